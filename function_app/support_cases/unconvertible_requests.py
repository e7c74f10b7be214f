"""Requests the Functions SDK cannot turn into an ASGI scope, answered 400 in the app's
error shape instead of an exception the host answers with a bare 500.

`func.AsgiFunctionApp` converts each request (azure.functions `_http_asgi.AsgiRequest`)
before the app sees it, and that conversion raises on what a client controls: a path
whose percent-escapes decode to bytes that are not UTF-8 (`/api/cases/%ff`), an
`X-Forwarded-Port` of more digits than Python converts to an int, a URL port out of
range. Served by uvicorn the app never meets these: uvicorn decodes such a path with
replacement characters (the routes then answer 4xx) and reads no `X-Forwarded-Port`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import azure.functions as func

# Not exported by azure.functions: the very conversion the middleware is about to run, and
# its way of answering a func.HttpResponse from an ASGI app.
from azure.functions._http_asgi import AsgiRequest, AsgiResponse

from .cors import BrowserOrigins
from .http_errors import error_response
from .settings import AppSettings

REQUEST_REFUSED_STATUS = 400


def refuse_unconvertible_requests(
    middleware: func.AsgiMiddleware, settings: Callable[[], AppSettings]
) -> None:
    """Has `middleware` answer 400 to a request its conversion would raise on; every
    other request is served as before. `func.AsgiFunctionApp` builds its middleware
    itself, and its HTTP function calls `middleware.handle_async` on each request.
    `settings` are the app's: the 400 carries the CORS headers its other answers do."""
    serve = middleware.handle_async

    async def handle_async(
        req: func.HttpRequest, context: func.Context | None = None
    ) -> func.HttpResponse:
        try:
            AsgiRequest(req, context).to_asgi_http_scope()
        except UnicodeDecodeError:
            reason = "the path is not UTF-8 once its percent-escapes are decoded"
        except ValueError:
            # Python's own words (how to lift its int digit limit) say nothing to a caller.
            reason = "the URL's host or port, or the X-Forwarded-Port header, cannot be read"
        else:
            return await serve(req, context)
        return await _refused(req, reason, settings)

    # An instance attribute: the HTTP function looks the method up on each call.
    middleware.handle_async = handle_async  # type: ignore[method-assign]


async def _refused(
    req: func.HttpRequest, reason: str, settings: Callable[[], AppSettings]
) -> func.HttpResponse:
    """The 400, through the app's outermost layer (CORS): an allowed page reads it as it
    reads the app's other refusals, and its preflight is answered as the app would."""
    answer = error_response(REQUEST_REFUSED_STATUS, f"invalid request: {reason}")
    refused = await AsgiResponse.from_app(BrowserOrigins(answer, settings), _stand_in(req), b"")
    return refused.to_func_response()


def _stand_in(req: func.HttpRequest) -> dict[str, Any]:
    """What CORS reads of the request (its method and headers) at a path of no route:
    the request's own path and port are what could not be converted."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.1"},
        "http_version": "1.1",
        "method": req.method,
        "scheme": "https",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": [(name.lower().encode(), value.encode()) for name, value in req.headers.items()],
        "server": None,
        "client": None,
    }
