"""edgecompute_ml's 4-bit kernel (``_kernels/q4.cpp``) as a git revision has it, against the
working tree's, in one process, calls alternating: the way to judge a kernel change on a noisy
machine.

Why one process: on a shared VM a whole process can land in a slow or a fast mode (the same
1024 x 576 product measured ~47 us in one process and ~72 us in the next, for as long as each
lived), so timing the two sources in turn, process by process, says nothing. Here the revision's
source is compiled under another op namespace (``edgecompute_ml_rev``) and loaded beside the
working tree's; every shape checks that the two agree, then times them call by call.

    python benchmarks/q4_ab.py                # HEAD against the working tree
    python benchmarks/q4_ab.py HEAD~3 --threads 1
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

from edgecompute_ml._formats import quant
from edgecompute_ml._kernels import build

SOURCE = "edgecompute_ml/src/edgecompute_ml/_kernels/q4.cpp"
# (inputs, activation rows): SmolLM2's 576 and 1536, Whisper's 384 (a 12-group short block),
# Qwen2-0.5B's 896 (a block and 12), Llama-3.2-1B's 2048; decode (1 row) and a short prompt
SHAPES = [(384, 1), (576, 1), (896, 1), (1536, 1), (2048, 1), (576, 7), (2048, 8)]
ROWS = 1024


def compile_revision(rev: str, out: Path) -> Path:
    """The kernel's source at ``rev``, its op library renamed, compiled into ``out``."""
    root = Path(__file__).resolve().parent.parent
    text = subprocess.run(["git", "show", f"{rev}:{SOURCE}"], cwd=root, check=True, capture_output=True,
                          text=True).stdout
    text = text.replace("TORCH_LIBRARY_FRAGMENT(edgecompute_ml,", "TORCH_LIBRARY_FRAGMENT(edgecompute_ml_rev,")
    text = text.replace("TORCH_LIBRARY_IMPL(edgecompute_ml,", "TORCH_LIBRARY_IMPL(edgecompute_ml_rev,")
    source, library = out / "q4_rev.cpp", out / "q4_rev.so"
    source.write_text(text)
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()]
    rpath = [f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()]
    subprocess.run(["g++", "-std=c++20", "-O3", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-w", abi,
                    *includes, str(source), "-o", str(library), *libs, "-ltorch_cpu", "-lc10", *rpath], check=True)
    return library


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rev", nargs="?", default="HEAD")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args()
    if not build.load_q4():
        sys.exit(f"the working tree's 4-bit kernel is not in use: {build.q4_status()}")
    with tempfile.TemporaryDirectory() as tmp:
        torch.ops.load_library(str(compile_revision(args.rev, Path(tmp))))
    torch.set_num_threads(args.threads)
    ours, theirs = torch.ops.edgecompute_ml.q4_linear, torch.ops.edgecompute_ml_rev.q4_linear
    print(f"q4 ISA {torch.ops.edgecompute_ml.q4_isa(-1)} (1: AVX2, 2: AVX-512 VNNI), {args.threads} threads, "
          f"{ROWS} weight rows, 10th percentile of {args.calls} calls each, alternating\n")
    print(f"| inputs | rows | {args.rev} (us) | working tree (us) | tree / {args.rev} |")
    print("| --- | --- | --- | --- | --- |")
    for k, m in SHAPES:
        g = torch.Generator().manual_seed(k)
        codes = quant.Q4Codes(torch.randint(0, 16, (ROWS, k), dtype=torch.uint8, generator=g),
                              (torch.rand(ROWS, k // 32, generator=g) * 0.1).half().float(),
                              (torch.rand(ROWS, k // 32, generator=g) * 0.1).half().float())
        w = quant.QuantizedLinear(codes)
        call = (torch.randn(m, k, generator=g), w.packed, w.scales, w.low)
        torch.testing.assert_close(ours(*call), theirs(*call), rtol=1e-5, atol=1e-4)
        times: dict[str, list[float]] = {"rev": [], "tree": []}
        for _ in range(20):
            ours(*call)
            theirs(*call)
        for _ in range(args.calls):
            for name, op in (("rev", theirs), ("tree", ours)):
                start = time.perf_counter_ns()
                op(*call)
                times[name].append((time.perf_counter_ns() - start) / 1e3)
        rev, tree = (sorted(times[n])[args.calls // 10] for n in ("rev", "tree"))
        print(f"| {k} | {m} | {rev:.1f} | {tree:.1f} | {tree / rev:.2f}x |")


if __name__ == "__main__":
    main()
