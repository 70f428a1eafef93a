"""Float linear layers whose weights are prepacked when the model runs on CPU in float32.

An encoder's forward over one short input (a sentence, an image's patches) multiplies a few rows
by every weight once: ``F.linear`` goes to MKL's GEMM, which re-reads the weight in its row-major
layout on every call. Two packed forms, chosen at load:

- **this package's kernel** (``_kernels/linear.cpp``, ``torch.ops.edgecompute_ml.f32_linear``,
  AVX-512F or AVX2 with FMA): the weight in blocks of one vector's columns ``[ceil(N/L), K, L]``
  (L = 16 with AVX-512, 8 with AVX2); every row of a short input passes each block in one sweep;
  bias and residual, or GELU, applied on the way out. MiniLM's 24 linears take 0.53x oneDNN's
  time for one sentence (10 rows), 0.91x for 64 rows, 1.00x for 768 (an AVX2 EPYC, 2 threads; an
  AVX-512 one: 0.86x, 0.96x, 0.98x; docs/performance.md): oneDNN spends ~15 us a call building
  its primitive before it starts. Compiled at first use
  (``_kernels/build.py``); ``EDGECOMPUTE_ML_LINEAR_KERNEL=0`` (read at each load) turns it off.
- **oneDNN's** inner product with the weight reordered once at load
  (``torch.ops.mkldnn._reorder_linear_weight``, the kernel inductor's freezing pass also uses),
  where the kernel above is off, did not build, or the CPU has neither instruction set. Against
  ``F.linear`` it takes half the time for a few rows and is no slower for many (an AVX-512 EPYC, 2
  threads, a 384 -> 1536 layer: 8 rows 118-133 us vs 65 us, 1024 rows 24-36 ms vs 16-24 ms;
  all-MiniLM-L6-v2's whole forward over one sentence 5.7 ms vs 3.2 ms).

Graph capture was measured on the same forward and lost: ``torch.jit.trace`` + ``freeze`` 6.7 ms,
``torch.compile`` (inductor) 7-8 ms with or without freezing (on x86 its fp32 linears go to MKL's
packed GEMM, slower here than oneDNN's), against 3.2 ms for oneDNN's packed weights run eagerly.

The packed weight replaces the float one (no second copy is kept). Elsewhere (CUDA, MPS, bfloat16
or float16, or ``torch.backends.mkldnn.enabled = False``, the switch that also turns oneDNN off in
torch itself and here turns all packing off) a layer is plain ``F.linear``: the same numbers to
float32 rounding.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .._kernels import build as kernels

__all__ = ["Dense", "Packing", "linear", "pack_blocks", "packing_available", "packing_for"]

#: how a layer's weight is held: "blocks" (this package's kernel), "onednn" (reordered for
#: oneDNN) or "plain" (as loaded, ``F.linear``)
Packing = Literal["blocks", "onednn", "plain"]
# float32 only: oneDNN's bfloat16 kernels need AVX512-BF16 or AMX, not every CPU has them
_PACKABLE = (torch.float32,)
# columns of one weight block in linear.cpp, by the instruction set it runs on (linear_isa)
_LANES = {1: 8, 2: 16}


def packing_for(device: torch.device, dtype: torch.dtype) -> Packing:
    """How float weights for ``device``/``dtype`` are packed (see the module doc); the first call
    on a CPU may compile the kernel (seconds, once: it is cached on disk)."""
    if device.type != "cpu" or dtype not in _PACKABLE or not torch.backends.mkldnn.enabled:
        return "plain"
    if kernels.load_linear():
        return "blocks"
    return "onednn" if torch._C._has_mkldnn else "plain"


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights for ``device``/``dtype`` are prepacked in one form or the other."""
    return packing_for(device, dtype) != "plain"


def pack_blocks(weight: torch.Tensor) -> torch.Tensor:
    """A float32 weight [N, K] in linear.cpp's layout for this CPU: [ceil(N/L), K, L], zero past N,
    L = 16 columns with AVX-512, 8 with AVX2. Needs the kernel loaded (``packing_for``)."""
    lanes = _LANES[int(torch.ops.edgecompute_ml.linear_isa(-1))]
    n, k = weight.shape
    blocks = -(-n // lanes)
    padded = weight.new_zeros(blocks * lanes, k)
    padded[:n] = weight
    return padded.view(blocks, lanes, k).transpose(1, 2).contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None, gelu: bool,
           blocks: bool) -> torch.Tensor:
    """``residual + x W^T + bias``, or ``gelu(x W^T + bias)`` (exact, erf), over a weight packed by
    :func:`pack_blocks` (``blocks``) or reordered for oneDNN; not both ``residual`` and ``gelu``.
    Written for TorchScript too (the encoders' compiled forwards call it): the residual add names
    its arguments, because run eagerly an unqualified five-argument call makes the op's Python
    overload resolution try the first schema by iterating the residual as a list of scalars
    (~1.5 ms a call)."""
    if blocks:
        out: torch.Tensor = torch.ops.edgecompute_ml.f32_linear(x, weight, bias, residual, bias.shape[0], gelu)
    elif residual is not None:
        out = torch.ops.mkldnn._linear_pointwise(x, other=residual, W=weight, B=bias, attr="add")
    elif gelu:  # "none": erf, not tanh
        out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    else:
        out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return out


class Dense:
    """``y = x W^T + b`` for a float weight [N, K], packed as :func:`packing_for` says; with
    ``gelu``, ``gelu(y)`` (exact, erf), fused into oneDNN's kernel when packed for it (one pass
    over the output instead of two: ~9 us a MiniLM layer here)."""

    __slots__ = ("bias", "gelu", "packing", "shape", "weight")
    bias: torch.Tensor | None
    gelu: bool
    packing: Packing
    shape: tuple[int, int]
    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device,
                 dtype: torch.dtype, *, gelu: bool = False) -> None:
        self.shape = (int(weight.shape[0]), int(weight.shape[1]))
        self.gelu = gelu
        self.packing = packing_for(device, dtype) if weight.dtype == dtype else "plain"
        if self.packing == "blocks":
            self.weight = pack_blocks(weight)
            self.bias = None if bias is None else bias.contiguous()
        elif self.packing == "onednn":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
            self.bias = bias
        else:
            self.weight, self.bias = weight, bias

    @property
    def packed(self) -> bool:
        """Whether the weight is held in one of the packed forms."""
        return self.packing != "plain"

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``residual + x W^T + b`` with ``residual`` (its shape: the output's), added in the
        packed kernels (one op and one pass over the output less; the same float32 sum, so the
        same bits as a separate ``+``). Not with ``gelu``."""
        if residual is not None and self.gelu:
            raise ValueError("Dense: a residual is added to a layer without gelu only")
        if self.packing == "blocks":
            y: torch.Tensor = torch.ops.edgecompute_ml.f32_linear(x, self.weight, self.bias, residual, self.shape[0],
                                                                  self.gelu)
            return y
        if self.packing == "onednn":
            if residual is not None:
                added: torch.Tensor = torch.ops.mkldnn._linear_pointwise.binary(
                    x.contiguous(), residual.contiguous(), self.weight, self.bias, "add")
                return added
            attr, algorithm = ("gelu", "none") if self.gelu else ("none", "")  # "none": erf, not tanh
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, attr, [],
                                                                   algorithm)
            return out
        y = F.linear(x, self.weight, self.bias)
        if residual is not None:
            return residual + y
        return F.gelu(y) if self.gelu else y

    @property
    def nbytes(self) -> int:
        """Bytes held by the weight (packed or not) and the bias."""
        total = self.weight.numel() * self.weight.element_size()
        return total + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())
