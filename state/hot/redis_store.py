"""The Redis hot tier: cached workflow records, atomic section/field writes, fenced locks.

Layout, all keys hash-tagged with the thread id (one cluster slot per thread):

- `{tid}:wf`     hash: `version`, `schema_version`, `created_at`, `updated_at`,
                 `fence`, and one `s:<section>` field per section (JSON). HSET
                 leaves the key's TTL alone, so section writes keep it by nature.
- `{name}:lock`  lock owner token, `SET NX PX`.
- `{name}:fence` last fencing token issued for that lock name.

Every read-modify-write is one Lua script, so concurrent writers never lose
each other's changes. Scripts never decode JSON they do not have to: only
`update_field` decodes the one section it edits, and only when that section
survives Lua's cjson round trip unchanged (see `_UPDATE_FIELD`).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..errors import BackendUnavailable
from ..ports import JSON, Lock, TierHealth, WorkflowRecord
from ..schema import CURRENT
from ..settings import Settings
from .redis_client import hot_key

WORKFLOW_KIND = "wf"
LOCK_KIND = "lock"
FENCE_KIND = "fence"
SECTION_PREFIX = "s:"
# The fence counter outlives any lock on it; it is re-seeded from the clock if lost.
FENCE_RETENTION_MS = 7 * 24 * 3600 * 1000

# What the section-editing scripts answer (see each script).
DONE, NOT_CACHED, TRY_AGAIN, NOT_AN_OBJECT = 1, 0, -1, -2

# Replace the whole cached record unless the cache holds a newer version.
# KEYS[1] record; ARGV[1] version, ARGV[2] ttl seconds, ARGV[3..] field/value pairs.
_INSTALL = """
local cached = redis.call('HGET', KEYS[1], 'version')
if cached and tonumber(cached) > tonumber(ARGV[1]) then
  return 0
end
redis.call('DEL', KEYS[1])
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# Replace one section of a cached record; with a version, only if the cache is older.
# KEYS[1] record; ARGV[1] section field, ARGV[2] JSON, ARGV[3] version or '', ARGV[4] now.
_MERGE_SECTION = """
local cached = redis.call('HGET', KEYS[1], 'version')
if not cached then
  return 0
end
if ARGV[3] ~= '' then
  if tonumber(cached) >= tonumber(ARGV[3]) then
    return 0
  end
  redis.call('HSET', KEYS[1], 'version', ARGV[3])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], 'updated_at', ARGV[4])
return 1
"""

# Set one field of one (object) section. cjson turns `[]` into `{}`, keeps only 14
# significant digits and writes 640.0 as 640, so a section holding an empty array,
# a 15+ digit run or a whole-valued float is not re-encoded here: the script answers
# -1 and the caller falls back to a compare-and-set of the whole section. The new
# value itself is never decoded: a random marker stands in for it during encoding
# and is then replaced by its JSON.
# KEYS[1] record; ARGV[1] section field, ARGV[2] field name, ARGV[3] value JSON,
# ARGV[4] marker, ARGV[5] now. Returns 1 done, 0 not cached, -1 unsafe, -2 not an object.
_UPDATE_FIELD = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local section = {}
if raw then
  if string.sub(raw, 1, 1) ~= '{' then
    return -2
  end
  if string.find(raw, '%[%s*%]') or string.find(raw, string.rep('%d', 15))
      or string.find(raw, '%d%.0[^%d]') then
    return -1
  end
  section = cjson.decode(raw)
end
section[ARGV[2]] = ARGV[4]
local encoded = cjson.encode(section)
local first, last = string.find(encoded, '"' .. ARGV[4] .. '"', 1, true)
encoded = string.sub(encoded, 1, first - 1) .. ARGV[3] .. string.sub(encoded, last + 1)
redis.call('HSET', KEYS[1], ARGV[1], encoded, 'updated_at', ARGV[5])
return 1
"""

# Replace a section only if it still holds what the caller read ('' = absent).
# KEYS[1] record; ARGV[1] section field, ARGV[2] expected JSON, ARGV[3] new JSON, ARGV[4] now.
# Returns 1 done, 0 not cached, -1 changed meanwhile.
_COMPARE_AND_SET_SECTION = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local raw = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if raw ~= ARGV[2] then
  return -1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3], 'updated_at', ARGV[4])
return 1
"""

# Take the lock and issue the next fencing token in one step. The token is at least
# the server clock in microseconds, so it stays monotonic even if the counter is lost
# (restart without persistence, eviction, failover).
# KEYS[1] lock, KEYS[2] fence; ARGV[1] token, ARGV[2] ttl ms, ARGV[3] fence retention ms.
_ACQUIRE_LOCK = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 0
end
local now = redis.call('TIME')
local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
local fence = math.max((tonumber(redis.call('GET', KEYS[2])) or 0) + 1, clock)
redis.call('SET', KEYS[2], string.format('%.0f', fence), 'PX', ARGV[3])
return fence
"""

# Delete the lock only if the caller's token still owns it.
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _dumps(value: JSON) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _now() -> str:
    return datetime.now(UTC).isoformat()


@contextmanager
def redis_errors() -> Iterator[None]:
    """Any Redis failure (down, timeout, out of memory, read-only replica) is the tier's."""
    try:
        yield
    except RedisError as exc:
        raise BackendUnavailable("redis", f"{type(exc).__name__}: {exc}") from exc


class RedisHotStore:
    """`HotStateStore` over one redis.asyncio client (standalone or cluster-safe keys)."""

    name = "redis"

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        self._client = client
        self._settings = settings
        self._install = client.register_script(_INSTALL)
        self._merge_section = client.register_script(_MERGE_SECTION)
        self._update_field = client.register_script(_UPDATE_FIELD)
        self._compare_and_set_section = client.register_script(_COMPARE_AND_SET_SECTION)
        self._acquire_lock = client.register_script(_ACQUIRE_LOCK)
        self._release_lock = client.register_script(_RELEASE_LOCK)

    # ----------------------------------------------------------------- records

    async def get(self, thread_id: str) -> WorkflowRecord | None:
        with redis_errors():
            fields = await self._client.hgetall(hot_key(thread_id, WORKFLOW_KIND))
        return _record_from_hash(thread_id, fields)

    async def install(self, record: WorkflowRecord, *, ttl_seconds: int) -> bool:
        args: list[str | int] = [record.version, ttl_seconds]
        for field, value in _hash_from_record(record).items():
            args += [field, value]
        with redis_errors():
            installed = await self._install(
                keys=[hot_key(record.thread_id, WORKFLOW_KIND)], args=args
            )
        return bool(installed)

    async def merge_section(
        self, thread_id: str, section: str, value: JSON, *, version: int | None = None
    ) -> bool:
        args = [SECTION_PREFIX + section, _dumps(value), "" if version is None else version, _now()]
        with redis_errors():
            merged = await self._merge_section(keys=[hot_key(thread_id, WORKFLOW_KIND)], args=args)
        return bool(merged)

    async def update_field(self, thread_id: str, section: str, field: str, value: JSON) -> bool:
        key = hot_key(thread_id, WORKFLOW_KIND)
        section_field = SECTION_PREFIX + section
        encoded = _dumps(value)
        marker = f"__value_{secrets.token_hex(16)}__"
        with redis_errors():
            outcome = int(
                await self._update_field(
                    keys=[key], args=[section_field, field, encoded, marker, _now()]
                )
            )
            if outcome == TRY_AGAIN:
                outcome = await self._update_field_by_compare_and_set(key, section, field, value)
        if outcome == NOT_AN_OBJECT:
            raise ValueError(f"section {section!r} of {thread_id!r} is not a JSON object")
        return outcome == DONE

    async def _update_field_by_compare_and_set(
        self, key: str, section: str, field: str, value: JSON
    ) -> int:
        """Edit the section in Python and write it back only if nobody changed it meanwhile.

        Lock-free: a failed compare means another writer succeeded, so this terminates.
        """
        section_field = SECTION_PREFIX + section
        while True:
            raw = await self._client.hget(key, section_field)
            current = json.loads(raw) if raw is not None else {}
            if not isinstance(current, dict):
                return NOT_AN_OBJECT
            current[field] = value
            outcome = int(
                await self._compare_and_set_section(
                    keys=[key],
                    args=[section_field, raw or b"", _dumps(current), _now()],
                )
            )
            if outcome != TRY_AGAIN:
                return outcome

    async def invalidate(self, thread_id: str) -> None:
        with redis_errors():
            await self._client.delete(hot_key(thread_id, WORKFLOW_KIND))

    async def ttl(self, thread_id: str) -> int:
        with redis_errors():
            return int(await self._client.ttl(hot_key(thread_id, WORKFLOW_KIND)))

    # ----------------------------------------------------------------- locks

    async def acquire_lock(self, name: str, *, ttl_ms: int) -> Lock | None:
        token = secrets.token_hex(16)
        with redis_errors():
            fence = int(
                await self._acquire_lock(
                    keys=[hot_key(name, LOCK_KIND), hot_key(name, FENCE_KIND)],
                    args=[token, ttl_ms, max(FENCE_RETENTION_MS, ttl_ms)],
                )
            )
        if fence == 0:
            return None
        return Lock(name=name, token=token, fence=fence, ttl_ms=ttl_ms)

    async def release_lock(self, lock: Lock) -> bool:
        with redis_errors():
            released = await self._release_lock(
                keys=[hot_key(lock.name, LOCK_KIND)], args=[lock.token]
            )
        return bool(released)

    # ----------------------------------------------------------------- lifecycle

    async def health(self) -> TierHealth:
        started = time.perf_counter()
        try:
            with redis_errors():
                await self._client.ping()
        except BackendUnavailable as exc:
            return TierHealth(self.name, up=False, detail=str(exc))
        return TierHealth(self.name, up=True, latency_ms=(time.perf_counter() - started) * 1000)

    async def close(self) -> None:
        await self._client.aclose()


def _hash_from_record(record: WorkflowRecord) -> dict[str, str | int]:
    fields: dict[str, str | int] = {
        "version": record.version,
        "schema_version": record.schema_version,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "fence": record.fence,
    }
    for section, value in record.sections.items():
        fields[SECTION_PREFIX + section] = _dumps(value)
    return fields


def _record_from_hash(thread_id: str, raw: dict[Any, Any]) -> WorkflowRecord | None:
    fields = {_text(key): _text(value) for key, value in raw.items()}
    # A copy cached by other code (another schema) is a miss: the cold tier re-reads
    # it through the upcasters and installs the current shape.
    if "version" not in fields or fields.get("schema_version") != str(CURRENT["workflow"]):
        return None
    try:
        return WorkflowRecord(
            thread_id=thread_id,
            version=int(fields["version"]),
            sections={
                key.removeprefix(SECTION_PREFIX): json.loads(value)
                for key, value in fields.items()
                if key.startswith(SECTION_PREFIX)
            },
            schema_version=int(fields["schema_version"]),
            created_at=fields.get("created_at", ""),
            updated_at=fields.get("updated_at", ""),
            fence=int(fields.get("fence", 0)),
        )
    except ValueError:
        # A damaged copy is a miss, not a failed call: the cold read re-installs it whole.
        return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
