"""An event stream serves a caller only while the caller may read the case."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from e2e_payloads import duplicate_charges

from support_cases.api import create_app
from support_cases.auth import ROLE_REVIEW, ROLE_SUBMIT
from support_cases.demo import demo_case
from support_cases.runtime import Runtime


@pytest.fixture
async def api(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://stream.test") as http:
        yield http


async def test_a_reviewers_stream_ends_once_the_case_no_longer_awaits_review(
    api: httpx.AsyncClient, bearer: Callable[..., dict[str, str]], case_id: str
) -> None:
    """GET answers a reviewer 404 once the case was decided; a stream the reviewer opened
    while it awaited review must not go on serving what the customer writes after."""
    owner = bearer("stream-owner", [ROLE_SUBMIT])
    reviewer = bearer("stream-reviewer", [ROLE_REVIEW])
    body = {**demo_case(case_id), "transactions": duplicate_charges(612.40)}
    submitted = await api.post("/api/cases", json=body, headers=owner)
    assert submitted.json()["status"] == "awaiting_review", submitted.text
    reviewer_stream = asyncio.create_task(
        api.get(f"/api/cases/{case_id}/events", params={"seconds": 4}, headers=reviewer)
    )
    owner_stream = asyncio.create_task(
        api.get(f"/api/cases/{case_id}/events", params={"seconds": 4}, headers=owner)
    )
    await asyncio.sleep(0.5)

    decided = await api.post(
        f"/api/cases/{case_id}/review", json={"decision": "reject"}, headers=reviewer
    )
    assert decided.json()["status"] == "completed", decided.text
    assert (await api.get(f"/api/cases/{case_id}", headers=reviewer)).status_code == 404
    follow_up = "my new card number is 4111 1111 1111 1111"
    sent = await api.post(f"/api/cases/{case_id}/messages", json={"text": follow_up}, headers=owner)
    assert sent.status_code in (200, 202), sent.text

    streamed, owners = await reviewer_stream, await owner_stream
    assert streamed.status_code == 200 and owners.status_code == 200
    assert follow_up not in streamed.text
    # The submitter's right lasts: its stream carries the follow-up.
    assert follow_up in owners.text
