"""Compile ``q4.cpp`` at first use into a content-hashed on-disk cache and load it as the torch
custom op ``torch.ops.edgecompute_ml.q4_linear`` (docs/ml.md, "Quantized weights").

- **Compiler**: ``$CXX`` (may hold arguments), else ``c++``, ``g++`` or ``clang++``, with torch's
  headers and libraries, ``-O3 -fopenmp`` (the op's threads are ATen's OpenMP pool: compiled with
  GCC the library needs ``libgomp.so.1``, which resolves to the copy torch has already loaded;
  clang is asked for libgomp too, never a second runtime). No ``-march``: the source picks its
  instruction set at load (AVX-512 VNNI, else AVX2).
- **Cache**: ``$EDGECOMPUTE_ML_CACHE/kernels``, else the user cache directory's
  ``edgecompute-ml/kernels``; the file name hashes the source, torch's version, the compiler's
  identity, the flags and the CPU's instruction sets. A build is written under a temporary name
  and renamed into place, so processes compiling at the same time never load half a library.
- **Fallback**: ``EDGECOMPUTE_ML_Q4_KERNEL=0`` turns the kernel off; no compiler, a failed compile
  or load, or a CPU with neither AVX2 nor AVX-512 VNNI leave ``q4`` weights on torch's int4 kernel.
  The reason is logged once per process and kept in :func:`q4_status`.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from .._runtime.paths import cache_root

__all__ = ["DISABLE_ENV", "SOURCE", "cache_dir", "load_q4", "q4_status"]

_log = logging.getLogger("edgecompute_ml.kernels")
SOURCE = Path(__file__).resolve().parent / "q4.cpp"
#: set to 0/false/off/no to keep 4-bit weights on torch's int4 kernel
DISABLE_ENV = "EDGECOMPUTE_ML_Q4_KERNEL"
_FLAGS = ("-std=c++20", "-O3", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-fvisibility=hidden",
          "-Wno-psabi", "-w")
_ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni")
_lock = threading.Lock()
_state: dict[str, str | None] = {}  # "reason": None when the kernel is loaded, else why not


def cache_dir() -> Path:
    """``$EDGECOMPUTE_ML_CACHE/kernels``, else the user cache directory's ``edgecompute-ml/kernels``."""
    return cache_root() / "kernels"


def _compiler() -> list[str] | None:
    explicit = os.environ.get("CXX")
    if explicit:
        command = shlex.split(explicit)
        return command if command and shutil.which(command[0]) else None
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


@functools.lru_cache(maxsize=4)
def _compiler_identity(command: tuple[str, ...]) -> str:
    done = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=30, check=False)
    return done.stdout + done.stderr


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(flag for flag in _ISA_FLAGS if flag in have)
    except OSError:
        pass
    return ""


def _command(compiler: list[str], identity: str, output: Path) -> list[str]:
    import torch

    root = os.path.dirname(torch.__file__)
    lib = os.path.join(root, "lib")
    openmp = ["-fopenmp=libgomp"] if "clang" in identity.lower() else []  # torch's runtime, not libomp
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    return [*compiler, *_FLAGS, *openmp, abi, f"-I{os.path.join(root, 'include')}", str(SOURCE), "-o", str(output),
            f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}"]


def _build() -> Path:
    """The cached library, compiled first if it is not there. Raises RuntimeError with the reason."""
    import torch

    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(f"no C++ compiler (CXX={os.environ.get('CXX', '')!r}; tried c++, g++, clang++)")
    identity = _compiler_identity(tuple(compiler))
    probe = _command(compiler, identity, Path("OUT"))
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), identity.encode(), " ".join(probe).encode(),
                 _cpu_flags().encode()):
        key.update(part)
        key.update(b"\0")
    folder = cache_dir()
    target = folder / f"q4-{key.hexdigest()[:24]}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".q4-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run(_command(compiler, identity, Path(temporary)), capture_output=True, text=True,
                              timeout=600, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE.name} failed ({compiler[0]}): {done.stderr.strip()[-800:]}")
        os.replace(temporary, target)  # atomic: a concurrent builder loads a whole library or builds its own
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"compiling {SOURCE.name} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("0", "false", "off", "no")


def load_q4() -> bool:
    """Whether ``torch.ops.edgecompute_ml.q4_linear`` is usable in this process, compiling and
    loading it on the first call (later calls are a dictionary lookup)."""
    if "reason" in _state:
        return _state["reason"] is None
    with _lock:
        if "reason" not in _state:
            _state["reason"] = _load()
            if _state["reason"] is not None:
                _log.warning("ml: 4-bit weights use torch's int4 kernel, not edgecompute_ml's: %s", _state["reason"])
    return _state["reason"] is None


def _load() -> str | None:
    if _disabled():
        return f"turned off ({DISABLE_ENV}={os.environ[DISABLE_ENV]})"
    import torch

    try:
        if not hasattr(torch.ops.edgecompute_ml, "q4_isa"):
            torch.ops.load_library(str(_build()))  # type: ignore[no-untyped-call]
        isa = int(torch.ops.edgecompute_ml.q4_isa(-1))
    except (RuntimeError, OSError) as exc:
        return str(exc)
    if isa <= 0:
        return "this CPU has neither AVX-512 VNNI nor AVX2"
    return None


def q4_status() -> str | None:
    """None when the kernel is in use, else why not (None too before the first :func:`load_q4`)."""
    return _state.get("reason")


def _forget() -> None:
    """Tests: decide again at the next :func:`load_q4` (a loaded library stays loaded)."""
    with _lock:
        _state.clear()
