"""Compiling C++ plugins with the system compiler into a content-hashed cache (stdlib only)."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from edgecompute.errors import ConfigError

from . import _isa
from .errors import CompileError, NoCompiler

__all__ = ["BUILTIN_SOURCES", "DEFAULT_FLAGS", "PREBUILT_DIR", "build_builtin", "build_plugin", "cache_dir", "compiler",
           "include_dir"]

PACKAGE_DIR = Path(__file__).resolve().parent
#: the bundled plugin: builtin.cpp holds the plugin table and most algorithms, fft.cpp the FFT
BUILTIN_SOURCES = tuple(PACKAGE_DIR / source for source in _isa.SOURCES)
#: where a wheel holds the bundled plugin compiled at build time, one library per instruction-set level
PREBUILT_DIR = PACKAGE_DIR / "_prebuilt"
DEFAULT_FLAGS: tuple[str, ...] = (
    "-std=c++17", "-O3", "-march=native", "-fPIC", "-shared", "-fvisibility=hidden", "-fno-math-errno",
)
SOURCE_SUFFIXES = (".cpp", ".cc", ".cxx", ".c++", ".C")
_HEADER_SUFFIXES = (".h", ".hpp", ".hh", ".hxx", ".inl")
_lock = threading.Lock()


def include_dir() -> Path:
    """The directory holding ``edgecompute/plugin.h`` (pass it to the compiler with ``-I``)."""
    return PACKAGE_DIR / "include"


def cache_dir() -> Path:
    """Where compiled plugins are kept: ``$EDGECOMPUTE_CPP_CACHE``, else the user cache directory."""
    explicit = os.environ.get("EDGECOMPUTE_CPP_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgecompute-cpp"


def compiler(source: str = "<compiler>") -> list[str]:
    """The C++ compiler command: ``$CXX`` (may hold arguments), else ``c++``, ``g++`` or ``clang++``.

    Raises :class:`NoCompiler` (naming ``source``, what needed it) when there is none."""
    explicit = os.environ.get("CXX")
    if explicit:
        return shlex.split(explicit)
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return [found]
    raise NoCompiler(source)


@functools.lru_cache(maxsize=8)
def _compiler_identity(command: tuple[str, ...]) -> str:
    try:
        done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        raise CompileError("<compiler>", list(command), f"cannot run the C++ compiler {command[0]!r}: {exc}") from exc
    return done.stdout + done.stderr


@functools.lru_cache(maxsize=1)
def _machine_identity() -> str:
    # -march=native makes the library specific to this CPU: a cache shared between machines
    # must not hand one machine's build to another
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    flags += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()} {flags}"


def _files_under(directory: Path, suffixes: Iterable[str]) -> list[Path]:
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            if name.endswith(tuple(suffixes)):
                found.append(Path(root) / name)
    return sorted(found)


def build_plugin(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, flags: Sequence[str] = (),
                 include_dirs: Sequence[str | os.PathLike[str]] = (), name: str | None = None,
                 cache: str | os.PathLike[str] | None = None) -> Path:
    """Compile C++ plugin source(s) into a shared library and return its path.

    The library lands in the cache (:func:`cache_dir`) under a name made of a hash of everything
    that affects it: the sources, the headers next to them and in ``include_dirs``, the
    edgecompute headers, the compiler's identity, the flags and the machine. An unchanged
    plugin is never rebuilt; a changed one is. Extra ``flags`` go after the defaults
    (:data:`DEFAULT_FLAGS`; add e.g. ``-DEC_ABI_TARGET=1`` or ``-lm``).

    Raises :class:`CompileError` with the compiler's message when compiling fails, and
    :class:`NoCompiler` when there is no compiler to run.
    """
    sources = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
    if not sources:
        raise ConfigError("build_plugin needs at least one source file")
    for source in sources:
        if not source.is_file():
            raise ConfigError(f"C++ plugin source {str(source)!r} does not exist")
    command = compiler(", ".join(str(s) for s in sources))
    includes = [include_dir(), *(Path(p) for p in include_dirs)]
    all_flags = [*DEFAULT_FLAGS, *flags]
    digest = hashlib.sha256()
    for part in (_compiler_identity(tuple(command)), _machine_identity(), "\0".join(command), "\0".join(all_flags)):
        digest.update(part.encode())
        digest.update(b"\0")
    hashed: set[Path] = set()
    for source in sources:
        hashed.add(source.resolve())
    for directory in {s.resolve().parent for s in sources}:  # headers next to the sources (not below)
        hashed.update(p.resolve() for p in directory.iterdir() if p.is_file() and p.suffix in _HEADER_SUFFIXES)
    for directory in {p.resolve() for p in includes}:
        if directory.is_dir():
            hashed.update(p.resolve() for p in _files_under(directory, _HEADER_SUFFIXES))
    for file in sorted(hashed):
        digest.update(str(file).encode())
        digest.update(file.read_bytes())
    label = name or sources[0].stem
    target_dir = Path(cache) if cache is not None else cache_dir()
    target = target_dir / f"{label}-{digest.hexdigest()[:20]}.so"
    if target.exists():
        return target
    with _lock:
        if target.exists():
            return target
        target_dir.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=f".{label}-", suffix=".so", dir=target_dir)
        os.close(fd)
        argv = [*command, *all_flags, *(f"-I{p}" for p in includes), *(str(s) for s in sources), "-o", temporary]
        try:
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                raise CompileError(", ".join(str(s) for s in sources), argv, done.stderr or done.stdout)
            os.replace(temporary, target)  # atomic: concurrent builders never see half a library
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    return target


def build_builtin() -> Path:
    """The bundled plugin's library: in a wheel, the one compiled at build time for the highest
    instruction-set level this CPU runs (``$EDGECOMPUTE_CPP_ISA`` may name another, or ``native``);
    in a source install (no such libraries), compiled for this CPU on first use."""
    try:
        found = _isa.best_level(PREBUILT_DIR)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if found is not None:
        return found[1]
    try:
        return build_plugin(BUILTIN_SOURCES, name="builtin")
    except NoCompiler:
        raise NoCompiler("the bundled plugin", bundled=True) from None
