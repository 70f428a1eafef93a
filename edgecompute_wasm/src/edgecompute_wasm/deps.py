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
from ._paths import real_path_under
from .errors import WheelRefused

__all__ = ["check_wheel", "find_in_wheelhouse", "resolve", "unpack"]

# compiled code by its name: ".so" with any version suffix (".so.1", ".so.1.2"), ".pyd", ".dylib",
# ".dll", and static objects; a name only, never whether the bytes look native
_NATIVE = re.compile(r"\.(so|pyd|dylib|dll)(\.[0-9A-Za-z_]+)*$|\.(a|o)$", re.IGNORECASE)
_CHUNK = 1 << 20
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
    native = [n for n in names if _NATIVE.search(n.rstrip("/"))]
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


def unpack(wheel: Path, site_root: Path, *, max_bytes: int = 128 * 1024 * 1024,
           max_files: int = 20_000) -> tuple[str, Path]:
    """Unpack ``wheel`` once into ``site_root/<sha256>``; return (sha256, folder).

    At most ``max_files`` members and ``max_bytes`` unpacked bytes, counted while decompressing (the
    sizes a zip declares are not trusted); a refused or failed unpack leaves nothing behind."""
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
            members = archive.infolist()
            if len(members) > max_files:
                raise WheelRefused(f"{wheel.name} holds {len(members)} files, above its ceiling max_wheel_files = "
                                   f"{max_files}")
            if sum(info.file_size for info in members) > max_bytes:
                raise WheelRefused(f"{wheel.name} unpacks to more than its ceiling max_wheel_unpacked_bytes = "
                                   f"{max_bytes}")
            written = 0
            for info in members:
                _check_member(wheel, info)
            for info in members:
                try:
                    written = _extract(archive, info, tmp, written, max_bytes, wheel.name)
                except (OSError, zipfile.BadZipFile, EOFError) as exc:  # duplicate names, a file over a folder
                    raise WheelRefused(f"{wheel.name} cannot be unpacked at {info.filename!r}: {exc}") from None
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


def _check_member(wheel: Path, info: zipfile.ZipInfo) -> None:
    raw = info.filename
    name = PurePosixPath(raw)
    if (name.is_absolute() or ".." in name.parts or raw.startswith(("/", "\\")) or "\\" in raw or "\x00" in raw
            or (len(raw) > 1 and raw[1] == ":")):
        raise WheelRefused(f"{wheel.name} holds an unsafe path {raw!r}")
    kind = (info.external_attr >> 16) & 0o170000
    if kind == 0o120000:
        raise WheelRefused(f"{wheel.name} holds a symlink {raw!r}")
    if kind not in (0, 0o100000, 0o040000):
        raise WheelRefused(f"{wheel.name} holds a special file {raw!r}")


def _extract(archive: zipfile.ZipFile, info: zipfile.ZipInfo, root: Path, written: int, max_bytes: int,
             wheel: str) -> int:
    """Write one member under ``root``, counting the bytes it really decompresses to."""
    target = root.joinpath(*PurePosixPath(info.filename).parts)
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return written
    target.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(info) as source, open(target, "xb") as out:
        while True:
            chunk = source.read(_CHUNK)
            if not chunk:
                break
            written += len(chunk)
            if written > max_bytes:
                raise WheelRefused(f"{wheel} unpacks to more than its ceiling max_wheel_unpacked_bytes = "
                                   f"{max_bytes}")
            out.write(chunk)
    return written


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
        if text.endswith(".whl"):
            # a host path named by a request: only under the operator's wheel_roots, by real path
            wheel = Path(real_path_under(text, settings.wheel_roots, "params['requirements'] wheel path",
                                         "wheel_roots", WheelRefused))
            if not wheel.is_file():
                raise WheelRefused(f"{text!r} is not a regular wheel file")
        else:
            wheel = find_in_wheelhouse(text, settings.wheelhouse)
        check_wheel(wheel)
        digest, folder = unpack(wheel, site_root, max_bytes=settings.max_wheel_unpacked_bytes,
                                max_files=settings.max_wheel_files)
        guest = f"/deps/{digest[:16]}"
        if guest not in paths:
            mounts.append((str(folder), guest))
            paths.append(guest)
    return mounts, paths
