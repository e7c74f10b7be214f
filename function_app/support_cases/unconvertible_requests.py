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

import azure.functions as func

# Not exported by azure.functions: the very conversion the middleware is about to run.
from azure.functions._http_asgi import AsgiRequest

from .http_errors import error_response

REQUEST_REFUSED_STATUS = 400


def refuse_unconvertible_requests(middleware: func.AsgiMiddleware) -> None:
    """Has `middleware` answer 400 to a request its conversion would raise on; every
    other request is served as before. `func.AsgiFunctionApp` builds its middleware
    itself, and its HTTP function calls `middleware.handle_async` on each request."""
    serve = middleware.handle_async

    async def handle_async(
        req: func.HttpRequest, context: func.Context | None = None
    ) -> func.HttpResponse:
        try:
            AsgiRequest(req, context).to_asgi_http_scope()
        except UnicodeDecodeError:
            return _refused("the path is not UTF-8 once its percent-escapes are decoded")
        except ValueError:
            # Python's own words (how to lift its int digit limit) say nothing to a caller.
            return _refused(
                "the URL's host or port, or the X-Forwarded-Port header, cannot be read"
            )
        return await serve(req, context)

    # An instance attribute: the HTTP function looks the method up on each call.
    middleware.handle_async = handle_async  # type: ignore[method-assign]


def _refused(reason: str) -> func.HttpResponse:
    answer = error_response(REQUEST_REFUSED_STATUS, f"invalid request: {reason}")
    return func.HttpResponse(
        bytes(answer.body), status_code=answer.status_code, mimetype=answer.media_type
    )
