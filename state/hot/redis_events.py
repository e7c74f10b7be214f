"""Per-thread event logs in Redis Streams: `{tid}:<ns>:events`.

One XADD with an approximate MAXLEN (Redis trims whole macro nodes, so a thread keeps
at least `max_events`) and an EXPIRE, pipelined: one round trip per event. Stream ids
(`<ms>-<seq>`) are the event ids, so a reader resumes from any id it saw; a blocking
XREAD waits for the next one without polling.
"""

from __future__ import annotations

import json
import re
from typing import Any

import redis.asyncio as aioredis

from ..ports import JSON, StoredEvent
from .redis_client import hot_key
from .redis_store import redis_errors

EVENTS_KIND = "events"
# Below the client's 2 s socket timeout: a blocking read must answer before it.
MAX_WAIT_MS = 1500
# `<ms>-<seq>`, or `<ms>` alone (Redis reads it as `<ms>-0`).
_STREAM_ID = re.compile(r"^\d{1,20}(-\d{1,20})?$")


class RedisEventLog:
    """`EventLog` over the hot tier's client."""

    def __init__(
        self, client: aioredis.Redis, *, namespace: str, max_events: int, ttl_seconds: int
    ) -> None:
        self._client = client
        self._namespace = namespace
        self._max_events = max_events
        self._ttl_seconds = ttl_seconds

    def _key(self, thread_id: str) -> str:
        return hot_key(thread_id, EVENTS_KIND, namespace=self._namespace)

    async def append(self, thread_id: str, data: JSON) -> str:
        key = self._key(thread_id)
        body = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        with redis_errors():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.xadd(key, {"d": body}, maxlen=self._max_events, approximate=True)
                pipe.expire(key, self._ttl_seconds)
                event_id, _ = await pipe.execute()
        return event_id.decode() if isinstance(event_id, bytes) else str(event_id)

    async def read(
        self, thread_id: str, *, after: str | None = None, wait_ms: int = 0, count: int = 100
    ) -> list[StoredEvent]:
        with redis_errors():
            found = await self._client.xread(
                {self._key(thread_id): after or "0-0"},
                count=count,
                block=min(wait_ms, MAX_WAIT_MS) or None,
            )
        events: list[StoredEvent] = []
        streams: list[Any] = list(found or [])
        for _key, entries in streams:
            for event_id, fields in entries:
                raw = fields.get(b"d", fields.get("d"))
                text = event_id.decode() if isinstance(event_id, bytes) else str(event_id)
                events.append(StoredEvent(text, json.loads(raw)))
        return events

    def valid_id(self, event_id: str) -> bool:
        return bool(_STREAM_ID.match(event_id))

    async def delete(self, thread_id: str) -> None:
        with redis_errors():
            await self._client.delete(self._key(thread_id))
