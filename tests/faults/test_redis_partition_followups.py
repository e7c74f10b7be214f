"""Follow-up messages under a partition of one worker from Redis (see
test_redis_partition_one_worker.py for the setup): a follow-up B runs after A, cut off,
moved the case on must go on from what A acknowledged, not from the older checkpoint
Redis still holds."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from devstack import RedisServer
from support_cases.effects import idempotency_key
from support_cases.models import CaseStatus, FollowUp, FollowUpStrategy
from support_cases.settings import AppSettings

from .apps import open_runtime, review_case
from .proxy import LoopbackProxy


@pytest.fixture
def redis_proxy(
    redis_server: Callable[..., RedisServer],
) -> Iterator[tuple[RedisServer, LoopbackProxy]]:
    server = redis_server()
    proxy = LoopbackProxy(server.port).start()
    try:
        yield server, proxy
    finally:
        proxy.stop()


@pytest.mark.parametrize("strategy", [FollowUpStrategy.ENQUEUE, FollowUpStrategy.INTERRUPT])
@pytest.mark.parametrize("backend", ["postgres"])
async def test_a_follow_up_run_by_another_worker_goes_on_from_a_cut_off_workers_decision(
    backend: str,
    strategy: FollowUpStrategy,
    settings_for: Callable[..., AppSettings],
    redis_proxy: tuple[RedisServer, LoopbackProxy],
) -> None:
    """A, cut off from Redis, approves a case (refund paid, case completed). The
    customer's follow-up reaches B, which reaches Redis: its run must start from the
    approved state (the decision stands for follow-ups), not from the interrupt
    checkpoint Redis still caches (which asks for review again, the approval lost)."""
    server, proxy = redis_proxy
    direct = f"redis://127.0.0.1:{server.port}/0"
    through = f"redis://127.0.0.1:{proxy.port}/0"
    async with (
        open_runtime(settings_for(backend, redis_url=through)) as a,
        open_runtime(settings_for(backend, redis_url=direct)) as b,
    ):
        case_id = f"partition-followup-{uuid.uuid4().hex[:8]}"
        await review_case(b, case_id)
        for app in (a, b):
            assert (await app.runtime.service.status(case_id)).status is CaseStatus.AWAITING_REVIEW
        try:
            proxy.cut("reset")
            approved = await a.decide(case_id, "approve", "alice")
            await a.runtime.service.wait_idle()
            assert approved.accepted, approved
            assert (await a.runtime.service.status(case_id)).status is CaseStatus.COMPLETED

            sent = await b.runtime.service.post_message(
                case_id, FollowUp(text="thanks, when will I see it?", strategy=strategy), None
            )
            await b.runtime.service.wait_idle()
        finally:
            proxy.restore()
        record = await b.runtime.backends.cold.get(case_id)
        assert record is not None
        run = record.sections["run"]
        review = record.sections.get("review")
        runs = {e["run_id"]: e["status"] for e in record.sections["runs"]}
        performed = await b.runtime.provider.performed(idempotency_key(case_id, "refund"))
        state = await b.runtime.service._graph.aget_state({"configurable": {"thread_id": case_id}})
        assert len(performed) == 1, performed
        assert review is not None and review["decision"] == "approve", review
        assert "review" in state.values and not state.interrupts, (
            f"the follow-up {sent.run.run_id} ran from a state without A's approval: "
            f"interrupts {state.interrupts}, case {run['status']}, runs {runs}"
        )
        assert run["status"] == CaseStatus.COMPLETED.value, (run, runs)
