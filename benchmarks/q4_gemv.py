"""GEMV micro table: edgecompute_ml's 4-bit kernel (``_kernels/q4.cpp``) against torch's int4pack
kernel on the same codes (bfloat16 activations for torch), M = 1 and 4; min / median of single
calls, GB/s = bytes held / min time.

    python benchmarks/q4_gemv.py [threads]
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from edgecompute_ml._formats import quant
from edgecompute_ml._kernels import build

SHAPES = [(2048, 8192), (128256, 2048)]  # a Llama-3.2-1B down projection, its tied output projection


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    times.sort()
    return times[0] / 1e6, times[len(times) // 2] / 1e6


def main() -> None:
    if not build.load_q4():
        sys.exit(f"the 4-bit kernel is not in use: {build.q4_status()}")
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    print(f"threads {torch.get_num_threads()}, load {Path('/proc/loadavg').read_text().split()[:3]}")
    print("| weight [N x K] | M | ours ms (min / median) | ours GB/s | torch int4pack ms (min / median) "
          "| torch GB/s | torch / ours |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n, k in SHAPES:
        codes = quant.Q4Codes(torch.randint(0, 16, (n, k), dtype=torch.uint8),
                              torch.rand(n, k // 32).half().float() * 0.1, torch.zeros(n, k // 32))
        ours = quant.QuantizedLinear(codes)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.codes.int(), 1)
        scales = torch.stack([codes.scale.t(), torch.zeros(k // 32, n)], -1).bfloat16().contiguous()
        del codes
        ours_bytes, torch_bytes = ours.nbytes, packed.numel() + scales.numel() * 2
        for m in (1, 4):
            x = torch.randn(m, k)
            xb = x.bfloat16()
            repeats = 200 if n * k < 10**8 else 30
            a = _time(functools.partial(ours, x), repeats)
            b = _time(functools.partial(torch.ops.aten._weight_int4pack_mm_for_cpu, xb, packed, 32, scales), repeats)
            print(f"| {n} x {k} | {m} | {a[0]:.3f} / {a[1]:.3f} | {ours_bytes / a[0] / 1e6:.1f} "
                  f"| {b[0]:.3f} / {b[1]:.3f} | {torch_bytes / b[0] / 1e6:.1f} | {b[0] / a[0]:.2f}x |")


if __name__ == "__main__":
    main()
