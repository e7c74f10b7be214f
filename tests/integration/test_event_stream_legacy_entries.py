"""A case's log holding entries written before each entry carried its predecessor's id (by
a worker of an older release, up to a rolling deploy and for as long as the log lives):
a resume past events the log dropped is refused all the same, not served from its oldest
kept as if nothing were missing."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from state.hot.redis_client import create_redis_client, hot_key, hot_namespace
from state.hot.redis_events import EVENTS_KIND, RedisEventLog
from state.ports import ResumePoint
from state.settings import Settings
from support_cases.events import PAGE, CaseEvents, EventsTrimmed
from tests.support.records import unique_thread

KEPT = 200


@pytest.fixture
async def redis(stack_env: dict[str, str]) -> AsyncIterator[tuple[aioredis.Redis, str]]:
    settings = Settings.model_validate(
        {"cosmos_endpoint": stack_env["COSMOS_ENDPOINT"], "redis_url": stack_env["REDIS_URL"]}
    )
    client = create_redis_client(settings)
    yield client, hot_namespace(settings)
    await client.aclose()


async def _append_as_before(client: aioredis.Redis, key: str, n: int) -> str:
    """What an append of the release before did: its token and body, no predecessor."""
    body = json.dumps({"event": "old", "n": n})
    found = await client.xadd(
        key, {"t": secrets.token_hex(8), "d": body}, maxlen=KEPT, approximate=True
    )
    return found.decode() if isinstance(found, bytes) else str(found)


async def test_a_resume_past_dropped_entries_of_the_release_before_is_refused(
    redis: tuple[aioredis.Redis, str],
) -> None:
    client, namespace = redis
    log = RedisEventLog(client, namespace=namespace, max_events=KEPT, ttl_seconds=60)
    case = unique_thread("events")
    key = hot_key(case, EVENTS_KIND, namespace=namespace)
    ids = [await _append_as_before(client, key, n) for n in range(2 * KEPT)]
    await log.append(case, {"event": "new"})  # this release's, after them
    oldest_kept = (await log.read(case, count=1))[0]
    assert oldest_kept.id != ids[0] and oldest_kept.previous is None

    assert await log.resume_point(case, ids[0]) is ResumePoint.TRIMMED
    events = CaseEvents(log)
    with pytest.raises(EventsTrimmed):
        await events.opened(case, ids[0], seconds=0, caller="reader")
    # From the oldest kept on, nothing is missing.
    assert await log.resume_point(case, oldest_kept.id) is ResumePoint.KEPT
    stream = await events.opened(case, oldest_kept.id, seconds=0, caller="reader")
    served = [event async for event in stream if event is not None]
    assert served[-1].data == {"event": "new"}


async def test_a_stream_ends_at_a_gap_among_entries_of_the_release_before(
    redis: tuple[aioredis.Redis, str],
) -> None:
    """A stream reading slower than an older release's worker writes the case: the log
    drops what it has not served, and its next page starts at an entry that names no
    predecessor."""
    client, namespace = redis
    log = RedisEventLog(client, namespace=namespace, max_events=KEPT, ttl_seconds=60)
    case = unique_thread("events")
    key = hot_key(case, EVENTS_KIND, namespace=namespace)
    for n in range(KEPT):
        await _append_as_before(client, key, n)
    stream = await CaseEvents(log).opened(case, None, seconds=0.2, caller="reader")
    served = [await anext(stream) for _ in range(PAGE)]
    for n in range(KEPT, 3 * KEPT):  # the older worker writes on; the log drops the rest
        await _append_as_before(client, key, n)
    served += [event async for event in stream]

    numbers = [event.data["n"] for event in served if event is not None]
    assert numbers == list(range(PAGE)), f"served past the gap: {numbers[PAGE:][:3]}..."
