"""Where an executor runs: in the host process, in a worker process, or in another environment.

::

    registry = Registry.discover(placement={
        "cpp": Placement.process(),                              # same environment, own process
        "ml": Placement.process(python="/opt/ml-venv/bin/python"),  # another environment
    })

or in ``edgecompute.toml``::

    [executors.ml]
    placement = "process"
    python = "/opt/ml-venv/bin/python"

A placed executor keeps the same ``Request``/``Response`` and every scheduler feature; a worker that
dies fails its in-flight tasks with ``ExecutorCrashed`` and is restarted (see docs/placement.md).
An executor distribution may run its own work in supervised worker processes through
:class:`WorkerExecutor` (the ``cpp`` executor's ``process`` isolation does).
This module is light: the worker machinery loads when a placed executor is first built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from ..errors import ConfigError

__all__ = ["PLACEMENT_KEYS", "Placement", "WorkerExecutor", "sandbox_unavailable"]

if TYPE_CHECKING:
    from ._proxy import WorkerExecutor

KINDS = ("inprocess", "process", "sandbox", "ray")
#: Keys of an ``[executors.NAME]`` table that belong to the placement, not to the executor.
PLACEMENT_KEYS = frozenset({"placement", "python", "max_crashes", "crash_window", "restart_backoff",
                            "restart_backoff_max", "start_timeout", "ray_address", "ray_temp_dir",
                            "ray_num_cpus", "ray_actor", "ray_custom_resources", "sandbox_roots",
                            "sandbox_writable", "sandbox_network", "sandbox_memory_mb", "sandbox_cpus",
                            "sandbox_env"})


def _paths(value: object) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"placement sandbox paths must be a list of absolute paths, not {value!r}")
    for path in value:
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path or path.rstrip("/") in ("", "/proc",
                                                                                                    "/dev", "/tmp"):
            raise ConfigError(f"placement sandbox path {path!r} must be an absolute path other than /, /proc, "
                              f"/dev and /tmp")
    return tuple(value)


def _environment(value: object) -> Mapping[str, str]:
    if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\0" not in k + v
            for k, v in value.items()):
        raise ConfigError(f"placement sandbox_env must be a table of strings, not {value!r}")
    return dict(value)


def _memory(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 16:
        raise ConfigError(f"placement sandbox_memory_mb must be an integer >= 16, not {value!r}")


def _cpus(instance: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None:
        _positive(instance, attribute, value)


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"placement {attribute.name} must be a number > 0, not {value!r}")


@attrs.frozen
class Placement:
    """How and where one executor runs.

    ``kind`` is ``"inprocess"`` (the default: the executor lives in the host process) or
    ``"process"`` (a worker process; with ``python``, a worker started by that interpreter, in the
    environment it belongs to), ``"sandbox"`` (the same worker, inside a bubblewrap sandbox: see
    :meth:`sandbox`) or ``"ray"``. The supervision policy: a worker is restarted after a crash, first
    at once, then after ``restart_backoff`` seconds doubling up to ``restart_backoff_max``; after
    ``max_crashes`` crashes within ``crash_window`` seconds the circuit opens and the executor
    stays down (its health says why) until the registry is rebuilt.
    """

    kind: str = "inprocess"
    python: str | None = None
    max_crashes: int = attrs.field(default=5, validator=_positive)
    crash_window: float = attrs.field(default=60.0, validator=_positive)
    restart_backoff: float = attrs.field(default=0.05, validator=_positive)
    restart_backoff_max: float = attrs.field(default=5.0, validator=_positive)
    start_timeout: float = attrs.field(default=120.0, validator=_positive)
    #: Ray only: the cluster to join (None: start a local one), where Ray keeps its temporary and
    #: session files (None: a folder of ours under the temporary folder, never the home folder),
    #: the CPUs a local cluster gets, what each actor holds, and custom Ray resources it needs.
    ray_address: str | None = None
    ray_temp_dir: str | None = None
    ray_num_cpus: float | None = None
    ray_actor: Mapping[str, float] = attrs.field(factory=lambda: {"cpu": 1.0})
    ray_custom_resources: Mapping[str, float] = attrs.field(factory=dict)
    #: Sandbox only (see :meth:`sandbox`).
    sandbox_roots: tuple[str, ...] = attrs.field(default=(), converter=_paths)
    sandbox_writable: tuple[str, ...] = attrs.field(default=(), converter=_paths)
    sandbox_network: bool = False
    sandbox_memory_mb: int = attrs.field(default=4096, validator=_memory)
    sandbox_cpus: float | None = attrs.field(default=None, validator=_cpus)
    sandbox_env: Mapping[str, str] = attrs.field(factory=dict, converter=_environment)

    def __attrs_post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"placement must be one of {', '.join(map(repr, KINDS))}, not {self.kind!r}")
        if self.python is not None and (not isinstance(self.python, str) or not self.python):
            raise ConfigError(f"placement python must be a path to an interpreter, not {self.python!r}")
        unknown = set(self.ray_actor) - {"cpu", "memory_mb", "gpu_memory_mb", "gpus"}
        if unknown:
            raise ConfigError(f"placement ray_actor takes cpu, memory_mb, gpu_memory_mb, gpus; "
                              f"not {', '.join(sorted(unknown))}")
        if self.python is not None and self.kind not in ("process", "sandbox"):
            raise ConfigError(f"python={self.python!r} needs placement 'process' or 'sandbox', not {self.kind!r}")
        if not isinstance(self.sandbox_network, bool):
            raise ConfigError(f"placement sandbox_network must be true or false, not {self.sandbox_network!r}")
        if self.kind != "sandbox":
            given = [f.name for f in attrs.fields(Placement) if f.name.startswith("sandbox_")
                     and getattr(self, f.name) != f.default and not (f.name == "sandbox_env" and not self.sandbox_env)]
            if given:
                raise ConfigError(f"{', '.join(given)} need(s) placement 'sandbox', not {self.kind!r}")

    @classmethod
    def inprocess(cls) -> Placement:
        """Run in the host process (the default)."""
        return cls()

    @classmethod
    def process(cls, *, python: str | None = None, **policy: Any) -> Placement:
        """Run in a worker process; with ``python``, in the environment of that interpreter."""
        return cls("process", python, **policy)

    @classmethod
    def sandbox(cls, *, python: str | None = None, roots: tuple[str, ...] | list[str] = (),
                writable: tuple[str, ...] | list[str] = (), network: bool = False, memory_mb: int = 4096,
                cpus: float | None = None, env: Mapping[str, str] | None = None, **policy: Any) -> Placement:
        """Run in a worker process inside a bubblewrap sandbox (Linux; ``apt-get install bubblewrap``).

        The worker sees ``/usr``, its interpreter and environment, and ``roots`` (read-only), and
        ``writable`` (read-write); it has a private ``/tmp``, its own pid, user, ipc and uts
        namespaces, no network unless ``network``, at most ``memory_mb`` of memory (the kernel
        kills it past that) and, with ``cpus``, at most that many CPUs' worth of time. Its
        environment is cleared except ``PATH``, ``HOME=/tmp``, ``LANG`` and ``env``.
        See docs/placement.md.
        """
        return cls("sandbox", python, sandbox_roots=tuple(roots), sandbox_writable=tuple(writable),
                   sandbox_network=network, sandbox_memory_mb=memory_mb, sandbox_cpus=cpus,
                   sandbox_env=dict(env or {}), **policy)

    @classmethod
    def ray(cls, *, address: str | None = None, temp_dir: str | None = None, num_cpus: float | None = None,
            actor: Mapping[str, float] | None = None, custom_resources: Mapping[str, float] | None = None,
            **policy: Any) -> Placement:
        """Run as a Ray actor (needs ``pip install edgecompute[ray]``); see docs/placement.md."""
        return cls("ray", None, ray_address=address, ray_temp_dir=temp_dir, ray_num_cpus=num_cpus,
                   ray_actor=dict(actor or {"cpu": 1.0}), ray_custom_resources=dict(custom_resources or {}),
                   **policy)

    @property
    def in_process(self) -> bool:
        return self.kind == "inprocess"

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], *, where: str = "settings") -> Placement | None:
        """The placement an ``[executors.NAME]`` table asks for, or None when it names none."""
        given = {key: settings[key] for key in PLACEMENT_KEYS if key in settings}
        if not given:
            return None
        kind = given.pop("placement", "process" if "python" in given else "inprocess")
        if not isinstance(kind, str):
            raise ConfigError(f"{where}.placement must be a string, not {kind!r}")
        try:
            return cls(kind, **given)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def sandbox_unavailable() -> str | None:
    """Why placement ``"sandbox"`` cannot start on this machine (bubblewrap missing, namespaces
    refused), or None when it can. Runs ``bwrap`` once and remembers the answer."""
    from ._sandbox import unavailable

    return unavailable()


def __getattr__(name: str) -> Any:
    # the worker machinery (sockets, subprocess, shared memory) loads only when an executor is placed
    if name == "WorkerExecutor":
        from ._proxy import WorkerExecutor

        return WorkerExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
