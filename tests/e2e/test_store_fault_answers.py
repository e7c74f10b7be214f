"""A store's failure answers which tier failed and an incident id; the store's own words
(host names, roles, statements) stay in the log."""

from __future__ import annotations

import re

import httpx
import pytest

from state import BackendUnavailable, RequestRejected
from support_cases.demo import demo_case
from support_cases.runtime import Runtime

STORE_WORDS = 'connection to server at "db-internal.example" failed: role "app-identity" denied'


@pytest.mark.parametrize(
    ("error", "status", "answer"),
    [
        (BackendUnavailable("postgres", STORE_WORDS), 503, "postgres unavailable, retry later"),
        (RequestRejected("cosmos", STORE_WORDS, code=403), 500, "cosmos refused the request"),
    ],
)
async def test_a_store_fault_answers_the_tier_and_an_incident_id_never_the_stores_words(
    client: httpx.AsyncClient,
    runtime: Runtime,
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
    status: int,
    answer: str,
) -> None:
    """What a store says when it fails names hosts, roles and statements: it goes to the
    log, under an id the answer gives the caller to quote."""
    assert (await client.post("/api/cases", json=demo_case(case_id))).status_code == 201

    async def failing(_case_id: str) -> None:
        raise error

    monkeypatch.setattr(runtime.service, "status", failing)
    response = await client.get(f"/api/cases/{case_id}")
    assert response.status_code == status
    message = response.json()["error"]
    match = re.fullmatch(re.escape(answer) + r" \(incident ([0-9a-f]{12})\)", message)
    assert match, message
    assert any(
        match.group(1) in record.getMessage() and STORE_WORDS in record.getMessage()
        for record in caplog.records
    )
