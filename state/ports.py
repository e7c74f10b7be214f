"""The ports of the state library: what the tiers promise, not how they do it.

Adapters (`state.hot.*`, `state.cold.*`) implement these; the composition
(`state.tiered`), the LangGraph saver (`state.checkpoint`) and the app depend
only on these protocols. Every document a cold store writes carries
`schema_version`; every JSON value here is plain JSON (dict/list/str/number/
bool/None).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, Protocol, runtime_checkable

from .errors import CorruptState, LogEntryLost, RequestRejected

JSON = Any  # a JSON-compatible value

# (serde type tag, payload bytes) as produced by LangGraph's `serde.dumps_typed`.
TypedBytes = tuple[str, bytes]


# --------------------------------------------------------------------------- workflow records


@dataclass(frozen=True)
class WorkflowRecord:
    """The durable per-thread workflow document: named sections plus a version."""

    thread_id: str
    version: int
    sections: dict[str, JSON]
    schema_version: int
    created_at: str  # ISO 8601 UTC
    updated_at: str
    # Highest fencing token a writer presented so far (0: none).
    fence: int = 0

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> WorkflowRecord:
        """From a stored document already upcast to the current schema (any cold backend).
        `CorruptState` for one that is not a record's shape (a field missing or of the wrong
        type, as written by hand), so callers that skip or report a damaged record see it."""
        try:
            sections = document["sections"]
            if not isinstance(sections, dict):
                raise TypeError(f"sections is {type(sections).__name__}, not an object")
            return cls(
                thread_id=document["thread_id"],
                version=int(document["version"]),
                sections=sections,
                schema_version=int(document["schema_version"]),
                created_at=document["created_at"],
                updated_at=document["updated_at"],
                fence=int(document.get("fence", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            name = document.get("thread_id", "?") if isinstance(document, dict) else "?"
            raise CorruptState(f"workflow record {name!r} is damaged: {exc!r}") from exc


# `AuditEntry.section` of the entry a create writes: version 1, before None,
# after = all sections. Every later entry names the one section it changed.
CREATED_SECTION = "*"


@dataclass(frozen=True)
class Caller:
    """Who a write is made on behalf of (an authenticated HTTP caller), next to the agent."""

    id: str  # the caller's stable id (Entra object id)
    name: str  # a display name, for people reading the trail

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name}

    @classmethod
    def from_json(cls, value: Any) -> Caller | None:
        if isinstance(value, dict) and value.get("id"):
            return cls(id=str(value["id"]), name=str(value.get("name") or ""))
        return None


# Set around the work done for a caller; cold stores record it on every audit entry they
# write meanwhile. A context variable, not a parameter: a run started for a caller goes
# on in its own task (which copies the context) through agents that know nothing of HTTP.
_acting_for: ContextVar[Caller | None] = ContextVar("acting_for", default=None)


def checkpoint_time_us(checkpoint_id: str) -> int | None:
    """When a checkpoint was made (Unix microseconds), from its LangGraph uuid6 id; None for
    an id that is no uuid6."""
    try:
        made = uuid.UUID(checkpoint_id)
    except ValueError:
        return None
    if made.version != 6:
        return None
    # uuid6: the 60-bit time (100 ns since 1582-10-15) split around the version nibble.
    ticks = (made.int >> 80) << 12 | (made.int >> 64) & 0x0FFF
    return (ticks - _UUID_EPOCH_TICKS) // 10


# The Unix epoch in uuid time (100 ns ticks since the Gregorian calendar's start).
_UUID_EPOCH_TICKS = 0x01B21DD213814000


def acting_caller() -> Caller | None:
    """The caller on whose behalf the current task writes (None: the system itself)."""
    return _acting_for.get()


@contextmanager
def acting_for(caller: Caller | None) -> Iterator[None]:
    token = _acting_for.set(caller)
    try:
        yield
    finally:
        _acting_for.reset(token)


@dataclass(frozen=True)
class AuditEntry:
    """One append-only record of a change: who, what, before, after, which version."""

    thread_id: str
    version: int  # the record version this change produced
    agent_id: str
    section: str
    before: JSON
    after: JSON
    at: str  # ISO 8601 UTC
    schema_version: int
    # The HTTP caller the write was made for; None for the system's own writes (the timer).
    caller: Caller | None = None

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> AuditEntry:
        """From a stored document already upcast to the current schema (any cold backend)."""
        return cls(
            thread_id=document["thread_id"],
            version=int(document["version"]),
            agent_id=document["agent_id"],
            section=document["section"],
            before=document.get("before"),
            after=document.get("after"),
            at=document["at"],
            schema_version=int(document["schema_version"]),
            caller=Caller.from_json(document.get("caller")),
        )


@dataclass(frozen=True)
class SectionWrite:
    """One section of a multi-section write (`update_sections`) and who wrote it."""

    section: str
    value: JSON
    agent_id: str


def check_distinct(backend: str, writes: Sequence[SectionWrite]) -> None:
    """A multi-section write names each section once: each entry's `before` is the
    value stored before the write."""
    names = [write.section for write in writes]
    if not names or len(set(names)) != len(names):
        raise RequestRejected(backend, f"update_sections needs distinct sections, got {names}")


@dataclass(frozen=True)
class Lock:
    """A held lock: the token proves ownership, the fence orders holders over time."""

    name: str
    token: str
    fence: int
    ttl_ms: int


@dataclass(frozen=True)
class TierHealth:
    name: str
    up: bool
    detail: str = ""
    latency_ms: float | None = None


# A tier that has not answered its health probe by then is reported down. Probes and
# load balancers time out within a few seconds; a partitioned server (no reset, no reply)
# would otherwise hold the answer for the client's socket timeouts and retries.
HEALTH_PROBE_SECONDS = 1.5


async def timed_probe(
    name: str, check: Callable[[], Awaitable[object]], *, errors: tuple[type[Exception], ...]
) -> TierHealth:
    """A tier's health from one round trip `check`: up with its latency, or down with
    the error it raised, if one of `errors` (how that tier reports being unreachable),
    or with no answer within `HEALTH_PROBE_SECONDS`."""
    started = time.perf_counter()
    probe = asyncio.ensure_future(check())
    try:
        await asyncio.wait({probe}, timeout=HEALTH_PROBE_SECONDS)
    finally:
        if not probe.done():
            # Cancelled, not awaited: a client may take its own timeouts to wind the call
            # down (psycopg asks the partitioned server to cancel the query, ~10 s).
            probe.cancel()
            probe.add_done_callback(_discard_outcome)
    if not probe.done():
        return TierHealth(name, up=False, detail=f"no answer within {HEALTH_PROBE_SECONDS} s")
    try:
        probe.result()
    except errors as exc:
        return TierHealth(name, up=False, detail=f"{type(exc).__name__}: {exc}")
    return TierHealth(name, up=True, latency_ms=(time.perf_counter() - started) * 1000)


def _discard_outcome(probe: asyncio.Future[object]) -> None:
    """Retrieve an abandoned probe's outcome (so asyncio logs no unretrieved exception)."""
    if not probe.cancelled():
        probe.exception()


@runtime_checkable
class RecordStore(Protocol):
    """Versioned, audited workflow records: what every layer of the record stack offers.

    A cold store is one; the cache-aside composition (`state.tiered`) is one over a
    cold store, and the size layer (`state.sized`) is one over either.
    """

    async def create(
        self, thread_id: str, sections: dict[str, JSON], *, agent_id: str
    ) -> WorkflowRecord:
        """Store version 1 and its audit entry (section `CREATED_SECTION`).

        Raises `WorkflowExists` if the thread already has a record.
        """

    async def get(self, thread_id: str) -> WorkflowRecord | None: ...

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
        """Replace one section if the record is still at `expected_version`.

        Raises `VersionConflict` (stale version), `WorkflowNotFound`,
        `StaleFencingToken` (a token lower than one already presented), or
        `StateTooLarge` (the record would pass the store's item limit). On
        success the record is at `expected_version + 1` and an `AuditEntry`
        for that version exists.
        """

    async def update_sections(
        self,
        thread_id: str,
        writes: Sequence[SectionWrite],
        *,
        expected_version: int,
        fencing_token: int | None = None,
    ) -> WorkflowRecord:
        """Replace several distinct sections in one write, or none of them.

        As `update_section`, with one version and one `AuditEntry` per section, in
        order: on success the record is at `expected_version + len(writes)`.
        """

    async def audit_trail(self, thread_id: str, *, limit: int = 50) -> list[AuditEntry]:
        """Newest first."""


@runtime_checkable
class ColdStateStore(RecordStore, Protocol):
    """Source of truth for workflow records and their audit trail (Cosmos, Postgres)."""

    name: str

    async def setup(self) -> None:
        """Create what is missing (container / migrations) where the settings allow it."""

    async def delete(self, thread_id: str) -> None: ...

    async def record_ids(self) -> list[str]:
        """Every thread holding a workflow record (archive records included): a query across
        every thread, for operator commands (a repair), never for a request's path."""

    async def stored_version(self, thread_id: str) -> int | None:
        """The version of the thread's record as stored, its sections not read (a record
        `get` refuses as `CorruptState` has one too); None if there is none. For an
        operator's repair (`replace_damaged`). Raises `UnsupportedSchemaVersion` for a
        record written by newer code: what it holds is not this code's to overwrite."""

    async def replace_damaged(
        self, thread_id: str, sections: dict[str, JSON], *, expected_version: int, agent_id: str
    ) -> WorkflowRecord:
        """Replace the whole record's sections, whatever is stored there (an object or not),
        if it is still at `expected_version` (`stored_version`), for an operator's repair of
        a record `get` cannot read: a change meanwhile (another repair) is kept.

        Raises `VersionConflict`, `WorkflowNotFound`, `UnsupportedSchemaVersion` (written by
        newer code meanwhile) or `StateTooLarge`, having written nothing. On success the
        record is at `expected_version + 1`, its fence kept, and an `AuditEntry` for that
        version (section `CREATED_SECTION`) holds the stored sections before and after.
        """

    async def health(self) -> TierHealth: ...

    async def close(self) -> None: ...


@runtime_checkable
class ColdRetention(Protocol):
    """How long a thread's cold state outlives its activity (STATE_COLD_TTL_SECONDS).

    Retention is per thread: a thread expires whole, that long after its last
    activity, so nothing its latest checkpoint or record references (a channel
    value written at step 1, an offloaded or archived section stored as
    `<thread>~archive~...` records) expires before it does. Neither backend
    lets items expire by their own age: on both `sweep` (the timer) deletes
    expired threads. Last activity: Cosmos, the newest write of any item of
    the thread; Postgres, its newest record update or checkpoint. -1 keeps
    everything forever. A held thread never expires, archive records included.
    `hold` and `release` are idempotent, so a retry after an error or a crash
    part-way is always safe.
    """

    name: str

    async def hold(self, thread_id: str) -> None:
        """Exempt the thread (and its archive records) from expiry until `release`."""

    async def release(self, thread_id: str) -> None:
        """Back to the default retention, counted from now (a no-op if not held)."""

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
        """Delete up to `limit` expired, unheld threads; return how many were deleted.

        `now` (seconds since the epoch) sets the clock expiry is judged by; None:
        the backend's own (Cosmos: this process's, against items' `_ts`; Postgres:
        the database's). `expiring` is awaited with each thread id found expired
        (archive records' too), while nothing else can write it (Postgres: its record
        locked); it may return a flush fencing token, which the thread's flush fence is
        raised to. The thread is then looked at again, and spared if it was written
        meanwhile; `deleting` is awaited with each thread still expired, just before its
        cold state is deleted, and spares it by returning False (`state.retention`: the
        hot tier holds steps of it the cold tier has not seen). `spared` is awaited with
        each thread found expired that the sweep then keeps (written meanwhile, or
        `deleting` said no), once that is decided (`state.retention` lets its runs write
        on then, not once the sweep ends). If any of them raises, that
        thread is not deleted and the sweep stops with the error (`state.retention`
        drops the thread's hot state there, so a failure to reach Redis leaves it for
        the next sweep).
        `spare`: threads not deleted by this sweep, expired or not (the timer's cases due to
        be resumed); the next sweep not sparing one looks at it again.
        `deadline` (a `time.monotonic()` time): no batch (Postgres) or thread (Cosmos) is
        started after it; the next sweep takes the rest.
        """


@dataclass(frozen=True)
class WriteIntent:
    """A writer's mark on a thread's hot entry while its cold write is in flight."""

    thread_id: str
    token: str
    # The hot tier's clock (microseconds) when the intent was registered.
    registered_at: int


@dataclass(frozen=True)
class HotRead:
    """One read of a thread's hot entry."""

    # The cached record if it may be served: None on a miss, or while a write is pending.
    record: WorkflowRecord | None
    # The hot tier's clock (microseconds) at a read that missed; see `HotStateStore.install`.
    # May be 0 for an entry the read found current: only a miss's install needs the clock
    # (a copy found current but undecodable held no intent for it to clear).
    observed_at: int
    # A write intent hides the entry (its writer may have committed a newer version).
    pending: bool = False
    # On a miss: the fill lease the read took, which `install` presents (see there).
    lease: str | None = None


@runtime_checkable
class HotStateStore(Protocol):
    """The Redis tier: a cache of workflow records plus coordination primitives.

    All keys of one thread share the hash tag `{thread_id}`; keys are namespaced
    by the cold store they cache, so stores sharing one Redis never see each
    other's entries.
    """

    name: str

    async def read(self, thread_id: str) -> HotRead:
        """The servable record (if any) and the hot tier's clock, in one round trip."""

    async def get(self, thread_id: str) -> WorkflowRecord | None:
        """`read(thread_id).record`."""

    async def begin_write(
        self,
        thread_id: str,
        *,
        bound_ms: int,
        ttl_seconds: int,
        token: str | None = None,
        clear: bool = False,
    ) -> WriteIntent:
        """Mark the entry (creating it if absent) before a cold write: hidden until the
        intent is removed, or its deadline (`bound_ms` from now) passes and a reader
        installs what it read from cold after that. A caller that chooses `token` can
        still remove the intent when this call failed without saying whether it landed.
        `clear`: first drop the cached record as `invalidate` does, in the same step."""

    async def abandon_write(self, intent: WriteIntent) -> None:
        """Remove `intent` after a cold write that certainly did not happen."""

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
        """Cache `record` unless the cache already holds a newer version (atomic).

        In the same step, remove `intent` and every intent whose deadline is before
        `expired_before` (a hot-tier clock reading taken before the cold read that
        produced `record`); others stay and keep the entry hidden.
        The `intent` of the write that produced `record` (`written`), and a reader's
        `lease` (taken by the `read` that missed), must still be in the entry: an entry
        that lost them (evicted, or the lease revoked by an install or invalidation
        since) may have held a newer version than `record` meanwhile, so nothing is
        installed, and a writer's install drops the record.
        Returns whether the record was installed.
        """

    async def invalidate(self, thread_id: str) -> None:
        """Drop the cached record; write intents stay."""

    async def acquire_lock(self, name: str, *, ttl_ms: int) -> Lock | None:
        """Take the lock if free; the returned fence is higher than any issued before."""

    async def release_lock(self, lock: Lock) -> bool:
        """Release only if `lock.token` still owns it (compare-and-delete)."""

    async def renew_lock(self, lock: Lock) -> bool:
        """Extend the lock to `lock.ttl_ms` from now, only if `lock.token` still owns it
        (compare-and-expire); False means another holder has it, or nobody does."""

    async def lock_ttl_ms(self, name: str) -> int | None:
        """How long whoever holds the lock keeps it, in milliseconds; None if nobody does."""

    async def health(self) -> TierHealth: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class StoredEvent:
    """One entry of a thread's event log: its id orders it within the thread."""

    id: str
    data: JSON
    # The id of the entry appended just before it (None for a log's first, or one written
    # before entries recorded it): a reader after an id below it missed that entry, which
    # the log dropped. Read with the entry, so it cannot race the trimming.
    previous: str | None = None


def event_order(event_id: str) -> tuple[int, int]:
    """A stream id as what orders it (`<ms>` alone is `<ms>-0`)."""
    millis, _, seq = event_id.partition("-")
    return int(millis), int(seq or 0)


class ResumePoint(Enum):
    """Where an id stands in a thread's event log, for a reader resuming after it."""

    # Every event after it is in the log (none yet, maybe).
    KEPT = "kept"
    # Past the log's newest id (none kept: past the server's clock, as a log expired or
    # deleted starts again there): not an id it gave out. Ids to come are below it until
    # the clock passes it, so a read after it misses every event until then; another
    # thread's newer id is one.
    PAST_NEWEST = "past_newest"
    # Below the newest event the log dropped (the `previous` of its oldest kept; below the
    # oldest kept, once the log dropped some, when that names none): events after it are
    # gone, and a read after it starts at the oldest kept as if none were.
    TRIMMED = "trimmed"


@runtime_checkable
class EventLog(Protocol):
    """A bounded, per-thread, append-only log of events that any process can read from
    any point (what a client resuming a stream after `id` needs). Oldest entries go first
    once a thread has `max_events`; a thread's log expires `ttl_seconds` after its last
    append."""

    async def append(self, thread_id: str, data: JSON) -> str:
        """Add an event; returns its id (greater than every earlier id of the thread)."""

    async def read(
        self, thread_id: str, *, after: str | None = None, wait_ms: int = 0, count: int = 100
    ) -> list[StoredEvent]:
        """Events after `after` (None: from the oldest kept), oldest first, at most `count`;
        with `wait_ms`, waits up to that long for one when there is none yet."""

    def valid_id(self, event_id: str) -> bool:
        """Whether `event_id` has the form of this log's ids (a client's Last-Event-ID)."""

    async def resume_point(self, thread_id: str, after: str) -> ResumePoint:
        """What a reader resuming after `after` (a valid id) would miss, if anything: see
        `ResumePoint`. `0` asks for the oldest kept: KEPT."""

    async def delete(self, thread_id: str) -> None: ...


@runtime_checkable
class SectionArchive(Protocol):
    """Cold storage for sections a workflow has finished with, fetched back by reference.

    Content-addressed: archiving the same value twice yields the same reference
    and stores it once, so a retried archive never duplicates.
    """

    async def archive(self, thread_id: str, section: str, value: JSON) -> str:
        """Store `value` durably and return the reference that fetches it back."""

    async def fetch_archived(self, ref: str) -> JSON:
        """The value stored under `ref`; raises `WorkflowNotFound` if it is gone."""


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class StoredCheckpoint:
    """One LangGraph checkpoint as a cold store keeps it.

    `checkpoint` is the serialized checkpoint *without* channel values (those
    live as blobs, one per channel version, written only when they change).
    """

    thread_id: str
    checkpoint_ns: str
    checkpoint_id: str
    parent_checkpoint_id: str | None
    checkpoint: TypedBytes
    metadata: dict[str, JSON]
    channel_versions: dict[str, str | int | float]
    # Read side only. A store (or cache) that loaded the checkpoint's blobs (channel ->
    # value at `channel_versions`) and its pending writes in the same round trips attaches
    # them here; None means "not loaded: ask `get_blobs` / `get_writes`".
    blobs: dict[str, TypedBytes] | None = None
    writes: list[StoredWrite] | None = None
    # The delta history of channels LangGraph rebuilds at this checkpoint, when the store
    # read it in the same round trips (None: not read; ask `delta_history`).
    history: dict[str, ChannelHistory] | None = None


@dataclass(frozen=True)
class StoredBlob:
    channel: str
    version: str | int | float
    value: TypedBytes  # ("empty", b"") marks a channel with no value at that version


@dataclass(frozen=True)
class StoredWrite:
    task_id: str
    task_path: str
    idx: int
    channel: str
    value: TypedBytes


@dataclass(frozen=True)
class ChannelHistory:
    """What one channel contributed along the parent chain of a checkpoint (the store
    side of LangGraph's `DeltaChannelHistory`).

    `writes` are the channel's writes stored at the ancestors from the nearest one
    holding a value (`seed_at`, included) up to the parent (the target's own writes
    are pending, not history), each with the id of the checkpoint it belongs to, in
    any order: the saver sorts them by checkpoint id, then `writes_sort_key`.
    `seed` is the value stored at `seed_at`; None when the walk reached the root.
    """

    writes: list[tuple[str, StoredWrite]]
    seed: TypedBytes | None = None
    seed_at: str | None = None


PruneStrategy = Literal["keep_latest", "delete"]


@dataclass(frozen=True)
class CheckpointPut:
    """A `put_checkpoint` waiting in the write-behind backlog."""

    checkpoint: StoredCheckpoint
    blobs: Sequence[StoredBlob]

    @property
    def thread_id(self) -> str:
        return self.checkpoint.thread_id


@dataclass(frozen=True)
class WritesPut:
    """A `put_writes` waiting in the write-behind backlog."""

    thread_id: str
    checkpoint_ns: str
    checkpoint_id: str
    writes: Sequence[StoredWrite]
    upsert: bool


FlushOp = CheckpointPut | WritesPut


@runtime_checkable
class CheckpointStore(Protocol):
    """Durable checkpoint storage behind the LangGraph saver (one partition per thread).

    Semantics shared by every backend (the contract tests check them):
    - `put_checkpoint` stores the new blobs, then the checkpoint; a crash in
      between leaves unreferenced blobs, never a checkpoint missing blobs.
    - checkpoint ids are time-ordered strings (LangGraph uuid6); "latest" and
      `before` compare them as strings, newest first.
    - `put_writes` keyed by (checkpoint, task_id, idx): with `upsert` a repeat
      replaces, without it a repeat is ignored (LangGraph's special channels
      such as errors/interrupts replace, ordinary writes do not).
    """

    name: str

    async def setup(self) -> None: ...

    async def put_checkpoint(
        self,
        checkpoint: StoredCheckpoint,
        blobs: Sequence[StoredBlob],
        *,
        parent_vouched: bool = False,
    ) -> None:
        """Raises `ParentGone` (nothing written) if the checkpoint has a parent the store
        no longer holds, unless `parent_vouched`: the caller knows the parent is on its way
        (a write-behind log holds it)."""

    async def put_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[StoredWrite],
        *,
        upsert: bool,
    ) -> None: ...

    def check_checkpoint(self, checkpoint: StoredCheckpoint, blobs: Sequence[StoredBlob]) -> None:
        """`StateTooLarge` or `InvalidValue` if the store could never hold the checkpoint
        (`put_checkpoint` and `apply_batch` would refuse it whatever its parent), without
        I/O: a write-behind put asks before the log acknowledges it."""

    async def apply_batch(self, ops: Sequence[FlushOp], *, fence: int | None = None) -> None:
        """Apply write-behind work with the same effect as the calls in order.

        Idempotent: applying a batch twice, or a prefix of it and then all of it,
        leaves the same state as applying it once. Ops of one thread keep their
        order; a store may batch them into fewer round trips.

        `fence` (the flush lock's token; the ops are then of one thread): the store
        keeps the highest fence each thread was written or deleted under and refuses,
        with `StaleFencingToken` and nothing applied, a batch under a lower one: a
        flusher paused past its lock cannot land a batch after the next holder (or a
        `delete_thread` under the lock) has moved on (on Cosmos, but for the writes it
        stores outside a transactional batch: `cosmos_fences`).
        """

    async def get_checkpoint(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str | None,
        *,
        with_history: bool = True,
        spared: bool = True,
    ) -> StoredCheckpoint | None:
        """By id, or the latest of (thread, namespace) when `checkpoint_id` is None.

        A store that reads a DeltaChannel history alongside its checkpoint
        (`StoredCheckpoint.history`) skips that when `with_history` is False: the
        caller has it at hand already. `spared` False: None for a checkpoint of a deleted
        run that `delete_for_runs` kept for a later checkpoint's DeltaChannel history
        (never a namespace's latest).
        """

    async def get_blobs(
        self, thread_id: str, checkpoint_ns: str, versions: dict[str, str | int | float]
    ) -> dict[str, TypedBytes]:
        """The blob of each (channel, version) asked for; channels without one are left out."""

    async def get_writes(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str
    ) -> list[StoredWrite]:
        """Pending writes of a checkpoint, ordered by (task_id, idx)."""

    def list_checkpoints(
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
        """Newest first, paged from the store (never the whole partition in memory);
        `checkpoint_id`: that checkpoint only (in each namespace the filters leave);
        `spared`: with the checkpoints of deleted runs that `delete_for_runs` kept for a
        later checkpoint's DeltaChannel history."""

    async def delta_history(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str, channels: Sequence[str]
    ) -> dict[str, ChannelHistory]:
        """Per channel, its writes and seed along the parent chain of `checkpoint_id` (see
        `ChannelHistory`), in a bounded number of round trips whatever the chain's depth;
        an unknown checkpoint has an empty history."""

    async def delete_thread(self, thread_id: str, *, fence: int | None = None) -> None:
        """Delete the thread's checkpoints; with `fence` (the flush lock's token), keep
        it as the thread's fence, so a batch of an earlier lock holder is refused."""

    async def fence_thread(self, thread_id: str, fence: int) -> None:
        """Raise the thread's flush fence to `fence` (one already past it stays), changing
        nothing else: a batch of an earlier lock holder is refused from then on (before a
        change to the backlog that such a batch must not undo: a discard)."""

    async def delete_for_runs(self, run_ids: Sequence[str]) -> set[str]:
        """Delete checkpoints (and their writes) whose metadata run_id is in `run_ids`;
        returns the threads that lost any (what a cache in front must drop). Not atomic
        across threads: failing after it may have deleted from some, it raises
        `RunsPartlyDeleted` naming them (a call again would not); failing before, the
        `BackendUnavailable` it met."""

    async def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None: ...

    async def prune(self, thread_ids: Sequence[str], *, strategy: PruneStrategy) -> None:
        """keep_latest: keep only the newest checkpoint of each namespace; delete: all."""

    async def close(self) -> None: ...


@dataclass(frozen=True)
class CacheLookup:
    """What the hot checkpoint cache holds for one (thread, namespace)."""

    # The latest checkpoint with its blobs and writes attached, on a hit.
    checkpoint: StoredCheckpoint | None
    # On a miss, when asked for: a fill lease to hand back to `fill` with what the cold
    # tier returned. A write that lands meanwhile revokes it, so a fill never installs
    # state older than that write.
    lease: str | None = None
    # On a hit, the delta history of the cached checkpoint for the channels the cache
    # tracks (None: it tracks none), read in the same round trip.
    history: dict[str, ChannelHistory] | None = None
    # On a miss with a lease asked for: whether the thread's write-behind log holds
    # entries, read in the lease's round trip (None: not known, ask the log).
    backlog: bool | None = None
    # A blocking lookup or lease Redis did not answer (the failure counted, as `lookup`
    # counts its own): the caller reads the cold tier without a lease rather than asking
    # `lookup` to wait out the same Redis again.
    unreachable: bool = False


@dataclass(frozen=True)
class HistoryLookup:
    """What the cache holds of a checkpoint's delta history: `history` when it tracks it;
    else, when that checkpoint is the cached latest, a `lease` to track what the caller
    reads from the cold tier (`fill_history`), revoked by any write to an ancestor that
    lands meanwhile, so a fill never installs a history that misses it."""

    history: dict[str, ChannelHistory] | None
    lease: str | None = None


@runtime_checkable
class CheckpointCache(Protocol):
    """Hot copy of the latest checkpoint per (thread, namespace); never the source of truth.

    Every method is best effort: a cache failure is counted and swallowed (the
    saver then serves from the cold tier), never raised to the caller; but for a strict
    `invalidate` and `ready`, which maintenance calls (a deletion the cache must follow).
    """

    name: str

    async def ready(self) -> None:
        """Raise `BackendUnavailable` unless the cache answers now."""

    async def lookup(
        self, thread_id: str, checkpoint_ns: str, *, lease: bool, with_history: bool = True
    ) -> CacheLookup:
        """The cached latest checkpoint (with its delta history unless `with_history` is
        False: the caller has it), or on a miss a lease to fill it when `lease`."""

    async def fill(self, checkpoint: StoredCheckpoint, lease: str) -> None:
        """Install a complete checkpoint read from the cold tier, with its delta history
        when it carries one (in the same step: a write that lands later joins it), if
        `lease` still holds."""

    async def advance(self, checkpoint: StoredCheckpoint, blobs: Sequence[StoredBlob]) -> None:
        """After a cold put: move the cached latest to `checkpoint` if it is newer.

        `blobs` are the channels that changed; the rest come from the cached
        parent. A cache that cannot apply the change drops the entry instead.
        """

    async def add_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[StoredWrite],
        *,
        upsert: bool,
    ) -> None:
        """After a cold put_writes: keep the cached checkpoint's pending writes exact."""

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
        """Drop one namespace of a thread, or all of them (None). `strict`: a failure
        raises `BackendUnavailable` (the entries may still be served) instead.
        `deleted_at` (all namespaces only): a checkpoint id made as checkpoints were
        deleted, which the root entry keeps as dropped at (`seen`) in the same step, so a
        root put no newer, stored before the deletion took it, is not cached after it (nor
        a subgraph's first put, whose entry `advance` drops instead). With it, `fence_fills`
        (a drop before a cold delete of the whole thread): no reader's fill of a checkpoint
        no newer than `deleted_at` is cached until `lift_fence`, that `deleted_at`, is given
        to the drop after the delete (which drops every fill lease taken before it)."""

    async def logged(self, thread_id: str) -> bool:
        """Whether the thread's write-behind log holds entries (False if that cannot be
        read): a cached checkpoint the cold tier lacks is on its way only then."""

    def distrust(self, thread_id: str, checkpoint_ns: str) -> None:
        """The cold tier moved past this entry while Redis was failing: never serve it; it
        is dropped on the next contact with it (no round trip now)."""

    async def history(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str, channels: Sequence[str]
    ) -> HistoryLookup:
        """The delta history of the cached latest checkpoint, if it is `checkpoint_id` and
        the cache tracks every channel asked for; else none (ask the cold tier), with a
        lease to fill it if the cache could track it."""

    async def fill_history(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        history: dict[str, ChannelHistory],
        lease: str,
    ) -> None:
        """Track `history` (read from the cold tier) if `checkpoint_id` is still the cached
        latest, untracked, and `lease` still holds; later puts of its descendants keep it
        current."""


# The state operation a cold-tier round trip serves ("state.update_section", ...), for
# adapters that cannot name it themselves (the Cosmos request hook sees every call).
cold_operation: ContextVar[str | None] = ContextVar("cold_operation", default=None)


@contextmanager
def attributed(operation: str) -> Iterator[None]:
    """Cold round trips made inside count under `operation` (see `cold_operation`)."""
    token = cold_operation.set(operation)
    try:
        yield
    finally:
        cold_operation.reset(token)


@dataclass
class Counters:
    """Round trips an adapter made, for the benchmark, tests of O(1) claims and metrics."""

    requests: int = 0
    request_charge: float = 0.0
    by_operation: dict[str, int] = field(default_factory=dict)
    charge_by_operation: dict[str, float] = field(default_factory=dict)

    def count(self, operation: str, charge: float = 0.0) -> None:
        self.requests += 1
        self.request_charge += charge
        self.by_operation[operation] = self.by_operation.get(operation, 0) + 1
        self.charge_by_operation[operation] = self.charge_by_operation.get(operation, 0.0) + charge

    def snapshot(self) -> dict[str, tuple[int, float]]:
        """(requests, charge) per operation; safe to call from another thread (metrics)."""
        counts, charges = dict(self.by_operation), dict(self.charge_by_operation)
        return {name: (count, charges.get(name, 0.0)) for name, count in counts.items()}

    def reset(self) -> None:
        self.requests = 0
        self.request_charge = 0.0
        self.by_operation.clear()
        self.charge_by_operation.clear()


@dataclass(frozen=True)
class LogEntry:
    """One unflushed write-behind operation and its position in the thread's log."""

    entry_id: str
    op: FlushOp


@dataclass(frozen=True)
class StuckEntry:
    """A write-behind entry the cold store refused for good: its thread's later entries
    wait behind it until it is stored (its cause fixed) or an operator discards it."""

    thread_id: str
    entry_id: str
    checkpoint_ns: str
    checkpoint_id: str
    kind: Literal["put", "writes"]
    reason: str  # the refusal, as the cold store said it
    since: float  # when a flusher first found it stuck (epoch seconds, the log's clock)


@dataclass(frozen=True)
class Backlog:
    """Write-behind work not yet in the cold tier."""

    entries: int
    threads: int
    oldest_age_seconds: float | None  # None: nothing is waiting
    # Threads held back by an entry the cold store refused for good, and the oldest such.
    stuck_threads: int = 0
    oldest_stuck: StuckEntry | None = None


class BlockingAppends(Protocol):
    """`WriteBehindLog`'s appends for a caller with no event loop (the saver's sync API):
    the same single round trip, made on the caller's own thread, so an acknowledged write
    never waits for the loop thread that runs everything else."""

    def append_put_blocking(
        self,
        checkpoint: StoredCheckpoint,
        blobs: Sequence[StoredBlob],
        *,
        fence: int | None,
        fence_checked: bool = False,
        parent_stored: bool = False,
    ) -> None: ...

    def append_writes_blocking(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[StoredWrite],
        *,
        upsert: bool,
        fence: int | None,
        fence_checked: bool = False,
    ) -> None: ...


class BlockingCheckpointStore(Protocol):
    """`CheckpointStore`'s reads of one checkpoint and its write-through writes for a caller
    with no event loop (the saver's sync API with no hot tier), on the caller's own
    thread: a call need not wait for the loop thread that runs everything else."""

    def get_checkpoint_blocking(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str | None,
        *,
        with_history: bool,
        spared: bool = True,
    ) -> StoredCheckpoint | None: ...

    def put_checkpoint_blocking(
        self, checkpoint: StoredCheckpoint, blobs: Sequence[StoredBlob]
    ) -> None:
        """As `put_checkpoint` (never vouched: no hot tier can hold the parent)."""

    def put_writes_blocking(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[StoredWrite],
        *,
        upsert: bool,
    ) -> None: ...


class BlockingCache(Protocol):
    """`CheckpointCache` for a caller with no event loop (the saver's sync API): a lookup,
    and in write-through mode the cache's side of a write, made on the caller's own
    thread. A lookup or lease is None wherever the async method has more to do (the
    caller then asks it on the loop thread); a write does all that its async twin does."""

    def lookup_blocking(
        self, thread_id: str, checkpoint_ns: str, *, with_history: bool
    ) -> CacheLookup | None:
        """A hit, a miss without its lease (`lease_blocking` takes it), or `unreachable`."""

    def lease_blocking(self, thread_id: str, checkpoint_ns: str) -> CacheLookup | None:
        """A miss's lease and backlog, as `lookup(lease=True)` reports them, or
        `unreachable`."""

    def advance_blocking(
        self, checkpoint: StoredCheckpoint, blobs: Sequence[StoredBlob]
    ) -> None: ...

    def add_writes_blocking(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[StoredWrite],
        *,
        upsert: bool,
    ) -> None: ...


@runtime_checkable
class WriteBehindLog(Protocol):
    """The hot tier's record of checkpoint work the cold tier has not received yet.

    An append is one round trip that updates the hot copy of the latest checkpoint
    (as `CheckpointCache.advance` / `add_writes` do) and records the work for the
    flusher in the same atomic step. Unlike the cache, failures raise
    (`BackendUnavailable`): an append that failed is not acknowledged. Entries never
    expire and are never evicted under a volatile-* eviction policy.
    """

    name: str

    async def append_put(
        self,
        checkpoint: StoredCheckpoint,
        blobs: Sequence[StoredBlob],
        *,
        fence: int | None,
        fence_checked: bool = False,
        parent_stored: bool = False,
    ) -> None:
        """Raises `StaleFencingToken` if a writer with a higher fence wrote this thread,
        `FenceUnknown` (writing nothing) if the hot tier holds no fence for the thread
        unless the caller checked `fence` against the durable one (`fence_checked`), and
        `UnknownParent` (writing nothing) if the hot tier has no trace of the checkpoint's
        parent, unless the caller says the parent is stored (`parent_stored`), and
        `LogEntryTooLarge` (writing nothing) if the put is more than one entry holds."""

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
        """Fenced as `append_put` is; `LogEntryTooLarge` (writing nothing) if the writes are
        more than one entry holds."""

    async def pending(self, thread_id: str) -> bool:
        """Whether the thread has unflushed entries."""

    async def read(self, thread_id: str, *, count: int, after: str | None = None) -> list[LogEntry]:
        """The oldest `count` unflushed entries of the thread (`after`: of those past that
        entry id), in order, up to the first one that lost a value or cannot be read:
        `LogEntryLost` or `LogEntryDamaged` if that is the oldest."""

    async def ack(self, thread_id: str, entry_ids: Sequence[str]) -> int:
        """Forget entries the cold tier now holds; returns how many are left."""

    async def discard(self, thread_id: str, *, refuse_appends_ms: int | None = None) -> None:
        """Drop every unflushed entry of the thread and its cached checkpoints, in one step
        (it is being deleted). With `refuse_appends_ms`, appends to the thread are refused
        (`ThreadExpiring`) from that same step on, until `accept_appends` or that long."""

    async def deleted_since(self, thread_id: str, checkpoint_id: str) -> bool:
        """Whether a `discard` of the thread came after checkpoint `checkpoint_id` was made
        (by its uuid6 time): the thread was deleted under it, rather than the hot tier losing
        it. Remembered for a while (the hot TTL), and lost with the rest of the thread's hot
        state: False then, as for an id that is no uuid6."""

    async def refuse_appends(self, thread_id: str, *, for_ms: int) -> None:
        """Refuse appends to the thread (`ThreadExpiring`), as `discard` does, but keep its
        entries: until `accept_appends` or `for_ms`."""

    async def accept_appends(self, thread_id: str) -> None:
        """End the refusal a `discard` or `refuse_appends` began."""

    async def drop_lost(self, lost: LogEntryLost, *, lock_token: str) -> bool:
        """Drop every unflushed entry of the thread and its cached checkpoints, in one step,
        if the entry `read` found short of a value (`lost`) still is, and the flush lock is
        still `lock_token`'s (else `LockLost`); False, dropping nothing, if it is not."""

    async def dirty_threads(
        self, *, limit: int, skip: int = 0, unflushed_for: float = 0.0
    ) -> list[tuple[str, float]]:
        """Threads with unflushed entries, oldest first (past the `skip` oldest), with a
        marker for `settle`; only those whose oldest unflushed entry is at least
        `unflushed_for` seconds old (by the log's clock)."""

    async def settle(self, thread_id: str, marker: float) -> bool:
        """Unlist the thread unless it was appended to since `marker` was read; True if
        unlisted."""

    async def mark_dirty(self, thread_id: str) -> None:
        """List the thread again (entries were found after a settle)."""

    async def marker(self, thread_id: str) -> float | None:
        """The thread's current marker (None: not listed)."""

    async def fence_now(self) -> int:
        """A fencing token above every flush lock token granted so far (the lock may have
        lapsed, or been evicted, while its holder thought it held it)."""

    async def lock_thread(self, thread_id: str, *, ttl_ms: int) -> str | None:
        """The right to flush the thread (None: another flusher holds it). The token is a
        decimal fencing token, larger than every earlier holder's: the cold store refuses a
        batch under an older one (`CheckpointStore.apply_batch`)."""

    async def renew_thread_lock(self, thread_id: str, token: str, *, ttl_ms: int) -> bool:
        """Extend the flush lock while `token` still holds it; False if it was lost."""

    async def unlock_thread(self, thread_id: str, token: str) -> None: ...

    async def backlog(self) -> Backlog: ...

    async def note_stuck(self, stuck: StuckEntry) -> bool:
        """Record the thread's stuck entry (no TTL) until an `ack` or a discard of the
        thread's entries clears it; False if that entry was recorded already."""

    async def stuck(self) -> list[StuckEntry]:
        """Every recorded stuck entry, oldest first."""

    async def newest(self, thread_id: str) -> str | None:
        """The id of the thread's newest unflushed entry, if any (for `drop_entries`)."""

    async def drop_entries(
        self, thread_id: str, entry_ids: Sequence[str], *, newest: str | None, lock_token: str
    ) -> int | None:
        """Remove the entries from the thread's log without the cold tier having them (an
        operator discards them), and the thread's cached checkpoints with them, in one step,
        so no put builds on a dropped one; returns how many are left. None, nothing removed,
        unless `newest` (as `newest` answered before the caller read the entries it chose
        from) is still the newest: an append landed since, which may depend on them.
        `LockLost`, nothing removed, unless the flush lock is still `lock_token`'s."""


@runtime_checkable
class CheckpointFence(Protocol):
    """What refuses checkpoint writes from a writer that lost its thread to a newer one.

    Checked before a checkpoint write reaches the cold tier, in every write mode.
    """

    async def admit(self, thread_id: str, fence: int, *, checked: bool = False) -> None:
        """Raise `StaleFencingToken` if a writer presented a higher fence for the thread;
        else remember `fence` as the highest seen (where this fence keeps one). A fence
        that may lose what it keeps raises `FenceUnknown` when it holds nothing for the
        thread, unless the caller `checked` the token against a durable fence."""
