"""Only the client applications AUTH_ALLOWED_CLIENT_IDS names may call the API with a token.

A user's app roles reach every client application the user consents to (the API's
`user_impersonation` scope allows user consent), so a consent-phishing app got tokens
carrying its victim's roles and the API took them: it only asked that a token name some
client. Tokens come from the test stack's own issuer, as in `test_auth_matrix.py`, with
the client named in `azp` (v2) or `appid` (v1).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from support_cases.api import create_app
from support_cases.auth import ROLE_SUBMIT
from support_cases.demo import demo_case
from support_cases.runtime import Runtime
from support_cases.settings import AppSettings

LISTED = "0c6f1e8a-3d52-4b8e-9a61-5e2f7d9b4c10"
ALSO_LISTED = "7a1d2b3c-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
# A client the user consented to that nobody listed (the consent-phishing app).
STRANGER = "d4c3b2a1-9f8e-4d7c-b6a5-f4e3d2c1b0a9"


def app_for(
    runtime: Runtime, e2e_settings: Callable[..., AppSettings], allowed: str | None
) -> httpx.AsyncClient:
    """The API over `runtime`, its settings read as the environment gives them (the
    comma-separated value of AUTH_ALLOWED_CLIENT_IDS; None: unset)."""
    overrides = {} if allowed is None else {"auth_allowed_client_ids": allowed}
    settings = e2e_settings(runtime.settings.state_cold_backend, **overrides)
    app = create_app(dataclasses.replace(runtime, settings=settings))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c.test")


@pytest.fixture
async def guarded(
    runtime: Runtime, e2e_settings: Callable[..., AppSettings]
) -> AsyncIterator[httpx.AsyncClient]:
    """The API accepting two clients (written as an operator might: spaces, upper case)."""
    async with app_for(runtime, e2e_settings, f" {LISTED.upper()} ,{ALSO_LISTED},") as http:
        yield http


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_listed_client_is_accepted_and_any_other_refused_401(
    guarded: httpx.AsyncClient, runtime: Runtime, issue_token: Callable[..., str]
) -> None:
    """Same user, same role: through a listed client the case is taken; through a client
    nobody listed (before this, 201 for the phishing app) it is a 401 naming the claim."""
    for client in (LISTED, ALSO_LISTED):
        case_id = f"case-clients-{uuid.uuid4().hex[:12]}"
        token = issue_token("clients-victim", [ROLE_SUBMIT], azp=client)
        taken = await guarded.post("/api/cases", json=demo_case(case_id), headers=bearer(token))
        assert taken.status_code == 201, taken.text
    case_id = f"case-clients-{uuid.uuid4().hex[:12]}"
    phished = issue_token("clients-victim", [ROLE_SUBMIT], azp=STRANGER)
    refused = await guarded.post("/api/cases", json=demo_case(case_id), headers=bearer(phished))
    assert refused.status_code == 401, refused.text
    error = refused.json()["error"]
    assert f"client application (azp {STRANGER!r}) is not one this API accepts" in error
    assert "AUTH_ALLOWED_CLIENT_IDS" in error
    assert refused.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    assert await runtime.store.get(case_id) is None
    # Every route, not only intake: a read is refused the same way.
    read = await guarded.get("/api/cases/no-such-case", headers=bearer(phished))
    assert read.status_code == 401, read.text


async def test_a_v1_tokens_appid_is_checked_too(
    guarded: httpx.AsyncClient, issue_token: Callable[..., str]
) -> None:
    """A v1 access token names its client in `appid`, not `azp`: the same list applies."""
    listed = issue_token("clients-v1", [ROLE_SUBMIT], azp="", appid=ALSO_LISTED)
    accepted = await guarded.get("/api/cases/no-such-case", headers=bearer(listed))
    assert accepted.status_code == 404, accepted.text
    stranger = issue_token("clients-v1", [ROLE_SUBMIT], azp="", appid=STRANGER)
    refused = await guarded.get("/api/cases/no-such-case", headers=bearer(stranger))
    assert refused.status_code == 401, refused.text
    assert f"client application (appid {STRANGER!r})" in refused.json()["error"]


@pytest.mark.parametrize("unset", [None, "", " , "])
async def test_without_a_list_any_client_is_accepted(
    runtime: Runtime,
    e2e_settings: Callable[..., AppSettings],
    issue_token: Callable[..., str],
    unset: str | None,
) -> None:
    """Unset or empty (the local stack's default): any client, as before. The same token
    is refused once a list that does not name its client is set."""
    token = issue_token("clients-anyone", [ROLE_SUBMIT], azp=STRANGER)
    async with app_for(runtime, e2e_settings, unset) as open_api:
        accepted = await open_api.get("/api/cases/no-such-case", headers=bearer(token))
        assert accepted.status_code == 404, accepted.text
    async with app_for(runtime, e2e_settings, LISTED) as guarded:
        refused = await guarded.get("/api/cases/no-such-case", headers=bearer(token))
        assert refused.status_code == 401, refused.text
