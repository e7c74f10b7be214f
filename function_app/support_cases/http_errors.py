"""Maps use-case and state-library errors to HTTP answers: client mistakes are 4xx, never 500."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Route, get_route_path

from state import (
    BackendUnavailable,
    EntryStuck,
    InvalidValue,
    LockNotAcquired,
    RequestRejected,
    RunsPartlyDeleted,
    RunsStillWriting,
    SaverClosed,
    SettingsError,
    StaleFencingToken,
    StateTooLarge,
    StillWriting,
    ThreadExpiring,
    VersionConflict,
    WorkflowNotFound,
)

from .admission import RunsBusy
from .events import (
    CallerStreamsBusy,
    EventsTrimmed,
    EventsUnavailable,
    InvalidEventId,
    StreamsBusy,
)
from .json_body import DuplicateKey
from .runs import RunIndexBusy, RunIndexDamaged
from .service import CaseBusy, CaseConflict, CaseNotFound, IdempotencyMismatch, ReservedCaseId

log = logging.getLogger(__name__)

STORE_RETRY_AFTER_SECONDS = 1
# A damaged run index shard reads again only once an operator repaired it: asked sooner, the
# answer is the same 503.
DAMAGED_INDEX_RETRY_AFTER_SECONDS = 60

STATUS_BY_ERROR: tuple[tuple[type[Exception], int], ...] = (
    (CaseNotFound, 404),
    (WorkflowNotFound, 404),
    (CaseConflict, 409),
    (VersionConflict, 409),
    (StaleFencingToken, 409),
    (LockNotAcquired, 409),
    # The retention sweep is deleting the case under the request.
    (ThreadExpiring, 410),
    (IdempotencyMismatch, 422),
    (ReservedCaseId, 422),
    (InvalidEventId, 422),
    (EventsTrimmed, 410),
    (StateTooLarge, 413),
    # The caller's value cannot be stored as given (e.g. a NUL character on Postgres).
    (InvalidValue, 422),
    (RunIndexBusy, 503),
    (EventsUnavailable, 503),
)


def error_response(status: int, message: str, detail: Any = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status)


def _unparsable_body(cause: BaseException | None) -> str | None:
    """Why FastAPI could not parse a JSON body, when it answered 400 for it (None: another
    400)."""
    if isinstance(cause, UnicodeDecodeError):
        return "cannot be decoded as UTF-8"
    if isinstance(cause, RecursionError):
        return "nested too deeply"
    if isinstance(cause, DuplicateKey):
        return str(cause)
    if isinstance(cause, ValueError):
        # An integer of more digits than Python converts (sys.get_int_max_str_digits); its
        # message tells a Python programmer how to lift the limit, not the caller.
        if "digits" in str(cause):
            return "a number has too many digits"
        return "cannot be parsed"
    return None


def _described(request: Request, problem: dict[str, Any]) -> dict[str, str]:
    """One validation problem as `where` and `problem`, in the caller's terms where FastAPI's
    own say little: its "JSON decode error" at `body.<offset>`, a body it never parsed (not
    sent as JSON), and a JSON body that is not an object."""
    where = ".".join(str(part) for part in problem.get("loc", ()))
    if problem.get("type") == "json_invalid":
        # The location's second part is the parser's character offset, not a field.
        why = problem.get("ctx", {}).get("error", "cannot be parsed")
        offset = problem["loc"][1] if len(problem.get("loc", ())) > 1 else 0
        return {"where": "body", "problem": f"not valid JSON ({why} at character {offset})"}
    if where == "body" and isinstance(problem.get("input"), bytes):
        # FastAPI parses a body as JSON only under a JSON content type: any other (or none,
        # as `curl -d` sends form encoding) reaches validation as raw bytes.
        sent = request.headers.get("content-type") or "none"
        return {
            "where": "body",
            "problem": f"expected a JSON object with content-type: application/json (got {sent})",
        }
    if where == "body" and problem.get("type") == "model_attributes_type":
        # Pydantic's words ("a valid dictionary or object to extract fields from") name
        # Python types; the caller sent JSON.
        return {"where": "body", "problem": f"expected a JSON object, got {_json_kind(problem)}"}
    if where == "body" and problem.get("type") == "missing":
        return {"where": "body", "problem": "expected a JSON object, got an empty body"}
    return {"where": where, "problem": problem.get("msg", "invalid")}


def _allowed_methods(request: Request, routes: Sequence[BaseRoute]) -> str | None:
    """The methods the routes on the request's path answer to (None: no route there):
    Starlette's own `Allow` names only the first route's (a GET route's, not its HEAD
    twin's)."""
    path = get_route_path(request.scope)
    methods = {
        method
        for route in routes
        if isinstance(route, Route) and route.path_regex.match(path)
        for method in route.methods or ()
    }
    return ", ".join(sorted({"OPTIONS", *methods})) if methods else None


def _json_kind(problem: dict[str, Any]) -> str:
    value = problem.get("input")
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: a bool is one
        return "true or false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "another value"


def install_error_handlers(app: FastAPI, routes: Sequence[BaseRoute] = ()) -> None:
    """`routes`: all of the app's, to name in a 405's `Allow` (else Starlette's)."""
    for error_type, status in STATUS_BY_ERROR:

        async def handle(request: Request, error: Exception, status: int = status) -> JSONResponse:
            return error_response(status, str(error))

        app.add_exception_handler(error_type, handle)

    async def store_fault(request: Request, error: Exception) -> JSONResponse:
        """A store that could not be reached (503), runs being deleted that write on (409),
        or a store that refused for good for a reason that is not the caller's value (500:
        permissions, a broken invariant). The store's own words (host names, roles, SQL)
        stay in the log; the caller learns which tier and an id to quote."""
        assert isinstance(error, BackendUnavailable | RequestRejected)
        incident = uuid.uuid4().hex[:12]
        unavailable = isinstance(error, BackendUnavailable)
        cause = error.cause if isinstance(error, RunsPartlyDeleted) else error
        if isinstance(cause, RunsStillWriting):
            # Not an outage: a rolled-back run (another worker's) writes on. Retried as one.
            status, answer = 409, "a run being deleted is still writing to the case, retry later"
        elif isinstance(cause, StillWriting):
            # Not an outage either: a run writes on to the case being deleted.
            status, answer = 409, "the case is still being written to, retry later"
        elif unavailable:
            status, answer = 503, f"{error.backend} unavailable, retry later"
        else:
            status, answer = 500, f"{error.backend} refused the request"
        log.warning(
            "%s %s answered %d (incident %s): %s",
            request.method,
            request.url.path,
            status,
            incident,
            error,
        )
        response = error_response(status, f"{answer} (incident {incident})")
        if unavailable:
            # A store that answered nothing lately is tried again after about this long
            # (`AnswerCircuit`, `ServerCircuit`); a client need not wait longer to ask.
            response.headers["Retry-After"] = str(STORE_RETRY_AFTER_SECONDS)
        return response

    async def stuck(request: Request, error: Exception) -> JSONResponse:
        """A case's write-behind backlog held back by an entry the cold store refuses for
        good (a read flushes the backlog first): the operator's to resolve (`agent-state
        write-behind`), not the caller's mistake, nor a crash. Not retried by itself soon:
        no Retry-After. The store's words stay in the log."""
        assert isinstance(error, EntryStuck)
        incident = uuid.uuid4().hex[:12]
        log.error(
            "%s %s answered 503 (incident %s): %s",
            request.method,
            request.url.path,
            incident,
            error,
        )
        return error_response(
            503,
            f"the case's saved state cannot reach durable storage; an operator must act"
            f" (incident {incident})",
        )

    async def closing(request: Request, error: Exception) -> JSONResponse:
        """The worker's saver closed under the request (the process shutting down): another
        worker answers it, so the caller retries, as after a store outage."""
        log.warning("%s %s answered 503: %s", request.method, request.url.path, error)
        response = error_response(503, "this worker is shutting down, retry later")
        response.headers["Retry-After"] = str(STORE_RETRY_AFTER_SECONDS)
        return response

    app.add_exception_handler(BackendUnavailable, store_fault)
    app.add_exception_handler(SaverClosed, closing)
    app.add_exception_handler(EntryStuck, stuck)
    # InvalidValue, a RequestRejected for the caller's value, keeps its 422 above.
    app.add_exception_handler(RequestRejected, store_fault)

    async def invalid_request(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        problems = [_described(request, problem) for problem in error.errors()]
        summary = "; ".join(f"{p['where']}: {p['problem']}" for p in problems)
        return error_response(422, f"invalid request: {summary}", problems)

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        if error.status_code == 400 and (why := _unparsable_body(error.__cause__)):
            # FastAPI's answer to a body its JSON parser gave up on without a JSONDecodeError
            # (not UTF-8, nested too deep, a number too long): the same 422 as malformed
            # JSON, which the OpenAPI document declares, saying which it was.
            return error_response(
                422,
                f"invalid request: body: not valid JSON ({why})",
                [{"where": "body", "problem": "not valid JSON"}],
            )
        allow = _allowed_methods(request, routes) if error.status_code == 405 else None
        if allow and request.method == "OPTIONS":
            # What the path allows, as RFC 9110 describes OPTIONS, rather than a 405.
            return Response(status_code=204, headers={"Allow": allow})
        response = error_response(error.status_code, str(error.detail))
        response.headers.update(error.headers or {})
        if allow:
            # RFC 9110 requires it on a 405; Starlette's names one route's methods only.
            response.headers["Allow"] = allow
        return response

    async def busy(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, CaseBusy)
        ends = error.lease_ends_at.isoformat() if error.lease_ends_at else None
        detail = {"stalled": error.stalled, "lease_ends_at": ends}
        response = error_response(409, str(error), detail)
        response.headers["Retry-After"] = str(error.retry_after)
        return response

    async def worker_busy(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StreamsBusy | RunsBusy)
        response = error_response(503, str(error))
        response.headers["Retry-After"] = str(error.retry_after)
        return response

    async def caller_streams_busy(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, CallerStreamsBusy)
        response = error_response(429, str(error))
        response.headers["Retry-After"] = str(error.retry_after)
        return response

    async def index_damaged(request: Request, error: Exception) -> JSONResponse:
        """The case's run index shard is unreadable (`RunIndexDamaged`): the operator's to
        repair, not the caller's mistake nor a crash; nothing was written for the request."""
        assert isinstance(error, RunIndexDamaged)
        log.error(
            "%s %s answered 503: run index shard %s is damaged: %s",
            request.method,
            request.url.path,
            error.shard,
            error.__cause__,
        )
        response = error_response(503, str(error))
        response.headers["Retry-After"] = str(DAMAGED_INDEX_RETRY_AFTER_SECONDS)
        return response

    async def misconfigured(request: Request, error: Exception) -> JSONResponse:
        """The environment's settings are wrong: the operator's to fix, not the caller's,
        and not a crash (500). It names the variable, never its value."""
        log.error("%s %s answered 503: settings: %s", request.method, request.url.path, error)
        # `status` too: on /health this 503 is then the HealthView its document declares.
        body = {"error": f"the API is not configured correctly: {error}", "status": "down"}
        return JSONResponse(body, status_code=503)

    app.add_exception_handler(SettingsError, misconfigured)
    app.add_exception_handler(CaseBusy, busy)
    app.add_exception_handler(StreamsBusy, worker_busy)
    app.add_exception_handler(RunsBusy, worker_busy)
    app.add_exception_handler(CallerStreamsBusy, caller_streams_busy)
    app.add_exception_handler(RunIndexDamaged, index_damaged)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
