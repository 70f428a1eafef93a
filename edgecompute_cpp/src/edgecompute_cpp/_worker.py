"""The worker process of ``process`` isolation: loads plugins and runs calls sent by the host.

Started as ``python -m edgecompute_cpp._worker FD ARENA``: FD is its end of a socket pair, ARENA
the path of the shared-memory file through which arrays cross. Messages are pickled tuples:

    ("describe", path)                                    -> ("ok", info) | ("error", kind, message)
    ("call", path, algorithm, params, inputs, out_offset) -> ("ok", outputs) | ("error", kind, message)
    ("arena", path)                                       -> ("ok", None)   (the host grew the arena)

``inputs`` are ``(name, dtype, shape, offset)`` in the arena; each output comes back as
``(name, dtype, shape, offset)`` when it fits in the arena after ``out_offset``, else as
``(name, array)`` (pickled through the socket).
"""

from __future__ import annotations

import mmap
import os
import socket
import sys
from multiprocessing.connection import Connection
from typing import Any

ALIGN = 64


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


def main(argv: list[str]) -> None:
    import numpy as np

    from edgecompute.errors import EdgeComputeError, InvalidRequest

    from ._native import NativePlugin, PluginCallError

    sock = socket.socket(fileno=int(argv[0]))
    conn = Connection(os.dup(sock.fileno()))
    sock.close()
    arena = Arena(argv[1])
    plugins: dict[str, NativePlugin] = {}

    def load(path: str) -> NativePlugin:
        plugin = plugins.get(path)
        if plugin is None:
            plugin = plugins[path] = NativePlugin(path)
        return plugin

    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        kind = message[0]
        try:
            if kind == "describe":
                conn.send(("ok", load(message[1]).describe()))
            elif kind == "arena":
                arena = Arena(message[1])
                conn.send(("ok", None))
            elif kind == "call":
                _, path, algorithm, params, specs, out_offset = message
                buf = arena.map
                inputs = []
                for name, dtype, shape, offset in specs:
                    count = 1
                    for s in shape:
                        count *= s
                    array = np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(shape)
                    inputs.append((name, array))
                outputs = load(path).call(algorithm, inputs, params)
                del inputs
                replies: list[Any] = []
                cursor = out_offset
                for name, array in outputs:
                    end = cursor + array.nbytes
                    if end <= arena.size:
                        target = np.frombuffer(buf, dtype=array.dtype, count=array.size, offset=cursor)
                        target[...] = array.reshape(-1)
                        replies.append((name, array.dtype.str, array.shape, cursor))
                        cursor = align(end)
                    else:
                        replies.append((name, np.ascontiguousarray(array)))
                del outputs
                conn.send(("ok", replies))
            else:
                conn.send(("error", "internal", f"unknown message {kind!r}"))
        except InvalidRequest as exc:
            conn.send(("error", "invalid", str(exc)))
        except PluginCallError as exc:
            conn.send(("error", "plugin", str(exc)))
        except EdgeComputeError as exc:
            conn.send(("error", type(exc).__name__, getattr(exc, "reason", str(exc)), getattr(exc, "found", None)))
        except Exception as exc:  # noqa: BLE001 - reported to the host, the worker lives on
            conn.send(("error", "internal", f"{type(exc).__name__}: {exc}"))


if __name__ == "__main__":
    main(sys.argv[1:])
