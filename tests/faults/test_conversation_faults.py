"""Conversations under process faults: real API processes (uvicorn, the app's own factory or
`tests.step_pause`'s paused one) on one stack, SIGKILLed by their own pid.

- Workers SIGKILLed while runs are queued: a case's run is in progress in worker A
  while follow-ups queue behind it (posted to A and to a second worker B: the last
  round's fresh process, which never served this case); A and B are SIGKILLed with the
  runs still queued. A fresh API process takes one more follow-up, and the timer's tick
  (`run_tick`, what the deployed timer function runs, from a runtime opened after the
  kill) resumes the stalled run and then its queue.
  Every follow-up must run once, in arrival order: its run is in the runs list once,
  completed, and its text is once among the conversation's customer messages. Three
  kill moments per backend: the case's first run held in a step, a follow-up's run held
  in a step, and a seeded random moment while A drains the queue.
- SSE stream across an API restart: a client reads a case's event stream from API
  process A while another process runs the case's runs; A is SIGKILLed mid-stream
  (twice: A, then A'); each time the client resumes from a new process with the
  `Last-Event-ID` of the last event it parsed. What it collected must be the case's
  event log exactly: nothing lost, nothing twice.

The timer resumes every stale case of its store, so scenario one runs on a cold store
of its own (a Cosmos container / a Postgres database).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from support_cases.demo import demo_case
from support_cases.maintenance import run_tick
from support_cases.models import RunStatus
from support_cases.runtime import Runtime
from support_cases.service import case_config
from support_cases.settings import AppSettings
from tests.e2e.api_server import api_process, wait_for
from tests.step_pause import PAUSE_AFTER_ENV, PAUSED_APP
from tests.support.cosmos import drop_container
from tests.support.effects import provider_calls
from tests.support.sse import parse_sse

from .apps import open_runtime
from .conftest import Deadline, Recorder

SEED = 8842
BACKENDS = ["cosmos", "postgres"]
# A dead worker's lock runs out this fast, and its run looks stalled a second after its
# last heartbeat: the timer can take the case over within a few seconds of the kill.
LOCK_TTL_MS = 1500
STALE_AFTER_SECONDS = 1
# Follow-ups queued before the kill (more posted to the fresh process after it).
QUEUED_BEFORE_KILL = 4
# Held long past the test: the workers die in the step.
HOLD = 60
KILL_MOMENTS = ("first run held", "follow-up run held", "random moment while draining")
# The last moment: every run on A takes about a second, so A drains the queue for some
# five seconds, and the kill comes a seeded 0.5 to 3.5 s after the last follow-up.
DRAIN_SLOWLY = "intake=0.3,policy=0.3,response=0.3"

Client = httpx.AsyncClient
ApiProcess = tuple[subprocess.Popen[bytes], Client]


async def events_of(client: Client, case_id: str, **headers: str) -> list[dict[str, Any]]:
    response = await client.get(
        f"/api/cases/{case_id}/events", params={"seconds": 0}, headers=headers
    )
    assert response.status_code == 200, response.text
    return parse_sse(response.text)


async def whole_log(client: Client, case_id: str) -> list[dict[str, Any]]:
    """The case's whole event log, read page by page (each from the last id of the one
    before) until a read returns nothing more."""
    events: list[dict[str, Any]] = []
    while page := await events_of(
        client, case_id, **({"Last-Event-ID": events[-1]["id"]} if events else {})
    ):
        events.extend(page)
    return events


async def runs_of(client: Client, case_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/api/cases/{case_id}/runs")
    assert response.status_code == 200, response.text
    return list(response.json()["runs"])


async def post(client: Client, case_id: str, text: str, strategy: str = "enqueue") -> str:
    """Post a follow-up; its run id (accepted: 202, or 200 if its run ended in time)."""
    response = await client.post(
        f"/api/cases/{case_id}/messages", json={"text": text, "strategy": strategy}
    )
    assert response.status_code in (200, 202), response.text
    return str(response.json()["run"]["run_id"])


def sigkill(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL


@asynccontextmanager
async def started(
    *specs: tuple[dict[str, str], Path, str | None],
) -> AsyncIterator[list[ApiProcess]]:
    """API processes (env, log, factory: None for the app's own), started at once; each
    stopped afterwards (a process the test SIGKILLed is only waited for)."""
    async with AsyncExitStack() as stack:
        yield list(
            await asyncio.gather(
                *(
                    stack.enter_async_context(
                        api_process(env, log) if factory is None else api_process(env, log, factory)
                    )
                    for env, log, factory in specs
                )
            )
        )


# ---------------------------------------------------------------- workers killed, runs queued


@asynccontextmanager
async def own_cold_store(
    backend: str,
    env_for: Callable[..., dict[str, str]],
    request: pytest.FixtureRequest,
) -> AsyncIterator[dict[str, str]]:
    """The app's environment on a cold store of this test's own (dropped after)."""
    overrides: dict[str, object] = {
        "case_stale_after_seconds": STALE_AFTER_SECONDS,
        "state_lock_ttl_ms": LOCK_TTL_MS,
        "case_sync_wait_seconds": 0.5,
    }
    if backend == "postgres":
        overrides["postgres_url"] = request.getfixturevalue("fresh_postgres_url")
        yield env_for(backend, **overrides)
        return
    overrides["cosmos_container"] = f"queued-{uuid.uuid4().hex[:8]}"
    env = env_for(backend, **overrides)
    try:
        yield env
    finally:
        await drop_container(settings_of(env))


def settings_of(env: dict[str, str]) -> AppSettings:
    return AppSettings.model_validate({name.lower(): value for name, value in env.items()})


def follow_up_text(case_id: str, n: int, *, money: bool = False) -> str:
    """A follow-up unique to its case and place: each must show up exactly once."""
    topic = "the refund on my invoice" if money else "my question"
    return f"Follow-up {n} on {case_id} about {topic}"


@dataclass
class QueuedTally:
    rounds: int = 0
    follow_ups: int = 0
    queued_at_kill: int = 0
    running_at_kill: int = 0
    lost: int = 0
    run_twice: int = 0
    out_of_order: int = 0
    duplicate_refunds: int = 0
    # Intake and response steps more or fewer than one per run.
    steps_off: int = 0
    ticks: int = 0
    moments: list[str] = field(default_factory=list)


async def wait_for_event(
    client: Client, case_id: str, event: str, run_id: str, node: str | None, log: Path
) -> None:
    async def seen() -> bool:
        return any(
            e["event"] == event and e.get("run_id") == run_id and e.get("node", node) == node
            for e in await events_of(client, case_id)
        )

    await wait_for(seen, f"{event} {node or ''} of {run_id}", log, 30)


async def until_completed(client: Client, case_id: str, log: Path) -> None:
    async def completed() -> bool:
        response = await client.get(f"/api/cases/{case_id}")
        return bool(response.json()["status"] == "completed")

    await wait_for(completed, f"{case_id} to complete", log, 30)


async def kill_with_runs_queued(
    moment: str,
    env: dict[str, str],
    logs: Path,
    case_id: str,
    rng: random.Random,
    spare: tuple[ApiProcess, Path] | None,
) -> list[str]:
    """Drive the case to the kill moment on workers A and B (`spare`, the last round's
    fresh process and its log, if any: one app start less) and SIGKILL both; the texts
    of the follow-ups accepted, in the order they were posted."""
    pause = f"billing={HOLD}" if moment != KILL_MOMENTS[2] else DRAIN_SLOWLY
    texts: list[str] = []
    specs: list[tuple[dict[str, str], Path, str | None]] = [
        ({**env, PAUSE_AFTER_ENV: pause}, logs / "a.log", PAUSED_APP)
    ]
    b_log = spare[1] if spare else logs / "b.log"
    if spare is None:
        specs.append((env, b_log, None))
    async with started(*specs) as processes:
        a_process, a = processes[0]
        b_process, b = spare[0] if spare else processes[1]
        if moment == KILL_MOMENTS[0]:
            # The case's first run, held in its billing step on A.
            assert (await a.post("/api/cases", json=demo_case(case_id))).status_code == 202
            first = (await runs_of(b, case_id))[0]["run_id"]
            await wait_for_event(b, case_id, "node_started", first, "billing_agent", logs / "a.log")
        elif moment == KILL_MOMENTS[1]:
            # The case rests (done on B); its first follow-up's run is held in billing on A.
            assert (await b.post("/api/cases", json=demo_case(case_id))).status_code in (201, 202)
            await until_completed(b, case_id, b_log)
            texts.append(follow_up_text(case_id, 1, money=True))
            held = await post(a, case_id, texts[-1])
            await wait_for_event(b, case_id, "node_started", held, "billing_agent", logs / "a.log")
        else:
            # A runs everything, each run slowed down a little; the kill comes at random.
            assert (await a.post("/api/cases", json=demo_case(case_id))).status_code == 202
        await asyncio.sleep(0.3)  # inside the held step (its section written, not checkpointed)
        while len(texts) < QUEUED_BEFORE_KILL:
            texts.append(follow_up_text(case_id, len(texts) + 1, money=len(texts) % 2 == 0))
            await post((a, b)[len(texts) % 2], case_id, texts[-1])
        if moment == KILL_MOMENTS[2]:
            await asyncio.sleep(rng.uniform(0.5, 3.5))
        for process in (a_process, b_process):
            sigkill(process)
    return texts


async def resume_by_the_timer(
    timer: Runtime,
    fresh: Client,
    case_id: str,
    texts: list[str],
    tally: QueuedTally,
) -> list[dict[str, Any]]:
    """A fresh API process takes one more follow-up; the timer (on a runtime opened after
    the kill) ticks until the case's runs all ended; the runs as the fresh process reports."""
    texts.append(follow_up_text(case_id, len(texts) + 1))
    await post(fresh, case_id, texts[-1])
    deadline = Deadline(90)
    # Ticks half a second apart; the runs are looked at as soon as a tick's work is done.
    pause = 0.0
    while True:
        runs = await runs_of(fresh, case_id)
        if not any(r["status"] in ("queued", "running") for r in runs):
            return runs
        deadline.check(f"the runs of {case_id} to end (now {runs})")
        await asyncio.sleep(pause)
        await run_tick(timer.service)
        tally.ticks += 1
        await timer.service.wait_idle()
        pause = 0.5


async def check_each_ran_once_in_order(
    runtime: Runtime,
    case_id: str,
    texts: list[str],
    runs: list[dict[str, Any]],
    tally: QueuedTally,
) -> None:
    snapshot = await runtime.graph.aget_state(case_config(case_id))
    said = [m["content"] for m in snapshot.values.get("messages", []) if m["role"] == "customer"]
    follow_ups = [r for r in runs if r["kind"] == "message"]
    for text in texts:
        runs_for = [r for r in follow_ups if r["text"] == text]
        if said.count(text) == 0 or [r["status"] for r in runs_for] != [RunStatus.COMPLETED]:
            tally.lost += 1
        tally.run_twice += max(0, said.count(text) - 1) + max(0, len(runs_for) - 1)
    if said != [demo_case(case_id)["text"], *texts] or [r["text"] for r in follow_ups] != texts:
        tally.out_of_order += 1
    for earlier, later in itertools.pairwise(runs):
        if later["started_at"] is None or earlier["ended_at"] is None:
            continue  # counted as lost above
        if datetime.fromisoformat(later["started_at"]) < datetime.fromisoformat(
            earlier["ended_at"]
        ):
            tally.out_of_order += 1
    # Each run (the first, and one per follow-up) went through intake and response once.
    steps = list(snapshot.values.get("completed_steps", []))
    tally.steps_off += sum(abs(steps.count(s) - len(texts) - 1) for s in ("intake", "response"))
    refunds = await provider_calls(runtime, case_id, "refund")
    tally.duplicate_refunds += max(0, len(refunds) - 1)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
async def test_workers_killed_while_runs_are_queued(
    backend: str,
    env_for: Callable[..., dict[str, str]],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    reliability: Recorder,
) -> None:
    rng = random.Random(f"{SEED}-{backend}")
    tally = QueuedTally()
    spare: tuple[ApiProcess, Path] | None = None
    async with own_cold_store(backend, env_for, request) as env, AsyncExitStack() as fresh:
        for number, moment in enumerate(KILL_MOMENTS):
            case_id = f"queued-{backend}-{number}-{uuid.uuid4().hex[:8]}"
            logs = tmp_path / f"round-{number}"
            logs.mkdir()
            texts = await kill_with_runs_queued(moment, env, logs, case_id, rng, spare)
            async with open_runtime(settings_of(env)) as timer:
                at_kill = (await timer.runtime.service.runs(case_id)).runs
                tally.queued_at_kill += sum(r.status is RunStatus.QUEUED for r in at_kill)
                tally.running_at_kill += sum(r.status is RunStatus.RUNNING for r in at_kill)
                # The fresh process, started after the kill: B of the next round (stopped
                # with the stack if not killed).
                c_log = logs / "c.log"
                spare = (await fresh.enter_async_context(api_process(env, c_log)), c_log)
                runs = await resume_by_the_timer(timer.runtime, spare[0][1], case_id, texts, tally)
                await check_each_ran_once_in_order(timer.runtime, case_id, texts, runs, tally)
            tally.rounds += 1
            tally.follow_ups += len(texts)
            tally.moments.append(
                f"{moment}: {sum(r.status is RunStatus.QUEUED for r in at_kill)} queued, "
                f"{sum(r.status is RunStatus.RUNNING for r in at_kill)} running"
            )

    reliability.record(
        f"Workers SIGKILLed while runs are queued ({backend})",
        injected=f"{QUEUED_BEFORE_KILL} follow-ups queued (posted to two API processes) behind "
        "a run in progress, then both processes SIGKILLed; a fresh API process takes one "
        "more follow-up and the timer's tick (run_tick) resumes the case "
        f"({len(KILL_MOMENTS)} kill moments: {', '.join(KILL_MOMENTS)})",
        runs=tally.follow_ups,
        lost_writes=tally.lost,
        silent_overwrites=tally.run_twice,
        observed=f"{tally.queued_at_kill} runs queued and {tally.running_at_kill} running "
        f"when the workers died ({'; '.join(tally.moments)}); the runs ended after "
        f"{tally.ticks} timer ticks; {tally.lost} lost, {tally.run_twice} run twice "
        f"(counted as silent overwrites), {tally.out_of_order} out of arrival order, "
        f"{tally.steps_off} intake/response steps more or fewer than one per run, "
        f"{tally.duplicate_refunds} duplicate refunds",
    )
    assert tally.lost == 0 and tally.run_twice == 0 and tally.out_of_order == 0
    assert tally.steps_off == 0 and tally.duplicate_refunds == 0
    # The first two moments kill with every follow-up still queued.
    assert tally.queued_at_kill >= 2 * QUEUED_BEFORE_KILL - 1


# ---------------------------------------------------------------- SSE across an API restart

RESTARTS = 2
STREAM_FOLLOW_UPS = 8
# Every step of every run on the worker takes a little while: the runs publish events
# for longer than the restarts take.
SLOW_STEPS = ",".join(
    f"{step}=0.25" for step in ("intake", "billing", "account", "policy", "refund", "response")
)


@dataclass
class StreamClient:
    """Reads a case's events as a browser's EventSource does: complete frames only, and
    after a cut it reconnects with the id of the last event it parsed."""

    case_id: str
    last_run: str = ""
    collected: list[dict[str, Any]] = field(default_factory=list)
    connects: int = 0

    @property
    def last_id(self) -> str | None:
        return self.collected[-1]["id"] if self.collected else None

    def finished(self) -> bool:
        return any(
            e["event"] == "run_completed" and e.get("run_id") == self.last_run
            for e in self.collected
        )

    async def read(self, client: Client) -> bool:
        """Stream from `client` until the last run completed (True) or the cut (False)."""
        headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
        self.connects += 1
        buffer = ""
        try:
            async with client.stream(
                "GET",
                f"/api/cases/{self.case_id}/events",
                params={"seconds": 120},
                headers=headers,
            ) as stream:
                assert stream.status_code == 200
                async for chunk in stream.aiter_text():
                    buffer += chunk
                    *frames, buffer = buffer.split("\n\n")
                    self.collected.extend(parse_sse("\n\n".join(frames)))
                    if self.finished():
                        return True
        except httpx.TransportError:
            return False
        raise AssertionError("the stream ended before the case's last run completed")


@pytest.mark.slow
async def test_sse_stream_across_an_api_restart(
    env_for: Callable[..., dict[str, str]], tmp_path: Path, reliability: Recorder
) -> None:
    rng = random.Random(f"{SEED}-sse")
    env = env_for("postgres", case_sync_wait_seconds=0.2)
    case_id = f"sse-{uuid.uuid4().hex[:10]}"
    reader = StreamClient(case_id)
    cut_at: list[int] = []
    behind: list[int] = []
    async with AsyncExitStack() as stack:
        (_, worker), (api, client) = await asyncio.gather(
            stack.enter_async_context(
                api_process(
                    {**env, PAUSE_AFTER_ENV: SLOW_STEPS}, tmp_path / "worker.log", PAUSED_APP
                )
            ),
            stack.enter_async_context(api_process(env, tmp_path / "api-0.log")),
        )
        assert (await worker.post("/api/cases", json=demo_case(case_id))).status_code == 202
        for n in range(STREAM_FOLLOW_UPS):
            reader.last_run = await post(worker, case_id, follow_up_text(case_id, n, money=n == 3))
        for restart in range(1, RESTARTS + 2):
            reading = asyncio.ensure_future(reader.read(client))
            if restart > RESTARTS:
                assert await asyncio.wait_for(reading, 90), "the stream was cut"
                break
            # Cut mid-stream: once a few more events arrived, at a seeded count.
            kill_at = len(reader.collected) + rng.randint(5, 15)
            deadline = Deadline(60)
            while len(reader.collected) < kill_at:
                deadline.check(f"{kill_at} events on the stream")
                assert not reading.done(), "the stream ended before the kill"
                await asyncio.sleep(0.01)
            sigkill(api)
            assert not await asyncio.wait_for(reading, 30), "the stream outlived its server"
            cut_at.append(len(reader.collected))
            # The runs go on meanwhile; a new API process (same stack) serves the rest.
            api, client = await stack.enter_async_context(
                api_process(env, tmp_path / f"api-{restart}.log")
            )
            missed = {"Last-Event-ID": reader.last_id} if reader.last_id else {}
            behind.append(len(await events_of(client, case_id, **missed)))
        full = await whole_log(client, case_id)
        single = await events_of(client, case_id)

    ids = [e["id"] for e in reader.collected]
    duplicated = len(ids) - len(set(ids))
    lost = len({e["id"] for e in full} - set(ids))
    reliability.record(
        "SSE stream across an API restart",
        injected=f"the API process serving a case's event stream SIGKILLed mid-stream "
        f"{RESTARTS} times (at a seeded event count) while another process runs the case's "
        f"{STREAM_FOLLOW_UPS + 1} runs; the client reconnects to a new API process with "
        "Last-Event-ID of the last event it parsed",
        runs=RESTARTS,
        lost_writes=lost,
        silent_overwrites=duplicated,
        observed=f"{len(full)} events in the case's log; the client collected {len(ids)} over "
        f"{reader.connects} connections (cut after {', '.join(map(str, cut_at))} events; "
        f"{', '.join(map(str, behind))} published meanwhile, before the new process was up); "
        f"{lost} lost, {duplicated} duplicated (counted as silent overwrites); "
        f"{'identical to' if reader.collected == full else 'differs from'} the log read whole; "
        f"one read of it from the start (seconds=0) returned {len(single)} of {len(full)} events",
    )
    assert lost == 0 and duplicated == 0
    assert reader.collected == full
    assert single == full, (
        f"GET /api/cases/{{id}}/events?seconds=0 returned only the first {len(single)} of the "
        f"case's {len(full)} events (paged with Last-Event-ID, the log has them all): "
        "CaseEvents.stream stops after one read of at most 100 events once `seconds` ran out"
    )
    assert full[-1]["event"] == "run_completed" and full[-1]["queued"] == 0
    assert all(behind)  # each resume had events to catch up on
