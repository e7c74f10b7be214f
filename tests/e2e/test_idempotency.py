"""A retried POST returns the same case (Idempotency-Key header, client key, or case id)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest
from e2e_payloads import duplicate_charges

from support_cases.api import create_app
from support_cases.demo import demo_case
from support_cases.runtime import Runtime
from support_cases.service import run_lock_name
from support_cases.settings import AppSettings
from tests.faults.proxy import LoopbackProxy
from tests.support.effects import provider_calls
from tests.support.sse import parse_sse


def _no_case_id(case_id: str) -> dict[str, object]:
    body = demo_case(case_id)
    del body["case_id"]
    return body


async def test_retry_with_the_same_idempotency_key_returns_the_same_case(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    key = f"key-{uuid.uuid4().hex}"
    body = _no_case_id("unused")
    first = await client.post("/api/cases", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 201, first.text
    retry = await client.post("/api/cases", json=body, headers={"Idempotency-Key": key})
    assert retry.status_code == 200
    assert retry.headers["idempotent-replayed"] == "true"
    case_id = first.json()["case_id"]
    assert retry.json()["case_id"] == case_id
    assert retry.json()["final_response"] == first.json()["final_response"]
    refunds = await provider_calls(runtime, case_id, "refund")
    assert len(refunds) == 1

    other = await client.post(
        "/api/cases", json=body, headers={"Idempotency-Key": f"key-{uuid.uuid4().hex}"}
    )
    assert other.status_code == 201 and other.json()["case_id"] != case_id


async def test_client_key_in_the_body_works_like_the_header(client: httpx.AsyncClient) -> None:
    body = {**_no_case_id("unused"), "client_key": f"ck-{uuid.uuid4().hex}"}
    first = await client.post("/api/cases", json=body)
    retry = await client.post("/api/cases", json=body)
    assert (first.status_code, retry.status_code) == (201, 200)
    assert first.json()["case_id"] == retry.json()["case_id"]


async def test_same_key_with_a_different_body_is_refused(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    key = f"key-{uuid.uuid4().hex}"
    body = _no_case_id("unused")
    first = await client.post("/api/cases", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 201
    version = (await runtime.store.get(first.json()["case_id"])).version  # type: ignore[union-attr]
    changed = {**body, "text": "Something else entirely"}
    response = await client.post("/api/cases", json=changed, headers={"Idempotency-Key": key})
    assert response.status_code == 422
    assert "different request" in response.json()["error"]
    after = await runtime.store.get(first.json()["case_id"])
    assert after is not None and after.version == version


async def test_resubmitting_a_case_id_returns_the_existing_case(
    client: httpx.AsyncClient, case_id: str
) -> None:
    first = await client.post("/api/cases", json=demo_case(case_id))
    again = await client.post("/api/cases", json=demo_case(case_id))
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["case_id"] == case_id


async def test_resubmitting_a_case_id_with_another_body_is_409_and_changes_nothing(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    """The case id names an existing case the body does not describe: a conflict, which
    answered 422 as if the body were malformed."""
    body = demo_case(case_id)
    assert (await client.post("/api/cases", json=body)).status_code == 201
    await runtime.service.wait_idle()
    version = (await runtime.store.get(case_id)).version  # type: ignore[union-attr]
    response = await client.post("/api/cases", json={**body, "text": "Something else"})
    assert response.status_code == 409, response.text
    assert "already exists with a different request" in response.json()["error"]
    after = await runtime.store.get(case_id)
    assert after is not None and after.version == version
    again = await client.post("/api/cases", json=body)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"


async def test_concurrent_retries_create_one_case(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    key = f"key-{uuid.uuid4().hex}"
    body = _no_case_id("unused")
    answers = await asyncio.gather(
        *(client.post("/api/cases", json=body, headers={"Idempotency-Key": key}) for _ in range(4))
    )
    assert sorted(a.status_code for a in answers) == [200, 200, 200, 201]
    case_ids = {a.json()["case_id"] for a in answers}
    assert len(case_ids) == 1
    await runtime.service.wait_idle()
    case_id = case_ids.pop()
    assert len(await provider_calls(runtime, case_id, "refund")) == 1
    assert len(await provider_calls(runtime, case_id, "reset_link")) == 1


async def test_a_follow_up_retried_with_another_strategy_is_refused_not_replayed(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    """The same Idempotency-Key with another body is refused: the strategy is part of the
    message, so a retry asking to roll back is not the earlier enqueue, answered as done."""
    assert (await client.post("/api/cases", json=demo_case(case_id))).status_code == 201
    key = {"Idempotency-Key": f"msg-{uuid.uuid4().hex}"}
    path = f"/api/cases/{case_id}/messages"
    first = await client.post(path, json={"text": "any news?", "strategy": "enqueue"}, headers=key)
    assert first.status_code in (200, 202), first.text
    await runtime.service.wait_idle()
    runs = (await client.get(f"/api/cases/{case_id}/runs")).json()["runs"]
    changed = await client.post(
        path, json={"text": "any news?", "strategy": "rollback"}, headers=key
    )
    assert changed.status_code == 422, changed.text
    assert "another message" in changed.json()["error"]
    assert (await client.get(f"/api/cases/{case_id}/runs")).json()["runs"] == runs
    same = await client.post(path, json={"text": "any news?", "strategy": "enqueue"}, headers=key)
    assert same.status_code == 200 and same.headers["idempotent-replayed"] == "true"
    assert same.json()["run"]["run_id"] == first.json()["run"]["run_id"]


async def test_a_follow_up_key_another_caller_used_on_the_case_is_refused_not_replayed(
    client: httpx.AsyncClient,
    runtime: Runtime,
    case_id: str,
    bearer: Callable[..., dict[str, str]],
) -> None:
    """An operator (who may write to any case) and the case's submitter are two callers: the
    submitter's message under a key the operator used is not the operator's request retried.
    It was answered 200 `Idempotent-Replayed` with the operator's run, and never queued."""
    assert (await client.post("/api/cases", json=demo_case(case_id))).status_code == 201
    key = f"msg-{uuid.uuid4().hex}"
    path = f"/api/cases/{case_id}/messages"
    message = {"text": "any news?", "strategy": "enqueue"}
    operator = {**bearer("e2e-operator"), "Idempotency-Key": key}
    first = await client.post(path, json=message, headers=operator)
    assert first.status_code in (200, 202), first.text
    await runtime.service.wait_idle()
    runs = (await client.get(f"/api/cases/{case_id}/runs")).json()["runs"]
    other = await client.post(path, json=message, headers={"Idempotency-Key": key})
    assert other.status_code == 422, other.text
    assert "another caller" in other.json()["error"]
    assert (await client.get(f"/api/cases/{case_id}/runs")).json()["runs"] == runs
    again = await client.post(path, json=message, headers=operator)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["run"]["run_id"] == first.json()["run"]["run_id"]


@pytest.mark.parametrize(("cuts", "worker"), [(1, "free"), (1, "full"), (2, "free")])
async def test_a_retry_after_a_503_whose_run_never_got_going_starts_that_run(
    cuts: int,
    worker: str,
    e2e_settings: Callable[..., AppSettings],
    bearer: Callable[..., dict[str, str]],
) -> None:
    """The submit stored its case, then its run met the cold store out of reach and it
    answered 503. Its retry (same key, same caller) once the store is back must get the run
    going: the case was left "running" with nobody on it, and the retry answered 200
    "running" while the case waited for the timer (the stale period, minutes). A flapping
    store (`cuts` 2): the retry's own run cut too, the retry after it starts the run again.
    With the worker driving its most runs (CASE_MAX_RUNS), the retry is sent back (503)
    rather than answered "running": the retry after that starts it."""
    server = e2e_settings("postgres").postgres_url
    assert server is not None
    target = urlparse(server.get_secret_value())
    assert target.hostname == "127.0.0.1" and target.port is not None
    with LoopbackProxy(target.port) as proxy:
        proxied = target._replace(netloc=f"{target.netloc.rsplit(':', 1)[0]}:{proxy.port}")
        made, holding, release = 0, asyncio.Event(), asyncio.Event()

        async def cut_after_intake(step: str) -> None:
            nonlocal made
            if step == "intake" and made < cuts:
                made += 1
                proxy.cut("reset")
            elif step == "intake" and worker == "full" and not holding.is_set():
                holding.set()  # the one run slot, held by another case's run
                await release.wait()

        settings = e2e_settings(
            "postgres",
            postgres_url=proxied.geturl(),
            state_write_mode="write-through",
            case_sync_wait_seconds=60,  # the run's failure, not a 202, answers the submit
            case_max_runs=1,
        )
        runtime = await Runtime.open(settings, after_step=cut_after_intake)
        try:
            transport = httpx.ASGITransport(app=create_app(runtime))
            async with httpx.AsyncClient(
                transport=transport, base_url="http://e2e.test", headers=bearer("e2e-client")
            ) as client:
                key = {"Idempotency-Key": f"key-{uuid.uuid4().hex}"}
                body = _no_case_id("unused")
                for tries in range(1, cuts + 1):
                    failed = await client.post("/api/cases", json=body, headers=key)
                    assert made == tries
                    assert failed.status_code == 503, failed.text
                    assert "retry-after" in failed.headers
                    proxy.restore()
                if worker == "full":
                    other = asyncio.ensure_future(
                        client.post(
                            "/api/cases", json=demo_case(f"case-other-{uuid.uuid4().hex[:12]}")
                        )
                    )
                    await holding.wait()
                    busy = await client.post("/api/cases", json=body, headers=key)
                    assert busy.status_code == 503, busy.text
                    assert busy.headers["retry-after"] == "5"
                    release.set()
                    assert (await other).status_code == 201

                retry = await client.post("/api/cases", json=body, headers=key)
                assert retry.status_code in (201, 202), retry.text
                case_id = retry.json()["case_id"]
                deadline = time.monotonic() + 10  # far below the stale period (300 s)
                while (status := (await client.get(f"/api/cases/{case_id}")).json())[
                    "status"
                ] != "completed":
                    assert time.monotonic() < deadline, status
                    await asyncio.sleep(0.05)
                assert status["final_response"]
                await runtime.service.wait_idle()
                assert len(await provider_calls(runtime, case_id, "refund")) == 1
                again = await client.post("/api/cases", json=body, headers=key)
                assert again.status_code == 200, again.text
                assert again.json()["status"] == "completed"
        finally:
            proxy.restore()
            release.set()
            await runtime.service.wait_idle()
            await runtime.close()


async def test_a_follow_up_sent_while_a_retried_submit_holds_the_case_is_run(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submit takes the case's run lock before its create, which finds the case there (a
    retry of a case the hot tier holds no copy of). A follow-up that lands meanwhile finds
    the case taken and leaves its run to the holder: the retry must start it as it lets go,
    not leave it queued for the timer."""
    first = await client.post("/api/cases", json=demo_case(case_id))
    assert first.status_code == 201, first.text
    await runtime.service.wait_idle()
    # A retry finding the case cached answers without taking the lock: here Redis no longer
    # holds it (evicted), so the retry learns of the case only as its create fails.
    assert runtime.backends.hot is not None
    await runtime.backends.hot.invalidate(case_id)
    cold = runtime.backends.cold
    create: Callable[..., Any] = cold.create
    reached, release = asyncio.Event(), asyncio.Event()

    async def reply_held(thread_id: str, sections: dict[str, Any], **kwargs: Any) -> Any:
        if thread_id == case_id and not reached.is_set():
            reached.set()
            await release.wait()
        return await create(thread_id, sections, **kwargs)

    monkeypatch.setattr(cold, "create", reply_held)
    retry = asyncio.ensure_future(client.post("/api/cases", json=demo_case(case_id)))
    await asyncio.wait_for(reached.wait(), 10)
    follow_up = await client.post(
        f"/api/cases/{case_id}/messages", json={"text": "I can't find my invoice"}
    )
    assert (follow_up.status_code, follow_up.json()["run"]["status"]) == (202, "queued"), (
        follow_up.text
    )
    release.set()
    replayed = await retry
    assert replayed.status_code == 200, replayed.text
    await asyncio.wait_for(runtime.service.wait_idle(), 60)
    runs = (await client.get(f"/api/cases/{case_id}/runs")).json()["runs"]
    assert [run["status"] for run in runs] == ["completed", "completed"], runs


@pytest.mark.parametrize("held", ["its queue check", "its retake of the run lock"])
async def test_a_retry_that_ran_the_first_run_while_a_slow_submit_let_go_is_not_run_again(
    client: httpx.AsyncClient,
    runtime: Runtime,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
    held: str,
) -> None:
    """A submit whose create outlasted a renewal of its run lock (forced) lets go of the
    lock and takes it again to start the first run. A retry landing in between (as the
    submit looks for follow-ups queued meanwhile, or is about to take the lock again) takes
    the lock and starts (here: completes) that run; the submit then ran it again from its
    intake, on a case that had ended, and answered it with a new case's empty state. The
    case's stream tells the run queued once, before it starts (not after the retry ended
    it)."""
    monkeypatch.setattr(runtime.service, "_may_run_out", lambda guard: True)
    reached, release = asyncio.Event(), asyncio.Event()
    if held == "its queue check":
        take_queue_left = runtime.service._take_queue_left

        async def check_held(target: str) -> None:
            if target == case_id and not reached.is_set():
                reached.set()
                await release.wait()
            await take_queue_left(target)

        monkeypatch.setattr(runtime.service, "_take_queue_left", check_held)
    else:
        hot = runtime.backends.hot
        assert hot is not None
        acquire: Callable[..., Any] = hot.acquire_lock
        takes = 0

        async def retake_held(name: str, *, ttl_ms: int) -> Any:
            nonlocal takes
            if name == run_lock_name(case_id):
                takes += 1
                if takes == 2:  # the submit's first take is before its create
                    reached.set()
                    await release.wait()
            return await acquire(name, ttl_ms=ttl_ms)

        monkeypatch.setattr(hot, "acquire_lock", retake_held)
    submit = asyncio.ensure_future(client.post("/api/cases", json=demo_case(case_id)))
    await asyncio.wait_for(reached.wait(), 10)
    retry = await client.post("/api/cases", json=demo_case(case_id))
    assert retry.status_code in (201, 202), retry.text
    # Not `wait_idle`: the submit's queue check, held here, goes on as its own task.
    deadline = time.monotonic() + 60
    while (status := (await client.get(f"/api/cases/{case_id}")).json())["status"] != "completed":
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.05)
    release.set()
    answer = await submit
    assert answer.status_code in (201, 202), answer.text
    # The case as the retry's run left it (not a new case's empty state).
    assert (answer.json()["status"], bool(answer.json()["final_response"])) == (
        "completed",
        True,
    ), answer.text
    await asyncio.wait_for(runtime.service.wait_idle(), 60)
    monkeypatch.undo()
    stream = await client.get(f"/api/cases/{case_id}/events", params={"seconds": 0})
    kinds = [event["event"] for event in parse_sse(stream.text)]
    assert kinds.count("run_started") == 1, kinds
    assert kinds.count("run_queued") == 1 and kinds[:2] == ["run_queued", "run_started"], kinds
    case = (await client.get(f"/api/cases/{case_id}")).json()
    assert (case["status"], bool(case["final_response"])) == ("completed", True), case
    assert len(await provider_calls(runtime, case_id, "refund")) == 1


async def test_a_retried_submit_of_a_case_awaiting_review_does_not_refuse_its_decision(
    client: httpx.AsyncClient,
    runtime: Runtime,
    case_id: str,
    reviewer: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client re-sends the submit of a case parked at human review while a reviewer
    decides it. The retry took the case's run lock before its create found the case there,
    and the decision meeting it was refused (409, "another runner keeps the case"). Held
    wherever it waits (its create, or its replay), the retry must leave the case to the
    decision."""
    body = {
        "case_id": case_id,
        "customer_id": "cust-escalated",
        "text": "The hotel charged me twice",
        "transactions": duplicate_charges(612.40, merchant="Hotel Europa"),
    }
    first = await client.post("/api/cases", json=body)
    assert first.status_code == 201, first.text
    await runtime.service.wait_idle()
    parked = (await client.get(f"/api/cases/{case_id}")).json()
    assert parked["status"] == "awaiting_review", parked
    reached, release = asyncio.Event(), asyncio.Event()

    async def held() -> None:
        if not reached.is_set():
            reached.set()
            await release.wait()

    cold = runtime.backends.cold
    create: Callable[..., Any] = cold.create
    replay = runtime.service._replay

    async def create_held(thread_id: str, sections: dict[str, Any], **kwargs: Any) -> Any:
        if thread_id == case_id:
            await held()
        return await create(thread_id, sections, **kwargs)

    async def replay_held(existing: Any, submission: Any, caller: Any) -> Any:
        await held()
        return await replay(existing, submission, caller)

    monkeypatch.setattr(cold, "create", create_held)
    monkeypatch.setattr(runtime.service, "_replay", replay_held)
    retry = asyncio.ensure_future(client.post("/api/cases", json=body))
    try:
        await asyncio.wait_for(reached.wait(), 10)
        decided = await client.post(
            f"/api/cases/{case_id}/review", json={"decision": "approve"}, headers=reviewer
        )
    finally:
        release.set()
    replayed = await retry
    assert decided.status_code in (200, 202), decided.text
    assert replayed.status_code == 200, replayed.text
    assert replayed.headers["idempotent-replayed"] == "true"
    await asyncio.wait_for(runtime.service.wait_idle(), 60)
    case = (await client.get(f"/api/cases/{case_id}")).json()
    assert (case["status"], case["review"]["decision"]) == ("completed", "approve"), case
    assert len(await provider_calls(runtime, case_id, "refund")) == 1
