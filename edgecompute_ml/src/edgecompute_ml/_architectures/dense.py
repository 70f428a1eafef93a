"""Float linear layers whose weights are prepacked for oneDNN when the model runs on CPU.

An encoder's forward over one short input (a sentence, an image's patches) multiplies a few rows
by every weight once: ``F.linear`` goes to MKL's GEMM, which re-reads the weight in its row-major
layout on every call. oneDNN's inner product with the weight reordered once at load
(``torch.ops.mkldnn._reorder_linear_weight``, the kernel inductor's freezing pass also uses)
takes half the time for a few rows and is no slower for many (measured on this machine's AVX-512
EPYC, 2 threads, a 384 -> 1536 layer: 8 rows 118-133 us vs 65 us, 1024 rows 24-36 ms vs 16-24 ms;
all-MiniLM-L6-v2's whole forward over one sentence 5.7 ms vs 3.2 ms; docs/performance.md).

Graph capture was measured on the same forward and lost: ``torch.jit.trace`` + ``freeze`` 6.7 ms,
``torch.compile`` (inductor) 7-8 ms with or without freezing (on x86 its fp32 linears go to MKL's
packed GEMM, slower here than oneDNN's), against 3.2 ms for these packed weights run eagerly.

The packed weight replaces the float one (no second copy is kept). Elsewhere (CUDA, MPS, bfloat16 or float16,
a torch without oneDNN, or ``torch.backends.mkldnn.enabled = False``, the switch that also turns
oneDNN off in torch itself) a layer is plain ``F.linear``: the same numbers to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["Dense", "packing_available"]

# float32 only: oneDNN's bfloat16 kernels need AVX512-BF16 or AMX, not every CPU has them
_PACKABLE = (torch.float32,)


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights for ``device``/``dtype`` are prepacked for oneDNN (see the module doc)."""
    return (device.type == "cpu" and dtype in _PACKABLE and torch._C._has_mkldnn
            and bool(torch.backends.mkldnn.enabled))


class Dense:
    """``y = x W^T + b`` for a float weight [N, K], prepacked where :func:`packing_available`;
    with ``gelu``, ``gelu(y)`` (exact, erf), fused into oneDNN's kernel when packed (one pass over
    the output instead of two: ~9 us a MiniLM layer here)."""

    __slots__ = ("bias", "gelu", "packed", "shape", "weight")
    bias: torch.Tensor | None
    gelu: bool
    packed: bool
    shape: tuple[int, int]
    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device,
                 dtype: torch.dtype, *, gelu: bool = False) -> None:
        self.shape = (int(weight.shape[0]), int(weight.shape[1]))
        self.bias = bias
        self.gelu = gelu
        self.packed = packing_available(device, dtype) and weight.dtype == dtype
        self.weight = (torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None) if self.packed
                       else weight)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``residual + x W^T + b`` with ``residual`` (its shape: the output's), added in
        oneDNN's kernel when packed (one op and one pass over the output less; the same float32
        sum, so the same bits as a separate ``+``). Not with ``gelu``."""
        if residual is not None and self.gelu:
            raise ValueError("Dense: a residual is added to a layer without gelu only")
        if self.packed:
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
