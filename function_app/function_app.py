"""Azure Functions worker entry: the FastAPI app as one HTTP function, plus the maintenance
timer (resume stale runs, then sweep expired state).

The worker imports this file by its stem from the deployed folder's root, where
`support_cases` and `state` (copied in by the prepackage hook) sit beside it.
Nothing here touches settings or backends at import time: indexing must work
before any app setting is read.
"""

from __future__ import annotations

import azure.functions as func

from support_cases.api import create_app
from support_cases.maintenance import run_tick
from support_cases.runtime import process_runtime
from support_cases.telemetry import traced
from support_cases.unconvertible_requests import refuse_unconvertible_requests

# Every route is under /api: host.json keeps the default routePrefix "api" and the
# ASGI function passes the full path through to FastAPI. No host key: callers present
# Entra ID access tokens, which the app validates on every request (support_cases.auth),
# and /api/health must answer the availability test without any credential.
api = create_app()
app = func.AsgiFunctionApp(app=api, http_auth_level=func.AuthLevel.ANONYMOUS)
# A path that is not UTF-8 once decoded, or an unreadable port, raised in the SDK's own
# conversion of the request (a bare 500 from the host): a 400 in the app's error shape.
refuse_unconvertible_requests(app.middleware, api.state.settings_source)


@app.function_name(name="resume_stale_runs")
@app.timer_trigger(
    arg_name="timer", schedule="0 */1 * * * *", run_on_startup=False, use_monitor=True
)
async def resume_stale_runs(timer: func.TimerRequest) -> None:
    # One span per tick: with PYTHON_ENABLE_OPENTELEMETRY the worker makes it a child of
    # the host's invocation, so timer runs show up in the same traces as HTTP calls.
    runtime = await process_runtime.get()
    with traced("timer.resume_stale_runs", past_due=timer.past_due) as span:
        # Logs the counts and exports them as metrics; one failing case never stops the tick.
        tick = await run_tick(runtime.service)
        span.set_attribute("resumed", len(tick.resumed))
        span.set_attribute("swept", tick.swept if tick.swept is not None else -1)
        span.set_attribute("flushed", tick.flushed if tick.flushed is not None else -1)
