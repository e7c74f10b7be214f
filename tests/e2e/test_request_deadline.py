"""A request that gets no answer within API_REQUEST_DEADLINE_SECONDS, its stores slow, is
answered 503 with Retry-After, on the real stack for each cold backend; cut, it leaves
nothing half-done (as a client's disconnect does: test_request_cancellation.py). A run's
own wait (CASE_SYNC_WAIT_SECONDS) and an event stream's `seconds` are not cut.

A slow store is a store call whose reply is held back (as in test_request_cancellation.py)
until the request was answered: each call is bounded, but not a request's several.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from state import JSON
from state.ports import HotRead
from support_cases.api import create_app
from support_cases.demo import demo_case
from support_cases.runtime import Runtime
from support_cases.settings import AppSettings
from tests.support.effects import provider_calls, run_once_outcome

DEADLINE_SECONDS = 1.0
# Time for the 503 to come back once the deadline passed: far below a held call's forever.
MARGIN_SECONDS = 2.0


def bounded(runtime: Runtime, **overrides: object) -> Runtime:
    """The runtime, its API's settings with a short request deadline."""
    settings = runtime.settings.model_copy(
        update={"api_request_deadline_seconds": DEADLINE_SECONDS, **overrides}
    )
    return dataclasses.replace(runtime, settings=settings)


@pytest.fixture
async def deadline_client(
    runtime: Runtime, bearer: Callable[..., dict[str, str]]
) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(bounded(runtime)))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://e2e.test", headers=bearer("e2e-client")
    ) as http:
        yield http


def assert_cut(answer: httpx.Response, elapsed: float) -> None:
    assert answer.status_code == 503, answer.text
    assert int(answer.headers["Retry-After"]) >= 1, answer.headers
    assert "no answer within" in answer.json()["error"], answer.text
    assert DEADLINE_SECONDS <= elapsed < DEADLINE_SECONDS + MARGIN_SECONDS, elapsed


async def timed(request: Any) -> tuple[httpx.Response, float]:
    """The answer and how long it took; a request still unanswered past the deadline and
    its margin fails (a held call never answers on its own)."""
    started = time.monotonic()
    answer = await asyncio.wait_for(request, DEADLINE_SECONDS + MARGIN_SECONDS)
    return answer, time.monotonic() - started


async def test_a_read_whose_store_does_not_answer_in_time_is_answered_503(
    runtime: Runtime,
    client: httpx.AsyncClient,
    deadline_client: httpx.AsyncClient,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The case's status, its record's read held back in Redis: 503 with Retry-After
    within the deadline, in the API's error shape; the same read answers once the store
    does."""
    submitted = await client.post("/api/cases", json=demo_case(case_id))
    assert submitted.status_code in (201, 202), submitted.text
    await runtime.service.wait_idle()

    hot = runtime.backends.hot
    assert hot is not None
    read: Callable[..., Any] = hot.read
    answers = asyncio.Event()

    async def slow_read(thread_id: str) -> HotRead:
        if thread_id == case_id:
            await answers.wait()
        found: HotRead = await read(thread_id)
        return found

    monkeypatch.setattr(hot, "read", slow_read)
    try:
        answer, elapsed = await timed(deadline_client.get(f"/api/cases/{case_id}"))
    finally:
        answers.set()
    assert_cut(answer, elapsed)
    monkeypatch.undo()
    again = await deadline_client.get(f"/api/cases/{case_id}")
    assert (again.status_code, again.json()["status"]) == (200, "completed"), again.text


async def test_a_submit_cut_by_the_deadline_still_runs_its_case_once(
    runtime: Runtime,
    deadline_client: httpx.AsyncClient,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The submit's create, written by the cold tier, its reply held back past the
    deadline: 503 with Retry-After; the case, created running, is not left so (its first
    run goes on, as a cancelled submit's does): it completes, each side effect done once,
    its run lock released; the submit sent again answers the finished case."""
    key = {"Idempotency-Key": f"deadline-{case_id}"}
    cold = runtime.backends.cold
    create: Callable[..., Any] = cold.create
    answered = asyncio.Event()

    async def reply_held(thread_id: str, sections: dict[str, JSON], **kwargs: Any) -> Any:
        stored = await create(thread_id, sections, **kwargs)
        if thread_id == case_id:
            await answered.wait()
        return stored

    monkeypatch.setattr(cold, "create", reply_held)
    try:
        answer, elapsed = await timed(
            deadline_client.post("/api/cases", json=demo_case(case_id), headers=key)
        )
    finally:
        answered.set()
    assert_cut(answer, elapsed)
    await asyncio.wait_for(runtime.service.wait_idle(), 60)
    monkeypatch.undo()

    observed = await run_once_outcome(deadline_client, runtime, case_id)
    assert observed == ("completed", 1, 1, 1, None), observed
    retried = await deadline_client.post("/api/cases", json=demo_case(case_id), headers=key)
    assert (retried.status_code, retried.json()["status"]) == (200, "completed"), retried.text
    await asyncio.wait_for(runtime.service.wait_idle(), 60)
    assert len(await provider_calls(runtime, case_id, "refund")) == 1


async def test_a_run_longer_than_the_deadline_is_waited_for_as_asked(
    runtime: Runtime,
    e2e_settings: Callable[..., AppSettings],
    bearer: Callable[..., dict[str, str]],
    case_id: str,
) -> None:
    """A submit's wait for its run (CASE_SYNC_WAIT_SECONDS) is the request's own: a run
    that takes longer than the deadline, within that wait, answers 201, not 503."""
    slow_step = "refund"

    async def slower_than_the_deadline(step: str) -> None:
        if step == slow_step:
            # Due after the request's deadline, which was set before the run began.
            await asyncio.sleep(DEADLINE_SECONDS + 0.5)

    own = await Runtime.open(
        e2e_settings(
            runtime.settings.state_cold_backend.value,
            api_request_deadline_seconds=DEADLINE_SECONDS,
            case_sync_wait_seconds=30,
        ),
        after_step=slower_than_the_deadline,
    )
    try:
        transport = httpx.ASGITransport(app=create_app(own))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://e2e.test", headers=bearer("e2e-client")
        ) as client:
            started = time.monotonic()
            answer = await client.post("/api/cases", json=demo_case(case_id))
            elapsed = time.monotonic() - started
            assert answer.status_code == 201, answer.text
            assert answer.json()["status"] == "completed", answer.text
            assert elapsed > DEADLINE_SECONDS, elapsed
    finally:
        await own.service.wait_idle()
        await own.close()


async def test_an_event_stream_stays_open_past_the_deadline(
    runtime: Runtime,
    client: httpx.AsyncClient,
    deadline_client: httpx.AsyncClient,
    case_id: str,
) -> None:
    """An event stream asked open for longer than the deadline is served to its end."""
    submitted = await client.post("/api/cases", json=demo_case(case_id))
    assert submitted.status_code in (201, 202), submitted.text
    await runtime.service.wait_idle()
    seconds = DEADLINE_SECONDS + 0.5
    started = time.monotonic()
    events = await deadline_client.get(f"/api/cases/{case_id}/events", params={"seconds": seconds})
    elapsed = time.monotonic() - started
    assert events.status_code == 200, events.text
    assert "run_started" in events.text
    assert elapsed >= seconds, elapsed
