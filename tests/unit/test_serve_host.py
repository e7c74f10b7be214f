"""`agent-state serve` with AUTH_DISABLED answers loopback host names only: listening on
127.0.0.1 does not stop a web page that re-points its own host name there (DNS
rebinding) from calling the unauthenticated API; its browser names that host in `Host`.
Nor does it stop a page of another origin sending it a request it cannot read the answer
to (a form's POST: no preflight), with a loopback `Host`: its browser names the page's
origin in `Origin` (or says `Sec-Fetch-Site: cross-site`)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from agent_state_cli.cli import serving_app
from support_cases.runtime import RuntimeHolder
from support_cases.settings import AZURE_HOST_MARKERS, AppSettings

PORT = 7071
LOCAL = {"cosmos_endpoint": "https://127.0.0.1:1/"}


async def status_for(values: dict[str, Any], host: str, path: str = "/api/openapi.json") -> int:
    return (await answer_to(values, "GET", path, {"Host": host})).status_code


async def answer_to(
    values: dict[str, Any], method: str, path: str, headers: dict[str, str]
) -> httpx.Response:
    settings = AppSettings.model_validate({**LOCAL, **values})
    app = serving_app(PORT, holder=RuntimeHolder(lambda: settings))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        return await client.request(method, path, headers=headers)


@pytest.fixture(autouse=True)
def not_in_azure(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in AZURE_HOST_MARKERS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (f"evil.example:{PORT}", 421),
        ("evil.example", 421),
        (f"127.0.0.1:{PORT + 1}", 421),  # loopback, but another server's port
        (f"127.0.0.1:{PORT}", 200),
        (f"LOCALHOST:{PORT}", 200),
        (f"[::1]:{PORT}", 200),
        # No port: what clients send for port 80 (`serve --port 80`); no rebinding page
        # sends a loopback name.
        ("localhost", 200),
        ("127.0.0.1", 200),
        ("[::1]", 200),
        ("localhost.evil.example", 421),
        ("127.0.0.1.evil.example", 421),
        (f"[::1]:{PORT + 1}", 421),
        # What a page of any site calling http://0.0.0.0:<port> sends: that address reaches
        # a server listening on loopback on Linux and macOS, and names no loopback host.
        (f"0.0.0.0:{PORT}", 421),
        ("", 421),
    ],
)
async def test_with_auth_disabled_only_loopback_host_names_are_answered(
    host: str, expected: int
) -> None:
    assert await status_for({"auth_disabled": True}, host) == expected
    # Every route, not only the document: refused before any reaches the app.
    if expected == 421:
        assert await status_for({"auth_disabled": True}, host, "/api/cases/case-1") == 421


async def test_with_auth_on_the_host_is_not_checked() -> None:
    """A caller needs a token then; a deployment's own host names are not loopback ones."""
    issuer = {
        "auth_issuer": "http://issuer.test",
        "auth_audience": "api://serve-test",
        "auth_jwks_url": "http://127.0.0.1:1/keys",
    }
    assert await status_for(issuer, f"evil.example:{PORT}") == 200
    assert await status_for(issuer, f"evil.example:{PORT}", "/api/cases/case-1") == 401


LOOPBACK_HOST = {"Host": f"127.0.0.1:{PORT}"}
# What a page's form sends: a "simple" request, no preflight, no body needed.
FORM_POST = ("POST", "/api/cases/case-1/resume", {"Content-Type": "text/plain"})


@pytest.mark.parametrize(
    ("browser", "refused"),
    [
        ({"Origin": "https://evil.example"}, True),
        ({"Origin": "http://127.0.0.1.evil.example"}, True),
        ({"Origin": "http://localhost.evil.example:3000"}, True),
        ({"Origin": "null"}, True),  # a sandboxed frame, a file:// page
        ({"Origin": "http://user@127.0.0.1"}, True),  # no browser sends it so
        ({"Sec-Fetch-Site": "cross-site"}, True),  # no Origin (a GET): the page's site
        ({"Origin": f"http://127.0.0.1:{PORT}"}, False),  # the API's own /api/docs
        ({"Origin": f"http://[::1]:{PORT}"}, False),
        ({"Origin": "http://localhost:3000"}, False),  # a page served on this machine
        ({"Origin": "https://LOCALHOST"}, False),
        ({"Sec-Fetch-Site": "same-origin"}, False),
        ({}, False),  # curl, the CLI: no browser, no page
    ],
)
async def test_with_auth_disabled_browser_pages_of_other_origins_are_refused(
    browser: dict[str, str], refused: bool
) -> None:
    method, path, form = FORM_POST
    sent = await answer_to(
        {"auth_disabled": True}, method, path, {**LOOPBACK_HOST, **form, **browser}
    )
    if refused:
        assert sent.status_code == 403, sent.text
        assert "loopback origin" in sent.json()["error"]
        answer = await answer_to(
            {"auth_disabled": True}, "GET", "/api/openapi.json", {**LOOPBACK_HOST, **browser}
        )
        assert answer.status_code == 403  # every route, before any reaches the app
    else:
        # Reaches the route (the case store is out of reach here).
        assert sent.status_code != 403, sent.text
        answer = await answer_to(
            {"auth_disabled": True}, "GET", "/api/openapi.json", {**LOOPBACK_HOST, **browser}
        )
        assert answer.status_code == 200


async def test_with_auth_disabled_a_foreign_page_opens_no_event_stream() -> None:
    """EventSource names its page's origin: a foreign page would otherwise hold the local
    principal's streams (every caller is that one), and `agent-state follow` be refused (429)."""
    stream = {**LOOPBACK_HOST, "Origin": "https://evil.example", "Accept": "text/event-stream"}
    answer = await answer_to({"auth_disabled": True}, "GET", "/api/cases/case-1/events", stream)
    assert answer.status_code == 403, answer.text
    assert "loopback origin" in answer.json()["error"]


async def test_with_auth_disabled_the_origins_cors_allows_are_answered() -> None:
    """An origin CORS_ALLOWED_ORIGINS names is one the operator let call this API."""
    portal = "https://portal.example.com"
    values = {"auth_disabled": True, "cors_allowed_origins": portal}
    preflight = {
        **LOOPBACK_HOST,
        "Origin": portal,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    answer = await answer_to(values, "OPTIONS", "/api/cases", preflight)
    assert answer.status_code == 200, answer.text
    assert answer.headers["access-control-allow-origin"] == portal
    sent = {**LOOPBACK_HOST, "Origin": portal}
    answer = await answer_to(values, "GET", "/api/openapi.json", sent)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == portal
    elsewhere = {**LOOPBACK_HOST, "Origin": "https://evil.example"}
    assert (await answer_to(values, "GET", "/api/openapi.json", elsewhere)).status_code == 403


async def test_with_auth_disabled_any_origin_in_cors_opens_no_page_to_it() -> None:
    """`*` lets pages call an API whose callers present tokens; a page of any origin acting
    with every role, unauthenticated, is what this check is for."""
    values = {"auth_disabled": True, "cors_allowed_origins": "*"}
    elsewhere = {**LOOPBACK_HOST, "Origin": "https://evil.example"}
    assert (await answer_to(values, "GET", "/api/openapi.json", elsewhere)).status_code == 403


async def test_with_auth_on_the_origin_is_not_checked() -> None:
    """A page of another origin needs a token then, which it cannot have."""
    issuer = {
        "auth_issuer": "http://issuer.test",
        "auth_audience": "api://serve-test",
        "auth_jwks_url": "http://127.0.0.1:1/keys",
    }
    evil = {**LOOPBACK_HOST, "Origin": "https://evil.example"}
    assert (await answer_to(issuer, "GET", "/api/openapi.json", evil)).status_code == 200
    method, path, form = FORM_POST
    assert (await answer_to(issuer, method, path, {**evil, **form})).status_code == 401
