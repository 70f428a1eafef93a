"""Registers fine, but its executor fails to build on first use."""

from typing import Any

import edgecompute


def make_executor() -> Any:
    raise OSError("libbroken.so: cannot open shared object file")


@edgecompute.hookimpl
def register_executors(register: Any) -> None:
    register(make_executor, name="broken")
