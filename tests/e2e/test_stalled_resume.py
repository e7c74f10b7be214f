"""A stalled case whose dead runner still holds its lease: the resume answer says so and when
the lease ends (409 with Retry-After), the case view shows that end, and the CLI's `resume`
waits for it (or, with --no-wait, says so and stops).

The dead runner is played by a lease taken and never released: the run lock in
Redis, or (without a hot tier) the lease in the case's cold record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import httpx
import pytest
from api_server import api_process, app_env
from typer.testing import CliRunner

from agent_state_cli.cli import app as cli_app
from state.settings import Settings
from support_cases.api import create_app
from support_cases.demo import demo_case
from support_cases.models import CaseStatus, CaseSubmission
from support_cases.runs import RUN_SECTION, new_run_section, utcnow
from support_cases.runtime import Runtime
from support_cases.service import (
    REQUEST_SECTION,
    RUN_LEASE_SECTION,
    fingerprint,
    run_lock_name,
)

DEAD_RUNNER_LEASE_MS = 3000


async def cli(*args: str) -> tuple[int, str]:
    """Exit code and what a terminal shows (stdout and stderr together)."""
    result = await asyncio.to_thread(
        CliRunner().invoke, cli_app, list(args), env={"COLUMNS": "200"}
    )
    return result.exit_code, result.output


async def stalled_case(runtime: Runtime, case_id: str, **sections: object) -> None:
    """A case as a runner that died mid-run leaves it: marked running, heartbeat long ago."""
    submission = CaseSubmission.model_validate(demo_case(case_id))
    request = {
        **submission.model_dump(mode="json", exclude={"case_id", "client_key"}),
        "fingerprint": fingerprint(submission),
        "idempotency_key": None,
    }
    run = new_run_section(CaseStatus.RUNNING)
    run["heartbeat_at"] = (utcnow() - timedelta(hours=1)).isoformat()
    await runtime.store.create(
        case_id, {REQUEST_SECTION: request, RUN_SECTION: run, **sections}, agent_id="test"
    )


def assert_refused_until_lease_ends(response: httpx.Response) -> int:
    assert response.status_code == 409, response.text
    body = response.json()
    assert "is stalled" in body["error"] and "lease ends at" in body["error"], body
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= DEAD_RUNNER_LEASE_MS / 1000 + 1
    assert body["detail"]["stalled"] is True
    ends = datetime.fromisoformat(body["detail"]["lease_ends_at"])
    assert abs((ends - utcnow()).total_seconds() - retry_after) <= 1.5
    return retry_after


async def resume_after(client: httpx.AsyncClient, case_id: str, retry_after: int) -> None:
    await asyncio.sleep(retry_after)
    response = await client.post(f"/api/cases/{case_id}/resume")
    assert response.status_code in (200, 202), response.text


async def test_resume_of_a_stalled_case_says_when_the_dead_runners_lock_ends(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    await stalled_case(runtime, case_id)
    await runtime.store.lock(run_lock_name(case_id), ttl_ms=DEAD_RUNNER_LEASE_MS)

    retry_after = assert_refused_until_lease_ends(await client.post(f"/api/cases/{case_id}/resume"))
    case = (await client.get(f"/api/cases/{case_id}")).json()
    assert case["status"] == "stalled"
    assert case["lease_ends_at"] is not None
    assert 0 < (datetime.fromisoformat(case["lease_ends_at"]) - utcnow()).total_seconds() <= 3.5

    await resume_after(client, case_id, retry_after)
    await runtime.service.wait_idle()
    case = (await client.get(f"/api/cases/{case_id}")).json()
    assert case["status"] == "completed" and case["lease_ends_at"] is None


async def test_without_a_hot_tier_the_cold_lease_is_reported_the_same_way(
    e2e_settings: Callable[..., Settings],
    case_id: str,
    bearer: Callable[..., dict[str, str]],
) -> None:
    runtime = await Runtime.open(e2e_settings("postgres", redis_url=None))
    try:
        dead_lease = {"token": "dead-runner", "until": time.time() + DEAD_RUNNER_LEASE_MS / 1000}
        await stalled_case(runtime, case_id, **{RUN_LEASE_SECTION: dead_lease})
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://e2e.test", headers=bearer("e2e-client")
        ) as client:
            retry_after = assert_refused_until_lease_ends(
                await client.post(f"/api/cases/{case_id}/resume")
            )
            case = (await client.get(f"/api/cases/{case_id}")).json()
            assert case["lease_ends_at"] is not None
            await resume_after(client, case_id, retry_after)
            await runtime.service.wait_idle()
            assert (await runtime.service.status(case_id)).status is CaseStatus.COMPLETED
    finally:
        await runtime.close()


@pytest.mark.parametrize("runtime", ["cosmos"], indirect=True)
async def test_the_cli_resume_waits_for_the_lease_unless_told_not_to(
    runtime: Runtime,
    stack_env: dict[str, str],
    case_id: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The CLI gets its token from the stack's issuer, as an operator.
    monkeypatch.setenv("AGENT_STATE_ISSUER", stack_env["AUTH_ISSUER"])
    monkeypatch.setenv("AGENT_STATE_USER", "olga")
    await stalled_case(runtime, case_id)
    env = {**app_env(runtime, stack_env), "CASE_SYNC_WAIT_SECONDS": "30"}
    async with api_process(env, tmp_path / "api.log") as (_, client):
        api = ("--api", str(client.base_url))
        await runtime.store.lock(run_lock_name(case_id), ttl_ms=DEAD_RUNNER_LEASE_MS)

        code, out = await cli("resume", case_id, "--no-wait", *api)
        assert code == 1 and "409" in out and "is stalled" in out and "lease ends at" in out

        code, out = await cli("show", case_id, *api)
        assert code == 0 and "lease ends" in out

        started = time.monotonic()
        code, out = await cli("resume", case_id, *api)
        assert code == 0, out
        assert "waiting" in out and "completed" in out
        assert time.monotonic() - started >= 1  # it waited for the lease, then resumed
