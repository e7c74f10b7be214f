"""The HTTP API under /api (FastAPI): the same app runs in Azure Functions and under uvicorn."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute

from state import HEALTH_PROBE_SECONDS, BackendUnavailable, RequestRejected, VersionConflict
from state.errors import NoAnswer, SettingsError

from .auth import (
    ALL_ROLES,
    ANONYMOUS,
    ROLE_OPERATE,
    ROLE_REVIEW,
    ROLE_SUBMIT,
    AuthGate,
    AuthNotConfigured,
    Forbidden,
    Principal,
    RequireToken,
    install_auth_errors,
    optional_principal,
    principal,
    role,
    token_refusal,
)
from .body_limit import BodySizeLimit
from .cors import BrowserOrigins
from .deadline import RequestDeadline
from .encoded_slash import KeepEncodedSlashes
from .events import sse_frame
from .http_errors import install_error_handlers
from .json_body import UniqueKeysRoute
from .models import (
    AUDIT_PAGE_MAX,
    CASE_ID_PATTERN,
    CHECKPOINT_ID_PATTERN,
    HISTORY_PAGE_MAX,
    IDEMPOTENCY_KEY_MAX_LENGTH,
    AuditTrailView,
    CaseLinks,
    CaseStatus,
    CaseSubmission,
    CaseView,
    CheckpointPageView,
    ErrorBody,
    FollowUp,
    HealthView,
    MessageAccepted,
    ReviewDecision,
    RunsView,
    TierView,
)
from .runtime import Runtime, RuntimeHolder, process_runtime
from .service import (
    CaseConflict,
    CaseNotFound,
    CaseService,
    DecisionTakenBack,
    Outcome,
    RunUnfinished,
)
from .settings import AppSettings

log = logging.getLogger(__name__)

API_PREFIX = "/api"
# Answered without a token: up/down for the availability test, and the API's description.
# The body limit while the settings cannot be read (every route then answers 503).
DEFAULT_BODY_LIMIT: int = AppSettings.model_fields["case_max_body_bytes"].default
# Health has its own bound (a probe's) and its own 503 body: no request deadline.
HEALTH_PATHS = frozenset({f"{API_PREFIX}/health"})
PUBLIC_PATHS = frozenset(
    {f"{API_PREFIX}/health", f"{API_PREFIX}/openapi.json", f"{API_PREFIX}/docs"}
)

CaseId = Annotated[str, Path(pattern=CASE_ID_PATTERN, description="the case (thread) id")]
IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=IDEMPOTENCY_KEY_MAX_LENGTH)
]
ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody} for status in (401, 403, 404, 409, 410, 413, 422, 500, 503)
}
ERRORS[503]["headers"] = {
    "Retry-After": {
        "description": "Seconds to wait before retrying, when a store could not be reached, "
        "the case's run index awaits an operator's repair, the worker drives as many case "
        "runs as it may (CASE_MAX_RUNS), (event streams) it serves as many streams as it "
        "may, or the request had no answer within API_REQUEST_DEADLINE_SECONDS",
        "schema": {"type": "integer", "minimum": 1},
    }
}
ERRORS[409]["headers"] = {
    "Retry-After": {
        "description": "Seconds until the lease of the case's current (or dead) runner ends, "
        "when another runner holds the case; seconds to wait before retrying, when runs a "
        "rollback deletes are still writing to it",
        "schema": {"type": "integer", "minimum": 1},
    }
}


# An event's id (`<ms>-<seq>`, or `<ms>` for `<ms>-0`); a client resumes after the last one
# it got (`0`: from the oldest kept). At most 19 digits a part: always below 2**64.
# ASCII digits only: `\d` would also admit other scripts' digits (pydantic's regex is
# Unicode-aware), which Redis refuses, so a stream would end at once instead of a 422.
EVENT_ID_PATTERN = r"^[0-9]{1,19}(-[0-9]{1,19})?$"
# One Server-Sent Event as a client parses it: `data` is the event's JSON, `event` its type.
SSE_EVENT_SCHEMA: dict[str, object] = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": EVENT_ID_PATTERN},
        "event": {"type": "string"},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
    "required": ["id", "event", "data"],
}


def case_links(case_id: str) -> CaseLinks:
    base = f"{API_PREFIX}/cases/{case_id}"
    return CaseLinks(
        self=base,
        checkpoints=f"{base}/checkpoints",
        audit=f"{base}/audit",
        review=f"{base}/review",
        resume=f"{base}/resume",
        messages=f"{base}/messages",
        events=f"{base}/events",
        runs=f"{base}/runs",
    )


def _answer(outcome: Outcome, response: Response, *, new_status: int = 200) -> CaseView:
    """`new_status` when the run came to rest in time, 202 while it still runs, 200 on a replay."""
    links = case_links(outcome.view.case_id)
    response.headers["Location"] = links.self
    if new_status == 201 and not outcome.created:
        response.headers["Idempotent-Replayed"] = "true"
        response.status_code = 200
    elif not outcome.finished:
        response.status_code = 202
    else:
        response.status_code = new_status
    return outcome.view.model_copy(update={"links": links})


async def case_service(request: Request) -> CaseService:
    source: Callable[[], Awaitable[Runtime]] = request.app.state.runtime_source
    return (await source()).service


Cases = Annotated[CaseService, Depends(case_service)]
Caller = Annotated[Principal, Depends(principal)]
Submitter = Annotated[Principal, Depends(role(ROLE_SUBMIT))]
Reviewer = Annotated[Principal, Depends(role(ROLE_REVIEW))]
Operator = Annotated[Principal, Depends(role(ROLE_OPERATE))]


def may_read(caller: Principal, view: CaseView) -> bool:
    """Operators read every case, submitters their own, reviewers those awaiting review."""
    if reads_for_good(caller, view):
        return True
    return caller.has(ROLE_REVIEW) and view.status is CaseStatus.AWAITING_REVIEW


def reads_for_good(caller: Principal, view: CaseView) -> bool:
    """Whether the caller's right to read the case outlasts any change of its state."""
    if caller.has(ROLE_OPERATE):
        return True
    return bool(caller.has(ROLE_SUBMIT) and view.submitted_by and view.submitted_by.id == caller.id)


def may_see_decision(caller: Principal, view: CaseView) -> bool:
    """Whether a refused decision may say why: to a caller who may read the case, or to
    its reviewer of record (a second decision)."""
    decided_by = (view.review or {}).get("reviewer_id")
    return may_read(caller, view) or decided_by == caller.id


router = APIRouter(prefix=API_PREFIX, responses=ERRORS, route_class=UniqueKeysRoute)


@router.post(
    "/cases",
    status_code=201,
    summary="Submit a support case",
    responses={200: {"model": CaseView}, 202: {"model": CaseView}},
)
async def submit_case(
    submission: CaseSubmission,
    response: Response,
    caller: Submitter,
    cases: Cases,
    idempotency_key: IdempotencyKey = None,
) -> CaseView:
    """201 for a new case; the same body again (same `case_id`, or same `Idempotency-Key`
    without one) answers 200 with that case. Another body under an existing `case_id` is
    409; under a used `Idempotency-Key`, 422."""
    outcome = await cases.submit(submission, idempotency_key, caller.caller)
    return _answer(outcome, response, new_status=201)


@router.get("/cases/{case_id}", summary="Case status and result")
async def case_status(case_id: CaseId, caller: Caller, cases: Cases) -> CaseView:
    view = await readable_case(case_id, caller, cases)
    return view.model_copy(update={"links": case_links(case_id)})


@router.get("/cases/{case_id}/checkpoints", summary="Checkpoint history, newest first")
async def case_checkpoints(
    case_id: CaseId,
    caller: Operator,
    cases: Cases,
    limit: Annotated[int, Query(ge=1, le=HISTORY_PAGE_MAX)] = 20,
    # A checkpoint id (LangGraph's are UUIDs): anything else would page from the newest.
    before: Annotated[str | None, Query(pattern=CHECKPOINT_ID_PATTERN)] = None,
) -> CheckpointPageView:
    return await cases.history(case_id, limit=limit, before=before)


@router.get("/cases/{case_id}/audit", summary="Audit trail of section writes, newest first")
async def case_audit(
    case_id: CaseId,
    caller: Operator,
    cases: Cases,
    limit: Annotated[int, Query(ge=1, le=AUDIT_PAGE_MAX)] = 100,
) -> AuditTrailView:
    return await cases.audit(case_id, limit=limit)


@router.post(
    "/cases/{case_id}/review",
    summary="Approve or reject an escalated refund; resumes the case",
    responses={202: {"model": CaseView}},
)
async def review_case(
    case_id: CaseId, decision: ReviewDecision, response: Response, caller: Reviewer, cases: Cases
) -> CaseView:
    if decision.reviewer_id is not None and decision.reviewer_id not in (caller.id, caller.name):
        raise Forbidden(
            f"reviewer_id {decision.reviewer_id!r} is not the caller: a decision is recorded "
            f"under the token's principal ({caller.name}, {caller.id}); leave reviewer_id out"
        )
    submitted_by = await cases.submitter(case_id)
    if submitted_by is not None and submitted_by.id == caller.id and caller.id != ANONYMOUS.id:
        # Four eyes: the refund a case was escalated for is not approved by who asked for it.
        raise Forbidden(
            "a review decision is made by someone other than the case's submitter "
            f"({caller.name}, {caller.id} submitted it)"
        )
    try:
        outcome = await cases.decide(case_id, decision, caller.caller)
    except (DecisionTakenBack, RunUnfinished):
        raise  # the decision was taken: its reviewer saw the case awaiting review
    except (CaseConflict, VersionConflict):
        # Reviewers see only cases awaiting review: a refused decision (not awaiting
        # review, being worked on, stopped by a follow-up) must not tell them that another
        # case exists, or its state, unless they decided it themselves.
        if not may_see_decision(caller, await cases.status(case_id)):
            raise CaseNotFound(case_id) from None
        raise
    return _answer(outcome, response)


@router.post(
    "/cases/{case_id}/resume",
    summary="Resume a stalled or failed run from its last checkpoint",
    responses={202: {"model": CaseView}},
)
async def resume_case(
    case_id: CaseId, response: Response, caller: Operator, cases: Cases
) -> CaseView:
    return _answer(await cases.resume(case_id, caller=caller.caller), response)


async def readable_case(case_id: str, caller: Principal, cases: CaseService) -> CaseView:
    """The case if the caller may read it; 404 otherwise (never say whose it is)."""
    if not caller.roles & ALL_ROLES:
        raise Forbidden(
            f"reading a case needs one of the app roles {', '.join(sorted(ALL_ROLES))};"
            f" the caller has {caller.held}"
        )
    view = await cases.status(case_id)
    if not may_read(caller, view):
        raise CaseNotFound(case_id)
    return view


@router.post(
    "/cases/{case_id}/messages",
    status_code=202,
    summary="Send a follow-up message to a case; its run is queued, or handled per strategy",
    responses={200: {"model": MessageAccepted}},
)
async def post_message(
    case_id: CaseId,
    message: FollowUp,
    response: Response,
    caller: Submitter,
    cases: Cases,
    idempotency_key: IdempotencyKey = None,
) -> MessageAccepted:
    """The case's submitter writes again (an operator may too, holding Cases.Submit as
    well). 202 while the message's
    run is queued or running, 200 once it rested in time (or on a replay of the same
    Idempotency-Key); 409 with `reject` while a run is in progress."""
    owner = await cases.submitter(case_id)
    if not caller.has(ROLE_OPERATE) and (owner is None or owner.id != caller.id):
        raise CaseNotFound(case_id)
    outcome = await cases.post_message(case_id, message, idempotency_key, caller.caller)
    links = case_links(case_id)
    response.headers["Location"] = links.runs
    if outcome.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    response.status_code = 200 if outcome.replayed or outcome.finished else 202
    return MessageAccepted(case_id=case_id, run=outcome.run, links=links)


@router.get(
    "/cases/{case_id}/runs", summary="The case's runs, oldest first, with status and timing"
)
async def case_runs(case_id: CaseId, caller: Caller, cases: Cases) -> RunsView:
    await readable_case(case_id, caller, cases)
    return await cases.runs(case_id)


@router.get(
    "/cases/{case_id}/events",
    summary="The case's progress as Server-Sent Events (resumable with Last-Event-ID)",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "`text/event-stream`: one frame per event (`id`, `event`, "
            "`data` as JSON), a `: keep-alive` comment while quiet; ends after `seconds`",
            "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
        },
        410: {
            "model": ErrorBody,
            "description": "Events after the Last-Event-ID are no longer kept (the case's "
            "log keeps its newest): read the case, then its events from 0",
        },
        429: {
            "model": ErrorBody,
            "description": "The caller holds as many of the worker's event streams as one "
            "caller may (CASE_MAX_EVENT_STREAMS_PER_CALLER)",
            "headers": {
                "Retry-After": {
                    "description": "Seconds to wait before retrying (or close a stream)",
                    "schema": {"type": "integer", "minimum": 1},
                }
            },
        },
    },
)
async def case_events(
    case_id: CaseId,
    caller: Caller,
    cases: Cases,
    seconds: Annotated[
        float,
        # NaN passes no bound: without this it was told "should be less than or equal to 200".
        Query(ge=0, le=200, allow_inf_nan=False, description="How long the stream stays open"),
    ] = 60.0,
    # Not nullable in the document (a client sends no header rather than "null"): absent is "".
    last_event_id: Annotated[
        str,
        Header(alias="Last-Event-ID", pattern=EVENT_ID_PATTERN, description="Resume after"),
    ] = "",
    after: Annotated[
        str,
        Query(pattern=EVENT_ID_PATTERN, description="Resume after (as Last-Event-ID)"),
    ] = "",
) -> StreamingResponse:
    view = await readable_case(case_id, caller, cases)
    start = last_event_id or after or None
    cases.events.check(start)  # 503 without an event log, 422 for an id of another form
    # 429 while the caller holds as many streams as one caller may; 503 while this worker
    # serves as many as it may, or with the log out of reach; 422 for an id past the case's
    # newest event, 410 for one whose successors were dropped.
    stream = await cases.events.opened(case_id, start, seconds=seconds, caller=caller.id)
    # A reviewer reads the case only while it awaits review: checked again before each
    # event, or the stream would go on serving what is written after the decision.
    while_awaiting_review = not reads_for_good(caller, view)

    async def frames() -> AsyncIterator[str]:
        async for event in stream:
            if event is not None and while_awaiting_review:
                try:
                    still = await cases.awaiting_review(case_id)
                except (CaseNotFound, BackendUnavailable):
                    still = False  # the client reconnects, and is checked again
                if not still:
                    return
            yield sse_frame(event)

    return StreamingResponse(
        frames(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/health",
    summary="Up or down for anyone; each tier's health for Cases.Operate",
    responses={503: {"model": HealthView}},
    # The token is optional here: `{}` is "no credentials" in an OpenAPI security list.
    openapi_extra={"security": [{}]},
)
async def health(
    request: Request,
    response: Response,
    caller: Annotated[Principal | None, Depends(optional_principal)],
) -> HealthView:
    try:
        cases = await _opened_within_probe(request)
    except (BackendUnavailable, RequestRejected) as down:
        # The process opens its tiers on first use: a cold tier down since the start is
        # this report (which tier, for Cases.Operate), like one that went down later. So
        # is one that refuses the open for good (a container that does not exist, no
        # permission): a tier's probe reports that down too, not as a 500.
        log.warning("health: the tiers could not be opened: %s", down)
        tier = TierView(name=down.backend, up=False, detail=f"{type(down).__name__}: {down}")
        report = HealthView(status="down", tiers=[tier])
    else:
        report = await cases.health()
    if report.status == "down":
        response.status_code = 503
    if caller is None or not caller.has(ROLE_OPERATE):
        return HealthView(status=report.status)
    return report


async def _opened_within_probe(request: Request) -> CaseService:
    """The case service, waiting at most a health probe's bound for the process to open its
    tiers: a cold tier that does not answer (a partition) would hold the report for the
    pool's or the SDK's timeouts. The open goes on for the requests after it, and the
    probes after it wait on it: one each would queue behind it, a full open each."""
    opening: asyncio.Future[CaseService] | None = request.app.state.health_opening
    if opening is None or opening.done():
        opening = asyncio.ensure_future(case_service(request))
        opening.add_done_callback(_retrieved)
        request.app.state.health_opening = opening
    try:
        async with asyncio.timeout(HEALTH_PROBE_SECONDS):
            return await asyncio.shield(opening)
    except TimeoutError as slow:
        settings: Callable[[], AppSettings] = request.app.state.settings_source
        backend = settings().state_cold_backend.value
        raise NoAnswer(backend, f"no answer within {HEALTH_PROBE_SECONDS:g} s") from slow


def _retrieved(opening: asyncio.Future[CaseService]) -> None:
    # An open that fails after the report was sent: the next request opens again.
    if not opening.cancelled():
        opening.exception()


def add_head_twins(api: APIRouter) -> None:
    """Load balancers, uptime probes and link checkers ask with HEAD: FastAPI, unlike
    Starlette, answers HEAD on a GET route 405. Each GET route gets a HEAD twin: the same
    operation, whose body the server drops; not a second operation in the API's description.
    Not an event stream: its HEAD would hold one of the worker's stream slots for as long as
    the stream stays open, for nothing."""
    for route in list(api.routes):
        streams = route.response_class is StreamingResponse if isinstance(route, APIRoute) else True
        if isinstance(route, APIRoute) and "GET" in (route.methods or ()) and not streams:
            api.add_api_route(
                route.path_format.removeprefix(api.prefix),
                route.endpoint,
                methods=["HEAD"],
                response_model=route.response_model,
                status_code=route.status_code,
                response_class=route.response_class,
                name=route.name,
                include_in_schema=False,
            )


add_head_twins(router)


def create_app(runtime: Runtime | None = None, holder: RuntimeHolder = process_runtime) -> FastAPI:
    """The ASGI app; `runtime` given (tests) or opened once per process from the environment."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Opened lazily by the first request (a tier down at startup must not
        # stop the worker from indexing or answering /health); closed here.
        try:
            # Announces AUTH_DISABLED on every start; a configuration problem is logged
            # here and answered (503, named) on every request that needs a caller.
            gate.get()
        except AuthNotConfigured as problem:
            log.error("the API cannot authenticate callers: %s", problem)
        try:
            yield
        finally:
            # A health probe's open outlives its request, so the server's shutdown does not
            # wait for it: ended here, or it would open the tiers after their close.
            opening: asyncio.Future[CaseService] | None = app.state.health_opening
            if opening is not None:
                opening.cancel()
                await asyncio.wait({opening})
            if runtime is None:
                await holder.close()

    async def runtime_source() -> Runtime:
        return runtime or await holder.get()

    def settings_source() -> AppSettings:
        return runtime.settings if runtime else holder.settings()

    gate = AuthGate(settings_source)

    app = FastAPI(
        title="Support cases",
        version="1.0.0",
        description="Support-case workflows (LangGraph agents) over tiered state.",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        # Only an OAuth2 flow in the docs UI needs its redirect page; the API's bearer
        # scheme does not, and the page (outside /api) answered any token.
        swagger_ui_oauth2_redirect_url=None,
        redoc_url=None,
        lifespan=lifespan,
        # No redirect of a trailing slash: that answer comes before any token is checked,
        # so a bad token would learn which routes exist; such a path is a 404 instead.
        redirect_slashes=False,
    )
    app.state.runtime_source = runtime_source
    app.state.settings_source = settings_source
    app.state.health_opening = None
    app.state.auth_gate = gate
    app.include_router(router)
    # Every route, so a 405 or an OPTIONS names a GET route's HEAD twin as well.
    install_error_handlers(app, routes=[*app.routes, *router.routes])
    install_auth_errors(app)
    settings = runtime.settings if runtime else None

    def body_limit() -> int:
        try:
            return (settings or holder.settings()).case_max_body_bytes
        except SettingsError:
            # The route answers 503 naming the problem; a crash here would be a bare 500.
            return DEFAULT_BODY_LIMIT

    def deadline() -> float | None:
        try:
            return (settings or holder.settings()).api_request_deadline_seconds
        except SettingsError:
            return None  # the route answers 503 naming the problem at once

    app.add_middleware(BodySizeLimit, max_bytes=body_limit, refused_first=token_refusal)
    # Before the body limit: no token, no reading of the body.
    app.add_middleware(RequireToken, gate=gate, public=PUBLIC_PATHS)
    # Before the body is read: a client trickling its body held a worker past the deadline.
    app.add_middleware(RequestDeadline, seconds=deadline, exempt=HEALTH_PATHS)
    # Before the token check and the deadline: they see the path the router will.
    app.add_middleware(KeepEncodedSlashes)
    # Added last, so it runs first: a browser's preflight carries no token.
    app.add_middleware(BrowserOrigins, settings=settings_source)
    return app
