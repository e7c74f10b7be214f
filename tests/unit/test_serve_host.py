"""`agent-state serve` with AUTH_DISABLED answers loopback host names only: listening on
127.0.0.1 does not stop a web page that re-points its own host name there (DNS
rebinding) from calling the unauthenticated API; its browser names that host in `Host`."""

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
    settings = AppSettings.model_validate({**LOCAL, **values})
    app = serving_app(PORT, holder=RuntimeHolder(lambda: settings))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        answer = await client.get(path, headers={"Host": host})
    return answer.status_code


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
