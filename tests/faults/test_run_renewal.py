"""A case run renews its lock (Redis) or lease (cold tier) for as long as it lives, and a
renewal that finds it taken stops the run: it writes no checkpoint and no record after.

The refund step is held open (the app's pause hook) for several lock TTLs, so the
run outlives its first TTL many times over.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from state.errors import LockNotAcquired, VersionConflict
from state.hot.redis_client import create_redis_client
from state.hot.redis_store import LOCK_KIND, RedisHotStore
from state.settings import Settings
from state.tiered import TieredStateStore
from support_cases.api import create_app
from support_cases.auth import ROLE_REVIEW
from support_cases.models import CaseStatus, FollowUp
from support_cases.runs import RUN_SECTION
from support_cases.runtime import Runtime
from support_cases.service import RUN_LEASE_SECTION, run_lock_name
from tests.step_pause import pause_after

from .apps import open_runtime, submission

LOCK_TTL_MS = 900
PAUSE_SECONDS = 3.0
# The app's test hook that holds a step open (an environment variable, read per call).
# The refund step is held open this long, for several lock TTLs.
PAUSE_REFUND = pause_after(f"refund={PAUSE_SECONDS}")


def run_settings(settings_for: Callable[..., Settings], backend: str, tier: str) -> Settings:
    overrides: dict[str, object] = {
        "state_lock_ttl_ms": LOCK_TTL_MS,
        "case_sync_wait_seconds": 0,
        "state_write_mode": "write-through",
    }
    if tier == "cold":
        overrides.update(redis_url=None)
    return settings_for(backend, **overrides)


async def wait_for_step(store: TieredStateStore, case_id: str, section: str) -> None:
    for _ in range(600):
        record = await store.get(case_id)
        if record is not None and section in record.sections:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"case {case_id}: no {section!r} section")


async def take_over(runtime: Runtime, case_id: str, tier: str) -> int:
    """Another runner takes the case over (its `tier`'s lock or lease), as after a pause
    past the TTL; its fencing token."""
    store = runtime.store
    if tier == "redis":
        hot = runtime.backends.hot
        assert isinstance(hot, RedisHotStore)
        raw = create_redis_client(runtime.settings)
        try:
            await raw.delete(hot.key(run_lock_name(case_id), LOCK_KIND))
        finally:
            await raw.aclose()
        return (await store.lock(run_lock_name(case_id), ttl_ms=60_000)).fence
    # Read again on a conflict, as a runner claiming the lease does: the running one's keeper
    # renews its lease (and writes its heartbeat) meanwhile.
    for _ in range(20):
        record = await store.get(case_id)
        assert record is not None
        fence = record.fence + 1
        try:
            await store.update_section(
                case_id,
                RUN_LEASE_SECTION,
                {"token": "the-taker", "until": 4_000_000_000},
                agent_id="taker",
                expected_version=record.version,
                fencing_token=fence,
            )
        except VersionConflict:
            continue
        return fence
    raise AssertionError(f"case {case_id}: the lease could not be taken over")


@pytest.mark.parametrize("tier", ["redis", "cold"])
async def test_a_run_longer_than_its_lock_ttl_keeps_its_lock(
    tier: str, settings_for: Callable[..., Settings]
) -> None:
    case_id = f"renew-{tier}-{uuid.uuid4().hex[:10]}"
    async with open_runtime(
        run_settings(settings_for, "postgres", tier), after_step=PAUSE_REFUND
    ) as app:
        store, service = app.runtime.store, app.runtime.service
        await service.submit(submission(case_id), None)
        await wait_for_step(store, case_id, "refund")
        # Held open for over three TTLs by now: without renewals anyone could take it.
        await asyncio.sleep(3 * LOCK_TTL_MS / 1000)
        if tier == "redis":
            with pytest.raises(LockNotAcquired):
                await store.lock(run_lock_name(case_id), ttl_ms=LOCK_TTL_MS)
        else:
            record = await store.get(case_id)
            assert record is not None
            lease = record.sections[RUN_LEASE_SECTION]
            assert lease["token"] and lease["until"] > time.time()
        await service.wait_idle()
        assert (await service.status(case_id)).status is CaseStatus.COMPLETED


@pytest.mark.parametrize("tier", ["redis", "cold"])
async def test_a_renewal_that_finds_the_lock_taken_stops_the_run(
    tier: str, settings_for: Callable[..., Settings]
) -> None:
    case_id = f"taken-{tier}-{uuid.uuid4().hex[:10]}"
    async with open_runtime(
        run_settings(settings_for, "postgres", tier), after_step=PAUSE_REFUND
    ) as app:
        runtime = app.runtime
        store, service = runtime.store, runtime.service
        await service.submit(submission(case_id), None)
        await wait_for_step(store, case_id, "refund")
        fence = await take_over(runtime, case_id, tier)
        checkpoints = [
            c async for c in runtime.saver.alist({"configurable": {"thread_id": case_id}})
        ]
        # The next renewal (within a third of the TTL) finds it taken and stops the run,
        # long before the refund step's pause ends.
        await asyncio.wait_for(service.wait_idle(), timeout=LOCK_TTL_MS / 1000)
        await asyncio.sleep(PAUSE_SECONDS)  # past where the step would have gone on
        after = [c async for c in runtime.saver.alist({"configurable": {"thread_id": case_id}})]
        assert [c.config for c in after] == [c.config for c in checkpoints]
        record = await store.get(case_id)
        assert record is not None
        assert record.sections[RUN_SECTION]["status"] == CaseStatus.RUNNING.value
        assert "response" not in record.sections
        if tier == "cold":
            assert record.fence == fence  # no write of the stopped run landed after the claim


@pytest.mark.parametrize("tier", ["redis", "cold"])
async def test_a_decision_whose_run_another_runner_took_over_is_not_answered_200(
    tier: str, settings_for: Callable[..., Settings], issue_token: Callable[..., str]
) -> None:
    """The reviewer waits for the decision's run, which loses the case to another runner
    mid-way and stops: the answer says so (409, the app's error shape), not 200 with the
    case as the other runner has it, as if the decision's run had come to rest."""
    case_id = f"decided-{tier}-{uuid.uuid4().hex[:10]}"
    settings = run_settings(settings_for, "postgres", tier).model_copy(
        update={"case_sync_wait_seconds": 30.0}
    )
    async with open_runtime(settings, after_step=PAUSE_REFUND) as app:
        runtime = app.runtime
        store, service = runtime.store, runtime.service
        await service.submit(submission(case_id, amount=750.0), None)
        assert (await service.status(case_id)).status is CaseStatus.AWAITING_REVIEW
        transport = httpx.ASGITransport(app=create_app(runtime))
        reviewer = {"Authorization": f"Bearer {issue_token('lost-run-reviewer', [ROLE_REVIEW])}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://f.test") as http:
            deciding = asyncio.ensure_future(
                http.post(
                    f"/api/cases/{case_id}/review",
                    json={"decision": "approve"},
                    headers=reviewer,
                    timeout=60,
                )
            )
            await wait_for_step(store, case_id, "refund")
            await take_over(runtime, case_id, tier)
            answer = await asyncio.wait_for(deciding, timeout=PAUSE_SECONDS * 3)
        assert answer.status_code == 409, answer.text
        assert case_id in answer.json()["error"], answer.text
        await service.wait_idle()
        # The stopped run wrote nothing after losing the case: the taker's to finish.
        record = await store.get(case_id)
        assert record is not None
        assert record.sections[RUN_SECTION]["status"] == CaseStatus.RUNNING.value
        assert "response" not in record.sections


async def test_a_submit_whose_first_run_another_runner_took_over_is_not_reported_finished(
    settings_for: Callable[..., Settings],
) -> None:
    """As for a decision, a submit waiting for its case's first run, which loses the case
    mid-way: the case was created (not a 409, which would read "not created"), and its
    run is not reported at rest (201), but going on elsewhere (202)."""
    case_id = f"submitted-{uuid.uuid4().hex[:10]}"
    settings = run_settings(settings_for, "postgres", "redis").model_copy(
        update={"case_sync_wait_seconds": 30.0}
    )
    async with open_runtime(settings, after_step=PAUSE_REFUND) as app:
        runtime = app.runtime
        submitting = asyncio.ensure_future(runtime.service.submit(submission(case_id), None))
        await wait_for_step(runtime.store, case_id, "refund")
        await take_over(runtime, case_id, "redis")
        outcome = await asyncio.wait_for(submitting, timeout=PAUSE_SECONDS * 3)
        assert outcome.created
        assert not outcome.finished
        assert outcome.view.status is CaseStatus.RUNNING
        await runtime.service.wait_idle()


async def test_a_queue_whose_case_another_runner_took_over_between_runs_is_not_an_error(
    settings_for: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A follow-up's queue, in the background: another runner takes the case over (its
    lease, as after a pause past the TTL) just as the holder starts the next queued run,
    whose start its fence then fails. That is a runner losing the case, said at warning
    level as it is mid-run, not a background run logged as failed at error level."""
    case_id = f"queue-taken-{uuid.uuid4().hex[:10]}"
    async with open_runtime(run_settings(settings_for, "postgres", "cold")) as app:
        runtime = app.runtime
        service, tracker = runtime.service, runtime.service._tracker
        await service.submit(submission(case_id), None)
        await service.wait_idle()
        start_next = tracker.start_next

        async def taken_over_first(name: str, *args: Any, **kwargs: Any) -> Any:
            if name == case_id:
                await take_over(runtime, case_id, "cold")
            return await start_next(name, *args, **kwargs)

        monkeypatch.setattr(tracker, "start_next", taken_over_first)
        with caplog.at_level(logging.WARNING, logger="support_cases.service"):
            await service.post_message(case_id, FollowUp(text="Thanks, that's all"), None)
            await service.wait_idle()
        named = [r for r in caplog.records if case_id in r.getMessage()]
        assert named, caplog.text
        assert all(r.levelno < logging.ERROR for r in named), caplog.text
        record = await runtime.store.get(case_id)
        assert record is not None
        assert [e["status"] for e in record.sections["runs"]][-1] == "queued", record.sections


async def test_a_run_alive_in_a_step_longer_than_the_stale_period_is_not_resumed(
    settings_for: Callable[..., Settings],
) -> None:
    """Worker A runs the case under the Redis run lock, its refund step held open past the
    stale period (renewing its lock all along). Worker B, cut off from Redis, guards with
    the cold-tier lease, which the run lock knows nothing of: only the run's heartbeat tells
    B the run is alive, so a renewing runner must keep it fresh within a long step."""
    case_id = f"renew-alive-{uuid.uuid4().hex[:10]}"
    shared: dict[str, object] = {
        "state_lock_ttl_ms": LOCK_TTL_MS,
        "case_sync_wait_seconds": 0,
        "state_write_mode": "write-through",
        "case_stale_after_seconds": 1,
    }
    async with (
        open_runtime(settings_for("postgres", **shared), after_step=PAUSE_REFUND) as a,
        open_runtime(settings_for("postgres", redis_url=None, **shared)) as b,
    ):
        await a.runtime.service.submit(submission(case_id), None)
        await wait_for_step(a.runtime.store, case_id, "refund")
        await asyncio.sleep(2.0)  # past the stale period, A still inside its refund step

        assert (await a.runtime.service.status(case_id)).status is CaseStatus.RUNNING
        report = await b.runtime.service.resume_stale()
        await b.runtime.service.wait_idle()
        await a.runtime.service.wait_idle()

        assert case_id not in report.resumed, f"B resumed A's live run: {report}"
        record = await a.runtime.backends.cold.get(case_id)
        assert record is not None
        assert record.sections[RUN_SECTION]["status"] == CaseStatus.COMPLETED.value
