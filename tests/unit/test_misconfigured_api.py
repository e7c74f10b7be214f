"""An API whose settings cannot be read answers 503 naming the problem (the operator's to
fix), never a bare 500: requests with bodies too, whose size limit is itself a setting."""

from __future__ import annotations

import httpx
import pytest

from state.errors import SettingsError
from support_cases.api import create_app
from support_cases.runtime import RuntimeHolder
from support_cases.settings import AppSettings
from tests.support.misconfigured import api_from_environment

PROBLEM = "COSMOS_ENDPOINT is not a URL"


def unreadable_settings() -> AppSettings:
    raise SettingsError(PROBLEM)


@pytest.mark.parametrize("token", [None, "Bearer not-even-a-jwt"])
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/health", None),
        ("POST", "/api/cases", b'{"case_id": "case_8842"}'),
        ("POST", "/api/cases/case_8842/review", b'{"decision": "approve"}'),
        ("GET", "/api/cases/case_8842", None),
    ],
)
async def test_every_request_is_a_503_naming_the_setting(
    token: str | None, method: str, path: str, body: bytes | None
) -> None:
    app = create_app(holder=RuntimeHolder(unreadable_settings))
    headers = {"content-type": "application/json"} | ({"authorization": token} if token else {})
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answer = await client.request(method, path, content=body, headers=headers)
    assert answer.status_code == 503, answer.text
    assert PROBLEM in answer.json()["error"]


async def test_a_body_over_the_default_limit_is_still_refused_without_reading_on() -> None:
    """The limit falls back to its default: no caller can be authenticated, so the size is
    all there is to tell (a token's 503 comes first, as a bad token's 401 would)."""
    app = create_app(holder=RuntimeHolder(unreadable_settings))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        oversized = b"x" * (2 * 1024 * 1024)
        refused = await client.post("/api/cases", content=oversized)
        assert refused.status_code == 413, refused.text
        assert "larger than 262144 bytes" in refused.json()["error"]
        with_token = await client.post(
            "/api/cases", content=oversized, headers={"authorization": "Bearer x"}
        )
        assert with_token.status_code == 503, with_token.text
        assert PROBLEM in with_token.json()["error"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        # An origin pasted with the portal's sign-in: refused, as no browser sends it so.
        ("CORS_ALLOWED_ORIGINS", "https://portal-admin:hunter2-pw@portal.example.com"),
        # An issuer behind basic authentication: refused in Azure, where it must be https.
        ("AUTH_ISSUER", "http://issuer-admin:hunter2-pw@issuer.internal:8095"),
        ("AUTH_JWKS_URL", "http://issuer-admin:hunter2-pw@issuer.internal:8095/keys"),
    ],
)
async def test_a_refused_setting_is_named_without_its_value(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    variable: str,
    value: str,
) -> None:
    """Every caller, without a token, reads why the settings are refused (503): a value
    quoted there (or in the log) hands out whatever credentials it holds."""
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:8091/")
    monkeypatch.setenv("WEBSITE_INSTANCE_ID", "in-azure")
    monkeypatch.setenv(variable, value)
    async with api_from_environment() as client:
        answer = await client.get("/api/health")
    assert answer.status_code == 503, answer.text
    assert variable in answer.json()["error"]
    assert "hunter2-pw" not in answer.text
    assert "hunter2-pw" not in caplog.text
