"""docs/scheduler.md, section by section (a comment heads each section's tests):

- Task states: run returns the response; names, bare and ambiguous; option checks; plain
  exceptions become ExecutorError.
- Order: priorities first, FIFO within one; aging.
- Admission: resources bound concurrency and all come back; fractions never drift; infeasible
  requests; GPU memory per device; backfill past a GPU wait, never past a CPU wait; a cancelled
  queued task lets the ones it held back start.
- Concurrency per executor: max_concurrency, thread_safe=False, parking and passing turns on.
- Blocking code: worker threads side by side with the loop running.
- Deadlines, Cancellation, Retries, Backpressure and closing, Observing (streams, events,
  waiters, done callbacks; the context's view of its neighbours).

Order, admission and concurrency are also checked against an independent model under random
interleavings in test_properties.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading

import pytest

from edgecompute import (
    Config,
    FunctionExecutor,
    Registry,
    Request,
    Resources,
    Scheduler,
    TaskContext,
    TaskEvent,
    TaskHandle,
    TaskState,
)
from edgecompute.errors import (
    AmbiguousAlgorithm,
    EdgeComputeError,
    ExecutorError,
    InfeasibleRequest,
    InvalidRequest,
    QueueFull,
    SchedulerClosed,
    TaskCancelled,
    TaskTimeout,
    UnknownAlgorithm,
)

from .helpers import Controlled, settle

pytestmark = pytest.mark.anyio


def make(cpu: float = 1, config: Config | None = None, **kwargs: object) -> tuple[Scheduler, Controlled]:
    ctl = Controlled()
    scheduler = Scheduler(Registry([ctl]), capacity=Resources(cpu=cpu, memory_mb=1024),
                          config=config or Config(), **kwargs)  # type: ignore[arg-type]
    return scheduler, ctl


# -- Task states -----------------------------------------------------------------------------------


async def test_run_returns_the_response_with_executor_and_timings() -> None:
    scheduler, _ = make()
    async with scheduler:
        response = await scheduler.run("ctl/echo", {"x": 1})
    assert response.outputs == {"x": 1}
    assert response.executor == "ctl"
    assert set(response.timings) >= {"queued", "run", "total"}
    assert response.timings["total"] >= response.timings["run"] >= 0


async def test_bare_algorithm_name_works_when_unique() -> None:
    scheduler, _ = make()
    async with scheduler:
        assert (await scheduler.run("echo", 5)).outputs == 5


async def test_unknown_and_ambiguous_names_fail_at_submit_naming_candidates() -> None:
    class Other(Controlled):
        name = "other"

    registry = Registry([Controlled(), Other()])
    async with Scheduler(registry, capacity=Resources(cpu=1), config=Config()) as scheduler:
        with pytest.raises(UnknownAlgorithm, match=r"ctl/echoo.*did you mean 'ctl/echo'"):
            scheduler.submit(Request("ctl/echoo"))
        with pytest.raises(AmbiguousAlgorithm, match=r"ctl/echo, other/echo"):
            scheduler.submit(Request("echo"))
        assert scheduler.stats().submitted == 0


async def test_run_rejects_unknown_options_and_bad_values() -> None:
    scheduler, _ = make()
    async with scheduler:
        with pytest.raises(InvalidRequest, match="unknown option.*prio"):
            await scheduler.run("ctl/echo", 1, prio=3)
        with pytest.raises(InvalidRequest, match="timeout must be"):
            await scheduler.run("ctl/echo", 1, timeout=-1)


async def test_plain_exceptions_become_executor_errors() -> None:
    class Broken(Controlled):
        async def execute(self, request, ctx):  # type: ignore[no-untyped-def]
            raise ZeroDivisionError("division by zero")

    async with Scheduler(Registry([Broken()]), capacity=Resources(cpu=1), config=Config()) as scheduler:
        with pytest.raises(ExecutorError, match=r"ctl/echo failed.*ZeroDivisionError") as info:
            await scheduler.run("ctl/echo")
        assert isinstance(info.value.__cause__, ZeroDivisionError)


# -- Order: priorities with aging ------------------------------------------------------------------


async def test_higher_priority_first_fifo_within_a_priority() -> None:
    scheduler, ctl = make(cpu=1)
    async with scheduler:
        blocker = scheduler.submit(Request("ctl/gate", "blocker"))
        await settle()
        handles = [scheduler.submit(Request("ctl/echo", name, priority=p))
                   for name, p in [("a0", 0), ("b0", 0), ("c5", 5), ("d1", 1), ("e5", 5)]]
        ctl.release("blocker")
        for handle in [blocker, *handles]:
            await handle.result()
    assert ctl.started == ["blocker", "c5", "e5", "d1", "a0", "b0"]


async def test_aging_lets_an_old_low_priority_task_overtake_new_high_priority_ones() -> None:
    # aging=0.05 s per level: a task that waited 0.3 s is worth 6 levels
    scheduler, ctl = make(cpu=1, config=Config(aging=0.05))
    async with scheduler:
        blocker = scheduler.submit(Request("ctl/gate", "blocker"))
        old = scheduler.submit(Request("ctl/echo", "old-low", priority=0))
        await asyncio.sleep(0.3)
        new = scheduler.submit(Request("ctl/echo", "new-high", priority=3))
        ctl.release("blocker")
        await asyncio.gather(blocker.result(), old.result(), new.result())
    assert ctl.started == ["blocker", "old-low", "new-high"]


# -- Admission: resources --------------------------------------------------------------------------


async def test_resources_bound_concurrency_and_all_come_back() -> None:
    scheduler, ctl = make(cpu=2)
    async with scheduler:
        handles = [scheduler.submit(Request("ctl/gate", i)) for i in range(5)]
        await settle()
        assert [h.state for h in handles].count(TaskState.RUNNING) == 2
        assert scheduler.stats().in_use.cpu == 2
        for i in range(5):
            ctl.release(i)
        for handle in handles:
            await handle.result()
        await settle()
        assert scheduler.idle
    assert ctl.max_running == 2


async def test_fractional_cpu_reservations_never_drift() -> None:
    app = FunctionExecutor("app")

    @app.algorithm(resources=Resources(cpu=0.1))
    async def echo(value: int) -> int:
        return value

    async with Scheduler(Registry([app]), capacity=Resources(cpu=1), config=Config()) as scheduler:
        handles = [scheduler.submit(Request("app/echo", i)) for i in range(1000)]
        for handle in handles:
            await handle.result()
        await settle()
        assert scheduler.idle
        assert scheduler.stats().in_use == Resources()


async def test_infeasible_request_fails_at_once() -> None:
    scheduler, _ = make(cpu=2)
    async with scheduler:
        with pytest.raises(InfeasibleRequest, match=r"cpu=3.*capacity \(cpu=2"):
            scheduler.submit(Request("ctl/echo", resources=Resources(cpu=3)))
        with pytest.raises(InfeasibleRequest, match="gpus=1"):
            scheduler.submit(Request("ctl/echo", resources=Resources(gpu_memory_mb=100)))


async def test_gpu_memory_is_accounted_per_device() -> None:
    ctl = Controlled()
    capacity = Resources(cpu=8, memory_mb=1024, gpus=2, gpu_memory_mb=1000)
    async with Scheduler(Registry([ctl]), capacity=capacity, config=Config()) as scheduler:
        with pytest.raises(InfeasibleRequest):
            scheduler.submit(Request("ctl/gate", "too-big", resources=Resources(gpu_memory_mb=1500)))
        a = scheduler.submit(Request("ctl/gate", "a", resources=Resources(gpu_memory_mb=600)))
        b = scheduler.submit(Request("ctl/gate", "b", resources=Resources(gpu_memory_mb=600)))
        c = scheduler.submit(Request("ctl/gate", "c", resources=Resources(gpu_memory_mb=600)))
        await settle()
        assert (a.state, b.state, c.state) == (TaskState.RUNNING, TaskState.RUNNING, TaskState.QUEUED)
        assert sorted(ctl.contexts["a"].devices + ctl.contexts["b"].devices) == [0, 1]
        ctl.release("a")
        await a.result()
        await settle()
        assert c.state is TaskState.RUNNING
        ctl.release("b")
        ctl.release("c")
        await asyncio.gather(b.result(), c.result())


async def test_a_task_waiting_for_gpu_does_not_hold_up_cpu_only_work() -> None:
    ctl = Controlled()
    capacity = Resources(cpu=4, memory_mb=1024, gpus=1, gpu_memory_mb=1000)
    async with Scheduler(Registry([ctl]), capacity=capacity, config=Config()) as scheduler:
        gpu_a = scheduler.submit(Request("ctl/gate", "gpu-a", resources=Resources(cpu=1, gpus=1)))
        gpu_b = scheduler.submit(Request("ctl/gate", "gpu-b", resources=Resources(cpu=1, gpus=1), priority=9))
        cpu = scheduler.submit(Request("ctl/echo", "cpu", resources=Resources(cpu=1)))
        assert (await cpu.result()).outputs == "cpu"
        assert gpu_b.state is TaskState.QUEUED
        ctl.release("gpu-a")
        ctl.release("gpu-b")
        await asyncio.gather(gpu_a.result(), gpu_b.result())


async def test_cancelling_a_queued_task_lets_the_ones_it_held_back_start_at_once() -> None:
    scheduler, ctl = make(cpu=2)
    async with scheduler:
        running = scheduler.submit(Request("ctl/gate", "running", resources=Resources(cpu=1)))
        big = scheduler.submit(Request("ctl/gate", "big", resources=Resources(cpu=2), priority=5))
        small = scheduler.submit(Request("ctl/gate", "small", resources=Resources(cpu=1)))
        await settle()
        # one cpu is free, but the waiting big task is short of cpu, so the small one may not take it
        assert (running.state, big.state, small.state) == (TaskState.RUNNING, TaskState.QUEUED, TaskState.QUEUED)
        big.cancel()
        await settle()
        assert small.state is TaskState.RUNNING  # no other event needed: nothing ended or arrived
        ctl.release("running")
        ctl.release("small")
        await asyncio.gather(running.result(), small.result())


@pytest.mark.parametrize("behind", [False, True], ids=["at-the-front", "behind-the-front"])
async def test_a_new_task_that_does_not_fit_can_still_let_a_waiting_one_start(behind: bool) -> None:
    # Regression (found by TestSchedulerInvariants): submit() skipped admission for a task that
    # does not fit, as if it could neither start nor let another start. But it changes who holds
    # back whom: a task that waits for something the new one is short of is now merely waiting
    # behind it, and what that task is short of no longer holds back the tasks after it.
    ctl = Controlled()
    capacity = Resources(cpu=4, memory_mb=1024, gpus=1, gpu_memory_mb=1000)
    async with Scheduler(Registry([ctl]), capacity=capacity, config=Config()) as scheduler:
        hogs = [scheduler.submit(Request("ctl/gate", "gpu", resources=Resources(gpus=1))),
                scheduler.submit(Request("ctl/gate", "memory", resources=Resources(memory_mb=1000)))]
        waiting = []
        if behind:  # the front task waits for cpu, which none of the others needs
            hogs.append(scheduler.submit(Request("ctl/gate", "cpu", resources=Resources(cpu=4))))
            waiting.append(scheduler.submit(Request("ctl/gate", "front", resources=Resources(cpu=1),
                                                    priority=9)))
        big = scheduler.submit(Request("ctl/gate", "big", resources=Resources(memory_mb=500, gpus=1)))
        small = scheduler.submit(Request("ctl/gate", "small", resources=Resources(memory_mb=10)))
        await settle()
        assert all(h.state is TaskState.RUNNING for h in hogs)
        # big waits for memory (and the gpu) ahead of small, which needs memory: small may not pass
        assert all(h.state is TaskState.QUEUED for h in [*waiting, big, small])
        # urgent goes ahead of big and waits for the gpu only; big now waits for the gpu behind
        # it, so big's want of memory no longer holds small back
        urgent = scheduler.submit(Request("ctl/gate", "urgent", resources=Resources(gpus=1), priority=5))
        await settle()
        assert small.state is TaskState.RUNNING  # no other event needed: nothing ended
        assert all(h.state is TaskState.QUEUED for h in [*waiting, urgent, big])
        for key in ("small", "cpu", "front", "gpu", "urgent", "memory", "big"):
            ctl.release(key)
        await asyncio.gather(*(h.result() for h in [*hogs, *waiting, big, small, urgent]))


async def test_with_a_backlog_a_new_task_that_fits_beside_it_still_starts() -> None:
    scheduler, ctl = make(cpu=2)
    async with scheduler:
        running = [scheduler.submit(Request("ctl/gate", f"r{i}", resources=Resources(cpu=1))) for i in range(2)]
        waiting = [scheduler.submit(Request("ctl/gate", f"w{i}", resources=Resources(cpu=1))) for i in range(5)]
        await settle()
        assert all(h.state is TaskState.QUEUED for h in waiting)
        # needs only memory, of which there is room: the full cpu does not hold it back
        memory_only = scheduler.submit(Request("ctl/echo", "m", resources=Resources(cpu=0, memory_mb=100)))
        assert (await asyncio.wait_for(memory_only.result(), 5)).outputs == "m"
        for i in range(2):
            ctl.release(f"r{i}")
        for i in range(5):
            ctl.release(f"w{i}")
        await asyncio.gather(*(h.result() for h in running + waiting))


# -- Concurrency per executor ----------------------------------------------------------------------


async def test_executor_concurrency_cap_from_config() -> None:
    config = Config(executors={"ctl": {"max_concurrency": 2}})
    scheduler, ctl = make(cpu=8, config=config)
    async with scheduler:
        handles = [scheduler.submit(Request("ctl/gate", i)) for i in range(6)]
        await settle()
        assert sum(h.state is TaskState.RUNNING for h in handles) == 2
        for i in range(6):
            ctl.release(i)
        await asyncio.gather(*(h.result() for h in handles))
    assert ctl.max_running == 2


async def test_non_thread_safe_algorithm_runs_one_at_a_time() -> None:
    scheduler, ctl = make(cpu=8)
    async with scheduler:
        singles = [scheduler.submit(Request("ctl/single", f"s{i}")) for i in range(3)]
        echo = scheduler.submit(Request("ctl/echo", "other"))
        await echo.result()  # not held up by the parked single tasks
        await settle()
        assert [h.state for h in singles] == [TaskState.RUNNING, TaskState.QUEUED, TaskState.QUEUED]
        for i in range(3):
            ctl.release(f"s{i}")
        await asyncio.gather(*(h.result() for h in singles))
    assert [name for name in ctl.started if name.startswith("s")] == ["s0", "s1", "s2"]


async def test_a_cancelled_parked_task_does_not_strand_the_ones_behind_it() -> None:
    scheduler, ctl = make(cpu=8, config=Config(executors={"ctl": {"max_concurrency": 1}}))
    async with scheduler:
        running = scheduler.submit(Request("ctl/gate", "running"))
        parked = [scheduler.submit(Request("ctl/gate", f"p{i}")) for i in range(3)]
        await settle()
        parked[0].cancel()
        ctl.release("running")
        ctl.release("p1")
        ctl.release("p2")
        await asyncio.wait_for(asyncio.gather(running.result(), parked[1].result(), parked[2].result()), 5)


async def test_a_put_back_task_that_ends_while_queued_passes_its_turn_on() -> None:
    # s1 gets the freed slot's turn but cannot start (cpu is short); cancelled, its turn must pass
    # to s2, which fits: the state machine found s2 stranded, parked beside a free slot
    scheduler, ctl = make(cpu=1)
    async with scheduler:
        s0 = scheduler.submit(Request("ctl/single", "s0"))  # holds the algorithm's one slot
        blocker = scheduler.submit(Request("ctl/gate", "blocker", resources=Resources(cpu=0.9)))
        s1 = scheduler.submit(Request("ctl/single", "s1", resources=Resources(cpu=0.5)))
        s2 = scheduler.submit(Request("ctl/single", "s2"))
        await settle()
        assert (s1.state, s2.state) == (TaskState.QUEUED, TaskState.QUEUED)
        ctl.release("s0")
        await s0.result()
        await settle()
        assert (s1.state, s2.state) == (TaskState.QUEUED, TaskState.QUEUED)  # s1: 0.5 cpu, 0.1 free
        s1.cancel()
        await settle()
        assert s2.state is TaskState.RUNNING
        ctl.release("s2")
        ctl.release("blocker")
        await asyncio.gather(s2.result(), blocker.result())


# -- Blocking code ---------------------------------------------------------------------------------


async def test_blocking_work_runs_on_threads_without_stalling_the_loop() -> None:
    # four blocking calls are in their threads at the same time (overlap), and the loop runs while
    # they block: it is the loop that sees all four in and lets them go; no clock is read
    app = FunctionExecutor("app")
    lock = threading.Lock()
    inside = 0
    go = threading.Event()

    @app.algorithm(resources=Resources(cpu=1))
    def hold(inputs: int) -> int:
        nonlocal inside
        with lock:
            inside += 1
        if not go.wait(10):  # only the loop sets it
            raise RuntimeError("the loop did not run while blocking code waited")
        return inputs

    async with Scheduler(Registry([app]), capacity=Resources(cpu=4, memory_mb=1024), config=Config()) as scheduler:
        runs = asyncio.gather(*(scheduler.run("app/hold", i) for i in range(4)))
        try:
            for _ in range(10_000):
                if inside == 4:
                    break
                await asyncio.sleep(0.001)
            seen = inside
        finally:
            go.set()
        responses = await runs
    assert seen == 4  # all four blocked on their threads at once
    assert [response.outputs for response in responses] == [0, 1, 2, 3]


async def test_blocking_executor_base_class_runs_on_worker_threads() -> None:
    from edgecompute import Algorithm, BlockingExecutor

    class Hasher(BlockingExecutor):
        name = "hash"
        version = "1"

        def algorithms(self) -> list[Algorithm]:
            return [Algorithm("sha256", "hex digest of bytes", Resources(cpu=1))]

        def run(self, request: Request, ctx) -> str:  # type: ignore[no-untyped-def]
            import hashlib

            assert threading.current_thread() is not threading.main_thread()
            return hashlib.sha256(request.inputs).hexdigest()

    async with Scheduler(Registry([Hasher()]), capacity=Resources(cpu=1), config=Config()) as scheduler:
        response = await scheduler.run("hash/sha256", b"abc")
        assert response.outputs.startswith("ba7816bf")
        assert scheduler.registry.select("sha256").algorithm.resources == Resources(cpu=1)


async def test_executor_threads_can_stream_and_report_progress() -> None:
    from edgecompute import FunctionExecutor

    app = FunctionExecutor("app")
    seen_threads: list[str] = []

    @app.algorithm(resources=Resources(cpu=1))
    def produce(n: int, *, ctx) -> int:  # type: ignore[no-untyped-def]
        seen_threads.append(threading.current_thread().name)
        for i in range(n):
            ctx.emit_nowait(i)
            ctx.progress(i + 1, n)
        return n

    async with Scheduler(Registry([app]), capacity=Resources(cpu=1), config=Config()) as scheduler:
        handle = scheduler.submit(Request("app/produce", 5))
        assert [c async for c in handle.stream()] == [0, 1, 2, 3, 4]
        assert (await handle.result()).outputs == 5
    assert seen_threads[0].startswith("edgecompute-worker")


async def test_the_context_counts_the_tasks_running_beside_it() -> None:
    from edgecompute import FunctionExecutor

    app = FunctionExecutor("app")
    both_in, both_read = asyncio.Event(), asyncio.Event()
    arrived = 0
    readings: list[int] = []

    @app.algorithm(resources=Resources(cpu=1))
    async def count(inputs: None, ctx: TaskContext) -> int:
        nonlocal arrived
        arrived += 1
        if arrived == 2:
            both_in.set()
        await both_in.wait()  # the first one waits for the second
        readings.append(ctx.running)
        if len(readings) == 2:
            both_read.set()
        await both_read.wait()  # neither ends before both have looked
        return readings[-1]

    async with Scheduler(Registry([app]), capacity=Resources(cpu=4, memory_mb=1024), config=Config()) as scheduler:
        await asyncio.gather(scheduler.run("app/count"), scheduler.run("app/count"))
        assert readings == [2, 2]
        assert (await scheduler.run("app/count")).outputs == 1


# -- Deadlines -------------------------------------------------------------------------------------


async def test_deadline_covers_queue_time() -> None:
    scheduler, ctl = make(cpu=1)
    async with scheduler:
        blocker = scheduler.submit(Request("ctl/gate", "blocker"))
        queued = scheduler.submit(Request("ctl/echo", "late", timeout=0.05))
        with pytest.raises(TaskTimeout, match="in the queue"):
            await queued.result()
        assert queued.state is TaskState.TIMED_OUT
        ctl.release("blocker")
        await blocker.result()
    assert "late" not in ctl.started


async def test_deadline_cancels_a_running_task_and_releases_its_resources() -> None:
    scheduler, ctl = make(cpu=1)
    async with scheduler:
        with pytest.raises(TaskTimeout, match="running"):
            await scheduler.run("ctl/sleep", 3600, timeout=0.1)
        # the hour's sleep was cut: the executor's call has returned, without finishing
        assert ctl.running == 0 and ctl.finished == []
        await settle()
        assert scheduler.idle
        assert (await scheduler.run("ctl/echo", "next")).outputs == "next"


async def test_default_timeout_from_config() -> None:
    scheduler, _ = make(config=Config(timeout=0.05))
    async with scheduler:
        with pytest.raises(TaskTimeout):
            await scheduler.run("ctl/sleep", 5)


async def test_a_deadline_inside_run_raises_task_timeout_and_leaves_the_caller_uncancelled() -> None:
    scheduler, _ = make()
    async with scheduler:
        with pytest.raises(TaskTimeout):
            await scheduler.run("ctl/sleep", 10, timeout=0.05)
        current = asyncio.current_task()
        assert current is not None and current.cancelling() == 0
        assert (await scheduler.run("ctl/echo", "after")).outputs == "after"


# -- Cancellation ----------------------------------------------------------------------------------


async def test_cancel_queued_and_running() -> None:
    scheduler, ctl = make(cpu=1)
    async with scheduler:
        running = scheduler.submit(Request("ctl/gate", "running"))
        queued = scheduler.submit(Request("ctl/echo", "queued"))
        await settle()
        assert queued.cancel() is True
        assert running.cancel() is True
        assert running.cancel() is False  # already ended
        with pytest.raises(TaskCancelled):
            await queued.result()
        with pytest.raises(TaskCancelled):
            await running.result()
        await settle()
        assert scheduler.idle
        assert "queued" not in ctl.started
        assert (await scheduler.run("ctl/echo", 1)).outputs == 1


async def test_cancelled_blocking_task_keeps_its_resources_until_the_thread_returns() -> None:
    scheduler, ctl = make(cpu=1)
    async with scheduler:
        handle = scheduler.submit(Request("ctl/block", 0.3))
        await asyncio.sleep(0.05)
        handle.cancel()
        with pytest.raises(TaskCancelled):
            await handle.result()
        assert ctl.contexts[0.3].cancelled
        assert scheduler.stats().in_use.cpu == 1  # the thread still runs: its core is still taken
        follower = scheduler.submit(Request("ctl/echo", "after"))
        await settle()
        assert follower.state is TaskState.QUEUED
        assert (await follower.result()).outputs == "after"
        await settle()
        assert scheduler.idle


async def test_cancelling_run_cancels_its_task() -> None:
    scheduler, _ = make()
    async with scheduler:
        caller = asyncio.create_task(scheduler.run("ctl/sleep", 10))
        await asyncio.sleep(0.05)
        assert scheduler.stats().running == 1  # started at once, inline in the caller's task
        caller.cancel()
        done, _ = await asyncio.wait([caller], timeout=5)
        assert done, "the caller did not see its cancellation"
        assert caller.cancelled()
        await settle()
        assert scheduler.stats().finished["cancelled"] == 1
        assert scheduler.idle


# A task whose end admits the next queued one hands that one its asyncio task (the scheduler's
# _run): these check that a cancellation of one task never reaches the next in the same asyncio task.


def _probe() -> tuple[FunctionExecutor, dict[str, asyncio.Event], list[tuple[str, asyncio.Task[object] | None, int]]]:
    """An executor whose ``wait`` tasks wait for ``gates[inputs]`` (when there is one) and record
    (inputs, the asyncio task they ran in, its pending cancellations)."""
    probe = FunctionExecutor("probe")
    gates: dict[str, asyncio.Event] = {}
    ran: list[tuple[str, asyncio.Task[object] | None, int]] = []

    @probe.algorithm(resources=Resources(cpu=1))
    async def wait(inputs: str) -> str:
        task = asyncio.current_task()
        ran.append((inputs, task, task.cancelling() if task else -1))
        if inputs in gates:
            await gates[inputs].wait()
        return inputs

    return probe, gates, ran


async def test_a_cancelled_task_leaves_the_next_one_run_in_its_asyncio_task_uncancelled() -> None:
    probe, gates, ran = _probe()
    gates["first"], gates["second"] = asyncio.Event(), asyncio.Event()
    async with Scheduler(Registry([probe]), capacity=Resources(cpu=1), config=Config()) as scheduler:
        first = scheduler.submit(Request("probe/wait", "first"))
        second = scheduler.submit(Request("probe/wait", "second"))
        await settle()
        first.cancel()
        await settle()
        assert second.state is TaskState.RUNNING
        gates["second"].set()
        assert (await second.result()).outputs == "second"
        with pytest.raises(TaskCancelled):
            await first.result()
    # the second ran in the first one's asyncio task, with no cancellation left pending on it
    assert [(name, task is ran[0][1], cancelling) for name, task, cancelling in ran] == [
        ("first", True, 0), ("second", True, 0)]


async def test_a_task_that_cancels_itself_and_returns_does_not_cancel_the_next() -> None:
    probe = FunctionExecutor("self")
    async with Scheduler(Registry([probe]), capacity=Resources(cpu=1), config=Config()) as scheduler:

        @probe.algorithm(resources=Resources(cpu=1))
        async def quit(inputs: str, ctx: TaskContext) -> str:
            if inputs == "quitter":
                handle = scheduler.task(ctx.task_id)
                assert handle is not None
                handle.cancel()  # a cancellation of its own asyncio task, pending when it returns
            return inputs

        quitter = scheduler.submit(Request("self/quit", "quitter"))
        after = scheduler.submit(Request("self/quit", "after"))
        with pytest.raises(TaskCancelled):
            await quitter.result()
        assert (await after.result()).outputs == "after"
        assert scheduler.stats().finished == {"succeeded": 1, "failed": 0, "cancelled": 1, "timed_out": 0}


async def test_a_task_cancelled_before_its_first_step_never_runs_and_the_queue_goes_on() -> None:
    probe, gates, ran = _probe()
    gates["first"] = asyncio.Event()
    async with Scheduler(Registry([probe]), capacity=Resources(cpu=1), config=Config()) as scheduler:
        handles = {name: scheduler.submit(Request("probe/wait", name)) for name in ("first", "second", "third")}

        def cancel_second_at_start(event: TaskEvent) -> None:
            if event.kind == "started" and event.task_id == handles["second"].id:
                handles["second"].cancel()  # admitted by the first one's end, not begun

        scheduler.subscribe(cancel_second_at_start)
        await settle()
        gates["first"].set()
        assert (await handles["third"].result()).outputs == "third"
        with pytest.raises(TaskCancelled):
            await handles["second"].result()
        await settle()
        assert scheduler.idle
    assert [name for name, _, _ in ran] == ["first", "third"]


async def test_cancelling_our_asyncio_task_between_two_tasks_ends_the_one_it_was_to_run() -> None:
    # what asyncio.run does to tasks left at its end, for one: someone else cancels the asyncio
    # task that was handed the next record, before that record's first step
    probe, gates, ran = _probe()
    gates["first"] = asyncio.Event()
    events: list[tuple[str, str]] = []
    async with Scheduler(Registry([probe]), capacity=Resources(cpu=1), config=Config()) as scheduler:
        handles = {name: scheduler.submit(Request("probe/wait", name)) for name in ("first", "second", "third")}

        def cancel_the_asyncio_task(event: TaskEvent) -> None:
            events.append((event.kind, event.task_id))
            if event.kind == "started" and event.task_id == handles["second"].id:
                task = asyncio.current_task()  # the first one's, still ending: it runs the second next
                assert task is ran[0][1]
                task.cancel()

        scheduler.subscribe(cancel_the_asyncio_task)
        await settle()
        gates["first"].set()
        assert (await handles["first"].result()).outputs == "first"
        with pytest.raises(TaskCancelled):
            await handles["second"].result()
        assert (await handles["third"].result()).outputs == "third"
        await settle()
        assert scheduler.idle
    assert [name for name, _, _ in ran] == ["first", "third"]
    second = handles["second"].id
    assert [kind for kind, task_id in events if task_id == second] == ["started", "cancelled"]


async def test_a_cancelled_error_the_code_meets_ends_the_task_cancelled() -> None:
    probe = FunctionExecutor("stray")

    @probe.algorithm(resources=Resources(cpu=1))
    async def awaits_a_cancelled_future(inputs: str) -> str:
        if inputs == "stray":
            future = asyncio.get_running_loop().create_future()
            future.cancel()
            await future  # raises CancelledError though nobody cancelled this task
        return inputs

    async with Scheduler(Registry([probe]), capacity=Resources(cpu=1), config=Config()) as scheduler:
        stray = scheduler.submit(Request("stray/awaits_a_cancelled_future", "stray"))
        after = scheduler.submit(Request("stray/awaits_a_cancelled_future", "after"))
        with pytest.raises(TaskCancelled):
            await asyncio.wait_for(stray.result(), 5)
        assert (await asyncio.wait_for(after.result(), 5)).outputs == "after"
        await settle()
        assert scheduler.idle


# -- Retries ---------------------------------------------------------------------------------------


async def test_retryable_errors_are_retried_with_backoff() -> None:
    config = Config(retries=3, retry_backoff=0.01)
    scheduler, ctl = make(config=config)
    async with scheduler:
        events: list[str] = []
        scheduler.subscribe(lambda event: events.append(event.kind))
        response = await scheduler.run("ctl/fail", "x", params={"retryable": True, "succeed_after": 2})
        assert response.outputs == "recovered"
    assert ctl.calls == 3
    assert events.count("retrying") == 2
    assert events[-1] == "succeeded"


async def test_non_retryable_errors_fail_once_and_retries_run_out() -> None:
    scheduler, ctl = make(config=Config(retries=2, retry_backoff=0.001))
    async with scheduler:
        with pytest.raises(ExecutorError, match="failure 1"):
            await scheduler.run("ctl/fail", "x")
        assert ctl.calls == 1
        handle = scheduler.submit(Request("ctl/fail", "y", params={"retryable": True}, retries=1))
        with pytest.raises(ExecutorError, match="failure 3"):
            await handle.result()
        assert handle.attempts == 2
        assert handle.state is TaskState.FAILED


_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="none")


@pytest.mark.parametrize("queued", [False, True])
async def test_each_attempt_starts_from_the_submitters_context(queued: bool) -> None:
    # docs/scheduler.md, "Context variables": a retry sees the submitter's values, not what the
    # attempt before it set (admitted at once or from the queue)
    flaky = FunctionExecutor("flaky")
    seen: list[tuple[str, str]] = []
    gate = asyncio.Event()

    @flaky.algorithm(resources=Resources(cpu=1))
    async def note(inputs: str) -> str:
        seen.append((inputs, _tenant.get()))
        _tenant.set("set by an attempt")
        if inputs == "before":
            await gate.wait()  # holds the only core while the other one is submitted
        if inputs == "retried" and len([name for name, _ in seen if name == inputs]) == 1:
            raise ExecutorError("once", retryable=True)
        return inputs

    async def submit_as_tenant(scheduler: Scheduler) -> TaskHandle:
        _tenant.set("tenant")
        return scheduler.submit(Request("flaky/note", "retried", retries=1))

    config = Config(retry_backoff=0.001)
    async with Scheduler(Registry([flaky]), capacity=Resources(cpu=1), config=config) as scheduler:
        before = scheduler.submit(Request("flaky/note", "before")) if queued else None
        await settle()
        handle = await asyncio.create_task(submit_as_tenant(scheduler))
        if before is not None:
            assert handle.state is TaskState.QUEUED and handle.attempts == 0
            gate.set()
        assert (await handle.result()).outputs == "retried"
        assert handle.attempts == 2
        if before is not None:
            assert (await before.result()).outputs == "before"
    assert [tenant for name, tenant in seen if name == "retried"] == ["tenant", "tenant"]


# -- Backpressure and closing ----------------------------------------------------------------------


async def test_queue_bound_raises_or_waits() -> None:
    scheduler, ctl = make(cpu=1, max_queue=2)
    async with scheduler:
        running = scheduler.submit(Request("ctl/gate", "r"))
        queued = [scheduler.submit(Request("ctl/gate", i)) for i in range(2)]
        with pytest.raises(QueueFull, match="max_queue=2"):
            scheduler.submit(Request("ctl/echo"))
        waiter = asyncio.create_task(scheduler.asubmit(Request("ctl/echo", "waited")))
        await settle()
        assert not waiter.done()
        ctl.release("r")
        ctl.release(0)
        ctl.release(1)
        handle = await waiter
        assert (await handle.result()).outputs == "waited"
        await asyncio.gather(running.result(), *(h.result() for h in queued))


async def test_close_drains_queued_work_by_default() -> None:
    scheduler, ctl = make(cpu=1)
    async with scheduler:
        handles = [scheduler.submit(Request("ctl/sleep", 0.01)) for _ in range(5)]
    assert all(h.state is TaskState.SUCCEEDED for h in handles)
    assert not ctl.closed  # the registry was ours, so closing it is ours too
    await scheduler.registry.aclose()
    assert ctl.closed
    with pytest.raises(SchedulerClosed):
        scheduler.submit(Request("ctl/echo"))


async def test_close_with_cancel_ends_everything_and_an_error_in_the_body_cancels() -> None:
    scheduler, _ = make(cpu=1, config=Config(close="cancel"))
    async with scheduler:
        handles = [scheduler.submit(Request("ctl/sleep", 10)) for _ in range(3)]
    assert [h.state for h in handles] == [TaskState.CANCELLED] * 3
    assert scheduler.idle

    scheduler, _ = make(cpu=1)
    with pytest.raises(RuntimeError, match="boom"):
        async with scheduler:
            handle = scheduler.submit(Request("ctl/sleep", 10))
            raise RuntimeError("boom")
    assert handle.state is TaskState.CANCELLED


async def test_submit_before_start_is_a_clear_error() -> None:
    scheduler, _ = make()
    with pytest.raises(SchedulerClosed, match="async with"):
        scheduler.submit(Request("ctl/echo"))


# -- Observing -------------------------------------------------------------------------------------


async def test_stream_yields_chunks_in_order_and_progress_is_reported() -> None:
    scheduler, _ = make()
    async with scheduler:
        progress: list[float] = []
        scheduler.subscribe(lambda e: progress.append(e.progress) if e.kind == "progress" else None)
        handle = scheduler.submit(Request("ctl/stream", 4))
        chunks = [chunk async for chunk in handle.stream()]
        assert chunks == [0, 1, 2, 3]
        assert (await handle.result()).outputs == 4
        assert progress == [0.25, 0.5, 0.75, 1.0]
        assert handle.progress == 1.0


async def test_a_reader_that_leaves_mid_chunk_leaves_it_for_the_next_reader() -> None:
    scheduler, _ = make()
    async with scheduler:
        handle = scheduler.submit(Request("ctl/stream", 4))
        await handle.result()
        first = handle.stream()
        assert [await anext(first), await anext(first)] == [0, 1]
        await first.aclose()  # left while holding chunk 1: it was never taken
        assert not handle.streaming
        assert [chunk async for chunk in handle.stream()] == [1, 2, 3]
        assert handle.response is not None and handle.response.outputs == 4
        handle.drop_outputs()
        assert handle.response.outputs is None


async def test_stream_raises_the_task_error_after_the_chunks() -> None:
    scheduler, _ = make()
    async with scheduler:
        handle = scheduler.submit(Request("ctl/stream", 1000, params={"delay": 0.01}, timeout=0.05))
        chunks = []
        with pytest.raises(TaskTimeout):
            async for chunk in handle.stream():
                chunks.append(chunk)
                await asyncio.sleep(0.001)
        assert chunks[:3] == [0, 1, 2]


async def test_observers_see_each_task_end_exactly_once() -> None:
    scheduler, _ = make(cpu=1)
    ends: dict[str, list[str]] = {}

    def observe(event):  # type: ignore[no-untyped-def]
        if event.state.terminal:
            ends.setdefault(event.task_id, []).append(event.kind)

    async with scheduler:
        scheduler.subscribe(observe)
        scheduler.subscribe(lambda event: 1 / 0)  # a broken observer changes nothing
        ok = scheduler.submit(Request("ctl/echo", 1))
        bad = scheduler.submit(Request("ctl/fail", 2))
        cancelled = scheduler.submit(Request("ctl/gate", 3))
        cancelled.cancel()
        for handle in (ok, bad, cancelled):
            with contextlib.suppress(EdgeComputeError):
                await handle.result()
    assert ends == {ok.id: ["succeeded"], bad.id: ["failed"], cancelled.id: ["cancelled"]}


async def test_result_waiters_are_independent_of_each_other() -> None:
    scheduler, ctl = make()
    async with scheduler:
        handle = scheduler.submit(Request("ctl/gate", "g"))
        first = asyncio.create_task(handle.result())
        second = asyncio.create_task(handle.result())
        await settle()
        first.cancel()  # giving up on one wait does not cancel the task or the other wait
        ctl.release("g")
        assert (await second).outputs == "g"
        assert handle.state is TaskState.SUCCEEDED


async def test_done_callbacks_run_in_finishing_order_and_at_once_when_done() -> None:
    scheduler, ctl = make(cpu=2)
    async with scheduler:
        finished: list[str] = []
        first = scheduler.submit(Request("ctl/gate", "first"))
        second = scheduler.submit(Request("ctl/gate", "second"))
        first.add_done_callback(lambda h: finished.append(h.request.inputs))
        second.add_done_callback(lambda h: finished.append(h.request.inputs))
        second.add_done_callback(lambda h: 1 / 0)  # a broken callback is logged, nothing more
        ctl.release("second")
        await second.result()
        ctl.release("first")
        await first.result()
        first.add_done_callback(lambda h: finished.append("late"))
    assert finished == ["second", "first", "late"]
