"""Scheduler invariants under random interleavings, checked with hypothesis.

Invariants:
- every submitted task ends in exactly one terminal state (observed once, by state and by event);
- the resources held by running tasks never exceed the capacity, in any dimension;
- when everything has ended, every reservation has come back.

The state machine checks docs/scheduler.md's "Order", "Admission" and "Concurrency per executor"
against a reference model of its own (AdmissionModel below, written from the page, not from
edgecompute/_admission.py): removing the starvation guard from the code makes it fail.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from edgecompute import (
    Algorithm,
    Config,
    Health,
    Registry,
    Request,
    Resources,
    Response,
    Scheduler,
    TaskContext,
    TaskHandle,
    TaskState,
)
from edgecompute.errors import (
    EdgeComputeError,
    ExecutorError,
    InfeasibleRequest,
    QueueFull,
    SchedulerClosed,
    TaskCancelled,
    TaskTimeout,
)

CAPACITY = Resources(cpu=3, memory_mb=1000, gpus=2, gpu_memory_mb=1000)


class Probe:
    """An executor that records how much of each resource its running tasks hold."""

    name = "probe"
    version = "1"

    def __init__(self) -> None:
        self.gates: dict[int, asyncio.Event] = {}
        self.cpu = 0.0
        self.memory = 0.0
        self.peak_cpu = 0.0
        self.peak_memory = 0.0
        self.gpu: dict[int, float] = {}
        self.peak_gpu = 0.0
        self.lock = threading.Lock()
        self.running = self.peak_running = 0
        self.singles = self.peak_singles = 0
        # request id -> entries into execute minus exits: the reference model's view of which
        # ended tasks still run code (and so still hold their concurrency slot)
        self.inside: Counter[str] = Counter()

    def algorithms(self) -> Sequence[Algorithm]:
        return [
            *(Algorithm(name, resources=Resources(cpu=1)) for name in ("gate", "echo", "fail", "block")),
            Algorithm("single", resources=Resources(cpu=1), thread_safe=False),
        ]

    def requirements(self, request: Request) -> Resources:
        if request.resources is not None:
            return Resources()  # the test states this task's needs in the request: they are all it needs
        return Resources(cpu=1)

    async def execute(self, request: Request, ctx: TaskContext) -> Response:
        self.inside[request.id] += 1
        try:
            if ctx.algorithm.name == "block":
                # measured on the worker thread itself: a cancelled task's thread still holds its share
                return Response(await ctx.run_sync(self._hold, request, ctx, 0.002))
            return await self._hold_async(request, ctx)
        finally:
            self.inside[request.id] -= 1

    def _hold(self, request: Request, ctx: TaskContext, seconds: float) -> int:
        with self.lock:
            self._take(request, ctx, 1)
        try:
            time.sleep(seconds)
            return int(request.inputs)
        finally:
            with self.lock:
                self._take(request, ctx, -1)

    def _take(self, request: Request, ctx: TaskContext, sign: int) -> None:
        need = request.resources or Resources(cpu=1)
        self.cpu += sign * need.cpu
        self.memory += sign * need.memory_mb
        for device in ctx.devices:
            self.gpu[device] = self.gpu.get(device, 0) + sign * (need.gpu_memory_mb or CAPACITY.gpu_memory_mb)
        self.peak_cpu = max(self.peak_cpu, self.cpu)
        self.peak_memory = max(self.peak_memory, self.memory)
        self.peak_gpu = max([self.peak_gpu, *self.gpu.values()])

    async def _hold_async(self, request: Request, ctx: TaskContext) -> Response:
        self._take(request, ctx, 1)
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        if ctx.algorithm.name == "single":
            self.singles += 1
            self.peak_singles = max(self.peak_singles, self.singles)
        try:
            name = ctx.algorithm.name
            if name in ("gate", "single"):
                await self.gates.setdefault(request.inputs, asyncio.Event()).wait()
            elif name == "fail":
                raise ExecutorError("planned failure", retryable=bool(request.inputs % 2))
            return Response(request.inputs)
        finally:
            self._take(request, ctx, -1)
            self.running -= 1
            if ctx.algorithm.name == "single":
                self.singles -= 1

    def release(self, key: int) -> None:
        self.gates.setdefault(key, asyncio.Event()).set()

    async def health(self) -> Health:
        return Health()

    async def aclose(self) -> None:
        return None


resources = st.builds(
    Resources,
    cpu=st.sampled_from([0, 0.5, 1, 1.5, 3, 4]),
    memory_mb=st.sampled_from([0, 100, 600]),
    gpu_memory_mb=st.sampled_from([0, 0, 400, 1000]),
    gpus=st.sampled_from([0, 0, 1, 2]),
)


# -- reference model of admission -----------------------------------------------------------------
#
# Written from docs/scheduler.md, not from the scheduler: it keeps its own record of every task from
# the events it observes (order key, needs, state), its own count of concurrency slots, and its own
# statement of the rules (order, backfill, starvation guard, limits). The only thing it borrows is
# the resource pool's arithmetic (``short_of``: in what a need does not fit what is free now),
# which is the accounting of what is reserved, not the policy under test.
#
# Some facts are invisible from outside: whether a task held by a concurrency limit is parked or
# back in the queue, whether a task waiting to retry is back in the queue, whether a cancelled
# task's thread has returned its slot yet, and the order of two tasks whose keys are closer than
# the model's clock can tell. The model then keeps two bounds on the set of resources the tasks
# ahead are waiting for: ``low`` (certainly waited for) and ``high`` (possibly), and claims only what
# holds under both: a task that fits and competes with nothing in ``high`` should have started; a
# task admitted while it competes with ``low`` passed a task it may not pass.

_CLOCK = 0.0005  # how far apart two order keys must be for the model to tell their order


def _needs_what(need: Resources, waited_for: set[str] | frozenset[str]) -> bool:
    """docs/scheduler.md: a task may pass one that waits only if it needs none of what that one is
    short of (a CPU-only task may pass a task waiting for GPU memory, not one waiting for CPU)."""
    return bool(
        ("cpu" in waited_for and need.cpu > 0)
        or ("memory" in waited_for and need.memory_mb > 0)
        or ("gpu" in waited_for and (need.gpus > 0 or need.gpu_memory_mb > 0))
    )


class ModelTask:
    def __init__(self, task_id: str, need: Resources, priority: int, algorithm: str, seq: int,
                 submitted: float, aging: float) -> None:
        self.id = task_id
        self.need = need
        self.priority = priority
        self.algorithm = algorithm
        self.seq = seq
        # docs/scheduler.md: one heap keyed by submitted_at - priority * aging; a retry keeps it
        self.key = submitted - priority * aging
        self.state = "queued"  # queued, running, ended
        self.retrying = False  # waiting out a retry's backoff, or back in the queue after it
        self.lingering = False  # ended while its blocking code ran on a thread: its slot may be held

    def __repr__(self) -> str:
        return f"<{self.id} {self.algorithm} {self.need} p={self.priority} {self.state}>"


class AdmissionModel:
    def __init__(self, machine: SchedulerMachine, aging: float, limit: int | None) -> None:
        self.machine = machine
        self.aging = aging
        self.limits: dict[str, int] = {"probe/single": 1}
        if limit is not None:
            self.limits["probe"] = limit
        self.expected: dict[str, tuple[Resources, int, str]] = {}
        self.tasks: dict[str, ModelTask] = {}
        self.seq = 0
        self.snapshot: dict[str, frozenset[str]] | None = None
        self.pending: tuple[Resources, dict[str, frozenset[str]], dict[str, frozenset[str]]] | None = None
        self.checked_starts = 0
        # the scheduler logs and swallows an observer's exceptions: a broken rule is kept here and
        # raised by the state machine's invariant
        self.violations: list[str] = []

    # -- what the model sees --------------------------------------------------------------------

    def expect(self, task_id: str, need: Resources, priority: int, algorithm: str) -> None:
        self.expected[task_id] = (need, priority, algorithm)

    def observe(self, event) -> None:  # type: ignore[no-untyped-def]
        kind = event.kind
        if kind == "submitted":
            need, priority, algorithm = self.expected[event.task_id]
            self.seq += 1
            self.tasks[event.task_id] = ModelTask(event.task_id, need, priority, algorithm, self.seq,
                                                  time.monotonic(), self.aging)
            return
        task = self.tasks[event.task_id]
        if kind == "started":
            try:
                self.check_start(task)
            except AssertionError as exc:
                self.violations.append(str(exc))
            task.state, task.retrying = "running", False
        elif kind == "retrying":
            task.state, task.retrying = "queued", True
        elif event.state.terminal:
            if task.algorithm == "block" and self.machine.probe.inside[task.id] > 0:
                task.lingering = True
            task.state, task.retrying = "ended", False

    def watch(self, pool) -> None:  # type: ignore[no-untyped-def]
        """Record, at each reservation, what each queued task was short of just before it and at
        the start of the scan that made it (the reference for the starvation guard)."""
        acquire, release = pool.try_acquire, pool.release

        def try_acquire(need: Resources):  # type: ignore[no-untyped-def]
            queued = [t for t in self.tasks.values() if t.state == "queued"]
            before = {t.id: pool.short_of(t.need) for t in queued}
            if self.snapshot is None:
                # the pool only shrinks from here until a release or the loop's next turn, so what
                # a task is short of now is at most what it was short of when a later scan saw it
                self.snapshot = before
                self.machine.loop.call_soon(self._forget_snapshot)
            allocation = acquire(need)
            if allocation is not None:
                self.pending = (need, before, self.snapshot)
            return allocation

        def give_back(allocation) -> None:  # type: ignore[no-untyped-def]
            release(allocation)
            self.snapshot = None

        pool.try_acquire = try_acquire
        pool.release = give_back

    def _forget_snapshot(self) -> None:
        self.snapshot = None

    # -- what the model works out ---------------------------------------------------------------

    def _keys(self, task: ModelTask) -> list[str]:
        keys = [key for key in ("probe",) if key in self.limits]
        if task.algorithm == "single":
            keys.append("probe/single")
        return keys

    def _certainly_at_limit(self, task: ModelTask) -> bool:
        inside = self.machine.probe.inside
        for key in self._keys(task):
            held = sum(1 for t in self.tasks.values()
                       if key in self._keys(t) and (t.state == "running" or (t.state == "ended" and inside[t.id] > 0
                                                                              and not t.lingering)))
            if held >= self.limits[key]:
                return True
        return False

    def _presence(self, queued: list[ModelTask], at_start: bool) -> dict[str, str]:
        """"in": certainly in the queue, free of limits; "maybe": perhaps in it; "out": not."""
        waiting = sum(1 for t in queued if t.retrying)
        retrying = self.machine.scheduler.stats().retrying
        presence = {}
        for task in queued:
            if task.retrying and retrying == waiting:
                presence[task.id] = "out"  # all of them wait out their backoff
            elif task.retrying and retrying:
                presence[task.id] = "maybe"
            elif self._keys(task):
                # parked or back in the queue cannot be told apart; while the start being checked
                # is counted, neither can a limit that was reached
                presence[task.id] = "out" if not at_start and self._certainly_at_limit(task) else "maybe"
            else:
                presence[task.id] = "in"
        return presence

    def _ordered(self, queued: list[ModelTask]) -> list[ModelTask] | None:
        """The queue in order, or None when two keys are too close to order."""
        queued = sorted(queued, key=lambda t: (t.key, t.seq))
        for a, b in itertools.pairwise(queued):
            if a.priority != b.priority and b.key - a.key < _CLOCK:
                return None
        return queued

    def check_start(self, task: ModelTask) -> None:
        """A task starts: no task ahead of it that it may not pass was waiting, and none ahead of it
        that could start was passed over."""
        assert self.pending is not None, f"{task} started without a reservation"
        need, before, snapshot = self.pending
        self.pending = None
        assert need == task.need, (need, task)
        assert task.state == "queued", task
        queued = [t for t in self.tasks.values() if t.state == "queued"]
        ordered = self._ordered(queued)
        if ordered is None:
            return
        presence = self._presence(queued, at_start=True)
        low: set[str] = set()
        high: set[str] = set()
        for ahead in ordered:
            if ahead is task:
                break
            if presence[ahead.id] == "out":
                continue
            short_now = before[ahead.id]
            if presence[ahead.id] == "maybe" or ahead.id not in snapshot:
                if not _needs_what(ahead.need, low):
                    high |= short_now
            elif _needs_what(ahead.need, low):
                continue  # it competes with a task ahead of it: it waits without holding others
            elif not _needs_what(ahead.need, high):
                assert short_now, f"{task} started before {ahead}, which was ahead of it and fitted"
                low |= snapshot[ahead.id]
                high |= short_now
            else:
                high |= short_now
        self.checked_starts += 1
        assert not _needs_what(task.need, low), (
            f"{task} started while a task ahead of it waited for {sorted(low)}, which it needs too"
        )

    def check_settled(self, pool) -> None:  # type: ignore[no-untyped-def]
        """Between events, no task in the queue that may pass all ahead of it fits what is free."""
        assert not self.violations, self.violations
        queued = [t for t in self.tasks.values() if t.state == "queued"]
        ordered = self._ordered(queued)
        if ordered is None:
            return
        presence = self._presence(queued, at_start=False)
        low: set[str] = set()
        high: set[str] = set()
        for task in ordered:
            if presence[task.id] == "out":
                continue
            short = pool.short_of(task.need)
            if presence[task.id] == "maybe":
                if not _needs_what(task.need, low):
                    high |= short
            elif _needs_what(task.need, low):
                continue
            elif not _needs_what(task.need, high):
                assert short, f"{task} fits and may pass every task ahead of it, yet it waits"
                low |= short
                high |= short
            else:
                high |= short


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(max_queue=st.integers(2, 12), aging=st.sampled_from([0.0, 0.01, 10.0]),
                limit=st.sampled_from([None, 1, 2]))
    def start(self, max_queue: int, aging: float, limit: int | None) -> None:
        self.loop = asyncio.new_event_loop()
        self.probe = Probe()
        self.limit = limit
        executors = {"probe": {"max_concurrency": limit}} if limit else {}
        config = Config(retries=1, retry_backoff=0.001, aging=aging, executors=executors)
        self.scheduler = Scheduler(Registry([self.probe]), capacity=CAPACITY, max_queue=max_queue, config=config)
        self.loop.run_until_complete(self.scheduler.start())
        self.handles: list[TaskHandle] = []
        self.runs: list[asyncio.Task[Response]] = []
        self.ends: dict[str, list[str]] = {}
        self.ended_before_cancel: set[str] = set()
        self.key = 0
        self.model = AdmissionModel(self, aging, limit)
        # the model watches the pool's reservations and sees each event before anything else
        self.model.watch(self.scheduler._pool)
        self.scheduler.subscribe(self.model.observe)
        self.scheduler.subscribe(self._observe)

    def _observe(self, event) -> None:  # type: ignore[no-untyped-def]
        if event.state.terminal:
            self.ends.setdefault(event.task_id, []).append(event.kind)

    @rule(
        algorithm=st.sampled_from(["gate", "echo", "fail", "block", "single"]),
        need=resources,
        priority=st.integers(-3, 3),
        timeout=st.sampled_from([None, None, 0.001, 0.02]),
    )
    def submit(self, algorithm: str, need: Resources, priority: int, timeout: float | None) -> None:
        self.key += 1
        request = Request(f"probe/{algorithm}", self.key, priority=priority, timeout=timeout, resources=need)
        self.model.expect(request.id, need, priority, algorithm)
        try:
            handle = self.scheduler.submit(request)
        except InfeasibleRequest:
            assert not need.fits(CAPACITY)
            return
        except QueueFull:
            assert self.scheduler.stats().queued >= self.scheduler.max_queue
            return
        assert need.fits(CAPACITY)
        self.handles.append(handle)

    @rule(
        algorithm=st.sampled_from(["gate", "echo", "fail", "block"]),
        cpu=st.sampled_from([0, 1, 2]),
        timeout=st.sampled_from([None, 0.001, 0.02]),
    )
    def run(self, algorithm: str, cpu: float, timeout: float | None) -> None:
        """Scheduler.run from a task of its own: starts inline when nothing waits and it fits."""
        self.key += 1
        self.model.expect(f"run-{self.key}", Resources(cpu=cpu), 0, algorithm)
        call = self.scheduler.run(f"probe/{algorithm}", self.key, timeout=timeout, resources=Resources(cpu=cpu),
                                  id=f"run-{self.key}")
        self.runs.append(self.loop.create_task(call, name=f"run-{self.key}"))

    @precondition(lambda self: self.runs)
    @rule(index=st.integers(0, 10**6))
    def cancel_caller(self, index: int) -> None:
        call = self.runs[index % len(self.runs)]
        if call.get_name() in self.ends and not call.done():
            # the task has ended but its caller has not resumed yet: the caller still sees
            # CancelledError (asyncio's rule: a cancelled caller is cancelled), the task keeps its end
            self.ended_before_cancel.add(call.get_name())
        call.cancel()

    @precondition(lambda self: self.handles)
    @rule(index=st.integers(0, 10**6))
    def cancel(self, index: int) -> None:
        handle = self.handles[index % len(self.handles)]
        was_done = handle.done()
        assert handle.cancel() is (not was_done)

    @rule(key=st.integers(1, 40))
    def release(self, key: int) -> None:
        self.probe.release(key)

    @rule(steps=st.integers(1, 5))
    def advance(self, steps: int) -> None:
        for _ in range(steps):
            self.loop.run_until_complete(asyncio.sleep(0))

    @rule(seconds=st.sampled_from([0.001, 0.005, 0.02]))
    def wait(self, seconds: float) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))

    @invariant()
    def within_capacity(self) -> None:
        in_use = self.scheduler.stats().in_use
        assert in_use.cpu <= CAPACITY.cpu + 1e-9
        assert in_use.memory_mb <= CAPACITY.memory_mb + 1e-9
        assert in_use.gpu_memory_mb <= CAPACITY.gpu_memory_mb
        assert self.probe.peak_cpu <= CAPACITY.cpu + 1e-9
        assert self.probe.peak_memory <= CAPACITY.memory_mb + 1e-9
        assert self.probe.peak_gpu <= CAPACITY.gpu_memory_mb + 1e-9

    @invariant()
    def within_concurrency_limits(self) -> None:
        assert self.probe.peak_singles <= 1
        if self.limit is not None:
            assert self.probe.peak_running <= self.limit

    @invariant()
    def no_waiting_task_could_start(self) -> None:
        """Liveness: whatever could let a waiting task start dispatches at once, so between events
        no task that may pass every task ahead of it fits what is free (the reference model)."""
        self.model.check_settled(self.scheduler._pool)

    @invariant()
    def the_queue_knows_what_it_holds(self) -> None:
        admission = self.scheduler._admission
        assert Counter(id(admission.tasks[place].needs) for place in admission.heap) == admission.kinds

    @invariant()
    def at_most_one_end(self) -> None:
        assert all(len(kinds) == 1 for kinds in self.ends.values())

    def teardown(self) -> None:
        for key in range(self.key + 1):
            self.probe.release(key)
        # bounded: a scheduler that lost a reservation would otherwise drain forever
        self.loop.run_until_complete(asyncio.wait_for(self.scheduler.aclose(timeout=5), 10))
        states = {TaskCancelled: "cancelled", TaskTimeout: "timed_out", ExecutorError: "failed"}
        for call in self.runs:
            assert call.done()
            ends = self.ends.get(call.get_name())
            if call.cancelled() and call.get_name() in self.ended_before_cancel:
                assert ends is not None and len(ends) == 1
            elif call.cancelled():
                # None: cancelled while waiting for queue room. Or the task ended on its own (a retry
                # that came due) in the loop iteration that delivered the caller's cancellation,
                # before the caller resumed: the task keeps that one end
                assert ends is None or len(ends) == 1, ends
            elif call.exception() is None:
                assert ends == ["succeeded"]
            elif isinstance(call.exception(), SchedulerClosed):
                assert ends is None  # it had not started before the scheduler closed: never submitted
            else:
                assert ends == [states[type(call.exception())]], (ends, call.exception())
        for handle in self.handles:
            assert handle.done(), handle
            assert self.ends[handle.id] == [handle.state.value]
            if handle.state.value != "succeeded":
                assert isinstance(handle.exception(), EdgeComputeError)
        assert len(self.ends) == len(self.handles) + sum(c.get_name() in self.ends for c in self.runs)
        assert self.scheduler.idle
        self.loop.close()


TestSchedulerInvariants = SchedulerMachine.TestCase
TestSchedulerInvariants.settings = settings(
    max_examples=200, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@settings(max_examples=200, deadline=None)
@given(priorities=st.lists(st.integers(-5, 5), min_size=1, max_size=25))
def test_start_order_is_priority_then_submission(priorities: list[int]) -> None:
    async def scenario() -> list[int]:
        probe = Probe()
        started: list[int] = []
        original = probe.execute

        async def execute(request: Request, ctx: TaskContext) -> Response:
            started.append(request.inputs)
            return await original(request, ctx)

        probe.execute = execute  # type: ignore[method-assign]
        async with Scheduler(Registry([probe]), capacity=Resources(cpu=1), config=Config(aging=1e6)) as s:
            blocker = s.submit(Request("probe/gate", -1, priority=100))
            handles = [s.submit(Request("probe/echo", i, priority=p)) for i, p in enumerate(priorities)]
            probe.release(-1)
            await blocker.result()
            for handle in handles:
                await handle.result()
        return started[1:]

    expected = [i for i, _ in sorted(enumerate(priorities), key=lambda item: (-item[1], item[0]))]
    assert asyncio.run(scenario()) == expected


@settings(max_examples=300)
@given(a=resources, b=resources)
def test_resources_arithmetic(a: Resources, b: Resources) -> None:
    total = a + b
    assert total - b == Resources(max(0.0, total.cpu - b.cpu), total.memory_mb - b.memory_mb,
                                  total.gpu_memory_mb - b.gpu_memory_mb, total.gpus - b.gpus)
    assert a.fits(a + b) or a.devices_needed > (a + b).gpus or a.gpu_memory_mb > (a + b).gpu_memory_mb
    assert Resources().fits(a)


def test_invalid_resources_are_rejected() -> None:
    with pytest.raises(ValueError, match="cpu must be a finite number"):
        Resources(cpu=-1)
    with pytest.raises(TypeError, match="memory_mb must be a number"):
        Resources(memory_mb="1GB")  # type: ignore[arg-type]


# -- Order: the queue's places (docs/scheduler.md, "Order") -----------------------------------------


class _Waiter:
    def __init__(self, name: int, needs: Resources) -> None:
        self.name = name
        self.state = TaskState.QUEUED
        self.needs = needs
        self.limits: tuple[str, ...] = ()


@given(st.lists(st.integers(min_value=-10**12, max_value=10**12) | st.sampled_from([0, 1, -1]), min_size=1,
                max_size=40))
@settings(max_examples=200, deadline=None)
def test_tasks_start_in_order_key_then_submission_order(keys_us: list[int]) -> None:
    # Order keys are seconds (submission time less priority times aging): they may be negative,
    # equal, or far apart, and the queue packs each into one int with a sequence number
    # (_admission.py). Keys here are whole microseconds up to 11 days either way: ties go to the
    # earlier submission, every other pair keeps its order.
    from edgecompute._admission import Admission
    from edgecompute.resources import Allocation, ResourcePool

    pool = ResourcePool(Resources(cpu=1))
    started: list[int] = []

    def start(task: _Waiter, allocation: Allocation) -> None:
        started.append(task.name)
        pool.release(allocation)  # done at once: the scan goes on to the next

    admission: Admission[_Waiter] = Admission(pool, 0.0, {}, start)
    blocker = pool.try_acquire(Resources(cpu=1))
    assert blocker is not None
    needs = Resources(cpu=1)
    for name, key in enumerate(keys_us):
        admission.queue(_Waiter(name, needs), key / 1e6)
    assert started == []
    pool.release(blocker)
    admission.dispatch()
    assert started == [name for _, name in sorted((key, name) for name, key in enumerate(keys_us))]
    assert not admission.heap and not admission.tasks and admission.queued == 0
