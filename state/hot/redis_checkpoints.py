"""Hot copy of the latest LangGraph checkpoint per (thread, namespace) in Redis.

One hash per (thread, namespace), key `{thread_id}:<store>:cp4:{ns}` (hash-tagged,
so a thread's keys share a cluster slot; `<store>` names the cold store cached,
so stores sharing one Redis stay apart; the digit is the entry format, so code
that changes the format never reads entries written by the previous one). The log and
the cold tier are shared by all formats, so during a rolling deploy across a bump each
version would serve its own entry, stale once the other took a turn: whatever changes
or deletes an entry deletes the neighbouring formats' (`other_formats`) in the same
step, and the other version misses and reads the log and the cold tier. Fields:

- `id`: the cached checkpoint's id, which every script compares byte-wise so
  the cache only ever moves forward;
- `head`: id, parent, metadata and channel versions as JSON; `cp`: the checkpoint;
- `b:{channel}`: the channel's latest cached value, prefixed by its version (a
  checkpoint whose version differs does not see it);
- `w:{task_id}\\0{idx}`: the cached checkpoint's pending writes;
- `e:{checkpoint_id}\\0{task_id}\\0{idx}`: early writes, saved for a checkpoint
  newer than the cached one while that checkpoint's own save is still in flight
  (LangGraph overlaps the two); its `advance` turns them into `w:` entries;
- `n:{channel}`: the epoch (`redis_values`) the channel's `b:` field refers to, when
  its value is large: the field then holds a reference, not the value;
- `lease`: a reader's fill lease on an empty entry;
- `seen`: on an entry a fork dropped (a put whose parent is not the cached checkpoint),
  the newest checkpoint id it was at or dropped at: a put no newer is not installed. An
  empty entry is not an empty thread: concurrent first runs on a new thread each put a
  root (no parent), and one landing late, after another run's fork dropped the entry,
  would otherwise be cached as the latest though the cold tier holds newer checkpoints.
  A deletion leaves it on the root entry (`invalidate(deleted_at=...)`), and its time in
  a key of its own (`DELETED_KIND`), which holds back every namespace's first checkpoint
  no newer (`advance`'s `deleted`): a root put installed since drops `seen`. A deletion of
  the whole thread also fences off a reader's fill of one no newer (`FILL_FENCE_KIND`)
  until its drop after the cold delete;
- the delta history of the cached checkpoint (LangGraph's DeltaChannel), once a
  reader filled it from the cold tier for some channels: `d@` (the checkpoint it
  belongs to), `dc` (the channels tracked), per channel `df:{channel}` (the checkpoint
  that stored its seed) and the seed itself: `dv:{channel}`, the version of it that the
  channel's `b:` field holds (no copy), or `ds:{channel}`, a copy where a reader filled
  it from the cold tier; and `dx:{checkpoint_id}\\0{task_id}\\0{idx}`
  (ancestors' writes). `advance` carries it to the child: the parent's stored values of
  the tracked channels become their seeds, its pending writes join the history, and
  writes older than every tracked channel's seed go. So a warm load reads the history
  in the same HGETALL as the checkpoint; any mismatch (a fork, a dropped entry, a late
  write older than the parent) drops it and the next reader refills it.

A field per value (not one packed value) keeps a put O(what changed): `advance`
writes the changed fields only, so a long conversation is not re-encoded on
every step. A warm read is one HGETALL (and, for large values, a pipelined
GETRANGE of their epochs: `redis_values`, which also says why such values never
pass through a script). Values are stored uncompressed: the hot tier trades
memory for never compressing on the request path.

`advance` applies a put as a delta on the cached parent (or drops the entry if
the parent is not what is cached), `add_writes` keeps pending writes exact, and
`fill` installs what a reader got from the cold tier only if no write revoked
its lease meanwhile. Redis failures never fail the caller: they are counted,
the key is deleted on the next contact, and the saver serves from the cold tier.

The thread's namespace index (`cp-namespaces`, a set) names its entries for
`invalidate`, which deletes the root entry whatever the index says. Redis may evict
the index alone (it has a TTL, and reads touch the entries, not it), so an entry of
another namespace (a subgraph's) is read only together with the index and served only
while the index lists it: an unlisted one is deleted and read as a miss.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from ..errors import BackendUnavailable, CorruptState, StateError
from ..ports import (
    CacheLookup,
    ChannelHistory,
    HistoryLookup,
    StoredBlob,
    StoredCheckpoint,
    StoredWrite,
    TypedBytes,
)
from . import redis_client
from .redis_client import LUA_SLICED, hot_key, script_call
from .redis_values import (
    EPOCH_HEAD,
    LUA_VALUES,
    REFERENCE_TYPE,
    STAGED_TTL_MS,
    EpochBytes,
    Reference,
    ValueEpochs,
    ValuePlan,
    complete,
    read_plan,
    resolve,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# 3: the checkpoint record and values as `state.checkpoint.values` stores them (a record
# without its channel versions, `zlib+` types); code at 2 would fail in the serde.
# 4: large values by reference to an epoch (`redis_values`), which 3 would take for values.
ENTRY_FORMAT = 4
# The formats whose code may share Redis with this one (a rolling deploy crosses one bump,
# either way: an upgrade or a rollback): every change to an entry deletes theirs. Both
# sides must do so, so a bump ships after a release of the format it replaces that does.
NEIGHBOUR_FORMATS = (-1, 1)
# Key kind of a thread's write-behind log (`redis_write_behind`): a cache miss checks it.
LOG_KIND = "wb-log"
# Key kinds of the thread's epochs the log refers to (entries per epoch), and of those
# the cache refers to (`redis_values`).
HELD_EPOCHS_KIND = "wb-epochs"
CACHED_EPOCHS_KIND = "ep-cached"
# Key kind of the checkpoint id a deletion made (`invalidate(deleted_at=...)`):
# apart from the root entry, whose `seen` the next run's first put drops, so a subgraph's
# first put, stored before the deletion and landing after that, is still held back.
DELETED_KIND = "cp-deleted"
# Key kind of the checkpoint id a drop made before a cold delete of the whole thread
# (`invalidate(fence_fills=True)`): a reader's fill of a checkpoint no newer, which may
# have read the cold tier before the delete, is refused, should the delete's drop after it
# fail (Redis cut) and leave that fill served once Redis is back. That drop lifts it: it
# drops every lease taken before it, and what the thread holds later (a copy into it) is
# cached again. Not for delete_for_runs, whose only drop follows its cold delete: the
# thread goes on, and its checkpoints older than the call would never be cached again.
FILL_FENCE_KIND = "cp-fill-fence"
# A reader's lease on an empty entry outlives any cold read it waits for.
LEASE_TTL_MS = 30_000
# How often entries a failed call left suspect are tried again (`_drop_suspects`).
SUSPECT_RETRY_SECONDS = 0.25

LUA_HELPERS = (
    LUA_VALUES
    + LUA_SLICED
    + """
-- Byte-wise order (Lua's `<` on strings follows the server's collation locale).
local function older(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- `e:{checkpoint id}\\0...` -> the checkpoint id.
local function early_id(field)
  return string.sub(field, 3, string.find(field, '\\0', 3, true) - 1)
end

-- `dx:{checkpoint id}\\0...` -> the checkpoint id.
local function history_id(field)
  return string.sub(field, 4, string.find(field, '\\0', 4, true) - 1)
end

local function drop_history(key)
  local drop = {}
  for _, field in ipairs(redis.call('HKEYS', key)) do
    if string.sub(field, 1, 1) == 'd' then drop[#drop + 1] = field end
  end
  if #drop > 0 then sliced('HDEL', key, drop) end
end

local function keep(key, ttl, index, namespace)
  redis.call('EXPIRE', key, ttl)
  redis.call('SADD', index, namespace)
  redis.call('EXPIRE', index, ttl)
end

-- Move the cached entry `key` to checkpoint `id` (child of `parent`), setting the
-- fields ARGV[first..] (name/value pairs), whose large values are `ops`' epochs.
-- 1: moved; 0: the cache is already at `id` or newer, or was dropped at a newer one;
-- -1: the parent is not what is cached, so the entry is dropped. A dropped entry keeps
-- `seen`, the newest checkpoint id it was moved to or dropped at: an empty entry is not
-- an empty thread, so a root put (parent '') that lands late, older than a checkpoint
-- the thread already has (concurrent first runs), is not installed as the latest.
-- `cached_id`: the entry's `id` field if the caller read it already in this script (false
-- when it has none), nil to read it here. `deleted`: the thread's mark of a
-- deletion (`invalidate(deleted_at=...)`), which holds back a first checkpoint (no parent)
-- of any namespace no newer: the entry is dropped.
local function advance(key, index, id, parent, ttl, namespace, first, ops, cached, held, known,
    cached_id, deleted)
  local current = cached_id
  if current == nil then current = redis.call('HGET', key, 'id') end
  local newest = current or redis.call('HGET', key, 'seen')
  if newest and not older(newest, id) then return 0 end
  local held_back = false
  if deleted and parent == '' then
    local mark = redis.call('GET', deleted)
    held_back = mark and not older(mark, id)
  end
  if held_back or (current or '') ~= parent then
    drop_entry(key, cached, held, known)
    redis.call('HSET', key, 'seen', id)
    keep(key, ttl, index, namespace)
    return -1
  end
  local drop, set = {}, {'id', id}
  local prefix = 'e:' .. id .. '\\0'
  -- The delta history moves from the parent to `id`: the parent's stored values of
  -- the tracked channels become their seeds, its pending writes history.
  local tracked, oldest = nil, nil
  if parent ~= '' and redis.call('HGET', key, 'd@') == parent then
    tracked = cjson.decode(redis.call('HGET', key, 'dc'))
    local versions = cjson.decode(redis.call('HGET', key, 'head'))['versions']
    local bounded = true
    for _, ch in ipairs(tracked) do
      local seed_at = redis.call('HGET', key, 'df:' .. ch)
      local version = versions[ch]
      if version ~= nil then
        local framed = cjson.encode(version)
        framed = struct.pack('>I4', #framed) .. framed
        local blob = redis.call('HGET', key, 'b:' .. ch)
        if blob and string.sub(blob, 1, #framed) == framed then
          -- The seed is the parent's value, which its `b:` field keeps: name its version
          -- rather than copy it.
          set[#set + 1] = 'dv:' .. ch
          set[#set + 1] = framed
          set[#set + 1] = 'df:' .. ch
          set[#set + 1] = parent
          drop[#drop + 1] = 'ds:' .. ch
          seed_at = parent
        end
      end
      if not seed_at then
        bounded = false
      elseif oldest == nil or older(seed_at, oldest) then
        oldest = seed_at
      end
    end
    if not bounded then oldest = nil end
    set[#set + 1] = 'd@'
    set[#set + 1] = id
  end
  local referring = {}
  for _, field in ipairs(redis.call('HKEYS', key)) do
    local kind = string.sub(field, 1, 2)
    if field == 'lease' or field == 'seen' then
      -- Named only when there (HKEYS says): a put with nothing else to drop sends no HDEL.
      drop[#drop + 1] = field
    elseif kind == 'n:' then
      referring[string.sub(field, 3)] = true
    elseif kind == 'w:' then
      drop[#drop + 1] = field
      if tracked then
        set[#set + 1] = 'dx:' .. parent .. '\\0' .. string.sub(field, 3)
        set[#set + 1] = redis.call('HGET', key, field)
      end
    elseif kind == 'dx' then
      -- Writes older than every tracked channel's seed are no longer history.
      if not tracked or (oldest and older(history_id(field), oldest)) then
        drop[#drop + 1] = field
      end
    elseif string.sub(field, 1, 1) == 'd' and not tracked then
      drop[#drop + 1] = field
    elseif kind == 'e:' then
      if string.sub(field, 1, #prefix) == prefix then
        set[#set + 1] = 'w:' .. string.sub(field, #prefix + 1)
        set[#set + 1] = redis.call('HGET', key, field)
        drop[#drop + 1] = field
      elseif older(early_id(field), id) then
        drop[#drop + 1] = field
      end
    end
  end
  if #drop > 0 then sliced('HDEL', key, drop) end
  track_epochs(key, first, ops, cached, held, ttl, referring, known)
  for i = first, #ARGV do set[#set + 1] = ARGV[i] end
  sliced('HSET', key, set)
  keep(key, ttl, index, namespace)
  return 1
end

-- Set the writes ARGV[first..] (name/value pairs of `w:` fields) on `key` under the names
-- `name` gives: without `upsert`, only those it lacks (the first of a name given twice), as
-- an HSETNX each would: one HMGET and one HSET per 1000 writes (`unpack` has a limit), not a
-- command per write.
local function set_writes(key, upsert, first, name)
  if #ARGV == first + 1 then
    redis.call(upsert and 'HSET' or 'HSETNX', key, name(ARGV[first]), ARGV[first + 1])
    return
  end
  for start = first, #ARGV, 2000 do
    local last, names, set = math.min(start + 1999, #ARGV), {}, {}
    for i = start, last, 2 do names[#names + 1] = name(ARGV[i]) end
    local held = upsert and {} or redis.call('HMGET', key, unpack(names))
    local taken = {}
    for j, field in ipairs(names) do
      if upsert or not (held[j] or taken[field]) then
        taken[field] = true
        set[#set + 1] = field
        set[#set + 1] = ARGV[start + 2 * j - 1]
      end
    end
    if #set > 0 then redis.call('HSET', key, unpack(set)) end
  end
end

-- Pending writes of checkpoint `id` (ARGV[first..], name/value pairs of `w:` fields).
-- 1: added to the cached checkpoint; 0: the cache is newer; -1: kept as early writes.
local function add_writes(key, id, upsert, ttl, first)
  local current = redis.call('HGET', key, 'id')
  if current == id then
    set_writes(key, upsert, first, function(field) return field end)
    return 1
  end
  if current and not older(current, id) then
    -- A reader filling the history from the cold tier may have read before this write.
    redis.call('HDEL', key, 'dl')
    -- Writes of the cached checkpoint's parent landing after its child (LangGraph
    -- overlaps the two) join the delta history; older ones void it.
    if redis.call('HGET', key, 'd@') == current then
      if cjson.decode(redis.call('HGET', key, 'head'))['parent'] == id then
        local prefix = 'dx:' .. id .. '\\0'
        set_writes(key, upsert, first, function(field) return prefix .. string.sub(field, 3) end)
      else
        drop_history(key)
      end
    end
    return 0
  end
  redis.call('HDEL', key, 'lease')
  local prefix = 'e:' .. id .. '\\0'
  set_writes(key, upsert, first, function(field) return prefix .. string.sub(field, 3) end)
  if redis.call('TTL', key) < 0 then redis.call('EXPIRE', key, ttl) end
  return -1
end
"""
)

# KEYS: entry, namespace index, held epochs, cached epochs, the entry's other formats, the
# thread's deletion mark (`DELETED_KIND`), then the put's epochs and the others the writer
# knows the entry refers to (`LUA_VALUES`). ARGV:
# new id, parent id ('' for none), ttl, namespace, the value ops (`LUA_VALUES`), then
# name/value pairs of the fields that changed. Returns `advance`'s outcome, or -4, with
# nothing written, when an epoch is not at the length its writer saw.
_ADVANCE = (
    LUA_HELPERS
    + """
local ops, known = value_ops(8, 5), declared(8)
local first = 6 + 4 * #ops
if not values_ready(ops) then return -4 end
redis.call('DEL', KEYS[5], KEYS[6])
write_values(ops, KEYS[3], false, ARGV[3])
local moved = advance(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], ARGV[4], first, ops, KEYS[4],
  KEYS[3], known, nil, KEYS[7])
if moved ~= 1 then release_unreferenced(ops, KEYS[4], KEYS[3], known) end
return moved
"""
)

# KEYS: entry, its other formats. ARGV: checkpoint id, '1' to replace existing writes, ttl,
# then write name/value pairs.
_ADD_WRITES = (
    LUA_HELPERS
    + """
redis.call('DEL', KEYS[2], KEYS[3])
return add_writes(KEYS[1], ARGV[1], ARGV[2] == '1', ARGV[3], 4)
"""
)

# KEYS: the root entry, the deletion mark, the fill fence, then every other key to delete.
# ARGV: checkpoint id, ttl, '1' to set the fill fence at that id, the fence to lift (or '').
# `invalidate(deleted_at=...)`: the keys deleted, and the root entry left dropped and the
# mark set at that id, in one step, so no first put lands in between and stays cached.
_DROP_MARKING = (
    LUA_SLICED
    + """
sliced('DEL', KEYS[1], KEYS, 4)
redis.call('HSET', KEYS[1], 'seen', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
if ARGV[3] == '1' then
  redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[2])
elseif ARGV[4] ~= '' and redis.call('GET', KEYS[3]) == ARGV[4] then
  -- Only the fence this deletion set: another one under way keeps its own.
  redis.call('DEL', KEYS[3])
end
return 1
"""
)

# KEYS: entry, namespace index, the thread's fill fence (`FILL_FENCE_KIND`). ARGV: lease
# token, checkpoint id, ttl, namespace, then name/value pairs of every field of the
# checkpoint. A checkpoint no newer than the fence was read before or during a deletion:
# not installed, so a reader that read the cold tier just before a delete does not cache
# the deleted thread again (the deletion's last drop may fail, Redis cut, and leave it
# served once Redis is back).
_FILL = (
    LUA_HELPERS
    + """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
local deleted = redis.call('GET', KEYS[3])
if deleted and not older(deleted, ARGV[2]) then
  redis.call('HDEL', KEYS[1], 'lease')
  return 0
end
-- What was dropped (`seen`) is in what was filled: its put preceded the lease.
local done = {'lease', 'seen'}
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  -- Early writes of a checkpoint at or before the filled one are in what was filled.
  if string.sub(field, 1, 2) == 'e:' and not older(ARGV[2], early_id(field)) then
    done[#done + 1] = field
  end
end
sliced('HDEL', KEYS[1], done)
local set = {'id', ARGV[2]}
for i = 5, #ARGV do set[#set + 1] = ARGV[i] end
sliced('HSET', KEYS[1], set)
keep(KEYS[1], ARGV[3], KEYS[2], ARGV[4])
return 1
"""
)

# KEYS: entry. ARGV: checkpoint id, lease token. A lease on the history of the cached
# latest checkpoint, when it is that one: 1 if granted (revoked by a write to an older
# checkpoint, see add_writes), else 0.
_LEASE_HISTORY = """
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'dl', ARGV[2])
return 1
"""

# KEYS: entry. ARGV: checkpoint id, tracked channels (JSON), lease token, then name/value
# pairs of the history fields. Installs only under the lease, so a history read from the
# cold tier before a write to an ancestor landed is never tracked.
_FILL_HISTORY = (
    LUA_HELPERS
    + """
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'dl') ~= ARGV[3] then return 0 end
drop_history(KEYS[1])
local set = {'d@', ARGV[1], 'dc', ARGV[2]}
for i = 4, #ARGV do set[#set + 1] = ARGV[i] end
sliced('HSET', KEYS[1], set)
return 1
"""
)

# KEYS: entry, the thread's write-behind log. ARGV: lease token, lease ttl in ms.
# Returns {1 if leased, else 0; 1 if the log holds entries, else 0}: a miss costs one
# round trip more than a hit, not two (a reader that misses must flush the log first).
_LEASE = """
local backlog = redis.call('EXISTS', KEYS[2])
if redis.call('HEXISTS', KEYS[1], 'id') == 1 then return {0, backlog} end
redis.call('HSET', KEYS[1], 'lease', ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {1, backlog}
"""

# An entry's fields but the delta history's (seeds `ds:`, writes `dx:`): a reader that
# has the history at hand need not receive a snapshot of the whole conversation.
_HISTORY_FILTER = """
local function without_history(fields)
  local found = {}
  for i = 1, #fields, 2 do
    local prefix = string.sub(fields[i], 1, 3)
    if prefix ~= 'ds:' and prefix ~= 'dx:' then
      found[#found + 1] = fields[i]
      found[#found + 1] = fields[i + 1]
    end
  end
  return found
end
"""

# KEYS: entry.
_WITHOUT_HISTORY = _HISTORY_FILTER + "return without_history(redis.call('HGETALL', KEYS[1]))"

# KEYS: a subgraph's entry, the namespace index. ARGV: namespace, '1' with the history.
# A checkpoint is served only while the index lists the namespace: `invalidate` finds such
# entries through the index alone, and the index (a TTL, touched by writes only) may be
# evicted on its own, leaving an entry a delete of the thread missed. An unlisted entry
# holding a checkpoint is deleted and read as a miss (nil); the fill after it lists it
# again. One holding no checkpoint yet (early writes, waiting for their checkpoint's put
# to land; a lease) serves nothing stale, and is read as it is.
_READ_LISTED = (
    _HISTORY_FILTER
    + """
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 and redis.call('HEXISTS', KEYS[1], 'id') == 1 then
  redis.call('DEL', KEYS[1])
  return false
end
local fields = redis.call('HGETALL', KEYS[1])
if ARGV[2] == '1' then return fields end
return without_history(fields)
"""
)

# KEYS: held epochs, cached epochs, then epochs the cache listed. Each is unlisted, and
# deleted unless the write-behind log refers to it.
_DROP_EPOCHS = """
for i = 3, #KEYS do
  redis.call('HDEL', KEYS[2], KEYS[i])
  if redis.call('HEXISTS', KEYS[1], KEYS[i]) == 0 then redis.call('DEL', KEYS[i]) end
end
return 1
"""

_LENGTH = struct.Struct(">I")


def _framed(parts: Sequence[bytes], chunks: list[bytes]) -> list[bytes]:
    for part in parts:
        chunks += (_LENGTH.pack(len(part)), part)
    return chunks


def pack(*parts: bytes) -> bytes:
    # One join: a value can be a megabyte, and every intermediate copy shows in a put.
    return b"".join(_framed(parts, []))


def unpack(packed: bytes, offset: int = 0) -> list[bytes]:
    parts: list[bytes] = []
    end = len(packed)
    while offset < end:
        (size,) = _LENGTH.unpack_from(packed, offset)
        offset += 4
        parts.append(packed[offset : offset + size])
        offset += size
    return parts


@functools.lru_cache(maxsize=4096, typed=True)
def _version_prefix(version: str | int | float) -> bytes:
    """Starts a blob field: framed, so version 1 never matches a field of version 10.
    Cached (typed: 1 and 1.0 differ): every read and put builds one per channel."""
    return pack(json.dumps(version).encode())


def typed_field(value: TypedBytes) -> bytes:
    return pack(value[0].encode(), value[1])


def untyped(field: bytes, offset: int = 0) -> TypedBytes:
    """The typed value framed at `offset` of `field` (its payload is the one copy made)."""
    serde_type, payload = unpack(field, offset)
    return serde_type.decode(), payload


def head_field(checkpoint: StoredCheckpoint) -> bytes:
    return json.dumps(
        {
            "id": checkpoint.checkpoint_id,
            "parent": checkpoint.parent_checkpoint_id,
            "metadata": checkpoint.metadata,
            "versions": checkpoint.channel_versions,
        }
    ).encode()


def checkpoint_fields(checkpoint: StoredCheckpoint) -> list[bytes]:
    """`head` and `cp` name/value pairs of a checkpoint."""
    return [b"head", head_field(checkpoint), b"cp", typed_field(checkpoint.checkpoint)]


def blob_fields(
    blobs: Sequence[StoredBlob], references: Mapping[str, Reference] | None = None
) -> list[bytes]:
    """`b:` name/value pairs: the value, or its reference where `references` has one."""
    fields: list[bytes] = []
    for blob in blobs:
        reference = (references or {}).get(blob.channel)
        if reference is None:
            serde_type, payload = blob.value
        else:
            serde_type, payload = REFERENCE_TYPE, reference.encode()
        framed = _framed((serde_type.encode(), payload), [_version_prefix(blob.version)])
        fields += [b"b:" + blob.channel.encode(), b"".join(framed)]
    return fields


def _field_value(blob: bytes, offset: int, epochs: Mapping[str, EpochBytes]) -> TypedBytes:
    """The typed value of a `b:` field whose version prefix ends at `offset`."""
    value = untyped(blob, offset)
    if value[0] != REFERENCE_TYPE:
        return value
    return resolve(Reference.decode(value[1]), epochs)


def _reference(blob: bytes, offset: int) -> Reference | None:
    serde_type, payload = untyped(blob, offset)
    return Reference.decode(payload) if serde_type == REFERENCE_TYPE else None


def read_values(
    fields: dict[bytes, bytes], found: StoredCheckpoint
) -> dict[str, tuple[str, bytes]]:
    """Channel -> (epoch, value) of the values `found` read through references."""
    values: dict[str, tuple[str, bytes]] = {}
    for channel, (_, payload) in (found.blobs or {}).items():
        blob = fields[b"b:" + channel.encode()]
        reference = _reference(blob, len(_version_prefix(found.channel_versions[channel])))
        if reference is not None:
            values[channel] = (reference.epoch, payload)
    return values


def needed_references(
    fields: dict[bytes, bytes], *, entry: bool = True, with_history: bool
) -> list[Reference]:
    """The references `parse_entry` (if `entry`) and `parse_history` (if `with_history`)
    will resolve in an entry."""
    # A channel whose `b:` field holds a reference has an `n:` field (the same script sets
    # both): most entries have none, and need no parse of their head here.
    if b"head" not in fields or not any(name.startswith(b"n:") for name in fields):
        return []
    versions: dict[str, str | int | float] = json.loads(fields[b"head"])["versions"]
    found: list[Reference] = []
    for channel, version in versions.items() if entry else ():
        blob = fields.get(b"b:" + channel.encode())
        expected = _version_prefix(version)
        if blob is not None and blob.startswith(expected):
            reference = _reference(blob, len(expected))
            if reference is not None:
                found.append(reference)
    if with_history and fields.get(b"d@") == fields.get(b"id"):
        for name, version_field in fields.items():
            if not name.startswith(b"dv:"):
                continue
            blob = fields.get(b"b:" + name[3:])
            if blob is not None and blob.startswith(version_field):
                reference = _reference(blob, len(version_field))
                if reference is not None:
                    found.append(reference)
    return found


def write_fields(writes: Sequence[StoredWrite]) -> list[bytes]:
    fields: list[bytes] = []
    for write in writes:
        header = pack(
            write.task_id.encode(),
            write.task_path.encode(),
            str(write.idx).encode(),
            write.channel.encode(),
        )
        serde_type, payload = write.value[0].encode(), write.value[1]
        # pack(header, typed_field(value)), joined once.
        chunks = _framed((header,), [])
        chunks.append(_LENGTH.pack(8 + len(serde_type) + len(payload)))
        fields += [
            f"w:{write.task_id}\0{write.idx}".encode(),
            b"".join(_framed((serde_type, payload), chunks)),
        ]
    return fields


def parse_write(field: bytes) -> StoredWrite:
    (header_size,) = _LENGTH.unpack_from(field, 0)
    task_id, task_path, idx, channel = unpack(field[4 : 4 + header_size])
    # The typed value is framed after the header: parsed in place, not sliced out first.
    value = untyped(field, 4 + header_size + 4)
    return StoredWrite(task_id.decode(), task_path.decode(), int(idx), channel.decode(), value)


def parse_entry(
    thread_id: str,
    checkpoint_ns: str,
    fields: dict[bytes, bytes],
    epochs: Mapping[str, EpochBytes] | None = None,
) -> StoredCheckpoint:
    """A checkpoint from its cached fields (`head`, `cp`, `b:*`, `w:*`); `epochs`: those
    its references name (`needed_references`), read by `read_plan`."""
    head = json.loads(fields[b"head"])
    versions: dict[str, str | int | float] = head["versions"]
    blobs: dict[str, TypedBytes] = {}
    for channel, version in versions.items():
        blob = fields.get(b"b:" + channel.encode())
        expected = _version_prefix(version)
        # A channel's field holds its latest cached version; older checkpoints' don't match.
        if blob is not None and blob.startswith(expected):
            blobs[channel] = _field_value(blob, len(expected), epochs or {})
    writes = [parse_write(value) for name, value in fields.items() if name.startswith(b"w:")]
    writes.sort(key=lambda w: (w.task_id, w.idx))
    return StoredCheckpoint(
        thread_id=thread_id,
        checkpoint_ns=checkpoint_ns,
        checkpoint_id=head["id"],
        parent_checkpoint_id=head["parent"],
        checkpoint=untyped(fields[b"cp"]),
        metadata=head["metadata"],
        channel_versions=versions,
        blobs=blobs,
        writes=writes,
    )


def history_fields(history: dict[str, ChannelHistory]) -> list[bytes]:
    """`ds:`/`df:` (seed and where it was stored) and `dx:` name/value pairs of a history."""
    fields: list[bytes] = []
    for channel, entry in history.items():
        if entry.seed is not None and entry.seed_at is not None:
            fields += [b"ds:" + channel.encode(), typed_field(entry.seed)]
            fields += [b"df:" + channel.encode(), entry.seed_at.encode()]
        for checkpoint_id, write in entry.writes:
            [name, value] = write_fields([write])
            fields += [b"dx:" + checkpoint_id.encode() + b"\0" + name[2:], value]
    return fields


def parse_history(
    fields: dict[bytes, bytes], epochs: Mapping[str, EpochBytes] | None = None
) -> dict[str, ChannelHistory] | None:
    """The delta history of the cached checkpoint, per tracked channel (None: none kept)."""
    if b"d@" not in fields or fields[b"d@"] != fields.get(b"id"):
        return None
    tracked: list[str] = json.loads(fields[b"dc"])
    seed_at = {ch: fields.get(b"df:" + ch.encode()) for ch in tracked}
    writes: dict[str, list[tuple[str, StoredWrite]]] = {ch: [] for ch in tracked}
    for name, value in fields.items():
        if not name.startswith(b"dx:"):
            continue
        checkpoint_id = name[3:].split(b"\0", 1)[0]
        write = parse_write(value)
        since = seed_at.get(write.channel)
        if write.channel in writes and (since is None or checkpoint_id >= since):
            writes[write.channel].append((checkpoint_id.decode(), write))
    history: dict[str, ChannelHistory] = {}
    for ch in tracked:
        at = seed_at[ch]
        if at is None:
            history[ch] = ChannelHistory(writes[ch])
            continue
        seed = fields.get(b"ds:" + ch.encode())
        if seed is None:
            # Named by version: the channel's `b:` field, unless a newer value replaced it
            # (then this channel's history is not the cache's to answer).
            version = fields.get(b"dv:" + ch.encode())
            blob = fields.get(b"b:" + ch.encode())
            if version is None or blob is None or not blob.startswith(version):
                continue
            named = _field_value(blob, len(version), epochs or {})
            history[ch] = ChannelHistory(writes[ch], seed=named, seed_at=at.decode())
            continue
        history[ch] = ChannelHistory(writes[ch], seed=untyped(seed), seed_at=at.decode())
    return history


@dataclass
class CheckpointCacheStats:
    hits: int = 0
    misses: int = 0
    errors: int = 0


def _hash_reply(reply: object) -> dict[bytes, bytes]:
    """HGETALL's raw reply: a map under RESP3 (redis-py's default), a flat list under RESP2."""
    return cast("dict[bytes, bytes]", reply) if isinstance(reply, dict) else _paired(reply)


def _paired(flat: object) -> dict[bytes, bytes]:
    """A hash's fields from a script's flat name/value list (nil, an unlisted entry: none)."""
    names = cast("list[bytes] | None", flat) or []
    return dict(zip(names[::2], names[1::2], strict=True))


# Entries remembered as holding no delta history (one per thread this process read lately).
REMEMBERED_HISTORYLESS = 10_000


class HistorylessEntries:
    """The entries whose last read showed no delta history (no `dc` field: nothing ever
    asked for one). A reader that needs no history reads such an entry with a plain
    HGETALL, which Redis answers faster than the script that leaves the history out; an
    entry that has gained one meanwhile is merely sent whole once, and read through the
    script again from then on. Thread-safe: sync reads run on their callers' threads."""

    def __init__(self) -> None:
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def saw(self, key: str, fields: Mapping[bytes, bytes]) -> None:
        with self._lock:
            if b"dc" in fields:
                self._keys.pop(key, None)
                return
            self._keys[key] = None
            self._keys.move_to_end(key)
            if len(self._keys) > REMEMBERED_HISTORYLESS:
                self._keys.popitem(last=False)


class RedisCheckpointCache:
    """The `CheckpointCache` port on Redis (see the module docstring)."""

    name = "redis"

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        namespace: str,
        ttl_seconds: int,
        blocking_client: redis.Redis | None = None,
    ) -> None:
        # The client is shared with the hot store, whose owner closes it.
        self._client = client
        # For `BlockingCache`: calls from a thread with no event loop.
        self._blocking_client = blocking_client
        self._store = namespace
        self._ttl = ttl_seconds
        self._advance = client.register_script(_ADVANCE)
        self._add_writes = client.register_script(_ADD_WRITES)
        self._fill = client.register_script(_FILL)
        self._lease = client.register_script(_LEASE)
        self._fill_history = client.register_script(_FILL_HISTORY)
        self._lease_history = client.register_script(_LEASE_HISTORY)
        self._without_history = client.register_script(_WITHOUT_HISTORY)
        self._historyless = HistorylessEntries()
        self._read_listed = client.register_script(_READ_LISTED)
        self._drop_epochs = client.register_script(_DROP_EPOCHS)
        self._drop_marking = client.register_script(_DROP_MARKING)
        self.epochs = ValueEpochs()
        # Entries a failed call may have left wrong: never served by this process, and
        # deleted on its next contact with them or by `_dropping` once Redis answers.
        self._suspect: set[str] = set()
        self._dropping: asyncio.Task[None] | None = None
        # The loop the client is bound to (None: built off one): a sync caller's thread
        # that suspects an entry starts `_dropping` there.
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._healthy = True
        self.stats = CheckpointCacheStats()

    @property
    def ttl_seconds(self) -> int:
        return self._ttl

    @property
    def namespace(self) -> str:
        return self._store

    def key(self, thread_id: str, checkpoint_ns: str) -> str:
        """The entry of one (thread, checkpoint namespace)."""
        return hot_key(thread_id, f"cp{ENTRY_FORMAT}:{checkpoint_ns}", namespace=self._store)

    def other_formats(self, key: str) -> list[str]:
        """The entry `key` as the neighbouring formats' code names it (none if `key` is not
        an entry): deleted with every change to it. Same hash tag, so same cluster slot."""
        head, marker, tail = key.partition(f"}}:{self._store}:cp{ENTRY_FORMAT}:")
        if not marker:
            return []
        return [
            f"{head}}}:{self._store}:cp{ENTRY_FORMAT + step}:{tail}" for step in NEIGHBOUR_FORMATS
        ]

    def _delete_entry(self, key: str) -> Awaitable[int]:
        """One DEL of the entry in every format (`other_formats`)."""
        return self._client.delete(key, *self.other_formats(key))

    def namespaces_key(self, thread_id: str) -> str:
        return hot_key(thread_id, "cp-namespaces", namespace=self._store)

    def log_key(self, thread_id: str) -> str:
        """The thread's write-behind log (`redis_write_behind`), which a miss looks at."""
        return hot_key(thread_id, LOG_KIND, namespace=self._store)

    def thread_key(self, thread_id: str, kind: str) -> str:
        return hot_key(thread_id, kind, namespace=self._store)

    def plan_values(
        self, thread_id: str, checkpoint_ns: str, blobs: Sequence[StoredBlob]
    ) -> ValuePlan:
        """The put's large values as epochs (`redis_values`)."""
        return self.epochs.plan(
            thread_id,
            checkpoint_ns,
            blobs,
            lambda: self.thread_key(thread_id, f"ep:{os.urandom(8).hex()}"),
        )

    def epoch_keys(self, thread_id: str) -> list[str]:
        """The keys `LUA_VALUES` needs besides the epochs: held, then cached."""
        return [
            self.thread_key(thread_id, HELD_EPOCHS_KIND),
            self.thread_key(thread_id, CACHED_EPOCHS_KIND),
        ]

    async def read_epochs(self, references: Sequence[Reference]) -> dict[str, EpochBytes]:
        """Each epoch `references` name, from `EPOCH_HEAD` to the longest they read: from
        what this process holds of it, else from Redis."""
        epochs, unheld = self._held_epochs(references)
        if unheld:
            ranges = [
                ("GETRANGE", epoch, EPOCH_HEAD, length - 1) for epoch, length in unheld.items()
            ]
            epochs.update(
                zip(unheld, await redis_client.round_trip(self._client, ranges), strict=True)
            )
        return epochs

    def _read_epochs_blocking(self, references: Sequence[Reference]) -> dict[str, EpochBytes]:
        assert self._blocking_client is not None
        epochs, unheld = self._held_epochs(references)
        if unheld:
            ranges = [
                ("GETRANGE", epoch, EPOCH_HEAD, length - 1) for epoch, length in unheld.items()
            ]
            replies = redis_client.round_trip_blocking(self._blocking_client, ranges)
            epochs.update(zip(unheld, replies, strict=True))
        return epochs

    def _held_epochs(
        self, references: Sequence[Reference]
    ) -> tuple[dict[str, EpochBytes], dict[str, int]]:
        """What this process holds of the epochs `references` need, and the others with the
        length to read of each."""
        needed = read_plan(references)
        held = self.epochs.held(needed)
        return held, {epoch: length for epoch, length in needed.items() if epoch not in held}

    # ----------------------------------------------------------------------- port

    async def lookup(
        self, thread_id: str, checkpoint_ns: str, *, lease: bool, with_history: bool = True
    ) -> CacheLookup:
        key = self.key(thread_id, checkpoint_ns)
        if key in self._suspect and not await self._clear_if_suspect(key):
            return CacheLookup(None)
        try:
            fields, epochs = await self._read(
                key, thread_id, checkpoint_ns, with_history=with_history
            )
        except (RedisError, OSError) as exc:
            self._failed(key, exc)
            return CacheLookup(None)
        except (CorruptState, ValueError, KeyError, struct.error) as exc:
            self._failed(key, exc)
            await self._clear_if_suspect(key)
            return CacheLookup(None)
        self._healthy = True
        if b"id" in fields:
            try:
                found = parse_entry(thread_id, checkpoint_ns, fields, epochs)
            except (CorruptState, ValueError, KeyError, struct.error) as exc:
                # Never fail a read over a cache entry: drop it and read the cold tier.
                self._failed(key, exc)
                await self._clear_if_suspect(key)
                return CacheLookup(None)
            self.stats.hits += 1
            if epochs:
                self.epochs.remember(thread_id, checkpoint_ns, read_values(fields, found))
            if not with_history:
                return CacheLookup(found)
            try:
                history = parse_history(fields, epochs)
            except (CorruptState, ValueError, KeyError, struct.error) as exc:
                self._failed(key, exc)
                history = None
            return CacheLookup(found, history=history)
        self.stats.misses += 1
        if not lease:
            return CacheLookup(None)
        token = os.urandom(12).hex()
        leased = await self._call(
            key, self._script(self._lease, [key, self.log_key(thread_id)], [token, LEASE_TTL_MS])
        )
        if leased is None:
            return CacheLookup(None)
        granted, backlog = cast("list[int]", leased)
        return CacheLookup(None, token if granted == 1 else None, backlog=backlog == 1)

    async def _read(
        self, key: str, thread_id: str, checkpoint_ns: str, *, with_history: bool
    ) -> tuple[dict[bytes, bytes], dict[str, EpochBytes]]:
        """The entry's fields and the epochs its references need. A put that moved the
        entry between the two reads may have released an epoch the first one names: then
        both are read again, once (a second miss is the entry's: `parse_entry` says so)."""
        for attempt in range(2):
            if checkpoint_ns:
                flat = await self._script(
                    self._read_listed,
                    [key, self.namespaces_key(thread_id)],
                    [checkpoint_ns, int(with_history)],
                )
                fields = _paired(flat)
            elif with_history or key in self._historyless:
                [reply] = await redis_client.round_trip(self._client, [("HGETALL", key)])
                fields = _hash_reply(reply)
                self._historyless.saw(key, fields)
            else:
                fields = _paired(await self._script(self._without_history, [key], []))
                self._historyless.saw(key, fields)
            references = needed_references(fields, with_history=with_history)
            if not references:
                return fields, {}
            epochs = await self.read_epochs(references)
            if attempt or complete(references, epochs):
                break
        return fields, epochs

    def lookup_blocking(
        self, thread_id: str, checkpoint_ns: str, *, with_history: bool
    ) -> CacheLookup | None:
        """`lookup` without a lease, from the caller's own thread: a hit, or a miss (no
        entry, not counted: `lease_blocking` then takes the lease, or `lookup` is asked),
        or `unreachable` (Redis failed the read); None where `lookup` has more to do (a
        suspect or unreadable entry): the caller then asks it."""
        if self._blocking_client is None:
            raise StateError("this checkpoint cache was opened without a blocking client")
        key = self.key(thread_id, checkpoint_ns)
        if key in self._suspect:
            return None
        try:
            if checkpoint_ns:
                fields = _paired(
                    self._script_blocking(
                        self._read_listed,
                        [key, self.namespaces_key(thread_id)],
                        [checkpoint_ns, int(with_history)],
                    )
                )
            elif with_history or key in self._historyless:
                [reply] = redis_client.round_trip_blocking(
                    self._blocking_client, [("HGETALL", key)]
                )
                fields = _hash_reply(reply)
                self._historyless.saw(key, fields)
            else:
                fields = _paired(self._script_blocking(self._without_history, [key], []))
                self._historyless.saw(key, fields)
        except (RedisError, OSError) as exc:
            self._failed(key, exc)
            return CacheLookup(None, unreachable=True)
        if b"id" not in fields:
            # Counted by `lease_blocking`, or by `lookup` if asked next: once either way.
            return CacheLookup(None)
        try:
            references = needed_references(fields, with_history=with_history)
            epochs = self._read_epochs_blocking(references) if references else {}
            if not complete(references, epochs):
                return None  # `lookup` reads it again
            found = parse_entry(thread_id, checkpoint_ns, fields, epochs)
            history = parse_history(fields, epochs) if with_history else None
        except (CorruptState, ValueError, KeyError, struct.error, RedisError, OSError):
            return None
        self.stats.hits += 1
        if epochs:
            self.epochs.remember(thread_id, checkpoint_ns, read_values(fields, found))
        return CacheLookup(found, history=history)

    def lease_blocking(self, thread_id: str, checkpoint_ns: str) -> CacheLookup | None:
        """The fill lease `lookup` takes on a miss of the latest checkpoint, and the
        thread's backlog, from the caller's own thread; `unreachable` on a Redis error."""
        key = self.key(thread_id, checkpoint_ns)
        token = os.urandom(12).hex()
        try:
            granted, backlog = cast(
                "list[int]",
                self._script_blocking(
                    self._lease, [key, self.log_key(thread_id)], [token, LEASE_TTL_MS]
                ),
            )
        except (RedisError, OSError) as exc:
            self.stats.misses += 1
            self._failed(key, exc)
            return CacheLookup(None, unreachable=True)
        self.stats.misses += 1
        return CacheLookup(None, token if granted == 1 else None, backlog=backlog == 1)

    async def _script(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        return await redis_client.run_script(self._client, script, keys, args)

    def _script_blocking(self, script: AsyncScript, keys: list[str], args: list[Any]) -> object:
        assert self._blocking_client is not None
        client = self._blocking_client
        try:
            [reply] = redis_client.round_trip_blocking(client, [script_call(script, keys, args)])
        except NoScriptError:
            source = ("EVAL", script.script, len(keys), *keys, *args)
            [reply] = redis_client.round_trip_blocking(client, [source])
        return reply

    async def fill(self, checkpoint: StoredCheckpoint, lease: str) -> None:
        key = self.key(checkpoint.thread_id, checkpoint.checkpoint_ns)
        blobs = [
            StoredBlob(channel, checkpoint.channel_versions[channel], value)
            for channel, value in (checkpoint.blobs or {}).items()
        ]
        fields = (
            checkpoint_fields(checkpoint)
            + blob_fields(blobs)
            + write_fields(checkpoint.writes or [])
        )
        if checkpoint.history:
            # Tracked from the fill on: a write that lands after it joins the history.
            fields += [
                b"d@",
                checkpoint.checkpoint_id.encode(),
                b"dc",
                json.dumps(sorted(checkpoint.history)).encode(),
                *history_fields(checkpoint.history),
            ]
        await self._call(
            key,
            self._script(
                self._fill,
                [
                    key,
                    self.namespaces_key(checkpoint.thread_id),
                    self.thread_key(checkpoint.thread_id, FILL_FENCE_KIND),
                ],
                [
                    lease,
                    checkpoint.checkpoint_id,
                    self._ttl,
                    checkpoint.checkpoint_ns,
                    *fields,
                ],
            ),
        )

    async def advance(self, checkpoint: StoredCheckpoint, blobs: Sequence[StoredBlob]) -> None:
        thread_id, checkpoint_ns = checkpoint.thread_id, checkpoint.checkpoint_ns
        key = self.key(thread_id, checkpoint_ns)
        if not await self._clear_if_suspect(key):
            return
        for _ in range(2):
            plan = self.plan_values(thread_id, checkpoint_ns, blobs)
            moved = await self._call(key, self._advance_with(key, checkpoint, blobs, plan))
            if moved == 1:
                self.epochs.remember(thread_id, checkpoint_ns, plan.stored)
                return
            self.epochs.forget(thread_id, checkpoint_ns)
            if moved != -4:
                return
        # A new epoch gone before its script ran (a restart, an eviction): the entry still
        # shows the parent, which is no longer the latest.
        if await self._call(key, self._delete_entry(key)) is None:
            self.distrust(thread_id, checkpoint_ns)

    def _advance_call(
        self, key: str, checkpoint: StoredCheckpoint, blobs: Sequence[StoredBlob], plan: ValuePlan
    ) -> tuple[list[str], list[Any]]:
        """The advance script's keys and arguments."""
        thread_id = checkpoint.thread_id
        keys = [
            key,
            self.namespaces_key(thread_id),
            *self.epoch_keys(thread_id),
            *self.other_formats(key),
            self.thread_key(thread_id, DELETED_KIND),
            *plan.keys,
        ]
        args = [
            checkpoint.checkpoint_id,
            checkpoint.parent_checkpoint_id or "",
            self._ttl,
            checkpoint.checkpoint_ns,
            *plan.ops,
            *checkpoint_fields(checkpoint),
            *blob_fields(blobs, plan.references),
        ]
        return keys, args

    async def _advance_with(
        self, key: str, checkpoint: StoredCheckpoint, blobs: Sequence[StoredBlob], plan: ValuePlan
    ) -> int:
        """The advance script, after the SET of the put's new epochs, in one round trip."""
        keys, args = self._advance_call(key, checkpoint, blobs, plan)
        if not plan.staged:
            return int(await self._script(self._advance, keys, args))

        async def run() -> int:
            *_, moved = await redis_client.round_trip(
                self._client,
                [
                    *(
                        ("SET", epoch, payload, "PX", STAGED_TTL_MS, "NX")
                        for epoch, payload in plan.staged
                    ),
                    script_call(self._advance, keys, args),
                ],
            )
            return int(moved)

        try:
            return await run()
        except NoScriptError:
            # The server lost its script cache (restart, failover): load it, once.
            await self._client.script_load(_ADVANCE)
            return await run()

    def advance_blocking(self, checkpoint: StoredCheckpoint, blobs: Sequence[StoredBlob]) -> None:
        """`advance` from the caller's own thread, all of it: a hand-over to the loop thread
        after the cold write would be refused as the saver closes, the entry left showing
        the parent. A Redis error suspects the entry, as `advance` does (its drop starts on
        the loop thread). A lost reply's resend runs the script again harmlessly: it moves
        an entry that still shows the parent only."""
        thread_id, checkpoint_ns = checkpoint.thread_id, checkpoint.checkpoint_ns
        key = self.key(thread_id, checkpoint_ns)
        if key in self._suspect and not self._delete_entry_blocking(key):
            return
        assert self._blocking_client is not None
        for _ in range(2):
            plan = self.plan_values(thread_id, checkpoint_ns, blobs)
            keys, args = self._advance_call(key, checkpoint, blobs, plan)
            commands = [
                *(
                    ("SET", epoch, payload, "PX", STAGED_TTL_MS, "NX")
                    for epoch, payload in plan.staged
                ),
                script_call(self._advance, keys, args),
            ]
            try:
                try:
                    *_, moved = redis_client.round_trip_blocking(self._blocking_client, commands)
                except NoScriptError:
                    # The server lost its script cache (restart, failover): load it, once.
                    # The staged epochs' SETs, sent again, change nothing (NX).
                    redis_client.round_trip_blocking(
                        self._blocking_client, [("SCRIPT", "LOAD", _ADVANCE)]
                    )
                    *_, moved = redis_client.round_trip_blocking(self._blocking_client, commands)
            except (RedisError, OSError) as exc:
                self._failed(key, exc)
                self.epochs.forget(thread_id, checkpoint_ns)
                return
            self._healthy = True
            if int(moved) == 1:
                self.epochs.remember(thread_id, checkpoint_ns, plan.stored)
                return
            self.epochs.forget(thread_id, checkpoint_ns)
            if int(moved) != -4:
                return
        # As `advance`: the entry still shows the parent, which is no longer the latest.
        self._delete_entry_blocking(key)

    def _delete_entry_blocking(self, key: str) -> bool:
        """`_clear_if_suspect`'s delete (whether or not the entry is suspect), from the
        caller's own thread; False on an error, the entry then suspect."""
        assert self._blocking_client is not None
        try:
            redis_client.round_trip_blocking(
                self._blocking_client, [("DEL", key, *self.other_formats(key))]
            )
        except (RedisError, OSError) as exc:
            self._failed(key, exc)
            return False
        self._healthy = True
        self._suspect.discard(key)
        return True

    def add_writes_blocking(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[StoredWrite],
        *,
        upsert: bool,
    ) -> None:
        """`add_writes` from the caller's own thread, as `advance_blocking` (adding the
        same writes again, on a lost reply's resend, changes nothing)."""
        if not writes:
            return
        key = self.key(thread_id, checkpoint_ns)
        if key in self._suspect and not self._delete_entry_blocking(key):
            return
        try:
            self._script_blocking(
                self._add_writes,
                [key, *self.other_formats(key)],
                [checkpoint_id, "1" if upsert else "0", self._ttl, *write_fields(writes)],
            )
        except (RedisError, OSError) as exc:
            self._failed(key, exc)
            return
        self._healthy = True

    async def add_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[StoredWrite],
        *,
        upsert: bool,
    ) -> None:
        if not writes:
            return
        key = self.key(thread_id, checkpoint_ns)
        if not await self._clear_if_suspect(key):
            return
        await self._call(
            key,
            self._script(
                self._add_writes,
                [key, *self.other_formats(key)],
                [checkpoint_id, "1" if upsert else "0", self._ttl, *write_fields(writes)],
            ),
        )

    async def history(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str, channels: Sequence[str]
    ) -> HistoryLookup:
        key = self.key(thread_id, checkpoint_ns)
        if key in self._suspect and not await self._clear_if_suspect(key):
            return HistoryLookup(None)
        token = os.urandom(12).hex()
        answers = await self._call(key, self._read_leasing_history(key, checkpoint_id, token))
        if answers is None:
            return HistoryLookup(None)
        fields, granted = answers
        lease = token if granted == 1 else None
        if fields.get(b"id") != checkpoint_id.encode():
            return HistoryLookup(None)
        try:
            references = needed_references(fields, entry=False, with_history=True)
            epochs = await self.read_epochs(references) if references else {}
            if not complete(references, epochs):
                # A put moved the entry since: not this entry's fault; the cold tier answers.
                return HistoryLookup(None, lease)
            history = parse_history(fields, epochs)
        except (RedisError, OSError) as exc:
            self._failed(key, exc)
            return HistoryLookup(None)
        except (CorruptState, ValueError, KeyError, struct.error) as exc:
            self._failed(key, exc)
            return HistoryLookup(None)
        if history is None or not set(channels) <= history.keys():
            return HistoryLookup(None, lease)
        return HistoryLookup({ch: history[ch] for ch in channels})

    async def _read_leasing_history(
        self, key: str, checkpoint_id: str, token: str
    ) -> tuple[dict[bytes, bytes], int]:
        """The entry and, in the same round trip, a lease on its history in case it is not
        the one asked for (a plain HGETALL and a script in a pipeline, not one script: a
        large entry costs more passed through Lua)."""

        async def read() -> tuple[dict[bytes, bytes], int]:
            reply, granted = await redis_client.round_trip(
                self._client,
                [("HGETALL", key), script_call(self._lease_history, [key], [checkpoint_id, token])],
            )
            return _hash_reply(reply), int(granted)

        try:
            return await read()
        except NoScriptError:
            # The server lost its script cache (restart, failover): load it, once.
            await self._client.script_load(_LEASE_HISTORY)
            return await read()

    async def logged(self, thread_id: str) -> bool:
        try:
            found = await self._client.exists(self.log_key(thread_id))
        except (RedisError, OSError) as exc:
            # Not the entry's failure: no key to suspect, only counted.
            self.stats.errors += 1
            log.warning("hot checkpoint cache failing (%s): write-behind log not read", exc)
            return False
        return bool(found)

    async def fill_history(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        history: dict[str, ChannelHistory],
        lease: str,
    ) -> None:
        key = self.key(thread_id, checkpoint_ns)
        if not await self._clear_if_suspect(key):
            return
        await self._call(
            key,
            self._script(
                self._fill_history,
                [key],
                [checkpoint_id, json.dumps(sorted(history)), lease, *history_fields(history)],
            ),
        )

    def distrust(self, thread_id: str, checkpoint_ns: str) -> None:
        self._suspect.add(self.key(thread_id, checkpoint_ns))
        self._drop_suspects_soon()

    async def close(self) -> None:
        if self._dropping is not None:
            self._dropping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dropping
            self._dropping = None

    async def ready(self) -> None:
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            raise BackendUnavailable("redis", str(exc)) from exc

    async def invalidate(
        self,
        thread_id: str,
        checkpoint_ns: str | None = None,
        *,
        strict: bool = False,
        deleted_at: str | None = None,
        fence_fills: bool = False,
        lift_fence: str | None = None,
    ) -> None:
        self.epochs.forget(thread_id, checkpoint_ns)
        call = self._call_after_rest if strict else self._call_now
        if checkpoint_ns is not None:
            key = self.key(thread_id, checkpoint_ns)
            if await call(key, lambda: self._delete_entry(key)) is not None:
                self._suspect.discard(key)
            elif strict:
                raise _not_invalidated(thread_id)
            return
        index = self.namespaces_key(thread_id)
        # The root namespace's entry whatever the index says: the index has a TTL, so
        # Redis may evict it (reads touch the entries, not the index).
        root = self.key(thread_id, "")
        namespaces = cast(
            "set[bytes] | None", await call(index, lambda: self._client.smembers(index))
        )
        if namespaces is None:
            self._suspect.add(root)  # never served by this process until dropped
            if strict:
                raise _not_invalidated(thread_id)
            return
        keys = [self.key(thread_id, ns) for ns in {"", *(ns.decode() for ns in namespaces)}]
        # A copy: a sync caller's thread may suspect or clear an entry meanwhile.
        keys += [key for key in list(self._suspect) if key.startswith(root)]
        others = [other for key in keys for other in self.other_formats(key)]

        def drop() -> Awaitable[Any]:
            if deleted_at is None:
                return self._client.delete(index, *keys, *others)
            return self._script(
                self._drop_marking,
                [
                    root,
                    self.thread_key(thread_id, DELETED_KIND),
                    self.thread_key(thread_id, FILL_FENCE_KIND),
                    index,
                    *keys,
                    *others,
                ],
                [deleted_at, self._ttl, "1" if fence_fills else "", lift_fence or ""],
            )

        if await call(index, drop) is not None:
            self._suspect.difference_update(keys)
        elif strict:
            raise _not_invalidated(thread_id)
        await self._call(index, self._drop_cached_epochs(thread_id))

    async def _drop_cached_epochs(self, thread_id: str) -> None:
        """The thread's epochs only its (now deleted) entries referred to; those the
        write-behind log refers to stay until flushed, decided in the script that deletes
        (a put landing meanwhile may make one held)."""
        held_key, cached_key = self.epoch_keys(thread_id)
        cached = cast("list[bytes]", await self._client.hkeys(cached_key))
        if cached:
            keys = [held_key, cached_key, *(epoch.decode() for epoch in cached)]
            await self._script(self._drop_epochs, keys, [])

    # ----------------------------------------------------------------------- failures

    async def _call(self, key: str, call: Awaitable[T]) -> T | None:
        """Run one Redis call; on failure count it, suspect the key and return None."""
        try:
            result = await call
        except (RedisError, OSError) as exc:
            self._failed(key, exc)
            return None
        self._healthy = True
        return result

    async def _call_now(self, key: str, call: Callable[[], Awaitable[T]]) -> T | None:
        return await self._call(key, call())

    async def _call_after_rest(self, key: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """`_call` for an invalidation that must reach Redis (maintenance): refused unsent
        while this process rests a server that timed out lately (`ServerCircuit`, at most
        `FAIL_FAST_SECONDS`), it is sent once the rest is over, as the probe. A delete is
        idempotent, and a user's delete right after a brief stall must not fail only for
        the rest. Refused for longer (another caller's probe is out), it fails now."""
        try:
            result = await call()
        except redis_client.ServerTimedOutLately as exc:
            if exc.rest > redis_client.FAIL_FAST_SECONDS:
                self._failed(key, exc)
                return None
            rest = exc.rest
        except (RedisError, OSError) as exc:
            self._failed(key, exc)
            return None
        else:
            self._healthy = True
            return result
        await asyncio.sleep(rest)
        return await self._call(key, call())

    def _failed(self, key: str, error: Exception) -> None:
        self.stats.errors += 1
        self._suspect.add(key)
        if self._healthy:  # once per outage, not once per call
            log.warning("hot checkpoint cache failing (%s): serving from the cold tier", error)
        self._healthy = False
        self._drop_suspects_soon()

    def _drop_suspects_soon(self) -> None:
        """Another process reads what Redis holds: an entry this one could not advance (the
        cold tier moved past it while Redis was out of reach) is dropped as soon as Redis
        answers again, not on this process's next contact with the thread, which may never
        come. Until then another process may be served it (README: the loss window)."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        home = self._loop or running
        if home is None:
            return  # no loop to run it on: the next contact drops them
        if running is not home:  # a sync caller's thread
            with contextlib.suppress(RuntimeError):  # the loop closed: nothing to drop for
                home.call_soon_threadsafe(self._drop_suspects_soon)
            return
        if self._dropping is not None and not self._dropping.done():
            return
        self._dropping = home.create_task(self._drop_suspects())

    async def _drop_suspects(self) -> None:
        while self._suspect:
            await asyncio.sleep(SUSPECT_RETRY_SECONDS)
            for key in list(self._suspect):
                if not await self._clear_if_suspect(key):
                    break

    async def _clear_if_suspect(self, key: str) -> bool:
        """Delete an entry a failed call may have left wrong; False if Redis is still failing."""
        if key not in self._suspect:
            return True
        if await self._call(key, self._delete_entry(key)) is None:
            return False
        self._suspect.discard(key)
        return True


def _not_invalidated(thread_id: str) -> BackendUnavailable:
    return BackendUnavailable(
        "redis", f"the cached checkpoints of {thread_id!r} could not be dropped"
    )
