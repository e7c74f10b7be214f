"""Server-side trouble answers 5xx; client mistakes answer 4xx. A store's own words (host
names, roles, statements) stay in the log, under an incident id the answer gives."""

from __future__ import annotations

import re

import httpx
import pytest
from fastapi import FastAPI

from state.errors import (
    BackendUnavailable,
    EntryStuck,
    InvalidValue,
    RequestRejected,
    RunsPartlyDeleted,
    RunsStillWriting,
    SaverClosed,
    StillWriting,
    VersionConflict,
)
from support_cases.http_errors import install_error_handlers
from support_cases.runs import RunIndexBusy
from support_cases.service import CaseConflict

STORE_WORDS = 'connection to server at "db-internal.example" failed: role "app-identity" denied'
INCIDENT = r" \(incident [0-9a-f]{12}\)"


@pytest.mark.parametrize(
    ("error", "status", "answer"),
    [
        (RunIndexBusy("the run index is busy (VersionConflict); retry"), 503, None),
        (CaseConflict("case 'c' is not awaiting review"), 409, None),
        (VersionConflict("c", 1, 2), 409, None),
        (InvalidValue("postgres", "unsupported Unicode escape sequence", code="22P05"), 422, None),
        (
            BackendUnavailable("postgres", STORE_WORDS),
            503,
            re.escape("postgres unavailable, retry later") + INCIDENT,
        ),
        (
            RequestRejected("cosmos", STORE_WORDS, code=403),
            500,
            re.escape("cosmos refused the request") + INCIDENT,
        ),
        (
            EntryStuck("case-1", "1-0", "cp-1", f"RequestRejected: {STORE_WORDS}"),
            503,
            re.escape("the case's saved state cannot reach durable storage; an operator must act")
            + INCIDENT,
        ),
    ],
)
async def test_errors_map_to_their_status(
    error: Exception, status: int, answer: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise error

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/boom")
    assert response.status_code == status
    retry_after = "1" if isinstance(error, BackendUnavailable) else None
    assert response.headers.get("Retry-After") == retry_after
    message = response.json()["error"]
    if answer is None:
        assert message == str(error)
        return
    assert re.fullmatch(answer, message), message
    incident = message.rsplit(" ", 1)[1].rstrip(")")
    logged = [record.getMessage() for record in caplog.records]
    assert any(incident in line and STORE_WORDS in line for line in logged), logged


@pytest.mark.parametrize(
    "error",
    [
        RunsStillWriting("write-behind", ["run-1"], ["case-1"]),
        RunsPartlyDeleted(RunsStillWriting("cosmos", ["run-1"], ["case-1"]), ["case-1"]),
    ],
)
async def test_runs_still_writing_are_a_409_to_retry_not_a_store_outage(
    error: BackendUnavailable, caplog: pytest.LogCaptureFixture
) -> None:
    """A rollback's delete gave up on a run that writes on (another worker's): every store
    answered, so the answer must not say one is unavailable; retried later, it succeeds."""
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise error

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/boom")
    assert response.status_code == 409, response.text
    assert response.headers.get("Retry-After") == "1"
    message = response.json()["error"]
    answer = "a run being deleted is still writing to the case, retry later"
    assert re.fullmatch(re.escape(answer) + INCIDENT, message), message
    incident = message.rsplit(" ", 1)[1].rstrip(")")
    logged = [record.getMessage() for record in caplog.records]
    assert any(incident in line and "still writing to ['case-1']" in line for line in logged)


async def test_a_case_still_written_to_while_deleted_is_a_409_to_retry_not_a_store_outage() -> None:
    """A case deletion whose backlog appends kept outpacing (`StillWriting`): Redis answered
    every call, so the answer must not say it is unavailable; retried later, it succeeds."""
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise StillWriting("redis", "appends to 'case-1' landed during each of 5 tries")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/boom")
    assert response.status_code == 409, response.text
    assert response.headers.get("Retry-After") == "1"
    answer = "the case is still being written to, retry later"
    assert re.fullmatch(re.escape(answer) + INCIDENT, response.json()["error"])


async def test_a_saver_closed_under_a_request_answers_503_to_retry() -> None:
    """The worker shutting down closed its saver under the request: another worker answers
    it, so the caller is told to retry, not given a 500."""
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise SaverClosed()

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/boom")
    assert response.status_code == 503
    assert response.headers.get("Retry-After") == "1"
    assert response.json()["error"] == "this worker is shutting down, retry later"
