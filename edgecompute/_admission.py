"""Admission: which waiting task starts next. No event loop here: the scheduler calls in when
something changes, and this module starts tasks through the ``start`` function it was given.

The rules (docs/scheduler.md, "Order" and "Admission"):

- Order. Higher priority first, equal priorities in submission order. Waiting raises a task's
  effective priority by one level every ``aging`` seconds, so the queue is one heap keyed by
  ``submitted_at - priority * aging``: the boost is linear in waiting time, two queued tasks never
  swap places, and a plain heap stays correct. A retried task keeps its original place.
- Resources. The task at the front starts as soon as its needs fit what is free.
- Backfill. When it does not fit, up to ``BACKFILL_WINDOW`` tasks further are looked at for ones
  that need none of the resources the tasks ahead of them are short of. A CPU-only task may pass a
  task waiting for GPU memory; a task that needs CPU may not pass one waiting for CPU, so big tasks
  are not starved by small ones.
- Limits. A task whose executor runs its ``max_concurrency`` tasks, or whose algorithm is not
  thread-safe and already runs, steps aside (it is parked) without blocking tasks of other
  executors, and keeps its place: a freed slot puts the first parked task still queued back, and
  so does a limited task that ends while queued (it may be the one put back).
- Settled between events. Whatever could let a waiting task start (a submission, a release, a
  queued task ending, a freed slot) scans at once, so between events no task that admission may
  reach could start. That is what lets a submission that changes nothing skip the scan.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

from .models import Resources, TaskState
from .resources import Allocation, ResourcePool

__all__ = ["BACKFILL_WINDOW", "Admission"]

BACKFILL_WINDOW = 32
_QUEUED = TaskState.QUEUED
_heappush = heapq.heappush


class _Waiting(Protocol):
    state: TaskState
    needs: Resources
    limits: tuple[str, ...]


T = TypeVar("T", bound=_Waiting)

# A place in the queue is one int: the order key in nanoseconds, then a sequence number in the low
# 40 bits, unique, so two places never tie. The heap holds these ints and ``tasks`` maps them to
# their tasks: a tuple per entry was one more object per queued task for the cyclic GC to walk
# (measured: docs/performance.md, the scheduler's queued burst).
_SEQ_BITS = 40


class Admission(Generic[T]):
    """The queue of tasks waiting to start, the slots their concurrency limits hold, and the rules
    that pick which start (this module's docstring)."""

    def __init__(self, pool: ResourcePool, aging: float, limits: dict[str, int],
                 start: Callable[[T, Allocation], None]) -> None:
        self.pool = pool
        self.aging = aging
        #: ``max_concurrency`` per executor name; a key not here (a non-thread-safe algorithm's
        #: qualified name) allows one task at a time
        self.limits = limits
        self._start = start
        self.heap: list[int] = []
        #: place -> task, for every place in the heap or parked (those of ended tasks included)
        self.tasks: dict[int, T] = {}
        # id(needs) -> how many heap entries ask for that Resources object (stale ones included):
        # a scan stops once every kind left has failed to fit (see admit)
        self.kinds: dict[int, int] = {}
        self.queued = 0  # tasks waiting in the heap or parked; entries of ended tasks not counted
        self.running: dict[str, int] = collections.defaultdict(int)  # slots held per limit key
        self.parked: dict[str, collections.deque[int]] = {}
        self.dispatching = False
        self._seq = 0

    # -- the queue ----------------------------------------------------------------------------

    def key(self, submitted_at: float, priority: int) -> float:
        return submitted_at - priority * self.aging

    def queue(self, task: T, key: float) -> bool:
        """Put a task in the queue at order ``key``; return whether admission may have changed
        (scan then).

        Admission is settled for the tasks that wait. A task that does not fit leaves it so if it
        competes with the task at the front (see held_back): scanning the queue again would then
        only cost time (~30 us per submission with a backlog).
        """
        self._seq = seq = self._seq + 1
        self.queued += 1
        place = (int(key * 1e9) << _SEQ_BITS) + seq
        tasks = self.tasks
        tasks[place] = task
        heap = self.heap
        _heappush(heap, place)
        needs = task.needs
        kinds = self.kinds
        kind = id(needs)
        kinds[kind] = kinds.get(kind, 0) + 1
        if task.limits:
            return True
        front = tasks[heap[0]]
        if front is task or front.state is not _QUEUED or (front.limits and self.at_limit(front.limits)):
            return True
        front_needs = front.needs
        if front_needs is needs:  # the usual backlog: the same needs, so they do not fit either
            return self.pool.fits(needs)
        short = self.pool.short_of(needs)
        return not (short and self.held_back(needs, short, front_needs))

    def ended(self, limits: tuple[str, ...] = ()) -> None:
        """A queued task ended (cancelled, timed out): its entry goes stale, dropped when reached.

        A task with limits may have been the parked task a freed slot put back: its turn passes to
        the next parked task still queued, or that one would wait for a slot nobody holds.
        """
        self.queued -= 1
        for key in limits:
            if self.running[key] < self._limit_of(key):
                self._unpark(key)

    def waiting(self) -> Iterator[T]:
        """The tasks in the queue or parked, stale entries included, in no particular order."""
        yield from list(self.tasks.values())

    def _push(self, place: int) -> None:
        heapq.heappush(self.heap, place)
        kind = id(self.tasks[place].needs)
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def _pop(self) -> int:
        place = heapq.heappop(self.heap)
        kind = id(self.tasks[place].needs)
        left = self.kinds[kind] - 1
        if left:
            self.kinds[kind] = left
        else:
            del self.kinds[kind]
        return place

    # -- admission ----------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Start what may start now."""
        if self.dispatching:
            return  # a start that ends a task at once (an observer cancels it) scans again below
        self.dispatching = True
        try:
            self.admit()
        finally:
            self.dispatching = False

    def admit(self) -> None:
        heap = self.heap
        tasks = self.tasks
        pool = self.pool
        kinds = self.kinds
        skipped: list[int] | None = None
        blocked: frozenset[str] | set[str] = frozenset()
        # the needs (by identity) found unable to start in this scan: they stay unable, as the
        # pool only shrinks and ``blocked`` only grows while it runs
        failed: set[int] | None = None
        while heap:
            place = heap[0]
            task = tasks[place]
            if task.state is not _QUEUED:
                self._pop()  # ended while queued (cancelled, timed out); already counted
                del tasks[place]
                continue
            needs, limits = task.needs, task.limits
            if limits and self.at_limit(limits):
                self._pop()
                self.parked.setdefault(limits[0] if len(limits) == 1 else self._limiting_key(limits),
                                       collections.deque()).append(place)
                continue
            competes = bool(blocked) and self.competes(needs, blocked)
            if not competes:
                allocation = pool.try_acquire(needs)
                if allocation is not None:
                    heapq.heappop(heap)  # _pop, inline: once per queued task
                    del tasks[place]
                    kind = id(needs)
                    left = kinds[kind] - 1
                    if left:
                        kinds[kind] = left
                    else:
                        del kinds[kind]
                    self.queued -= 1
                    if limits:
                        for key in limits:
                            self.running[key] += 1
                    self._start(task, allocation)
                    continue
            if failed is None:
                if len(kinds) == 1:
                    break  # one kind in the queue, this one's: nothing in it can start (below)
                failed = {id(needs)}
            else:
                failed.add(id(needs))
            if failed.issuperset(kinds):
                # whatever is left asks for what could not start. Decided before the entry leaves
                # the heap: a backlog of one kind then costs one look per completion, not a pop
                # and a push
                break
            if not competes:
                blocked = set(blocked) | pool.short_of(needs)
            if skipped is None:
                skipped = [self._pop()]
            else:
                skipped.append(self._pop())
                if len(skipped) > BACKFILL_WINDOW:
                    break  # the window is full
        if skipped is not None:
            for place in skipped:
                self._push(place)

    @staticmethod
    def competes(needs: Resources, blocked: frozenset[str] | set[str]) -> bool:
        """Whether a task with ``needs`` needs something that a task ahead of it is short of."""
        return (
            ("cpu" in blocked and needs.cpu > 0)
            or ("memory" in blocked and needs.memory_mb > 0)
            or ("gpu" in blocked and needs.devices_needed > 0)
        )

    def held_back(self, needs: Resources, short: frozenset[str], front: Resources) -> bool:
        """Whether a new task, with ``needs`` that are ``short`` of something, queued behind a
        front task with needs ``front``, leaves admission as it was: true when the front task is
        short of something this one needs.

        Not fitting is not enough. A task that competes with nothing ahead of it adds what it is
        short of to what the tasks behind it may not take (see admit); a task behind that waited
        for such a thing then merely competes, and what *it* was short of, which held back the
        tasks after it, no longer counts: one of those may start now. Nor is landing behind the
        front. But a task that competes with the front task competes wherever it lands: it
        changes no one's ``blocked``, and nothing can start.
        """
        # the front task needs at least as much of something this one is short of: it is short
        # of it too (the usual case, decided without looking at the pool again)
        if "cpu" in short and front.cpu >= needs.cpu:
            return True
        if "memory" in short and front.memory_mb >= needs.memory_mb:
            return True
        if ("gpu" in short and front.devices_needed >= needs.devices_needed
                and (not front.gpu_memory_mb or 0 < needs.gpu_memory_mb <= front.gpu_memory_mb)):
            return True  # as many devices, each with at least as much free memory (or whole)
        return self.competes(needs, self.pool.short_of(front))

    # -- concurrency limits -------------------------------------------------------------------

    def at_limit(self, limits: tuple[str, ...]) -> bool:
        return any(self.running[key] >= self._limit_of(key) for key in limits)

    def _limiting_key(self, limits: tuple[str, ...]) -> str:
        for key in limits:
            if self.running[key] >= self._limit_of(key):
                return key
        return limits[0]

    def _limit_of(self, key: str) -> int:
        return self.limits.get(key, 1)  # qualified names are non-thread-safe algorithms: one at a time

    def free_slots(self, limits: tuple[str, ...]) -> None:
        """A task's code has stopped: its slots go to the first parked task still queued."""
        for key in limits:
            self.running[key] -= 1
            self._unpark(key)

    def _unpark(self, key: str) -> None:
        parked = self.parked.get(key)
        while parked:
            place = parked.popleft()
            if self.tasks[place].state is _QUEUED:
                self._push(place)
                break
            del self.tasks[place]
