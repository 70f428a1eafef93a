"""``edgecompute-wasm``: fill and check a wheelhouse of pure-Python wheels for guest code.

    edgecompute-wasm wheelhouse ./wheels requests==2.32.3 attrs   # pip download, pure wheels only
    edgecompute-wasm check ./wheels                                # refuse what cannot run in wasm

The download step is the only one that touches the network, and it runs ahead of time, never
while a request runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .deps import check_wheel
from .errors import WheelRefused


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgecompute-wasm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fill = sub.add_parser("wheelhouse", help="download pure-Python wheels (with pip) into a folder")
    fill.add_argument("folder", type=Path)
    fill.add_argument("requirements", nargs="+")
    check = sub.add_parser("check", help="check that every wheel in a folder can run in the sandbox")
    check.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.command == "check" and not args.folder.is_dir():
        # the shape of every executor CLI's errors (edgecompute-cpp, edgecompute-ml): one line, status 1
        print(f"edgecompute-wasm: error: {args.folder} is not a folder", file=sys.stderr)
        return 1
    if args.command == "wheelhouse":
        args.folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--platform", "any",
                   "--python-version", "3.12", "--implementation", "py", "--abi", "none",
                   "-d", str(args.folder), *args.requirements]
        result = subprocess.run(command, check=False)
        if result.returncode != 0:
            print("pip download failed (a package with no pure-Python wheel cannot run in the sandbox)",
                  file=sys.stderr)
            return result.returncode
    return _check(args.folder)


def _check(folder: Path) -> int:
    bad = 0
    wheels = sorted(folder.glob("*.whl"))
    for wheel in wheels:
        try:
            check_wheel(wheel)
            print(f"ok       {wheel.name}")
        except WheelRefused as exc:
            bad += 1
            print(f"refused  {exc}")
    print(f"{len(wheels) - bad} usable, {bad} refused")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
