"""The write-behind log on Redis: checkpoint work acknowledged before the cold tier has it.

Per thread (hash tag `{thread_id}`, so one cluster slot), next to the cache entry
of `redis_checkpoints`:

- `wb-log`: a stream of unflushed operations, one entry per put / put_writes
  (a cache miss checks it in its lease script: `LOG_KIND`),
  holding everything the cold tier needs (the same fields as the cache entry) and
  the entry format (`f`, the cache's `ENTRY_FORMAT`);
- `wb-flushing`: the flush lock (token, expiring), so one flusher at a time
  applies a thread's entries, in order; a dead flusher's lock expires and
  another takes the thread over. The token is the server's clock in
  microseconds when the lock was taken: each holder's is larger than every
  earlier one's, even after the key was lost (FLUSHALL), so the cold store can
  refuse a batch from a holder paused past its lock (`CheckpointStore.apply_batch`);
- `wb-epochs`: per epoch (`redis_values`: where a large value lives, a version
  appending to the last) the number of unflushed entries referring to it, which
  keeps it from expiring; `wb-references`: per entry id, the epochs it refers to,
  so acknowledging the entry releases them;
- `wb-fence`: the highest fencing token a writer presented. Write-through checkpoint
  writes check and raise the same key (`RedisCheckpointFence`) before their cold
  write, so both write modes keep one fence per thread. It has a TTL, renewed by
  every fenced write: a write that finds none is refused (`FenceUnknown`) until its
  caller checked the token against the thread's durable fence;
- `wb-expiring`: set by the discard that begins the retention sweep's deletion of the
  thread: appends are refused (`ThreadExpiring`) until the sweep ends, so nothing reaches
  the log that a flusher could apply onto the deleted thread. It holds the server time
  the refusal ends at rather than a TTL (an evicted mark would let appends in);
- `wb-deleted`: set by every discard (the thread is being deleted) to the server time in
  microseconds, for the hot TTL: a put from a checkpoint made before it finds its parent
  deleted, not lost (`deleted_since`). Evicted or lost with the thread's other keys, it
  leaves that put reported as a loss, the cautious answer.

An append is one script: fence check, cache advance, stream entry, all atomic in
the thread's slot. It is pipelined (same round trip) with a second script on the
shared `{wb:<store>}` slot that lists the thread as dirty: `dirty` (score bumped
by every append, so a flusher can tell whether anything arrived while it
flushed), `since` (when the thread became dirty: the backlog's age) and
`entries` (a count for health and metrics), and `stuck` (per thread, the entry the
cold store refused for good, with its reason: cleared by the thread's next `ack` or
unlisting). The append goes first, so a thread
is never listed after its entry is lost, only (harmlessly) listed with nothing
to flush. None of these keys has a TTL except the fence and the deleted mark: under a
volatile-* eviction policy the others are never evicted.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from ..errors import (
    BackendUnavailable,
    CorruptState,
    FenceUnknown,
    LockLost,
    LogEntryDamaged,
    LogEntryLost,
    LogEntryTooLarge,
    StaleFencingToken,
    StateError,
    StillWriting,
    ThreadExpiring,
    UnknownParent,
    UnsupportedSchemaVersion,
)
from ..ports import (
    Backlog,
    CheckpointPut,
    FlushOp,
    LogEntry,
    StoredBlob,
    StoredCheckpoint,
    StoredWrite,
    StuckEntry,
    WritesPut,
    checkpoint_time_us,
)
from . import redis_client
from .redis_checkpoints import (
    ENTRY_FORMAT,
    LOG_KIND,
    LUA_HELPERS,
    RedisCheckpointCache,
    blob_fields,
    checkpoint_fields,
    parse_write,
    unpack,
    untyped,
    write_fields,
)
from .redis_client import LUA_SLICE, LUA_SLICED, Command, hot_key
from .redis_values import (
    REFERENCE_TYPE,
    STAGED_TTL_MS,
    EpochBytes,
    Reference,
    ValuePlan,
    complete,
    read_plan,
    resolve,
)

# Key kind of each entry's epochs (`redis_values`).
REFERENCES_KIND = "wb-references"
# Key kind of the thread's flush lock.
FLUSH_LOCK_KIND = "wb-flushing"
# Key kind of the mark that refuses appends to a thread the retention sweep is deleting.
EXPIRING_KIND = "wb-expiring"
# Key kind of the mark a discard leaves: when the thread was deleted.
DELETED_KIND = "wb-deleted"
# Values a stream entry holds besides the operation's fields (`_APPEND_PUT`'s `op`, `f`,
# `ns`; `_APPEND_WRITES`' also `cid`, `upsert`): one XADD takes the whole entry, applied
# whole, so an operation of more than LUA_SLICE values in all is not logged (`_put_call`,
# `_writes_call`): it goes to the cold tier instead.
PUT_ENTRY_HEAD = 6
WRITES_ENTRY_HEAD = 10
# Tries of a thread's delete against appends still landing (each lists its epochs anew).
DISCARD_ATTEMPTS = 5
# Entries whose epochs `read` keeps for their `ack` (beyond: asked of Redis again).
REMEMBERED_ENTRIES = 100_000
# An append: its keys, arguments, fence (as `_fence_arg` sends it), and the new epochs to
# SET ahead of it.
_Call = tuple[list[str], list[Any], str, list[tuple[str, bytes]]]

# Fence check shared by both appends and the write-through admit. `presented`: '' for
# none, else the token, with a trailing '!' once the caller checked it against the
# thread's durable fence. Returns the highest token seen if the presented one is lower,
# -1 if Redis holds no fence for the thread (new, or its key expired or was evicted: a
# stale writer must not pass for the first one) unless checked, else nil (the fence is
# raised to the token).
_FENCE = """
local function fenced(fence_key, presented, ttl)
  if presented == '' then return nil end
  local checked = string.sub(presented, -1) == '!'
  local token = checked and string.sub(presented, 1, -2) or presented
  -- Set again at every write, the newest writer's included: it expires only with a
  -- thread that stopped. One command for a writer at or above the fence (the usual
  -- case); a refused one puts back what it replaced (renewing its TTL: a longer-lived
  -- fence refuses no more than the same fence would).
  local held = redis.call('SET', fence_key, token, 'EX', ttl, 'GET')
  if not held then
    if checked then return nil end
    redis.call('DEL', fence_key)
    return -1
  end
  local seen = tonumber(held)
  if tonumber(token) < seen then
    redis.call('SET', fence_key, held, 'EX', ttl)
    return seen
  end
  return nil
end
"""

# Whether the log holds the put of checkpoint `id` in namespace `ns`.
_LOGGED = """
local function logged(log, ns, id)
  for _, entry in ipairs(redis.call('XRANGE', log, '-', '+')) do
    local fields, op, at, head = entry[2], nil, nil, nil
    for i = 1, #fields, 2 do
      local name = fields[i]
      if name == 'op' then op = fields[i + 1]
      elseif name == 'ns' then at = fields[i + 1]
      elseif name == 'head' then head = fields[i + 1] end
    end
    if op == 'put' and at == ns and head and string.find(head, id, 1, true)
        and cjson.decode(head)['id'] == id then
      return true
    end
  end
  return false
end
"""

# Whether the expiring mark KEYS[i] refuses appends now: it holds the server time (ms) the
# refusal ends at, and has no TTL, so a volatile-* eviction policy never evicts it.
_EXPIRING = """
local function expiring(i)
  local until_ms = redis.call('GET', KEYS[i])
  if not until_ms then return false end
  -- The release before set '1' with a TTL (a rolling deployment): its TTL is its deadline.
  if redis.call('PTTL', KEYS[i]) > 0 then return true end
  local now = redis.call('TIME')
  if tonumber(until_ms) > tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) then
    return true
  end
  redis.call('DEL', KEYS[i])
  return false
end
"""

# KEYS: entry, namespace index, log, fence, held epochs, cached epochs, references, the
# expiring mark, the entry's other formats, then the put's epochs and the others the writer
# knows the entry refers to (`LUA_VALUES`).
# ARGV: id, parent, ttl, namespace, fence, '1' if the parent is known to be stored, the
# value ops (`LUA_VALUES`), then the checkpoint's name/value fields.
# Returns {cache outcome, highest fence or 0}; {-3, 0}, with nothing written, when the
# hot tier has no trace of the parent (no checkpoint cached, the parent not in the log):
# it may have lost it (FLUSHALL, a restart without persistence), which the caller checks;
# {-7, 0}, nothing written, when a newer checkpoint is cached (a fork): the caller checks
# the cold tier holds the parent, not deleted (nor kept only for a DeltaChannel history);
# {-4, 0}, nothing written, when an epoch is not at the length its writer saw; {-5, 0},
# nothing written, when Redis holds no fence to check the writer's against; {-6, 0},
# nothing written, when the thread is being deleted by the retention sweep.
_APPEND_PUT = (
    LUA_HELPERS
    + _EXPIRING
    + _FENCE
    + _LOGGED
    + """
if expiring(8) then return {-6, 0} end
local ops, known = value_ops(11, 7), declared(11)
local first = 8 + 4 * #ops
local stale = fenced(KEYS[4], ARGV[5], ARGV[3])
if stale == -1 then return {-5, 0} end
if stale then return {-2, stale} end
-- The entry's id when read here (nil otherwise), so `advance` need not read it again.
local head = nil
if ARGV[6] ~= '1' and ARGV[2] ~= '' then
  head = redis.call('HGET', KEYS[1], 'id')
  if head ~= ARGV[2] and not logged(KEYS[3], ARGV[4], ARGV[2]) then
    -- A fork goes on from an older checkpoint; a parent newer than the cached one is a
    -- step past it that Redis may have lost (a replica promoted while it lagged).
    if head and older(ARGV[2], head) then return {-7, 0} end
    return {-3, 0}
  end
end
if not values_ready(ops) then return {-4, 0} end
redis.call('DEL', KEYS[9], KEYS[10])
write_values(ops, KEYS[5], true, ARGV[3])
local moved = advance(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], first, ops, KEYS[6],
  KEYS[5], known, head)
local entry = {'op', 'put', 'f', '$ENTRY_FORMAT', 'ns', ARGV[4]}
for i = first, #ARGV do entry[#entry + 1] = ARGV[i] end
local entry_id = redis.call('XADD', KEYS[3], '*', unpack(entry))
if #ops > 0 then
  local epochs = {}
  for _, op in ipairs(ops) do epochs[#epochs + 1] = op.key end
  redis.call('HSET', KEYS[7], entry_id, cjson.encode(epochs))
end
return {moved, 0}
""".replace("$ENTRY_FORMAT", str(ENTRY_FORMAT))
)

# KEYS: entry, log, fence, expiring mark, the entry's other formats. ARGV: checkpoint id,
# '1' to upsert, ttl, namespace, fence, then the writes' name/value fields. Answers as
# `_APPEND_PUT`.
_APPEND_WRITES = (
    LUA_HELPERS
    + _EXPIRING
    + _FENCE
    + """
if expiring(4) then return {-6, 0} end
local stale = fenced(KEYS[3], ARGV[5], ARGV[3])
if stale == -1 then return {-5, 0} end
if stale then return {-2, stale} end
redis.call('DEL', KEYS[5], KEYS[6])
local added = add_writes(KEYS[1], ARGV[1], ARGV[2] == '1', ARGV[3], 6)
local entry = {'op', 'writes', 'f', '$ENTRY_FORMAT', 'ns', ARGV[4], 'cid', ARGV[1], 'upsert', ARGV[2]}
for i = 6, #ARGV do entry[#entry + 1] = ARGV[i] end
redis.call('XADD', KEYS[2], '*', unpack(entry))
return {added, 0}
""".replace("$ENTRY_FORMAT", str(ENTRY_FORMAT))
)

# KEYS: fence. ARGV: fence, ttl. Returns the highest fence seen if ARGV[1] is lower, -1 if
# there is none to check it against, else 0.
_ADMIT = (
    _FENCE
    + """
return fenced(KEYS[1], ARGV[1], ARGV[2]) or 0
"""
)

# KEYS: dirty, since, entries. ARGV: thread id, entries to count (an append's 1; to list a
# thread again, the entries its log holds), then '1' to count them only while the count is
# 0 (a re-listing). `since` only when the thread was not listed (its `dirty` score is 1 now):
# `dirty` and `since` list and unlist a thread together (`_SETTLE`), so a listed thread has
# its `since` already. A re-listed thread's entries were counted by their appends, unless the
# settle before it unlisted the last thread and zeroed the count after they landed: then the
# count reads 0 (with entries in this log), and they are counted here.
_MARK_DIRTY = """
if tonumber(redis.call('ZINCRBY', KEYS[1], 1, ARGV[1])) == 1 then
  local now = redis.call('TIME')
  redis.call('ZADD', KEYS[2], 'NX', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000), ARGV[1])
end
if ARGV[3] ~= '1' or tonumber(redis.call('GET', KEYS[3]) or '0') <= 0 then
  redis.call('INCRBY', KEYS[3], ARGV[2])
end
return 1
"""

# What the delete scripts answer when a put landed since the caller listed the thread's
# held epochs and cache namespaces (they delete nothing then; the caller lists again).
STALE_LISTING = -1
# `_DROP_LOST`'s other refusals: the entry lost nothing after all (an earlier flusher's
# late acknowledgement released its epochs as it removed it), or the caller's flush lock
# is no longer its own.
NOT_LOST = -2
NOT_LOCKED = -3

# Whether the held epochs KEYS[first..first + count - 1] are all the thread's (KEYS[3]).
_LISTED = """
local function listed(first, count)
  if redis.call('HLEN', KEYS[3]) ~= count then return false end
  for i = first, first + count - 1 do
    if redis.call('HEXISTS', KEYS[3], KEYS[i]) == 0 then return false end
  end
  return true
end
"""

# Sets the expiring mark to the server time `ms` from now (see `_EXPIRING`).
_REFUSAL = """
local function refuse(mark, ms)
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('SET', mark, string.format('%d', now_ms + tonumber(ms)))
end
"""

# KEYS: the expiring mark. ARGV: how many ms appends are refused.
_REFUSE = (
    _REFUSAL
    + """
refuse(KEYS[1], ARGV[1])
return 1
"""
)

# KEYS: log, references, held epochs, every epoch it listed (ARGV[1]: how many), the
# cache's namespace index and entries, the expiring mark, then the deleted mark. Deletes
# them all, sets the expiring mark to refuse appends for ARGV[2] ms unless it is '', the
# deleted mark to the server time (us) for ARGV[3] s, and returns how many entries the log
# held.
_DISCARD = (
    LUA_SLICED
    + _LISTED
    + _REFUSAL
    + """
if not listed(4, tonumber(ARGV[1])) then return -1 end
local length = redis.call('XLEN', KEYS[1])
sliced('DEL', KEYS[1], KEYS, 2)
if ARGV[2] ~= '' then refuse(KEYS[#KEYS - 1], ARGV[2]) end
local now = redis.call('TIME')
redis.call('SET', KEYS[#KEYS], now[1] .. string.format('%06d', tonumber(now[2])), 'EX', ARGV[3])
return length
"""
)

# KEYS: log, references, held epochs, flush lock, namespace index, the lost entry's
# epochs (ARGV[3]: how many; ARGV[5..]: the length it reads of each), the held epochs
# (ARGV[4]: how many), then the cache entry of each namespace listed (ARGV after the
# lengths), in every format. ARGV[1]: the flush lock's token, ARGV[2]: the entry's id.
# Deletes all but the lock, if the lock is the caller's and the entry, still in the log,
# is short of a value: an acknowledgement removes an entry and releases its epochs in one
# step, so that is a loss. Returns how many entries the log held.
_DROP_LOST = (
    LUA_SLICED
    + _LISTED
    + """
local epochs, held = tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('GET', KEYS[4]) ~= ARGV[1] then return -3 end
if #redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2]) == 0 then return -2 end
local short = false
for i = 1, epochs do
  if redis.call('STRLEN', KEYS[5 + i]) < tonumber(ARGV[4 + i]) then short = true end
end
if not short then return -2 end
if not listed(6 + epochs, held) then return -1 end
if redis.call('SCARD', KEYS[5]) ~= #ARGV - 4 - epochs then return -1 end
for i = 5 + epochs, #ARGV do
  if redis.call('SISMEMBER', KEYS[5], ARGV[i]) == 0 then return -1 end
end
local length = redis.call('XLEN', KEYS[1])
local lost = {KEYS[2], KEYS[3], KEYS[5]}
for i = 6, #KEYS do lost[#lost + 1] = KEYS[i] end
sliced('DEL', KEYS[1], lost)
return length
"""
)

# KEYS: dirty, since, entries, stuck. ARGV: thread id, marker ('' to unlist
# unconditionally). An unlisted thread has nothing stuck either.
_SETTLE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and (ARGV[2] == '' or tonumber(score) == tonumber(ARGV[2])) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[4], ARGV[1])
  if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('SET', KEYS[3], 0) end
  return 1
end
return 0
"""

# KEYS: log, references, held epochs, cached epochs, then the epochs the entries refer
# to. ARGV: ttl, then entry ids. An epoch no entry refers to any more expires with the
# cache if the cache refers to it, else goes. Returns {entries removed, entries left in
# the log, the oldest left's id or ''}.
_ACKNOWLEDGE = (
    LUA_SLICED
    + """
local function acknowledge(ttl, ids, epochs)
  local removed = sliced('XDEL', KEYS[1], ids)
  if epochs then
    for _, joined in ipairs(sliced('HMGET', KEYS[2], ids)) do
      if joined then
        for _, epoch in ipairs(cjson.decode(joined)) do
          if redis.call('HINCRBY', KEYS[3], epoch, -1) <= 0 then
            redis.call('HDEL', KEYS[3], epoch)
            if redis.call('HEXISTS', KEYS[4], epoch) == 1 then
              redis.call('EXPIRE', epoch, ttl)
            else
              redis.call('DEL', epoch)
            end
          end
        end
      end
    end
    sliced('HDEL', KEYS[2], ids)
  end
  local left = redis.call('XLEN', KEYS[1])
  local oldest = ''
  if left == 0 then
    redis.call('DEL', KEYS[1])
  else
    oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1][1]
  end
  return {removed, left, oldest}
end
"""
)

_ACK = (
    _ACKNOWLEDGE
    + """
local ttl = table.remove(ARGV, 1)
return acknowledge(ttl, ARGV, #KEYS > 4)
"""
)

# KEYS: as `_ACK`'s, but for the thread's namespace index and cache entries (ARGV[3]: how
# many) and then its flush lock after the cached epochs. ARGV: ttl, the id of the log's
# newest entry when the caller read it ('' for none), how many cache keys, the caller's lock
# token, then the entry ids. Drops the cache with the entries in one step, so an append
# after it finds a dropped checkpoint neither cached nor logged; {-1, 0, ''}
# (STALE_LISTING), nothing done, if an append landed since that read; {-3, 0, ''}
# (NOT_LOCKED) if the lock is no longer the caller's.
_DROP = (
    _ACKNOWLEDGE
    + """
local ttl = table.remove(ARGV, 1)
local seen = table.remove(ARGV, 1)
local cached = tonumber(table.remove(ARGV, 1))
local token = table.remove(ARGV, 1)
if redis.call('GET', KEYS[5 + cached]) ~= token then return {-3, 0, ''} end
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if (newest and newest[1] or '') ~= seen then return {-1, 0, ''} end
sliced('DEL', KEYS[5], KEYS, 6, 4 + cached)
return acknowledge(ttl, ARGV, #KEYS > 5 + cached)
"""
)

# KEYS: entries, since, stuck. ARGV: entries that left the thread's log, thread id, the
# time (ms) of its oldest entry left, or '' (none left). The count never goes below 0; a
# thread still listed is listed from its oldest unflushed entry on, not from when it first
# became dirty; with none left, from now: an append landing before the flusher unlists the
# thread keeps it listed, and its entry is no older than this (else the thread would look
# unflushed since the batch just flushed, to the backlog's age and the timer's pass).
# Entries leave in order (a discard takes the oldest too): its stuck entry, the oldest, left
# with any that did.
_ACKED = """
if redis.call('DECRBY', KEYS[1], ARGV[1]) < 0 then redis.call('SET', KEYS[1], 0) end
if tonumber(ARGV[1]) > 0 then redis.call('HDEL', KEYS[3], ARGV[2]) end
local oldest = ARGV[3]
if oldest == '' and tonumber(ARGV[1]) > 0 then
  local now = redis.call('TIME')
  oldest = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
end
if oldest ~= '' then redis.call('ZADD', KEYS[2], 'XX', oldest, ARGV[2]) end
return 1
"""

# KEYS: stuck, dirty. ARGV: thread id, entry id, the record as JSON. Records it with the
# server's time (s) unless that entry is recorded already, or the thread is no longer listed
# (0): a flusher past its lock, paused, may report an entry another process has discarded
# since, and a record of a thread nothing flushes any more would never be cleared.
_NOTE_STUCK = """
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held and cjson.decode(held)['entry_id'] == ARGV[2] then return 0 end
local now = redis.call('TIME')
local record = cjson.decode(ARGV[3])
record['since'] = string.format('%d.%06d', tonumber(now[1]), tonumber(now[2]))
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(record))
return 1
"""

# KEYS: lock. ARGV: TTL (ms). The token (the server's clock in microseconds), or nil
# while another holds the lock.
_LOCK = """
local now = redis.call('TIME')
local token = now[1] .. string.format('%06d', tonumber(now[2]))
if redis.call('SET', KEYS[1], token, 'NX', 'PX', ARGV[1]) then return token end
return false
"""

# KEYS: lock. ARGV: token (and, renewing, the TTL).
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


class RedisWriteBehindLog:
    """The `WriteBehindLog` port on Redis (see the module docstring)."""

    name = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        cache: RedisCheckpointCache,
        *,
        blocking_client: redis.Redis | None = None,
    ) -> None:
        self._client = client
        # For `BlockingAppends`: the same appends from a thread with no event loop.
        self._blocking_client = blocking_client
        self._cache = cache
        self._read_epochs: OrderedDict[tuple[str, str], list[str]] = OrderedDict()
        store = cache.namespace
        # Keys shared by every thread: one slot of their own.
        self._dirty = f"{{wb:{store}}}:dirty"
        self._since = f"{{wb:{store}}}:since"
        self._entries = f"{{wb:{store}}}:entries"
        self._stuck = f"{{wb:{store}}}:stuck"
        self._scripts = {
            name: (source, _sha(source))
            for name, source in {
                "put": _APPEND_PUT,
                "writes": _APPEND_WRITES,
                "dirty": _MARK_DIRTY,
                "settle": _SETTLE,
                "ack": _ACK,
                "drop": _DROP,
                "acked": _ACKED,
                "lock": _LOCK,
                "unlock": _UNLOCK,
                "renew": _RENEW,
                "refuse": _REFUSE,
                "discard": _DISCARD,
                "drop_lost": _DROP_LOST,
                "note_stuck": _NOTE_STUCK,
            }.items()
        }

    def _key(self, thread_id: str, kind: str) -> str:
        return _thread_key(self._cache, thread_id, kind)

    def _cache_entries(self, thread_id: str, namespaces: list[str]) -> list[str]:
        """The cache entries of the namespaces listed and the root's, in every format."""
        entries = [self._cache.key(thread_id, ns) for ns in {"", *namespaces}]
        return [*entries, *(other for key in entries for other in self._cache.other_formats(key))]

    # ----------------------------------------------------------------------- appends

    async def append_put(
        self,
        checkpoint: StoredCheckpoint,
        blobs: Sequence[StoredBlob],
        *,
        fence: int | None,
        fence_checked: bool = False,
        parent_stored: bool = False,
    ) -> None:
        fenced = _fence_arg(fence, fence_checked)
        for attempt in range(2):
            with self._put_attempt(checkpoint, blobs, fenced, parent_stored, attempt) as call:
                await self._append(checkpoint.thread_id, "put", call)
                return

    async def append_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[StoredWrite],
        *,
        upsert: bool,
        fence: int | None,
        fence_checked: bool = False,
    ) -> None:
        fenced = _fence_arg(fence, fence_checked)
        call = self._writes_call(thread_id, checkpoint_ns, checkpoint_id, writes, upsert, fenced)
        await self._append(thread_id, "writes", call)

    def append_put_blocking(
        self,
        checkpoint: StoredCheckpoint,
        blobs: Sequence[StoredBlob],
        *,
        fence: int | None,
        fence_checked: bool = False,
        parent_stored: bool = False,
    ) -> None:
        fenced = _fence_arg(fence, fence_checked)
        for attempt in range(2):
            with self._put_attempt(checkpoint, blobs, fenced, parent_stored, attempt) as call:
                self._append_blocking(checkpoint.thread_id, "put", call)
                return

    def append_writes_blocking(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[StoredWrite],
        *,
        upsert: bool,
        fence: int | None,
        fence_checked: bool = False,
    ) -> None:
        fenced = _fence_arg(fence, fence_checked)
        call = self._writes_call(thread_id, checkpoint_ns, checkpoint_id, writes, upsert, fenced)
        self._append_blocking(thread_id, "writes", call)

    @contextmanager
    def _put_attempt(
        self,
        checkpoint: StoredCheckpoint,
        blobs: Sequence[StoredBlob],
        fence: str,
        parent_stored: bool,
        attempt: int,
    ) -> Iterator[_Call]:
        """One try at a put: its call; its epochs remembered once it is logged, forgotten
        if not. An epoch that moved ends the first try quietly (the second sends the values
        whole), and the second as BackendUnavailable."""
        thread_id, checkpoint_ns = checkpoint.thread_id, checkpoint.checkpoint_ns
        plan = self._cache.plan_values(thread_id, checkpoint_ns, blobs)
        try:
            yield self._put_call(checkpoint, blobs, fence, parent_stored, plan)
        except _EpochMoved:
            self._cache.epochs.forget(thread_id, checkpoint_ns)
            if attempt:
                raise BackendUnavailable("redis", _EPOCH_LOST) from None
        except BaseException:
            self._cache.epochs.forget(thread_id, checkpoint_ns)
            raise
        else:
            self._cache.epochs.remember(thread_id, checkpoint_ns, plan.stored)

    def _put_call(
        self,
        checkpoint: StoredCheckpoint,
        blobs: Sequence[StoredBlob],
        fence: str,
        parent_stored: bool,
        plan: ValuePlan,
    ) -> _Call:
        thread_id = checkpoint.thread_id
        fields = [*checkpoint_fields(checkpoint), *blob_fields(blobs, plan.references)]
        if PUT_ENTRY_HEAD + len(fields) > LUA_SLICE:
            raise LogEntryTooLarge(thread_id, PUT_ENTRY_HEAD + len(fields), LUA_SLICE)
        entry = self._cache.key(thread_id, checkpoint.checkpoint_ns)
        keys = [
            entry,
            self._cache.namespaces_key(thread_id),
            self._key(thread_id, LOG_KIND),
            self._key(thread_id, "wb-fence"),
            *self._cache.epoch_keys(thread_id),
            self._key(thread_id, REFERENCES_KIND),
            self._key(thread_id, EXPIRING_KIND),
            *self._cache.other_formats(entry),
            *plan.keys,
        ]
        args: list[Any] = [
            checkpoint.checkpoint_id,
            checkpoint.parent_checkpoint_id or "",
            self._cache.ttl_seconds,
            checkpoint.checkpoint_ns,
            fence,
            "1" if parent_stored else "0",
            *plan.ops,
            *fields,
        ]
        return keys, args, fence, plan.staged

    def _writes_call(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[StoredWrite],
        upsert: bool,
        fence: str,
    ) -> _Call:
        fields = write_fields(writes)
        if WRITES_ENTRY_HEAD + len(fields) > LUA_SLICE:
            raise LogEntryTooLarge(thread_id, WRITES_ENTRY_HEAD + len(fields), LUA_SLICE)
        entry = self._cache.key(thread_id, checkpoint_ns)
        keys = [
            entry,
            self._key(thread_id, LOG_KIND),
            self._key(thread_id, "wb-fence"),
            self._key(thread_id, EXPIRING_KIND),
            *self._cache.other_formats(entry),
        ]
        args: list[Any] = [
            checkpoint_id,
            "1" if upsert else "0",
            self._cache.ttl_seconds,
            checkpoint_ns,
            fence,
            *fields,
        ]
        return keys, args, fence, []

    # The append and the dirty listing go in one round trip (a pipeline, not a transaction:
    # they live on different cluster slots). If the server lost its script cache (restart,
    # failover), neither script ran past the error, and listing a thread twice is harmless:
    # the scripts are loaded and the commands sent again.

    async def _append(self, thread_id: str, script: str, call: _Call) -> None:
        keys, args, fence, staged = call
        commands = self._append_commands(thread_id, script, keys, args, staged)
        for attempt in range(2):
            try:
                # Not sent again after a lost reply: the append may have run (a second
                # would log it twice); the caller takes Redis as out (cold instead).
                *_, appended, _ = await redis_client.round_trip(
                    self._client, commands, resend=False
                )
            except NoScriptError:
                if attempt:
                    raise
                await self._load_scripts()
                continue
            except (RedisError, OSError) as exc:
                raise BackendUnavailable("redis", str(exc)) from exc
            return _appended(thread_id, appended, fence)

    def _append_blocking(self, thread_id: str, script: str, call: _Call) -> None:
        keys, args, fence, staged = call
        if self._blocking_client is None:
            raise StateError("this write-behind log was opened without a blocking client")
        commands = self._append_commands(thread_id, script, keys, args, staged)
        for attempt in range(2):
            try:
                *_, appended, _ = redis_client.round_trip_blocking(
                    self._blocking_client, commands, resend=False
                )
            except NoScriptError:
                if attempt:
                    raise
                try:
                    loads = [("SCRIPT", "LOAD", source) for source, _ in self._scripts.values()]
                    redis_client.round_trip_blocking(self._blocking_client, loads)
                except (RedisError, OSError) as exc:
                    raise BackendUnavailable("redis", str(exc)) from exc
                continue
            except (RedisError, OSError) as exc:
                raise BackendUnavailable("redis", str(exc)) from exc
            return _appended(thread_id, appended, fence)

    def _append_commands(
        self,
        thread_id: str,
        script: str,
        keys: list[str],
        args: list[Any],
        staged: list[tuple[str, bytes]],
    ) -> list[Command]:
        dirty_keys = [self._dirty, self._since, self._entries]
        # New epochs as plain SETs, never script arguments (`redis_values`).
        # NX: a round trip sent again (its scripts were lost) must not put a TTL back on an
        # epoch the first one's append made the log's.
        return [
            *(("SET", epoch, payload, "PX", STAGED_TTL_MS, "NX") for epoch, payload in staged),
            ("EVALSHA", self._scripts[script][1], len(keys), *keys, *args),
            ("EVALSHA", self._scripts["dirty"][1], len(dirty_keys), *dirty_keys, thread_id, 1),
        ]

    async def _load_scripts(self) -> None:
        """Every script in one round trip (the server lost them all: a restart, a failover)."""
        try:
            loads = self._client.pipeline(transaction=False)
            for source, _ in self._scripts.values():
                loads.script_load(source)
            await loads.execute()
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis", str(exc)) from exc

    async def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        source, sha = self._scripts[script]
        try:
            try:
                return await self._client.evalsha(sha, len(keys), *keys, *args)
            except NoScriptError:
                return await self._client.eval(source, len(keys), *keys, *args)
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis", str(exc)) from exc

    # ----------------------------------------------------------------------- flusher side

    async def pending(self, thread_id: str) -> bool:
        try:
            return bool(await self._client.exists(self._key(thread_id, LOG_KIND)))
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis", str(exc)) from exc

    async def read(self, thread_id: str, *, count: int, after: str | None = None) -> list[LogEntry]:
        try:
            found = cast(
                "list[tuple[bytes, dict[bytes, bytes]]]",
                await self._client.xrange(
                    self._key(thread_id, LOG_KIND),
                    min="-" if after is None else f"({after}",
                    count=count,
                ),
            )
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis", str(exc)) from exc
        # Up to the first damaged entry: the ones before it are read, it is raised once it
        # is the oldest (the flusher records it stuck).
        damaged: LogEntryDamaged | None = None
        references: dict[bytes, list[Reference]] = {}
        for entry_id, fields in found:
            try:
                references[entry_id] = _references(fields)
            except CorruptState as exc:
                damaged = _damaged(thread_id, entry_id, fields, exc)
                break
        needed = [reference for listed in references.values() for reference in listed]
        try:
            # Each epoch once, to the longest version the batch reads (`redis_values`).
            epochs = await self._cache.read_epochs(needed) if needed else {}
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis", str(exc)) from exc
        entries: list[LogEntry] = []
        for entry_id, fields in found:
            if entry_id not in references:
                break  # the damaged one
            listed = references[entry_id]
            if not complete(listed, epochs):
                # Held epochs leave only with their entries (`ack`, `discard`): the flusher,
                # holding the thread's lock, reads one gone only if Redis lost it.
                if entries:
                    break  # the entries before it first; the next read raises
                raise LogEntryLost(thread_id, entry_id.decode(), read_plan(listed))
            try:
                op = _op(thread_id, fields, epochs)
            except CorruptState as exc:
                damaged = _damaged(thread_id, entry_id, fields, exc)
                break
            self._remember_epochs(thread_id, entry_id.decode(), listed)
            entries.append(LogEntry(entry_id.decode(), op))
        if damaged is not None and not entries:
            raise damaged
        return entries

    def _remember_epochs(self, thread_id: str, entry_id: str, listed: list[Reference]) -> None:
        """The epochs an entry read refers to, for its `ack` to name as the script's keys."""
        self._read_epochs[(thread_id, entry_id)] = sorted({ref.epoch for ref in listed})
        while len(self._read_epochs) > REMEMBERED_ENTRIES:
            self._read_epochs.popitem(last=False)

    async def _epochs_of(self, thread_id: str, entry_ids: Sequence[str]) -> list[str]:
        """The epochs the entries refer to: as read, or (entries this log did not read)
        from the thread's references."""
        epochs: set[str] = set()
        unread: list[str] = []
        for entry_id in entry_ids:
            listed = self._read_epochs.pop((thread_id, entry_id), None)
            if listed is None:
                unread.append(entry_id)
            else:
                epochs.update(listed)
        if unread:
            try:
                found = await self._client.hmget(self._key(thread_id, REFERENCES_KIND), unread)
            except (RedisError, OSError) as exc:
                raise BackendUnavailable("redis", str(exc)) from exc
            for joined in found:
                if joined:
                    epochs.update(json.loads(joined))
        return sorted(epochs)

    async def ack(self, thread_id: str, entry_ids: Sequence[str]) -> int:
        if not entry_ids:
            return await self._length(thread_id)
        # Two scripts: a script's keys must share a cluster slot, and the log is in the
        # thread's, the count and listing in the shared one. Should this process die
        # between them, the count stays high until the listing empties (`settle` zeroes
        # it then) and the thread's listed age counts from an entry already flushed.
        keys = [
            self._key(thread_id, LOG_KIND),
            self._key(thread_id, REFERENCES_KIND),
            *self._cache.epoch_keys(thread_id),
            *await self._epochs_of(thread_id, entry_ids),
        ]
        removed, left, oldest = await self._run("ack", keys, [self._cache.ttl_seconds, *entry_ids])
        await self._acked(thread_id, int(removed), oldest)
        return int(left)

    async def _acked(self, thread_id: str, removed: int, oldest: bytes) -> None:
        """The shared listing's part of an acknowledgement (`_ACKED`)."""
        # A stream entry's id starts with the server's clock (ms) when it was appended.
        oldest_ms = oldest.split(b"-", 1)[0] if oldest else b""
        if removed or oldest_ms:
            await self._run(
                "acked",
                [self._entries, self._since, self._stuck],
                [removed, thread_id, oldest_ms],
            )

    async def newest(self, thread_id: str) -> str | None:
        try:
            found = await self._client.xrevrange(self._key(thread_id, LOG_KIND), count=1)
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis", str(exc)) from exc
        return cast("bytes", found[0][0]).decode() if found else None

    async def _length(self, thread_id: str) -> int:
        try:
            return int(await self._client.xlen(self._key(thread_id, LOG_KIND)))
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis", str(exc)) from exc

    async def discard(self, thread_id: str, *, refuse_appends_ms: int | None = None) -> None:
        held_key, _ = self._cache.epoch_keys(thread_id)
        log_keys = [self._key(thread_id, LOG_KIND), self._key(thread_id, REFERENCES_KIND)]
        index = self._cache.namespaces_key(thread_id)
        marks = [self._key(thread_id, EXPIRING_KIND), self._key(thread_id, DELETED_KIND)]
        refusal = "" if refuse_appends_ms is None else str(refuse_appends_ms)

        def discarding(held: list[str], namespaces: list[str]) -> tuple[list[str], list[Any]]:
            # The cache in the same step: left alone, it could name a checkpoint whose log
            # entries this drops as a parent Redis knows, should the thread's deletion stop
            # here (the root namespace's entry whatever the index says: it may be evicted).
            entries = self._cache_entries(thread_id, namespaces)
            keys = [*log_keys, held_key, *held, index, *entries, *marks]
            return keys, [len(held), refusal, self._cache.ttl_seconds]

        dropped = await self._delete_listed(thread_id, "discard", discarding, with_cache=True)
        self._cache.epochs.forget(thread_id)
        await self._unlist(thread_id, dropped)

    async def deleted_since(self, thread_id: str, checkpoint_id: str) -> bool:
        made = checkpoint_time_us(checkpoint_id)
        if made is None:
            return False
        try:
            deleted = await self._client.get(self._key(thread_id, DELETED_KIND))
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis", str(exc)) from exc
        return deleted is not None and made < int(deleted)

    async def refuse_appends(self, thread_id: str, *, for_ms: int) -> None:
        await self._run("refuse", [self._key(thread_id, EXPIRING_KIND)], [for_ms])

    async def accept_appends(self, thread_id: str) -> None:
        try:
            await self._client.delete(self._key(thread_id, EXPIRING_KIND))
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis", str(exc)) from exc

    async def drop_lost(self, lost: LogEntryLost, *, lock_token: str) -> bool:
        thread_id = lost.thread_id
        held_key, _ = self._cache.epoch_keys(thread_id)
        fixed = [
            self._key(thread_id, LOG_KIND),
            self._key(thread_id, REFERENCES_KIND),
            held_key,
            self._key(thread_id, FLUSH_LOCK_KIND),
            self._cache.namespaces_key(thread_id),
            *lost.epochs,
        ]

        def dropping(held: list[str], namespaces: list[str]) -> tuple[list[str], list[Any]]:
            # The cache goes in the same step: left alone, it could still name the newest
            # (lost) checkpoint as a parent Redis knows, and a put on it would reach the
            # cold tier with its parent missing there.
            # The root namespace's entry whatever the index says: it has a TTL, so Redis
            # may have evicted it.
            entries = self._cache_entries(thread_id, namespaces)
            lengths = list(lost.epochs.values())
            return (
                [*fixed, *held, *entries],
                [lock_token, lost.entry_id, len(lengths), len(held), *lengths, *namespaces],
            )

        answer = await self._delete_listed(thread_id, "drop_lost", dropping, with_cache=True)
        if answer == NOT_LOST:
            return False
        if answer == NOT_LOCKED:
            raise LockLost(f"flush of {thread_id!r}", "taken over before its drop")
        self._cache.epochs.forget(thread_id)
        await self._unlist(thread_id, answer)
        return True

    async def _delete_listed(
        self,
        thread_id: str,
        script: str,
        keys_and_args: Callable[[list[str], list[str]], tuple[list[str], list[Any]]],
        *,
        with_cache: bool = False,
    ) -> int:
        """Run a delete script given the thread's held epochs (and `with_cache`, its cache
        namespaces) as listed now: it deletes those it is given, so it is given them all; a
        put landing after the listing makes it answer STALE_LISTING, and it lists again."""
        held_key, _ = self._cache.epoch_keys(thread_id)
        index = self._cache.namespaces_key(thread_id)
        for _ in range(DISCARD_ATTEMPTS):
            try:
                held = cast("list[bytes]", await self._client.hkeys(held_key))
                namespaces = (
                    cast("set[bytes]", await self._client.smembers(index)) if with_cache else ()
                )
            except (RedisError, OSError) as exc:
                raise BackendUnavailable("redis", str(exc)) from exc
            listing = [epoch.decode() for epoch in held], [ns.decode() for ns in namespaces]
            answer = int(await self._run(script, *keys_and_args(*listing)))
            if answer != STALE_LISTING:
                return answer
        raise StillWriting(
            "redis",
            f"appends to {thread_id!r} landed during each of {DISCARD_ATTEMPTS} tries to"
            " delete its backlog; try again when they pause",
        )

    async def _unlist(self, thread_id: str, dropped: int) -> None:
        """Take a thread whose log was just deleted off the listing; listed again if an
        append landed in between (it would wait for no flusher)."""
        if dropped:
            # Clamped at 0 as an acknowledgement's is: Redis may have lost everything since
            # the log went (a FLUSHALL), and a count below 0 would hide the next entries.
            await self._acked(thread_id, dropped, b"")
        await self._run("settle", self._listing_keys(), [thread_id, ""])
        if await self.pending(thread_id):
            await self.mark_dirty(thread_id)

    async def dirty_threads(
        self, *, limit: int, skip: int = 0, unflushed_for: float = 0.0
    ) -> list[tuple[str, float]]:
        try:
            if unflushed_for > 0:
                # `since` scores come from the server's clock: compare with the same.
                seconds, micros = await self._client.time()
                newest = int(seconds) * 1000 + int(micros) // 1000 - unflushed_for * 1000
                oldest = cast(
                    "list[bytes]",
                    await self._client.zrangebyscore(
                        self._since, "-inf", newest, start=skip, num=max(limit, 1)
                    ),
                )
            else:
                oldest = cast(
                    "list[bytes]",
                    await self._client.zrange(self._since, skip, skip + max(limit - 1, 0)),
                )
            if not oldest:
                return []
            markers = await self._client.zmscore(self._dirty, oldest)  # type: ignore[arg-type]
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis", str(exc)) from exc
        return [
            (thread.decode(), float(marker if marker is not None else 0.0))
            for thread, marker in zip(oldest, markers, strict=True)
        ]

    async def marker(self, thread_id: str) -> float | None:
        try:
            score = await self._client.zscore(self._dirty, thread_id)
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis", str(exc)) from exc
        return None if score is None else float(score)

    async def settle(self, thread_id: str, marker: float) -> bool:
        settled = await self._run("settle", self._listing_keys(), [thread_id, marker])
        return bool(settled)

    def _listing_keys(self) -> list[str]:
        return [self._dirty, self._since, self._entries, self._stuck]

    async def mark_dirty(self, thread_id: str) -> None:
        # Not counted again unless the settle this follows zeroed their count (`_MARK_DIRTY`):
        # each entry's append counted it, before this or after.
        length = await self._length(thread_id)
        await self._run(
            "dirty", [self._dirty, self._since, self._entries], [thread_id, length, "1"]
        )

    async def fence_now(self) -> int:
        # Lock tokens are the server's clock in microseconds when granted (`_LOCK`).
        try:
            seconds, micros = await self._client.time()
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis", str(exc)) from exc
        return int(seconds) * 1_000_000 + int(micros)

    async def lock_thread(self, thread_id: str, *, ttl_ms: int) -> str | None:
        token = await self._run("lock", [self._key(thread_id, FLUSH_LOCK_KIND)], [ttl_ms])
        return None if token is None else cast("bytes", token).decode()

    async def renew_thread_lock(self, thread_id: str, token: str, *, ttl_ms: int) -> bool:
        renewed = await self._run("renew", [self._key(thread_id, FLUSH_LOCK_KIND)], [token, ttl_ms])
        return bool(renewed)

    async def unlock_thread(self, thread_id: str, token: str) -> None:
        await self._run("unlock", [self._key(thread_id, FLUSH_LOCK_KIND)], [token])

    async def backlog(self) -> Backlog:
        try:
            pipe = self._client.pipeline(transaction=False)
            pipe.zcard(self._dirty)
            pipe.zrange(self._since, 0, 0, withscores=True)
            pipe.get(self._entries)
            pipe.time()
            pipe.hvals(self._stuck)
            threads, oldest, entries, (seconds, micros), stuck = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis", str(exc)) from exc
        age = None
        if threads and oldest:
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            age = max(0.0, (now_ms - float(oldest[0][1])) / 1000)
        recorded = _stuck_entries(stuck)
        return Backlog(
            entries=max(0, int(entries or 0)),
            threads=int(threads),
            oldest_age_seconds=age,
            stuck_threads=len(recorded),
            oldest_stuck=recorded[0] if recorded else None,
        )

    async def note_stuck(self, stuck: StuckEntry) -> bool:
        record = {**asdict(stuck), "since": None}
        noted = await self._run(
            "note_stuck",
            [self._stuck, self._dirty],
            [stuck.thread_id, stuck.entry_id, json.dumps(record)],
        )
        return bool(noted)

    async def stuck(self) -> list[StuckEntry]:
        try:
            found = await self._client.hvals(self._stuck)
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis", str(exc)) from exc
        return _stuck_entries(found)

    async def drop_entries(
        self, thread_id: str, entry_ids: Sequence[str], *, newest: str | None, lock_token: str
    ) -> int | None:
        index = self._cache.namespaces_key(thread_id)
        try:
            namespaces = cast("set[bytes]", await self._client.smembers(index))
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis", str(exc)) from exc
        # A namespace a put adds after this listing comes with an entry: the script sees it.
        cached = [index, *self._cache_entries(thread_id, [ns.decode() for ns in namespaces])]
        keys = [
            self._key(thread_id, LOG_KIND),
            self._key(thread_id, REFERENCES_KIND),
            *self._cache.epoch_keys(thread_id),
            *cached,
            self._key(thread_id, FLUSH_LOCK_KIND),
            *await self._epochs_of(thread_id, entry_ids),
        ]
        # Removed as an acknowledgement removes them: their epochs released, counts kept.
        removed, left, oldest = await self._run(
            "drop",
            keys,
            [self._cache.ttl_seconds, newest or "", len(cached), lock_token, *entry_ids],
        )
        if int(removed) == NOT_LOCKED:
            raise LockLost(f"flush of {thread_id!r}", "taken over before its discard")
        if int(removed) == STALE_LISTING:
            return None
        self._cache.epochs.forget(thread_id)
        await self._acked(thread_id, int(removed), oldest)
        if int(left) == 0:
            await self._unlist(thread_id, 0)
        return int(left)


class RedisCheckpointFence:
    """The `CheckpointFence` port on Redis, for write-through checkpoint writes: one
    script checks and raises the thread's `wb-fence` (the key write-behind appends
    check), atomically in the thread's slot."""

    def __init__(
        self,
        client: aioredis.Redis,
        cache: RedisCheckpointCache,
        *,
        blocking_client: redis.Redis | None = None,
    ) -> None:
        self._client = client
        # For `BlockingAppends`: the same appends from a thread with no event loop.
        self._blocking_client = blocking_client
        self._cache = cache
        self._admit = client.register_script(_ADMIT)

    async def admit(self, thread_id: str, fence: int, *, checked: bool = False) -> None:
        try:
            highest = int(
                await self._admit(
                    keys=[_thread_key(self._cache, thread_id, "wb-fence")],
                    args=[_fence_arg(fence, checked), self._cache.ttl_seconds],
                )
            )
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis", str(exc)) from exc
        if highest == -1:
            raise FenceUnknown(thread_id)
        if highest:
            raise StaleFencingToken(thread_id, fence, highest)


class _EpochMoved(StateError):
    """An epoch a put appends to is not at the length its writer saw, or a new one is gone
    (`redis_values`): nothing was written, and the put sends its values whole again."""


_EPOCH_LOST = "a large value sent ahead of its append was gone before it (a restart?)"


def _stuck_entries(found: Sequence[bytes | str]) -> list[StuckEntry]:
    """Recorded stuck entries, oldest first."""
    records = [json.loads(raw) for raw in found]
    entries = [StuckEntry(**{**record, "since": float(record["since"])}) for record in records]
    return sorted(entries, key=lambda entry: entry.since)


def _damaged(
    thread_id: str, entry_id: bytes, fields: dict[bytes, bytes], exc: CorruptState
) -> LogEntryDamaged:
    """An entry that cannot be read, with what can be read of it, for the operator."""
    kind = "put" if fields.get(b"op") == b"put" else "writes"
    checkpoint_id = fields.get(b"cid", b"").decode(errors="replace")
    if kind == "put":
        try:
            head = json.loads(fields.get(b"head", b""))
            checkpoint_id = str(head["id"]) if isinstance(head, dict) else ""
        except (ValueError, KeyError):
            checkpoint_id = ""
    return LogEntryDamaged(
        thread_id,
        entry_id.decode(),
        kind=kind,
        checkpoint_ns=fields.get(b"ns", b"").decode(errors="replace"),
        checkpoint_id=checkpoint_id,
        reason=str(exc),
    )


def _fence_arg(fence: int | None, checked: bool) -> str:
    """A fencing token as `_FENCE` takes it."""
    return "" if fence is None else f"{fence}!" if checked else str(fence)


def _appended(thread_id: str, appended: list[Any], fence: str) -> None:
    outcome, highest = appended
    if outcome == -2:
        raise StaleFencingToken(thread_id, int(fence.rstrip("!") or 0), int(highest))
    if outcome == -5:
        raise FenceUnknown(thread_id)
    if outcome == -3:
        raise UnknownParent(thread_id)
    if outcome == -7:
        raise UnknownParent(thread_id, fork=True)
    if outcome == -4:
        raise _EpochMoved(thread_id)
    if outcome == -6:
        raise ThreadExpiring(thread_id)


def _references(fields: dict[bytes, bytes]) -> list[Reference]:
    """The references among an entry's `b:` fields (none read from an entry of a newer
    format than this code's, which `_op` refuses)."""
    found: list[Reference] = []
    if fields.get(b"f", b"").isdigit() and int(fields[b"f"]) > ENTRY_FORMAT:
        return found
    for name, value in fields.items():
        if name.startswith(b"b:"):
            # A damaged field is its thread's trouble (`CorruptState`), not the drain's.
            try:
                _, serde_type, payload = unpack(value)
            except (ValueError, struct.error) as exc:
                raise CorruptState(f"unreadable write-behind blob field {name!r}: {exc}") from exc
            if serde_type == REFERENCE_TYPE.encode():
                found.append(Reference.decode(payload))
    return found


def _thread_key(cache: RedisCheckpointCache, thread_id: str, kind: str) -> str:
    return hot_key(thread_id, kind, namespace=cache.namespace)


def _sha(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()


def _head(raw: bytes) -> dict[str, Any]:
    """A put entry's head, its fields of the types a put writes: a damaged one is refused
    here (`ValueError`, the entry damaged), not sent on to fail the cold store's packing with
    an untyped error that would stop the drain pass, not record the entry stuck."""
    head = json.loads(raw)
    if not (
        isinstance(head, dict)
        and isinstance(head.get("id"), str)
        and isinstance(head.get("parent"), str | None)
        and isinstance(head.get("metadata"), dict)
        and isinstance(head.get("versions"), dict)
        and all(
            isinstance(version, str | int | float) and not isinstance(version, bool)
            for version in head["versions"].values()
        )
    ):
        raise ValueError("a put entry's head is not of a put's shape")
    return head


def _op(thread_id: str, fields: dict[bytes, bytes], epochs: Mapping[str, EpochBytes]) -> FlushOp:
    """A stream entry back into the operation it recorded.

    An entry of a newer format than this code's is refused, not misread: it stays in the
    log for a flusher of the code that wrote it (a rolling deploy runs both)."""
    try:
        entry_format = int(fields.get(b"f", b"2"))  # entries before format 3 had no `f`
    except ValueError as exc:
        raise CorruptState(f"unreadable write-behind entry of {thread_id!r}: {exc}") from exc
    if entry_format > ENTRY_FORMAT:
        raise UnsupportedSchemaVersion("write-behind entry", entry_format, ENTRY_FORMAT)
    try:
        checkpoint_ns = fields[b"ns"].decode()
        if fields[b"op"] == b"put":
            head = _head(fields[b"head"])
            blobs = []
            for name, value in fields.items():
                if name.startswith(b"b:"):
                    version, serde_type, payload = unpack(value)
                    typed = (serde_type.decode(), payload)
                    if typed[0] == REFERENCE_TYPE:
                        typed = resolve(Reference.decode(payload), epochs)
                    blobs.append(StoredBlob(name[2:].decode(), json.loads(version), typed))
            checkpoint = StoredCheckpoint(
                thread_id=thread_id,
                checkpoint_ns=checkpoint_ns,
                checkpoint_id=head["id"],
                parent_checkpoint_id=head["parent"],
                checkpoint=untyped(fields[b"cp"]),
                metadata=head["metadata"],
                channel_versions=head["versions"],
            )
            return CheckpointPut(checkpoint, blobs)
        writes: list[StoredWrite] = [
            parse_write(value) for name, value in fields.items() if name.startswith(b"w:")
        ]
        return WritesPut(
            thread_id,
            checkpoint_ns,
            fields[b"cid"].decode(),
            writes,
            upsert=fields[b"upsert"] == b"1",
        )
    except (KeyError, ValueError, TypeError, struct.error) as exc:
        raise CorruptState(f"unreadable write-behind entry of {thread_id!r}: {exc}") from exc
