"""The worker process of ``process`` isolation: loads plugins and runs calls sent by the host.

Started as ``python -m edgecompute_cpp._worker FD ARENA``: FD is its end of a ``SOCK_SEQPACKET``
socket pair, ARENA the path of the shared-memory file through which arrays cross. Each message is
one pickled tuple in one packet (one ``send`` and one ``recv`` a message, no length prefix):

    ("describe", path)                     -> ("ok", info) | ("error", kind, message)
    ("call", path, algorithm, params,
     inputs, out_offset, out_block)        -> ("ok", outputs, arena) | ("error", kind, message)
    ("arena", path)                        -> ("ok", None)   (the host grew the arena)
    ("segments", [(id, size), ...])        -> no reply; the next packet carries their fds
    ("forget", [id, ...])                  -> no reply; unmap those shared segments

``params`` is the JSON bytes, or ``(offset, length)`` of them in the arena when they are large.
``inputs`` are ``(name, dtype, shape, offset, segment)``: in the arena when ``segment`` is
None, else in that shared segment (``_shared``: arrays the caller made there are not copied).
``out_block`` is None or ``(segment, offset, size)``, a block the host reserved for the outputs:
if they fit, each comes back as ``(name, dtype, shape, offset, True)``, written in that segment
from that offset; otherwise as ``(name, dtype, shape, offset, False)``, written in the arena
after ``out_offset``. When they do not fit there either, the worker makes a larger arena itself,
writes them there from offset 0 and returns its path as ``arena`` (else None): the host maps it
and unlinks it, and both use it from then on. Nothing large ever crosses the socket, so every
packet fits its buffer.
"""

from __future__ import annotations

import mmap
import os
import pickle
import socket
import sys
import tempfile
from typing import Any

ALIGN = 64
#: No message is larger (the host's receive buffer); pickled tuples of names and shapes are tiny.
MAX_MESSAGE = 1 << 16


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Arena:
    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            self.size = os.fstat(fd).st_size
            self.map = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)


def shm_dir() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def new_arena_file(size: int) -> str:
    """A shared-memory file of ``size`` bytes with its pages reserved, in /dev/shm if possible.

    Reserved now: a sparse file in a full /dev/shm (64 MB in a default Docker container) would
    kill the process that first writes to it with SIGBUS instead of raising.
    """
    error: OSError | None = None
    for directory in dict.fromkeys((shm_dir(), None)):
        fd, path = tempfile.mkstemp(prefix="edgecompute-cpp-", dir=directory)
        try:
            os.ftruncate(fd, size)
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)
            return path
        except OSError as exc:
            os.unlink(path)
            error = exc
        finally:
            os.close(fd)
    raise OSError(f"cannot allocate a {size / 2**20:.0f} MiB shared-memory arena: {error}")


def main(argv: list[str]) -> None:
    import numpy as np

    from edgecompute.errors import EdgeComputeError, InvalidRequest

    from ._native import NativePlugin
    from .errors import PluginCallError

    sock = socket.socket(fileno=int(argv[0]))
    arena = Arena(argv[1])
    plugins: dict[str, NativePlugin] = {}
    segments: dict[int, mmap.mmap] = {}
    unmapped: dict[int, str] = {}

    def load(path: str) -> NativePlugin:
        plugin = plugins.get(path)
        if plugin is None:
            plugin = plugins[path] = NativePlugin(path)
        return plugin

    def send(message: tuple[Any, ...]) -> None:
        sock.send(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))

    def call(path: str, algorithm: str, params: bytes | tuple[int, int], specs: list[Any],
             out_offset: int, out_block: tuple[int, int, int] | None) -> tuple[Any, ...]:
        nonlocal arena
        buf = arena.map
        if isinstance(params, tuple):  # large params travel in the arena
            params = bytes(buf[params[0]:params[0] + params[1]])
        inputs = []
        for name, dtype, shape, offset, segment in specs:
            inputs.append((name, np.ndarray(shape, dtype, buf if segment is None else mapped(segment), offset)))
        outputs = load(path).call(algorithm, inputs, params)
        del inputs
        size = 0
        for _, array in outputs:
            size = align(size + array.nbytes)
        grown = None
        in_block = out_block is not None and size <= out_block[2]
        if in_block:
            assert out_block is not None
            target, cursor = mapped(out_block[0]), out_block[1]
        else:
            if out_offset + size > arena.size:
                # they do not fit after the inputs: a new arena of our own, outputs from its start
                grown = new_arena_file(max(align(size * 2), arena.size * 2))
                arena, out_offset = Arena(grown), 0
            target, cursor = arena.map, out_offset
        replies = []
        for name, array in outputs:
            nbytes = array.nbytes
            if nbytes:  # plugin outputs are C-contiguous
                target[cursor:cursor + nbytes] = array.data.cast("B") if array.ndim else array.tobytes()
            replies.append((name, array.dtype.str, array.shape, cursor, in_block))
            cursor = align(cursor + nbytes)
        return ("ok", replies, grown)

    def mapped(segment: int) -> mmap.mmap:
        view = segments.get(segment)
        if view is None:
            raise OSError(f"shared segment {segment} is not mapped in the worker: "
                          f"{unmapped.get(segment, 'its file descriptor never arrived')}")
        return view

    send(("ready", os.getpid()))
    while True:
        try:
            packet = sock.recv(MAX_MESSAGE)
        except OSError:
            return
        if not packet:
            return  # the host closed its end
        message = pickle.loads(packet)
        kind = message[0]
        if kind == "segments":  # no reply: a failure shows on the call that needs the segment
            _, fds, _, _ = socket.recv_fds(sock, 16, len(message[1]))
            for (ident, size), fd in zip(message[1], fds, strict=False):
                try:
                    segments[ident] = mmap.mmap(fd, size)
                except OSError as exc:
                    unmapped[ident] = f"{type(exc).__name__}: {exc}"
                finally:
                    os.close(fd)
            continue
        if kind == "forget":
            for ident in message[1]:
                view = segments.pop(ident, None)
                if view is not None:
                    try:
                        view.close()
                    except BufferError:
                        pass  # an array over it is still alive; the mapping goes with it
            continue
        try:
            if kind == "call":
                send(call(*message[1:]))
            elif kind == "describe":
                send(("ok", load(message[1]).describe()))
            elif kind == "arena":
                arena = Arena(message[1])
                send(("ok", None))
            else:
                send(("error", "internal", f"unknown message {kind!r}"))
        except InvalidRequest as exc:
            send(("error", "invalid", str(exc)))
        except PluginCallError as exc:
            send(("error", "plugin", str(exc)))
        except EdgeComputeError as exc:
            send(("error", type(exc).__name__, getattr(exc, "reason", str(exc)), getattr(exc, "found", None)))
        except Exception as exc:  # noqa: BLE001 - reported to the host, the worker lives on
            send(("error", "internal", f"{type(exc).__name__}: {exc}"))

if __name__ == "__main__":
    main(sys.argv[1:])
