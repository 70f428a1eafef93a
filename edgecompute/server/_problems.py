"""Every error the gateway answers is an RFC 9457 problem details body (``application/problem+json``).

``type`` is a relative URI, ``/problems/<slug>``, one per kind of problem (docs/server.md lists
them); ``title`` is fixed per type, ``detail`` says what happened this time. Extensions:
``error`` (the edgecompute error class, when one caused it), ``request_id``, and for 429 and 503
``retry_after`` (seconds, also sent as the ``Retry-After`` header).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from .. import errors

log = logging.getLogger("edgecompute.server")

__all__ = ["PROBLEM_JSON", "Problem", "problem_for_error"]

PROBLEM_JSON = "application/problem+json"

#: slug -> (status, title)
PROBLEMS: dict[str, tuple[int, str]] = {
    "bad-request": (400, "The request is malformed"),
    "unauthorized": (401, "A valid API key is required"),
    "forbidden": (403, "The API key may not do this"),
    "not-found": (404, "No such resource"),
    "unknown-algorithm": (404, "No executor offers this algorithm"),
    "method-not-allowed": (405, "Method not allowed"),
    "not-acceptable": (406, "Cannot answer in any accepted media type"),
    "request-timeout": (408, "The request did not arrive in time"),
    "conflict": (409, "The request conflicts with the resource's state"),
    "result-evicted": (410, "The task's result is no longer kept"),
    "payload-too-large": (413, "The request body is too large"),
    "uri-too-long": (414, "The request target is too long"),
    "unsupported-media-type": (415, "Unsupported request media type"),
    "invalid-request": (422, "The request is invalid"),
    "infeasible": (422, "The request needs more resources than the server has"),
    "rate-limited": (429, "Too many requests"),
    "headers-too-large": (431, "The request's header fields are too large"),
    "too-many-in-flight": (429, "Too many unfinished tasks for this API key"),
    "internal": (500, "Internal server error"),
    "unavailable": (503, "The scheduler cannot take this task now"),
    # a task's own failure, inside a task resource (never an HTTP status of its own)
    "task-failed": (200, "The task failed"),
    "task-cancelled": (200, "The task was cancelled"),
    "task-timeout": (200, "The task passed its deadline"),
}


class Problem(Exception):
    """An error answer: raise it in a handler and the app turns it into a problem response."""

    def __init__(self, slug: str, detail: str, *, error: str | None = None, retry_after: float | None = None,
                 headers: dict[str, str] | None = None, status: int | None = None) -> None:
        super().__init__(detail)
        self.slug = slug
        self.status = status if status is not None else PROBLEMS[slug][0]
        self.detail = detail
        self.error = error
        self.retry_after = retry_after
        self.headers = dict(headers or {})
        if retry_after is not None:
            self.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))

    def body(self, instance: str | None = None, request_id: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"type": f"/problems/{self.slug}", "title": PROBLEMS[self.slug][1],
                                "status": self.status, "detail": self.detail}
        if instance is not None:
            body["instance"] = instance
        if self.error is not None:
            body["error"] = self.error
        if request_id is not None:
            body["request_id"] = request_id
        if self.retry_after is not None:
            body["retry_after"] = max(1, math.ceil(self.retry_after))
        return body

    def encode(self, instance: str | None = None, request_id: str | None = None) -> bytes:
        return json.dumps(self.body(instance, request_id), separators=(",", ":")).encode()


def problem_for_error(exc: BaseException) -> Problem:
    """The HTTP answer for an edgecompute error raised while submitting."""
    name = type(exc).__name__
    if isinstance(exc, errors.UnknownAlgorithm):
        return Problem("unknown-algorithm", str(exc), error=name)
    if isinstance(exc, errors.UnknownExecutor):
        return Problem("not-found", str(exc), error=name)
    if isinstance(exc, errors.InfeasibleRequest):
        return Problem("infeasible", str(exc), error=name)
    if isinstance(exc, (errors.InvalidRequest, errors.AmbiguousAlgorithm)):
        return Problem("invalid-request", str(exc), error=name)
    if isinstance(exc, errors.QueueFull):
        return Problem("unavailable", str(exc), error=name, retry_after=1)
    if isinstance(exc, errors.SchedulerClosed):
        return Problem("unavailable", str(exc), error=name, retry_after=5)
    if isinstance(exc, errors.PluginError):
        # the server's fault, not the request's; the reason (a library path, a traceback line) is
        # for the operator's log, not for a remote client
        log.error("a request named an executor whose plugin failed: %s", exc)
        return Problem("internal", f"plugin {exc.plugin!r} failed to load on this server, so it cannot run this "
                       "task (the server's log has the reason)", error=name)
    if isinstance(exc, errors.TaskTimeout):
        return Problem("task-timeout", str(exc), error=name)
    if isinstance(exc, errors.TaskCancelled):
        return Problem("task-cancelled", str(exc), error=name)
    return Problem("task-failed", str(exc), error=name)
