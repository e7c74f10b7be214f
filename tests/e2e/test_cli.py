"""The `agent-state` CLI against a real API process: readable output, JSON on request; a
case as a conversation (reply, runs, follow)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_server import api_process, app_env, start_uvicorn, wait_for
from typer.testing import CliRunner

from agent_state_cli.cli import SseFrame, app, sse_frames
from devstack import CosmosEmulator, free_port
from support_cases.demo import demo_case
from support_cases.runtime import Runtime
from tests.step_pause import PAUSE_AFTER_ENV, PAUSED_APP


async def cli(*args: str) -> tuple[int, str]:
    """Exit code and what a terminal shows (stdout and stderr together)."""
    code, output, _ = await cli_streams(*args)
    return code, output


async def cli_json(*args: str) -> Any:
    """Stdout of a successful `--json` call, parsed (notices on stderr must not break it)."""
    code, output, stdout = await cli_streams(*args, "--json")
    assert code == 0, output
    return json.loads(stdout)


async def cli_streams(*args: str) -> tuple[int, str, str]:
    result = await asyncio.to_thread(CliRunner().invoke, app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.output, result.stdout


async def test_submit_show_audit_checkpoints_review(
    runtime: Runtime, stack_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CLI gets its tokens from the stack's issuer, as "dana" with every role.
    monkeypatch.setenv("AGENT_STATE_ISSUER", stack_env["AUTH_ISSUER"])
    monkeypatch.setenv("AGENT_STATE_USER", "dana")
    demo_id = f"case-cli-{uuid.uuid4().hex[:12]}"
    escalated_id = f"case-cli-{uuid.uuid4().hex[:12]}"
    # Long enough that a slow run still answers "completed" rather than 202.
    env = {**app_env(runtime, stack_env), "CASE_SYNC_WAIT_SECONDS": "60"}
    async with api_process(env, tmp_path / "api.log") as (_, client):
        api = ("--api", str(client.base_url))

        case = await cli_json("submit", "--demo", "--case-id", demo_id, *api)
        assert case["case_id"] == demo_id and case["status"] == "completed"

        code, out = await cli("show", demo_id, *api)
        assert code == 0 and "completed" in out and "refunded 49.99 USD" in out

        code, out = await cli("audit", demo_id, *api)
        assert code == 0
        for agent in ("billing-agent", "account-agent", "policy-agent", "response-agent"):
            assert agent in out

        history = await cli_json("checkpoints", demo_id, *api)
        assert history["checkpoints"][0]["next"] == []

        body = tmp_path / "escalated.json"
        body.write_text(
            json.dumps(
                {
                    "case_id": escalated_id,
                    "customer_id": "cust-cli",
                    "text": "double charge on my flight",
                    "transactions": [
                        {
                            "id": f"t{n}",
                            "merchant": "SkyAir",
                            "amount": 980.0,
                            "timestamp": f"2024-06-01T09:0{n}:00Z",
                        }
                        for n in range(2)
                    ],
                }
            )
        )
        code, out = await cli("submit", "--file", str(body), *api)
        assert code == 0 and "awaiting_review" in out and "agent-state review" in out

        # Four eyes: dana submitted the case, so alice decides it.
        code, out = await cli("review", escalated_id, "approve", *api)
        assert code == 1 and "403" in out and "other than the case's submitter" in out
        monkeypatch.setenv("AGENT_STATE_USER", "alice")
        code, out = await cli("review", escalated_id, "reject", *api)
        assert code == 0 and "refused" in out and "reject by alice" in out

        code, out = await cli("review", escalated_id, "approve", *api)
        assert code == 1 and "409" in out and "not awaiting review" in out

        code, out = await cli("show", "case-does-not-exist", *api)
        assert code == 1 and "404" in out

        health = await cli_json("health", *api)
        assert health["status"] == "ok" and health["tiers"]

        # A token without Cases.Operate: the audit trail is refused, the role named.
        monkeypatch.setenv("AGENT_STATE_ROLES", "Cases.Submit")
        code, out = await cli("audit", demo_id, *api)
        assert code == 1 and "403" in out and "Cases.Operate" in out


async def test_health_of_an_api_that_is_down_shows_its_tiers_and_exits_1(
    stack_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API answers `down` with a 503: once printed as `503: {"status":"down",...}`, the
    report's raw JSON as if it were an error message, the moment `health` matters most."""
    monkeypatch.setenv("AGENT_STATE_ISSUER", stack_env["AUTH_ISSUER"])
    # The API's own emulator, so stopping it leaves the session's stack alone.
    cosmos = CosmosEmulator(port=free_port(), workdir=tmp_path / "cosmos")
    cosmos.start()
    env = {
        **stack_env,
        "STATE_COLD_BACKEND": "cosmos",
        "COSMOS_ENDPOINT": cosmos.endpoint,
        "COSMOS_CREATE_IF_MISSING": "true",
    }
    try:
        async with api_process(env, tmp_path / "api.log") as (_, client):
            api = ("--api", str(client.base_url))
            cosmos.stop()

            code, out = await cli("health", *api)
            assert code == 1, out
            assert "overall: down" in out and re.search(r"cosmos\s+│\s+NO", out), out
            assert "503" not in out and '"status"' not in out, out

            code, output, stdout = await cli_streams("health", "--json", *api)
            assert code == 1, output
            assert json.loads(stdout)["status"] == "down"
    finally:
        cosmos.stop()


INVOICE = "I also can't download my invoice"


async def logged_events(client: httpx.AsyncClient, case_id: str) -> list[dict[str, Any]]:
    """Every event the API has logged for the case, each its data with its id (a stream
    open for a moment: with `seconds=0` the API answers at most 100 events)."""
    response = await client.get(f"/api/cases/{case_id}/events", params={"seconds": 0.5})
    assert response.status_code == 200, response.text
    frames = [frame for frame in response.text.split("\n\n") if frame.startswith("id: ")]
    return [
        {"id": frame.split("\n")[0].removeprefix("id: "), **json.loads(frame.split("data: ")[1])}
        for frame in frames
    ]


def event_lines(output: str) -> list[str]:
    """The lines `follow` printed for events (they start with the event's time)."""
    return [line for line in output.splitlines() if re.match(r"\d\d:\d\d:\d\d\.\d{3}  run-", line)]


async def test_a_case_id_that_is_not_one_never_reaches_another_case(
    runtime: Runtime, stack_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The id goes into the URL's path: `x/../<case>` would read (or decide) <case>, and
    `<case>#x` would read the case where its runs were asked for."""
    monkeypatch.setenv("AGENT_STATE_ISSUER", stack_env["AUTH_ISSUER"])
    monkeypatch.setenv("AGENT_STATE_USER", "dana")
    case_id = f"case-cli-{uuid.uuid4().hex[:12]}"
    async with api_process(app_env(runtime, stack_env), tmp_path / "api.log") as (_, client):
        api = ("--api", str(client.base_url))
        await cli_json("submit", "--demo", "--case-id", case_id, *api)
        for command in (
            ("show", f"nothere/../{case_id}"),
            ("runs", f"{case_id}#x"),
            ("review", f"nothere/../{case_id}", "approve"),
            ("reply", f"{case_id}?x", "hello"),
        ):
            code, out = await cli(*command, *api)
            assert code == 2, out
            assert "is not a case id" in out and "Traceback" not in out
            assert case_id not in out.replace(command[1], "")


def test_sse_frames_are_parsed_as_the_standard_says() -> None:
    stream = (
        ": keep-alive\r\n\r\n"
        'id: 1-0\nevent: node_finished\ndata: {"a":\ndata:1}\n\n'
        "event: no_data\n\n"
        "id: 2-0\ndata:no space\r"
        "\r"
        "id: 3-0\ndata: cut off by a dropped connection"
    )
    frames = list(sse_frames(stream.splitlines()))
    assert frames == [
        SseFrame("1-0", "node_finished", '{"a":\n1}'),
        SseFrame("2-0", "message", "no space"),
    ]


async def test_reply_runs_and_follow_on_a_case_at_rest(
    runtime: Runtime, stack_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_STATE_ISSUER", stack_env["AUTH_ISSUER"])
    monkeypatch.setenv("AGENT_STATE_USER", "dana")
    case_id = f"case-cli-{uuid.uuid4().hex[:12]}"
    env = {**app_env(runtime, stack_env), "CASE_SYNC_WAIT_SECONDS": "60"}
    async with api_process(env, tmp_path / "api.log") as (_, client):
        api = ("--api", str(client.base_url))
        assert (await cli_json("submit", "--demo", "--case-id", case_id, *api))["status"] == (
            "completed"
        )

        answer = await cli_json("reply", case_id, INVOICE, "--idempotency-key", "k1", *api)
        run = answer["run"]
        assert run["status"] == "completed" and run["kind"] == "message"
        assert run["strategy"] == "enqueue" and run["text"] == INVOICE
        code, out = await cli("reply", case_id, INVOICE, "--idempotency-key", "k1", *api)
        assert code == 0 and run["run_id"] in out and "replayed" in out
        assert re.search(r"status\s+│ completed in \d+\.\d\d s", out), out
        assert f"agent-state show {case_id}" in out

        code, out = await cli("runs", case_id, *api)
        assert code == 0, out
        rows = [line for line in out.splitlines() if "run-" in line]
        assert len(rows) == 2, out
        assert re.search(r"run-\w{8} +│ intake +│ completed +│ -", rows[0]), out
        assert run["run_id"][:12] in rows[1] and INVOICE in rows[1] and "enqueue" in rows[1]
        assert (await cli_json("runs", case_id, *api))["runs"][1] == run

        # A longer conversation: its log holds more than one read of it (100 events).
        for n in range(7):
            more = await client.post(
                f"/api/cases/{case_id}/messages", json={"text": f"Where is my refund? ({n})"}
            )
            assert more.status_code == 200, more.text
        logged = await logged_events(client, case_id)
        assert len(logged) > 100
        # At rest: the events so far, each once, and out at once (not after the stream's 60 s).
        started = time.monotonic()
        code, out = await cli("follow", case_id, *api)
        assert code == 0 and time.monotonic() - started < 20, out
        lines = event_lines(out)
        assert [line.split()[2] for line in lines] == [event["event"] for event in logged]
        assert any(
            re.search(r"node_finished +billing_agent: 1 duplicate charge\(s\) at StreamFlix", line)
            for line in lines
        ), out
        assert re.search(rf'run_queued +message \(enqueue\): "{INVOICE}"', out), out
        assert lines[-1].endswith("run_completed   queued: 0"), out
        code, _, stdout = await cli_streams("follow", case_id, "--json", *api)
        assert code == 0 and [json.loads(line) for line in stdout.splitlines()] == logged

        # Refused before anything is sent: the strategies are named.
        code, out = await cli("reply", case_id, INVOICE, "--strategy", "later", *api)
        assert code == 2 and "'later' is not one of 'reject', 'enqueue'" in out, out
        # Refused by the API: its status and message.
        code, out = await cli("reply", case_id, "   ", *api)
        assert code == 1 and "422" in out and "body.text" in out, out
        code, out = await cli("reply", "case-does-not-exist", INVOICE, *api)
        assert code == 1 and "404" in out and "not found" in out, out
        code, out = await cli("follow", "case-does-not-exist", *api)
        assert code == 1 and "404" in out, out
        assert len((await client.get(f"/api/cases/{case_id}/runs")).json()["runs"]) == 9


async def test_follow_shows_the_runs_as_they_go_and_stops_once_the_case_rests(
    runtime: Runtime, stack_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_STATE_ISSUER", stack_env["AUTH_ISSUER"])
    monkeypatch.setenv("AGENT_STATE_USER", "dana")
    case_id = f"case-cli-{uuid.uuid4().hex[:12]}"
    # Every run's billing step takes 2 s: the intake is still running when the reply
    # comes, which is queued behind it.
    env = {**app_env(runtime, stack_env), PAUSE_AFTER_ENV: "billing=2"}
    async with api_process(env, tmp_path / "api.log", PAUSED_APP) as (_, client):
        api = ("--api", str(client.base_url))
        submitted = await client.post("/api/cases", json=demo_case(case_id))
        assert submitted.status_code == 202, submitted.text

        code, out = await cli("reply", case_id, INVOICE, *api)
        assert code == 0 and re.search(r"status\s+│ queued", out), out
        assert f"agent-state follow {case_id}" in out
        code, out = await cli("reply", case_id, "Thanks", "--strategy", "reject", *api)
        assert code == 1 and "409" in out and "run in progress" in out, out

        # One-second streams: `follow` reconnects a few times while the runs go on.
        code, out = await cli("follow", case_id, "--stream-seconds", "1", *api)
        assert code == 0, out
        runs = (await client.get(f"/api/cases/{case_id}/runs")).json()["runs"]
        assert [run["status"] for run in runs] == ["completed", "completed"]
        lines = event_lines(out)
        # Each event once, in the log's order, though the stream was renewed mid-run.
        logged = await logged_events(client, case_id)
        assert [line.split()[1:3] for line in lines] == [
            [event["run_id"][:12], event["event"]] for event in logged
        ]
        for run in runs:
            short = run["run_id"][:12]
            assert any(re.search(rf"{short}  node_started +billing_agent", x) for x in lines)
            assert any(re.search(rf"{short}  run_completed", x) for x in lines)
        assert lines[-1].split()[1:] == [runs[1]["run_id"][:12], "run_completed", "queued:", "0"]

        # Another run: `follow` shows the log from its start, where the earlier runs'
        # "run_completed, queued: 0" must not stop it before this run rests.
        code, out = await cli("reply", case_id, "Where is my refund?", *api)
        assert code == 0 and re.search(r"status\s+│ (queued|running)", out), out
        code, out = await cli("follow", case_id, *api)
        assert code == 0, out
        runs = (await client.get(f"/api/cases/{case_id}/runs")).json()["runs"]
        assert [run["status"] for run in runs] == ["completed"] * 3
        lines = event_lines(out)
        assert len(lines) == len(await logged_events(client, case_id))
        assert lines[-1].split()[1:3] == [runs[2]["run_id"][:12], "run_completed"]


async def test_follow_reconnects_after_the_api_went_away_and_misses_nothing(
    runtime: Runtime, stack_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_STATE_ISSUER", stack_env["AUTH_ISSUER"])
    case_id = f"case-cli-{uuid.uuid4().hex[:12]}"
    env = app_env(runtime, stack_env)
    log = tmp_path / "api.log"
    # The intake run is held in its billing step until the API is killed.
    async with api_process({**env, PAUSE_AFTER_ENV: "billing=60"}, log, PAUSED_APP) as (
        first,
        client,
    ):
        api = str(client.base_url)
        submitted = await client.post("/api/cases", json=demo_case(case_id))
        assert submitted.status_code == 202, submitted.text
        following = asyncio.ensure_future(cli_streams("follow", case_id, "--json", "--api", api))

        async def streaming() -> bool:
            return f"/api/cases/{case_id}/events" in await asyncio.to_thread(log.read_text)

        await wait_for(streaming, "follow to open the event stream", log)
        os.killpg(first.pid, signal.SIGKILL)
        await asyncio.to_thread(first.wait, 10)
    second = start_uvicorn(env, log, int(api.rsplit(":", 1)[1]))
    try:
        async with httpx.AsyncClient(base_url=api, headers=client.headers) as again:

            async def resumed() -> bool:
                answer = await again.post(f"/api/cases/{case_id}/resume")
                return answer.status_code in (200, 202)

            # Once the dead runner's lease and heartbeat ran out (1.5 s and 2 s here).
            await wait_for(resumed, "the stalled run to resume", log)
            code, output, stdout = await asyncio.wait_for(asyncio.shield(following), 60)
            assert code == 0, output
            assert "reconnecting" in output
            shown = [json.loads(line) for line in stdout.splitlines()]
            assert shown == await logged_events(again, case_id)
            assert shown[-1]["event"] == "run_completed" and shown[-1]["queued"] == 0
            assert [e["event"] for e in shown].count("run_started") == 2
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        await asyncio.to_thread(second.wait, 10)
        # The CLI runs in a thread, which cannot be cancelled: without an API it gives up
        # within seconds, and must be done before another test's CLI call swaps stdout.
        await asyncio.wait({following}, timeout=60)


async def test_follow_tries_again_while_its_caller_holds_as_many_streams_as_it_may(
    runtime: Runtime, stack_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller's other stream (another `follow` of its own) held its last slot: the 429
    (with Retry-After) ended `follow` at once, exit 1, where a 503 is tried again. It now
    tries again, waiting first at least the Retry-After."""
    monkeypatch.setenv("AGENT_STATE_ISSUER", stack_env["AUTH_ISSUER"])
    # The same caller as the API client of `api_process`.
    monkeypatch.setenv("AGENT_STATE_USER", "e2e-client")
    case_id = f"case-cli-{uuid.uuid4().hex[:12]}"
    env = {**app_env(runtime, stack_env), "CASE_MAX_EVENT_STREAMS_PER_CALLER": "1"}
    log = tmp_path / "api.log"
    async with api_process(env, log) as (_, client):
        assert (await client.post("/api/cases", json=demo_case(case_id))).status_code in (
            201,
            202,
        )

        async def completed() -> bool:
            case = await client.get(f"/api/cases/{case_id}")
            return bool(case.json()["status"] == "completed")

        await wait_for(completed, "the case to complete", log)
        events = f"/api/cases/{case_id}/events"
        loop = asyncio.get_running_loop()
        async with client.stream("GET", events, params={"seconds": 200}) as held:
            assert held.status_code == 200

            async def slot_back() -> bool:
                async with client.stream("GET", events, params={"seconds": 0}) as probe:
                    await probe.aread()
                    return probe.status_code == 200

            async def release() -> None:
                await held.aclose()
                await wait_for(slot_back, "the held stream's slot to come back", log)

            waits: list[float] = []

            def first_pause_releases(seconds: float) -> None:
                # `follow` waits before trying again: the other stream ends meanwhile.
                waits.append(seconds)
                if not held.is_closed:
                    asyncio.run_coroutine_threadsafe(release(), loop).result(60)

            monkeypatch.setattr("agent_state_cli.cli.time.sleep", first_pause_releases)
            code, output, stdout = await cli_streams(
                "follow", case_id, "--json", "--api", str(client.base_url)
            )
        assert code == 0, output
        assert output.count("reconnecting") == 1 and "429" in output, output
        assert waits and waits[0] >= 5, waits  # no sooner than the 429's Retry-After
        shown = [json.loads(line) for line in stdout.splitlines()]
        assert shown == await logged_events(client, case_id)


async def test_follow_tells_an_event_log_out_of_reach_and_tries_again(
    runtime: Runtime,
    stack_env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    bearer: Any,
) -> None:
    """The API's Redis gone: its event stream answers 503 (with Retry-After), which `follow`
    tries again as a dropped connection, then gives up saying so. It once got a 200 stream
    that ended at once, empty, and printed nothing and exited 0, as for a case without
    events."""
    from support_cases.api import create_app

    monkeypatch.setenv("AGENT_STATE_ISSUER", stack_env["AUTH_ISSUER"])
    monkeypatch.setenv("AGENT_STATE_USER", "erin")
    monkeypatch.setattr("agent_state_cli.cli.time.sleep", lambda _seconds: None)
    case_id = f"case-cli-{uuid.uuid4().hex[:12]}"
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(runtime)),
        base_url="http://cli.test",
        headers=bearer("erin"),
    ) as submitter:
        assert (await submitter.post("/api/cases", json=demo_case(case_id))).status_code == 201
    # The same cold tier, its Redis a port nothing listens on.
    env = {**app_env(runtime, stack_env), "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    async with api_process(env, tmp_path / "api.log") as (_, client):
        code, out = await cli("follow", case_id, "--api", str(client.base_url))
    assert code == 2, out
    assert out.count("reconnecting") == 5 and "redis unavailable" in out, out
    assert "lost the event stream" in out, out
