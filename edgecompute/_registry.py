"""The registry: which executors exist, built on first use, and which one runs an algorithm."""

from __future__ import annotations

import difflib
import inspect
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from . import _atexit
from .errors import AmbiguousAlgorithm, ConfigError, PluginError, UnknownAlgorithm, UnknownExecutor
from .executor import Executor
from .models import Algorithm, Health, HealthStatus
from .placement import PLACEMENT_KEYS, Placement

__all__ = ["ExecutorEntry", "Registry", "Selection"]

if TYPE_CHECKING:
    import pluggy

log = logging.getLogger("edgecompute.registry")

ExecutorFactory = Callable[..., Executor]

#: the keys of an [executors.NAME] table that the core reads (the rest are the executor's)
_CORE_KEYS = frozenset({"enabled", "max_concurrency"})


@attrs.frozen
class Selection:
    """The executor chosen for an algorithm name."""

    executor: Executor
    algorithm: Algorithm

    @property
    def qualified_name(self) -> str:
        return f"{self.executor.name}/{self.algorithm.name}"


@attrs.define(eq=False)
class ExecutorEntry:
    """One registered executor: how to build it, where it came from, and the built instance."""

    name: str
    factory: ExecutorFactory
    source: str = "api"
    settings: Mapping[str, Any] = attrs.field(factory=dict)
    instance: Executor | None = None
    error: PluginError | None = None
    algorithms: dict[str, Algorithm] = attrs.field(factory=dict)

    @property
    def built(self) -> bool:
        return self.instance is not None


_EXECUTOR_MEMBERS = ("name", "version", "algorithms", "requirements", "execute", "health", "aclose")


def _missing_members(candidate: object) -> str:
    """What keeps ``candidate`` from being an Executor, in words."""
    missing = [member for member in _EXECUTOR_MEMBERS if not hasattr(candidate, member)]
    if missing:
        return f"it lacks {', '.join(missing)} of the Executor protocol"
    return "it has every member of the Executor protocol, so check their kinds"


def _factory_name(factory: Any) -> str | None:
    name = getattr(factory, "name", None)
    return name if isinstance(name, str) and name else None


def _accepts_config(factory: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return "config" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _placed(name: str, placement: Placement, settings: Mapping[str, Any], factory: Any) -> ExecutorFactory:
    def build() -> Executor:
        if placement.kind == "ray":
            from .placement.ray import RayExecutor  # ray is imported only here, on first use

            return RayExecutor(name, placement, settings, factory)
        from .placement._proxy import WorkerExecutor  # the worker machinery loads on first use

        return WorkerExecutor(name, placement, settings, factory)

    return build


class Registry:
    """Maps executor names to executors and algorithm names to the executor that runs them.

    Algorithm names are ``executor/algorithm``; a bare ``algorithm`` works when exactly one
    executor offers it (finding that out builds every executor, so prefer qualified names).
    """

    def __init__(self, executors: Iterable[Executor | ExecutorFactory] = (), *,
                 settings: Mapping[str, Mapping[str, Any]] | None = None,
                 placement: Mapping[str, Placement] | None = None) -> None:
        self._entries: dict[str, ExecutorEntry] = {}
        self._settings = {name: dict(value) for name, value in (settings or {}).items()}
        self._placements: dict[str, Placement] = {}
        for name, value in self._settings.items():
            found = Placement.from_settings(value, where=f"executors.{name}")
            if found is not None:
                self._placements[name] = found
        for name, where in (placement or {}).items():
            if not isinstance(where, Placement):
                raise TypeError(f"placement of {name!r} must be a Placement, not {type(where).__name__}")
            self._placements[name] = where
        self._routes: dict[str, Selection] = {}
        self._lock = threading.RLock()
        #: Plugins that failed to load or to register (discovery goes on without them).
        self.problems: list[PluginError] = []
        #: The pluggy manager that discovery used (None for a registry built by hand).
        self.plugin_manager: pluggy.PluginManager | None = None
        for executor in executors:
            self.register(executor)
        self._register_elsewhere()

    @classmethod
    def discover(cls, *, settings: Mapping[str, Mapping[str, Any]] | None = None,
                 placement: Mapping[str, Placement] | None = None) -> Registry:
        """A registry of every executor that installed distributions register.

        ``settings`` maps executor names to their settings (the ``[executors.NAME]`` tables of the
        configuration); by default they are read with ``Config.load()`` (``edgecompute.toml`` and
        ``EDGECOMPUTE_*``), so the file is honoured however the registry is made; pass ``{}`` for
        none. An executor whose settings say ``enabled = false`` is left out; its other keys go to
        its constructor as ``config``.
        ``placement`` says where executors run (default: in this process); an executor placed in
        another environment (``Placement.process(python=...)``) is listed even when this one lacks it.
        """
        from ._plugins import load_entry_points, plugin_manager

        if settings is None:
            from .config import Config

            settings = Config.load().executors
        registry = cls(settings=settings, placement=placement)
        pm = registry.plugin_manager = plugin_manager()
        registry.problems.extend(load_entry_points(pm))
        for impl in pm.hook.register_executors.get_hookimpls():
            plugin = impl.plugin_name

            def register(factory: Any, *, name: str | None = None, _plugin: str = plugin) -> None:
                registry.register(factory, name=name, source=_plugin)

            try:
                impl.function(register=register)
            except Exception as exc:  # noqa: BLE001 - a plugin's bug must not break discovery
                problem = PluginError(plugin, f"register_executors raised {type(exc).__name__}: {exc}")
                problem.__cause__ = exc
                log.warning("%s", problem)
                registry.problems.append(problem)
        for name in sorted(set(settings) - set(registry.names())):
            if settings[name].get("enabled", True) is not False:
                # a misspelt [executors.NAME] would otherwise configure nothing, silently
                close = difflib.get_close_matches(name, registry.names(), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                log.warning("configuration has [executors.%s] but no executor %r is installed%s",
                            name, name, hint)
        return registry

    # -- registration ---------------------------------------------------------------------------

    def register(self, factory: Executor | ExecutorFactory, *, name: str | None = None,
                 source: str = "api", replace: bool = False) -> None:
        """Add an executor: an instance, an executor class, or a zero-argument factory.

        Classes and factories are called on first use. A factory without a ``name`` attribute
        needs ``name=``.
        """
        instance: Executor | None = None
        build: ExecutorFactory
        original = factory
        if not callable(factory) or (not inspect.isclass(factory) and isinstance(factory, Executor)):
            if not isinstance(factory, Executor):
                raise TypeError(f"cannot register {factory!r}: not an executor, class or factory "
                                f"({_missing_members(factory)})")
            instance = factory

            def build() -> Executor:
                assert instance is not None
                return instance
        else:
            build = factory
        name = name or _factory_name(factory)
        if name is None:
            raise TypeError(f"cannot register {factory!r} without a name: pass name='...'")
        if "/" in name:
            raise ValueError(f"executor name {name!r} must not contain '/'")
        settings = self._settings.get(name, {})
        if settings.get("enabled", True) is False:
            log.info("executor %r is disabled by configuration", name)
            return
        placement = self._placements.get(name)
        if placement is not None and not placement.in_process:
            build, instance = _placed(name, placement, settings, original), None
        with self._lock:
            if name in self._entries and self._entries[name].source == "placement":
                replace = True  # the real registration supersedes the stand-in made from placement
            if name in self._entries and not replace:
                existing = self._entries[name]
                problem = PluginError(source, f"executor {name!r} is already registered by {existing.source}")
                self.problems.append(problem)
                log.warning("%s", problem)
                return
            entry = ExecutorEntry(name, build, source, settings)
            self._entries[name] = entry
            self._routes.clear()
            if instance is not None:
                self._adopt(entry, instance)
                _atexit.close_at_exit(self)

    def _register_elsewhere(self) -> None:
        # executors placed in another environment need not be installed here: the worker there
        # reports their algorithms. Registered under source "placement", replaced by a real one.
        for name, placement in self._placements.items():
            if (placement.python is not None or placement.kind == "ray") and name not in self._entries:
                self.register(_placed(name, placement, self._settings.get(name, {}), None),
                              name=name, source="placement")

    def placement(self, name: str) -> Placement:
        """Where the executor called ``name`` runs."""
        return self._placements.get(name, Placement())

    # -- lookup ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._entries)

    def executors(self) -> list[ExecutorEntry]:
        """Every registered executor, built or not, in name order."""
        return [self._entries[name] for name in sorted(self._entries)]

    def get(self, name: str) -> Executor:
        """The executor called ``name``, built now if it was not yet."""
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownExecutor(name, self._entries)
        return self._build(entry)

    def select(self, algorithm: str) -> Selection:
        """The executor and algorithm that ``algorithm`` names."""
        route = self._routes.get(algorithm)
        if route is not None:
            return route
        with self._lock:
            route = self._select(algorithm)
            self._routes[algorithm] = route
            return route

    def algorithms(self) -> dict[str, Algorithm]:
        """Every algorithm of every executor that builds, by qualified name."""
        found: dict[str, Algorithm] = {}
        for entry in self.executors():
            try:
                self._build(entry)
            except PluginError:
                continue
            for algorithm in entry.algorithms.values():
                found[f"{entry.name}/{algorithm.name}"] = algorithm
        return found

    def refresh(self, name: str | None = None) -> None:
        """Re-read the algorithms of built executors (after an executor gained algorithms)."""
        with self._lock:
            self._routes.clear()
            for entry in self._entries.values():
                if entry.instance is not None and name in (None, entry.name):
                    self._adopt(entry, entry.instance)

    def _select(self, algorithm: str) -> Selection:
        executor_name, slash, bare = algorithm.partition("/")
        if slash:
            entry = self._entries.get(executor_name)
            if entry is None or not bare:
                raise UnknownAlgorithm(algorithm, self._known())
            executor = self._build(entry)
            found = entry.algorithms.get(bare)
            if found is None:  # executors may gain algorithms at run time (plugins, models)
                self._adopt(entry, executor)
                found = entry.algorithms.get(bare)
            if found is None:
                raise UnknownAlgorithm(algorithm, self._known())
            return Selection(executor, found)
        candidates: list[tuple[ExecutorEntry, Algorithm]] = []
        for entry in self._entries.values():
            try:
                self._build(entry)
            except PluginError:
                continue
            if algorithm in entry.algorithms:
                candidates.append((entry, entry.algorithms[algorithm]))
        if not candidates:
            raise UnknownAlgorithm(algorithm, self._known())
        if len(candidates) > 1:
            raise AmbiguousAlgorithm(algorithm, (f"{e.name}/{a.name}" for e, a in candidates))
        entry, found = candidates[0]
        assert entry.instance is not None
        return Selection(entry.instance, found)

    def _known(self) -> list[str]:
        return list(self.algorithms())

    def _build(self, entry: ExecutorEntry) -> Executor:
        built = entry.instance
        if built is not None:
            return built
        with self._lock:
            if entry.instance is not None:  # another thread built it while we waited
                return entry.instance
            if entry.error is not None:
                raise entry.error
            try:
                factory = entry.factory
                config = {k: v for k, v in entry.settings.items() if k not in PLACEMENT_KEYS}
                accepts = _accepts_config(factory)
                own = sorted(set(config) - _CORE_KEYS)
                if own and not accepts:
                    # the keys would reach nothing: a typo, or settings for a constructor without any
                    raise ConfigError(f"[executors.{entry.name}]: unknown key(s) {', '.join(own)}; executor "
                                      f"{entry.name!r} takes no settings of its own (no `config` parameter); "
                                      f"valid keys: {', '.join(sorted(_CORE_KEYS))} and the placement keys")
                kwargs = {"config": config} if config and accepts else {}
                executor = factory(**kwargs)
                if not isinstance(executor, Executor):
                    raise TypeError(f"{factory!r} returned {type(executor).__name__}, which is not an Executor "
                                    f"({_missing_members(executor)})")
                if executor.name != entry.name:
                    raise ValueError(f"executor registered as {entry.name!r} calls itself {executor.name!r}")
                self._adopt(entry, executor)
                _atexit.close_at_exit(self)
            except Exception as exc:
                entry.error = PluginError(entry.source, f"executor {entry.name!r} failed to build: "
                                                        f"{type(exc).__name__}: {exc}")
                entry.error.__cause__ = exc
                log.warning("%s", entry.error)
                raise entry.error from exc
            return executor

    @staticmethod
    def _adopt(entry: ExecutorEntry, executor: Executor) -> None:
        algorithms = {}
        listed: Iterable[object] = executor.algorithms()
        for algorithm in listed:
            if not isinstance(algorithm, Algorithm):
                raise TypeError(f"executor {entry.name!r} listed {algorithm!r}, not an Algorithm")
            algorithms[algorithm.name] = algorithm
        entry.algorithms = algorithms
        entry.instance = executor

    # -- lifecycle ------------------------------------------------------------------------------

    async def health(self) -> dict[str, Health]:
        """Each executor's health; one that cannot build or answer is reported DOWN."""
        report: dict[str, Health] = {}
        for entry in self.executors():
            try:
                report[entry.name] = await self._build(entry).health()
            except Exception as exc:  # noqa: BLE001 - health must answer, whatever the executor does
                report[entry.name] = Health(HealthStatus.DOWN, f"{type(exc).__name__}: {exc}")
        return report

    async def aclose(self) -> None:
        """Close every executor that was built, each once, even if some fail to close."""
        _atexit.closed(self)
        errors: list[Exception] = []
        for entry in self.executors():
            instance, entry.instance = entry.instance, None
            if instance is None:
                continue
            try:
                await instance.aclose()
            except Exception as exc:  # noqa: BLE001 - close the others first, then report
                errors.append(exc)
        self._routes.clear()
        if errors:
            raise ExceptionGroup("some executors failed to close", errors)
