"""The wheel's build hook: compiles the bundled plugin once per instruction-set level into the wheel.

A wheel so built needs no compiler where it is installed (only plugins given as C++ source do);
at load time the host picks the library for the highest level the CPU runs (``_isa.py``). An
editable install gets none of this: the bundled plugin is compiled for the CPU on first use.

``$CXX`` picks the compiler (default: the first of c++, g++, clang++ on PATH);
``$EDGECOMPUTE_CPP_BUILD_JOBS`` how many levels compile at once (default: the CPU count).
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PACKAGE = Path(__file__).resolve().parent / "src" / "edgecompute_cpp"


def _load_isa() -> Any:
    # by path: the package imports edgecompute, which the build environment need not have
    spec = importlib.util.spec_from_file_location("_edgecompute_cpp_isa", PACKAGE / "_isa.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compiler() -> list[str]:
    explicit = os.environ.get("CXX")
    if explicit:
        return shlex.split(explicit)
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return [found]
    raise RuntimeError("building the edgecompute-cpp wheel compiles its bundled plugin and needs a C++17 "
                       "compiler: install one (e.g. apt-get install g++) or set $CXX")


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        isa = _load_isa()
        command = _compiler()
        self._scratch = tempfile.mkdtemp(prefix="edgecompute-cpp-build-")
        scratch = Path(self._scratch)
        exports = scratch / "exports.map"
        exports.write_text(isa.EXPORTS)
        sources = [str(PACKAGE / source) for source in isa.SOURCES]

        def build(level: Any) -> Path:
            target: Path = scratch / isa.library_name(level)
            argv = [*command, *isa.BUILD_FLAGS, *level.flags, f"-Wl,--version-script={exports}",
                    f"-I{PACKAGE / 'include'}", *sources, "-o", str(target)]
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"compiling the bundled plugin for {level.name} failed:\n{shlex.join(argv)}\n"
                                   f"{done.stderr or done.stdout}")
            return target

        jobs = int(os.environ.get("EDGECOMPUTE_CPP_BUILD_JOBS", 0)) or os.cpu_count() or 1
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            built = list(pool.map(build, isa.levels()))
        for library in built:
            build_data["force_include"][str(library)] = f"edgecompute_cpp/_prebuilt/{library.name}"
        build_data["pure_python"] = False
        # native code, but no Python extension: any Python 3, this platform only
        build_data["tag"] = f"py3-none-{sysconfig.get_platform().replace('-', '_').replace('.', '_')}"

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        scratch = getattr(self, "_scratch", None)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
