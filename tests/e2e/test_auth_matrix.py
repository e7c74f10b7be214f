"""Every route x every kind of caller, against the real app, tiers and token issuer.

Tokens come from the test stack's own issuer (an RS256 key generated for this
run, its JWKS served on loopback); the API validates them exactly as it
validates Entra's. Callers: one per app role, a token with no role, and the bad
tokens (none, expired, not yet valid, another audience, another issuer, a
signature by another key, a key id the issuer never published, unsigned, signed
with HMAC instead of RSA, garbage, another scheme). Each answer must be the
specified one: 401 / 403 with the problem named, 404 for a case the caller may
not see, and the route's own answer otherwise.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from e2e_payloads import duplicate_charges

from support_cases.api import create_app
from support_cases.auth import ANONYMOUS, ROLE_OPERATE, ROLE_REVIEW, ROLE_SUBMIT
from support_cases.demo import demo_case
from support_cases.runtime import Runtime
from support_cases.service import run_lock_name

OWNER = "matrix-owner"


def resigned(token: str, *, kid: str | None = None) -> str:
    """The same claims signed by a key the issuer never had (under its kid, or another)."""
    claims = jwt.decode(token, options={"verify_signature": False})
    header = jwt.get_unverified_header(token)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(claims, stranger, algorithm="RS256", headers={"kid": kid or header["kid"]})


def with_algorithm(token: str, algorithm: str) -> str:
    """The same claims, unsigned (`none`) or HMAC-signed with a guessable secret."""
    claims = jwt.decode(token, options={"verify_signature": False})
    kid = jwt.get_unverified_header(token)["kid"]
    key = None if algorithm == "none" else "a-shared-secret-anyone-could-guess-32b"
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid})


@pytest.fixture
async def api(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(transport=transport, base_url="http://matrix.test") as http:
        yield http


@pytest.fixture
def callers(issue_token: Callable[..., str]) -> dict[str, dict[str, str]]:
    """Authorization headers per kind of caller ({} = no header at all)."""

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    valid = issue_token("matrix-bad", [ROLE_OPERATE])
    return {
        "owner": bearer(issue_token(OWNER, [ROLE_SUBMIT])),
        "submitter": bearer(issue_token("matrix-stranger", [ROLE_SUBMIT])),
        "reviewer": bearer(issue_token("matrix-reviewer", [ROLE_REVIEW])),
        "operator": bearer(issue_token("matrix-operator", [ROLE_OPERATE])),
        "no role": bearer(issue_token("matrix-nobody", [])),
        "no token": {},
        "expired": bearer(issue_token("matrix-bad", [ROLE_OPERATE], expires_in=-600)),
        "not yet valid": bearer(issue_token("matrix-bad", [ROLE_OPERATE], not_before_in=600)),
        "wrong audience": bearer(
            issue_token("matrix-bad", [ROLE_OPERATE], audience="api://someone-else")
        ),
        "wrong issuer": bearer(
            issue_token("matrix-bad", [ROLE_OPERATE], issuer="https://login.example.com/v2.0")
        ),
        "wrong signature": bearer(resigned(valid)),
        "unknown key": bearer(resigned(valid, kid=uuid.uuid4().hex)),
        "unsigned": bearer(with_algorithm(valid, "none")),
        "hmac signed": bearer(with_algorithm(valid, "HS256")),
        "garbage": bearer("not-a-jwt"),
        "basic scheme": {"Authorization": "Basic dXNlcjpwYXNz"},
    }


# What a bad token's 401 must name.
BAD_TOKENS = {
    "no token": "missing bearer token",
    "expired": "expired",
    "not yet valid": "not valid yet",
    "wrong audience": "audience",
    "wrong issuer": "issuer",
    "wrong signature": "signature",
    "unknown key": "signing key",
    "unsigned": "not RS256",
    "hmac signed": "not RS256",
    "garbage": "invalid token",
    "basic scheme": "Bearer",
}

# route -> caller -> expected status (bad tokens: 401 everywhere, health aside).
# `done` is a completed case of OWNER, `waiting` one of OWNER awaiting review.
EXPECTED: dict[str, dict[str, int]] = {
    "POST /api/cases": {
        "owner": 201,
        "submitter": 201,
        "reviewer": 403,
        "operator": 403,
        "no role": 403,
    },
    "GET /api/cases/{done}": {
        "owner": 200,
        "submitter": 404,
        "reviewer": 404,
        "operator": 200,
        "no role": 403,
    },
    "GET /api/cases/{waiting}": {
        "owner": 200,
        "submitter": 404,
        "reviewer": 200,
        "operator": 200,
        "no role": 403,
    },
    "GET /api/cases/{done}/checkpoints": {
        "owner": 403,
        "submitter": 403,
        "reviewer": 403,
        "operator": 200,
        "no role": 403,
    },
    "GET /api/cases/{done}/audit": {
        "owner": 403,
        "submitter": 403,
        "reviewer": 403,
        "operator": 200,
        "no role": 403,
    },
    # Only the case's submitter writes to it again (an operator holding the submit role too).
    "POST /api/cases/{done}/messages": {
        "owner": 200,
        "submitter": 404,
        "reviewer": 403,
        "operator": 403,
        "no role": 403,
    },
    "GET /api/cases/{done}/runs": {
        "owner": 200,
        "submitter": 404,
        "reviewer": 404,
        "operator": 200,
        "no role": 403,
    },
    "GET /api/cases/{waiting}/events": {
        "owner": 200,
        "submitter": 404,
        "reviewer": 200,
        "operator": 200,
        "no role": 403,
    },
    # A reviewer may not see a completed case it did not decide: 404, as for reading it
    # (its reviewer of record hears 409: test_a_second_decision_...).
    "POST /api/cases/{done}/review": {
        "owner": 403,
        "submitter": 403,
        "reviewer": 404,
        "operator": 403,
        "no role": 403,
    },
    "POST /api/cases/{done}/resume": {
        "owner": 403,
        "submitter": 403,
        "reviewer": 403,
        "operator": 409,
        "no role": 403,
    },
    "GET /api/health": {
        "owner": 200,
        "submitter": 200,
        "reviewer": 200,
        "operator": 200,
        "no role": 200,
        "no token": 200,
    },
}


def test_the_matrix_covers_every_route_of_the_api(runtime: Runtime) -> None:
    schema = create_app(runtime).openapi()
    routes = {
        f"{method.upper()} {path}"
        for path, operations in schema["paths"].items()
        for method in operations
    }
    covered = {
        route.replace("{done}", "{case_id}").replace("{waiting}", "{case_id}") for route in EXPECTED
    }
    assert routes == covered


def _body_for(route: str) -> dict[str, Any] | None:
    if route == "POST /api/cases":
        return demo_case(f"case-matrix-{uuid.uuid4().hex[:12]}")
    if route.endswith("/review"):
        return {"decision": "approve"}
    if route.endswith("/messages"):
        return {"text": "Any news on my refund?"}
    return None


# The event stream answers what it has and ends, rather than staying open.
PARAMS = {"GET /api/cases/{waiting}/events": {"seconds": 0}}


async def test_route_by_caller_matrix(
    api: httpx.AsyncClient, callers: dict[str, dict[str, str]]
) -> None:
    owner = callers["owner"]
    done = f"case-matrix-{uuid.uuid4().hex[:12]}"
    waiting = f"case-matrix-{uuid.uuid4().hex[:12]}"
    assert (await api.post("/api/cases", json=demo_case(done), headers=owner)).status_code == 201
    escalated = {
        "case_id": waiting,
        "customer_id": "cust-matrix",
        "text": "The hotel charged me twice",
        "transactions": duplicate_charges(612.40, merchant="Hotel Europa"),
    }
    answer = await api.post("/api/cases", json=escalated, headers=owner)
    assert answer.status_code == 201 and answer.json()["status"] == "awaiting_review"

    mismatches: list[str] = []
    for route, by_caller in EXPECTED.items():
        method, template = route.split(" ", 1)
        path = template.format(done=done, waiting=waiting)
        for caller, headers in callers.items():
            expected = by_caller.get(caller, 401)
            response = await api.request(
                method, path, json=_body_for(route), headers=headers, params=PARAMS.get(route)
            )
            if response.status_code != expected:
                mismatches.append(
                    f"{route} as {caller}: {response.status_code} (wanted {expected}) "
                    f"{response.text[:160]}"
                )
                continue
            error = response.json().get("error", "") if response.status_code >= 400 else ""
            if expected == 401:
                assert BAD_TOKENS[caller] in error, (route, caller, error)
                assert response.headers["www-authenticate"].startswith("Bearer")
            if expected == 403:
                assert "app role" in error, (route, caller, error)
            if route == "GET /api/health":
                detailed = response.json().get("tiers") is not None
                assert detailed == (caller == "operator"), (caller, response.json())
    assert not mismatches, "\n".join(mismatches)


async def test_a_second_decision_is_409_to_its_reviewer_and_404_to_other_reviewers(
    api: httpx.AsyncClient, callers: dict[str, dict[str, str]], issue_token: Callable[..., str]
) -> None:
    case_id = f"case-matrix-{uuid.uuid4().hex[:12]}"
    escalated = {
        "case_id": case_id,
        "customer_id": "cust-matrix",
        "text": "The hotel charged me twice",
        "transactions": duplicate_charges(612.40, merchant="Hotel Europa"),
    }
    answer = await api.post("/api/cases", json=escalated, headers=callers["owner"])
    assert answer.status_code == 201 and answer.json()["status"] == "awaiting_review"
    review = f"/api/cases/{case_id}/review"
    decided = await api.post(review, json={"decision": "approve"}, headers=callers["reviewer"])
    assert decided.status_code == 200 and decided.json()["status"] == "completed", decided.text

    again = await api.post(review, json={"decision": "reject"}, headers=callers["reviewer"])
    assert again.status_code == 409
    assert "not awaiting review (status: completed)" in again.json()["error"]
    other = {"Authorization": f"Bearer {issue_token('matrix-reviewer-2', [ROLE_REVIEW])}"}
    late = await api.post(review, json={"decision": "reject"}, headers=other)
    assert late.status_code == 404
    assert late.json()["error"] == f"case {case_id!r} not found"
    # Exactly what a case that does not exist answers.
    unknown_id = f"case-matrix-{uuid.uuid4().hex[:12]}"
    unknown = await api.post(
        f"/api/cases/{unknown_id}/review", json={"decision": "reject"}, headers=other
    )
    assert unknown.status_code == 404
    assert unknown.json() == {**late.json(), "error": f"case {unknown_id!r} not found"}


async def test_a_caller_holding_both_roles_cannot_decide_the_review_of_its_own_case(
    api: httpx.AsyncClient, runtime: Runtime, issue_token: Callable[..., str]
) -> None:
    """Four eyes: the refund a case was escalated for is decided by someone other than
    who submitted it, whatever roles the submitter holds."""
    both = {"Authorization": f"Bearer {issue_token('matrix-both', [ROLE_SUBMIT, ROLE_REVIEW])}"}
    case_id = f"case-matrix-{uuid.uuid4().hex[:12]}"
    body = {**demo_case(case_id), "transactions": duplicate_charges(612.40)}
    submitted = await api.post("/api/cases", json=body, headers=both)
    assert submitted.json()["status"] == "awaiting_review", submitted.text
    before = await runtime.store.get(case_id)
    review = f"/api/cases/{case_id}/review"
    own = await api.post(review, json={"decision": "approve"}, headers=both)
    assert own.status_code == 403, own.text
    assert "someone other than the case's submitter" in own.json()["error"]
    after = await runtime.store.get(case_id)
    assert before is not None and after is not None and after.version == before.version
    other = {"Authorization": f"Bearer {issue_token('matrix-other', [ROLE_REVIEW])}"}
    approved = await api.post(review, json={"decision": "approve"}, headers=other)
    assert approved.status_code == 200, approved.text
    assert approved.json()["refund"]["status"] == "issued"


async def test_a_token_naming_the_local_anonymous_id_is_refused(
    api: httpx.AsyncClient, runtime: Runtime, issue_token: Callable[..., str]
) -> None:
    """Only AUTH_DISABLED acts as the anonymous principal (exempt from four eyes, owner of
    the cases submitted without authentication): a token claiming its id is a 401."""
    token = issue_token("matrix-lookalike", [ROLE_SUBMIT, ROLE_REVIEW], oid=ANONYMOUS.id)
    lookalike = {"Authorization": f"Bearer {token}"}
    case_id = f"case-matrix-{uuid.uuid4().hex[:12]}"
    body = {**demo_case(case_id), "transactions": duplicate_charges(612.40)}
    submitted = await api.post("/api/cases", json=body, headers=lookalike)
    assert submitted.status_code == 401, submitted.text
    assert "reserved" in submitted.json()["error"]
    assert await runtime.store.get(case_id) is None


async def test_an_id_token_is_not_an_access_token(
    api: httpx.AsyncClient, runtime: Runtime, issue_token: Callable[..., str]
) -> None:
    """An ID token of a sign-in to the API's own registration has this API's issuer and
    audience and may carry app roles; it names no client application (`azp`, v1 `appid`),
    which every access token does. Such a token acted as its user: 201."""
    token = issue_token("matrix-id-token", [ROLE_SUBMIT], azp="")
    case_id = f"case-matrix-{uuid.uuid4().hex[:12]}"
    submitted = await api.post(
        "/api/cases", json=demo_case(case_id), headers={"Authorization": f"Bearer {token}"}
    )
    assert submitted.status_code == 401, submitted.text
    assert "not an access token" in submitted.json()["error"]
    assert await runtime.store.get(case_id) is None
    # A v1 access token names its client as `appid`.
    v1 = issue_token("matrix-v1-token", [ROLE_SUBMIT], azp="", appid="a-client-app")
    accepted = await api.get("/api/cases/no-such-case", headers={"Authorization": f"Bearer {v1}"})
    assert accepted.status_code == 404, accepted.text


@pytest.mark.parametrize("bad", ["garbage", "expired", "wrong signature", "basic scheme"])
async def test_a_bad_token_is_a_401_before_anything_is_said_of_the_input(
    api: httpx.AsyncClient, callers: dict[str, dict[str, str]], bad: str
) -> None:
    """FastAPI validates a route's input before its dependencies check the token: a caller
    with a bad token must still get the 401, not a 422 describing its input."""
    malformed = await api.post(
        "/api/cases",
        content=b'{"case_id": ',
        headers={**callers[bad], "Content-Type": "application/json"},
    )
    assert malformed.status_code == 401, malformed.text
    assert BAD_TOKENS[bad] in malformed.json()["error"]
    assert malformed.headers["WWW-Authenticate"].startswith("Bearer")
    not_a_case = await api.post("/api/cases", json={"case_id": 7}, headers=callers[bad])
    assert not_a_case.status_code == 401, not_a_case.text
    # With a valid token the input's problem is told as before.
    told = await api.post(
        "/api/cases",
        content=b'{"case_id": ',
        headers={**callers["owner"], "Content-Type": "application/json"},
    )
    assert told.status_code == 422, told.text


@pytest.mark.parametrize("bad", ["garbage", "expired", "wrong signature", "basic scheme"])
@pytest.mark.parametrize("chunked", [False, True])
async def test_a_bad_token_is_a_401_before_the_body_limit_is_told(
    api: httpx.AsyncClient,
    runtime: Runtime,
    callers: dict[str, dict[str, str]],
    bad: str,
    chunked: bool,
) -> None:
    """An oversized body (declared in Content-Length, or found so while read) was a 413
    before its token was checked: a caller with a bad token learnt the API's body limit."""
    payload = b" " * (runtime.settings.case_max_body_bytes + 1)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 64 * 1024):
            yield payload[start : start + 64 * 1024]

    def oversized(headers: dict[str, str]) -> Any:
        content = chunks() if chunked else payload
        headers = {**headers, "Content-Type": "application/json"}
        return api.post("/api/cases", content=content, headers=headers)

    refused = await oversized(callers[bad])
    assert refused.status_code == 401, refused.text
    assert BAD_TOKENS[bad] in refused.json()["error"]
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    # With a valid token the limit is told as before.
    told = await oversized(callers["owner"])
    assert told.status_code == 413, told.text
    assert "larger than" in told.json()["error"]


@pytest.mark.parametrize("bad", ["garbage", "expired", "wrong signature", "basic scheme"])
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("OPTIONS", "/api/cases/case_8842"),
        ("DELETE", "/api/cases/case_8842"),
        ("GET", "/api/no-such-route"),
        ("OPTIONS", "/api/health"),
        # A known route with a trailing slash: a redirect to it would tell a bad token
        # which routes exist, as a 404 of an unknown path does not.
        ("GET", "/api/cases/case_8842/"),
        ("POST", "/api/cases/"),
        # FastAPI's OAuth2 redirect page for the docs, outside /api (the API's bearer
        # scheme never uses it): it answered a bad token 200.
        ("GET", "/docs/oauth2-redirect"),
    ],
)
async def test_a_bad_token_is_a_401_where_the_router_answers_without_a_route(
    api: httpx.AsyncClient,
    callers: dict[str, dict[str, str]],
    bad: str,
    method: str,
    path: str,
) -> None:
    """An OPTIONS, a 405 or an unknown path is answered before any route's dependency
    checks the token: a bad token must not get further there than no token does (a 401
    without any), nor learn what the API serves."""
    refused = await api.request(method, path, headers=callers[bad])
    assert refused.status_code == 401, refused.text
    assert BAD_TOKENS[bad] in refused.json()["error"]
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    # With a valid token the router's own answer, as before.
    answered = await api.request(method, path, headers=callers["owner"])
    assert answered.status_code in (204, 404, 405), answered.text


async def test_the_docs_ui_is_public_and_points_at_no_page_outside_the_api(
    api: httpx.AsyncClient,
) -> None:
    page = await api.get("/api/docs")
    assert page.status_code == 200, page.text
    assert "/api/openapi.json" in page.text
    assert "oauth2RedirectUrl" not in page.text


@pytest.mark.parametrize("value", ["", "   "])
async def test_an_empty_authorization_header_is_no_token(
    api: httpx.AsyncClient, runtime: Runtime, value: str
) -> None:
    """A header with nothing in it is no token: the 401 comes before the input is read,
    described or stored, as without the header."""
    case_id = f"case-matrix-{uuid.uuid4().hex[:12]}"
    empty = {"Authorization": value}
    malformed = await api.post(
        "/api/cases", content=b'{"case_id": ', headers={**empty, "Content-Type": "application/json"}
    )
    assert malformed.status_code == 401, malformed.text
    assert "missing bearer token" in malformed.json()["error"]
    options = await api.options(f"/api/cases/{case_id}", headers=empty)
    assert options.status_code == 401, options.text
    submitted = await api.post("/api/cases", json=demo_case(case_id), headers=empty)
    assert submitted.status_code == 401, submitted.text
    assert await runtime.store.get(case_id) is None


async def test_a_token_the_routes_find_none_of_is_a_401_before_the_input_is_read(
    api: httpx.AsyncClient, runtime: Runtime
) -> None:
    """`RequireToken` and the routes must agree whether a token was presented: a header the
    middleware let through as a token, but the routes took for none, had the router answer
    (404, 405, OPTIONS) and the input described (422) to a caller without any token."""
    # No ASCII space: a token to HTTP, none to str.strip.
    headers = [(b"Authorization", b"\xa0")]
    case_id = f"case-matrix-{uuid.uuid4().hex[:12]}"
    malformed = await api.post(
        "/api/cases",
        content=b'{"case_id": ',
        headers=[*headers, (b"Content-Type", b"application/json")],
    )
    assert malformed.status_code == 401, malformed.text
    for method, path in [("GET", "/api/no-such-route"), ("OPTIONS", f"/api/cases/{case_id}")]:
        refused = await api.request(method, path, headers=headers)
        assert refused.status_code == 401, (method, path, refused.text)
    submitted = await api.post("/api/cases", json=demo_case(case_id), headers=headers)
    assert submitted.status_code == 401, submitted.text
    assert await runtime.store.get(case_id) is None


@pytest.mark.parametrize(
    ("first", "second"),
    [("", "garbage"), ("owner", "garbage"), ("garbage", "owner"), ("owner", "owner")],
)
async def test_two_authorization_headers_are_a_400_before_the_input_is_read(
    api: httpx.AsyncClient,
    runtime: Runtime,
    callers: dict[str, dict[str, str]],
    first: str,
    second: str,
) -> None:
    """The first header was the one read: a proxy in front that checked the other one let
    through a request the app then answered as someone else, or as no one. Which counts is
    ambiguous, so neither does, on every path (a token on /health shows its details)."""

    def authorization(caller: str) -> bytes:
        return callers[caller]["Authorization"].encode() if caller else b""

    headers = [(b"Authorization", authorization(first)), (b"Authorization", authorization(second))]
    case_id = f"case-matrix-{uuid.uuid4().hex[:12]}"
    answers = [
        await api.post("/api/cases", json=demo_case(case_id), headers=headers),
        await api.post(
            "/api/cases",
            content=b'{"case_id": ',
            headers=[*headers, (b"Content-Type", b"application/json")],
        ),
        await api.get(f"/api/cases/{case_id}", headers=headers),
        await api.options(f"/api/cases/{case_id}", headers=headers),
        await api.get("/api/health", headers=headers),
    ]
    for answer in answers:
        assert answer.status_code == 400, (answer.request.url, answer.text)
        assert answer.json() == {
            "error": "more than one Authorization header: send one bearer token"
        }
    assert await runtime.store.get(case_id) is None


@pytest.mark.parametrize("separator", [",", ", "])
async def test_one_authorization_header_holding_two_tokens_is_a_401(
    api: httpx.AsyncClient, runtime: Runtime, issue_token: Callable[..., str], separator: str
) -> None:
    """What the Functions host makes of two Authorization headers (it joins them with a
    comma, see test_worker_requests): not one bearer token, whichever a proxy checked."""
    owner, other = issue_token(OWNER, [ROLE_SUBMIT]), issue_token("matrix-other", [ROLE_SUBMIT])
    joined = {"Authorization": f"Bearer {owner}{separator}Bearer {other}"}
    case_id = f"case-matrix-{uuid.uuid4().hex[:12]}"
    submitted = await api.post("/api/cases", json=demo_case(case_id), headers=joined)
    assert submitted.status_code == 401, submitted.text
    assert submitted.json()["error"] == "the Authorization header is not 'Bearer <access token>'"
    assert submitted.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    assert await runtime.store.get(case_id) is None


async def test_a_decision_on_a_case_being_worked_on_is_404_to_a_reviewer_who_may_not_see_it(
    api: httpx.AsyncClient,
    runtime: Runtime,
    callers: dict[str, dict[str, str]],
) -> None:
    # Found by review: the case's runner lock answered 409 (with when its lease ends)
    # before the decision's checks ran.
    case_id = f"case-matrix-{uuid.uuid4().hex[:12]}"
    made = await api.post("/api/cases", json=demo_case(case_id), headers=callers["owner"])
    assert made.status_code == 201 and made.json()["status"] == "completed", made.text
    review = f"/api/cases/{case_id}/review"
    held = await runtime.store.lock(run_lock_name(case_id), ttl_ms=60_000)
    assert held is not None
    try:
        hidden = await api.post(review, json={"decision": "reject"}, headers=callers["reviewer"])
    finally:
        await runtime.store.unlock(held)
    assert hidden.status_code == 404 and hidden.json()["error"] == f"case {case_id!r} not found"


async def test_a_403_names_the_missing_role(
    api: httpx.AsyncClient, callers: dict[str, dict[str, str]]
) -> None:
    response = await api.get("/api/cases/anything/audit", headers=callers["reviewer"])
    assert response.status_code == 403
    assert "Cases.Operate" in response.json()["error"]
    assert "Cases.Review" in response.json()["error"]  # and what the caller has


@pytest.mark.parametrize(
    ("roles", "held"),
    [([], "no app role"), (["Other.Role", "Cases.Archive"], "Cases.Archive, Other.Role")],
)
async def test_a_403_reading_a_case_names_the_roles_the_token_holds(
    api: httpx.AsyncClient, issue_token: Callable[..., str], roles: list[str], held: str
) -> None:
    """Found by review: reading a case named the roles it needs, not the caller's, so a
    user could not tell a token without roles from one holding the wrong ones."""
    token = issue_token("matrix-elsewhere", roles)
    response = await api.get("/api/cases/anything", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error.startswith("reading a case needs one of the app roles"), error
    assert error.endswith(f"; the caller has {held}"), error


async def test_a_submitter_cannot_take_over_another_callers_case_id(
    api: httpx.AsyncClient, callers: dict[str, dict[str, str]]
) -> None:
    case_id = f"case-matrix-{uuid.uuid4().hex[:12]}"
    body = demo_case(case_id)
    assert (await api.post("/api/cases", json=body, headers=callers["owner"])).status_code == 201
    # The same body again by its owner is an idempotent replay; by someone else, refused
    # without showing the case.
    replay = await api.post("/api/cases", json=body, headers=callers["owner"])
    assert replay.status_code == 200 and replay.json()["case_id"] == case_id
    other = await api.post("/api/cases", json=body, headers=callers["submitter"])
    assert other.status_code == 409 and "another caller" in other.json()["error"]
    assert "customer_id" not in other.text


async def test_the_same_idempotency_key_from_two_callers_makes_two_cases(
    api: httpx.AsyncClient, callers: dict[str, dict[str, str]]
) -> None:
    body = {name: value for name, value in demo_case().items() if name != "case_id"}
    key = {"Idempotency-Key": f"matrix-{uuid.uuid4().hex}"}
    mine = await api.post("/api/cases", json=body, headers={**callers["owner"], **key})
    theirs = await api.post("/api/cases", json=body, headers={**callers["submitter"], **key})
    assert mine.status_code == theirs.status_code == 201
    assert mine.json()["case_id"] != theirs.json()["case_id"]
