"""A hook implementation that raises while registering."""

from typing import Any

import edgecompute


@edgecompute.hookimpl
def register_executors(register: Any) -> None:
    raise RuntimeError("this plugin's registration is broken")
