"""A worker serves a bounded number of event streams: one more is a 503 with Retry-After,
and a stream that ended makes room again. One caller holds a bounded number of them: one
more of its own is a 429 with Retry-After, while other callers still open theirs."""

from __future__ import annotations

import asyncio
import gc
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import ClientDisconnect
from starlette.types import Message

from support_cases.api import create_app
from support_cases.auth import ROLE_SUBMIT
from support_cases.demo import demo_case
from support_cases.runtime import Runtime
from support_cases.settings import AppSettings


@asynccontextmanager
async def case_streams(
    e2e_settings: Callable[..., AppSettings], bearer: Callable[..., dict[str, str]], case_id: str
) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A client of an app serving at most 2 event streams, the case submitted: the client
    and the case's events path."""
    runtime = await Runtime.open(e2e_settings("postgres", case_max_event_streams=2))
    try:
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://streams.test", headers=bearer("streamer")
        ) as client:
            assert (await client.post("/api/cases", json=demo_case(case_id))).status_code == 201
            yield client, f"/api/cases/{case_id}/events"
    finally:
        await runtime.close()


async def test_one_stream_past_the_maximum_is_503_and_an_ended_one_makes_room(
    e2e_settings: Callable[..., AppSettings],
    bearer: Callable[..., dict[str, str]],
    case_id: str,
) -> None:
    async with case_streams(e2e_settings, bearer, case_id) as (client, events):
        long_ones = [
            asyncio.create_task(client.get(events, params={"seconds": 3})) for _ in range(2)
        ]
        await asyncio.sleep(0.5)  # both are open
        refused = await client.get(events, params={"seconds": 0})
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "5"
        assert "CASE_MAX_EVENT_STREAMS" in refused.json()["error"]
        assert [answer.status_code for answer in await asyncio.gather(*long_ones)] == [200, 200]
        served = await client.get(events, params={"seconds": 0})
        assert served.status_code == 200 and "run_completed" in served.text


async def test_a_burst_of_streams_opened_at_once_is_held_to_the_maximum(
    e2e_settings: Callable[..., AppSettings],
    bearer: Callable[..., dict[str, str]],
    case_id: str,
) -> None:
    """Requests arriving together all passed a bound checked before their streams started
    (each then waited on its first read): the slot is taken before that wait."""
    async with case_streams(e2e_settings, bearer, case_id) as (client, events):
        # Open long enough that all six have asked before the first two end (a slot free
        # again would rightly let one more in).
        answers = await asyncio.gather(
            *(client.get(events, params={"seconds": 3}) for _ in range(6))
        )
        assert sorted(answer.status_code for answer in answers) == [200, 200, 503, 503, 503, 503]
        # Every slot was given back: streams ended, and the refused never held one.
        again = await asyncio.gather(*(client.get(events, params={"seconds": 0}) for _ in range(2)))
        assert [answer.status_code for answer in again] == [200, 200]


class HeldStream:
    """One `GET .../events` driven at the ASGI level, as a server would: a test sees the
    moment its answer starts (the stream's slot is then held, or it was refused), and makes
    its client go away or its request be cancelled. (httpx's ASGI transport returns only
    once the whole answer is in.)"""

    def __init__(
        self,
        app: FastAPI,
        path: str,
        headers: dict[str, str],
        seconds: float,
        *,
        vanished: bool = False,
    ) -> None:
        """`vanished`: the client is gone before the answer starts (sending it fails, as a
        server of ASGI 2.4 reports a closed connection)."""
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self._vanished = vanished
        self.body = bytearray()
        self._started = asyncio.Event()
        self._gone = asyncio.Event()
        self._asked = False
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4" if vanished else "2.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": f"seconds={seconds}".encode(),
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
            "server": ("streams.test", 80),
            "client": ("127.0.0.1", 50000),
        }
        self.task = asyncio.create_task(app(scope, self._receive, self._send))

    async def _receive(self) -> Message:
        if not self._asked:
            self._asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: Message) -> None:
        if self._vanished:
            raise OSError("the client closed the connection")
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {k.decode(): v.decode() for k, v in message["headers"]}
            self._started.set()
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")

    async def started(self) -> int:
        """The answer's status, once it started."""
        started = asyncio.create_task(self._started.wait())
        await asyncio.wait({started, self.task}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if self.status is None:
            await self.task  # the app failed before answering: its error
        assert self.status is not None
        return self.status

    async def ended(self) -> bytes:
        """The whole answer's body, once the stream ended by itself."""
        await self.task
        return bytes(self.body)

    async def leave(self) -> None:
        """Its client goes away (the server reads `http.disconnect`)."""
        self._gone.set()
        await self.task


@asynccontextmanager
async def callers_streams(
    e2e_settings: Callable[..., AppSettings],
    bearer: Callable[..., dict[str, str]],
    callers: list[str],
    **limits: int,
) -> AsyncIterator[Callable[..., HeldStream]]:
    """An app with stream `limits`, each of `callers` (submitters) having submitted a case:
    what opens a stream of a caller's case as that caller (closed at the end)."""
    runtime = await Runtime.open(e2e_settings("postgres", **limits))
    app = create_app(runtime)
    streams: list[HeldStream] = []
    try:
        headers = {caller: bearer(caller, [ROLE_SUBMIT]) for caller in callers}
        paths: dict[str, str] = {}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://streams.test") as client:
            for caller in callers:
                case_id = f"case-streams-{uuid.uuid4().hex[:16]}"
                submitted = await client.post(
                    "/api/cases", json=demo_case(case_id), headers=headers[caller]
                )
                assert submitted.status_code == 201, submitted.text
                paths[caller] = f"/api/cases/{case_id}/events"

        def open_stream(caller: str, seconds: float, *, vanished: bool = False) -> HeldStream:
            stream = HeldStream(app, paths[caller], headers[caller], seconds, vanished=vanished)
            if not vanished:  # it ends at once, and a test drops it
                streams.append(stream)
            return stream

        yield open_stream
    finally:
        for stream in streams:
            stream.task.cancel()
        await asyncio.gather(*(stream.task for stream in streams), return_exceptions=True)
        await runtime.close()


def refusal(stream: HeldStream, body: bytes) -> str:
    assert stream.headers["retry-after"] == "5"
    return str(json.loads(body)["error"])


async def test_a_caller_past_its_maximum_is_429_while_other_callers_still_open_streams(
    e2e_settings: Callable[..., AppSettings], bearer: Callable[..., dict[str, str]]
) -> None:
    """One caller opening streams without end held every slot of the worker: everyone
    else was refused (503) for as long as they stayed open."""
    limits = {"case_max_event_streams": 4, "case_max_event_streams_per_caller": 2}
    callers = ["hog", "other", "third"]
    async with callers_streams(e2e_settings, bearer, callers, **limits) as open_stream:
        # Asked at once: the caller's bound is checked and its slot taken in one step.
        hogs = [open_stream("hog", 200) for _ in range(5)]
        statuses = [await stream.started() for stream in hogs]
        assert sorted(statuses) == [200, 200, 429, 429, 429], statuses
        refused = next(stream for stream in hogs if stream.status == 429)
        assert "CASE_MAX_EVENT_STREAMS_PER_CALLER" in refusal(refused, await refused.ended())
        # Another caller still gets its stream, served in full, while the first keeps its own.
        served = open_stream("other", 0)
        assert await served.started() == 200
        assert b"run_completed" in await served.ended()
        held = [stream for stream in hogs if stream.status == 200]
        assert not any(stream.task.done() for stream in held)
        # The worker's bound still holds for all callers together: 2 + 2 of 4 held, a third
        # caller (under its own bound) is refused by it.
        others = [open_stream("other", 200) for _ in range(2)]
        assert [await stream.started() for stream in others] == [200, 200]
        full = open_stream("third", 0)
        assert await full.started() == 503
        assert "CASE_MAX_EVENT_STREAMS)" in refusal(full, await full.ended())


async def test_a_callers_slot_comes_back_when_its_stream_ends_or_is_cancelled(
    e2e_settings: Callable[..., AppSettings], bearer: Callable[..., dict[str, str]]
) -> None:
    limits = {"case_max_event_streams": 10, "case_max_event_streams_per_caller": 1}
    async with callers_streams(e2e_settings, bearer, ["watcher"], **limits) as open_stream:
        short = open_stream("watcher", 1)
        assert await short.started() == 200
        assert await open_stream("watcher", 0).started() == 429
        # It ended by itself (its `seconds` up): its slot is free again.
        assert b"run_completed" in await short.ended()
        gone = open_stream("watcher", 200)
        assert await gone.started() == 200
        assert await open_stream("watcher", 0).started() == 429
        # Its client went away mid-stream: the server cancels the stream.
        await gone.leave()
        cancelled = open_stream("watcher", 200)
        assert await cancelled.started() == 200
        assert await open_stream("watcher", 0).started() == 429
        # Its request was cancelled (the host gave up on it).
        cancelled.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled.task
        last = open_stream("watcher", 0)
        assert await last.started() == 200
        assert b"run_completed" in await last.ended()


async def test_a_callers_stream_whose_client_left_before_it_started_gives_its_slot_back(
    e2e_settings: Callable[..., AppSettings], bearer: Callable[..., dict[str, str]]
) -> None:
    """The client gone before the answer started: the stream is never iterated, so its
    `finally` never runs; its slot comes back when it is collected."""
    limits = {"case_max_event_streams": 10, "case_max_event_streams_per_caller": 1}
    async with callers_streams(e2e_settings, bearer, ["watcher"], **limits) as open_stream:
        abandoned = open_stream("watcher", 200, vanished=True)
        with pytest.raises(ClientDisconnect) as raised:
            await abandoned.task
        assert abandoned.status is None
        assert await open_stream("watcher", 0).started() == 429
        # The failed request (its traceback) was what still referred to the stream.
        del abandoned, raised
        gc.collect()
        last = open_stream("watcher", 0)
        assert await last.started() == 200
        assert b"run_completed" in await last.ended()
