"""`TieredCheckpointSaver`: LangGraph's checkpointer over the cold store and the hot cache.

The cold `CheckpointStore` (Cosmos or Postgres) is the source of truth; the
optional `CheckpointCache` (Redis) holds the latest checkpoint of each (thread,
namespace) so that reading it costs one Redis round trip and no cold request.

Two write modes (`STATE_WRITE_MODE`):
- write-through: writes go cold first, then update the cache; cache failures
  never fail a call. A put whose parent the cold tier no longer holds (its run was
  deleted under it) is refused (`ParentGone`) unless the cache holds that parent
  and the thread's write-behind log holds entries.
- write-behind (with a `Flusher`): a put or put_writes is one Redis round trip
  that updates the hot copy and records the work in the write-behind log; the
  flusher moves it to the cold tier in the background. Natural boundaries wait
  for it: a write carrying an interrupt or an error, `durability="sync"` or "exit", and
  `flush(thread_id)`. Reads the cold tier answers (a cache miss, `list`, a
  checkpoint by id) first flush the thread's backlog, so they never see a gap.
  With Redis unreachable, or a write too large for one log entry
  (`LogEntryTooLarge`: then fenced in Redis as an append, its hot copy dropped), a put
  writes through instead, with every channel value, so the cold checkpoint stands on
  its own whatever the log still holds.

Fencing: a write whose config carries a fencing token (`FENCING_TOKEN_KEY`) is
refused with `StaleFencingToken` before it reaches the cold tier if a writer with a
higher token wrote the thread. Write-behind appends check the thread's fence in
Redis atomically with the append; write-through writes first check and raise the
same fence (`fence`, one Redis round trip); without a reachable Redis, both check
the fence of the thread's workflow record in the cold tier (`record_fence`).

A checkpoint is stored without its channel values, except small scalars (and
short collections of them) kept inline, as LangGraph's Postgres saver keeps
primitives: every other value is a blob per (channel, version), written only in
the step that changed it.

The async methods run on the loop that owns the clients (`self.loop`), from
any loop; the sync ones hand their call to that loop from another thread.
`open_sync` gives purely synchronous code a saver on a private loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import inspect
import itertools
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from langchain_core.runnables import RunnableConfig
from langgraph._internal._constants import CONFIG_KEY_RUNTIME
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    DeltaChannelHistory,
    get_checkpoint_id,
    get_serializable_checkpoint_metadata,
    writes_sort_key,
)
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.serde.base import SerializerProtocol

from ..errors import (
    BackendClosed,
    BackendUnavailable,
    EntryStuck,
    FenceUnknown,
    HotStateLost,
    InvalidValue,
    LockLost,
    LogEntryTooLarge,
    ParentGone,
    RunsPartlyDeleted,
    RunsStillWriting,
    SaverClosed,
    SaverForked,
    SaverLoopMissing,
    SaverLoopStopped,
    StateError,
    StillWriting,
    SyncCallOnSaverLoop,
    UnknownParent,
)
from ..ports import (
    BlockingAppends,
    BlockingCache,
    BlockingCheckpointStore,
    ChannelHistory,
    CheckpointCache,
    CheckpointFence,
    CheckpointPut,
    CheckpointStore,
    PruneStrategy,
    StoredBlob,
    StoredCheckpoint,
    StoredWrite,
    TypedBytes,
    WritesPut,
)
from ..size import ARCHIVE_SEPARATOR, storable_json, storable_text
from .chains import WrittenChains
from .fencing import RecordFence
from .flusher import Flusher
from .loop_thread import LoopThread
from .values import KeptInline, dump_checkpoint, dump_value, load_checkpoint, load_value

if TYPE_CHECKING:
    from ..factory import Backends
    from ..settings import Settings

T = TypeVar("T")

PRUNE_STRATEGIES: tuple[PruneStrategy, ...] = ("keep_latest", "delete")
# `configurable` key of a run's fencing token: a checkpoint write presenting a lower
# token than one the thread has seen is refused (StaleFencingToken), in either mode.
FENCING_TOKEN_KEY = "fencing_token"
# Checkpoints a synchronous `list` fetches per hop to the loop thread.
SYNC_LIST_BATCH = 50
# LangGraph passes the run's durability to the saver under this `configurable` key.
DURABILITY_KEY = "__pregel_durability"
# Those whose writes return only once durable: every step ("sync"), or the one save a
# run makes as it exits ("exit": LangGraph persists nothing before).
SYNCHRONOUS_DURABILITY = ("sync", "exit")
# Writes on these channels end a step the caller must find again after a crash.
BOUNDARY_CHANNELS = frozenset({"__interrupt__", "__error__"})
# Checkpoints `update_state` saves (a fork too): written outside any run, so no run's end
# flushes them; the call returns once they are durable, as a boundary.
OUTSIDE_RUN_SOURCES = frozenset({"update", "fork"})
# Values this small stay inline in the checkpoint instead of costing a blob document
# (and a round trip) of their own. An unchanged channel stays as its parent had it
# (`KeptInline`), inline with the same value or in its version's blob.
INLINE_MAX_CHARS = 256
INLINE_MAX_ITEMS = 16
# Delta histories kept from cache hits until the request that follows asks for them.
HISTORY_MEMO_SIZE = 1_000
# How long a boundary whose backlog only Redis holds keeps trying to flush it while Redis
# is out: a restart or a failover is back within it; past it the run stops unflushed.
REDIS_RETURN_SECONDS = 5.0
REDIS_RETRY_POLL_SECONDS = 0.25
# Entries of a backlog delete_for_runs could not flush that it reads for the runs' puts.
ALL_LOGGED = 1_000_000
# Rounds of flush-and-delete `delete_for_runs` makes for puts of its runs that landed in the
# backlog after its flush (a run still writing), before it gives up.
LATE_RUN_PUT_ROUNDS = 3
# Tries of a prune or copy whose flush lock was lost during its store call (its lease ran
# out: a flush may have interleaved), each done again under a new lock before giving up.
FLUSH_LOCKED_ATTEMPTS = 3
# A lost thread's cold root, when it could not be read as the loss was found: followed by
# a checkpoint id made then (ids grow with time): a root newer than it is another
# process having gone on.
ROOT_UNKNOWN = "\0unknown"
# How long closing an `open_sync` saver waits for the sync calls at work on their callers'
# threads, then for those in flight on its loop thread, to finish before it closes the
# backends under them (then cancels the rest).
CLOSE_WAIT_SECONDS = 5.0
# How long a hand-over waits for a saver loop that is not running (nor closed) to run,
# before `SaverLoopStopped`: a loop whose thread is starting (`run_forever` not begun yet)
# runs within it; one stopped between its owner's `run_until_complete` turns is refused.
LOOP_START_WAIT_SECONDS = 2.0
LOOP_START_POLL_SECONDS = 0.01
# How often a caller waiting for its call on the loop looks whether the loop closed (its
# owner stopped it before the call ran, then closed it): nothing would ever answer it.
LOOP_CLOSED_POLL_SECONDS = 0.5
# Cosmos refuses a partition key value over 2 KB (the emulator does not): a thread id is
# held to half that on every backend, so a thread works alike on each.
MAX_THREAD_ID_BYTES = 1024


def _keep_newest(memo: OrderedDict[str, Any], thread_id: str) -> None:
    """Per-thread memos of threads the background flush alone drains are never confirmed:
    keep the newest HISTORY_MEMO_SIZE."""
    memo.move_to_end(thread_id)
    while len(memo) > HISTORY_MEMO_SIZE:
        memo.popitem(last=False)


def _starts_run(config: RunnableConfig) -> bool:
    """A root latest read LangGraph's loop makes as a run starts (not a state reader's)."""
    return CONFIG_KEY_RUNTIME in config.get("configurable", {})


def _scalar(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float):
        return True
    return isinstance(value, str) and len(value) <= INLINE_MAX_CHARS


def _inline(value: Any) -> bool:
    if _scalar(value):
        return True
    return (
        isinstance(value, list | tuple | set | frozenset)
        and len(value) <= INLINE_MAX_ITEMS
        and all(_scalar(item) for item in value)
    )


@dataclasses.dataclass(frozen=True)
class _Put:
    """A put as the tiers store it, and what the saver does with it after."""

    stored: StoredCheckpoint
    blobs: list[StoredBlob]  # the new versions' values, not inline
    inline: dict[str, Any]  # small values kept in the checkpoint record
    inline_bytes: dict[str, TypedBytes]  # the same, serialized
    present: list[str]  # every channel holding a value
    fence: int | None
    boundary: bool  # durability "sync" or "exit", or a state update: returns once cold


@dataclasses.dataclass(frozen=True)
class _Writes:
    """A put_writes as the tiers store it."""

    thread_id: str
    checkpoint_ns: str
    checkpoint_id: str
    writes: list[StoredWrite]
    upsert: bool
    fence: int | None
    boundary: bool  # an interrupt, an error, or durability "sync" or "exit"


@dataclasses.dataclass(frozen=True)
class _Tracked:
    """A thread's run tracking (`_unconfirmed`, `_unconfirmed_writes`, `_paused`,
    `_boundary_checkpoints`) at one moment."""

    heads: dict[str, str]
    writes: dict[str, tuple[str, set[tuple[str, int]]]]
    paused: set[str]
    boundaries: dict[str, str]


def _thread_of(configurable: Mapping[str, Any]) -> str:
    """The thread a config names, as text (an int one as LangGraph's savers take it)."""
    return _named("thread id", configurable["thread_id"])


def _named(what: str, name: object) -> str:
    """A thread (or run) id as text. None is refused: as text it is the thread "None",
    another caller's perhaps, where InMemorySaver keeps a thread of its own and Postgres
    refuses it; a delete, copy or flush given None would act on that caller's thread."""
    if name is None:
        raise InvalidValue("checkpoints", f"a {what} of None")
    return str(name)


def _writable_thread(configurable: dict[str, Any]) -> str:
    """The thread a put or put_writes goes to; one Cosmos could not hold is refused here,
    before write-behind acknowledges a step no flush could ever store."""
    thread_id = _thread_of(configurable)
    # First: a thread id that is not UTF-8 has no size in bytes.
    _refuse_unstorable("thread id", [thread_id])
    size = len(thread_id.encode())
    if size > MAX_THREAD_ID_BYTES:
        raise InvalidValue(
            "checkpoints", f"a thread id of {size} bytes (at most {MAX_THREAD_ID_BYTES})"
        )
    if ARCHIVE_SEPARATOR in thread_id:
        # Retention would take it for an archive record and delete it with its "owner".
        raise InvalidValue("checkpoints", f"a thread id holding {ARCHIVE_SEPARATOR!r}")
    return thread_id


def _refuse_unstorable(what: str, names: Iterable[str]) -> None:
    """Postgres text and jsonb cannot hold a NUL character, and no store takes text that is
    not UTF-8 (a lone surrogate: JSON's "\\ud800" decodes to one): a name with either is
    refused on every backend (a thread works alike on each), before write-behind
    acknowledges a step whose flush would be refused for good, holding back the thread's
    later steps."""
    for name in names:
        storable_text("checkpoints", what, name)


def _sendable(what: str, names: Iterable[str]) -> list[str]:
    """`names` for a read or delete: none the store could hold is refused, as a write
    refuses it, rather than fail in a client (Redis, Postgres) or find nothing (others)."""
    sendable = [_named(what, name) for name in names]
    for name in sendable:
        storable_text("checkpoints", what, name)
    return sendable


def _run_ids(run_ids: Sequence[str]) -> list[str]:
    if isinstance(run_ids, str):
        # A str is a sequence of one-character run ids: those runs would be deleted.
        raise TypeError("run_ids must be a sequence of run ids, not a str")
    return _sendable("run id", run_ids)


def _namespace(configurable: Mapping[str, Any]) -> str:
    """The checkpoint namespace a config names ("" for none). One that is not a str is
    refused on every backend alike: Postgres refused a read of an int one, Cosmos found
    nothing for it, and a write failed with a plain TypeError."""
    checkpoint_ns = configurable.get("checkpoint_ns", "")
    if not isinstance(checkpoint_ns, str):
        kind = type(checkpoint_ns).__name__
        raise InvalidValue("checkpoints", f"a checkpoint namespace of type {kind} (not a str)")
    return checkpoint_ns


def _address(config: RunnableConfig) -> tuple[str, str, str | None]:
    """(thread, namespace, checkpoint id or None for the latest) a config names."""
    configurable = config["configurable"]
    (thread_id,) = _sendable("thread id", [_thread_of(configurable)])
    checkpoint_ns = _namespace(configurable)
    _sendable("checkpoint namespace", [checkpoint_ns])
    # An empty id names no checkpoint, as LangGraph's savers read it: the latest.
    return thread_id, checkpoint_ns, get_checkpoint_id(config) or None


class TieredCheckpointSaver(BaseCheckpointSaver[str]):
    def __init__(
        self,
        store: CheckpointStore,
        cache: CheckpointCache | None = None,
        *,
        flusher: Flusher | None = None,
        fence: CheckpointFence | None = None,
        record_fence: CheckpointFence | None = None,
        serde: SerializerProtocol | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        blocking_appends: BlockingAppends | None = None,
        blocking_cache: BlockingCache | None = None,
        blocking_store: BlockingCheckpointStore | None = None,
    ) -> None:
        super().__init__(serde=serde)
        if flusher is not None and cache is None:
            raise ValueError("write-behind needs the hot checkpoint cache its log updates")
        self.store = store
        self.cache = cache
        # Set: write-behind mode.
        self.flusher = flusher
        # The sync API reads a cache hit from the caller's thread, and in write-behind mode
        # appends from there too (a write needs no cold request then).
        self._blocking = blocking_appends if flusher is not None else None
        self._blocking_cache = blocking_cache if cache is not None else None
        # Without a hot tier, the sync API reads and writes the cold tier from the caller's
        # thread when the store can (each call then skips two thread hand-overs); with
        # one, a miss of the latest checkpoint reads it from there, and in write-through
        # mode a write goes to both tiers from there.
        self._blocking_store = blocking_store if cache is None else None
        self._blocking_cold = blocking_store if cache is not None else None
        self._writes_through_here = (
            flusher is None and self._blocking_cold is not None and self._blocking_cache is not None
        )
        # The hot tier's fence per thread (write-through writes check it), and the cold
        # tier's, checked instead while the hot one cannot be reached (or is absent).
        self.fence = fence
        self.record_fence = record_fence
        # Checks against the record's fence in flight, per (thread, token): a run's put and
        # put_writes that both find no fence in Redis share one cold read.
        self._durable_checks: dict[tuple[str, int], asyncio.Future[None]] = {}
        # Write-behind threads whose newest write this process sent straight to the cold
        # tier because Redis could not be reached: that state is durable already.
        self._written_through: set[str] = set()
        # Set as `open_sync` closes the saver: sync calls from other threads then fail.
        self._closed = False
        # Sync calls at work on their callers' own threads (a cache hit, a write-behind
        # append, a cold request without a hot tier, a hand-over to the loop thread): the
        # close waits for them before the backends close, so none reconnects a closed
        # client (a connection nothing would close) or hands over to a stopped loop.
        self._callers = 0
        self._callers_done = threading.Condition()
        # The sync calls running on the loop thread (loop-only), and whether closing has
        # begun there: `open_sync` lets them finish before it closes the backends, so none
        # runs on (and reconnects) a client already closed.
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._settling = False
        # Delta histories of the threads this process writes from their root.
        self._chains = WrittenChains()
        # (thread, namespace) -> the latest checkpoint's delta history a cache hit brought.
        self._histories: OrderedDict[tuple[str, str], tuple[str, dict[str, ChannelHistory]]] = (
            OrderedDict()
        )
        # The sync API's reads fill it from their callers' threads.
        self._histories_lock = threading.Lock()
        # Inline values as stored, for the next put of each thread (see KeptInline).
        self._kept_inline = KeptInline()
        # Write-behind: thread -> namespace -> the last put this process appended that no
        # flush of its own has confirmed in the cold tier yet (under `_histories_lock`).
        self._unconfirmed: OrderedDict[str, dict[str, str]] = OrderedDict()
        # Write-behind: thread -> the task-scoped namespaces (":" in the name) that wrote an
        # interrupt or an error: their state outlives the run (the resume goes on from it),
        # so boundaries check them as they check the root's (under `_histories_lock`).
        self._paused: OrderedDict[str, set[str]] = OrderedDict()
        # Write-behind: thread -> namespace -> the checkpoint a boundary's writes (an
        # interrupt, an error) belong to, until the thread's next run starts. With
        # durability "async" LangGraph saves a step's checkpoint and its tasks' writes
        # concurrently: that checkpoint's put, or a sibling task's result, arriving after
        # them is part of the boundary (under `_histories_lock`).
        self._boundary_checkpoints: OrderedDict[str, dict[str, str]] = OrderedDict()
        # Write-behind: thread -> namespace -> (checkpoint, its writes' (task, idx)) this
        # process appended to the log since the namespace's last put: a boundary counts
        # them too (a sibling task's result is part of the state an interrupt reports).
        self._unconfirmed_writes: OrderedDict[str, dict[str, tuple[str, set[tuple[str, int]]]]] = (
            OrderedDict()
        )
        # Threads whose run lost state with Redis (`HotStateLost` raised): every later
        # boundary of the run fails too (LangGraph drops a subgraph's write error when the
        # subgraph exits with an interrupt), until a run starts again from the cold tier.
        # thread -> the root checkpoint the cold tier held as newest when the loss was found.
        self._lost: OrderedDict[str, str | None] = OrderedDict()
        # How many such losses this saver found (a metric: the only sign of them, since
        # the backlog gauges read a FLUSHALL's loss as a drained backlog).
        self.losses_found = 0
        # Threads whose runs delete_for_runs deleted but whose cached checkpoints it could not
        # drop (Redis failed in between): dropped by its next call before anything else.
        self._owed_drops: set[str] = set()
        # Set by `from_backends`: once they are closed, every call is refused (`SaverClosed`)
        # rather than reach a client that would connect again, which nothing would close.
        self._backends: Backends | None = None
        # The process that opened it: a forked child has neither its loop thread nor
        # connections of its own (see `_refuse_forked`).
        self._pid = os.getpid()
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise SaverLoopMissing() from None
        self.loop = loop

    @classmethod
    def from_backends(
        cls,
        backends: Backends,
        *,
        serde: SerializerProtocol | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> TieredCheckpointSaver:
        """The saver over opened backends (call it on the loop that opened them), in the
        write mode the settings chose."""
        saver = cls(
            backends.checkpoints,
            backends.hot_checkpoints,
            flusher=backends.flusher,
            fence=backends.checkpoint_fence,
            record_fence=RecordFence(backends.cold),
            serde=serde,
            loop=loop,
            blocking_appends=backends.blocking_appends,
            blocking_cache=backends.blocking_cache,
            blocking_store=backends.blocking_store,
        )
        saver._backends = backends
        return saver

    @classmethod
    @contextmanager
    def open_sync(
        cls, settings: Settings, *, serde: SerializerProtocol | None = None
    ) -> Iterator[TieredCheckpointSaver]:
        """For code with no event loop: opens the backends on a private loop thread."""
        from ..factory import open_backends

        runner = LoopThread()
        try:
            backends = runner.run(open_backends(settings))
            saver = cls.from_backends(backends, serde=serde, loop=runner.loop)
            try:
                yield saver
            finally:
                # A forked child leaving the block closes nothing: the loop thread is not in
                # this process, and closing the clients would end the parent's connections.
                if not saver.forked:
                    saver._close_in_opener(runner, backends)
        finally:
            runner.stop()

    def _close_in_opener(self, runner: LoopThread, backends: Backends) -> None:
        """`open_sync`'s close, in the process that opened the saver."""
        # First: a call from another thread now fails at once (`SaverClosed`), and
        # those at work on their callers' threads finish. The calls in flight on
        # the loop thread finish (or are cancelled, their callers
        # get `SaverClosed`) before the backends close: none of them then meets a
        # closed client, or opens a connection again that nothing would close.
        self._close_to_callers(CLOSE_WAIT_SECONDS)
        try:
            runner.run(self._settle_in_flight(CLOSE_WAIT_SECONDS))
        finally:
            runner.run(backends.close())

    # ----------------------------------------------------------------------- async API

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        self._refuse_closed()
        if asyncio.get_running_loop() is self.loop:  # the hot path: no extra coroutine layer
            return await self._get_tuple(config)
        return await self._on_loop(self._get_tuple(config))

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        self._refuse_closed()
        found = self._list(config, filter=filter, before=before, limit=limit)
        if asyncio.get_running_loop() is self.loop:
            async for item in found:
                yield item
            return
        try:
            while True:
                try:
                    item = await self._on_loop(_next(found))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            await self._on_loop(_close(found))

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return await self._on_loop(self._put(config, checkpoint, metadata, new_versions))

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        await self._on_loop(self._put_writes(config, writes, task_id, task_path))

    async def aget_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        self._refuse_closed()
        if asyncio.get_running_loop() is self.loop:
            return await self._delta_history(config, channels)
        return await self._on_loop(self._delta_history(config, channels))

    def expect_new_thread(self, thread_id: str) -> None:
        """Say that `thread_id` was just made and has no checkpoint (a case id its record's
        creation has just claimed): LangGraph's first read of it then asks no tier. Wrong
        only if checkpoints of that id exist, and then the run starts the thread afresh
        rather than continue a stranger's state."""
        self._chains.declare_new(_named("thread id", thread_id))

    async def aseed_fence(
        self, thread_id: str, fence: int, *, record_checked: bool = False
    ) -> None:
        """For a run that has just taken the thread's lock with `fence`, a token above every
        earlier holder's and so at least the thread's durable fence: the hot tier's fence
        is raised to it, so the run's checkpoint writes need no read of the record, and an
        earlier holder's writes are refused at Redis from now on (`StaleFencingToken` if a
        newer one's token is there already). If Redis holds no fence for the thread (new,
        or lost since a newer holder's seed) the token is checked against the record
        first, unless `record_checked`: the caller knows the record's fence is not above
        `fence`. Without Redis, the first write checks the record as always."""
        named = _named("thread id", thread_id)
        if self.fence is None:
            return
        # Not `checked` unless the caller vouches: a fence Redis lost (evicted, restarted)
        # since a newer holder's seed is indistinguishable from a new thread's, and a
        # stale run waking after that must be checked against the record, as its first
        # write would be.
        with contextlib.suppress(BackendUnavailable):
            await self._on_loop(self._seed_fence(named, int(fence), record_checked))

    def seed_fence(self, thread_id: str, fence: int, *, record_checked: bool = False) -> None:
        """Synchronous `aseed_fence`: call it as the run takes the thread's lock, before its
        first write (README, "Fencing")."""
        # Refused from the saver's loop even without a hot tier, as `flush`.
        self._refuse_on_loop()
        named = _named("thread id", thread_id)
        if self.fence is None:
            return
        with contextlib.suppress(BackendUnavailable):
            self._sync(self._seed_fence(named, int(fence), record_checked))

    async def _seed_fence(self, thread_id: str, fence: int, record_checked: bool) -> None:
        assert self.fence is not None
        try:
            await self.fence.admit(thread_id, fence, checked=record_checked)
        except FenceUnknown:
            await self._admit_durably(thread_id, fence)
            await self.fence.admit(thread_id, fence, checked=True)

    async def aflush(self, thread_id: str) -> None:
        """Return once the thread's write-behind backlog is in the cold tier (a no-op in
        write-through mode): call it at the end of a run before reporting its outcome."""
        # Refused in either mode, as a write naming None is.
        named = _named("thread id", thread_id)
        if self.flusher is not None:
            await self._on_loop(self._flush_thread(named))

    async def arefresh(self, thread_id: str) -> None:
        """Make the next read of the thread's latest checkpoint come from the cold tier
        (after its write-behind backlog): its cached copy is dropped. For a run about to
        go on from that checkpoint under a new lock: Redis may still hold a copy another
        process moved past while it could not reach Redis (README: the loss window), and
        going on from it would fork past what that process acknowledged."""
        named = _named("thread id", thread_id)
        if self.cache is not None:
            await self._on_loop(self._refresh(named))

    async def _refresh(self, thread_id: str) -> None:
        assert self.cache is not None
        if self.flusher is not None:
            await self.flusher.settle_thread(thread_id)
        # Not strict: with Redis out of reach the copy is suspect, never served here.
        await self.cache.invalidate(thread_id)

    async def adelete_thread(self, thread_id: str) -> None:
        await self._on_loop(self._delete_thread(_named("thread id", thread_id)))

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await self._on_loop(self._delete_for_runs(_run_ids(run_ids)))

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await self._on_loop(
            self._copy_thread(
                _named("thread id", source_thread_id), _named("thread id", target_thread_id)
            )
        )

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        await self._on_loop(self._prune(thread_ids, strategy))

    # ----------------------------------------------------------------------- sync API

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        if self._blocking_cache is None and self._blocking_store is None:
            return self._sync(self._get_tuple(config))
        # A hit (or, with no hot tier, the cold read) on this thread; else the loop thread.
        with self._caller_call():
            return self._get_tuple_here(config)

    def _get_tuple_here(self, config: RunnableConfig) -> CheckpointTuple | None:
        thread_id, checkpoint_ns, checkpoint_id = _address(config)
        self._note_run_start(config, thread_id, checkpoint_ns, checkpoint_id)
        if checkpoint_id is None and self._chains.take_new(thread_id, checkpoint_ns):
            return None
        with_history = self._with_history(thread_id, checkpoint_ns, checkpoint_id)
        if self._blocking_store is not None:
            return self._cold_read_here(
                self._blocking_store, thread_id, checkpoint_ns, checkpoint_id, with_history
            )
        assert self._blocking_cache is not None
        cached = self._blocking_cache.lookup_blocking(
            thread_id, checkpoint_ns, with_history=with_history
        )
        if cached is not None and cached.unreachable:
            return self._read_unleased(thread_id, checkpoint_ns, checkpoint_id, with_history)
        hit, history = (cached.checkpoint, cached.history) if cached is not None else (None, None)
        if hit is not None and checkpoint_id in (None, hit.checkpoint_id):
            return self._hit(hit, history, latest=checkpoint_id is None)
        if hit is not None:  # an older checkpoint named: `lookup` would only read it again
            return self._read_unleased(thread_id, checkpoint_ns, checkpoint_id, with_history)
        if cached is not None and hit is None and checkpoint_id is None:
            return self._latest_missed_here(thread_id, checkpoint_ns, config, with_history)
        return self._sync(self._get_tuple(config))

    def _latest_missed_here(
        self, thread_id: str, checkpoint_ns: str, config: RunnableConfig, with_history: bool
    ) -> CheckpointTuple | None:
        """`_get_tuple` past a miss of the latest checkpoint: the fill lease taken from the
        caller's thread, and the cold read made there too unless the loop thread is needed
        (a backlog to flush first, a store with no blocking reads). A checkpoint found goes
        into the cache from the loop thread; a new thread has none, and needs no hand-over."""
        assert self._blocking_cache is not None
        leased = self._blocking_cache.lease_blocking(thread_id, checkpoint_ns)
        if leased is None:
            return self._sync(self._get_tuple(config))
        if leased.unreachable:
            return self._read_unleased(thread_id, checkpoint_ns, None, with_history)
        cold = self._blocking_cold
        if cold is None or leased.backlog:
            return self._sync(
                self._cold_read(
                    thread_id, checkpoint_ns, None, with_history, leased.lease, leased.backlog
                )
            )
        with self._closed_under_call():
            stored = cold.get_checkpoint_blocking(
                thread_id, checkpoint_ns, None, with_history=with_history
            )
        if stored is not None:
            stored = self._sync(self._filled(stored, leased.lease))
        self._note_cold_read(stored, thread_id, checkpoint_ns, None)
        return None if stored is None else self._tuple(stored, keep_inline=True)

    def _read_unleased(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None, with_history: bool
    ) -> CheckpointTuple | None:
        """A sync read the cache cannot serve and will not be filled by (Redis failed the
        lookup, or a checkpoint older than the cached one is named): the cold tier, as
        `_get_tuple` goes on past such a lookup; on the caller's thread when no backlog has
        to be flushed first (write-through) and the store reads blocking."""
        if self.flusher is not None or self._blocking_cold is None:
            return self._sync(
                self._cold_read(thread_id, checkpoint_ns, checkpoint_id, with_history, None, None)
            )
        return self._cold_read_here(
            self._blocking_cold, thread_id, checkpoint_ns, checkpoint_id, with_history
        )

    def _cold_read_here(
        self,
        store: BlockingCheckpointStore,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str | None,
        with_history: bool,
    ) -> CheckpointTuple | None:
        with self._closed_under_call():
            stored = store.get_checkpoint_blocking(
                thread_id, checkpoint_ns, checkpoint_id, with_history=with_history, spared=False
            )
        if stored is not None and (stored.blobs is None or stored.writes is None):
            stored = self._sync(self._complete(stored))
        self._note_cold_read(stored, thread_id, checkpoint_ns, checkpoint_id)
        return None if stored is None else self._tuple(stored, keep_inline=True)

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        found = self._list(config, filter=filter, before=before, limit=limit)
        try:
            # A batch per hop to the loop thread, not an item: a hop costs as much as a
            # small read.
            while batch := self._sync(_take(found, SYNC_LIST_BATCH)):
                yield from batch
                if len(batch) < SYNC_LIST_BATCH:
                    return
        finally:
            # Not handed to a loop that is not running (refused only after the wait for a
            # starting loop, in place of the refusal at hand): `found` never started then,
            # or its loop's async generator finalizer closes it. Refused, the saver closed
            # (this generator kept past that): its loop's shutdown closed `found` already.
            if self.loop.is_running():
                with contextlib.suppress(SaverClosed, SaverLoopStopped):
                    self._sync(_close(found))

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        if (
            self._blocking_store is None
            and self._blocking is None
            and not self._writes_through_here
        ):
            return self._sync(self._put(config, checkpoint, metadata, new_versions))
        with self._caller_call():
            return self._put_here(config, checkpoint, metadata, new_versions)

    def _put_here(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """`put` on the caller's thread: to the cold tier without a hot one, to both in
        write-through mode, else the write-behind append."""
        if self._blocking_store is not None:
            put = self._prepared_put(config, checkpoint, metadata, new_versions)
            self._admit_blocking(put.stored.thread_id, put.fence)
            with self._closed_under_call():
                self._blocking_store.put_checkpoint_blocking(put.stored, put.blobs)
            return self._put_done(put)
        if self._writes_through_here:
            put = self._prepared_put(config, checkpoint, metadata, new_versions)
            self._put_through_here(put)
            return self._put_done(put)
        # Write-behind: the append from this thread; the loop thread only for what needs
        # it (a boundary's flush, the cold write when Redis fails).
        put = self._prepared_put(config, checkpoint, metadata, new_versions)
        self.store.check_checkpoint(put.stored, put.blobs)  # as `_put`
        blocking = self._blocking
        assert blocking is not None

        def append(parent_stored: bool) -> None:
            self._fenced_blocking(
                put.stored.thread_id,
                put.fence,
                lambda checked: blocking.append_put_blocking(
                    put.stored,
                    put.blobs,
                    fence=put.fence,
                    fence_checked=checked,
                    parent_stored=parent_stored,
                ),
            )

        try:
            try:
                append(parent_stored=False)
            except UnknownParent as unknown:
                self._sync(self._parent_stored(put, fork=unknown.fork))
                append(parent_stored=True)
        except HotStateLost:
            raise
        except LogEntryTooLarge:
            self._sync(self._put_cold_instead(put, checkpoint, redis_up=True))
        except BackendUnavailable as exc:
            self._raise_unless_redis(exc)
            self._sync(self._put_cold_instead(put, checkpoint))
        else:
            self._appended(put)
            self._boundary_sync(put.stored.thread_id, self._is_boundary(put))
        return self._put_done(put)

    def _put_through_here(self, put: _Put) -> None:
        """`_put`'s write-through with a hot tier, on the caller's thread: the cold write,
        then the cache's advance (a parent the store finds gone, on the loop thread)."""
        assert self._blocking_cold is not None and self._blocking_cache is not None
        stored = put.stored
        self._admit_blocking(stored.thread_id, put.fence)
        try:
            try:
                with self._closed_under_call():
                    self._blocking_cold.put_checkpoint_blocking(stored, put.blobs)
            except ParentGone as refused:
                self._sync(self._put_vouched(put, refused))
            self._blocking_cache.advance_blocking(stored, put.blobs)
        except BaseException:
            self._distrust_hot_copy(stored.thread_id, stored.checkpoint_ns)  # as `_put`
            raise

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        if (
            self._blocking_store is None
            and self._blocking is None
            and not self._writes_through_here
        ):
            self._sync(self._put_writes(config, writes, task_id, task_path))
            return
        with self._caller_call():
            self._put_writes_here(config, writes, task_id, task_path)

    def _put_writes_here(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str,
    ) -> None:
        """`put_writes` on the caller's thread, as `_put_here`."""
        if self._blocking_store is not None:
            writes_put = self._prepared_writes(config, writes, task_id, task_path)
            try:
                self._admit_blocking(writes_put.thread_id, writes_put.fence)
                with self._closed_under_call():
                    self._blocking_store.put_writes_blocking(
                        writes_put.thread_id,
                        writes_put.checkpoint_ns,
                        writes_put.checkpoint_id,
                        writes_put.writes,
                        upsert=writes_put.upsert,
                    )
            except BaseException:
                self._chains.forget(writes_put.thread_id)  # as `_put_writes`
                raise
            self._writes_done(writes_put)
            return
        if self._writes_through_here:
            through = self._prepared_writes(config, writes, task_id, task_path)
            try:
                self._store_writes_here(through)
            except BaseException:
                self._chains.forget(through.thread_id)  # as `_put_writes`
                raise
            self._writes_done(through)
            return
        put = self._prepared_writes(config, writes, task_id, task_path)
        self._note_boundary(put)
        blocking = self._blocking
        assert blocking is not None
        try:
            try:
                self._fenced_blocking(
                    put.thread_id,
                    put.fence,
                    lambda checked: blocking.append_writes_blocking(
                        put.thread_id,
                        put.checkpoint_ns,
                        put.checkpoint_id,
                        put.writes,
                        upsert=put.upsert,
                        fence=put.fence,
                        fence_checked=checked,
                    ),
                )
            except LogEntryTooLarge:
                self._sync(self._writes_cold_instead(put, redis_up=True))
            except BackendUnavailable as exc:
                self._raise_unless_redis(exc)
                self._sync(self._writes_cold_instead(put))
            else:
                self._written_through.discard(put.thread_id)
                self._writes_appended(put)
                self._boundary_sync(put.thread_id, self._is_boundary(put))
        except BaseException:
            self._chains.forget(put.thread_id)  # stored or not, this process cannot tell
            raise
        self._writes_done(put)

    def _store_writes_here(self, put: _Writes) -> None:
        """`_store_writes` in write-through mode with a hot tier, on the caller's thread."""
        assert self._blocking_cold is not None and self._blocking_cache is not None
        self._note_boundary(put)
        self._admit_blocking(put.thread_id, put.fence)
        address = (put.thread_id, put.checkpoint_ns, put.checkpoint_id)
        try:
            with self._closed_under_call():
                self._blocking_cold.put_writes_blocking(*address, put.writes, upsert=put.upsert)
            self._blocking_cache.add_writes_blocking(*address, put.writes, upsert=put.upsert)
        except BaseException:
            self._distrust_hot_copy(put.thread_id, put.checkpoint_ns)  # as `_store_writes`
            raise

    def get_delta_channel_history(
        self, *, config: RunnableConfig, channels: Sequence[str]
    ) -> Mapping[str, DeltaChannelHistory]:
        return self._sync(self._delta_history(config, channels))

    def flush(self, thread_id: str) -> None:
        """Synchronous `aflush`."""
        # Refused from the saver's loop even in write-through mode: code that works there
        # would hang once switched to write-behind.
        self._refuse_on_loop()
        named = _named("thread id", thread_id)
        if self.flusher is not None:
            self._sync(self._flush_thread(named))

    def delete_thread(self, thread_id: str) -> None:
        self._sync(self._delete_thread(_named("thread id", thread_id)))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._sync(self._delete_for_runs(_run_ids(run_ids)))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._sync(
            self._copy_thread(
                _named("thread id", source_thread_id), _named("thread id", target_thread_id)
            )
        )

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self._sync(self._prune(thread_ids, strategy))

    def get_next_version(self, current: str | None, channel: None) -> str:
        """Monotonic, with a random tail: two forks of one parent never share a blob key."""
        if current is None:
            current_v = 0
        elif isinstance(current, int):
            current_v = current
        else:
            current_v = int(current.split(".")[0])
        return f"{current_v + 1:032}.{random.random():016}"

    # ----------------------------------------------------------------------- loop bridging

    async def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._backends is not None and self._backends.closed:
            coro.close()
            raise SaverClosed()
        if asyncio.get_running_loop() is self.loop:
            return await coro
        if self.forked:  # see `_refuse_forked`
            coro.close()
            raise SaverForked()
        try:
            for pause in self._loop_start_pauses():
                await asyncio.sleep(pause)
            ended: _Ended[T] = _Ended()
            ending = _ending(coro, ended)
            try:
                call = asyncio.run_coroutine_threadsafe(ending, self.loop)
            except RuntimeError:
                ending.close()
                raise
        except (SaverLoopStopped, RuntimeError):
            coro.close()
            # RuntimeError: the loop closed between the look and the hand-over.
            raise SaverClosed() if self._closed else SaverLoopStopped() from None
        called = asyncio.wrap_future(call)
        try:
            while not call.done():
                if (await asyncio.wait({called}, timeout=LOOP_CLOSED_POLL_SECONDS))[0]:
                    break
                if self._ended_unsaid(call, ended):
                    break
                self._refuse_loop_closed(call, ending, coro)
        except asyncio.CancelledError:
            called.cancel()  # as awaiting `called` itself would: the call on the loop too
            raise
        # The call may have ended just before its loop closed, its result still on the way
        # to this loop: `call` has it already (and `called`, cancelled, drops its copy).
        called.cancel()
        try:
            if not call.done():
                return ended.outcome()
            return call.result()
        except concurrent.futures.CancelledError:
            # Cut off on the loop, not cancelled here, as `_sync` tells its callers.
            raise self._cut_off() from None
        except BackendClosed:
            if self._closed:
                raise SaverClosed() from None
            raise

    def _sync(self, coro: Coroutine[Any, Any, T]) -> T:
        ended: _Ended[T] = _Ended()
        tracked = self._tracked(coro, ended)
        try:
            with self._caller_call():
                for pause in self._loop_start_pauses():
                    time.sleep(pause)
                call = asyncio.run_coroutine_threadsafe(tracked, self.loop)
        # SaverForked too: refused before the hand-over, its coroutines closed all the same
        # (never awaited, each would warn in the child's log).
        except (asyncio.InvalidStateError, SaverClosed, SaverForked, RuntimeError):
            tracked.close()
            coro.close()
            if self._closed:
                raise SaverClosed() from None
            if self.loop.is_closed():  # closed between the look and the hand-over
                raise SaverLoopStopped() from None
            raise
        try:
            while True:
                with contextlib.suppress(concurrent.futures.TimeoutError):
                    return call.result(timeout=LOOP_CLOSED_POLL_SECONDS)
                if call.done():  # the call's own TimeoutError
                    return call.result()
                if self._ended_unsaid(call, ended):
                    return ended.outcome()
                self._refuse_loop_closed(call, tracked, coro)
        except concurrent.futures.CancelledError:
            raise self._cut_off() from None
        except BackendClosed:
            if self._closed:
                raise SaverClosed() from None
            raise

    def _cut_off(self) -> SaverClosed | SaverLoopStopped:
        """What a caller gets for its call cancelled on the saver loop (it never asked for
        that): the saver's close cancelled what still ran there, or else the loop's owner
        ended it (`asyncio.run` cancels the tasks left as it returns)."""
        return SaverClosed() if self._closed else SaverLoopStopped()

    async def _tracked(self, coro: Coroutine[Any, Any, T], ended: _Ended[T]) -> T:
        """A sync call's coroutine on the loop thread, known to `_settle_in_flight`."""
        if self._settling:
            coro.close()
            raise SaverClosed()
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        try:
            return await _ending(coro, ended)
        finally:
            self._in_flight.discard(task)

    async def _settle_in_flight(self, wait_seconds: float) -> None:
        """As the saver closes, before its backends do: no sync call starts on the loop
        thread any more, those running finish (within `wait_seconds`; the rest are cancelled,
        their callers get `SaverClosed`)."""
        self._settling = True
        running = set(self._in_flight)
        if not running:
            return
        _, late = await asyncio.wait(running, timeout=wait_seconds)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    @contextmanager
    def _caller_call(self) -> Iterator[None]:
        """Around a sync call's work on its caller's thread: refused once the saver is
        closed (and from its loop), and waited for by the close."""
        with self._callers_done:
            self._refuse_on_loop()
            self._callers += 1
        try:
            yield
        finally:
            with self._callers_done:
                self._callers -= 1
                if not self._callers:
                    self._callers_done.notify_all()

    def _close_to_callers(self, wait_seconds: float) -> None:
        """As `open_sync` closes the saver, first: no sync call starts any more, those at
        work on their callers' threads finish (within `wait_seconds`; bounded by the
        clients' own timeouts, and the next hand-over of each is refused)."""
        with self._callers_done:
            self._closed = True
            self._callers_done.wait_for(lambda: not self._callers, wait_seconds)

    @contextmanager
    def _closed_under_call(self) -> Iterator[None]:
        """Around a sync call's own backend request: the saver closed while the call was
        on its way is `SaverClosed`, as for a call that hands over to the loop thread."""
        try:
            yield
        except BackendClosed:
            if self._closed:
                raise SaverClosed() from None
            raise

    def _refuse_on_loop(self) -> None:
        """Checked first by every sync call: refused after the saver was closed, and from the
        loop it would wait for, and in a forked child."""
        self._refuse_forked()
        self._refuse_closed()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return
        if running is self.loop:
            raise SyncCallOnSaverLoop()

    def _refuse_closed(self) -> None:
        """Refused once `open_sync` closed the saver, or the owner of the backends it was
        built on (`from_backends`) closed them."""
        if self._closed or (self._backends is not None and self._backends.closed):
            raise SaverClosed()

    @property
    def forked(self) -> bool:
        """Whether this is a forked child's copy of a saver its parent opened."""
        return os.getpid() != self._pid

    def _refuse_forked(self) -> None:
        """A forked child's call would wait forever for the loop thread (threads do not
        survive a fork), or send over sockets the parent shares and read its replies."""
        if self.forked:
            raise SaverForked()

    def _loop_start_pauses(self) -> Iterator[float]:
        """The pauses a hand-over makes before it gives its call to the loop: none while the
        loop runs; while it is not running yet (its thread starting, `run_forever` not begun)
        up to `LOOP_START_WAIT_SECONDS`, then `SaverLoopStopped`, and at once for a closed
        loop: a loop not running (the caller's own between `run_until_complete` calls, one
        `asyncio.run` closed) would never run the call, and its caller would wait forever."""
        deadline: float | None = None
        while not self.loop.is_running():
            now = time.monotonic()
            deadline = now + LOOP_START_WAIT_SECONDS if deadline is None else deadline
            if self._closed or self.loop.is_closed() or now >= deadline:
                raise SaverLoopStopped()  # `SaverClosed` instead once closed: see the callers
            yield LOOP_START_POLL_SECONDS

    def _ended_unsaid(self, call: concurrent.futures.Future[Any], ended: _Ended[Any]) -> bool:
        """The call ended in the very turn its loop was stopped in, and the loop closed
        before its next turn would have told `call` (a task's end reaches its future a turn
        later): `ended` holds what it returned or raised."""
        return self.loop.is_closed() and not call.done() and ended.done

    def _refuse_loop_closed(
        self, call: concurrent.futures.Future[Any], *handed: Coroutine[Any, Any, Any]
    ) -> None:
        """While a caller waits for its call handed to the loop: a loop closed since will
        never finish it, unless it did just before closing (its result on the way: looked at
        after the loop, it is seen). The call's coroutines it never started are closed (else
        each warns it was never awaited); one it left suspended is left as it is."""
        if not self.loop.is_closed() or call.done():
            return
        for coro in handed:
            if inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
                coro.close()
        raise SaverClosed() if self._closed else SaverLoopStopped()

    def _boundary_sync(self, thread_id: str, boundary: bool) -> None:
        """`_boundary` after a sync caller's own append: a boundary's flush waits on the
        loop thread; otherwise the flusher is told, without waiting for it (nor waking the
        loop thread, unless the flusher waits for work)."""
        assert self.flusher is not None
        if boundary:
            self._sync(self._flush_thread(thread_id))
        else:
            self.flusher.notify_from_thread(thread_id)

    # ----------------------------------------------------------------------- operations

    async def _get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        thread_id, checkpoint_ns, checkpoint_id = _address(config)
        self._note_run_start(config, thread_id, checkpoint_ns, checkpoint_id)
        if checkpoint_id is None and self._chains.take_new(thread_id, checkpoint_ns):
            return None
        with_history = self._with_history(thread_id, checkpoint_ns, checkpoint_id)
        lease, backlog = None, None
        if self.cache is not None:
            cached = await self.cache.lookup(
                thread_id, checkpoint_ns, lease=checkpoint_id is None, with_history=with_history
            )
            hit = cached.checkpoint
            if hit is not None and checkpoint_id in (None, hit.checkpoint_id):
                return self._hit(hit, cached.history, latest=checkpoint_id is None)
            lease, backlog = cached.lease, cached.backlog
        return await self._cold_read(
            thread_id, checkpoint_ns, checkpoint_id, with_history, lease, backlog
        )

    async def _cold_read(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str | None,
        with_history: bool,
        lease: str | None,
        backlog: bool | None,
    ) -> CheckpointTuple | None:
        """`_get_tuple` past a miss of the hot tier: the thread's backlog flushed, the cold
        tier read, and what it holds put in the cache under the miss's `lease`."""
        if self.flusher is not None:
            await self.flusher.settle_thread(thread_id, pending=backlog)
        # Not a checkpoint kept only for a later one's DeltaChannel history: deleted to the
        # caller (as LangGraph's savers answer, None), and a put going on from one is refused.
        stored = await self.store.get_checkpoint(
            thread_id, checkpoint_ns, checkpoint_id, with_history=with_history, spared=False
        )
        if stored is not None:
            stored = await self._filled(stored, lease)  # its history with it, when it has one
        self._note_cold_read(stored, thread_id, checkpoint_ns, checkpoint_id)
        if stored is None:
            return None
        return self._tuple(stored, keep_inline=True)

    async def _filled(self, stored: StoredCheckpoint, lease: str | None) -> StoredCheckpoint:
        """A latest checkpoint read from the cold tier, completed, and into the cache."""
        stored = await self._complete(stored)
        if self.cache is not None and lease is not None:
            await self.cache.fill(stored, lease)
        return stored

    def _note_cold_read(
        self,
        stored: StoredCheckpoint | None,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str | None,
    ) -> None:
        """What a read of the cold tier found (None: nothing), for the chains."""
        if stored is None:
            if checkpoint_id is None:
                self._chains.found_empty(thread_id, checkpoint_ns)
            return
        self._chains.loaded(stored, latest=checkpoint_id is None)
        if stored.history is not None:
            self._remember_history(stored, stored.history)

    def _with_history(self, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None) -> bool:
        """Whether a read should bring the checkpoint's delta history along. This process's
        own chain of the thread has the history of its head: when that is the checkpoint
        asked for (as it is while one worker runs a thread), neither tier need send it
        again. Another process's newer checkpoint has none then, and LangGraph's history
        request that follows reads it (`_delta_history`)."""
        head = self._chains.head(thread_id, checkpoint_ns)
        return head is None or checkpoint_id not in (None, head)

    def _hit(
        self,
        hit: StoredCheckpoint,
        history: dict[str, ChannelHistory] | None,
        *,
        latest: bool,
    ) -> CheckpointTuple:
        self._chains.loaded(hit, latest=latest)
        if history is not None:
            self._remember_history(hit, history)
        return self._tuple(hit, keep_inline=True)

    async def _list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None,
        before: RunnableConfig | None,
        limit: int | None,
    ) -> AsyncGenerator[CheckpointTuple, None]:
        configurable = (config or {}).get("configurable") or {}
        thread_id = None
        if "thread_id" in configurable:
            (thread_id,) = _sendable("thread id", [_thread_of(configurable)])
        # None (or none given): every namespace.
        checkpoint_ns = (
            None if configurable.get("checkpoint_ns") is None else _namespace(configurable)
        )
        if checkpoint_ns is not None:
            _sendable("checkpoint namespace", [checkpoint_ns])
        # No stored metadata holds what this refuses: found nothing, or refused (Postgres).
        storable_json("checkpoints", "metadata filter", filter)
        # As in `_address`: an empty id names no checkpoint, so it bounds nothing.
        before_id = (get_checkpoint_id(before) if before else None) or None
        if self.flusher is not None:
            if thread_id is not None:
                await self.flusher.settle_thread(thread_id)
            else:
                await self.flusher.settle_all()
        checkpoint_id = configurable.get("checkpoint_id")
        if thread_id is not None and checkpoint_ns is not None and checkpoint_id:
            # One named checkpoint: a point read, then the same filters as a listing.
            found = await self.store.get_checkpoint(
                thread_id, checkpoint_ns, checkpoint_id, spared=False
            )
            if (
                found is not None
                and (limit is None or limit > 0)
                and (before_id is None or found.checkpoint_id < before_id)
                and all(found.metadata.get(k) == v for k, v in (filter or {}).items())
            ):
                yield self._tuple(await self._complete(found))
            return
        # No namespace named: every namespace, as LangGraph's savers do (also for a named
        # checkpoint, a subgraph's found by its id alone). Not the checkpoints of deleted
        # runs kept only for a later one's DeltaChannel history: deleted to the caller, and
        # a put going on from one is refused (`ParentGone`).
        async for stored in self.store.list_checkpoints(
            thread_id=thread_id,
            checkpoint_ns=checkpoint_ns,
            before=before_id,
            limit=limit,
            metadata_filter=filter,
            checkpoint_id=checkpoint_id or None,
            spared=False,
        ):
            yield self._tuple(await self._complete(stored))

    async def _put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        put = self._prepared_put(config, checkpoint, metadata, new_versions)
        thread_id = put.stored.thread_id
        if self.flusher is None:
            await self._admit(thread_id, put.fence, hot=True)
            try:
                await self._put_through(put)
                if self.cache is not None:
                    await self.cache.advance(put.stored, put.blobs)
            except BaseException:
                # Cancelled or failed, the cold write may have landed all the same (its
                # reply lost): the hot copy, still showing the parent, must not be served.
                self._distrust_hot_copy(thread_id, put.stored.checkpoint_ns)
                raise
        else:
            # Acknowledged, a put the cold store refuses would block the thread's log for good.
            self.store.check_checkpoint(put.stored, put.blobs)
            log = self.flusher.log

            async def append(parent_stored: bool) -> None:
                await self._fenced(
                    thread_id,
                    put.fence,
                    lambda checked: log.append_put(
                        put.stored,
                        put.blobs,
                        fence=put.fence,
                        fence_checked=checked,
                        parent_stored=parent_stored,
                    ),
                )

            try:
                try:
                    await append(parent_stored=False)
                except UnknownParent as unknown:
                    await self._parent_stored(put, fork=unknown.fork)
                    await append(parent_stored=True)
            except HotStateLost:
                raise
            except LogEntryTooLarge:
                await self._put_cold_instead(put, checkpoint, redis_up=True)
            except BackendUnavailable as exc:
                self._raise_unless_redis(exc)
                await self._put_cold_instead(put, checkpoint)
            else:
                self._appended(put)
                await self._boundary(thread_id, self._is_boundary(put))
        return self._put_done(put)

    async def _put_through(self, put: _Put) -> None:
        """A write-through put, which the store refuses if its parent is gone (a run
        `delete_for_runs` deleted under it: stored, its step would be the thread's latest).
        Then only a hot tier holding that parent as the namespace's latest, with the
        thread's write-behind log not empty, vouches for it (a write-behind process's put
        its flusher has not stored yet): a look only on refusal, so a put costs no round
        trip more."""
        try:
            await self.store.put_checkpoint(put.stored, put.blobs)
        except ParentGone as refused:
            await self._put_vouched(put, refused)

    async def _put_vouched(self, put: _Put, refused: ParentGone) -> None:
        """The put `refused` for its parent gone, stored again if the hot tier vouches for
        that parent."""
        if not await self._hot_head_is_parent(put.stored):
            raise refused
        await self.store.put_checkpoint(put.stored, put.blobs, parent_vouched=True)

    async def _hot_head_is_parent(self, stored: StoredCheckpoint) -> bool:
        if self.cache is None:
            return False
        found = await self.cache.lookup(
            stored.thread_id, stored.checkpoint_ns, lease=False, with_history=False
        )
        head = found.checkpoint
        if head is None or head.checkpoint_id != stored.parent_checkpoint_id:
            return False
        # A head the log does not hold was stored cold: gone now, it was deleted (the
        # deleter drops the hot copy only after its cold delete, or never if Redis failed).
        return await self.cache.logged(stored.thread_id)

    async def _parent_stored(self, put: _Put, *, fork: bool) -> None:
        """The hot tier has no trace of the put's parent: unless the cold tier has it (a fork,
        a cache entry gone after its flush), Redis lost it, and the run cannot go on. Not
        when it holds a newer checkpoint as the namespace's latest (`fork`), nor when the
        cold tier does (a prune took the parent and the cached head with it), nor when the
        parent is one delete_for_runs kept only for a later checkpoint's DeltaChannel
        history (a deleted run's), nor when the thread was deleted since the parent was made
        (the log's mark of it): then the parent is gone, and the put refused as a
        write-through put is (`ParentGone`), not flushed onto it later. A step Redis lost
        is newer than every flushed one, as the log flushes in order."""
        stored = put.stored
        thread_id, checkpoint_ns = stored.thread_id, stored.checkpoint_ns
        parent = stored.parent_checkpoint_id
        assert parent is not None
        if await self._in_cold(thread_id, checkpoint_ns, parent, spared=False):
            return
        if (
            fork
            or await self._in_cold(thread_id, checkpoint_ns, parent)
            or await self._gone(thread_id, checkpoint_ns, parent)
        ):
            raise ParentGone(thread_id, checkpoint_ns, parent)
        # Marked, not only forgotten: in a subgraph LangGraph drops this error as the
        # subgraph exits with an interrupt, and the run's later boundaries must fail.
        await self._mark_lost(thread_id)
        raise HotStateLost(thread_id, parent)

    async def _in_cold(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str, *, spared: bool = True
    ) -> bool:
        found = await self.store.get_checkpoint(
            thread_id, checkpoint_ns, checkpoint_id, with_history=False, spared=spared
        )
        return found is not None

    def _appended(self, put: _Put) -> None:
        """A put is in the hot log: the thread's next boundary checks it reached the cold tier."""
        stored = put.stored
        self._written_through.discard(stored.thread_id)
        with self._histories_lock:
            heads = self._unconfirmed.setdefault(stored.thread_id, {})
            heads[stored.checkpoint_ns] = stored.checkpoint_id
            self._drop_superseded_writes(
                stored.thread_id, stored.checkpoint_ns, stored.checkpoint_id
            )
            self._unconfirmed.move_to_end(stored.thread_id)
            # Threads the background flush alone drains are never confirmed: keep the newest.
            while len(self._unconfirmed) > HISTORY_MEMO_SIZE:
                self._unconfirmed.popitem(last=False)

    def _drop_superseded_writes(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str
    ) -> None:
        """A put of the namespace supersedes the writes tracked on an older checkpoint (its
        own values hold their effect), not those on itself or a newer one: with durability
        "async" LangGraph saves a step's checkpoint and its tasks' writes concurrently, so
        they can arrive first, and no cold copy of the checkpoint holds them (under
        `_histories_lock`)."""
        spaces = self._unconfirmed_writes.get(thread_id, {})
        known = spaces.get(checkpoint_ns)
        if known is not None and known[0] < checkpoint_id:
            del spaces[checkpoint_ns]

    def _prepared_put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> _Put:
        configurable = config["configurable"]
        thread_id = _writable_thread(configurable)
        checkpoint_ns = _namespace(configurable)
        parent_id = configurable.get("checkpoint_id")
        values = checkpoint["channel_values"]
        versions = checkpoint["channel_versions"]
        _refuse_unstorable("checkpoint namespace", [checkpoint_ns])
        _refuse_unstorable("channel name", itertools.chain(values, versions, new_versions))
        kept = self._kept_inline.of(thread_id, checkpoint_ns, parent_id)
        inline: dict[str, Any] = {}
        inline_bytes: dict[str, TypedBytes] = {}
        for channel, value in values.items():
            if kept is not None and channel not in new_versions:
                # Unchanged since the parent: its value as stored then, not the live one.
                was = kept.get(channel)
                if was is None:
                    continue  # a blob at the parent: that version's holds it
                if was[0] == versions.get(channel):
                    inline_bytes[channel] = was[1]
                    inline[channel] = self.serde.loads_typed(was[1])
                    continue
            if _inline(value):
                inline[channel] = value
                inline_bytes[channel] = self.serde.dumps_typed(value)
        carried = []
        for channel, (version, data) in (kept or {}).items():
            # A channel the running graph lacks (another graph's on the thread, or an older
            # release's) keeps its version, and a checkpoint's value is its version's, as
            # LangGraph's savers read it: an inline one is carried, not lost (a blob's
            # version holds its value already).
            unchanged = channel not in values and channel not in new_versions
            if unchanged and version is not None and version == versions.get(channel):
                inline_bytes[channel] = data
                inline[channel] = self.serde.loads_typed(data)
                carried.append(channel)
        # LangGraph's `__copy__` (a fork) puts an older checkpoint's versions under that
        # checkpoint's parent, with no new versions: what changed at the copied checkpoint
        # (its input, a DeltaChannel snapshot) is held by no ancestor of the copy, and a
        # store that finds values through the parent (Cosmos) would lose it. A fork stores
        # its values whole.
        stored_versions = versions if metadata.get("source") == "fork" else new_versions
        blobs = [
            StoredBlob(channel, version, self.serde.dumps_typed(values[channel]))
            for channel, version in stored_versions.items()
            if channel in values and channel not in inline
        ]
        # LangGraph drops a NUL from a top-level string (its own savers' rule); one left
        # deeper, or in a key, or a lone surrogate anywhere is refused here, before
        # write-behind acknowledges a step Postgres would refuse to flush.
        stored_metadata = dict(get_serializable_checkpoint_metadata(config, metadata))
        storable_json("checkpoints", "metadata key or value", stored_metadata)
        stored = StoredCheckpoint(
            thread_id=thread_id,
            checkpoint_ns=checkpoint_ns,
            checkpoint_id=checkpoint["id"],
            parent_checkpoint_id=parent_id,
            checkpoint=dump_checkpoint(self.serde, checkpoint, inline),
            metadata=stored_metadata,
            channel_versions=dict(versions),
        )
        return _Put(
            stored,
            blobs,
            inline,
            inline_bytes,
            present=[*values, *carried],
            fence=configurable.get(FENCING_TOKEN_KEY),
            boundary=configurable.get(DURABILITY_KEY) in SYNCHRONOUS_DURABILITY
            or metadata.get("source") in OUTSIDE_RUN_SOURCES,
        )

    async def _put_cold_instead(
        self, put: _Put, checkpoint: Checkpoint, *, redis_up: bool = False
    ) -> None:
        """Write-behind with Redis out, or a put too large for a log entry (`LogEntryTooLarge`):
        the checkpoint goes straight to the cold tier, every value with it (the log holding
        the older ones may never drain), and the hot copy is not trusted any more. It stands
        on its own unless a DeltaChannel is rebuilt from ancestors only the log may hold
        (then as `_writes_cold_instead`). `redis_up` (a put too large): its fence checked and
        raised in Redis as an append's is, or a stale writer's appends would still pass; its
        parent checked as an append's is (a parent deleted since refuses it); and the hot
        copy dropped at once (`_drop_hot_copy`)."""
        thread_id = put.stored.thread_id
        await self._admit(thread_id, put.fence, hot=redis_up)
        values = checkpoint["channel_values"]
        every_value = [
            StoredBlob(channel, version, self.serde.dumps_typed(values[channel]))
            for channel, version in checkpoint["channel_versions"].items()
            if channel in values and channel not in put.inline
        ]
        try:
            await self._put_cold_checked(put, every_value, redis_up=redis_up)
        except BaseException:
            # As a write-through put's: it may have landed all the same (its reply lost).
            self._distrust_hot_copy(thread_id, put.stored.checkpoint_ns)
            raise
        await self._drop_hot_copy(thread_id, put.stored.checkpoint_ns, redis_up=redis_up)
        # A DeltaChannel's value is not among them: it is rebuilt from the ancestors' writes,
        # which may be in the Redis log alone.
        rebuilt = bool(put.stored.metadata.get("counters_since_delta_snapshot"))
        if not rebuilt:
            # The namespace's newest state is this cold checkpoint, whole: no put of it the
            # log holds is needed any more (writes on it sent before it still are).
            with self._histories_lock:
                self._unconfirmed.get(thread_id, {}).pop(put.stored.checkpoint_ns, None)
                self._drop_superseded_writes(
                    thread_id, put.stored.checkpoint_ns, put.stored.checkpoint_id
                )
            self._written_through.add(thread_id)
        elif await self._stands_alone(thread_id, put.stored.checkpoint_ns):
            self._written_through.add(thread_id)
        elif self._is_boundary(put):
            await self._flush_thread(thread_id)

    def _is_boundary(self, put: _Put | _Writes) -> bool:
        """Whether a put or writes, once in the hot log or the cold tier, are a boundary:
        asked for as one, or at the checkpoint a boundary's writes named earlier in the run
        (its own late put, a sibling task's result). Asked after the append, so that either
        the boundary's flush or this call's own covers it."""
        if put.boundary:
            return True
        address = put.stored if isinstance(put, _Put) else put
        with self._histories_lock:
            named = self._boundary_checkpoints.get(address.thread_id, {})
            return named.get(address.checkpoint_ns) == address.checkpoint_id

    def _put_done(self, put: _Put) -> RunnableConfig:
        stored = put.stored
        self._chains.put(
            stored.thread_id,
            stored.checkpoint_ns,
            stored.checkpoint_id,
            stored.parent_checkpoint_id,
            put.present,
            {blob.channel: blob.value for blob in put.blobs} | put.inline_bytes,
        )
        self._kept_inline.keep(
            stored.thread_id,
            stored.checkpoint_ns,
            stored.checkpoint_id,
            {
                channel: (stored.channel_versions.get(channel), value)
                for channel, value in put.inline_bytes.items()
            },
        )
        return {
            "configurable": {
                "thread_id": stored.thread_id,
                "checkpoint_ns": stored.checkpoint_ns,
                "checkpoint_id": stored.checkpoint_id,
            }
        }

    async def _put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str,
    ) -> None:
        put = self._prepared_writes(config, writes, task_id, task_path)
        try:
            await self._store_writes(put)
        except BaseException:
            # Stored or not, this process cannot tell: its chain of the thread goes.
            self._chains.forget(put.thread_id)
            raise
        self._writes_done(put)

    def _prepared_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str,
    ) -> _Writes:
        configurable = config["configurable"]
        _refuse_unstorable(
            "checkpoint namespace, task id or task path",
            [_namespace(configurable), task_id, task_path],
        )
        _refuse_unstorable("channel name", (channel for channel, _ in writes))
        # Special channels (errors, interrupts, resume) replace; ordinary writes are
        # keyed by position and a repeat is ignored, as in LangGraph's own savers.
        upsert = all(channel in WRITES_IDX_MAP for channel, _ in writes)
        # One rule for every store: a (task_id, idx) repeated inside one call keeps its
        # first write, or its last when the writes replace (two interrupts of one task).
        by_key: dict[int, StoredWrite] = {}
        for idx, (channel, value) in enumerate(writes):
            key = WRITES_IDX_MAP.get(channel, idx)
            if upsert or key not in by_key:
                by_key[key] = StoredWrite(
                    task_id, task_path, key, channel, dump_value(self.serde, value)
                )
        return _Writes(
            thread_id=_writable_thread(configurable),
            checkpoint_ns=_namespace(configurable),
            checkpoint_id=configurable["checkpoint_id"],
            writes=list(by_key.values()),
            upsert=upsert,
            fence=configurable.get(FENCING_TOKEN_KEY),
            boundary=configurable.get(DURABILITY_KEY) in SYNCHRONOUS_DURABILITY
            or any(channel in BOUNDARY_CHANNELS for channel, _ in writes),
        )

    def _writes_done(self, put: _Writes) -> None:
        self._chains.put_writes(
            put.thread_id, put.checkpoint_ns, put.checkpoint_id, put.writes, upsert=put.upsert
        )

    def _note_run_start(
        self, config: RunnableConfig, thread_id: str, checkpoint_ns: str, checkpoint_id: str | None
    ) -> None:
        """A run starts over from what the tiers hold: the thread is no longer lost, and the
        boundaries of its last run are behind it. So are its steps no boundary acknowledged:
        another worker may have flushed and deleted them since (`delete_for_runs`), and
        Redis losing them is the documented loss window, not this run's loss. LangGraph
        reads the latest checkpoint as a run starts, from a given checkpoint too."""
        if checkpoint_ns == "" and checkpoint_id is None and _starts_run(config):
            with self._histories_lock:
                self._lost.pop(thread_id, None)
                self._boundary_checkpoints.pop(thread_id, None)
                self._unconfirmed.pop(thread_id, None)
                self._unconfirmed_writes.pop(thread_id, None)

    def _writes_appended(self, put: _Writes) -> None:
        keys = {(w.task_id, w.idx) for w in put.writes}
        with self._histories_lock:
            head = self._unconfirmed.get(put.thread_id, {}).get(put.checkpoint_ns)
            spaces = self._unconfirmed_writes.setdefault(put.thread_id, {})
            _keep_newest(self._unconfirmed_writes, put.thread_id)
            known = spaces.get(put.checkpoint_ns)
            if (head is not None and head > put.checkpoint_id) or (
                known is not None and known[0] > put.checkpoint_id
            ):
                return  # writes of a checkpoint a newer one of the namespace supersedes
            if known is not None and known[0] == put.checkpoint_id:
                known[1].update(keys)
            else:
                spaces[put.checkpoint_ns] = (put.checkpoint_id, keys)

    async def _writes_stand_alone(self, thread_id: str, checkpoint_ns: str) -> bool:
        """Whether the writes this process appended to the namespace's newest checkpoint
        reached the cold tier (a flusher here applied them, or the cold tier has them)."""
        assert self.flusher is not None
        with self._histories_lock:
            known = self._unconfirmed_writes.get(thread_id, {}).get(checkpoint_ns)
            if known is None:
                return True
            checkpoint_id, keys = known[0], set(known[1])  # a snapshot: appends go on
        if not await self._writes_stored(thread_id, checkpoint_ns, checkpoint_id, keys):
            return False
        # Writes appended during the check are not confirmed.
        return self._confirmed_writes(thread_id, checkpoint_ns, checkpoint_id, keys)

    def _confirmed_writes(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str, keys: set[tuple[str, int]]
    ) -> bool:
        """Forget the namespace's tracked writes if `keys` of `checkpoint_id` were all of
        them; False if more were appended meanwhile (they stay tracked)."""
        with self._histories_lock:
            spaces = self._unconfirmed_writes.get(thread_id, {})
            now = spaces.get(checkpoint_ns)
            if now is None:
                return True
            if now[0] == checkpoint_id and now[1] <= keys:
                del spaces[checkpoint_ns]
                return True
            return False

    async def _writes_stored(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str, keys: set[tuple[str, int]]
    ) -> bool:
        """Whether the cold tier has these writes: applied by a flusher here, else found."""
        assert self.flusher is not None
        missing = keys - self.flusher.applied_writes(thread_id, checkpoint_ns, checkpoint_id)
        if not missing:
            return True
        stored = await self.store.get_writes(thread_id, checkpoint_ns, checkpoint_id)
        return not missing - {(write.task_id, write.idx) for write in stored}

    def _note_boundary(self, put: _Writes) -> None:
        """Before a boundary's writes are appended: what later puts and boundaries check."""
        if self.flusher is None or not put.boundary:
            return
        with self._histories_lock:
            spaces = self._boundary_checkpoints.setdefault(put.thread_id, {})
            spaces[put.checkpoint_ns] = put.checkpoint_id
            _keep_newest(self._boundary_checkpoints, put.thread_id)
            if ":" in put.checkpoint_ns:
                self._paused.setdefault(put.thread_id, set()).add(put.checkpoint_ns)
                _keep_newest(self._paused, put.thread_id)

    async def _store_writes(self, put: _Writes) -> None:
        self._note_boundary(put)
        if self.flusher is None:
            await self._admit(put.thread_id, put.fence, hot=True)
            try:
                await self.store.put_writes(
                    put.thread_id,
                    put.checkpoint_ns,
                    put.checkpoint_id,
                    put.writes,
                    upsert=put.upsert,
                )
                if self.cache is not None:
                    await self.cache.add_writes(
                        put.thread_id,
                        put.checkpoint_ns,
                        put.checkpoint_id,
                        put.writes,
                        upsert=put.upsert,
                    )
            except BaseException:
                # As a put's: the hot copy may lack writes the cold tier holds.
                self._distrust_hot_copy(put.thread_id, put.checkpoint_ns)
                raise
            return
        log = self.flusher.log
        try:
            await self._fenced(
                put.thread_id,
                put.fence,
                lambda checked: log.append_writes(
                    put.thread_id,
                    put.checkpoint_ns,
                    put.checkpoint_id,
                    put.writes,
                    upsert=put.upsert,
                    fence=put.fence,
                    fence_checked=checked,
                ),
            )
        except LogEntryTooLarge:
            await self._writes_cold_instead(put, redis_up=True)
        except BackendUnavailable as exc:
            self._raise_unless_redis(exc)
            await self._writes_cold_instead(put)
        else:
            self._written_through.discard(put.thread_id)
            self._writes_appended(put)
            await self._boundary(put.thread_id, self._is_boundary(put))

    async def _put_cold_checked(
        self, put: _Put, every_value: Sequence[StoredBlob], *, redis_up: bool
    ) -> None:
        parent = put.stored.parent_checkpoint_id
        if redis_up and parent is not None:
            try:
                await self.store.put_checkpoint(put.stored, every_value)
            except ParentGone:
                # Not stored cold: a parent Redis holds neither as the cached head with a
                # backlog nor in the log is gone (deleted since, as an append on it is
                # refused) or lost. The log alone may hold it: the entry is dropped by a put
                # too large (the next put then only marks it), and may be evicted.
                if not (
                    await self._hot_head_is_parent(put.stored)
                    or await self._logs_put(put.stored.thread_id, put.stored.checkpoint_ns, parent)
                ):
                    await self._parent_stored(put, fork=False)
                await self.store.put_checkpoint(put.stored, every_value, parent_vouched=True)
        else:
            # Vouched: its parent may be in the log alone, which Redis being out cannot show.
            await self.store.put_checkpoint(put.stored, every_value, parent_vouched=True)

    async def _writes_cold_instead(self, put: _Writes, *, redis_up: bool = False) -> None:
        """Write-behind with Redis out, or writes too many for a log entry (`LogEntryTooLarge`):
        the writes go straight to the cold tier. They stand
        on their own only beside their checkpoint: while a put of the namespace this
        process appended is not in the cold tier, the thread's newest state may live in
        Redis alone, so a boundary (an interrupt) flushes as after an append, and fails
        the write unless Redis comes back with it. `redis_up`: fenced, and the hot copy dropped,
        as `_put_cold_instead`'s."""
        await self._admit(put.thread_id, put.fence, hot=redis_up)
        try:
            await self.store.put_writes(
                put.thread_id, put.checkpoint_ns, put.checkpoint_id, put.writes, upsert=put.upsert
            )
        except BaseException:
            self._distrust_hot_copy(put.thread_id, put.checkpoint_ns)  # as a put's
            raise
        await self._drop_hot_copy(put.thread_id, put.checkpoint_ns, redis_up=redis_up)
        boundary = self._is_boundary(put)
        if await self._stands_alone(put.thread_id, put.checkpoint_ns) and (
            not boundary or await self._all_stand_alone(put.thread_id)
        ):
            self._written_through.add(put.thread_id)
        elif boundary:
            await self._flush_thread(put.thread_id)

    async def _all_stand_alone(self, thread_id: str) -> bool:
        """`_stands_alone` for every namespace whose state outlives its run: the root, and
        a subgraph compiled with checkpointer=True. A namespace named after its task (":"
        before the task id, LangGraph's NS_END) ends with its task, whose result is in its
        parent's state; an interrupt inside it is a boundary of its own."""
        with self._histories_lock:
            paused = self._paused.get(thread_id, set())
            namespaces = [
                ns
                for ns in {
                    *self._unconfirmed.get(thread_id, {}),
                    *self._unconfirmed_writes.get(thread_id, {}),
                }
                if ":" not in ns or ns in paused
            ]
        for checkpoint_ns in namespaces:
            if not await self._stands_alone(thread_id, checkpoint_ns):
                return False
        return True

    async def _stands_alone(self, thread_id: str, checkpoint_ns: str) -> bool:
        """Whether the namespace's state this process wrote is durable without the log: no
        put of it waits there, or the last one did reach the cold tier (a flusher here
        applied it, or the cold tier has it: the background flush does not confirm)."""
        assert self.flusher is not None
        if not await self._writes_stand_alone(thread_id, checkpoint_ns):
            return False
        with self._histories_lock:
            head = self._unconfirmed.get(thread_id, {}).get(checkpoint_ns)
        if head is None:
            return True
        if self.flusher.last_applied(thread_id, checkpoint_ns) != head and not await self._in_cold(
            thread_id, checkpoint_ns, head
        ):
            return False
        with self._histories_lock:
            heads = self._unconfirmed.get(thread_id, {})
            if heads.get(checkpoint_ns) == head:
                del heads[checkpoint_ns]
        return True

    async def _drop_hot_copy(self, thread_id: str, checkpoint_ns: str, *, redis_up: bool) -> None:
        """After a write-behind write went to the cold tier instead: the hot copy (the parent
        as the latest, or the checkpoint without those writes) is never served by this
        process, and with Redis answering (`redis_up`) is dropped before the write returns,
        not left to another process until the drop of suspect entries comes round."""
        self._distrust_hot_copy(thread_id, checkpoint_ns)
        if redis_up and self.cache is not None:
            await self.cache.invalidate(thread_id, checkpoint_ns)

    def _distrust_hot_copy(self, thread_id: str, checkpoint_ns: str) -> None:
        """Redis just failed and the cold tier moved past the hot copy: it is dropped on the
        cache's next contact with it, never served as the latest."""
        if self.cache is not None:
            self.cache.distrust(thread_id, checkpoint_ns)

    async def _delta_history(
        self, config: RunnableConfig, channels: Sequence[str]
    ) -> dict[str, DeltaChannelHistory]:
        """LangGraph's DeltaChannel history: from this process's own chain of the thread when
        it wrote the thread from its root (`chains`), or from the cached latest checkpoint
        when it is the one asked for (usually read with it, so no round trip at all), else
        in the cold tier's bounded round trips, then tracked by the cache for the puts
        that follow."""
        if not channels:
            return {}
        configurable = config["configurable"]
        thread_id = _thread_of(configurable)
        checkpoint_ns = _namespace(configurable)
        # As in `_address`: an empty id names no checkpoint, so the latest's history.
        checkpoint_id = get_checkpoint_id(config) or None
        if checkpoint_id is None:
            latest = await self._get_tuple(config)
            if latest is None:
                return {ch: {"writes": []} for ch in channels}
            checkpoint_id = str(latest.config["configurable"]["checkpoint_id"])
        with self._histories_lock:
            remembered = self._histories.pop((thread_id, checkpoint_ns), None)
        history = self._chains.history(thread_id, checkpoint_ns, checkpoint_id, channels)
        if (
            history is None
            and remembered is not None
            and remembered[0] == checkpoint_id
            and set(channels) <= remembered[1].keys()
        ):
            history = remembered[1]
        lease = None
        if history is None and self.cache is not None:
            cached = await self.cache.history(thread_id, checkpoint_ns, checkpoint_id, channels)
            history, lease = cached.history, cached.lease
        if history is None:
            if self.flusher is not None:
                await self.flusher.settle_thread(thread_id)  # the cold tier must hold it all
            history = await self.store.delta_history(
                thread_id, checkpoint_ns, checkpoint_id, channels
            )
            if self.cache is not None and lease is not None:
                await self.cache.fill_history(
                    thread_id, checkpoint_ns, checkpoint_id, history, lease
                )
        return {ch: self._channel_history(history[ch]) for ch in channels}

    def _remember_history(
        self, checkpoint: StoredCheckpoint, history: dict[str, ChannelHistory]
    ) -> None:
        """Keep what a cache hit brought along for the history request that follows it
        (LangGraph asks right after loading the checkpoint); taken once."""
        key = (checkpoint.thread_id, checkpoint.checkpoint_ns)
        with self._histories_lock:
            self._histories[key] = (checkpoint.checkpoint_id, history)
            self._histories.move_to_end(key)
            while len(self._histories) > HISTORY_MEMO_SIZE:
                self._histories.popitem(last=False)

    def _forget_histories(self, thread_id: str) -> None:
        """What this process remembers of the thread's stored state (its delta histories,
        chains), which maintenance changed. Not what its runs appended and their boundaries
        must still find stored: a prune or a copy onto the thread leaves a step in the log
        as it is, and Redis losing it must still fail the run's boundary (`_forget_runs`)."""
        self._chains.forget(thread_id)
        self._kept_inline.forget(thread_id)
        with self._histories_lock:
            for key in [key for key in self._histories if key[0] == thread_id]:
                del self._histories[key]

    def _forget_runs(self, thread_id: str) -> None:
        """`_forget_histories`, and what the thread's runs appended, once it is lost or its
        steps were deleted."""
        self._forget_histories(thread_id)
        with self._histories_lock:
            self._unconfirmed.pop(thread_id, None)
            self._paused.pop(thread_id, None)
            self._boundary_checkpoints.pop(thread_id, None)
            self._unconfirmed_writes.pop(thread_id, None)

    def _channel_history(self, history: ChannelHistory) -> DeltaChannelHistory:
        # Chain order (ancestor ids grow toward the target), then a step's own order.
        writes = sorted(
            history.writes,
            key=lambda w: (w[0], *writes_sort_key(w[1].task_path, w[1].task_id, w[1].idx)),
        )
        entry: DeltaChannelHistory = {
            "writes": [(w.task_id, w.channel, load_value(self.serde, w.value)) for _, w in writes]
        }
        if history.seed is not None:
            entry["seed"] = self.serde.loads_typed(history.seed)
        return entry

    async def _admit(self, thread_id: str, fence: int | None, *, hot: bool) -> None:
        """Before a cold write: refuse a stale fencing token (see the module docstring).
        `hot=False`: Redis just failed, so only the record's fence is asked."""
        if fence is None:
            return
        if hot and self.fence is not None:
            try:
                await self.fence.admit(thread_id, int(fence))
                return
            except FenceUnknown:
                # Outside the handler below: a cold tier failing this read fails the write.
                await self._admit_durably(thread_id, fence)
                # Redis going out after the durable check passed does not undo it.
                with contextlib.suppress(BackendUnavailable):
                    await self.fence.admit(thread_id, int(fence), checked=True)
                return
            except BackendUnavailable:
                pass  # Redis out: the record's fence still orders the thread's writers
        await self._admit_durably(thread_id, fence)

    def _raise_unless_redis(self, exc: BackendUnavailable) -> None:
        """Only Redis out sends a write-behind write to the cold tier instead: a cold tier
        failing on the way (the read of a parent or of the record's fence) fails the write."""
        assert self.flusher is not None
        if exc.backend != self.flusher.log.name:
            raise exc

    async def _admit_durably(self, thread_id: str, fence: int | None) -> None:
        if self.record_fence is None or fence is None:
            return
        key = (thread_id, int(fence))
        check = self._durable_checks.get(key)
        if check is None:
            check = asyncio.ensure_future(self.record_fence.admit(thread_id, int(fence)))
            self._durable_checks[key] = check
            check.add_done_callback(lambda _: self._durable_checks.pop(key, None))
        await asyncio.shield(check)

    async def _fenced(
        self, thread_id: str, fence: int | None, write: Callable[[bool], Awaitable[None]]
    ) -> None:
        """`write(fence_checked)`: again, the token checked against the thread's durable
        fence, if Redis held no fence to check it against (`FenceUnknown`: a new thread,
        or its fence expired or was evicted, when a stale writer must not pass)."""
        try:
            await write(False)
        except FenceUnknown:
            await self._admit_durably(thread_id, fence)
            await write(True)

    def _admit_blocking(self, thread_id: str, fence: int | None) -> None:
        """`_admit` for the sync API's cold writes: a fenced write asks the loop thread
        (the record's fence is read there); an unfenced one needs nothing."""
        if fence is not None:
            self._sync(self._admit(thread_id, fence, hot=True))

    def _fenced_blocking(
        self, thread_id: str, fence: int | None, write: Callable[[bool], None]
    ) -> None:
        """`_fenced` for the sync API's appends, made on the caller's thread."""
        try:
            write(False)
        except FenceUnknown:
            self._sync(self._admit_durably(thread_id, fence))
            write(True)

    async def _boundary(self, thread_id: str, synchronous: bool) -> None:
        """After a write-behind append: flush now at a boundary, else let the flusher run."""
        assert self.flusher is not None
        if synchronous:
            await self._flush_thread(thread_id)
        else:
            self.flusher.notify(thread_id)

    async def _flush_thread(self, thread_id: str) -> None:
        assert self.flusher is not None
        with self._histories_lock:
            lost, lost_at = thread_id in self._lost, self._lost.get(thread_id)
        if lost:
            root = await self._cold_root(thread_id)
            if lost_at is not None and lost_at.startswith(ROOT_UNKNOWN):
                since = lost_at[len(ROOT_UNKNOWN) :]
                still = root is None or root <= since
            else:
                still = root == lost_at
            if still:
                raise HotStateLost(thread_id, "(lost earlier in this run)")
            with self._histories_lock:  # another process went on from the cold tier
                self._lost.pop(thread_id, None)
        with self._histories_lock:
            expected = dict(self._unconfirmed.get(thread_id, {}))
            expected_writes = {
                ns: (cid, set(keys))
                for ns, (cid, keys) in self._unconfirmed_writes.get(thread_id, {}).items()
            }
        deadline: float | None = None
        while True:
            try:
                await self.flusher.flush_thread(thread_id)
                break
            except BackendUnavailable as exc:
                if thread_id in self._written_through and await self._all_stand_alone(thread_id):
                    # Redis is out, and this process wrote the thread's newest state
                    # straight to the cold tier, in every namespace it wrote (a subgraph's
                    # cold write says nothing of its parent's); older entries wait in the
                    # log for Redis to return.
                    self._written_through.discard(thread_id)
                    return
                # The newest state may live only in Redis. A flush is idempotent, so it is
                # tried again until Redis is back: it then finds the log as Redis kept it,
                # or empty after a restart, where what this flusher applied before Redis
                # went (a batch whose acknowledgement failed) still confirms the puts
                # below. A cold-tier outage, or a flush lock never released, is not retried.
                now = asyncio.get_running_loop().time()
                deadline = now + REDIS_RETURN_SECONDS if deadline is None else deadline
                if exc.backend != self.flusher.log.name or now >= deadline:
                    raise  # not durable: the run stops, the timer resumes it
                await asyncio.sleep(REDIS_RETRY_POLL_SECONDS)
        await self._confirm_flushed(thread_id, expected, expected_writes)

    async def _cold_root(self, thread_id: str) -> str | None:
        found = await self.store.get_checkpoint(thread_id, "", None, with_history=False)
        return found.checkpoint_id if found is not None else None

    async def _mark_lost(self, thread_id: str) -> None:
        """Boundaries of the run fail until a run starts again here, or the cold tier's
        root moves past what it holds now (another process went on from it)."""
        self.losses_found += 1
        self._forget_runs(thread_id)
        try:
            root = await self._cold_root(thread_id)
        except BackendUnavailable:
            # The loss is what the caller reports; stay marked until a root newer than now.
            root = ROOT_UNKNOWN + str(uuid6(clock_seq=-1))
        with self._histories_lock:
            self._lost[thread_id] = root
            _keep_newest(self._lost, thread_id)

    async def _confirm_flushed(
        self,
        thread_id: str,
        expected: dict[str, str],
        expected_writes: dict[str, tuple[str, set[tuple[str, int]]]],
    ) -> None:
        """An empty log is not proof the flush stored this process's puts: Redis may have
        lost them (FLUSHALL, a restart without persistence). The last put of each namespace
        is confirmed by the flusher having applied it, else by a cold read."""
        assert self.flusher is not None
        for checkpoint_ns, checkpoint_id in expected.items():
            applied = self.flusher.last_applied(thread_id, checkpoint_ns) == checkpoint_id
            if (
                not applied
                and not await self._in_cold(thread_id, checkpoint_ns, checkpoint_id)
                and not await self._gone(thread_id, checkpoint_ns, checkpoint_id)
            ):
                await self._mark_lost(thread_id)
                raise HotStateLost(thread_id, checkpoint_id)
        for checkpoint_ns, (checkpoint_id, keys) in expected_writes.items():
            if not await self._writes_stored(
                thread_id, checkpoint_ns, checkpoint_id, keys
            ) and not await self._gone(thread_id, checkpoint_ns, checkpoint_id):
                await self._mark_lost(thread_id)
                raise HotStateLost(thread_id, checkpoint_id)
        for checkpoint_ns, (checkpoint_id, keys) in expected_writes.items():
            self._confirmed_writes(thread_id, checkpoint_ns, checkpoint_id, keys)
        with self._histories_lock:
            heads = self._unconfirmed.get(thread_id, {})
            for checkpoint_ns, checkpoint_id in expected.items():
                if heads.get(checkpoint_ns) == checkpoint_id:
                    del heads[checkpoint_ns]
            if not heads:
                self._unconfirmed.pop(thread_id, None)

    async def _gone(self, thread_id: str, checkpoint_ns: str, checkpoint_id: str) -> bool:
        """Whether a step of this process the hot tier no longer has was removed, not lost:
        gone past (`_gone_past`), or the thread deleted after it was made. With the thread
        deleted whole the cold tier cannot tell that from Redis losing a thread never
        flushed; the log's mark of the deletion can, while Redis keeps it: a real loss
        takes it with the thread's other keys, and a step made after it was not deleted."""
        assert self.flusher is not None
        if await self._gone_past(thread_id, checkpoint_ns, checkpoint_id):
            return True
        try:
            return await self.flusher.log.deleted_since(thread_id, checkpoint_id)
        except BackendUnavailable:
            return False  # the mark unread: a loss, as without one (the cautious answer)

    async def _gone_past(self, thread_id: str, checkpoint_ns: str, checkpoint_id: str) -> bool:
        """Whether the namespace's latest cold checkpoint is newer than `checkpoint_id`, a
        step of this process neither applied here nor found cold, and goes on from it:
        another process went on past it (a run of its own, after flushing it), and a prune
        may have taken it since, no longer the latest. Its absence is then no loss of the
        thread's state, as a cold root moved past a lost one ends that loss
        (`_flush_thread`). Not when that newer checkpoint's parents lead to a stored one
        older than the step without passing it, or to a root newer than the step: another
        process went on from the cold tier (or started the thread afresh) after Redis lost
        the step (its lock gone with it), which nobody stored. A gap in the parents (a
        prune took them) cannot tell, and counts as gone past. A parent no older than its
        child (`aput` takes any ids) ends the walk, which could go round, as a loss (the
        cautious answer). Asked only then: a boundary that finds its steps costs no read
        more."""
        latest = await self.store.get_checkpoint(thread_id, checkpoint_ns, None, with_history=False)
        if latest is None or latest.checkpoint_id <= checkpoint_id:
            return False
        child, parent = latest.checkpoint_id, latest.parent_checkpoint_id
        while parent is not None and checkpoint_id < parent < child:
            found = await self.store.get_checkpoint(
                thread_id, checkpoint_ns, parent, with_history=False
            )
            if found is None:
                return True
            child, parent = parent, found.parent_checkpoint_id
        if parent is None or parent >= child:
            return False
        if parent == checkpoint_id:
            return True
        return not await self._in_cold(thread_id, checkpoint_ns, parent)

    # Maintenance changes the cold tier under the hot one, which must follow: with Redis
    # unreachable it is refused (`BackendUnavailable`) rather than done in the cold tier
    # alone, where Redis, back with its data, would serve what was deleted, and a backlog
    # left in its log would be flushed back onto it. The cache is dropped before the
    # change (which checks Redis answers) and again after (what a reader cached meanwhile).

    async def _drop_cached(
        self,
        thread_id: str,
        *,
        deleting: bool = False,
        fence_fills: bool = False,
        lift_fence: str | None = None,
    ) -> str | None:
        """Returns the deletion's mark when `deleting`: the fence a drop before a cold delete
        of the whole thread sets (`fence_fills`), which the drop after it lifts."""
        if self.cache is None:
            return None
        # Written through, a new thread's first put stored cold just before a deletion took
        # it reaches the emptied entry after: a root needs no parent there, so the root entry
        # is left dropped at now, and such a root (a subgraph's too) is not cached.
        # (Write-behind appends are refused while a thread is deleted, and its log dropped
        # with the entry.) In both modes, until the drop after a whole thread's delete, no
        # reader's fill of a checkpoint no newer is cached: one that read the cold tier before
        # the delete would otherwise cache the deleted thread again, served once Redis is
        # back should that drop fail.
        deleted_at = str(uuid6(clock_seq=-1)) if deleting else None
        await self.cache.invalidate(
            thread_id,
            strict=True,
            deleted_at=deleted_at,
            fence_fills=fence_fills,
            lift_fence=lift_fence,
        )
        return deleted_at

    async def _delete_thread(self, thread_id: str) -> None:
        _sendable("thread id", [thread_id])
        tracked = self._tracked_runs(thread_id)
        self._forget_runs(thread_id)
        fence: str | None = None
        try:
            fence = await self._drop_cached(thread_id, deleting=True, fence_fills=True)
            if self.flusher is None:
                await self.store.delete_thread(thread_id)
            else:
                await self.flusher.delete_thread(thread_id)
        except BaseException as exc:
            # Refused (Redis unreachable, the flush lock busy) or failed, the delete may have
            # left the run's steps in the log: Redis losing them later must still fail the
            # run's boundary, as if no delete had been asked.
            self._retrack_runs(thread_id, tracked)
            if isinstance(exc, Exception):  # cancelled, it is left to the hot TTL
                await self._lift_fences({thread_id: fence}, exc)
            raise
        await self._drop_cached(thread_id, deleting=True, lift_fence=fence)

    async def _lift_fences(self, fences: Mapping[str, str | None], failure: Exception) -> None:
        """After a whole thread's cold delete refused or failed (the cold tier unreachable,
        the flush lock busy), the drop that lifts its fill fence, best effort: the thread
        may go on, and the fence would refuse its checkpoints for the hot TTL. As after a
        delete done, the drop takes what a reader filled meanwhile (its lease too), so what
        is cached after it was read from the cold tier as the delete left it. Not when Redis
        failed it: the drop would only wait that Redis out again. (Appends outpacing the
        backlog's discard, `StillWriting`, are no Redis failure: Redis answered.)"""
        if (
            isinstance(failure, BackendUnavailable)
            and failure.backend == "redis"
            and not isinstance(failure, StillWriting)
        ):
            return
        for thread_id, fence in fences.items():
            if fence is not None:
                with contextlib.suppress(BackendUnavailable):
                    await self._drop_cached(thread_id, deleting=True, lift_fence=fence)

    def _tracked_runs(self, thread_id: str) -> _Tracked:
        """What `_forget_runs` drops of the thread's runs' steps, as it stands now."""
        with self._histories_lock:
            return _Tracked(
                heads=dict(self._unconfirmed.get(thread_id, {})),
                writes={
                    ns: (checkpoint_id, set(keys))
                    for ns, (checkpoint_id, keys) in self._unconfirmed_writes.get(
                        thread_id, {}
                    ).items()
                },
                paused=set(self._paused.get(thread_id, ())),
                boundaries=dict(self._boundary_checkpoints.get(thread_id, {})),
            )

    def _retrack_runs(self, thread_id: str, tracked: _Tracked) -> None:
        """Track again what `_tracked_runs` saw; a step tracked since (newer) is kept."""
        with self._histories_lock:
            for memo, before in (
                (self._unconfirmed, tracked.heads),
                (self._unconfirmed_writes, tracked.writes),
                (self._boundary_checkpoints, tracked.boundaries),
            ):
                if before:
                    now: dict[str, Any] = memo.setdefault(thread_id, {})
                    for checkpoint_ns, value in before.items():
                        now.setdefault(checkpoint_ns, value)
                    _keep_newest(memo, thread_id)
            if tracked.paused:
                self._paused.setdefault(thread_id, set()).update(tracked.paused)
                _keep_newest(self._paused, thread_id)

    async def _delete_for_runs(self, run_ids: Sequence[str]) -> None:
        if not run_ids:
            return
        if self.cache is not None:
            await self.cache.ready()
        # Drops an earlier call owed: once deleted, a call again finds nothing to touch.
        for thread_id in list(self._owed_drops):
            await self._drop_cached(thread_id)
            self._owed_drops.discard(thread_id)
        unflushed = await self.flusher.settle_all() if self.flusher is not None else {}
        # A backlog left in the log goes on from the cold checkpoints of its thread: if
        # those include the runs', the store would delete (or not spare) ancestors that
        # the backlog's checkpoints, once flushed, are rebuilt from. Refused before any
        # change, as the store cannot be asked to leave one thread out.
        blocked = [
            thread_id for thread_id in unflushed if await self._holds_runs(thread_id, run_ids)
        ]
        if blocked:
            _raise_stuck(blocked, unflushed)
            raise BackendUnavailable(
                "write-behind",
                f"the backlog of {sorted(blocked)} goes on from checkpoints of these runs and "
                "could not be flushed; call again once it can",
            )
        # The store names the threads it touched: no read of whole checkpoints to find them.
        affected = await self._delete_runs_in_cold(run_ids)
        if self.flusher is not None:
            # A run of these ids still writing may have appended after the flush above (its
            # parent was cached): flushed after the delete, that put would become the
            # thread's latest state, on a parent that is gone. Flushed and deleted again
            # until no backlog holds one, nor is one a namespace's latest cold checkpoint
            # (flushed meanwhile by another worker); a put appended after this (its parent
            # neither cached nor logged nor cold any more) is refused (`HotStateLost`).
            # Only the threads the delete touched are read, and those whose backlog the
            # flush above left (another worker's flusher may move a put of the runs from
            # it to the cold tier after the delete: flushed here then, or the call fails).
            # That flush took every other backlog listed then, so a thread missed is one
            # these runs first wrote to after it (a run started during this call). Looked
            # for once more after the last round: a run that stopped during it is deleted
            # by then, not a failure.
            late = await self._late_run_threads(affected, run_ids, unflushed)
            rounds = 0
            while late:
                if rounds == LATE_RUN_PUT_ROUNDS:
                    raise RunsStillWriting("write-behind", run_ids, late)
                rounds += 1
                for thread_id in late:
                    await self.flusher.flush_thread(thread_id)
                affected |= await self._delete_runs_in_cold(run_ids)
                late = await self._late_run_threads(affected, run_ids, unflushed)
        stuck = [thread_id for thread_id in unflushed if await self._logs_runs(thread_id, run_ids)]
        if stuck:
            # Those runs' checkpoints still in the log would land after the deletion.
            _raise_stuck(stuck, unflushed)
            raise BackendUnavailable(
                "write-behind",
                f"the backlog of {sorted(stuck)} holds checkpoints of these runs and could "
                "not be flushed; call again once it can",
            )

    async def _late_run_threads(
        self, threads: set[str], run_ids: Sequence[str], unflushed: Collection[str]
    ) -> Sequence[str]:
        """Those of the threads whose backlog holds a put of one of the runs, or where one
        is a namespace's latest cold checkpoint: a flusher (another worker's) moved such a
        put there after the delete, before the log was read. The log first: a put leaves it
        only once applied, so the cold read after it sees one the log read missed. Of the
        `unflushed` threads (the first flush failed), those whose backlog holds none (one
        that does fails the call) but where another flusher moved one since."""
        assert self.flusher is not None
        left = set(unflushed)
        return [
            thread_id
            for thread_id in sorted(threads - left)
            if (
                await self.flusher.log.pending(thread_id)
                and await self._logs_runs(thread_id, run_ids)
            )
            or await self._newest_is_of_runs(thread_id, run_ids)
        ] + [
            thread_id
            for thread_id in sorted(left)
            if not await self._logs_runs(thread_id, run_ids)
            and await self._newest_is_of_runs(thread_id, run_ids)
        ]

    async def _newest_is_of_runs(self, thread_id: str, run_ids: Sequence[str]) -> bool:
        """Whether, after the runs' delete, a checkpoint of theirs is its namespace's latest
        in the cold tier: one landed since (one the delete spared never is: a kept checkpoint
        it is an ancestor of is newer). Nothing of theirs left, one empty listing per run."""
        for run_id in run_ids:
            newest = await self._newest_of_run(thread_id, run_id)
            if newest is None:
                continue
            latest = await self.store.get_checkpoint(
                thread_id, newest.checkpoint_ns, None, with_history=False
            )
            if latest is not None and latest.metadata.get("run_id") in run_ids:
                return True
        return False

    async def _delete_runs_in_cold(self, run_ids: Sequence[str]) -> set[str]:
        try:
            affected = set(await self.store.delete_for_runs(run_ids))
        except RunsPartlyDeleted as failed:
            # A call again finds nothing left to delete in those threads: it would not name
            # them, and their caches would serve the deleted runs.
            await self._drop_deleted(failed.thread_ids)
            raise
        await self._drop_deleted(affected)
        return affected

    async def _drop_deleted(self, thread_ids: Iterable[str]) -> None:
        """Drops the caches and delta histories of threads whose runs the store deleted."""
        self._owed_drops.update(thread_ids)
        for thread_id in thread_ids:
            await self._forget_deleted_runs(thread_id)
            await self._drop_cached(thread_id, deleting=True)
            self._owed_drops.discard(thread_id)

    async def _forget_deleted_runs(self, thread_id: str) -> None:
        """`_forget_runs`, but for the steps still in the thread's log: appended after the
        flush before the delete, the store could not delete them (another run's, or a late
        one of the runs that a later round flushes and deletes), and Redis losing them must
        still fail their run's boundary, as after a prune."""
        with self._histories_lock:
            heads = dict(self._unconfirmed.get(thread_id, {}))
            writes = {
                ns: (checkpoint_id, set(keys))
                for ns, (checkpoint_id, keys) in self._unconfirmed_writes.get(thread_id, {}).items()
            }
        logged = await self._logged_steps(thread_id)
        self._forget_histories(thread_id)
        with self._histories_lock:
            # Only what was read before the log: a step appended since stays tracked.
            now = self._unconfirmed.get(thread_id, {})
            for checkpoint_ns, checkpoint_id in heads.items():
                logged_step = (checkpoint_ns, checkpoint_id) in logged
                if not logged_step and now.get(checkpoint_ns) == checkpoint_id:
                    del now[checkpoint_ns]
            if not now:
                self._unconfirmed.pop(thread_id, None)
            spaces = self._unconfirmed_writes.get(thread_id, {})
            for checkpoint_ns, (checkpoint_id, keys) in writes.items():
                known = spaces.get(checkpoint_ns)
                if (
                    (checkpoint_ns, checkpoint_id) not in logged
                    and known is not None
                    and known[0] == checkpoint_id
                    and known[1] <= keys
                ):
                    del spaces[checkpoint_ns]
            if not spaces:
                self._unconfirmed_writes.pop(thread_id, None)
            if not logged:
                self._paused.pop(thread_id, None)
                self._boundary_checkpoints.pop(thread_id, None)

    async def _logged_steps(self, thread_id: str) -> set[tuple[str, str]]:
        """The (namespace, checkpoint) of the puts and writes in the thread's log; none if
        it cannot be read (the run tracking is then forgotten, as it was before any kept)."""
        if self.flusher is None:
            return set()
        try:
            entries = await self.flusher.log.read(thread_id, count=ALL_LOGGED)
        except StateError:
            return set()
        logged: set[tuple[str, str]] = set()
        for entry in entries:
            if isinstance(entry.op, CheckpointPut):
                logged.add((entry.op.checkpoint.checkpoint_ns, entry.op.checkpoint.checkpoint_id))
            elif isinstance(entry.op, WritesPut):
                logged.add((entry.op.checkpoint_ns, entry.op.checkpoint_id))
        return logged

    async def _holds_runs(self, thread_id: str, run_ids: Sequence[str]) -> bool:
        """Whether the cold tier holds a checkpoint of one of the runs in the thread."""
        for run_id in run_ids:
            if await self._newest_of_run(thread_id, run_id) is not None:
                return True
        return False

    async def _newest_of_run(self, thread_id: str, run_id: str) -> StoredCheckpoint | None:
        found = self.store.list_checkpoints(
            thread_id=thread_id,
            checkpoint_ns=None,
            before=None,
            limit=1,
            metadata_filter={"run_id": run_id},
        )
        try:
            async for stored in found:
                return stored
        finally:
            aclose = getattr(found, "aclose", None)
            if aclose is not None:
                await aclose()
        return None

    async def _logs_runs(self, thread_id: str, run_ids: Sequence[str]) -> bool:
        """Whether the thread's backlog may hold a put of one of the runs (an entry this
        code cannot read may)."""
        assert self.flusher is not None
        after: str | None = None
        while True:
            # A read stops short of an entry it cannot read (raised once it is the oldest):
            # read on past the last one returned until the log ends.
            try:
                entries = await self.flusher.log.read(thread_id, count=ALL_LOGGED, after=after)
            except StateError:
                return True
            if not entries:
                return False
            if any(
                isinstance(entry.op, CheckpointPut)
                and entry.op.checkpoint.metadata.get("run_id") in run_ids
                for entry in entries
            ):
                return True
            after = entries[-1].entry_id

    async def _logs_put(self, thread_id: str, checkpoint_ns: str, checkpoint_id: str) -> bool:
        """Whether the thread's backlog holds the put of the checkpoint (as an append finds
        its parent there); False if an entry cannot be read (the cautious answer)."""
        assert self.flusher is not None
        after: str | None = None
        while True:
            try:
                entries = await self.flusher.log.read(thread_id, count=ALL_LOGGED, after=after)
            except BackendUnavailable:
                raise  # Redis failing is no answer: not taken for a loss of the parent
            except StateError:
                return False
            if not entries:
                return False
            if any(
                isinstance(entry.op, CheckpointPut)
                and entry.op.checkpoint.checkpoint_ns == checkpoint_ns
                and entry.op.checkpoint.checkpoint_id == checkpoint_id
                for entry in entries
            ):
                return True
            after = entries[-1].entry_id

    async def _copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        _sendable("thread id", [source_thread_id])
        # The copy is a thread a put could not write to (nor Cosmos in Azure hold) otherwise.
        _writable_thread({"thread_id": target_thread_id})
        if self.flusher is not None:
            await self.flusher.settle_thread(target_thread_id, strict=True)

        async def copy() -> None:
            await self._drop_cached(target_thread_id)
            await self.store.copy_thread(source_thread_id, target_thread_id)

        # The source's flush lock held through the copy: a store copies in several
        # requests (Cosmos: values, then holders, then checkpoints), and a step of the
        # source flushed between them would be copied without its writes.
        await self._flush_locked(source_thread_id, copy)
        self._forget_histories(target_thread_id)
        await self._drop_cached(target_thread_id)

    async def _flush_locked(self, thread_id: str, work: Callable[[], Awaitable[None]]) -> None:
        """`work` under the thread's flush lock, its backlog flushed first (no flush changes
        the thread's cold state meanwhile); done again (it is idempotent) if the lock was
        lost on the way, as `Flusher.holding_flushed` asks of its callers."""
        if self.flusher is None:
            await work()
            return
        for attempt in range(FLUSH_LOCKED_ATTEMPTS):
            try:
                async with self.flusher.holding_flushed(thread_id):
                    await work()
                return
            except LockLost:
                if attempt + 1 == FLUSH_LOCKED_ATTEMPTS:
                    raise

    async def _prune(self, thread_ids: Sequence[str], strategy: str) -> None:
        if isinstance(thread_ids, str):
            raise TypeError("thread_ids must be a sequence of thread ids, not a str")
        if strategy not in PRUNE_STRATEGIES:
            raise ValueError(f"unknown prune strategy {strategy!r}; use one of {PRUNE_STRATEGIES}")
        threads = _sendable("thread id", thread_ids)
        if not threads:
            return
        if strategy == "delete" and self.flusher is not None:
            # Each backlog dropped under its flush lock and fenced off, as delete_thread does.
            for thread_id in threads:
                await self._delete_thread(thread_id)
            return
        store_strategy: PruneStrategy = "delete" if strategy == "delete" else "keep_latest"
        fences: dict[str, str | None] = {}
        if self.flusher is None:
            try:
                for thread_id in threads:
                    fences[thread_id] = await self._drop_cached(
                        thread_id, deleting=strategy == "delete", fence_fills=strategy == "delete"
                    )
                await self.store.prune(threads, strategy=store_strategy)
            except Exception as exc:
                await self._lift_fences(fences, exc)
                raise
        else:
            # A thread at a time, under its flush lock: a step flushed while the store reads
            # the thread in several requests (its checkpoints, then its chunks) would lose
            # the chunks it added, collected as unreached. One lock held at a time: holding
            # one while waiting for the next would deadlock with the retention sweep, which
            # holds the locks of the threads it deletes in the order the cold tier lists them.
            for thread_id in dict.fromkeys(threads):

                async def prune(thread_id: str = thread_id) -> None:
                    await self._drop_cached(thread_id)
                    await self.store.prune([thread_id], strategy=store_strategy)

                await self._flush_locked(thread_id, prune)
        for thread_id in threads:
            self._forget_histories(thread_id)
            await self._drop_cached(
                thread_id, deleting=strategy == "delete", lift_fence=fences.get(thread_id)
            )

    # ----------------------------------------------------------------------- conversion

    async def _complete(self, stored: StoredCheckpoint) -> StoredCheckpoint:
        """Attach blobs and writes a store did not load with the checkpoint."""
        blobs, writes = stored.blobs, stored.writes
        if blobs is None:
            blobs = await self.store.get_blobs(
                stored.thread_id, stored.checkpoint_ns, stored.channel_versions
            )
        if writes is None:
            writes = await self.store.get_writes(
                stored.thread_id, stored.checkpoint_ns, stored.checkpoint_id
            )
        return dataclasses.replace(stored, blobs=blobs, writes=writes)

    def _tuple(self, stored: StoredCheckpoint, *, keep_inline: bool = False) -> CheckpointTuple:
        """`keep_inline`: a run may go on from this checkpoint (a latest or named read), so
        its inline values are kept as stored, before LangGraph gets (and may change) them."""
        checkpoint = load_checkpoint(self.serde, stored)
        values = dict(checkpoint.get("channel_values") or {})
        if keep_inline:
            self._kept_inline.keep(
                stored.thread_id,
                stored.checkpoint_ns,
                stored.checkpoint_id,
                {
                    channel: (stored.channel_versions.get(channel), self.serde.dumps_typed(value))
                    for channel, value in values.items()
                },
            )
        for channel, value in (stored.blobs or {}).items():
            if value[0] != "empty":
                values[channel] = self.serde.loads_typed(value)
        checkpoint["channel_values"] = values
        writes = sorted(
            stored.writes or [], key=lambda w: writes_sort_key(w.task_path, w.task_id, w.idx)
        )
        location = {"thread_id": stored.thread_id, "checkpoint_ns": stored.checkpoint_ns}
        return CheckpointTuple(
            config={"configurable": {**location, "checkpoint_id": stored.checkpoint_id}},
            checkpoint=checkpoint,
            metadata=stored.metadata,  # type: ignore[arg-type]
            parent_config=(
                {"configurable": {**location, "checkpoint_id": stored.parent_checkpoint_id}}
                if stored.parent_checkpoint_id
                else None
            ),
            pending_writes=[
                (w.task_id, w.channel, load_value(self.serde, w.value)) for w in writes
            ],
        )


async def _next(iterator: AsyncIterator[T]) -> T:
    return await anext(iterator)


class _Ended(Generic[T]):
    """What a call's coroutine returned or raised, kept as it ends on the saver loop: its
    caller reads it when the loop closed before telling the call's future."""

    def __init__(self) -> None:
        self.done = False
        self.value: T | None = None
        self.error: BaseException | None = None

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error
        return cast(T, self.value)


async def _ending(coro: Coroutine[Any, Any, T], ended: _Ended[T]) -> T:
    """`coro`, its end kept in `ended` (a cancellation is not an end: the call was cut off)."""
    try:
        value = await coro
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        ended.error, ended.done = exc, True
        raise
    ended.value, ended.done = value, True
    return value


async def _take(iterator: AsyncIterator[T], count: int) -> list[T]:
    taken: list[T] = []
    async for item in iterator:
        taken.append(item)
        if len(taken) == count:
            break
    return taken


async def _close(iterator: AsyncGenerator[Any, None]) -> None:
    await iterator.aclose()


def _raise_stuck(threads: Sequence[str], unflushed: Mapping[str, StateError]) -> None:
    """The `EntryStuck` of the first of the threads whose backlog one holds back: an entry
    the operator must act on (`agent-state write-behind`), named, not an outage to retry."""
    for thread_id in sorted(threads):
        if isinstance(failure := unflushed.get(thread_id), EntryStuck):
            raise failure
