"""A worker drives a bounded number of case runs at once (CASE_MAX_RUNS): a request that
would start one more is a 503 with Retry-After, refused before anything is written, and
the timer leaves such a case for a later tick; a run that ended makes room again.

Runs are held open after their intake step (the app's `after_step` seam), so the bound is
full for as long as the test needs, deterministically."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from e2e_payloads import duplicate_charges
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from state.hot.redis_client import create_redis_client
from state.hot.redis_store import LOCK_KIND, RedisHotStore
from support_cases import metrics
from support_cases.api import create_app
from support_cases.demo import demo_case
from support_cases.models import FollowUpStrategy, RunStatus
from support_cases.runs import new_run_entry
from support_cases.runtime import Runtime
from support_cases.service import message_run_id, run_lock_name
from support_cases.settings import AppSettings
from tests.support.metric_points import points
from tests.support.postgres import own_database


class Held:
    """Holds every run after its intake step until released; counts those that reached it."""

    def __init__(self) -> None:
        self.reached = 0
        self.changed = asyncio.Condition()
        self.release = asyncio.Event()

    async def hook(self, step: str) -> None:
        if step == "intake":
            async with self.changed:
                self.reached += 1
                self.changed.notify_all()
            await self.release.wait()

    async def until_reached(self, runs: int) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: self.reached >= runs), 30)


@pytest.fixture
def held() -> Held:
    return Held()


@pytest.fixture
async def client(
    e2e_settings: Callable[..., AppSettings],
    bearer: Callable[..., dict[str, str]],
    held: Held,
) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime]]:
    """A client of an app driving at most 2 runs, its runs held after intake; a database
    of its own, so that the timer here finds only this test's cases."""
    server = e2e_settings("postgres").postgres_url
    assert server is not None
    with own_database(server.get_secret_value()) as url:
        settings = e2e_settings(
            "postgres",
            postgres_url=url,
            state_write_mode="write-through",
            case_max_runs=2,
            case_sync_wait_seconds=0.5,
        )
        runtime = await Runtime.open(settings, after_step=held.hook)
        try:
            transport = httpx.ASGITransport(app=create_app(runtime))
            async with httpx.AsyncClient(
                transport=transport, base_url="http://runs.test", headers=bearer("submitter")
            ) as http:
                yield http, runtime
        finally:
            held.release.set()
            await runtime.service.wait_idle()
            await runtime.close()


async def submitted_until(http: httpx.AsyncClient, body: dict[str, Any], status: str) -> None:
    """Submits a case its runs are released for, and waits for it to reach `status`: within
    the sync wait (0.5 s here) a slow machine may answer 202 first."""
    answer = await http.post("/api/cases", json=body)
    assert answer.status_code in (201, 202), answer.text
    deadline = asyncio.get_running_loop().time() + 30
    while answer.json()["status"] != status:
        assert asyncio.get_running_loop().time() < deadline, answer.text
        await asyncio.sleep(0.05)
        answer = await http.get(f"/api/cases/{body['case_id']}")
        assert answer.status_code == 200, answer.text


async def fill_the_worker(http: httpx.AsyncClient, held: Held, case_id: str) -> tuple[str, str]:
    """Two cases whose runs are held at their first step: the worker's maximum reached."""
    first, second = f"{case_id}-1", f"{case_id}-2"
    reached = held.reached
    for one in (first, second):
        assert (await http.post("/api/cases", json=demo_case(one))).status_code == 202
    await held.until_reached(reached + 2)
    return first, second


async def test_a_case_past_the_maximum_is_503_with_nothing_written_and_an_ended_run_makes_room(
    client: tuple[httpx.AsyncClient, Runtime], held: Held, case_id: str
) -> None:
    http, runtime = client
    first, second = await fill_the_worker(http, held, case_id)
    refused_id = f"{case_id}-3"

    refused = await http.post("/api/cases", json=demo_case(refused_id))
    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"] == "5"
    assert "CASE_MAX_RUNS" in refused.json()["error"]
    # Nothing half-written: no case a run never starts on, nothing for the timer.
    assert (await http.get(f"/api/cases/{refused_id}")).status_code == 404
    # The timer starts no run past the bound either.
    report = await runtime.service.resume_stale()
    assert not report.resumed and not report.failed
    assert set(report.skipped) == {first, second}
    assert all("most runs" in why for why in report.skipped.values()), report.skipped

    held.release.set()
    await runtime.service.wait_idle()
    retried = await http.post("/api/cases", json=demo_case(refused_id))
    assert retried.status_code in (201, 202), retried.text  # 202: past the sync wait
    await runtime.service.wait_idle()
    assert (await http.get(f"/api/cases/{refused_id}")).json()["status"] == "completed"


async def test_a_burst_of_cases_at_once_is_held_to_the_maximum(
    client: tuple[httpx.AsyncClient, Runtime], held: Held, case_id: str
) -> None:
    """Requests arriving together each awaited the stores before their runs started: the
    slot is taken before that, or all of them would pass the bound."""
    http, runtime = client
    ids = [f"{case_id}-{n}" for n in range(6)]
    answers = await asyncio.gather(*(http.post("/api/cases", json=demo_case(i)) for i in ids))
    assert sorted(answer.status_code for answer in answers) == [202, 202, 503, 503, 503, 503]
    for one, answer in zip(ids, answers, strict=True):
        expected = 404 if answer.status_code == 503 else 200
        assert (await http.get(f"/api/cases/{one}")).status_code == expected
    held.release.set()
    await runtime.service.wait_idle()
    # Every slot was given back: the runs ended, and the refused never kept one.
    again_ids = [f"{i}-again" for i in ids[:2]]
    again = await asyncio.gather(*(http.post("/api/cases", json=demo_case(i)) for i in again_ids))
    # Both started (202 when a loaded machine runs them past the sync wait), none refused.
    assert {answer.status_code for answer in again} <= {201, 202}, [a.text for a in again]
    await runtime.service.wait_idle()
    for one in again_ids:
        assert (await http.get(f"/api/cases/{one}")).json()["status"] == "completed"


async def test_a_replayed_submit_is_answered_with_its_case_while_the_maximum_is_reached(
    client: tuple[httpx.AsyncClient, Runtime], held: Held, case_id: str
) -> None:
    """A retry of a submit that created its case (the client lost the answer) starts no
    run: it is answered as any replay is, not told to come back later; a submit naming
    that case with another body is still the conflict it is."""
    http, _ = client
    first, _ = await fill_the_worker(http, held, case_id)

    replayed = await http.post("/api/cases", json=demo_case(first))
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["case_id"] == first
    other = {**demo_case(first), "text": "another request under the same case id"}
    assert (await http.post("/api/cases", json=other)).status_code == 409
    # A new case is still refused.
    assert (await http.post("/api/cases", json=demo_case(f"{case_id}-3"))).status_code == 503


async def test_a_replayed_message_whose_run_started_is_answered_while_the_maximum_is_reached(
    client: tuple[httpx.AsyncClient, Runtime], held: Held, case_id: str
) -> None:
    """As a replayed submit: a retried follow-up whose run has left the queue starts no
    run, and is answered with that run; a new message is still refused."""
    http, runtime = client
    answered = f"{case_id}-0"
    key = {"Idempotency-Key": f"{case_id}-message"}
    text = {"text": "any news?"}
    held.release.set()
    assert (await http.post("/api/cases", json=demo_case(answered))).status_code == 201
    sent = await http.post(f"/api/cases/{answered}/messages", json=text, headers=key)
    assert sent.status_code == 200, sent.text
    await runtime.service.wait_idle()
    held.release.clear()
    await fill_the_worker(http, held, case_id)

    replayed = await http.post(f"/api/cases/{answered}/messages", json=text, headers=key)
    assert replayed.status_code == 200, replayed.text
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert replayed.json()["run"]["run_id"] == sent.json()["run"]["run_id"]
    new = await http.post(f"/api/cases/{answered}/messages", json={"text": "and now?"})
    assert new.status_code == 503, new.text


def escalated(case_id: str) -> dict[str, object]:
    """A case whose refund goes to human review: its run pauses, and nobody drives it."""
    return {**demo_case(case_id), "transactions": duplicate_charges(612.40)}


@pytest.mark.parametrize(
    ("strategy", "stopped"), [("interrupt", "interrupted"), ("rollback", "rolled_back")]
)
async def test_a_follow_up_stopping_a_run_is_taken_while_the_maximum_is_reached(
    client: tuple[httpx.AsyncClient, Runtime],
    held: Held,
    case_id: str,
    strategy: str,
    stopped: str,
) -> None:
    """It frees work rather than adding any: the run it stops hands its slot on to the
    follow-up's run, which needs none of its own; a new case is still refused."""
    http, runtime = client
    first, _ = await fill_the_worker(http, held, case_id)

    sent = await http.post(
        f"/api/cases/{first}/messages", json={"text": "forget it", "strategy": strategy}
    )
    assert sent.status_code == 202, sent.text
    follow_up = sent.json()["run"]
    assert follow_up["status"] == "queued"
    assert (await http.post("/api/cases", json=demo_case(f"{case_id}-3"))).status_code == 503

    held.release.set()
    await runtime.service.wait_idle()
    runs = (await http.get(f"/api/cases/{first}/runs")).json()["runs"]
    assert [(run["kind"], run["status"]) for run in runs] == [
        ("intake", stopped),
        ("message", "completed"),
    ], runs
    assert runs[0]["stopped_by"] == follow_up["run_id"]
    assert runtime.service.run_slots.taken == 0


async def test_a_follow_up_queued_behind_a_run_is_taken_while_the_maximum_is_reached(
    client: tuple[httpx.AsyncClient, Runtime], held: Held, case_id: str
) -> None:
    """Found by review: a plain follow-up (enqueue) to a case whose run is going was refused
    (503) on a full worker, though, like a stop, it starts no run: that run's runner starts
    it next, in its slot. Its retry is its replay; a new case is still refused."""
    http, runtime = client
    first, _ = await fill_the_worker(http, held, case_id)
    message = {"text": "any news?", "strategy": "enqueue"}
    key = {"Idempotency-Key": f"{case_id}-news"}

    sent = await http.post(f"/api/cases/{first}/messages", json=message, headers=key)
    assert sent.status_code == 202, sent.text
    assert sent.json()["run"]["status"] == "queued"
    replayed = await http.post(f"/api/cases/{first}/messages", json=message, headers=key)
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["run"]["run_id"] == sent.json()["run"]["run_id"]
    assert (await http.post("/api/cases", json=demo_case(f"{case_id}-3"))).status_code == 503
    assert runtime.service.run_slots.refused == 1

    held.release.set()
    await runtime.service.wait_idle()
    runs = (await http.get(f"/api/cases/{first}/runs")).json()["runs"]
    assert [(run["kind"], run["status"]) for run in runs] == [
        ("intake", "completed"),
        ("message", "completed"),
    ], runs
    assert runtime.service.run_slots.taken == 0


def slots_taken_during(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The slots taken from now on (the count after each take): none for a request that
    starts no run on a full worker (`admitted` refuses it before taking one)."""
    slots = runtime.service.run_slots
    seen: list[int] = []
    take = slots._take

    def counted() -> Any:
        slot = take()
        seen.append(slots.taken)
        return slot

    monkeypatch.setattr(slots, "_take", counted)
    return seen


async def test_a_follow_up_queued_behind_a_review_is_taken_while_the_maximum_is_reached(
    client: tuple[httpx.AsyncClient, Runtime],
    held: Held,
    case_id: str,
    bearer: Callable[..., dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by review: a plain follow-up (enqueue) to a case paused for review was refused
    (503) on a full worker, though it starts no run: with room, it waits queued behind the
    review, and the decision's run starts it next. Taken so on a full worker, with no slot,
    and its retry is its replay; a stop of that paused run would start one, still refused."""
    http, runtime = client
    reviewer = bearer("run-limit-reviewer")
    paused = f"{case_id}-0"
    held.release.set()
    await submitted_until(http, escalated(paused), "awaiting_review")
    held.release.clear()
    await fill_the_worker(http, held, case_id)
    taken = slots_taken_during(runtime, monkeypatch)
    message = {"text": "any news?", "strategy": "enqueue"}
    key = {"Idempotency-Key": f"{case_id}-news"}

    sent = await http.post(f"/api/cases/{paused}/messages", json=message, headers=key)
    assert sent.status_code == 202, sent.text
    assert sent.json()["run"]["status"] == "queued"
    replayed = await http.post(f"/api/cases/{paused}/messages", json=message, headers=key)
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["run"]["run_id"] == sent.json()["run"]["run_id"]
    stop = await http.post(
        f"/api/cases/{paused}/messages", json={"text": "stop", "strategy": "interrupt"}
    )
    assert stop.status_code == 503, stop.text
    runs = (await http.get(f"/api/cases/{paused}/runs")).json()["runs"]
    assert [(run["kind"], run["status"]) for run in runs] == [
        ("intake", "awaiting_review"),
        ("message", "queued"),
    ], runs
    assert taken == [], taken
    assert runtime.service.run_slots.refused == 1

    held.release.set()
    await runtime.service.wait_idle()
    decided = await http.post(
        f"/api/cases/{paused}/review", json={"decision": "approve"}, headers=reviewer
    )
    assert decided.status_code in (200, 202), decided.text
    await runtime.service.wait_idle()
    runs = (await http.get(f"/api/cases/{paused}/runs")).json()["runs"]
    assert [(run["kind"], run["status"]) for run in runs] == [
        ("intake", "completed"),
        ("message", "completed"),
    ], runs
    assert runtime.service.run_slots.taken == 0


async def test_a_follow_up_queued_behind_a_run_whose_runner_is_gone_takes_no_slot(
    client: tuple[httpx.AsyncClient, Runtime],
    held: Held,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by review: a plain follow-up taken on a full worker behind a run whose runner
    is gone (its lock ran out, as after a crash) found the case free and took it up, a run
    slot past the bound, for nothing: a plain follow-up waits for the stalled run's resume.
    Nor is its retry (its replay) a slot more."""
    http, runtime = client
    first, _ = await fill_the_worker(http, held, case_id)
    hot = runtime.backends.hot
    assert isinstance(hot, RedisHotStore)
    raw = create_redis_client(runtime.settings)
    try:
        assert await raw.delete(hot.key(run_lock_name(first), LOCK_KIND)) == 1
    finally:
        await raw.aclose()
    taken = slots_taken_during(runtime, monkeypatch)
    message = {"text": "any news?", "strategy": "enqueue"}
    key = {"Idempotency-Key": f"{case_id}-news"}

    sent = await http.post(f"/api/cases/{first}/messages", json=message, headers=key)
    assert sent.status_code == 202, sent.text
    replayed = await http.post(f"/api/cases/{first}/messages", json=message, headers=key)
    assert replayed.status_code == 200, replayed.text
    runs = (await http.get(f"/api/cases/{first}/runs")).json()["runs"]
    assert [(run["kind"], run["status"]) for run in runs] == [
        ("intake", "running"),
        ("message", "queued"),
    ], runs
    assert taken == [], taken


async def test_a_retried_follow_up_left_queued_on_a_case_at_rest_is_refused_while_the_maximum_is_reached(
    client: tuple[httpx.AsyncClient, Runtime], held: Held, case_id: str
) -> None:
    """A follow-up queued on a case at rest by a request that ended before starting it (a
    503 after its write, a crash): its retry on a full worker would start it, a run past the
    bound. Refused, it stays queued for a worker with room."""
    http, runtime = client
    ended = f"{case_id}-0"
    held.release.set()
    assert (await http.post("/api/cases", json=demo_case(ended))).status_code == 201
    key, text = f"{case_id}-news", "any news?"
    run_id = message_run_id(ended, key)
    left = new_run_entry(
        run_id, "message", RunStatus.QUEUED, text=text, strategy=FollowUpStrategy.ENQUEUE
    )
    await runtime.service._tracker.enqueue(
        ended, left, FollowUpStrategy.ENQUEUE, agent_id="run-limit-test"
    )
    held.release.clear()
    await fill_the_worker(http, held, case_id)

    retried = await http.post(
        f"/api/cases/{ended}/messages",
        json={"text": text, "strategy": "enqueue"},
        headers={"Idempotency-Key": key},
    )
    assert retried.status_code == 503, retried.text
    runs = (await http.get(f"/api/cases/{ended}/runs")).json()["runs"]
    assert next(run for run in runs if run["run_id"] == run_id)["status"] == "queued"
    assert runtime.service.run_slots.taken == 2


async def test_a_follow_up_refused_while_the_maximum_is_reached_leaves_no_run_index_entry(
    client: tuple[httpx.AsyncClient, Runtime], held: Held, case_id: str
) -> None:
    """Found by review: a follow-up refused on a full worker (its case has no run going to
    take it next) indexed the case first, an entry for the timer to drop later."""
    http, runtime = client
    tracker = runtime.service._tracker
    ended = f"{case_id}-0"
    held.release.set()
    await submitted_until(http, demo_case(ended), "completed")
    await runtime.service.resume_stale()  # a case with nothing left to run leaves the index
    assert ended not in await tracker.active_cases()
    held.release.clear()
    await fill_the_worker(http, held, case_id)

    for strategy in ("interrupt", "rollback", "enqueue"):
        refused = await http.post(
            f"/api/cases/{ended}/messages", json={"text": "and now?", "strategy": strategy}
        )
        assert refused.status_code == 503, refused.text
    assert ended not in await tracker.active_cases()


async def test_a_follow_up_to_a_case_in_the_wrong_state_is_its_404_or_409_while_the_maximum_is_reached(
    client: tuple[httpx.AsyncClient, Runtime],
    held: Held,
    case_id: str,
    bearer: Callable[..., dict[str, str]],
) -> None:
    """A 503 tells the client to retry what can never succeed: the wrong target is said
    first, as a worker with room says it; the right one is still refused, with nothing
    written, when it would start a run (a stop of a run nobody drives would)."""
    http, _ = client
    reviewer = bearer("run-limit-reviewer")
    paused = f"{case_id}-0"
    held.release.set()
    await submitted_until(http, escalated(paused), "awaiting_review")
    held.release.clear()
    first, _ = await fill_the_worker(http, held, case_id)

    approve = {"decision": "approve"}
    rejected = await http.post(
        f"/api/cases/{first}/messages", json={"text": "any news?", "strategy": "reject"}
    )
    assert rejected.status_code == 409, rejected.text
    assert "run in progress" in rejected.json()["error"]
    running = await http.post(f"/api/cases/{first}/review", json=approve, headers=reviewer)
    assert running.status_code == 409, running.text
    assert "not awaiting review (status: running)" in running.json()["error"]
    not_stalled = await http.post(f"/api/cases/{first}/resume")
    assert not_stalled.status_code == 409, not_stalled.text
    assert "nothing to resume" in not_stalled.json()["error"]
    unknown = await http.post(f"/api/cases/{case_id}-unknown/resume")
    assert unknown.status_code == 404, unknown.text

    for refused in (
        await http.post(f"/api/cases/{paused}/review", json=approve, headers=reviewer),
        await http.post(
            f"/api/cases/{paused}/messages", json={"text": "stop", "strategy": "interrupt"}
        ),
    ):
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "5"
    after = (await http.get(f"/api/cases/{paused}")).json()
    assert after["status"] == "awaiting_review"
    runs = (await http.get(f"/api/cases/{paused}/runs")).json()["runs"]
    assert [(run["kind"], run["status"]) for run in runs] == [("intake", "awaiting_review")]


async def test_the_slots_taken_and_the_requests_refused_show_in_the_metrics(
    client: tuple[httpx.AsyncClient, Runtime], held: Held, case_id: str
) -> None:
    http, runtime = client
    # The runtime feeds the process's instruments; these are the test's own, on the same slots.
    assert metrics.app_metrics._run_slots is runtime.service.run_slots
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    meters = metrics.AppMetrics(provider.get_meter("test"))
    meters.register_run_slots(runtime.service.run_slots)
    try:
        assert points(reader, metrics.RUN_SLOTS_TAKEN) == {(): 0}
        first, _ = await fill_the_worker(http, held, case_id)
        assert points(reader, metrics.RUN_SLOTS_TAKEN) == {(): 2}

        for refused in (f"{case_id}-3", f"{case_id}-4"):
            assert (await http.post("/api/cases", json=demo_case(refused))).status_code == 503
        # A replayed submit is answered, not refused.
        assert (await http.post("/api/cases", json=demo_case(first))).status_code == 200
        assert points(reader, metrics.RUNS_REFUSED) == {(): 2}

        held.release.set()
        await runtime.service.wait_idle()
        assert points(reader, metrics.RUN_SLOTS_TAKEN) == {(): 0}
        assert points(reader, metrics.RUNS_REFUSED) == {(): 2}
    finally:
        provider.shutdown()


async def ends_stopped_then_followed(
    http: httpx.AsyncClient, runtime: Runtime, held: Held, case_id: str
) -> None:
    """The held runs let go: the case's first run ends interrupted, the stop's run completed,
    and no run slot is left taken."""
    held.release.set()
    await runtime.service.wait_idle()
    runs = (await http.get(f"/api/cases/{case_id}/runs")).json()["runs"]
    assert [(run["kind"], run["status"]) for run in runs] == [
        ("intake", "interrupted"),
        ("message", "completed"),
    ], runs
    assert runtime.service.run_slots.taken == 0


async def started_then_ends_stopped_then_followed(
    http: httpx.AsyncClient, runtime: Runtime, held: Held, case_id: str, run_id: str
) -> None:
    """The stop's run (`run_id`) leaves `queued` within 10 s; then as `ends_stopped_then_followed`."""

    async def follow_up_started() -> None:
        while True:
            runs = (await http.get(f"/api/cases/{case_id}/runs")).json()["runs"]
            if next(run for run in runs if run["run_id"] == run_id)["status"] != "queued":
                return
            await asyncio.sleep(0.1)

    await asyncio.wait_for(follow_up_started(), 10)
    await ends_stopped_then_followed(http, runtime, held, case_id)


async def test_a_retried_follow_up_stopping_a_run_is_its_replay_while_the_maximum_is_reached(
    client: tuple[httpx.AsyncClient, Runtime], held: Held, case_id: str
) -> None:
    """Found by review: a stop taken on a full worker (202, queued for the runner of the run
    it stops) was refused (503) when its client, having lost the answer, sent it again: the
    replay of a run still queued read as a run more to start."""
    http, runtime = client
    first, _ = await fill_the_worker(http, held, case_id)
    message = {"text": "forget it", "strategy": "interrupt"}
    key = {"Idempotency-Key": f"{case_id}-stop"}
    sent = await http.post(f"/api/cases/{first}/messages", json=message, headers=key)
    assert sent.status_code == 202, sent.text

    replayed = await http.post(f"/api/cases/{first}/messages", json=message, headers=key)
    assert replayed.status_code == 200, replayed.text
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert replayed.json()["run"]["run_id"] == sent.json()["run"]["run_id"]
    assert runtime.service.run_slots.refused == 0
    other = {**message, "text": "another message under that key"}
    mismatched = await http.post(f"/api/cases/{first}/messages", json=other, headers=key)
    assert mismatched.status_code == 422, mismatched.text

    await ends_stopped_then_followed(http, runtime, held, first)


@pytest.mark.parametrize("gone", ["before the stop", "before its retry"])
async def test_a_stop_of_a_run_nobody_drives_starts_its_follow_up_while_the_maximum_is_reached(
    client: tuple[httpx.AsyncClient, Runtime], held: Held, case_id: str, gone: str
) -> None:
    """Found by review: a stop taken on a full worker is left to the runner of the run it
    stops. A run left "running" by a runner gone (its lock ran out, as after a crash) has
    none: the stop stayed queued until the timer found the run stalled, where a worker with
    room starts it at once (a run past the bound, as any queue taken up outside a request).
    The runner gone only after the stop was taken, the client's retry of the stop (its
    replay) starts it so."""
    http, runtime = client
    first, _ = await fill_the_worker(http, held, case_id)
    hot = runtime.backends.hot
    assert isinstance(hot, RedisHotStore)

    async def runner_gone() -> None:
        raw = create_redis_client(runtime.settings)
        try:
            assert await raw.delete(hot.key(run_lock_name(first), LOCK_KIND)) == 1
        finally:
            await raw.aclose()

    message = {"text": "forget it", "strategy": "interrupt"}
    key = {"Idempotency-Key": f"{case_id}-stop"}
    if gone == "before the stop":
        await runner_gone()
    sent = await http.post(f"/api/cases/{first}/messages", json=message, headers=key)
    assert sent.status_code == 202, sent.text
    run_id = sent.json()["run"]["run_id"]
    if gone == "before its retry":
        await runner_gone()
        replayed = await http.post(f"/api/cases/{first}/messages", json=message, headers=key)
        assert replayed.status_code == 200, replayed.text
    await started_then_ends_stopped_then_followed(http, runtime, held, first, run_id)


async def test_a_stop_queued_while_a_refused_submit_looks_at_its_case_is_started(
    client: tuple[httpx.AsyncClient, Runtime],
    held: Held,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by review: a retried submit refused on a full worker takes the case's run lock
    to learn whether its first run is left unstarted (nobody holds it). A stop queued
    meanwhile finds the case taken and leaves its run to the holder, which let go without
    looking at the queue: the stop waited for the timer to find the run stalled."""
    http, runtime = client
    first, _ = await fill_the_worker(http, held, case_id)
    hot = runtime.backends.hot
    assert isinstance(hot, RedisHotStore)
    raw = create_redis_client(runtime.settings)
    try:  # the first run's runner gone (its lock ran out, as after a crash)
        assert await raw.delete(hot.key(run_lock_name(first), LOCK_KIND)) == 1
    finally:
        await raw.aclose()
    service = runtime.service
    try_lock = service._try_lock
    stopped: list[httpx.Response] = []

    async def stop_while_held(locked_id: str) -> Any:
        guard = await try_lock(locked_id)
        if locked_id == first and guard is not None and not stopped:
            stopped.append(
                await http.post(
                    f"/api/cases/{first}/messages",
                    json={"text": "forget it", "strategy": "interrupt"},
                )
            )
        return guard

    monkeypatch.setattr(service, "_try_lock", stop_while_held)
    retried = await http.post("/api/cases", json=demo_case(first))
    assert retried.status_code == 503, retried.text  # its first run is left: a run more
    assert [answer.status_code for answer in stopped] == [202], stopped
    run_id = stopped[0].json()["run"]["run_id"]
    await started_then_ends_stopped_then_followed(http, runtime, held, first, run_id)


async def test_the_timer_leaves_a_dead_workers_queue_for_a_later_tick_while_the_maximum_is_reached(
    client: tuple[httpx.AsyncClient, Runtime], held: Held, case_id: str
) -> None:
    """Runs queued on a case at rest by a worker that died before starting them: a tick on
    a full worker starts none of them (skipped, still queued); a tick with room starts them."""
    http, runtime = client
    ended = f"{case_id}-0"
    held.release.set()
    assert (await http.post("/api/cases", json=demo_case(ended))).status_code == 201
    left = new_run_entry(
        message_run_id(ended, f"{case_id}-left"),
        "message",
        RunStatus.QUEUED,
        text="any news?",
        strategy=FollowUpStrategy.ENQUEUE,
    )
    await runtime.service._tracker.enqueue(
        ended, left, FollowUpStrategy.ENQUEUE, agent_id="run-limit-test"
    )
    held.release.clear()
    await fill_the_worker(http, held, case_id)

    report = await runtime.service.resume_stale()
    assert not report.resumed and not report.failed, report
    assert "most runs" in report.skipped[ended], report
    runs = (await http.get(f"/api/cases/{ended}/runs")).json()["runs"]
    assert [run["status"] for run in runs] == ["completed", "queued"], runs
    assert runtime.service.run_slots.taken == 2

    held.release.set()
    await runtime.service.wait_idle()
    report = await runtime.service.resume_stale()
    assert report.resumed == [ended], report
    await runtime.service.wait_idle()
    runs = (await http.get(f"/api/cases/{ended}/runs")).json()["runs"]
    assert [run["status"] for run in runs] == ["completed", "completed"], runs
    assert runtime.service.run_slots.taken == 0
