"""The registry: docs/plugins.md ("The protocol": names, versions, algorithms) and
docs/getting-started.md ("Run something": bare names when unique, errors naming candidates)."""

from __future__ import annotations

import pytest

from edgecompute import Algorithm, FunctionExecutor, Registry, Resources
from edgecompute.errors import AmbiguousAlgorithm, PluginError, UnknownAlgorithm, UnknownExecutor

from .helpers import Controlled

pytestmark = pytest.mark.anyio


def test_register_class_builds_lazily_once() -> None:
    built = []

    class Lazy(Controlled):
        name = "lazy"

        def __init__(self) -> None:
            built.append(1)
            super().__init__()

    registry = Registry()
    registry.register(Lazy)
    assert built == []
    assert registry.names() == ["lazy"]
    assert not registry.executors()[0].built
    executor = registry.get("lazy")
    assert registry.get("lazy") is executor
    assert built == [1]


def test_factory_function_needs_a_name() -> None:
    registry = Registry()
    with pytest.raises(TypeError, match="name="):
        registry.register(lambda: Controlled())
    registry.register(lambda: Controlled(), name="ctl")
    assert registry.get("ctl").name == "ctl"


def test_factory_that_returns_a_different_name_is_reported() -> None:
    registry = Registry()
    registry.register(lambda: Controlled(), name="other")
    with pytest.raises(PluginError, match="registered as 'other' calls itself 'ctl'"):
        registry.get("other")


def test_settings_reach_factories_that_take_config() -> None:
    seen = {}

    class Configurable(Controlled):
        def __init__(self, config: dict | None = None) -> None:
            seen.update(config or {})
            super().__init__()

    registry = Registry(settings={"ctl": {"isolation": "process", "max_concurrency": 2}})
    registry.register(Configurable)
    registry.get("ctl")
    assert seen == {"isolation": "process", "max_concurrency": 2}


def test_disabled_executor_is_not_registered() -> None:
    registry = Registry([Controlled()], settings={"ctl": {"enabled": False}})
    assert registry.names() == []


def test_duplicate_names_are_reported_not_replaced() -> None:
    first = Controlled()
    registry = Registry([first])
    registry.register(Controlled(), source="another plugin")
    assert registry.get("ctl") is first
    assert "already registered" in str(registry.problems[0])


def test_select_qualified_bare_unknown_and_ambiguous() -> None:
    app = FunctionExecutor("app")
    app.add(lambda x: x, name="echo")
    app.add(lambda x: x, name="only_app")
    registry = Registry([Controlled(), app])
    selection = registry.select("ctl/echo")
    assert selection.qualified_name == "ctl/echo"
    assert registry.select("only_app").qualified_name == "app/only_app"
    with pytest.raises(AmbiguousAlgorithm) as ambiguous:
        registry.select("echo")
    assert ambiguous.value.candidates == ["app/echo", "ctl/echo"]
    with pytest.raises(UnknownAlgorithm) as unknown:
        registry.select("nope/echo")
    assert "app/only_app" in unknown.value.known
    with pytest.raises(UnknownAlgorithm, match="did you mean 'app/only_app'"):
        registry.select("app/only_ap")
    with pytest.raises(UnknownExecutor, match="known executors: app, ctl"):
        registry.get("nope")


def test_executors_may_gain_algorithms_at_run_time() -> None:
    app = FunctionExecutor("app")
    registry = Registry([app])
    with pytest.raises(UnknownAlgorithm):
        registry.select("app/late")
    app.add(lambda x: x, name="late")
    assert registry.select("app/late").algorithm.name == "late"


def test_registering_a_non_executor_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="not an executor"):
        Registry([42])  # type: ignore[list-item]


def test_algorithm_validation() -> None:
    with pytest.raises(ValueError, match="must not contain '/'"):
        Algorithm("a/b")
    with pytest.raises(ValueError, match="non-empty"):
        Algorithm(" ")
    with pytest.raises(TypeError):
        Algorithm("x", resources={"cpu": 1})  # type: ignore[arg-type]
    assert Algorithm("x").resources == Resources(cpu=1)


async def test_health_reports_broken_executors_as_down_and_close_closes_built_ones() -> None:
    def broken() -> Controlled:
        raise OSError("missing library")

    ctl = Controlled()
    registry = Registry([ctl])
    registry.register(broken, name="broken")
    health = await registry.health()
    assert health["ctl"].ok
    assert health["broken"].status.value == "down"
    assert "missing library" in health["broken"].message
    await registry.aclose()
    assert ctl.closed
