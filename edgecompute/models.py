"""Small frozen value classes that cross the public API."""

from __future__ import annotations

import collections
import enum
import math
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs

__all__ = [
    "Algorithm",
    "Health",
    "HealthStatus",
    "Request",
    "Resources",
    "Response",
    "TaskEvent",
    "TaskState",
]


def _non_negative(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise TypeError(f"{attribute.name} must be a number, not {type(value).__name__}")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name} must be a finite number >= 0, not {value!r}")


@attrs.frozen
class Resources:
    """What a task needs, or what a pool holds.

    ``cpu`` counts cores (fractions allowed), ``memory_mb`` host memory. ``gpus`` counts devices and
    ``gpu_memory_mb`` is the memory needed *on each* of them; a task that asks for GPU memory without
    a device count needs one device. In a capacity, ``gpus`` devices each hold ``gpu_memory_mb``.
    """

    cpu: float = attrs.field(default=0.0, validator=_non_negative)
    memory_mb: float = attrs.field(default=0.0, validator=_non_negative)
    gpu_memory_mb: float = attrs.field(default=0.0, validator=_non_negative)
    gpus: int = attrs.field(default=0, validator=_non_negative)

    @property
    def devices_needed(self) -> int:
        """GPU devices a task with these needs must be given."""
        if self.gpus:
            return int(self.gpus)
        return 1 if self.gpu_memory_mb > 0 else 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.cpu + other.cpu,
            self.memory_mb + other.memory_mb,
            self.gpu_memory_mb + other.gpu_memory_mb,
            self.gpus + other.gpus,
        )

    def __sub__(self, other: Resources) -> Resources:
        return Resources(
            max(0.0, self.cpu - other.cpu),
            max(0.0, self.memory_mb - other.memory_mb),
            max(0.0, self.gpu_memory_mb - other.gpu_memory_mb),
            max(0, self.gpus - other.gpus),
        )

    def fits(self, capacity: Resources) -> bool:
        """Whether a task needing ``self`` could ever run on a pool of ``capacity``."""
        if self.cpu > capacity.cpu or self.memory_mb > capacity.memory_mb:
            return False
        devices = self.devices_needed
        return devices == 0 or (devices <= capacity.gpus and self.gpu_memory_mb <= capacity.gpu_memory_mb)

    def __str__(self) -> str:
        parts = [f"cpu={self.cpu:g}", f"memory_mb={self.memory_mb:g}"]
        if self.gpus or self.gpu_memory_mb:
            parts += [f"gpus={self.devices_needed}", f"gpu_memory_mb={self.gpu_memory_mb:g}"]
        return ", ".join(parts)


DEFAULT_RESOURCES = Resources(cpu=1.0)
NO_RESOURCES = Resources()
#: Shared read-only default for mapping fields, so an empty request allocates nothing.
_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _name(instance: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not isinstance(value, str) or not value or value.isspace():
        raise ValueError(f"{attribute.name} must be a non-empty string, not {value!r}")


@attrs.frozen
class Algorithm:
    """One algorithm an executor offers, with the resources a task of it needs by default."""

    name: str = attrs.field(validator=_name)
    description: str = ""
    resources: Resources = attrs.field(
        default=DEFAULT_RESOURCES, validator=attrs.validators.instance_of(Resources)
    )
    #: False when the algorithm may only run one task at a time in a process.
    thread_safe: bool = True

    @name.validator
    def _no_slash(self, attribute: attrs.Attribute[str], value: str) -> None:
        if "/" in value:
            raise ValueError(f"algorithm name {value!r} must not contain '/'")


class TaskState(enum.Enum):
    """Where a task is in its life. The last four are terminal: a task reaches exactly one."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED, TaskState.TIMED_OUT})


# Task ids are capabilities in the gateway (a client that knows one may ask for it), so they come
# from the OS's CSPRNG: a seeded Mersenne Twister is predicted from 156 of its ids. One getrandom
# call fills a pool of 256 ids (about 0.2 us an id instead of 0.7 us for secrets.token_hex(16)).
# deque appends and pops are atomic, so threads may take ids at once; a forked child empties the
# pool, or parent and child would hand out the same ids.
_ID_BATCH = 256
_id_pool: collections.deque[str] = collections.deque()
os.register_at_fork(after_in_child=_id_pool.clear)


def _new_id() -> str:
    try:
        return _id_pool.popleft()
    except IndexError:
        digits = os.urandom(16 * _ID_BATCH).hex()
        _id_pool.extend([digits[i:i + 32] for i in range(0, len(digits), 32)])
        return _id_pool.popleft()


def _mapping(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not _EMPTY and type(value) is not dict and not isinstance(value, Mapping):
        raise TypeError(f"{attribute.name} must be a mapping, not {type(value).__name__}")


def _optional_timeout(instance: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is None:
        return
    if type(value) is bool or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"timeout must be a number of seconds > 0 or None, not {value!r}")


def _optional_resources(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, Resources):
        raise TypeError(f"resources must be a Resources or None, not {type(value).__name__}")


def _int(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{attribute.name} must be an int, not {value!r}")


def _retries(instance: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None:
        _int(instance, attribute, value)
        if value < 0:
            raise ValueError(f"retries must be >= 0, not {value}")


#: the default of Request.id: a fresh id
_AUTO_ID: Any = object()


@attrs.frozen(eq=False, init=False)
class Request:
    """A unit of work: run ``algorithm`` on ``inputs`` with ``params``.

    ``algorithm`` is ``"executor/algorithm"`` or a bare algorithm name that exactly one executor
    offers. Higher ``priority`` runs first. ``timeout`` (seconds) bounds queue time plus run time.
    ``resources`` overrides what the executor says the task needs. ``retries`` overrides the
    scheduler's retry count for errors marked retryable (``None``: use the scheduler's default).
    """

    algorithm: str
    inputs: Any = None
    params: Mapping[str, Any] = _EMPTY
    priority: int = 0
    timeout: float | None = None
    resources: Resources | None = None
    metadata: Mapping[str, Any] = _EMPTY
    retries: int | None = None
    id: str = attrs.field(factory=_new_id)

    # A hand-written __init__: requests are made on the hot path, and attrs' generated one sets
    # each slot through a generic object.__setattr__ (the frozen class forbids plain assignment),
    # which costs about twice what the slots' own descriptors do. One check of the common case
    # (plain types, defaults) instead of a validator per field.
    def __init__(self, algorithm: str, inputs: Any = None, params: Mapping[str, Any] = _EMPTY, priority: int = 0,
                 timeout: float | None = None, resources: Resources | None = None,
                 metadata: Mapping[str, Any] = _EMPTY, retries: int | None = None, id: str = _AUTO_ID) -> None:
        field = _REQUEST_FIELDS
        if type(algorithm) is not str or not algorithm or algorithm.isspace():
            _name(self, field.algorithm, algorithm)
        if params is not _EMPTY:
            _mapping(self, field.params, params)
        if type(priority) is not int:
            _int(self, field.priority, priority)
        if timeout is not None:
            _optional_timeout(self, field.timeout, timeout)
        if resources is not None:
            _optional_resources(self, field.resources, resources)
        if metadata is not _EMPTY:
            _mapping(self, field.metadata, metadata)
        if retries is not None:
            _retries(self, field.retries, retries)
        if id is _AUTO_ID:
            id = _new_id()
        elif type(id) is not str or not id:
            _name(self, field.id, id)
        _set_algorithm(self, algorithm)
        _set_inputs(self, inputs)
        _set_params(self, params)
        _set_priority(self, priority)
        _set_timeout(self, timeout)
        _set_resources(self, resources)
        _set_metadata(self, metadata)
        _set_retries(self, retries)
        _set_id(self, id)


_REQUEST_FIELDS = attrs.fields(Request)
(_set_algorithm, _set_inputs, _set_params, _set_priority, _set_timeout, _set_resources, _set_metadata, _set_retries,
 _set_id) = (Request.__dict__[field.name].__set__ for field in _REQUEST_FIELDS)


@attrs.frozen(eq=False, init=False)
class Response:
    """What a task produced. The scheduler fills in ``executor`` and ``timings``.

    ``timings`` holds seconds: ``queued`` (waiting for admission), ``run`` (inside the executor),
    ``total``, plus anything the executor adds (e.g. ``load``).
    """

    outputs: Any = None
    executor: str = ""
    timings: Mapping[str, float] = attrs.field(default=_EMPTY)

    def __init__(self, outputs: Any = None, executor: str = "", timings: Mapping[str, float] = _EMPTY) -> None:
        # hand-written for speed, like Request's: one per task, and two on the scheduler's path
        _set_outputs(self, outputs)
        _set_executor(self, executor)
        _set_timings(self, timings)


_set_outputs, _set_executor, _set_timings = (Response.__dict__[field.name].__set__ for field in attrs.fields(Response))


class HealthStatus(enum.Enum):
    OK = "ok"
    DEGRADED = "degraded"
    DOWN = "down"


@attrs.frozen
class Health:
    """An executor's answer to ``health()``; ``details`` is free-form and JSON-friendly."""

    status: HealthStatus = HealthStatus.OK
    message: str = ""
    details: Mapping[str, Any] = attrs.field(default=_EMPTY)

    @property
    def ok(self) -> bool:
        return self.status is HealthStatus.OK


@attrs.frozen
class TaskEvent:
    """A change in a task's life, delivered to scheduler observers.

    ``kind`` is one of ``submitted``, ``started``, ``retrying``, ``progress``, or the terminal state's
    value (``succeeded``, ``failed``, ``cancelled``, ``timed_out``).
    """

    kind: str
    task_id: str
    algorithm: str
    executor: str
    state: TaskState
    time: float
    error: BaseException | None = None
    progress: float | None = None
