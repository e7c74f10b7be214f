"""Per-thread event logs in Redis Streams: `{tid}:<ns>:events`.

An append is one script: XADD with an approximate MAXLEN (Redis trims whole macro
nodes, so a thread keeps at least `max_events`) and an EXPIRE, in one round trip.
Each append carries a token of its own, and the script adds nothing when one of the
stream's newest entries has that token already: an append retried after a timeout
whose first attempt did land (by redis-py's retry, or ours) is stored once. Every attempt
looks, the first too: one that timed out may reach Redis after its retry ran (its bytes held
up in the network or a proxy while the retry went on a new connection). Stream
ids (`<ms>-<seq>`) are the event ids, so a reader resumes from any id it saw; a
blocking XREAD waits for the next one without polling. Each entry carries its
predecessor's id (`p`): a reader after an id below it knows, from what it read, that the
log dropped events it missed.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from ..ports import JSON, ResumePoint, StoredEvent, event_order
from . import redis_client
from .redis_client import hot_key
from .redis_store import redis_errors

EVENTS_KIND = "events"
# The longest a blocking read waits at the server (its reply is read for this long past
# the socket timeout: `redis_client.round_trip`).
MAX_WAIT_MS = 1500
# `<ms>-<seq>`, or `<ms>` alone (Redis reads it as `<ms>-0`); each part an unsigned 64-bit
# integer in Redis: 19 digits at most keeps it below 2**64 (a time in ms has 13).
# ASCII digits, the whole id: `\d` matches any script's digits and `$` a trailing newline,
# ids Redis refuses.
_STREAM_ID = re.compile(r"[0-9]{1,19}(-[0-9]{1,19})?")
# Tries of one append whose outcome a timeout or a dropped connection left unknown.
APPEND_ATTEMPTS = 3
# How far back a retried append looks for itself: appends of other writers may land
# between two tries of one, never this many.
RECENT_ENTRIES = 32

# KEYS[1] stream; ARGV[1] token, ARGV[2] body, ARGV[3] max events, ARGV[4] ttl seconds,
# ARGV[5] how many of the newest entries to look through for the token.
_APPEND = """
local recent = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[5])
for _, entry in ipairs(recent) do
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 't' and fields[i + 1] == ARGV[1] then
      return entry[1]
    end
  end
end
local entry = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 't', ARGV[1], 'd', ARGV[2]}
if recent[1] then
  -- Its predecessor: a reader after an id below it, once trimmed, missed it.
  table.insert(entry, 'p')
  table.insert(entry, recent[1][1])
end
local id = redis.call(unpack(entry))
redis.call('EXPIRE', KEYS[1], ARGV[4])
return id
"""


# KEYS[1] stream. The server's TIME; then, for a stream, its last generated id, the
# predecessor of its oldest kept entry ('' when it has none), that entry's id and how many
# entries the stream dropped (Redis 7's `entries-added`; 0 before, unknown): an entry
# written before entries carried `p` has none, dropped or not. Inside a script XINFO
# answers RESP2 (a flat list) whatever protocol the client speaks.
_RESUME_POINT = """
local now = redis.call('TIME')
if redis.call('EXISTS', KEYS[1]) == 0 then
  return now
end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local field = {}
for i = 1, #info, 2 do
  field[info[i]] = info[i + 1]
end
local newest = field['last-generated-id']
local previous = ''
local oldest = newest
if type(field['first-entry']) == 'table' then
  oldest = field['first-entry'][1]
  local fields = field['first-entry'][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'p' then
      previous = fields[i + 1]
    end
  end
end
local dropped = (field['entries-added'] or field['length']) - field['length']
return {now[1], now[2], newest, previous, oldest, dropped}
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisEventLog:
    """`EventLog` over the hot tier's client; a read waits at most `MAX_WAIT_MS`, on
    `waiting_client` (a pool of its own: an open stream holds a connection nearly all the
    time, and enough of them would leave none to the tier's other commands)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        namespace: str,
        max_events: int,
        ttl_seconds: int,
        waiting_client: aioredis.Redis | None = None,
    ) -> None:
        self._client = client
        self._waiting_client = waiting_client or client
        self._namespace = namespace
        self._max_events = max_events
        self._ttl_seconds = ttl_seconds
        self._append = client.register_script(_APPEND)
        self._resume_point = client.register_script(_RESUME_POINT)

    def _key(self, thread_id: str) -> str:
        return hot_key(thread_id, EVENTS_KIND, namespace=self._namespace)

    async def append(self, thread_id: str, data: JSON) -> str:
        body = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        args: list[str | int] = [
            secrets.token_hex(8),
            body,
            self._max_events,
            self._ttl_seconds,
            RECENT_ENTRIES,
        ]
        with redis_errors():
            for attempt in range(APPEND_ATTEMPTS):
                try:
                    return _text(
                        await redis_client.run_script(
                            self._client, self._append, [self._key(thread_id)], args
                        )
                    )
                except (RedisConnectionError, RedisTimeoutError, OSError):
                    if attempt == APPEND_ATTEMPTS - 1:
                        raise
        raise AssertionError("unreachable")

    async def read(
        self, thread_id: str, *, after: str | None = None, wait_ms: int = 0, count: int = 100
    ) -> list[StoredEvent]:
        block_ms = min(wait_ms, MAX_WAIT_MS)
        command: list[EncodableT] = ["XREAD", "COUNT", count]
        if block_ms:
            command += ["BLOCK", block_ms]
        command += ["STREAMS", self._key(thread_id), after or "0-0"]
        with redis_errors():
            [found] = await redis_client.round_trip(
                self._waiting_client if block_ms else self._client,
                [command],
                wait_seconds=block_ms / 1000,
            )
        events: list[StoredEvent] = []
        # The server's reply, no response callback: RESP2 (redis-py's default) answers
        # [[key, entries]], a REDIS_URL asking for protocol=3 {key: entries}; nil when
        # nothing came. An entry is [id, [field, value, ...]].
        streams: list[Any] = (
            list(found.values())
            if isinstance(found, dict)
            else [entries for _key, entries in found or []]
        )
        for entries in streams:
            for event_id, fields in entries:
                values = dict(zip(fields[::2], fields[1::2], strict=True))
                # Keys are bytes, or str with decode_responses.
                raw = values[b"d"] if b"d" in values else values["d"]
                previous = values.get(b"p", values.get("p"))
                events.append(
                    StoredEvent(
                        _text(event_id),
                        json.loads(raw),
                        None if previous is None else _text(previous),
                    )
                )
        return events

    def valid_id(self, event_id: str) -> bool:
        return bool(_STREAM_ID.fullmatch(event_id))

    async def resume_point(self, thread_id: str, after: str) -> ResumePoint:
        if event_order(after) == (0, 0):
            return ResumePoint.KEPT
        with redis_errors():
            found = await redis_client.run_script(
                self._client, self._resume_point, [self._key(thread_id)], []
            )
        seconds, micros, *log = found
        if not log:
            # None kept: a log expired or deleted starts again at the server's clock (an
            # id is the time of its append in ms), past every id it gave out before.
            now = (int(seconds) * 1000 + int(micros) // 1000, 0)
            return ResumePoint.KEPT if event_order(after) <= now else ResumePoint.PAST_NEWEST
        newest, newest_dropped, oldest_kept = (_text(value) for value in log[:3])
        if event_order(after) > event_order(newest):
            return ResumePoint.PAST_NEWEST
        if newest_dropped:
            trimmed = event_order(after) < event_order(newest_dropped)
        else:
            # Its oldest kept entry names no predecessor: the log's first, or one written
            # before entries carried it (an older release), whose dropped predecessor is
            # unknown: any id below it may have missed some.
            trimmed = int(log[3]) > 0 and event_order(after) < event_order(oldest_kept)
        return ResumePoint.TRIMMED if trimmed else ResumePoint.KEPT

    async def delete(self, thread_id: str) -> None:
        with redis_errors():
            await self._client.delete(self._key(thread_id))
