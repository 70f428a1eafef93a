"""Hostile requests against every installed executor: the error each gets, and what it cost the host.

    python benchmarks/security.py [--only SUBSTRING] [--json FILE]

Every case (``benchmarks/security_cases/*.py``) runs in a fresh process, through ``Runtime`` with the
executor built from the case's operator config. The process first runs a normal request to the same
executor; its peak RSS is the baseline. Then the peak is reset (``/proc/self/clear_refs``) and the
attack runs. Columns:

- ``error``: the class the attack ended in (``ok`` if it succeeded); ``want``: the class it must get;
- ``safe s``: seconds from submitting the attack until the scheduler had nothing running and nothing
  reserved (the host is safe again: no thread still works on the attack);
- ``RSS +MB``: the attack's peak RSS above the normal request's peak;
- ``bars``: the host process survived (exit 0), no check found host data in the answer, the RSS above
  the baseline stayed under the case's memory limit + 64 MB, and the time to safe stayed under the
  deadline + 1 s.

The process exits 1 if any case misses a bar.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from security_cases import Case  # noqa: E402 - the cases live beside this script

MiB = 1024 * 1024


def all_cases(tmp: Path) -> dict[str, tuple[str, Case]]:
    """Every case by name, with the module it comes from."""
    import security_cases

    found: dict[str, tuple[str, Case]] = {}
    for info in sorted(pkgutil.iter_modules(security_cases.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"security_cases.{info.name}")
        folder = tmp / info.name
        folder.mkdir(parents=True, exist_ok=True)
        for case in module.cases(folder):
            if case.name in found:
                raise SystemExit(f"two cases are called {case.name!r}")
            found[case.name] = (info.name, case)
    return found


def _peak_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current RSS


def child(name: str) -> dict[str, Any]:
    """Runs one case in this (fresh) process and returns what it measured."""
    import attrs

    from edgecompute import Registry, Resources, Runtime

    with tempfile.TemporaryDirectory(prefix="ec-sec-") as tmp:
        _module, case = all_cases(Path(tmp))[name]
        registry = Registry.discover(settings={case.executor: case.config})
        with Runtime(registry) as rt:
            rt.run(case.normal())
            baseline = _peak_rss()
            _reset_peak()
            request = case.attack()
            if request.timeout is None:
                request = attrs.evolve(request, timeout=case.deadline)
            start = time.perf_counter()
            outputs: Any = None
            try:
                outputs = rt.run(request).outputs
                error = "ok"
                message = ""
            except Exception as exc:  # noqa: BLE001 - the class is what we record
                error = type(exc).__name__
                message = str(exc)
            # safe again: nothing running and nothing reserved (a lingering thread keeps its reservation)
            while True:
                stats = rt.stats()
                if stats.running == 0 and stats.in_use == Resources():
                    break
                if time.perf_counter() - start > case.deadline + 30:
                    break
                time.sleep(0.005)
            safe = time.perf_counter() - start
            peak = _peak_rss()
            problem = case.check(outputs) if case.check is not None else None
        return {"error": error, "message": message[:200], "safe": safe, "over": (peak - baseline) / MiB,
                "problem": problem}


def run_case(name: str, case: Case) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True,
                          timeout=case.deadline + 120)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        return {"error": f"HOST EXIT {done.returncode}", "message": tail[0][:200], "safe": float("nan"),
                "over": float("nan"), "problem": f"the host process ended with code {done.returncode}",
                "exit": done.returncode}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["exit"] = 0
    return result


def bars(case: Case, result: dict[str, Any]) -> list[str]:
    missed = []
    if result["exit"] != 0:
        missed.append("host exit")
    want = "ok" if case.expect is None else case.expect
    if result["error"] != want:
        missed.append(f"got {result['error']}")
    if result["problem"]:
        missed.append(str(result["problem"]))
    if not result["over"] <= case.memory_limit_mb + 64:
        missed.append("memory")
    if not result["safe"] <= case.deadline + 1:
        missed.append("time to safe")
    return missed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return 0

    with tempfile.TemporaryDirectory(prefix="ec-sec-") as tmp:
        cases = {name: found for name, found in all_cases(Path(tmp)).items() if args.only in name}
    print(f"{len(cases)} cases, each in a fresh process (python {sys.version.split()[0]}, {os.cpu_count()} CPUs)\n")
    header = f"| {'case':<64} | {'want':<17} | {'error':<17} | {'safe s':>6} | {'RSS +MB':>7} | bars |"
    print(header)
    print("|" + "|".join("-" * (len(cell)) for cell in header.split("|")[1:-1]) + "|")
    results = {}
    failures = 0
    for name, (_module, case) in cases.items():
        result = run_case(name, case)
        missed = bars(case, result)
        failures += bool(missed)
        results[name] = {**result, "missed": missed}
        want = "ok" if case.expect is None else case.expect
        print(f"| {name:<64} | {want:<17} | {result['error']:<17} | {result['safe']:>6.2f} | "
              f"{result['over']:>7.1f} | {'ok' if not missed else 'MISS: ' + '; '.join(missed)} |", flush=True)
    print(f"\n{len(cases) - failures} of {len(cases)} cases meet every bar")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
