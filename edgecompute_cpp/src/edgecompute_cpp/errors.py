"""Errors of the cpp executor; all derive from edgecompute's hierarchy."""

from __future__ import annotations

from edgecompute.errors import ExecutorError, PluginError

__all__ = ["BundledPluginDown", "CompileError", "NoCompiler", "PluginABIError", "PluginCallError"]


class CompileError(PluginError):
    """Compiling a C++ plugin failed; ``output`` holds the compiler's message, ``command`` the
    command line that ran."""

    def __init__(self, source: str, command: list[str], output: str) -> None:
        super().__init__(source, f"compiling failed (exit status non-zero):\n{output.strip()}")
        self.source = source
        self.command = command
        self.output = output


class NoCompiler(CompileError):
    """A plugin given as C++ source needs a C++ compiler, and there is none (no ``$CXX``, and no
    ``c++``, ``g++`` or ``clang++`` on ``PATH``). The bundled algorithms of an installed wheel need
    none; a source install compiles them on first use, so it needs one too."""

    def __init__(self, source: str, bundled: bool = False) -> None:
        super().__init__(source, [], "")
        self.bundled = bundled
        missing = "no C++ compiler was found ($CXX is unset and none of c++, g++, clang++ is on PATH)"
        if bundled:
            self.reason = (f"it is compiled from source on first use here (a source install of edgecompute-cpp, "
                           f"or $EDGECOMPUTE_CPP_ISA=native), but {missing}: install the edgecompute-cpp wheel, "
                           f"which holds it compiled, or a C++ compiler (e.g. apt-get install g++), or set $CXX")
        else:
            self.reason = (f"it is C++ source, and building it needs a C++ compiler, but {missing}: "
                           f"install one (e.g. apt-get install g++) or set $CXX, or give the plugin as a "
                           f"compiled .so")
        self.args = (f"plugin {source!r} failed: {self.reason}",)

    def __reduce__(self) -> tuple[type[NoCompiler], tuple[str, bool]]:
        # whole, across a placement worker's pipe (the default would pass the message as `source`)
        return type(self), (self.source, self.bundled)


class BundledPluginDown(PluginError):
    """A bundled algorithm was asked for while the bundled plugin is down: it failed to load, and
    ``reason`` says why (no compiler in a source install, a library this system cannot load)."""

    def __init__(self, algorithm: str, cause: BaseException | str) -> None:
        why = cause.reason if isinstance(cause, PluginError) else str(cause)
        super().__init__("the bundled plugin", why)
        self.algorithm = algorithm
        self.args = (f"{algorithm} cannot run: executor 'cpp' is down for its bundled algorithms, because its "
                     f"bundled plugin failed to load: {why}",)

    def __reduce__(self) -> tuple[type[BundledPluginDown], tuple[str, str]]:
        return type(self), (self.algorithm, self.reason)


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


class PluginCallError(ExecutorError):
    """A plugin's algorithm returned an error status, or outputs the ABI does not allow; ``code``
    is the status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[type[PluginCallError], tuple[str, int]]:
        # whole, across a worker process's socket (the default would drop the code)
        return type(self), (str(self), self.code)
