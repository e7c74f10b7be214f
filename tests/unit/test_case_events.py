"""`support_cases.events` over the in-memory event log: what a stream returns and frames."""

from __future__ import annotations

import gc
import json

import pytest

from state import StoredEvent
from support_cases.events import (
    PAGE,
    CaseEvents,
    EventsUnavailable,
    InvalidEventId,
    StreamsBusy,
    sse_frame,
)
from tests.support.fakes import MemoryEventLog


async def collect(events: CaseEvents, after: str | None, seconds: float) -> list[StoredEvent]:
    stream = await events.opened("case", after, seconds=seconds, caller="reader")
    return [e async for e in stream if e is not None]


async def test_a_stream_ending_now_still_returns_every_event_after_the_id() -> None:
    log = MemoryEventLog(max_events=PAGE * 5)
    events = CaseEvents(log)
    for n in range(PAGE * 2 + 50):
        await events.publish("case", "node_started", n=n)
    everything = await collect(events, None, seconds=0)
    assert [e.data["n"] for e in everything] == list(range(PAGE * 2 + 50))
    assert all(e.data["event"] == "node_started" and e.data["at"] for e in everything)
    rest = await collect(events, everything[PAGE].id, seconds=0)
    assert rest == everything[PAGE + 1 :]


async def test_without_a_log_or_with_a_foreign_id_the_stream_is_refused() -> None:
    with pytest.raises(EventsUnavailable):
        CaseEvents(None).check(None)
    await CaseEvents(None).publish("case", "run_started")  # nothing to tell it to: no error
    with pytest.raises(InvalidEventId):
        CaseEvents(MemoryEventLog()).check("not-an-id")


def test_frames_carry_id_type_and_json_data_and_keep_alive_is_a_comment() -> None:
    frame = sse_frame(StoredEvent("5-1", {"event": "run_completed", "text": "a\nb"}))
    lines = frame.split("\n")
    assert lines[:2] == ["id: 5-1", "event: run_completed"]
    assert json.loads(lines[2].removeprefix("data: ")) == {"event": "run_completed", "text": "a\nb"}
    assert frame.endswith("\n\n") and frame.count("\n") == 4
    assert sse_frame(None) == ": keep-alive\n\n"


async def test_a_stream_never_iterated_gives_its_slot_back_once_collected() -> None:
    """Its client gone before the answer started: the generator never runs its `finally`."""
    events = CaseEvents(MemoryEventLog(), max_streams=1)
    await events.publish("case", "run_started")
    stream = await events.opened("case", None, seconds=0, caller="reader")
    with pytest.raises(StreamsBusy):
        await events.opened("case", None, seconds=0, caller="reader")
    del stream
    gc.collect()
    assert [e.data["event"] for e in await collect(events, None, seconds=0)] == ["run_started"]
    assert [e.data["event"] for e in await collect(events, None, seconds=0)] == ["run_started"]
