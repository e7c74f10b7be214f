"""A stream that read a page before the case's log dropped what preceded it missed
nothing: it serves the page and goes on (ending it would send its client, whose last id is
now dropped too, a 410 for nothing, again each time it lags as far)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from state.hot.redis_client import create_redis_client, hot_namespace
from state.hot.redis_events import RedisEventLog
from state.ports import StoredEvent
from state.settings import Settings
from support_cases.events import PAGE, CaseEvents
from tests.support.records import unique_thread

KEPT = 2 * PAGE


class TrimmedRightAfterRead(RedisEventLog):
    """The case writes, and its log drops its oldest, right after the stream's next read
    (once): what a busy case does to a stream at its log's cap."""

    trim_after_read = False

    async def read(
        self, thread_id: str, *, after: str | None = None, wait_ms: int = 0, count: int = 100
    ) -> list[StoredEvent]:
        found = await super().read(thread_id, after=after, wait_ms=wait_ms, count=count)
        if self.trim_after_read and found:
            self.trim_after_read = False
            for n in range(KEPT):
                await self.append(thread_id, {"event": "later", "n": n})
        return found


@pytest.fixture
async def log(stack_env: dict[str, str]) -> AsyncIterator[TrimmedRightAfterRead]:
    settings = Settings.model_validate(
        {"cosmos_endpoint": stack_env["COSMOS_ENDPOINT"], "redis_url": stack_env["REDIS_URL"]}
    )
    client = create_redis_client(settings)
    yield TrimmedRightAfterRead(
        client, namespace=hot_namespace(settings), max_events=KEPT, ttl_seconds=60
    )
    await client.aclose()


async def test_a_page_read_before_the_log_trims_is_served(log: TrimmedRightAfterRead) -> None:
    case = unique_thread("events")
    for n in range(KEPT):
        await log.append(case, {"event": "early", "n": n})
    events = CaseEvents(log)
    stream = await events.opened(case, None, seconds=0.2, caller="reader")
    served = [await anext(stream) for _ in range(PAGE)]
    log.trim_after_read = True  # the next read: the second page, then the log trims
    served += [event async for event in stream]
    got = [event for event in served if event is not None]

    early = [event.data["n"] for event in got if event.data["event"] == "early"]
    assert early == list(range(KEPT)), f"stream ended after early {early[-1]}"
    # Its client, resuming after the last event it got, is not refused either.
    resumed = await events.opened(case, got[-1].id, seconds=0, caller="reader")
    assert [event async for event in resumed if event is not None] == []
