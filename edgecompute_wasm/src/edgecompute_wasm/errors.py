"""Typed errors of the ``wasm`` executor.

Every breach of a sandbox limit derives from :class:`edgecompute.errors.SandboxViolation`; an
exception raised by guest code is a :class:`GuestError` carrying the guest's traceback.
"""

from __future__ import annotations

from edgecompute.errors import ExecutorError, InvalidRequest, SandboxViolation

__all__ = [
    "GuestError",
    "RuntimeIntegrityError",
    "SandboxCrashed",
    "SandboxFuelExhausted",
    "SandboxMemoryExceeded",
    "SandboxOutputExceeded",
    "SandboxStackOverflow",
    "SandboxTimeout",
    "WheelRefused",
]


class _Captured:
    """Mix-in: what the guest printed before it failed."""

    stdout: str = ""
    stderr: str = ""

    def _capture(self, stdout: str = "", stderr: str = "") -> None:
        self.stdout = stdout
        self.stderr = stderr


class SandboxTimeout(SandboxViolation, _Captured):
    """The guest ran past its wall-clock limit (epoch deadline) and was stopped."""

    def __init__(self, message: str, *, limit: float | None = None, stdout: str = "", stderr: str = "") -> None:
        super().__init__(message)
        self.limit = limit
        self._capture(stdout, stderr)


class SandboxFuelExhausted(SandboxViolation, _Captured):
    """The guest used up its fuel (its instruction budget)."""

    def __init__(self, message: str, *, fuel: int | None = None, stdout: str = "", stderr: str = "") -> None:
        super().__init__(message)
        self.fuel = fuel
        self._capture(stdout, stderr)


class SandboxMemoryExceeded(SandboxViolation, _Captured):
    """The guest tried to grow its linear memory past the cap."""

    def __init__(self, message: str, *, limit_bytes: int | None = None, stdout: str = "", stderr: str = "") -> None:
        super().__init__(message)
        self.limit_bytes = limit_bytes
        self._capture(stdout, stderr)


class SandboxOutputExceeded(SandboxViolation, _Captured):
    """The guest wrote more to stdout/stderr (or returned a bigger result) than allowed."""

    def __init__(self, message: str, *, limit_bytes: int | None = None, stdout: str = "", stderr: str = "") -> None:
        super().__init__(message)
        self.limit_bytes = limit_bytes
        self._capture(stdout, stderr)


class SandboxStackOverflow(SandboxViolation, _Captured):
    """The guest exhausted the WebAssembly call stack."""

    def __init__(self, message: str, *, stdout: str = "", stderr: str = "") -> None:
        super().__init__(message)
        self._capture(stdout, stderr)


class SandboxCrashed(SandboxViolation, _Captured):
    """The guest trapped (or exited, or answered garbage) for a reason that is no named limit."""

    def __init__(self, message: str, *, trap: str = "", exit_code: int | None = None, stdout: str = "",
                 stderr: str = "") -> None:
        super().__init__(message)
        self.trap = trap
        self.exit_code = exit_code
        self._capture(stdout, stderr)


class GuestError(ExecutorError, _Captured):
    """Guest code raised an exception; ``guest_type`` and ``guest_traceback`` describe it."""

    def __init__(self, message: str, *, guest_type: str = "", guest_message: str = "", guest_traceback: str = "",
                 stdout: str = "", stderr: str = "") -> None:
        super().__init__(message)
        self.guest_type = guest_type
        self.guest_message = guest_message
        self.guest_traceback = guest_traceback
        self._capture(stdout, stderr)


class WheelRefused(InvalidRequest):
    """A dependency wheel cannot be used in the sandbox (not pure Python, missing, or malformed)."""


class RuntimeIntegrityError(ExecutorError):
    """The CPython-for-WASI runtime file does not match its pinned sha256; it is never compiled."""
