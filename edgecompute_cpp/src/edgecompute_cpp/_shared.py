"""Memory that the host and every worker of a ``process`` pool map: arrays made here cross free.

:meth:`CppExecutor.empty <edgecompute_cpp.CppExecutor.empty>` hands out numpy arrays carved out
of shared-memory segments (``memfd`` files). When such an array is an input of a call, the host
sends its segment and offset instead of copying it into the worker's arena. Large outputs come
back the same way: the host reserves a block before the call, the worker writes the outputs into
it, and the host returns arrays over it (which can be the next call's inputs, again uncopied). A worker maps a
segment the first time a call needs it; the file descriptor travels over the worker's socket, so
nothing is ever named in ``/dev/shm`` and nothing is left behind if a process dies.

A block returns to the heap when the last array over it is collected. Segments are kept for
reuse; a segment that empties and is not the first one is given back to the system (and the
workers told to unmap it on their next call).
"""

from __future__ import annotations

import bisect
import collections
import mmap
import os
import threading
import weakref
from typing import Any

import numpy as np

from edgecompute.errors import InvalidRequest

__all__ = ["SharedBlock", "SharedHeap"]

ALIGN = 64
SEGMENT_SIZE = 64 << 20


def _round(n: int, to: int) -> int:
    return (n + to - 1) // to * to


class Segment:
    """One shared-memory file, mapped in the host, with a first-fit list of its free ranges."""

    __slots__ = ("_free", "_used", "address", "fd", "id", "map", "size")

    def __init__(self, ident: int, size: int) -> None:
        from ._native import ffi

        self.id = ident
        self.size = size
        self.fd = os.memfd_create(f"edgecompute-cpp-{ident}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size)
        except OSError:
            os.close(self.fd)
            raise
        self.address = int(ffi.cast("uintptr_t", ffi.from_buffer(self.map)))
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), sorted by offset
        self._used = 0

    def allocate(self, nbytes: int) -> int | None:
        for i, (offset, length) in enumerate(self._free):
            if length >= nbytes:
                if length == nbytes:
                    del self._free[i]
                else:
                    self._free[i] = (offset + nbytes, length - nbytes)
                self._used += nbytes
                return offset
        return None

    def release(self, offset: int, nbytes: int) -> None:
        self._used -= nbytes
        free = self._free
        i = bisect.bisect(free, (offset, 0))
        # merge with the free range after, then with the one before
        if i < len(free) and free[i][0] == offset + nbytes:
            nbytes += free.pop(i)[1]
        if i > 0 and free[i - 1][0] + free[i - 1][1] == offset:
            offset, nbytes = free[i - 1][0], free[i - 1][1] + nbytes
            free[i - 1] = (offset, nbytes)
        else:
            free.insert(i, (offset, nbytes))

    @property
    def used(self) -> int:
        return self._used

    @property
    def empty(self) -> bool:
        return self._used == 0

    def close(self) -> None:
        # Only the descriptor: arrays over the mapping hold no buffer export that would stop
        # mmap.close(), so the mapping must go with the last object that refers to it.
        os.close(self.fd)


class Reservation:
    """A block reserved for a call's outputs. The arrays over it keep it; collected, it is freed."""

    __slots__ = ("__weakref__", "offset", "segment", "size")

    def __init__(self, segment: Segment, offset: int, size: int) -> None:
        self.segment = segment
        self.offset = offset
        self.size = size


class SharedBlock:
    """What a numpy array over shared memory has as its base: it keeps the memory's owner alive
    (itself, for an array from :meth:`SharedHeap.empty`; a :class:`Reservation` for outputs)."""

    __slots__ = ("__array_interface__", "__weakref__", "owner", "segment")

    def __init__(self, segment: Segment, interface: dict[str, Any], owner: Reservation | None = None) -> None:
        self.segment = segment
        self.owner = owner
        self.__array_interface__ = interface


class SharedHeap:
    """The shared segments of one executor. Thread-safe: blocks may be freed by any thread's GC."""

    def __init__(self, segment_size: int = SEGMENT_SIZE) -> None:
        self.segment_size = segment_size
        self.segments: dict[int, Segment] = {}
        #: bumped whenever a segment is given back, so that workers learn to unmap it
        self.generation = 0
        self._next_id = 0
        self._lock = threading.Lock()
        # Blocks are freed by finalizers, which the cyclic GC may run in any thread at any moment,
        # even inside our own locked code: they only queue the block (an atomic append), and the
        # next call that takes the lock frees what is queued.
        self._freed: collections.deque[tuple[Segment, int, int]] = collections.deque()

    def empty(self, shape: Any, dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        try:
            shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(n) for n in shape)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"shape must be an int or a sequence of ints, not {shape!r}") from exc
        if any(n < 0 for n in shape):
            raise InvalidRequest(f"shape {shape} has a negative dimension")
        nbytes = dtype.itemsize
        for n in shape:
            nbytes *= n
        size = _round(max(nbytes, 1), ALIGN)
        with self._lock:
            self._free_queued()
            segment, offset = self._allocate(size)
        block = SharedBlock(segment, {"data": (segment.address + offset, False), "shape": shape,
                                      "typestr": dtype.str, "version": 3})
        weakref.finalize(block, self._freed.append, (segment, offset, size))
        return np.asarray(block)

    def reserve(self, size: int) -> Reservation:
        """A block of ``size`` bytes for a call's outputs (see :meth:`view`)."""
        size = _round(max(size, 1), ALIGN)
        with self._lock:
            self._free_queued()
            segment, offset = self._allocate(size)
        reservation = Reservation(segment, offset, size)
        weakref.finalize(reservation, self._freed.append, (segment, offset, size))
        return reservation

    @staticmethod
    def view(reservation: Reservation, offset: int, shape: tuple[int, ...], typestr: str) -> np.ndarray:
        """An array at ``offset`` of the reservation's segment, keeping the reservation."""
        segment = reservation.segment
        return np.asarray(SharedBlock(segment, {"data": (segment.address + offset, False), "shape": shape,
                                                "typestr": typestr, "version": 3}, reservation))

    def _allocate(self, size: int) -> tuple[Segment, int]:
        for segment in self.segments.values():
            offset = segment.allocate(size)
            if offset is not None:
                return segment, offset
        segment = Segment(self._next_id, max(self.segment_size, _round(size, 2 << 20)))
        self._next_id += 1
        self.segments[segment.id] = segment
        offset = segment.allocate(size)
        assert offset is not None
        return segment, offset

    def _free_queued(self) -> None:
        """Free the blocks whose arrays are gone (under the lock)."""
        freed = self._freed
        while freed:
            segment, offset, size = freed.popleft()
            segment.release(offset, size)
            # keep one segment of the usual size for reuse; give any other back once it is empty
            if segment.empty and self.segments.get(segment.id) is segment and (
                    len(self.segments) > 1 or segment.size > self.segment_size):
                del self.segments[segment.id]
                segment.close()
                self.generation += 1

    def collect(self) -> None:
        """Free now what the collected arrays held (calls that allocate do it anyway)."""
        if self._freed:
            with self._lock:
                self._free_queued()

    def usage(self) -> dict[str, float]:
        with self._lock:
            self._free_queued()
            segments = list(self.segments.values())
        return {"segments": len(segments), "mapped_mb": round(sum(s.size for s in segments) / 2**20, 1),
                "in_use_mb": round(sum(s.used for s in segments) / 2**20, 3)}

    def locate(self, array: np.ndarray) -> tuple[int, int] | None:
        """(segment id, offset) of an array that lies in one of our segments, else None."""
        block: Any = array.base
        while type(block) is np.ndarray:  # a view of a view: numpy keeps the chain
            block = block.base
        if type(block) is not SharedBlock:
            return None
        segment = block.segment
        if self.segments.get(segment.id) is not segment:
            return None  # another executor's block
        return segment.id, array.__array_interface__["data"][0] - segment.address

    def close(self) -> None:
        with self._lock:
            for segment in self.segments.values():
                segment.close()
            self.segments.clear()
            self.generation += 1
