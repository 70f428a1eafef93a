"""What the sandbox tests share: whether this machine can make a sandbox, and a sandbox placement
that sees the cpp executor's compiled plugins (built here on the host, bound read-only)."""

from __future__ import annotations

from typing import Any

import pytest

from edgecompute import Placement
from edgecompute.placement import sandbox_unavailable


def skip_without_namespaces() -> None:
    reason = sandbox_unavailable()
    if reason is not None:
        pytest.skip(f"this machine cannot create the sandbox's namespaces: {reason}")


def cpp_sandbox(**knobs: Any) -> Placement:
    """A sandbox placement whose cpp executor finds the bundled plugin compiled by the host: a
    sandbox has no writable cache, and compiling there would cost every worker start seconds."""
    from edgecompute_cpp import CppExecutor, cache_dir

    CppExecutor(builtin=True, plugins=[]).algorithms()  # compiles the bundled plugin into the cache
    cache = str(cache_dir())
    roots = [cache, *knobs.pop("roots", ())]
    env = {"EDGECOMPUTE_CPP_CACHE": cache, **knobs.pop("env", {})}
    return Placement.sandbox(roots=roots, env=env, **knobs)
