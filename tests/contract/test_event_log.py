"""The `EventLog` contract on a real redis-server (Streams) and on the in-memory fake:
ordered ids, reading after any id, a bounded log, a read that waits for the next event."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from state.hot.redis_client import create_redis_client, hot_namespace
from state.hot.redis_events import MAX_WAIT_MS, RedisEventLog
from state.ports import EventLog, ResumePoint
from state.settings import Settings
from tests.support.fakes import MEMORY, MemoryEventLog
from tests.support.records import unique_thread

MAX_EVENTS = 200


@pytest.fixture(params=["redis", MEMORY])
async def events(request: pytest.FixtureRequest) -> AsyncIterator[EventLog]:
    if request.param == MEMORY:
        yield MemoryEventLog(max_events=MAX_EVENTS)
        return
    stack_env: dict[str, str] = request.getfixturevalue("stack_env")
    settings = Settings.model_validate(
        {"cosmos_endpoint": stack_env["COSMOS_ENDPOINT"], "redis_url": stack_env["REDIS_URL"]}
    )
    client = create_redis_client(settings)
    yield RedisEventLog(
        client, namespace=hot_namespace(settings), max_events=MAX_EVENTS, ttl_seconds=60
    )
    await client.aclose()


def test_implements_the_port(events: EventLog) -> None:
    assert isinstance(events, EventLog)


async def test_reads_in_order_from_the_start_or_after_any_id(events: EventLog) -> None:
    thread = unique_thread("events")
    ids = [await events.append(thread, {"n": n}) for n in range(5)]
    assert all(events.valid_id(event_id) for event_id in ids)
    everything = await events.read(thread)
    assert [event.data for event in everything] == [{"n": n} for n in range(5)]
    assert [event.id for event in everything] == ids
    after_second = await events.read(thread, after=ids[1])
    assert [event.data["n"] for event in after_second] == [2, 3, 4]
    assert await events.read(thread, after=ids[-1]) == []
    assert [event.data["n"] for event in await events.read(thread, count=2)] == [0, 1]


async def test_threads_are_apart_and_delete_drops_one(events: EventLog) -> None:
    one, other = unique_thread("events"), unique_thread("events")
    await events.append(one, {"thread": "one"})
    await events.append(other, {"thread": "other"})
    await events.delete(one)
    assert await events.read(one) == []
    assert [event.data for event in await events.read(other)] == [{"thread": "other"}]


async def test_a_long_log_keeps_at_least_its_bound_and_the_newest(events: EventLog) -> None:
    thread = unique_thread("events")
    for n in range(MAX_EVENTS * 3):
        await events.append(thread, {"n": n})
    kept = await events.read(thread, count=MAX_EVENTS * 3)
    # Redis trims whole stream nodes (approximate MAXLEN): at least the bound is kept.
    assert MAX_EVENTS <= len(kept) < MAX_EVENTS * 3
    assert kept[-1].data == {"n": MAX_EVENTS * 3 - 1}


async def test_a_waiting_read_returns_the_next_event_as_it_is_appended(events: EventLog) -> None:
    thread = unique_thread("events")
    last = await events.append(thread, {"n": 0})
    started = time.monotonic()
    # The longest wait the server takes, so that a loaded machine has most of it for the
    # append below and the answer (a 1 s wait, answered within 0.9 s, left it 0.8 s).
    waiting = asyncio.ensure_future(events.read(thread, after=last, wait_ms=MAX_WAIT_MS))
    await asyncio.sleep(0.1)
    await events.append(thread, {"n": 1})
    found = await waiting
    assert [event.data for event in found] == [{"n": 1}]
    assert time.monotonic() - started < MAX_WAIT_MS / 1000 - 0.1  # the append ended it
    # Nothing comes: the wait ends empty after about wait_ms.
    assert await events.read(thread, after=found[-1].id, wait_ms=200) == []


async def test_ids_of_another_form_are_not_valid_and_a_bare_time_reads_after_it(
    events: EventLog,
) -> None:
    for bad in (
        "",
        "abc",
        "1-",
        "-1",
        "1-2-3",
        "12.5-0",
        "+1",
        f"{2**64}-0",
        f"1-{2**64}",
        "\u0661\u0662",  # Arabic-Indic digits: `\d` to a Unicode regex, refused by Redis
        "1-0\n",
    ):
        assert not events.valid_id(bad)
    thread = unique_thread("events")
    first = await events.append(thread, {"n": 0})
    assert events.valid_id("0")
    assert [e.data for e in await events.read(thread, after="0")] == [{"n": 0}]
    millis = first.split("-")[0]
    assert await events.read(thread, after=str(int(millis) + 1)) == []


async def test_an_id_past_every_id_the_log_gave_out_is_past_the_newest(events: EventLog) -> None:
    """A reader resuming after an id the log never reached would wait for ids that come
    only once the clock passes it: every event until then missed, without a sign."""
    thread = unique_thread("events")
    assert await events.resume_point(thread, "0") is ResumePoint.KEPT
    # Empty: any id up to now may be the last of a log since expired or deleted.
    recent = f"{int(time.time() * 1000) - 1000}-0"
    assert await events.resume_point(thread, recent) is ResumePoint.KEPT
    later = f"{int(time.time() * 1000) + 3_600_000}-0"
    assert await events.resume_point(thread, later) is ResumePoint.PAST_NEWEST
    newest = await events.append(thread, {"n": 0})
    assert await events.resume_point(thread, newest) is ResumePoint.KEPT
    millis, _, seq = newest.partition("-")
    next_one = f"{millis}-{int(seq) + 1}"
    assert await events.resume_point(thread, next_one) is ResumePoint.PAST_NEWEST


async def test_an_id_whose_successors_were_trimmed_says_so(events: EventLog) -> None:
    """Resuming after an id older than the oldest kept event, once the log dropped some,
    would skip the dropped events without a sign."""
    thread = unique_thread("events")
    ids = [await events.append(thread, {"n": n}) for n in range(MAX_EVENTS * 2)]
    oldest_kept = (await events.read(thread, count=1))[0].id
    assert oldest_kept != ids[0]
    assert await events.resume_point(thread, ids[0]) is ResumePoint.TRIMMED
    assert await events.resume_point(thread, oldest_kept) is ResumePoint.KEPT
    assert await events.resume_point(thread, ids[-1]) is ResumePoint.KEPT
    # From the oldest kept, by asking for it: no resume, nothing to say.
    assert await events.resume_point(thread, "0") is ResumePoint.KEPT


async def test_the_newest_dropped_id_resumes_without_missing_anything(events: EventLog) -> None:
    """A client holding the last event the log dropped has every event after it still kept:
    nothing to refuse (a 410 would send it back to 0 for nothing)."""
    thread = unique_thread("events")
    ids = [await events.append(thread, {"n": n}) for n in range(MAX_EVENTS * 2)]
    oldest_kept = (await events.read(thread, count=1))[0].id
    newest_dropped = ids[ids.index(oldest_kept) - 1]
    assert await events.resume_point(thread, newest_dropped) is ResumePoint.KEPT
    older = ids[ids.index(oldest_kept) - 2]
    assert await events.resume_point(thread, older) is ResumePoint.TRIMMED
