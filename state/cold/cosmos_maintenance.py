"""Maintenance of the Cosmos checkpoint documents: delete, copy, prune, and their garbage.

A checkpoint names the documents holding its channel values (`value_at`:
itself or ancestors, always older). Removing checkpoints therefore keeps what a
kept one names: a removed checkpoint still named is reduced to a values holder
under the same id (only the named values stay), and holders or layout-1 blobs
that no kept checkpoint names any more are deleted with their chunks.

LangGraph's DeltaChannel keeps no value in most checkpoints: it is rebuilt from
the writes of the ancestors back to the nearest one holding a snapshot. Removing
checkpoints (prune, delete_for_runs) spares every one on such a chain of a
checkpoint that stays, so no surviving checkpoint loses its history. A checkpoint
of a deleted run spared so is marked (`spared`): the thread's next delete_for_runs
dooms it again, so once the checkpoints that needed it go too, it goes with them
instead of becoming the thread's latest state again.

Removing is not safe against a writer of the same thread running meanwhile (a put
in flight may name a document this pass removes); a copy is (it copies the
checkpoints the source held before its first pass). Nor are removals safe against
two of them on one thread at once (two delete_for_runs may each keep what the other
deletes, where Postgres takes them in turn): the app prunes and deletes threads
whose runs have stopped, under the case's run guard.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import BackendUnavailable, RunsPartlyDeleted, RunsStillWriting
from ..ports import PruneStrategy
from . import cosmos_layout as layout
from .cosmos_io import BULK_PAGE_SIZE, DELETE_BATCH, Doc, PartitionIO, gather, strip_system

# Looks again delete_for_runs takes for a run still writing to threads, before it gives up.
LATE_RUN_ROUNDS = 3


class CheckpointMaintenance:
    def __init__(
        self, io: PartitionIO, packer: layout.Packer, forget: Callable[[str], None]
    ) -> None:
        self._io = io
        self._packer = packer
        # Drops what the store remembers of a thread (the lineage of its last put).
        self._forget = forget

    async def delete_thread(self, thread_id: str) -> None:
        # Checkpoints newest first: whatever still reads as the latest names only
        # older documents, which are still there. Queried again until none is left: a
        # put that landed meanwhile goes too, and one landing after the last is refused,
        # as it reads its parent in its own batch (`ParentGone`).
        while True:
            ids = await self._io.query_all(
                f"SELECT TOP {DELETE_BATCH} VALUE c.id FROM c WHERE c.thread_id = @thread"
                " AND c.type = @type ORDER BY c.checkpoint_id DESC",
                {"@thread": thread_id, "@type": layout.CHECKPOINT},
                partition=thread_id,
            )
            if not ids:
                break
            await self._io.delete_ids(thread_id, [str(doc_id) for doc_id in ids])
        await self._io.delete_matching(
            thread_id, "ARRAY_CONTAINS(@types, c.type)", {"@types": layout.ALL_TYPES}
        )
        self._forget(thread_id)

    async def delete_for_runs(self, run_ids: Sequence[str]) -> set[str]:
        if not run_ids:
            return set()
        deleted: set[str] = set()
        victims = await self._run_checkpoints(run_ids, late=False)
        # Looked for again after each pass until none is left: a checkpoint of the runs
        # committed before the call's last look (on a thread the run first wrote to after
        # the listing, a put with no parent) does not survive it; one after it is a write
        # that came after the call. A query more per call, none per put.
        rounds = 0
        while victims:
            if rounds > LATE_RUN_ROUNDS:
                still = RunsStillWriting("cosmos", run_ids, {thread_id for thread_id, _ in victims})
                raise RunsPartlyDeleted(still, deleted)
            rounds += 1
            await self._delete_run_checkpoints(victims, deleted)
            try:
                victims = await self._run_checkpoints(run_ids, late=True)
            except BackendUnavailable as error:
                raise RunsPartlyDeleted(error, deleted) from error
        return deleted

    async def _run_checkpoints(
        self, run_ids: Sequence[str], *, late: bool
    ) -> dict[tuple[str, str], set[str]]:
        """The runs' checkpoint ids per (thread, namespace); `late`: but those spared (kept
        on purpose by the pass before)."""
        spared = " AND NOT IS_DEFINED(c.spared)" if late else ""
        victims: dict[tuple[str, str], set[str]] = defaultdict(set)
        async for page in self._io.pages(
            "SELECT c.thread_id, c.checkpoint_ns, c.checkpoint_id FROM c"
            f" WHERE c.type = @type AND ARRAY_CONTAINS(@runs, c.metadata.run_id){spared}",
            {"@type": layout.CHECKPOINT, "@runs": list(run_ids)},
            partition=None,
            page_size=BULK_PAGE_SIZE,
        ):
            for doc in page:
                victims[(doc["thread_id"], doc["checkpoint_ns"])].add(doc["checkpoint_id"])
        return victims

    async def _delete_run_checkpoints(
        self, victims: dict[tuple[str, str], set[str]], deleted: set[str]
    ) -> None:
        """`victims` removed, adding the threads removed from to `deleted`."""
        for (thread_id, checkpoint_ns), checkpoint_ids in victims.items():
            try:
                await self._remove(
                    thread_id, checkpoint_ns, checkpoint_ids.__contains__, runs_deleted=True
                )
            except BackendUnavailable as error:
                # The threads deleted from before, and this one: its removal is a request
                # per batch of documents, some of which may have landed.
                self._forget(thread_id)
                raise RunsPartlyDeleted(error, deleted | {thread_id}) from error
            self._forget(thread_id)
            deleted.add(thread_id)

    async def prune(self, thread_ids: Sequence[str], *, strategy: PruneStrategy) -> None:
        if strategy not in ("keep_latest", "delete"):
            raise ValueError(f"unknown prune strategy {strategy!r}")
        for thread_id in thread_ids:
            if strategy == "delete":
                await self.delete_thread(thread_id)
                continue
            latest: dict[str, str] = {}
            async for page in self._io.pages(
                "SELECT c.checkpoint_ns, c.checkpoint_id FROM c"
                " WHERE c.thread_id = @thread AND c.type = @type",
                {"@thread": thread_id, "@type": layout.CHECKPOINT},
                partition=thread_id,
                page_size=BULK_PAGE_SIZE,
            ):
                for doc in page:
                    ns, checkpoint_id = doc["checkpoint_ns"], doc["checkpoint_id"]
                    latest[ns] = max(latest.get(ns, checkpoint_id), checkpoint_id)
            for ns, newest in latest.items():
                # The latest and anything newer (a put that landed meanwhile) stay.
                await self._remove(thread_id, ns, newest.__gt__)
            self._forget(thread_id)

    async def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        def moved(doc: Doc, **changes: Any) -> Doc:
            return {**strip_system(doc), "thread_id": target_thread_id, **changes}

        # What the target holds already stays as it is (as Postgres's copy does nothing
        # on a conflict): ids do not name the thread, so the source's document of the
        # same id (a checkpoint pruned to a values holder, say) would replace the target's.
        # But a values holder under a checkpoint's id that a copy stopped half-way left (its
        # second step done, not its third): the checkpoint is written over it.
        held = await self._ids(target_thread_id)
        kept = set(held)
        holders = {doc_id for doc_id, kind in held.items() if kind != layout.CHECKPOINT}
        # The source's checkpoints as they stand before the first pass: only those are
        # copied as checkpoints. One a writer stored after it (a write-through step, which
        # no flush lock holds off) may name values or writes that pass did not see.
        source = await self._ids(source_thread_id)
        listed = {doc_id for doc_id, kind in source.items() if kind == layout.CHECKPOINT}
        # Everything but checkpoints first, then the checkpoints as values holders,
        # then as checkpoints: a checkpoint appears only once all it names is there.
        await self._copy(
            source_thread_id,
            [layout.CHUNK, layout.BLOCK, layout.BLOB, layout.WRITE],
            moved,
            kept,
        )
        # Values holders with them: a prune of the source meanwhile may have reduced
        # a checkpoint the first pass saw as one (and skipped) to a holder kept ones name.
        await self._copy(
            source_thread_id,
            [layout.CHECKPOINT, layout.VALUES],
            lambda doc: (
                moved(layout.to_layout_2(doc), type=layout.VALUES)
                if doc["type"] == layout.CHECKPOINT
                else moved(doc)
            ),
            kept,
            only=listed,
        )
        await self._copy(source_thread_id, [layout.CHECKPOINT], moved, kept - holders, only=listed)
        self._forget(target_thread_id)

    async def _ids(self, thread_id: str) -> dict[str, str]:
        """The thread's document ids, and the type of each."""
        ids: dict[str, str] = {}
        async for page in self._io.pages(
            "SELECT c.id, c.type FROM c WHERE c.thread_id = @thread",
            {"@thread": thread_id},
            partition=thread_id,
            page_size=BULK_PAGE_SIZE,
        ):
            ids.update((doc["id"], doc["type"]) for doc in page)
        return ids

    async def _copy(
        self,
        source_thread_id: str,
        types: list[str],
        change: Callable[[Doc], Doc],
        kept: set[str],
        *,
        only: set[str] | None = None,
    ) -> None:
        """The source's documents of `types` the target does not hold (`kept`); with `only`,
        its checkpoints only those of that set."""
        async for page in self._io.pages(
            "SELECT * FROM c WHERE c.thread_id = @thread AND ARRAY_CONTAINS(@types, c.type)",
            {"@thread": source_thread_id, "@types": types},
            partition=source_thread_id,
            page_size=DELETE_BATCH,
        ):
            await self._io.upsert_all(
                [
                    change(doc)
                    for doc in page
                    if doc["id"] not in kept
                    and (only is None or doc["type"] != layout.CHECKPOINT or doc["id"] in only)
                ]
            )

    async def _remove(
        self,
        thread_id: str,
        checkpoint_ns: str,
        doomed: Callable[[str], bool],
        *,
        runs_deleted: bool = False,
    ) -> None:
        """Remove the namespace's checkpoints whose id is `doomed`, keeping what the rest name.
        `runs_deleted` (delete_for_runs): those an earlier one spared are doomed again, and
        those spared now are marked so."""
        lineage: dict[str, _Lineage] = {}
        async for page in self._io.pages(
            "SELECT * FROM c WHERE c.thread_id = @thread AND c.type = @type"
            " AND c.checkpoint_ns = @ns",
            {"@thread": thread_id, "@type": layout.CHECKPOINT, "@ns": checkpoint_ns},
            partition=thread_id,
            page_size=BULK_PAGE_SIZE,
        ):
            for found in page:
                doc = layout.to_layout_2(found)
                lineage[doc["checkpoint_id"]] = _Lineage.of(doc)

        def gone(checkpoint_id: str) -> bool:
            return doomed(checkpoint_id) or (runs_deleted and lineage[checkpoint_id].spared)

        # A doomed checkpoint on the DeltaChannel chain of one that stays is spared: its
        # writes (and seed) are what that one's delta channels are rebuilt from.
        spared = _delta_chains(lineage, [cid for cid in lineage if not gone(cid)])
        named: dict[str, set[str]] = defaultdict(set)  # document id -> channels kept ones use
        victims: list[str] = []
        marked: list[str] = []
        for checkpoint_id, kept in lineage.items():
            if gone(checkpoint_id):
                if checkpoint_id not in spared:
                    victims.append(kept.doc_id)
                    continue
                if runs_deleted and not kept.spared:
                    marked.append(kept.doc_id)
            for channel, holder_id in kept.value_at.items():
                named[holder_id].add(channel)
        # So the thread's next delete_for_runs dooms them again: once what needs them goes
        # too, they must not become the thread's latest state again. A patch, not a write
        # of the document as read: one deleted meanwhile stays deleted.
        await gather(
            [
                self._io.patch(doc_id, thread_id, [{"op": "add", "path": "/spared", "value": True}])
                for doc_id in marked
            ]
        )
        if not victims:
            return
        victim_docs: list[Doc] = []
        for start in range(0, len(victims), DELETE_BATCH):
            victim_docs += [
                layout.to_layout_2(doc)
                for doc in await self._io.query_all(
                    "SELECT * FROM c WHERE c.thread_id = @thread AND ARRAY_CONTAINS(@ids, c.id)",
                    {"@thread": thread_id, "@ids": victims[start : start + DELETE_BATCH]},
                    partition=thread_id,
                )
            ]
        # Pending writes of the removed checkpoints go first (nothing names them).
        doomed_ids = sorted(doc["checkpoint_id"] for doc in victim_docs)
        for start in range(0, len(doomed_ids), DELETE_BATCH):
            await self._remove_docs(
                thread_id,
                "c.type = @type AND c.checkpoint_ns = @ns AND ARRAY_CONTAINS(@checkpoints, c.checkpoint_id)",
                {
                    "@type": layout.WRITE,
                    "@ns": checkpoint_ns,
                    "@checkpoints": doomed_ids[start : start + DELETE_BATCH],
                },
            )
        # Values only removed checkpoints named: earlier holders and layout-1 blobs.
        orphans = {
            holder
            for doc in victim_docs
            for holder in doc["value_at"].values()
            if holder not in named and holder not in victims
        }
        holders: list[Doc] = []
        unreferenced: list[str] = []
        for doc in victim_docs:
            channels = named.get(doc["id"])
            if channels:
                holder, dropped = self._packer.values_holder(doc, channels)
                holders.append(holder)
                unreferenced += dropped
            else:
                unreferenced += [doc["id"], *layout.chunks_of([doc])]
        await self._io.upsert_all(holders)
        await self._io.delete_ids(thread_id, unreferenced)
        ordered = sorted(orphans)
        for start in range(0, len(ordered), DELETE_BATCH):
            await self._remove_docs(
                thread_id,
                "ARRAY_CONTAINS(@ids, c.id) AND c.type != @checkpoint",
                {"@ids": ordered[start : start + DELETE_BATCH], "@checkpoint": layout.CHECKPOINT},
            )

    async def _remove_docs(self, thread_id: str, condition: str, params: dict[str, Any]) -> None:
        """Documents matching `condition`, with their chunks."""
        docs = [
            layout.to_layout_2(doc)
            for doc in await self._io.query_all(
                f"SELECT * FROM c WHERE c.thread_id = @thread AND ({condition})",
                {"@thread": thread_id, **params},
                partition=thread_id,
            )
        ]
        await self._io.delete_ids(thread_id, [doc["id"] for doc in docs] + layout.chunks_of(docs))


@dataclass(frozen=True)
class _Lineage:
    """What maintenance needs of a checkpoint document (not its values)."""

    doc_id: str
    parent_checkpoint_id: str | None
    value_at: dict[str, str]
    # Channels LangGraph's DeltaChannel rebuilds at this checkpoint from its ancestors:
    # those its metadata counts as updated since their last snapshot.
    delta_channels: list[str]
    # Of a run delete_for_runs deleted, kept for a survivor's DeltaChannel history.
    spared: bool

    @classmethod
    def of(cls, doc: Doc) -> _Lineage:
        counted = (doc.get("metadata") or {}).get("counters_since_delta_snapshot") or {}
        versions = doc.get("channel_versions") or {}
        return cls(
            doc["id"],
            doc.get("parent_checkpoint_id"),
            dict(doc["value_at"]),
            [channel for channel in counted if channel in versions],
            bool(doc.get("spared")),
        )


def _delta_chains(lineage: dict[str, _Lineage], starts: list[str]) -> set[str]:
    """Checkpoint ids on the DeltaChannel chains of `starts`: per delta channel, the
    ancestors from the parent back to the nearest one holding the channel's value."""
    on_chain: set[str] = set()
    seen: set[tuple[str, str]] = set()
    for start in starts:
        for channel in lineage[start].delta_channels:
            at = lineage[start].parent_checkpoint_id
            while at is not None and at in lineage and (at, channel) not in seen:
                seen.add((at, channel))
                on_chain.add(at)
                if channel in lineage[at].value_at:
                    break
                at = lineage[at].parent_checkpoint_id
    return on_chain
