"""The worker protocol: one message per packet of a Unix ``SOCK_SEQPACKET`` socket pair, large
buffers through shared memory.

Messages are ``(kind, task, body)``. The body is pickled with protocol 5: buffers of at least
:data:`OUT_OF_BAND` bytes (numpy arrays, large ``bytes``) are taken out of band and copied once
into a shared-memory segment from the sender's :class:`Arena`; the frame says where each lies. The
receiver maps the segment and rebuilds the body on top of it (zero copy) or from a private copy,
then hands the segment back with a ``release`` message so the sender can reuse it: steady-state
traffic touches no new pages. A pickle that would still exceed :data:`INBAND_MAX` goes into the
segment too, so every packet fits the socket's buffer.

The first two messages on a connection, ``setup`` (host to worker) and ``hello`` (worker to host),
use the frame of protocol 1 (:func:`encode`, :func:`decode`: a 4-byte length and a pickled
``(kind, task, body, segment, spans)``), which every version reads; ``hello`` carries
:data:`VERSION` and a host refuses a worker that speaks another one. After them, messages use the
compact frame of :func:`pack` and :func:`unpack`: a 10-byte header (kind, flags, task number) and
the pickled body, one ``pickle.dumps`` and one ``pickle.loads`` per small message.

A packet is never split or merged, so several threads may send on one socket without a lock and
several may block in ``recv`` on it: each gets whole messages, and the kernel wakes one of them.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import struct
import tempfile
import threading
from typing import Any

__all__ = ["INBAND_MAX", "KINDS", "MAX_MESSAGE", "OUT_OF_BAND", "VERSION", "Arena", "Attachments", "ProtocolError",
           "Unreadable", "decode", "encode", "frame_length", "pack", "remove_segments", "unpack"]

#: The protocol version; bumped on any change a peer of another version would misread.
#: 2: one message per SOCK_SEQPACKET packet, compact frames after the handshake.
VERSION = 2
#: Buffers at least this large cross through shared memory instead of the socket.
OUT_OF_BAND = 64 * 1024
#: A pickled body larger than this goes into shared memory with the buffers.
INBAND_MAX = 64 * 1024
#: No packet is larger: a receiver's buffer of this size holds any message (and the default
#: socket buffer of ~208 KiB accepts it).
MAX_MESSAGE = INBAND_MAX + 4096
#: The message kinds, by their code in a compact frame.
KINDS = ("run", "chunk", "progress", "done", "error", "cancel", "health", "release", "close")
_CODES = {kind: code for code, kind in enumerate(KINDS)}
HEADER = struct.Struct("!I")
_HEAD = struct.Struct("!BBQ")  # kind, flags, task number
_COUNT = struct.Struct("!I")  # a segment starts with how many spans it holds ...
_SPAN = struct.Struct("!QQ")  # ... then each one's offset and length
_SEGMENT = 1  # flags: the message has buffers in a segment
_SPILLED = 2  # flags: the pickled body itself is the segment's last span
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
        # never through a link: a sandboxed peer could point one at a file only the host may read
        flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT | os.O_EXCL if create else 0)
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
        self._lock = threading.Lock()  # a worker sends from several threads

    def take(self, size: int) -> _Segment:
        with self._lock:
            return self._take(size)

    def _take(self, size: int) -> _Segment:
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
        with self._lock:
            segment = self._lent.pop(name, None)
            if segment is not None:
                self._free.append(segment)

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        for segment in [*self._free, *self._lent.values()]:
            segment.close()
            try:
                os.unlink(os.path.join(shm_folder(), segment.name))
            except FileNotFoundError:
                pass
        self._free.clear()
        self._lent.clear()


def remove_segments(prefix: str) -> int:
    """Unlink every segment whose name starts with ``prefix`` (what a dead worker left); a prefix
    with a ``/`` names segments in a folder of the shared-memory folder."""
    removed = 0
    head, _, start = prefix.rpartition("/")
    folder = os.path.join(shm_folder(), head) if head else shm_folder()
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith(start):
            try:
                os.unlink(os.path.join(folder, name))
                removed += 1
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                pass
    return removed


class Attachments:
    """The receiver's mappings of the peer's segments, opened once and kept.

    With ``prefix`` (a host facing a sandboxed worker) only segments named ``prefix-N`` are mapped,
    and none larger than ``max_size`` bytes: the peer chooses the names and sizes it sends.
    """

    def __init__(self, prefix: str | None = None, max_size: int | None = None) -> None:
        self._segments: dict[str, _Segment] = {}
        self._lock = threading.Lock()  # a worker receives on several threads
        self._prefix = prefix
        self._max_size = max_size

    def view(self, name: str, size: int) -> memoryview:
        segment = self._segments.get(name)
        if segment is None or segment.size < size:
            with self._lock:
                segment = self._segments.get(name)
                if segment is None or segment.size < size:
                    segment = self._segments[name] = self._open(name)
        return segment.view

    def _open(self, name: str) -> _Segment:
        prefix = self._prefix
        if prefix is not None and not (name.startswith(prefix + "-") and name[len(prefix) + 1:].isdigit()):
            raise ProtocolError(f"segment {name!r} is not one of the peer's ({prefix}-N)")
        size = os.path.getsize(os.path.join(shm_folder(), name))
        if self._max_size is not None and size > self._max_size:
            raise ProtocolError(f"segment {name!r} of {size} bytes is larger than the peer may hold")
        return _Segment(name, size, create=False)

    def close(self) -> None:
        with self._lock:
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


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


def pack(kind: str, task: int, body: Any, arena: Arena) -> bytes:
    """One compact frame (one packet) holding a message; at most :data:`MAX_MESSAGE` bytes.

    A small body costs one ``pickle.dumps``; only a pickle that comes out large is looked at again
    (large ``bytes`` taken out of band, then the pickle itself moved to shared memory if need be).
    A segment starts with its table of spans, so the packet only names it, however many buffers.
    """
    buffers: list[pickle.PickleBuffer] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        if buffer.raw().nbytes < OUT_OF_BAND:
            return True
        buffers.append(buffer)
        return False

    data = pickle.dumps(body, 5, buffer_callback=out_of_band)
    spill = False
    if len(data) > INBAND_MAX:
        wrapped = _wrap_bytes(body)
        if wrapped is not body:
            buffers.clear()
            data = pickle.dumps(wrapped, 5, buffer_callback=out_of_band)
        spill = len(data) > INBAND_MAX
    if not buffers and not spill:
        return _HEAD.pack(_CODES[kind], 0, task) + data
    raws = [buffer.raw() for buffer in buffers]
    if spill:
        raws.append(memoryview(data))
    table = _aligned(_COUNT.size + _SPAN.size * len(raws))
    segment = arena.take(table + sum(_aligned(raw.nbytes) for raw in raws))
    view = segment.view
    _COUNT.pack_into(view, 0, len(raws))
    offset = table
    for index, raw in enumerate(raws):
        view[offset:offset + raw.nbytes] = raw  # the one copy of the data
        _SPAN.pack_into(view, _COUNT.size + _SPAN.size * index, offset, raw.nbytes)
        offset += _aligned(raw.nbytes)
    name = segment.name.encode()
    flags = _SEGMENT | (_SPILLED if spill else 0)
    return b"".join((_HEAD.pack(_CODES[kind], flags, task), bytes((len(name),)), name, b"" if spill else data))


def unpack(frame: memoryview, attachments: Attachments, *, copy: bool) -> tuple[str, int, Any, str | None]:
    """``(kind, task, body, segment)`` of a compact frame; the caller releases ``segment`` when done.

    ``copy`` as for :func:`decode`. A body that does not unpickle comes back as :class:`Unreadable`.
    """
    try:
        code, flags, task = _HEAD.unpack_from(frame)
        kind = KINDS[code]
    except (struct.error, IndexError) as exc:
        raise ProtocolError(f"not a frame of protocol {VERSION}: {exc}") from None
    if not flags:
        try:
            return kind, task, pickle.loads(frame[_HEAD.size:]), None
        except Exception as exc:  # noqa: BLE001 - reported to the task, not raised on the connection
            return kind, task, Unreadable(exc), None
    try:
        end = _HEAD.size + 1 + frame[_HEAD.size]
        name = bytes(frame[_HEAD.size + 1:end]).decode()
        view = attachments.view(name, _COUNT.size)
        count = _COUNT.unpack_from(view)[0]
        spans = [_SPAN.unpack_from(view, _COUNT.size + _SPAN.size * index) for index in range(count)]
        view = attachments.view(name, max(offset + length for offset, length in spans))
    except Exception as exc:
        raise ProtocolError(f"bad segment in a frame: {type(exc).__name__}: {exc}") from exc
    if flags & _SPILLED:
        offset, length = spans.pop()
        data: Any = view[offset:offset + length]
    else:
        data = frame[end:]
    buffers = [bytearray(view[offset:offset + length]) if copy else view[offset:offset + length]
               for offset, length in spans]
    try:
        body = pickle.loads(data, buffers=buffers)
    except Exception as exc:  # noqa: BLE001 - reported to the task, not raised on the connection
        body = Unreadable(exc)
    return kind, task, body, name
