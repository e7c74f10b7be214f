"""Cache-aside composition of the cold store (source of truth) and the Redis hot tier.

Reads go hot first; a miss reads cold and installs the record in hot only if hot
does not already hold a newer version (compared inside Redis). Writes go to cold
first, then install the new record in hot the same way, so a reader installing
what it read before the write can never replace the newer copy.

A writer can die between its cold write and its hot install, so before the cold
write it registers a write intent on the thread's hot entry: a token with a
deadline `now + STATE_LOCK_TTL_MS` on the Redis clock (a writer is assumed to
finish one cold write within its lock's TTL, as fencing already assumes). While
any intent is present, the hot copy is not served: readers go to cold. Who
removes an intent:

- its writer's post-commit install (install-if-not-older, as before);
- its writer, after a cold write that certainly did not happen (conflict, not
  found, stale fence, too large). After any other failure (timeout,
  cancellation, cold unreachable) the write may have landed, so the intent
  stays to its deadline;
- a reader's install from cold, but only intents whose deadline had passed when
  that reader read hot, *before* its cold read. Their writer is presumed dead
  and its commit, if any, happened before the deadline, so the cold read saw it.

Races, and why they are safe:

- Writer dies after its cold commit: its intent hides the old copy; once the
  deadline passes, the next reader reads cold (which has the commit) and
  installs it.
- Two writers, one dies: each has its own intent and removes only its own, so
  the survivor's install leaves the dead one's intent hiding the entry.
- Reader vs live writer: an intent registered after the reader's hot read, or
  not yet expired then, has a deadline later than that read, so the reader's
  install keeps it. A cold read older than the writer's commit can therefore
  never make the entry servable; install-if-not-older keeps the record itself
  from going backwards.
- A conflict (`VersionConflict`) proves the caller's copy may be stale: the
  writer re-reads cold and installs that in place of its intent, so a retry
  reads what cold holds.
- Eviction (the entry has a TTL, so volatile-* may take it) takes the newer
  version the comparison relies on. So a writer installs only while its intent
  is still in the entry (else the record there goes too), and a read that misses
  takes a fill lease in the entry that its install presents; every install and
  invalidation revokes the leases taken before it. A slower writer, or a reader
  whose cold read predates a commit, then finds its intent or lease gone with the
  evicted entry and installs nothing.

The hot tier is an optimisation: its failures never fail a call. They are
counted, logged once per outage, and the call is served from cold. After a
failure the hot tier is left alone for `HOT_RETRY_AFTER_SECONDS` (a hung Redis
would otherwise cost a timeout per call). Threads written while the hot tier was
unreachable may still have an older copy there (Redis may have been up but out
of reach), so they are remembered and re-installed from cold ("settled") before
hot serves them again. Settling runs in the background, `SETTLE_CONCURRENCY`
threads at a time, started by the first read that finds the hot tier usable:
no request waits for other threads' re-installs, and a read of a thread not yet
settled is served from cold.

Known limits: a cold write that commits after its deadline and whose writer
then dies before installing can leave the older copy a reader installed in the
meantime; so can an intent lost to eviction, FLUSHALL or a failover without
persistence while the re-install that settles a thread after an outage (it takes
no lease) reads cold before the commit. In both the old copy lasts until a later
write or the hot TTL. A writer that cannot reach Redis
writes without an intent: as before, only its own process knows to re-install.

`CacheAsideStore` is this protocol alone, over records in whatever form the
layer above stores them. `TieredStateStore`, what an app uses, is the size layer
(`state.sized`) over it, so both tiers hold bounded, stored forms and callers see
plain values; each call passes each layer once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from opentelemetry import trace

from .errors import (
    BackendUnavailable,
    CorruptState,
    InvalidValue,
    LockNotAcquired,
    RequestRejected,
    StaleFencingToken,
    StateTooLarge,
    UnsupportedSchemaVersion,
    VersionConflict,
    WorkflowExists,
    WorkflowNotFound,
)
from .ports import (
    JSON,
    AuditEntry,
    ColdStateStore,
    HotStateStore,
    Lock,
    SectionWrite,
    TierHealth,
    WorkflowRecord,
    WriteIntent,
    attributed,
)
from .settings import Settings
from .shielding import taken_or_given_back
from .size import (
    ARCHIVE_SEPARATOR,
    ColdRecordArchive,
    StateSizeManager,
    escaped,
    storable_text,
)
from .sized import SizedStateStore

if TYPE_CHECKING:
    from .factory import Backends

logger = logging.getLogger(__name__)
tracer = trace.get_tracer("state")

HOT_RETRY_AFTER_SECONDS = 1.0
# Threads re-installed at once while settling after an outage (each is one cold read
# and one Redis call): enough to drain a backlog quickly without flooding either tier.
SETTLE_CONCURRENCY = 8
# How often threads left unsettled by an outage are tried again in the background; twice
# as long after each pass that settled none (the cold tier out of reach too), up to the max.
RESETTLE_RETRY_SECONDS = 0.25
RESETTLE_MAX_SECONDS = 5.0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    hot_errors: int = 0
    # Installs refused because the hot tier already held a newer version.
    installs_rejected: int = 0
    # Reads served from cold because a write intent hid the hot copy (also misses).
    pending: int = 0
    # Reads the cold tier served because the hot tier failed them (also errors), backs off
    # after a failure, or has the thread not settled yet after one: neither hits nor misses.
    bypassed: int = 0


class CacheAsideStore:
    """A `RecordStore` cache-aside over a cold store and an optional hot tier, plus locks."""

    def __init__(
        self,
        cold: ColdStateStore,
        hot: HotStateStore | None,
        *,
        lock_ttl_ms: int,
        hot_ttl_seconds: int,
    ) -> None:
        self._cold = cold
        self._hot = hot
        # Also the bound of a write intent: a writer finishes a cold write within it.
        self._lock_ttl_ms = lock_ttl_ms
        self._hot_ttl_seconds = hot_ttl_seconds
        self.stats = CacheStats()
        self._hot_skip_until = 0.0
        self._hot_down = False
        # Threads whose hot copy may be older than cold (written while hot was unreachable).
        self._unsettled: set[str] = set()
        # Threads being re-installed right now: no longer in `_unsettled`, not yet fresh in hot.
        self._settling: set[str] = set()
        # Our own intents whose cold write committed but whose install could not reach
        # Redis: the re-install that settles the thread clears them, instead of leaving
        # the entry hidden (and the hot tier unfilled) until their deadlines.
        self._stranded_intents: dict[str, list[WriteIntent]] = {}
        # The background pass settling `_unsettled` (at most one at a time), and when the
        # next may start: after a pass that settled nothing (the cold tier out of reach
        # too), not on every read meanwhile, each of which would retry every thread.
        self._settler: asyncio.Task[None] | None = None
        self._settle_not_before = 0.0
        self._settle_retry = RESETTLE_RETRY_SECONDS
        # Retries the settling pass while the hot tier is failing or threads are unsettled:
        # Redis may be up for other processes (a partition), which are served the copies
        # this one could not advance until they are re-installed.
        self._resettler: asyncio.Task[None] | None = None
        # Lock takes under way (a cancelled caller's among them), then the releases of the
        # locks taken for cancelled callers (the event loop references its tasks weakly):
        # `close` waits for both, or a lock taken as the process stops would be held to
        # its TTL.
        self._lock_takes: set[asyncio.Future[Lock | None]] = set()
        self._unlocking: set[asyncio.Task[bool]] = set()

    # ----------------------------------------------------------------- records

    async def get(self, thread_id: str) -> WorkflowRecord | None:
        storable_text("records", "thread id", thread_id)
        with _span("get", thread_id=thread_id) as span:
            hot = await self._usable_hot(thread_id)
            if hot is None and self._hot is not None:
                self.stats.bypassed += 1
                span.set_attribute("state.cache", "bypassed")
            observed_at: int | None = None
            lease: str | None = None
            if hot is not None:
                try:
                    found = await hot.read(thread_id)
                except BackendUnavailable as exc:
                    self._hot_failed("get", exc)
                    self.stats.bypassed += 1
                    hot = None  # a read leaves nothing stale behind: just use cold
                else:
                    self._hot_recovered()
                    if found.record is not None:
                        self.stats.hits += 1
                        span.set_attribute("state.cache", "hit")
                        return found.record
                    self.stats.misses += 1
                    if found.pending:
                        self.stats.pending += 1
                    span.set_attribute("state.cache", "pending" if found.pending else "miss")
                    observed_at, lease = found.observed_at, found.lease
            # Only after the hot read: what this cold read returns includes the commit
            # of every writer whose intent had expired by `observed_at`.
            record = await self._cold.get(thread_id)
            if record is not None and hot is not None:
                await self._install(record, expired_before=observed_at, lease=lease)
            return record

    async def is_cached(self, thread_id: str) -> bool:
        """Whether the hot tier holds a copy of the record it may serve now; never a cold
        read (False if the hot tier is absent or out of reach). A hint that the record
        exists, not the truth: a copy may outlive a record retention removed from cold."""
        storable_text("records", "thread id", thread_id)
        with _span("is_cached", thread_id=thread_id):
            hot = await self._usable_hot(thread_id)
            if hot is None:
                return False
            try:
                record = await hot.get(thread_id)
            except BackendUnavailable as exc:
                self._hot_failed("is_cached", exc)
                return False
            self._hot_recovered()
            return record is not None

    async def get_fresh(self, thread_id: str) -> WorkflowRecord | None:
        """The record as the cold tier (the source of truth) holds it, never a hot copy.

        For a decision taken under a run lock: Redis may still serve an older copy that
        another process wrote past while it could not reach Redis (a partition; README:
        the loss window), and a run started on it would undo what that process
        acknowledged."""
        storable_text("records", "thread id", thread_id)
        with _span("get_fresh", thread_id=thread_id):
            return await self._cold.get(thread_id)

    async def create(
        self, thread_id: str, sections: dict[str, JSON], *, agent_id: str
    ) -> WorkflowRecord:
        if ARCHIVE_SEPARATOR in thread_id:
            # Retention would take it for an archive record and delete it with its "owner".
            raise InvalidValue("records", f"a thread id holding {ARCHIVE_SEPARATOR!r}")
        storable_text("records", "thread id", thread_id)
        storable_text("records", "agent id", agent_id)
        with _span("create", thread_id=thread_id):
            # A copy left from an earlier record of this thread id would outrank the new
            # version 1; clearing it first is safe because cold has nothing older. Cleared
            # as the intent is registered (one round trip): under an intent like any write,
            # a slow install of version 1 must not land on an entry eviction emptied after a
            # later write's install.
            intent = await self._begin_write(thread_id, clear=True)
            try:
                record = await self._cold.create(thread_id, sections, agent_id=agent_id)
            except WorkflowExists:
                # The thread was live (a retried create): a reader holding an older copy
                # could now install it over the gap the invalidation left; put cold's back.
                await self._reinstall_from_cold(thread_id, intent)
                raise
            except (StateTooLarge, RequestRejected):
                await self._abandon_write(intent)
                raise
            await self._install(record, intent=intent, written=True)
            return record

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
        """One cold write under a write intent, then install: an intent covers exactly
        one cold write, so nothing else lengthens the window the hot copy is hidden."""
        storable_text("records", "agent id", agent_id)
        with _span("update_section", thread_id=thread_id, section=section):
            return await self._under_intent(
                thread_id,
                lambda: self._cold.update_section(
                    thread_id,
                    section,
                    value,
                    expected_version=expected_version,
                    agent_id=agent_id,
                    fencing_token=fencing_token,
                ),
            )

    async def update_sections(
        self,
        thread_id: str,
        writes: Sequence[SectionWrite],
        *,
        expected_version: int,
        fencing_token: int | None = None,
    ) -> WorkflowRecord:
        """Several distinct sections in one cold write (one audit entry each, under its
        own agent), then one install: what a batch of `update_section` calls would leave,
        for one write's cost."""
        for write in writes:
            storable_text("records", "agent id", write.agent_id)
        with _span(
            "update_sections",
            thread_id=thread_id,
            sections=",".join(write.section for write in writes),
        ):
            return await self._under_intent(
                thread_id,
                lambda: self._cold.update_sections(
                    thread_id,
                    writes,
                    expected_version=expected_version,
                    fencing_token=fencing_token,
                ),
            )

    async def _under_intent(
        self, thread_id: str, write: Callable[[], Awaitable[WorkflowRecord]]
    ) -> WorkflowRecord:
        """One cold write under a write intent, then install what it returned."""
        storable_text("records", "thread id", thread_id)
        intent = await self._begin_write(thread_id)
        try:
            record = await write()
        except VersionConflict:
            # The caller may have read an outdated hot copy; refresh it so a retry
            # reads what cold holds.
            await self._reinstall_from_cold(thread_id, intent)
            raise
        except WorkflowNotFound:
            # Gone from cold (deleted or expired there): a hot copy must not outlive it.
            await self._abandon_write(intent)
            await self._invalidate(thread_id)
            raise
        except (StaleFencingToken, StateTooLarge, RequestRejected):
            # Refused before anything was written; other failures may have written.
            await self._abandon_write(intent)
            raise
        await self._install(record, intent=intent, written=True)
        return record

    async def replace_damaged(
        self, thread_id: str, sections: dict[str, JSON], *, expected_version: int, agent_id: str
    ) -> WorkflowRecord:
        """The cold store's `replace_damaged` under a write intent, then install."""
        storable_text("records", "thread id", thread_id)
        storable_text("records", "agent id", agent_id)
        with _span("replace_damaged", thread_id=thread_id):
            intent = await self._begin_write(thread_id)
            try:
                record = await self._cold.replace_damaged(
                    thread_id, sections, expected_version=expected_version, agent_id=agent_id
                )
            except (VersionConflict, WorkflowNotFound):
                # Not re-installed from cold, as `_under_intent` does: what cold holds may
                # be what `get` refuses still. A hot copy goes; the next read fills it.
                await self._abandon_write(intent)
                await self._invalidate(thread_id)
                raise
            except (UnsupportedSchemaVersion, StateTooLarge, RequestRejected):
                await self._abandon_write(intent)  # refused before anything was written
                raise
            await self._install(record, intent=intent, written=True)
            return record

    async def audit_trail(self, thread_id: str, *, limit: int = 50) -> list[AuditEntry]:
        """Newest first; `before` and `after` as the layer above stored them."""
        storable_text("records", "thread id", thread_id)
        with _span("audit_trail", thread_id=thread_id):
            return await self._cold.audit_trail(thread_id, limit=limit)

    # ----------------------------------------------------------------- locks

    async def lock(self, name: str, *, ttl_ms: int | None = None) -> Lock:
        storable_text("locks", "lock name", name)
        with _span("lock", lock=name):
            if self._hot is None:
                raise BackendUnavailable("redis", "no hot tier configured: locks need Redis")
            # Kept until it ends: `close` waits for a take whose caller was cancelled.
            locking = asyncio.ensure_future(
                self._hot.acquire_lock(name, ttl_ms=ttl_ms or self._lock_ttl_ms)
            )
            self._lock_takes.add(locking)
            locking.add_done_callback(self._lock_takes.discard)
            try:
                held = await taken_or_given_back(locking, self._unlock_late)
            except BackendUnavailable as exc:
                self._hot_failed("lock", exc)
                raise
            self._hot_recovered()
            if held is None:
                raise LockNotAcquired(name)
            return held

    def _unlock_late(self, held: Lock | None) -> None:
        """Release a lock taken for a caller that was cancelled before it got it."""
        if held is not None:
            task = asyncio.ensure_future(self.unlock(held))
            self._unlocking.add(task)
            task.add_done_callback(self._unlocking.discard)

    async def lock_expires_in(self, name: str) -> float | None:
        """Seconds until the lock's current holder loses it; None if nobody holds it, or
        the hot tier cannot say (absent or unreachable)."""
        storable_text("locks", "lock name", name)
        with _span("lock_ttl", lock=name):
            if self._hot is None or self._hot_skipped():
                return None
            try:
                remaining = await self._hot.lock_ttl_ms(name)
            except BackendUnavailable as exc:
                self._hot_failed("lock_ttl", exc)
                return None
            self._hot_recovered()
            return None if remaining is None else remaining / 1000

    async def renew(self, lock: Lock) -> bool:
        """Extend `lock` by its TTL if it is still ours; False if it is not (taken by
        another holder, or run out). Raises `BackendUnavailable` if Redis cannot be reached."""
        with _span("renew", lock=lock.name):
            if self._hot is None:
                raise BackendUnavailable("redis", "no hot tier configured: locks need Redis")
            try:
                renewed = await self._hot.renew_lock(lock)
            except BackendUnavailable as exc:
                self._hot_failed("renew", exc)
                raise
            self._hot_recovered()
            return renewed

    async def unlock(self, lock: Lock) -> bool:
        """False if the lock was no longer ours or Redis was unreachable (it then expires)."""
        with _span("unlock", lock=lock.name):
            if self._hot is None:
                return False
            try:
                return await self._hot.release_lock(lock)
            except BackendUnavailable as exc:
                self._hot_failed("unlock", exc)
                return False

    # ----------------------------------------------------------------- health

    async def health(self) -> list[TierHealth]:
        """The cold tier, then the hot tier if one is configured; never raises. Both are
        probed at once, so one tier down costs at most one probe's wait."""
        with _span("health"):
            if self._hot is None:
                return [await _probe(self._cold.name, self._cold.health())]
            cold, hot = await asyncio.gather(
                _probe(self._cold.name, self._cold.health()),
                _probe(self._hot.name, self._hot.health()),
            )
            if hot.up:
                self._hot_recovered()
            else:
                self._hot_failed("health", BackendUnavailable(self._hot.name, hot.detail))
            return [cold, hot]

    # ----------------------------------------------------------------- hot tier upkeep

    def _hot_skipped(self) -> bool:
        return time.monotonic() < self._hot_skip_until

    async def _usable_hot(self, thread_id: str) -> HotStateStore | None:
        """The hot tier if it may serve `thread_id` now. Unsettled threads are settled in
        the background (started here if needed); until then they are served from cold."""
        if self._hot is None or self._hot_skipped():
            return None
        if self._unsettled:
            self._start_settling()
        if thread_id in self._unsettled or thread_id in self._settling:
            return None
        return self._hot

    def _start_settling(self) -> None:
        loop = asyncio.get_running_loop()
        running = self._settler
        if running is not None and not running.done() and running.get_loop() is loop:
            return
        if time.monotonic() < self._settle_not_before:
            return
        self._settler = loop.create_task(self._settle(), name="state-settle-hot-tier")

    async def _settle(self) -> None:
        """One pass over the threads unsettled when it starts, `SETTLE_CONCURRENCY` at a
        time. It stops early when the hot tier fails again; threads it could not settle
        (or marked meanwhile) wait for the pass the next read starts, which after a pass
        that settled none waits out a backoff (`RESETTLE_RETRY_SECONDS`, doubling)."""
        pending = list(self._unsettled)
        try:
            await self._settle_pass(pending)
        finally:
            # Backing off is for a cold tier out of reach: a hot tier that failed the pass
            # has a backoff of its own, and the pass after it recovers must not wait.
            stuck = all(thread_id in self._unsettled for thread_id in pending)
            if pending and stuck and not self._hot_down:
                self._settle_not_before = time.monotonic() + self._settle_retry
                self._settle_retry = min(2 * self._settle_retry, RESETTLE_MAX_SECONDS)
            else:
                self._settle_not_before = 0.0
                self._settle_retry = RESETTLE_RETRY_SECONDS

    async def _settle_pass(self, pending: list[str]) -> None:
        for start in range(0, len(pending), SETTLE_CONCURRENCY):
            if self._hot_skipped():
                return
            # A thread settled meanwhile (by a writer's conflict) needs nothing more.
            batch = [t for t in pending[start : start + SETTLE_CONCURRENCY] if t in self._unsettled]
            outcomes = await asyncio.gather(
                *(self._reinstall_from_cold(thread_id) for thread_id in batch),
                return_exceptions=True,
            )
            for thread_id, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, asyncio.CancelledError):
                    raise outcome
                if isinstance(outcome, BaseException):
                    # Nobody awaits this pass: log it; the thread stays unsettled.
                    logger.warning("cannot settle hot copy of %r: %r", thread_id, outcome)

    def _settle_soon(self) -> None:
        """Settle the threads written while Redis was out of reach as soon as it answers
        again, not on this process's next read, which may not come for a long time (other
        processes that reach Redis would be served the older copies until then)."""
        running = self._resettler
        if running is not None and not running.done():
            return
        try:
            self._resettler = asyncio.get_running_loop().create_task(
                self._resettle(), name="state-resettle-hot-tier"
            )
        except RuntimeError:
            return  # no loop: the next read starts the settling pass

    async def _resettle(self) -> None:
        delay = wait = RESETTLE_RETRY_SECONDS
        while self._unsettled or self._hot_down:
            await asyncio.sleep(wait)
            wait = delay
            if self._hot_skipped():
                continue
            if not self._unsettled:
                # Probe the tier so an outage with nothing to settle ends too.
                if self._hot is not None:
                    up = (await self._hot.health()).up  # a probe reports failure, not raises
                    if not up:
                        self._hot_skip_until = time.monotonic() + HOT_RETRY_AFTER_SECONDS
                        continue
                self._hot_recovered()
                continue
            backing_off = self._settle_not_before - time.monotonic()
            if backing_off > 0:
                # A pass a read started settled none and backs off: try again when that
                # ends (within RESETTLE_MAX_SECONDS), not a whole `delay` after it.
                wait = backing_off
                continue
            before = set(self._unsettled)
            self._start_settling()
            await self.settled()
            # Not a cold read per thread every RESETTLE_RETRY_SECONDS while the cold tier
            # cannot answer them.
            progressed = bool(before - self._unsettled)
            delay = RESETTLE_RETRY_SECONDS if progressed else min(2 * delay, RESETTLE_MAX_SECONDS)
            wait = delay

    async def settled(self) -> None:
        """Wait for the background settling pass in progress, if any (tests, shutdown)."""
        running = self._settler
        if running is not None and running.get_loop() is asyncio.get_running_loop():
            await asyncio.shield(running)

    async def close(self) -> None:
        """Stop settling; what is left unsettled is served from cold by whoever reopens.
        Locks taken for callers cancelled meanwhile are released first."""
        loop = asyncio.get_running_loop()
        # Each take's release is started as it ends (`_unlock_late`, called first).
        await asyncio.gather(
            *(f for f in self._lock_takes if f.get_loop() is loop), return_exceptions=True
        )
        await asyncio.gather(
            *(t for t in self._unlocking if t.get_loop() is loop), return_exceptions=True
        )
        for running in (self._resettler, self._settler):
            if running is not None and running.get_loop() is asyncio.get_running_loop():
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running
        self._resettler = self._settler = None

    async def _begin_write(self, thread_id: str, *, clear: bool = False) -> WriteIntent | None:
        """Register a write intent (`clear`: dropping the cached record first); None if the
        hot tier cannot take one (the thread is then unsettled: re-installed from cold
        before this process serves it from hot, as after a failed invalidation)."""
        if self._hot is None:
            return None
        if self._hot_skipped():
            self._unsettled.add(thread_id)
            return None
        token = secrets.token_hex(8)
        try:
            intent = await self._hot.begin_write(
                thread_id,
                bound_ms=self._lock_ttl_ms,
                ttl_seconds=self._hot_ttl_seconds,
                token=token,
                clear=clear,
            )
        except BackendUnavailable as exc:
            self._hot_failed("begin_write", exc)
            # The intent may have landed with its reply lost: settling removes it by token.
            self._strand(thread_id, WriteIntent(thread_id, token, registered_at=0))
            return None
        self._hot_recovered()
        return intent

    async def _abandon_write(self, intent: WriteIntent | None) -> None:
        if self._hot is None or intent is None:
            return
        try:
            await self._hot.abandon_write(intent)
        except BackendUnavailable as exc:
            # The intent expires at its deadline; until then readers just go to cold.
            self._hot_failed("abandon_write", exc)

    async def _install(
        self,
        record: WorkflowRecord,
        *,
        intent: WriteIntent | None = None,
        expired_before: int | None = None,
        lease: str | None = None,
        written: bool = False,
    ) -> None:
        if self._hot is None:
            return
        if self._hot_skipped() or (written and intent is None):
            # A write without an intent (Redis was out at its start) cannot tell whether a
            # newer version was installed and evicted since: the settle re-installs it.
            self._strand(record.thread_id, intent)
            return
        try:
            installed = await self._hot.install(
                record,
                ttl_seconds=self._hot_ttl_seconds,
                intent=intent,
                expired_before=expired_before,
                lease=lease,
                written=written,
            )
        except BackendUnavailable as exc:
            self._hot_failed("install", exc)
            self._strand(record.thread_id, intent)
            return
        self._hot_recovered()
        if not installed:
            self.stats.installs_rejected += 1

    def _strand(self, thread_id: str, intent: WriteIntent | None) -> None:
        self._unsettled.add(thread_id)
        if intent is not None:
            self._stranded_intents.setdefault(thread_id, []).append(intent)

    async def _invalidate(self, thread_id: str) -> None:
        if self._hot is None:
            return
        if self._hot_skipped():
            self._unsettled.add(thread_id)
            return
        try:
            await self._hot.invalidate(thread_id)
        except BackendUnavailable as exc:
            self._hot_failed("invalidate", exc)
            self._unsettled.add(thread_id)

    async def _reinstall_from_cold(self, thread_id: str, intent: WriteIntent | None = None) -> bool:
        """Make the hot copy at least as new as cold, replacing `intent` (whose write
        did not happen) if given; False if the hot tier is failing."""
        if self._hot is None:
            return True
        if self._hot_skipped():
            self._strand(thread_id, intent)
            return False
        # Committed writes of ours (their cold writes are done, so the cold read below
        # sees them): their intents go with this install.
        stranded = self._stranded_intents.pop(thread_id, [])
        if intent is not None:
            # The caller's, first: it landed (a stranded one may not have), so the install
            # below can require it.
            stranded.insert(0, intent)
        own = stranded[0] if stranded else None
        # Discarded before the cold read, so a writer that fails meanwhile marks it again;
        # `_settling` keeps readers off the hot copy until the install below lands.
        self._unsettled.discard(thread_id)
        self._settling.add(thread_id)
        try:
            try:
                record = await self._cold.get(thread_id)
            except BackendUnavailable as exc:
                # Cold trouble is the caller's own call to report; keep it for next time.
                # Our intents hide the entry until their deadlines meanwhile.
                logger.info("cannot settle hot copy of %r yet: %s", thread_id, exc)
                self._unsettled.add(thread_id)
                self._stranded_intents.setdefault(thread_id, []).extend(stranded)
                return True
            except (CorruptState, UnsupportedSchemaVersion):
                # Cold holds what `get` refuses: nothing to install, and an older readable
                # copy must not be served instead. Dropped as a record gone is; the next
                # read reports the damage, not a caller's conflicted write (`_under_intent`).
                record = None
            except BaseException:
                # Whatever else stopped the cold read (cancelled, refused): still unsettled.
                self._unsettled.add(thread_id)
                self._stranded_intents.setdefault(thread_id, []).extend(stranded)
                raise
            try:
                if record is None:
                    await self._hot.invalidate(thread_id)
                elif not await self._hot.install(
                    record,
                    ttl_seconds=self._hot_ttl_seconds,
                    intent=own,
                    # Registered before this cold read: intents expired by then are safe
                    # to clear, as for a reader.
                    expired_before=None if own is None else own.registered_at,
                    # The caller's, like a writer's, is required still in the entry: one
                    # that lost it (evicted) may have held a newer version meanwhile.
                    written=intent is not None,
                ):
                    self.stats.installs_rejected += 1
                for leftover in stranded[1:] if record is not None else stranded:
                    await self._hot.abandon_write(leftover)
            except BackendUnavailable as exc:
                self._hot_failed("reinstall", exc)
                self._strand(thread_id, None)
                self._stranded_intents.setdefault(thread_id, []).extend(stranded)
                return False
        finally:
            self._settling.discard(thread_id)
        self._hot_recovered()
        return True

    def _hot_failed(self, operation: str, exc: BackendUnavailable) -> None:
        self.stats.hot_errors += 1
        self._hot_skip_until = time.monotonic() + HOT_RETRY_AFTER_SECONDS
        if not self._hot_down:
            self._hot_down = True
            logger.warning("hot tier down during %s, serving from cold: %s", operation, exc)
        self._settle_soon()

    def _hot_recovered(self) -> None:
        self._hot_skip_until = 0.0
        if self._hot_down:
            self._hot_down = False
            logger.warning("hot tier reachable again")


class TieredStateStore(SizedStateStore):
    """What an app uses: size-bounded records (`SizedStateStore`) over `CacheAsideStore`,
    with its locks, health and hot-tier upkeep."""

    def __init__(
        self,
        cold: ColdStateStore,
        hot: HotStateStore | None,
        settings: Settings,
        size: StateSizeManager | None = None,
    ) -> None:
        self.cache = CacheAsideStore(
            cold,
            hot,
            lock_ttl_ms=settings.state_lock_ttl_ms,
            hot_ttl_seconds=settings.state_hot_ttl_seconds,
        )
        # Default: the settings' policy, archiving into the cold store itself.
        super().__init__(
            self.cache,
            size
            or StateSizeManager.from_settings(
                settings, ColdRecordArchive.from_settings(cold, settings)
            ),
        )

    @classmethod
    def from_backends(cls, backends: Backends) -> TieredStateStore:
        return cls(backends.cold, backends.hot, backends.settings)

    @property
    def stats(self) -> CacheStats:
        return self.cache.stats

    async def replace_damaged(
        self, thread_id: str, sections: dict[str, JSON], *, expected_version: int, agent_id: str
    ) -> WorkflowRecord:
        """For an operator's repair of a record `get` refuses (`CorruptState`): its sections
        replaced whole if still at `expected_version` (the cold store's `stored_version`),
        as `ColdStateStore.replace_damaged` says, stored bounded as `create` stores them; the
        hot copy follows."""
        with attributed("state.replace_damaged"):
            stored, actions = await self.size.shrink(
                thread_id, {name: escaped(value) for name, value in sections.items()}
            )
            self._stored_size("replace_damaged", actions.after.total)
            record = await self.cache.replace_damaged(
                thread_id, stored, expected_version=expected_version, agent_id=agent_id
            )
            return await self._expand(record)

    async def is_cached(self, thread_id: str) -> bool:
        return await self.cache.is_cached(thread_id)

    async def lock(self, name: str, *, ttl_ms: int | None = None) -> Lock:
        return await self.cache.lock(name, ttl_ms=ttl_ms)

    async def lock_expires_in(self, name: str) -> float | None:
        return await self.cache.lock_expires_in(name)

    async def renew(self, lock: Lock) -> bool:
        return await self.cache.renew(lock)

    async def unlock(self, lock: Lock) -> bool:
        return await self.cache.unlock(lock)

    async def health(self) -> list[TierHealth]:
        return await self.cache.health()

    async def settled(self) -> None:
        await self.cache.settled()

    async def close(self) -> None:
        await self.cache.close()


async def _probe(name: str, check: Awaitable[TierHealth]) -> TierHealth:
    """Await a tier's health check; whatever it raises becomes a down report."""
    try:
        return await check
    # Health must answer whatever went wrong, so anything a check raises is a "down".
    except Exception as exc:
        return TierHealth(name, up=False, detail=f"{type(exc).__name__}: {exc}")


@contextmanager
def _span(operation: str, **attributes: str) -> Iterator[trace.Span]:
    with (
        tracer.start_as_current_span(
            f"state.{operation}",
            attributes={f"state.{name}": value for name, value in attributes.items()},
        ) as span,
        attributed(f"state.{operation}"),
    ):
        yield span
