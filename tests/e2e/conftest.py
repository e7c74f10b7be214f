"""End-to-end fixtures: the real app (graph, store, saver) over HTTP on the real local stack.

One Runtime per cold backend for the whole session (opening Cosmos/Postgres
clients is the slow part); every test uses its own case ids, so tests never
see each other's state.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import httpx
import pytest

from support_cases.api import create_app
from support_cases.runtime import Runtime
from support_cases.settings import AppSettings

COLD_BACKENDS = ["cosmos", "postgres"]

# Far above any test's own runs; a teardown past it is stuck, not slow.
TEARDOWN_SECONDS = 60.0


def redis_database(url: str, database: int) -> str:
    return f"{url.rsplit('/', 1)[0]}/{database}"


@pytest.fixture(scope="session")
def e2e_settings(stack_env: dict[str, str]) -> Callable[..., AppSettings]:
    """Settings for one cold backend against the test stack (Redis in front); overrides by name."""

    def build(backend: str, **overrides: object) -> AppSettings:
        values: dict[str, object] = {
            "state_cold_backend": backend,
            "cosmos_endpoint": stack_env["COSMOS_ENDPOINT"],
            "cosmos_key": stack_env["COSMOS_KEY"],
            "cosmos_create_if_missing": True,
            "postgres_url": stack_env["POSTGRES_URL"],
            # One Redis database per cold backend: both runtimes share the session's
            # Redis, and a hot copy must never stand for a record of the other backend.
            "redis_url": redis_database(stack_env["REDIS_URL"], COLD_BACKENDS.index(backend)),
            # Tokens from the stack's own issuer, validated as the app validates Entra's.
            "auth_issuer": stack_env["AUTH_ISSUER"],
            "auth_jwks_url": stack_env["AUTH_JWKS_URL"],
            "auth_audience": stack_env["AUTH_AUDIENCE"],
        }
        values.update(overrides)
        return AppSettings.model_validate(values)

    return build


@pytest.fixture(scope="session", params=COLD_BACKENDS)
async def runtime(
    request: pytest.FixtureRequest, e2e_settings: Callable[..., AppSettings]
) -> AsyncIterator[Runtime]:
    opened = await Runtime.open(e2e_settings(str(request.param)))
    try:
        yield opened
    finally:
        try:
            await within_teardown(opened.service.wait_idle(), "the runs left going")
        finally:
            await within_teardown(opened.close(), "closing the runtime")


async def within_teardown(step: Awaitable[None], what: str) -> None:
    """Await `step`; past TEARDOWN_SECONDS, print where every task waits and fail (a
    session fixture stuck in teardown otherwise ends as a bare timeout of the next test,
    with no stack of the task that hangs)."""
    task = asyncio.ensure_future(step)
    # asyncio.wait does not cancel what it waits for: the stacks are read live.
    await asyncio.wait({task}, timeout=TEARDOWN_SECONDS)
    if not task.done():
        for pending in asyncio.all_tasks():
            if pending is not asyncio.current_task():
                print(f"--- {pending.get_name()}", file=sys.stderr)
                for place in awaiting(pending.get_coro()):
                    print(f"    {place}", file=sys.stderr)
        task.cancel()
        pytest.fail(f"teardown stuck on {what} for {TEARDOWN_SECONDS:.0f} s (stacks above)")
    task.result()


def awaiting(awaitable: object) -> Iterator[str]:
    """Where a suspended coroutine waits, outermost first, down its chain of awaits
    (`Task.print_stack` shows only the outermost frame of a suspended task)."""
    while awaitable is not None:
        frame = next(
            (
                getattr(awaitable, name)
                for name in ("cr_frame", "ag_frame", "gi_frame")
                if getattr(awaitable, name, None) is not None
            ),
            None,
        )
        if frame is not None:
            yield f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}"
        awaitable = next(
            (
                getattr(awaitable, name)
                for name in ("cr_await", "ag_await", "gi_yieldfrom")
                if getattr(awaitable, name, None) is not None
            ),
            None,
        )


@pytest.fixture
async def client(
    runtime: Runtime, bearer: Callable[..., dict[str, str]]
) -> AsyncIterator[httpx.AsyncClient]:
    """The API in-process, called by one caller holding every role ("e2e-client")."""
    transport = httpx.ASGITransport(app=create_app(runtime))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://e2e.test", headers=bearer("e2e-client")
    ) as http:
        yield http


@pytest.fixture
def reviewer(bearer: Callable[..., dict[str, str]]) -> dict[str, str]:
    """Headers of a second caller holding every role: a review decision never comes from
    the case's submitter ("e2e-client")."""
    return bearer("e2e-reviewer")


@pytest.fixture
def case_id() -> str:
    return f"case-e2e-{uuid.uuid4().hex[:16]}"
