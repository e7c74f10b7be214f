"""The API's copy of the issuer's signing keys follows the issuer's key rollover, and
survives the issuer being out of reach or slow without calling it once per request or
holding requests up. Against a real JWKS endpoint on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from devstack.issuer import Issuer
from state import BackendUnavailable
from support_cases import auth
from support_cases.api import create_app
from support_cases.auth import SigningKeys, Unauthenticated
from support_cases.runtime import RuntimeHolder
from support_cases.settings import AZURE_HOST_MARKERS, AppSettings

TRICKLED_PARTS = 10


class JwksEndpoint:
    """Serves `document` at /keys; `available` False answers 503, after `delay` seconds;
    `trickle` seconds between each of its body's TRICKLED_PARTS."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.available = True
        self.delay = 0.0
        self.trickle = 0.0
        self.requests = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                endpoint.requests += 1
                time.sleep(endpoint.delay)
                body = json.dumps(endpoint.document).encode()
                self.send_response(200 if endpoint.available else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not endpoint.trickle:
                    self.wfile.write(body)
                    return
                step = -(-len(body) // TRICKLED_PARTS)
                try:
                    for start in range(0, len(body), step):
                        self.wfile.write(body[start : start + step])
                        self.wfile.flush()
                        time.sleep(endpoint.trickle)
                except OSError:
                    pass  # the client gave up on it

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/keys"


@pytest.fixture
def jwks() -> Iterator[JwksEndpoint]:
    endpoint = JwksEndpoint()
    thread = threading.Thread(target=endpoint.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        endpoint.server.shutdown()
        endpoint.server.server_close()
        thread.join(5)


@pytest.fixture
def short_lived_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "KEYS_MAX_AGE_SECONDS", 0.2)
    monkeypatch.setattr(auth, "KEYS_REFRESH_MIN_SECONDS", 0.0)


async def test_a_key_the_issuer_withdrew_is_refused_once_the_keys_are_refreshed(
    jwks: JwksEndpoint, short_lived_keys: None
) -> None:
    old, new = Issuer("http://issuer.test", "api"), Issuer("http://issuer.test", "api")
    jwks.document = old.jwks()
    keys = SigningKeys(jwks.url)
    assert (await keys.key(old.kid)).key_id == old.kid

    jwks.document = new.jwks()  # rollover: the old key is withdrawn
    await _age()
    with pytest.raises(Unauthenticated, match="no signing key"):
        await keys.key(old.kid)
    assert (await keys.key(new.kid)).key_id == new.kid


async def test_the_keys_last_fetched_stay_in_use_while_the_issuer_is_out_of_reach(
    jwks: JwksEndpoint, short_lived_keys: None
) -> None:
    issuer = Issuer("http://issuer.test", "api")
    jwks.document = issuer.jwks()
    keys = SigningKeys(jwks.url)
    await keys.key(issuer.kid)
    jwks.available = False
    await _age()
    assert (await keys.key(issuer.kid)).key_id == issuer.kid
    assert jwks.requests == 2  # it asked, and went on with what it had


async def test_an_issuer_out_of_reach_is_not_asked_again_by_every_request(
    jwks: JwksEndpoint,
) -> None:
    """No keys held and the issuer answering 503: every request is refused (fail closed),
    but the issuer is not called once per request (each a token naming any key id)."""
    jwks.available = False
    keys = SigningKeys(jwks.url)
    for _ in range(5):
        with pytest.raises(BackendUnavailable, match="token issuer keys"):
            await keys.key(uuid.uuid4().hex)
    assert jwks.requests == 1


async def test_requests_waiting_on_a_slow_issuer_share_its_one_answer(
    jwks: JwksEndpoint,
) -> None:
    """Requests that queue behind a fetch the issuer is slow to refuse are refused with it,
    instead of each waiting for (and sending) a fetch of its own."""
    jwks.available, jwks.delay = False, 0.5
    keys = SigningKeys(jwks.url)
    started = time.monotonic()
    answers = await asyncio.gather(
        *(keys.key(uuid.uuid4().hex) for _ in range(4)), return_exceptions=True
    )
    assert all(isinstance(answer, BackendUnavailable) for answer in answers), answers
    assert jwks.requests == 1
    assert time.monotonic() - started < 4 * jwks.delay


async def test_the_issuer_is_asked_again_once_it_may_have_recovered(
    jwks: JwksEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "KEYS_RETRY_SECONDS", 0.2)
    issuer = Issuer("http://issuer.test", "api")
    jwks.document, jwks.available = issuer.jwks(), False
    keys = SigningKeys(jwks.url)
    with pytest.raises(BackendUnavailable):
        await keys.key(issuer.kid)
    jwks.available = True
    await asyncio.sleep(0.3)
    assert (await keys.key(issuer.kid)).key_id == issuer.kid
    assert jwks.requests == 2


async def test_a_slow_refresh_of_expired_keys_holds_up_no_other_request(
    jwks: JwksEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys past their age with the issuer slow to answer: one request asks it, the others
    go on with the keys held instead of queueing behind that request."""
    monkeypatch.setattr(auth, "KEYS_MAX_AGE_SECONDS", 0.2)
    issuer = Issuer("http://issuer.test", "api")
    jwks.document = issuer.jwks()
    keys = SigningKeys(jwks.url)
    await keys.key(issuer.kid)
    jwks.available, jwks.delay = False, 1.0
    await _age()
    refreshing = asyncio.create_task(keys.key(issuer.kid))
    await asyncio.sleep(0.1)  # that request is now waiting for the issuer
    started = time.monotonic()
    assert (await keys.key(issuer.kid)).key_id == issuer.kid
    assert time.monotonic() - started < 0.5
    assert (await refreshing).key_id == issuer.kid
    assert jwks.requests == 2


async def test_a_refresh_cut_off_by_its_request_deadline_still_withdraws_the_old_key(
    jwks: JwksEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys past their age, the issuer slower than the refreshing request has left: that
    request is cut off, but its fetch is not. Otherwise the refresh was abandoned and not
    tried again for KEYS_REFRESH_MIN_SECONDS, and a withdrawn key stayed accepted for as
    long as the issuer answered slower than the requests' deadline."""
    monkeypatch.setattr(auth, "KEYS_MAX_AGE_SECONDS", 0.2)
    old, new = Issuer("http://issuer.test", "api"), Issuer("http://issuer.test", "api")
    jwks.document = old.jwks()
    keys = SigningKeys(jwks.url)
    await keys.key(old.kid)
    jwks.document, jwks.delay = new.jwks(), 0.5  # rollover, answered slowly
    await _age()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):  # the request's deadline
            await keys.key(old.kid)
    await asyncio.sleep(0.6)  # the issuer has answered
    with pytest.raises(Unauthenticated, match="no signing key"):
        await keys.key(old.kid)
    assert (await keys.key(new.kid)).key_id == new.kid
    assert jwks.requests == 2


async def test_credentials_in_the_jwks_url_are_never_logged(
    jwks: JwksEndpoint, short_lived_keys: None, caplog: pytest.LogCaptureFixture
) -> None:
    """AUTH_JWKS_URL may carry a password (user:password@) or a token in its query: the
    keys are fetched with them, but every log line (the app's and the HTTP client's) and
    error names the URL without its userinfo and query."""
    caplog.set_level(logging.DEBUG)
    password, token = "jwks-pass-" + uuid.uuid4().hex, "jwks-token-" + uuid.uuid4().hex
    location = jwks.url.removeprefix("http://")
    url = f"http://jwks-user:{password}@{location}?token={token}"
    issuer = Issuer("http://issuer.test", "api")
    jwks.document = issuer.jwks()
    keys = SigningKeys(url)
    await keys.key(issuer.kid)
    jwks.available = False
    await _age()
    assert (await keys.key(issuer.kid)).key_id == issuer.kid  # refresh failed, logged
    with pytest.raises(BackendUnavailable) as refused:
        await SigningKeys(url).key(issuer.kid)
    assert jwks.requests == 3
    assert f"http://{location}" in str(refused.value)
    logged = [caplog.text, *(record.getMessage() for record in caplog.records)]
    assert any(f"http://{location}" in line for line in logged)  # still named
    for secret in (password, token):
        assert not any(secret in line for line in logged), secret
        assert secret not in str(refused.value)


async def test_the_api_refuses_callers_while_the_issuer_is_out_of_reach(
    jwks: JwksEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed: no keys, no caller (503 naming the keys, never the route's answer)."""
    for name in AZURE_HOST_MARKERS:
        monkeypatch.delenv(name, raising=False)
    issuer = Issuer("http://issuer.test", "api://keys-test")
    jwks.document, jwks.available = issuer.jwks(), False
    settings = AppSettings.model_validate(
        {
            "cosmos_endpoint": "https://127.0.0.1:8091/",
            "auth_issuer": issuer.base_url,
            "auth_audience": issuer.audience,
            "auth_jwks_url": jwks.url,
        }
    )
    token = issuer.mint({"name": "keys-test"})["access_token"]
    app = create_app(holder=RuntimeHolder(lambda: settings))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://keys.test") as client:
        for _ in range(3):
            answer = await client.get(
                "/api/cases/case-1", headers={"Authorization": f"Bearer {token}"}
            )
            assert answer.status_code == 503, answer.text
            assert "token issuer keys unavailable" in answer.json()["error"]
            assert answer.headers["Retry-After"]
    assert jwks.requests == 1


async def test_requests_cut_off_by_their_deadline_leave_the_fetch_to_end_and_refuse_the_next(
    jwks: JwksEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An issuer that does not answer, under a request deadline shorter than the keys'
    fetch timeout: each request is cut off (503) while the fetch waits, but that fetch is
    not abandoned with it. Otherwise every request sent the issuer a fetch of its own, and
    no failure was ever recorded, so none was refused at once: each waited its whole
    deadline."""
    for name in AZURE_HOST_MARKERS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(auth, "KEYS_FETCH_TIMEOUT_SECONDS", 1.0)
    issuer = Issuer("http://issuer.test", "api://keys-test")
    jwks.document, jwks.delay = issuer.jwks(), 3.0
    settings = AppSettings.model_validate(
        {
            "cosmos_endpoint": "https://127.0.0.1:8091/",
            "auth_issuer": issuer.base_url,
            "auth_audience": issuer.audience,
            "auth_jwks_url": jwks.url,
            "api_request_deadline_seconds": 0.3,
        }
    )
    token = issuer.mint({"name": "keys-test"})["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    app = create_app(holder=RuntimeHolder(lambda: settings))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://keys.test") as client:
        first = time.monotonic()
        for _ in range(3):
            answer = await client.get("/api/cases/case-1", headers=headers)
            assert answer.status_code == 503, answer.text
            assert "no answer within" in answer.json()["error"]
        assert jwks.requests == 1
        # The one fetch timed out: the requests after it are refused at once, unasked.
        await asyncio.sleep(max(0.0, first + 1.3 - time.monotonic()))
        started = time.monotonic()
        answer = await client.get("/api/cases/case-1", headers=headers)
        assert answer.status_code == 503, answer.text
        assert "token issuer keys unavailable" in answer.json()["error"]
        assert time.monotonic() - started < 0.2
    assert jwks.requests == 1


async def test_an_issuer_trickling_its_answer_is_given_up_on_within_the_fetch_timeout(
    jwks: JwksEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KEYS_FETCH_TIMEOUT_SECONDS bounds the whole fetch, not each read of it: an issuer
    (or a proxy in front of it) sending its answer a few bytes at a time held the fetch,
    and every request queued behind it, for as long as it went on."""
    monkeypatch.setattr(auth, "KEYS_FETCH_TIMEOUT_SECONDS", 1.0)
    issuer = Issuer("http://issuer.test", "api")
    jwks.document, jwks.trickle = issuer.jwks(), 0.5
    keys = SigningKeys(jwks.url)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="no answer within 1 s"):
        await keys.key(issuer.kid)
    assert time.monotonic() - started < 2.0
    with pytest.raises(BackendUnavailable, match="last fetch failed"):
        await keys.key(issuer.kid)  # a failure as any other: not asked again at once
    assert jwks.requests == 1


async def test_a_token_naming_a_key_of_another_type_is_refused_as_invalid(
    jwks: JwksEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An issuer's JWKS may hold EC (or other) keys beside its RSA ones: an RS256 token
    naming one is an invalid token (401), not a key PyJWT cannot use (TypeError, 500)."""
    for name in AZURE_HOST_MARKERS:
        monkeypatch.delenv(name, raising=False)
    issuer = Issuer("http://issuer.test", "api://keys-test")
    elliptic = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))
    rsa_key = issuer.jwks()["keys"][0]
    jwks.document = {"keys": [{**rsa_key, "kid": "rsa"}, {**elliptic, "kid": issuer.kid}]}
    settings = AppSettings.model_validate(
        {
            "cosmos_endpoint": "https://127.0.0.1:8091/",
            "auth_issuer": issuer.base_url,
            "auth_audience": issuer.audience,
            "auth_jwks_url": jwks.url,
        }
    )
    token = issuer.mint({"name": "keys-test"})["access_token"]
    app = create_app(holder=RuntimeHolder(lambda: settings))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://keys.test") as client:
        answer = await client.get("/api/cases/case-1", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 401, answer.text
    assert f"no signing key {issuer.kid!r}" in answer.json()["error"]
    keys = SigningKeys(jwks.url)
    assert (await keys.key("rsa")).key_id == "rsa"  # the set's RSA keys are still used


async def _age() -> None:
    """Past the keys' maximum age (short_lived_keys)."""
    await asyncio.sleep(0.3)
