"""wasm/python sandboxes restored from the snapshot of a booted interpreter: isolation and fallbacks.

Every request must start from the same pristine snapshot: nothing a guest changes (module state,
sys.modules, builtins, the environment, sys.path, the heap, the random generator) may reach the
next request, whether it runs after it or beside it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from edgecompute import Request

from .conftest import run, run_many

# What a guest leaves behind: every kind of interpreter state it can reach.
POLLUTE = """
import builtins, collections, json, os, random, re, sys, types
KEEP = []
def main(secret):
    builtins.leaked = secret
    json.leaked = secret
    json.dumps = lambda *a, **k: secret
    collections.Counter.leaked = secret
    sys.modules["leaked_module"] = types.ModuleType(secret)
    sys.path.append("/" + secret)
    os.environ["LEAKED"] = secret
    random.seed(1234)
    re.compile(secret)  # the module's pattern cache
    sys.intern(secret)
    sys.setrecursionlimit(123)
    KEEP.extend(bytearray(secret.encode()) * 1000 for _ in range(2000))  # ~ the heap grows by MBs
    sys.modules["__main__"].leaked = secret
    return len(KEEP)
"""

# What a guest sees when it starts: a fingerprint of the same state.
PROBE = """
import builtins, collections, gc, json, os, random, sys
def main(reversed_secret):
    blocks = sys.getallocatedblocks()
    # the secret is handed over reversed: this request's own inputs must not match it
    secret = reversed_secret[::-1]
    raw = secret.encode()
    def holds(o):
        if isinstance(o, dict):
            items = [*o.keys(), *o.values()]
        elif isinstance(o, (list, tuple, set, frozenset)):
            items = o
        else:
            return False
        for x in items:
            if isinstance(x, str) and secret in x or isinstance(x, (bytes, bytearray)) and raw in x:
                return True
        return False
    # every container the collector knows, and every module's and class's namespace (a dict of
    # atomic values only is not tracked by the collector)
    roots = [m.__dict__ for m in list(sys.modules.values()) if hasattr(m, "__dict__")]
    roots += [vars(o) for o in gc.get_objects() if isinstance(o, type)]
    heap = any(holds(o) for o in gc.get_objects() if o is not roots) or any(holds(o) for o in roots)
    return {
        "blocks": blocks,
        "builtins": hasattr(builtins, "leaked"),
        "json": hasattr(json, "leaked") or json.dumps({"a": 1}) != '{"a": 1}',
        "class": hasattr(collections.Counter, "leaked"),
        "modules": "leaked_module" in sys.modules,
        "path": any(secret in p for p in sys.path),
        "environ": dict(os.environ),
        "random": random.Random(1234).random() == random.random(),
        "recursion": sys.getrecursionlimit(),
        "main": hasattr(sys.modules["__main__"], "leaked"),
        "heap": heap,
    }
"""

CLEAN = {"builtins": False, "json": False, "class": False, "modules": False, "path": False, "environ": {},
         "random": False, "recursion": 1000, "main": False, "heap": False}


def _manifest(wasm: Any) -> dict[str, str]:
    from edgecompute_wasm import _snapshot

    path = _snapshot.manifest_path(wasm.runtime().cache_dir, wasm.settings.preload)
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def _snapshot_files(wasm: Any) -> tuple[Path, Path]:
    """The snapshot module and its compiled code in the cache folder."""
    from edgecompute_wasm import _snapshot
    from edgecompute_wasm._cache import entry_path

    runtime = wasm.runtime()
    key = _snapshot.compiled_key(runtime.cache_dir, wasm.settings.preload, runtime.engine.key)
    assert key is not None
    compiled = entry_path(key, runtime.cache_dir)
    assert compiled.is_file()
    return _snapshot.manifest_path(runtime.cache_dir, wasm.settings.preload).with_suffix(".wasm"), compiled


def _probe(wasm: Any, secret: str) -> dict[str, Any]:
    outputs: dict[str, Any] = run(wasm, inputs=secret[::-1], source=PROBE).outputs
    return outputs


def test_the_default_executor_starts_sandboxes_from_the_snapshot(wasm: Any) -> None:
    before = wasm.runtime().python.stats()["snapshot_starts"]
    assert run(wasm, inputs=20, source="def main(x):\n    return x + 1").outputs == 21
    assert wasm.runtime().python.stats()["snapshot_starts"] == before + 1


def test_nothing_a_guest_changes_reaches_the_next_request(wasm: Any) -> None:
    secret = "s3cr3t-9f1c2a"
    first = _probe(wasm, secret)
    assert {k: v for k, v in first.items() if k != "blocks"} == CLEAN
    assert run(wasm, inputs=secret, source=POLLUTE).outputs == 2000
    after = _probe(wasm, secret)
    assert {k: v for k, v in after.items() if k != "blocks"} == CLEAN
    # the heap a request starts with is the snapshot's, block for block
    assert after["blocks"] == first["blocks"]
    # and what each request starts from, on disk, is unchanged: restores map it copy-on-write
    wasm_path, compiled = _snapshot_files(wasm)
    assert hashlib.sha256(wasm_path.read_bytes()).hexdigest() == _manifest(wasm)["sha256"]
    for path in (wasm_path, compiled):
        assert secret.encode() not in path.read_bytes()


def test_the_probe_sees_what_a_polluter_left_in_its_own_interpreter(wasm: Any) -> None:
    # the control: in one interpreter, the probe finds every change POLLUTE makes
    secret = "s4me-1nterpreter"
    source = (POLLUTE.replace("def main(", "def pollute(") + PROBE.replace("def main(", "def probe(")
              + "def main(secret):\n    pollute(secret)\n    return probe(secret[::-1])\n")
    seen = run(wasm, inputs=secret, source=source).outputs
    assert seen["environ"] == {"LEAKED": secret} and seen["recursion"] == 123
    assert all(seen[key] for key in CLEAN if key not in ("environ", "recursion")), seen


def test_concurrent_polluters_never_reach_concurrent_probes(wasm: Any) -> None:
    secret = "c0ncurrent-77ab"
    requests = []
    for i in range(12):
        if i % 2 == 0:
            requests.append(Request("wasm/python", secret, params={"source": POLLUTE}))
        else:
            requests.append(Request("wasm/python", secret[::-1], params={"source": PROBE}))
    results = run_many(wasm, requests)
    probes = [r.outputs for i, r in enumerate(results) if i % 2 == 1]
    assert len(probes) == 6
    for probe in probes:
        assert {k: v for k, v in probe.items() if k != "blocks"} == CLEAN
    assert len({p["blocks"] for p in probes}) == 1


def test_unused_preopen_slots_hold_nothing(wasm: Any) -> None:
    from edgecompute_wasm._snapshot import slot_placeholder

    source = ("import os\n"
              "def main(names):\n"
              "    out = []\n"
              "    for name in names:\n"
              "        try:\n"
              "            out.append(os.listdir(name))\n"
              "        except OSError as exc:\n"
              "            out.append(type(exc).__name__)\n"
              "    return out\n")
    names = [slot_placeholder(1), slot_placeholder(63), "/"]
    listed = run(wasm, inputs=names, source=source).outputs
    assert all(isinstance(entry, str) for entry in listed), listed  # every one an OSError


def test_a_mount_path_too_long_for_a_slot_boots_an_interpreter_instead(wasm: Any, tmp_path: Path) -> None:
    (tmp_path / "w.txt").write_text("7")
    guest = "/" + "m" * 300
    runner = wasm.runtime().python
    before = runner.stats()
    source = f"def main(x):\n    return int(open({guest + '/w.txt'!r}).read()) + x"
    assert run(wasm, inputs=1, source=source, mounts={guest: str(tmp_path)}).outputs == 8
    after = runner.stats()
    assert after["snapshot_starts"] == before["snapshot_starts"]
    assert after["cold_starts"] + after["warm_starts"] == before["cold_starts"] + before["warm_starts"] + 1
    # and a short one is served from the snapshot, with the same mount at its slot
    source = "def main(x):\n    return int(open('/short/w.txt').read()) + x"
    assert run(wasm, inputs=2, source=source, mounts={"/short": str(tmp_path)}).outputs == 9
    assert runner.stats()["snapshot_starts"] == after["snapshot_starts"] + 1


def test_a_memory_cap_below_the_snapshots_memory_boots_an_interpreter_instead(wasm: Any) -> None:
    # a cap the booting interpreter fits in but the snapshot's memory image does not: served as before
    runner = wasm.runtime().python
    snapshot_mb = runner.snapshot.memory_bytes / 2**20
    memory_mb = snapshot_mb - 1
    before = runner.stats()
    assert run(wasm, inputs=4, source="def main(x):\n    return x * 3", memory_mb=memory_mb).outputs == 12
    after = runner.stats()
    assert after["snapshot_starts"] == before["snapshot_starts"]
    assert after["cold_starts"] + after["warm_starts"] == before["cold_starts"] + before["warm_starts"] + 1
    assert run(wasm, inputs=4, source="def main(x):\n    return x * 3", memory_mb=snapshot_mb + 1).outputs == 12
    assert runner.stats()["snapshot_starts"] == after["snapshot_starts"] + 1


def test_the_switch_turns_the_snapshot_off(cache_dir: Path) -> None:
    import asyncio

    from edgecompute_wasm.executor import WasmExecutor

    executor = WasmExecutor({"cache_dir": str(cache_dir), "snapshot": False, "pool_size": 0, "memory_mb": 128})
    try:
        source = "import sys\ndef main(x):\n    return x * 2, sys.path[0]"
        assert run(executor, inputs=21, source=source).outputs == (42, "/.stdlib")
        stats = executor.runtime().python.stats()
        assert executor.runtime().python.snapshot is None
        assert stats["snapshot_starts"] == 0 and stats["cold_starts"] >= 1
    finally:
        asyncio.run(executor.aclose())


def test_a_stale_or_foreign_manifest_is_not_loaded(wasm: Any) -> None:
    from edgecompute_wasm import _snapshot

    runtime = wasm.runtime()
    preload = wasm.settings.preload
    path = _snapshot.manifest_path(runtime.cache_dir, preload)
    text = path.read_text()
    fields = dict(line.split("=", 1) for line in text.splitlines())
    # built from another bootstrap: not loaded
    assert _snapshot.load(runtime, preload, "0" * 64) is None
    # the manifest as it is loads (its compiled entry is in the cache)
    assert _snapshot.load(runtime, preload, fields["boot"]) is not None
    # the manifest names the snapshot's bytes by their sha256
    assert hashlib.sha256(path.with_suffix(".wasm").read_bytes()).hexdigest() == fields["sha256"]
    # a manifest of another format is not read at all
    path.write_text(text.replace("format=" + _snapshot.FORMAT, "format=0"))
    try:
        assert _snapshot.load(runtime, preload, fields["boot"]) is None
    finally:
        path.write_text(text)


def test_the_snapshot_holds_no_host_data(wasm: Any) -> None:
    # built from a pristine boot: no host path, name or environment value reached the guest's
    # memory (strings the pinned runtime holds itself excepted)
    import os
    import socket

    from edgecompute_wasm._runtime import verified_runtime_bytes

    original = verified_runtime_bytes()
    snapshot = _snapshot_files(wasm)[0].read_bytes()
    runtime = wasm.runtime()
    host = [str(runtime.cache_dir), str(Path.home()), os.getcwd(), socket.gethostname(), *os.environ.values()]
    checked = 0
    for text in host:
        raw = text.encode()
        if len(raw) >= 6 and raw not in original:
            assert raw not in snapshot, text
            checked += 1
    assert checked >= 3


def test_a_snapshot_whose_bytes_do_not_match_its_manifest_is_refused(wasm: Any, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import shutil
    import types

    from edgecompute_wasm import _snapshot
    from edgecompute_wasm._cache import CacheStats

    runtime = wasm.runtime()
    preload = wasm.settings.preload
    source = _snapshot.manifest_path(runtime.cache_dir, preload)
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    target = _snapshot.manifest_path(folder, preload)
    shutil.copyfile(source, target)
    data = bytearray(source.with_suffix(".wasm").read_bytes())
    data[len(data) // 2] ^= 1
    target.with_suffix(".wasm").write_bytes(bytes(data))
    scratch = types.SimpleNamespace(cache_dir=folder, engine=runtime.engine, cache_stats=CacheStats())
    with caplog.at_level(logging.WARNING, "edgecompute_wasm.snapshot"):
        assert _snapshot.load(scratch, preload, _manifest(wasm)["boot"]) is None
    assert "does not match the sha256 its manifest records" in caplog.text
    assert scratch.cache_stats.misses == 1  # no compiled entry there: its bytes were checked, and refused


@pytest.mark.parametrize(("guest", "fits"), [("/model", True), ("/" + "a" * 255, True), ("/" + "a" * 256, False),
                                             ("/a\x00b", False)])
def test_which_mounts_fit_a_slot(guest: str, fits: bool) -> None:
    from edgecompute_wasm._snapshot import SLOTS, Snapshot

    snapshot = Snapshot(None, range(SLOTS), 2**20)
    assert snapshot.fits([("/host", guest)], 2**20) is fits
    assert snapshot.fits([("/host", "/m")] * SLOTS, 2**20) is True
    assert snapshot.fits([("/host", "/m")] * (SLOTS + 1), 2**20) is False
    assert snapshot.fits([("/host", "/m")], 2**20 - 1) is False


def test_a_snapshot_sandbox_blocked_past_its_deadline_is_woken_by_the_watchdog(cache_dir: Path,
                                                                               tmp_path: Path) -> None:
    # it runs on the request's worker thread: blocked in a FIFO's open (no epoch reaches it), that
    # thread is freed by the watchdog, and the request ends with its timeout
    import asyncio
    import os

    from edgecompute_wasm.errors import SandboxTimeout
    from edgecompute_wasm.executor import WasmExecutor

    folder = tmp_path / "m"
    folder.mkdir()
    executor = WasmExecutor({"cache_dir": str(cache_dir), "pool_size": 0, "prestart": False,
                             "mounts": {"/m": str(folder)}})
    os.mkfifo(folder / "pipe")  # after the operator's check: files can appear in a mounted folder
    runtime = executor.runtime()
    try:
        with pytest.raises(SandboxTimeout):
            run(executor, source="def main(x):\n    return open('/m/pipe').read()", timeout=0.5)
        assert runtime.python.stats()["snapshot_starts"] == 1
        assert runtime.engine.live == 0
        # and a request after it is served as usual
        assert run(executor, inputs=2, source="def main(x):\n    return x + 1").outputs == 3
    finally:
        asyncio.run(executor.aclose())
    assert runtime.join(5.0)


@pytest.mark.slow
def test_a_build_boots_the_pinned_runtime_and_replaces_the_stale_snapshot(wasm: Any, tmp_path: Path) -> None:
    import types

    from edgecompute_wasm import _snapshot
    from edgecompute_wasm._cache import CacheStats, entry_path
    from edgecompute_wasm._python import BOOTSTRAP
    from edgecompute_wasm._runtime import verified_runtime_bytes

    runtime = wasm.runtime()
    preload = wasm.settings.preload
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    scratch = types.SimpleNamespace(cache_dir=folder, engine=runtime.engine, cache_stats=CacheStats())
    # an older build's snapshot: its manifest, and its compiled entry
    manifest = _snapshot.manifest_path(folder, preload)
    manifest.write_text(f"format={_snapshot.FORMAT}\nsha256={'ab' * 32}\nboot=old\nslots=1\nmemory_bytes=1\n")
    stale = _snapshot.compiled_key(folder, preload, runtime.engine.key)
    assert stale is not None
    entry_path(stale, folder).write_bytes(b"stale")
    built = _snapshot.build(scratch, runtime.python.module, verified_runtime_bytes(), preload, BOOTSTRAP, "new")
    assert not entry_path(stale, folder).exists()
    fields = dict(line.split("=", 1) for line in manifest.read_text().splitlines())
    assert fields["boot"] == "new"
    assert hashlib.sha256(manifest.with_suffix(".wasm").read_bytes()).hexdigest() == fields["sha256"]
    assert built.memory_bytes == int(fields["memory_bytes"]) and len(built.slots) == _snapshot.SLOTS
    # what a new process finds: the manifest, then the compiled entry it names
    loaded = _snapshot.load(scratch, preload, "new")
    assert loaded is not None and loaded.slots == built.slots
    assert scratch.cache_stats.hits == 1
