"""The wasm executor's first request in a new process (warm disk cache), paired A/B.

    python benchmarks/wasm_first_request.py [--rounds 20] [--variant PYTHONPATH ...]

Each process runs the code of ``benchmarks/wasm.py`` section 2: it imports edgecompute and
edgecompute_wasm, then times from just before ``WasmExecutor(...)`` to the response of one
``Scheduler.run("wasm/python", ...)``. With ``--variant`` given several times (a ``PYTHONPATH`` that
puts another checkout first, ``""`` for the installed one), the variants run one after the other
in every round, so load from other work hits them alike. The script prints each variant's median,
min and max, and with two variants the median of the paired differences. A shared machine makes
single figures move by tens of milliseconds, so compare the variants within one run.

An old checkout for comparison:  git archive COMMIT | tar -x -C /tmp/old, then
``--variant /tmp/old/edgecompute_wasm/src:/tmp/old --variant ""``. The .pyc files must exist for
both (run each once without ``PYTHONDONTWRITEBYTECODE``); this script unsets that variable.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from wasm import first_request_code  # the script of benchmarks/wasm.py section 2

CODE = first_request_code({"pool_size": 8, "memory_mb": 128})


def once(pythonpath: str) -> tuple[float, float]:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    else:
        env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True, env=env)
    first, _, hits, start = out.stdout.split()
    if hits != "1":
        raise SystemExit("the disk cache was not used: run benchmarks/wasm.py once to fill it")
    return float(first) * 1e3, float(start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--variant", action="append", default=None, help="a PYTHONPATH; '' for the installed code")
    args = parser.parse_args()
    variants = args.variant if args.variant is not None else [""]
    for v in variants:  # warm-up: page cache, .pyc files
        once(v)
    load = os.getloadavg()[0]
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            results[v].append(once(v))
    print(f"first request in a new process, {args.rounds} rounds, load average {load:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} at the end")
    for v, rs in results.items():
        firsts = [f for f, _ in rs]
        print(f"  {v or '(installed)'}: median {statistics.median(firsts):.1f} ms, min {min(firsts):.1f}, "
              f"max {max(firsts):.1f}; interpreter start (sandbox_start) median "
              f"{statistics.median(s for _, s in rs):.1f} ms; under 150 ms in {sum(f < 150 for f in firsts)} of "
              f"{len(firsts)}")
    if len(variants) == 2:
        a, b = (results[v] for v in variants)
        diffs = [x - y for (x, _), (y, _) in zip(a, b, strict=True)]
        print(f"  paired difference (first variant minus second): median {statistics.median(diffs):.1f} ms, "
              f"the second faster in {sum(d > 0 for d in diffs)} of {len(diffs)} rounds")


if __name__ == "__main__":
    main()
