"""Loads plugins from the ``edgecompute`` entry-point group into a pluggy plugin manager.

Each entry point is loaded on its own, so one broken plugin is reported (as a ``PluginError``)
instead of breaking discovery for the others.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterable

import pluggy

from . import hookspecs
from .errors import PluginError

__all__ = ["ENTRY_POINT_GROUP", "load_entry_points", "plugin_manager"]

ENTRY_POINT_GROUP = "edgecompute"

log = logging.getLogger("edgecompute.plugins")


def plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("edgecompute")
    pm.add_hookspecs(hookspecs)
    return pm


def _entry_points() -> Iterable[importlib.metadata.EntryPoint]:
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def _describe(ep: importlib.metadata.EntryPoint) -> str:
    dist = ep.dist.name if ep.dist is not None else "?"
    return f"{ep.name} ({dist})"


def load_entry_points(pm: pluggy.PluginManager) -> list[PluginError]:
    """Register every installed plugin with ``pm``; return the ones that failed to load."""
    problems: list[PluginError] = []
    seen: set[str] = set()
    for ep in _entry_points():
        if ep.name in seen or pm.has_plugin(ep.name):
            continue  # the same distribution visible twice on sys.path
        seen.add(ep.name)
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # noqa: BLE001 - any failure in third-party code is reported
            problem = PluginError(_describe(ep), f"could not be loaded: {type(exc).__name__}: {exc}")
            problem.__cause__ = exc
            log.warning("%s", problem)
            problems.append(problem)
    return problems
