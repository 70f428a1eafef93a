"""Host paths named by requests: allowed only under operator roots, checked by their real path.

A request is untrusted. A path it names (a mount, a module file, a wheel) is used only when the
operator configured roots for it, the path's real path (every symlink resolved) lies under one of
them, and it is the kind of thing expected: a folder that holds only regular files, folders and
symlinks, or a regular file read with a bounded, non-blocking read.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgecompute.errors import InvalidRequest

__all__ = ["check_tree", "read_file_under", "real_path_under", "unstick_fifos"]


def real_path_under(path: Any, roots: Sequence[Path], param: str, setting: str,
                    error: Callable[[str], Exception] = InvalidRequest) -> str:
    """The real path of ``path`` when it lies under one of ``roots``; ``error`` otherwise."""
    if not roots:
        raise error(f"{param}: this wasm executor takes no host paths from requests (the operator allows them "
                    f"under folders named by {setting} in [executors.wasm])")
    if not isinstance(path, (str, os.PathLike)):
        raise error(f"{param} must be a path, not {type(path).__name__}")
    text = os.fspath(path)
    if not isinstance(text, str) or not text or "\x00" in text:
        raise error(f"{param} must be a non-empty path")
    real = os.path.realpath(text)
    if not any(_inside(real, str(root)) for root in roots):
        raise error(f"{param} {text!r} is not under the folders allowed by {setting}")
    return real


def _inside(real: str, root: str) -> bool:
    try:
        return os.path.commonpath([real, root]) == root
    except ValueError:
        return False


def read_file_under(real: str, roots: Sequence[Path], cap: int, param: str, setting: str, cap_setting: str) -> bytes:
    """At most ``cap`` bytes of the regular file at ``real`` (already checked to lie under ``roots``).

    O_NOFOLLOW: the last component was resolved, so a symlink there now is a swap; O_NONBLOCK: a FIFO
    swapped in never blocks this thread in open(); fstat: only a regular file is read; the read
    stops at ``cap + 1`` bytes whatever the file's size claims (a growing file, /proc)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError as exc:
        raise InvalidRequest(f"cannot open {param} {real!r}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidRequest(f"{param} {real!r} is not a regular file")
        try:  # what was opened, after any swap of a folder above it for a symlink
            opened = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            opened = real
        if not any(_inside(opened, str(root)) for root in roots):
            raise InvalidRequest(f"{param} {real!r} is not under the folders allowed by {setting}")
        if st.st_size > cap:
            raise InvalidRequest(f"{param} {real!r} is {st.st_size} bytes, above its ceiling {cap} "
                                 f"({cap_setting})")
        chunks, total = [], 0
        while total <= cap:
            chunk = os.read(fd, min(1 << 20, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > cap:
            raise InvalidRequest(f"{param} {real!r} is larger than its ceiling {cap} ({cap_setting})")
        return b"".join(chunks)
    finally:
        os.close(fd)


def check_tree(real: str, max_entries: int, what: str, error: Callable[[str], Exception] = InvalidRequest) -> None:
    """Refuse a folder that holds anything but regular files, folders and symlinks.

    wasmtime's WASI opens a guest's file with a blocking open(): a FIFO (or a device) in a mount
    would block the sandbox thread where no epoch deadline reaches it. Symlinks are allowed: those
    that leave the folder are refused by wasmtime, those that stay point at entries checked here."""
    st = os.stat(real)
    if not stat.S_ISDIR(st.st_mode):
        raise error(f"{what}: {real!r} is not a folder")
    seen = 0
    stack = [real]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                continue  # the guest cannot open it either
            raise error(f"{what}: cannot list {folder!r}: {exc.strerror}") from None
        for entry in entries:
            seen += 1
            if seen > max_entries:
                raise error(f"{what}: {real!r} holds more than {max_entries} entries to check "
                            "(max_mount_entries)")
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                stack.append(entry.path)
            elif not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                raise error(f"{what}: {entry.path!r} is a special file (FIFO, socket or device); a mount may "
                            "hold only regular files, folders and symlinks")


def unstick_fifos(folders: Sequence[str], max_entries: int) -> int:
    """Wake a thread blocked opening or reading a FIFO under ``folders``: open each FIFO for writing
    without blocking (it succeeds only when a reader waits) and close it, so the reader sees end of
    file and returns to wasm code, where its passed deadline stops it. Returns the FIFOs woken."""
    woken = seen = 0
    stack = list(folders)
    while stack and seen <= max_entries:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            seen += 1
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError:
                continue
            if stat.S_ISDIR(mode):
                stack.append(entry.path)
            elif stat.S_ISFIFO(mode):
                try:
                    fd = os.open(entry.path, os.O_WRONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
                except OSError:
                    continue  # ENXIO: nobody is reading it
                os.close(fd)
                woken += 1
    return woken
