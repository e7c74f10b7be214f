"""How LangGraph checkpoints are laid out as Cosmos documents: ids, entries, chunking.

Documents of one thread share its logical partition; every one carries `type`,
`thread_id` and `schema_version` (the logical schema, shared with Postgres:
`state.schema`). Layout 2 (the `layout` field; absent means layout 1):

- `cp:{ns}:{checkpoint_id}`  a checkpoint. It embeds the serialized checkpoint
  (`checkpoint`), the values of the channels that changed in its step
  (`values`: channel -> entry with its `version`), and where the current value
  of every channel lives (`value_at`: channel -> id of the document holding it,
  itself or an ancestor, inherited from the parent), and for LangGraph's
  DeltaChannel, where each rebuilt channel's history starts (`delta_seed`, see
  `delta_seeds`). One write stores a step,
  and the ids it names were all written before it, so a reader that can see a
  checkpoint can see everything it references: no ordering of requests needed.
- `write:{ns}:{checkpoint_id}:{task_id}`  the ordinary pending writes of one
  task (created once, first write wins per index);
  `write:{ns}:{checkpoint_id}:{task_id}:{idx}`  one special write (errors,
  interrupts, resume), replaced by a repeat.
- `checkpoint_values` documents keep the id of a checkpoint that maintenance
  removed while a kept checkpoint still names it in `value_at`: only the
  referenced values stay.
- `blk:{digest}`  a chunk of a large value (`state.cold.chunks`): the value's
  entry holds the manifest (its `serde` prefixed `chunked+`), its content is in
  these documents, one per distinct chunk of the thread, shared by every
  version (so an appended list stores what it grew by). Written before the
  checkpoint naming them; maintenance deletes those no manifest reaches, once
  old enough (`_ts`) that no step still landing names them
  (`cosmos_checkpoints.block_grace_seconds`).
- `{owner id}:{chunk set}:{n}`  part n of an entry too large for its document.
  A chunk set is named by a digest of the entry's key in its document (channel,
  write index) and its content: storing the same step again (a retry, a
  write-behind batch applied twice) rewrites the same chunks instead of
  leaving copies, and two entries never share chunks. Clean-up after a lost
  first-write-wins race deletes only chunks the stored document does not use.

An entry is `{serde, enc, data, parts, chunk_set}`: the value compressed over the
threshold, base64 in `data`, or (spilled) `data` empty and the payload in chunks
1..parts-1. A document is packed to stay under the item limit by spilling its
largest entries first.

Layout 1 (written before): the checkpoint's own entry at the top level of the
`cp:` document, one `blob:{ns}:{channel}:{version}` document per channel
version, one `write:...:{task}:{idx}` document per write, and a `ptr:{ns}`
pointer. `to_layout_2` reads those in the new shape (a layout-1 checkpoint's
`value_at` names the blob documents), so threads written before keep working
and continue in layout 2; pointers are no longer read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import codec
from ..errors import CorruptState, InvalidValue, StateTooLarge
from ..ports import StoredBlob, StoredCheckpoint, StoredWrite, TypedBytes
from ..schema import CURRENT, upcast
from .chunks import MANIFEST_TYPE_PREFIX, Chunk, delta_snapshot, is_manifest, manifest_head

Doc = dict[str, Any]

CHECKPOINT = "checkpoint"
VALUES = "checkpoint_values"
WRITE = "checkpoint_write"
CHUNK = "checkpoint_chunk"
# A content-addressed chunk of large values (`state.cold.chunks`), shared by their versions.
BLOCK = "checkpoint_block"
# Layout 1 only: read, deleted and copied, never written.
BLOB = "checkpoint_blob"
POINTER = "checkpoint_pointer"
ALL_TYPES = [CHECKPOINT, VALUES, WRITE, CHUNK, BLOCK, BLOB, POINTER]
# Logical schema kind of each document type (chunks are raw slices of their owner).
SCHEMA_KIND = {CHECKPOINT: "checkpoint", VALUES: "checkpoint", BLOB: "blob", WRITE: "write"}
LAYOUT = 2
ENTRY_FIELDS = ("serde", "enc", "data", "parts", "chunk_set")

# Cosmos caps ids at 1023 bytes; longer ones are replaced by a digest.
MAX_ID_LENGTH = 1000
# Cosmos holds every JSON number as a double: an integer past 2**53 in a checkpoint's
# metadata would come back rounded, and a float without a fraction as an integer (2.0 as 2,
# 2.0**60 as the integer of its shortest digits, another number), so such metadata is also
# kept exactly, as JSON text.
EXACT_INT = 2**53
ID_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


# --------------------------------------------------------------------------- ids


def _id_part(text: str) -> str:
    """Ids may not contain / \\ ? #; escaping also keeps ':' free as the separator."""
    if ID_SAFE.issuperset(text):  # the common case (ids, plain names), checked in C
        return text
    return "".join(
        ch if ch in ID_SAFE else "".join(f"~{byte:02X}" for byte in ch.encode()) for ch in text
    )


def _doc_id(prefix: str, *parts: str) -> str:
    doc_id = ":".join([prefix, *(_id_part(part) for part in parts)])
    if len(doc_id) <= MAX_ID_LENGTH:
        return doc_id
    return f"{prefix}:~h:{hashlib.sha256(doc_id.encode()).hexdigest()}"


def checkpoint_doc_id(checkpoint_ns: str, checkpoint_id: str) -> str:
    return _doc_id("cp", checkpoint_ns, checkpoint_id)


def task_writes_doc_id(checkpoint_ns: str, checkpoint_id: str, task_id: str) -> str:
    return _doc_id("write", checkpoint_ns, checkpoint_id, task_id)


def write_doc_id(checkpoint_ns: str, checkpoint_id: str, task_id: str, idx: int) -> str:
    """A special write in layout 2; every write in layout 1."""
    return _doc_id("write", checkpoint_ns, checkpoint_id, task_id, str(idx))


def blob_doc_id(checkpoint_ns: str, channel: str, version: str | int | float) -> str:
    return _doc_id("blob", checkpoint_ns, channel, str(version))


def block_doc_id(digest: bytes) -> str:
    return f"blk:{digest.hex()}"


def block_doc(thread_id: str, chunk: Chunk, snapshot_of: tuple[str, str] | None) -> Doc:
    """A block; one of a DeltaChannel snapshot carries the snapshot's (namespace, channel),
    so a snapshot's blocks come by one query by that tag, not one per level of its tree.
    Blocks are upserted: the tag is the last storing snapshot's (a block another value
    stored last is fetched by digest instead)."""
    doc: Doc = {
        "id": block_doc_id(chunk.digest),
        "type": BLOCK,
        "thread_id": thread_id,
        "node": chunk.node,
        "schema_version": 1,
        "data": codec.to_text(chunk.data),
    }
    if snapshot_of is not None:
        doc["checkpoint_ns"], doc["snapshot_of"] = snapshot_of
    return doc


def block_of(doc: Doc) -> Chunk:
    """The chunk a block document holds (its digest from its id: checked on assembly)."""
    try:
        digest = bytes.fromhex(doc["id"].removeprefix("blk:"))
    except ValueError as exc:
        raise CorruptState(f"{doc['id']} is not a block id") from exc
    node, data = doc.get("node"), doc.get("data")
    # A damaged document is damage (typed), not a KeyError reaching the caller.
    if not isinstance(node, bool) or not isinstance(data, str):
        raise CorruptState(f"{doc['id']} is not a block document")
    return Chunk(digest, node, codec.from_text(data))


def snapshot_channels(doc: Doc) -> list[str]:
    """Channels whose value the document holds as a manifest of a DeltaChannel snapshot."""
    found = []
    for channel, entry in held_values(doc).items():
        serde = str(entry.get("serde", ""))
        if is_manifest(serde) and int(entry["parts"]) == 1:
            head = manifest_head(decode(doc["id"], entry, {})[1])
            if delta_snapshot(serde.removeprefix(MANIFEST_TYPE_PREFIX), head):
                found.append(channel)
    return found


def manifests_of(docs: Iterable[Doc], chunks: Mapping[str, Doc]) -> list[bytes]:
    """The chunk manifests among the values the documents hold (`chunks`: their spill)."""
    return [
        decode(doc["id"], entry, chunks)[1]
        for doc in docs
        for entry in held_values(doc).values()
        if is_manifest(str(entry.get("serde", "")))
    ]


def chunk_ids(owner_id: str, entry: Mapping[str, Any]) -> list[str]:
    """Ids of the chunks that follow the part an entry holds inline."""
    return [f"{owner_id}:{entry['chunk_set']}:{part}" for part in range(1, int(entry["parts"]))]


def _json_size(doc: Doc) -> int:
    """Its JSON's bytes; a number JSON cannot carry is refused here, before sending (the
    emulator answers it with a 500, which reads as an outage)."""
    try:
        return len(json.dumps(doc, allow_nan=False).encode())
    except ValueError as exc:  # NaN, Infinity (or a value that contains itself)
        raise InvalidValue("cosmos", f"not valid JSON: {exc}", code=400) from exc


def packed_size(doc: Doc) -> int:
    """`_json_size(doc)` without encoding the payloads (base64 is counted by its length)."""
    held = [(entry, entry["data"]) for entry in entries(doc)]
    for entry, _ in held:
        entry["data"] = ""
    try:
        return _json_size(doc) + sum(len(data) for _, data in held)
    finally:
        for entry, data in held:
            entry["data"] = data


# --------------------------------------------------------------------------- reading layouts


def to_layout_2(doc: Doc) -> Doc:
    """Any stored document in the current layout, then upcast to the current logical schema.

    The boundary where a stored document becomes one the readers take apart: one of the
    wrong shape is `CorruptState` naming it here, not a KeyError or TypeError from a reader.
    """
    kind = SCHEMA_KIND.get(doc.get("type", ""))
    if kind is None:
        return doc
    try:
        if doc.get("layout", 1) < LAYOUT:
            if doc["type"] == CHECKPOINT:
                doc = _checkpoint_1_to_2(doc)
            elif doc["type"] == WRITE:
                doc = _write_1_to_2(doc)
        doc = upcast(kind, doc)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _damaged(doc, repr(exc)) from exc
    _check_shape(doc)
    return doc


def _damaged(doc: Doc, what: str) -> CorruptState:
    return CorruptState(f"{doc.get('id')!r} is not a {doc.get('type')} document: {what}")


def _check_entry(doc: Doc, entry: Any) -> None:
    """An entry `decode` and `chunk_ids` can read (`Packer.entry`)."""
    if not (
        isinstance(entry, dict)
        and isinstance(entry.get("serde"), str)
        and isinstance(entry.get("enc"), str)
        and isinstance(entry.get("data"), str)
        and type(entry.get("parts")) is int
        and entry["parts"] >= 1
        and isinstance(entry.get("chunk_set"), str)
    ):
        raise _damaged(doc, "a damaged value entry")


def check_values(doc: Doc) -> None:
    """`CorruptState` unless its `values` are channel -> entry with a `version` (also for
    documents queried by their values alone, that skip `to_layout_2`)."""
    values = doc.get("values")
    if values is None:
        return
    if not isinstance(values, dict):
        raise _damaged(doc, "its values are not a mapping")
    for entry in values.values():
        _check_entry(doc, entry)
        if not isinstance(entry.get("version"), str | int | float):
            raise _damaged(doc, "a value without a version")


def _check_shape(doc: Doc) -> None:
    """`CorruptState` unless a (layout-2, upcast) document has the fields its readers take."""
    if not isinstance(doc.get("id"), str):
        raise _damaged(doc, "no id")
    kind = doc["type"]
    if kind == BLOB:
        _check_entry(doc, doc)
        if not isinstance(doc.get("channel"), str) or not isinstance(
            doc.get("version"), str | int | float
        ):
            raise _damaged(doc, "no channel or version")
        return
    if kind == VALUES:
        check_values(doc)
        return
    if not isinstance(doc.get("checkpoint_ns"), str) or not isinstance(
        doc.get("checkpoint_id"), str
    ):
        raise _damaged(doc, "no namespace or checkpoint id")
    if kind == WRITE:
        writes = doc.get("writes")
        if not (
            isinstance(writes, list)
            and isinstance(doc.get("task_id"), str)
            and isinstance(doc.get("task_path"), str)
        ):
            raise _damaged(doc, "no writes list, task id or task path")
        for entry in writes:
            _check_entry(doc, entry)
            if type(entry.get("idx")) is not int or not isinstance(entry.get("channel"), str):
                raise _damaged(doc, "a write without an index or channel")
        return
    check_values(doc)
    _check_entry(doc, doc.get("checkpoint"))
    parent = doc.get("parent_checkpoint_id")
    value_at = doc.get("value_at")
    seeds = doc.get("delta_seed")
    if not (
        isinstance(doc.get("thread_id"), str)
        and (parent is None or isinstance(parent, str))
        and isinstance(doc.get("channel_versions"), dict)
        and isinstance(doc.get("metadata"), dict)
        and isinstance(doc.get("metadata_json") or "", str)
        and isinstance(value_at, dict)
        and all(isinstance(holder, str) for holder in value_at.values())
        and (seeds is None or isinstance(seeds, dict))
    ):
        raise _damaged(doc, "a damaged thread id, parent, versions, metadata or value_at")
    for seed in (seeds or {}).values():
        if not (
            isinstance(seed, dict)
            and isinstance(seed.get("since"), str)
            and isinstance(seed.get("holder") or "", str)
        ):
            raise _damaged(doc, "a damaged delta_seed")


def _checkpoint_1_to_2(doc: Doc) -> Doc:
    converted = {key: value for key, value in doc.items() if key not in ENTRY_FIELDS}
    ns = doc["checkpoint_ns"]
    converted.update(
        layout=LAYOUT,
        checkpoint={key: doc[key] for key in ENTRY_FIELDS},
        values={},
        # Layout 1 wrote a blob per channel version; channels kept inline have none.
        value_at={
            channel: blob_doc_id(ns, channel, version)
            for channel, version in (doc.get("channel_versions") or {}).items()
        },
    )
    return converted


def _write_1_to_2(doc: Doc) -> Doc:
    converted = {
        key: value for key, value in doc.items() if key not in (*ENTRY_FIELDS, "idx", "channel")
    }
    entry = {key: doc[key] for key in ENTRY_FIELDS}
    # A layout-1 write document is the stored winner of its (task, idx): exact, like a replace.
    converted.update(
        layout=LAYOUT,
        replace=True,
        writes=[{**entry, "idx": doc["idx"], "channel": doc["channel"]}],
    )
    return converted


def held_values(doc: Doc) -> dict[str, Doc]:
    """Channel -> entry (with `version`) of the values a document holds (any layout)."""
    if doc["type"] == BLOB:
        return {doc["channel"]: doc}
    return dict(doc.get("values") or {})


def entries(doc: Doc) -> Iterator[Doc]:
    """Every entry a (layout-2) document carries."""
    if doc["type"] == BLOB:
        yield doc
        return
    if "checkpoint" in doc:
        yield doc["checkpoint"]
    yield from (doc.get("values") or {}).values()
    yield from doc.get("writes") or ()


def chunks_of(docs: Iterable[Doc]) -> list[str]:
    return [
        chunk
        for doc in docs
        for entry in entries(doc)
        if int(entry["parts"]) > 1
        for chunk in chunk_ids(doc["id"], entry)
    ]


def decode(owner_id: str, entry: Mapping[str, Any], chunks: Mapping[str, Doc]) -> TypedBytes:
    parts = [codec.from_text(entry["data"])]
    for chunk_id in chunk_ids(owner_id, entry):
        chunk = chunks.get(chunk_id)
        if chunk is None:
            raise CorruptState(f"{owner_id} is missing its chunk {chunk_id}")
        data = chunk.get("data")
        # A damaged chunk document is damage (typed), as a damaged block is (`block_of`).
        if not isinstance(data, str):
            raise CorruptState(f"{chunk_id} is not a chunk document")
        parts.append(codec.from_text(data))
    return entry["serde"], codec.decode(entry["enc"], parts, expected_chunks=int(entry["parts"]))


@dataclass(frozen=True)
class Lineage:
    """What a child checkpoint inherits: where each channel's value lives, at which version,
    and where the history of each DeltaChannel rebuilt at it starts."""

    checkpoint_id: str
    channel_versions: dict[str, str | int | float]
    value_at: dict[str, str]
    delta_seed: dict[str, Doc]

    @classmethod
    def of(cls, doc: Doc) -> Lineage:
        return cls(
            doc["checkpoint_id"],
            dict(doc["channel_versions"]),
            dict(doc["value_at"]),
            dict(doc.get("delta_seed") or {}),
        )


def delta_seeds(
    checkpoint: StoredCheckpoint, blobs: Sequence[StoredBlob], parent: Lineage | None
) -> dict[str, Doc]:
    """Where the history of each DeltaChannel LangGraph rebuilds at `checkpoint` starts.

    LangGraph names those channels in the metadata (`counters_since_delta_snapshot`:
    updated since their last snapshot). Per channel, `since` is the id of the nearest
    ancestor storing its value (`holder`: the document holding it) or, for a channel first
    written at the parent, the parent (`holder` None: nothing before it). Inherited from
    the parent, so a reader of the checkpoint knows the range of ancestors to read with
    it, in the same round trip as its writes; a channel whose start the parent does not
    know is left out (its history is then resolved from the lineage).
    """
    counted = checkpoint.metadata.get("counters_since_delta_snapshot")
    if parent is None or not isinstance(counted, dict):
        return {}
    stored_here = {blob.channel for blob in blobs}
    seeds: dict[str, Doc] = {}
    for channel in counted:
        if channel not in checkpoint.channel_versions or channel in stored_here:
            continue
        if channel in parent.value_at:
            seeds[channel] = {"since": parent.checkpoint_id, "holder": parent.value_at[channel]}
        elif channel not in parent.channel_versions:
            seeds[channel] = {"since": parent.checkpoint_id, "holder": None}
        elif channel in parent.delta_seed:
            seeds[channel] = parent.delta_seed[channel]
    return seeds


def stored_checkpoint(
    doc: Doc, holders: Mapping[str, Doc], chunks: Mapping[str, Doc], writes: list[StoredWrite]
) -> StoredCheckpoint:
    """A layout-2 checkpoint document with its values (found in `holders`) and writes."""
    versions = doc["channel_versions"]
    blobs: dict[str, TypedBytes] = {}
    for channel, holder_id in doc["value_at"].items():
        holder = doc if holder_id == doc["id"] else holders.get(holder_id)
        if holder is None or channel not in versions:
            continue  # a channel without a stored value, as `get_blobs` leaves it out
        entry = held_values(holder).get(channel)
        if entry is not None and str(entry["version"]) == str(versions[channel]):
            blobs[channel] = decode(holder["id"], entry, chunks)
    return StoredCheckpoint(
        thread_id=doc["thread_id"],
        checkpoint_ns=doc["checkpoint_ns"],
        checkpoint_id=doc["checkpoint_id"],
        parent_checkpoint_id=doc.get("parent_checkpoint_id"),
        checkpoint=decode(doc["id"], doc["checkpoint"], chunks),
        metadata=metadata_of(doc),
        channel_versions=versions,
        blobs=blobs,
        writes=writes,
    )


def metadata_of(doc: Doc) -> dict[str, Any]:
    """A checkpoint document's metadata as written (`EXACT_INT`)."""
    exact = doc.get("metadata_json")
    metadata = doc.get("metadata")
    if exact is not None:
        try:
            metadata = json.loads(exact)
        except (ValueError, TypeError) as exc:
            raise _damaged(doc, f"its metadata_json is not JSON: {exc}") from exc
    # Also read from documents as queried (a list's metadata filter), before `to_layout_2`.
    if not isinstance(metadata, dict):
        raise _damaged(doc, "its metadata is not an object")
    return metadata


def _changed_by_cosmos(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) > EXACT_INT
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, dict):
        return any(_changed_by_cosmos(v) for v in value.values())
    if isinstance(value, list):
        return any(_changed_by_cosmos(v) for v in value)
    return False


def stored_writes(docs: Iterable[Doc], chunks: Mapping[str, Doc]) -> list[StoredWrite]:
    """Pending writes of layout-2 write documents of one checkpoint, by (task_id, idx).

    A replacing document (special channels; every layout-1 one) wins over an
    ordinary one for the same (task, idx).
    """
    chosen: dict[tuple[str, int], tuple[bool, StoredWrite]] = {}
    for doc in docs:
        for entry in doc["writes"]:
            key = (doc["task_id"], int(entry["idx"]))
            replace = bool(doc.get("replace"))
            if key in chosen and (chosen[key][0] or not replace):
                continue
            value = decode(doc["id"], entry, chunks)
            stored = StoredWrite(doc["task_id"], doc["task_path"], key[1], entry["channel"], value)
            chosen[key] = (replace, stored)
    return [stored for _, (_, stored) in sorted(chosen.items())]


# --------------------------------------------------------------------------- writing


@dataclass
class Packed:
    """A document and the chunk documents that must be stored before it."""

    doc: Doc
    chunks: list[Doc]


def _checkpoint_doc(
    checkpoint: StoredCheckpoint,
    checkpoint_entry: Doc,
    values: dict[str, Doc],
    value_at: dict[str, str],
    seeds: dict[str, Doc],
) -> Doc:
    doc: Doc = {
        "id": checkpoint_doc_id(checkpoint.checkpoint_ns, checkpoint.checkpoint_id),
        "type": CHECKPOINT,
        "thread_id": checkpoint.thread_id,
        "checkpoint_ns": checkpoint.checkpoint_ns,
        "checkpoint_id": checkpoint.checkpoint_id,
        "parent_checkpoint_id": checkpoint.parent_checkpoint_id,
        "metadata": checkpoint.metadata,
        "channel_versions": checkpoint.channel_versions,
        "schema_version": CURRENT["checkpoint"],
        "layout": LAYOUT,
        "checkpoint": checkpoint_entry,
        "values": values,
        "value_at": value_at,
    }
    if seeds:
        doc["delta_seed"] = seeds
    if _changed_by_cosmos(checkpoint.metadata):
        doc["metadata_json"] = json.dumps(checkpoint.metadata)
    return doc


def _spilled(serde_type: str) -> Doc:
    """The widest an entry of `serde_type` is left in its document once spilled (as a
    compressed manifest, in as many parts as a chunk id can number)."""
    return {
        "serde": MANIFEST_TYPE_PREFIX + codec.COMPRESSED_TYPE_PREFIX + serde_type,
        "enc": codec.ZLIB,
        "data": "",
        "parts": 10**6,
        "chunk_set": "0" * 16,
    }


class Packer:
    """Encodes values into entries and keeps each document within the item limit."""

    def __init__(self, *, max_item_bytes: int, compress_threshold: int) -> None:
        self.max_item_bytes = max_item_bytes
        self.compress_threshold = compress_threshold

    def entry(self, value: TypedBytes) -> Doc:
        serde_type, data = value
        if serde_type.startswith(codec.COMPRESSED_TYPE_PREFIX):
            encoding, payload = codec.RAW, data
        else:
            encoding, payload = codec.compress(data, self.compress_threshold)
        return {
            "serde": serde_type,
            "enc": encoding,
            "data": codec.to_text(payload),
            "parts": 1,
            "chunk_set": "",
        }

    def pack(self, doc: Doc, spillable: Mapping[str, Doc]) -> Packed:
        """Spill the largest of `spillable` (entries inside `doc`, by key) until `doc` fits."""
        room = self.max_item_bytes - codec.ITEM_MARGIN_BYTES
        size = packed_size(doc)
        chunks: list[Doc] = []
        for key, entry in sorted(spillable.items(), key=lambda e: len(e[1]["data"]), reverse=True):
            if size <= room:
                break
            if int(entry["parts"]) > 1:
                continue
            size -= len(entry["data"])
            chunks.extend(self._spill(doc, key, entry))
        if size > room:
            raise StateTooLarge(f"{doc['type']} document {doc['id']}", size, room)
        return Packed(doc, chunks)

    def _spill(self, doc: Doc, key: str, entry: Doc) -> list[Doc]:
        payload = codec.from_text(entry["data"])
        digest = hashlib.blake2b(key.encode(), digest_size=8)
        digest.update(b"\0" + entry["enc"].encode() + b"\0" + payload)
        chunk_set = digest.hexdigest()
        widest = {
            "id": f"{doc['id']}:{chunk_set}:{10**6}",
            "type": CHUNK,
            "thread_id": doc["thread_id"],
            "of": doc["id"],
            "part": 10**6,
            "schema_version": 1,
            "data": "",
        }
        budget = codec.base64_chunk_budget(self.max_item_bytes, _json_size(widest))
        pieces = codec.split(payload, budget)
        entry.update(data="", parts=1 + len(pieces), chunk_set=chunk_set)
        return [
            {**widest, "id": chunk_id, "part": part, "data": codec.to_text(piece)}
            for part, (chunk_id, piece) in enumerate(
                zip(chunk_ids(doc["id"], entry), pieces, strict=True), start=1
            )
        ]

    def checkpoint(
        self, checkpoint: StoredCheckpoint, blobs: Sequence[StoredBlob], parent: Lineage | None
    ) -> Packed:
        doc_id = checkpoint_doc_id(checkpoint.checkpoint_ns, checkpoint.checkpoint_id)
        versions = checkpoint.channel_versions
        value_at: dict[str, str] = {}
        if parent is not None:
            # An unchanged channel (same version as the parent's) lives where it lived.
            value_at = {
                channel: holder
                for channel, holder in parent.value_at.items()
                if channel in versions
                and str(versions[channel]) == str(parent.channel_versions.get(channel))
            }
        values: dict[str, Doc] = {}
        for blob in blobs:
            values[blob.channel] = {**self.entry(blob.value), "version": blob.version}
            value_at[blob.channel] = doc_id
        checkpoint_entry = self.entry(checkpoint.checkpoint)
        doc = _checkpoint_doc(
            checkpoint, checkpoint_entry, values, value_at, delta_seeds(checkpoint, blobs, parent)
        )
        return self.pack(
            doc,
            {"checkpoint": checkpoint_entry, **{f"value:{ch}": e for ch, e in values.items()}},
        )

    def check_checkpoint(self, checkpoint: StoredCheckpoint, blobs: Sequence[StoredBlob]) -> None:
        """`StateTooLarge` if no packing of the checkpoint fits an item: what stays in its
        document whatever spills (metadata, versions) is over it; `InvalidValue` if that is
        not valid JSON. Measured as wide as `checkpoint` can pack, whatever its parent
        (every value spilled, every channel named in `value_at` and, if a DeltaChannel's, in
        `delta_seed`), without encoding a value: cheap enough for a write-behind append to
        ask before acknowledging a put that no flush could ever store."""
        doc_id = checkpoint_doc_id(checkpoint.checkpoint_ns, checkpoint.checkpoint_id)
        versions = checkpoint.channel_versions
        counted = checkpoint.metadata.get("counters_since_delta_snapshot")
        doc = _checkpoint_doc(
            checkpoint,
            _spilled(checkpoint.checkpoint[0]),
            {blob.channel: {**_spilled(blob.value[0]), "version": blob.version} for blob in blobs},
            dict.fromkeys(versions, doc_id),
            {
                channel: {"since": checkpoint.checkpoint_id, "holder": doc_id}
                for channel in (counted if isinstance(counted, dict) else ())
                if channel in versions
            },
        )
        room = self.max_item_bytes - codec.ITEM_MARGIN_BYTES
        size = packed_size(doc)
        if size > room:
            raise StateTooLarge(f"{doc['type']} document {doc['id']}", size, room)

    def writes(
        self,
        doc_id: str,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[StoredWrite],
        *,
        replace: bool,
    ) -> Packed:
        """One document for writes of one task (first in `writes` wins per index)."""
        first = writes[0]
        items = [
            {**self.entry(write.value), "idx": write.idx, "channel": write.channel}
            for write in writes
        ]
        doc: Doc = {
            "id": doc_id,
            "type": WRITE,
            "thread_id": thread_id,
            "checkpoint_ns": checkpoint_ns,
            "checkpoint_id": checkpoint_id,
            "task_id": first.task_id,
            "task_path": first.task_path,
            "replace": replace,
            "schema_version": CURRENT["write"],
            "layout": LAYOUT,
            "writes": items,
        }
        return self.pack(doc, {f"write:{item['idx']}": item for item in items})

    def values_holder(self, doc: Doc, channels: set[str]) -> tuple[Doc, list[str]]:
        """`doc` (a layout-2 checkpoint) reduced to the values of `channels`.

        Returns the holder and the chunk ids only the dropped entries used.
        """
        kept = {ch: entry for ch, entry in held_values(doc).items() if ch in channels}
        holder = {
            "id": doc["id"],
            "type": VALUES,
            "thread_id": doc["thread_id"],
            "checkpoint_ns": doc["checkpoint_ns"],
            "checkpoint_id": doc["checkpoint_id"],
            "schema_version": CURRENT["checkpoint"],
            "layout": LAYOUT,
            "values": kept,
        }
        dropped = set(chunks_of([doc])) - set(chunks_of([holder]))
        return holder, sorted(dropped)
