"""``python -m edgecompute_cpp._probe LIBRARY``: load one plugin library and describe it, nothing else.

In ``process`` isolation a plugin that crashes while it loads takes its worker process with it;
when a worker dies while starting, the host loads each plugin alone in this throwaway process to
learn which one did it (a crash is the exit status: killed by a signal).
"""

from __future__ import annotations

import sys

from edgecompute.errors import EdgeComputeError

from ._native import NativePlugin


def main(argv: list[str]) -> int:
    try:
        NativePlugin(argv[0], argv[0]).describe()
    except EdgeComputeError:
        return 1  # refused, not crashed: the worker reports it as a problem of its own
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
