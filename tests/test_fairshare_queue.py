"""The fair admission queue, deterministically: a fake engine that runs what the queue lets in."""

from __future__ import annotations

import asyncio

import pytest

from agencyllm.serving.gateway.fairshare import FairQueue, QueueRefused, Ticket

ENGINES: list[FakeEngine] = []


@pytest.fixture(autouse=True)
async def no_request_outlives_its_test():
    yield
    for engine in ENGINES:
        for task in engine.tasks.values():
            task.cancel()
        await asyncio.gather(*engine.tasks.values(), return_exceptions=True)
    ENGINES.clear()


class FakeEngine:
    """Records the order in which requests get a slot; each runs until the test finishes it."""

    def __init__(self, queue: FairQueue) -> None:
        ENGINES.append(self)
        self.queue = queue
        self.started: list[str] = []
        self._done: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task] = {}

    def submit(self, name: str, ticket: Ticket) -> asyncio.Task:
        self._done[name] = asyncio.Event()

        async def run():
            async with await self.queue.acquire(ticket):
                self.started.append(name)
                await self._done[name].wait()

        task = asyncio.ensure_future(run())
        self.tasks[name] = task
        return task

    async def finish(self, name: str) -> None:
        self._done[name].set()
        await self.tasks[name]

    async def settle(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0)


def a(tenant: str, cls: str = "interactive", share: float = 1.0) -> Ticket:
    return Ticket(tenant=tenant, share=share, traffic_class=cls)


async def test_a_lone_tenant_uses_every_slot():
    engine = FakeEngine(FairQueue(4, interactive_reserve=1))
    for i in range(4):
        engine.submit(f"a{i}", a("alpha"))
    await engine.settle()
    assert engine.started == ["a0", "a1", "a2", "a3"]
    assert engine.queue.running == 4
    for i in range(4):
        await engine.finish(f"a{i}")
    assert engine.queue.running == 0


async def test_one_request_is_not_pushed_out_by_fifty_waiting():
    queue = FairQueue(2)
    engine = FakeEngine(queue)
    for i in range(52):
        engine.submit(f"b{i}", a("bravo"))
    await engine.settle()
    engine.submit("a0", a("alpha"))
    await engine.settle()
    assert engine.started == ["b0", "b1"]
    await engine.finish("b0")
    await engine.settle()
    # The freed slot goes to alpha (0 running) before bravo's 50 waiting requests.
    assert engine.started[-1] == "a0"


async def test_slots_follow_the_shares_under_contention():
    queue = FairQueue(4)
    engine = FakeEngine(queue)
    for i in range(4):  # bravo alone fills the engine (work-conserving)
        engine.submit(f"b{i}", a("bravo", share=1))
    await engine.settle()
    for i in range(20):
        engine.submit(f"a{i}", a("alpha", share=3))
        engine.submit(f"b{i + 4}", a("bravo", share=1))
    await engine.settle()
    # As bravo's running requests finish, alpha (share 3) takes slots until it runs 3 to bravo's 1.
    for name in ("b0", "b1", "b2"):
        await engine.finish(name)
        await engine.settle()
    assert queue.load("alpha").running == 3
    assert queue.load("bravo").running == 1
    order = []
    for _ in range(16):  # steady state: every finished slot goes back to the same side's share
        running = [n for n in engine.started if not engine.tasks[n].done()]
        await engine.finish(running[0])
        await engine.settle()
        order.append(engine.started[-1][0])
        assert queue.load("alpha").running + queue.load("bravo").running == 4
    assert order.count("a") == 3 * order.count("b")


async def test_the_interactive_reserve_is_never_taken_by_batch_work():
    queue = FairQueue(4, interactive_reserve=1)
    engine = FakeEngine(queue)
    for i in range(10):
        engine.submit(f"b{i}", a("bravo", "batch"))
    await engine.settle()
    assert queue.running == 3 and queue.batch_running == 3
    await engine.finish("b0")
    await engine.settle()
    assert queue.batch_running == 3  # a batch request took b0's slot, never the reserved one
    engine.submit("a0", a("alpha"))
    await engine.settle()
    assert engine.started[-1] == "a0"
    assert queue.running == 4


async def test_interactive_before_batch_within_a_tenant():
    queue = FairQueue(1)
    engine = FakeEngine(queue)
    engine.submit("first", a("alpha", "batch"))
    await engine.settle()
    engine.submit("bulk", a("alpha", "batch"))
    engine.submit("chat", a("alpha", "interactive"))
    await engine.settle()
    await engine.finish("first")
    await engine.settle()
    assert engine.started == ["first", "chat"]


async def test_a_request_waiting_past_its_limit_is_refused_and_leaves_the_queue():
    queue = FairQueue(1, max_wait_seconds=0.05)
    engine = FakeEngine(queue)
    engine.submit("busy", a("bravo"))
    await engine.settle()
    with pytest.raises(QueueRefused) as refused:
        await queue.acquire(a("alpha"))
    assert refused.value.reason == "wait_timeout" and refused.value.retry_after >= 1
    assert queue.waiting == 0
    await engine.finish("busy")
    assert queue.running == 0


async def test_the_queue_per_tenant_is_bounded():
    queue = FairQueue(1, max_queued_per_tenant=2)
    engine = FakeEngine(queue)
    for name in ("run", "w1", "w2"):
        engine.submit(name, a("bravo"))
    await engine.settle()
    with pytest.raises(QueueRefused) as refused:
        await queue.acquire(a("bravo"))
    assert refused.value.reason == "queue_full"
    engine.submit("other", a("alpha"))  # another tenant still queues
    await engine.settle()
    assert queue.load("alpha").waiting == 1


async def test_a_cancelled_waiter_frees_its_place_and_a_cancelled_runner_its_slot():
    queue = FairQueue(1)
    engine = FakeEngine(queue)
    engine.submit("run", a("bravo"))
    engine.submit("wait", a("alpha"))
    await engine.settle()
    engine.tasks["wait"].cancel()
    await engine.settle()
    assert queue.waiting == 0
    engine.tasks["run"].cancel()
    await engine.settle()
    assert queue.running == 0 and queue.load("bravo").running == 0


async def test_two_equal_tenants_flooding_get_equal_slots():
    queue = FairQueue(6)
    engine = FakeEngine(queue)
    for i in range(30):
        engine.submit(f"a{i}", a("alpha"))
        engine.submit(f"b{i}", a("bravo"))
    await engine.settle()
    for _ in range(24):
        running = [n for n in engine.started if not engine.tasks[n].done()]
        await engine.finish(running[0])
        await engine.settle()
        assert abs(queue.load("alpha").running - queue.load("bravo").running) <= 1
    started = engine.started
    assert abs(sum(n[0] == "a" for n in started) - sum(n[0] == "b" for n in started)) <= 1


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        FairQueue(0)
    with pytest.raises(ValueError):
        FairQueue(2, interactive_reserve=2)


async def test_a_newcomer_below_its_share_starts_at_once_in_a_burst_slot_paid_back_next():
    queue = FairQueue(4, burst=1)
    engine = FakeEngine(queue)
    for i in range(10):
        engine.submit(f"b{i}", a("bravo"))
    await engine.settle()
    engine.submit("a0", a("alpha"))
    await engine.settle()
    assert engine.started[-1] == "a0" and queue.running == 5  # no wait for a running request to end
    engine.submit("c0", a("charlie"))
    await engine.settle()
    assert "c0" not in engine.started  # one burst slot only: charlie waits for the next free slot
    await engine.finish("b0")
    await engine.settle()
    assert queue.running == 4 and "c0" not in engine.started  # b0's slot paid the burst back
    await engine.finish("b1")
    await engine.settle()
    assert engine.started[-1] == "c0"  # then charlie (0 running) before bravo's waiting requests


async def test_batch_work_and_tenants_at_their_share_never_burst():
    queue = FairQueue(2, burst=1)
    engine = FakeEngine(queue)
    engine.submit("b0", a("bravo"))
    engine.submit("a0", a("alpha"))
    await engine.settle()
    engine.submit("a1", a("alpha"))  # alpha holds its fair share (1 of 2): it waits
    engine.submit("c0", a("charlie", "batch"))  # batch never bursts
    await engine.settle()
    assert queue.running == 2 and engine.started == ["b0", "a0"]
