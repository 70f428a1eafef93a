"""Escape attempts: each is contained with a clear error (or a harmless answer), the host unharmed."""

from __future__ import annotations

import os
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgecompute import Request
from edgecompute.errors import EdgeComputeError
from edgecompute_wasm.errors import (
    GuestError,
    SandboxMemoryExceeded,
    SandboxOutputExceeded,
    SandboxTimeout,
)

from .conftest import run, run_many


def guest(wasm, body: str, inputs=None, **params):
    """Run ``def main(x):`` + body; return the outputs."""
    source = "def main(x):\n" + "\n".join("    " + line for line in body.strip().splitlines())
    return run(wasm, inputs=inputs, source=source, **params).outputs


def test_host_files_are_not_there(wasm) -> None:
    out = guest(wasm, """
import os
found = {}
for path in ('/etc/passwd', '/proc/self/environ', '/root', '/home', '/tmp', os.path.expanduser('~')):
    try:
        found[path] = os.listdir(path) if os.path.isdir(path) else open(path).read()[:10]
    except OSError as exc:
        found[path] = type(exc).__name__
return found
""")
    assert all(isinstance(v, str) and v.endswith("Error") for v in out.values()), out


def test_path_traversal_out_of_a_mount(wasm, tmp_path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "ok.txt").write_text("ok")
    (tmp_path / "secret.txt").write_text("secret")
    out = guest(wasm, """
import os
tries = {}
for path in ('/data/ok.txt', '/data/../secret.txt', '/data/../../etc/passwd', '/data/./../inner/../secret.txt'):
    try:
        tries[path] = open(path).read()
    except OSError as exc:
        tries[path] = type(exc).__name__
try:
    os.symlink('/data/..', '/data/up')
    tries['symlink'] = 'made'
except OSError as exc:
    tries['symlink'] = type(exc).__name__
return tries
""", mounts={"/data": str(inner)})
    assert out["/data/ok.txt"] == "ok"
    assert "secret" not in str(list(out.values()))
    assert out["symlink"].endswith("Error")
    assert sorted(p.name for p in inner.iterdir()) == ["ok.txt"]


def test_read_only_mount_cannot_be_written(wasm, tmp_path) -> None:
    (tmp_path / "model.bin").write_bytes(b"weights")
    out = guest(wasm, """
import os
results = []
for attempt in (lambda: open('/m/model.bin', 'wb'), lambda: open('/m/new.txt', 'w'),
                lambda: os.remove('/m/model.bin'), lambda: os.mkdir('/m/d'),
                lambda: os.rename('/m/model.bin', '/m/x.bin'), lambda: open('/m/model.bin', 'ab')):
    try:
        attempt()
        results.append('allowed')
    except OSError as exc:
        results.append(type(exc).__name__)
return results
""", mounts={"/m": str(tmp_path)})
    assert "allowed" not in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]
    assert (tmp_path / "model.bin").read_bytes() == b"weights"


def test_no_sockets(wasm) -> None:
    out = guest(wasm, """
try:
    import socket
except ImportError as exc:
    return 'no socket module: ' + str(exc)
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.connect(('127.0.0.1', 22))
    return 'connected'
except Exception as exc:
    return type(exc).__name__
""")
    assert out != "connected"


def test_no_subprocesses(wasm) -> None:
    out = guest(wasm, """
import os
results = []
for attempt in (lambda: os.system('id'), lambda: os.fork(), lambda: os.execv('/bin/sh', ['sh']),
                lambda: __import__('subprocess').run(['id'])):
    try:
        results.append(repr(attempt()))
    except Exception as exc:
        results.append(type(exc).__name__)
return results
""")
    assert all(r.endswith("Error") or r == "-1" for r in out), out


def test_no_environment_leaks(wasm, monkeypatch) -> None:
    monkeypatch.setenv("EDGECOMPUTE_TEST_SECRET", "hunter2")
    out = guest(wasm, "import os, sys\nreturn dict(os.environ), sys.argv[:1], os.getcwd()")
    environ, _argv, _cwd = out
    assert environ == {}
    assert "hunter2" not in repr(out)


def test_infinite_loop(wasm) -> None:
    with pytest.raises(SandboxTimeout):
        guest(wasm, "while True:\n    pass", timeout=0.5)


def test_memory_bomb(wasm) -> None:
    with pytest.raises(SandboxMemoryExceeded):
        guest(wasm, "s = 'x'\nwhile True:\n    s = s + s", memory_mb=64)


def test_deep_recursion(wasm) -> None:
    with pytest.raises(GuestError) as info:
        guest(wasm, "def f(n):\n    return f(n + 1)\nreturn f(0)")
    assert info.value.guest_type == "RecursionError"


def test_deep_recursion_with_the_limit_lifted(wasm) -> None:
    # Python frames live on the guest heap: this ends at the memory cap or the deadline
    with pytest.raises((SandboxMemoryExceeded, SandboxTimeout, GuestError)):
        guest(wasm, "import sys\nsys.setrecursionlimit(10**7)\ndef f(n):\n    return f(n + 1)\nreturn f(0)",
              memory_mb=48, timeout=5)


def test_output_flood(wasm) -> None:
    with pytest.raises(SandboxOutputExceeded):
        guest(wasm, "import sys\nwhile True:\n    sys.stderr.write('e' * 65536)", output_bytes=100_000)


def test_thread_bomb(wasm) -> None:
    out = guest(wasm, """
import threading
started = 0
try:
    for _ in range(1000):
        threading.Thread(target=lambda: None).start()
        started += 1
except Exception as exc:
    return started, type(exc).__name__
return started, None
""")
    assert out[0] == 0 and out[1] is not None, out


def test_requests_never_see_each_others_data(wasm) -> None:
    writer = ("import sys, builtins\n"
              "def main(x):\n"
              "    builtins.SECRET = x\n"
              "    sys.modules['stash'] = type(sys)('stash')\n"
              "    sys.modules['stash'].value = x\n"
              "    return 'stored'\n")
    reader = ("import sys, builtins\n"
              "def main(x):\n"
              "    return [getattr(builtins, 'SECRET', None), 'stash' in sys.modules]\n")
    requests = []
    for i in range(6):
        requests.append(Request("wasm/python", f"secret-{i}", params={"source": writer}))
        requests.append(Request("wasm/python", None, params={"source": reader}))
    results = run_many(wasm, requests)
    assert results[0::2] and all(r.outputs == "stored" for r in results[0::2]), results
    assert all(r.outputs == [None, False] for r in results[1::2]), results


def test_host_is_unharmed_after_the_attempts(wasm) -> None:
    import time

    assert guest(wasm, "return x * 2", inputs=21) == 42
    from edgecompute_wasm._python import PythonRunner

    # every sandbox thread ends: what is left is the ticker, the pre-starter and the pools' idle ones
    limit = 2 + PythonRunner.MAX_SHAPES * wasm.settings.pool_size
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        sandboxes = [t for t in threading.enumerate() if t.name.startswith("edgecompute-wasm")]
        if len(sandboxes) <= limit:
            break
        time.sleep(0.1)
    assert len(sandboxes) <= limit, [t.name for t in sandboxes]
    assert os.path.exists("/etc/passwd")


_source_text = st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from(["def main(x):", "    return x", "    ", "while True:", "import os", "print(1)",
                              "raise SystemExit", "    yield 1", "x = [0] * 10**9", "os._exit(3)", "main = 5",
                              "import sys; sys.stdout.close()", "def main(*a): return a", "lambda: 0", "\n",
                              "open('/etc/passwd')", "__import__('marshal').dumps(1)", "main = print"]),
             max_size=8).map("\n".join),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=_source_text)
def test_random_source_never_hurts_the_host(wasm, source: str) -> None:
    try:
        run(wasm, inputs={"k": 1}, source=source, timeout=1.0, memory_mb=64)
    except EdgeComputeError:
        pass  # contained: a typed error
    assert os.path.exists("/etc/passwd")
