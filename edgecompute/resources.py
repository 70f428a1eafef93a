"""The capacity pool the scheduler admits tasks against.

Amounts are kept as integers (milli-cores, kilobytes) so that admitting and releasing fractional
requests many times never drifts: every reservation comes back exactly.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any, NamedTuple, TypedDict

import attrs

from .models import Resources

__all__ = ["Allocation", "Capacity", "ResourcePool", "capacity_with", "machine_capacity", "resolve_capacity"]


class Capacity(TypedDict, total=False):
    """Some fields of a capacity: the ``[capacity]`` table, or ``Scheduler(capacity={...})``.

    The fields given replace the machine's (or the configuration's); the others keep theirs.
    """

    cpu: float
    memory_mb: float
    gpus: int
    gpu_memory_mb: float


#: the keys a capacity table may name, in the order the docs list them
CAPACITY_KEYS: tuple[str, ...] = ("cpu", "memory_mb", "gpus", "gpu_memory_mb")


def machine_capacity() -> Resources:
    """This machine's usable cores and physical memory; GPUs only when configured."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        memory_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (AttributeError, ValueError, OSError):
        memory_mb = 1024.0
    return Resources(cpu=float(cpus), memory_mb=float(int(memory_mb)))


def capacity_with(given: Mapping[str, Any], base: Resources | None = None) -> Resources:
    """``base`` (default: :func:`machine_capacity`) with the fields that ``given`` names replaced.

    Raises ``ValueError`` naming an unknown key (with the close match and the valid keys) and
    ``TypeError``/``ValueError`` for a bad value, such as a ``gpus`` that is not a whole number.
    """
    unknown = sorted(set(given) - set(CAPACITY_KEYS))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), CAPACITY_KEYS, n=1)
            hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
        raise ValueError(f"unknown key(s) {', '.join(hints)}; valid keys: {', '.join(CAPACITY_KEYS)}")
    gpus = given.get("gpus", 0)
    if not isinstance(gpus, int) or isinstance(gpus, bool):
        # a device count: 1.5 devices is a typo, not a capacity ([0] * 1.5 fails much later)
        raise TypeError(f"gpus must be a whole number of devices, not {gpus!r}")
    return attrs.evolve(machine_capacity() if base is None else base, **given)


def resolve_capacity(argument: Resources | Mapping[str, Any] | None, base: Resources) -> Resources:
    """The capacity a ``capacity=`` argument means: a :class:`Resources` exactly (its unset fields
    are 0), a mapping (:class:`Capacity`) as the fields it names over ``base``, None as ``base``."""
    if argument is None:
        return base
    if isinstance(argument, Resources):
        return argument
    if isinstance(argument, Mapping):
        return capacity_with(argument, base)
    raise TypeError(f"capacity must be a Resources or a mapping of its fields, not {type(argument).__name__}")


def _milli(value: float) -> int:
    return round(value * 1000)


class Allocation(NamedTuple):
    """What one admitted task holds; ``devices`` are the GPU indices it was given.

    A named tuple rather than a frozen attrs class: one is built per admitted task, and a tuple
    is built several times faster.
    """

    cpu: int
    memory: int
    gpu_memory: tuple[int, ...]
    devices: tuple[int, ...]


_NOTHING = Allocation(0, 0, (), ())


class ResourcePool:
    """Tracks what is free. Not thread-safe: only the scheduler's loop touches it."""

    def __init__(self, capacity: Resources) -> None:
        self.capacity = capacity
        self._cpu = _milli(capacity.cpu)
        self._memory = _milli(capacity.memory_mb)
        device_memory = _milli(capacity.gpu_memory_mb)
        self._device_total = device_memory
        self._gpu_free = [device_memory] * capacity.gpus
        self._cpu_free = self._cpu
        self._memory_free = self._memory
        # executors mostly hand back the same Resources object: convert it once, and hand out one
        # Allocation for it while it needs no devices (a named tuple, immutable: tasks can share it;
        # building one per task cost more than the rest of try_acquire)
        self._last_need: Resources | None = None
        self._last_allocation = _NOTHING
        self._last_count = 0

    def feasible(self, need: Resources) -> bool:
        """Whether ``need`` could ever be admitted (when nothing else runs)."""
        return need.fits(self.capacity)

    def fits(self, need: Resources) -> bool:
        """Whether ``need`` would fit right now: :meth:`try_acquire`'s answer, taking nothing."""
        if need is self._last_need and not self._last_count:
            allocation = self._last_allocation
            return allocation.cpu <= self._cpu_free and allocation.memory <= self._memory_free
        return not self.short_of(need)

    def try_acquire(self, need: Resources) -> Allocation | None:
        """Reserve ``need`` now, or return None when it does not fit at the moment."""
        if need is self._last_need:
            allocation, count = self._last_allocation, self._last_count
        else:
            if not (need.cpu or need.memory_mb or need.gpus or need.gpu_memory_mb):
                return _NOTHING
            allocation = Allocation(_milli(need.cpu), _milli(need.memory_mb), (), ())
            count = need.devices_needed
            self._last_need, self._last_allocation, self._last_count = need, allocation, count
        cpu, memory = allocation.cpu, allocation.memory
        if cpu > self._cpu_free or memory > self._memory_free:
            return None
        if count:
            # gpus without gpu_memory_mb means whole devices
            want = _milli(need.gpu_memory_mb) if need.gpu_memory_mb else self._device_total
            # best fit: the fullest devices that still have room, leaving big holes for big tasks
            fitting = sorted((free, index) for index, free in enumerate(self._gpu_free) if free >= want)
            if len(fitting) < count:
                return None
            devices = tuple(sorted(index for _, index in fitting[:count]))
            for index in devices:
                self._gpu_free[index] -= want
            allocation = Allocation(cpu, memory, (want,) * count, devices)
        self._cpu_free -= cpu
        self._memory_free -= memory
        return allocation

    def release(self, allocation: Allocation) -> None:
        if allocation is _NOTHING:
            return
        self._cpu_free += allocation.cpu
        self._memory_free += allocation.memory
        if allocation.devices:
            for index, amount in zip(allocation.devices, allocation.gpu_memory, strict=True):
                self._gpu_free[index] += amount

    def short_of(self, need: Resources) -> frozenset[str]:
        """The dimensions in which ``need`` does not fit right now."""
        short = set()
        if _milli(need.cpu) > self._cpu_free:
            short.add("cpu")
        if _milli(need.memory_mb) > self._memory_free:
            short.add("memory")
        count = need.devices_needed
        if count:
            want = _milli(need.gpu_memory_mb) if need.gpu_memory_mb else self._device_total
            if sum(1 for free in self._gpu_free if free >= want) < count:
                short.add("gpu")
        return frozenset(short)

    @property
    def in_use(self) -> Resources:
        gpu_used = [self._device_total - free for free in self._gpu_free]
        return Resources(
            cpu=(self._cpu - self._cpu_free) / 1000,
            memory_mb=(self._memory - self._memory_free) / 1000,
            gpu_memory_mb=max(gpu_used, default=0) / 1000,
            gpus=sum(1 for used in gpu_used if used),
        )

    @property
    def idle(self) -> bool:
        """True when every reservation has come back."""
        return (
            self._cpu_free == self._cpu
            and self._memory_free == self._memory
            and all(free == self._device_total for free in self._gpu_free)
        )
