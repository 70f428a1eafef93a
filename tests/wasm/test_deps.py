"""Dependencies: pure-Python wheels unpacked once, mounted read-only; others refused clearly."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from edgecompute_wasm import deps
from edgecompute_wasm.cli import main as cli_main
from edgecompute_wasm.errors import WheelRefused

from .conftest import run


def make_wheel(folder: Path, name: str, version: str, files: dict[str, str], *, tag: str = "py3-none-any",
               purelib: bool = True) -> Path:
    wheel = folder / f"{name}-{version}-{tag}.whl"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
        archive.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nRoot-Is-Purelib: {str(purelib).lower()}\nTag: {tag}\n")
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def test_pure_wheel_is_importable_in_the_guest(wasm, tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path, "tinymath", "1.0", {"tinymath/__init__.py": "def triple(v):\n    return 3 * v\n"})
    source = "import tinymath\ndef main(x):\n    return tinymath.triple(x), tinymath.__file__"
    out = run(wasm, inputs=5, source=source, requirements=[str(wheel)]).outputs
    assert out[0] == 15
    assert out[1].startswith("/deps/")
    # unpacked once, by content
    site = Path(wasm.settings.cache_dir) / "site"
    assert len([p for p in site.iterdir() if p.is_dir() and not p.name.startswith(".")]) >= 1
    # and read-only in the guest
    source = ("import tinymath, os\ndef main(x):\n    try:\n"
              "        open(os.path.dirname(tinymath.__file__) + '/x', 'w')\n"
              "        return 'wrote'\n    except OSError as e:\n        return type(e).__name__")
    assert run(wasm, source=source, requirements=[str(wheel)]).outputs != "wrote"


def test_wheelhouse_lookup_by_name(tmp_path: Path) -> None:
    make_wheel(tmp_path, "pkg_a", "1.2", {"pkg_a/__init__.py": ""})
    make_wheel(tmp_path, "pkg_a", "1.10", {"pkg_a/__init__.py": ""})
    assert deps.find_in_wheelhouse("pkg-a", tmp_path).name.startswith("pkg_a-1.10-")
    assert deps.find_in_wheelhouse("PKG_A==1.2", tmp_path).name.startswith("pkg_a-1.2-")
    with pytest.raises(WheelRefused, match="no wheel"):
        deps.find_in_wheelhouse("other", tmp_path)
    with pytest.raises(WheelRefused, match="no wheelhouse"):
        deps.find_in_wheelhouse("pkg_a", None)


def test_native_wheels_are_refused(wasm, tmp_path: Path) -> None:
    native = make_wheel(tmp_path, "fast", "1.0", {"fast/_speed.cpython-312-x86_64-linux-gnu.so": "ELF"},
                        tag="cp312-cp312-manylinux_2_17_x86_64", purelib=False)
    with pytest.raises(WheelRefused, match="not pure Python"):
        run(wasm, source="def main(x): return 1", requirements=[str(native)])
    sneaky = make_wheel(tmp_path, "sneaky", "1.0", {"sneaky/_c.so": "ELF"})
    with pytest.raises(WheelRefused, match="compiled code"):
        deps.check_wheel(sneaky)
    evil = tmp_path / "evil-1.0-py3-none-any.whl"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("../../escape.py", "x")
        archive.writestr("evil-1.0.dist-info/WHEEL", "Root-Is-Purelib: true\nTag: py3-none-any\n")
    with pytest.raises(WheelRefused, match="unsafe path"):
        deps.unpack(evil, tmp_path)


def test_cli_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_wheel(tmp_path, "good", "1.0", {"good/__init__.py": ""})
    assert cli_main(["check", str(tmp_path)]) == 0
    make_wheel(tmp_path, "bad", "1.0", {}, tag="cp312-cp312-linux_x86_64", purelib=False)
    assert cli_main(["check", str(tmp_path)]) == 1
    assert "refused" in capsys.readouterr().out
