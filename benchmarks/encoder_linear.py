"""The float32 linears of an encoder: edgecompute_ml's kernel (``_kernels/linear.cpp``, weights in
blocks of 16 columns with AVX-512, 8 with AVX2) against oneDNN's packed inner product (what
torch's inductor freezing and edgecompute_ml's fallback use) and ``F.linear`` (MKL), on
all-MiniLM-L6-v2's 24 layer shapes.

    nice -n 10 python benchmarks/encoder_linear.py [--rows 10,64,768] [--threads 2] [--repeats 200]

Each pass runs the 24 linears of the 6 layers in order, as a forward does (q/k/v 384 -> 1152,
output 384 -> 384 with the residual added, FFN 384 -> 1536 with GELU, 1536 -> 384 with the
residual): 42 MB of weights, distinct per layer, so the weights stream from memory as they do in
a real forward, not from cache. The engines take turns pass by pass (A B C A B C ...); the table
gives each one's median pass and the ratios to oneDNN, the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from edgecompute_ml._architectures.dense import pack_blocks
from edgecompute_ml._kernels import build

HIDDEN, INTER, LAYERS = 384, 1536, 6


def _layers(g: torch.Generator) -> list[list[tuple[torch.Tensor, torch.Tensor, str]]]:
    """Per layer: (weight, bias, what follows) for q/k/v, output, FFN in, FFN out."""
    shapes = [(3 * HIDDEN, HIDDEN, "none"), (HIDDEN, HIDDEN, "add"), (INTER, HIDDEN, "gelu"), (HIDDEN, INTER, "add")]
    return [[(torch.randn(n, k, generator=g) * k ** -0.5, torch.randn(n, generator=g), post) for n, k, post in shapes]
            for _ in range(LAYERS)]


def _engines(layers: list[list[tuple[torch.Tensor, torch.Tensor, str]]]) -> dict[str, Callable[..., None]]:
    """Each engine runs a pass: per layer, the four linears over ``x`` [rows, 384] (the FFN's second
    over ``inter`` [rows, 1536]), adding ``x`` as the residual where a forward does."""
    blocks = [[(pack_blocks(w), b, post) for w, b, post in layer] for layer in layers]
    onednn = [[(torch.ops.mkldnn._reorder_linear_weight(w, None), b, post) for w, b, post in layer]
              for layer in layers]

    def ours(x: torch.Tensor, inter: torch.Tensor) -> None:
        for layer in blocks:
            for i, (w, b, post) in enumerate(layer):
                torch.ops.edgecompute_ml.f32_linear(inter if i == 3 else x, w, b, x if post == "add" else None,
                                                    b.shape[0], post == "gelu")

    def dnnl(x: torch.Tensor, inter: torch.Tensor) -> None:
        for layer in onednn:
            for i, (w, b, post) in enumerate(layer):
                src = inter if i == 3 else x
                if post == "add":
                    torch.ops.mkldnn._linear_pointwise(src, other=x, W=w, B=b, attr="add")
                else:  # GELU fused into oneDNN's kernel ("none": erf)
                    torch.ops.mkldnn._linear_pointwise(src, w, b, post, [], "none" if post == "gelu" else "")

    def mkl(x: torch.Tensor, inter: torch.Tensor) -> None:
        for layer in layers:
            for i, (w, b, post) in enumerate(layer):
                y = F.linear(inter if i == 3 else x, w, b)
                if post == "add":
                    y += x
                elif post == "gelu":
                    F.gelu(y)

    return {"edgecompute_ml": ours, "oneDNN packed": dnnl, "F.linear (MKL)": mkl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="10,64,768")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not build.load_linear():
        raise SystemExit(f"the kernel is not in use: {build.linear_status()}")
    isa = {2: "AVX-512F", 1: "AVX2"}.get(int(torch.ops.edgecompute_ml.linear_isa(-1)), "?")
    layers = _layers(torch.Generator().manual_seed(0))
    engines = _engines(layers)
    print(f"MiniLM's 24 linears a pass, {args.threads} threads, kernel ISA {isa}; median ms a pass "
          "(ratio: / oneDNN packed)")
    print(f"| rows | {' | '.join(engines)} | ours / oneDNN |")
    print("| --- |" + " --- |" * (len(engines) + 1))
    for rows in (int(r) for r in args.rows.split(",")):
        g = torch.Generator().manual_seed(rows)
        x, inter = torch.randn(rows, HIDDEN, generator=g), torch.randn(rows, INTER, generator=g)
        repeats = max(5, args.repeats * 10 // max(10, rows))
        times: dict[str, list[float]] = {name: [] for name in engines}
        with torch.inference_mode():
            for fn in engines.values():
                fn(x, inter)  # warm: first-call setup (oneDNN's primitive cache)
            for _ in range(repeats):
                for name, fn in engines.items():
                    start = time.perf_counter()
                    fn(x, inter)
                    times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        cells = " | ".join(f"{med[name]:.3f}" for name in engines)
        print(f"| {rows} | {cells} | {med['edgecompute_ml'] / med['oneDNN packed']:.2f}x |")


if __name__ == "__main__":
    main()
