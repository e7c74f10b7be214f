"""The API process killed (SIGKILL) mid-workflow, restarted, and the case completed by resume.

A test-only hook holds the refund step open for a minute *after* the refund went
out and was recorded, so the kill lands between the side effect and LangGraph's
checkpoint of that step: the resumed run re-executes the step and must not pay
twice. Resume goes through the HTTP endpoint or the timer function itself.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from api_server import REPO_ROOT, api_process, app_env, wait_for
from azure.functions.timer import TimerRequest

from support_cases.demo import demo_case
from support_cases.runtime import Runtime
from support_cases.settings import get_app_settings
from tests.step_pause import PAUSE_AFTER_ENV, PAUSED_APP
from tests.support.effects import provider_calls

pytestmark = pytest.mark.slow


async def run_until_killed(env: dict[str, str], log: Path, case_id: str, runtime: Runtime) -> None:
    """Submit the demo case to an API that stalls in the refund step, then SIGKILL it."""
    paused = {**env, PAUSE_AFTER_ENV: "refund=60"}
    async with api_process(paused, log, PAUSED_APP) as (process, client):
        response = await client.post("/api/cases", json=demo_case(case_id))
        assert response.status_code == 202, response.text

        async def refund_recorded() -> bool:
            case = (await client.get(f"/api/cases/{case_id}")).json()
            return any(e["kind"] == "refund" and e["status"] == "done" for e in case["effects"])

        await wait_for(refund_recorded, "the refund to be recorded", log)
        os.killpg(process.pid, signal.SIGKILL)
        await asyncio.to_thread(process.wait, 10)
        assert process.returncode == -signal.SIGKILL
    case = await runtime.service.status(case_id)
    assert "refund" not in case.completed_steps  # killed before the step was checkpointed
    assert len(await provider_calls(runtime, case_id, "refund")) == 1


async def resume_by_timer(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Invoke the deployed timer function's code in this process, configured like the app."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_app_settings.cache_clear()
    spec = importlib.util.spec_from_file_location(
        "function_app_entry", REPO_ROOT / "function_app" / "function_app.py"
    )
    assert spec and spec.loader
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    timer = next(
        f for f in entry.app.get_functions() if f.get_function_name() == "resume_stale_runs"
    )
    try:
        await timer.get_user_function()(TimerRequest(past_due=False))
    finally:
        await entry.process_runtime.close()
        get_app_settings.cache_clear()


@pytest.mark.parametrize("resume_via", ["endpoint", "timer"])
async def test_killed_mid_workflow_completes_after_restart_with_effects_once(
    runtime: Runtime,
    stack_env: dict[str, str],
    case_id: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    resume_via: str,
) -> None:
    env = app_env(runtime, stack_env)
    log = tmp_path / "api.log"
    await run_until_killed(env, log, case_id, runtime)

    async with api_process(env, log) as (_, client):

        async def stalled() -> bool:
            case = (await client.get(f"/api/cases/{case_id}")).json()
            return bool(case["status"] == "stalled")

        await wait_for(stalled, "the dead run to go stale", log)
        await asyncio.sleep(1.5)  # the dead process's lock TTL
        if resume_via == "endpoint":
            response = await client.post(f"/api/cases/{case_id}/resume")
            assert response.status_code in (200, 202), response.text
        else:
            await resume_by_timer(env, monkeypatch)

        async def completed() -> dict[str, Any] | None:
            case = (await client.get(f"/api/cases/{case_id}")).json()
            return case if case["status"] == "completed" else None

        case = await wait_for(completed, "the resumed case to complete", log)

    steps = case["completed_steps"]
    assert sorted(steps) == sorted(["intake", "billing", "account", "policy", "refund", "response"])
    assert "refunded 49.99 USD" in case["final_response"]
    assert "password reset link" in case["final_response"]
    assert {(e["kind"], e["status"]) for e in case["effects"]} == {
        ("refund", "done"),
        ("reset_link", "done"),
    }
    for kind in ("refund", "reset_link"):
        assert len(await provider_calls(runtime, case_id, kind)) == 1, kind
    # The refund the customer is told about is the one that was actually paid.
    paid = await provider_calls(runtime, case_id, "refund")
    assert case["refund"]["reference"] == paid[0]["reference"]
