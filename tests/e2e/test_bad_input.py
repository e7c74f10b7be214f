"""Client mistakes get a clear 4xx and write nothing (checked in the store itself)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import azure.functions as func
import httpx
import pytest
from e2e_payloads import duplicate_charges

from support_cases.api import create_app
from support_cases.demo import demo_case
from support_cases.runtime import Runtime


def _without(body: dict[str, Any], field: str) -> dict[str, Any]:
    return {key: value for key, value in body.items() if key != field}


def _with_transaction(body: dict[str, Any], **change: Any) -> dict[str, Any]:
    first = {**body["transactions"][0], **change}
    return {**body, "transactions": [first, *body["transactions"][1:]]}


BAD_BODIES: dict[str, Any] = {
    "missing customer_id": lambda b: _without(b, "customer_id"),
    "missing text": lambda b: _without(b, "text"),
    "text is a number": lambda b: {**b, "text": 42},
    "empty text": lambda b: {**b, "text": "   "},
    "transactions not a list": lambda b: {**b, "transactions": {"id": "x"}},
    "negative amount": lambda b: _with_transaction(b, amount=-5),
    "amount is text": lambda b: _with_transaction(b, amount="lots"),
    # JSON true is not 1, nor "612.40" a number: neither may become a refund's amount.
    "amount is true": lambda b: _with_transaction(b, amount=True),
    "amount is a numeric string": lambda b: _with_transaction(b, amount="612.40"),
    "timestamp without zone": lambda b: _with_transaction(b, timestamp="2024-05-01T10:00:00"),
    "timestamp garbage": lambda b: _with_transaction(b, timestamp="yesterday"),
    "unknown field": lambda b: {**b, "priority": "urgent"},
    "bad currency": lambda b: _with_transaction(b, currency="dollars"),
}


@pytest.mark.parametrize("mistake", sorted(BAD_BODIES))
async def test_invalid_submission_is_422_and_writes_nothing(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str, mistake: str
) -> None:
    body = BAD_BODIES[mistake](demo_case(case_id))
    response = await client.post("/api/cases", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"].startswith("invalid request:")
    assert await runtime.store.get(case_id) is None
    assert (await client.get(f"/api/cases/{case_id}")).status_code == 404


async def test_invalid_case_id_is_422(client: httpx.AsyncClient, runtime: Runtime) -> None:
    body = demo_case("bad/id?#")
    response = await client.post("/api/cases", json=body)
    assert response.status_code == 422
    assert "case_id" in response.json()["error"]


@pytest.mark.parametrize("suffix", ["", "/runs", "/audit"])
async def test_a_case_id_with_an_encoded_slash_is_the_422_of_any_invalid_case_id(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str, suffix: str
) -> None:
    """`a%2Fb` answered a generic 404 (the router saw two segments), and `<id>%2Fruns`
    answered the runs of case <id>."""
    assert (await client.post("/api/cases", json=demo_case(case_id))).status_code == 201
    invalid = await client.get(f"/api/cases/{case_id}!x{suffix}")
    assert invalid.status_code == 422, invalid.text
    for encoded in (f"{case_id}%2Fruns{suffix}", f"{case_id}%2fx{suffix}"):
        response = await client.get(f"/api/cases/{encoded}")
        assert response.status_code == 422, (encoded, response.text)
        assert response.json()["error"] == invalid.json()["error"]


@pytest.mark.xfail(
    strict=True,
    reason="azure-functions' AsgiRequest decodes the URL's path (raw_path included) before "
    "the app sees it: KeepEncodedSlashes cannot tell `a%2Fb` from `a/b` there",
)
async def test_a_case_id_with_an_encoded_slash_is_422_in_the_functions_worker_too(
    client: httpx.AsyncClient,
    runtime: Runtime,
    bearer: Callable[..., dict[str, str]],
    case_id: str,
) -> None:
    """In Azure a request reaches the app through the SDK's ASGI middleware (the one
    `func.AsgiFunctionApp` registers), which decodes the URL's path, `raw_path` included,
    before the app sees it: `<id>%2Fruns` answered the runs of case <id> there."""
    assert (await client.post("/api/cases", json=demo_case(case_id))).status_code == 201
    worker = func.AsgiMiddleware(create_app(runtime))
    request = func.HttpRequest(
        "GET",
        f"http://worker.test/api/cases/{case_id}%2Fruns",
        headers=bearer("e2e-client"),
        body=b"",
    )
    response = await worker.handle_async(request, None)
    assert response.status_code == 422, response.get_body()


@pytest.mark.parametrize("reserved", ["support-cases-active-runs-0", "sim-provider-case_8842"])
async def test_a_case_id_naming_an_internal_record_is_422(
    client: httpx.AsyncClient, runtime: Runtime, reserved: str
) -> None:
    response = await client.post("/api/cases", json=demo_case(reserved))
    assert response.status_code == 422, response.text
    assert "reserved" in response.json()["error"]
    # The run index may exist (other cases' runs write it); no case was stored in it.
    record = await runtime.store.get(reserved)
    assert record is None or "request" not in record.sections


async def test_malformed_json_is_422(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    text = json.dumps(demo_case(case_id))[:-10]
    response = await client.post(
        "/api/cases", content=text, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert await runtime.store.get(case_id) is None


async def test_malformed_json_says_what_the_parser_found_and_where(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    """FastAPI's own answer was `body.1: JSON decode error`: a field `1` that does not exist
    and nothing the caller can act on."""
    response = await client.post(
        "/api/cases", content=b"{bad", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error.startswith("invalid request: body: not valid JSON ("), error
    assert "Expecting property name" in error and "at character 1" in error, error
    assert response.json()["detail"][0]["where"] == "body"


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", None],
    ids=["text", "form (curl -d)", "none"],
)
async def test_a_json_body_under_another_content_type_is_422_naming_the_one_to_send(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str, content_type: str | None
) -> None:
    """A valid case body sent without `content-type: application/json` is never parsed;
    the answer said `Input should be a valid dictionary or object to extract fields from`."""
    headers = {"content-type": content_type} if content_type else {}
    response = await client.post(
        "/api/cases", content=json.dumps(demo_case(case_id)).encode(), headers=headers
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert "content-type: application/json" in error, error
    assert f"(got {content_type or 'none'})" in error, error
    assert await runtime.store.get(case_id) is None


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"[]", "an array"),
        (b'"a case"', "a string"),
        (b"42", "a number"),
        (b"null", "null"),
        (b"true", "true or false"),
        (b"", "an empty body"),
    ],
    ids=["array", "string", "number", "null", "bool", "empty"],
)
async def test_a_json_body_that_is_not_an_object_is_422_saying_what_it_is(
    client: httpx.AsyncClient, body: bytes, kind: str
) -> None:
    """Pydantic's words were `Input should be a valid dictionary or object to extract fields
    from` (or `Field required` for no body): Python's types, not what the caller sent."""
    for path in ("/api/cases", "/api/cases/case_1/messages", "/api/cases/case_1/review"):
        response = await client.post(
            path, content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, (path, response.text)
        error = response.json()["error"]
        assert error == f"invalid request: body: expected a JSON object, got {kind}", error


async def test_oversized_body_is_413_and_writes_nothing(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    body = demo_case(case_id)
    body["text"] = "x" * (runtime.settings.case_max_body_bytes + 1)
    response = await client.post("/api/cases", json=body)
    assert response.status_code == 413
    assert "larger than" in response.json()["error"]
    assert await runtime.store.get(case_id) is None


async def test_oversized_chunked_body_is_413(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    payload = json.dumps(demo_case(case_id)).encode() + b" " * runtime.settings.case_max_body_bytes

    async def chunks() -> Any:
        for start in range(0, len(payload), 64 * 1024):
            yield payload[start : start + 64 * 1024]

    response = await client.post(
        "/api/cases", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert await runtime.store.get(case_id) is None


async def test_a_content_length_of_more_digits_than_python_converts_is_413(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    """A declared length past `sys.get_int_max_str_digits()` (4300) is larger than any limit:
    converting it raised ValueError in the body limit, a bare 500. uvicorn's parser refuses
    such a header itself; an ASGI server that passes it on must not crash the app."""
    response = await client.post(
        "/api/cases",
        content=json.dumps(demo_case(case_id)).encode(),
        headers={"content-type": "application/json", "content-length": "1" * 5000},
    )
    assert response.status_code == 413, response.text
    assert "larger than" in response.json()["error"]
    assert await runtime.store.get(case_id) is None


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/cases/{id}", None),
        ("GET", "/api/cases/{id}/checkpoints", None),
        ("GET", "/api/cases/{id}/audit", None),
        ("POST", "/api/cases/{id}/review", {"decision": "approve"}),
        ("POST", "/api/cases/{id}/resume", None),
    ],
)
async def test_unknown_case_is_404_and_writes_nothing(
    client: httpx.AsyncClient,
    runtime: Runtime,
    case_id: str,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    response = await client.request(method, path.format(id=case_id), json=body)
    assert response.status_code == 404
    assert case_id in response.json()["error"]
    assert await runtime.store.get(case_id) is None


async def test_decision_on_a_case_not_awaiting_review_is_409_and_changes_nothing(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str, reviewer: dict[str, str]
) -> None:
    assert (await client.post("/api/cases", json=demo_case(case_id))).status_code == 201
    before = await runtime.store.get(case_id)
    response = await client.post(
        f"/api/cases/{case_id}/review", json={"decision": "approve"}, headers=reviewer
    )
    assert response.status_code == 409
    assert "not awaiting review (status: completed)" in response.json()["error"]
    resume = await client.post(f"/api/cases/{case_id}/resume")
    assert resume.status_code == 409
    after = await runtime.store.get(case_id)
    assert before is not None and after is not None and after.version == before.version


@pytest.mark.parametrize(
    "decision",
    [
        {"decision": "maybe"},
        {"reviewer_id": "e2e-client"},
        {"decision": "approve", "reviewer_id": ""},
        {"decision": "approve", "reviewer_id": 7},
    ],
)
async def test_malformed_decision_is_422(
    client: httpx.AsyncClient,
    runtime: Runtime,
    case_id: str,
    decision: dict[str, Any],
    reviewer: dict[str, str],
) -> None:
    assert (await client.post("/api/cases", json=demo_case(case_id))).status_code == 201
    before = await runtime.store.get(case_id)
    response = await client.post(f"/api/cases/{case_id}/review", json=decision, headers=reviewer)
    assert response.status_code == 422
    after = await runtime.store.get(case_id)
    assert before is not None and after is not None and after.version == before.version


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/cases/{id}/checkpoints", {"limit": 0}),
        ("/api/cases/{id}/checkpoints", {"limit": "ten"}),
        ("/api/cases/{id}/checkpoints", {"before": "junk"}),
        ("/api/cases/{id}/audit", {"limit": 100000}),
    ],
)
async def test_bad_query_parameters_are_422(
    client: httpx.AsyncClient, case_id: str, path: str, params: dict[str, Any]
) -> None:
    response = await client.get(path.format(id=case_id), params=params)
    assert response.status_code == 422


@pytest.mark.parametrize("seconds", ["nan", "inf", "-inf"])
async def test_an_event_stream_length_that_is_not_a_finite_number_is_422_saying_so(
    client: httpx.AsyncClient, case_id: str, seconds: str
) -> None:
    """NaN passes no bound, so it was told it "should be less than or equal to 200"."""
    assert (await client.post("/api/cases", json=demo_case(case_id))).status_code == 201
    response = await client.get(f"/api/cases/{case_id}/events", params={"seconds": seconds})
    assert response.status_code == 422, response.text
    assert (
        response.json()["error"]
        == "invalid request: query.seconds: Input should be a finite number"
    )


async def test_a_value_the_cold_store_cannot_hold_is_422(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    """Postgres JSON cannot hold a NUL character, so no backend takes one (a case that
    works on one works on each): a typed refusal, 422, never a 500."""
    body = {**demo_case(case_id), "text": "I was charged twice \u0000 and I can't log in"}
    response = await client.post("/api/cases", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"].startswith("records refused the request: a NUL character")
    assert await runtime.store.get(case_id) is None


async def test_a_lone_surrogate_in_a_case_id_is_422_and_writes_nothing(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    """JSON's "\\ud800" decodes to a lone surrogate, which no store can encode as UTF-8
    (the state library refuses such a thread id with InvalidValue): refused as input."""
    body = json.dumps({**demo_case(case_id), "case_id": case_id + "\ud800"})
    assert "\\ud800" in body
    response = await client.post(
        "/api/cases", content=body.encode(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"].startswith("invalid request: body.case_id:"), response.text
    assert await runtime.store.get(case_id) is None


async def test_a_review_note_no_cold_store_can_hold_is_422_and_the_case_still_waits(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str, reviewer: dict[str, str]
) -> None:
    """The run writes the note after the answer: a NUL in it (which Postgres JSON cannot hold)
    is refused up front on every backend, or the case failed with the decision stuck in it."""
    body = {**demo_case(case_id), "transactions": duplicate_charges(612.40)}
    submitted = await client.post("/api/cases", json=body)
    assert submitted.json()["status"] == "awaiting_review", submitted.text
    response = await client.post(
        f"/api/cases/{case_id}/review",
        json={"decision": "approve", "note": "ok \u0000 ok"},
        headers=reviewer,
    )
    assert response.status_code == 422, response.text
    assert "NUL" in response.json()["error"]
    assert (await client.get(f"/api/cases/{case_id}")).json()["status"] == "awaiting_review"
    approved = await client.post(
        f"/api/cases/{case_id}/review", json={"decision": "approve", "note": "ok"}, headers=reviewer
    )
    assert approved.json()["status"] == "completed", approved.text


async def test_a_body_that_cannot_be_decoded_is_422(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    """Not UTF-8, so not JSON: the declared 422 like any malformed JSON, not an undeclared 400."""
    response = await client.post(
        "/api/cases", content=b"F\xff", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"].startswith("invalid request:")
    schema = (await client.get("/api/openapi.json")).json()
    assert "422" in schema["paths"]["/api/cases"]["post"]["responses"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("TRACE", "/api/health", {"GET"}),
        ("DELETE", "/api/cases", {"POST"}),
        ("PUT", "/api/cases/case_1/resume", {"POST"}),
    ],
)
async def test_a_405_names_the_allowed_methods(
    client: httpx.AsyncClient, method: str, path: str, allowed: set[str]
) -> None:
    response = await client.request(method, path)
    assert response.status_code == 405, response.text
    assert allowed <= {m.strip() for m in response.headers["Allow"].split(",")}


async def test_head_on_health_answers_as_get_without_a_body(
    client: httpx.AsyncClient, runtime: Runtime
) -> None:
    """Load balancers and uptime probes ask with HEAD, and without a token."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(runtime)), base_url="http://e2e.test"
    ) as anonymous:
        got = await anonymous.get("/api/health")
        head = await anonymous.head("/api/health")
    assert got.status_code == 200, got.text
    assert head.status_code == 200, head.text
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]
    assert head.headers["content-length"] == got.headers["content-length"]
    # With a token too (the tier report's length varies with its latencies).
    operator_head = await client.head("/api/health")
    assert operator_head.status_code == 200 and operator_head.content == b""
    # HEAD is the same operation as GET: the API's description lists GET only.
    schema = (await client.get("/api/openapi.json")).json()
    assert list(schema["paths"]["/api/health"]) == ["get"]


async def test_head_on_every_get_route_answers_as_get_without_a_body(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    """Not only /api/health: HEAD on another GET route answered 405."""
    assert (await client.post("/api/cases", json=demo_case(case_id))).status_code == 201
    await runtime.service.wait_idle()
    for path in (f"/api/cases/{case_id}", f"/api/cases/{case_id}/runs", "/api/cases/nosuch"):
        got = await client.get(path)
        head = await client.head(path)
        assert head.status_code == got.status_code, (path, head.status_code)
        assert head.content == b"", path
        assert head.headers["content-type"] == got.headers["content-type"], path
        assert head.headers["content-length"] == got.headers["content-length"], path
    # Not the event stream: its HEAD would hold a stream slot while the stream stays open.
    events = await client.head(f"/api/cases/{case_id}/events")
    assert events.status_code == 405 and events.headers["allow"] == "GET, OPTIONS"
    # Still GET only in the API's description.
    schema = (await client.get("/api/openapi.json")).json()
    assert list(schema["paths"]["/api/cases/{case_id}"]) == ["get"]


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/api/health", "GET, HEAD, OPTIONS"),
        ("/api/cases", "OPTIONS, POST"),
        ("/api/cases/case_1", "GET, HEAD, OPTIONS"),
    ],
)
async def test_options_and_405_name_every_allowed_method_head_included(
    client: httpx.AsyncClient, path: str, allowed: str
) -> None:
    """OPTIONS answered 405, and a 405's `Allow` on a GET route left HEAD out."""
    options = await client.options(path)
    assert options.status_code == 204, options.text
    assert options.headers["Allow"] == allowed
    refused = await client.request("TRACE", path)
    assert refused.status_code == 405, refused.text
    assert refused.headers["Allow"] == allowed


@pytest.mark.parametrize(
    ("shape", "because"),
    [
        ("nested too deeply", "nested too deeply"),
        ("a number of 5000 digits", "digits"),
    ],
    ids=["too deep", "too many digits"],
)
async def test_a_body_json_cannot_parse_is_422_saying_why_not_an_undeclared_400(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str, shape: str, because: str
) -> None:
    """Python's JSON parser gives up on these without a JSONDecodeError (RecursionError,
    ValueError): FastAPI answers 400, which the document does not declare, or the 422 said
    the body was not UTF-8."""
    text = json.dumps(demo_case(case_id))
    if shape == "nested too deeply":
        text = text[:-1] + ', "extra": ' + "[" * 100_000 + "]" * 100_000 + "}"
    else:
        text = text.replace("4.5", "9" * 5000)
    response = await client.post(
        "/api/cases", content=text, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error.startswith("invalid request: body: not valid JSON"), error
    assert because in error and "UTF-8" not in error, error
    assert await runtime.store.get(case_id) is None


@pytest.mark.parametrize(
    "event_id",
    [
        "\u0661\u0662",  # Arabic-Indic digits: `\d` to a Unicode regex
        "\uff11-0",  # a fullwidth digit
    ],
)
async def test_an_event_id_of_digits_of_another_script_is_422_not_an_empty_stream(
    client: httpx.AsyncClient, case_id: str, event_id: str
) -> None:
    """Redis takes ASCII digits only: such an id passed the pattern, then the stream ended
    at once (200, no events, a 'redis unavailable' warning) and a client reconnected with it
    forever."""
    assert (await client.post("/api/cases", json=demo_case(case_id))).status_code == 201
    response = await client.get(
        f"/api/cases/{case_id}/events", params={"seconds": 1, "after": event_id}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"].startswith("invalid request:")
    valid = await client.get(f"/api/cases/{case_id}/events", params={"seconds": 0, "after": "0"})
    assert valid.status_code == 200 and "event: run_queued" in valid.text


async def test_a_decision_naming_its_verdict_twice_is_422_and_the_case_still_waits(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str, reviewer: dict[str, str]
) -> None:
    """Python's JSON parser keeps the last of a repeated key: `{"decision": "approve",
    "decision": "reject"}` refused the refund, though nobody can tell which was meant."""
    body = {**demo_case(case_id), "transactions": duplicate_charges(612.40)}
    submitted = await client.post("/api/cases", json=body)
    assert submitted.json()["status"] == "awaiting_review", submitted.text
    before = await runtime.store.get(case_id)
    response = await client.post(
        f"/api/cases/{case_id}/review",
        content=b'{"decision": "approve", "decision": "reject"}',
        headers={**reviewer, "content-type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"] == (
        "invalid request: body: not valid JSON (the key 'decision' appears more than once "
        "in one object)"
    )
    after = await runtime.store.get(case_id)
    assert before is not None and after is not None and after.version == before.version
    approved = await client.post(
        f"/api/cases/{case_id}/review", json={"decision": "approve"}, headers=reviewer
    )
    assert approved.json()["refund"]["status"] == "issued", approved.text


async def test_a_charge_naming_its_amount_twice_is_422_and_writes_nothing(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    """The charge was taken at whichever amount came last (612.40 here, no longer the
    duplicate of a 49.99 charge the client may have meant it to be): stated once, or 422."""
    body = json.dumps({**demo_case(case_id), "transactions": duplicate_charges(49.99)})
    body = body.replace('"amount": 49.99,', '"amount": 49.99, "amount": 612.40,', 1)
    response = await client.post(
        "/api/cases", content=body.encode(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert "the key 'amount' appears more than once" in response.json()["error"]
    assert await runtime.store.get(case_id) is None


@pytest.mark.parametrize(
    "change",
    [
        {"amount": 612.40},
        {"merchant": "Hotel Europa"},
        {"currency": "EUR"},
        {"timestamp": "2024-05-02T10:00:00Z"},
    ],
    ids=["amount", "merchant", "currency", "timestamp"],
)
async def test_one_transaction_id_listed_twice_with_other_details_is_422_naming_it(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str, change: dict[str, Any]
) -> None:
    """The first listing was kept and the other dropped unsaid: txn_1001 at 49.99, then
    at 612.40, was judged (and refunded) as the 49.99 duplicate of txn_1002; listed the
    other way round, it was no duplicate at all."""
    body = demo_case(case_id)
    body["transactions"].append({**body["transactions"][0], **change})
    response = await client.post("/api/cases", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error.startswith("invalid request: body.transactions:"), error
    assert "'txn_1001' is listed more than once with different details" in error
    assert await runtime.store.get(case_id) is None


async def test_one_transaction_listed_twice_alike_is_one_charge(
    client: httpx.AsyncClient, case_id: str
) -> None:
    """A repeat of a transaction as it was (however written) is no ambiguity, and no
    second charge: the case is the demo's, one duplicate refunded."""
    body = demo_case(case_id)
    repeat = {key: value for key, value in body["transactions"][0].items() if key != "currency"}
    body["transactions"].append({**repeat, "timestamp": "2024-05-01T10:00:00+00:00"})
    response = await client.post("/api/cases", json=body)
    assert response.status_code == 201, response.text
    billing = response.json()["billing"]
    assert [charge["transaction_id"] for charge in billing["duplicates"]] == ["txn_1002"]
    assert billing["refund_amount"] == 49.99


async def test_a_follow_up_carrying_transactions_is_422_and_queues_nothing(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> None:
    """A follow-up is text only: the case's transactions are those it was submitted with,
    so one it knows cannot come again with other details."""
    assert (await client.post("/api/cases", json=demo_case(case_id))).status_code == 201
    before = await runtime.store.get(case_id)
    changed = {**demo_case(case_id)["transactions"][0], "amount": 612.40}
    response = await client.post(
        f"/api/cases/{case_id}/messages",
        json={"text": "It was 612.40, not 49.99", "transactions": [changed]},
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"].startswith("invalid request: body.transactions:")
    after = await runtime.store.get(case_id)
    assert before is not None and after is not None and after.version == before.version
    assert len((await client.get(f"/api/cases/{case_id}/runs")).json()["runs"]) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"merchant": "STREAMFLIX"},
        {"merchant": "Stream  Flix"},
        {"amount": 49.990000001},
        {"timestamp": "2024-05-01T12:00:00+02:00"},
    ],
    ids=["merchant-case", "merchant-spacing", "sub-cent-amount", "same-instant"],
)
async def test_one_transaction_listed_twice_as_billing_sees_it_is_one_charge(
    client: httpx.AsyncClient, case_id: str, change: dict[str, Any]
) -> None:
    """Billing matches a merchant whatever its case, an amount to the cent and a timestamp
    as an instant: a repeat that differs only so is judged the same at either listing, so
    it is no ambiguity to refuse (an export listing `STREAMFLIX` was answered 422)."""
    body = demo_case(case_id)
    if change.get("merchant") == "Stream  Flix":
        for charge in body["transactions"][:2]:
            charge["merchant"] = "Stream Flix"
    body["transactions"].append({**body["transactions"][0], **change})
    response = await client.post("/api/cases", json=body)
    assert response.status_code == 201, response.text
    billing = response.json()["billing"]
    assert [charge["transaction_id"] for charge in billing["duplicates"]] == ["txn_1002"]
    assert billing["refund_amount"] == 49.99
