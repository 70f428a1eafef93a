"""Weight-only quantized linear layers: weights stay packed (4 or 8 bits) and are multiplied by
this package's own 4-bit kernel (``_kernels/q4.cpp``) or torch's CPU weight-packed kernels
(``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``).

Two forms, chosen per tensor:

- ``q4``: 4-bit codes in groups of 32 along the input dimension, one scale and one offset per
  group, ``w = (q - 8) * scale + offset``. GGUF Q4_0, Q4_1 and Q4_K are exactly this form (their
  codes and scales are kept as they are).
- ``int8``: 8-bit codes with one scale per output row, ``w = q * scale``. Every other quantized
  GGUF type (Q8_0, Q5_*, Q6_K, ...) is requantised to it from its dequantised rows, one tensor at a
  time; ``dtype = "int8"`` quantizes float checkpoints to it. Token embeddings always use it (a row
  lookup reads one row).

``dtype = "int4"`` quantizes a float checkpoint's linear weights to the ``q4`` form
(:func:`quantize_q4`: each group's minimum and maximum span the 16 codes, as GGUF's Q4_1 does).

A ``q4`` weight is held in one of two layouts, never both:

- **native** (where ``_kernels/build.load_q4`` compiled and loaded the kernel): codes [N, K/2] in
  blocks of up to 16 groups, each 4 steps of 4 bytes a group (:func:`_native_order`), scales and
  ``low = offset - 8 * scale`` in float16 [N, K/32] (``low`` absent for offsets of zero: Q4_0).
  The kernel quantizes each activation row per 32 to two int8 terms (about 16 bits a value;
  llama.cpp's one term moved SmolLM2's greedy text on near ties), takes the integer dot with
  AVX-512 VNNI (or AVX2) and returns float32. Where float16 does not hold a file's scales exactly
  (Q4_K's products), a weight looked up by row also keeps them in float32 for its rows.
- **torch's int4 packing** otherwise (the fallback). Its kernel takes bfloat16 activations (its
  float32 path is scalar code, 10-50x slower here; measured in docs/ml.md), so the input is
  rounded to bfloat16; the int8 kernel likewise.

A language model's output projection held as GGUF Q8_0 (``prepare(..., rows=True, screen=True)``)
is swept as a 4-bit *screen* of its rows in the native layout, and its top logits recomputed from
the file's codes (:func:`_screen_of`): the screen only ranks the vocabulary.

Loaders produce *unpacked* forms (:class:`Q4Codes`, :class:`Int8Codes`) so that a model can fuse
q/k/v or gate/up before packing (:func:`fuse`); :func:`prepare` packs one weight. The unpacked forms
live only while a model is being built.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from .._kernels import build as kernels
from .._runtime import hugepages

__all__ = ["GROUP", "Int8Codes", "Q4Codes", "QuantizedLinear", "embedding", "fuse", "into_huge_pages", "linear",
           "logits", "prepare", "quantize_int8", "quantize_q4", "tensor_bytes"]

GROUP = 32  # values per q4 group (GGUF's block size; the CPU int4 kernel's smallest group)
_ACT = torch.bfloat16
_LARGE = 256  # rows from which an int8 product dequantises its weight for a float32 GEMM
_ROWS = 16  # the int4 packer wants a multiple of 16 output rows; others are padded with zero rows
_BLOCK = 64  # rows of one block of the int4 packer's layout (read by QuantizedLinear.rows)


@attrs.define(eq=False)
class Q4Codes:
    """Unpacked 4-bit weight: ``codes`` uint8 [N, K] in 0..15, ``scale``/``offset`` float32 [N, K / 32]."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        q = self.codes.view(n, k // GROUP, GROUP).float() - 8.0
        return (q * self.scale[..., None] + self.offset[..., None]).view(n, k)

    def rows(self, order: torch.Tensor) -> Q4Codes:
        return Q4Codes(self.codes[order], self.scale[order], self.offset[order])


@attrs.define(eq=False)
class Int8Codes:
    """Unpacked 8-bit weight: ``codes`` int8 [N, K], ``scale`` float32 [N] (one per row), or
    [N, K / 32] (one per group of 32 inputs: GGUF Q8_0 as the file stores it)."""

    codes: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    def dequantize(self) -> torch.Tensor:
        if self.scale.dim() == 1:
            return self.codes.float() * self.scale[:, None]
        n, k = self.shape
        return (self.codes.float().view(n, -1, GROUP) * self.scale[..., None]).view(n, k)

    def rows(self, order: torch.Tensor) -> Int8Codes:
        return Int8Codes(self.codes[order], self.scale[order])


Codes = Q4Codes | Int8Codes


def quantize_int8(w: torch.Tensor, chunk: int = 4096) -> Int8Codes:
    """Symmetric per-row int8 of a float weight [N, K] (rows in chunks: no full float32 copy)."""
    codes = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(w.shape[0], dtype=torch.float32)
    for start in range(0, w.shape[0], chunk):
        rows = w[start:start + chunk].float()
        s = rows.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        codes[start:start + chunk] = torch.round(rows / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[start:start + chunk] = s
    return Int8Codes(codes, scale)


def quantize_q4(w: torch.Tensor, chunk: int = 4096) -> Q4Codes:
    """4-bit codes of a float weight [N, K] (K a multiple of 32): per group of 32 inputs, the
    minimum and maximum map to codes 0 and 15 (rows in chunks: no full float32 copy)."""
    n, k = int(w.shape[0]), int(w.shape[1])
    if k % GROUP:
        raise ValueError(f"a 4-bit weight needs whole groups of {GROUP} inputs, not {k}")
    codes = torch.empty((n, k), dtype=torch.uint8)
    scale = torch.empty((n, k // GROUP), dtype=torch.float32)
    offset = torch.empty((n, k // GROUP), dtype=torch.float32)
    for start in range(0, n, chunk):
        rows = w[start:start + chunk].float().view(-1, k // GROUP, GROUP)
        low, high = rows.amin(dim=-1), rows.amax(dim=-1)
        s = ((high - low) / 15.0).clamp_min(1e-12)
        q = torch.round((rows - low[..., None]) / s[..., None]).clamp_(0, 15)
        codes[start:start + chunk] = q.to(torch.uint8).view(-1, k)
        scale[start:start + chunk] = s
        offset[start:start + chunk] = low + 8.0 * s  # w = (q - 8) * scale + offset
    return Q4Codes(codes, scale, offset)


class QuantizedLinear:
    """A packed weight [N, K] and the kernel that multiplies by it."""

    __slots__ = ("_pad", "kind", "low", "native", "packed", "row_codes", "row_group_scale", "row_offset", "row_scale",
                 "scales", "shape")
    _pad: int
    kind: str  # "q4" or "int8"
    native: bool  # q4 in this package's own layout, multiplied by _kernels/q4.cpp (see __doc__)
    low: torch.Tensor | None  # native q4: offset - 8 * scale in float16, None where the offsets are 0
    packed: torch.Tensor
    row_scale: torch.Tensor | None  # int8: the kernel's per-row scales in float32
    # exact rows of a weight looked up by row (prepare(..., rows=True)) where the kernel's form is
    # not exact: a Q8_0 file's codes [N, K] (int8; also those of a screened weight, swept as
    # native q4) and, for Q8_0 and q4, scales [N, K/32] (float32);
    # q4 codes are read from ``packed``; offsets [N, K/32] of q4 unless all zero (Q4_0)
    row_codes: torch.Tensor | None
    row_group_scale: torch.Tensor | None
    row_offset: torch.Tensor | None
    scales: torch.Tensor
    shape: tuple[int, int]

    def __init__(self, codes: Codes, *, rows: bool = False, screen: bool = False) -> None:
        n, k = codes.shape
        self.shape = (n, k)
        self.row_scale: torch.Tensor | None = None
        self.row_offset: torch.Tensor | None = None
        self.row_codes: torch.Tensor | None = None
        self.row_group_scale: torch.Tensor | None = None
        self.native = False
        self.low = None
        if isinstance(codes, Q4Codes) and k % GROUP:
            raise ValueError(f"a 4-bit weight needs whole groups of {GROUP} inputs, not {k}")
        sweep = _screen_of(codes) if rows and screen and isinstance(codes, Int8Codes) else None
        if sweep is not None and isinstance(codes, Int8Codes):
            # a Q8_0 output projection: the 4-bit screen is swept, the file's codes give exact rows
            self.kind = "q4"
            self.native = True
            self._pad = 0
            self.packed, self.scales, self.low = sweep
            self.row_codes = codes.codes.contiguous()
            self.row_group_scale = codes.scale.float().contiguous()
        elif isinstance(codes, Q4Codes) and _native_q4(codes):
            self.kind = "q4"
            self.native = True
            self._pad = 0
            self.packed, self.scales, self.low, held = _pack_native(codes)
            if rows and not held:  # the file's own scales, for exact rows
                self.row_group_scale = codes.scale.float().contiguous()
                self.row_offset = codes.offset.float().contiguous() if bool(codes.offset.any()) else None
        elif isinstance(codes, Q4Codes):
            # a weight looked up by row is padded to the packer's 64-row blocks, whose layout
            # _q4_row_layout has checked (one code of a row every 32 bytes)
            pad = -n % (_BLOCK if rows else _ROWS)
            q, scale, offset = codes.codes, codes.scale, codes.offset
            if pad:
                q = torch.cat([q, torch.full((pad, k), 8, dtype=torch.uint8)])
                scale = torch.cat([scale, torch.zeros(pad, scale.shape[1])])
                offset = torch.cat([offset, torch.zeros(pad, offset.shape[1])])
            self.kind = "q4"
            self._pad = pad
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            self.scales = torch.stack([scale.t(), offset.t()], dim=-1).to(_ACT).contiguous()  # [K/32, N, 2]
            if rows:  # the file's own scales, for exact rows (the kernel's are rounded to bfloat16)
                self.row_group_scale = codes.scale.float().contiguous()
                self.row_offset = codes.offset.float().contiguous() if bool(codes.offset.any()) else None
        else:
            self.kind = "int8"
            self._pad = 0
            exact = codes
            codes = _to_int8(codes)  # the kernel scales whole rows
            self.packed = codes.codes.contiguous()
            self.scales = codes.scale.to(_ACT)
            self.row_scale = codes.scale.float()  # embedding lookups scale rows in float32
            if exact is not codes and rows:  # a Q8_0 file's own codes too, for exact rows (see __doc__)
                self.row_codes = exact.codes.contiguous()
                self.row_group_scale = exact.scale.float().contiguous()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        n, k = self.shape
        if self.kind == "int8" and self.row_scale is not None and x.numel() >= _LARGE * k:
            # many rows (a Whisper window, a long prompt): the kernel's cost grows with rows, a float
            # GEMM's far less; the weight is dequantised for this one product (measured in docs/ml.md)
            return F.linear(x, (self.packed.to(x.dtype) * self.row_scale[:, None].to(x.dtype)), bias)
        y: torch.Tensor
        if self.native:
            y = torch.ops.edgecompute_ml.q4_linear(x.reshape(-1, k).float(), self.packed, self.scales, self.low)
            y = y.to(x.dtype).view(*x.shape[:-1], n)
            return y if bias is None else y + bias
        flat = x.reshape(-1, k).to(_ACT)
        if self.kind == "q4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales)
            if self._pad:
                y = y[:, :n]
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.packed, self.scales)
        y = y.to(x.dtype).view(*x.shape[:-1], n)
        return y if bias is None else y + bias

    @property
    def looked_up(self) -> bool:
        """Whether :meth:`rows` can read this weight's rows (int8, native q4, or prepared with ``rows``)."""
        return self.native or self.row_scale is not None or self.row_group_scale is not None

    def logits(self, x: torch.Tensor, exact: int = 32) -> torch.Tensor:
        """``self(x)`` in float32, with each row's ``exact`` largest outputs recomputed from the
        exact weight rows and ``x`` in float32. The kernel's bfloat16 output is exact to about 3
        digits (logits of 25 in steps of 0.125), which would decide near ties between the top
        tokens; the recomputed top makes the greedy choice that of float32 activations."""
        y = self(x).float()
        if not self.looked_up:
            return y
        n, k = self.shape
        flat, xf = y.view(-1, n), x.reshape(-1, k).float()
        top = flat.topk(min(exact, n), dim=-1).indices  # [R, exact]
        rows = self._exact_rows(top.reshape(-1)).view(*top.shape, k)  # [R, exact, K]
        flat.scatter_(1, top, torch.bmm(rows, xf[:, :, None])[..., 0])
        return y

    def _exact_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (1-D) of the weight in float32, exactly as the file's codes and scales give them."""
        k = self.shape[1]
        if self.row_codes is not None and self.row_group_scale is not None:  # a Q8_0 file's codes
            grouped = self.row_codes[ids].float().view(-1, k // GROUP, GROUP) * self.row_group_scale[ids, :, None]
            return grouped.view(-1, k)
        if self.kind == "int8":
            if self.row_scale is None:
                raise TypeError("this weight is not looked up by row")
            return self.packed[ids].float() * self.row_scale[ids, None]
        if self.native:
            return self._native_rows(ids)
        scale = self.row_group_scale
        if scale is None:
            raise TypeError("this weight is not looked up by row")
        blocks = self.packed.view(-1, k, _BLOCK // 2)  # [N / 64, K, 32]: rows r and r + 32 share a byte
        within = ids % _BLOCK
        raw = blocks[ids // _BLOCK, :, within % (_BLOCK // 2)]  # [R, K]
        codes = torch.where((within < _BLOCK // 2)[:, None], raw & 0x0F, raw >> 4)
        w = (codes.float() - 8.0).view(-1, k // GROUP, GROUP) * scale[ids, :, None]
        if self.row_offset is not None:
            w = w + self.row_offset[ids, :, None]
        return w.view(-1, k)

    def _native_rows(self, ids: torch.Tensor) -> torch.Tensor:
        k = self.shape[1]
        q = _native_order(self.packed[ids], False).view(-1, k // GROUP, GROUP).float() - 8.0
        offset: torch.Tensor | None
        if self.row_group_scale is not None:
            scale, offset = self.row_group_scale[ids], (None if self.row_offset is None else self.row_offset[ids])
        else:  # float16 holds the file's scales exactly (checked when packed): offset computed as then
            scale = self.scales[ids].float()
            offset = None if self.low is None else self.low[ids].float() + 8.0 * scale
        w = q * scale[..., None]
        if offset is not None:
            w = w + offset[..., None]
        return w.view(-1, k)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``F.embedding(ids, W)`` of a weight packed for lookups (``prepare(..., rows=True)``)."""
        return self._exact_rows(ids.reshape(-1)).to(dtype).view(*ids.shape, self.shape[1])

    @property
    def nbytes(self) -> int:
        total = self.packed.numel() * self.packed.element_size() + self.scales.numel() * self.scales.element_size()
        for extra in (self.low, self.row_scale, self.row_codes, self.row_group_scale, self.row_offset):
            if extra is not None:
                total += extra.numel() * extra.element_size()
        return total


class _Split:
    """Weights fused along the output dimension whose forms differ (say a Q4_K q/k beside a Q6_K
    v): one kernel per part, outputs concatenated."""

    __slots__ = ("parts", "shape")

    def __init__(self, parts: Sequence[QuantizedLinear | torch.Tensor]) -> None:
        self.parts = list(parts)
        self.shape = (sum(int(p.shape[0]) for p in parts), int(parts[0].shape[1]))

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.cat([linear(x, p) for p in self.parts], dim=-1)
        return y if bias is None else y + bias

    @property
    def nbytes(self) -> int:
        return sum(tensor_bytes(p) for p in self.parts)


Weight = torch.Tensor | QuantizedLinear | _Split


def _to_int8(codes: Codes) -> Int8Codes:
    """Per-row int8 codes (the int8 kernel's form) of any unpacked weight."""
    if isinstance(codes, Int8Codes) and codes.scale.dim() == 1:
        return codes
    n = codes.shape[0]
    out = Int8Codes(torch.empty(codes.shape, dtype=torch.int8), torch.empty(n))
    for start in range(0, n, 4096):  # through float32 a slice at a time
        part = quantize_int8(codes.rows(torch.arange(start, min(n, start + 4096))).dequantize())
        out.codes[start:start + 4096], out.scale[start:start + 4096] = part.codes, part.scale
    return out


def prepare(w: Any, *, rows: bool = False, screen: bool = False) -> Any:
    """The weight a model multiplies by: float tensors as they are, unpacked codes packed. With
    ``rows`` (a weight also looked up by row: the token embeddings), 4-bit codes stay 4-bit where
    this torch's packed layout is the one :meth:`QuantizedLinear.rows` reads, else become int8.
    With ``screen`` too (a weight whose products are only read through :func:`logits`: a language
    model's output projection), int8 codes with a scale per 32 (GGUF Q8_0) are swept as a 4-bit
    screen (see :func:`_screen_of`)."""
    if isinstance(w, Q4Codes) and rows and not _native_q4(w) and not _q4_row_layout():
        return QuantizedLinear(_to_int8(w), rows=True)
    if isinstance(w, (Q4Codes, Int8Codes)):
        return QuantizedLinear(w, rows=rows, screen=screen)
    return w


def _screen_of(codes: Int8Codes, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """A 4-bit screen of a Q8_0 weight (:func:`quantize_q4` of its rows) packed in the native
    layout (codes, scales, low), for :meth:`QuantizedLinear.logits` to sweep where this package's
    kernel runs; None for per-row int8 codes, without the kernel, or where float16 cannot hold
    the screen's scales. Made a chunk of rows at a time (small transients).

    Why: a Q8_0 output projection is read whole at every token. Swept by torch's int8 kernel it
    needs a per-row int8 copy beside the file's codes (kept for exact lookups and top logits);
    the 4-bit screen replaces that copy at 0.62x its bytes and takes half its time (SmolLM2's
    49152 x 576 head on an AVX2 EPYC, 2 threads: 2.0-2.4 ms against 4.1-4.9). The screen only
    ranks: the top logits are recomputed from the file's codes, and on random weights the true
    argmax ranked at most 6th among the screen's logits, well inside the 32 recomputed."""
    if codes.scale.dim() != 2 or not kernels.load_q4():
        return None
    n = codes.shape[0]
    packed, scales, lows = [], [], []
    for start in range(0, n, chunk):
        part = quantize_q4(codes.rows(torch.arange(start, min(n, start + chunk))).dequantize())
        if not _native_q4(part):
            return None
        p, s, low, _ = _pack_native(part)
        if low is None:  # every offset zero: a Q4_0-like chunk, its low term -8 * scale
            low = (-8.0 * s.float()).to(torch.float16)
        packed.append(p)
        scales.append(s)
        lows.append(low)
    return torch.cat(packed), torch.cat(scales), torch.cat(lows)


def _native_q4(codes: Q4Codes) -> bool:
    """Whether ``codes`` go to this package's kernel: it is loaded (compiled at the first call) and
    float16 holds the scales and offsets (finite)."""
    if not kernels.load_q4():
        return False
    low = codes.offset.float() - 8.0 * codes.scale.float()
    return bool(torch.isfinite(codes.scale.to(torch.float16)).all() and torch.isfinite(low.to(torch.float16)).all())


_BLOCK_GROUPS = 16  # groups of one block of the native layout (one int32 lane of the kernel each)


def _native_order(codes: torch.Tensor, forward: bool) -> torch.Tensor:
    """Codes [R, K] (0..15) in the native byte order [R, K/2] (``forward``), or back. A block of
    up to 16 groups is 4 steps of 4 bytes a group; byte ``b`` of group ``i`` in step ``j`` holds
    value ``4j + b`` of the group (low nibble) and value ``16 + 4j + b`` (high nibble)."""
    rows, k = int(codes.shape[0]), int(codes.shape[1]) * (1 if forward else 2)
    groups = k // GROUP
    parts = []
    for g0 in range(0, groups, _BLOCK_GROUPS):
        n = min(_BLOCK_GROUPS, groups - g0)
        if forward:
            c = codes[:, g0 * GROUP:(g0 + n) * GROUP].reshape(rows, n, 2, 4, 4)  # [R, group, half, j, b]
            parts.append((c[:, :, 0] | (c[:, :, 1] << 4)).transpose(1, 2).reshape(rows, n * 16))
        else:
            b = codes[:, g0 * 16:(g0 + n) * 16].reshape(rows, 4, n, 4).transpose(1, 2)  # [R, group, j, b]
            parts.append(torch.stack([b & 0x0F, b >> 4], dim=2).reshape(rows, n * GROUP))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].contiguous()


def _pack_native(codes: Q4Codes, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
    """The native layout (see __doc__): codes [N, K/2], scale and low float16 [N, K/32] (low None
    where every offset is 0), and whether float16 holds the scales exactly (``(q - 8) * scale +
    offset`` computed from them equals the file's to the bit). Rows in chunks: small transients."""
    n, k = codes.shape
    packed = torch.empty((n, k // 2), dtype=torch.uint8)
    for start in range(0, n, chunk):
        packed[start:start + chunk] = _native_order(codes.codes[start:start + chunk], True)
    scale32, offset32 = codes.scale.float(), codes.offset.float()
    scale = scale32.to(torch.float16).contiguous()
    exact = torch.equal(scale.float(), scale32)
    low = None
    if bool(offset32.any()):
        low = (offset32 - 8.0 * scale32).to(torch.float16).contiguous()
        exact = exact and torch.equal(low.float() + 8.0 * scale.float(), offset32)
    return packed, scale, low, exact


_LAYOUT: list[bool] = []


def _q4_row_layout() -> bool:
    """Whether ``_convert_weight_to_int4pack_for_cpu`` packs 64-row blocks as [K, 32] bytes, row
    ``r`` in the low nibbles and row ``r + 32`` in the high ones (torch 2.x's AVX-512/AVX2 CPU
    layout); checked once on a small probe, since the layout is torch's private choice."""
    if not _LAYOUT:
        g = torch.Generator().manual_seed(0)
        probe = torch.randint(0, 16, (2 * _BLOCK, 2 * GROUP), dtype=torch.int32, generator=g)
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
            blocks = packed.reshape(2, 2 * GROUP, _BLOCK // 2).transpose(1, 2).int()  # [2, 32, K]
            got = torch.cat([torch.cat([b & 0x0F, b >> 4]) for b in blocks])
            _LAYOUT.append(packed.numel() == probe.numel() // 2 and torch.equal(got, probe))
        except (RuntimeError, ValueError):
            _LAYOUT.append(False)
    return _LAYOUT[0]


def fuse(parts: Sequence[Any]) -> Any:
    """Concatenate weights along the output dimension (q/k/v, gate/up) and prepare the result."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(list(parts))
    if all(isinstance(p, Q4Codes) for p in parts):
        return QuantizedLinear(Q4Codes(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                                       torch.cat([p.offset for p in parts])))
    if all(isinstance(p, Int8Codes) for p in parts):
        rows = [_to_int8(p) for p in parts]
        return QuantizedLinear(Int8Codes(torch.cat([p.codes for p in rows]), torch.cat([p.scale for p in rows])))
    return _Split([prepare(p) for p in parts])


def linear(x: torch.Tensor, w: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a float, packed or split weight."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    out: torch.Tensor = w(x, bias)
    return out


def logits(x: torch.Tensor, w: Any) -> torch.Tensor:
    """The output projection: :meth:`QuantizedLinear.logits` for a packed weight looked up by row."""
    if isinstance(w, QuantizedLinear):
        return w.logits(x)
    return linear(x, w)


def embedding(ids: torch.Tensor, w: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return F.embedding(ids, w)
    out: torch.Tensor = w.rows(ids, dtype)
    return out


# what a product reads whole at every call (the exact rows of a weight looked up by row are read
# a few at a time: they stay where they are)
_SWEPT = ("packed", "scales", "low")


def into_huge_pages(weights: Iterable[Any]) -> None:
    """Move the packed weights among ``weights`` (each once; float tensors stay) into one region
    of transparent huge pages (``_runtime/hugepages.py``): a decode step streams every one of
    them, and with 4 KB pages walks the page tables for each page (a 64 MB stream of q4 codes
    at 2 threads: 0.93-0.95x the time in huge pages, on an AMD EPYC VM)."""
    fields: list[tuple[QuantizedLinear, str]] = []
    seen: set[int] = set()
    for w in weights:
        for part in (w.parts if isinstance(w, _Split) else [w]):
            if isinstance(part, QuantizedLinear) and id(part) not in seen:
                seen.add(id(part))
                fields += [(part, name) for name in _SWEPT if getattr(part, name) is not None]
    region = hugepages.region_for(getattr(part, name) for part, name in fields)
    if region is None:
        return
    for part, name in fields:  # each original dropped as its copy replaces it
        setattr(part, name, region.copy(getattr(part, name)))


def tensor_bytes(w: Any) -> int:
    """Bytes a weight holds (float or packed)."""
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    if isinstance(w, (QuantizedLinear, _Split)):
        return w.nbytes
    return 0
