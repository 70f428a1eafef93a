"""wasm/module: user WebAssembly modules, from WAT text and from C compiled with clang + wasi-libc."""

from __future__ import annotations

import pytest

from edgecompute.errors import InvalidRequest
from edgecompute_wasm.errors import (
    SandboxCrashed,
    SandboxMemoryExceeded,
    SandboxOutputExceeded,
    SandboxStackOverflow,
    SandboxTimeout,
)

from .conftest import run

ADD = '(module (func (export "add") (param i32 i64) (result i64) local.get 0 i64.extend_i32_s local.get 1 i64.add))'

HELLO_WAT = r'''
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello from wat\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 15))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $exit (i32.const 3))))
'''

LOOP = '(module (func (export "spin") (loop br 0)))'
RECURSE = '(module (func $f (export "f") call $f))'


def test_exported_numeric_function(wasm) -> None:
    assert run(wasm, "wasm/module", wasm=ADD, function="add", args=[2, 40]).outputs == 42


def test_binary_module_and_float_function(wasm) -> None:
    import wasmtime

    binary = wasmtime.wat2wasm(
        '(module (func (export "half") (param f64) (result f64) local.get 0 f64.const 0.5 f64.mul))')
    assert run(wasm, "wasm/module", wasm=binary, function="half", args=[3.0]).outputs == 1.5


def test_wasi_command_from_wat(wasm) -> None:
    out = run(wasm, "wasm/module", wasm=HELLO_WAT).outputs
    assert out["stdout"] == "hello from wat\n"
    assert out["exit_code"] == 3


def test_bad_modules_and_arguments_are_refused(wasm) -> None:
    with pytest.raises(InvalidRequest, match="WAT"):
        run(wasm, "wasm/module", wasm="(module (func")
    with pytest.raises(InvalidRequest, match="valid WebAssembly"):
        run(wasm, "wasm/module", wasm=b"\x00asm\x01\x00\x00\x00garbage")
    with pytest.raises(InvalidRequest, match="only wasi_snapshot_preview1"):
        run(wasm, "wasm/module", wasm='(module (import "env" "system" (func)) (func (export "_start")))')
    with pytest.raises(InvalidRequest, match="takes 2 arguments"):
        run(wasm, "wasm/module", wasm=ADD, function="add", args=[1])
    with pytest.raises(InvalidRequest, match="exports no function"):
        run(wasm, "wasm/module", wasm=ADD, function="sub", args=[1, 2])


def test_module_limits(wasm) -> None:
    with pytest.raises(SandboxTimeout):
        run(wasm, "wasm/module", wasm=LOOP, function="spin", timeout=0.3)
    with pytest.raises(SandboxStackOverflow):
        run(wasm, "wasm/module", wasm=RECURSE, function="f")
    with pytest.raises(SandboxMemoryExceeded):
        run(wasm, "wasm/module", wasm='(module (memory 2000) (func (export "f")))', function="f", memory_mb=16)
    with pytest.raises(SandboxCrashed, match="unreachable"):
        run(wasm, "wasm/module", wasm='(module (func (export "f") unreachable))', function="f")


def test_memory_grow_past_the_cap_fails_inside_the_guest(wasm) -> None:
    grow = '(module (memory 1) (func (export "grow") (result i32) (memory.grow (i32.const 1000))))'
    assert run(wasm, "wasm/module", wasm=grow, function="grow", memory_mb=8).outputs == -1


C_ECHO = r'''
#include <stdio.h>
#include <string.h>
#include <ctype.h>
int main(int argc, char **argv) {
    char buf[256];
    size_t n = fread(buf, 1, sizeof buf - 1, stdin);
    buf[n] = 0;
    for (size_t i = 0; i < n; i++) buf[i] = toupper((unsigned char)buf[i]);
    printf("%s|%d|%s\n", argc > 1 ? argv[1] : "-", argc, buf);
    fprintf(stderr, "done\n");
    return 7;
}
'''

C_FLOOD = r'''
#include <stdio.h>
int main(void) { for (;;) puts("flood flood flood flood flood flood flood"); }
'''

C_FILES = r'''
#include <stdio.h>
int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "r");
    if (!f) { printf("no:%s\n", argv[1]); return 1; }
    char buf[64] = {0};
    fread(buf, 1, sizeof buf - 1, f);
    printf("yes:%s\n", buf);
    FILE *w = fopen(argv[2], "w");
    printf(w ? "wrote\n" : "readonly\n");
    return 0;
}
'''


def test_c_wasi_command_with_argv_stdin_stdout(wasm, wasi_clang) -> None:
    binary = wasi_clang("echo", C_ECHO)
    out = run(wasm, "wasm/module", b"hello", wasm=binary, argv=["echo", "arg1"]).outputs
    assert out["stdout"] == "arg1|2|HELLO\n"
    assert out["stderr"] == "done\n"
    assert out["exit_code"] == 7


def test_c_output_flood_is_capped(wasm, wasi_clang) -> None:
    with pytest.raises(SandboxOutputExceeded):
        run(wasm, "wasm/module", wasm=wasi_clang("flood", C_FLOOD), output_bytes=4096)


def test_c_module_sees_only_read_only_mounts(wasm, wasi_clang, tmp_path) -> None:
    (tmp_path / "in.txt").write_text("data")
    binary = wasi_clang("files", C_FILES)
    out = run(wasm, "wasm/module", wasm=binary, argv=["files", "/data/in.txt", "/data/out.txt"],
              mounts={"/data": str(tmp_path)}).outputs
    assert out["stdout"] == "yes:data\nreadonly\n"
    assert not (tmp_path / "out.txt").exists()
    out = run(wasm, "wasm/module", wasm=binary, argv=["files", "/etc/passwd", "/tmp/x"]).outputs
    assert out["stdout"] == "no:/etc/passwd\n"
