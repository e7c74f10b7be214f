"""Workflow records and their audit ledger in the Cosmos DB container (`ColdStateStore`).

Everything of a thread lives in its logical partition (`/thread_id`), next to the
checkpoint documents (ids "cp:", "write:" and their chunks; "blob:" and "ptr:"
from the previous layout: `cosmos_layout`); this adapter owns the ids "wf"
(the record) and "audit:<version>:<write id>" (the ledger).

A change is one transactional batch (all of it or nothing, in the thread's
partition): create the audit entry for version n+1 under a fresh write id,
pointing at the record's current `last_write_id` (`prev_write_id`), and
replace the record with If-Match on the ETag read, setting version n+1 and
`last_write_id` = this write id. A change of k sections (`update_sections`)
creates k entries (versions n+1..n+k, each pointing at the one before) and sets
version n+k and the last entry's write id. A conflicting writer's batch fails
whole, so it leaves no entry behind. A change too large for one batch (over 100
operations, or a request body over 2 MB: each up to an item, the record holds a
section's value and its entry holds it before and after) first creates the entries
that do not fit, in requests of their own, then sends the rest with the record's
write: no chain reaches an entry until the record names it, so if that write fails
they are orphans, never shown.

The record's `last_write_id` and each entry's `prev_write_id` form a chain;
`audit_trail` walks it from the record, so an entry no chain reaches (written
by an earlier layout of this adapter, which created entries before the record
changed) is never shown.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import aclosing
from datetime import UTC, datetime
from typing import Any

from azure.core.exceptions import AzureError

from ..errors import (
    CorruptState,
    InvalidValue,
    StaleFencingToken,
    StateError,
    StateTooLarge,
    VersionConflict,
    WorkflowExists,
    WorkflowNotFound,
)
from ..ports import (
    CREATED_SECTION,
    JSON,
    AuditEntry,
    SectionWrite,
    TierHealth,
    WorkflowRecord,
    acting_caller,
    check_distinct,
    timed_probe,
)
from ..schema import CURRENT, check_readable, upcast
from .cosmos_client import CosmosConnection
from .cosmos_io import (
    BATCH_OPERATIONS,
    BULK_PAGE_SIZE,
    BatchOperation,
    BatchRefused,
    PartitionIO,
    batch_refusal,
)

logger = logging.getLogger(__name__)

WORKFLOW_ID = "wf"
AUDIT_ID_PREFIX = "audit:"
WORKFLOW_TYPE = "workflow"
AUDIT_TYPE = "audit"
# The record of each of this many threads, as this process last read or wrote it
# (records whose document passes `KNOWN_RECORD_BYTES` as stored, in the UTF-8 JSON
# `_check_size` measures, are not kept): an update expecting that version
# sends its batch without reading first. The batch's If-Match guards it: a record
# changed elsewhere meanwhile refuses it, and the update reads and tries once more.
KNOWN_RECORDS = 1_000
KNOWN_RECORD_BYTES = 256 * 1024
# Audit queries fetch this many entries beyond the limit per page, so an orphan or
# two in the range rarely costs a second round trip.
AUDIT_PAGE_SLACK = 4
# A transactional batch's request body may not pass 2 MB (the service's limit; the
# emulator does not enforce it). Documents are measured as the SDK sends them, plus
# room for each operation's envelope (its type, id and If-Match).
BATCH_BODY_BYTES = 2 * 1024 * 1024 - 1024
OPERATION_ENVELOPE_BYTES = 256

# Queries name the partition key in the filter too: the local emulator ignores the
# partition key option and refuses (or fans out) queries without it.
_AUDIT_NEWEST_FIRST = (
    "SELECT * FROM c WHERE c.thread_id = @thread_id AND c.type = @type"
    " AND c.version <= @version ORDER BY c.version DESC"
)


def audit_id(version: int, write_id: str) -> str:
    # Zero-padded so ids sort like versions.
    return f"{AUDIT_ID_PREFIX}{version:012d}:{write_id}"


def _now() -> str:
    return datetime.now(UTC).isoformat()


class CosmosStateStore:
    """`ColdStateStore` on one Cosmos container shared through a `CosmosConnection`."""

    name = "cosmos"

    def __init__(self, connection: CosmosConnection, *, max_item_bytes: int) -> None:
        self._connection = connection
        self._io = PartitionIO(connection)
        self._max_item_bytes = max_item_bytes
        self._known: OrderedDict[str, dict[str, Any]] = OrderedDict()

    async def setup(self) -> None:
        # Creates database and container when the settings allow it (locally).
        await self._connection.container()

    # ----------------------------------------------------------------- records

    async def create(
        self, thread_id: str, sections: dict[str, JSON], *, agent_id: str
    ) -> WorkflowRecord:
        now = _now()
        write_id = uuid.uuid4().hex
        record = {
            "id": WORKFLOW_ID,
            "thread_id": thread_id,
            "type": WORKFLOW_TYPE,
            "schema_version": CURRENT["workflow"],
            "version": 1,
            "sections": sections,
            "created_at": now,
            "updated_at": now,
            "fence": 0,
            "last_write_id": write_id,
        }
        entry = self._audit_document(
            thread_id,
            version=1,
            write_id=write_id,
            prev_write_id=None,
            agent_id=agent_id,
            section=CREATED_SECTION,
            before=None,
            after=sections,
            at=now,
        )
        sizes = self._check_size(thread_id, entry, record)
        try:
            created = await self._commit(thread_id, [entry], ("create", (record,)), sizes)
        except BatchRefused as refused:
            existing = await self._read_record(thread_id)
            if existing is not None and existing.get("last_write_id") == write_id:
                # The SDK re-sent a batch of ours that had landed.
                return WorkflowRecord.from_document(existing)
            if existing is not None and await self._written_over(thread_id, record, existing):
                return WorkflowRecord.from_document(record)
            if existing is None:
                raise batch_refusal(refused) from refused
            raise WorkflowExists(thread_id) from refused
        return WorkflowRecord.from_document(self._remember(thread_id, created, sizes[-1]))

    async def get(self, thread_id: str) -> WorkflowRecord | None:
        document = await self._read_record(thread_id)
        return None if document is None else WorkflowRecord.from_document(document)

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
        return await self.update_sections(
            thread_id,
            [SectionWrite(section, value, agent_id)],
            expected_version=expected_version,
            fencing_token=fencing_token,
        )

    async def update_sections(
        self,
        thread_id: str,
        writes: Sequence[SectionWrite],
        *,
        expected_version: int,
        fencing_token: int | None = None,
    ) -> WorkflowRecord:
        """One transactional batch: an audit entry per section and the replace of the
        record (If-Match on the ETag read), after one read unless this process knows the
        record at `expected_version` (`KNOWN_RECORDS`).

        The entries chain in order (each names the one before as `prev_write_id`), and
        the record names the last.
        """
        check_distinct(self.name, writes)
        known = self._known_at(thread_id, expected_version)
        try:
            return await self._update(
                thread_id,
                writes,
                known or await self._read_record(thread_id),
                expected_version=expected_version,
                fencing_token=fencing_token,
            )
        except (VersionConflict, StaleFencingToken, StateTooLarge, CorruptState):
            # Refused on what this process knew, unread: a version moved past elsewhere
            # (shrunk, fenced, repaired) is a conflict, as the other backends report it.
            if known is None:
                raise
        # What this process knew was stale (a change elsewhere): read, and once more.
        return await self._update(
            thread_id,
            writes,
            await self._read_record(thread_id),
            expected_version=expected_version,
            fencing_token=fencing_token,
        )

    async def _update(
        self,
        thread_id: str,
        writes: Sequence[SectionWrite],
        current: dict[str, Any] | None,
        *,
        expected_version: int,
        fencing_token: int | None,
    ) -> WorkflowRecord:
        if current is None:
            raise WorkflowNotFound(thread_id)
        if current["version"] != expected_version:
            raise VersionConflict(thread_id, expected_version, current["version"])
        fence = int(current.get("fence", 0))
        if fencing_token is not None:
            if fencing_token < fence:
                raise StaleFencingToken(thread_id, fencing_token, fence)
            fence = fencing_token

        if not isinstance(current["sections"], dict):
            # Stored by hand as something else: only `replace_damaged` writes over it.
            raise CorruptState(f"workflow record {thread_id!r} is damaged: sections not an object")
        now = _now()
        sections = dict(current["sections"])
        entries = []
        prev_write_id = current.get("last_write_id")
        for offset, write in enumerate(writes, start=1):
            write_id = uuid.uuid4().hex
            entry = self._audit_document(
                thread_id,
                version=expected_version + offset,
                write_id=write_id,
                prev_write_id=prev_write_id,
                agent_id=write.agent_id,
                section=write.section,
                before=sections.get(write.section),
                after=write.value,
                at=now,
            )
            if "ttl" in current:
                # A thread held by an earlier version, every item carrying `ttl: -1`
                # (`cosmos_retention`): its ledger must not expire while the record it
                # explains is kept (the replacement keeps the record's `ttl`).
                entry["ttl"] = current["ttl"]
            entries.append(entry)
            sections[write.section] = write.value
            prev_write_id = write_id
        replacement = {
            **_without_system_properties(current),
            "schema_version": CURRENT["workflow"],
            "version": expected_version + len(writes),
            "sections": sections,
            "updated_at": now,
            "fence": fence,
            "last_write_id": prev_write_id,
        }
        sizes = self._check_size(thread_id, *entries, replacement)
        replace = ("replace", (WORKFLOW_ID, replacement), {"if_match_etag": current["_etag"]})
        return await self._replace(thread_id, entries, replace, sizes, expected_version)

    async def _replace(
        self,
        thread_id: str,
        entries: list[dict[str, Any]],
        replace: BatchOperation,
        sizes: list[int],
        expected_version: int,
    ) -> WorkflowRecord:
        """Commit a replace of the record read at `expected_version` (If-Match on its ETag)
        with its new audit `entries`, the last of which the replacement names."""
        last_write_id = entries[-1]["write_id"]
        try:
            replaced = await self._commit(thread_id, entries, replace, sizes)
        except BatchRefused as refused:
            self._known.pop(thread_id, None)
            if refused.status == 404:
                raise WorkflowNotFound(thread_id) from refused
            now_stored = await self._io.read(WORKFLOW_ID, thread_id)
            if now_stored is not None and now_stored.get("last_write_id") == last_write_id:
                # The SDK re-sent a batch of ours that had landed (connection lost after
                # the write); its ETag no longer matched our own change.
                return WorkflowRecord.from_document(self._remember(thread_id, now_stored))
            written = replace[1][1]
            if now_stored is not None and await self._written_over(thread_id, written, now_stored):
                return WorkflowRecord.from_document(written)
            if refused.status not in (409, 412):
                raise batch_refusal(refused) from refused
            actual = None if now_stored is None else int(now_stored["version"])
            raise VersionConflict(thread_id, expected_version, actual) from refused
        return WorkflowRecord.from_document(self._remember(thread_id, replaced, sizes[-1]))

    async def _written_over(
        self, thread_id: str, written: dict[str, Any], stored: dict[str, Any]
    ) -> bool:
        """Whether `written` (the record of a batch the SDK re-sent, which the service then
        refused) landed and another write followed before the resend: the entry after it
        names its write as the one before, which only a writer that read it can (write ids
        are fresh). Asked only of a record `stored` past its version; one at it or before
        was another writer's."""
        if int(stored["version"]) <= int(written["version"]):
            return False
        following = await self._io.query_all(
            "SELECT VALUE c.id FROM c WHERE c.thread_id = @thread_id AND c.type = @type"
            " AND c.version = @version AND c.prev_write_id = @write_id",
            {
                "@thread_id": thread_id,
                "@type": AUDIT_TYPE,
                "@version": int(written["version"]) + 1,
                "@write_id": written["last_write_id"],
            },
            partition=thread_id,
        )
        return bool(following)

    async def stored_version(self, thread_id: str) -> int | None:
        # The document as stored: `_read_record` would upcast sections it cannot read.
        document = await self._io.read(WORKFLOW_ID, thread_id)
        if document is None:
            return None
        check_readable("workflow", int(document.get("schema_version", 1)))
        return int(document["version"])

    async def replace_damaged(
        self, thread_id: str, sections: dict[str, JSON], *, expected_version: int, agent_id: str
    ) -> WorkflowRecord:
        # Read as stored, its sections untouched (they may be of any shape), and replaced
        # at its ETag, as `_update` replaces a readable one.
        current = await self._io.read(WORKFLOW_ID, thread_id)
        if current is None:
            self._known.pop(thread_id, None)
            raise WorkflowNotFound(thread_id)
        check_readable("workflow", int(current.get("schema_version", 1)))
        if current["version"] != expected_version:
            raise VersionConflict(thread_id, expected_version, current["version"])
        now = _now()
        write_id = uuid.uuid4().hex
        entry = self._audit_document(
            thread_id,
            version=expected_version + 1,
            write_id=write_id,
            prev_write_id=current.get("last_write_id"),
            agent_id=agent_id,
            section=CREATED_SECTION,
            before=current.get("sections"),
            after=sections,
            at=now,
        )
        if "ttl" in current:
            entry["ttl"] = current["ttl"]  # as `_update` keeps a held thread's ledger
        replacement = {
            **_without_system_properties(current),
            "schema_version": CURRENT["workflow"],
            "version": expected_version + 1,
            "sections": sections,
            "updated_at": now,
            "last_write_id": write_id,
        }
        sizes = self._check_size(thread_id, entry, replacement)
        replace = ("replace", (WORKFLOW_ID, replacement), {"if_match_etag": current["_etag"]})
        return await self._replace(thread_id, [entry], replace, sizes, expected_version)

    # ----------------------------------------------------------------- audit

    async def audit_trail(self, thread_id: str, *, limit: int = 50) -> list[AuditEntry]:
        if limit <= 0:
            return []
        head = await self._read_record(thread_id)
        if head is None:
            return []
        expected_version = int(head["version"])
        expected_write: str | None = head.get("last_write_id")
        trail: list[AuditEntry] = []
        pages = self._io.pages(
            _AUDIT_NEWEST_FIRST,
            {"@thread_id": thread_id, "@type": AUDIT_TYPE, "@version": expected_version},
            partition=thread_id,
            page_size=limit + AUDIT_PAGE_SLACK,
        )
        async with aclosing(pages):
            async for page in pages:
                for document in page:
                    version = int(document["version"])
                    if version < expected_version:
                        # The chain has a gap (expired by TTL, or deleted): nothing
                        # older can be proven part of this record's history.
                        logger.warning(
                            "audit chain of %r ends at version %d", thread_id, expected_version
                        )
                        return trail
                    if document.get("write_id") != expected_write:
                        continue  # an orphan: a losing or crashed writer of this version
                    trail.append(AuditEntry.from_document(upcast("audit", dict(document))))
                    expected_write = document.get("prev_write_id")
                    expected_version -= 1
                    if len(trail) == limit or expected_write is None:
                        return trail
        return trail

    # ----------------------------------------------------------------- lifecycle

    async def delete(self, thread_id: str) -> None:
        """Remove the record, then its audit entries (the thread's checkpoints stay)."""
        # Record first: a crash part-way leaves only entries no chain reaches.
        self._known.pop(thread_id, None)
        await self._io.delete(WORKFLOW_ID, thread_id)
        await self._io.delete_matching(thread_id, "c.type = @type", {"@type": AUDIT_TYPE})

    async def record_ids(self) -> list[str]:
        found: list[str] = []
        async for page in self._io.pages(
            "SELECT VALUE c.thread_id FROM c WHERE c.id = @id",
            {"@id": WORKFLOW_ID},
            partition=None,
            page_size=BULK_PAGE_SIZE,
        ):
            found += (str(thread_id) for thread_id in page)
        return found

    async def health(self) -> TierHealth:
        return await timed_probe(self.name, self._probe, errors=(StateError, AzureError))

    async def _probe(self) -> None:
        """The container read, with the endpoint checked to accept connections meanwhile:
        a stopped server is reported as refusing them, not as silent (`accepting`)."""
        read = asyncio.ensure_future(self._read_container())
        try:
            await self._connection.accepting()
        except BaseException:
            read.cancel()
            # Retrieved, so asyncio logs no unretrieved exception of a read that failed too.
            read.add_done_callback(lambda done: done.cancelled() or done.exception())
            raise
        await read

    async def _read_container(self) -> None:
        container = await self._connection.container()
        async with self._connection.bounded():
            await container.read(response_hook=self._connection.response_hook)

    async def close(self) -> None:
        """Nothing to release: the shared connection is closed by whoever opened it."""

    # ----------------------------------------------------------------- steps

    async def _read_record(self, thread_id: str) -> dict[str, Any] | None:
        """The stored record upcast to the current schema, with its `_etag`; None if absent."""
        document = await self._io.read(WORKFLOW_ID, thread_id)
        if document is None:
            self._known.pop(thread_id, None)
            return None
        return self._remember(thread_id, document)

    def _remember(
        self, thread_id: str, document: dict[str, Any], size: int | None = None
    ) -> dict[str, Any]:
        """`document` upcast, with its `_etag`, kept as what this process knows of the record.
        `size`: the document's bytes as this process sent it (`_check_size`), if it did."""
        record = {**upcast("workflow", dict(document)), "_etag": document["_etag"]}
        self._known.pop(thread_id, None)
        if size is None:
            size = len(_encode(_without_system_properties(document), allow_nan=True).encode())
        if size <= KNOWN_RECORD_BYTES:
            self._known[thread_id] = record
            while len(self._known) > KNOWN_RECORDS:
                self._known.popitem(last=False)
        return record

    def _known_at(self, thread_id: str, version: int) -> dict[str, Any] | None:
        known = self._known.get(thread_id)
        return known if known is not None and known["version"] == version else None

    def _audit_document(
        self,
        thread_id: str,
        *,
        version: int,
        write_id: str,
        prev_write_id: str | None,
        agent_id: str,
        section: str,
        before: JSON,
        after: JSON,
        at: str,
    ) -> dict[str, Any]:
        return {
            "id": audit_id(version, write_id),
            "thread_id": thread_id,
            "type": AUDIT_TYPE,
            "schema_version": CURRENT["audit"],
            "version": version,
            "write_id": write_id,
            "prev_write_id": prev_write_id,
            "agent_id": agent_id,
            "section": section,
            "before": before,
            "after": after,
            "at": at,
            "caller": caller.to_json() if (caller := acting_caller()) else None,
        }

    async def _commit(
        self,
        thread_id: str,
        entries: list[dict[str, Any]],
        record: BatchOperation,
        sizes: list[int],
    ) -> dict[str, Any]:
        """Create `entries` and apply `record` (the record's create or replace) in one
        transactional batch, or where that would pass the service's limits, the entries
        that do not fit first (see the module docstring). `sizes`: of the entries, then
        the record. Returns the record as stored; raises `BatchRefused` as `batch` does."""
        room = BATCH_BODY_BYTES - sizes[-1] - OPERATION_ENVELOPE_BYTES
        cut = len(entries)
        while cut > 0 and len(entries) - cut + 1 < BATCH_OPERATIONS:
            needed = sizes[cut - 1] + OPERATION_ENVELOPE_BYTES
            if needed > room:
                break
            room -= needed
            cut -= 1
        # Fresh ids: an upsert re-sent by the SDK writes the same entry again.
        await self._io.upsert_all(entries[:cut])
        *_, stored = await self._io.batch(
            thread_id, [*(("create", (entry,)) for entry in entries[cut:]), record]
        )
        return stored

    def _check_size(self, thread_id: str, *documents: dict[str, Any]) -> list[int]:
        """Refuse before writing anything: Cosmos rejects items over 2 MB, the emulator does not;
        and numbers JSON cannot carry, which the emulator answers with a 500 (an outage).
        Returns each document's size as sent."""
        limit = self._max_item_bytes
        sizes = []
        for document in documents:
            try:
                text = _encode(document, allow_nan=False)
            except ValueError as exc:  # NaN, Infinity (or a value that contains itself)
                raise InvalidValue("cosmos", f"not valid JSON: {exc}", code=400) from exc
            size = len(text.encode())
            if size > limit:
                raise StateTooLarge(f"{document['type']} document of {thread_id!r}", size, limit)
            sizes.append(size)
        return sizes


def _encode(document: dict[str, Any], *, allow_nan: bool) -> str:
    """A document as the SDK sends it (compact, UTF-8 text)."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False, allow_nan=allow_nan)


def _without_system_properties(document: dict[str, Any]) -> dict[str, Any]:
    """Drop `_etag`, `_rid`, `_ts`...: Cosmos sets them, a replacement body must not."""
    return {key: value for key, value in document.items() if not key.startswith("_")}
