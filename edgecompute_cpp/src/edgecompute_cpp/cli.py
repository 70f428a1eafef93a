"""``edgecompute-cpp``: print the plugin include directory, build plugins, list what loads."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgecompute-cpp", description="Tools for edgecompute C++ plugins.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("include", help="print the directory that holds edgecompute/plugin.h")
    build = commands.add_parser("build", help="compile C++ plugin sources (or, with none, the bundled plugin) "
                                              "into the cache and print the library paths")
    build.add_argument("sources", nargs="*")
    build.add_argument("--flag", action="append", default=[], help="an extra compiler flag (repeatable)")
    commands.add_parser("list", help="list the plugins and algorithms the cpp executor loads")
    args = parser.parse_args(argv)

    from edgecompute.errors import EdgeComputeError

    try:
        if args.command == "include":
            from ._build import include_dir

            print(include_dir())
        elif args.command == "build":
            from ._build import build_builtin, build_plugin

            if not args.sources:
                print(build_builtin())
            for source in args.sources:
                print(build_plugin(source, flags=args.flag))
        else:
            import asyncio

            from .executor import CppExecutor

            executor = CppExecutor()
            health = asyncio.run(executor.health())
            print(json.dumps({"status": health.status.value, "message": health.message,
                              "plugins": health.details.get("plugins", []),
                              "problems": health.details.get("problems", [])}, indent=2))
    except EdgeComputeError as exc:
        print(f"edgecompute-cpp: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
