"""ASGI middleware bounding how long a request takes to be answered (API_REQUEST_DEADLINE_SECONDS).

Each store call is bounded, but a request makes several in turn: under a slow store (each
call near its timeout) a GET or a submit took over 13 s. Past the deadline the handler is
cancelled, as when its client disconnects: the service's handling of a cancelled request
(a run handed to a background task, a lock let go) leaves nothing half-done. The caller is
answered 503 with Retry-After instead. The request's body read counts too: a client
trickling it in would otherwise hold a worker for as long as it liked. Its body still
arriving at the deadline, the request is the client's to blame: 408 (and the connection
closed: the rest of the body would be read as the next request).

The deadline ends once the answer starts: an event stream stays open for its own
`seconds`. A request's wait for its run (CASE_SYNC_WAIT_SECONDS, after which it answers
202) is its own, asked-for wait: not counted (`waiting_for_run`). Health is not bounded
here: its probes have their own bound, and its 503 its own body.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

# A request that ran out of time met slow stores: asked again at once, it would likely too.
RETRY_AFTER_SECONDS = 5


@dataclass
class _Clock:
    """None once the request ended: tasks it spawned (a run, a pool's reader) keep a copy
    of its context, and would keep the task, its error and that error's frames alive."""

    timeout: asyncio.Timeout | None
    task: asyncio.Task[Any] | None


# The deadline of the request served in this task. Tasks the request spawns copy it, but
# run on after it: they never move it (`waiting_for_run` checks the task).
_CLOCK: ContextVar[_Clock | None] = ContextVar("request_deadline", default=None)


@contextmanager
def waiting_for_run() -> Iterator[None]:
    """A request's wait for its run, which its deadline does not count: the deadline moves
    on by as long as the wait took. Outside a bounded request (the timer), nothing."""
    clock = _CLOCK.get()
    timeout = clock.timeout if clock and clock.task is asyncio.current_task() else None
    due = timeout.when() if timeout else None
    if timeout is None or due is None or timeout.expired():
        # Not a bounded request's task; or its answer started, or its time is up.
        yield
        return
    loop = asyncio.get_running_loop()
    began = loop.time()
    timeout.reschedule(None)
    try:
        yield
    finally:
        timeout.reschedule(due + (loop.time() - began))


class RequestDeadline:
    """`seconds`: the deadline (None: none, e.g. while the settings cannot be read);
    `exempt`: paths it does not apply to."""

    def __init__(
        self, app: ASGIApp, seconds: Callable[[], float | None], exempt: frozenset[str]
    ) -> None:
        self.app = app
        self.seconds = seconds
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        seconds = self.seconds() if scope["type"] == "http" else None
        if seconds is None or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        answering = False
        body_arriving = False
        timeout = asyncio.timeout(seconds)

        async def receive_noting() -> Message:
            nonlocal body_arriving
            body_arriving = True
            message = await receive()
            body_arriving = message["type"] == "http.request" and message.get("more_body", False)
            return message

        async def send_noting(message: Message) -> None:
            nonlocal answering
            if message["type"] == "http.response.start" and not answering:
                if timeout.expired():
                    # Its cancellation is on the way: the 503 below answers instead.
                    return
                # An answer begun is not cut: a stream's body goes on for as long as it asked.
                answering = True
                timeout.reschedule(None)
            if answering:
                await send(message)

        try:
            async with timeout:
                clock = _Clock(timeout, asyncio.current_task())
                token = _CLOCK.set(clock)
                try:
                    await self.app(scope, receive_noting, send_noting)
                finally:
                    clock.timeout = clock.task = None
                    _CLOCK.reset(token)
        except TimeoutError:
            if not timeout.expired() or answering:
                raise  # not this deadline's
        if timeout.expired() and not answering:
            if body_arriving:
                log.warning(
                    "%s %s answered 408: its body did not arrive within the deadline of %g s",
                    scope["method"],
                    scope["path"],
                    seconds,
                )
                await _answer_body_late(send, seconds)
                return
            log.warning(
                "%s %s answered 503: no answer within its deadline of %g s",
                scope["method"],
                scope["path"],
                seconds,
            )
            await _answer(send, seconds)


async def _answer(send: Send, seconds: float) -> None:
    await _send_error(
        send,
        503,
        f"no answer within {seconds:g} s, retry later",
        (b"retry-after", str(RETRY_AFTER_SECONDS).encode()),
    )


async def _answer_body_late(send: Send, seconds: float) -> None:
    await _send_error(
        send,
        408,
        f"the request's body did not arrive within {seconds:g} s",
        (b"connection", b"close"),
    )


async def _send_error(send: Send, status: int, error: str, header: tuple[bytes, bytes]) -> None:
    # The API's error shape (`http_errors.error_response`), built here: http_errors imports
    # the service, which imports this module.
    body = json.dumps({"error": error}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                header,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
