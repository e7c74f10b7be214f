"""Who may do what: Entra ID access tokens, app roles, and the caller behind a request.

Every request but `/api/health` carries `Authorization: Bearer <access token>`
for the API's app registration. The app validates it itself, in Azure and
locally alike: RS256 signature against the issuer's published keys (JWKS),
issuer, audience, expiry and not-before, and the client application it was issued
to when AUTH_ALLOWED_CLIENT_IDS names the accepted ones. The token's `roles` claim (app roles
assigned to the user or client application) decides what the caller may do;
its object id and name are the caller recorded on reviews and audit entries.

With AUTH_DISABLED=true (local use only; refused in Azure by the settings)
every request acts as one local principal holding every role, and the API
says so in its log when it starts.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import jwt
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from state import BackendUnavailable, Caller, SettingsError

from .http_errors import error_response
from .settings import AppSettings, browser_origin

log = logging.getLogger(__name__)

ROLE_SUBMIT = "Cases.Submit"  # intake, follow-ups, read the cases this caller submitted
ROLE_REVIEW = "Cases.Review"  # review decisions, read cases awaiting review
ROLE_OPERATE = "Cases.Operate"  # resume, checkpoints, audit, detailed health, every case
ALL_ROLES = frozenset({ROLE_SUBMIT, ROLE_REVIEW, ROLE_OPERATE})

# Clock skew tolerated on exp / nbf, as Entra's own libraries do by default.
LEEWAY_SECONDS = 60
# A token naming a key id the cached JWKS lacks refreshes the keys (Entra rotates
# them), but at most this often: unknown key ids must not make every request fetch.
KEYS_REFRESH_MIN_SECONDS = 60.0
# The issuer rolls its signing keys: a key it withdrew is trusted at most this long after.
KEYS_MAX_AGE_SECONDS = 24 * 3600.0
KEYS_FETCH_TIMEOUT_SECONDS = 10.0
# After a failed fetch the issuer is asked again no sooner than this: requests meanwhile
# (and those queued behind that fetch) are refused at once, not each a call to the issuer.
KEYS_RETRY_SECONDS = 5.0
ANONYMOUS = Caller(id="local-anonymous", name="anonymous (AUTH_DISABLED)")
# RFC 6750's b64token: one access token, no space or comma in it.
BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
NOT_BEARER = "the Authorization header is not 'Bearer <access token>'"


class AuthError(Exception):
    """A request refused for who its caller is (or is not)."""


class Unauthenticated(AuthError):
    """No token, or a token that does not validate (maps to 401)."""


class Forbidden(AuthError):
    """A valid token without the role the request needs (maps to 403)."""


class AuthNotConfigured(AuthError):
    """The API cannot check tokens: settings missing or contradictory (maps to 503)."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: stable id (Entra object id), display name, app roles."""

    id: str
    name: str
    roles: frozenset[str]

    @property
    def caller(self) -> Caller:
        return Caller(id=self.id, name=self.name)

    def has(self, role: str) -> bool:
        return role in self.roles

    @property
    def held(self) -> str:
        """The app roles its token holds, for a 403 to name: whether the token lacks the
        role or holds another tells the caller what to ask for."""
        return ", ".join(sorted(self.roles)) or "no app role"

    def require(self, role: str) -> None:
        if not self.has(role):
            raise Forbidden(f"this request needs the app role {role}; the caller has {self.held}")


def redacted_url(url: str | httpx.URL) -> str:
    """`url` without its userinfo (user:password@), query and fragment: what may carry a
    credential (AUTH_JWKS_URL may), so what logs and errors name instead."""
    parts = urlsplit(str(url))
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


class _RedactedUrls(logging.Filter):
    """httpx logs each request's full URL at INFO (`HTTP Request: GET <url> ...`), which
    the Functions host ships to Application Insights: its URL arguments are redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                redacted_url(arg) if isinstance(arg, httpx.URL) else arg for arg in record.args
            )
        return True


logging.getLogger("httpx").addFilter(_RedactedUrls())


class SigningKeys:
    """The issuer's JWKS, fetched on first use, again for a key id it does not hold, and
    again once older than KEYS_MAX_AGE_SECONDS (a key the issuer withdrew is then gone).
    A failed fetch is not tried again for KEYS_RETRY_SECONDS: an issuer out of reach is
    not called once per request."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._named = redacted_url(url)
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = float("-inf")
        self._tried_at = float("-inf")
        self._failed_at = float("-inf")
        self._refreshing = asyncio.Lock()
        self._fetching: asyncio.Future[None] | None = None

    async def key(self, kid: str) -> jwt.PyJWK:
        if kid not in self._keys:
            async with self._refreshing:
                if kid not in self._keys and _since(self._fetched_at) >= KEYS_REFRESH_MIN_SECONDS:
                    await self._fetch_missing()
        elif _since(self._fetched_at) >= KEYS_MAX_AGE_SECONDS and not self._refreshing.locked():
            # One request refreshes; the others go on with the keys held rather than queue
            # behind an issuer that may take KEYS_FETCH_TIMEOUT_SECONDS to answer.
            async with self._refreshing:
                await self._refresh_expired()
        found = self._keys.get(kid)
        if found is None:
            raise Unauthenticated(f"invalid token: no signing key {kid!r} at the issuer")
        return found

    async def _fetch_missing(self) -> None:
        idle = self._fetching is None or self._fetching.done()
        if idle and _since(self._failed_at) < KEYS_RETRY_SECONDS:
            raise BackendUnavailable(
                "token issuer keys",
                f"{self._named}: its last fetch failed under {KEYS_RETRY_SECONDS:g} s ago",
            )
        await self._shared_fetch()

    async def _shared_fetch(self) -> None:
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.ensure_future(self._fetch_noting_failure())
            self._fetching.add_done_callback(_retrieved)
        # Shielded: a request cut off meanwhile (its deadline, its client gone) leaves the
        # fetch to its own timeout, which records a failure; else the next request asked
        # the issuer again at once, and no request was ever refused without waiting. A
        # refresh cut off so was not tried again for KEYS_REFRESH_MIN_SECONDS: a withdrawn
        # key stayed in use while the issuer answered slower than the requests' deadline.
        await asyncio.shield(self._fetching)

    async def _fetch_noting_failure(self) -> None:
        try:
            await self._fetch()
        except BackendUnavailable:
            self._failed_at = time.monotonic()
            raise

    async def _refresh_expired(self) -> None:
        expired = _since(self._fetched_at) >= KEYS_MAX_AGE_SECONDS
        if not expired or _since(self._tried_at) < KEYS_REFRESH_MIN_SECONDS:
            return
        self._tried_at = time.monotonic()
        try:
            await self._shared_fetch()
        except BackendUnavailable as error:
            # The issuer is out of reach: the keys as last fetched stay in use until it
            # answers (asked again at most once a KEYS_REFRESH_MIN_SECONDS).
            log.warning("signing keys not refreshed, the last fetched stay in use: %s", error)

    async def _fetch(self) -> None:
        try:
            # The whole fetch: httpx's timeout bounds each read, which an issuer (or a proxy)
            # sending its answer a few bytes at a time renews for as long as it goes on.
            async with (
                asyncio.timeout(KEYS_FETCH_TIMEOUT_SECONDS),
                httpx.AsyncClient(timeout=KEYS_FETCH_TIMEOUT_SECONDS) as client,
            ):
                response = await client.get(self._url)
                if not response.is_success:
                    # Not raise_for_status(): its message holds the full URL.
                    raise BackendUnavailable(
                        "token issuer keys", f"{self._named}: answered {response.status_code}"
                    )
                document = response.json()
        except TimeoutError:
            raise BackendUnavailable(
                "token issuer keys",
                f"{self._named}: no answer within {KEYS_FETCH_TIMEOUT_SECONDS:g} s",
            ) from None
        except (httpx.HTTPError, ValueError) as error:
            raise BackendUnavailable("token issuer keys", f"{self._named}: {error}") from error
        try:
            keys = jwt.PyJWKSet.from_dict(document).keys
        except (jwt.PyJWKSetError, jwt.InvalidKeyError, AttributeError) as error:
            raise BackendUnavailable("token issuer keys", f"{self._named}: {error}") from error
        self._fetched_at = time.monotonic()
        # RSA keys only: tokens are RS256, and PyJWT verifying one with another type's key
        # raises TypeError (a 500) where a token naming it is just invalid (401).
        self._keys = {key.key_id: key for key in keys if key.key_id and key.key_type == "RSA"}


def _since(moment: float) -> float:
    return time.monotonic() - moment


def _retrieved(fetching: asyncio.Future[None]) -> None:
    # A fetch whose requests were all cut off fails unawaited: not logged as unretrieved.
    if not fetching.cancelled():
        fetching.exception()


class TokenValidator:
    """Validates Entra-style access tokens against one issuer, audience and JWKS."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        keys_url: str,
        allowed_clients: frozenset[str] = frozenset(),
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        # Lower-case client ids; empty: any client application.
        self.allowed_clients = allowed_clients
        self._keys = SigningKeys(keys_url)

    async def principal(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as error:
            raise Unauthenticated(f"invalid token: {error}") from None
        if header.get("alg") != "RS256":
            raise Unauthenticated(f"invalid token: algorithm {header.get('alg')!r} is not RS256")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("invalid token: no key id (kid) in its header")
        key = await self._keys.key(kid)
        claims = self._verify(token, key)
        object_id = claims.get("oid") or claims.get("sub")
        if not isinstance(object_id, str) or not object_id:
            raise Unauthenticated("invalid token: no object id (oid) claim")
        if object_id == ANONYMOUS.id:
            # That id is AUTH_DISABLED's caller, exempt from four eyes and owner of the
            # cases submitted without authentication: no token may act as it.
            raise Unauthenticated(f"invalid token: the object id {object_id!r} is reserved")
        client_claim = "azp" if claims.get("azp") else "appid"
        client = claims.get(client_claim)
        if not client:
            # An ID token of a sign-in to the API's own registration has the same issuer
            # and audience, and may carry roles; only an access token names its client.
            raise Unauthenticated(
                "invalid token: not an access token (it names no client application: azp or appid)"
            )
        if self.allowed_clients and str(client).lower() not in self.allowed_clients:
            # A user's app roles reach every client the user consented to: without this a
            # consent-phishing app would act with its victim's roles.
            raise Unauthenticated(
                f"invalid token: its client application ({client_claim} {str(client)!r}) is "
                "not one this API accepts (AUTH_ALLOWED_CLIENT_IDS)"
            )
        roles = claims.get("roles") or []
        if not isinstance(roles, list):
            raise Unauthenticated("invalid token: the roles claim is not a list")
        # Users have a name; a client application (client credentials) has only its id.
        name = (
            claims.get("name")
            or claims.get("preferred_username")
            or claims.get("azp")
            or claims.get("appid")
        )
        return Principal(
            id=object_id,
            name=str(name or object_id),
            roles=frozenset(role for role in roles if isinstance(role, str)),
        )

    def _verify(self, token: str, key: jwt.PyJWK) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=["RS256"],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "nbf", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("invalid token: it has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("invalid token: it is not valid yet (nbf)") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(
                f"invalid token: its audience is not this API ({self.audience})"
            ) from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(f"invalid token: its issuer is not {self.issuer}") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("invalid token: the signature does not verify") from None
        except jwt.InvalidTokenError as error:
            raise Unauthenticated(f"invalid token: {error}") from None
        return claims


class Authenticator:
    """Turns a request's bearer token into a Principal, per the settings."""

    def __init__(self, settings: AppSettings) -> None:
        self.disabled = settings.auth_disabled
        self._validator: TokenValidator | None = None
        if self.disabled:
            return
        issuer, keys_url = settings.auth_issuer_url, settings.auth_keys_url
        if not (settings.auth_audience and issuer and keys_url):
            raise AuthNotConfigured(
                "authentication is not configured: set AUTH_TENANT_ID and AUTH_AUDIENCE "
                "(or AUTH_ISSUER + AUTH_JWKS_URL + AUTH_AUDIENCE), or AUTH_DISABLED=true "
                "for local use"
            )
        self._validator = TokenValidator(
            issuer=issuer,
            audience=settings.auth_audience,
            keys_url=keys_url,
            allowed_clients=frozenset(settings.auth_allowed_client_ids),
        )

    async def principal(self, token: str | None) -> Principal:
        if self._validator is None:
            return Principal(id=ANONYMOUS.id, name=ANONYMOUS.name, roles=ALL_ROLES)
        if not token:
            raise Unauthenticated("missing bearer token (Authorization: Bearer <access token>)")
        return await self._validator.principal(token)


def announce(authenticator: Authenticator) -> None:
    if authenticator.disabled:
        log.warning(
            "AUTHENTICATION IS OFF (AUTH_DISABLED=true): every caller acts as %r with every "
            "role. Local use only; the app refuses this setting in Azure.",
            ANONYMOUS.name,
        )


class AuthGate:
    """The app's one Authenticator, built (and announced) once from the settings."""

    def __init__(self, settings: Callable[[], AppSettings]) -> None:
        self._settings = settings
        self._authenticator: Authenticator | None = None

    def get(self) -> Authenticator:
        if self._authenticator is None:
            try:
                settings = self._settings()
            except SettingsError as error:
                raise AuthNotConfigured(str(error)) from error
            authenticator = Authenticator(settings)
            announce(authenticator)
            self._authenticator = authenticator
        return self._authenticator


# auto_error=False: a missing token is answered by the app's own 401 (with its reason).
bearer = HTTPBearer(auto_error=False, description="An Entra ID access token for the API")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def presents_token(scope: Scope) -> bool:
    """Whether the request carries an Authorization header with anything in it (an empty
    one is no token, as no header is). `RequireToken` and the routes ask this same question
    of the same raw headers: a header one took for a token and the other for none (a second
    header, a non-breaking space) let a request without a token reach the router."""
    return any(name == b"authorization" and value.strip() for name, value in scope["headers"])


async def optional_principal(request: Request, credentials: Credentials) -> Principal | None:
    """The caller when a token is presented (validated: a bad one is still a 401), else None."""
    if credentials is None and not presents_token(request.scope):
        gate: AuthGate = request.app.state.auth_gate
        try:
            authenticator = gate.get()
        except AuthNotConfigured:
            return None  # answering without a caller needs no token checking
        return await authenticator.principal(None) if authenticator.disabled else None
    return await principal(request, credentials)


async def principal(request: Request, credentials: Credentials) -> Principal:
    """The authenticated caller; 401 without a valid token."""
    gate: AuthGate = request.app.state.auth_gate
    if credentials is None and presents_token(request.scope):
        raise Unauthenticated(NOT_BEARER)
    if credentials is not None and not BEARER_TOKEN.fullmatch(credentials.credentials):
        # The Functions host joins two Authorization headers into one ("Bearer a,Bearer
        # b"): not one token, whichever of them a proxy checked.
        raise Unauthenticated(NOT_BEARER)
    return await gate.get().principal(credentials.credentials if credentials else None)


def role(required: str) -> Callable[..., Any]:
    """A dependency: the caller, who must hold `required` (403 naming it otherwise)."""

    async def holder(
        caller: Annotated[Principal, Depends(principal)],
    ) -> Principal:
        caller.require(required)
        return caller

    return holder


class RequireToken:
    """ASGI middleware: a request without a token (no Authorization header, or an empty
    one) is answered 401 before its input is read or validated (the routes' dependencies
    then validate the token). One with more than one Authorization header is answered 400
    on every path: which of them counts is ambiguous, and a proxy in front may have
    checked another one than the app would.

    `public` paths (health, the OpenAPI document and its UI) pass without one.
    """

    def __init__(self, app: ASGIApp, gate: AuthGate, public: frozenset[str]) -> None:
        self.app = app
        self.gate = gate
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _authorization_header_count(scope) > 1:
            refused = error_response(
                400, "more than one Authorization header: send one bearer token"
            )
            await refused(scope, receive, send)
            return
        if (
            scope["type"] != "http"
            or scope["path"] in self.public
            or presents_token(scope)
            or self._disabled()
        ):
            await self.app(scope, receive, send)
            return
        response = error_response(
            401, "missing bearer token (Authorization: Bearer <access token>)"
        )
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)

    def _disabled(self) -> bool:
        try:
            return self.gate.get().disabled
        except AuthNotConfigured:
            return True  # not decided here: the routes answer 503 naming the problem


def _authorization_header_count(scope: Scope) -> int:
    return sum(1 for name, _ in scope["headers"] if name == b"authorization")


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class LoopbackHostOnly:
    """ASGI middleware for a local server with AUTH_DISABLED (`agent-state serve`): a
    request whose `Host` is not a loopback name, with the serving port or none (clients
    leave port 80 out: `serve --port 80`), is answered 421. Listening on loopback is not
    enough: a web page that re-points its own host name at 127.0.0.1 (DNS rebinding) calls
    the API as same-origin, every role included; its browser sends that host name, never
    a loopback one. The local token issuer checks its `Host` so too (devstack/issuer.py).

    A request a browser sends for a page of another origin is answered 403: a page may
    send a form's POST (no preflight) to 127.0.0.1 with a loopback `Host`, and acts with
    every role though it never reads the answer. Its browser names the page's origin in
    `Origin` (or, without one, says `Sec-Fetch-Site: cross-site`). Loopback origins (the
    API's own /api/docs, a page served on this machine) and those `allowed_origins`
    (CORS_ALLOWED_ORIGINS) names pass; its `*` does not: it lets pages of any origin call
    with a token, which this API then asks for of none. No `Origin`: not a page (curl,
    the CLI)."""

    def __init__(self, app: ASGIApp, port: int, allowed_origins: tuple[str, ...] = ()) -> None:
        self.app = app
        self.port = port
        self.names = frozenset({*LOOPBACK_NAMES, *(f"{name}:{port}" for name in LOOPBACK_NAMES)})
        self.allowed_origins = frozenset(allowed_origins) - {"*"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(dict(_latin1_headers(scope)))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, headers: dict[str, str]) -> Response | None:
        if headers.get("host", "").lower() not in self.names:
            return error_response(
                421,
                "with AUTH_DISABLED this API answers a loopback Host only: "
                f"127.0.0.1, localhost or [::1], with port {self.port} or none",
            )
        origin = headers.get("origin")
        cross_site = origin is None and headers.get("sec-fetch-site") == "cross-site"
        if cross_site or (origin is not None and not self._allowed(origin)):
            return error_response(
                403,
                "with AUTH_DISABLED this API answers browser pages of a loopback origin "
                "(http://127.0.0.1, localhost or [::1], any port) or of one "
                "CORS_ALLOWED_ORIGINS names only",
            )
        return None

    def _allowed(self, origin: str) -> bool:
        spelled = browser_origin(origin)
        if spelled is None:
            return False  # `null` (a sandboxed frame, a file:// page), or no origin at all
        return urlsplit(spelled).hostname in LOOPBACK_HOSTS or spelled in self.allowed_origins


def _latin1_headers(scope: Scope) -> list[tuple[str, str]]:
    # Reversed: dict() of them keeps the first of each name, as Starlette reads a header.
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in reversed(headers)]


def install_auth_errors(app: FastAPI) -> None:
    async def unauthenticated(request: Request, error: Exception) -> JSONResponse:
        response = error_response(401, str(error))
        # RFC 6750: the scheme, and what was wrong with a token that was presented.
        challenge = "Bearer"
        if presents_token(request.scope):
            # Printable ASCII only: the reason may quote parts of an attacker's token.
            reason = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in str(error))
            reason = reason[:200]
            challenge = f'Bearer error="invalid_token", error_description="{reason}"'
        response.headers["WWW-Authenticate"] = challenge
        return response

    async def forbidden(request: Request, error: Exception) -> JSONResponse:
        return error_response(403, str(error))

    async def not_configured(request: Request, error: Exception) -> JSONResponse:
        log.error("refusing requests: %s", error)
        return error_response(503, str(error))

    app.add_exception_handler(Unauthenticated, unauthenticated)
    app.add_exception_handler(Forbidden, forbidden)
    app.add_exception_handler(AuthNotConfigured, not_configured)
    # FastAPI parses and validates the input before the routes' dependencies run, and the
    # router answers an OPTIONS, a 405 or an unknown path with no dependency run at all, so
    # a caller with an invalid token would learn what is wrong with its input (422), or
    # what the API serves, rather than with its token. `RequireToken` covers a missing
    # token; this, a presented one.
    for input_error in (RequestValidationError, StarletteHTTPException):
        answer = app.exception_handlers[input_error]

        async def authenticated_first(
            request: Request, error: Exception, answer: Any = answer
        ) -> Response:
            response: Response = await answer(request, error)
            return await token_refusal(request.scope) or response

        app.add_exception_handler(input_error, authenticated_first)


async def token_refusal(scope: Scope) -> Response | None:
    """The app's answer to the token a request presents, if it is refused (401; 503 when
    its signing keys cannot be had); None for a valid one, or none (`RequireToken`'s)."""
    if not presents_token(scope):
        return None
    request = Request(scope)
    try:
        await principal(request, await bearer(request))
    except (AuthError, BackendUnavailable) as refused:
        answer: Response = await _handler_of(request.app, refused)(request, refused)
        return answer
    return None


def _handler_of(app: FastAPI, error: Exception) -> Any:
    return next(
        app.exception_handlers[kind]
        for kind in type(error).__mro__
        if kind in app.exception_handlers
    )
