"""The Redis hot tier: cached workflow records, write intents, fenced locks.

Layout, all keys hash-tagged with the thread id (one cluster slot per thread) and
namespaced by the cold store they cache (`hot_namespace`: two stores may share
one Redis):

- `{tid}:<ns>:wf`     hash: `version`, `schema_version`, `created_at`,
                      `updated_at`, `fence`, one `s:<section>` field per section
                      (JSON), and one `i:<token>` field per write in flight (its
                      deadline on the server clock, in microseconds).
- `{name}:<ns>:lock`  lock owner token, `SET NX PX`.
- `{name}:<ns>:fence` last fencing token issued for that lock name.

Write intents (`i:` fields) are what keep a half-finished write from leaving a
stale copy: while one is present the record is not served (see `read`), and
`state.tiered` explains who adds and removes them and why that is race-free.
Deadlines and read times come from the server's `TIME`, so every worker
compares them on one clock.

Every read-modify-write is one Lua script, so concurrent writers never lose
each other's changes. Scripts never decode JSON.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..errors import BackendUnavailable
from ..ports import JSON, HotRead, Lock, TierHealth, WorkflowRecord, WriteIntent, timed_probe
from ..schema import CURRENT
from . import redis_client
from .redis_client import LUA_SLICED, hot_key

WORKFLOW_KIND = "wf"
LOCK_KIND = "lock"
FENCE_KIND = "fence"
# The health probe's key (`{health}:<namespace>:health`), and how long it lives.
HEALTH_THREAD = HEALTH_KIND = "health"
HEALTH_PROBE_TTL_MS = 60_000
SECTION_PREFIX = "s:"
INTENT_PREFIX = "i:"
LEASE_PREFIX = "r:"
# How long an entry a fill lease created lives if nothing is installed in it.
LEASE_ENTRY_MS = 60_000
# The fence counter outlives any lock on it; it is re-seeded from the clock if lost.
FENCE_RETENTION_MS = 7 * 24 * 3600 * 1000

# The whole entry, and on a miss (no record, or one a write intent hides) the server clock
# too, in one step; a miss also takes a fill lease, ARGV[1], which an install presents and
# every install or invalidation revokes (an entry created for it expires in ARGV[2] ms).
# A copy of another schema version is a miss too (`_record_from_hash`), so it takes one.
# A record served needs no clock (only a miss's install uses it): one command less per hit.
# KEYS[1] record; ARGV[3] the current schema version. Returns {seconds, microseconds (0, 0
# if served), fields, the lease field (new or shared) or 0 if served}.
_READ = """
local flat = redis.call('HGETALL', KEYS[1])
local versioned, current, hidden, lease = false, false, false, nil
for i = 1, #flat, 2 do
  local prefix = string.sub(flat[i], 1, 2)
  if prefix == 'i:' then hidden = true end
  if prefix == 'r:' then lease = flat[i] end
  if flat[i] == 'version' then versioned = true end
  if flat[i] == 'schema_version' and flat[i + 1] == ARGV[3] then current = true end
end
if versioned and current and not hidden then return {0, 0, flat, 0} end
local now = redis.call('TIME')
-- One lease per entry, shared by the misses since the last install or invalidation
-- (which revoke it as they would each): a field per miss piled up on a hidden entry.
if lease then return {now[1], now[2], flat, lease} end
redis.call('HSET', KEYS[1], ARGV[1], '1')
-- An entry the HSET created (nothing read) has no TTL yet: no PTTL to ask.
if #flat == 0 or redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {now[1], now[2], flat, ARGV[1]}
"""

# Register a write intent, creating the entry if absent. The entry is kept at least
# until the intent's deadline (an expired key would take the intent with it) and an
# entry the intent created expires with the hot TTL, so intents never linger.
# With ARGV[4] '1', the cached record (and fill leases) goes first, other intents stay: a
# create's invalidation in the same step, not a round trip of its own.
# KEYS[1] record; ARGV[1] intent field, ARGV[2] bound ms, ARGV[3] ttl seconds, ARGV[4] '1'
# to clear. Returns the server clock (microseconds) at registration.
_BEGIN_WRITE = (
    LUA_SLICED
    + """
if ARGV[4] == '1' then
  local record = {}
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(field, 1, 2) ~= 'i:' then record[#record + 1] = field end
  end
  if #record > 0 then sliced('HDEL', KEYS[1], record) end
end
local now = redis.call('TIME')
local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
redis.call('HSET', KEYS[1], ARGV[1], string.format('%.0f', clock + tonumber(ARGV[2]) * 1000))
-- An entry whose TTL already outlasts the deadline keeps it: a PEXPIRE to the TTL it has
-- (time stands still in a script) was a command per write for nothing.
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], math.max(tonumber(ARGV[3]) * 1000, tonumber(ARGV[2])))
elseif ttl < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return string.format('%.0f', clock)
"""
)

# Replace the whole cached record unless the cache holds a newer version, and drop
# write intents: the caller's own, and those whose deadline is before ARGV[4].
# Every other intent survives the replacement, so the entry stays hidden; fill leases
# do not (a reader that read before this may not install what it read).
# The field ARGV[5] (the intent of the write that produced the record, or a reader's
# lease) must still be there: if the entry lost it, a newer version may have been cached
# and lost since, and a writer's record goes (the entry may hold an older one).
# KEYS[1] record; ARGV[1] version, ARGV[2] ttl seconds, ARGV[3] own intent field or '',
# ARGV[4] clock (microseconds) or '', ARGV[5] required field or '', ARGV[6..]
# field/value pairs.
_INSTALL = (
    LUA_SLICED
    + """
-- The fields once, then the version and every intent's deadline in one HMGET: a command
-- per intent (and one for the required field) made installs cost twice what they do.
local fields, asked, present = redis.call('HKEYS', KEYS[1]), {'version'}, ARGV[5] == ''
for _, field in ipairs(fields) do
  if field == ARGV[5] then present = true end
  if string.sub(field, 1, 2) == 'i:' then asked[#asked + 1] = field end
end
if not present then
  if string.sub(ARGV[5], 1, 2) == 'i:' then
    local record = {}
    for _, field in ipairs(fields) do
      if string.sub(field, 1, 2) ~= 'i:' then record[#record + 1] = field end
    end
    if #record > 0 then sliced('HDEL', KEYS[1], record) end
  end
  return 0
end
local values = sliced('HMGET', KEYS[1], asked)
local kept, dropped = {}, {}
for i = 2, #asked do
  local field, deadline = asked[i], values[i]
  if field == ARGV[3] or (ARGV[4] ~= '' and tonumber(deadline) < tonumber(ARGV[4])) then
    dropped[#dropped + 1] = field
  else
    kept[#kept + 1] = field
    kept[#kept + 1] = deadline
  end
end
local cached = values[1]
if cached and tonumber(cached) > tonumber(ARGV[1]) then
  if #dropped > 0 then
    sliced('HDEL', KEYS[1], dropped)
  end
  return 0
end
redis.call('DEL', KEYS[1])
-- One HSET for the whole record (and one for the surviving intents), but past `unpack`'s
-- limit (`sliced`): a command per field made installs the bulk of the hot tier's work.
sliced('HSET', KEYS[1], ARGV, 6)
if #kept > 0 then
  sliced('HSET', KEYS[1], kept)
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""
)

# Drop the cached record but keep write intents: a writer in flight still hides the
# entry from readers installing what they read meanwhile. KEYS[1] record.
_INVALIDATE = (
    LUA_SLICED
    + """
local record = {}
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(field, 1, 2) ~= 'i:' then
    record[#record + 1] = field
  end
end
if #record > 0 then
  sliced('HDEL', KEYS[1], record)
end
return #record
"""
)

# Take the lock and issue the next fencing token in one step. The token is at least
# the server clock in microseconds, so it stays monotonic even if the counter is lost
# (restart without persistence, eviction, failover).
# KEYS[1] lock, KEYS[2] fence; ARGV[1] token, ARGV[2] ttl ms, ARGV[3] fence retention ms.
_ACQUIRE_LOCK = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return 0 end
local current = tonumber(redis.call('GET', KEYS[2]))
-- Held with this token: this very call ran already (its reply was lost and the client
-- sent it again), and holds the lock with the token it was issued then.
if held and current then return current end
if not held then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
local now = redis.call('TIME')
local clock = tonumber(now[1]) * 1000000 + tonumber(now[2])
local fence = math.max((current or 0) + 1, clock)
redis.call('SET', KEYS[2], string.format('%.0f', fence), 'PX', ARGV[3])
return fence
"""

# Extend the lock only if the caller's token still owns it. KEYS[1] lock; ARGV[1] token,
# ARGV[2] ttl ms.
_RENEW_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
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

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        namespace: str,
        probe_client: aioredis.Redis | None = None,
    ) -> None:
        self._client = client
        # The health probe's client, its pool apart (`PROBE_CONNECTIONS`): with every
        # connection of `client`'s pool in use (a burst), the probe measures Redis, not
        # the pool. Closed with the store.
        self._probe_client = probe_client or client
        # Which cold store's records these are (`hot_namespace`).
        self._namespace = namespace
        self._read = client.register_script(_READ)
        self._begin_write = client.register_script(_BEGIN_WRITE)
        self._install = client.register_script(_INSTALL)
        self._invalidate = client.register_script(_INVALIDATE)
        self._acquire_lock = client.register_script(_ACQUIRE_LOCK)
        self._release_lock = client.register_script(_RELEASE_LOCK)
        self._renew_lock = client.register_script(_RENEW_LOCK)

    # ----------------------------------------------------------------- records

    def key(self, thread_id: str, kind: str = WORKFLOW_KIND) -> str:
        return hot_key(thread_id, kind, namespace=self._namespace)

    async def read(self, thread_id: str) -> HotRead:
        lease = LEASE_PREFIX + secrets.token_hex(8)
        with redis_errors():
            seconds, micros, flat, leased = await redis_client.run_script(
                self._client,
                self._read,
                [self.key(thread_id)],
                [lease, LEASE_ENTRY_MS, CURRENT["workflow"]],
            )
        fields = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
        observed_at = int(seconds) * 1_000_000 + int(micros)
        taken = None if leased == 0 else _text(leased)
        if any(field.startswith(INTENT_PREFIX) for field in fields):
            return HotRead(None, observed_at, pending=True, lease=taken)
        record = _record_from_hash(thread_id, fields)
        return HotRead(record, observed_at, lease=None if record is not None else taken)

    async def get(self, thread_id: str) -> WorkflowRecord | None:
        return (await self.read(thread_id)).record

    async def begin_write(
        self,
        thread_id: str,
        *,
        bound_ms: int,
        ttl_seconds: int,
        token: str | None = None,
        clear: bool = False,
    ) -> WriteIntent:
        token = token or secrets.token_hex(8)
        with redis_errors():
            registered_at = await redis_client.run_script(
                self._client,
                self._begin_write,
                [self.key(thread_id)],
                [INTENT_PREFIX + token, bound_ms, ttl_seconds, "1" if clear else "0"],
            )
        return WriteIntent(thread_id, token, int(registered_at))

    async def abandon_write(self, intent: WriteIntent) -> None:
        with redis_errors():
            await self._client.hdel(self.key(intent.thread_id), INTENT_PREFIX + intent.token)

    async def install(
        self,
        record: WorkflowRecord,
        *,
        ttl_seconds: int,
        intent: WriteIntent | None = None,
        expired_before: int | None = None,
        lease: str | None = None,
        written: bool = False,
    ) -> bool:
        own = "" if intent is None else INTENT_PREFIX + intent.token
        args: list[str | int] = [
            record.version,
            ttl_seconds,
            own,
            "" if expired_before is None else expired_before,
            own if written else lease or "",
        ]
        for field, value in _hash_from_record(record).items():
            args += [field, value]
        with redis_errors():
            installed = await redis_client.run_script(
                self._client, self._install, [self.key(record.thread_id)], args
            )
        return bool(installed)

    async def invalidate(self, thread_id: str) -> None:
        with redis_errors():
            await redis_client.run_script(self._client, self._invalidate, [self.key(thread_id)], [])

    # ----------------------------------------------------------------- locks

    async def acquire_lock(self, name: str, *, ttl_ms: int) -> Lock | None:
        token = secrets.token_hex(16)
        with redis_errors():
            fence = int(
                await redis_client.run_script(
                    self._client,
                    self._acquire_lock,
                    [self.key(name, LOCK_KIND), self.key(name, FENCE_KIND)],
                    [token, ttl_ms, max(FENCE_RETENTION_MS, ttl_ms)],
                )
            )
        if fence == 0:
            return None
        return Lock(name=name, token=token, fence=fence, ttl_ms=ttl_ms)

    async def lock_ttl_ms(self, name: str) -> int | None:
        with redis_errors():
            remaining = int(await self._client.pttl(self.key(name, LOCK_KIND)))
        return remaining if remaining >= 0 else None

    async def release_lock(self, lock: Lock) -> bool:
        with redis_errors():
            released = await redis_client.run_script(
                self._client, self._release_lock, [self.key(lock.name, LOCK_KIND)], [lock.token]
            )
        return bool(released)

    async def renew_lock(self, lock: Lock) -> bool:
        with redis_errors():
            renewed = await redis_client.run_script(
                self._client,
                self._renew_lock,
                [self.key(lock.name, LOCK_KIND)],
                [lock.token, lock.ttl_ms],
            )
        return bool(renewed)

    # ----------------------------------------------------------------- lifecycle

    async def health(self) -> TierHealth:
        return await timed_probe(self.name, self._ping, errors=(BackendUnavailable,))

    async def _ping(self) -> None:
        """A write, not a PING: a Redis at its `maxmemory` with nothing it may evict
        answers PING but refuses every write, and a hot tier that takes no write is down
        for this app (each goes to the cold tier) however promptly it answers."""
        with redis_errors():
            await self._probe_client.set(
                self.key(HEALTH_THREAD, HEALTH_KIND), 1, px=HEALTH_PROBE_TTL_MS
            )

    async def close(self) -> None:
        if self._probe_client is not self._client:
            await self._probe_client.aclose()
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


def _record_from_hash(thread_id: str, fields: dict[str, str]) -> WorkflowRecord | None:
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
