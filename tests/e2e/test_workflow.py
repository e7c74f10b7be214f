"""The "Done when" scenarios over HTTP, on the real stack, for each cold backend."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from e2e_payloads import duplicate_charges

from devstack.issuer import object_id_for
from state.checkpoint import TieredCheckpointSaver
from support_cases.api import create_app
from support_cases.auth import ROLE_REVIEW
from support_cases.demo import demo_case
from support_cases.models import CaseStatus
from support_cases.runtime import Runtime
from support_cases.service import CaseService, case_config
from tests.support.effects import provider_calls

AGENT_WRITES = [
    ("intake-agent", "intake"),
    ("billing-agent", "billing"),
    ("account-agent", "account"),
    ("policy-agent", "policy"),
    ("refund-agent", "refund"),
    ("response-agent", "response"),
]


async def performed(runtime: Runtime, case_id: str, kind: str) -> int:
    return len(await provider_calls(runtime, case_id, kind))


async def audit_of(client: httpx.AsyncClient, case_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/api/cases/{case_id}/audit", params={"limit": 500})
    assert response.status_code == 200, response.text
    return list(response.json()["entries"])


async def test_case_8842_completes_with_refund_and_reset_link(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    response = await client.post("/api/cases", json=demo_case(case_id))
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"/api/cases/{case_id}"
    case = response.json()
    assert case["status"] == "completed"
    assert case["billing"]["refund_amount"] == 49.99
    assert [d["transaction_id"] for d in case["billing"]["duplicates"]] == ["txn_1002"]
    assert case["account"]["issue"] == "login"
    assert case["policy"]["decision"] == "auto_approved"
    assert case["refund"]["status"] == "issued"
    text = case["final_response"]
    assert "refunded 49.99 USD" in text and case["refund"]["reference"] in text
    assert "password reset link" in text and case["account"]["reset_reference"] in text

    steps = case["completed_steps"]
    assert len(steps) == len(set(steps))
    assert set(steps) == {"intake", "billing", "account", "policy", "refund", "response"}
    assert steps[0] == "intake" and steps[-2:] == ["refund", "response"]

    # The same result when read back later.
    again = (await client.get(f"/api/cases/{case_id}")).json()
    assert again["status"] == "completed" and again["final_response"] == text

    entries = await audit_of(client, case_id)
    versions = [entry["version"] for entry in entries]
    assert versions == sorted(versions, reverse=True) and len(set(versions)) == len(versions)
    expected_after = {
        "intake": {"customer_id": "cust_1042", "transaction_count": 3, "text_length": 39},
        "response": {"text": text},
    }
    for agent_id, section in AGENT_WRITES:
        writes = [e for e in entries if e["agent_id"] == agent_id and e["section"] == section]
        assert len(writes) == 1, (agent_id, section, writes)
        assert writes[0]["before"] is None
        assert writes[0]["after"] == expected_after.get(section, case.get(section))
    # Effects: claimed, then recorded done, by the agent that performed them; each happened once.
    assert {(e["kind"], e["status"]) for e in case["effects"]} == {
        ("refund", "done"),
        ("reset_link", "done"),
    }
    assert await performed(runtime, case_id, "refund") == 1
    assert await performed(runtime, case_id, "reset_link") == 1


async def test_a_case_that_only_mentions_logging_in_sends_no_reset_link(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    """Found by review: "I log into the app every morning" read as a login problem, and the
    customer got a password reset link nobody asked for."""
    body = {
        **demo_case(case_id),
        "text": "I log into the app every morning and saw two charges",
    }
    response = await client.post("/api/cases", json=body)
    assert response.status_code == 201, response.text
    case = response.json()
    assert case["status"] == "completed"
    assert case["refund"]["status"] == "issued"
    assert case["account"] == {"issue": None, "reset_link_sent": False, "reset_reference": None}
    assert "reset link" not in case["final_response"]
    assert await performed(runtime, case_id, "reset_link") == 0


async def test_a_new_cases_run_reads_no_record_from_the_cold_tier(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The case was just created and its run holds the case's lock: neither the run's
    checkpoint fence nor anything else needs the record read back from the cold tier."""
    cold = runtime.backends.cold
    read: list[str] = []
    get = cold.get

    async def counted(thread_id: str) -> Any:
        read.append(thread_id)
        return await get(thread_id)

    monkeypatch.setattr(cold, "get", counted)
    response = await client.post("/api/cases", json=demo_case(case_id))
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "completed"
    assert case_id not in read


async def test_an_auto_approved_case_reads_its_record_from_redis_this_often(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #16 counts Redis commands per case. Each read of the record: one as the submit
    looks for a case of its id (a retry's, answered without taking the run lock), one at
    the start (the run's id), one per step (a follow-up's stop) and one per record write of
    a step (4 sections, 2 with an effect done) and per effect claim (2), one for the
    completed mark, one for the queue after it, one after letting the case go, one for the
    answer. Not two for the mark, nor two for the queue: each writes on the record it has
    just read."""
    hot = runtime.backends.hot
    assert hot is not None
    reads: list[str] = []
    read = hot.read

    async def counted(thread_id: str) -> Any:
        reads.append(thread_id)
        return await read(thread_id)

    monkeypatch.setattr(hot, "read", counted)
    response = await client.post("/api/cases", json=demo_case(case_id))
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "completed"
    assert reads.count(case_id) == 1 + 1 + 6 + 6 + 2 + 1 + 1 + 1 + 1


async def test_checkpoint_history_is_newest_first_and_paginates(
    client: httpx.AsyncClient, case_id: str
) -> None:
    assert (await client.post("/api/cases", json=demo_case(case_id))).status_code == 201
    first = (await client.get(f"/api/cases/{case_id}/checkpoints", params={"limit": 3})).json()
    assert len(first["checkpoints"]) == 3 and first["next_before"]
    latest = first["checkpoints"][0]
    assert latest["next"] == [] and "response" in latest["completed_steps"]
    steps = [c["step"] for c in first["checkpoints"]]
    assert steps == sorted(steps, reverse=True)
    rest = (
        await client.get(
            f"/api/cases/{case_id}/checkpoints",
            params={"limit": 100, "before": first["next_before"]},
        )
    ).json()
    ids = [c["checkpoint_id"] for c in first["checkpoints"] + rest["checkpoints"]]
    assert len(ids) == len(set(ids))
    assert rest["next_before"] is None
    assert rest["checkpoints"][-1]["completed_steps"] == []  # the input checkpoint


async def test_the_conversation_is_kept_as_deltas_and_read_back_whole(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    assert (await client.post("/api/cases", json=demo_case(case_id))).status_code == 201
    state = await runtime.graph.aget_state(case_config(case_id))
    conversation = state.values["messages"]
    assert conversation[0] == {"role": "customer", "content": demo_case(case_id)["text"]}
    assert conversation[-1]["content"] == state.values["final_response"]
    # Every earlier checkpoint rebuilds the conversation as it was then: a prefix.
    async for earlier in runtime.graph.aget_state_history(case_config(case_id)):
        messages = earlier.values.get("messages", [])
        assert conversation[: len(messages)] == messages
    # The latest checkpoint stores no copy of the conversation: LangGraph's DeltaChannel
    # keeps each step's new messages as writes, and a whole copy every 50 updates.
    saver = runtime.saver
    assert isinstance(saver, TieredCheckpointSaver)
    await saver.aflush(case_id)
    latest = await saver.store.get_checkpoint(case_id, "", None)
    assert latest is not None
    stored = await saver.store.get_blobs(
        case_id, "", {"messages": latest.channel_versions["messages"]}
    )
    kept = saver.serde.loads_typed(stored["messages"]) if "messages" in stored else None
    assert kept != conversation


async def _escalated(client: httpx.AsyncClient, runtime: Runtime, case_id: str) -> dict[str, Any]:
    body = {
        "case_id": case_id,
        "customer_id": "cust-escalated",
        "text": "The hotel charged me twice",
        "transactions": duplicate_charges(612.40, merchant="Hotel Europa"),
    }
    response = await client.post("/api/cases", json=body)
    assert response.status_code == 201, response.text
    case = response.json()
    assert case["status"] == "awaiting_review"
    assert case["policy"]["decision"] == "needs_review"
    assert case["awaiting_review"]["refund_amount"] == 612.40
    assert case["refund"] is None and case["final_response"] is None
    assert await performed(runtime, case_id, "refund") == 0
    return dict(case)


async def test_over_threshold_waits_for_review_then_approve_refunds(
    client: httpx.AsyncClient,
    runtime: Runtime,
    case_id: str,
    bearer: Callable[..., dict[str, str]],
) -> None:
    await _escalated(client, runtime, case_id)
    alice = object_id_for("alice")
    response = await client.post(
        f"/api/cases/{case_id}/review",
        json={"decision": "approve"},
        headers=bearer("alice", [ROLE_REVIEW]),
    )
    assert response.status_code == 200, response.text
    case = response.json()
    assert case["status"] == "completed"
    # The reviewer of record is the token's principal.
    assert case["review"] == {
        "decision": "approve",
        "reviewer_id": alice,
        "reviewer_name": "alice",
        "note": None,
    }
    assert case["refund"]["status"] == "issued" and case["refund"]["amount"] == 612.40
    assert "refunded 612.40 USD" in case["final_response"]
    assert case["completed_steps"].count("human_review") == 1
    assert await performed(runtime, case_id, "refund") == 1
    entries = await audit_of(client, case_id)
    reviewed = [e for e in entries if e["agent_id"] == f"reviewer:{alice}"]
    assert [e["section"] for e in reviewed] == ["review"]
    assert reviewed[0]["caller"] == {"id": alice, "name": "alice"}
    # Everything the resumed run wrote was on alice's behalf; the intake on the submitter's.
    resumed = [e for e in entries if e["version"] >= reviewed[0]["version"]]
    assert {e["caller"]["name"] for e in resumed} == {"alice"}
    assert entries[-1]["caller"]["name"] == "e2e-client"

    # A second decision is refused and changes nothing: 409 to alice, who decided; bob,
    # another reviewer, may no longer see the case at all (404).
    second = await client.post(
        f"/api/cases/{case_id}/review",
        json={"decision": "reject"},
        headers=bearer("alice", [ROLE_REVIEW]),
    )
    assert second.status_code == 409
    assert "not awaiting review" in second.json()["error"]
    third = await client.post(
        f"/api/cases/{case_id}/review",
        json={"decision": "reject"},
        headers=bearer("bob", [ROLE_REVIEW]),
    )
    assert third.status_code == 404
    assert await audit_of(client, case_id) == entries
    assert (await client.get(f"/api/cases/{case_id}")).json()["refund"]["status"] == "issued"


async def test_over_threshold_reject_completes_with_a_refusal(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str, reviewer: dict[str, str]
) -> None:
    await _escalated(client, runtime, case_id)
    response = await client.post(
        f"/api/cases/{case_id}/review",
        json={"decision": "reject", "note": "charge was legitimate"},
        headers=reviewer,
    )
    assert response.status_code == 200, response.text
    case = response.json()
    assert case["status"] == "completed"
    assert case["refund"]["status"] == "refused" and case["refund"]["reference"] is None
    assert "unable to approve a refund" in case["final_response"]
    assert await performed(runtime, case_id, "refund") == 0
    again = await client.post(
        f"/api/cases/{case_id}/review", json={"decision": "approve"}, headers=reviewer
    )
    assert again.status_code == 409


async def test_concurrent_decisions_only_one_wins(
    client: httpx.AsyncClient,
    runtime: Runtime,
    case_id: str,
    bearer: Callable[..., dict[str, str]],
) -> None:
    await _escalated(client, runtime, case_id)
    answers = await asyncio.gather(
        *(
            client.post(
                f"/api/cases/{case_id}/review",
                json={"decision": "approve"},
                headers=bearer(f"reviewer-{n}", [ROLE_REVIEW]),
            )
            for n in range(3)
        )
    )
    assert sorted(a.status_code for a in answers) == [200, 409, 409]
    assert await performed(runtime, case_id, "refund") == 1


@pytest.mark.parametrize("strategy", ["interrupt", "rollback"])
async def test_a_decision_racing_a_follow_up_that_stops_its_run_stands_or_is_refused(
    client: httpx.AsyncClient,
    runtime: Runtime,
    case_id: str,
    strategy: str,
    monkeypatch: pytest.MonkeyPatch,
    reviewer: dict[str, str],
) -> None:
    """The decision passed its checks and resumed the run; a follow-up then asks that run to
    stop before its review step. An interrupt lets the decision stand (recorded, and the
    refund follows); a rollback takes it with the run, and the decision answers 409. Never
    a 200 for a decision that is gone."""
    await _escalated(client, runtime, case_id)
    tracker = runtime.service._tracker
    mark = tracker.mark
    resuming, go_on = asyncio.Event(), asyncio.Event()

    async def held_at_start(target: str, status: CaseStatus, **kwargs: Any) -> Any:
        if target == case_id and status is CaseStatus.RUNNING and not go_on.is_set():
            resuming.set()
            await go_on.wait()
        return await mark(target, status, **kwargs)

    monkeypatch.setattr(tracker, "mark", held_at_start)
    decision = asyncio.create_task(
        client.post(f"/api/cases/{case_id}/review", json={"decision": "approve"}, headers=reviewer)
    )
    await asyncio.wait_for(resuming.wait(), 30)
    message = {"text": "Any news?", "strategy": strategy}
    follow_up = await client.post(f"/api/cases/{case_id}/messages", json=message)
    assert follow_up.status_code == 202, follow_up.text
    go_on.set()
    decided = await decision
    await runtime.service.wait_idle()
    case = (await client.get(f"/api/cases/{case_id}")).json()
    if strategy == "interrupt":
        assert decided.status_code == 200, decided.text
        assert case["review"] is not None and case["review"]["decision"] == "approve"
        assert case["status"] == "completed", case
        assert await performed(runtime, case_id, "refund") == 1
    else:
        assert decided.status_code == 409, decided.text
        assert "rolled back" in decided.json()["error"]
        assert case["status"] == "awaiting_review" and case["review"] is None
        assert await performed(runtime, case_id, "refund") == 0


async def test_a_long_run_answers_202_with_a_status_url(
    runtime: Runtime, case_id: str, bearer: Callable[..., dict[str, str]]
) -> None:
    patient = dataclasses.replace(
        runtime,
        service=CaseService(
            runtime.store,
            runtime.graph,
            runtime.settings.model_copy(update={"case_sync_wait_seconds": 0.0}),
            runtime.backends.retention,
        ),
    )
    transport = httpx.ASGITransport(app=create_app(patient))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://e2e.test", headers=bearer("e2e-client")
    ) as http:
        response = await http.post("/api/cases", json=demo_case(case_id))
        assert response.status_code == 202, response.text
        assert response.json()["status"] in {"accepted", "running"}
        status_url = response.headers["location"]
        await patient.service.wait_idle()
        final = await http.get(status_url)
    assert final.json()["status"] == "completed"


async def test_health_reports_each_tier(client: httpx.AsyncClient, runtime: Runtime) -> None:
    response = await client.get("/api/health")
    assert response.status_code == 200
    report = response.json()
    assert report["status"] == "ok"
    names = [tier["name"] for tier in report["tiers"]]
    assert runtime.settings.state_cold_backend.value in names and "redis" in names
    assert all(tier["up"] for tier in report["tiers"])


async def test_openapi_schema_is_served(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/api/openapi.json")).json()
    for path in (
        "/api/cases",
        "/api/cases/{case_id}",
        "/api/cases/{case_id}/checkpoints",
        "/api/cases/{case_id}/audit",
        "/api/cases/{case_id}/review",
        "/api/cases/{case_id}/resume",
        "/api/health",
    ):
        assert path in schema["paths"], path
