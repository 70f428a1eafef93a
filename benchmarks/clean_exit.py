"""A script that uses the ml, wasm and cpp executors through ``Runtime``, run many times in a row.

    python benchmarks/clean_exit.py [--runs 200] [--jobs 1] [--close {with,never}]

Each run is a fresh process doing what an application does: ``with Runtime() as rt:`` (or, with
``--close never``, a started Runtime that is never closed), one embedding with the pretrained
all-MiniLM-L6-v2, one ``wasm/python`` call and one ``cpp/gaussian_blur``, then a normal exit.
Prints the count of runs that exited with code 0 and the codes of the others. Before the fix in
``edgecompute/_atexit.py`` about 1 run in 10 aborted at exit (code 134: "terminate called without
an active exception"), with threads still inside torch while the interpreter finalised.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

SCRIPT = """
import numpy as np
from edgecompute import Runtime

def work(rt):
    vectors = rt.run("ml/embeddings", ["a first sentence", "and a second one"],
                     params={"model": "all-minilm-l6-v2"}).outputs
    assert len(vectors) == 2 and len(vectors[0]) == 384
    assert rt.run("wasm/python", {"n": 20}, params={"source": "def main(i):\\n    return sum(range(i['n']))\\n"}
                  ).outputs == 190
    blurred = rt.run("cpp/gaussian_blur", {"image": np.ones((64, 64), np.float32)}, params={"sigma": 1.5}).outputs
    assert abs(float(np.asarray(blurred).mean()) - 1.0) < 1e-3

if CLOSE == "with":
    with Runtime() as rt:
        work(rt)
else:
    rt = Runtime()
    rt.start()
    work(rt)
"""


def one(close: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-c", f"CLOSE = {close!r}\n" + SCRIPT], capture_output=True,
                          text=True, timeout=300)
    return done.returncode, done.stderr.strip().splitlines()[-1] if done.returncode and done.stderr else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=1, help="processes at once")
    parser.add_argument("--close", choices=["with", "never"], default="with")
    args = parser.parse_args()
    start = time.perf_counter()
    codes: collections.Counter[int] = collections.Counter()
    last_error: dict[int, str] = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        for code, error in pool.map(lambda _: one(args.close), range(args.runs)):
            codes[code] += 1
            if error:
                last_error[code] = error
    print(f"{codes[0]} of {args.runs} runs exited with code 0 ({time.perf_counter() - start:.0f} s, "
          f"close={args.close}, jobs={args.jobs})")
    for code, count in sorted(codes.items()):
        if code:
            print(f"  exit {code}: {count} runs; last stderr line: {last_error.get(code, '')}")
    return 0 if codes[0] == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
