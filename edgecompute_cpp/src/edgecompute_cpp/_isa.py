"""Instruction-set levels the bundled plugin is compiled for in a wheel, and the best one this CPU runs.

Standard library only, and no relative imports: the wheel's build hook (``hatch_build.py``) loads
this file by path, before edgecompute is installed.

A wheel holds one library per level (``_prebuilt/builtin-<level>.so``); at load time the host picks
the highest level whose every feature the CPU (and the kernel, which hides what the OS does not
save) reports. One whole library per level, rather than ``target_clones`` on chosen functions,
lets the compiler vectorise every loop, inlined helpers included, for the level.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path

__all__ = ["BUILD_FLAGS", "EXPORTS", "ISA_ENV", "NATIVE", "SOURCES", "Level", "best_level", "levels",
           "library_name", "supported_levels"]

#: the bundled plugin's sources, relative to the package directory
SOURCES = ("native/builtin.cpp", "native/fft.cpp")
#: flags of a wheel's libraries besides -march: the C++ runtime linked in, so that the library
#: needs no libstdc++ of the system's (a slim image may lack it, or hold an older one), and only
#: the plugin ABI's symbols exported (the linked-in runtime's stay private to the library)
BUILD_FLAGS: tuple[str, ...] = (
    "-std=c++17", "-O3", "-fPIC", "-shared", "-fvisibility=hidden", "-fno-math-errno",
    "-static-libstdc++", "-static-libgcc", "-s",
)
#: the linker version script: the plugin ABI's symbols, nothing else
EXPORTS = "{ global: ec_info; ec_execute; ec_release; local: *; };\n"
#: an operator's choice of level; ``native`` compiles the bundled sources for this very CPU
ISA_ENV = "EDGECOMPUTE_CPP_ISA"
NATIVE = "native"


class Level:
    """One instruction-set level: its name, its compiler flags, and the CPU features it needs
    (as Linux's /proc/cpuinfo names them)."""

    __slots__ = ("features", "flags", "name")

    def __init__(self, name: str, flags: Sequence[str], features: Sequence[str]) -> None:
        self.name = name
        self.flags = tuple(flags)
        self.features = frozenset(features)

    def __repr__(self) -> str:
        return f"Level({self.name!r})"


# The x86-64 psABI micro-architecture levels, each needing the features of the ones below it too
_V2 = ("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3")
_V3 = (*_V2, "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")
_V4 = (*_V3, "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
_X86_64 = (
    Level("x86-64", ["-march=x86-64", "-mtune=generic"], ()),
    Level("x86-64-v2", ["-march=x86-64-v2", "-mtune=generic"], _V2),
    Level("x86-64-v3", ["-march=x86-64-v3", "-mtune=generic"], _V3),
    Level("x86-64-v4", ["-march=x86-64-v4", "-mtune=generic"], _V4),
)
# elsewhere, one library for the platform's baseline (the compiler's default target)
_GENERIC = (Level("generic", [], ()),)


def levels(machine: str | None = None) -> tuple[Level, ...]:
    """The levels a wheel for ``machine`` (default: this one) holds, lowest first."""
    machine = (machine or platform.machine()).lower()
    return _X86_64 if machine in ("x86_64", "amd64") else _GENERIC


def _cpu_features() -> frozenset[str] | None:
    """The CPU's feature flags as the kernel reports them, or None where it does not say."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return None


def supported_levels() -> list[Level]:
    """The levels this CPU runs, lowest first (the lowest always: it is the platform's baseline)."""
    all_levels = levels()
    features = _cpu_features()
    if features is None:
        return [all_levels[0]]
    return [level for level in all_levels if level.features <= features]


def library_name(level: Level) -> str:
    return f"builtin-{level.name}.so"


def best_level(directory: Path) -> tuple[Level, Path] | None:
    """The library in ``directory`` for the highest level this CPU runs, or None when the
    directory holds none (a source checkout: the bundled plugin is compiled on first use).

    ``$EDGECOMPUTE_CPP_ISA`` names a level to use instead; a level this CPU cannot run, or one
    the wheel lacks, is a ``ValueError`` (running it would kill the process with SIGILL)."""
    wanted = os.environ.get(ISA_ENV, "")
    if wanted == NATIVE:
        return None
    available = {level.name: (level, directory / library_name(level)) for level in levels()
                 if (directory / library_name(level)).is_file()}
    if not available:
        if wanted:
            raise ValueError(f"${ISA_ENV}={wanted!r}: this installation holds no prebuilt bundled plugin "
                             f"(a source install compiles it for this CPU: unset ${ISA_ENV} or set it to "
                             f"{NATIVE!r})")
        return None
    runnable = [level.name for level in supported_levels()]
    if wanted:
        if wanted not in available:
            raise ValueError(f"${ISA_ENV}={wanted!r}: this installation holds the bundled plugin for "
                             f"{', '.join(available)} (or {NATIVE!r}: compile it for this CPU)")
        if wanted not in runnable:
            raise ValueError(f"${ISA_ENV}={wanted!r}: this CPU lacks its instructions; it runs "
                             f"{', '.join(runnable)}")
        return available[wanted]
    for name in reversed(runnable):
        if name in available:
            return available[name]
    return None
