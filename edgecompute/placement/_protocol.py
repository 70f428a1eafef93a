"""The worker protocol: one message per packet of a Unix ``SOCK_SEQPACKET`` socket pair, large
buffers through shared memory that has no name.

Messages are ``(kind, task, body)``. The body is pickled with protocol 5: buffers of at least
:data:`OUT_OF_BAND` bytes (numpy arrays, large ``bytes``) are taken out of band and copied once
into a shared-memory segment from the sender's :class:`Arena`; the frame says where each lies. A
segment is a ``memfd``: it never has a name in ``/dev/shm``, so nothing is left there however either
side ends (kill -9 included). The first frame that uses a segment carries its file descriptor
(``SCM_RIGHTS``, in the same packet); the receiver maps it once and keeps it. The receiver rebuilds
the body on top of the segment (zero copy) or from a private copy, then hands the segment back (a
``release`` message, or inside its answer: :func:`pack`'s ``release``) so the sender can reuse it:
steady-state traffic touches no new pages. A
pickle that would still exceed :data:`INBAND_MAX` goes into the segment too, so every packet fits
the socket's buffer.

Which side may write what: a segment is written only by its sender, and a receiver maps the
peer's segments read-only (:class:`Attachments`). A worker's inputs are therefore read-only arrays,
and whatever the worker's code does with memory it does not own, it cannot change a byte the host
will read as another task's answer: the host copies every answer out of the worker's segment as it
arrives, before it hands the segment back.

The first two messages on a connection, ``setup`` (host to worker) and ``hello`` (worker to host),
use the frame of protocol 1 (:func:`encode`, :func:`decode`: a 4-byte length and a pickled
``(kind, task, body, segment, spans)``), which every version reads; they carry everything in band.
``hello`` carries :data:`VERSION` and a host refuses a worker that speaks another one. After them,
messages use the compact frame of :func:`pack` and :func:`unpack`: a 10-byte header (kind, flags,
task number) and the pickled body, one ``pickle.dumps`` and one ``pickle.loads`` per small message.
A plain numpy array is pickled as its buffer, dtype string and shape (:func:`_reduce_array`); a
body that is nothing but one (the common answer) is not pickled at all: the frame holds its dtype
string and shape, and its data in band or as a segment's one span.

A packet is never split or merged, so several threads may send on one socket without a lock and
several may block in ``recv`` on it: each gets whole messages (and the descriptors they carry), and
the kernel wakes one of them.
"""

from __future__ import annotations

import array
import copyreg
import fcntl
import io
import mmap
import os
import pickle
import socket
import struct
import sys
import threading
from typing import Any

__all__ = ["INBAND_MAX", "KINDS", "MAX_MESSAGE", "OUT_OF_BAND", "VERSION", "Arena", "Attachments", "ProtocolError",
           "Unreadable", "decode", "encode", "frame_length", "pack", "receive", "send", "unpack"]

#: The protocol version; bumped on any change a peer of another version would misread.
#: 2: one message per SOCK_SEQPACKET packet, compact frames after the handshake.
#: 3: segments are memfds passed with the first frame that uses them, named by number.
#: 4: plain numpy arrays travel as (buffer, dtype string, shape), rebuilt by _protocol._array.
#: 5: ``call``, a request the host's executor has checked, for the worker's ``run_checked``; a
#:    body that is one plain numpy array crosses as dtype, shape and data, without pickle.
VERSION = 5
#: Buffers at least this large cross through shared memory instead of the socket.
OUT_OF_BAND = 64 * 1024
#: A pickled body larger than this goes into shared memory with the buffers.
INBAND_MAX = 64 * 1024
#: No packet is larger: a receiver's buffer of this size holds any message (and the default
#: socket buffer of ~208 KiB accepts it).
MAX_MESSAGE = INBAND_MAX + 4096
#: The message kinds, by their code in a compact frame.
KINDS = ("run", "chunk", "progress", "done", "error", "cancel", "health", "release", "close", "call")
_CODES = {kind: code for code, kind in enumerate(KINDS)}
HEADER = struct.Struct("!I")
_HEAD = struct.Struct("!BBQ")  # kind, flags, task number
_ID = struct.Struct("!I")  # the segment's number, after the header of a frame that uses one
_COUNT = struct.Struct("!I")  # a segment starts with how many spans it holds ...
_SPAN = struct.Struct("!QQ")  # ... then each one's offset and length
_SEGMENT = 1  # flags: the message has buffers in a segment
_SPILLED = 2  # flags: the pickled body itself is the segment's last span
_NEW = 4  # flags: the packet carries the segment's file descriptor (its first use)
_RELEASES = 8  # flags: the packet hands back one of the receiver's segments (its number follows the header)
_ARRAY = 16  # flags: the body is one plain numpy array: _ARRAY_HEAD, dtype string, shape, then its data
_ARRAY_HEAD = struct.Struct("!BB")  # the dtype string's length, the number of dimensions
MAX_FRAME = 1 << 30
_ALIGN = 64
_MIN_SEGMENT = 1 << 20
_FD_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)
_SEAL_FUTURE_WRITE = 0x10  # F_SEAL_FUTURE_WRITE (Linux 5.1); the fcntl module of Python 3.11 lacks it


class ProtocolError(Exception):
    """A peer sent something that is not a frame of this protocol."""


class _Segment:
    """A sender's memfd, mapped read-write; ``fd`` stays open until it has gone to the peer."""

    __slots__ = ("fd", "id", "map", "sent", "size", "view")

    def __init__(self, ident: int, size: int) -> None:
        fd = os.memfd_create(f"edgecompute-{ident}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
            # sealed once we hold our writable mapping: the peer can map it only read-only (not
            # even mprotect makes that writable) and cannot shrink it under us (a SIGBUS here)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEAL_FUTURE_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.id = ident
        self.size = size
        self.sent = False
        self.view = memoryview(self.map)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.view.release()
        try:
            self.map.close()
        except BufferError:  # something still views it (a zero-copy array); the OS unmaps at exit
            pass


class Arena:
    """The sender's shared-memory segments: taken for one message, given back by the receiver."""

    def __init__(self) -> None:
        self._free: list[_Segment] = []
        self._lent: dict[int, _Segment] = {}
        self._count = 0
        self._lock = threading.Lock()  # a worker sends from several threads

    def take(self, size: int) -> _Segment:
        with self._lock:
            best = None
            for segment in self._free:
                if segment.size >= size and (best is None or segment.size < best.size):
                    best = segment
            if best is not None:
                self._free.remove(best)
            else:
                self._count += 1
                best = _Segment(self._count, max(_MIN_SEGMENT, 1 << (size - 1).bit_length()))
            self._lent[best.id] = best
            return best

    def give_back(self, ident: int) -> None:
        with self._lock:
            segment = self._lent.pop(ident, None)
            if segment is not None:
                self._free.append(segment)

    def close(self) -> None:
        with self._lock:
            for segment in [*self._free, *self._lent.values()]:
                segment.close()
            self._free.clear()
            self._lent.clear()


class Attachments:
    """The receiver's read-only mappings of the peer's segments, mapped once and kept.

    With ``max_size`` (a host facing a sandboxed worker) no segment larger than that is mapped:
    the peer chooses the sizes it sends.
    """

    def __init__(self, max_size: int | None = None) -> None:
        self._segments: dict[int, tuple[mmap.mmap, memoryview]] = {}
        self._lock = threading.Lock()  # a worker receives on several threads
        self._max_size = max_size

    def adopt(self, ident: int, fd: int) -> None:
        """Map the segment ``ident`` from its descriptor (then closed)."""
        try:
            size = os.fstat(fd).st_size
            if self._max_size is not None and size > self._max_size:
                raise ProtocolError(f"segment {ident} of {size} bytes is larger than the peer may hold")
            if size == 0:
                raise ProtocolError(f"segment {ident} is empty")
            mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        except OSError as exc:
            raise ProtocolError(f"segment {ident} cannot be mapped: {exc}") from exc
        finally:
            os.close(fd)
        with self._lock:
            old = self._segments.get(ident)
            self._segments[ident] = (mapping, memoryview(mapping))
        if old is not None:
            _unmap(*old)

    def view(self, ident: int) -> memoryview:
        found = self._segments.get(ident)
        if found is None:
            raise ProtocolError(f"segment {ident} was never sent")
        return found[1]

    def close(self) -> None:
        with self._lock:
            for mapping, view in self._segments.values():
                _unmap(mapping, view)
            self._segments.clear()


def _unmap(mapping: mmap.mmap, view: memoryview) -> None:
    view.release()
    try:
        mapping.close()
    except BufferError:  # a zero-copy array still views it; the OS unmaps at exit
        pass


def send(sock: socket.socket, frame: bytes, fd: int | None) -> None:
    """One packet: ``frame``, with ``fd`` as its ancillary data when given. Blocks when the
    socket does (``BlockingIOError`` from a non-blocking one that is full)."""
    if fd is None:
        sock.send(frame)
    else:
        sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", (fd,)))])


def receive(sock: socket.socket, buffer: bytearray, flags: int = 0) -> tuple[int, list[int]]:
    """One packet into ``buffer``: its size (0 at EOF) and the descriptors it carried."""
    size, ancillary, _, _ = sock.recvmsg_into((buffer,), _FD_SPACE, flags)
    if not ancillary:
        return size, []
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return size, list(fds)


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


def encode(kind: str, task: str, body: Any) -> bytes:
    """One frame of protocol 1 holding a message, everything in band (the handshake's)."""
    frame = pickle.dumps((kind, task, pickle.dumps(body, protocol=5), None, []), protocol=5)
    return HEADER.pack(len(frame)) + frame


def frame_length(header: bytes) -> int:
    length: int = HEADER.unpack(header)[0]
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds the limit of {MAX_FRAME}")
    return length


class Unreadable:
    """A message body this side cannot unpickle (a class that only the peer's environment has)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def decode(frame: bytes) -> tuple[str, str, Any]:
    """``(kind, task, body)`` of a frame of protocol 1; a body that does not unpickle comes back
    as :class:`Unreadable`. A frame that names a segment (protocol 1 and 2 peers put large bodies
    in named files) is refused: this side maps none by name."""
    try:
        kind, task, payload, name, _ = pickle.loads(frame)
    except Exception as exc:
        raise ProtocolError(f"not a frame: {type(exc).__name__}: {exc}") from exc
    if name is not None:
        raise ProtocolError(f"the peer sent segment {name!r} by name (an older protocol)")
    try:
        body = pickle.loads(payload)
    except Exception as exc:  # noqa: BLE001 - reported to the task, not raised on the connection
        body = Unreadable(exc)
    return kind, task, body


def _array(buffer: Any, dtype: str, shape: tuple[int, ...]) -> Any:
    """An array rebuilt from its buffer (see :func:`_reduce_array`): writable when the buffer is."""
    new = _new_array[0]
    if new is None:
        import numpy

        new = _new_array[0] = numpy.ndarray
    return new(shape, dtype, buffer)


_new_array: list[Any] = [None]  # numpy.ndarray, once an array arrives (the core does not import numpy)


def _reduce_array(array: Any) -> Any:
    """A plain C-contiguous numpy array as its buffer (out of band when large), dtype string and
    shape: cheaper both ways than numpy's own reduction, which pickles the dtype as an object
    and rebuilds through a Python helper (measured: ~1.5 us less a message each way)."""
    dtype = array.dtype
    if type(array) is not _ndarray[0] or dtype.kind not in _PLAIN_KINDS or not array.flags.c_contiguous:
        return array.__reduce_ex__(5)
    return _array, (pickle.PickleBuffer(array), dtype.str, array.shape)


_PLAIN_KINDS = frozenset("biufc")  # numbers only: the dtype string says all, and a buffer carries them
_ndarray: list[Any] = [None]


class _Pickler(pickle.Pickler):
    """``pickle.dumps`` with numpy arrays reduced by :func:`_reduce_array` (numpy is looked for
    only once a body holds an array: the core does not import it)."""

    dispatch_table: dict[type, Any] = {}


def _dumps(body: Any, buffer_callback: Any) -> bytes:
    if _ndarray[0] is None and _numpy_array() is None:
        return pickle.dumps(body, 5, buffer_callback=buffer_callback)
    out = io.BytesIO()
    _Pickler(out, 5, buffer_callback=buffer_callback).dump(body)
    return out.getvalue()


def _aligned(size: int) -> int:
    return -(-size // _ALIGN) * _ALIGN


def pack(kind: str, task: int, body: Any, arena: Arena, *, release: int | None = None) -> tuple[bytes, int | None]:
    """One compact frame (one packet) holding a message, at most :data:`MAX_MESSAGE` bytes, and
    the descriptor to send with it (a segment's first use), else None. With ``release``, the frame
    also hands back that segment of the peer's (an answer returns its request's segment so, and
    the peer wakes once for both).

    A small body costs one ``pickle.dumps``; only a pickle that comes out large is looked at again
    (large ``bytes`` taken out of band, then the pickle itself moved to shared memory if need be).
    A segment starts with its table of spans, so the packet only names it, however many buffers.
    """
    plain = _ndarray[0] or _numpy_array()
    if type(body) is plain and body.dtype.kind in _PLAIN_KINDS and body.flags.c_contiguous:
        return _pack_array(kind, task, body, arena, release)
    buffers: list[pickle.PickleBuffer] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        if buffer.raw().nbytes < OUT_OF_BAND:
            return True
        buffers.append(buffer)
        return False

    data = _dumps(body, out_of_band)
    spill = False
    if len(data) > INBAND_MAX:
        wrapped = _wrap_bytes(body)
        if wrapped is not body:
            buffers.clear()
            data = _dumps(wrapped, out_of_band)
        spill = len(data) > INBAND_MAX
    returned = b"" if release is None else _ID.pack(release)
    if not buffers and not spill:
        return _HEAD.pack(_CODES[kind], 0 if release is None else _RELEASES, task) + returned + data, None
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
    fd = None
    flags = _SEGMENT | (_SPILLED if spill else 0) | (0 if release is None else _RELEASES)
    if not segment.sent:
        # the segment is lent to this message alone, and comes back only after the peer has
        # read it: no other frame can use it before this one has delivered its descriptor
        segment.sent = True
        fd = segment.fd
        flags |= _NEW
    head = _HEAD.pack(_CODES[kind], flags, task) + returned + _ID.pack(segment.id)
    return (head if spill else head + data), fd


def _numpy_array() -> Any:
    """numpy.ndarray once numpy is imported (by anyone), else None: the core does not import it."""
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return None
    _ndarray[0] = numpy.ndarray
    _Pickler.dispatch_table = {**copyreg.dispatch_table, numpy.ndarray: _reduce_array}
    return numpy.ndarray


def _pack_array(kind: str, task: int, array: Any, arena: Arena, release: int | None) -> tuple[bytes, int | None]:
    """:func:`pack` of a body that is one plain C-contiguous array: no pickle either way."""
    dtype = array.dtype.str.encode("ascii")
    shape = array.shape
    described = _ARRAY_HEAD.pack(len(dtype), len(shape)) + dtype + struct.pack(f"!{len(shape)}q", *shape)
    returned = b"" if release is None else _ID.pack(release)
    flags = _ARRAY | (0 if release is None else _RELEASES)
    raw = pickle.PickleBuffer(array).raw()
    nbytes = raw.nbytes
    if nbytes < OUT_OF_BAND:
        return _HEAD.pack(_CODES[kind], flags, task) + returned + described + raw.tobytes(), None
    table = _aligned(_COUNT.size + _SPAN.size)
    segment = arena.take(table + nbytes)
    view = segment.view
    _COUNT.pack_into(view, 0, 1)
    _SPAN.pack_into(view, _COUNT.size, table, nbytes)
    view[table:table + nbytes] = raw  # the one copy of the data
    fd = None
    flags |= _SEGMENT
    if not segment.sent:  # see pack
        segment.sent = True
        fd = segment.fd
        flags |= _NEW
    return _HEAD.pack(_CODES[kind], flags, task) + returned + _ID.pack(segment.id) + described, fd


def _unpack_array(frame: memoryview, at: int, data: Any) -> Any:
    """The array a :func:`_pack_array` frame describes at ``at``, over ``data`` (None: the rest
    of the frame, copied); :class:`Unreadable` when it does not describe one."""
    try:
        size, ndim = _ARRAY_HEAD.unpack_from(frame, at)
        at += _ARRAY_HEAD.size
        dtype = str(frame[at:at + size], "ascii")
        shape = struct.unpack_from(f"!{ndim}q", frame, at + size)
        if data is None:
            data = bytearray(frame[at + size + 8 * ndim:])
        new = _new_array[0]
        if new is None:
            import numpy

            new = _new_array[0] = numpy.ndarray
        array = new(shape, dtype, data)
        if array.dtype.kind not in _PLAIN_KINDS or array.nbytes != len(data) or array.shape != shape:
            raise ValueError(f"{array.dtype} of shape {shape} over {len(data)} bytes is no plain array")
    except Exception as exc:  # noqa: BLE001 - reported to the task, not raised on the connection
        return Unreadable(exc)
    return array


def unpack(frame: memoryview, attachments: Attachments, *, copy: bool, fds: list[int] | None = None,
           arena: Arena | None = None) -> tuple[str, int, Any, int | None]:
    """``(kind, task, body, segment)`` of a compact frame received with ``fds``; the caller
    releases ``segment`` (a number) when done. A segment of ours that the frame hands back goes
    back to ``arena``.

    With ``copy`` the body owns its data and the segment may be released at once; without, arrays
    view the (read-only) segment, which must stay lent until they are no longer used. A body that
    does not unpickle comes back as :class:`Unreadable`.
    """
    try:
        code, flags, task = _HEAD.unpack_from(frame)
        kind = KINDS[code]
    except (struct.error, IndexError) as exc:
        _close(fds)
        raise ProtocolError(f"not a frame of protocol {VERSION}: {exc}") from None
    start = _HEAD.size
    if flags & _RELEASES:
        try:
            returned = _ID.unpack_from(frame, start)[0]
        except struct.error as exc:
            _close(fds)
            raise ProtocolError(f"not a frame of protocol {VERSION}: {exc}") from None
        start += _ID.size
        if arena is not None:
            arena.give_back(returned)
    if not flags & _SEGMENT:
        if fds:
            _close(fds)  # a peer that sends descriptors nobody asked for must not fill our table
        if flags & _ARRAY:
            return kind, task, _unpack_array(frame, start, None), None
        try:
            return kind, task, pickle.loads(frame[start:]), None
        except Exception as exc:  # noqa: BLE001 - reported to the task, not raised on the connection
            return kind, task, Unreadable(exc), None
    try:
        ident = _ID.unpack_from(frame, start)[0]
        if flags & _NEW:
            if not fds:
                raise ProtocolError("a frame announced a segment and carried no descriptor")
            attachments.adopt(ident, fds.pop(0))
        view = attachments.view(ident)
        end = len(view)
        spans = []
        for index in range(_COUNT.unpack_from(view)[0]):
            span = _SPAN.unpack_from(view, _COUNT.size + _SPAN.size * index)
            if span[0] + span[1] > end:
                raise ProtocolError(f"segment {ident} holds spans past its end")
            spans.append(span)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"bad segment in a frame: {type(exc).__name__}: {exc}") from exc
    finally:
        if fds:
            _close(fds)
    if flags & _ARRAY:
        if len(spans) != 1:
            return kind, task, Unreadable(ProtocolError(f"an array's frame names {len(spans)} spans")), ident
        offset, length = spans[0]
        held = bytearray(view[offset:offset + length]) if copy else view[offset:offset + length]
        return kind, task, _unpack_array(frame, start + _ID.size, held), ident
    if flags & _SPILLED:
        offset, length = spans.pop()
        data: Any = view[offset:offset + length]
    else:
        data = frame[start + _ID.size:]
    buffers = [bytearray(view[offset:offset + length]) if copy else view[offset:offset + length]
               for offset, length in spans]
    try:
        body = pickle.loads(data, buffers=buffers)
    except Exception as exc:  # noqa: BLE001 - reported to the task, not raised on the connection
        body = Unreadable(exc)
    return kind, task, body, ident


def _close(fds: list[int] | None) -> None:
    while fds:
        os.close(fds.pop())
