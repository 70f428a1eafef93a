"""wasm/python: the guest programming model, limits and typed errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgecompute.errors import InvalidRequest, SandboxViolation
from edgecompute_wasm.errors import (
    GuestError,
    SandboxMemoryExceeded,
    SandboxOutputExceeded,
    SandboxTimeout,
)

from .conftest import run


def test_discovered_through_the_entry_point_without_importing_wasmtime() -> None:
    code = (
        "import sys\n"
        "from edgecompute import Registry\n"
        "r = Registry.discover()\n"
        "e = r.get('wasm')\n"
        "assert [a.name for a in e.algorithms()] == ['python', 'module'], e.algorithms()\n"
        "assert 'wasmtime' not in sys.modules, 'registering or building imported wasmtime'\n"
        "print(type(e).__name__, r.select('wasm/python').qualified_name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["WasmExecutor", "wasm/python"]


def test_small_dict_round_trip(wasm) -> None:
    response = run(wasm, inputs={"a": 1, "b": [1, 2.5, "x"]},
                   source="def main(inputs):\n    return {'sum': inputs['a'] + 1, 'b': inputs['b']}")
    assert response.outputs == {"sum": 2, "b": [1, 2.5, "x"]}
    assert response.executor == "wasm"
    assert "sandbox_run" in response.timings


def test_plain_data_types_cross_both_ways(wasm) -> None:
    value = {"none": None, "t": True, "f": False, "big": 2**200, "neg": -(2**70), "float": 1.5e300,
             "s": "h\u00e9llo \U0001f600", "b": b"\x00\xff", "tuple": (1, (2, 3)), "set": {1, 2},
             "nested": [[[{"k": [1]}]]], 3: "int key"}
    response = run(wasm, inputs=value, source="def main(x):\n    return x")
    assert response.outputs == value


def test_custom_function_name(wasm) -> None:
    response = run(wasm, inputs=[3, 4], source="def area(xy):\n    return xy[0] * xy[1]", function="area")
    assert response.outputs == 12


def test_stdout_and_stderr_are_captured(wasm) -> None:
    response = run(wasm, inputs=None, capture=True,
                   source="import sys\ndef main(x):\n    print('out line')\n    print('err line', file=sys.stderr)\n"
                          "    return 1")
    assert response.outputs == {"result": 1, "stdout": "out line\n", "stderr": "err line\n"}


def test_guest_exception_carries_the_guest_traceback(wasm) -> None:
    source = "def helper(v):\n    return 1 / v\n\ndef main(x):\n    return helper(x)\n"
    with pytest.raises(GuestError) as info:
        run(wasm, inputs=0, source=source)
    error = info.value
    assert error.guest_type == "ZeroDivisionError"
    assert 'File "<guest>", line 2, in helper' in error.guest_traceback
    assert "return 1 / v" in error.guest_traceback
    assert "_edgecompute" not in error.guest_traceback  # no bootstrap frames
    assert not error.retryable


def test_syntax_error_and_missing_function(wasm) -> None:
    with pytest.raises(GuestError) as info:
        run(wasm, source="def main(x) return 1")
    assert info.value.guest_type == "SyntaxError"
    with pytest.raises(GuestError) as info:
        run(wasm, source="x = 1")
    assert info.value.guest_type == "NameError"
    assert "main" in str(info.value)


def test_unserializable_result_is_a_clear_error(wasm) -> None:
    with pytest.raises(GuestError, match="cannot cross the sandbox"):
        run(wasm, source="def main(x):\n    return object()")


def test_bad_requests_are_refused_before_running(wasm) -> None:
    with pytest.raises(InvalidRequest, match="source"):
        run(wasm, inputs=1)
    with pytest.raises(InvalidRequest, match="plain data"):
        run(wasm, inputs=object(), source="def main(x): return x")
    with pytest.raises(InvalidRequest, match="unknown params"):
        run(wasm, source="def main(x): return x", sourec="typo")
    with pytest.raises(InvalidRequest, match="timeout"):
        run(wasm, source="def main(x): return x", timeout=-1)


def test_infinite_loop_times_out(wasm) -> None:
    with pytest.raises(SandboxTimeout) as info:
        run(wasm, source="def main(x):\n    while True:\n        pass", timeout=0.5)
    assert isinstance(info.value, SandboxViolation)


def test_sleeping_guest_is_stopped_at_its_deadline(wasm) -> None:
    # no clock in the test: the guest would sleep for a day, so only a stop at the deadline ends it
    with pytest.raises(SandboxTimeout):
        run(wasm, source="import time\ndef main(x):\n    time.sleep(86400)", timeout=0.5)


def test_request_deadline_bounds_the_sandbox(wasm) -> None:
    from edgecompute.errors import TaskTimeout

    with pytest.raises((TaskTimeout, SandboxTimeout)):
        run(wasm, source="def main(x):\n    while True:\n        pass", deadline=0.5)


def test_memory_cap(wasm) -> None:
    with pytest.raises(SandboxMemoryExceeded):
        run(wasm, source="def main(x):\n    blocks = []\n    while True:\n        blocks.append(bytearray(1 << 20))",
            memory_mb=48)


def test_one_huge_allocation(wasm) -> None:
    with pytest.raises(SandboxMemoryExceeded):
        run(wasm, source="def main(x):\n    return len(bytearray(1 << 30))")


def test_output_cap(wasm) -> None:
    with pytest.raises(SandboxOutputExceeded) as info:
        run(wasm, source="def main(x):\n    while True:\n        print('x' * 1000)", output_bytes=10_000)
    assert 0 < len(info.value.stdout) <= 10_000


def test_result_cap(wasm) -> None:
    with pytest.raises(SandboxOutputExceeded, match="return value"):
        run(wasm, source="def main(x):\n    return 'y' * 100_000", result_bytes=10_000)


def test_outputs_stream_as_a_chunk(wasm) -> None:
    import asyncio

    from edgecompute import Registry, Request, Resources, Scheduler
    from edgecompute.config import Config

    async def go():
        async with Scheduler(Registry([wasm]), capacity=Resources(cpu=4, memory_mb=100000), config=Config()) as s:
            source = "def main(x):\n    print('p', x)\n    return x"
            handle = s.submit(Request("wasm/python", 2, params={"source": source}))
            chunks = [chunk async for chunk in handle.stream()]
            return chunks, (await handle.result()).outputs

    chunks, outputs = asyncio.run(go())
    assert chunks == [{"stdout": "p 2\n", "stderr": ""}]
    assert outputs == 2


def test_read_only_mount_for_model_files(wasm, tmp_path) -> None:
    (tmp_path / "weights.txt").write_text("0.5 0.25")
    source = ("def main(x):\n"
              "    with open('/model/weights.txt') as f:\n"
              "        w = [float(v) for v in f.read().split()]\n"
              "    return sum(a * b for a, b in zip(w, x))")
    response = run(wasm, inputs=[2, 4], source=source, mounts={"/model": str(tmp_path)})
    assert response.outputs == 2.0


def test_every_codec_is_there_though_only_common_ones_are_precompiled(wasm) -> None:
    source = (
        "import codecs, encodings, sys\n"
        "def main(x):\n"
        "    names = [codecs.lookup(n).name for n in ('utf-8', 'latin-1', 'cp037', 'shift_jis', 'koi8_r', 'rot13')]\n"
        "    boot = [m for m in sys.modules if 'edgecompute' in m]\n"
        "    return names, 'h\\u00e9'.encode('cp037'), encodings.__path__[0], sys.argv, boot\n"
    )
    names, encoded, first, argv, boot = run(wasm, source=source).outputs
    assert names == ["utf-8", "iso8859-1", "cp037", "shift_jis", "koi8-r", "rot-13"]
    assert encoded == "h\u00e9".encode("cp037")
    # from the snapshot, encodings was imported at its boot, from the runtime's own archive
    assert first == ("/usr/local/lib/python312.zip/encodings" if wasm.settings.snapshot else "/.stdlib/encodings")
    assert argv == ["-c"] and boot == []  # the precompiled bootstrap leaves no trace


def test_the_bootstrap_is_sent_as_source_without_the_precompiled_stdlib(wasm) -> None:
    from edgecompute_wasm._python import BOOT_MODULE, PythonRunner
    from edgecompute_wasm.settings import WasmSettings

    runtime = wasm.runtime()
    precompiled = runtime.python
    assert precompiled.argv[-1] == f"__import__({BOOT_MODULE!r}).main(())"
    runner = PythonRunner(runtime.engine, precompiled.module, pool_size=0, prestart=False, preload=("json",))
    assert "-I" in runner.argv and runner.base_mounts == [] and runner.env == []
    limits = WasmSettings().limits({}, None)
    result = runner.run("import sys\ndef main(x):\n    return x + 1, 'json' in sys.modules, sys.path[0]", "main", 41,
                        limits)
    assert result.value == (42, True, "/usr/local/lib/python312.zip")
    # and with it, the precompiled bootstrap takes the same preload
    folder = precompiled.base_mounts[0][0]
    runner = PythonRunner(runtime.engine, precompiled.module, pool_size=0, prestart=False, preload=("json",),
                          stdlib=folder)
    assert runner.argv[-1] == f"__import__({BOOT_MODULE!r}).main(('json',))"
    result = runner.run("import sys\ndef main(x):\n    return x + 1, 'json' in sys.modules, sys.path[0]", "main", 41,
                        limits)
    assert result.value == (42, True, "/.stdlib")
