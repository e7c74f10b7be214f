"""Browser pages of the origins CORS_ALLOWED_ORIGINS names may call the API: their preflight
is answered without a token, and the answers (401s included) carry what a page needs to
read them. No origin configured: no CORS headers at all."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from state import SettingsError
from support_cases.api import create_app
from support_cases.auth import ROLE_SUBMIT
from support_cases.demo import demo_case
from support_cases.runtime import Runtime
from support_cases.settings import AppSettings

PORTAL = "https://portal.example.com"
# The same origin as an operator may write it.
PORTAL_WRITTEN = "https://Portal.Example.com:443"
BASE = {"cosmos_endpoint": "https://127.0.0.1:1/", "auth_disabled": True}
PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
}


@asynccontextmanager
async def api_allowing(runtime: Runtime, *origins: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = runtime.settings.model_copy(update={"cors_allowed_origins": origins})
    app = create_app(dataclasses.replace(runtime, settings=settings))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cors.test") as http:
        yield http


async def test_an_allowed_origins_preflight_is_answered_without_a_token(
    runtime: Runtime,
) -> None:
    async with api_allowing(runtime, PORTAL) as api:
        answer = await api.options("/api/cases", headers={"Origin": PORTAL, **PREFLIGHT})
    assert answer.status_code == 200, answer.text
    assert answer.headers["access-control-allow-origin"] == PORTAL
    assert "POST" in answer.headers["access-control-allow-methods"]
    allowed = answer.headers["access-control-allow-headers"].lower()
    assert {"authorization", "content-type", "idempotency-key"} <= {
        name.strip() for name in allowed.split(",")
    }
    assert "access-control-allow-credentials" not in answer.headers


async def test_another_origins_preflight_is_refused(runtime: Runtime) -> None:
    async with api_allowing(runtime, PORTAL) as api:
        answer = await api.options(
            "/api/cases", headers={"Origin": "https://elsewhere.example", **PREFLIGHT}
        )
    assert answer.status_code == 400
    assert "access-control-allow-origin" not in answer.headers


async def test_answers_to_an_allowed_origin_are_readable_by_its_page(
    runtime: Runtime, issue_token: Callable[..., str]
) -> None:
    token = issue_token("cors-portal", [ROLE_SUBMIT])
    async with api_allowing(runtime, PORTAL) as api:
        created = await api.post(
            "/api/cases",
            json=demo_case(f"case-cors-{uuid.uuid4().hex[:12]}"),
            headers={"Origin": PORTAL, "Authorization": f"Bearer {token}"},
        )
        refused = await api.get("/api/cases/case_8842", headers={"Origin": PORTAL})
    assert created.status_code in (201, 202), created.text
    assert created.headers["access-control-allow-origin"] == PORTAL
    exposed = created.headers["access-control-expose-headers"].lower()
    assert {"location", "retry-after", "www-authenticate"} <= {
        name.strip() for name in exposed.split(",")
    }
    # The page can tell its user to sign in again: the 401 is readable too.
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == PORTAL


async def test_no_origin_configured_means_no_cors_headers(runtime: Runtime) -> None:
    async with api_allowing(runtime) as api:
        preflight = await api.options("/api/cases", headers={"Origin": PORTAL, **PREFLIGHT})
        health = await api.get("/api/health", headers={"Origin": PORTAL})
    assert preflight.status_code == 401  # as any request without a token
    assert health.status_code == 200
    for answer in (preflight, health):
        assert not any(name.startswith("access-control-") for name in answer.headers)


async def test_an_origin_written_with_capitals_or_its_default_port_matches_its_page(
    runtime: Runtime,
) -> None:
    """A browser sends its origin with the host in lower case and no default port, and
    CORS compares it exactly: the setting is read as the browser will spell it."""
    settings = AppSettings.model_validate({**BASE, "cors_allowed_origins": PORTAL_WRITTEN})
    async with api_allowing(runtime, *settings.cors_allowed_origins) as api:
        answer = await api.options("/api/cases", headers={"Origin": PORTAL, **PREFLIGHT})
    assert answer.status_code == 200, answer.text
    assert answer.headers["access-control-allow-origin"] == PORTAL


@pytest.mark.parametrize(
    "origins",
    [
        "https://portal.example.com/",  # a browser sends no trailing slash
        "portal.example.com",
        "https://portal.example.com/app",
        "https://user@portal.example.com",
        "https://portal.example.com:port",
    ],
)
def test_an_origin_no_browser_sends_is_refused_at_start(origins: str) -> None:
    with pytest.raises(SettingsError, match="CORS_ALLOWED_ORIGINS"):
        AppSettings.model_validate({**BASE, "cors_allowed_origins": origins})


def test_origins_are_read_comma_separated() -> None:
    def read(origins: str) -> tuple[str, ...]:
        values = {**BASE, "cors_allowed_origins": origins}
        return AppSettings.model_validate(values).cors_allowed_origins

    assert read(f" {PORTAL}, http://localhost:3000 ,") == (PORTAL, "http://localhost:3000")
    assert read("*") == ("*",)
    # As a browser spells them: the host in lower case, no default port.
    assert read(f"{PORTAL_WRITTEN},HTTP://LOCALHOST:80,http://[::1]:8080") == (
        PORTAL,
        "http://localhost",
        "http://[::1]:8080",
    )
    assert read("") == ()
