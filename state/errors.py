"""Typed errors of the state library. Callers catch these, never a client's own."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping


class StateError(Exception):
    """Base of every error the state library raises on purpose."""


class VersionConflict(StateError):
    """A write expected a version the store no longer holds (a concurrent writer won)."""

    def __init__(self, thread_id: str, expected: int | None, actual: int | None) -> None:
        super().__init__(
            f"version conflict on {thread_id!r}: expected version {expected}, store has {actual}"
        )
        self.thread_id = thread_id
        self.expected = expected
        self.actual = actual


class WorkflowExists(StateError):
    """A create found a record already stored under that thread id."""

    def __init__(self, thread_id: str) -> None:
        super().__init__(f"workflow {thread_id!r} already exists")
        self.thread_id = thread_id


class WorkflowNotFound(StateError):
    def __init__(self, thread_id: str) -> None:
        super().__init__(f"workflow {thread_id!r} not found")
        self.thread_id = thread_id


class StaleFencingToken(StateError):
    """A writer presented a fencing token older than one the store has already seen."""

    def __init__(self, thread_id: str, presented: int, highest: int) -> None:
        super().__init__(
            f"stale fencing token on {thread_id!r}: presented {presented}, store has seen {highest}"
        )
        self.thread_id = thread_id
        self.presented = presented
        self.highest = highest


class LockNotAcquired(StateError):
    def __init__(self, name: str) -> None:
        super().__init__(f"lock {name!r} is held by another owner")
        self.name = name


class LockLost(StateError):
    """A held lock or lease is no longer its holder's (taken by another, or run out before
    it could be renewed): the holder must stop writing."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"lock {name!r} lost: {detail}")
        self.name = name


class StateTooLarge(StateError):
    """A value cannot be stored within the backend's limits even after compression/chunking."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(f"{what} is {size} bytes, over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class BackendUnavailable(StateError):
    """A store could not be reached (connection refused, timeout, service unavailable)."""

    def __init__(self, backend: str, detail: str) -> None:
        super().__init__(f"{backend} unavailable: {detail}")
        self.backend = backend


class NoAnswer(BackendUnavailable):
    """A store answered nothing within the operation timeout (hung, or the network path
    drops packets): whether the request took effect is unknown."""


class BackendClosed(BackendUnavailable):
    """A call through a backend connection after its owner closed it: nothing was sent,
    and nothing was opened again for it."""

    def __init__(self, backend: str) -> None:
        super().__init__(backend, "its connection was closed by its owner")


class FlushLockBusy(BackendUnavailable):
    """Another flusher held a thread's write-behind flush lock past the caller's wait."""

    def __init__(self, thread_id: str) -> None:
        super().__init__(
            "write-behind", f"the flush lock of {thread_id!r} was not released in time"
        )
        self.thread_id = thread_id


class StillWriting(BackendUnavailable):
    """A delete that writers kept landing on during each of its rounds (something stored
    after each look): it gave up rather than chase them. Not an outage, though retried as
    one (the writers may have stopped by then): its message says so, not that `backend` is
    unavailable."""

    def __init__(self, backend: str, detail: str) -> None:
        # StateError's: BackendUnavailable's would call the store unavailable.
        StateError.__init__(self, detail)
        self.backend = backend


class RunsStillWriting(StillWriting):
    """A `delete_for_runs` that runs of its ids kept writing to (a checkpoint of theirs
    stored after each look)."""

    def __init__(self, backend: str, run_ids: Iterable[str], thread_ids: Iterable[str]) -> None:
        super().__init__(
            backend,
            f"runs {sorted(run_ids)} are still writing to {sorted(thread_ids)}; stop them"
            " and call again",
        )


class RunsPartlyDeleted(BackendUnavailable):
    """A store's `delete_for_runs` failed after it may have deleted the runs' checkpoints
    from some threads (`thread_ids`, committed or of unknown outcome). A cache in front
    drops those too: a call again finds nothing left to delete there, so names them no more."""

    def __init__(self, cause: BackendUnavailable, thread_ids: Iterable[str]) -> None:
        self.thread_ids = frozenset(thread_ids)
        self.cause = cause
        deleted = f"the runs deleted from up to {len(self.thread_ids)} threads"
        if isinstance(cause, StillWriting):
            # Not "unavailable" either: its cause's words.
            StateError.__init__(self, f"{cause} ({deleted} so far)")
            self.backend = cause.backend
        else:
            super().__init__(cause.backend, f"failed with {deleted}: {cause}")


class RequestRejected(StateError):
    """A store refused a request for good: sent again unchanged, it fails the same way
    (no permission, a broken invariant, a value it cannot hold). Transient trouble is
    `BackendUnavailable` instead."""

    def __init__(self, backend: str, detail: str, *, code: int | str | None = None) -> None:
        super().__init__(f"{backend} refused the request: {detail}")
        self.backend = backend
        # The store's own code when known: an HTTP status (Cosmos), a SQLSTATE (Postgres).
        self.code = code


class InvalidValue(RequestRejected):
    """The store cannot hold a value as given (a NUL character in Postgres JSON, a number
    JSON cannot carry, a document Cosmos refuses as malformed)."""


class UnsupportedSchemaVersion(StateError):
    """A stored document was written by newer code than this one (no upcaster can read it)."""

    def __init__(self, kind: str, found: int, supported: int) -> None:
        super().__init__(
            f"{kind} has schema_version {found}; this code reads up to {supported}. "
            "Upgrade the application before reading this state."
        )
        self.kind = kind
        self.found = found
        self.supported = supported


class SettingsError(StateError):
    """The configuration is incomplete or contradictory."""


class CorruptState(StateError):
    """A stored value cannot be read back as written (missing chunk, bad encoding)."""


class UnknownParent(StateError):
    """A write-behind put whose parent the hot tier has no trace of (neither its cache
    entry nor its log entry): nothing was written. The caller checks the cold tier, then
    appends again saying the parent is stored (`parent_stored`), or gives up
    (`HotStateLost`; `ParentGone` for a `fork`: the hot tier caches a newer checkpoint
    as the namespace's latest, so lost nothing)."""

    def __init__(self, thread_id: str, *, fork: bool = False) -> None:
        super().__init__(f"the hot tier has no trace of the parent of a put on {thread_id!r}")
        self.thread_id = thread_id
        self.fork = fork


class ParentGone(StateError):
    """A write-through checkpoint put whose parent the cold tier no longer holds (deleted,
    or kept by `delete_for_runs` only for a DeltaChannel history): nothing was written.
    The run writing it was deleted under it (or forks a checkpoint that is gone) and
    cannot go on; stored, its step would bring a deleted run back as the latest."""

    def __init__(self, thread_id: str, checkpoint_ns: str, parent_checkpoint_id: str) -> None:
        super().__init__(
            f"the parent {parent_checkpoint_id} of a put on {thread_id!r}"
            f" (namespace {checkpoint_ns!r}) is no longer stored"
        )
        self.thread_id = thread_id
        self.checkpoint_ns = checkpoint_ns
        self.parent_checkpoint_id = parent_checkpoint_id


class FenceUnknown(StateError):
    """The hot tier holds no fence for the thread (new, or its key expired or was evicted),
    so it cannot tell a stale writer from the newest: nothing was written. The caller
    checks the token against the thread's durable fence, then presents it as checked
    (`fence_checked`), which seeds the hot one."""

    def __init__(self, thread_id: str) -> None:
        super().__init__(f"the hot tier holds no fence for {thread_id!r}")
        self.thread_id = thread_id


class LogEntryLost(StateError):
    """A write-behind entry refers to a value Redis no longer holds (evicted under an
    `allkeys-*` policy): that entry and every later one of the thread are lost, as if
    Redis had lost them."""

    def __init__(self, thread_id: str, entry_id: str, epochs: Mapping[str, int]) -> None:
        super().__init__(f"write-behind entry {entry_id} of {thread_id!r} lost a value")
        self.thread_id = thread_id
        self.entry_id = entry_id
        # Where its values were: each epoch and the length the entry reads of it.
        self.epochs = dict(epochs)


class LogEntryTooLarge(StateError):
    """A put or put_writes with more fields than one write-behind log entry holds (a script
    passes a Redis command a bounded number of values, and each is one entry, applied whole):
    nothing was appended, and it goes to the cold tier instead."""

    def __init__(self, thread_id: str, fields: int, limit: int) -> None:
        super().__init__(
            f"a write of {thread_id!r} with {fields} fields is more than one write-behind log"
            f" entry holds ({limit})"
        )
        self.thread_id = thread_id


class LogEntryDamaged(CorruptState):
    """A write-behind entry that cannot be read back (a field damaged in Redis): it holds
    its thread's later entries back as an entry the cold store refuses does, and is recorded
    stuck the same way, for an operator to discard. What could be read of it is kept
    (`kind`, `checkpoint_ns`, `checkpoint_id`: '' where unreadable)."""

    def __init__(
        self,
        thread_id: str,
        entry_id: str,
        *,
        kind: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        reason: str,
    ) -> None:
        super().__init__(f"write-behind entry {entry_id} of {thread_id!r} is damaged: {reason}")
        self.thread_id = thread_id
        self.entry_id = entry_id
        self.kind = kind
        self.checkpoint_ns = checkpoint_ns
        self.checkpoint_id = checkpoint_id
        self.reason = reason


class EntryStuck(StateError):
    """A write-behind entry the cold store refused for good (`reason`: too large, a value it
    cannot hold, any refusal that is not an outage): the thread's later entries wait behind
    it, never durable, until its cause is fixed or an operator discards it
    (`agent-state write-behind discard`)."""

    def __init__(self, thread_id: str, entry_id: str, checkpoint_id: str, reason: str) -> None:
        super().__init__(
            f"write-behind entry {entry_id} (checkpoint {checkpoint_id}) of {thread_id!r}"
            f" is refused by the cold store for good, holding back the thread's later"
            f" entries: {reason}"
        )
        self.thread_id = thread_id
        self.entry_id = entry_id
        self.checkpoint_id = checkpoint_id
        self.reason = reason


class NotStuck(StateError):
    """A discard named an entry that is not its thread's stuck entry (stored since, already
    discarded, or never recorded): nothing was discarded."""

    def __init__(self, thread_id: str, entry_id: str) -> None:
        super().__init__(f"write-behind entry {entry_id} of {thread_id!r} is not stuck")
        self.thread_id = thread_id
        self.entry_id = entry_id


class DiscardOutpaced(StateError):
    """An operator's discard of a stuck entry that appends to its thread kept undoing: each
    landed between a read of the log and the drop, `attempts` times. Not an outage (Redis
    answered every call): nothing was discarded, and the discard goes through when tried
    again once the run writing to the thread pauses."""

    def __init__(self, thread_id: str, entry_id: str, attempts: int) -> None:
        super().__init__(
            f"write-behind entry {entry_id} of {thread_id!r} was not discarded: a run kept"
            f" appending to the thread during each of {attempts} tries; try again when it"
            " pauses"
        )
        self.thread_id = thread_id
        self.entry_id = entry_id
        self.attempts = attempts


class HotStateLost(BackendUnavailable):
    """Redis lost checkpoints of a thread before they reached the cold tier (FLUSHALL, a
    restart without persistence, a failover): the run cannot go on from them, nor may a
    flush report them stored. The thread resumes from its last checkpoint in the cold
    tier, as after any Redis outage."""

    def __init__(self, thread_id: str, checkpoint_id: str) -> None:
        super().__init__(
            "redis",
            f"checkpoint {checkpoint_id} of {thread_id!r} was acknowledged by Redis, then lost"
            " before it reached the cold tier",
        )
        self.thread_id = thread_id
        self.checkpoint_id = checkpoint_id


class ThreadExpiring(StateError):
    """A write-behind append to a thread being deleted (by the retention sweep or
    `delete_thread`): refused, nothing written (the run cannot go on: its past is being
    deleted under it)."""

    def __init__(self, thread_id: str) -> None:
        super().__init__(f"thread {thread_id!r} is being deleted")
        self.thread_id = thread_id


class SaverClosed(StateError):
    """A call to a checkpoint saver after it was closed, or one it was closed under."""

    def __init__(self) -> None:
        super().__init__(
            "the checkpoint saver is closed (its open_sync block has ended, or the "
            "backends it was built on were closed)"
        )


class SaverForked(StateError):
    """A call to a checkpoint saver in a process forked from the one that opened it: its
    loop thread did not survive the fork, and its connections are the parent's (a reply
    could go to either process), so it is refused before anything is sent."""

    def __init__(self) -> None:
        super().__init__(
            "the checkpoint saver was opened in another process (this one was forked from "
            "it): open a saver of its own in this process (TieredCheckpointSaver.open_sync(), "
            "or from_backends over backends opened here)"
        )


class SyncCallOnSaverLoop(StateError, asyncio.InvalidStateError):
    """A sync call of a checkpoint saver from the event loop its clients run on: it would
    wait for that loop while blocking it, so it is refused before anything is sent. Also
    an `asyncio.InvalidStateError`, as LangGraph's async savers raise in this case."""

    def __init__(self) -> None:
        super().__init__(
            "synchronous TieredCheckpointSaver calls would block the loop they wait for: "
            "from inside it, use the async methods (`aget_tuple`, `alist`, `aput`, "
            "`aput_writes`, ... or `await graph.ainvoke(...)`)"
        )


class SaverLoopMissing(StateError, asyncio.InvalidStateError):
    """A checkpoint saver built outside any event loop without one named: its stores'
    clients run on a loop, which it must know to hand its calls to."""

    def __init__(self) -> None:
        super().__init__(
            "TieredCheckpointSaver needs the event loop its stores run on: build it "
            "inside that loop, pass `loop=`, or use TieredCheckpointSaver.open_sync()"
        )


class SaverLoopStopped(StateError, asyncio.InvalidStateError):
    """A call a checkpoint saver hands to its loop while that loop is not running (stopped,
    or closed): nothing would ever run it, so it is refused instead of waited for."""

    def __init__(self) -> None:
        super().__init__(
            "the event loop TieredCheckpointSaver's stores run on is not running (stopped "
            "or closed): keep it running while the saver is used, or use "
            "TieredCheckpointSaver.open_sync()"
        )
