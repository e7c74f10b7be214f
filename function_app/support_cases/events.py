"""A case's progress as events: what the runner publishes and what `GET .../events` serves.

Events go to the state library's per-thread event log (Redis Streams), never to one
process's memory, so any instance serves any case's stream and a client resumes
after the last id it saw (`Last-Event-ID`). Publishing is best effort: a run never
fails, or waits, because its progress could not be told (the case's record and
checkpoints are the truth; events are the view of it as it happens).
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

from state import BackendUnavailable, EventLog, ResumePoint, StoredEvent, event_order

log = logging.getLogger(__name__)

# A comment line every so often keeps proxies from closing a quiet stream.
KEEP_ALIVE_SECONDS = 15.0
# One blocking read of the log waits this long at most (the stream checks its own end
# and the client in between).
READ_WAIT_MS = 1000
# Events per read of the log.
PAGE = 100
# Line breaks to Python's `str.splitlines` that `json.dumps` does not escape (it escapes
# every control character below U+0020), each with its JSON escape.
LINE_BREAKS_JSON_KEEPS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


class EventsUnavailable(Exception):
    """No event log (no hot tier configured): maps to 503. A Redis out of reach is the
    store's `BackendUnavailable` (503 with Retry-After)."""


class InvalidEventId(Exception):
    """A Last-Event-ID not of the log's form: maps to 422."""


class EventsTrimmed(Exception):
    """A Last-Event-ID older than the case's oldest kept event, once its log dropped some
    (events after it may be gone): maps to 410."""


class StreamsBusy(Exception):
    """This worker serves as many event streams as it may: maps to 503 with Retry-After."""

    retry_after = 5


class CallerStreamsBusy(Exception):
    """This caller holds as many of this worker's event streams as one caller may: maps to
    429 with Retry-After."""

    retry_after = 5


class CaseEvents:
    def __init__(
        self, log_: EventLog | None, *, max_streams: int = 100, max_streams_per_caller: int = 10
    ) -> None:
        self._log = log_
        # Each open stream holds an HTTP connection for up to 200 s and a Redis connection
        # while it waits on the log: without a bound, any caller could take them all. And
        # without one per caller, one caller could hold every slot and refuse all others.
        self._max_streams = max_streams
        self._max_streams_per_caller = max_streams_per_caller
        self._open_streams = 0
        # Open streams by caller id; a caller without any has no entry.
        self._open_by_caller: defaultdict[str, int] = defaultdict(int)

    async def publish(self, case_id: str, event: str, **fields: Any) -> None:
        if self._log is None:
            return
        data = {"event": event, "at": datetime.now(UTC).isoformat(), **fields}
        try:
            await self._log.append(case_id, data)
        except BackendUnavailable as error:
            log.warning("case %s: event %s not published: %s", case_id, event, error)

    def check(self, after: str | None) -> EventLog:
        if self._log is None:
            raise EventsUnavailable("case events need the hot tier (REDIS_URL or REDIS_HOST)")
        if after is not None and not self._log.valid_id(after):
            raise InvalidEventId(f"Last-Event-ID {after!r} is not an event id of this API")
        return self._log

    async def opened(
        self, case_id: str, after: str | None, *, seconds: float, caller: str
    ) -> AsyncIterator[StoredEvent | None]:
        """The case's events after `after`, for `seconds`, opened by `caller` (its id): see
        `_stream`. Refuses the stream while the caller holds its maximum
        (`CallerStreamsBusy`) or this worker serves its own (`StreamsBusy`); its slot is
        taken here, before anything is awaited, or requests arriving together would all
        pass the bounds. The first page is read now: a log out of reach when the stream
        opens raises `BackendUnavailable` (503, Retry-After) rather than answer 200 with a
        stream that ends at once, empty, which a client takes for a case without events."""
        events = self.check(after)
        give_back = self._take_slot(caller)
        try:
            first = await events.read(case_id, after=after, wait_ms=0, count=PAGE)
            if after is not None:
                await self._check_no_gap(events, case_id, after, first)
        except BaseException:
            give_back()
            raise
        stream = self._stream(case_id, after, seconds=seconds, first=first, give_back=give_back)
        # A stream never iterated (its client gone before the answer started) never runs
        # its `finally`: its slot comes back when it is collected.
        weakref.finalize(stream, give_back)
        return stream

    @staticmethod
    async def _check_resume_point(events: EventLog, case_id: str, after: str) -> None:
        """Refuses a resume that would miss events without a sign (`ResumePoint`), once a
        read after it found none. Checked after that read: an id past the newest then is
        past it when checked (the newest only grows)."""
        point = await events.resume_point(case_id, after)
        if point is ResumePoint.PAST_NEWEST:
            raise InvalidEventId(
                f"Last-Event-ID {after!r} is past every event of case {case_id!r} (not one "
                "of its ids): resume after the last id its stream sent, or from 0"
            )
        if point is ResumePoint.TRIMMED:
            raise _trimmed(case_id, after)

    @classmethod
    async def _check_no_gap(
        cls, events: EventLog, case_id: str, after: str, found: list[StoredEvent]
    ) -> None:
        """Refuses a read after `after` whose first event follows one the log dropped,
        above `after`: it came with the read, so trimming after the read (which drops what
        the stream read already, maybe `after` too) is no gap. `0` asks for the oldest kept.
        A read that found none asks the log (`_check_resume_point`); so does one whose first
        event names no predecessor (the log's first, or written by an older release)."""
        if event_order(after) == (0, 0):
            return
        if not found:
            await cls._check_resume_point(events, case_id, after)
            return
        previous = found[0].previous
        if previous is None:
            trimmed = await events.resume_point(case_id, after) is ResumePoint.TRIMMED
        else:
            trimmed = event_order(previous) > event_order(after)
        if trimmed:
            raise _trimmed(case_id, after)

    def _take_slot(self, caller: str) -> Callable[[], None]:
        """One of this worker's stream slots for `caller`, and what gives it back (once,
        however often it is called)."""
        held = self._open_by_caller.get(caller, 0)
        if held >= self._max_streams_per_caller:
            raise CallerStreamsBusy(
                f"this caller holds {held} of this worker's event streams, the most one "
                "caller may (CASE_MAX_EVENT_STREAMS_PER_CALLER); close one or retry in "
                f"{CallerStreamsBusy.retry_after} s"
            )
        if self._open_streams >= self._max_streams:
            raise StreamsBusy(
                f"this worker serves {self._open_streams} event streams, its maximum "
                f"(CASE_MAX_EVENT_STREAMS); retry in {StreamsBusy.retry_after} s"
            )
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            if not given_back:
                given_back = True
                self._open_streams -= 1
                left = self._open_by_caller[caller] - 1
                if left:
                    self._open_by_caller[caller] = left
                else:
                    del self._open_by_caller[caller]

        # No call between reading a count and writing it back: the collector could run
        # there, and with it an abandoned stream's `give_back` (`weakref.finalize`).
        self._open_streams += 1
        self._open_by_caller[caller] += 1
        return give_back

    async def _stream(
        self,
        case_id: str,
        after: str | None,
        *,
        seconds: float,
        first: list[StoredEvent],
        give_back: Callable[[], None],
    ) -> AsyncIterator[StoredEvent | None]:
        """The case's events after `after` (`first`: the first page, already read), for
        `seconds`; None now and then while quiet (the caller sends a keep-alive). Ends
        early if the log becomes unreachable: the client reconnects with the last id it
        got."""
        try:
            async for event in self._events(case_id, after, seconds=seconds, first=first):
                yield event
        finally:
            give_back()

    async def _events(
        self,
        case_id: str,
        after: str | None,
        *,
        seconds: float,
        first: list[StoredEvent] | None,
    ) -> AsyncIterator[StoredEvent | None]:
        events = self.check(after)
        deadline = time.monotonic() + seconds
        quiet_since = time.monotonic()
        more = False  # the last page was full: read on without waiting, even past the end
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            wait_ms = 0 if more else max(0, min(READ_WAIT_MS, left_ms))
            try:
                if first is not None:
                    found, first = first, None
                else:
                    found = await events.read(case_id, after=after, wait_ms=wait_ms, count=PAGE)
                    # A client reading slower than the case writes: the log may have dropped
                    # what the stream has not served yet. It ends then, and the client,
                    # reconnecting after the last id it got, is told (410).
                    if found and after is not None:
                        await self._check_no_gap(events, case_id, after, found)
            except (BackendUnavailable, EventsTrimmed) as error:
                log.warning("case %s: event stream ended: %s", case_id, error)
                return
            for event in found:
                after = event.id
                yield event
            more = len(found) == PAGE
            if found:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= KEEP_ALIVE_SECONDS:
                quiet_since = time.monotonic()
                yield None
            if left_ms <= 0 and not more:
                return


def _trimmed(case_id: str, after: str) -> EventsTrimmed:
    return EventsTrimmed(
        f"events of case {case_id!r} after Last-Event-ID {after!r} are no longer kept (a "
        "case keeps its newest events): read the case (GET) for where it stands, then its "
        "events from 0"
    )


def sse_frame(event: StoredEvent | None) -> str:
    """One Server-Sent Events frame (a comment for None: keep-alive)."""
    if event is None:
        return ": keep-alive\n\n"
    name = str(event.data.get("event", "message")) if isinstance(event.data, dict) else "message"
    body = json.dumps(event.data, separators=(",", ":"), ensure_ascii=False)
    # JSON leaves these raw inside strings (a customer's text), and clients that read the
    # stream by Python's line rules (httpx's iter_lines) break the data line at them.
    for raw, escaped in LINE_BREAKS_JSON_KEEPS.items():
        body = body.replace(raw, escaped)
    return f"id: {event.id}\nevent: {name}\ndata: {body}\n\n"
