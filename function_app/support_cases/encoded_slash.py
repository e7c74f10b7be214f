"""ASGI middleware keeping a percent-encoded slash (`%2F`) in the path it routes on."""

from __future__ import annotations

import re
from urllib.parse import unquote

from starlette.types import ASGIApp, Receive, Scope, Send

ENCODED_SLASH = re.compile(rb"%2f", re.IGNORECASE)


class KeepEncodedSlashes:
    """Routes match the decoded path, where `a%2Fb` is two segments: a case id `a/b`
    answered a generic 404, and `x%2Fruns` reached case `x`'s runs. Kept encoded, it is one
    segment, which the case-id pattern refuses (422) like any other invalid case id.
    Served by uvicorn only: azure-functions' ASGI adapter hands over a `raw_path` it
    decoded, where no `%2F` is left to keep."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw: bytes | None = scope.get("raw_path") if scope["type"] == "http" else None
        if raw and ENCODED_SLASH.search(raw):
            # raw_path is the request target as sent (any root_path included, as in `path`);
            # a query string is not part of it.
            parts = ENCODED_SLASH.split(raw.split(b"?", 1)[0])
            kept = "%2F".join(unquote(part.decode("latin-1")) for part in parts)
            scope = {**scope, "path": kept}
        await self.app(scope, receive, send)
