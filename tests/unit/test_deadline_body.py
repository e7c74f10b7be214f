"""The request deadline (API_REQUEST_DEADLINE_SECONDS) counts the time the request's body
takes to arrive: a client trickling its body in held a worker for as long as it liked, the
deadline starting only once the whole body was read. Its body still arriving at the
deadline, it is answered 408 (the client's doing), not a slow store's 503. The app is
driven as a server drives it, its `receive` handing over the body a byte at a time; no
store is reached (a real server's: tests/integration/test_request_body_deadline.py)."""

from __future__ import annotations

import asyncio
import json
import time

from starlette.types import Message

from tests.support.slow_body import (
    BODY,
    DEADLINE_SECONDS,
    MARGIN_SECONDS,
    TRICKLE_SECONDS,
    bounded_app,
)


async def test_a_body_trickled_in_slower_than_the_deadline_is_answered_408_in_time() -> None:
    app = bounded_app()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/cases",
        "raw_path": b"/api/cases",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    sent = 0
    answer: list[Message] = []

    async def trickle() -> Message:
        nonlocal sent
        if sent == len(BODY):
            await asyncio.Event().wait()  # as a server's receive once the body is over
        await asyncio.sleep(TRICKLE_SECONDS)
        sent += 1
        return {
            "type": "http.request",
            "body": BODY[sent - 1 : sent],
            "more_body": sent < len(BODY),
        }

    async def send(message: Message) -> None:
        answer.append(message)

    started = time.monotonic()
    # The app returns: the worker is free again, not waiting for the rest of the body.
    await asyncio.wait_for(app(scope, trickle, send), DEADLINE_SECONDS + MARGIN_SECONDS)
    elapsed = time.monotonic() - started

    assert DEADLINE_SECONDS <= elapsed < DEADLINE_SECONDS + MARGIN_SECONDS, elapsed
    assert sent < len(BODY), "the whole body was read before the answer"
    start, body = answer
    assert start["status"] == 408, answer
    assert dict(start["headers"])[b"connection"] == b"close", start
    assert "body did not arrive within 0.5 s" in json.loads(body["body"])["error"], body
