"""Errors of the cpp executor; all derive from edgecompute's hierarchy."""

from __future__ import annotations

from edgecompute.errors import PluginError

__all__ = ["CompileError", "PluginABIError"]


class CompileError(PluginError):
    """Compiling a C++ plugin failed; ``output`` holds the compiler's message, ``command`` the
    command line that ran."""

    def __init__(self, source: str, command: list[str], output: str) -> None:
        super().__init__(source, f"compiling failed (exit status non-zero):\n{output.strip()}")
        self.source = source
        self.command = command
        self.output = output


class PluginABIError(PluginError):
    """A plugin was built for an ABI version this host does not know."""

    def __init__(self, plugin: str, found: int, supported: tuple[int, int]) -> None:
        super().__init__(
            plugin,
            f"it was built for plugin ABI version {found}, but this edgecompute-cpp supports versions "
            f"{supported[0]} to {supported[1]}; rebuild it against this edgecompute-cpp's headers "
            f"(`edgecompute-cpp include`) or upgrade edgecompute-cpp",
        )
        self.found = found
        self.supported = supported
