"""Narrow rows and output projections on edgecompute_ml's 4-bit kernel (``_kernels/q4.cpp``),
against torch's own kernels on the same weights, engines alternating call by call:

1. M = 1 against 1024 weight rows of 512, 576, 1024 and 1536 inputs, one thread: the kernel's
   cost per row and per group of 32 (a 576-wide row is 16 groups and a 2-group tail), beside
   torch's int4pack kernel (bfloat16 activations) on the same codes.
2. A Q8_0 output projection swept as a 4-bit screen (``quant.prepare(..., rows=True,
   screen=True)``: SmolLM2's 49152 x 576 head, Whisper tiny's 51864 x 384) against the per-row
   int8 form torch's ``_weight_int8pack_mm`` multiplies, M = 1, two threads: ``logits`` (the sweep
   plus the top 32 recomputed from the exact rows) and the bytes held.

    python benchmarks/q4_rows.py
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

ROWS = 1024
WIDTHS = [512, 576, 1024, 1536]
HEADS = [(49152, 576), (51864, 384)]


def _p10(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """10th-percentile microseconds a call, the engines alternating call by call."""
    for fn in fns.values():
        for _ in range(5):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter_ns()
            fn()
            times[name].append((time.perf_counter_ns() - start) / 1e3)
    return {name: sorted(t)[len(t) // 10] for name, t in times.items()}


def _codes(n: int, k: int, seed: int) -> quant.Q4Codes:
    g = torch.Generator().manual_seed(seed)
    return quant.quantize_q4(torch.randn(n, k, generator=g) * 0.05)


def narrow_rows() -> None:
    torch.set_num_threads(1)
    print(f"\n1. M = 1 against {ROWS} rows, one thread (10th percentile of 400 calls each)\n")
    print("| inputs | groups | ours (us) | ours a group (ns) | torch int4 (us) | ours / torch |")
    print("| --- | --- | --- | --- | --- | --- |")
    for k in WIDTHS:
        codes = _codes(ROWS, k, k)
        ours = quant.QuantizedLinear(codes)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.codes.to(torch.int32), 1)
        scales = torch.stack([codes.scale.t(), codes.offset.t()], dim=-1).to(torch.bfloat16).contiguous()
        x = torch.randn(1, k)
        xb = x.to(torch.bfloat16)
        torch_int4 = functools.partial(torch.ops.aten._weight_int4pack_mm_for_cpu, xb, packed, quant.GROUP, scales)
        t = _p10({"ours": functools.partial(ours, x), "torch": torch_int4}, 400)
        groups = ROWS * k // quant.GROUP
        print(f"| {k} | {k // quant.GROUP} | {t['ours']:.1f} | {t['ours'] * 1e3 / groups:.2f} | {t['torch']:.1f} | "
              f"{t['ours'] / t['torch']:.2f}x |")


def heads() -> None:
    import gguf
    import numpy as np

    from edgecompute_ml._formats.gguf import quantized_codes

    torch.set_num_threads(2)
    print("\n2. A Q8_0 output projection, M = 1, two threads: logits (sweep + exact top 32)\n")
    print("| weight | 4-bit screen (ms) | torch int8 rows (ms) | screen / int8 | held, screen / int8 (MB) | "
          "argmax agrees |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n, k in HEADS:
        data = np.random.default_rng(n).standard_normal((n, k)).astype(np.float32) * 0.05
        raw = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0).reshape(-1).view(np.uint8)
        codes = quantized_codes(raw, int(gguf.GGMLQuantizationType.Q8_0), (n, k))
        screened = quant.prepare(codes, rows=True, screen=True)
        plain = quant.prepare(codes, rows=True)
        x = torch.randn(1, k)
        t = _p10({"screen": functools.partial(quant.logits, x, screened),
                  "int8": functools.partial(quant.logits, x, plain)}, 60)
        xs = torch.randn(64, k)
        agree = int((quant.logits(xs, screened).argmax(-1) == quant.logits(xs, plain).argmax(-1)).sum())
        print(f"| {n} x {k} | {t['screen'] / 1e3:.2f} | {t['int8'] / 1e3:.2f} | {t['screen'] / t['int8']:.2f}x | "
              f"{quant.tensor_bytes(screened) / 1e6:.1f} / {quant.tensor_bytes(plain) / 1e6:.1f} | {agree}/64 |")


def main() -> None:
    if not build.load_q4():
        sys.exit(f"the 4-bit kernel is not in use: {build.q4_status()}")
    print(f"load {Path('/proc/loadavg').read_text().split()[:3]}, q4 ISA {torch.ops.edgecompute_ml.q4_isa(-1)} "
          "(1: AVX2, 2: AVX-512 VNNI)")
    narrow_rows()
    heads()


if __name__ == "__main__":
    main()
