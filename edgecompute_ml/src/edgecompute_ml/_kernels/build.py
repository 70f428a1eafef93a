"""Compile this package's kernels at first use into a content-hashed on-disk cache and load them
as torch custom ops (docs/ml.md, "Quantized weights" and "One sentence"):

- ``q4.cpp``: ``torch.ops.edgecompute_ml.q4_linear``, the 4-bit weight-only matmul
  (:func:`load_q4`; fallback: torch's int4 kernel);
- ``linear.cpp``: ``torch.ops.edgecompute_ml.f32_linear``, the float32 linear of the encoders
  over weights packed in blocks of columns (:func:`load_linear`; fallback: oneDNN's packed linear);
- ``attention.cpp``: ``torch.ops.edgecompute_ml.one_query_attention``, a decoder step's attention
  over the keys up to its position (:func:`load_attention`; fallback: torch's attention).

Each is its own shared library, built and loaded on its own:

- **Compiler**: ``$CXX`` (may hold arguments), else ``c++``, ``g++`` or ``clang++``, with torch's
  headers and libraries, ``-O3 -fopenmp`` (the ops' threads are ATen's OpenMP pool: compiled with
  GCC a library needs ``libgomp.so.1``, which resolves to the copy torch has already loaded;
  clang is asked for libgomp too, never a second runtime). No ``-march``: the sources pick their
  instruction set at load.
- **Cache**: ``$EDGECOMPUTE_ML_CACHE/kernels``, else the user cache directory's
  ``edgecompute-ml/kernels``; the file name hashes the source and the headers beside it
  (``simd.h``), torch's version, the compiler's identity, the flags and the CPU's instruction
  sets. A build is written under a temporary name and renamed into place, so processes compiling
  at the same time never load half a library.
- **Fallback**: an environment variable turns a kernel off (``EDGECOMPUTE_ML_Q4_KERNEL=0``,
  ``EDGECOMPUTE_ML_LINEAR_KERNEL=0``, ``EDGECOMPUTE_ML_ATTENTION_KERNEL=0``); no compiler, a
  failed compile or load, or a CPU without the instruction sets leave the work on torch's
  kernels. The reason is logged once per process and kept in :func:`q4_status`,
  :func:`linear_status` and :func:`attention_status`.
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
from collections.abc import Callable
from pathlib import Path

import attrs

from .._runtime.paths import cache_root

__all__ = ["ATTENTION_DISABLE_ENV", "DISABLE_ENV", "LINEAR_DISABLE_ENV", "attention_status", "cache_dir",
           "declare_linear", "linear_status", "load_attention", "load_linear", "load_q4", "q4_status"]

_log = logging.getLogger("edgecompute_ml.kernels")
_HERE = Path(__file__).resolve().parent
#: set to 0/false/off/no to keep 4-bit weights on torch's int4 kernel
DISABLE_ENV = "EDGECOMPUTE_ML_Q4_KERNEL"
#: set to 0/false/off/no to keep float32 encoder linears on oneDNN's packed kernel
LINEAR_DISABLE_ENV = "EDGECOMPUTE_ML_LINEAR_KERNEL"
#: set to 0/false/off/no to keep a decoder step's attention on torch's
ATTENTION_DISABLE_ENV = "EDGECOMPUTE_ML_ATTENTION_KERNEL"
_FLAGS = ("-std=c++20", "-O3", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-fvisibility=hidden",
          "-Wno-psabi", "-w")
_ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni")
_lock = threading.Lock()
_declared: list[object] = []  # the torch.library.Library holding f32_linear's schema, once declared
#: declared here, not in linear.cpp, so that TorchScript compiles a function naming the op
#: whether or not the library loads (dense.py then runs the oneDNN branch of that function)
F32_LINEAR_SCHEMA = "f32_linear(Tensor x, Tensor w, Tensor? bias, Tensor? residual, int n, bool gelu=False) -> Tensor"
#: the same for linear.cpp's encoder self-attention over a fused q/k/v projection
ENCODER_ATTENTION_SCHEMA = "encoder_attention(Tensor qkv, Tensor? key_mask, int heads) -> Tensor"


def _q4_isa() -> str | None:
    import torch

    if int(torch.ops.edgecompute_ml.q4_isa(-1)) <= 0:
        return "this CPU has neither AVX-512 VNNI nor AVX2"
    return None


def _linear_isa() -> str | None:
    import torch

    if int(torch.ops.edgecompute_ml.linear_isa(-1)) <= 0:
        return "this CPU has neither AVX-512F nor AVX2 with FMA"
    return None


def _attention_isa() -> str | None:
    import torch

    if int(torch.ops.edgecompute_ml.attention_isa()) <= 0:
        return "this CPU lacks AVX2 with FMA"
    return None


@attrs.frozen
class _Kernel:
    name: str  # the library's file name prefix
    source: Path
    disable_env: str
    marker: str  # an op the library defines: present once it is loaded
    isa: Callable[[], str | None]  # None when this CPU can run it, else why not
    fallback: str  # what runs instead, for the log
    # "load": why loading failed (None: loaded); "reason": why it is not in use now (None: it is)
    state: dict[str, str | None] = attrs.field(factory=dict, eq=False)


_Q4 = _Kernel("q4", _HERE / "q4.cpp", DISABLE_ENV, "q4_isa", _q4_isa, "4-bit weights use torch's int4 kernel")
_LINEAR = _Kernel("linear", _HERE / "linear.cpp", LINEAR_DISABLE_ENV, "linear_isa", _linear_isa,
                  "float32 encoder linears use oneDNN's packed kernel")
_ATTENTION = _Kernel("attention", _HERE / "attention.cpp", ATTENTION_DISABLE_ENV, "attention_isa", _attention_isa,
                     "a decoder step's attention uses torch's")


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


def _command(compiler: list[str], identity: str, source: Path, output: Path) -> list[str]:
    import torch

    root = os.path.dirname(torch.__file__)
    lib = os.path.join(root, "lib")
    openmp = ["-fopenmp=libgomp"] if "clang" in identity.lower() else []  # torch's runtime, not libomp
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    return [*compiler, *_FLAGS, *openmp, abi, f"-I{os.path.join(root, 'include')}", str(source), "-o", str(output),
            f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}"]


def _build(kernel: _Kernel) -> Path:
    """The kernel's cached library, compiled first if it is not there. Raises RuntimeError with
    the reason."""
    import torch

    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(f"no C++ compiler (CXX={os.environ.get('CXX', '')!r}; tried c++, g++, clang++)")
    identity = _compiler_identity(tuple(compiler))
    source = kernel.source
    probe = _command(compiler, identity, source, Path("OUT"))
    key = hashlib.sha256()
    headers = b"".join(header.read_bytes() for header in sorted(source.parent.glob("*.h")))  # what sources include
    for part in (source.read_bytes(), headers, torch.__version__.encode(), identity.encode(), " ".join(probe).encode(),
                 _cpu_flags().encode()):
        key.update(part)
        key.update(b"\0")
    folder = cache_dir()
    target = folder / f"{kernel.name}-{key.hexdigest()[:24]}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{kernel.name}-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run(_command(compiler, identity, source, Path(temporary)), capture_output=True, text=True,
                              timeout=600, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed ({compiler[0]}): {done.stderr.strip()[-800:]}")
        os.replace(temporary, target)  # atomic: a concurrent builder loads a whole library or builds its own
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"compiling {source.name} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def declare_linear() -> None:
    """Declare the schemas of ``torch.ops.edgecompute_ml.f32_linear`` and ``encoder_attention`` in
    this process (once; their CPU and Meta kernels come with linear.cpp's library)."""
    with _lock:
        if not _declared:
            import torch

            library = torch.library.Library("edgecompute_ml", "FRAGMENT")  # type: ignore[no-untyped-call]
            library.define(F32_LINEAR_SCHEMA)  # type: ignore[no-untyped-call]  # its kernels: linear.cpp's
            library.define(ENCODER_ATTENTION_SCHEMA)  # type: ignore[no-untyped-call]
            _declared.append(library)


def _ensure(kernel: _Kernel) -> bool:
    # the switch is read at every call (a model's load: cheap), the library loaded once
    if kernel is _LINEAR:
        declare_linear()  # off or not: the encoders' scripted forwards name the op (dense.linear)
    setting = os.environ.get(kernel.disable_env, "")
    if setting.strip().lower() in ("0", "false", "off", "no"):
        return _settle(kernel, f"turned off ({kernel.disable_env}={setting})")
    state = kernel.state
    if "load" not in state:
        with _lock:
            if "load" not in state:
                state["load"] = _load(kernel)
    return _settle(kernel, state["load"])


def _settle(kernel: _Kernel, reason: str | None) -> bool:
    """Record why the kernel is not in use (None: it is), logging each new reason once."""
    with _lock:
        if reason is not None and kernel.state.get("reason", "") != reason:
            _log.warning("ml: %s, not edgecompute_ml's: %s", kernel.fallback, reason)
        kernel.state["reason"] = reason
    return reason is None


def _load(kernel: _Kernel) -> str | None:
    import torch

    try:
        if not hasattr(torch.ops.edgecompute_ml, kernel.marker):
            torch.ops.load_library(str(_build(kernel)))  # type: ignore[no-untyped-call]
        return kernel.isa()
    except (RuntimeError, OSError) as exc:
        return str(exc)


def load_q4() -> bool:
    """Whether ``torch.ops.edgecompute_ml.q4_linear`` is usable in this process, compiling and
    loading it on the first call (later calls are a dictionary lookup)."""
    return _ensure(_Q4)


def q4_status() -> str | None:
    """None when the 4-bit kernel is in use, else why not (None too before the first :func:`load_q4`)."""
    return _Q4.state.get("reason")


def load_linear() -> bool:
    """Whether ``torch.ops.edgecompute_ml.f32_linear`` is usable in this process, compiling and
    loading it on the first call (later calls are a dictionary lookup)."""
    return _ensure(_LINEAR)


def linear_status() -> str | None:
    """None when the float32 linear kernel is in use, else why not (None too before the first
    :func:`load_linear`)."""
    return _LINEAR.state.get("reason")


def load_attention() -> bool:
    """Whether ``torch.ops.edgecompute_ml.one_query_attention`` is usable in this process,
    compiling and loading it on the first call (later calls are a dictionary lookup)."""
    return _ensure(_ATTENTION)


def attention_status() -> str | None:
    """None when the one-query attention kernel is in use, else why not (None too before the first
    :func:`load_attention`)."""
    return _ATTENTION.state.get("reason")


def _forget() -> None:
    """Tests: decide again at the next load (a loaded library stays loaded)."""
    with _lock:
        for kernel in (_Q4, _LINEAR, _ATTENTION):
            kernel.state.clear()
