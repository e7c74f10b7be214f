"""Server-side trouble answers 5xx with a message; client mistakes answer 4xx."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from state.errors import BackendUnavailable, InvalidValue, RequestRejected, VersionConflict
from support_cases.http_errors import install_error_handlers
from support_cases.runs import RunIndexBusy
from support_cases.service import CaseConflict


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (RunIndexBusy("the run index is busy (VersionConflict); retry"), 503),
        (BackendUnavailable("cosmos", "HTTP 503"), 503),
        (CaseConflict("case 'c' is not awaiting review"), 409),
        (VersionConflict("c", 1, 2), 409),
        (InvalidValue("postgres", "unsupported Unicode escape sequence", code="22P05"), 422),
        (RequestRejected("cosmos", "HTTP 403: not authorized", code=403), 500),
    ],
)
async def test_errors_map_to_their_status(error: Exception, status: int) -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise error

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/boom")
    assert response.status_code == status
    assert response.json()["error"] == str(error)
