"""Hostile requests against the ``wasm`` executor (run by ``benchmarks/security.py``).

One case per attack of docs/wasm.md's "Security" section. Each case's ``tmp`` folder holds what the
attack needs (a FIFO, a symlink to /etc, a wheel bomb); the operator config names folders under it.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

from edgecompute.models import Request

from . import Case

_ADD = '(module (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add))'


def _normal_python() -> Request:
    return Request("wasm/python", [1, 2, 3], params={"source": "def main(x):\n    return sum(x)"})


def _normal_module() -> Request:
    return Request("wasm/module", None, params={"wasm": _ADD, "function": "add", "args": [2, 3]})


def _python(source: str, inputs: Any = None, **params: Any) -> Any:
    return lambda: Request("wasm/python", inputs, params={"source": source, **params})


def _module(wasm: str | bytes, function: str | None = "f", inputs: Any = None, **params: Any) -> Any:
    if function is not None:
        params["function"] = function
    return lambda: Request("wasm/module", inputs, params={"wasm": wasm, **params})


def _no_host_file(outputs: Any) -> str | None:
    text = repr(outputs)
    return "host file content leaked" if ("root:" in text or "SECRET-" in text) else None


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    name = path.name.split("-")[0]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for member, data in files.items():
            archive.writestr(member, data)
        archive.writestr(f"{name}-1.0.dist-info/WHEEL",
                         "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{name}-1.0.dist-info/RECORD", "")
    return path


def cases(tmp: Path) -> list[Case]:
    root = tmp / "root"
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "ok.txt").write_text("ok")
    (tmp / "secret.txt").write_text("SECRET-wasm")
    if not (root / "etc").exists():
        (root / "etc").symlink_to("/etc")
        (root / "up").symlink_to(tmp)
    fifo_mount = root / "fifo"
    fifo_mount.mkdir(exist_ok=True)
    if not (fifo_mount / "pipe").exists():
        os.mkfifo(fifo_mount / "pipe")
    later = tmp / "later"  # a config mount, clean when the executor is built; a FIFO appears afterwards
    later.mkdir(exist_ok=True)
    modules = tmp / "modules"
    modules.mkdir(exist_ok=True)
    (modules / "add.wat").write_text(_ADD)
    if not (modules / "zero.wasm").exists():
        (modules / "zero.wasm").symlink_to("/dev/zero")
        (modules / "passwd.wasm").symlink_to("/etc/passwd")
        os.mkfifo(modules / "fifo.wasm")
    wheels = tmp / "wheels"
    wheels.mkdir(exist_ok=True)
    bomb = wheels / "bomb-1.0-py3-none-any.whl"
    if not bomb.exists():  # 160 MiB unpacked, above the default max_wheel_unpacked_bytes (128 MiB)
        _wheel(bomb, {})
        with zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED) as archive:
            chunk = b"#" * (1 << 20)  # streamed: building the case must not raise the RSS baseline
            for i in range(5):
                with archive.open(f"bomb/f{i}.py", "w", force_zip64=True) as member:
                    for _ in range(32):
                        member.write(chunk)
    native = _wheel(wheels / "native-1.0-py3-none-any.whl", {"native/__init__.py": b"", "native/_c.so.1": b"ELF"})

    mounts_allowed = {"allow_request_mounts": True, "request_mount_roots": [str(root)]}
    read_passwd = "def main(x):\n    return open('/h/passwd').read()"

    def fifo_appears() -> Request:
        pipe = later / "pipe"
        if not pipe.exists():
            os.mkfifo(pipe)
        return Request("wasm/python", None, params={"source": "def main(x):\n    return open('/m/pipe').read()",
                                                    "timeout": 1.0})

    v128 = "v128.const i32x4 0 0 0 0"
    table_grow = ('(module (table $t 1 funcref) (func (export "f") (result i32) (loop $l (br_if $l (i32.ne '
                  '(table.grow $t (ref.null func) (i32.const 1000000)) (i32.const -1)))) (table.size $t)))')
    iovecs = '''(module (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 64)
      (func (export "f") (result i32) (local $i i32)
        (loop $l
          (i32.store (i32.add (i32.const 64) (i32.mul (local.get $i) (i32.const 8))) (i32.const 0))
          (i32.store (i32.add (i32.const 68) (i32.mul (local.get $i) (i32.const 8))) (i32.const 4194304))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $l (i32.lt_u (local.get $i) (i32.const 1024))))
        (call $w (i32.const 1) (i32.const 64) (i32.const 1024) (i32.const 0))))'''

    def within(limit: int) -> Any:
        return lambda out: None if isinstance(out, int) and out <= limit else f"table grew to {out}"

    c = Case
    return [
        # -- host paths (rule 1)
        c("wasm: request mount of /etc (default config)", "wasm", _python(read_passwd, mounts={"/h": "/etc"}),
          _normal_python, "InvalidRequest", check=_no_host_file),
        c("wasm: request mount of /etc outside the roots", "wasm", _python(read_passwd, mounts={"/h": "/etc"}),
          _normal_python, "InvalidRequest", config=mounts_allowed, check=_no_host_file),
        c("wasm: request mount of a symlink to /etc in a root", "wasm",
          _python(read_passwd, mounts={"/h": str(root / "etc")}), _normal_python, "InvalidRequest",
          config=mounts_allowed, check=_no_host_file),
        c("wasm: request mount of a symlink above the root", "wasm",
          _python("def main(x):\n    return open('/h/secret.txt').read()", mounts={"/h": str(root / "up")}),
          _normal_python, "InvalidRequest", config=mounts_allowed, check=_no_host_file),
        c("wasm: request mount of a folder holding a FIFO", "wasm",
          _python("def main(x):\n    return open('/m/pipe').read()", mounts={"/m": str(fifo_mount)}),
          _normal_python, "InvalidRequest", config=mounts_allowed),
        c("wasm: a FIFO appears in a config mount", "wasm", fifo_appears, _normal_python, "SandboxTimeout",
          config={"mounts": {"/m": str(later)}}),
        c("wasm: guest reads /etc/passwd with no mount", "wasm",
          _python("def main(x):\n    try:\n        return open('/etc/passwd').read()\n"
                  "    except OSError as e:\n        return type(e).__name__"),
          _normal_python, None, check=_no_host_file),
        c("wasm: module path /dev/zero (default config)", "wasm",
          lambda: Request("wasm/module", None, params={"path": "/dev/zero", "function": "f"}),
          _normal_module, "InvalidRequest"),
        c("wasm: module path symlink to /dev/zero in a root", "wasm",
          lambda: Request("wasm/module", None, params={"path": str(modules / "zero.wasm"), "function": "f"}),
          _normal_module, "InvalidRequest", config={"module_roots": [str(modules)]}),
        c("wasm: module path symlink to /etc/passwd in a root", "wasm",
          lambda: Request("wasm/module", None, params={"path": str(modules / "passwd.wasm"), "function": "f"}),
          _normal_module, "InvalidRequest", config={"module_roots": [str(modules)]}, check=_no_host_file),
        c("wasm: module path FIFO in a root", "wasm",
          lambda: Request("wasm/module", None, params={"path": str(modules / "fifo.wasm"), "function": "f"}),
          _normal_module, "InvalidRequest", config={"module_roots": [str(modules)]}),
        c("wasm: wheel path outside wheel_roots", "wasm",
          _python("def main(x): return 1", requirements=[str(native)]), _normal_python, "WheelRefused"),
        c("wasm: wheel with a .so.1 member", "wasm", _python("def main(x): return 1", requirements=[str(native)]),
          _normal_python, "WheelRefused", config={"wheel_roots": [str(wheels)]}),
        c("wasm: wheel bomb (160 MiB unpacked)", "wasm", _python("def main(x): return 1", requirements=[str(bomb)]),
          _normal_python, "WheelRefused", config={"wheel_roots": [str(wheels)]}),
        # -- export types wasmtime-py cannot describe (they aborted the host)
        c("wasm: export takes a v128", "wasm", _module('(module (func (export "f") (param v128)))'),
          _normal_module, "InvalidRequest"),
        c("wasm: export returns a v128", "wasm", _module(f'(module (func (export "f") (result v128) {v128}))'),
          _normal_module, "InvalidRequest"),
        c("wasm: export returns a funcref", "wasm",
          _module('(module (func $g) (elem declare func $g) (func (export "f") (result funcref) ref.func $g))'),
          _normal_module, "InvalidRequest"),
        c("wasm: export takes an externref", "wasm", _module('(module (func (export "f") (param externref)))'),
          _normal_module, "InvalidRequest"),
        c("wasm: export returns a (ref $t)", "wasm",
          _module('(module (type $t (func)) (func $g) (elem declare func $g) (func (export "f") (result (ref $t)) '
                  'ref.func $g))'), _normal_module, "InvalidRequest"),
        c("wasm: export takes an anyref (GC)", "wasm", _module('(module (func (export "f") (param anyref)))'),
          _normal_module, "InvalidRequest"),
        c("wasm: _start returns a v128", "wasm", _module(f'(module (func (export "_start") (result v128) {v128}))',
                                                         None), _normal_module, "InvalidRequest"),
        c("wasm: _initialize takes a v128", "wasm",
          _module('(module (func (export "_initialize") (param v128)) (func (export "f")))'),
          _normal_module, "InvalidRequest"),
        c("wasm: called export is a global", "wasm", _module('(module (global (export "f") i32 (i32.const 1)))'),
          _normal_module, "InvalidRequest"),
        c("wasm: non-WASI import", "wasm", _module('(module (import "env" "system" (func)) (func (export "f")))'),
          _normal_module, "InvalidRequest"),
        c("wasm: WASI memory import", "wasm",
          _module('(module (import "wasi_snapshot_preview1" "m" (memory 1)) (func (export "f")))'),
          _normal_module, "InvalidRequest"),
        # -- host memory (rule 2)
        c("wasm: four memories of 256 MiB each", "wasm",
          _module('(module (memory 1) (memory 1) (memory 1) (memory 1) (func (export "f")))'),
          _normal_module, "InvalidRequest"),
        c("wasm: table.grow loop", "wasm", _module(table_grow), _normal_module, None, check=within(1_000_000)),
        c("wasm: 17 tables", "wasm", _module("(module " + "(table 1 funcref) " * 17 + '(func (export "f")))'),
          _normal_module, "InvalidRequest"),
        c("wasm: memory.grow past the cap", "wasm",
          _module('(module (memory 1) (func (export "f") (result i32) (memory.grow (i32.const 60000))))'),
          _normal_module, None, check=lambda out: None if out == -1 else f"memory.grow gave {out}"),
        c("wasm: fd_write naming its memory 1024 times", "wasm", _module(iovecs), _normal_module,
          "SandboxOutputExceeded"),
        c("wasm: python memory bomb", "wasm", _python("def main(x):\n    s = 'x'\n    while True:\n        s += s"),
          _normal_python, "SandboxMemoryExceeded"),
        c("wasm: 16 MiB stdin + 1", "wasm",
          lambda: Request("wasm/module", b"\0" * ((16 << 20) + 1),
                          params={"wasm": '(module (func (export "_start")))'}),
          _normal_module, "InvalidRequest"),
        c("wasm: 1 MiB argv", "wasm",
          lambda: Request("wasm/module", None, params={"wasm": '(module (func (export "_start")))',
                                                       "argv": ["x" * (1 << 20)]}),
          _normal_module, "InvalidRequest"),
        # -- ceilings (rule 2)
        c("wasm: memory_mb 2048 over its ceiling", "wasm", _python("def main(x): return 1", memory_mb=2048),
          _normal_python, "InvalidRequest"),
        c("wasm: timeout 15 s over its ceiling", "wasm", _python("def main(x): return 1", timeout=15),
          _normal_python, "InvalidRequest"),
        c("wasm: output_bytes 60 MB over its ceiling", "wasm", _python("def main(x): return 1",
                                                                       output_bytes=60_000_000),
          _normal_python, "InvalidRequest"),
        c("wasm: result_bytes 1 GB over its ceiling", "wasm", _python("def main(x): return 1",
                                                                      result_bytes=1 << 30),
          _normal_python, "InvalidRequest"),
        c("wasm: fuel over its ceiling", "wasm", _module(_ADD, "add", args=[1, 2], fuel=10**12), _normal_module,
          "InvalidRequest", config={"fuel": 10**6}),
        # -- deadlines (rule 3), strictness (rule 5)
        c("wasm: endless python loop", "wasm", _python("def main(x):\n    while True:\n        pass", timeout=1.0),
          _normal_python, "SandboxTimeout"),
        c("wasm: endless module loop", "wasm", _module('(module (func (export "f") (loop br 0)))', timeout=1.0),
          _normal_module, "SandboxTimeout"),
        c("wasm: unknown param", "wasm", _python("def main(x): return 1", memroy_mb=1), _normal_python,
          "InvalidRequest"),
    ]
