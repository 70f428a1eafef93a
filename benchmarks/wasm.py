"""The wasm executor: latency, cold start, concurrency and memory, against a naive sandbox.

    python benchmarks/wasm.py [--requests 40] [--throughput 48] [--rss 500] [--first 7] [--cache DIR]

Prints one table. The baseline is the naive way: a fresh wasmtime store and instance per request
running ``python -c`` that reads the request as JSON from stdin and prints the answer as JSON
(same engine, same compiled module). Every edgecompute row goes through the whole path: a
``Scheduler`` running ``wasm/python`` on the ``wasm`` executor, a fresh sandbox per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

from edgecompute import Registry, Resources, Scheduler
from edgecompute.config import Config
from edgecompute_wasm.executor import WasmExecutor

SMALL = "def main(inputs):\n    return {'sum': inputs['a'] + inputs['b'], 'tag': inputs['tag']}\n"
INPUTS = {"a": 2, "b": 3, "tag": "bench"}


def first_request_code(config: dict[str, Any]) -> str:
    """A script for a new process: it imports edgecompute and the wasm executor, runs one request
    and prints the seconds from ``WasmExecutor(config)`` to the response, the same counting the
    imports, the disk cache's hits, and the response's sandbox_start timing (also seconds)."""
    return textwrap.dedent(f"""
        import time
        t0 = time.perf_counter()
        import asyncio
        from edgecompute import Registry, Resources, Scheduler
        from edgecompute.config import Config
        from edgecompute_wasm.executor import WasmExecutor
        async def main():
            t1 = time.perf_counter()
            ex = WasmExecutor({config!r})
            async with Scheduler(Registry([ex]), capacity=Resources(cpu=2, memory_mb=10**6), config=Config()) as s:
                r = await s.run("wasm/python", {INPUTS!r}, params={{"source": {SMALL!r}}})
            t2 = time.perf_counter()
            assert r.outputs == {{"sum": 5, "tag": "bench"}}, r.outputs
            hits = ex._runtime.cache_stats.hits
            await ex.aclose()
            return t2 - t1, t2 - t0, hits, r.timings["sandbox_start"]
        print(*asyncio.run(main()))
    """)

NAIVE = textwrap.dedent("""
    import json, sys
    exec(compile(sys.argv[1], '<guest>', 'exec'), scope := {})
    print(json.dumps(scope['main'](json.loads(sys.stdin.read()))))
""")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def naive_run(runtime, stdin_path: str) -> dict:
    import wasmtime

    store = wasmtime.Store(runtime.engine.engine)
    out: list[bytes] = []
    try:
        store.set_epoch_deadline(runtime.engine.ticks(30))
        wasi = wasmtime.WasiConfig()
        wasi.argv = ["python", "-c", NAIVE, SMALL]
        wasi.stdin_file = stdin_path
        wasi.stdout_custom = out.append
        store.set_wasi(wasi)
        linker = wasmtime.Linker(runtime.engine.engine)
        linker.define_wasi()
        instance = linker.instantiate(store, runtime.python_module)
        try:
            instance.exports(store)["_start"](store)
        except wasmtime.ExitTrap as exc:
            if exc.code:
                raise
    finally:
        store.close()
    return json.loads(b"".join(out))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=40, help="requests for each latency figure")
    parser.add_argument("--throughput", type=int, default=48, help="requests for each throughput figure")
    parser.add_argument("--rss", type=int, default=500, help="requests for the memory figure")
    parser.add_argument("--first", type=int, default=7, help="new processes for the first-request figure (median)")
    parser.add_argument("--pool", type=int, default=8)
    parser.add_argument("--cache", default=None, help="disk cache folder (default: the executor's)")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    config: dict[str, Any] = {"pool_size": args.pool, "memory_mb": 128}
    if args.cache:
        config["cache_dir"] = args.cache
    executor = WasmExecutor(config)
    t0 = time.perf_counter()
    executor.warm()
    load = time.perf_counter() - t0
    runtime = executor._runtime
    rows: list[tuple[str, str, str, str]] = []

    # -- naive baseline: fresh instance + interpreter start + JSON over stdin/stdout -------------------
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(INPUTS, f)
    naive = []
    for _ in range(max(5, args.requests // 4)):
        t = time.perf_counter()
        assert naive_run(runtime, f.name) == {"sum": 5, "tag": "bench"}
        naive.append(time.perf_counter() - t)
    os.unlink(f.name)
    base = statistics.median(naive)
    rows.append(("naive fresh instance, JSON via stdio (baseline)", f"{base * 1e3:.1f} ms", "1.00x", ""))

    registry = Registry([executor])
    capacity = Resources(cpu=os.cpu_count() or 2, memory_mb=1_000_000)
    async with Scheduler(registry, capacity=capacity, config=Config()) as s:
        request = {"source": SMALL}
        pool = runtime.python

        async def pool_ready() -> None:
            for _ in range(400):
                if pool.stats()["idle"] >= 1:
                    return
                await asyncio.sleep(0.01)

        # -- 1. warm latency: one request at a time, each in a fresh pre-started sandbox -----------------
        for _ in range(3):
            await pool_ready()
            await s.run("wasm/python", INPUTS, params=request)
        warm = []
        for _ in range(args.requests):
            await pool_ready()
            t = time.perf_counter()
            r = await s.run("wasm/python", INPUTS, params=request)
            warm.append(time.perf_counter() - t)
            assert r.outputs == {"sum": 5, "tag": "bench"}
        med = statistics.median(warm)
        p90 = sorted(warm)[int(0.9 * (len(warm) - 1))]
        rows.append(("wasm/python warm, median", f"{med * 1e3:.2f} ms", f"{base / med:.1f}x faster",
                     "PASS" if med <= 0.005 else "FAIL (<= 5 ms)"))
        rows.append(("wasm/python warm, p90", f"{p90 * 1e3:.2f} ms", f"{base / p90:.1f}x faster", ""))

        # -- 3. throughput: 1 at a time vs 8 in flight, sustained (the pool must keep up) --------------
        async def throughput(concurrency: int) -> tuple[float, float]:
            await pool_full()
            n = args.throughput
            sem = asyncio.Semaphore(concurrency)

            async def one() -> None:
                async with sem:
                    await s.run("wasm/python", INPUTS, params=request)

            t, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*(one() for _ in range(n)))
            return n / (time.perf_counter() - t), (time.process_time() - cpu) / n

        async def pool_full() -> None:
            for _ in range(300):  # up to 15 s
                if pool.stats()["idle"] >= args.pool:
                    return
                await asyncio.sleep(0.05)

        rps1, cpu1 = await throughput(1)
        rps8, cpu8 = await throughput(8)
        rows.append(("throughput, 1 at a time", f"{rps1:.1f} req/s", "", ""))
        rows.append(("throughput, 8 concurrent", f"{rps8:.1f} req/s", f"{rps8 / rps1:.2f}x of 1",
                     "PASS" if rps8 >= 1.6 * rps1 else "FAIL (>= 1.6x)"))
        rows.append(("  host CPU per request (1 at a time / 8 concurrent)", f"{cpu1 * 1e3:.0f} / {cpu8 * 1e3:.0f} ms",
                     "", ""))
        naive_rps = 1 / base
        rows.append(("naive baseline throughput, 1 at a time", f"{naive_rps:.1f} req/s", "", ""))

        # -- 4. host RSS over many requests ----------------------------------------------------------------
        n = args.rss
        sem = asyncio.Semaphore(4)

        async def one_rss(i: int) -> None:
            async with sem:
                await s.run("wasm/python", {"a": i, "b": 1, "tag": "x" * 100}, params=request)

        # measured with the pool full both times, so idle interpreters do not count as growth
        await asyncio.gather(*(one_rss(i) for i in range(50)))
        await pool_full()
        rss_start = rss_mb()
        marks = []
        for _ in range(5):
            await asyncio.gather(*(one_rss(i) for i in range(n // 5)))
            await pool_full()
            marks.append(rss_mb())
        rss_end = marks[-1]
        growth = rss_end - rss_start
        rows.append((f"host RSS over {n} requests", f"{rss_start:.0f} -> {rss_end:.0f} MB", f"{growth:+.1f} MB",
                     "PASS" if growth < 16 else "FAIL (grows)"))
        rows.append(("  RSS after each fifth", " ".join(f"{m:.0f}" for m in marks) + " MB", "", ""))
        stats = pool.stats()

    await executor.aclose()

    # -- 2. first request in a new process, warm disk cache ------------------------------------------------
    code = first_request_code(config)
    firsts = []
    for _ in range(max(1, args.first)):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)  # noqa: ASYNC221
        first, with_imports, hits, _ = out.stdout.split()
        assert hits == "1", "the disk cache was not used"
        firsts.append((float(first), float(with_imports)))
    first = statistics.median(f for f, _ in firsts)
    with_imports = statistics.median(w for _, w in firsts)
    rows.insert(3, ("first request, new process, warm disk cache, median", f"{first * 1e3:.0f} ms",
                    f"{base / first:.2f}x", "PASS" if first <= 0.150 else "FAIL (<= 150 ms)"))
    rows.insert(4, (f"  the same, min - max of {len(firsts)} processes",
                    f"{min(f for f, _ in firsts) * 1e3:.0f} - {max(f for f, _ in firsts) * 1e3:.0f} ms", "", ""))
    rows.insert(5, ("  the same, counting imports of edgecompute + wasmtime", f"{with_imports * 1e3:.0f} ms", "", ""))

    print(f"wasm executor benchmark  (cpus={os.cpu_count()}, load average {load_start:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end, "
          f"pool_size={args.pool}, runtime load {load:.2f} s, cache {dict(vars(runtime.cache_stats))})")
    print(f"{'measure':56} {'value':>18} {'vs baseline':>13}  target")
    for name, value, ratio, verdict in rows:
        print(f"{name:56} {value:>18} {ratio:>13}  {verdict}")
    print(f"pool: {stats}; max host RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    asyncio.run(main())
