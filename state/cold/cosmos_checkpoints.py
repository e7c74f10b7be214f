"""LangGraph checkpoints in the shared Cosmos container, one logical partition per thread.

Documents (all carry `type`, `thread_id`, `schema_version`; ids are unique
within the thread's partition):

- `cp:{ns}:{checkpoint_id}`    the checkpoint without channel values, plus its
                               metadata (queried by `list`) and channel versions;
- `blob:{ns}:{channel}:{version}`  one channel value, written only when it changes;
- `write:{ns}:{checkpoint_id}:{task_id}:{idx}`  one pending write;
- `ptr:{ns}`                   the latest checkpoint of the namespace, a copy of
                               its `cp:` document: "latest" is one point read;
- `{owner id}:{chunk set}:{n}` chunk n of a value too large for one item.

Values go through `state.codec`: compressed over the threshold, then split so
that no document passes `state_max_item_bytes`. A put writes chunks, then
blobs, then the checkpoint, then the pointer, so whatever a reader can reach is
complete. The pointer only moves forward (to a greater checkpoint id), guarded
by its ETag. A read of a checkpoint costs two round trips: the pointer (or the
checkpoint by id), then one query for its blobs and pending writes together.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from azure.core import MatchConditions
from azure.cosmos.aio import ContainerProxy
from azure.cosmos.exceptions import (
    CosmosAccessConditionFailedError,
    CosmosHttpResponseError,
    CosmosResourceExistsError,
    CosmosResourceNotFoundError,
)

from .. import codec
from ..errors import CorruptState, VersionConflict
from ..ports import (
    JSON,
    CheckpointPut,
    FlushOp,
    PruneStrategy,
    StoredBlob,
    StoredCheckpoint,
    StoredWrite,
    TypedBytes,
)
from ..schema import CURRENT, upcast
from ..settings import Settings
from .cosmos_client import CosmosConnection, cosmos_errors

T = TypeVar("T")
Doc = dict[str, Any]

CHECKPOINT = "checkpoint"
BLOB = "checkpoint_blob"
WRITE = "checkpoint_write"
POINTER = "checkpoint_pointer"
CHUNK = "checkpoint_chunk"
# Schema kind of each main document type (chunks are raw slices of their owner).
SCHEMA_KIND = {CHECKPOINT: "checkpoint", POINTER: "checkpoint", BLOB: "blob", WRITE: "write"}
ALL_TYPES = [CHECKPOINT, BLOB, WRITE, POINTER, CHUNK]
SYSTEM_PROPERTIES = ("_rid", "_self", "_etag", "_ts", "_attachments")

DEFAULT_PAGE_SIZE = 50
# Page size of internal queries that must read everything they match (blobs, writes).
BULK_PAGE_SIZE = 1000
DELETE_BATCH = 100
CONCURRENT_REQUESTS = 16
POINTER_ATTEMPTS = 8
# Last known pointer ETag per (thread, namespace): a put then moves the pointer in one
# conditional replace instead of a read plus a replace.
POINTER_MEMO_SIZE = 10_000
# Cosmos caps ids at 1023 bytes; longer ones are replaced by a digest.
MAX_ID_LENGTH = 1000
ID_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def _id_part(text: str) -> str:
    """Ids may not contain / \\ ? #; escaping also keeps ':' free as the separator."""
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


def blob_doc_id(checkpoint_ns: str, channel: str, version: str | int | float) -> str:
    return _doc_id("blob", checkpoint_ns, channel, str(version))


def write_doc_id(checkpoint_ns: str, checkpoint_id: str, task_id: str, idx: int) -> str:
    return _doc_id("write", checkpoint_ns, checkpoint_id, task_id, str(idx))


def pointer_doc_id(checkpoint_ns: str) -> str:
    return _doc_id("ptr", checkpoint_ns)


def chunk_ids(main: Doc) -> list[str]:
    """Ids of the chunks that follow the part a main document holds inline."""
    return [f"{main['id']}:{main['chunk_set']}:{part}" for part in range(1, int(main["parts"]))]


def _json_size(doc: Doc) -> int:
    return len(json.dumps(doc).encode())


def _strip_system(doc: Doc) -> Doc:
    return {key: value for key, value in doc.items() if key not in SYSTEM_PROPERTIES}


@dataclass(frozen=True)
class _PointerState:
    checkpoint_id: str
    etag: str


@dataclass
class _Encoded:
    """A main document carrying a value, and the chunk documents it needs first."""

    main: Doc
    chunks: list[Doc]


class CosmosCheckpointStore:
    """The `CheckpointStore` port on Cosmos DB NoSQL (see the module docstring)."""

    name = "cosmos"

    def __init__(
        self,
        connection: CosmosConnection,
        settings: Settings,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        self._connection = connection
        self._settings = settings
        self._page_size = page_size
        self._pointers: OrderedDict[tuple[str, str], _PointerState] = OrderedDict()

    async def setup(self) -> None:
        await self._connection.container()

    async def close(self) -> None:
        """The connection is shared with the other Cosmos adapters; its owner closes it."""

    # ----------------------------------------------------------------------- writes

    async def put_checkpoint(
        self, checkpoint: StoredCheckpoint, blobs: Sequence[StoredBlob]
    ) -> None:
        encoded_blobs = [self._encode_blob(checkpoint, blob) for blob in blobs]
        encoded_checkpoint = self._encode(
            self._checkpoint_envelope(checkpoint), checkpoint.checkpoint
        )
        # Chunks before the documents that reference them, blobs before the checkpoint,
        # the checkpoint before the pointer: a crash leaves garbage, never a dangling read.
        chunks = [c for e in [*encoded_blobs, encoded_checkpoint] for c in e.chunks]
        await self._upsert_all(chunks)
        await self._upsert_all([e.main for e in encoded_blobs])
        await self._upsert_all([encoded_checkpoint.main])
        await self._advance_pointer(self._pointer_doc(encoded_checkpoint.main))

    async def put_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[StoredWrite],
        *,
        upsert: bool,
    ) -> None:
        encoded = [
            self._encode(
                {
                    "id": write_doc_id(checkpoint_ns, checkpoint_id, write.task_id, write.idx),
                    "type": WRITE,
                    "thread_id": thread_id,
                    "checkpoint_ns": checkpoint_ns,
                    "checkpoint_id": checkpoint_id,
                    "task_id": write.task_id,
                    "task_path": write.task_path,
                    "idx": write.idx,
                    "channel": write.channel,
                    "schema_version": CURRENT["write"],
                },
                write.value,
            )
            for write in writes
        ]
        await self._upsert_all([c for e in encoded for c in e.chunks])
        if upsert:
            await self._upsert_all([e.main for e in encoded])
            return
        # First write wins: a retried or replayed write is ignored, and the chunks it
        # brought (a chunk set of its own) are removed again.
        created = await self._gather([self._create_if_absent(e.main) for e in encoded])
        losers = [e for e, was_created in zip(encoded, created, strict=True) if not was_created]
        await self._delete_ids(thread_id, [c["id"] for e in losers for c in e.chunks])

    async def apply_batch(self, ops: Sequence[FlushOp]) -> None:
        for op in ops:
            if isinstance(op, CheckpointPut):
                await self.put_checkpoint(op.checkpoint, op.blobs)
            else:
                await self.put_writes(
                    op.thread_id, op.checkpoint_ns, op.checkpoint_id, op.writes, upsert=op.upsert
                )

    # ----------------------------------------------------------------------- reads

    async def get_checkpoint(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None
    ) -> StoredCheckpoint | None:
        if checkpoint_id is None:
            main = await self._read(pointer_doc_id(checkpoint_ns), thread_id)
            if main is not None and not main["inline"]:
                main = await self._read(
                    checkpoint_doc_id(checkpoint_ns, main["checkpoint_id"]), thread_id
                )
        else:
            main = await self._read(checkpoint_doc_id(checkpoint_ns, checkpoint_id), thread_id)
        if main is None:
            return None
        [loaded] = await self._load_complete(thread_id, [main])
        return loaded

    async def get_blobs(
        self, thread_id: str, checkpoint_ns: str, versions: dict[str, str | int | float]
    ) -> dict[str, TypedBytes]:
        ids = [
            blob_doc_id(checkpoint_ns, channel, version) for channel, version in versions.items()
        ]
        mains = await self._query_all(
            "SELECT * FROM c WHERE c.thread_id = @thread AND ARRAY_CONTAINS(@ids, c.id)",
            {"@thread": thread_id, "@ids": ids},
            thread_id=thread_id,
        )
        values = await self._decode_all(thread_id, mains)
        return {doc["channel"]: values[doc["id"]] for doc in mains}

    async def get_writes(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str
    ) -> list[StoredWrite]:
        mains = await self._query_all(
            "SELECT * FROM c WHERE c.thread_id = @thread AND c.type = @type"
            " AND c.checkpoint_ns = @ns AND c.checkpoint_id = @checkpoint",
            {
                "@thread": thread_id,
                "@type": WRITE,
                "@ns": checkpoint_ns,
                "@checkpoint": checkpoint_id,
            },
            thread_id=thread_id,
        )
        values = await self._decode_all(thread_id, mains)
        return sorted(
            (self._stored_write(doc, values[doc["id"]]) for doc in mains),
            key=lambda w: (w.task_id, w.idx),
        )

    async def list_checkpoints(
        self,
        *,
        thread_id: str | None,
        checkpoint_ns: str | None,
        before: str | None,
        limit: int | None,
        metadata_filter: dict[str, JSON] | None,
    ) -> AsyncIterator[StoredCheckpoint]:
        if limit is not None and limit <= 0:
            return
        where = ["c.type = @type"]
        params: dict[str, Any] = {"@type": CHECKPOINT}
        if thread_id is not None:
            where.append("c.thread_id = @thread")
            params["@thread"] = thread_id
        if checkpoint_ns is not None:
            where.append("c.checkpoint_ns = @ns")
            params["@ns"] = checkpoint_ns
        if before is not None:
            where.append("c.checkpoint_id < @before")
            params["@before"] = before
        # Scalars are filtered by the server; null and structured values (whose equality
        # Cosmos SQL does not define like Python's) are compared here.
        local_filter: dict[str, JSON] = {}
        for n, (key, value) in enumerate(sorted((metadata_filter or {}).items())):
            if isinstance(value, str | int | float | bool):
                # A JSON string literal is a valid Cosmos SQL property name in brackets.
                where.append(f"c.metadata[{json.dumps(key)}] = @m{n}")
                params[f"@m{n}"] = value
            else:
                local_filter[key] = value
        query = f"SELECT * FROM c WHERE {' AND '.join(where)} ORDER BY c.checkpoint_id DESC"
        page_size = self._page_size
        if limit is not None and not local_filter:
            page_size = min(limit, page_size)
        remaining = limit
        async for page in self._pages(query, params, thread_id=thread_id, page_size=page_size):
            matching = [
                doc
                for doc in page
                if all(doc["metadata"].get(key) == value for key, value in local_filter.items())
            ]
            if remaining is not None:
                matching = matching[:remaining]
                remaining -= len(matching)
            by_thread: dict[str, list[Doc]] = defaultdict(list)
            for doc in matching:
                by_thread[doc["thread_id"]].append(doc)
            loaded: dict[tuple[str, str, str], StoredCheckpoint] = {}
            for thread, docs in by_thread.items():
                for stored in await self._load_complete(thread, docs):
                    loaded[(thread, stored.checkpoint_ns, stored.checkpoint_id)] = stored
            for doc in matching:
                yield loaded[(doc["thread_id"], doc["checkpoint_ns"], doc["checkpoint_id"])]
            if remaining is not None and remaining <= 0:
                return

    # ----------------------------------------------------------------------- maintenance

    async def delete_thread(self, thread_id: str) -> None:
        # Pointers first: from then on the thread reads as empty, even mid-delete.
        await self._delete_matching(thread_id, "c.type = @type", {"@type": POINTER})
        await self._delete_matching(
            thread_id, "ARRAY_CONTAINS(@types, c.type)", {"@types": ALL_TYPES}
        )
        self._forget_pointers(thread_id)

    async def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        if not run_ids:
            return
        victims: dict[tuple[str, str], list[Doc]] = defaultdict(list)
        async for page in self._pages(
            "SELECT c.id, c.thread_id, c.checkpoint_ns, c.checkpoint_id, c.channel_versions,"
            " c.parts, c.chunk_set FROM c"
            " WHERE c.type = @type AND ARRAY_CONTAINS(@runs, c.metadata.run_id)",
            {"@type": CHECKPOINT, "@runs": list(run_ids)},
            thread_id=None,
            page_size=BULK_PAGE_SIZE,
        ):
            for doc in page:
                victims[(doc["thread_id"], doc["checkpoint_ns"])].append(doc)
        for (thread_id, checkpoint_ns), docs in victims.items():
            deleted = {doc["checkpoint_id"] for doc in docs}
            await self._delete_docs(thread_id, docs)
            await self._delete_matching(
                thread_id,
                "c.type = @type AND c.checkpoint_ns = @ns AND ARRAY_CONTAINS(@checkpoints, c.checkpoint_id)",
                {"@type": WRITE, "@ns": checkpoint_ns, "@checkpoints": sorted(deleted)},
            )
            await self._repair_pointer(thread_id, checkpoint_ns, deleted)
            referenced = await self._referenced_versions(thread_id, checkpoint_ns, newer_than=None)
            await self._delete_unreferenced_blobs(thread_id, checkpoint_ns, docs, referenced)

    async def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        # Same order as a put: chunks, values, checkpoints, then the pointers.
        for types in ([CHUNK], [BLOB, WRITE], [CHECKPOINT], [POINTER]):
            async for page in self._pages(
                "SELECT * FROM c WHERE c.thread_id = @thread AND ARRAY_CONTAINS(@types, c.type)",
                {"@thread": source_thread_id, "@types": types},
                thread_id=source_thread_id,
                page_size=DELETE_BATCH,
            ):
                await self._upsert_all(
                    [{**_strip_system(doc), "thread_id": target_thread_id} for doc in page]
                )
        self._forget_pointers(target_thread_id)

    async def prune(self, thread_ids: Sequence[str], *, strategy: PruneStrategy) -> None:
        if strategy not in ("keep_latest", "delete"):
            raise ValueError(f"unknown prune strategy {strategy!r}")
        for thread_id in thread_ids:
            if strategy == "delete":
                await self.delete_thread(thread_id)
            else:
                await self._keep_latest(thread_id)

    async def _keep_latest(self, thread_id: str) -> None:
        pointers = await self._query_all(
            "SELECT c.checkpoint_ns, c.checkpoint_id FROM c WHERE c.thread_id = @thread AND c.type = @type",
            {"@thread": thread_id, "@type": POINTER},
            thread_id=thread_id,
        )
        for pointer in pointers:
            checkpoint_ns, latest = pointer["checkpoint_ns"], pointer["checkpoint_id"]
            # Checkpoints at or after the pointer stay: the latest and any put still in flight.
            referenced = await self._referenced_versions(
                thread_id, checkpoint_ns, newer_than=latest
            )
            older = "c.checkpoint_ns = @ns AND c.checkpoint_id < @latest"
            params = {"@ns": checkpoint_ns, "@latest": latest}
            freed = await self._delete_matching(
                thread_id, f"c.type = @type AND {older}", {"@type": CHECKPOINT, **params}
            )
            await self._delete_matching(
                thread_id, f"c.type = @type AND {older}", {"@type": WRITE, **params}
            )
            await self._delete_unreferenced_blobs(thread_id, checkpoint_ns, freed, referenced)

    async def _repair_pointer(self, thread_id: str, checkpoint_ns: str, deleted: set[str]) -> None:
        """Move a pointer whose checkpoint was deleted back to the newest one left (or drop it)."""
        self._pointers.pop((thread_id, checkpoint_ns), None)
        pointer = await self._read(pointer_doc_id(checkpoint_ns), thread_id)
        if pointer is None or pointer["checkpoint_id"] not in deleted:
            return
        newest = await self._query_all(
            "SELECT TOP 1 * FROM c WHERE c.thread_id = @thread AND c.type = @type"
            " AND c.checkpoint_ns = @ns ORDER BY c.checkpoint_id DESC",
            {"@thread": thread_id, "@type": CHECKPOINT, "@ns": checkpoint_ns},
            thread_id=thread_id,
        )
        container = await self._container()
        # If-Match: a put that advanced the pointer meanwhile wins over this repair.
        condition = {"etag": pointer["_etag"], "match_condition": MatchConditions.IfNotModified}
        try:
            with self._errors():
                if newest:
                    await container.replace_item(
                        pointer["id"],
                        self._pointer_doc(_strip_system(newest[0])),
                        response_hook=self._connection.response_hook,
                        **condition,
                    )
                else:
                    await container.delete_item(
                        pointer["id"],
                        partition_key=thread_id,
                        response_hook=self._connection.response_hook,
                        **condition,
                    )
        except (CosmosAccessConditionFailedError, CosmosResourceNotFoundError):
            pass

    async def _referenced_versions(
        self, thread_id: str, checkpoint_ns: str, *, newer_than: str | None
    ) -> set[tuple[str, str]]:
        """(channel, version) pairs used by the namespace's checkpoints (from `newer_than` on)."""
        where = "c.thread_id = @thread AND c.type = @type AND c.checkpoint_ns = @ns"
        params: dict[str, Any] = {"@thread": thread_id, "@type": CHECKPOINT, "@ns": checkpoint_ns}
        if newer_than is not None:
            where += " AND c.checkpoint_id >= @from"
            params["@from"] = newer_than
        referenced: set[tuple[str, str]] = set()
        async for page in self._pages(
            f"SELECT c.channel_versions FROM c WHERE {where}",
            params,
            thread_id=thread_id,
            page_size=BULK_PAGE_SIZE,
        ):
            for doc in page:
                referenced.update(_versions(doc))
        return referenced

    async def _delete_unreferenced_blobs(
        self,
        thread_id: str,
        checkpoint_ns: str,
        deleted_checkpoints: Iterable[Doc],
        referenced: set[tuple[str, str]],
    ) -> None:
        """Blobs a deleted checkpoint used and no kept one does (new blobs are never touched)."""
        freed = {pair for doc in deleted_checkpoints for pair in _versions(doc)} - referenced
        ids = sorted(blob_doc_id(checkpoint_ns, channel, version) for channel, version in freed)
        for start in range(0, len(ids), DELETE_BATCH):
            await self._delete_matching(
                thread_id, "ARRAY_CONTAINS(@ids, c.id)", {"@ids": ids[start : start + DELETE_BATCH]}
            )

    async def _delete_matching(
        self, thread_id: str, condition: str, params: dict[str, Any]
    ) -> list[Doc]:
        """Delete every document of the thread matching `condition` (with its chunks).

        Re-queries the first batch until nothing matches, so no continuation token
        is held across deletes. Returns the deleted documents' id fields and versions.
        """
        deleted: list[Doc] = []
        while True:
            batch = await self._query_all(
                f"SELECT TOP {DELETE_BATCH} c.id, c.parts, c.chunk_set, c.channel_versions FROM c"
                f" WHERE c.thread_id = @thread AND ({condition})",
                {"@thread": thread_id, **params},
                thread_id=thread_id,
            )
            if not batch:
                return deleted
            await self._delete_docs(thread_id, batch)
            deleted.extend(batch)

    async def _delete_docs(self, thread_id: str, docs: Sequence[Doc]) -> None:
        ids = [doc["id"] for doc in docs]
        ids += [chunk for doc in docs if int(doc.get("parts") or 1) > 1 for chunk in chunk_ids(doc)]
        await self._delete_ids(thread_id, ids)

    async def _delete_ids(self, thread_id: str, ids: Sequence[str]) -> None:
        container = await self._container()

        async def delete(doc_id: str) -> None:
            try:
                with self._errors():
                    await container.delete_item(
                        doc_id,
                        partition_key=thread_id,
                        response_hook=self._connection.response_hook,
                    )
            except CosmosResourceNotFoundError:
                pass

        await self._gather([delete(doc_id) for doc_id in ids])

    def _forget_pointers(self, thread_id: str) -> None:
        for key in [key for key in self._pointers if key[0] == thread_id]:
            del self._pointers[key]

    # ----------------------------------------------------------------------- documents

    def _checkpoint_envelope(self, checkpoint: StoredCheckpoint) -> Doc:
        return {
            "id": checkpoint_doc_id(checkpoint.checkpoint_ns, checkpoint.checkpoint_id),
            "type": CHECKPOINT,
            "thread_id": checkpoint.thread_id,
            "checkpoint_ns": checkpoint.checkpoint_ns,
            "checkpoint_id": checkpoint.checkpoint_id,
            "parent_checkpoint_id": checkpoint.parent_checkpoint_id,
            "metadata": checkpoint.metadata,
            "channel_versions": checkpoint.channel_versions,
            "schema_version": CURRENT["checkpoint"],
        }

    def _encode_blob(self, checkpoint: StoredCheckpoint, blob: StoredBlob) -> _Encoded:
        return self._encode(
            {
                "id": blob_doc_id(checkpoint.checkpoint_ns, blob.channel, blob.version),
                "type": BLOB,
                "thread_id": checkpoint.thread_id,
                "checkpoint_ns": checkpoint.checkpoint_ns,
                "channel": blob.channel,
                "version": blob.version,
                "schema_version": CURRENT["blob"],
            },
            blob.value,
        )

    def _encode(self, envelope: Doc, value: TypedBytes) -> _Encoded:
        """The value compressed and split so that every document stays within the item limit."""
        serde_type, data = value
        main = {**envelope, "serde": serde_type, "enc": codec.RAW, "parts": 1, "chunk_set": ""}
        widest_chunk = {
            "id": f"{main['id']}:{'0' * 16}:{10**6}",
            "type": CHUNK,
            "thread_id": main["thread_id"],
            "of": main["id"],
            "part": 10**6,
            "schema_version": 1,
        }
        budget = codec.base64_chunk_budget(
            self._settings.state_max_item_bytes,
            max(_json_size({**main, "data": ""}), _json_size({**widest_chunk, "data": ""})),
        )
        encoded = codec.encode(
            data,
            compress_threshold=self._settings.state_compress_threshold_bytes,
            chunk_bytes=budget,
        )
        main.update(
            enc=encoded.encoding, parts=len(encoded.chunks), data=codec.to_text(encoded.chunks[0])
        )
        if len(encoded.chunks) == 1:
            return _Encoded(main, [])
        main["chunk_set"] = encoded.digest
        chunks = [
            {
                "id": chunk_id,
                "type": CHUNK,
                "thread_id": main["thread_id"],
                "of": main["id"],
                "part": part,
                "schema_version": 1,
                "data": codec.to_text(chunk),
            }
            for part, (chunk_id, chunk) in enumerate(
                zip(chunk_ids(main), encoded.chunks[1:], strict=True), start=1
            )
        ]
        return _Encoded(main, chunks)

    @staticmethod
    def _pointer_doc(checkpoint_main: Doc) -> Doc:
        """A copy of the checkpoint document; inline when it fits one item, else a reference."""
        inline = int(checkpoint_main["parts"]) == 1
        pointer = {
            **checkpoint_main,
            "id": pointer_doc_id(checkpoint_main["checkpoint_ns"]),
            "type": POINTER,
            "inline": inline,
        }
        if not inline:
            for key in ("serde", "enc", "parts", "chunk_set", "data"):
                pointer.pop(key)
        return pointer

    @staticmethod
    def _stored_write(doc: Doc, value: TypedBytes) -> StoredWrite:
        return StoredWrite(doc["task_id"], doc["task_path"], int(doc["idx"]), doc["channel"], value)

    async def _load_complete(
        self, thread_id: str, checkpoints: Sequence[Doc]
    ) -> list[StoredCheckpoint]:
        """Checkpoint documents of one thread, with their blobs and pending writes attached.

        One query for every blob, write and checkpoint chunk of the batch; a second
        one only for chunks of large blobs and writes.
        """
        mains = [_upcast(doc) for doc in checkpoints]
        blob_ids = {
            blob_doc_id(doc["checkpoint_ns"], channel, version)
            for doc in mains
            for channel, version in doc["channel_versions"].items()
        }
        own_chunks = [chunk for doc in mains if int(doc["parts"]) > 1 for chunk in chunk_ids(doc)]
        wanted = {(doc["checkpoint_ns"], doc["checkpoint_id"]) for doc in mains}
        found = await self._query_all(
            "SELECT * FROM c WHERE c.thread_id = @thread AND (ARRAY_CONTAINS(@ids, c.id)"
            " OR (c.type = @write AND ARRAY_CONTAINS(@checkpoints, c.checkpoint_id)))",
            {
                "@thread": thread_id,
                "@ids": sorted(blob_ids) + own_chunks,
                "@write": WRITE,
                "@checkpoints": sorted({checkpoint_id for _, checkpoint_id in wanted}),
            },
            thread_id=thread_id,
        )
        chunks = {doc["id"]: doc for doc in found if doc["type"] == CHUNK}
        blobs = {doc["id"]: doc for doc in found if doc["type"] == BLOB}
        writes = [
            doc
            for doc in found
            if doc["type"] == WRITE and (doc["checkpoint_ns"], doc["checkpoint_id"]) in wanted
        ]
        values = await self._decode_all(thread_id, [*blobs.values(), *writes])
        writes_of: dict[tuple[str, str], list[StoredWrite]] = defaultdict(list)
        for doc in writes:
            writes_of[(doc["checkpoint_ns"], doc["checkpoint_id"])].append(
                self._stored_write(doc, values[doc["id"]])
            )
        loaded = []
        for doc in mains:
            ns = doc["checkpoint_ns"]
            doc_blobs = {}
            for channel, version in doc["channel_versions"].items():
                blob_id = blob_doc_id(ns, channel, version)
                if blob_id in blobs:
                    doc_blobs[channel] = values[blob_id]
            loaded.append(
                StoredCheckpoint(
                    thread_id=doc["thread_id"],
                    checkpoint_ns=ns,
                    checkpoint_id=doc["checkpoint_id"],
                    parent_checkpoint_id=doc.get("parent_checkpoint_id"),
                    checkpoint=_decode(doc, chunks),
                    metadata=doc["metadata"],
                    channel_versions=doc["channel_versions"],
                    blobs=doc_blobs,
                    writes=sorted(
                        writes_of[(ns, doc["checkpoint_id"])], key=lambda w: (w.task_id, w.idx)
                    ),
                )
            )
        return loaded

    async def _decode_all(self, thread_id: str, mains: Sequence[Doc]) -> dict[str, TypedBytes]:
        """Values of blob / write documents by id, fetching the chunks of large ones."""
        mains = [_upcast(doc) for doc in mains]
        needed = [chunk for doc in mains if int(doc["parts"]) > 1 for chunk in chunk_ids(doc)]
        chunks: dict[str, Doc] = {}
        if needed:
            found = await self._query_all(
                "SELECT * FROM c WHERE c.thread_id = @thread AND ARRAY_CONTAINS(@ids, c.id)",
                {"@thread": thread_id, "@ids": needed},
                thread_id=thread_id,
            )
            chunks = {doc["id"]: doc for doc in found}
        return {doc["id"]: _decode(doc, chunks) for doc in mains}

    # ----------------------------------------------------------------------- requests

    async def _container(self) -> ContainerProxy:
        return await self._connection.container()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        # The response hook only sees successes; failed round trips count too.
        with cosmos_errors():
            try:
                yield
            except CosmosHttpResponseError:
                self._connection.counters.count("failed")
                raise

    async def _read(self, doc_id: str, thread_id: str) -> Doc | None:
        container = await self._container()
        try:
            with self._errors():
                found: Doc = await container.read_item(
                    doc_id, partition_key=thread_id, response_hook=self._connection.response_hook
                )
        except CosmosResourceNotFoundError:
            return None
        return found

    async def _upsert_all(self, docs: Sequence[Doc]) -> None:
        container = await self._container()

        async def upsert(doc: Doc) -> None:
            with self._errors():
                await container.upsert_item(
                    doc, no_response=True, response_hook=self._connection.response_hook
                )

        await self._gather([upsert(doc) for doc in docs])

    async def _create_if_absent(self, doc: Doc) -> bool:
        container = await self._container()
        try:
            with self._errors():
                await container.create_item(
                    doc, no_response=True, response_hook=self._connection.response_hook
                )
        except CosmosResourceExistsError:
            return False
        return True

    async def _advance_pointer(self, pointer: Doc) -> None:
        """Move `ptr:{ns}` to this checkpoint unless it already names a newer one."""
        thread_id, new_id = pointer["thread_id"], pointer["checkpoint_id"]
        key = (thread_id, pointer["checkpoint_ns"])
        container = await self._container()
        for _ in range(POINTER_ATTEMPTS):
            known = self._pointers.get(key)
            if known is not None and known.checkpoint_id >= new_id:
                return
            try:
                with self._errors():
                    if known is None:
                        written = await container.create_item(
                            pointer, response_hook=self._connection.response_hook
                        )
                    else:
                        written = await container.replace_item(
                            pointer["id"],
                            pointer,
                            etag=known.etag,
                            match_condition=MatchConditions.IfNotModified,
                            response_hook=self._connection.response_hook,
                        )
            except (
                CosmosResourceExistsError,
                CosmosAccessConditionFailedError,
                CosmosResourceNotFoundError,
            ):
                # Another writer moved (or a delete removed) it: learn where it is now.
                self._remember_pointer(key, await self._read(pointer["id"], thread_id))
                continue
            self._remember_pointer(key, written)
            return
        raise VersionConflict(thread_id, None, None)

    def _remember_pointer(self, key: tuple[str, str], doc: Doc | None) -> None:
        if doc is None:
            self._pointers.pop(key, None)
            return
        self._pointers[key] = _PointerState(doc["checkpoint_id"], doc["_etag"])
        self._pointers.move_to_end(key)
        while len(self._pointers) > POINTER_MEMO_SIZE:
            self._pointers.popitem(last=False)

    async def _pages(
        self,
        query: str,
        params: dict[str, Any],
        *,
        thread_id: str | None,
        page_size: int,
    ) -> AsyncIterator[list[Doc]]:
        """One list per page the service returns, following its continuation tokens."""
        container = await self._container()
        scope: dict[str, Any] = {} if thread_id is None else {"partition_key": thread_id}
        with self._errors():
            pager = container.query_items(
                query,
                parameters=[{"name": name, "value": value} for name, value in params.items()],
                max_item_count=page_size,
                response_hook=self._connection.response_hook,
                **scope,
            ).by_page()
            async for page in pager:
                yield [item async for item in page]

    async def _query_all(self, query: str, params: dict[str, Any], *, thread_id: str) -> list[Doc]:
        found: list[Doc] = []
        async for page in self._pages(query, params, thread_id=thread_id, page_size=BULK_PAGE_SIZE):
            found.extend(page)
        return found

    @staticmethod
    async def _gather(calls: Sequence[Awaitable[T]]) -> list[T]:
        if len(calls) == 1:
            return [await calls[0]]
        limit = asyncio.Semaphore(CONCURRENT_REQUESTS)

        async def bounded(call: Awaitable[T]) -> T:
            async with limit:
                return await call

        return list(await asyncio.gather(*(bounded(call) for call in calls)))


def _upcast(doc: Doc) -> Doc:
    return upcast(SCHEMA_KIND[doc["type"]], doc) if doc.get("type") in SCHEMA_KIND else doc


def _versions(doc: Doc) -> Iterator[tuple[str, str]]:
    for channel, version in (doc.get("channel_versions") or {}).items():
        yield channel, str(version)


def _decode(main: Doc, chunks: dict[str, Doc]) -> TypedBytes:
    parts = [codec.from_text(main["data"])]
    for chunk_id in chunk_ids(main):
        chunk = chunks.get(chunk_id)
        if chunk is None:
            raise CorruptState(f"{main['id']} is missing its chunk {chunk_id}")
        parts.append(codec.from_text(chunk["data"]))
    return main["serde"], codec.decode(main["enc"], parts, expected_chunks=int(main["parts"]))
