"""Requests cancelled midway (a client that disconnects, an ASGI server cancelling the
handler), on the real stack for each cold backend: the case they were working on stays
free for the retry, which gets its answer once.

The cancellation is put where a request is exposed to it, a store call carried out with
its reply still on the way back: the case's run lock taken in Redis (or, without a hot
tier, its run lease claimed in the cold tier); the case marked running in the cold tier.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from e2e_payloads import duplicate_charges

from state import JSON, BackendUnavailable, Lock, WorkflowRecord
from state.ports import SectionWrite
from state.settings import Settings
from support_cases.api import create_app
from support_cases.demo import demo_case
from support_cases.models import CaseSubmission, FollowUp
from support_cases.records import write_section
from support_cases.runs import RUN_SECTION, RUNNER_ID, utcnow
from support_cases.runtime import Runtime
from support_cases.service import RUN_LEASE_SECTION, RunGuard, run_lock_name
from tests.support.effects import provider_calls, run_once_outcome
from tests.support.sse import parse_sse

# Far below the run lock's TTL (30 s): a lock left behind is still held after this.
RELEASED_WITHIN_SECONDS = 5.0
# Far below the stale period (300 s) the timer waits before it takes a run nobody started.
STARTED_WITHIN_SECONDS = 10.0


def escalated(case_id: str) -> dict[str, Any]:
    return {
        "case_id": case_id,
        "customer_id": "cust-escalated",
        "text": "The hotel charged me twice and I can't log in",
        "transactions": duplicate_charges(612.40, merchant="Hotel Europa"),
    }


async def cancelled_once(
    request: Awaitable[Any], reached: asyncio.Event, go_on: asyncio.Event
) -> None:
    """`request` cancelled once it `reached` the step a test holds; that step then goes on."""
    sent = asyncio.ensure_future(request)
    await asyncio.wait_for(reached.wait(), 10)
    sent.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sent
    go_on.set()


async def until_released(runtime: Runtime, name: str) -> None:
    deadline = time.monotonic() + RELEASED_WITHIN_SECONDS
    while (left := await runtime.store.lock_expires_in(name)) is not None:
        assert time.monotonic() < deadline, f"run lock {name!r} still held, {left:.1f} s to go"
        await asyncio.sleep(0.02)


async def until_runs_are(client: httpx.AsyncClient, case_id: str, *statuses: str) -> None:
    """Wait for the case's runs to reach `statuses` (the timer, which would start a run left
    queued, does not tick here)."""
    deadline = time.monotonic() + STARTED_WITHIN_SECONDS
    while True:
        runs = (await client.get(f"/api/cases/{case_id}/runs")).json()["runs"]
        if [run["status"] for run in runs] == list(statuses):
            return
        assert time.monotonic() < deadline, runs
        await asyncio.sleep(0.05)


async def until_lease_released(runtime: Runtime, case_id: str) -> None:
    deadline = time.monotonic() + RELEASED_WITHIN_SECONDS
    while True:
        record = await runtime.store.get_fresh(case_id)
        assert record is not None
        lease = record.sections.get(RUN_LEASE_SECTION) or {}
        if not lease.get("token") or lease["until"] <= time.time():
            return
        left = lease["until"] - time.time()
        assert time.monotonic() < deadline, (
            f"run lease of {case_id!r} still held, {left:.1f} s to go"
        )
        await asyncio.sleep(0.02)


def run_lock_reply_held(
    runtime: Runtime, case_id: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Event, asyncio.Event]:
    """The case's run lock, once: taken in Redis, its reply held back (`taken` set then)
    until `reply` is set."""
    hot = runtime.backends.hot
    assert hot is not None
    acquire: Callable[..., Any] = hot.acquire_lock
    taken, reply = asyncio.Event(), asyncio.Event()

    async def reply_held(name: str, *, ttl_ms: int) -> Lock | None:
        held: Lock | None = await acquire(name, ttl_ms=ttl_ms)
        if name == run_lock_name(case_id) and not taken.is_set():
            taken.set()
            await reply.wait()
        return held

    monkeypatch.setattr(hot, "acquire_lock", reply_held)
    return taken, reply


async def test_a_decision_cancelled_as_it_takes_the_run_lock_leaves_the_case_to_its_retry(
    runtime: Runtime,
    client: httpx.AsyncClient,
    reviewer: dict[str, str],
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The review decision is cancelled once Redis took the case's run lock for it, its
    reply not yet back: the lock is released at once (not held for its TTL, answering the
    retry 409), and the retried decision resumes the case, which refunds once."""
    submitted = await client.post("/api/cases", json=escalated(case_id))
    assert submitted.status_code in (201, 202), submitted.text
    await runtime.service.wait_idle()
    case = (await client.get(f"/api/cases/{case_id}")).json()
    assert case["status"] == "awaiting_review", case

    taken, reply = run_lock_reply_held(runtime, case_id, monkeypatch)
    await cancelled_once(
        client.post(f"/api/cases/{case_id}/review", json={"decision": "approve"}, headers=reviewer),
        taken,
        reply,
    )
    monkeypatch.undo()

    await until_released(runtime, run_lock_name(case_id))
    retried = await client.post(
        f"/api/cases/{case_id}/review", json={"decision": "approve"}, headers=reviewer
    )
    assert retried.status_code in (200, 202), retried.text
    await runtime.service.wait_idle()
    case = (await client.get(f"/api/cases/{case_id}")).json()
    observed = (
        case["status"],
        (case["review"] or {}).get("decision"),
        len(await provider_calls(runtime, case_id, "refund")),
        (await client.get("/api/health")).status_code,
    )
    assert observed == ("completed", "approve", 1, 200), observed


async def test_a_decision_cancelled_as_it_takes_the_run_lock_starts_a_stop_queued_meanwhile(
    runtime: Runtime,
    client: httpx.AsyncClient,
    reviewer: dict[str, str],
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by review: a stop sent while a decision's run lock is taken (its reply on the
    way) finds the case taken and leaves its run to the holder. The decision cancelled
    then, the lock was given back without looking at the queue: the stop waited for the
    timer rather than being started as the lock was let go of."""
    submitted = await client.post("/api/cases", json=escalated(case_id))
    assert submitted.status_code in (201, 202), submitted.text
    await runtime.service.wait_idle()
    taken, reply = run_lock_reply_held(runtime, case_id, monkeypatch)
    decision = asyncio.ensure_future(
        client.post(f"/api/cases/{case_id}/review", json={"decision": "approve"}, headers=reviewer)
    )
    await asyncio.wait_for(taken.wait(), 10)
    stop = await client.post(
        f"/api/cases/{case_id}/messages",
        json={"text": "Never mind the refund", "strategy": "interrupt"},
    )
    assert (stop.status_code, stop.json()["run"]["status"]) == (202, "queued"), stop.text
    decision.cancel()
    with pytest.raises(asyncio.CancelledError):
        await decision
    reply.set()
    monkeypatch.undo()

    await until_runs_are(client, case_id, "interrupted", "awaiting_review")
    await runtime.service.wait_idle()


async def test_a_decision_cancelled_once_its_run_is_marked_running_goes_on(
    runtime: Runtime,
    client: httpx.AsyncClient,
    reviewer: dict[str, str],
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The review decision is cancelled once the cold tier has the case marked running for
    it, the write's reply not yet back: its run goes on with the decision (not the case
    left "running" with nobody running it, refusing the decision's retry, until the timer
    finds it stalled and asks for a review again). The case completes, refunded once; the
    decision sent again is refused, and refunds nothing more."""
    submitted = await client.post("/api/cases", json=escalated(case_id))
    assert submitted.status_code in (201, 202), submitted.text
    await runtime.service.wait_idle()
    case = (await client.get(f"/api/cases/{case_id}")).json()
    assert case["status"] == "awaiting_review", case

    cold = runtime.backends.cold
    update_sections: Callable[..., Any] = cold.update_sections
    written, reply = asyncio.Event(), asyncio.Event()

    async def reply_held(thread_id: str, writes: list[SectionWrite], **kwargs: Any) -> Any:
        stored = await update_sections(thread_id, writes, **kwargs)
        marks_running = any(
            write.section == RUN_SECTION and write.value.get("status") == "running"
            for write in writes
        )
        if thread_id == case_id and marks_running and not written.is_set():
            written.set()
            await reply.wait()
        return stored

    monkeypatch.setattr(cold, "update_sections", reply_held)
    await cancelled_once(
        client.post(f"/api/cases/{case_id}/review", json={"decision": "approve"}, headers=reviewer),
        written,
        reply,
    )
    await runtime.service.wait_idle()
    monkeypatch.undo()

    case = (await client.get(f"/api/cases/{case_id}")).json()
    observed = (
        case["status"],
        (case["review"] or {}).get("decision"),
        len(await provider_calls(runtime, case_id, "refund")),
        await runtime.store.lock_expires_in(run_lock_name(case_id)),
    )
    assert observed == ("completed", "approve", 1, None), observed
    retried = await client.post(
        f"/api/cases/{case_id}/review", json={"decision": "approve"}, headers=reviewer
    )
    assert retried.status_code == 409, retried.text
    await runtime.service.wait_idle()
    assert len(await provider_calls(runtime, case_id, "refund")) == 1
    assert (await client.get("/api/health")).status_code == 200


async def decide_cancelled_as_the_lease_is_claimed(
    cold_only: Runtime,
    client: httpx.AsyncClient,
    case_id: str,
    reviewer: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A review decision cancelled once the cold tier wrote its run lease claim, the reply
    held back until then."""
    cold = cold_only.backends.cold
    update_section: Callable[..., Any] = cold.update_section
    written, reply = asyncio.Event(), asyncio.Event()

    async def reply_held(thread_id: str, section: str, value: JSON, **kwargs: Any) -> Any:
        stored = await update_section(thread_id, section, value, **kwargs)
        claims = section == RUN_LEASE_SECTION and bool(value.get("token"))
        if thread_id == case_id and claims and not written.is_set():
            written.set()
            await reply.wait()
        return stored

    monkeypatch.setattr(cold, "update_section", reply_held)
    await cancelled_once(
        client.post(f"/api/cases/{case_id}/review", json={"decision": "approve"}, headers=reviewer),
        written,
        reply,
    )
    monkeypatch.undo()


async def test_a_decision_cancelled_as_it_claims_the_cold_lease_leaves_the_case_to_its_retry(
    runtime: Runtime,
    e2e_settings: Callable[..., Settings],
    bearer: Callable[..., dict[str, str]],
    reviewer: dict[str, str],
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a hot tier the case's run lease is claimed in its cold record. The review
    decision is cancelled once the cold tier wrote its claim, the reply not yet back: the
    lease is given back at once (not held for its TTL, answering the retry 409), and the
    retried decision resumes the case, which refunds once."""
    cold_only = await Runtime.open(
        e2e_settings(runtime.settings.state_cold_backend.value, redis_url=None)
    )
    try:
        transport = httpx.ASGITransport(app=create_app(cold_only))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://e2e.test", headers=bearer("e2e-client")
        ) as client:
            submitted = await client.post("/api/cases", json=escalated(case_id))
            assert submitted.status_code in (201, 202), submitted.text
            await cold_only.service.wait_idle()
            case = (await client.get(f"/api/cases/{case_id}")).json()
            assert case["status"] == "awaiting_review", case

            await decide_cancelled_as_the_lease_is_claimed(
                cold_only, client, case_id, reviewer, monkeypatch
            )

            await until_lease_released(cold_only, case_id)
            retried = await client.post(
                f"/api/cases/{case_id}/review", json={"decision": "approve"}, headers=reviewer
            )
            assert retried.status_code in (200, 202), retried.text
            await cold_only.service.wait_idle()
            case = (await client.get(f"/api/cases/{case_id}")).json()
            observed = (
                case["status"],
                (case["review"] or {}).get("decision"),
                len(await provider_calls(cold_only, case_id, "refund")),
                case["lease_ends_at"],
            )
            assert observed == ("completed", "approve", 1, None), observed
    finally:
        await cold_only.close()


async def test_close_gives_back_a_cold_lease_claimed_for_a_cancelled_caller(
    runtime: Runtime,
    e2e_settings: Callable[..., Settings],
    bearer: Callable[..., dict[str, str]],
    reviewer: dict[str, str],
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a hot tier, a review decision is cancelled once the cold tier wrote its
    lease claim, the reply not yet back, and the service closes (the process stopping)
    then: close waits for the claim and gives the lease back before the stores close,
    rather than letting the give-back start on closed stores and the lease be held to its
    TTL, answering the case's next run 409."""
    cold_only = await Runtime.open(
        e2e_settings(runtime.settings.state_cold_backend.value, redis_url=None)
    )
    try:
        transport = httpx.ASGITransport(app=create_app(cold_only))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://e2e.test", headers=bearer("e2e-client")
        ) as client:
            submitted = await client.post("/api/cases", json=escalated(case_id))
            assert submitted.status_code in (201, 202), submitted.text
            await cold_only.service.wait_idle()

            await decide_cancelled_as_the_lease_is_claimed(
                cold_only, client, case_id, reviewer, monkeypatch
            )
            await cold_only.service.close()

            record = await cold_only.store.get_fresh(case_id)
            assert record is not None
            lease = record.sections.get(RUN_LEASE_SECTION) or {}
            assert not lease.get("token"), f"run lease still held at close: {lease}"
    finally:
        await cold_only.close()


async def test_a_resume_refused_and_cancelled_as_it_lets_go_of_the_run_lock_leaves_it_free(
    runtime: Runtime,
    client: httpx.AsyncClient,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A resume of a completed case takes its run lock, is refused (nothing to resume),
    and is cancelled as it lets go, its release not yet sent to Redis: the lock is
    released all the same (not held for its TTL, answering the case's next run 409)."""
    submitted = await client.post("/api/cases", json=demo_case(case_id))
    assert submitted.status_code in (201, 202), submitted.text
    await runtime.service.wait_idle()
    case = (await client.get(f"/api/cases/{case_id}")).json()
    assert case["status"] == "completed", case

    hot = runtime.backends.hot
    assert hot is not None
    release: Callable[..., Any] = hot.release_lock
    asked, sent = asyncio.Event(), asyncio.Event()

    async def sent_late(lock: Lock) -> bool:
        if lock.name == run_lock_name(case_id) and not asked.is_set():
            asked.set()
            await sent.wait()
        released: bool = await release(lock)
        return released

    monkeypatch.setattr(hot, "release_lock", sent_late)
    await cancelled_once(client.post(f"/api/cases/{case_id}/resume"), asked, sent)

    await until_released(runtime, run_lock_name(case_id))
    monkeypatch.undo()
    follow_up = await client.post(
        f"/api/cases/{case_id}/messages", json={"text": "I can't find my invoice"}
    )
    assert follow_up.status_code in (200, 202), follow_up.text
    await runtime.service.wait_idle()
    assert (await client.get(f"/api/cases/{case_id}")).json()["status"] == "completed"


@pytest.mark.parametrize("held", ["the create's reply", "the run_queued event"])
async def test_a_submit_cancelled_once_its_case_is_created_still_runs_it_once(
    runtime: Runtime,
    client: httpx.AsyncClient,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
    held: str,
) -> None:
    """The submit is cancelled once the cold tier has created its case (created as its
    first run, marked running), before its first run starts: as the write's reply is on
    its way back, or as it tells the run queued (its run lock held since before the
    create). The first run goes on (not the case
    left "running" with nobody running it until the timer finds it stalled, its retry
    replaying that). The case completes, each side effect done once, its run lock
    released; the submit sent again answers the finished case and runs nothing more."""
    key = {"Idempotency-Key": f"cancelled-{case_id}"}
    reached, release = asyncio.Event(), asyncio.Event()
    if held == "the create's reply":
        cold = runtime.backends.cold
        create: Callable[..., Any] = cold.create

        async def reply_held(thread_id: str, sections: dict[str, JSON], **kwargs: Any) -> Any:
            stored = await create(thread_id, sections, **kwargs)
            if thread_id == case_id and not reached.is_set():
                reached.set()
                await release.wait()
            return stored

        monkeypatch.setattr(cold, "create", reply_held)
    else:
        events = runtime.service._events
        publish = events.publish

        async def event_held(target: str, event: str, **fields: Any) -> None:
            if target == case_id and event == "run_queued" and not reached.is_set():
                reached.set()
                await release.wait()
            await publish(target, event, **fields)

        monkeypatch.setattr(events, "publish", event_held)
    await cancelled_once(
        client.post("/api/cases", json=demo_case(case_id), headers=key), reached, release
    )
    await asyncio.wait_for(runtime.service.wait_idle(), 60)
    monkeypatch.undo()

    # Run by its first attempt: not resumed (a second attempt) after going stale.
    observed = await run_once_outcome(client, runtime, case_id)
    assert observed == ("completed", 1, 1, 1, None), observed
    # Its stream tells the run as any first run's does, from its queueing.
    events = await client.get(f"/api/cases/{case_id}/events", params={"seconds": 0})
    kinds = [event["event"] for event in parse_sse(events.text)]
    assert kinds[:2] == ["run_queued", "run_started"] and kinds.count("run_queued") == 1, kinds
    retried = await client.post("/api/cases", json=demo_case(case_id), headers=key)
    assert (retried.status_code, retried.json()["status"]) == (200, "completed"), retried.text
    await asyncio.wait_for(runtime.service.wait_idle(), 60)
    assert len(await provider_calls(runtime, case_id, "refund")) == 1
    assert len(await provider_calls(runtime, case_id, "reset_link")) == 1


async def test_a_slow_submit_cancelled_as_it_lets_go_of_the_run_lock_still_runs_its_case(
    runtime: Runtime,
    client: httpx.AsyncClient,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A submit whose create outlasted a renewal of its run lock (forced) lets go of the
    lock before taking it again for the first run. Cancelled as it lets go, it started no
    run: the case, created "running", waited for the timer (the stale period, minutes)."""
    monkeypatch.setattr(runtime.service, "_may_run_out", lambda guard: True)
    hot = runtime.backends.hot
    assert hot is not None
    release_lock: Callable[..., Any] = hot.release_lock
    reached, release = asyncio.Event(), asyncio.Event()

    async def release_held(lock: Lock) -> bool:
        if lock.name == run_lock_name(case_id) and not reached.is_set():
            reached.set()
            await release.wait()
        released: bool = await release_lock(lock)
        return released

    monkeypatch.setattr(hot, "release_lock", release_held)
    await cancelled_once(client.post("/api/cases", json=demo_case(case_id)), reached, release)
    await asyncio.wait_for(runtime.service.wait_idle(), 60)
    monkeypatch.undo()
    observed = await run_once_outcome(client, runtime, case_id)
    assert observed == ("completed", 1, 1, 1, None), observed


async def test_a_run_stopped_by_close_before_its_first_step_lets_go_of_the_run_lock(
    runtime: Runtime,
    e2e_settings: Callable[..., Settings],
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A graceful shutdown (`close`) cancels a case's first run between the moment it is
    handed the run lock and its first step (which would release the lock on any path): the
    lock is released all the same, not held for its TTL, refusing the case to the worker
    that takes over (its follow-up answered 409 meanwhile)."""
    own = await Runtime.open(e2e_settings(runtime.settings.state_cold_backend.value))
    try:
        hot = own.backends.hot
        assert hot is not None
        acquire: Callable[..., Any] = hot.acquire_lock
        read: Callable[..., Any] = hot.read
        locked = asyncio.Event()
        closing: list[asyncio.Future[None]] = []

        async def lock_noted(name: str, *, ttl_ms: int) -> Lock | None:
            held: Lock | None = await acquire(name, ttl_ms=ttl_ms)
            if name == run_lock_name(case_id):
                locked.set()
            return held

        async def close_as_read(thread_id: str) -> Any:
            found = await read(thread_id)
            if thread_id == case_id and locked.is_set() and not closing:
                # The submit reads the case's run id under the lock, then hands the lock to
                # its run's task in the same step: `close` is scheduled before that task's
                # first step, and cancels it.
                closing.append(asyncio.ensure_future(own.service.close()))
            return found

        monkeypatch.setattr(hot, "acquire_lock", lock_noted)
        monkeypatch.setattr(hot, "read", close_as_read)
        await own.service.submit(CaseSubmission.model_validate(demo_case(case_id)), None)
        assert closing, "the submit never read its case under the run lock"
        await closing[0]
        monkeypatch.undo()
        await until_released(own, run_lock_name(case_id))
        # Left running, as by a stopped worker, for the timer: resumed here, or a later
        # test's tick on the shared stores would find it stalled and resume it.
        await write_section(own.store, case_id, RUN_SECTION, heartbeat_long_ago, agent_id=RUNNER_ID)
        resumed = await own.service.resume(case_id, wait_until_rest=True)
        assert resumed.view.status == "completed", resumed
    finally:
        await own.close()


def heartbeat_long_ago(record: WorkflowRecord) -> object:
    """The run section of a running case whose worker stopped long ago."""
    return {
        **record.sections[RUN_SECTION],
        "heartbeat_at": (utcnow() - timedelta(hours=1)).isoformat(),
    }


async def test_a_submit_cancelled_once_close_began_starts_no_run_after_it(
    runtime: Runtime,
    e2e_settings: Callable[..., Settings],
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server stops: the service is closed while a submit's create is on its way, and
    the server then cancels that submit. Its first run is not started in the background
    after `close` (which waited for none such), on stores about to close: the case, created
    running, is left to the timer as a stopped worker's is."""
    own = await Runtime.open(e2e_settings(runtime.settings.state_cold_backend.value))
    try:
        cold = own.backends.cold
        create: Callable[..., Any] = cold.create
        reached, release = asyncio.Event(), asyncio.Event()

        async def reply_held(thread_id: str, sections: dict[str, JSON], **kwargs: Any) -> Any:
            stored = await create(thread_id, sections, **kwargs)
            if thread_id == case_id:
                reached.set()
                await release.wait()
            return stored

        monkeypatch.setattr(cold, "create", reply_held)
        submit = asyncio.ensure_future(
            own.service.submit(CaseSubmission.model_validate(demo_case(case_id)), None)
        )
        await asyncio.wait_for(reached.wait(), 10)
        await own.service.close()
        submit.cancel()
        with pytest.raises(asyncio.CancelledError):
            await submit
        release.set()
        await asyncio.wait_for(own.service.wait_idle(), 60)
        monkeypatch.undo()
        record = await own.store.get_fresh(case_id)
        assert record is not None
        observed = (
            record.sections[RUN_SECTION]["status"],
            len(await provider_calls(own, case_id, "refund")),
            await own.store.lock_expires_in(run_lock_name(case_id)),
        )
        assert observed == ("running", 0, None), observed
        # Resumed here, as the timer would, or a later test's tick would find it stalled.
        await write_section(own.store, case_id, RUN_SECTION, heartbeat_long_ago, agent_id=RUNNER_ID)
        resumed = await own.service.resume(case_id, wait_until_rest=True)
        assert resumed.view.status == "completed", resumed
    finally:
        await own.close()


async def retry_cancelled_as_it_lets_go(
    runtime: Runtime,
    client: httpx.AsyncClient,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> httpx.Response:
    """A retried submit of a case the hot tier holds no copy of takes the case's run lock
    before its create, which finds the case there. A follow-up landing meanwhile (its
    answer returned) finds the case taken and leaves its run to the holder. The retry is
    cancelled as it lets go of the lock, its release not yet sent to Redis."""
    first = await client.post("/api/cases", json=demo_case(case_id))
    assert first.status_code == 201, first.text
    await runtime.service.wait_idle()
    hot = runtime.backends.hot
    assert hot is not None
    await hot.invalidate(case_id)
    cold = runtime.backends.cold
    create: Callable[..., Any] = cold.create
    release_lock: Callable[..., Any] = hot.release_lock
    creating, created = asyncio.Event(), asyncio.Event()
    releasing, released = asyncio.Event(), asyncio.Event()

    async def create_held(thread_id: str, sections: dict[str, JSON], **kwargs: Any) -> Any:
        if thread_id == case_id and not creating.is_set():
            creating.set()
            await created.wait()
        return await create(thread_id, sections, **kwargs)

    async def release_held(lock: Lock) -> bool:
        if lock.name == run_lock_name(case_id) and not releasing.is_set():
            releasing.set()
            await released.wait()
        done: bool = await release_lock(lock)
        return done

    monkeypatch.setattr(cold, "create", create_held)
    monkeypatch.setattr(hot, "release_lock", release_held)
    retry = asyncio.ensure_future(client.post("/api/cases", json=demo_case(case_id)))
    await asyncio.wait_for(creating.wait(), 10)
    follow_up = await client.post(
        f"/api/cases/{case_id}/messages", json={"text": "I can't find my invoice"}
    )
    assert (follow_up.status_code, follow_up.json()["run"]["status"]) == (202, "queued"), (
        follow_up.text
    )
    created.set()
    await cancelled_once(retry, releasing, released)
    return follow_up


async def test_a_retried_submit_cancelled_as_it_lets_go_starts_the_follow_up_queued_meanwhile(
    runtime: Runtime,
    client: httpx.AsyncClient,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`retry_cancelled_as_it_lets_go`: the follow-up's run starts all the same, in a run
    slot of its own (it was left queued for the timer)."""
    publish = runtime.service.events.publish
    follow_up_started, slots_seen = asyncio.Event(), asyncio.Event()
    follow_up_run: list[str] = []

    async def start_held(target: str, event: str, **fields: Any) -> None:
        if event == "run_started" and fields.get("run_id") in follow_up_run:
            follow_up_started.set()
            await slots_seen.wait()
        await publish(target, event, **fields)

    monkeypatch.setattr(runtime.service.events, "publish", start_held)
    original_post = client.post

    async def noting_the_follow_up(url: str, **kwargs: Any) -> httpx.Response:
        answer = await original_post(url, **kwargs)
        if url.endswith("/messages"):
            follow_up_run.append(answer.json()["run"]["run_id"])
        return answer

    monkeypatch.setattr(client, "post", noting_the_follow_up)
    await retry_cancelled_as_it_lets_go(runtime, client, case_id, monkeypatch)

    await asyncio.wait_for(follow_up_started.wait(), STARTED_WITHIN_SECONDS)
    # The cancelled retry gave its slot back as it ended: the run holds one of its own.
    taken = runtime.service.run_slots.taken
    slots_seen.set()
    assert taken == 1, taken
    await until_runs_are(client, case_id, "completed", "completed")
    await asyncio.wait_for(runtime.service.wait_idle(), 60)
    monkeypatch.undo()
    assert runtime.service.run_slots.taken == 0


async def first_run_left_running(
    runtime: Runtime, client: httpx.AsyncClient, case_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submit whose first run meets a tier out of reach (503): the run is left "running"
    with nobody on it, for a retry (or the timer) to start."""
    run = runtime.service._run

    async def cut(target: str, *args: Any, **kwargs: Any) -> Any:
        if target == case_id:
            raise BackendUnavailable("cold", "cut before the first run's first step")
        return await run(target, *args, **kwargs)

    monkeypatch.setattr(runtime.service, "_run", cut)
    failed = await client.post("/api/cases", json=demo_case(case_id))
    assert failed.status_code == 503, failed.text
    await runtime.service.wait_idle()
    monkeypatch.undo()


async def test_a_retried_submit_cancelled_before_it_marks_the_first_run_starts_the_follow_up(
    runtime: Runtime,
    client: httpx.AsyncClient,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A submit's first run met a tier out of reach (503), left "running" with nobody on
    it. Its retry takes the case's run lock to start that run; an interrupting follow-up
    landing before the retry marks it finds the case taken and leaves its run (and the stop
    of the first) to the holder. The retry is cancelled then: the follow-up's run starts all
    the same (it was left, with the first run "running", for the timer)."""
    await first_run_left_running(runtime, client, case_id, monkeypatch)

    record = runtime.service._record
    reached, go_on = asyncio.Event(), asyncio.Event()

    async def read_held(target: str, *, fresh: bool = False) -> WorkflowRecord:
        # The retry's read of the case under the lock, before it marks the run.
        if target == case_id and fresh and not reached.is_set():
            reached.set()
            await go_on.wait()
        return await record(target, fresh=fresh)

    monkeypatch.setattr(runtime.service, "_record", read_held)
    retry = asyncio.ensure_future(client.post("/api/cases", json=demo_case(case_id)))
    await asyncio.wait_for(reached.wait(), 10)
    follow_up = await client.post(
        f"/api/cases/{case_id}/messages",
        json={"text": "I can't find my invoice", "strategy": "interrupt"},
    )
    assert (follow_up.status_code, follow_up.json()["run"]["status"]) == (202, "queued"), (
        follow_up.text
    )
    await cancelled_once(retry, reached, go_on)
    monkeypatch.undo()

    await until_runs_are(client, case_id, "interrupted", "completed")
    await asyncio.wait_for(runtime.service.wait_idle(), 60)
    assert (await client.get(f"/api/cases/{case_id}")).json()["status"] == "completed"


async def test_a_retried_submit_cancelled_as_it_takes_the_run_lock_starts_a_stop_queued_meanwhile(
    runtime: Runtime,
    client: httpx.AsyncClient,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by review: a submit's first run met a tier out of reach (503), left "running"
    with nobody on it; its retry takes the case's run lock to start that run. A stop sent
    while that lock is taken (its reply on the way) finds the case taken and leaves its run
    to the holder. The retry cancelled then, the lock was given back without looking at the
    queue (`_try_lock`, unlike `_acquire`): the stop waited for the timer."""
    await first_run_left_running(runtime, client, case_id, monkeypatch)

    taken, reply = run_lock_reply_held(runtime, case_id, monkeypatch)
    retry = asyncio.ensure_future(client.post("/api/cases", json=demo_case(case_id)))
    await asyncio.wait_for(taken.wait(), 10)
    stop = await client.post(
        f"/api/cases/{case_id}/messages",
        json={"text": "I can't find my invoice", "strategy": "interrupt"},
    )
    assert (stop.status_code, stop.json()["run"]["status"]) == (202, "queued"), stop.text
    await cancelled_once(retry, taken, reply)
    monkeypatch.undo()

    await until_runs_are(client, case_id, "interrupted", "completed")
    await asyncio.wait_for(runtime.service.wait_idle(), 60)
    assert (await client.get(f"/api/cases/{case_id}")).json()["status"] == "completed"


async def test_wait_idle_waits_for_the_run_a_cancelled_request_starts_as_it_lets_go(
    runtime: Runtime,
    client: httpx.AsyncClient,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`retry_cancelled_as_it_lets_go` leaves the follow-up queued meanwhile to the retry's
    release, which starts it: `wait_idle` returns once that run rests, not as the release
    that started it ends."""
    await retry_cancelled_as_it_lets_go(runtime, client, case_id, monkeypatch)
    await asyncio.wait_for(runtime.service.wait_idle(), 60)
    monkeypatch.undo()
    runs = (await client.get(f"/api/cases/{case_id}/runs")).json()["runs"]
    assert [run["status"] for run in runs] == ["completed", "completed"], runs
    assert runtime.service.run_slots.taken == 0


async def test_close_begun_as_a_release_takes_up_the_queue_leaves_no_run_going(
    runtime: Runtime,
    e2e_settings: Callable[..., Settings],
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A retried submit lets go of the case it found created, with a follow-up queued
    meanwhile; `close` begins as that release reads the queue. The run the release starts
    is not left going after `close` returns, on stores about to close, its run lock held:
    the follow-up is left queued, as a stopped worker's is."""
    own = await Runtime.open(e2e_settings(runtime.settings.state_cold_backend.value))
    try:
        submission = CaseSubmission.model_validate(demo_case(case_id))
        await own.service.submit(submission, None)
        await own.service.wait_idle()
        hot = own.backends.hot
        assert hot is not None
        await hot.invalidate(case_id)
        cold = own.backends.cold
        create: Callable[..., Any] = cold.create
        release_lock: Callable[..., Any] = hot.release_lock
        read: Callable[..., Any] = hot.read
        creating, created = asyncio.Event(), asyncio.Event()
        released: list[str] = []
        closing: list[asyncio.Future[None]] = []

        async def create_held(thread_id: str, sections: dict[str, JSON], **kwargs: Any) -> Any:
            if thread_id == case_id and not creating.is_set():
                creating.set()
                await created.wait()
            return await create(thread_id, sections, **kwargs)

        async def release_noted(lock: Lock) -> bool:
            done: bool = await release_lock(lock)
            if lock.name == run_lock_name(case_id):
                released.append(lock.name)
            return done

        async def close_as_read(thread_id: str) -> Any:
            if thread_id == case_id and released and not closing:
                # The release reads the queue: `close` begins, and waits for that release.
                closing.append(asyncio.ensure_future(own.service.close()))
                await asyncio.sleep(0)
            return await read(thread_id)

        monkeypatch.setattr(cold, "create", create_held)
        monkeypatch.setattr(hot, "release_lock", release_noted)
        monkeypatch.setattr(hot, "read", close_as_read)
        retry = asyncio.ensure_future(own.service.submit(submission, None))
        await asyncio.wait_for(creating.wait(), 10)
        await own.service.post_message(case_id, FollowUp(text="I can't find my invoice"), None)
        created.set()
        await retry
        assert closing, "the release never read the queue"
        await asyncio.wait_for(closing[0], 60)
        monkeypatch.undo()
        assert await own.store.lock_expires_in(run_lock_name(case_id)) is None
        assert own.service.run_slots.taken == 0
    finally:
        await own.close()
    # Started here, as the timer would, or a later test's tick would find it left.
    await runtime.service.post_message(case_id, FollowUp(text="And my password?"), None)
    await runtime.service.wait_idle()


async def test_a_let_go_that_fails_with_a_programming_error_is_logged(
    runtime: Runtime,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Found by review: a let-go nobody awaits (its caller cancelled, or a run's task
    cancelled before its first step) that failed with anything but a tier's error ended
    in the gather of `wait_idle` (and `close`), which returns exceptions: unheard of."""

    async def broken(case_id: str) -> None:
        raise RuntimeError("a bug in the release")

    monkeypatch.setattr(runtime.service, "_take_queue_left", broken)
    with caplog.at_level(logging.ERROR, logger="support_cases.service"):
        runtime.service._let_go(case_id, RunGuard(), queue_left=True)
        await runtime.service.wait_idle()
    failed = [r for r in caplog.records if r.exc_info and case_id in r.getMessage()]
    assert [str(r.exc_info[1]) for r in failed if r.exc_info] == ["a bug in the release"], (
        caplog.records
    )
