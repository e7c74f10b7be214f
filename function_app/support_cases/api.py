"""The HTTP API under /api (FastAPI): the same app runs in Azure Functions and under uvicorn."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response

from .body_limit import BodySizeLimit
from .http_errors import install_error_handlers
from .models import (
    CASE_ID_PATTERN,
    AuditTrailView,
    CaseLinks,
    CaseSubmission,
    CaseView,
    CheckpointPageView,
    ErrorBody,
    HealthView,
    ReviewDecision,
)
from .runtime import Runtime, RuntimeHolder, process_runtime
from .service import CaseService, Outcome

API_PREFIX = "/api"

CaseId = Annotated[str, Path(pattern=CASE_ID_PATTERN, description="the case (thread) id")]
ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody} for status in (404, 409, 413, 422, 503)
}
ERRORS[409]["headers"] = {
    "Retry-After": {
        "description": "Seconds until the lease of the case's current (or dead) runner ends; "
        "only when another runner holds the case",
        "schema": {"type": "integer", "minimum": 1},
    }
}


def case_links(case_id: str) -> CaseLinks:
    base = f"{API_PREFIX}/cases/{case_id}"
    return CaseLinks(
        self=base,
        checkpoints=f"{base}/checkpoints",
        audit=f"{base}/audit",
        review=f"{base}/review",
        resume=f"{base}/resume",
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


router = APIRouter(prefix=API_PREFIX, responses=ERRORS)


@router.post(
    "/cases",
    status_code=201,
    summary="Submit a support case",
    responses={200: {"model": CaseView}, 202: {"model": CaseView}},
)
async def submit_case(
    submission: CaseSubmission,
    response: Response,
    cases: Cases,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200)
    ] = None,
) -> CaseView:
    outcome = await cases.submit(submission, idempotency_key)
    return _answer(outcome, response, new_status=201)


@router.get("/cases/{case_id}", summary="Case status and result")
async def case_status(case_id: CaseId, cases: Cases) -> CaseView:
    view = await cases.status(case_id)
    return view.model_copy(update={"links": case_links(case_id)})


@router.get("/cases/{case_id}/checkpoints", summary="Checkpoint history, newest first")
async def case_checkpoints(
    case_id: CaseId,
    cases: Cases,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    before: Annotated[str | None, Query(max_length=100)] = None,
) -> CheckpointPageView:
    return await cases.history(case_id, limit=limit, before=before)


@router.get("/cases/{case_id}/audit", summary="Audit trail of section writes, newest first")
async def case_audit(
    case_id: CaseId,
    cases: Cases,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> AuditTrailView:
    return await cases.audit(case_id, limit=limit)


@router.post(
    "/cases/{case_id}/review",
    summary="Approve or reject an escalated refund; resumes the case",
    responses={202: {"model": CaseView}},
)
async def review_case(
    case_id: CaseId, decision: ReviewDecision, response: Response, cases: Cases
) -> CaseView:
    return _answer(await cases.decide(case_id, decision), response)


@router.post(
    "/cases/{case_id}/resume",
    summary="Resume a stalled or failed run from its last checkpoint",
    responses={202: {"model": CaseView}},
)
async def resume_case(case_id: CaseId, response: Response, cases: Cases) -> CaseView:
    return _answer(await cases.resume(case_id), response)


@router.get("/health", summary="Each tier's health", responses={503: {"model": HealthView}})
async def health(response: Response, cases: Cases) -> HealthView:
    report = await cases.health()
    if report.status == "down":
        response.status_code = 503
    return report


def create_app(runtime: Runtime | None = None, holder: RuntimeHolder = process_runtime) -> FastAPI:
    """The ASGI app; `runtime` given (tests) or opened once per process from the environment."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Opened lazily by the first request (a tier down at startup must not
        # stop the worker from indexing or answering /health); closed here.
        try:
            yield
        finally:
            if runtime is None:
                await holder.close()

    async def runtime_source() -> Runtime:
        return runtime or await holder.get()

    app = FastAPI(
        title="Support cases",
        version="1.0.0",
        description="Support-case workflows (LangGraph agents) over tiered state.",
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url=f"{API_PREFIX}/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.runtime_source = runtime_source
    app.include_router(router)
    install_error_handlers(app)
    settings = runtime.settings if runtime else None
    app.add_middleware(
        BodySizeLimit,
        max_bytes=lambda: (settings or holder.settings()).case_max_body_bytes,
    )
    return app
