"""Size bounding as a layer over any `RecordStore`: what it stores is bounded, what it
returns is plain.

The policy and its steps (prune, truncate, compress, archive, offload) are
`state.size.StateSizeManager`; this layer decides when they run:

- `create` shrinks every section (prune, truncate, compress, offload), which
  keeps the record and its creation audit entry within half an item;
- `update_section` shrinks the section it writes: offloaded when it alone passes
  a quarter of an item. The other sections are not read (a write stays one write
  to the store below), so if that store refuses the whole record as over the item
  limit (`StateTooLarge`, Cosmos), the section is offloaded and written again
  with the same expected version: the refusal wrote nothing. Refused still, the
  record's largest other inline sections are offloaded in that same write.
  Postgres has no item limit and keeps such a record inline;
- `get`, and the records `create` and `update_section` return, are expanded:
  compressed and offloaded sections come back as written (after any pruning or
  truncation the policy asked for). Archived sections stay references unless
  `get(..., fetch_archived=True)`: the caller said the workflow is done with them.
- Archiving is the caller's call: `create(completed_sections=...)` or
  `update_section(..., completed=True)` archives a section configured in
  `STATE_ARCHIVABLE_SECTIONS`.

Everything below this layer (the cache-aside composition, both tiers) holds the
stored form, so expansion happens only on the way out, and archive I/O runs
before or after a write below, never inside it. Audit entries (`audit_trail`)
hold stored forms too: a reference in `before`/`after` is fetched back with
`StateSizeManager.expand`. Offloaded and archived values are content-addressed
cold records that are never deleted here (an audit entry may still name them,
and a write that failed after offloading may leave one behind): the cold
tier's retention deletes them with their thread, or as orphans.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Collection, Sequence

from .errors import StateTooLarge, WorkflowNotFound
from .ports import JSON, AuditEntry, RecordStore, SectionWrite, WorkflowRecord, attributed
from .size import ARCHIVE_AGENT_ID, StateSizeManager, escaped, is_archived, is_offloaded


class SizedStateStore:
    """A `RecordStore` whose records stay within an item, over `inner` holding stored forms."""

    def __init__(self, inner: RecordStore, size: StateSizeManager) -> None:
        self._inner = inner
        self.size = size
        # Called with (operation, bytes) for every record or section stored (metrics).
        self.size_listeners: list[Callable[[str, int], None]] = []

    # Each call counts the cold round trips of its archive I/O under its own operation,
    # as the layers below count theirs.

    async def get(self, thread_id: str, *, fetch_archived: bool = False) -> WorkflowRecord | None:
        """The record with plain sections; archived ones stay references unless asked."""
        with attributed("state.get"):
            record = await self._inner.get(thread_id)
            return None if record is None else await self._expand(record, fetch_archived)

    async def get_fresh(
        self, thread_id: str, *, fetch_archived: bool = False
    ) -> WorkflowRecord | None:
        """As `get`, read from the cold tier whatever a hot tier holds (see
        `CacheAsideStore.get_fresh`); over a store without one, the same as `get`."""
        with attributed("state.get"):
            fresh = getattr(self._inner, "get_fresh", None)
            record = await (fresh(thread_id) if fresh is not None else self._inner.get(thread_id))
            return None if record is None else await self._expand(record, fetch_archived)

    async def create(
        self,
        thread_id: str,
        sections: dict[str, JSON],
        *,
        agent_id: str,
        completed_sections: Collection[str] = (),
    ) -> WorkflowRecord:
        """Store version 1; `completed_sections` that are archivable are archived."""
        with attributed("state.create"):
            stored, actions = await self.size.shrink(
                thread_id,
                {name: escaped(value) for name, value in sections.items()},
                completed=completed_sections,
            )
            self._stored_size("create", actions.after.total)
            record = await self._inner.create(thread_id, stored, agent_id=agent_id)
            return await self._expand(record)

    async def update_section(
        self,
        thread_id: str,
        section: str,
        value: JSON,
        *,
        agent_id: str,
        expected_version: int | None = None,
        fencing_token: int | None = None,
        completed: bool = False,
    ) -> WorkflowRecord:
        """Replace one section (at the current version unless `expected_version`);
        `completed` archives it if it is archivable."""
        with attributed("state.update_section"):
            version = expected_version
            if version is None:
                current = await self._inner.get(thread_id)
                if current is None:
                    raise WorkflowNotFound(thread_id)
                version = current.version

            async def write(stored: JSON) -> WorkflowRecord:
                return await self._inner.update_section(
                    thread_id,
                    section,
                    stored,
                    expected_version=version,
                    agent_id=agent_id,
                    fencing_token=fencing_token,
                )

            shrunk, actions = await self.size.shrink(
                thread_id, {section: escaped(value)}, completed=(section,) if completed else ()
            )
            self._stored_size("update_section", actions.after.sections[section])
            stored = shrunk[section]
            # Each refusal wrote nothing, so the same version still holds for the next try.
            try:
                record = await write(stored)
            except StateTooLarge:
                if not (is_offloaded(stored) or is_archived(stored)):
                    stored = await self.size.offload(thread_id, section, stored)
                    with contextlib.suppress(StateTooLarge):
                        return await self._expand(await write(stored))
                # The other sections are what does not fit: some of them move out too.
                record = await self._write_making_room(
                    thread_id,
                    [SectionWrite(section, stored, agent_id)],
                    expected_version=version,
                    fencing_token=fencing_token,
                )
            return await self._expand(record)

    async def update_sections(
        self,
        thread_id: str,
        writes: Sequence[SectionWrite],
        *,
        expected_version: int,
        fencing_token: int | None = None,
        offloaded: bool = False,
        make_room: bool = False,
    ) -> WorkflowRecord:
        """Several distinct sections in one write below, each shrunk alone as
        `update_section` does. If the store below refuses the record as too large
        (`StateTooLarge`), nothing was written: the error goes to the caller, which may
        write the sections `offloaded` (each moved to the archive, by reference), and
        `make_room` (then) so that the record's largest other inline sections move out too
        if that is still refused. Every value is plain, as for `update_section`: one shaped
        like a reference is not taken for one (a caller's value may have any shape)."""
        with attributed("state.update_sections"):
            stored: list[SectionWrite] = []
            for write in writes:
                value = escaped(write.value)
                if offloaded:
                    value = await self.size.offload(thread_id, write.section, value)
                shrunk, actions = await self.size.shrink(thread_id, {write.section: value})
                self._stored_size("update_section", actions.after.sections[write.section])
                stored.append(dataclasses.replace(write, value=shrunk[write.section]))
            try:
                record = await self._inner.update_sections(
                    thread_id,
                    stored,
                    expected_version=expected_version,
                    fencing_token=fencing_token,
                )
            except StateTooLarge:
                if not make_room:
                    raise
                record = await self._write_making_room(
                    thread_id,
                    stored,
                    expected_version=expected_version,
                    fencing_token=fencing_token,
                )
            return await self._expand(record)

    async def _write_making_room(
        self,
        thread_id: str,
        writes: Sequence[SectionWrite],
        *,
        expected_version: int,
        fencing_token: int | None,
    ) -> WorkflowRecord:
        """`writes` (stored forms) in one write below with the record's largest other inline
        sections offloaded, as read at `expected_version` (read at another, the write is
        refused as a conflict: nothing moved is lost, an offloaded value is only a copy)."""
        fresh = getattr(self._inner, "get_fresh", None)
        current = await (fresh(thread_id) if fresh is not None else self._inner.get(thread_id))
        if current is None:
            raise WorkflowNotFound(thread_id)
        written = {write.section: write.value for write in writes}
        moved = await self.size.make_room(thread_id, {**current.sections, **written}, keep=written)
        return await self._inner.update_sections(
            thread_id,
            [
                *writes,
                *(SectionWrite(name, value, ARCHIVE_AGENT_ID) for name, value in moved.items()),
            ],
            expected_version=expected_version,
            fencing_token=fencing_token,
        )

    async def audit_trail(self, thread_id: str, *, limit: int = 50) -> list[AuditEntry]:
        """Newest first; `before` and `after` are the stored (shrunk) forms."""
        return await self._inner.audit_trail(thread_id, limit=limit)

    def _stored_size(self, operation: str, size: int) -> None:
        for listener in self.size_listeners:
            listener(operation, size)

    async def _expand(self, record: WorkflowRecord, fetch_archived: bool = False) -> WorkflowRecord:
        sections = await self.size.expand(record.sections, fetch_archived=fetch_archived)
        return dataclasses.replace(record, sections=sections)
