"""The API's copy of the issuer's signing keys follows the issuer's key rollover, and
survives the issuer being out of reach. Against a real JWKS endpoint on loopback."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from devstack.issuer import Issuer
from support_cases import auth
from support_cases.auth import SigningKeys, Unauthenticated


class JwksEndpoint:
    """Serves `document` at /keys; `available` False answers 503."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.available = True
        self.requests = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                endpoint.requests += 1
                body = json.dumps(endpoint.document).encode()
                self.send_response(200 if endpoint.available else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

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


async def _age() -> None:
    """Past the keys' maximum age (short_lived_keys)."""
    await asyncio.sleep(0.3)
