"""Checkpoint blobs stored as shared chunks, so a growing value costs what it grew by.

LangGraph stores a channel's whole value at every version it changes: a message
list appended to a thousand times is stored a thousand times, each copy longer
(quadratic in the conversation). A cold store keeps a large blob here as a
*manifest* whose content lives in per-thread, content-addressed chunks, so a
new version of a value that only grew stores its new bytes plus a few hundred
bytes of bookkeeping.

The mechanism, chosen for appended lists (the serialized form LangGraph's
serde gives a list that grew: the same bytes, a longer tail, and a length in
the first few bytes):

- `HEAD_BYTES` leading bytes (where a serializer writes a container's length)
  stay inline in the manifest: they change with every append;
- the rest is cut into fixed `LEAF_BYTES` leaves. An append leaves every full
  leaf as it was; only the last, partial one changes, and it stays inline in
  the manifest too (compressed with the full leaf before it as the
  dictionary): a leaf is stored once, when it is full. Fixed cuts are what an
  append keeps stable (content-defined cuts would also survive insertions in
  the middle, at a per-byte hashing cost the write path cannot pay in Python);
  a value changed elsewhere is still stored correctly, it only shares less;
- leaves are grouped `FANOUT` to a node, nodes `FANOUT` to a node one level up,
  until at most `FANOUT` digests remain: the manifest's roots. An append
  changes the last node of each level only, and only when a leaf fills, so a
  version costs its manifest, and now and then a leaf and a node per level,
  whatever the length of the value (a flat manifest naming every leaf would
  grow with the value: quadratic again).

Blobs under `CHUNK_THRESHOLD` stay whole (`chunked`). Every chunk and manifest is far below an item (Cosmos's 2 MB
limit holds whatever the value's size; a manifest grows with the depth of
the tree only).

Each chunk is addressed by its BLAKE2b digest (leaf and node digests are
personalized apart, so neither can stand for the other), stored once per
thread, leaves compressed. A reader verifies every chunk against the digest
that names it and the assembled length against the manifest: a value is never
assembled from wrong or missing chunks (`CorruptState` instead). A chunk lives
while a manifest of its thread reaches it; stores delete the others after they
delete blobs (`reachable`), copy them with the thread, and drop them with it.

`Chunker` remembers the last split per (thread, namespace, channel) for a
short while (`REMEMBER_SECONDS`), so a put hashes and compresses only the
leaves it adds and sends only the chunks that version added. A remembered split
counts only once the store confirmed the write, is forgotten when this store
deletes from the thread, and is built on only by a put that continues this
store's own chain: its parent is the last checkpoint this store wrote for the
thread and namespace, and that parent still holds the version of the channel the
split stored (a DeltaChannel snapshot: still in the parent's chain, which
maintenance keeps back to the snapshot; `PendingSplits`). Every chunk such a split
names is then reached from the parent, so while the parent exists no collection
can have taken them, whichever process collects. A put anywhere else (the first
of a thread, a new branch, the redo of a run another process rolled back, a step
after another process's) sends its values' chunks again, and the store forgets
what it remembered of that chain; so does a value whose channel was set to a
small value or cleared since (the graph's input is, at every step after it).

Reading back a value whose manifest a remembered split produced is served from the
split (`Chunker.value_of`: equal manifests name equal bytes, the digests see to
that), so a thread this process writes is read without fetching its chunks. Like
the rest of maintenance, collecting chunks is not safe against a writer of the
same thread running meanwhile, one that puts onto a checkpoint being deleted (the
app prunes and deletes threads whose runs have stopped): its put names chunks that
are gone, which a reader reports as `CorruptState`, never as a wrong value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ..errors import CorruptState
from ..ports import StoredBlob, StoredCheckpoint, TypedBytes

K = TypeVar("K")

# A blob of this many bytes or more is stored as chunks; smaller ones stay whole.
CHUNK_THRESHOLD = 8 * 1024
HEAD_BYTES = 64
LEAF_BYTES = 4096
# zlib levels: leaves are compressed once, when full; the tail with every version.
LEAF_LEVEL = 6
TAIL_LEVEL = 6
FANOUT = 64
DIGEST_BYTES = 16
# The stored `type` of a manifest blob: this prefix and the value's own serde type.
MANIFEST_TYPE_PREFIX = "chunked+"
MANIFEST_MAGIC = b"AGSCHNK1"
# magic, total length, depth (levels of nodes above the leaves), number of roots
MANIFEST_HEADER = struct.Struct(">8sQBH")
# How long a remembered split may spare a put the chunks it already stored.
REMEMBER_SECONDS = 30.0
# Remembered splits hold their value's bytes (compared with the next version's):
# at most this many bytes of them.
REMEMBER_BYTES = 64 * 1024 * 1024
# The last checkpoint stored per (thread, namespace): at most this many remembered.
REMEMBER_TIPS = 4096


def leaf_digest(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=DIGEST_BYTES, person=b"leaf").digest()


def node_digest(children: bytes) -> bytes:
    return hashlib.blake2b(children, digest_size=DIGEST_BYTES, person=b"node").digest()


@dataclass(frozen=True)
class Chunk:
    """A stored chunk: a leaf (`data` compressed) or a node (`data` its children's digests)."""

    digest: bytes
    node: bool
    data: bytes


# Fetches chunks of one thread by digest (a store may return more: their descendants).
Fetch = Callable[[list[bytes]], Awaitable[Mapping[bytes, Chunk]]]


@dataclass(frozen=True)
class Manifest:
    total: int
    depth: int
    roots: tuple[bytes, ...]
    head: bytes
    tail: bytes  # compressed, with the last leaf as its dictionary (`_pack_tail`)

    def encode(self) -> bytes:
        header = MANIFEST_HEADER.pack(MANIFEST_MAGIC, self.total, self.depth, len(self.roots))
        return header + b"".join(self.roots) + self.head + self.tail

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        try:
            magic, total, depth, count = MANIFEST_HEADER.unpack_from(data)
        except struct.error as exc:
            raise CorruptState("chunk manifest is truncated") from exc
        start = MANIFEST_HEADER.size
        end = start + count * DIGEST_BYTES
        if magic != MANIFEST_MAGIC or len(data) < end:
            raise CorruptState("not a chunk manifest")
        roots = tuple(data[at : at + DIGEST_BYTES] for at in range(start, end, DIGEST_BYTES))
        tail_at = end + min(HEAD_BYTES, total)
        return cls(total, depth, roots, data[end:tail_at], data[tail_at:])


def chunked(value: TypedBytes) -> bool:
    """Whether a blob is stored as chunks: large enough.

    DeltaChannel snapshots too: each is the whole conversation so far, so stored whole
    they grow quadratically with it; chunked, a snapshot stores what the conversation
    gained since the one before. The stores fetch a seed's chunks in the request that
    loads its history (Postgres in the same statement, Cosmos by the blocks' snapshot
    tag, alongside), so a history costs no extra round trip for them.
    """
    return len(value[1]) >= CHUNK_THRESHOLD


# LangGraph's serde writes a DeltaChannel snapshot as a top-level msgpack extension of
# this type: ext 8/16/32, then a 1/2/4-byte length, then the type byte; or, for a payload
# of 1, 2, 4, 8 or 16 bytes (an empty list), fixext, then the type byte.
DELTA_SNAPSHOT_EXT = 7
_EXT_TYPE_AT = {0xC7: 2, 0xC8: 3, 0xC9: 5, 0xD4: 1, 0xD5: 1, 0xD6: 1, 0xD7: 1, 0xD8: 1}


def delta_snapshot(type_: str, head: bytes) -> bool:
    """Whether a value whose serde type is `type_` and whose bytes start with `head` (at
    least 6 of them; a manifest keeps `HEAD_BYTES`) is a DeltaChannel snapshot."""
    at = _EXT_TYPE_AT.get(head[0]) if head else None
    return (
        type_ == "msgpack" and at is not None and len(head) > at and head[at] == DELTA_SNAPSHOT_EXT
    )


def manifest_head(data: bytes) -> bytes:
    """The first bytes of the value a manifest names (kept inline, `HEAD_BYTES`)."""
    return Manifest.decode(data).head


def fetched_first(fetched: Mapping[bytes, Chunk] | None, fetch: Fetch) -> Fetch:
    """`fetch`, asked only for the digests not among those already `fetched` (by the
    request that loaded the manifests), the answers merged with them."""
    known: Mapping[bytes, Chunk] = fetched or {}

    async def merged(digests: list[bytes]) -> Mapping[bytes, Chunk]:
        asked = [digest for digest in digests if digest not in known]
        if not asked:
            return known
        return {**known, **await fetch(asked)}

    return merged


def is_manifest(type_: str) -> bool:
    return type_.startswith(MANIFEST_TYPE_PREFIX)


def children(node: Chunk) -> list[bytes]:
    return [node.data[at : at + DIGEST_BYTES] for at in range(0, len(node.data), DIGEST_BYTES)]


def manifest_digests(data: bytes) -> tuple[bytes, ...]:
    return Manifest.decode(data).roots


def _levels(leaves: list[bytes]) -> tuple[list[list[bytes]], list[bytes]]:
    """The node levels above `leaves` (each a list of the nodes' children bytes) and the roots."""
    levels: list[list[bytes]] = []
    current = leaves
    while len(current) > FANOUT:
        nodes = [b"".join(current[at : at + FANOUT]) for at in range(0, len(current), FANOUT)]
        levels.append(nodes)
        current = [node_digest(node) for node in nodes]
    return levels, current


@dataclass
class Split:
    """What a confirmed write stored for one (thread, namespace, channel)."""

    value: bytes
    manifest: bytes
    full_leaves: int
    leaves: list[bytes]
    # The chunks this version's manifest reaches (not those of earlier versions: a
    # chunk no manifest reaches any more may have been collected).
    stored: frozenset[bytes]
    at: float
    # The channel version it was stored at, and whether it is a DeltaChannel snapshot.
    version: str = ""
    snapshot: bool = False


@dataclass(frozen=True)
class Tip:
    """The last checkpoint a store wrote of one (thread, namespace), and its channels'
    versions: what the chunks of a remembered split must be reached from."""

    checkpoint_id: str
    versions: Mapping[str, str]


class Chunker:
    """Splits large blobs into a manifest and chunks; see the module docstring."""

    def __init__(self) -> None:
        # The Postgres store's sync API uses one chunker from its callers' threads too.
        self._lock = threading.RLock()
        self._splits: OrderedDict[tuple[str, str, str], Split] = OrderedDict()
        self._by_manifest: dict[bytes, tuple[str, str, str]] = {}
        self._bytes = 0
        self._tips: OrderedDict[tuple[str, str], Tip] = OrderedDict()
        # The channels with a remembered split, per (thread, namespace).
        self._channels: dict[tuple[str, str], set[str]] = {}

    def tip(self, thread_id: str, checkpoint_ns: str) -> Tip | None:
        """The last checkpoint of (thread, namespace) this chunker's store wrote, if known."""
        with self._lock:
            return self._tips.get((thread_id, checkpoint_ns))

    def remembered(self, key: tuple[str, str, str]) -> Split | None:
        """The confirmed split of `key`, unless it is too old to trust."""
        with self._lock:
            known = self._splits.get(key)
            if known is None or time.monotonic() - known.at > REMEMBER_SECONDS:
                return None
            return known

    def split(
        self, value: bytes, known: Split | None, *, version: str = "", snapshot: bool = False
    ) -> tuple[bytes, list[Chunk], Split]:
        """The manifest of `value`, the chunks to store for it (those `known`, the split of
        the same channel's previous version, has not stored), and what to `confirm`."""
        head, body = value[:HEAD_BYTES], memoryview(value)[HEAD_BYTES:]
        full = len(body) // LEAF_BYTES
        reused: list[bytes] = []
        if known is not None and known.full_leaves <= full:
            end = HEAD_BYTES + known.full_leaves * LEAF_BYTES
            # The full leaves `known` hashed are still there, byte for byte: one memcmp,
            # without copying either side (a slice of a large value costs its page faults).
            if value.startswith(memoryview(known.value)[HEAD_BYTES:end], HEAD_BYTES):
                reused = known.leaves[: known.full_leaves]
        stored = known.stored if reused and known is not None else frozenset()
        chunks: list[Chunk] = []
        leaves = list(reused)
        for at in range(len(reused) * LEAF_BYTES, full * LEAF_BYTES, LEAF_BYTES):
            raw = bytes(body[at : at + LEAF_BYTES])
            digest = leaf_digest(raw)
            leaves.append(digest)
            if digest not in stored:
                chunks.append(Chunk(digest, False, zlib.compress(raw, LEAF_LEVEL)))
        levels, roots = _levels(leaves)
        nodes = [Chunk(node_digest(node), True, node) for level in levels for node in level]
        chunks.extend(node for node in nodes if node.digest not in stored)
        tree = frozenset(leaves).union(node.digest for node in nodes)
        last_leaf = bytes(body[(full - 1) * LEAF_BYTES : full * LEAF_BYTES]) if full else b""
        tail = _pack_tail(bytes(body[full * LEAF_BYTES :]), last_leaf)
        manifest = Manifest(len(value), len(levels), tuple(roots), bytes(head), tail).encode()
        remembered = Split(
            value=value,
            manifest=manifest,
            full_leaves=full,
            leaves=leaves,
            stored=tree,
            at=time.monotonic(),
            version=version,
            snapshot=snapshot,
        )
        return manifest, _unique(chunks), remembered

    def confirm(self, pending: PendingSplits) -> None:
        """What `pending` packed is stored: the puts continuing its chains build on it."""
        with self._lock:
            for where in pending.restarted:
                self._drop_chain(where)
            for key in pending.stale:
                self._drop(key)
            for key, split in pending.splits.items():
                self._remember(key, split)
            for where, tip in pending.tips.items():
                self._tips.pop(where, None)
                self._tips[where] = tip
            while len(self._tips) > REMEMBER_TIPS:
                where, _ = self._tips.popitem(last=False)
                self._drop_chain(where)

    def _remember(self, key: tuple[str, str, str], split: Split) -> None:
        self._drop(key)
        self._splits[key] = split
        self._by_manifest[split.manifest] = key
        self._channels.setdefault(key[:2], set()).add(key[2])
        self._bytes += len(split.value)
        while self._bytes > REMEMBER_BYTES:
            self._drop(next(iter(self._splits)))

    def _drop_chain(self, where: tuple[str, str]) -> None:
        for channel in list(self._channels.get(where, ())):
            self._drop((*where, channel))

    def value_of(self, manifest: bytes) -> bytes | None:
        """The value of `manifest` if a remembered split wrote it (at any age: a manifest
        names its bytes by their digests, whatever became of the chunks since)."""
        with self._lock:
            key = self._by_manifest.get(manifest)
            return None if key is None else self._splits[key].value

    def forget(self, thread_ids: Iterable[str]) -> None:
        """Chunks of these threads may have been deleted: send them again next time."""
        with self._lock:
            doomed = set(thread_ids)
            for where in [where for where in self._channels if where[0] in doomed]:
                self._drop_chain(where)
            for where in [where for where in self._tips if where[0] in doomed]:
                del self._tips[where]

    def _drop(self, key: tuple[str, str, str]) -> None:
        split = self._splits.pop(key, None)
        if split is None:
            return
        channels = self._channels[key[:2]]
        channels.discard(key[2])
        if not channels:
            del self._channels[key[:2]]
        self._bytes -= len(split.value)
        # Equal values (two channels, threads or namespaces) share one manifest entry.
        if self._by_manifest.get(split.manifest) == key:
            del self._by_manifest[split.manifest]


class PendingSplits:
    """The splits of one store call's checkpoints, in order, until the store confirms them.

    Call `begin` for every checkpoint put with its blobs (chunked or not: it moves the
    chain), then `split` for each of its chunked values. A value builds on what is
    remembered of its channel only if the put continues the chain (its parent is the
    last checkpoint written, by this call or confirmed before, or it is that checkpoint
    again) and that checkpoint still holds the remembered version: a channel set to a
    small value or cleared since (the graph's input, say) no longer reaches the old
    chunks. A DeltaChannel snapshot stays remembered past the versions its updates add,
    as maintenance keeps every checkpoint's chain back to its latest snapshot, until a
    newer snapshot replaces it (one stored whole, too small to chunk, forgets it).
    """

    def __init__(self, chunker: Chunker) -> None:
        self._chunker = chunker
        self.splits: dict[tuple[str, str, str], Split] = {}
        self.tips: dict[tuple[str, str], Tip] = {}
        # Chains this call broke: what the chunker remembers of them goes on confirm.
        self.restarted: set[tuple[str, str]] = set()
        # Per (thread, namespace), the versions of the checkpoint the put being split
        # builds on (None: it does not continue the chain).
        self._built_on: dict[tuple[str, str], Mapping[str, str] | None] = {}
        # Channels whose remembered split this call made stale (on confirm: forgotten).
        self.stale: set[tuple[str, str, str]] = set()

    def begin(self, checkpoint: StoredCheckpoint, blobs: Iterable[StoredBlob]) -> None:
        where = (checkpoint.thread_id, checkpoint.checkpoint_ns)
        tip = self.tips[where] if where in self.tips else self._chunker.tip(*where)
        parent = checkpoint.parent_checkpoint_id
        if tip is None or tip.checkpoint_id not in (parent, checkpoint.checkpoint_id):
            self.restarted.add(where)
            for key in [key for key in self.splits if key[:2] == where]:
                del self.splits[key]
            self._built_on[where] = None
        else:
            self._built_on[where] = tip.versions
        versions = {channel: str(v) for channel, v in checkpoint.channel_versions.items()}
        self.tips[where] = Tip(checkpoint.checkpoint_id, versions)
        for blob in blobs:
            type_, data = blob.value
            if not chunked(blob.value) and delta_snapshot(type_, data[:HEAD_BYTES]):
                key = (*where, blob.channel)
                self.splits.pop(key, None)
                self.stale.add(key)

    def split(
        self, key: tuple[str, str, str], value: TypedBytes, version: str | int | float
    ) -> tuple[bytes, list[Chunk]]:
        """The manifest of `value`, the channel `key` of the checkpoint `begin` was last
        called for, stored at `version`, and the chunks to store for it."""
        where, channel = key[:2], key[2]
        type_, data = value
        known = self.splits.get(key)
        if known is None and where not in self.restarted and key not in self.stale:
            known = self._chunker.remembered(key)
        built_on = self._built_on.get(where)
        if known is not None and (
            built_on is None or (not known.snapshot and built_on.get(channel) != known.version)
        ):
            known = None
        snapshot = delta_snapshot(type_, data[:HEAD_BYTES])
        manifest, added, self.splits[key] = self._chunker.split(
            data, known, version=str(version), snapshot=snapshot
        )
        return manifest, added


def _unique(chunks: list[Chunk]) -> list[Chunk]:
    seen: dict[bytes, Chunk] = {}
    for chunk in chunks:
        seen.setdefault(chunk.digest, chunk)
    return list(seen.values())


def assemble(manifest: bytes, chunks: Mapping[bytes, Chunk]) -> bytes:
    """The value a manifest names, from its thread's chunks; every chunk verified."""
    decoded = Manifest.decode(manifest)
    digests = list(decoded.roots)
    for _ in range(decoded.depth):
        below: list[bytes] = []
        for digest in digests:
            node = _chunk(chunks, digest, node=True)
            if node_digest(node.data) != digest:
                raise CorruptState("a chunk node does not match its digest")
            below.extend(children(node))
        digests = below
    parts = [decoded.head]
    for digest in digests:
        leaf = _chunk(chunks, digest, node=False)
        try:
            raw = zlib.decompress(leaf.data)
        except zlib.error as exc:
            raise CorruptState("a chunk does not decompress") from exc
        if leaf_digest(raw) != digest:
            raise CorruptState("a chunk does not match its digest")
        parts.append(raw)
    parts.append(_unpack_tail(decoded.tail, parts[-1] if digests else b""))
    value = b"".join(parts)
    if len(value) != decoded.total:
        raise CorruptState("chunks do not add up to the manifest's length")
    return value


def _pack_tail(raw: bytes, last_leaf: bytes) -> bytes:
    """The partial last leaf, compressed with the full one before it as the dictionary:
    the same kind of content, so the tail a version stores inline costs a third less."""
    packer = (
        zlib.compressobj(TAIL_LEVEL, zdict=last_leaf) if last_leaf else zlib.compressobj(TAIL_LEVEL)
    )
    return packer.compress(raw) + packer.flush()


def _unpack_tail(packed: bytes, last_leaf: bytes) -> bytes:
    unpacker = zlib.decompressobj(zdict=last_leaf) if last_leaf else zlib.decompressobj()
    try:
        raw = unpacker.decompress(packed) + unpacker.flush()
    except zlib.error as exc:
        raise CorruptState("a chunk manifest's tail does not decompress") from exc
    if not unpacker.eof:
        raise CorruptState("a chunk manifest's tail is truncated")
    return raw


def _chunk(chunks: Mapping[bytes, Chunk], digest: bytes, *, node: bool) -> Chunk:
    chunk = chunks.get(digest)
    if chunk is None or chunk.node != node:
        raise CorruptState(f"chunk {digest.hex()} is missing")
    return chunk


def reachable(manifests: Iterable[bytes], nodes: Mapping[bytes, Chunk]) -> set[bytes]:
    """Digests of every chunk the manifests reach, given the thread's nodes."""
    found: set[bytes] = set()
    pending = [digest for manifest in manifests for digest in manifest_digests(manifest)]
    while pending:
        digest = pending.pop()
        if digest in found:
            continue
        found.add(digest)
        node = nodes.get(digest)
        if node is not None:
            pending.extend(children(node))
    return found


# The value of a manifest known without fetching its chunks (`Chunker.value_of`).
Known = Callable[[bytes], bytes | None]


async def resolve(
    values: Mapping[K, TypedBytes], fetch: Fetch, known: Known
) -> dict[K, TypedBytes]:
    """`values` (of one thread) with each manifest replaced by the value it names: the
    `known` ones directly, the others with one `fetch` per level of nodes, for the
    digests not fetched yet."""
    resolved = dict(values)
    manifests: dict[K, bytes] = {}
    for key, (type_, data) in values.items():
        if not is_manifest(type_):
            continue
        value = known(data)
        if value is None:
            manifests[key] = data
        else:
            resolved[key] = (type_.removeprefix(MANIFEST_TYPE_PREFIX), value)
    if not manifests:
        return resolved
    found: dict[bytes, Chunk] = {}
    # One level of the manifests' trees at a time, from their roots: only the nodes they
    # reach are walked down. A fetch may return more (a store's descendants, or every
    # block of a snapshot's tag, older snapshots' too): a node no manifest reaches may
    # have outlived its children in a collection.
    level = {digest for data in manifests.values() for digest in manifest_digests(data)}
    seen = set(level)
    while level:
        asked = [digest for digest in level if digest not in found]
        if asked:
            found.update(await fetch(sorted(asked)))
        # The store has no chunk of that digest: asking again would not find it either.
        missing = level - found.keys()
        if missing:
            raise CorruptState(f"chunk {min(missing).hex()} is missing")
        below = {
            child for digest in level if found[digest].node for child in children(found[digest])
        }
        level = below - seen
        seen |= level
    for key, data in manifests.items():
        resolved[key] = (values[key][0].removeprefix(MANIFEST_TYPE_PREFIX), assemble(data, found))
    return resolved


async def resolve_checkpoints(
    checkpoints: Sequence[StoredCheckpoint],
    fetcher: Callable[[str], Fetch],
    known: Known,
) -> list[StoredCheckpoint]:
    """`checkpoints` with the manifests among their blobs and history seeds assembled:
    one `resolve` per thread that has any (`fetcher(thread_id)` fetches its chunks)."""
    by_thread: dict[str, dict[tuple[int, str, str], TypedBytes]] = {}
    for n, stored in enumerate(checkpoints):
        values = by_thread.setdefault(stored.thread_id, {})
        for ch, value in (stored.blobs or {}).items():
            values[(n, "blob", ch)] = value
        for ch, history in (stored.history or {}).items():
            if history.seed is not None:
                values[(n, "seed", ch)] = history.seed
    resolved: dict[tuple[int, str, str], TypedBytes] = {}
    for thread_id, values in by_thread.items():
        if any(is_manifest(type_) for type_, _ in values.values()):
            resolved.update(await resolve(values, fetcher(thread_id), known))
    if not resolved:
        return list(checkpoints)
    return [
        dataclasses.replace(
            stored,
            blobs=None
            if stored.blobs is None
            else {ch: resolved.get((n, "blob", ch), v) for ch, v in stored.blobs.items()},
            history=None
            if stored.history is None
            else {
                ch: dataclasses.replace(h, seed=resolved.get((n, "seed", ch), h.seed))
                for ch, h in stored.history.items()
            },
        )
        for n, stored in enumerate(checkpoints)
    ]
