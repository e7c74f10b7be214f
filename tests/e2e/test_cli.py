"""The `agent-state` CLI against a real API process: readable output, JSON on request."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from api_server import api_process, app_env
from typer.testing import CliRunner

from agent_state_cli.cli import app
from support_cases.runtime import Runtime


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

        code, out = await cli("review", escalated_id, "reject", *api)
        assert code == 0 and "refused" in out and "reject by dana" in out

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
