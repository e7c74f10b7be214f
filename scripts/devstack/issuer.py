"""A local token issuer that stands in for Microsoft Entra ID on loopback.

It signs RS256 access tokens shaped like Entra's v2 tokens (iss, aud, iat, nbf,
exp, oid, sub, tid, name, preferred_username, roles) with an RSA key generated
when it starts (never written anywhere), and serves the public half as JWKS.
The API validates these tokens exactly as it validates Entra's: signature
against the JWKS, issuer, audience, expiry and not-before.

    GET  /.well-known/openid-configuration   issuer, jwks_uri, token_endpoint
    GET  /keys                               the JWKS
    POST /token                              {"name", "roles", ...} -> {"access_token", ...}

`/token` mints whatever it is asked for (that is its job: tests ask for expired
tokens, other audiences, other issuers). It listens on 127.0.0.1 only, answers
only requests that name it so (`Host`: no web page re-pointing its own name at
loopback reads a token), and the app refuses a non-https issuer in Azure, so it
can only ever vouch for callers of a local API.

Run: python -m devstack.issuer --port 8095 --audience api://agent-state-local
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

LOOPBACK = "127.0.0.1"
LOCAL_AUDIENCE = "api://agent-state-local"
LOCAL_TENANT_ID = "00000000-0000-4000-8000-00000000a0a0"
# The client application an access token names (`azp`), as Entra's do: the CLI's.
LOCAL_CLIENT_ID = "00000000-0000-4000-8000-0000000c11e0"
ROLES = ("Cases.Submit", "Cases.Review", "Cases.Operate")
# Object ids derive from the name, so one person keeps one id across tokens (a submitter
# reads back the cases submitted under an earlier token).
OID_NAMESPACE = uuid.UUID("5f2b0f0e-8d3a-4c41-9a57-7c0de0a11ce5")
DEFAULT_LIFETIME_SECONDS = 3600


def object_id_for(name: str) -> str:
    return str(uuid.uuid5(OID_NAMESPACE, name))


class Issuer:
    def __init__(self, base_url: str, audience: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.audience = audience
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = uuid.uuid4().hex

    def jwks(self) -> dict[str, Any]:
        public = json.loads(RSAAlgorithm.to_jwk(self._key.public_key()))
        return {"keys": [{**public, "kid": self.kid, "use": "sig", "alg": "RS256"}]}

    def discovery(self) -> dict[str, str]:
        return {
            "issuer": self.base_url,
            "jwks_uri": f"{self.base_url}/keys",
            "token_endpoint": f"{self.base_url}/token",
        }

    def mint(self, request: dict[str, Any]) -> dict[str, Any]:
        """A signed token for `request`: name, roles, and optional overrides for tests."""
        name = str(request.get("name") or "local-developer")
        roles = request.get("roles", list(ROLES))
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise ValueError("roles must be a list of strings")
        now = int(time.time())
        lifetime = int(request.get("expires_in", DEFAULT_LIFETIME_SECONDS))
        not_before = now + int(request.get("not_before_in", 0))
        oid = str(request.get("oid") or object_id_for(name))
        claims: dict[str, Any] = {
            "iss": str(request.get("issuer") or self.base_url),
            "aud": str(request.get("audience") or self.audience),
            "iat": now,
            "nbf": not_before,
            "exp": now + lifetime,
            "oid": oid,
            "sub": oid,
            "tid": LOCAL_TENANT_ID,
            "name": name,
            "preferred_username": f"{name}@localhost",
            "roles": roles,
            "ver": "2.0",
        }
        # A test may ask for none (`"azp": ""`): an ID token carries no client application.
        client = str(request.get("azp", LOCAL_CLIENT_ID))
        if client:
            claims["azp"] = client
        if request.get("appid"):  # a v1 token's name for the client
            claims["appid"] = str(request["appid"])
        token = jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})
        return {"access_token": token, "token_type": "Bearer", "expires_in": lifetime}


def request_token(issuer_url: str, name: str, roles: list[str] | None = None, **claims: Any) -> str:
    """Ask a running local issuer for an access token (the CLI and the tests use this)."""
    body: dict[str, Any] = {"name": name, **claims}
    if roles is not None:
        body["roles"] = roles
    request = urllib.request.Request(
        f"{issuer_url.rstrip('/')}/token",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(json.loads(response.read())["access_token"])


def _handler(issuer: Issuer) -> type[BaseHTTPRequestHandler]:
    port = urlsplit(issuer.base_url).port
    names = {f"{LOOPBACK}:{port}", f"localhost:{port}"}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if not self._named_loopback():
                return
            if self.path == "/keys":
                self._answer(200, issuer.jwks())
            elif self.path == "/.well-known/openid-configuration":
                self._answer(200, issuer.discovery())
            else:
                self._answer(404, {"error": f"no such path: {self.path}"})

        def do_POST(self) -> None:
            if not self._named_loopback():
                return
            if self.path != "/token":
                self._answer(404, {"error": f"no such path: {self.path}"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            try:
                request = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(request, dict):
                    raise ValueError("the body must be a JSON object")
                self._answer(200, issuer.mint(request))
            except (ValueError, TypeError) as error:
                self._answer(400, {"error": str(error)})

        def _named_loopback(self) -> bool:
            """Whether the request names this server by a loopback name (else answered
            421). Listening on loopback is not enough: a web page that re-points its own
            host name at 127.0.0.1 (DNS rebinding) reads the answers as same-origin ones,
            tokens for any role included; its browser sends that host name."""
            if (self.headers.get("Host") or "").lower() in names:
                return True
            self._answer(
                421, {"error": f"this issuer answers {LOOPBACK}:{port} or localhost:{port} only"}
            )
            return False

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            # Token requests would otherwise log every caller line by line.
            pass

    return Handler


def serve(port: int, audience: str) -> None:
    issuer = Issuer(f"http://{LOOPBACK}:{port}", audience)
    server = ThreadingHTTPServer((LOOPBACK, port), _handler(issuer))
    print(f"token issuer on {issuer.base_url} (audience {audience})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--audience", default=LOCAL_AUDIENCE)
    arguments = parser.parse_args()
    serve(arguments.port, arguments.audience)


if __name__ == "__main__":
    main()
