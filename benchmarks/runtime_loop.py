"""A blocking ``Runtime.run()`` of trivial blocking code, on each loop the Runtime can run, against
what a synchronous caller would pick instead.

    nice -n 10 python benchmarks/runtime_loop.py [--calls 200] [--rounds 20]

Rows, taking turns in one process (rounds of ``--calls`` calls each, the order flipped every
round), median and 10th percentile per call, and the process's CPU time per call (all threads:
less sensitive than wall time to other load on the machine):

- ``Runtime(loop="uvloop")`` and ``Runtime(loop="asyncio")``: ``rt.run()`` of an algorithm whose
  code runs on a worker thread (``ctx.run_sync``): caller -> loop -> thread -> loop -> caller;
- a bare asyncio loop on a thread, fed with ``asyncio.run_coroutine_threadsafe`` a coroutine that
  awaits ``loop.run_in_executor``: the same crossings, with no scheduler (the baseline);
- ``ThreadPoolExecutor.submit(fn).result()``: one crossing each way, no loop at all (a floor).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import statistics
import threading
import time
from collections.abc import Callable

from edgecompute import Config, FunctionExecutor, Registry, Resources, Runtime, TaskContext


def _work(x: int) -> int:
    return x + 1


def _executor() -> FunctionExecutor:
    executor = FunctionExecutor("bench")

    @executor.algorithm(resources=Resources(cpu=1))
    async def blocking(x: int, *, ctx: TaskContext) -> int:
        return await ctx.run_sync(_work, x)

    return executor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    runtimes = {loop: Runtime(Registry([_executor()]), config=Config(), loop=loop) for loop in ("uvloop", "asyncio")}
    for rt in runtimes.values():
        rt.start()

    bare = asyncio.new_event_loop()
    threading.Thread(target=bare.run_forever, daemon=True).start()

    async def bare_call(x: int) -> int:
        return await bare.run_in_executor(None, _work, x)

    pool = concurrent.futures.ThreadPoolExecutor(1)
    rows: dict[str, Callable[[int], object]] = {
        'Runtime(loop="uvloop").run': lambda x: runtimes["uvloop"].run("bench/blocking", x),
        'Runtime(loop="asyncio").run': lambda x: runtimes["asyncio"].run("bench/blocking", x),
        "bare asyncio loop + run_in_executor": lambda x: asyncio.run_coroutine_threadsafe(bare_call(x), bare).result(),
        "ThreadPoolExecutor.submit().result()": lambda x: pool.submit(_work, x).result(),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    cpu: dict[str, float] = dict.fromkeys(rows, 0.0)  # the process's CPU time (all threads), per row
    for call in rows.values():  # warm-up
        for i in range(200):
            call(i)
    for r in range(args.rounds):
        for name in (list(rows) if r % 2 else list(rows)[::-1]):
            call = rows[name]
            cpu_start = time.process_time()
            for i in range(args.calls):
                start = time.perf_counter()
                call(i)
                times[name].append(time.perf_counter() - start)
            cpu[name] += time.process_time() - cpu_start
    for rt in runtimes.values():
        rt.close()
    bare.call_soon_threadsafe(bare.stop)
    pool.shutdown()

    base = statistics.median(times["bare asyncio loop + run_in_executor"])
    print(f"blocking call of trivial code, {args.rounds} rounds x {args.calls} calls, taking turns\n")
    print("| path | median (us) | p10 (us) | x bare asyncio | CPU time a call (us, all threads) |")
    print("| --- | --- | --- | --- | --- |")
    for name, values in times.items():
        values.sort()
        median = statistics.median(values)
        print(f"| {name} | {median * 1e6:.1f} | {values[len(values) // 10] * 1e6:.1f} | {median / base:.2f}x | "
              f"{cpu[name] / len(values) * 1e6:.1f} |")
    with open("/proc/loadavg") as f:
        print(f"\nload average: {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    main()
