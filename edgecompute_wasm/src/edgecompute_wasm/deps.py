"""Pure-Python dependencies for guest code, from local wheel files or a wheelhouse folder.

A wheel is accepted only when it is pure Python: ``Root-Is-Purelib: true``, every tag
``py*-none-any``, and no compiled extension inside. It is unpacked once into a content-addressed
folder (``<cache_dir>/site/<sha256 of the wheel>``) and mounted read-only in the sandbox, its guest
path put first on ``sys.path``. Nothing is downloaded: ``edgecompute-wasm wheelhouse`` fills a
wheelhouse ahead of time.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from ._cache import ensure_private_dir
from .errors import WheelRefused

__all__ = ["check_wheel", "find_in_wheelhouse", "resolve", "unpack"]

_NATIVE = (".so", ".pyd", ".dylib", ".dll", ".a", ".o")
_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*?)(?:\s*==\s*([A-Za-z0-9._+!-]+))?$")
MAX_WHEEL_BYTES = 256 * 1024 * 1024


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def check_wheel(path: Path) -> None:
    """Raise :class:`WheelRefused` unless ``path`` is a readable pure-Python wheel."""
    if path.suffix != ".whl" or not path.is_file():
        raise WheelRefused(f"{path} is not a wheel file")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            wheel_meta = [n for n in names if n.count("/") == 1 and n.endswith(".dist-info/WHEEL")]
            if len(wheel_meta) != 1:
                raise WheelRefused(f"{path.name} has no single .dist-info/WHEEL file")
            meta = archive.read(wheel_meta[0]).decode("utf-8", "replace")
    except zipfile.BadZipFile as exc:
        raise WheelRefused(f"{path.name} is not a valid wheel: {exc}") from None
    fields: dict[str, list[str]] = {}
    for line in meta.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), []).append(value.strip())
    if fields.get("root-is-purelib", ["false"])[0].lower() != "true":
        raise WheelRefused(f"{path.name} is not pure Python (Root-Is-Purelib is not true); only pure-Python wheels "
                           "run in the wasm sandbox")
    for tag in fields.get("tag", []):
        _python, abi, platform = [*tag.split("-"), "", "", ""][:3]
        if abi != "none" or platform != "any":
            raise WheelRefused(f"{path.name} is built for {tag}; only pure-Python (none-any) wheels run in the wasm "
                               "sandbox")
    native = [n for n in names if n.lower().endswith(_NATIVE)]
    if native:
        raise WheelRefused(f"{path.name} contains compiled code ({native[0]}); only pure-Python wheels run in the "
                           "wasm sandbox")


def find_in_wheelhouse(requirement: str, wheelhouse: Path | None) -> Path:
    match = _NAME.match(requirement.strip())
    if match is None:
        raise WheelRefused(f"{requirement!r} is neither a wheel path nor 'name' or 'name==version'")
    if wheelhouse is None:
        raise WheelRefused(f"{requirement!r} names a package, but no wheelhouse is configured "
                           "([executors.wasm] wheelhouse = 'folder')")
    name, version = _normalize(match.group(1)), match.group(2)
    candidates = []
    for wheel in Path(wheelhouse).glob("*.whl"):
        parts = wheel.name[:-4].split("-")
        if len(parts) >= 5 and _normalize(parts[0]) == name and (version is None or parts[1] == version):
            candidates.append((_version_key(parts[1]), wheel))
    if not candidates:
        raise WheelRefused(f"no wheel for {requirement!r} in the wheelhouse {wheelhouse}; fill it first with "
                           f"'edgecompute-wasm wheelhouse {wheelhouse} {requirement}'")
    return max(candidates)[1]


def _version_key(version: str) -> tuple[Any, ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.+-]", version))


def unpack(wheel: Path, site_root: Path) -> tuple[str, Path]:
    """Unpack ``wheel`` once into ``site_root/<sha256>``; return (sha256, folder)."""
    if wheel.stat().st_size > MAX_WHEEL_BYTES:
        raise WheelRefused(f"{wheel.name} is larger than {MAX_WHEEL_BYTES} bytes")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    target = site_root / digest
    if target.is_dir():
        return digest, target
    check_wheel(wheel)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=site_root))
    try:
        with zipfile.ZipFile(wheel) as archive:
            for info in archive.infolist():
                name = PurePosixPath(info.filename)
                if name.is_absolute() or ".." in name.parts or info.filename.startswith(("/", "\\")):
                    raise WheelRefused(f"{wheel.name} holds an unsafe path {info.filename!r}")
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise WheelRefused(f"{wheel.name} holds a symlink {info.filename!r}")
                archive.extract(info, tmp)
        for root, dirs, files in os.walk(tmp):
            for entry in dirs:
                os.chmod(os.path.join(root, entry), 0o755)
            for entry in files:
                os.chmod(os.path.join(root, entry), 0o644)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process unpacked it first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return digest, target


def resolve(requirements: Sequence[str] | str, settings: Any) -> tuple[list[tuple[str, str]], list[str]]:
    """Mounts (host, guest) and ``sys.path`` entries for a request's ``requirements``."""
    if isinstance(requirements, str) or not isinstance(requirements, Iterable):
        raise WheelRefused("params['requirements'] must be a list of wheel paths or 'name[==version]' entries")
    site_root = ensure_private_dir(Path(settings.cache_dir) / "site")
    mounts, paths = [], []
    for requirement in requirements:
        if not isinstance(requirement, (str, os.PathLike)):
            raise WheelRefused(f"bad requirement {requirement!r}")
        text = os.fspath(requirement)
        wheel = Path(text) if text.endswith(".whl") else find_in_wheelhouse(text, settings.wheelhouse)
        check_wheel(wheel)
        digest, folder = unpack(wheel, site_root)
        guest = f"/deps/{digest[:16]}"
        if guest not in paths:
            mounts.append((str(folder), guest))
            paths.append(guest)
    return mounts, paths
