"""The plugin ABI (versions, the header, the include command) and building plugins from source."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgecompute_cpp
from edgecompute.errors import PluginError
from edgecompute_cpp import CompileError, CppExecutor, PluginABIError, build_plugin, include_dir

from .conftest import PLUGINS


def test_include_command_prints_the_header_directory() -> None:
    done = subprocess.run([sys.executable, "-m", "edgecompute_cpp.cli", "include"], capture_output=True, text=True,
                          check=True)
    directory = Path(done.stdout.strip())
    assert directory == include_dir()
    header = (directory / "edgecompute" / "plugin.h").read_text()
    assert f"#define EC_ABI_VERSION {edgecompute_cpp.ABI_VERSION}" in header
    assert (directory / "edgecompute" / "plugin.hpp").is_file()
    console = shutil.which("edgecompute-cpp", path=os.path.dirname(sys.executable))
    if console:  # the console script the distribution installs
        done = subprocess.run([console, "include"], capture_output=True, text=True, check=True)
        assert done.stdout.strip() == str(directory)


def test_header_compiles_as_plain_c(tmp_path: Path) -> None:
    source = tmp_path / "plugin.c"
    source.write_text('#include <edgecompute/plugin.h>\n'
                      'int main(void) { ec_result r; r.n_outputs = 0; return r.n_outputs; }\n')
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    subprocess.run([cc, "-std=c99", "-Wall", "-Werror", f"-I{include_dir()}", "-c", str(source), "-o",
                    str(tmp_path / "plugin.o")], check=True)


def test_a_plugin_built_for_abi_1_still_loads_and_runs(oldabi: Path) -> None:
    executor = CppExecutor(builtin=False, plugins=[str(oldabi)])
    assert [a.name for a in executor.algorithms()] == ["oldabi.double"]
    np.testing.assert_array_equal(executor.call("oldabi.double", np.arange(5.0)), np.arange(5.0) * 2)


def test_a_plugin_for_an_unknown_abi_version_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    library = build_plugin(PLUGINS / "future.cpp", cache=tmp_path)
    from edgecompute_cpp._native import NativePlugin

    with pytest.raises(PluginABIError, match=r"built for plugin ABI version 99, but this edgecompute-cpp supports "
                                             r"versions 1 to 2") as info:
        NativePlugin(library)
    assert info.value.found == 99
    # through the executor it is reported as a problem and the other plugins still load
    executor = CppExecutor(builtin=False, plugins=[str(library)])
    assert executor.algorithms() == []
    assert any(isinstance(p, PluginABIError) for p in executor._ensure().problems)


def test_a_library_without_the_entry_points_is_refused(tmp_path: Path) -> None:
    library = build_plugin(PLUGINS / "notaplugin.cpp", cache=tmp_path)
    from edgecompute_cpp._native import NativePlugin

    with pytest.raises(PluginError, match="not an edgecompute plugin .missing symbol"):
        NativePlugin(library)
    with pytest.raises(PluginError, match="cannot load the shared library"):
        NativePlugin(tmp_path / "missing.so")


def test_build_plugin_caches_by_content_and_rebuilds_on_change(tmp_path: Path) -> None:
    source = tmp_path / "src" / "mini.cpp"
    source.parent.mkdir()
    text = (PLUGINS / "oldabi.cpp").read_text()
    source.write_text(text)
    cache = tmp_path / "cache"
    first = build_plugin(source, flags=["-DEC_ABI_TARGET=1"], cache=cache)
    stamp = first.stat().st_mtime_ns
    again = build_plugin(source, flags=["-DEC_ABI_TARGET=1"], cache=cache)
    assert again == first and again.stat().st_mtime_ns == stamp  # not rebuilt
    assert re.fullmatch(r"mini-[0-9a-f]{20}\.so", first.name)
    source.write_text(text.replace("2 * x[i]", "3 * x[i]"))
    changed = build_plugin(source, flags=["-DEC_ABI_TARGET=1"], cache=cache)
    assert changed != first
    flags = build_plugin(source, flags=["-DEC_ABI_TARGET=1", "-DUNUSED=1"], cache=cache)
    assert flags not in (first, changed)
    (source.parent / "helper.h").write_text("// a header next to the source is part of the hash\n")
    assert build_plugin(source, flags=["-DEC_ABI_TARGET=1"], cache=cache) not in (first, changed)
    executor = CppExecutor(builtin=False, plugins=[str(changed)])
    np.testing.assert_array_equal(executor.call("oldabi.double", np.ones(3)), np.full(3, 3.0))
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_compile_errors_carry_the_compiler_message(tmp_path: Path) -> None:
    with pytest.raises(CompileError) as info:
        build_plugin(PLUGINS / "broken.cpp", cache=tmp_path)
    error = info.value
    assert "undeclared_identifier_here" in error.output
    assert "undeclared_identifier_here" in str(error)
    assert "broken.cpp" in str(error) and error.command[-2] == "-o"
    assert isinstance(error, PluginError)
    assert not list(tmp_path.glob("*.so"))
    # given as a plugin source, the same error is a problem of the executor, not a crash
    executor = CppExecutor(builtin=False, plugins=[str(PLUGINS / "broken.cpp")])
    assert executor.algorithms() == []
    assert any(isinstance(p, CompileError) for p in executor._ensure().problems)


def test_a_missing_compiler_is_a_compile_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(CompileError, match="cannot run the C\\+\\+ compiler"):
        build_plugin(PLUGINS / "oldabi.cpp", cache=tmp_path)


def test_importing_the_plugin_module_is_light_and_construction_is_cheap() -> None:
    code = (
        "import sys\n"
        "import edgecompute_cpp.plugin\n"
        "from edgecompute_cpp import CppExecutor\n"
        "e = CppExecutor({'isolation': 'process'})\n"
        "assert 'cffi' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)\n"
        # construction starts nothing: no worker process, not even the machinery that would
        "assert e.pids == [] and 'edgecompute.placement._proxy' not in sys.modules\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr
