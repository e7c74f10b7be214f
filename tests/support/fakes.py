"""In-memory fakes of the state ports: the compositions tested in milliseconds, no server.

Each fake keeps its port's contract as the real adapters do, and tests/contract runs the
same cases against both: records carry versions and fences and refuse stale writers
(`VersionConflict`, `StaleFencingToken`), a cold store with an item limit refuses what
passes it (`StateTooLarge`, as Cosmos does), documents are upcast on read, the hot store
installs only what is not older and hides entries behind write intents, locks are fenced
and expire, the checkpoint cache only moves forward and fills only under an unrevoked
lease, and the write-behind log checks the thread's fence and updates the cache in the
same step as its append.

A hot tier's fakes share one `Outage`: setting `outage.down` makes every call fail as an
unreachable Redis does (`BackendUnavailable`; swallowed by the checkpoint cache, as its
port says), which is how a test takes the tier away and gives it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from state import schema
from state.checkpoint.flusher import Flusher
from state.errors import (
    BackendUnavailable,
    CorruptState,
    InvalidValue,
    LogEntryLost,
    ParentGone,
    StaleFencingToken,
    StateTooLarge,
    ThreadExpiring,
    UnknownParent,
    VersionConflict,
    WorkflowExists,
    WorkflowNotFound,
)
from state.factory import Backends
from state.ports import (
    CREATED_SECTION,
    JSON,
    AuditEntry,
    Backlog,
    CacheLookup,
    ChannelHistory,
    CheckpointPut,
    ColdRetention,
    FlushOp,
    HistoryLookup,
    HotRead,
    Lock,
    LogEntry,
    PruneStrategy,
    ResumePoint,
    SectionWrite,
    StoredBlob,
    StoredCheckpoint,
    StoredEvent,
    StoredWrite,
    StuckEntry,
    TierHealth,
    TypedBytes,
    WorkflowRecord,
    WriteIntent,
    WritesPut,
    acting_caller,
    check_distinct,
    checkpoint_time_us,
    event_order,
    timed_probe,
)
from state.retention import TieredRetention
from state.settings import Settings

MEMORY = "memory"


def memory_settings(**overrides: object) -> Settings:
    """Settings for stores built from fakes: every value a composition reads, no endpoint
    reached (the Cosmos endpoint only satisfies validation)."""
    return Settings.model_validate({"cosmos_endpoint": "https://localhost:1/", **overrides})


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _copy(value: JSON, backend: str = MEMORY) -> JSON:
    """A deep copy through JSON: what a store holds never aliases the caller's value, and a
    value JSON cannot carry is refused as the real stores refuse it."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidValue(backend, f"not storable as JSON: {exc}") from exc


def _size(document: dict[str, Any]) -> int:
    return len(json.dumps(document, separators=(",", ":")).encode())


@dataclass
class Outage:
    """Whether a tier's server is unreachable; shared by every fake of one hot tier."""

    down: bool = False

    def check(self, backend: str, operation: str) -> None:
        if self.down:
            raise BackendUnavailable(backend, f"{operation}: connection refused (test outage)")


class _Clock:
    """Microseconds since the epoch, strictly increasing (the hot tier's one clock)."""

    def __init__(self) -> None:
        self._last = 0

    def micros(self) -> int:
        self._last = max(self._last + 1, time.time_ns() // 1000)
        return self._last


@dataclass
class _Expiring:
    """A value with an optional expiry on the monotonic clock (Redis PX/EX)."""

    value: str
    expires_at: float | None = None

    def alive(self) -> bool:
        return self.expires_at is None or time.monotonic() < self.expires_at

    def remaining_ms(self) -> int | None:
        if self.expires_at is None:
            return None
        return max(0, int((self.expires_at - time.monotonic()) * 1000))


def _deadline(ms: int) -> float:
    return time.monotonic() + ms / 1000


class _Locks:
    """Named locks that expire, owned by a token (Redis SET NX PX, compare-and-delete)."""

    def __init__(self) -> None:
        self._held: dict[str, _Expiring] = {}

    def take(self, name: str, token: str, ttl_ms: int) -> bool:
        held = self._held.get(name)
        if held is not None and held.alive():
            return False
        self._held[name] = _Expiring(token, _deadline(ttl_ms))
        return True

    def owns(self, name: str, token: str) -> bool:
        held = self._held.get(name)
        return held is not None and held.alive() and held.value == token

    def renew(self, name: str, token: str, ttl_ms: int) -> bool:
        if not self.owns(name, token):
            return False
        self._held[name] = _Expiring(token, _deadline(ttl_ms))
        return True

    def release(self, name: str, token: str) -> bool:
        if not self.owns(name, token):
            return False
        del self._held[name]
        return True

    def remaining_ms(self, name: str) -> int | None:
        held = self._held.get(name)
        return held.remaining_ms() if held is not None and held.alive() else None


class _Tier:
    """What every fake of a server shares: its name, an outage switch, calls per operation."""

    name = MEMORY

    def __init__(self, outage: Outage | None = None) -> None:
        self.outage = outage or Outage()
        self.requests: Counter[str] = Counter()

    def _call(self, operation: str) -> None:
        self.outage.check(self.name, operation)
        self.requests[operation] += 1

    async def health(self) -> TierHealth:
        return await timed_probe(self.name, self._ping, errors=(BackendUnavailable,))

    async def _ping(self) -> None:
        self._call("health")

    async def close(self) -> None:
        """Nothing to release."""


# --------------------------------------------------------------------------- cold: records


class MemoryColdStore(_Tier):
    """`ColdStateStore` in a dict: documents versioned and upcast on read, like the real ones.

    `max_item_bytes` sets an item limit (Cosmos has one, Postgres none): a record or audit
    entry over it is refused with `StateTooLarge` before anything is written.
    `requests` counts calls per operation.
    """

    def __init__(self, *, max_item_bytes: int | None = None) -> None:
        super().__init__()
        self.max_item_bytes = max_item_bytes
        self._records: dict[str, dict[str, Any]] = {}
        self._trails: dict[str, list[dict[str, Any]]] = {}
        # Wall-clock seconds of each thread's newest write (retention's last activity).
        self.last_write: dict[str, float] = {}

    async def setup(self) -> None:
        self._call("setup")

    def _fits(self, what: str, *documents: dict[str, Any]) -> None:
        if self.max_item_bytes is None:
            return
        for document in documents:
            size = _size(document)
            if size > self.max_item_bytes:
                raise StateTooLarge(what, size, self.max_item_bytes)

    def _audit(
        self, thread_id: str, version: int, agent_id: str, section: str, before: JSON, after: JSON
    ) -> dict[str, Any]:
        caller = acting_caller()
        return {
            "thread_id": thread_id,
            "version": version,
            "agent_id": agent_id,
            "section": section,
            "before": before,
            "after": after,
            "at": _now_iso(),
            "schema_version": schema.CURRENT["audit"],
            "caller": caller.to_json() if caller else None,
        }

    async def create(
        self, thread_id: str, sections: dict[str, JSON], *, agent_id: str
    ) -> WorkflowRecord:
        self._call("create")
        stored = _copy(sections)
        now = _now_iso()
        document = {
            "thread_id": thread_id,
            "version": 1,
            "sections": stored,
            "schema_version": schema.CURRENT["workflow"],
            "created_at": now,
            "updated_at": now,
            "fence": 0,
        }
        entry = self._audit(thread_id, 1, agent_id, CREATED_SECTION, None, stored)
        self._fits(f"workflow record {thread_id!r}", document, entry)
        if thread_id in self._records:
            raise WorkflowExists(thread_id)
        self._records[thread_id] = document
        self._trails[thread_id] = [entry]
        self.last_write[thread_id] = time.time()
        return WorkflowRecord.from_document(_copy(document))

    async def get(self, thread_id: str) -> WorkflowRecord | None:
        self._call("get")
        document = self._records.get(thread_id)
        if document is None:
            return None
        return WorkflowRecord.from_document(schema.upcast("workflow", _copy(document)))

    async def update_section(
        self,
        thread_id: str,
        section: str,
        value: JSON,
        *,
        expected_version: int,
        agent_id: str,
        fencing_token: int | None = None,
    ) -> WorkflowRecord:
        self._call("update_section")
        stored = self._records.get(thread_id)
        if stored is None:
            raise WorkflowNotFound(thread_id)
        # Written by older code: the write stores it whole in the current schema.
        current = schema.upcast("workflow", _copy(stored))
        # The real stores' precedence: a stale version first, then the fence.
        if current["version"] != expected_version:
            raise VersionConflict(thread_id, expected_version, current["version"])
        if fencing_token is not None and fencing_token < current["fence"]:
            raise StaleFencingToken(thread_id, fencing_token, current["fence"])
        if not isinstance(current["sections"], dict):
            raise CorruptState(f"workflow record {thread_id!r} is damaged: sections not an object")
        after = _copy(value)
        sections = {**current["sections"], section: after}
        version = expected_version + 1
        document = {
            **current,
            "version": version,
            "sections": sections,
            "schema_version": schema.CURRENT["workflow"],
            "fence": max(current["fence"], fencing_token or 0),
            "updated_at": _now_iso(),
        }
        entry = self._audit(
            thread_id, version, agent_id, section, current["sections"].get(section), after
        )
        self._fits(f"workflow record {thread_id!r}", document, entry)
        self._records[thread_id] = document
        self._trails[thread_id].append(entry)
        self.last_write[thread_id] = time.time()
        return WorkflowRecord.from_document(_copy(document))

    async def update_sections(
        self,
        thread_id: str,
        writes: Sequence[SectionWrite],
        *,
        expected_version: int,
        fencing_token: int | None = None,
    ) -> WorkflowRecord:
        self._call("update_sections")
        check_distinct(self.name, writes)
        stored = self._records.get(thread_id)
        if stored is None:
            raise WorkflowNotFound(thread_id)
        current = schema.upcast("workflow", _copy(stored))
        if current["version"] != expected_version:
            raise VersionConflict(thread_id, expected_version, current["version"])
        if fencing_token is not None and fencing_token < current["fence"]:
            raise StaleFencingToken(thread_id, fencing_token, current["fence"])
        if not isinstance(current["sections"], dict):
            raise CorruptState(f"workflow record {thread_id!r} is damaged: sections not an object")
        sections = dict(current["sections"])
        entries = []
        for version, write in enumerate(writes, start=expected_version + 1):
            after = _copy(write.value)
            entries.append(
                self._audit(
                    thread_id,
                    version,
                    write.agent_id,
                    write.section,
                    sections.get(write.section),
                    after,
                )
            )
            sections[write.section] = after
        document = {
            **current,
            "version": expected_version + len(writes),
            "sections": sections,
            "schema_version": schema.CURRENT["workflow"],
            "fence": max(current["fence"], fencing_token or 0),
            "updated_at": _now_iso(),
        }
        self._fits(f"workflow record {thread_id!r}", document, *entries)
        self._records[thread_id] = document
        self._trails[thread_id].extend(entries)
        self.last_write[thread_id] = time.time()
        return WorkflowRecord.from_document(_copy(document))

    async def stored_version(self, thread_id: str) -> int | None:
        self._call("stored_version")
        stored = self._records.get(thread_id)
        if stored is None:
            return None
        schema.check_readable("workflow", stored["schema_version"])
        return int(stored["version"])

    async def replace_damaged(
        self, thread_id: str, sections: dict[str, JSON], *, expected_version: int, agent_id: str
    ) -> WorkflowRecord:
        self._call("replace_damaged")
        stored = self._records.get(thread_id)
        if stored is None:
            raise WorkflowNotFound(thread_id)
        schema.check_readable("workflow", stored["schema_version"])
        if stored["version"] != expected_version:
            raise VersionConflict(thread_id, expected_version, stored["version"])
        after = _copy(sections)
        version = expected_version + 1
        document = {
            **stored,
            "version": version,
            "sections": after,
            "schema_version": schema.CURRENT["workflow"],
            "updated_at": _now_iso(),
        }
        entry = self._audit(
            thread_id, version, agent_id, CREATED_SECTION, _copy(stored["sections"]), after
        )
        self._fits(f"workflow record {thread_id!r}", document, entry)
        self._records[thread_id] = document
        self._trails[thread_id].append(entry)
        self.last_write[thread_id] = time.time()
        return WorkflowRecord.from_document(_copy(document))

    async def audit_trail(self, thread_id: str, *, limit: int = 50) -> list[AuditEntry]:
        self._call("audit_trail")
        if limit <= 0:
            return []
        newest_first = list(reversed(self._trails.get(thread_id, [])))[:limit]
        return [AuditEntry.from_document(schema.upcast("audit", _copy(e))) for e in newest_first]

    async def delete(self, thread_id: str) -> None:
        self._call("delete")
        self._records.pop(thread_id, None)
        self._trails.pop(thread_id, None)
        self.last_write.pop(thread_id, None)

    async def record_ids(self) -> list[str]:
        self._call("record_ids")
        return list(self._records)

    def thread_ids(self) -> list[str]:
        """Every stored record id (archive records included)."""
        return list(self._records)


# --------------------------------------------------------------------------- cold: checkpoints


BlobKey = tuple[str, str, str, str]  # thread, namespace, channel, str(version)
CheckpointKey = tuple[str, str, str]  # thread, namespace, checkpoint id


class MemoryCheckpointStore(_Tier):
    """`CheckpointStore` in dicts, with the Postgres adapter's semantics: blob versions are
    immutable, a checkpoint put replaces, repeated writes keep the first (or the last with
    `upsert`), and deletes keep every blob a remaining checkpoint references.
    Checkpoints are returned without their blobs and writes (the saver asks for them)."""

    def __init__(self) -> None:
        super().__init__()
        self._checkpoints: dict[CheckpointKey, StoredCheckpoint] = {}
        self._blobs: dict[BlobKey, TypedBytes] = {}
        self._writes: dict[CheckpointKey, dict[tuple[str, int], StoredWrite]] = {}
        self._fences: dict[str, int] = {}  # thread -> highest flush fence (as the stores)
        self.last_write: dict[str, float] = {}

    async def setup(self) -> None:
        self._call("setup")

    async def put_checkpoint(
        self,
        checkpoint: StoredCheckpoint,
        blobs: Sequence[StoredBlob],
        *,
        parent_vouched: bool = False,
    ) -> None:
        self._call("put_checkpoint")
        parent = checkpoint.parent_checkpoint_id
        parent_key = (checkpoint.thread_id, checkpoint.checkpoint_ns, parent)
        if parent is not None and not parent_vouched and parent_key not in self._checkpoints:
            raise ParentGone(checkpoint.thread_id, checkpoint.checkpoint_ns, parent)
        self._apply(CheckpointPut(checkpoint, blobs))

    async def put_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[StoredWrite],
        *,
        upsert: bool,
    ) -> None:
        self._call("put_writes")
        self._apply(WritesPut(thread_id, checkpoint_ns, checkpoint_id, writes, upsert))

    def check_checkpoint(self, checkpoint: StoredCheckpoint, blobs: Sequence[StoredBlob]) -> None:
        """No item limit in memory."""

    async def apply_batch(self, ops: Sequence[FlushOp], *, fence: int | None = None) -> None:
        self._call("apply_batch")
        if fence is not None and ops:
            self._raise_fence(ops[0].thread_id, fence, at_least=False)
        for op in ops:
            self._apply(op)

    def _raise_fence(self, thread_id: str, fence: int, *, at_least: bool) -> None:
        highest = self._fences.get(thread_id, fence)
        if highest > fence and not at_least:
            raise StaleFencingToken(thread_id, fence, highest)
        self._fences[thread_id] = max(highest, fence)

    def _apply(self, op: FlushOp) -> None:
        if isinstance(op, CheckpointPut):
            checkpoint = op.checkpoint
            thread, ns = checkpoint.thread_id, checkpoint.checkpoint_ns
            for blob in op.blobs:
                self._blobs.setdefault((thread, ns, blob.channel, str(blob.version)), blob.value)
            key = (thread, ns, checkpoint.checkpoint_id)
            self._checkpoints[key] = dataclasses.replace(checkpoint, blobs=None, writes=None)
        else:
            thread = op.thread_id
            stored = self._writes.setdefault((thread, op.checkpoint_ns, op.checkpoint_id), {})
            for write in op.writes:
                if op.upsert:
                    stored[(write.task_id, write.idx)] = write
                else:
                    stored.setdefault((write.task_id, write.idx), write)
        self.last_write[thread] = time.time()

    async def get_checkpoint(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str | None,
        *,
        with_history: bool = True,
        spared: bool = True,
    ) -> StoredCheckpoint | None:
        # As `list_checkpoints`: nothing here is spared.
        self._call("get_checkpoint")
        if checkpoint_id is not None:
            return self._checkpoints.get((thread_id, checkpoint_ns, checkpoint_id))
        ids = [cid for (t, ns, cid) in self._checkpoints if (t, ns) == (thread_id, checkpoint_ns)]
        return self._checkpoints[(thread_id, checkpoint_ns, max(ids))] if ids else None

    async def get_blobs(
        self, thread_id: str, checkpoint_ns: str, versions: dict[str, str | int | float]
    ) -> dict[str, TypedBytes]:
        self._call("get_blobs")
        found = {
            channel: self._blobs.get((thread_id, checkpoint_ns, channel, str(version)))
            for channel, version in versions.items()
        }
        return {channel: value for channel, value in found.items() if value is not None}

    async def get_writes(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str
    ) -> list[StoredWrite]:
        self._call("get_writes")
        stored = self._writes.get((thread_id, checkpoint_ns, checkpoint_id), {})
        return [stored[key] for key in sorted(stored)]

    async def delta_history(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str, channels: Sequence[str]
    ) -> dict[str, ChannelHistory]:
        self._call("delta_history")
        target = self._checkpoints.get((thread_id, checkpoint_ns, checkpoint_id))
        history: dict[str, ChannelHistory] = {}
        for channel in channels:
            found = ChannelHistory(writes=[])
            parent_id = target.parent_checkpoint_id if target else None
            while parent_id is not None:
                ancestor = self._checkpoints.get((thread_id, checkpoint_ns, parent_id))
                if ancestor is None:
                    break
                stored = self._writes.get((thread_id, checkpoint_ns, parent_id), {})
                found.writes.extend(
                    (parent_id, write) for write in stored.values() if write.channel == channel
                )
                version = ancestor.channel_versions.get(channel)
                seed = self._blobs.get((thread_id, checkpoint_ns, channel, str(version)))
                if version is not None and seed is not None and seed[0] != "empty":
                    found = ChannelHistory(writes=found.writes, seed=seed, seed_at=parent_id)
                    break
                parent_id = ancestor.parent_checkpoint_id
            history[channel] = found
        return history

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
        # `delete_for_runs` here deletes a run whole (spares nothing): `spared` changes nothing.
        self._call("list_checkpoints")
        matching = [
            checkpoint
            for (thread, ns, cid), checkpoint in self._checkpoints.items()
            if thread_id in (None, thread)
            and checkpoint_ns in (None, ns)
            and checkpoint_id in (None, cid)
            and (before is None or cid < before)
            and all(checkpoint.metadata.get(k) == v for k, v in (metadata_filter or {}).items())
        ]
        matching.sort(key=lambda c: (c.checkpoint_id, c.thread_id, c.checkpoint_ns), reverse=True)
        for checkpoint in matching if limit is None else matching[:limit]:
            yield checkpoint

    def _drop(self, keys: Sequence[CheckpointKey]) -> None:
        """Delete checkpoints with their writes, and the blobs no remaining one references."""
        for key in keys:
            self._checkpoints.pop(key, None)
            self._writes.pop(key, None)
        referenced = {
            (thread, ns, channel, str(version))
            for (thread, ns, _), checkpoint in self._checkpoints.items()
            for channel, version in checkpoint.channel_versions.items()
        }
        threads = {thread for thread, _, _ in keys}
        for blob_key in [k for k in self._blobs if k[0] in threads and k not in referenced]:
            del self._blobs[blob_key]

    async def delete_thread(self, thread_id: str, *, fence: int | None = None) -> None:
        self._call("delete_thread")
        if fence is not None:
            self._raise_fence(thread_id, fence, at_least=True)
        self._delete_threads([thread_id])

    async def fence_thread(self, thread_id: str, fence: int) -> None:
        self._call("fence_thread")
        self._raise_fence(thread_id, fence, at_least=True)

    def _delete_threads(self, thread_ids: Sequence[str]) -> None:
        doomed = set(thread_ids)
        for table in (self._checkpoints, self._writes):
            for key in [k for k in table if k[0] in doomed]:
                del table[key]
        for blob_key in [k for k in self._blobs if k[0] in doomed]:
            del self._blobs[blob_key]
        for thread in doomed:
            self.last_write.pop(thread, None)

    async def delete_for_runs(self, run_ids: Sequence[str]) -> set[str]:
        self._call("delete_for_runs")
        runs = set(run_ids)
        doomed = [k for k, c in self._checkpoints.items() if c.metadata.get("run_id") in runs]
        self._drop(doomed)
        return {thread for thread, _, _ in doomed}

    async def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._call("copy_thread")
        for (thread, ns, cid), checkpoint in list(self._checkpoints.items()):
            if thread == source_thread_id:
                copied = dataclasses.replace(checkpoint, thread_id=target_thread_id)
                self._checkpoints.setdefault((target_thread_id, ns, cid), copied)
        for (thread, ns, channel, version), value in list(self._blobs.items()):
            if thread == source_thread_id:
                self._blobs.setdefault((target_thread_id, ns, channel, version), value)
        for (thread, ns, cid), writes in list(self._writes.items()):
            if thread == source_thread_id:
                target = self._writes.setdefault((target_thread_id, ns, cid), {})
                for key, write in writes.items():
                    target.setdefault(key, write)
        self.last_write[target_thread_id] = time.time()

    async def prune(self, thread_ids: Sequence[str], *, strategy: PruneStrategy) -> None:
        self._call("prune")
        if strategy == "delete":
            self._delete_threads(thread_ids)
            return
        latest: dict[tuple[str, str], str] = {}
        for thread, ns, cid in self._checkpoints:
            if thread in thread_ids and cid > latest.get((thread, ns), ""):
                latest[(thread, ns)] = cid
        self._drop(
            [k for k in self._checkpoints if k[0] in thread_ids and k[2] < latest[(k[0], k[1])]]
        )

    def thread_ids(self) -> set[str]:
        return {thread for thread, _, _ in self._checkpoints}


class MemoryRetention:
    """`ColdRetention` over the two memory stores: a thread expires whole (records, archive
    records named after it, checkpoints) `ttl_seconds` after its newest write."""

    name = MEMORY

    def __init__(
        self, cold: MemoryColdStore, checkpoints: MemoryCheckpointStore, *, ttl_seconds: int
    ) -> None:
        self._cold = cold
        self._checkpoints = checkpoints
        self._ttl = ttl_seconds
        self._held: set[str] = set()
        self._released_at: dict[str, float] = {}

    async def hold(self, thread_id: str) -> None:
        self._held.add(thread_id)

    async def release(self, thread_id: str) -> None:
        if thread_id in self._held:
            self._held.discard(thread_id)
            self._released_at[thread_id] = time.time()

    def _owner(self, thread_id: str) -> str:
        return thread_id.split("~archive~", 1)[0]

    async def sweep(
        self,
        *,
        limit: int,
        now: float | None = None,
        expiring: Callable[[str], Awaitable[int | None]] | None = None,
        spare: Collection[str] = (),
        deadline: float | None = None,
        deleting: Callable[[str], Awaitable[bool]] | None = None,
        spared: Callable[[str], Awaitable[None]] | None = None,
    ) -> int:
        if self._ttl < 0:
            return 0
        clock = time.time() if now is None else now
        # A thread's last activity is its own record's and checkpoints' (as Cosmos's
        # partition, Postgres's rows): archive records are apart. One no thread owns (an
        # offload whose record write failed) expires alone, by its own age.
        owners = {t for t in self._cold.last_write if self._owner(t) == t}
        owners |= set(self._checkpoints.last_write)
        last: dict[str, float] = {}
        for source in (self._cold.last_write, self._checkpoints.last_write):
            for thread_id, at in source.items():
                owner = self._owner(thread_id)
                if owner == thread_id:
                    last[owner] = max(last.get(owner, 0.0), at, self._released_at.get(owner, 0.0))
                elif owner not in owners:
                    last[thread_id] = at
        expired = [
            t
            for t, at in sorted(last.items())
            if t not in self._held and t not in spare and at + self._ttl < clock
        ][:limit]
        swept = 0
        for thread_id in expired:
            if expiring is not None:
                await expiring(thread_id)
            if deleting is not None and not await deleting(thread_id):
                if spared is not None:
                    await spared(thread_id)
                continue
            swept += 1
            if self._owner(thread_id) != thread_id:
                await self._cold.delete(thread_id)
                continue
            for record_id in self._cold.thread_ids():
                if self._owner(record_id) == thread_id:
                    await self._cold.delete(record_id)
            self._checkpoints._delete_threads([thread_id])
            self._released_at.pop(thread_id, None)
        return swept


# --------------------------------------------------------------------------- hot: records


@dataclass
class _HotEntry:
    record: WorkflowRecord | None = None
    intents: dict[str, int] = field(default_factory=dict)  # token -> deadline (µs)
    leases: set[str] = field(default_factory=set)  # fill leases taken by missed reads
    expires_at: float | None = None


class MemoryHotStore(_Tier):
    """`HotStateStore` in a dict, with the Redis scripts' semantics (see state.hot.redis_store):
    intents hide an entry until removed, install never goes back a version and drops only
    its own intent and those expired before `expired_before`, locks are fenced."""

    def __init__(self, outage: Outage | None = None) -> None:
        super().__init__(outage)
        self._clock = _Clock()
        self._entries: dict[str, _HotEntry] = {}
        self._locks = _Locks()
        self._fences: dict[str, int] = {}

    def _entry(self, thread_id: str) -> _HotEntry | None:
        entry = self._entries.get(thread_id)
        if (
            entry is not None
            and entry.expires_at is not None
            and time.monotonic() >= entry.expires_at
        ):
            del self._entries[thread_id]
            return None
        return entry

    def evict(self, thread_id: str | None = None) -> None:
        """Lose one thread's entry, or everything (eviction, FLUSHALL, failover)."""
        if thread_id is None:
            self._entries.clear()
        else:
            self._entries.pop(thread_id, None)

    async def read(self, thread_id: str) -> HotRead:
        self._call("read")
        observed_at = self._clock.micros()
        entry = self._entry(thread_id)
        if entry is not None and entry.record is not None and not entry.intents:
            return HotRead(entry.record, observed_at)
        if entry is None:
            entry = self._entries[thread_id] = _HotEntry(expires_at=time.monotonic() + 60)
        lease = secrets.token_hex(8)
        entry.leases.add(lease)
        return HotRead(None, observed_at, pending=bool(entry.intents), lease=lease)

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
        self._call("begin_write")
        token = token or secrets.token_hex(8)
        registered_at = self._clock.micros()
        entry = self._entry(thread_id) or self._entries.setdefault(thread_id, _HotEntry())
        if clear:
            entry.record = None
            entry.leases.clear()
        entry.intents[token] = registered_at + bound_ms * 1000
        # Kept at least to the intent's deadline; a new entry expires with the hot TTL.
        remaining = ttl_seconds if entry.expires_at is None else entry.expires_at - time.monotonic()
        entry.expires_at = time.monotonic() + max(remaining, bound_ms / 1000)
        return WriteIntent(thread_id, token, registered_at)

    async def abandon_write(self, intent: WriteIntent) -> None:
        self._call("abandon_write")
        entry = self._entry(intent.thread_id)
        if entry is not None:
            entry.intents.pop(intent.token, None)

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
        self._call("install")
        entry = self._entry(record.thread_id) or _HotEntry()
        if written and intent is not None and intent.token not in entry.intents:
            # As the script's drop: the leases go with the record (a reader's since the
            # eviction may hold what cold held before this write).
            entry.record = None
            entry.leases.clear()
            return False
        if not written and lease is not None and lease not in entry.leases:
            return False
        entry.intents = {
            token: deadline
            for token, deadline in entry.intents.items()
            if not (
                (intent is not None and token == intent.token)
                or (expired_before is not None and deadline < expired_before)
            )
        }
        if entry.record is not None and entry.record.version > record.version:
            self._entries[record.thread_id] = entry
            return False
        entry.record = WorkflowRecord.from_document(_copy(dataclasses.asdict(record)))
        entry.leases.clear()
        entry.expires_at = time.monotonic() + ttl_seconds
        self._entries[record.thread_id] = entry
        return True

    async def invalidate(self, thread_id: str) -> None:
        self._call("invalidate")
        entry = self._entry(thread_id)
        if entry is not None:
            entry.record = None
            entry.leases.clear()

    async def acquire_lock(self, name: str, *, ttl_ms: int) -> Lock | None:
        self._call("acquire_lock")
        token = secrets.token_hex(16)
        if not self._locks.take(name, token, ttl_ms):
            return None
        self._fences[name] = max(self._fences.get(name, 0) + 1, self._clock.micros())
        return Lock(name=name, token=token, fence=self._fences[name], ttl_ms=ttl_ms)

    async def release_lock(self, lock: Lock) -> bool:
        self._call("release_lock")
        return self._locks.release(lock.name, lock.token)

    async def renew_lock(self, lock: Lock) -> bool:
        self._call("renew_lock")
        return self._locks.renew(lock.name, lock.token, lock.ttl_ms)

    async def lock_ttl_ms(self, name: str) -> int | None:
        self._call("lock_ttl_ms")
        return self._locks.remaining_ms(name)


# --------------------------------------------------------------------------- hot: checkpoints


@dataclass
class _CacheEntry:
    checkpoint: StoredCheckpoint | None = None  # head and `cp`; None: no `id` yet
    blobs: dict[str, tuple[str | int | float, TypedBytes]] = field(default_factory=dict)
    writes: dict[tuple[str, int], StoredWrite] = field(default_factory=dict)
    # Writes for a newer checkpoint whose own put is still in flight: (id, task, idx).
    early: dict[tuple[str, str, int], StoredWrite] = field(default_factory=dict)
    lease: str | None = None
    # Dropped (a fork): the newest checkpoint id it was at or dropped at (Redis: `seen`).
    seen: str | None = None


@dataclass
class CacheCounts:
    hits: int = 0
    misses: int = 0
    errors: int = 0


class MemoryCheckpointCache:
    """`CheckpointCache` in a dict, with the Redis scripts' semantics (see
    state.hot.redis_checkpoints): the entry only moves forward, `advance` applies a put
    as a delta on the cached parent or drops the entry, early writes wait for their
    checkpoint, and a fill installs only under a lease no write revoked. Failures are
    counted and swallowed; an entry a failed call may have left wrong is dropped on the
    next contact."""

    name = MEMORY

    def __init__(self, outage: Outage | None = None) -> None:
        self.outage = outage or Outage()
        self.stats = CacheCounts()
        self._entries: dict[tuple[str, str], _CacheEntry] = {}
        # A write-through deletion's checkpoint id per thread (Redis: `DELETED_KIND`).
        self._deleted: dict[str, str] = {}
        # A whole thread's deletion under way: no fill no newer (Redis: `FILL_FENCE_KIND`).
        self._fill_fences: dict[str, str] = {}
        self._suspect: set[tuple[str, str]] = set()
        self.log: MemoryWriteBehindLog | None = None  # the log over it, which sets it

    def _reachable(self, key: tuple[str, str]) -> bool:
        """Whether the call may go on (the server answers); a suspect entry is dropped first."""
        if self.outage.down:
            self.stats.errors += 1
            self._suspect.add(key)
            return False
        if key in self._suspect:
            self._entries.pop(key, None)
            self._suspect.discard(key)
        return True

    def entry(self, thread_id: str, checkpoint_ns: str) -> _CacheEntry | None:
        """What is cached (tests look at it)."""
        return self._entries.get((thread_id, checkpoint_ns))

    async def lookup(
        self, thread_id: str, checkpoint_ns: str, *, lease: bool, with_history: bool = True
    ) -> CacheLookup:
        key = (thread_id, checkpoint_ns)
        if not self._reachable(key):
            return CacheLookup(None)
        entry = self._entries.get(key)
        if entry is not None and entry.checkpoint is not None:
            self.stats.hits += 1
            return CacheLookup(self._assemble(entry, entry.checkpoint))
        self.stats.misses += 1
        if not lease:
            return CacheLookup(None)
        entry = self._entries.setdefault(key, _CacheEntry())
        entry.lease = secrets.token_hex(12)
        return CacheLookup(None, entry.lease)

    @staticmethod
    def _assemble(entry: _CacheEntry, head: StoredCheckpoint) -> StoredCheckpoint:
        blobs = {
            channel: value
            for channel, (version, value) in entry.blobs.items()
            if head.channel_versions.get(channel) == version
        }
        writes = [entry.writes[key] for key in sorted(entry.writes)]
        return dataclasses.replace(head, blobs=blobs, writes=writes)

    async def fill(self, checkpoint: StoredCheckpoint, lease: str) -> None:
        key = (checkpoint.thread_id, checkpoint.checkpoint_ns)
        if not self._reachable(key):
            return
        entry = self._entries.get(key)
        if entry is None or entry.lease != lease:
            return
        fence = self._fill_fences.get(checkpoint.thread_id)
        if fence is not None and fence >= checkpoint.checkpoint_id:
            entry.lease = None
            return
        entry.lease = None
        entry.seen = None
        # Early writes of a checkpoint at or before the filled one are in what was filled.
        entry.early = {k: w for k, w in entry.early.items() if k[0] > checkpoint.checkpoint_id}
        entry.checkpoint = dataclasses.replace(checkpoint, blobs=None, writes=None)
        for channel, value in (checkpoint.blobs or {}).items():
            entry.blobs[channel] = (checkpoint.channel_versions[channel], value)
        for write in checkpoint.writes or []:
            entry.writes[(write.task_id, write.idx)] = write

    def _advance(
        self, checkpoint: StoredCheckpoint, blobs: Sequence[StoredBlob], *, marked: bool = False
    ) -> None:
        key = (checkpoint.thread_id, checkpoint.checkpoint_ns)
        entry = self._entries.get(key)
        current = entry.checkpoint.checkpoint_id if entry and entry.checkpoint else None
        newest = current or (entry.seen if entry else None)
        if newest is not None and newest >= checkpoint.checkpoint_id:
            return
        # `marked` (write-through): a first put no newer than a deletion's mark is held back.
        mark = self._deleted.get(checkpoint.thread_id) if marked else None
        held_back = checkpoint.parent_checkpoint_id is None and (
            mark is not None and mark >= checkpoint.checkpoint_id
        )
        if held_back or (current or "") != (checkpoint.parent_checkpoint_id or ""):
            self._entries[key] = _CacheEntry(seen=checkpoint.checkpoint_id)
            return
        entry = entry or self._entries.setdefault(key, _CacheEntry())
        entry.lease = None
        entry.seen = None
        cid = checkpoint.checkpoint_id
        entry.writes = {(t, i): w for (c, t, i), w in entry.early.items() if c == cid}
        entry.early = {k: w for k, w in entry.early.items() if k[0] > cid}
        entry.checkpoint = dataclasses.replace(checkpoint, blobs=None, writes=None)
        for blob in blobs:
            entry.blobs[blob.channel] = (blob.version, blob.value)

    async def advance(self, checkpoint: StoredCheckpoint, blobs: Sequence[StoredBlob]) -> None:
        if self._reachable((checkpoint.thread_id, checkpoint.checkpoint_ns)):
            self._advance(checkpoint, blobs, marked=True)

    def _add_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[StoredWrite],
        *,
        upsert: bool,
    ) -> None:
        entry = self._entries.get((thread_id, checkpoint_ns))
        current = entry.checkpoint.checkpoint_id if entry and entry.checkpoint else None
        if current is not None and current > checkpoint_id:
            return
        entry = entry or self._entries.setdefault((thread_id, checkpoint_ns), _CacheEntry())
        if current == checkpoint_id:
            target: dict[Any, StoredWrite] = entry.writes
            keys: list[tuple[Any, ...]] = [(w.task_id, w.idx) for w in writes]
        else:
            entry.lease = None
            target = entry.early
            keys = [(checkpoint_id, w.task_id, w.idx) for w in writes]
        for key, write in zip(keys, writes, strict=True):
            if upsert:
                target[key] = write
            else:
                target.setdefault(key, write)

    async def add_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[StoredWrite],
        *,
        upsert: bool,
    ) -> None:
        if writes and self._reachable((thread_id, checkpoint_ns)):
            self._add_writes(thread_id, checkpoint_ns, checkpoint_id, writes, upsert=upsert)

    async def logged(self, thread_id: str) -> bool:
        if self.outage.down:
            self.stats.errors += 1
            return False
        return self.log is not None and bool(self.log._logs.get(thread_id))

    async def history(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str, channels: Sequence[str]
    ) -> HistoryLookup:
        # Not tracked here: the saver asks the cold tier, as after a Redis miss.
        return HistoryLookup(None)

    async def fill_history(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        history: dict[str, ChannelHistory],
        lease: str,
    ) -> None:
        return None

    def distrust(self, thread_id: str, checkpoint_ns: str) -> None:
        self._suspect.add((thread_id, checkpoint_ns))

    async def ready(self) -> None:
        if self.outage.down:
            raise BackendUnavailable(self.name, "down")

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
        keys = [
            key
            for key in {*self._entries, *self._suspect}
            if key[0] == thread_id and checkpoint_ns in (None, key[1])
        ]
        if self.outage.down:
            self.stats.errors += 1
            self._suspect.update(keys)
            if strict:
                raise BackendUnavailable(self.name, "down")
            return
        for key in keys:
            self._entries.pop(key, None)
            self._suspect.discard(key)
        if deleted_at is not None and checkpoint_ns is None:
            self._entries[(thread_id, "")] = _CacheEntry(seen=deleted_at)
            self._deleted[thread_id] = deleted_at
            if fence_fills:
                self._fill_fences[thread_id] = deleted_at
            elif lift_fence is not None and self._fill_fences.get(thread_id) == lift_fence:
                del self._fill_fences[thread_id]


# --------------------------------------------------------------------------- hot: write-behind


# Flush-lock tokens of every fake log: each larger than the last, as Redis's clock gives.
_LOCK_TOKENS = itertools.count(1)


class MemoryWriteBehindLog(_Tier):
    """`WriteBehindLog` over a `MemoryCheckpointCache`: an append checks the thread's fence,
    moves the cached checkpoint and records the entry in one step, as the Redis script
    does; failures raise. `MemoryCheckpointFence` checks and raises the same fence."""

    # Its own name, as Redis's differs from the cold store's: the saver tells a log outage
    # (retried through a restart) from a cold one by it.
    name = "memory-log"

    def __init__(self, cache: MemoryCheckpointCache) -> None:
        super().__init__(cache.outage)
        self.cache = cache
        cache.log = self
        self.fences: dict[str, int] = {}
        self._logs: dict[str, list[LogEntry]] = {}
        self._sequence = 0
        self._dirty: dict[str, float] = {}  # thread -> marker, bumped by every append
        self._since: dict[str, float] = {}  # thread -> when it became dirty (seconds)
        self._locks = _Locks()
        self._expiring: dict[str, float] = {}  # thread -> until when appends are refused
        self._deleted: dict[str, int] = {}  # thread -> when a discard deleted it (Unix us)
        self._stuck: dict[str, StuckEntry] = {}

    def admit(self, thread_id: str, fence: int | None) -> None:
        if fence is None:
            return
        seen = self.fences.get(thread_id, 0)
        if fence < seen:
            raise StaleFencingToken(thread_id, fence, seen)
        self.fences[thread_id] = fence

    def _refuse_if_expiring(self, thread_id: str) -> None:
        if time.monotonic() < self._expiring.get(thread_id, 0.0):
            raise ThreadExpiring(thread_id)

    def _record(self, thread_id: str, op: FlushOp) -> None:
        self._sequence += 1
        self._logs.setdefault(thread_id, []).append(LogEntry(f"{self._sequence}-0", op))
        self.mark(thread_id)

    def mark(self, thread_id: str) -> None:
        self._dirty[thread_id] = self._dirty.get(thread_id, 0.0) + 1
        self._since.setdefault(thread_id, time.time())

    async def append_put(
        self,
        checkpoint: StoredCheckpoint,
        blobs: Sequence[StoredBlob],
        *,
        fence: int | None,
        fence_checked: bool = False,  # this fake never loses a fence
        parent_stored: bool = False,
    ) -> None:
        self._call("append_put")
        self._refuse_if_expiring(checkpoint.thread_id)
        self.admit(checkpoint.thread_id, fence)
        if not parent_stored:
            self._refuse_unknown_parent(checkpoint)
        self.cache._advance(checkpoint, blobs)
        bare = dataclasses.replace(checkpoint, blobs=None, writes=None)
        self._record(checkpoint.thread_id, CheckpointPut(bare, list(blobs)))

    def _refuse_unknown_parent(self, checkpoint: StoredCheckpoint) -> None:
        """`UnknownParent` as the Redis script answers it: a parent neither cached as the
        namespace's head nor logged; a fork only if older than the cached head (a newer
        one is a step Redis may have lost)."""
        parent = checkpoint.parent_checkpoint_id
        if not parent:
            return
        entry = self.cache.entry(checkpoint.thread_id, checkpoint.checkpoint_ns)
        head = entry.checkpoint.checkpoint_id if entry and entry.checkpoint else None
        if head == parent or any(
            isinstance(logged.op, CheckpointPut)
            and logged.op.checkpoint.checkpoint_ns == checkpoint.checkpoint_ns
            and logged.op.checkpoint.checkpoint_id == parent
            for logged in self._logs.get(checkpoint.thread_id, [])
        ):
            return
        # Byte-wise, as the script's `older`.
        older = head is not None and parent.encode() < head.encode()
        raise UnknownParent(checkpoint.thread_id, fork=older)

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
        self._call("append_writes")
        self._refuse_if_expiring(thread_id)
        self.admit(thread_id, fence)
        self.cache._add_writes(thread_id, checkpoint_ns, checkpoint_id, writes, upsert=upsert)
        self._record(
            thread_id, WritesPut(thread_id, checkpoint_ns, checkpoint_id, list(writes), upsert)
        )

    async def pending(self, thread_id: str) -> bool:
        self._call("pending")
        return bool(self._logs.get(thread_id))

    async def read(self, thread_id: str, *, count: int, after: str | None = None) -> list[LogEntry]:
        self._call("read")
        logged = self._logs.get(thread_id, [])
        if after is not None:
            ids = [entry.entry_id for entry in logged]
            logged = logged[ids.index(after) + 1 :] if after in ids else []
        return list(logged[:count])

    async def ack(self, thread_id: str, entry_ids: Sequence[str]) -> int:
        self._call("ack")
        done = set(entry_ids)
        left = [e for e in self._logs.get(thread_id, []) if e.entry_id not in done]
        if done:
            self._stuck.pop(thread_id, None)
        if left:
            self._logs[thread_id] = left
        else:
            self._logs.pop(thread_id, None)
        return len(left)

    async def discard(self, thread_id: str, *, refuse_appends_ms: int | None = None) -> None:
        self._call("discard")
        self._logs.pop(thread_id, None)
        self._unlist(thread_id)
        self._expiring.pop(thread_id, None)
        if refuse_appends_ms is not None:
            self._expiring[thread_id] = time.monotonic() + refuse_appends_ms / 1000
        # Remembered for good: this log, like the cache it moves, never expires anything.
        self._deleted[thread_id] = time.time_ns() // 1000

    async def deleted_since(self, thread_id: str, checkpoint_id: str) -> bool:
        self._call("deleted_since")
        made = checkpoint_time_us(checkpoint_id)
        return made is not None and made < self._deleted.get(thread_id, 0)

    async def refuse_appends(self, thread_id: str, *, for_ms: int) -> None:
        self._call("refuse_appends")
        self._expiring[thread_id] = time.monotonic() + for_ms / 1000

    async def accept_appends(self, thread_id: str) -> None:
        self._call("accept_appends")
        self._expiring.pop(thread_id, None)

    async def drop_lost(self, lost: LogEntryLost, *, lock_token: str) -> bool:
        self._call("drop_lost")
        self._logs.pop(lost.thread_id, None)
        self._unlist(lost.thread_id)
        return True

    def _unlist(self, thread_id: str) -> None:
        self._dirty.pop(thread_id, None)
        self._since.pop(thread_id, None)
        self._stuck.pop(thread_id, None)

    async def note_stuck(self, stuck: StuckEntry) -> bool:
        self._call("note_stuck")
        held = self._stuck.get(stuck.thread_id)
        if held is not None and held.entry_id == stuck.entry_id:
            return False
        self._stuck[stuck.thread_id] = dataclasses.replace(stuck, since=time.time())
        return True

    async def stuck(self) -> list[StuckEntry]:
        self._call("stuck")
        return sorted(self._stuck.values(), key=lambda stuck: stuck.since)

    async def newest(self, thread_id: str) -> str | None:
        self._call("newest")
        logged = self._logs.get(thread_id)
        return logged[-1].entry_id if logged else None

    async def drop_entries(
        self, thread_id: str, entry_ids: Sequence[str], *, newest: str | None, lock_token: str
    ) -> int | None:
        self._call("drop_entries")
        if await self.newest(thread_id) != newest:
            return None
        await self.cache.invalidate(thread_id)
        left = await self.ack(thread_id, entry_ids)
        if not left:
            self._unlist(thread_id)
        return left

    async def dirty_threads(
        self, *, limit: int, skip: int = 0, unflushed_for: float = 0.0
    ) -> list[tuple[str, float]]:
        self._call("dirty_threads")
        aged = [t for t, since in self._since.items() if time.time() - since >= unflushed_for]
        oldest = sorted(aged, key=lambda t: self._since[t])[skip : skip + max(limit, 1)]
        return [(thread, self._dirty.get(thread, 0.0)) for thread in oldest]

    async def settle(self, thread_id: str, marker: float) -> bool:
        self._call("settle")
        if self._dirty.get(thread_id) != marker:
            return False
        self._unlist(thread_id)
        return True

    async def mark_dirty(self, thread_id: str) -> None:
        self._call("mark_dirty")
        self.mark(thread_id)

    async def marker(self, thread_id: str) -> float | None:
        self._call("marker")
        return self._dirty.get(thread_id)

    async def fence_now(self) -> int:
        self._call("fence_now")
        return next(_LOCK_TOKENS)

    async def lock_thread(self, thread_id: str, *, ttl_ms: int) -> str | None:
        self._call("lock_thread")
        # A fencing token, as the Redis log's: larger than every earlier one.
        token = str(next(_LOCK_TOKENS))
        return token if self._locks.take(thread_id, token, ttl_ms) else None

    async def renew_thread_lock(self, thread_id: str, token: str, *, ttl_ms: int) -> bool:
        self._call("renew_thread_lock")
        return self._locks.renew(thread_id, token, ttl_ms)

    async def unlock_thread(self, thread_id: str, token: str) -> None:
        self._call("unlock_thread")
        self._locks.release(thread_id, token)

    async def backlog(self) -> Backlog:
        self._call("backlog")
        entries = sum(len(log) for log in self._logs.values())
        age = time.time() - min(self._since.values()) if self._since else None
        stuck = await self.stuck()
        return Backlog(
            entries=entries,
            threads=len(self._dirty),
            oldest_age_seconds=age,
            stuck_threads=len(stuck),
            oldest_stuck=stuck[0] if stuck else None,
        )


class MemoryCheckpointFence:
    """`CheckpointFence` on the write-behind log's per-thread fence (one fence per thread in
    both write modes, as on Redis)."""

    def __init__(self, log: MemoryWriteBehindLog) -> None:
        self._log = log

    async def admit(self, thread_id: str, fence: int, *, checked: bool = False) -> None:
        self._log._call("admit")
        self._log.admit(thread_id, fence)


# --------------------------------------------------------------------------- assembled tiers


class MemoryEventLog(_Tier):
    """`EventLog` in lists, with the stream semantics of state.hot.redis_events: ids
    `<ms>-<seq>` increasing per thread, the oldest dropped past `max_events`, a read that
    waits (woken by an append) when there is nothing after `after`."""

    def __init__(self, outage: Outage | None = None, *, max_events: int = 1000) -> None:
        super().__init__(outage)
        self._max_events = max_events
        self._logs: dict[str, list[StoredEvent]] = {}
        self._appended = asyncio.Condition()

    async def append(self, thread_id: str, data: JSON) -> str:
        self._call("append")
        log = self._logs.setdefault(thread_id, [])
        millis = int(time.time() * 1000)
        if log:
            last_ms, last_seq = (int(part) for part in log[-1].id.split("-"))
            event_id = f"{last_ms}-{last_seq + 1}" if millis <= last_ms else f"{millis}-0"
        else:
            event_id = f"{millis}-0"
        previous = log[-1].id if log else None
        log.append(StoredEvent(event_id, json.loads(json.dumps(data)), previous))
        del log[: -self._max_events]
        async with self._appended:
            self._appended.notify_all()
        return event_id

    def _after(self, thread_id: str, after: str | None, count: int) -> list[StoredEvent]:
        start = event_order(after or "0-0")
        return [e for e in self._logs.get(thread_id, []) if event_order(e.id) > start][:count]

    async def read(
        self, thread_id: str, *, after: str | None = None, wait_ms: int = 0, count: int = 100
    ) -> list[StoredEvent]:
        self._call("read")
        found = self._after(thread_id, after, count)
        if found or not wait_ms:
            return found
        async with self._appended:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._appended.wait_for(lambda: bool(self._after(thread_id, after, count))),
                    wait_ms / 1000,
                )
        return self._after(thread_id, after, count)

    def valid_id(self, event_id: str) -> bool:
        return bool(re.fullmatch(r"[0-9]{1,19}(-[0-9]{1,19})?", event_id))

    async def resume_point(self, thread_id: str, after: str) -> ResumePoint:
        self._call("read")
        log = self._logs.get(thread_id, [])
        point = event_order(after)
        if point == (0, 0):
            return ResumePoint.KEPT
        if not log:
            now = (int(time.time() * 1000), 0)
            return ResumePoint.KEPT if point <= now else ResumePoint.PAST_NEWEST
        if point > event_order(log[-1].id):
            return ResumePoint.PAST_NEWEST
        dropped = log[0].previous
        if dropped is not None and point < event_order(dropped):
            return ResumePoint.TRIMMED
        return ResumePoint.KEPT

    async def delete(self, thread_id: str) -> None:
        self._call("delete")
        self._logs.pop(thread_id, None)


@dataclass
class MemoryHotTier:
    """The fakes of one Redis: records, checkpoint cache, write-behind log, fence."""

    outage: Outage = field(default_factory=Outage)

    def __post_init__(self) -> None:
        self.store = MemoryHotStore(self.outage)
        self.cache = MemoryCheckpointCache(self.outage)
        self.log = MemoryWriteBehindLog(self.cache)
        self.fence = MemoryCheckpointFence(self.log)
        self.events = MemoryEventLog(self.outage)


@contextlib.asynccontextmanager
async def memory_backends(
    *, hot: bool = True, write_behind: bool = False, settings: Settings | None = None
) -> AsyncIterator[Backends]:
    """`Backends` as the factory builds them, every tier a fake (flusher running with
    write-behind), closed on exit."""
    settings = settings or memory_settings()
    cold = MemoryColdStore()
    checkpoints = MemoryCheckpointStore()
    tier = MemoryHotTier() if hot else None
    flusher = None
    if tier is not None and write_behind:
        flusher = Flusher(tier.log, checkpoints, lock_ttl_ms=settings.state_flush_lock_ttl_ms)
    retention: ColdRetention = MemoryRetention(
        cold, checkpoints, ttl_seconds=settings.state_cold_ttl_seconds
    )
    if tier is not None:
        retention = TieredRetention(
            retention,
            records=tier.store,
            checkpoints=tier.cache,
            flusher=flusher,
            events=tier.events,
        )
    backends = Backends(
        settings,
        cold,
        checkpoints,
        tier.store if tier else None,
        [],
        tier.cache if tier else None,
        retention=retention,
        flusher=flusher,
        checkpoint_fence=tier.fence if tier else None,
        events=tier.events if tier else None,
    )
    if flusher is not None:
        flusher.start()
        backends._closers.append(flusher.close)
    try:
        yield backends
    finally:
        await backends.close()


@contextlib.contextmanager
def unreachable(*outages: Outage) -> Iterator[None]:
    """The tiers behind `outages` are unreachable inside the block."""
    for each in outages:
        each.down = True
    try:
        yield
    finally:
        for each in outages:
            each.down = False
