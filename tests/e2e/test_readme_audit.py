"""What the README shows of real answers: the writers a case's audit trail names, and
the health answer without a token."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import httpx
from e2e_payloads import duplicate_charges

from devstack.issuer import object_id_for
from support_cases.auth import ROLE_REVIEW

README = Path(__file__).resolve().parents[2] / "README.md"


def documented_writers() -> set[str]:
    """The agent ids the paragraph names (`reviewer:<object id>` as a pattern)."""
    paragraph = README.read_text().split("The audit trail (newest first)", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"`([a-z_:<> -]+)`", paragraph))


def written_as(agent_id: str, reviewer: str) -> str:
    return agent_id.replace(reviewer, "<object id>")


async def test_every_writer_in_a_reviewed_and_followed_up_case_is_named(
    client: httpx.AsyncClient, case_id: str, bearer: Callable[..., dict[str, str]]
) -> None:
    body = {
        "case_id": case_id,
        "customer_id": "cust-escalated",
        "text": "The hotel charged me twice",
        "transactions": duplicate_charges(612.40, merchant="Hotel Europa"),
    }
    assert (await client.post("/api/cases", json=body)).json()["status"] == "awaiting_review"
    decided = await client.post(
        f"/api/cases/{case_id}/review",
        json={"decision": "approve"},
        headers=bearer("alice", [ROLE_REVIEW]),
    )
    assert decided.status_code == 200, decided.text
    reply = await client.post(f"/api/cases/{case_id}/messages", json={"text": "and my invoice"})
    assert reply.status_code == 200, reply.text

    audit = await client.get(f"/api/cases/{case_id}/audit", params={"limit": 500})
    alice = object_id_for("alice")
    writers = {written_as(entry["agent_id"], alice) for entry in audit.json()["entries"]}
    assert writers - documented_writers() == set()


async def test_health_without_a_token_answers_the_readme_shape(client: httpx.AsyncClient) -> None:
    shown = README.read_text().split("- `/api/health` answers anyone with `", 1)[1].split("`", 1)[0]
    documented = shown.replace('"ok" | "degraded" | "down"', '"ok"')
    del client.headers["authorization"]
    response = await client.get("/api/health")
    assert response.status_code == 200, response.text
    assert response.json() == json.loads(documented)
