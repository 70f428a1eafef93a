"""The edgecompute-cpp wheel: built with ``python -m build``, installed into a fresh venv with no
compiler on PATH, runs every bundled algorithm, at every instruction-set level this CPU has, with
the outputs of the in-tree build; only a plugin given as source needs a compiler there."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from packaging.requirements import Requirement

from edgecompute_cpp import CppExecutor
from edgecompute_cpp._isa import supported_levels

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
COMPILERS = ("c++", "g++", "gcc", "cc", "clang", "clang++")


def _cases() -> dict[str, list[tuple[Any, dict[str, Any]]]]:
    """Requests for every bundled algorithm, covering its dtypes and params."""
    rng = np.random.default_rng(7)
    image = rng.random((61, 83), dtype=np.float32)
    return {
        "grayscale": [(rng.integers(0, 256, (20, 31, 3), dtype=np.uint8), {}),
                      (rng.random((20, 31, 4)), {"order": "bgr"})],
        "gaussian_blur": [(image, {"sigma": 2.0}), (rng.random((40, 50, 3)), {"sigma": [1.0, 3.0], "truncate": 3.0})],
        "sobel": [(image, {}), (image.astype(np.float64), {"output": "all"})],
        "resize": [(image, {"width": 40, "height": 100}),
                   (rng.integers(0, 256, (33, 47, 3), dtype=np.uint8), {"width": 64, "height": 20})],
        "fir_filter": [({"signal": rng.standard_normal(4000).astype(np.float32),
                         "taps": rng.standard_normal(31).astype(np.float32)}, {}),
                       ({"signal": rng.standard_normal((3, 500)), "taps": rng.standard_normal(7)}, {"mode": "full"})],
        "fft": [(rng.standard_normal(4096), {}), (rng.standard_normal((3, 1009)).astype(np.float32), {}),
                ((rng.standard_normal(360) + 1j * rng.standard_normal(360)).astype(np.complex64), {"inverse": True})],
        "matmul": [({"a": rng.standard_normal((67, 45)).astype(np.float32),
                     "b": rng.standard_normal((45, 71)).astype(np.float32)}, {}),
                   ({"a": rng.standard_normal((20, 30)), "b": rng.standard_normal((30, 10))}, {})],
        "sum": [(np.arange(1000, dtype=np.int32), {}), (rng.random((7, 9, 11)), {})],
    }


# Runs in the fresh venv: every case through the installed wheel, plus what only the best level
# needs checking once (health, the scheduler, process isolation, a plugin given as source).
CHILD = r'''
import asyncio, json, os, pickle, shutil, sys
from pathlib import Path

cases_path, out_path, full = sys.argv[1], sys.argv[2], sys.argv[3] == "full"
report = {"compilers": [n for n in ("c++", "g++", "gcc", "cc", "clang", "clang++") if shutil.which(n)],
          "cxx": os.environ.get("CXX"), "cc": os.environ.get("CC")}
import edgecompute, edgecompute_cpp
from edgecompute_cpp import CppExecutor

report["edgecompute"] = edgecompute.__file__
report["edgecompute_cpp"] = edgecompute_cpp.__file__
with open(cases_path, "rb") as f:
    cases = pickle.load(f)
executor = CppExecutor()
report["algorithms"] = sorted(a.name for a in executor.algorithms())
health = asyncio.run(executor.health())
report["health"] = [health.status.value, health.message]
report["library"] = health.details["plugins"][0]["path"]
outputs = {name: [executor.call(name, inputs, params) for inputs, params in runs] for name, runs in cases.items()}
if full:
    import numpy as np
    from edgecompute import Config, Registry, Resources, Scheduler
    from edgecompute_cpp import NoCompiler, build_plugin

    async def scheduled():
        async with Scheduler(Registry([CppExecutor()]), capacity=Resources(cpu=2, memory_mb=1024),
                             config=Config()) as s:
            blurred = (await s.run("cpp/gaussian_blur", cases["gaussian_blur"][0][0], params={"sigma": 2.0})).outputs
        isolated = CppExecutor({"isolation": "process", "workers": 1})
        try:
            total = isolated.call("sum", np.arange(10.0))
        finally:
            await isolated.aclose()
        return blurred, total

    blurred, total = asyncio.run(scheduled())
    report["scheduler_matches"] = bool(np.array_equal(blurred, outputs["gaussian_blur"][0]))
    report["process_sum"] = float(total)
    source = Path(os.environ["HOME"]) / "mine.cpp"
    source.write_text("#include <edgecompute/plugin.h>\n")
    try:
        build_plugin(source)
        report["user_plugin"] = "built (!)"
    except NoCompiler as exc:
        report["user_plugin"] = f"{type(exc).__name__}: {exc}"
    loaded = CppExecutor(plugins=[str(source)])
    report["with_user_plugin"] = [asyncio.run(loaded.health()).status.value,
                                  [type(p).__name__ for p in loaded._ensure().problems],
                                  float(loaded.call("sum", np.ones(4)))]
with open(out_path, "wb") as f:
    pickle.dump(outputs, f)
print(json.dumps(report))
'''


def _third_party(names: list[str]) -> set[str]:
    """The distributions ``names`` need, recursively, leaving out ``names`` themselves."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            name = requirement.name.lower().replace("_", "-")
            if name not in seen and name not in names:
                seen.add(name)
                todo.append(name)
    return seen


def _link_dependencies(target: Path) -> None:
    """Links to the installed dependencies of edgecompute and edgecompute-cpp (numpy, cffi, attrs,
    ...) in ``target``: the test may not download them, and linking only these keeps the editable
    installs of this checkout out of the fresh venv."""
    target.mkdir()
    for name in _third_party(["edgecompute", "edgecompute-cpp"]):
        dist = importlib.metadata.distribution(name)
        base = Path(str(dist.locate_file("")))
        for top in {Path(str(f)).parts[0] for f in dist.files or []}:
            if top not in ("..", "__pycache__") and (base / top).exists() and not (target / top).exists():
                (target / top).symlink_to(base / top)


def _compiler_free_env(home: Path, **extra: str) -> dict[str, str]:
    empty = home / "bin"
    empty.mkdir(exist_ok=True)
    env = {"PATH": str(empty), "HOME": str(home), "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1",
           "EDGECOMPUTE_CPP_CACHE": str(home / "cache"), **extra}
    assert not any(shutil.which(name, path=env["PATH"]) for name in COMPILERS)
    return env


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the built wheels of edgecompute and edgecompute-cpp; its python."""
    if not any(shutil.which(name) for name in ("c++", "g++", "clang++")) and not os.environ.get("CXX"):
        pytest.skip("building the wheel needs a C++ compiler, and this machine has none")
    work = tmp_path_factory.mktemp("wheel")
    dist = work / "dist"
    for project, what in ((ROOT / "edgecompute_cpp", []), (ROOT, ["--wheel"])):
        subprocess.run([sys.executable, "-m", "build", "--no-isolation", *what, "--outdir", str(dist), str(project)],
                       check=True, capture_output=True)
    wheels = sorted(dist.glob("*.whl"))
    cpp_wheel = next(w for w in wheels if w.name.startswith("edgecompute_cpp-"))
    assert re.fullmatch(r"edgecompute_cpp-[\d.]+-py3-none-linux_\w+\.whl", cpp_wheel.name), cpp_wheel.name
    with zipfile.ZipFile(cpp_wheel) as archive:
        prebuilt = sorted(n for n in archive.namelist() if n.startswith("edgecompute_cpp/_prebuilt/"))
    assert prebuilt and all(n.endswith(".so") for n in prebuilt)
    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir())],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    root = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    _link_dependencies(work / "deps")
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "_dependencies.pth").write_text(str(work / "deps") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", *map(str, wheels)], check=True, capture_output=True)
    return python


def _run(python: Path, tmp_path: Path, cases: Any, full: bool, **env: str) -> tuple[dict[str, Any], Any]:
    (tmp_path / "cases.pkl").write_bytes(pickle.dumps(cases))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    done = subprocess.run([str(python), str(script), str(tmp_path / "cases.pkl"), str(tmp_path / "out.pkl"),
                           "full" if full else "cases"],
                          env=_compiler_free_env(tmp_path, **env), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    return report, pickle.loads((tmp_path / "out.pkl").read_bytes())


def _assert_close(got: Any, expected: Any, where: str) -> None:
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            _assert_close(got[key], expected[key], f"{where}[{key}]")
        return
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.dtype == expected.dtype and got.shape == expected.shape, where
    if expected.dtype.kind in "ui":
        # the rounding of a pixel may differ by one where fused multiply-adds differ by an ulp
        assert np.abs(got.astype(np.int64) - expected.astype(np.int64)).max(initial=0) <= 1, where
        return
    scale = max(1.0, float(np.abs(expected).max(initial=0)))
    # float64 outputs of some algorithms (grayscale) are computed with float32 weights
    tolerance = 2e-5 if expected.dtype in (np.float32, np.complex64) else 1e-6
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance * scale, err_msg=where)


def test_the_wheel_runs_every_bundled_algorithm_without_a_compiler(venv: Path, cpp: CppExecutor,
                                                                   tmp_path: Path) -> None:
    cases = _cases()
    assert sorted(cases) == sorted(a.name for a in cpp.algorithms()), "every bundled algorithm has a case"
    expected = {name: [cpp.call(name, inputs, params) for inputs, params in runs] for name, runs in cases.items()}
    report, outputs = _run(venv, tmp_path, cases, full=True)
    prefix = str(venv.parent.parent)
    assert report["compilers"] == [] and report["cxx"] is None and report["cc"] is None
    assert report["edgecompute"].startswith(prefix) and report["edgecompute_cpp"].startswith(prefix)
    best = supported_levels()[-1].name
    assert report["library"].startswith(prefix) and report["library"].endswith(f"/_prebuilt/builtin-{best}.so")
    assert report["health"][0] == "ok", report["health"]
    assert report["algorithms"] == sorted(cases)
    for name, runs in expected.items():
        for i, want in enumerate(runs):
            _assert_close(outputs[name][i], want, f"{name} case {i}")
    assert report["scheduler_matches"] and report["process_sum"] == 45.0
    assert report["user_plugin"].startswith("NoCompiler: ")
    assert "it is C++ source, and building it needs a C++ compiler" in report["user_plugin"]
    assert report["with_user_plugin"] == ["degraded", ["NoCompiler"], 4.0]


def test_every_instruction_set_level_of_the_wheel_matches_the_in_tree_build(venv: Path, cpp: CppExecutor,
                                                                            tmp_path: Path) -> None:
    cases = _cases()
    expected = {name: [cpp.call(name, inputs, params) for inputs, params in runs] for name, runs in cases.items()}
    levels = [level.name for level in supported_levels()]
    for level in levels:
        report, outputs = _run(venv, tmp_path, cases, full=False, EDGECOMPUTE_CPP_ISA=level)
        assert report["library"].endswith(f"/_prebuilt/builtin-{level}.so"), report["library"]
        for name, runs in expected.items():
            for i, want in enumerate(runs):
                _assert_close(outputs[name][i], want, f"{level}: {name} case {i}")
