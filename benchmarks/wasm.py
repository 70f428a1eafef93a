"""The wasm executor: latency, throughput, cold start and memory, snapshot on against snapshot off.

    python benchmarks/wasm.py [--requests 200] [--off-requests 40] [--burst 100] [--rss 5000] [--first 7]
                              [--cache DIR]

Prints one table. Every row but the naive one goes through the whole path: ``edgecompute.Runtime``
(the blocking face) running ``wasm/python`` on the ``wasm`` executor, a fresh sandbox per request.
The baseline of each ratio is measured in the same run: the same executor with ``snapshot = false``
(every sandbox boots CPython; a pool pre-starts them while traffic leaves it time), and the naive way
(a fresh store and instance per request running ``python -c``, JSON over stdin and stdout).
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
import types
from pathlib import Path
from typing import Any

from edgecompute import Registry, Runtime
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
            hits = ex.runtime().cache_stats.hits
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


def latencies(rt: Runtime, n: int, gap: float = 0.0) -> list[float]:
    out = []
    for _ in range(n):
        if gap:
            time.sleep(gap)
        t = time.perf_counter()
        r = rt.run("wasm/python", INPUTS, params={"source": SMALL})
        out.append(time.perf_counter() - t)
        assert r.outputs == {"sum": 5, "tag": "bench"}, r.outputs
    return out


def burst(rt: Runtime, n: int) -> float:
    """Requests per second for ``n`` requests submitted at once (``Runtime.map``)."""
    t = time.perf_counter()
    outputs = rt.map("wasm/python", [INPUTS] * n, params={"source": SMALL})
    dt = time.perf_counter() - t
    assert outputs == [{"sum": 5, "tag": "bench"}] * n
    return n / dt


def p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


def build_cost(runtime: Any, preload: tuple[str, ...]) -> tuple[float, float, int]:
    """Seconds to build the snapshot once (into a scratch cache folder), its boot's seconds, its size."""
    from edgecompute_wasm import _snapshot
    from edgecompute_wasm._cache import CacheStats
    from edgecompute_wasm._python import BOOTSTRAP
    from edgecompute_wasm._runtime import verified_runtime_bytes

    module, original = runtime.python.module, verified_runtime_bytes()
    with tempfile.TemporaryDirectory() as folder:
        scratch = types.SimpleNamespace(cache_dir=Path(folder), engine=runtime.engine, cache_stats=CacheStats())
        t = time.perf_counter()
        _snapshot.build(scratch, module, original, preload, BOOTSTRAP, "benchmark")
        seconds = time.perf_counter() - t
        manifest = _snapshot.manifest_path(Path(folder), preload)
        fields = dict(line.split("=", 1) for line in manifest.read_text().splitlines())
        return seconds, float(fields["boot_seconds"]), manifest.with_suffix(".wasm").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200, help="back-to-back requests, snapshot on")
    parser.add_argument("--off-requests", type=int, default=40, help="back-to-back requests, snapshot off")
    parser.add_argument("--burst", type=int, default=100, help="requests submitted at once")
    parser.add_argument("--rss", type=int, default=5000, help="requests for the memory figure")
    parser.add_argument("--first", type=int, default=7, help="new processes for the first-request figure (median)")
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--cache", default=None, help="disk cache folder (default: the executor's)")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    config: dict[str, Any] = {"pool_size": args.pool, "memory_mb": 128}
    if args.cache:
        config["cache_dir"] = args.cache
    rows: list[tuple[str, str, str, str]] = []

    on = WasmExecutor({**config, "snapshot": True})
    t0 = time.perf_counter()
    on.warm()  # builds the snapshot here if this cache folder has none yet
    load = time.perf_counter() - t0
    runtime = on.runtime()
    assert runtime is not None and runtime.python.snapshot is not None, "the snapshot could not be built"
    built_here = runtime.snapshot_build_seconds

    # -- naive baseline: fresh instance + interpreter start + JSON over stdin/stdout -------------------
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(INPUTS, f)
    naive = []
    for _ in range(10):
        t = time.perf_counter()
        assert naive_run(runtime, f.name) == {"sum": 5, "tag": "bench"}
        naive.append(time.perf_counter() - t)
    os.unlink(f.name)
    base = statistics.median(naive)

    # -- snapshot off: the same executor booting an interpreter per request (the baseline) -----------
    off = WasmExecutor({**config, "snapshot": False})
    with Runtime(Registry([off]), config=Config()) as rt:
        latencies(rt, 3)
        sparse = latencies(rt, 10, gap=0.2)
        off_b2b = latencies(rt, args.off_requests)
        off_rps = [burst(rt, args.burst) for _ in range(2)]
    off_med = statistics.median(off_b2b)

    # -- snapshot on ---------------------------------------------------------------------------------
    with Runtime(Registry([on]), config=Config()) as rt:
        latencies(rt, 5)
        b2b = latencies(rt, args.requests)
        on_rps = [burst(rt, args.burst) for _ in range(5)]
        # host RSS: after the first tenth of the requests, and after all of them
        chunk = max(1, args.rss // 10)
        rss_marks = []
        for _ in range(10):
            assert len(rt.map("wasm/python", [INPUTS] * chunk, params={"source": SMALL})) == chunk
            rss_marks.append(rss_mb())
        stats = runtime.python.stats()
    med = statistics.median(b2b)
    rows.append(("naive fresh instance, JSON via stdio", f"{base * 1e3:.1f} ms", "", ""))
    rows.append(("snapshot off, one request every 200 ms, median", f"{statistics.median(sparse) * 1e3:.2f} ms",
                 "", "sparse traffic: the pool hides the boot"))
    rows.append(("snapshot off, back to back, median", f"{off_med * 1e3:.2f} ms", "1.00x", ""))
    rows.append(("snapshot off, back to back, p90", f"{p90(off_b2b) * 1e3:.2f} ms", "", ""))
    rows.append(("snapshot on, back to back, median", f"{med * 1e3:.2f} ms", f"{off_med / med:.1f}x faster",
                 "PASS" if med <= 0.005 else "FAIL (<= 5 ms)"))
    rows.append(("snapshot on, back to back, p90", f"{p90(b2b) * 1e3:.2f} ms", "", ""))
    off_burst, on_burst = statistics.median(off_rps), statistics.median(on_rps)
    rows.append((f"snapshot off, {args.burst} submitted at once, median of {len(off_rps)}", f"{off_burst:.0f} req/s",
                 "1.00x", ""))
    rows.append((f"snapshot on, {args.burst} submitted at once, median of {len(on_rps)}", f"{on_burst:.0f} req/s",
                 f"{on_burst / off_burst:.1f}x", "PASS" if on_burst >= 10 * off_burst else "FAIL (>= 10x)"))
    rows.append(("  each burst, off | on", " ".join(f"{r:.0f}" for r in off_rps) + " | "
                 + " ".join(f"{r:.0f}" for r in on_rps), "", ""))
    growth = (rss_marks[-1] - rss_marks[0]) / rss_marks[0]
    rows.append((f"host RSS after {chunk} -> {chunk * 10} requests", f"{rss_marks[0]:.0f} -> {rss_marks[-1]:.0f} MB",
                 f"{growth * 100:+.1f}%", "PASS" if abs(growth) <= 0.10 else "FAIL (within 10%)"))
    rows.append(("  RSS after each tenth", " ".join(f"{m:.0f}" for m in rss_marks) + " MB", "", ""))

    asyncio.run(on.aclose())
    asyncio.run(off.aclose())

    # -- the snapshot's one-time cost, and the first request in a new process, warm disk cache ---------
    seconds, boot_seconds, size = build_cost(runtime, tuple(on.settings.preload))
    rows.append(("building the snapshot, once per cache folder", f"{seconds:.1f} s", "",
                 f"boot {boot_seconds:.2f} s + compile; {size / 2**20:.0f} MiB module"))
    code = first_request_code(config)
    firsts = []
    for _ in range(max(1, args.first)):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        first, with_imports, hits, _ = out.stdout.split()
        assert hits == "1", "the disk cache was not used"
        firsts.append((float(first), float(with_imports)))
    first = statistics.median(f for f, _ in firsts)
    with_imports = statistics.median(w for _, w in firsts)
    rows.append(("first request, new process, warm cache, median", f"{first * 1e3:.0f} ms", "",
                 "PASS" if first <= 0.150 else "FAIL (<= 150 ms)"))
    rows.append((f"  the same, min - max of {len(firsts)} processes",
                 f"{min(f for f, _ in firsts) * 1e3:.0f} - {max(f for f, _ in firsts) * 1e3:.0f} ms", "", ""))
    rows.append(("  the same, counting imports of edgecompute + wasmtime", f"{with_imports * 1e3:.0f} ms", "", ""))

    print(f"wasm executor benchmark  (cpus={os.cpu_count()}, load average {load_start:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end, runtime load {load:.2f} s"
          + (f" (snapshot built in it: {built_here:.1f} s)" if built_here else "")
          + f", cache {dict(vars(runtime.cache_stats))})")
    print(f"{'measure':56} {'value':>18} {'ratio':>13}  target")
    for name, value, ratio, verdict in rows:
        print(f"{name:56} {value:>18} {ratio:>13}  {verdict}")
    print(f"sandboxes: {stats}; max host RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
