"""Large checkpoint values in the hot tier: append-only epochs, so a put sends what grew.

A channel value that only grew (a message list with a message appended) is
serialized by LangGraph as the same bytes with a longer tail and a new length in
its first few bytes. Sending the whole value on every put costs the request path
its size twice over (measured: 1 MB per put through a script's arguments is
1.4 ms of server time, since Redis makes each argument a Lua string; as plain
commands it is still the socket's megabyte per put). So a value of
`BY_REFERENCE_BYTES` or more lives in an *epoch*: a string key
`{thread}:<store>:ep:<nonce>` holding the first version's bytes, to which each
later version that only grew appends its new tail. A version is named by a
reference in its `b:` field (cache entry and write-behind log alike): the epoch,
its length, and its own first `EPOCH_HEAD` bytes (where the length prefix
changes); its value is those bytes followed by the epoch's bytes from
`EPOCH_HEAD` to its length. Appending never changes bytes an earlier version
reads, so every version of an epoch stays readable from one key.

- A put sends a new epoch by a plain SET pipelined ahead of its script (never as
  a script argument); an append sends the tail only, as an argument. The script
  first checks each epoch is at the length its writer saw (`values_ready`), so
  an epoch only ever grows along one chain of versions: a writer whose epoch
  moved on (another process appended, a delete, a restart) is refused with
  nothing written and sends the whole value again in a new epoch.
- What this process last stored or read per (thread, namespace, channel) is
  remembered (`ValueEpochs`, within `REMEMBER_BYTES`; a put's once its script
  confirmed it), so the next put can tell an append (its bytes past `EPOCH_HEAD`
  start with the remembered ones) from anything else: a process taking over a
  conversation another wrote appends to its epoch after its first read.
- Lifetime: an epoch the write-behind log refers to has no TTL and counts its
  entries (`wb-epochs`), so it is never evicted or expired while unflushed; one
  only the cache refers to expires with the cache (`ep-cached` lists those), and
  is deleted as soon as neither refers to it: when the cache entry moves to
  another epoch or is dropped, or when the log's last entry naming it is
  acknowledged. A new epoch whose script never ran expires after
  `STAGED_TTL_MS` (it is SET with NX, so a pipeline sent again never touches an
  epoch the first send's script kept). Maintenance that deletes entries or a
  thread's log decides in one script, given the epochs it listed, which go.
  A script touches only epochs among its keys (a cluster routes it by them):
  those of the put and those this process last stored for the entry; an epoch
  written by another process that the cache stops referring to is left to its
  TTL. Each put refreshes the TTL of the epochs its entry refers to.
- Readers fetch the epochs a read needs with GETRANGE, pipelined (a cache hit
  with large values is two round trips; the flusher reads each epoch once for
  every version in a batch). A put between the two reads may release an epoch
  the first names: the entry is read again, once; a reference whose epoch is
  still gone or short reads as `CorruptState`: the cache entry is dropped and
  the cold tier answers.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import CorruptState
from ..ports import StoredBlob, TypedBytes

# A value this large or larger lives in an epoch (module docstring).
BY_REFERENCE_BYTES = 32 * 1024
# Leading bytes each version carries in its reference: a serializer writes a
# container's length there (msgpack: 1 to 5 bytes).
EPOCH_HEAD = 64
# A new epoch SET ahead of a script that never ran (its client died) expires after this.
STAGED_TTL_MS = 60_000
# What `ValueEpochs` keeps of the values it stored, at most.
REMEMBER_BYTES = 64 * 1024 * 1024
# The type of a `b:` field holding a reference (no serde type starts with NUL).
REFERENCE_TYPE = "\0epoch"

_LENGTH_BYTES = 4

LUA_VALUES = """
-- Large values (`redis_values`): ARGV[at] = n, then n quadruples (channel, 'new' or
-- 'append', the epoch's length its writer saw, the tail to append); their epoch keys
-- are KEYS[first_key], KEYS[first_key + 1], ..., followed by the other epochs the writer
-- knows the entry to refer to. A script touches only epochs among its KEYS (a cluster
-- routes it by them): one it does not know of is left to its TTL.
local function value_ops(first_key, at)
  local ops = {}
  for i = 0, tonumber(ARGV[at]) - 1 do
    local o = at + 1 + 4 * i
    ops[#ops + 1] = {key = KEYS[first_key + i], channel = ARGV[o],
      size = tonumber(ARGV[o + 2]), tail = ARGV[o + 3]}
  end
  return ops
end

local function declared(first_key)
  local known = {}
  for i = first_key, #KEYS do known[KEYS[i]] = true end
  return known
end

-- Whether every epoch is at the length its writer saw (a new one: set whole, not expired).
local function values_ready(ops)
  for _, op in ipairs(ops) do
    if redis.call('STRLEN', op.key) ~= op.size then return false end
  end
  return true
end

-- Append the tails. An epoch the log refers to has no TTL and counts its entries in
-- `held`; one only the cache refers to expires with it.
local function write_values(ops, held, logged, ttl)
  for _, op in ipairs(ops) do
    if #op.tail > 0 then redis.call('APPEND', op.key, op.tail) end
    if logged then
      redis.call('PERSIST', op.key)
      redis.call('HINCRBY', held, op.key, 1)
    elseif redis.call('HEXISTS', held, op.key) == 0 then
      redis.call('EXPIRE', op.key, ttl)
    end
  end
end

-- An epoch the cache no longer refers to: gone unless the log still does.
local function release(epoch, cached, held, known)
  redis.call('HDEL', cached, epoch)
  if known[epoch] and redis.call('HEXISTS', held, epoch) == 0 then redis.call('DEL', epoch) end
end

-- Epochs neither the cache nor the log refers to (a put that did not move the cache).
local function release_unreferenced(ops, cached, held, known)
  for _, op in ipairs(ops) do
    if redis.call('HEXISTS', cached, op.key) == 0 then release(op.key, cached, held, known) end
  end
end

-- Drop a cache entry with the epochs it referred to (its `n:{channel}` fields).
local function drop_entry(key, cached, held, known)
  for _, field in ipairs(redis.call('HKEYS', key)) do
    if string.sub(field, 1, 2) == 'n:' then
      release(redis.call('HGET', key, field), cached, held, known)
    end
  end
  redis.call('DEL', key)
end

-- After a put moved the entry `key`: each channel ARGV[first..] set now refers to its
-- op's epoch, or to none (inline); the epoch it referred to before (`referring`: the
-- channels with an `n:` field) is released. The epochs it still refers to expire with it.
local function track_epochs(key, first, ops, cached, held, ttl, referring, known)
  local epochs = {}
  for _, op in ipairs(ops) do epochs[op.channel] = op.key end
  for i = first, #ARGV, 2 do
    if string.sub(ARGV[i], 1, 2) == 'b:' then
      local ch = string.sub(ARGV[i], 3)
      local epoch, old = epochs[ch], nil
      if referring[ch] then old = redis.call('HGET', key, 'n:' .. ch) end
      if old and old ~= epoch then release(old, cached, held, known) end
      if epoch then
        redis.call('HSET', key, 'n:' .. ch, epoch)
        redis.call('HSET', cached, epoch, 1)
        referring[ch] = true
      elseif old then
        redis.call('HDEL', key, 'n:' .. ch)
        referring[ch] = nil
      end
    end
  end
  if next(referring) == nil then return end
  redis.call('EXPIRE', cached, ttl)
  for ch in pairs(referring) do
    local epoch = epochs[ch] or redis.call('HGET', key, 'n:' .. ch)
    if known[epoch] and redis.call('HEXISTS', held, epoch) == 0 then
      redis.call('EXPIRE', epoch, ttl)
    end
  end
end
"""


def _frame(*parts: bytes) -> bytes:
    return b"".join(len(part).to_bytes(_LENGTH_BYTES, "big") + part for part in parts)


def _unframe(packed: bytes | memoryview) -> list[bytes]:
    parts: list[bytes] = []
    offset, end = 0, len(packed)
    while offset < end:
        size = int.from_bytes(packed[offset : offset + _LENGTH_BYTES], "big")
        offset += _LENGTH_BYTES
        parts.append(bytes(packed[offset : offset + size]))
        offset += size
    return parts


@dataclass(frozen=True)
class Reference:
    """Where a version's value is: its epoch, length and first bytes, and its serde type."""

    serde_type: str
    epoch: str
    head: bytes
    length: int

    def encode(self) -> bytes:
        return _frame(
            self.serde_type.encode(), self.epoch.encode(), self.head, str(self.length).encode()
        )

    @classmethod
    def decode(cls, payload: bytes) -> Reference:
        try:
            serde_type, epoch, head, length = _unframe(payload)
            return cls(serde_type.decode(), epoch.decode(), head, int(length))
        except ValueError as exc:
            raise CorruptState(f"an unreadable hot value reference: {exc}") from exc


def read_plan(references: Sequence[Reference]) -> dict[str, int]:
    """The epochs `references` need, each to the longest length any of them reads."""
    needed: dict[str, int] = {}
    for reference in references:
        needed[reference.epoch] = max(needed.get(reference.epoch, 0), reference.length)
    return needed


# An epoch's bytes from `EPOCH_HEAD` on, as read from Redis or held by this process.
EpochBytes = bytes | memoryview


def complete(references: Sequence[Reference], epochs: Mapping[str, EpochBytes]) -> bool:
    """Whether `epochs` hold all that `references` read (else one was released meanwhile)."""
    return all(
        len(epochs.get(reference.epoch, b"")) >= reference.length - len(reference.head)
        for reference in references
    )


def resolve(reference: Reference, epochs: Mapping[str, EpochBytes]) -> TypedBytes:
    """The value `reference` names, from `epochs` (epoch -> its bytes from `EPOCH_HEAD` on,
    as read by GETRANGE for `read_plan`)."""
    data = epochs.get(reference.epoch)
    body = reference.length - len(reference.head)
    if data is None or len(data) < body:
        raise CorruptState(f"hot value epoch {reference.epoch!r} is gone or short")
    return reference.serde_type, reference.head + data[:body]


@dataclass
class ValuePlan:
    """A put's large values as its script receives them (`LUA_VALUES`)."""

    references: dict[str, Reference] = field(default_factory=dict)
    ops: list[bytes | str | int] = field(default_factory=lambda: [0])
    epoch_keys: list[str] = field(default_factory=list)
    # The other epochs this process last stored for the entry: the script may release them.
    known: list[str] = field(default_factory=list)
    # New epochs to SET ahead of the script.
    staged: list[tuple[str, bytes]] = field(default_factory=list)
    # What to remember once the script confirmed: channel -> (epoch, the whole value).
    stored: dict[str, tuple[str, bytes]] = field(default_factory=dict)

    def add(self, channel: str, epoch: str, size: int, tail: bytes, *, new: bool) -> None:
        self.ops[0] = int(self.ops[0]) + 1
        self.ops += [channel, "new" if new else "append", size, tail]
        self.epoch_keys.append(epoch)

    @property
    def keys(self) -> list[str]:
        """The script's epoch keys: the ops' first, then the known ones."""
        return self.epoch_keys + [epoch for epoch in self.known if epoch not in self.epoch_keys]


class ValueEpochs:
    """The value this process last stored per (thread, namespace, channel) and its epoch,
    so a put of a value that only grew sends its tail. Thread-safe: the sync API puts on
    its callers' threads."""

    def __init__(self, remember_bytes: int = REMEMBER_BYTES) -> None:
        self._last: OrderedDict[tuple[str, str], dict[str, tuple[str, bytes]]] = OrderedDict()
        # The same values by epoch, for `held`.
        self._by_epoch: dict[str, bytes] = {}
        self._bytes = 0
        self._budget = remember_bytes
        self._lock = threading.Lock()

    def plan(
        self,
        thread_id: str,
        checkpoint_ns: str,
        blobs: Sequence[StoredBlob],
        new_epoch: Callable[[], str],
    ) -> ValuePlan:
        plan = ValuePlan()
        with self._lock:
            last = dict(self._last.get((thread_id, checkpoint_ns), {}))
        plan.known = [epoch for epoch, _ in last.values()]
        for blob in blobs:
            serde_type, payload = blob.value
            if len(payload) < BY_REFERENCE_BYTES:
                continue
            stored = last.get(blob.channel)
            if stored is not None and _grew(stored[1], payload):
                epoch, before = stored
                plan.add(blob.channel, epoch, len(before), payload[len(before) :], new=False)
            else:
                epoch = new_epoch()
                plan.staged.append((epoch, payload))
                plan.add(blob.channel, epoch, len(payload), b"", new=True)
            head = payload[:EPOCH_HEAD]
            plan.references[blob.channel] = Reference(serde_type, epoch, head, len(payload))
            plan.stored[blob.channel] = (epoch, payload)
        return plan

    def remember(
        self, thread_id: str, checkpoint_ns: str, stored: Mapping[str, tuple[str, bytes]]
    ) -> None:
        """`stored`: channel -> (epoch, the whole value), as a confirmed put stored it or a
        read found it: the next put of this entry appends to it if it only grew."""
        if not stored:
            return
        key = (thread_id, checkpoint_ns)
        with self._lock:
            channels = self._last.setdefault(key, {})
            self._last.move_to_end(key)
            for channel, value in stored.items():
                previous = channels.get(channel)
                if previous is not None:
                    self._unindex(*previous)
                self._bytes += len(value[1]) - (len(previous[1]) if previous else 0)
                channels[channel] = value
                self._by_epoch[value[0]] = value[1]
            while self._bytes > self._budget and self._last:
                _, dropped = self._last.popitem(last=False)
                self._drop(dropped)

    def forget(self, thread_id: str, checkpoint_ns: str | None = None) -> None:
        with self._lock:
            for key in [key for key in self._last if key[0] == thread_id]:
                if checkpoint_ns in (None, key[1]):
                    self._drop(self._last.pop(key))

    def held(self, needed: Mapping[str, int]) -> dict[str, EpochBytes]:
        """Of `needed` (epoch -> length to read, as `read_plan` gives), the epochs this
        process stored or read at least that much of, from `EPOCH_HEAD` on: an epoch only
        ever grows, so those bytes are what Redis holds there, and need no read."""
        found: dict[str, EpochBytes] = {}
        with self._lock:
            for epoch, length in needed.items():
                payload = self._by_epoch.get(epoch)
                if payload is not None and len(payload) >= length:
                    found[epoch] = memoryview(payload)[EPOCH_HEAD:]
        return found

    def _drop(self, channels: Mapping[str, tuple[str, bytes]]) -> None:
        for epoch, payload in channels.values():
            self._bytes -= len(payload)
            self._unindex(epoch, payload)

    def _unindex(self, epoch: str, payload: bytes) -> None:
        if self._by_epoch.get(epoch) is payload:
            del self._by_epoch[epoch]


def _grew(before: bytes, now: bytes) -> bool:
    """Whether `now` is `before` with bytes appended, its first `EPOCH_HEAD` aside."""
    return len(now) >= len(before) > EPOCH_HEAD and now.startswith(
        memoryview(before)[EPOCH_HEAD:], EPOCH_HEAD
    )
