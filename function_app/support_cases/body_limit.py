"""ASGI middleware refusing request bodies over a size limit with 413, before any handler runs."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    """`refused_first`: the answer a request earns before its body's size is told (a bad
    token's 401, so a caller without a valid one learns nothing of the limit), if any."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: Callable[[], int],
        refused_first: Callable[[Scope], Awaitable[Response | None]],
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.refused_first = refused_first

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes()
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await self._reject(scope, receive, send, 400, "Content-Length is not a number")
                return
            # Compared by its digits first: past 4300 of them `int` raises (a bare 500).
            digits = declared.lstrip(b"0")
            if len(digits) > len(str(limit)) or int(digits or b"0") > limit:
                await self._reject(
                    scope, receive, send, 413, f"request body is larger than {limit} bytes"
                )
                return
        # Read the whole body first (it is small by definition), counting as it comes:
        # a chunked request has no Content-Length to trust.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._reject(
                    scope, receive, send, 413, f"request body is larger than {limit} bytes"
                )
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(
        self, scope: Scope, receive: Receive, send: Send, status: int, message: str
    ) -> None:
        # The token is in the headers: no more of the body is read for it.
        refusal = await self.refused_first(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await _answer(send, status, message)


async def _answer(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
