"""The worker protocol: length-prefixed frames over a socket, large buffers through shared memory.

A frame is a 4-byte big-endian length and a pickled ``(message, segment, spans)`` triple. The
message is itself pickled with protocol 5: buffers of at least :data:`OUT_OF_BAND` bytes (numpy
arrays, large ``bytes``) are taken out of band and copied once into a shared-memory segment from
the sender's :class:`Arena`; ``spans`` says where each lies. The receiver maps the segment and
rebuilds the message on top of it (zero copy) or from a private copy, then hands the segment back
with a ``release`` message so the sender can reuse it: steady-state traffic touches no new pages.

Messages are tuples ``(kind, task_id, body)``. The first two on a connection are ``setup``
(host to worker) and ``hello`` (worker to host); ``hello`` carries :data:`VERSION` and a host
refuses a worker that speaks another one.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import struct
import tempfile
from typing import Any

__all__ = ["OUT_OF_BAND", "VERSION", "Arena", "Attachments", "ProtocolError", "Unreadable", "decode", "encode",
           "frame_length", "remove_segments"]

#: The protocol version; bumped on any change a peer of another version would misread.
VERSION = 1
#: Buffers at least this large cross through shared memory instead of the socket.
OUT_OF_BAND = 64 * 1024
HEADER = struct.Struct("!I")
MAX_FRAME = 1 << 30
_ALIGN = 64
_MIN_SEGMENT = 1 << 20


class ProtocolError(Exception):
    """A peer sent something that is not a frame of this protocol."""


def shm_folder() -> str:
    """Where segments live: /dev/shm (memory) on Linux, else the temporary folder."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class _Segment:
    __slots__ = ("map", "name", "size", "view")

    def __init__(self, name: str, size: int, *, create: bool) -> None:
        path = os.path.join(shm_folder(), name)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.name = name
        self.size = size
        self.view = memoryview(self.map)

    def close(self) -> None:
        self.view.release()
        try:
            self.map.close()
        except BufferError:  # something still views it (a zero-copy array); the OS unmaps at exit
            pass


class Arena:
    """The sender's shared-memory segments: taken for one message, given back by the receiver.

    Every segment's name starts with ``prefix``, so whoever owns the prefix can remove what a
    killed process left behind (:func:`remove_segments`).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._free: list[_Segment] = []
        self._lent: dict[str, _Segment] = {}
        self._count = 0

    def take(self, size: int) -> _Segment:
        best = None
        for segment in self._free:
            if segment.size >= size and (best is None or segment.size < best.size):
                best = segment
        if best is not None:
            self._free.remove(best)
        else:
            capacity = max(_MIN_SEGMENT, 1 << (size - 1).bit_length())
            self._count += 1
            best = _Segment(f"{self.prefix}-{self._count}", capacity, create=True)
        self._lent[best.name] = best
        return best

    def give_back(self, name: str) -> None:
        segment = self._lent.pop(name, None)
        if segment is not None:
            self._free.append(segment)

    def close(self) -> None:
        for segment in [*self._free, *self._lent.values()]:
            segment.close()
            try:
                os.unlink(os.path.join(shm_folder(), segment.name))
            except FileNotFoundError:
                pass
        self._free.clear()
        self._lent.clear()


def remove_segments(prefix: str) -> int:
    """Unlink every segment whose name starts with ``prefix`` (what a dead worker left)."""
    removed = 0
    folder = shm_folder()
    for name in os.listdir(folder):
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(folder, name))
                removed += 1
            except FileNotFoundError:
                pass
    return removed


class Attachments:
    """The receiver's mappings of the peer's segments, opened once and kept."""

    def __init__(self) -> None:
        self._segments: dict[str, _Segment] = {}

    def view(self, name: str, size: int) -> memoryview:
        segment = self._segments.get(name)
        if segment is None or segment.size < size:
            segment = self._segments[name] = _Segment(name, os.path.getsize(os.path.join(shm_folder(), name)),
                                                      create=False)
        return segment.view

    def close(self) -> None:
        for segment in self._segments.values():
            segment.close()
        self._segments.clear()


class _BigBytes:
    """Stands in for a large ``bytes`` so that pickle takes it out of band (it copies exact
    ``bytes`` into the frame and offers no hook for them)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return bytes, (pickle.PickleBuffer(self.data),)


def _wrap_bytes(value: Any) -> Any:
    """``value`` with every large ``bytes`` inside plain containers wrapped (copies only what changes)."""
    kind = type(value)
    if kind is bytes:
        return _BigBytes(value) if len(value) >= OUT_OF_BAND else value
    if kind is dict:
        items = {key: _wrap_bytes(item) for key, item in value.items()}
        return value if all(items[k] is value[k] for k in value) else items
    if kind is list or kind is tuple:
        parts = [_wrap_bytes(item) for item in value]
        return value if all(a is b for a, b in zip(parts, value, strict=True)) else kind(parts)
    return value


def encode(kind: str, task: str, body: Any, arena: Arena) -> tuple[bytes, str | None]:
    """One frame holding a message, and the segment it lent (None when all went in band)."""
    buffers: list[pickle.PickleBuffer] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        if buffer.raw().nbytes < OUT_OF_BAND:
            return True
        buffers.append(buffer)
        return False

    stream = io.BytesIO()
    pickle.Pickler(stream, protocol=5, buffer_callback=out_of_band).dump(_wrap_bytes(body))
    name: str | None = None
    spans: list[tuple[int, int]] = []
    if buffers:
        raws = [buffer.raw() for buffer in buffers]
        total = sum(-(-raw.nbytes // _ALIGN) * _ALIGN for raw in raws)
        segment = arena.take(total)
        offset = 0
        for raw in raws:
            segment.view[offset:offset + raw.nbytes] = raw  # the one copy of the data
            spans.append((offset, raw.nbytes))
            offset += -(-raw.nbytes // _ALIGN) * _ALIGN
        name = segment.name
    frame = pickle.dumps((kind, task, stream.getvalue(), name, spans), protocol=5)
    return HEADER.pack(len(frame)) + frame, name


def frame_length(header: bytes) -> int:
    length: int = HEADER.unpack(header)[0]
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {MAX_FRAME}")
    return length


class Unreadable:
    """A message body this side cannot unpickle (a class that only the peer's environment has)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def decode(frame: bytes, attachments: Attachments, *, copy: bool) -> tuple[str, str, Any, str | None]:
    """``(kind, task, body, segment)`` of a frame; the caller releases ``segment`` when done.

    With ``copy`` the body owns its data and the segment may be released at once; without, arrays
    view the segment, which must stay lent until they are no longer used. A body that does not
    unpickle comes back as :class:`Unreadable`.
    """
    try:
        kind, task, payload, name, spans = pickle.loads(frame)
    except Exception as exc:
        raise ProtocolError(f"not a frame: {type(exc).__name__}: {exc}") from exc
    buffers: list[Any] = []
    if name is not None:
        end = max(offset + length for offset, length in spans)
        view = attachments.view(name, end)
        for offset, length in spans:
            part = view[offset:offset + length]
            buffers.append(bytearray(part) if copy else part)
    try:
        body = pickle.loads(payload, buffers=buffers)
    except Exception as exc:  # noqa: BLE001 - reported to the task, not raised on the connection
        body = Unreadable(exc)
    return kind, task, body, name
