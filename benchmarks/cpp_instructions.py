"""Instructions per call of the cpp/sum hot paths, counted under callgrind.

    python benchmarks/cpp_instructions.py [--root .] [--paths direct,execute,sched,noop] [--n 300,1300]

Each path runs in a fresh interpreter under ``valgrind --tool=callgrind`` twice, with N1 and N2
calls after 200 warm-up calls; instructions per call = (I(N2) - I(N1)) / (N2 - N1), so start-up,
imports and plugin loading cancel out. The executor gets inline_below_us=1e9: under valgrind the
call is ~50x slower and would otherwise leave the loop for a worker thread, unlike at native speed.
The bundled plugin is built for this run without AVX-512 (into a private cache): valgrind 3.19
cannot decode those instructions, and -march=native emits them where the CPU has them.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile

CHILD = r'''
import asyncio, sys, time
import numpy as np
from edgecompute import Config, Registry, Request, Resources, Response, Scheduler
from edgecompute.models import Algorithm
from edgecompute_cpp import CppExecutor

path, n = sys.argv[1], int(sys.argv[2])
cpp = CppExecutor(inline_below_us=1e9)
x = np.ones(16, np.float32)

class Ctx:
    def __init__(self):
        self.algorithm = next(a for a in cpp.algorithms() if a.name == "sum")
        self.deadline = None
        self.running = 1
    async def run_sync(self, fn, *args):
        return fn(*args)

class Noop:
    name = "noop"
    version = "0"
    def algorithms(self):
        return [Algorithm("sum", resources=Resources(cpu=1.0))]
    def requirements(self, request):
        return self._res
    _res = Resources(cpu=1.0)
    async def execute(self, request, ctx):
        return Response(None)
    async def health(self):
        pass
    async def aclose(self):
        pass

if path == "direct":
    sys.path.insert(0, BENCHMARKS)
    from cffi_direct import direct_sum
    direct = direct_sum(cpp._ensure().plugins["builtin"].native.lib, x)
    for _ in range(200 + n):
        direct()
elif path == "execute":
    async def main():
        ctx = Ctx()
        request = Request("cpp/sum", x)
        for _ in range(200 + n):
            await cpp.execute(request, ctx)
    asyncio.run(main())
else:
    ex = cpp if path == "sched" else Noop()
    algo = "cpp/sum" if path == "sched" else "noop/sum"
    async def main():
        async with Scheduler(Registry([ex]), capacity=Resources(cpu=2, memory_mb=1024), config=Config()) as s:
            for _ in range(200 + n):
                await s.run(algo, x)
    asyncio.run(main())
'''


def instructions(python: str, script: str, path: str, n: int, env: dict[str, str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        proc = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                               python, script, path, str(n)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{path} N={n} failed:\n{proc.stderr[-3000:]}")
        match = re.search(r"Collected : (\d+)", proc.stderr)
        assert match, proc.stderr[-2000:]
        return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=os.getcwd())
    parser.add_argument("--paths", default="direct,execute,sched,noop")
    parser.add_argument("--n", default="300,1300")
    args = parser.parse_args()
    n1, n2 = (int(v) for v in args.n.split(","))
    python = os.path.join(args.root, ".venv", "bin", "python")
    tmp = tempfile.TemporaryDirectory()
    script = os.path.join(tmp.name, "child.py")
    with open(script, "w") as f:
        f.write(f"BENCHMARKS = {os.path.dirname(os.path.abspath(__file__))!r}\n" + CHILD)
    compiler = os.path.join(tmp.name, "cxx")
    with open(compiler, "w") as f:  # the last -m flag wins over -march=native
        f.write(f'#!/bin/sh\nexec {os.environ.get("CXX", "c++")} "$@" -mno-avx512f\n')
    os.chmod(compiler, 0o755)
    env = dict(os.environ, PYTHONHASHSEED="0", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               CXX=compiler, EDGECOMPUTE_CPP_CACHE=os.path.join(tmp.name, "cache"))
    try:
        # build once here, not in the children (and not under valgrind)
        subprocess.run([python, "-c", "from edgecompute_cpp._build import build_builtin; build_builtin()"],
                       env=env, check=True)
        results = {}
        for path in args.paths.split(","):
            with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the two runs in parallel
                fa = pool.submit(instructions, python, script, path, n1, env)
                fb = pool.submit(instructions, python, script, path, n2, env)
                a, b = fa.result(), fb.result()
            results[path] = (b - a) / (n2 - n1)
            print(f"{path:8} {results[path]:10.0f} instructions/call", flush=True)
        if "direct" in results:
            for path, value in results.items():
                if path != "direct":
                    print(f"{path:8} {value - results['direct']:+10.0f} above direct")
    finally:
        tmp.cleanup()


if __name__ == "__main__":
    main()
