"""The keyword options of ``Scheduler.run``/``submit`` and ``Runtime.run``/``submit``/``map``.

Both faces take a :class:`~edgecompute.models.Request`'s fields as keywords; this module is the one
list of them and the one check that names a misspelt one.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from .errors import InvalidRequest

__all__ = ["REQUEST_OPTIONS", "given", "reject_unknown"]

REQUEST_OPTIONS = ("params", "priority", "timeout", "resources", "metadata", "retries", "id")


def reject_unknown(unknown: Mapping[str, Any]) -> None:
    """Raise for keyword arguments that are no :class:`Request` field.

    The public signatures type them ``**unknown: Never``, so that a type checker flags a misspelt
    option by name; at run time this names it too, with the close match.
    """
    if unknown:
        hints = []
        for name in sorted(unknown):
            close = difflib.get_close_matches(name, REQUEST_OPTIONS, n=1)
            hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
        raise InvalidRequest(f"unknown option(s) {', '.join(hints)}; valid: {', '.join(sorted(REQUEST_OPTIONS))}")


def given(**options: Any) -> dict[str, Any]:
    """The options that were given (not None)."""
    return {name: value for name, value in options.items() if value is not None}
