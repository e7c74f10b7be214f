"""The event stream as the Functions worker serves it: through `func.AsgiFunctionApp`.

In Azure every request reaches FastAPI through the SDK's ASGI middleware (the one
`function_app.py` registers); uvicorn and httpx's ASGI transport, which the other
stream tests use, are not on that path. A client of a Server-Sent Events stream must
see an event that is already there without waiting for the stream to end.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import azure.functions as func
import httpx
import pytest

from support_cases.api import create_app
from support_cases.demo import demo_case
from support_cases.runtime import Runtime
from support_cases.settings import AppSettings

STREAM_SECONDS = 4.0


@pytest.mark.xfail(
    strict=True,
    reason="func.AsgiFunctionApp buffers the whole response body (azure-functions "
    "_http_asgi.AsgiResponse): SSE reaches the client only when the stream ends",
)
async def test_a_worker_stream_delivers_a_stored_event_before_the_stream_ends(
    e2e_settings: Callable[..., AppSettings],
    bearer: Callable[..., dict[str, str]],
    case_id: str,
) -> None:
    runtime = await Runtime.open(e2e_settings("postgres"))
    try:
        app = create_app(runtime)
        headers = bearer("streamer")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://worker.test", headers=headers
        ) as client:
            assert (await client.post("/api/cases", json=demo_case(case_id))).status_code == 201
        # The same wrapper `func.AsgiFunctionApp(app=...)` puts in front of the app.
        worker = func.AsgiMiddleware(app)
        request = func.HttpRequest(
            "GET",
            # The worker hands the query over in the URL (the middleware reads it there).
            f"http://worker.test/api/cases/{case_id}/events?seconds={STREAM_SECONDS}",
            headers=headers,
            body=b"",
        )
        started = time.monotonic()
        response = await worker.handle_async(request, None)
        waited = time.monotonic() - started
        assert response.status_code == 200, response.get_body()
        assert b"run_completed" in response.get_body()
        # The case's events are stored before the request: the first frame is due at once,
        # not after the whole `seconds` the stream stays open.
        assert waited < STREAM_SECONDS / 2, f"first byte after {waited:.1f} s"
    finally:
        await runtime.close()
