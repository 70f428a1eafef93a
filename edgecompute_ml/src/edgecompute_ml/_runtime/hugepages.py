"""Weights in transparent huge pages (Linux).

A forward that reads every weight once walks the page tables once per 4 KB page it touches: a
sentence through all-MiniLM-L6-v2 reads its 41 MB of layer weights, ~10,000 pages, where a core's
second-level TLB holds 2,048 entries (8 MB; AMD Zen 3), and a SmolLM2 token streams ~60 MB of
4-bit weights. Copied into one anonymous private mapping advised with ``MADV_HUGEPAGE``, the same
bytes lie in 2 MB pages: 21 of them for MiniLM. On the 2-core AMD EPYC VM of docs/performance.md a
MiniLM sentence's forward took 0.91-0.92x the time so, and a 64 MB stream of q4 codes 0.93-0.95x
(one process, the two forms alternating).

Where the kernel's transparent huge pages are off (``never``), off Linux, or for tensors too few to
fill several huge pages, there is no region and the tensors stay as they are. A region's last
huge page may be partly unused (at most 2 MB); its head before the first 2 MB boundary is never
touched, so never backed."""

from __future__ import annotations

import mmap
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = ["HUGE_PAGE", "Region", "available", "region_for"]

HUGE_PAGE = 2 << 20
_ALIGN = 64  # each tensor's first byte: a cache line
_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether this process can ask for transparent huge pages (Linux, THP ``always`` or ``madvise``)."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in _MODE.read_text()
    except OSError:
        return False


def _span(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


class Region:
    """One anonymous private mapping of ``nbytes`` (and a huge page more, to start on a 2 MB
    boundary) advised for transparent huge pages; :meth:`copy` places tensors in it one after
    another. Each copy keeps the mapping alive."""

    def __init__(self, nbytes: int) -> None:
        region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: the faults then take huge pages
        self._whole = torch.frombuffer(region, dtype=torch.uint8)  # holds the mapping for every view of it
        self._at = (-self._whole.data_ptr()) % HUGE_PAGE
        self._end = self._at + nbytes

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of ``tensor`` (contiguous, strided, CPU) in the region, on a cache line."""
        size = tensor.numel() * tensor.element_size()
        if self._at + size > self._end:
            raise ValueError(f"the region has {self._end - self._at} bytes left, not {size}")
        copy = self._whole[self._at:self._at + size].view(tensor.dtype).view(tensor.shape)
        copy.copy_(tensor)
        self._at += _span(size)
        return copy


def region_for(tensors: Iterable[torch.Tensor], minimum: int = 4 * HUGE_PAGE) -> Region | None:
    """A :class:`Region` that holds ``tensors``, or None where huge pages are not available, where
    one is not a contiguous strided CPU tensor, or where together they hold under ``minimum``
    bytes (too few pages to matter). Copy them in one at a time, dropping each original as its
    copy replaces it: the process then holds one tensor twice at most, never the whole set."""
    total = 0
    for t in tensors:
        if t.device.type != "cpu" or t.layout != torch.strided or not t.is_contiguous():
            return None
        total += _span(t.numel() * t.element_size())
    if total < minimum or not available():
        return None
    try:
        return Region(total)
    except OSError:  # the advice refused (a sandbox's seccomp, a kernel without THP): pages as they come
        return None
