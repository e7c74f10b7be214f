"""LangGraph checkpoints in the shared Cosmos container, one logical partition per thread.

The document layout is `cosmos_layout`'s, the requests `cosmos_io`'s, and
delete / copy / prune `cosmos_maintenance`'s. Costs, in sequential round trips:

- put: one (an upsert of the checkpoint with its changed values embedded; with
  the chunks of a value over the item limit or the blocks of one large enough
  to be stored as shared blocks (`state.cold.chunks`: only the blocks the
  version added), one transactional batch, chunks first), plus one read of the
  parent when this process has not seen it (the last put and the latest read of
  each (thread, namespace) are remembered). A put goes on only from a parent still
  stored (`ParentGone`): a read of it in a transactional batch with the upsert
  (still one request; after the read of an unseen parent too, so a delete_thread
  between the two cannot leave the thread holding the put alone);
- put_writes: one (create of the task's writes document; special channels:
  an upsert each, concurrently); a repeat that adds indexes merges with
  If-Match;
- latest (or by id): two (a `TOP 1` query ordered by checkpoint id, or a point
  read; then a query for its writes and, only when some of its values live in
  ancestors, one for those, concurrently), plus one for chunks of large values;
- a checkpoint whose DeltaChannel history starts where its `delta_seed` says
  (see `cosmos_layout.delta_seeds`): still two, the history included (its
  range of writes replaces the query for the checkpoint's own writes; the
  range's lineage, the seeds' holders and the seeds' snapshot blocks are read
  concurrently);
- delta history on its own (LangGraph's DeltaChannel): two whatever the chain's
  depth (the namespace's lineage as ids, then the chain's writes, the seeds'
  holders and their snapshot blocks, concurrently), plus one for chunks of
  values over the item limit;
- values stored as blocks: one more query per level of the block tree (one
  for a value up to 256 KB, two up to 16 MB), except DeltaChannel snapshots:
  their blocks carry the snapshot's namespace and channel, and come by one
  query by that tag, alongside the history or the checkpoint's writes.

- a flush (`apply_batch`): per thread, its operations in order as
  transactional batches of up to 100 documents: one round trip for a run's
  worth of steps, and a reader (or a crash) sees a batch whole or not at all.

Prune and delete_for_runs delete the blocks no remaining manifest reaches, once they
are old enough to be judged (`block_grace_seconds`): a step stored meanwhile may name
blocks the collection sees unreached.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing
from typing import Any

from ..errors import (
    BackendUnavailable,
    CorruptState,
    ParentGone,
    RunsPartlyDeleted,
    VersionConflict,
)
from ..ports import (
    JSON,
    ChannelHistory,
    CheckpointPut,
    FlushOp,
    PruneStrategy,
    StoredBlob,
    StoredCheckpoint,
    StoredWrite,
    TypedBytes,
)
from . import cosmos_layout as layout
from .chunks import (
    HEAD_BYTES,
    MANIFEST_TYPE_PREFIX,
    Chunk,
    Chunker,
    Fetch,
    PendingSplits,
    chunked,
    delta_snapshot,
    fetched_first,
    reachable,
    resolve,
    resolve_checkpoints,
)
from .cosmos_client import CosmosConnection
from .cosmos_fences import FlushFences
from .cosmos_io import (
    BATCH_BYTES,
    BATCH_OPERATIONS,
    BULK_PAGE_SIZE,
    BatchOperation,
    BatchRefused,
    Doc,
    PartitionIO,
    gather,
    gather_pair,
    strip_system,
)
from .cosmos_maintenance import CheckpointMaintenance
from .metadata_filters import equal_scalars

DEFAULT_PAGE_SIZE = 50
# Lineage of the last put (or latest read) per (thread, namespace): the next put
# inherits `value_at` from it without reading its parent.
LINEAGE_MEMO_SIZE = 10_000
MERGE_ATTEMPTS = 8
# Room a fenced batch keeps for its fence document (`cosmos_fences`).
FENCE_BYTES = 1024
# How far this process's clock may be off the service's, which stamps `_ts`.
CLOCK_SKEW_SECONDS = 60.0
# Requests a step stored on its own sends in sequence from its blocks to its checkpoint
# (`_store_step`: the blocks, a fence's or parent's batch, a fence moved, the checkpoint
# upserted), with room to spare; each is bounded by the operation timeout.
STEP_REQUESTS_AFTER_BLOCKS = 5


def block_grace_seconds(operation_timeout_seconds: float) -> float:
    """How old (by `_ts`) an unreached block must be before it is collected, from the
    moment the collector starts reading manifests. A step stores the blocks it adds
    before the checkpoint naming them: in the same transactional batch (one `_ts`) or,
    too large for one, in requests of their own just before. Its checkpoint landing
    after the manifests were read names blocks the collector lists as unreached; they
    are at most this old. The blocks a step names without storing them again are reached
    from its parent, which the collection keeps (`chunks.PendingSplits`); and a store
    call that failed sends all its blocks again (`_forget_unconfirmed`), so a flush
    batch redone later, here or by another flusher, stamps them anew."""
    return CLOCK_SKEW_SECONDS + STEP_REQUESTS_AFTER_BLOCKS * operation_timeout_seconds


class CosmosCheckpointStore:
    """The `CheckpointStore` port on Cosmos DB NoSQL (see the module docstring)."""

    name = "cosmos"

    def __init__(
        self,
        connection: CosmosConnection,
        *,
        max_item_bytes: int,
        compress_threshold_bytes: int,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> None:
        self._io = PartitionIO(connection)
        # Seconds since the epoch, compared with the service's `_ts` (block collection).
        self._clock: Callable[[], float] = time.time
        self._block_grace = block_grace_seconds(connection.operation_timeout_seconds)
        self._packer = layout.Packer(
            max_item_bytes=max_item_bytes, compress_threshold=compress_threshold_bytes
        )
        self._page_size = page_size
        self._lineage: OrderedDict[tuple[str, str], layout.Lineage] = OrderedDict()
        self._maintenance = CheckpointMaintenance(self._io, self._packer, self._forget)
        self._chunker = Chunker()
        self._fences = FlushFences(self._io)

    async def setup(self) -> None:
        await self._io.container()

    async def close(self) -> None:
        """The connection is shared with the other Cosmos adapters; its owner closes it."""

    # ----------------------------------------------------------------------- writes

    async def put_checkpoint(
        self,
        checkpoint: StoredCheckpoint,
        blobs: Sequence[StoredBlob],
        *,
        parent_vouched: bool = False,
    ) -> None:
        pending = PendingSplits(self._chunker)
        step = await self._pack_checkpoint(checkpoint, blobs, pending, checked=not parent_vouched)
        await self._store(checkpoint.thread_id, [step], pending)

    async def put_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[StoredWrite],
        *,
        upsert: bool,
    ) -> None:
        if writes:
            step = self._pack_writes(thread_id, checkpoint_ns, checkpoint_id, writes, upsert=upsert)
            await self._store(thread_id, [step])

    def check_checkpoint(self, checkpoint: StoredCheckpoint, blobs: Sequence[StoredBlob]) -> None:
        self._packer.check_checkpoint(checkpoint, blobs)

    async def apply_batch(self, ops: Sequence[FlushOp], *, fence: int | None = None) -> None:
        """Threads concurrently; within a thread, its operations in order in transactional
        batches (see `_store`), each behind the thread's fence when `fence` is given
        (`cosmos_fences`)."""
        by_thread: dict[str, list[FlushOp]] = defaultdict(list)
        for op in ops:
            by_thread[op.thread_id].append(op)
        if fence is not None and len(by_thread) > 1:
            raise ValueError("a fenced batch holds the operations of one thread")

        async def apply(thread_id: str, thread_ops: list[FlushOp]) -> None:
            pending = PendingSplits(self._chunker)
            steps: list[_Step] = []
            try:
                for op in thread_ops:
                    if isinstance(op, CheckpointPut):
                        # Not checked: the parent may be earlier in the batch, and a late
                        # run's backlog is delete_for_runs' to drop (the saver's).
                        steps.append(
                            await self._pack_checkpoint(
                                op.checkpoint, op.blobs, pending, checked=False
                            )
                        )
                    elif op.writes:
                        steps.append(
                            self._pack_writes(
                                op.thread_id,
                                op.checkpoint_ns,
                                op.checkpoint_id,
                                op.writes,
                                upsert=op.upsert,
                            )
                        )
            except BaseException:
                self._forget_unconfirmed(thread_id)
                raise
            await self._store(thread_id, steps, pending, fence=fence)

        if by_thread:
            await gather(
                [apply(thread_id, thread_ops) for thread_id, thread_ops in by_thread.items()]
            )

    async def _pack_checkpoint(
        self,
        checkpoint: StoredCheckpoint,
        blobs: Sequence[StoredBlob],
        pending: PendingSplits,
        *,
        checked: bool,
    ) -> _Step:
        """The checkpoint's documents; its lineage is remembered (the next put of the thread
        packs against it) and its splits join `pending`, both forgotten if storing fails.
        `checked`: `ParentGone` if the parent is gone (see `_parent`)."""
        parent = await self._parent(checkpoint, checked=checked)
        blobs, blocks = self._split(checkpoint, blobs, pending)
        packed = self._packer.checkpoint(checkpoint, blobs, parent)
        self._remember(checkpoint.thread_id, checkpoint.checkpoint_ns, packed.doc)
        step = _Step(prelude=[*blocks, *packed.chunks], upserts=[packed.doc])
        if checked and parent is not None:
            # Read again by the write itself, even just read: a delete between the two
            # would leave the thread holding this step alone.
            step.parent = (checkpoint.checkpoint_ns, parent.checkpoint_id)
        return step

    def _split(
        self,
        checkpoint: StoredCheckpoint,
        blobs: Sequence[StoredBlob],
        pending: PendingSplits,
    ) -> tuple[list[StoredBlob], list[Doc]]:
        """Large values as manifests, and the block documents this version adds.

        A split of `pending` (an earlier put of the same store call, not yet stored) goes
        before what the chunker remembers: its blocks are stored before this version's.
        """
        stored: list[StoredBlob] = []
        blocks: list[Doc] = []
        pending.begin(checkpoint, blobs)
        for blob in blobs:
            type_, data = blob.value
            if not chunked(blob.value):
                stored.append(blob)
                continue
            key = (checkpoint.thread_id, checkpoint.checkpoint_ns, blob.channel)
            manifest, added = pending.split(key, blob.value, blob.version)
            snapshot_of = (
                (checkpoint.checkpoint_ns, blob.channel)
                if delta_snapshot(type_, data[:HEAD_BYTES])
                else None
            )
            blocks += [layout.block_doc(checkpoint.thread_id, c, snapshot_of) for c in added]
            stored.append(dataclasses.replace(blob, value=(MANIFEST_TYPE_PREFIX + type_, manifest)))
        return stored, blocks

    def _pack_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[StoredWrite],
        *,
        upsert: bool,
    ) -> _Step:
        where = (thread_id, checkpoint_ns, checkpoint_id)
        if upsert:
            # Each special write replaces its (task, idx); the last of a repeat wins.
            last = {(w.task_id, w.idx): w for w in writes}
            replaced = [
                self._packer.writes(
                    layout.write_doc_id(checkpoint_ns, checkpoint_id, *key),
                    *where,
                    [w],
                    replace=True,
                )
                for key, w in last.items()
            ]
            return _Step(
                prelude=[chunk for p in replaced for chunk in p.chunks],
                upserts=[p.doc for p in replaced],
            )
        # First write wins: per (task, idx) the first occurrence, one document per task.
        by_task: dict[str, dict[int, StoredWrite]] = defaultdict(dict)
        for write in writes:
            by_task[write.task_id].setdefault(write.idx, write)
        created = [
            self._packer.writes(
                layout.task_writes_doc_id(checkpoint_ns, checkpoint_id, task_id),
                *where,
                list(task_writes.values()),
                replace=False,
            )
            for task_id, task_writes in by_task.items()
        ]
        return _Step(prelude=[chunk for p in created for chunk in p.chunks], creates=created)

    async def _store(
        self,
        thread_id: str,
        steps: Sequence[_Step],
        pending: PendingSplits | None = None,
        *,
        fence: int | None = None,
    ) -> None:
        """Store `steps` in order: as transactional batches (all of a batch or none of it,
        one round trip; a reader sees a batch whole), one request where a step alone is a
        single request, and one step at a time (its chunks first) for a step too large for
        a batch or a batch the service refused (a task's writes that are already stored:
        the step merges them). Then the chunker may build on `pending`. With `fence`,
        every batch moves the thread's fence first (`_store_step` says how a step stored
        on its own is fenced)."""
        try:
            for group, batched in _transactions(steps, fenced=fence is not None):
                operations = _operations(group)
                if batched and await self._applied_as_batch(thread_id, group, operations, fence):
                    continue
                for step in group:
                    await self._store_step(thread_id, step, fence)
            if pending is not None:
                self._chunker.confirm(pending)
        except BaseException:
            self._forget_unconfirmed(thread_id)
            raise

    async def _applied_as_batch(
        self,
        thread_id: str,
        group: Sequence[_Step],
        operations: list[BatchOperation],
        fence: int | None,
    ) -> bool:
        if fence is not None:
            return await self._fences.batch(thread_id, fence, operations)
        try:
            await self._io.batch(thread_id, operations, bodies=False)
        except BatchRefused as refused:
            _raise_if_parent_gone(thread_id, group, operations, refused)
            return False
        return True

    async def _store_step(self, thread_id: str, step: _Step, fence: int | None) -> None:
        """One step on its own: its prelude first (blocks and chunks, in batches of their
        own, which nothing reaches until a document of the step names them). With `fence`,
        the step's upserted documents (a checkpoint) go in a transactional batch behind the
        fence's move, so a late step cannot land after a delete; where they do not fit
        one, or the step has none (a task's writes, created or merged), a request moving
        the fence goes first, which narrows that window without closing it. A step with
        a `parent` sends its documents behind a read of it the same way."""
        if step.parent is not None:
            # Too large for a batch (or refused as one): a read of its own, before any
            # document of the step is written. Unlike a batch's read, it sees whether the
            # parent was spared since the put remembered it: refused as `_parent` does.
            ns, parent_id = step.parent
            found = await self._io.read(layout.checkpoint_doc_id(ns, parent_id), thread_id)
            if found is None or found.get("type") != layout.CHECKPOINT or found.get("spared"):
                raise ParentGone(thread_id, ns, parent_id)
        await self._io.upsert_all(step.prelude)
        upserts: list[BatchOperation] = [("upsert", (doc,)) for doc in step.upserts]
        fits = bool(
            upserts
            and len(upserts) < BATCH_OPERATIONS
            and sum(map(layout.packed_size, step.upserts)) <= BATCH_BYTES - FENCE_BYTES
        )
        if fence is not None:
            if not (fits and await self._fences.batch(thread_id, fence, upserts)):
                await self._fences.move(thread_id, fence)
                await self._io.upsert_all(step.upserts)
        elif not (fits and await self._behind_parent(thread_id, step, upserts)):
            await self._io.upsert_all(step.upserts)
        if step.creates:
            await gather([self._create_or_merge(packed) for packed in step.creates])

    async def _behind_parent(
        self, thread_id: str, step: _Step, upserts: list[BatchOperation]
    ) -> bool:
        """The step's documents in one batch behind a read of its parent (if it has one),
        so a delete since the read before its prelude refuses them (`ParentGone`); False
        if there is no parent, or the service refused the batch otherwise (then sent
        without it, as before)."""
        if step.parent is None:
            return False
        operations: list[BatchOperation] = [
            ("read", (layout.checkpoint_doc_id(*step.parent),)),
            *upserts,
        ]
        return await self._applied_as_batch(thread_id, [step], operations, fence=None)

    def _forget_unconfirmed(self, thread_id: str) -> None:
        """After a failed store: what was packed against lineage and splits that may not
        be stored must not be built on."""
        self._forget(thread_id)
        self._chunker.forget([thread_id])

    async def _create_or_merge(self, packed: layout.Packed) -> None:
        """Create the task's writes document, or add the indexes it lacks (If-Match)."""
        if await self._io.create_if_absent(packed.doc):
            return
        thread_id = packed.doc["thread_id"]
        mine = [chunk["id"] for chunk in packed.chunks]
        for _ in range(MERGE_ATTEMPTS):
            stored = await self._io.read(packed.doc["id"], thread_id)
            if stored is None:
                if await self._io.create_if_absent(packed.doc):
                    return
                continue
            current = layout.to_layout_2(stored)
            present = {int(entry["idx"]) for entry in current["writes"]}
            added = [entry for entry in packed.doc["writes"] if int(entry["idx"]) not in present]
            merged = {**strip_system(current), "writes": [*current["writes"], *added]}
            if added:
                grown = self._packer.pack(merged, {f"write:{e['idx']}": e for e in added})
                await self._io.upsert_all(grown.chunks)
                mine += [chunk["id"] for chunk in grown.chunks]
                if not await self._io.replace_if_unchanged(
                    packed.doc["id"], merged, etag=stored["_etag"]
                ):
                    continue
            # Only chunks of this attempt that the stored document does not use: an
            # attempt whose create had landed (and was re-sent) finds its own chunks there.
            used = set(layout.chunks_of([merged]))
            await self._io.delete_ids(thread_id, [c for c in mine if c not in used])
            return
        raise VersionConflict(thread_id, None, None)

    # ----------------------------------------------------------------------- reads

    async def get_checkpoint(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str | None,
        *,
        with_history: bool = True,
        spared: bool = True,
    ) -> StoredCheckpoint | None:
        if checkpoint_id is None:
            found = await self._io.query_all(
                "SELECT TOP 1 * FROM c WHERE c.thread_id = @thread AND c.type = @type"
                " AND c.checkpoint_ns = @ns ORDER BY c.checkpoint_id DESC",
                {"@thread": thread_id, "@type": layout.CHECKPOINT, "@ns": checkpoint_ns},
                partition=thread_id,
            )
            main = found[0] if found else None
        else:
            main = await self._io.read(
                layout.checkpoint_doc_id(checkpoint_ns, checkpoint_id), thread_id
            )
            if main is not None and main.get("type") != layout.CHECKPOINT:
                main = None  # a values holder left by maintenance is not a checkpoint
            elif main is not None and main.get("spared"):
                # Remembered as a parent, it was not spared then: a put going on from it
                # (a fork, which reads it first) must read it again, and be refused.
                self._forget_lineage(thread_id, checkpoint_ns, checkpoint_id)
                if not spared:
                    main = None
        if main is None:
            return None
        main = layout.to_layout_2(main)
        # A snapshot it holds itself comes by its blocks' tag, alongside the rest.
        own = layout.snapshot_channels(main)
        if with_history and main.get("delta_seed") and main.get("parent_checkpoint_id"):
            loaded, blocks = await self._load_with_history(thread_id, main, own)
        else:
            complete, blocks = await gather_pair(
                self._load_complete(thread_id, [main]),
                self._snapshot_blocks(thread_id, main["checkpoint_ns"], own),
            )
            [loaded] = complete
        [loaded] = await resolve_checkpoints(
            [loaded], lambda thread: self._blocks(thread, blocks), self._chunker.value_of
        )
        if checkpoint_id is None:
            self._remember(thread_id, checkpoint_ns, layout.to_layout_2(main))
        return loaded

    async def get_blobs(
        self, thread_id: str, checkpoint_ns: str, versions: dict[str, str | int | float]
    ) -> dict[str, TypedBytes]:
        """By (channel, version) alone: any document of the namespace holding it."""
        if not versions:
            return {}
        conditions: list[str] = []
        params: dict[str, Any] = {"@thread": thread_id, "@ns": checkpoint_ns}
        for n, (channel, version) in enumerate(sorted(versions.items())):
            conditions.append(f'c["values"][{_sql_name(channel)}]["version"] = @v{n}')
            params[f"@v{n}"] = version
        params["@blobs"] = [
            layout.blob_doc_id(checkpoint_ns, channel, version)
            for channel, version in versions.items()
        ]
        found = await self._io.query_all(
            "SELECT * FROM c WHERE c.thread_id = @thread AND (ARRAY_CONTAINS(@blobs, c.id)"
            f" OR (c.checkpoint_ns = @ns AND ({' OR '.join(conditions)})))",
            params,
            partition=thread_id,
        )
        holders = [layout.to_layout_2(doc) for doc in found]
        chunks = await self._chunks(thread_id, holders)
        values: dict[str, TypedBytes] = {}
        for holder in holders:
            for channel, entry in layout.held_values(holder).items():
                wanted = versions.get(channel)
                if wanted is not None and str(entry["version"]) == str(wanted):
                    values.setdefault(channel, layout.decode(holder["id"], entry, chunks))
        return await resolve(values, self._blocks(thread_id), self._chunker.value_of)

    async def get_writes(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str
    ) -> list[StoredWrite]:
        found = await self._io.query_all(
            "SELECT * FROM c WHERE c.thread_id = @thread AND c.type = @type"
            " AND c.checkpoint_ns = @ns AND c.checkpoint_id = @checkpoint",
            {
                "@thread": thread_id,
                "@type": layout.WRITE,
                "@ns": checkpoint_ns,
                "@checkpoint": checkpoint_id,
            },
            partition=thread_id,
        )
        docs = [layout.to_layout_2(doc) for doc in found]
        return layout.stored_writes(docs, await self._chunks(thread_id, docs))

    async def list_checkpoints(
        self,
        *,
        thread_id: str | None,
        checkpoint_ns: str | None,
        before: str | None,
        limit: int | None,
        metadata_filter: dict[str, JSON] | None,
        checkpoint_id: str | None = None,
        spared: bool = True,
    ) -> AsyncIterator[StoredCheckpoint]:
        if limit is not None and limit <= 0:
            return
        where = ["c.type = @type"]
        params: dict[str, Any] = {"@type": layout.CHECKPOINT}
        if thread_id is not None:
            where.append("c.thread_id = @thread")
            params["@thread"] = thread_id
        if checkpoint_ns is not None:
            where.append("c.checkpoint_ns = @ns")
            params["@ns"] = checkpoint_ns
        if before is not None:
            where.append("c.checkpoint_id < @before")
            params["@before"] = before
        if checkpoint_id is not None:
            where.append("c.checkpoint_id = @id")
            params["@id"] = checkpoint_id
        if not spared:
            where.append("NOT IS_DEFINED(c.spared)")
        # Scalars are filtered by the server, as each value `==` holds equal to them (a
        # boolean and 0 or 1); null and structured values (whose equality Cosmos SQL does
        # not define like Python's) are compared here, and so are numbers past 2**53,
        # which the server compares rounded (`layout.EXACT_INT`).
        local_filter: dict[str, JSON] = {}
        for n, (key, value) in enumerate(sorted((metadata_filter or {}).items())):
            if isinstance(value, str | bool) or (
                isinstance(value, int | float) and abs(value) < layout.EXACT_INT
            ):
                equal = equal_scalars(value)
                names = [f"@m{n}_{k}" for k in range(len(equal))]
                compared = f"IN ({', '.join(names)})" if len(names) > 1 else f"= {names[0]}"
                where.append(f"c.metadata[{_sql_name(key)}] {compared}")
                params.update(zip(names, equal, strict=True))
            else:
                local_filter[key] = value
        query = f"SELECT * FROM c WHERE {' AND '.join(where)} ORDER BY c.checkpoint_id DESC"
        page_size = self._page_size
        if limit is not None and not local_filter:
            page_size = min(limit, page_size)
        remaining = limit
        pages = self._io.pages(query, params, partition=thread_id, page_size=page_size)
        async with aclosing(pages):
            async for page in pages:
                matching = [
                    doc
                    for doc in page
                    if all(
                        layout.metadata_of(doc).get(key) == value
                        for key, value in local_filter.items()
                    )
                ]
                if remaining is not None:
                    matching = matching[:remaining]
                    remaining -= len(matching)
                by_thread: dict[str, list[Doc]] = defaultdict(list)
                for doc in matching:
                    by_thread[doc["thread_id"]].append(doc)
                loaded: dict[tuple[str, str, str], StoredCheckpoint] = {}
                for thread, docs in by_thread.items():
                    complete = await self._load_complete(thread, docs)
                    for stored in await resolve_checkpoints(
                        complete, self._blocks, self._chunker.value_of
                    ):
                        loaded[(thread, stored.checkpoint_ns, stored.checkpoint_id)] = stored
                for doc in matching:
                    yield loaded[(doc["thread_id"], doc["checkpoint_ns"], doc["checkpoint_id"])]
                if remaining is not None and remaining <= 0:
                    return

    async def delta_history(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str, channels: Sequence[str]
    ) -> dict[str, ChannelHistory]:
        """Two sequential requests whatever the chain's depth, both in the thread's partition
        (a third only for chunks of values over the item limit).

        First the lineage of the namespace up to the target, newest first: ids, parents,
        and per channel its version and the document holding its value (small rows; one
        page holds a thousand checkpoints, and reading stops once every channel met its
        seed). The chain and each channel's seed are resolved from those ids here; then
        the writes of exactly the chain's checkpoints and the seeds' holders, concurrently.
        """
        if not channels:
            return {}
        projected = ", ".join(
            f"c.value_at[{_sql_name(ch)}] AS a{n}, c.channel_versions[{_sql_name(ch)}] AS v{n}"
            for n, ch in enumerate(channels)
        )
        pages = self._io.pages(
            f"SELECT c.checkpoint_id, c.parent_checkpoint_id, c.layout, {projected} FROM c"
            " WHERE c.thread_id = @thread AND c.type = @type AND c.checkpoint_ns = @ns"
            " AND c.checkpoint_id <= @target ORDER BY c.checkpoint_id DESC",
            {
                "@thread": thread_id,
                "@type": layout.CHECKPOINT,
                "@ns": checkpoint_ns,
                "@target": checkpoint_id,
            },
            partition=thread_id,
            page_size=BULK_PAGE_SIZE,
        )
        rows: dict[str, Doc] = {}
        walk = _ChainWalk(checkpoint_id, list(channels), checkpoint_ns)
        async with aclosing(pages):
            async for page in pages:
                rows.update((row["checkpoint_id"], row) for row in page)
                if walk.advance(rows):
                    break
        chain = walk.chain
        holders = sorted({holder for holder, _ in walk.seed_holder.values()})
        found_writes: list[Doc] = []
        found_holders: list[Doc] = []
        blocks: dict[bytes, Chunk] = {}
        if chain:
            writes_query = self._io.query_all(
                "SELECT * FROM c WHERE c.thread_id = @thread AND c.type = @write"
                " AND c.checkpoint_ns = @ns AND ARRAY_CONTAINS(@checkpoints, c.checkpoint_id)",
                {
                    "@thread": thread_id,
                    "@write": layout.WRITE,
                    "@ns": checkpoint_ns,
                    "@checkpoints": sorted(chain),
                },
                partition=thread_id,
            )
            if holders:
                found, blocks = await gather_pair(
                    gather([writes_query, self._fetch_list(thread_id, holders)]),
                    self._snapshot_blocks(thread_id, checkpoint_ns, sorted(walk.seed_holder)),
                )
                found_writes, found_holders = found
            else:
                found_writes = await writes_query
        # Only the entries of the channels each checkpoint contributes to.
        docs: list[Doc] = []
        for doc in found_writes:
            doc = layout.to_layout_2(doc)
            wanted = chain.get(doc["checkpoint_id"], set())
            kept = [entry for entry in doc["writes"] if entry["channel"] in wanted]
            if kept:
                docs.append({**doc, "writes": kept})
        seeds: dict[str, tuple[str, Doc, Doc]] = {}
        by_id = {doc["id"]: layout.to_layout_2(doc) for doc in found_holders}
        for ch, (holder_id, version) in walk.seed_holder.items():
            holder = by_id.get(holder_id)
            entry = layout.held_values(holder).get(ch) if holder is not None else None
            if holder is not None and entry is not None and str(entry["version"]) == version:
                seeds[ch] = (walk.seed_at[ch], holder, entry)
        chunks = await self._chunks(thread_id, [*docs, *(h for _, h, _ in seeds.values())])
        by_checkpoint: dict[str, list[Doc]] = defaultdict(list)
        for doc in docs:
            by_checkpoint[doc["checkpoint_id"]].append(doc)
        writes: dict[str, list[tuple[str, StoredWrite]]] = {ch: [] for ch in channels}
        for cid, cid_docs in by_checkpoint.items():
            for write in layout.stored_writes(cid_docs, chunks):
                writes[write.channel].append((cid, write))
        seed_values = await resolve(
            {
                ch: layout.decode(holder["id"], entry, chunks)
                for ch, (_, holder, entry) in seeds.items()
            },
            self._blocks(thread_id, blocks),
            self._chunker.value_of,
        )
        return {
            ch: ChannelHistory(
                writes[ch],
                seed=seed_values.get(ch),
                seed_at=seeds[ch][0] if ch in seeds else None,
            )
            for ch in channels
        }

    # ----------------------------------------------------------------------- maintenance

    async def delete_thread(self, thread_id: str, *, fence: int | None = None) -> None:
        self._chunker.forget([thread_id])
        if fence is not None:
            # Raised first: a batch that got in before it is deleted below, a later one
            # is refused. The fence document stays (`cosmos_fences`).
            await self._fences.move(thread_id, fence, at_least=True)
        await self._maintenance.delete_thread(thread_id)

    async def fence_thread(self, thread_id: str, fence: int) -> None:
        await self._fences.move(thread_id, fence, at_least=True)

    async def delete_for_runs(self, run_ids: Sequence[str]) -> set[str]:
        try:
            threads = await self._maintenance.delete_for_runs(run_ids)
        except RunsPartlyDeleted as failed:
            self._chunker.forget(failed.thread_ids)
            raise
        self._chunker.forget(threads)
        try:
            for thread_id in sorted(threads):
                await self._collect_blocks(thread_id)
        except BackendUnavailable as error:
            raise RunsPartlyDeleted(error, threads) from error
        return threads

    async def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._chunker.forget([target_thread_id])
        await self._maintenance.copy_thread(source_thread_id, target_thread_id)

    async def prune(self, thread_ids: Sequence[str], *, strategy: PruneStrategy) -> None:
        self._chunker.forget(thread_ids)
        await self._maintenance.prune(thread_ids, strategy=strategy)
        if strategy == "keep_latest":
            for thread_id in thread_ids:
                await self._collect_blocks(thread_id)

    async def _collect_blocks(self, thread_id: str) -> None:
        """Delete the thread's blocks that no manifest of a remaining document reaches, but
        those too new to be judged: a step stored meanwhile may name them
        (`block_grace_seconds`); a later collection takes those left unreached."""
        judged_before = self._clock() - self._block_grace
        holders = await self._io.query_all(
            'SELECT c.id, c.type, c.layout, c["values"] FROM c'
            " WHERE c.thread_id = @thread AND ARRAY_CONTAINS(@types, c.type)",
            {"@thread": thread_id, "@types": [layout.CHECKPOINT, layout.VALUES]},
            partition=thread_id,
        )
        # Only layout 2 holds manifests (layout 1 was written before them).
        docs = [doc for doc in holders if doc.get("layout", 1) >= layout.LAYOUT]
        for doc in docs:
            layout.check_values(doc)
        manifests = layout.manifests_of(docs, await self._chunks(thread_id, docs))
        # Every block, the new ones too: a node a step stored again (a new `_ts`) may be
        # what reaches older blocks from a manifest read.
        blocks = await self._io.query_all(
            "SELECT c.id, c.node, c.data, c._ts FROM c"
            " WHERE c.thread_id = @thread AND c.type = @type",
            {"@thread": thread_id, "@type": layout.BLOCK},
            partition=thread_id,
        )
        nodes = {chunk.digest: chunk for chunk in map(layout.block_of, blocks) if chunk.node}
        kept = {layout.block_doc_id(digest) for digest in reachable(manifests, nodes)}
        await self._io.delete_ids(
            thread_id,
            [doc["id"] for doc in blocks if doc["id"] not in kept and doc["_ts"] < judged_before],
        )

    def _blocks(self, thread_id: str, fetched: Mapping[bytes, Chunk] | None = None) -> Fetch:
        """Blocks by digest, one query per level of the tree, but for those already
        `fetched` (a snapshot's, with the checkpoint or its history)."""

        async def fetch(digests: list[bytes]) -> Mapping[bytes, Chunk]:
            ids = [layout.block_doc_id(digest) for digest in digests]
            found = await self._fetch_list(thread_id, ids)
            return {chunk.digest: chunk for chunk in map(layout.block_of, found)}

        return fetched_first(fetched, fetch)

    async def _snapshot_blocks(
        self, thread_id: str, checkpoint_ns: str, channels: list[str]
    ) -> dict[bytes, Chunk]:
        """The blocks of the channels' DeltaChannel snapshots (`layout.block_doc`'s tag),
        in one query run alongside the history's or the checkpoint's own. Every snapshot
        of the channel still stored is among them: for a conversation that only grows,
        the newest snapshot's blocks are all of them; a channel whose reducer drops or
        rewrites items brings older snapshots' blocks too (until pruning drops them). A
        block another value stored last is not here: `_blocks` fetches it by digest."""
        if not channels:
            return {}
        found = await self._io.query_all(
            "SELECT * FROM c WHERE c.thread_id = @thread AND c.type = @block"
            " AND c.checkpoint_ns = @ns AND ARRAY_CONTAINS(@channels, c.snapshot_of)",
            {
                "@thread": thread_id,
                "@block": layout.BLOCK,
                "@ns": checkpoint_ns,
                "@channels": channels,
            },
            partition=thread_id,
        )
        return {chunk.digest: chunk for chunk in map(layout.block_of, found)}

    # ----------------------------------------------------------------------- internals

    async def _parent(
        self, checkpoint: StoredCheckpoint, *, checked: bool
    ) -> layout.Lineage | None:
        """The parent's lineage: remembered (this process's last put or latest read of the
        namespace), else read. `checked`: a parent read and found gone, or spared (a
        deleted run's), raises `ParentGone`; either way the put's own write reads it again
        (`_Step.parent`), in its batch: no round trip more."""
        parent_id = checkpoint.parent_checkpoint_id
        if parent_id is None:
            return None
        key = (checkpoint.thread_id, checkpoint.checkpoint_ns)
        known = self._lineage.get(key)
        if known is not None and known.checkpoint_id == parent_id:
            return known
        found = await self._io.read(
            layout.checkpoint_doc_id(checkpoint.checkpoint_ns, parent_id), checkpoint.thread_id
        )
        if found is None or found.get("type") != layout.CHECKPOINT:
            found = None
        if checked and (found is None or found.get("spared")):
            raise ParentGone(checkpoint.thread_id, checkpoint.checkpoint_ns, parent_id)
        if found is None:
            return None
        return layout.Lineage.of(layout.to_layout_2(found))

    def _remember(self, thread_id: str, checkpoint_ns: str, doc: Doc) -> None:
        key = (thread_id, checkpoint_ns)
        self._lineage[key] = layout.Lineage.of(doc)
        self._lineage.move_to_end(key)
        while len(self._lineage) > LINEAGE_MEMO_SIZE:
            self._lineage.popitem(last=False)

    def _forget_lineage(self, thread_id: str, checkpoint_ns: str, checkpoint_id: str) -> None:
        key = (thread_id, checkpoint_ns)
        known = self._lineage.get(key)
        if known is not None and known.checkpoint_id == checkpoint_id:
            del self._lineage[key]

    def _forget(self, thread_id: str) -> None:
        for key in [key for key in self._lineage if key[0] == thread_id]:
            del self._lineage[key]

    async def _load_complete(
        self, thread_id: str, checkpoints: Sequence[Doc]
    ) -> list[StoredCheckpoint]:
        """Checkpoint documents of one thread, with their values and pending writes.

        One round trip: a query for their writes and, concurrently, one for the
        ancestors holding their values and their own chunks (two simple queries
        instead of one with OR: the emulator evaluates an OR of ARRAY_CONTAINS
        some 20x slower). A second round trip only for chunks of large ancestor
        values and writes.
        """
        mains = [layout.to_layout_2(doc) for doc in checkpoints]
        own = {doc["id"] for doc in mains}
        holder_ids = {holder for doc in mains for holder in doc["value_at"].values()} - own
        ids = sorted(holder_ids) + layout.chunks_of(mains)
        writes_query = self._io.query_all(
            "SELECT * FROM c WHERE c.thread_id = @thread AND c.type = @write"
            " AND ARRAY_CONTAINS(@checkpoints, c.checkpoint_id)",
            {
                "@thread": thread_id,
                "@write": layout.WRITE,
                "@checkpoints": sorted({doc["checkpoint_id"] for doc in mains}),
            },
            partition=thread_id,
        )
        if ids:
            by_id, found_writes = await gather([self._fetch_list(thread_id, ids), writes_query])
            found = [*by_id, *found_writes]
        else:
            found = await writes_query
        chunks = {doc["id"]: doc for doc in found if doc["type"] == layout.CHUNK}
        holders = {doc["id"]: layout.to_layout_2(doc) for doc in found if doc["id"] in holder_ids}
        wanted = {(doc["checkpoint_ns"], doc["checkpoint_id"]) for doc in mains}
        writes = [
            layout.to_layout_2(doc)
            for doc in found
            if doc["type"] == layout.WRITE
            and (doc["checkpoint_ns"], doc["checkpoint_id"]) in wanted
        ]
        missing = [c for c in layout.chunks_of([*holders.values(), *writes]) if c not in chunks]
        if missing:
            chunks.update(await self._fetch(thread_id, missing))
        holders.update((doc["id"], doc) for doc in mains)  # one may hold another's values
        writes_of: dict[tuple[str, str], list[Doc]] = defaultdict(list)
        for doc in writes:
            writes_of[(doc["checkpoint_ns"], doc["checkpoint_id"])].append(doc)
        return [
            layout.stored_checkpoint(
                doc,
                holders,
                chunks,
                layout.stored_writes(
                    writes_of[(doc["checkpoint_ns"], doc["checkpoint_id"])], chunks
                ),
            )
            for doc in mains
        ]

    async def _load_with_history(
        self, thread_id: str, main: Doc, own_snapshots: list[str]
    ) -> tuple[StoredCheckpoint, dict[bytes, Chunk]]:
        """One checkpoint whose DeltaChannel history starts where its `delta_seed` says, with
        that history, in the round trips `_load_complete` takes without it: its writes and
        the writes of the ancestors down to the oldest `since` are one range query, the
        seeds' holders join its own holders, and the lineage of that range (to keep only
        the parent chain, not a fork's checkpoints in the range) and the blocks of the
        seeds' snapshots and of `own_snapshots` are read alongside. Returns the checkpoint
        (manifests not assembled yet) and those blocks."""
        seeds: dict[str, Doc] = main["delta_seed"]
        checkpoint_id = main["checkpoint_id"]
        holder_ids = {*main["value_at"].values()} | {
            seed["holder"] for seed in seeds.values() if seed.get("holder")
        }
        holder_ids.discard(main["id"])
        ids = sorted(holder_ids) + layout.chunks_of([main])
        span = {
            "@thread": thread_id,
            "@ns": main["checkpoint_ns"],
            "@since": min(seed["since"] for seed in seeds.values()),
            "@until": checkpoint_id,
        }
        calls = [
            self._io.query_all(
                "SELECT * FROM c WHERE c.thread_id = @thread AND c.type = @write"
                " AND c.checkpoint_ns = @ns AND c.checkpoint_id >= @since"
                " AND c.checkpoint_id <= @until",
                {**span, "@write": layout.WRITE},
                partition=thread_id,
            ),
            self._io.query_all(
                "SELECT c.checkpoint_id, c.parent_checkpoint_id, c.channel_versions FROM c"
                " WHERE c.thread_id = @thread AND c.type = @type AND c.checkpoint_ns = @ns"
                " AND c.checkpoint_id >= @since AND c.checkpoint_id < @until",
                {**span, "@type": layout.CHECKPOINT},
                partition=thread_id,
            ),
        ]
        if ids:
            calls.append(self._fetch_list(thread_id, ids))
        snapshots = {channel for channel, seed in seeds.items() if seed.get("holder")}
        (found_writes, lineage, *by_id), blocks = await gather_pair(
            gather(calls),
            self._snapshot_blocks(
                thread_id, main["checkpoint_ns"], sorted(snapshots.union(own_snapshots))
            ),
        )
        found = by_id[0] if by_id else []
        chunks = {doc["id"]: doc for doc in found if doc["type"] == layout.CHUNK}
        holders = {doc["id"]: layout.to_layout_2(doc) for doc in found if doc["id"] in holder_ids}
        writes = [layout.to_layout_2(doc) for doc in found_writes]
        missing = [c for c in layout.chunks_of([*holders.values(), *writes]) if c not in chunks]
        if missing:
            chunks.update(await self._fetch(thread_id, missing))
        holders[main["id"]] = main
        writes_of: dict[str, list[Doc]] = defaultdict(list)
        for doc in writes:
            writes_of[doc["checkpoint_id"]].append(doc)
        stored = layout.stored_checkpoint(
            main, holders, chunks, layout.stored_writes(writes_of[checkpoint_id], chunks)
        )
        rows = {row["checkpoint_id"]: row for row in lineage}
        history: dict[str, ChannelHistory] = {}
        for channel, seed in seeds.items():
            chain: list[str] = []
            at = main.get("parent_checkpoint_id")
            while at is not None and at in rows:
                chain.append(at)
                if at == seed["since"]:
                    break
                at = rows[at].get("parent_checkpoint_id")
            if not chain or chain[-1] != seed["since"]:
                continue  # a gap in the chain: `delta_history` resolves it from the lineage
            value: TypedBytes | None = None
            if seed.get("holder"):
                holder = holders.get(seed["holder"])
                entry = layout.held_values(holder).get(channel) if holder is not None else None
                version = (rows[seed["since"]].get("channel_versions") or {}).get(channel)
                if holder is None or entry is None or str(entry["version"]) != str(version):
                    continue
                value = layout.decode(holder["id"], entry, chunks)
            channel_writes: list[tuple[str, StoredWrite]] = []
            for at in chain:
                docs = [
                    {**doc, "writes": [e for e in doc["writes"] if e["channel"] == channel]}
                    for doc in writes_of[at]
                ]
                channel_writes += [(at, w) for w in layout.stored_writes(docs, chunks)]
            history[channel] = ChannelHistory(
                channel_writes, seed=value, seed_at=seed["since"] if value is not None else None
            )
        return dataclasses.replace(stored, history=history), blocks

    async def _chunks(self, thread_id: str, docs: Sequence[Doc]) -> dict[str, Doc]:
        needed = layout.chunks_of(docs)
        return await self._fetch(thread_id, needed) if needed else {}

    async def _fetch(self, thread_id: str, ids: list[str]) -> dict[str, Doc]:
        return {doc["id"]: doc for doc in await self._fetch_list(thread_id, ids)}

    async def _fetch_list(self, thread_id: str, ids: list[str]) -> list[Doc]:
        found: list[Doc] = await self._io.query_all(
            "SELECT * FROM c WHERE c.thread_id = @thread AND ARRAY_CONTAINS(@ids, c.id)",
            {"@thread": thread_id, "@ids": ids},
            partition=thread_id,
        )
        return found


class _ChainWalk:
    """The parent chain of a target resolved from lineage rows (see `delta_history`)."""

    def __init__(self, target: str, channels: list[str], checkpoint_ns: str) -> None:
        self.checkpoint_ns = checkpoint_ns
        self.channels = channels
        # Checkpoint id -> the channels whose writes it contributes.
        self.chain: dict[str, set[str]] = {}
        # Channel -> (holder document id, version) and the checkpoint id of its seed.
        self.seed_holder: dict[str, tuple[str, str]] = {}
        self.seed_at: dict[str, str] = {}
        self._remaining = set(channels)
        self._next: str | None = None
        self._target = target
        self._started = False

    def advance(self, rows: dict[str, Doc]) -> bool:
        """Walk as far as `rows` reach; True once the walk is over (no more rows needed)."""
        if not self._started:
            target = rows.get(self._target)
            if target is None:
                return bool(rows)  # rows are newest first: the target would be the first
            self._started = True
            self._next = target.get("parent_checkpoint_id")
        while self._next is not None and self._remaining:
            row = rows.get(self._next)
            if row is None:
                return False  # on a later page
            self.chain[self._next] = set(self._remaining)
            for n, ch in enumerate(self.channels):
                if ch not in self._remaining or f"v{n}" not in row:
                    continue
                version = str(row[f"v{n}"])
                holder = row.get(f"a{n}")
                if holder is not None and not isinstance(holder, str):
                    raise CorruptState(
                        f"checkpoint {self._next} of namespace {self.checkpoint_ns!r} has a"
                        f" damaged value_at: {holder!r} for {ch!r}"
                    )
                if holder is None and row.get("layout", 1) < layout.LAYOUT:
                    holder = layout.blob_doc_id(self.checkpoint_ns, ch, version)
                if holder is not None:
                    self.seed_holder[ch] = (holder, version)
                    self.seed_at[ch] = self._next
                    self._remaining.discard(ch)
            self._next = row.get("parent_checkpoint_id")
        return True


def _sql_name(name: str) -> str:
    """A JSON string literal is a valid Cosmos SQL property name in brackets."""
    return json.dumps(name)


@dataclasses.dataclass
class _Step:
    """One put or put_writes packed: documents stored before its own (blocks, spilled
    chunks) and its own documents (upserted, or created: first write wins)."""

    prelude: list[Doc]
    upserts: list[Doc] = dataclasses.field(default_factory=list)
    creates: list[layout.Packed] = dataclasses.field(default_factory=list)
    # (namespace, id) of a parent the step is stored only if it is still there: read by
    # the step's batch first, so a parent deleted by then fails it whole (HTTP 404). Not
    # whether it is spared: a batch's read cannot tell (the put's own read of an unseen
    # parent does, as does the read before a step too large for a batch).
    parent: tuple[str, str] | None = None

    def operations(self) -> list[BatchOperation]:
        return [
            *self._parent_read(),
            *(("upsert", (doc,)) for doc in [*self.prelude, *self.upserts]),
            *(("create", (packed.doc,)) for packed in self.creates),
        ]

    def upserted_ids(self) -> set[str]:
        return {doc["id"] for doc in [*self.prelude, *self.upserts]}

    def created_ids(self) -> set[str]:
        return {packed.doc["id"] for packed in self.creates}

    def _parent_read(self) -> list[BatchOperation]:
        if self.parent is None:
            return []
        return [("read", (layout.checkpoint_doc_id(*self.parent),))]

    def size(self) -> int:
        docs = [*self.prelude, *self.upserts, *(packed.doc for packed in self.creates)]
        return sum(layout.packed_size(doc) for doc in docs)


def _raise_if_parent_gone(
    thread_id: str,
    group: Sequence[_Step],
    operations: Sequence[BatchOperation],
    refused: BatchRefused,
) -> None:
    """`ParentGone` if a batch was refused by its read of a step's parent (`_Step.parent`)."""
    if refused.status != 404 or not 0 <= refused.index < len(operations):
        return
    kind, args = operations[refused.index][:2]
    if kind != "read":
        return
    for step in group:
        if step.parent is not None and layout.checkpoint_doc_id(*step.parent) == args[0]:
            raise ParentGone(thread_id, *step.parent)


def _transactions(
    steps: Sequence[_Step], *, fenced: bool = False
) -> Iterator[tuple[list[_Step], bool]]:
    """`steps` in order, grouped within the service's limits for a transactional batch
    (`fenced`: less the fence's operation); `False` for a group of one request (no batch
    needed, unless fenced) or a step too large for one."""
    operations_room = BATCH_OPERATIONS - fenced
    bytes_room = BATCH_BYTES - FENCE_BYTES * fenced
    group: list[_Step] = []
    count = size = 0
    upserted: set[str] = set()
    created: set[str] = set()
    for step in steps:
        step_count, step_size = len(step.operations()), step.size()
        step_upserted, step_created = step.upserted_ids(), step.created_ids()
        # A create of an id the group names already (a task's writes retried) must meet
        # what is stored, to merge with it: in a batch of its own, after the group's.
        # An id upserted again stays in the group (`_operations` keeps its last upsert).
        repeats = step_created & (upserted | created) or step_upserted & created
        if group and (
            repeats or count + step_count > operations_room or size + step_size > bytes_room
        ):
            yield group, count + fenced > 1
            group, count, size = [], 0, 0
            upserted, created = set(), set()
        if step_count > operations_room or step_size > bytes_room:
            yield [step], False
            continue
        group.append(step)
        count += step_count
        size += step_size
        upserted |= step_upserted
        created |= step_created
    if group:
        yield group, count + fenced > 1


def _operations(group: Sequence[_Step]) -> list[BatchOperation]:
    """The group's operations in order, a document upserted more than once only at its
    last upsert: a transactional batch may not name an id twice, and the last upsert is
    what applying them in order leaves (the batch is atomic, so its position does not
    matter). `_transactions` keeps creates of an id from sharing a group with it."""
    operations = [operation for step in group for operation in step.operations()]
    last = {op[1][0]["id"]: at for at, op in enumerate(operations) if op[0] == "upsert"}
    return [
        op for at, op in enumerate(operations) if op[0] != "upsert" or last[op[1][0]["id"]] == at
    ]
