"""Hot copy of the latest LangGraph checkpoint per (thread, namespace) in Redis.

One hash per (thread, namespace), key `{thread_id}:<store>:cp1:{ns}` (hash-tagged,
so a thread's keys share a cluster slot; `<store>` names the cold store cached,
so stores sharing one Redis stay apart; the digit is the snapshot format, so
code that changes the format never reads entries written by the previous one):

- `id`: the cached checkpoint's id, which every script compares byte-wise so
  the cache only ever moves forward;
- `snap`: the whole entry as one packed value (length-prefixed name/value
  pairs): `head` (id, parent, metadata, channel versions as JSON), `cp` (the
  checkpoint), `b:{channel}` (a value with its version) and
  `w:{task_id}\\0{idx}` (the pending writes). A warm read is one HGET of a
  single bulk string, which parses far faster than a field per channel;
- `e:{checkpoint_id}\\0{task_id}\\0{idx}`: early writes, saved for a checkpoint
  newer than the cached one while that checkpoint's own save is still in flight
  (LangGraph overlaps the two); its `advance` turns them into `w:` entries;
- `lease`: a reader's fill lease on an empty entry.

`advance` applies a put as a delta on the cached parent (or drops the entry if
the parent is not what is cached), `add_writes` keeps pending writes exact, and
`fill` installs what a reader got from the cold tier only if no write revoked
its lease meanwhile. Redis failures never fail the caller: they are counted,
the key is deleted on the next contact, and the saver serves from the cold tier.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .. import codec
from ..errors import CorruptState
from ..ports import CacheLookup, StoredBlob, StoredCheckpoint, StoredWrite, TypedBytes
from ..settings import Settings
from .redis_client import hot_key, hot_namespace

log = logging.getLogger(__name__)
T = TypeVar("T")

SNAPSHOT_FORMAT = 1
# A reader's lease on an empty entry outlives any cold read it waits for.
LEASE_TTL_MS = 30_000
# Parsed snapshots kept per process, so a warm read of an unchanged entry skips the
# parse (it still fetches the snapshot from Redis every time).
PARSED_SNAPSHOTS = 256
PARSED_SNAPSHOT_MAX_BYTES = 64 * 1024

_LUA_HELPERS = """
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

local function decode(snap)
  local entries, order, pos = {}, {}, 1
  while snap and pos <= #snap do
    local size = struct.unpack('>I4', snap, pos)
    local name = string.sub(snap, pos + 4, pos + 3 + size)
    pos = pos + 4 + size
    size = struct.unpack('>I4', snap, pos)
    entries[name] = string.sub(snap, pos + 4, pos + 3 + size)
    order[#order + 1] = name
    pos = pos + 4 + size
  end
  return entries, order
end

local function put(entries, order, name, value)
  if entries[name] == nil then order[#order + 1] = name end
  entries[name] = value
end

local function encode(entries, order)
  local parts, seen = {}, {}
  for _, name in ipairs(order) do
    local value = entries[name]
    if value ~= nil and not seen[name] then
      seen[name] = true
      parts[#parts + 1] = struct.pack('>I4', #name) .. name .. struct.pack('>I4', #value) .. value
    end
  end
  return table.concat(parts)
end

local function keep(key, ttl, index, namespace)
  redis.call('EXPIRE', key, ttl)
  redis.call('SADD', index, namespace)
  redis.call('EXPIRE', index, ttl)
end
"""

# KEYS: entry, namespace index. ARGV: new id, parent id ('' for none), ttl, namespace,
# then name/value pairs of the entries that changed.
_ADVANCE = (
    _LUA_HELPERS
    + """
local current = redis.call('HGET', KEYS[1], 'id')
if current and not older(current, ARGV[1]) then return 0 end
if (current or '') ~= ARGV[2] then
  redis.call('DEL', KEYS[1])
  return -1
end
local entries, order = decode(redis.call('HGET', KEYS[1], 'snap'))
for name in pairs(entries) do
  if string.sub(name, 1, 2) == 'w:' then entries[name] = nil end
end
for i = 5, #ARGV, 2 do put(entries, order, ARGV[i], ARGV[i + 1]) end
local prefix = 'e:' .. ARGV[1] .. '\\0'
local done = {'lease'}
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(field, 1, 2) == 'e:' then
    if string.sub(field, 1, #prefix) == prefix then
      put(entries, order, 'w:' .. string.sub(field, #prefix + 1), redis.call('HGET', KEYS[1], field))
      done[#done + 1] = field
    elseif older(early_id(field), ARGV[1]) then
      done[#done + 1] = field
    end
  end
end
redis.call('HDEL', KEYS[1], unpack(done))
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'snap', encode(entries, order))
keep(KEYS[1], ARGV[3], KEYS[2], ARGV[4])
return 1
"""
)

# KEYS: entry. ARGV: checkpoint id, '1' to replace existing writes, ttl, then write
# name/value pairs. Writes for a checkpoint newer than the cached one wait as early writes.
_ADD_WRITES = (
    _LUA_HELPERS
    + """
local current = redis.call('HGET', KEYS[1], 'id')
if current == ARGV[1] then
  local entries, order = decode(redis.call('HGET', KEYS[1], 'snap'))
  for i = 4, #ARGV, 2 do
    if ARGV[2] == '1' or entries[ARGV[i]] == nil then put(entries, order, ARGV[i], ARGV[i + 1]) end
  end
  redis.call('HSET', KEYS[1], 'snap', encode(entries, order))
  return 1
end
if current and not older(current, ARGV[1]) then return 0 end
redis.call('HDEL', KEYS[1], 'lease')
local prefix = 'e:' .. ARGV[1] .. '\\0'
for i = 4, #ARGV, 2 do
  local field = prefix .. string.sub(ARGV[i], 3)
  if ARGV[2] == '1' then
    redis.call('HSET', KEYS[1], field, ARGV[i + 1])
  else
    redis.call('HSETNX', KEYS[1], field, ARGV[i + 1])
  end
end
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return -1
"""
)

# KEYS: entry, namespace index. ARGV: lease token, checkpoint id, ttl, namespace, snapshot.
_FILL = (
    _LUA_HELPERS
    + """
if redis.call('HGET', KEYS[1], 'lease') ~= ARGV[1] then return 0 end
local done = {'lease'}
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  -- Early writes of a checkpoint at or before the filled one are in what was filled.
  if string.sub(field, 1, 2) == 'e:' and not older(ARGV[2], early_id(field)) then
    done[#done + 1] = field
  end
end
redis.call('HDEL', KEYS[1], unpack(done))
redis.call('HSET', KEYS[1], 'id', ARGV[2], 'snap', ARGV[5])
keep(KEYS[1], ARGV[3], KEYS[2], ARGV[4])
return 1
"""
)

# KEYS: entry. ARGV: lease token, lease ttl in ms.
_LEASE = """
if redis.call('HEXISTS', KEYS[1], 'id') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'lease', ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

_LENGTH = struct.Struct(">I")


def _pack(*parts: bytes) -> bytes:
    return b"".join(_LENGTH.pack(len(part)) + part for part in parts)


def _unpack(packed: bytes) -> list[bytes]:
    parts: list[bytes] = []
    offset, end = 0, len(packed)
    while offset < end:
        (size,) = _LENGTH.unpack_from(packed, offset)
        offset += 4
        parts.append(packed[offset : offset + size])
        offset += size
    return parts


def _version_prefix(version: str | int | float) -> bytes:
    """Starts a blob entry: framed, so version 1 never matches an entry of version 10."""
    return _pack(json.dumps(version).encode())


@dataclass(frozen=True)
class _Parsed:
    """The immutable parts of a snapshot; metadata and versions are re-read per call."""

    head: bytes
    checkpoint: TypedBytes
    blobs: dict[str, TypedBytes]
    writes: tuple[StoredWrite, ...]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    errors: int = 0


class RedisCheckpointCache:
    """The `CheckpointCache` port on Redis (see the module docstring)."""

    name = "redis"

    def __init__(self, client: aioredis.Redis, settings: Settings) -> None:
        # The client is shared with the hot store, whose owner closes it.
        self._client = client
        self._store = hot_namespace(settings)
        self._ttl = settings.state_hot_ttl_seconds
        self._compress_threshold = settings.state_compress_threshold_bytes
        self._advance = client.register_script(_ADVANCE)
        self._add_writes = client.register_script(_ADD_WRITES)
        self._fill = client.register_script(_FILL)
        self._lease = client.register_script(_LEASE)
        # Entries a failed call may have left wrong: deleted on the next contact.
        self._suspect: set[str] = set()
        self._parsed: OrderedDict[str, tuple[bytes, _Parsed]] = OrderedDict()
        self._healthy = True
        self.stats = CacheStats()

    def key(self, thread_id: str, checkpoint_ns: str) -> str:
        """The entry of one (thread, checkpoint namespace)."""
        return hot_key(thread_id, f"cp{SNAPSHOT_FORMAT}:{checkpoint_ns}", namespace=self._store)

    def _namespaces_key(self, thread_id: str) -> str:
        return hot_key(thread_id, "cp-namespaces", namespace=self._store)

    # ----------------------------------------------------------------------- port

    async def lookup(self, thread_id: str, checkpoint_ns: str, *, lease: bool) -> CacheLookup:
        key = self.key(thread_id, checkpoint_ns)
        if key in self._suspect and not await self._clear_if_suspect(key):
            return CacheLookup(None)
        try:
            snapshot = cast("bytes | None", await self._client.hget(key, "snap"))
        except (RedisError, OSError) as exc:
            self._failed(key, exc)
            return CacheLookup(None)
        self._healthy = True
        if snapshot is not None:
            try:
                found = self._checkpoint(key, thread_id, checkpoint_ns, snapshot)
            except (CorruptState, ValueError, KeyError, struct.error) as exc:
                # Never fail a read over a cache entry: drop it and read the cold tier.
                self._failed(key, exc)
                await self._clear_if_suspect(key)
                return CacheLookup(None)
            self.stats.hits += 1
            return CacheLookup(found)
        self.stats.misses += 1
        if not lease:
            return CacheLookup(None)
        token = os.urandom(12).hex()
        granted = await self._call(key, self._lease(keys=[key], args=[token, LEASE_TTL_MS]))
        return CacheLookup(None, token if granted == 1 else None)

    async def fill(self, checkpoint: StoredCheckpoint, lease: str) -> None:
        key = self.key(checkpoint.thread_id, checkpoint.checkpoint_ns)
        entries = self._checkpoint_entries(checkpoint)
        for channel, value in (checkpoint.blobs or {}).items():
            entries += self._blob_entry(channel, checkpoint.channel_versions[channel], value)
        for write in checkpoint.writes or []:
            entries += self._write_entry(write)
        await self._call(
            key,
            self._fill(
                keys=[key, self._namespaces_key(checkpoint.thread_id)],
                args=[
                    lease,
                    checkpoint.checkpoint_id,
                    self._ttl,
                    checkpoint.checkpoint_ns,
                    _pack(*(_bytes(entry) for entry in entries)),
                ],
            ),
        )

    async def advance(self, checkpoint: StoredCheckpoint, blobs: Sequence[StoredBlob]) -> None:
        key = self.key(checkpoint.thread_id, checkpoint.checkpoint_ns)
        if not await self._clear_if_suspect(key):
            return
        entries = self._checkpoint_entries(checkpoint)
        for blob in blobs:
            entries += self._blob_entry(blob.channel, blob.version, blob.value)
        await self._call(
            key,
            self._advance(
                keys=[key, self._namespaces_key(checkpoint.thread_id)],
                args=[
                    checkpoint.checkpoint_id,
                    checkpoint.parent_checkpoint_id or "",
                    self._ttl,
                    checkpoint.checkpoint_ns,
                    *entries,
                ],
            ),
        )

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
        entries = [part for write in writes for part in self._write_entry(write)]
        await self._call(
            key,
            self._add_writes(
                keys=[key], args=[checkpoint_id, "1" if upsert else "0", self._ttl, *entries]
            ),
        )

    async def invalidate(self, thread_id: str, checkpoint_ns: str | None = None) -> None:
        if checkpoint_ns is not None:
            key = self.key(thread_id, checkpoint_ns)
            if await self._call(key, self._client.delete(key)) is not None:
                self._suspect.discard(key)
            return
        index = self._namespaces_key(thread_id)
        namespaces = cast(
            "set[bytes] | None", await self._call(index, self._client.smembers(index))
        )
        if namespaces is None:
            return
        keys = [self.key(thread_id, ns.decode()) for ns in namespaces]
        keys += [key for key in self._suspect if key.startswith(self.key(thread_id, ""))]
        if await self._call(index, self._client.delete(index, *keys)) is not None:
            self._suspect.difference_update(keys)

    # ----------------------------------------------------------------------- encoding

    def _typed(self, value: TypedBytes) -> bytes:
        serde_type, data = value
        encoding, payload = codec.compress(data, self._compress_threshold)
        return _pack(serde_type.encode(), encoding.encode(), payload)

    def _checkpoint_entries(self, checkpoint: StoredCheckpoint) -> list[str | bytes]:
        head = {
            "id": checkpoint.checkpoint_id,
            "parent": checkpoint.parent_checkpoint_id,
            "metadata": checkpoint.metadata,
            "versions": checkpoint.channel_versions,
        }
        return ["head", json.dumps(head), "cp", self._typed(checkpoint.checkpoint)]

    def _blob_entry(
        self, channel: str, version: str | int | float, value: TypedBytes
    ) -> list[str | bytes]:
        return [f"b:{channel}", _version_prefix(version) + self._typed(value)]

    def _write_entry(self, write: StoredWrite) -> list[str | bytes]:
        header = _pack(
            write.task_id.encode(),
            write.task_path.encode(),
            str(write.idx).encode(),
            write.channel.encode(),
        )
        return [f"w:{write.task_id}\0{write.idx}", _pack(header, self._typed(write.value))]

    @staticmethod
    def _untyped(packed: bytes) -> TypedBytes:
        serde_type, encoding, payload = _unpack(packed)
        return serde_type.decode(), codec.decompress(encoding.decode(), payload)

    def _checkpoint(
        self, key: str, thread_id: str, checkpoint_ns: str, snapshot: bytes
    ) -> StoredCheckpoint:
        memo = self._parsed.get(key)
        if memo is not None and memo[0] == snapshot:
            parsed = memo[1]
        else:
            parsed = self._parse(snapshot)
            if len(snapshot) <= PARSED_SNAPSHOT_MAX_BYTES:
                self._parsed[key] = (snapshot, parsed)
                self._parsed.move_to_end(key)
                if len(self._parsed) > PARSED_SNAPSHOTS:
                    self._parsed.popitem(last=False)
        head = json.loads(parsed.head)  # fresh objects for every caller
        return StoredCheckpoint(
            thread_id=thread_id,
            checkpoint_ns=checkpoint_ns,
            checkpoint_id=head["id"],
            parent_checkpoint_id=head["parent"],
            checkpoint=parsed.checkpoint,
            metadata=head["metadata"],
            channel_versions=head["versions"],
            blobs=dict(parsed.blobs),
            writes=list(parsed.writes),
        )

    def _parse(self, snapshot: bytes) -> _Parsed:
        parts = _unpack(snapshot)
        entries = dict(zip(parts[::2], parts[1::2], strict=True))
        versions: dict[str, str | int | float] = json.loads(entries[b"head"])["versions"]
        blobs: dict[str, TypedBytes] = {}
        for channel, version in versions.items():
            blob = entries.get(b"b:" + channel.encode())
            expected = _version_prefix(version)
            # A channel's entry holds its latest cached version; older checkpoints' don't match.
            if blob is not None and blob.startswith(expected):
                blobs[channel] = self._untyped(blob[len(expected) :])
        writes = []
        for name, value in entries.items():
            if name.startswith(b"w:"):
                header, typed = _unpack(value)
                task_id, task_path, idx, channel_name = _unpack(header)
                writes.append(
                    StoredWrite(
                        task_id.decode(),
                        task_path.decode(),
                        int(idx),
                        channel_name.decode(),
                        self._untyped(typed),
                    )
                )
        writes.sort(key=lambda w: (w.task_id, w.idx))
        return _Parsed(entries[b"head"], self._untyped(entries[b"cp"]), blobs, tuple(writes))

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

    def _failed(self, key: str, error: Exception) -> None:
        self.stats.errors += 1
        self._suspect.add(key)
        if self._healthy:  # once per outage, not once per call
            log.warning("hot checkpoint cache failing (%s): serving from the cold tier", error)
        self._healthy = False

    async def _clear_if_suspect(self, key: str) -> bool:
        """Delete an entry a failed call may have left wrong; False if Redis is still failing."""
        if key not in self._suspect:
            return True
        if await self._call(key, self._client.delete(key)) is None:
            return False
        self._suspect.discard(key)
        return True


def _bytes(entry: str | bytes) -> bytes:
    return entry.encode() if isinstance(entry, str) else entry
