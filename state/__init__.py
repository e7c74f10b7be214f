"""agent-state: durable, fast state for LangGraph workflows (Redis hot tier, Cosmos DB or
Postgres cold tier). Import what you use from here; the submodules are its parts.

Settings
    `Settings` reads the library's options from the environment (variable names:
    the field names upper-cased; other variables are ignored, so an application
    may subclass it with its own fields); `get_settings()` is the process's cached
    instance.
    `ColdBackend` picks Cosmos or Postgres, `WriteMode` write-behind or write-through.

Backends
    `open_backends(settings)` connects every configured tier (and creates the
    container or runs the migrations) and returns `Backends`; close it with
    `await backends.close()`, or use `async with backends_for(settings) as backends`.

Stores
    `TieredStateStore.from_backends(backends)`: workflow records (named sections,
    versioned, audited), size-bounded (`state.sized`) over a cache-aside of the
    cold tier (`state.tiered.CacheAsideStore`), plus fenced locks. Its types:
    `WorkflowRecord`, `AuditEntry`, `Lock`, `TierHealth`, `Caller` / `acting_for`
    (who an audit entry names), `JSON`. The ports: `RecordStore` (what every layer
    of records offers), and what the adapters implement: `ColdStateStore`,
    `HotStateStore`, `CheckpointStore`, `ColdRetention`, and `EventLog` (per-thread
    event logs in Redis Streams, `backends.events`; its entries are `StoredEvent`).

Checkpoints
    `TieredCheckpointSaver`, a LangGraph checkpointer: `from_backends(backends)`
    in async code, `open_sync(settings)` without an event loop. In write-behind
    mode `flush(thread_id)` / `aflush` make a thread durable in the cold tier, and
    the `Flusher` (`backends.flusher`) drains the backlog in the background. A run
    passes its lock's fencing token as `configurable[FENCING_TOKEN_KEY]`.

Errors
    Every failure is a `StateError`: `VersionConflict`, `WorkflowExists`,
    `WorkflowNotFound`, `StaleFencingToken`, `LockNotAcquired`, `StateTooLarge`,
    `BackendUnavailable` (and its `HotStateLost`, `FlushLockBusy`, `RunsPartlyDeleted`,
    `StillWriting` and its `RunsStillWriting`),
    `RequestRejected` (and its `InvalidValue`), `UnsupportedSchemaVersion`,
    `SettingsError`, `CorruptState`, `ThreadExpiring`, `ParentGone`, `EntryStuck` (a
    write-behind entry the cold store refuses for good), `NotStuck`, `DiscardOutpaced`,
    `SaverForked` (a saver used in a process forked from the one that opened it).

Using the saver from any LangGraph program (the README's example)::

    from state import Settings, TieredCheckpointSaver

    with TieredCheckpointSaver.open_sync(Settings()) as saver:  # settings from the environment
        graph = builder.compile(checkpointer=saver)
        graph.invoke(inputs, {"configurable": {"thread_id": "case_8842"}})
        saver.flush("case_8842")  # the end of the run: durable in the cold tier
"""

from .checkpoint import FENCING_TOKEN_KEY, Flusher, TieredCheckpointSaver
from .errors import (
    BackendUnavailable,
    CorruptState,
    DiscardOutpaced,
    EntryStuck,
    FlushLockBusy,
    HotStateLost,
    InvalidValue,
    LockLost,
    LockNotAcquired,
    NotStuck,
    ParentGone,
    RequestRejected,
    RunsPartlyDeleted,
    RunsStillWriting,
    SaverClosed,
    SaverForked,
    SaverLoopMissing,
    SaverLoopStopped,
    SettingsError,
    StaleFencingToken,
    StateError,
    StateTooLarge,
    StillWriting,
    SyncCallOnSaverLoop,
    ThreadExpiring,
    UnsupportedSchemaVersion,
    VersionConflict,
    WorkflowExists,
    WorkflowNotFound,
)
from .factory import Backends, backends_for, open_backends
from .ports import (
    HEALTH_PROBE_SECONDS,
    JSON,
    AuditEntry,
    Caller,
    CheckpointStore,
    ColdRetention,
    ColdStateStore,
    EventLog,
    HotStateStore,
    Lock,
    RecordStore,
    ResumePoint,
    SectionWrite,
    StoredEvent,
    TierHealth,
    WorkflowRecord,
    acting_for,
    event_order,
)
from .settings import ColdBackend, Settings, WriteMode, get_settings
from .shielding import taken_or_given_back
from .tiered import TieredStateStore

__all__ = [
    "FENCING_TOKEN_KEY",
    "HEALTH_PROBE_SECONDS",
    "JSON",
    "AuditEntry",
    "BackendUnavailable",
    "Backends",
    "Caller",
    "CheckpointStore",
    "ColdBackend",
    "ColdRetention",
    "ColdStateStore",
    "CorruptState",
    "DiscardOutpaced",
    "EntryStuck",
    "EventLog",
    "FlushLockBusy",
    "Flusher",
    "HotStateLost",
    "HotStateStore",
    "InvalidValue",
    "Lock",
    "LockLost",
    "LockNotAcquired",
    "NotStuck",
    "ParentGone",
    "RecordStore",
    "RequestRejected",
    "ResumePoint",
    "RunsPartlyDeleted",
    "RunsStillWriting",
    "SaverClosed",
    "SaverForked",
    "SaverLoopMissing",
    "SaverLoopStopped",
    "SectionWrite",
    "Settings",
    "SettingsError",
    "StaleFencingToken",
    "StateError",
    "StateTooLarge",
    "StillWriting",
    "StoredEvent",
    "SyncCallOnSaverLoop",
    "ThreadExpiring",
    "TierHealth",
    "TieredCheckpointSaver",
    "TieredStateStore",
    "UnsupportedSchemaVersion",
    "VersionConflict",
    "WorkflowExists",
    "WorkflowNotFound",
    "WorkflowRecord",
    "WriteMode",
    "acting_for",
    "backends_for",
    "event_order",
    "get_settings",
    "open_backends",
    "taken_or_given_back",
]
