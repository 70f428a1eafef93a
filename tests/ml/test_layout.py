"""The package's shape (docs/ml.md, "Package layout"): a light public top level, internals in
private subpackages, no module reading another module's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import edgecompute_ml

PACKAGE = Path(edgecompute_ml.__file__).parent
SUBPACKAGES = ("_architectures", "_formats", "_kernels", "_preprocessing", "_runtime", "_tasks")


def test_importing_the_package_loads_neither_torch_nor_its_internals():
    code = ("import sys, edgecompute_ml\n"
            "loaded = sorted(m for m in sys.modules if m.startswith(('torch', 'edgecompute_ml.')))\n"
            "assert not loaded, loaded\n"
            "assert edgecompute_ml.MLExecutor.__name__ == 'MLExecutor'\n"
            "assert edgecompute_ml.register_family.__module__ == 'edgecompute_ml._runtime.store'\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_public_top_level_and_the_private_subpackages():
    public = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert public == ["__init__.py", "cli.py", "demo.py", "errors.py", "executor.py", "plugin.py", "settings.py"]
    assert (PACKAGE / "py.typed").is_file()
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name.startswith("_")
                  and p.name != "__pycache__") == list(SUBPACKAGES)
    for sub in SUBPACKAGES:  # modules inside a private package are internal already: no second underscore
        assert all(not p.name.startswith("_") or p.name == "__init__.py" for p in (PACKAGE / sub).glob("*.py"))


def test_no_module_imports_a_private_name_of_another():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                offences += [f"{path.relative_to(PACKAGE)}: {node.module}.{alias.name}" for alias in node.names
                             if alias.name.startswith("_") and alias.name != "__version__"]
    assert offences == []
