"""Double-texting across processes: two API processes (uvicorn) on one stack (the same
Redis and cold store), per cold backend.

Process A runs the app with its billing step held open a few seconds
(`tests.step_pause`), so the case's run is in progress on A while a follow-up is posted
to process B. B only queues the follow-up (A holds the case's run lock); A drains the
queue when its run ends or stops. The case's events, published by both processes, are
read from B.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from api_server import api_process, app_env, wait_for
from test_conversation import (
    LOGIN_AGAIN,
    THANKS,
    conversation,
    customer_messages,
)

from support_cases.demo import demo_case
from support_cases.runtime import Runtime
from tests.step_pause import PAUSE_AFTER_ENV, PAUSED_APP
from tests.support.sse import parse_sse

# How long A holds the billing step of every run it drives: long enough for the test to
# see the run there and post the follow-up to B before the step ends. The follow-ups
# below ask about access or say thanks, so their runs (on A too) need no billing step.
HOLD_SECONDS = 4
BILLING_HOLD = f"billing={HOLD_SECONDS}"


@dataclass
class Processes:
    a: httpx.AsyncClient
    b: httpx.AsyncClient
    b_process: subprocess.Popen[bytes]
    log_a: Path
    log_b: Path


@pytest.fixture(scope="module")
async def processes(
    runtime: Runtime, stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Processes]:
    """A (billing held) and B (the app's own factory), both on `runtime`'s stack."""
    logs = tmp_path_factory.mktemp("conversation-processes")
    env = {
        **app_env(runtime, stack_env),
        # A held step is a live run, not a stalled one: its heartbeat may pause a while.
        "CASE_STALE_AFTER_SECONDS": "60",
        # Answers come back at once (202) while runs go on.
        "CASE_SYNC_WAIT_SECONDS": "0.2",
    }
    async with AsyncExitStack() as stack:
        (_, a), (b_process, b) = await asyncio.gather(
            stack.enter_async_context(
                api_process({**env, PAUSE_AFTER_ENV: BILLING_HOLD}, logs / "a.log", PAUSED_APP)
            ),
            stack.enter_async_context(api_process(env, logs / "b.log")),
        )
        yield Processes(a, b, b_process, logs / "a.log", logs / "b.log")


async def case_on(client: httpx.AsyncClient, case_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/cases/{case_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def runs_on(client: httpx.AsyncClient, case_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/api/cases/{case_id}/runs")
    assert response.status_code == 200, response.text
    return list(response.json()["runs"])


async def events_on(client: httpx.AsyncClient, case_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/api/cases/{case_id}/events", params={"seconds": 0})
    assert response.status_code == 200, response.text
    return parse_sse(response.text)


async def hold_on_a(procs: Processes, case_id: str) -> str:
    """Submit the demo case to A and wait until its run is held in the billing step;
    the run's id."""
    response = await procs.a.post("/api/cases", json=demo_case(case_id))
    assert response.status_code == 202, response.text

    async def in_billing() -> bool:
        case = await case_on(procs.b, case_id)
        return case["status"] == "running" and case["billing"] is not None

    await wait_for(in_billing, "the run to reach the held billing step on A", procs.log_a, 30)
    [run] = await runs_on(procs.b, case_id)
    assert run["status"] == "running" and run["kind"] == "intake"
    return str(run["run_id"])


async def post(client: httpx.AsyncClient, case_id: str, text: str, strategy: str) -> dict[str, Any]:
    response = await client.post(
        f"/api/cases/{case_id}/messages", json={"text": text, "strategy": strategy}
    )
    # 202: queued, since A holds the case; B did not run it.
    assert response.status_code == 202, response.text
    run = response.json()["run"]
    assert run["status"] == "queued", run
    return dict(run)


async def until_rest(procs: Processes, case_id: str) -> list[dict[str, Any]]:
    async def resting() -> list[dict[str, Any]] | None:
        runs = await runs_on(procs.a, case_id)
        return None if any(r["status"] in ("queued", "running") for r in runs) else runs

    return list(await wait_for(resting, "the case's runs to end", procs.log_a, 60))


def index_of(events: list[dict[str, Any]], event: str, run_id: str) -> int:
    found = [i for i, e in enumerate(events) if e["event"] == event and e.get("run_id") == run_id]
    assert len(found) == 1, (event, run_id, [(e["event"], e.get("run_id")) for e in events])
    return found[0]


async def test_interrupt_posted_to_b_stops_the_run_on_a_which_runs_the_follow_up(
    processes: Processes, runtime: Runtime, case_id: str
) -> None:
    first = await hold_on_a(processes, case_id)
    follow_up = (await post(processes.b, case_id, LOGIN_AGAIN, "interrupt"))["run_id"]
    # B is frozen from here until the runs end: whatever runs the follow-up, it is not B.
    os.kill(processes.b_process.pid, signal.SIGSTOP)
    try:
        runs = await until_rest(processes, case_id)
        case = await case_on(processes.a, case_id)
    finally:
        os.kill(processes.b_process.pid, signal.SIGCONT)

    assert [(r["run_id"], r["status"]) for r in runs] == [
        (first, "interrupted"),
        (follow_up, "completed"),
    ]
    assert runs[0]["stopped_by"] == follow_up
    assert runs[1]["started_at"] >= runs[0]["ended_at"]
    steps = case["completed_steps"]
    # The first run kept intake, billing and account, and stopped before its next step
    # (policy): policy, refund and response ran once, in the follow-up's run.
    assert sorted(steps[:3]) == ["account", "billing", "intake"], steps
    assert steps[3:] == ["intake", "account", "policy", "refund", "response"], steps
    assert case["status"] == "completed" and case["refund"]["status"] == "issued"
    # The answer is the follow-up's, and covers the whole case.
    assert f'follow-up ("{LOGIN_AGAIN}")' in case["final_response"]
    assert "refunded 49.99 USD" in case["final_response"]
    assert customer_messages(await conversation(runtime, case_id)) == [
        demo_case(case_id)["text"],
        LOGIN_AGAIN,
    ]

    # The events, as B serves them: A's run interrupted, then the follow-up's run.
    events = await events_on(processes.b, case_id)
    queued = index_of(events, "run_queued", follow_up)
    interrupted = index_of(events, "run_interrupted", first)
    started = index_of(events, "run_started", follow_up)
    completed = index_of(events, "run_completed", follow_up)
    assert queued < interrupted < started < completed == len(events) - 1
    assert events[queued]["strategy"] == "interrupt"
    assert events[interrupted]["stopped_by"] == follow_up
    assert events[completed]["queued"] == 0
    assert events[completed]["final_response"] == case["final_response"]
    first_run = [e for e in events if e.get("run_id") == first]
    assert "run_completed" not in [e["event"] for e in first_run]
    assert "policy_agent" not in [e.get("node") for e in first_run]
    assert len({e["id"] for e in events}) == len(events)


async def test_enqueued_follow_ups_posted_to_b_run_in_order_on_a_and_stream_live_from_b(
    processes: Processes, runtime: Runtime, case_id: str
) -> None:
    first = await hold_on_a(processes, case_id)
    live: list[dict[str, Any]] = []

    async def listen() -> None:
        """B's live stream from the case's first event, until the last run completed."""
        async with processes.b.stream(
            "GET", f"/api/cases/{case_id}/events", params={"seconds": 60}
        ) as stream:
            assert stream.status_code == 200
            buffer = ""
            async for chunk in stream.aiter_text():
                buffer += chunk
                *frames, buffer = buffer.split("\n\n")
                live.extend(parse_sse("\n\n".join(frames)))
                if any(e["event"] == "run_completed" and e["queued"] == 0 for e in live):
                    return

    listener = asyncio.ensure_future(listen())
    posted = [
        (await post(processes.b, case_id, text, "enqueue"))["run_id"]
        for text in (THANKS, LOGIN_AGAIN)
    ]
    started = time.monotonic()
    await asyncio.wait_for(listener, 60)
    assert time.monotonic() - started > 0.5  # the stream waited for A's runs, live

    runs = await until_rest(processes, case_id)
    assert [r["run_id"] for r in runs] == [first, *posted]
    assert [r["status"] for r in runs] == ["completed"] * 3
    for earlier, later in itertools.pairwise(runs):
        assert later["started_at"] >= earlier["ended_at"]
    assert customer_messages(await conversation(runtime, case_id)) == [
        demo_case(case_id)["text"],
        THANKS,
        LOGIN_AGAIN,
    ]
    case = await case_on(processes.b, case_id)
    assert f'follow-up ("{LOGIN_AGAIN}")' in case["final_response"]

    # What B streamed live is the case's whole event log, as B serves it afterwards.
    assert live == await events_on(processes.b, case_id)
    order = [(e["event"], e.get("run_id")) for e in live if e["event"].startswith("run_")]
    assert order == [
        ("run_queued", first),
        ("run_started", first),
        ("run_queued", posted[0]),
        ("run_queued", posted[1]),
        ("run_completed", first),
        ("run_started", posted[0]),
        ("run_completed", posted[0]),
        ("run_started", posted[1]),
        ("run_completed", posted[1]),
    ]
    assert [e["queued"] for e in live if e["event"] == "run_completed"] == [2, 1, 0]


async def test_closed_event_streams_leave_nothing_waiting_on_the_server(
    processes: Processes, runtime: Runtime, case_id: str
) -> None:
    """Clients that open a long stream and go away: within a read's wait (1 s) the server
    stops reading their streams (no read left blocked in Redis, no read sent after), and
    the API still answers at once."""
    assert (await processes.b.post("/api/cases", json=demo_case(case_id))).status_code in (
        201,
        202,
    )
    redis = runtime.settings.redis_url
    assert redis is not None
    raw = aioredis.Redis.from_url(redis.get_secret_value())

    async def blocked_reads() -> int:
        clients = await raw.client_list()
        # Flag `b`: waiting in a blocking command (`cmd` alone is the last one run).
        return sum(1 for client in clients if "b" in client.get("flags", ""))

    async def stream_reads() -> int:
        stats = await raw.info("commandstats")
        return int(stats.get("cmdstat_xread", {}).get("calls", 0))

    async def open_then_leave() -> None:
        async with processes.b.stream(
            "GET", f"/api/cases/{case_id}/events", params={"seconds": 120}
        ) as stream:
            assert stream.status_code == 200
            async for _ in stream.aiter_text():
                break  # the first frames arrived; the client goes away

    try:
        await asyncio.gather(*(open_then_leave() for _ in range(5)))
        deadline = time.monotonic() + 10
        while await blocked_reads():
            assert time.monotonic() < deadline, "reads still blocked 10 s after the clients left"
            await asyncio.sleep(0.2)
        # Five streams still read would send about 5 reads a second.
        before = await stream_reads()
        await asyncio.sleep(3)
        assert await stream_reads() - before <= 1
        started = time.monotonic()
        assert (await processes.b.get("/api/health")).status_code == 200
        assert time.monotonic() - started < 2
    finally:
        await raw.aclose()
