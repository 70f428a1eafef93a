"""Precompiled standard library for the guest: interpreter start-up in about half the time.

The runtime keeps its standard library as ``.py`` sources in an archive inside the wasm file and
compiles each module it imports, on every start (``encodings`` alone costs ~30 ms of a ~60 ms
start). Once per cache folder, a trusted run of the pinned interpreter compiles a fixed list of
stdlib modules (code objects from the runtime's own loader) and writes them as sourceless ``.pyc``
files into ``<cache_dir>/stdlib-<runtime sha256>-<FORMAT>-<digest of what it holds>``, together with
the guest's bootstrap module, compiled (``python -c`` would compile it on every start: 5-7 ms); every
sandbox then mounts that folder read-only at ``/.stdlib``, first on ``sys.path``. Guest code never
gets to write there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _runtime_pin as pin

log = logging.getLogger("edgecompute_wasm.stdlib")

GUEST_PATH = "/.stdlib"
FORMAT = "2"  # 2: the folder also holds the compiled bootstrap; a digest of its contents names it

# Modules (and one-level packages) compiled ahead. Packages with sub-packages are left out: a
# package here shadows the archive's copy whole.
MODULES = (
    "encodings", "json", "re", "collections", "traceback", "linecache", "functools", "random", "datetime",
    "string", "textwrap", "dataclasses", "typing", "enum", "base64", "hashlib", "struct", "copy", "heapq",
    "bisect", "csv", "statistics", "fractions", "decimal", "_pydecimal", "numbers", "keyword", "operator",
    "reprlib", "tokenize", "token", "contextlib", "weakref", "types", "copyreg", "warnings", "_weakrefset",
    "locale", "calendar", "difflib", "pprint", "ast", "inspect", "dis", "opcode", "collections", "itertools",
    "glob", "fnmatch", "shlex", "uuid", "hmac", "secrets", "gzip", "zipfile", "io", "_compression", "tempfile",
    "shutil", "argparse", "gettext", "colorsys", "graphlib", "zlib", "binascii", "quopri", "html", "string",
)

# The codecs precompiled from the ``encodings`` package (the others stay in the runtime's archive; the
# bootstrap puts it on ``encodings.__path__``). Every start lists the folder, and each entry costs a
# host call (wasmtime stats every entry, twice): all 122 codecs cost a start about 5 ms.
ENCODINGS = (
    "__init__", "aliases", "utf_8", "utf_8_sig", "latin_1", "ascii", "utf_16", "utf_16_le", "utf_16_be", "utf_32",
    "utf_32_le", "utf_32_be", "unicode_escape", "raw_unicode_escape", "cp1252", "charmap", "idna", "punycode",
    "base64_codec", "hex_codec",
)

GENERATE = r'''
import importlib.util, marshal, os, pkgutil, sys
root = sys.argv[1]
head = importlib.util.MAGIC_NUMBER + b"\0" * 12
done = 0
def put(rel, code):
    if code is None:
        raise ValueError("no code")
    path = root + "/" + rel
    folder = os.path.dirname(path)
    if folder != root and not os.path.isdir(folder):
        os.mkdir(folder)
    with open(path, "wb") as f:
        f.write(head + marshal.dumps(code))
boot = sys.argv[3]  # the bootstrap module: root/<boot>.py, written by the host, compiled and removed
with open(root + "/" + boot + ".py", encoding="utf-8") as f:
    put(boot + ".pyc", compile(f.read(), "<edgecompute-boot>", "exec"))
os.remove(root + "/" + boot + ".py")
for name in sys.argv[2].split(","):
    try:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "get_code"):
            continue
        if spec.submodule_search_locations is not None:
            subs = list(pkgutil.iter_modules(spec.submodule_search_locations))
            if any(s.ispkg for s in subs):
                continue
            if name == "encodings":
                subs = [s for s in subs if s.name in sys.argv[4].split(",")]
            codes = [(name + "/__init__.pyc", spec.loader.get_code(name))]
            for sub in subs:
                full = name + "." + sub.name
                codes.append((name + "/" + sub.name + ".pyc", importlib.util.find_spec(full).loader.get_code(full)))
        else:
            codes = [(name + ".pyc", spec.loader.get_code(name))]
        for rel, code in codes:
            put(rel, code)
        done += 1
    except Exception:
        pass
if done:
    with open(root + "/.complete", "w") as f:
        f.write(str(done))
'''


def ensure(runtime: Any, module: Callable[[], Any], boot_name: str, boot_source: str) -> Path | None:
    """The precompiled stdlib folder, made now if missing; None when it cannot be made.

    ``module()`` gives the compiled runtime (only called when the folder must be made). The folder
    also holds ``<boot_name>.pyc``: ``boot_source`` compiled by the guest's interpreter."""
    from ._cache import sha256

    digest = sha256(repr((boot_source, MODULES, ENCODINGS, GENERATE)).encode()).hex()[:16]  # what the folder holds
    target: Path = runtime.cache_dir / f"stdlib-{pin.RUNTIME_SHA256[:24]}-{FORMAT}-{digest}"
    if _complete(target, boot_name):
        return target
    import shutil
    import tempfile

    from ._sandbox import Sandbox

    tmp = Path(tempfile.mkdtemp(prefix=".stdlib-", dir=runtime.cache_dir))
    try:
        (tmp / f"{boot_name}.py").write_text(boot_source, encoding="utf-8")
        sandbox = Sandbox(runtime.engine, module(), argv=["python", "-S", "-I", "-c", GENERATE, "/.gen",
                                                         ",".join(dict.fromkeys(MODULES)), boot_name,
                                                         ",".join(ENCODINGS)],
                          mode="command", memory_bytes=512 * 2**20, output_bytes=2**20,
                          writable_mounts=[(str(tmp), "/.gen")])
        sandbox.give(b"", 120.0, None)
        sandbox.start()
        sandbox.ended.wait(130.0)
        if not _complete(tmp, boot_name):
            log.warning("could not precompile the guest stdlib (%s); starts stay slower",
                        sandbox.outcome.message if sandbox.outcome else "no outcome")
            return None
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            tmp.rename(target)
        except OSError:
            if not _complete(target, boot_name):
                raise
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _complete(folder: Path, boot_name: str) -> bool:
    try:
        return ((folder / ".complete").stat().st_size > 0
                and (folder / "encodings" / "__init__.pyc").stat().st_size > 16
                and (folder / f"{boot_name}.pyc").stat().st_size > 16)
    except OSError:
        return False
