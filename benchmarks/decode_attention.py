"""A decode step's attention, all layers of one token: edgecompute_ml's one-query kernel
(``_kernels/attention.cpp``) against torch's ``scaled_dot_product_attention``, over the whole
cache under a mask (what a shape-static captured step must pass it) and over the exact slice of
keys in use (what the eager step passes it).

    nice -n 10 python benchmarks/decode_attention.py [--threads 2] [--repeats 200]

Shapes: SmolLM2-135M (30 layers, 9 query heads over 3 key/value heads, head size 64) and a
Llama-3.2-1B (16 layers, 32 over 8, 64), with a cache of 128 and of 1024 positions. Each layer
has its own cache, as in a model; the three engines take turns token by token, and the table
gives each one's median time for all layers of a token and the ratio to the exact-slice SDPA.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from edgecompute_ml._kernels import build

MODELS = {"SmolLM2-135M": (30, 9, 3, 64), "Llama-3.2-1B": (16, 32, 8, 64)}


def _engines(layers: int, heads: int, kv: int, d: int, capacity: int,
             position: int) -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(position)
    qs = [torch.randn(1, heads, 1, d, generator=g) for _ in range(layers)]
    ks = [torch.randn(1, kv, capacity, d, generator=g) for _ in range(layers)]
    vs = [torch.randn(1, kv, capacity, d, generator=g) for _ in range(layers)]
    mask = (torch.arange(capacity) <= position).view(1, 1, 1, capacity)
    at = torch.tensor([position])
    kernel = torch.ops.edgecompute_ml.one_query_attention
    for q, k, v in zip(qs, ks, vs, strict=True):  # the same numbers from all three
        ref = F.scaled_dot_product_attention(q, k[:, :, :position + 1], v[:, :, :position + 1], enable_gqa=True)
        torch.testing.assert_close(kernel(q, k, v, at, 0, d ** -0.5), ref, rtol=1e-4, atol=1e-5)

    def masked() -> None:
        for q, k, v in zip(qs, ks, vs, strict=True):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def sliced() -> None:
        for q, k, v in zip(qs, ks, vs, strict=True):
            F.scaled_dot_product_attention(q, k[:, :, :position + 1], v[:, :, :position + 1], enable_gqa=True)

    def ours() -> None:
        for q, k, v in zip(qs, ks, vs, strict=True):
            kernel(q, k, v, at, 0, d ** -0.5)

    return {"SDPA, whole cache, mask": masked, "SDPA, exact slice": sliced, "edgecompute_ml": ours}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    if not build.load_attention():
        raise SystemExit(f"the attention kernel is not in use: {build.attention_status()}")
    torch.set_num_threads(args.threads)
    print(f"a token's attention over all layers, {args.threads} threads, median ms (ratio: / SDPA exact slice)\n")
    print("| model | cache | position | SDPA, whole cache, mask | SDPA, exact slice | edgecompute_ml | ours / slice |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, shape in MODELS.items():
        for capacity, positions in ((128, (20, 100)), (1024, (300, 1000))):
            for position in positions:
                engines = _engines(*shape, capacity, position)
                times: dict[str, list[float]] = {key: [] for key in engines}
                for _ in range(10):
                    for run in engines.values():
                        run()
                for _ in range(args.repeats):
                    for key, run in engines.items():
                        start = time.perf_counter()
                        run()
                        times[key].append(time.perf_counter() - start)
                ms = {key: statistics.median(t) * 1e3 for key, t in times.items()}
                base = ms["SDPA, exact slice"]
                print(f"| {name} | {capacity} | {position} | {ms['SDPA, whole cache, mask']:.3f} | {base:.3f} | "
                      f"{ms['edgecompute_ml']:.3f} | {ms['edgecompute_ml'] / base:.2f}x |")


if __name__ == "__main__":
    main()
