"""Cache-aside over the real tiers: Cosmos emulator (cold) and redis-server (hot).

The outage tests start their own Redis on a free loopback port and stop it
themselves; the session's Redis is never touched.
"""

from __future__ import annotations

import asyncio
import base64
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from devstack import RedisServer, free_port
from state import tiered as tiered_module
from state.cold.cosmos_client import CosmosConnection
from state.cold.cosmos_store import CosmosStateStore
from state.errors import (
    BackendUnavailable,
    CorruptState,
    LockNotAcquired,
    StaleFencingToken,
    VersionConflict,
    WorkflowExists,
    WorkflowNotFound,
)
from state.factory import backends_for, open_backends
from state.hot.redis_client import FAIL_FAST_SECONDS, create_redis_client, hot_namespace
from state.hot.redis_store import RedisHotStore
from state.ports import ColdStateStore, WorkflowRecord
from state.settings import Settings
from state.size import is_archived, is_offloaded, pruned_summary
from state.tiered import SETTLE_CONCURRENCY, TieredStateStore
from tests.support.redis_round_trips import RedisRoundTrips

RACE_ROUNDS = 15
READERS_PER_ROUND = 3
MAX_READ_LAG_SECONDS = 0.01


@pytest.fixture(scope="module")
def settings_for(stack_env: dict[str, str]) -> Callable[..., Settings]:
    def build(redis_url: str | None = stack_env["REDIS_URL"], **overrides: Any) -> Settings:
        return Settings.model_validate(
            {
                "cosmos_endpoint": stack_env["COSMOS_ENDPOINT"],
                "cosmos_key": stack_env["COSMOS_KEY"],
                "cosmos_create_if_missing": True,
                "postgres_url": stack_env["POSTGRES_URL"],
                "redis_url": redis_url,
                **overrides,
            }
        )

    return build


@pytest.fixture
def settings(settings_for: Callable[..., Settings]) -> Settings:
    return settings_for()


@pytest.fixture
async def cold(settings: Settings) -> AsyncIterator[CosmosStateStore]:
    connection = CosmosConnection(settings.cosmos)
    store = CosmosStateStore(connection, max_item_bytes=settings.state_max_item_bytes)
    await store.setup()
    yield store
    await connection.close()


@pytest.fixture
async def hot(settings: Settings) -> AsyncIterator[RedisHotStore]:
    store = RedisHotStore(create_redis_client(settings), namespace=hot_namespace(settings))
    yield store
    await store.close()


@pytest.fixture
async def hot_ttl(
    hot: RedisHotStore, settings: Settings
) -> AsyncIterator[Callable[[str], Awaitable[int]]]:
    """A thread's hot-entry TTL in seconds, read past the store (-2: no entry)."""
    client = create_redis_client(settings)

    async def ttl(thread_id: str) -> int:
        return int(await client.ttl(hot.key(thread_id)))

    yield ttl
    await client.aclose()


@pytest.fixture
def tiered(cold: CosmosStateStore, hot: RedisHotStore, settings: Settings) -> TieredStateStore:
    return TieredStateStore(cold, hot, settings)


@pytest.fixture
async def other_process(
    cold: CosmosStateStore, settings: Settings
) -> AsyncIterator[Callable[[ColdStateStore], TieredStateStore]]:
    """Another worker: its own Redis client in front of the same cold store."""
    opened: list[RedisHotStore] = []

    def build(cold_store: ColdStateStore = cold) -> TieredStateStore:
        hot_store = RedisHotStore(create_redis_client(settings), namespace=hot_namespace(settings))
        opened.append(hot_store)
        return TieredStateStore(cold_store, hot_store, settings)

    yield build
    for hot_store in opened:
        await hot_store.close()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # the processor stays registered; a shut exporter drops spans


def _thread() -> str:
    return f"tiered-{uuid.uuid4().hex[:12]}"


class HeldCold:
    """The real cold store, whose reads can be held after they return (to order a race)."""

    def __init__(self, inner: ColdStateStore) -> None:
        self._inner = inner
        self.name = inner.name
        self.read_done = asyncio.Event()
        self.release = asyncio.Event()

    async def get(self, thread_id: str) -> WorkflowRecord | None:
        record = await self._inner.get(thread_id)
        self.read_done.set()
        await self.release.wait()
        return record

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def evicted_then_read(
    hot: RedisHotStore,
    cold: ColdStateStore,
    other_process: Callable[[ColdStateStore], TieredStateStore],
    thread: str,
) -> tuple[HeldCold, TieredStateStore, asyncio.Task[WorkflowRecord | None]]:
    """Evict the thread's hot copy, then start another worker's read of it: it misses and
    reads cold, and waits holding what it read (version 1) until `held.release` is set."""
    await hot.invalidate(thread)
    held = HeldCold(cold)
    reader = other_process(held)  # type: ignore[arg-type]
    reading = asyncio.create_task(reader.get(thread))
    await held.read_done.wait()
    return held, reader, reading


class LaggingCold:
    """The real cold store, whose read results arrive a little late (a slow network)."""

    def __init__(self, inner: ColdStateStore, seed: int) -> None:
        self._inner = inner
        self.name = inner.name
        self._random = random.Random(seed)

    async def get(self, thread_id: str) -> WorkflowRecord | None:
        record = await self._inner.get(thread_id)
        await asyncio.sleep(self._random.uniform(0, MAX_READ_LAG_SECONDS))
        return record

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class GatedCold:
    """The real cold store, whose reads wait at a gate while it is closed (to order a race)."""

    def __init__(self, inner: ColdStateStore) -> None:
        self._inner = inner
        self.name = inner.name
        self.gate = asyncio.Event()
        self.gate.set()
        # One item per read that reached the closed gate.
        self.arrivals: asyncio.Queue[str] = asyncio.Queue()

    async def get(self, thread_id: str) -> WorkflowRecord | None:
        if not self.gate.is_set():
            self.arrivals.put_nowait(thread_id)
            await self.gate.wait()
        return await self._inner.get(thread_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class WorkerKilled(BaseException):
    """The worker process dying: no handler of the store may run (none catches this)."""


class DyingCold:
    """The real cold store, whose writer fails right after its write is committed.

    `error` is how: killed by default. Each write first waits at `gate` (open unless
    a test closes it), announcing itself on `arrived`, to order a race.
    """

    def __init__(self, inner: ColdStateStore, error: BaseException | None = None) -> None:
        self._inner = inner
        self.name = inner.name
        self._error = error or WorkerKilled()
        self.gate = asyncio.Event()
        self.gate.set()
        self.arrived = asyncio.Event()

    async def update_section(self, thread_id: str, section: str, value: Any, **kwargs: Any) -> Any:
        self.arrived.set()
        await self.gate.wait()
        await self._inner.update_section(thread_id, section, value, **kwargs)
        raise self._error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# --------------------------------------------------------------------------- cache-aside


async def test_a_miss_reads_cold_and_fills_hot_then_hits(
    tiered: TieredStateStore,
    cold: CosmosStateStore,
    hot: RedisHotStore,
    settings: Settings,
    hot_ttl: Callable[[str], Awaitable[int]],
) -> None:
    thread = _thread()
    stored = await cold.create(thread, {"intake": {"case": "case_8842"}}, agent_id="intake")
    assert await tiered.get(thread) == stored
    assert (tiered.stats.misses, tiered.stats.hits) == (1, 0)
    assert await hot.get(thread) == stored
    assert await tiered.get(thread) == stored
    assert (tiered.stats.misses, tiered.stats.hits) == (1, 1)
    assert 0 < await hot_ttl(thread) <= settings.state_hot_ttl_seconds


async def test_an_unknown_thread_is_none_and_caches_nothing(
    tiered: TieredStateStore, hot: RedisHotStore, hot_ttl: Callable[[str], Awaitable[int]]
) -> None:
    thread = _thread()
    assert await tiered.get(thread) is None
    assert await hot.get(thread) is None  # the miss's fill lease, no record
    assert await hot_ttl(thread) <= 60
    with pytest.raises(WorkflowNotFound):
        await tiered.update_section(thread, "s", 1, agent_id="a")


async def test_create_writes_cold_and_installs_hot(
    tiered: TieredStateStore, cold: CosmosStateStore, hot: RedisHotStore
) -> None:
    thread = _thread()
    created = await tiered.create(thread, {"s": 1}, agent_id="intake")
    assert await cold.get(thread) == created
    assert await hot.get(thread) == created
    with pytest.raises(WorkflowExists):
        await tiered.create(thread, {"s": 2}, agent_id="intake")
    assert await tiered.get(thread) == created


async def test_create_replaces_a_copy_left_from_an_earlier_record(
    tiered: TieredStateStore, cold: CosmosStateStore, hot: RedisHotStore
) -> None:
    thread = _thread()
    await tiered.create(thread, {"s": "old"}, agent_id="a")
    for version in range(1, 4):
        await tiered.update_section(thread, "s", version, agent_id="a")
    await cold.delete(thread)  # the hot copy (version 4) outlives the record
    fresh = await tiered.create(thread, {"s": "new"}, agent_id="b")
    assert await tiered.get(thread) == fresh
    assert await hot.get(thread) == fresh


async def test_update_goes_to_cold_first_then_updates_hot(
    tiered: TieredStateStore, cold: CosmosStateStore, hot: RedisHotStore
) -> None:
    thread = _thread()
    await tiered.create(thread, {"billing": None, "account": {"locked": True}}, agent_id="intake")
    updated = await tiered.update_section(
        thread, "billing", {"duplicate": 640.0}, agent_id="billing"
    )
    assert updated.version == 2
    assert updated.sections == {"billing": {"duplicate": 640.0}, "account": {"locked": True}}
    assert await cold.get(thread) == updated
    assert await hot.get(thread) == updated
    trail = await tiered.audit_trail(thread)
    assert [(e.version, e.agent_id) for e in trail] == [(2, "billing"), (1, "intake")]
    assert [e.version for e in await tiered.audit_trail(thread, limit=1)] == [2]


async def test_a_conflict_reaches_the_caller_and_refreshes_an_outdated_hot_copy(
    tiered: TieredStateStore, cold: CosmosStateStore, hot: RedisHotStore
) -> None:
    thread = _thread()
    await tiered.create(thread, {"s": 0}, agent_id="a")
    # Another writer changed cold without updating this hot copy.
    newer = await cold.update_section(thread, "s", 1, expected_version=1, agent_id="other")
    with pytest.raises(VersionConflict) as conflict:
        await tiered.update_section(thread, "s", 2, agent_id="a")
    assert (conflict.value.expected, conflict.value.actual) == (1, 2)
    assert await hot.get(thread) == newer
    # The caller's retry reads the refreshed copy and succeeds.
    retried = await tiered.update_section(thread, "s", 2, agent_id="a")
    assert retried.version == 3
    with pytest.raises(VersionConflict):
        await tiered.update_section(thread, "s", 9, agent_id="a", expected_version=2)


async def test_a_conflict_on_a_record_damaged_since_is_a_conflict_and_serves_no_stale_copy(
    tiered: TieredStateStore, cold: CosmosStateStore, hot: RedisHotStore
) -> None:
    """Another writer moved the record on, then it was damaged (by hand): a write at the
    version this process read is refused as the cold store refuses it, a conflict (a stale
    version comes first), not as the refresh after it fails to read the record. The
    outdated hot copy goes, so the caller's next read reports the damage."""
    thread = _thread()
    await tiered.create(thread, {"s": 0}, agent_id="a")
    await cold.update_section(thread, "s", 1, expected_version=1, agent_id="other")
    container = await cold._connection.container()
    stored = await container.read_item("wf", partition_key=thread)
    await container.replace_item("wf", {**stored, "sections": []})
    with pytest.raises(VersionConflict) as conflict:
        await tiered.update_section(thread, "s", 2, agent_id="a", expected_version=1)
    assert (conflict.value.expected, conflict.value.actual) == (1, 2)
    assert await hot.get(thread) is None
    with pytest.raises(CorruptState):
        await tiered.get(thread)


async def test_a_stale_install_racing_a_newer_write_cannot_win(
    tiered: TieredStateStore,
    cold: CosmosStateStore,
    hot: RedisHotStore,
    other_process: Callable[[ColdStateStore], TieredStateStore],
) -> None:
    thread = _thread()
    await tiered.create(thread, {"billing": "v1"}, agent_id="intake")
    held, reader, reading = await evicted_then_read(hot, cold, other_process, thread)

    newer = await tiered.update_section(
        thread, "billing", "v2", agent_id="billing", expected_version=1
    )
    held.release.set()  # now the reader installs what it read
    assert (await reading).version == 1

    assert reader.stats.installs_rejected == 1
    assert await hot.get(thread) == newer
    assert await reader.get(thread) == newer
    assert reader.stats.hits == 1


async def test_a_retried_create_does_not_let_a_stale_install_stick(
    tiered: TieredStateStore,
    cold: CosmosStateStore,
    hot: RedisHotStore,
    other_process: Callable[[ColdStateStore], TieredStateStore],
) -> None:
    thread = _thread()
    await tiered.create(thread, {"billing": "v1"}, agent_id="intake")
    held, _, reading = await evicted_then_read(hot, cold, other_process, thread)
    newer = await tiered.update_section(
        thread, "billing", "v2", agent_id="billing", expected_version=1
    )
    # A client retries the create: it fails, but clears the hot copy on the way.
    with pytest.raises(WorkflowExists):
        await tiered.create(thread, {"billing": "v1"}, agent_id="intake")
    held.release.set()  # now the reader installs what it read
    assert (await reading).version == 1

    assert await hot.get(thread) == newer


# --------------------------------------------------------------------------- half-done writes


@pytest.mark.parametrize(
    "failure",
    [WorkerKilled(), BackendUnavailable("cosmos", "timed out after the write was applied")],
    ids=["killed", "unknown-outcome"],
)
async def test_a_writer_failing_after_its_cold_commit_leaves_no_stale_copy(
    failure: BaseException,
    tiered: TieredStateStore,
    cold: CosmosStateStore,
    hot: RedisHotStore,
    other_process: Callable[[ColdStateStore], TieredStateStore],
) -> None:
    thread = _thread()
    created = await tiered.create(thread, {"performed": []}, agent_id="a")
    assert await tiered.get(thread) == created and tiered.stats.hits == 1
    writer = other_process(DyingCold(cold, failure))  # type: ignore[arg-type]
    with pytest.raises(type(failure)):
        await writer.update_section(
            thread, "performed", ["REFUND-1"], agent_id="a", expected_version=1
        )
    committed = await cold.get(thread)
    assert committed is not None and committed.version == 2

    assert await hot.get(thread) is None  # hidden by the writer's intent, not served stale
    assert await tiered.get(thread) == committed
    assert tiered.stats.pending == 1


async def test_two_writers_one_dies_and_the_survivor_does_not_unhide_a_stale_copy(
    tiered: TieredStateStore,
    cold: CosmosStateStore,
    hot: RedisHotStore,
    other_process: Callable[[ColdStateStore], TieredStateStore],
) -> None:
    thread = _thread()
    await tiered.create(thread, {"billing": None, "account": None}, agent_id="intake")
    doomed_cold = DyingCold(cold)
    doomed_cold.gate.clear()
    doomed = other_process(doomed_cold)  # type: ignore[arg-type]
    dying = asyncio.create_task(
        doomed.update_section(thread, "account", "done", agent_id="account", expected_version=2)
    )
    await doomed_cold.arrived.wait()  # its intent is registered, its cold write not yet sent

    survivor = await tiered.update_section(
        thread, "billing", "done", agent_id="billing", expected_version=1
    )
    assert await hot.get(thread) is None  # the other intent still hides version 2
    doomed_cold.gate.set()
    with pytest.raises(WorkerKilled):
        await dying
    committed = await cold.get(thread)
    assert committed is not None and committed.version == survivor.version + 1

    assert await hot.get(thread) is None
    assert await tiered.get(thread) == committed


async def test_a_reader_install_cannot_clear_a_live_writers_intent(
    cold: CosmosStateStore,
    hot: RedisHotStore,
    settings_for: Callable[..., Settings],
    other_process: Callable[[ColdStateStore], TieredStateStore],
) -> None:
    thread = _thread()
    # Its intent expires almost at once: below the settings' floor, so not validated.
    writer_settings = settings_for().model_copy(update={"state_lock_ttl_ms": 1})
    writer = TieredStateStore(DyingCold(cold), hot, writer_settings)  # type: ignore[arg-type]
    await writer.create(thread, {"billing": "v1"}, agent_id="intake")
    held, reader, reading = await evicted_then_read(hot, cold, other_process, thread)
    with pytest.raises(WorkerKilled):
        await writer.update_section(thread, "billing", "v2", agent_id="billing", expected_version=1)
    # The writer registered its intent before now and its bound is 1 ms: wait on the
    # Redis clock until the intent has expired, so only the read order protects it.
    dead_by = (await hot.read(thread)).observed_at + 1000
    while (await hot.read(thread)).observed_at <= dead_by:
        pass
    held.release.set()  # now the reader installs what it read
    assert (await reading).version == 1

    assert await hot.get(thread) is None
    committed = await cold.get(thread)
    assert committed is not None and committed.version == 2
    assert await reader.get(thread) == committed


async def test_an_expired_intent_is_cleared_by_the_next_readers_install(
    tiered: TieredStateStore, cold: CosmosStateStore, hot: RedisHotStore, settings: Settings
) -> None:
    thread = _thread()
    await tiered.create(thread, {"s": 0}, agent_id="a")
    # A writer's steps up to its death after the cold commit, with a bound already over.
    await hot.begin_write(thread, bound_ms=0, ttl_seconds=settings.state_hot_ttl_seconds)
    committed = await cold.update_section(thread, "s", 1, expected_version=1, agent_id="dead")

    assert await tiered.get(thread) == committed
    assert tiered.stats.pending == 1
    assert await hot.get(thread) == committed
    assert await tiered.get(thread) == committed and tiered.stats.hits == 1


async def test_a_refused_write_removes_its_intent(
    tiered: TieredStateStore, hot: RedisHotStore
) -> None:
    thread = _thread()
    await tiered.create(thread, {"s": 0}, agent_id="a")
    fenced = await tiered.update_section(thread, "s", 1, agent_id="a", fencing_token=10)
    with pytest.raises(StaleFencingToken):
        await tiered.update_section(thread, "s", 2, agent_id="b", fencing_token=9)
    with pytest.raises(WorkflowNotFound):
        await tiered.update_section(_thread(), "s", 2, agent_id="b", expected_version=1)
    assert await hot.get(thread) == fenced


async def test_a_lock_taken_for_a_cancelled_caller_is_released_before_close_returns(
    tiered: TieredStateStore, hot: RedisHotStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller cancelled while Redis takes its lock (as a stopping server cancels its
    requests) leaves that lock to be released: the store's close waits for it, as the
    Redis client closes next and the lock would be held to its TTL, the case busy."""
    name = f"run:{_thread()}"
    acquire, release = hot.acquire_lock, hot.release_lock
    taken, reply = asyncio.Event(), asyncio.Event()
    released: list[bool] = []

    async def reply_held(lock_name: str, *, ttl_ms: int) -> Any:
        held = await acquire(lock_name, ttl_ms=ttl_ms)
        taken.set()
        await reply.wait()
        return held

    async def recorded_release(lock: Any) -> bool:
        released.append(await release(lock))
        return released[-1]

    monkeypatch.setattr(hot, "acquire_lock", reply_held)
    monkeypatch.setattr(hot, "release_lock", recorded_release)
    locking = asyncio.ensure_future(tiered.lock(name))
    await taken.wait()
    locking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await locking
    reply.set()
    await tiered.close()
    assert released == [True]
    assert await hot.lock_ttl_ms(name) is None


async def test_a_read_takes_one_redis_round_trip_and_a_write_two(
    cold: CosmosStateStore, settings: Settings
) -> None:
    client = create_redis_client(settings)
    round_trips = RedisRoundTrips()
    unwatch = round_trips.watch(client)
    commands = round_trips.commands
    hot = RedisHotStore(client, namespace=hot_namespace(settings))
    try:
        tiered = TieredStateStore(cold, hot, settings)
        thread = _thread()
        await tiered.create(thread, {"s": 0}, agent_id="a")
        # Once first, so every script is loaded on the server.
        await tiered.update_section(thread, "s", 1, agent_id="a", expected_version=1)
        await tiered.get(thread)
        commands.clear()
        assert (await tiered.get(thread)) is not None and tiered.stats.hits == 2
        assert commands == ["EVALSHA"]
        commands.clear()
        await tiered.update_section(thread, "s", 2, agent_id="a", expected_version=2)
        assert commands == ["EVALSHA", "EVALSHA"]  # the intent, then the install
    finally:
        unwatch()
        await hot.close()


async def test_concurrent_readers_and_writers_leave_hot_no_older_than_cold(
    cold: CosmosStateStore,
    hot: RedisHotStore,
    other_process: Callable[[ColdStateStore], TieredStateStore],
) -> None:
    thread = _thread()
    writer = other_process(cold)
    readers = [
        other_process(LaggingCold(cold, seed))  # type: ignore[arg-type]
        for seed in range(READERS_PER_ROUND)
    ]
    await writer.create(thread, {"n": 0}, agent_id="writer")
    for round_number in range(RACE_ROUNDS):
        await hot.invalidate(thread)  # eviction, so the readers install what they read
        await asyncio.gather(
            writer.update_section(thread, "n", round_number + 1, agent_id="writer"),
            *(reader.get(thread) for reader in readers),
        )
        cached = await hot.get(thread)
        stored = await cold.get(thread)
        assert stored is not None and stored.version == round_number + 2
        assert cached is None or cached == stored, f"round {round_number}"
    rejected = sum(reader.stats.installs_rejected for reader in readers)
    print(f"\nrace: {RACE_ROUNDS} rounds, {rejected} stale installs rejected")


async def test_store_calls_are_traced(
    tiered: TieredStateStore, spans: InMemorySpanExporter
) -> None:
    thread = _thread()
    await tiered.create(thread, {"s": 0}, agent_id="a")
    await tiered.get(thread)
    await tiered.update_section(thread, "s", 1, agent_id="a")
    await tiered.audit_trail(thread)
    traced = [
        (span.name, span.attributes.get("state.cache") if span.attributes else None)
        for span in spans.get_finished_spans()
        if span.attributes and span.attributes.get("state.thread_id") == thread
    ]
    assert ("state.create", None) in traced
    assert ("state.get", "hit") in traced
    assert ("state.update_section", None) in traced
    assert ("state.audit_trail", None) in traced


async def test_from_backends_composes_the_configured_tiers(
    settings_for: Callable[..., Settings],
) -> None:
    # Postgres here: the composition must not care which cold backend it fronts.
    backends = await open_backends(settings_for(state_cold_backend="postgres"))
    try:
        tiered = TieredStateStore.from_backends(backends)
        thread = _thread()
        created = await tiered.create(thread, {"s": 0}, agent_id="a")
        assert await tiered.get(thread) == created and tiered.stats.hits == 1
        health = await tiered.health()
        assert [(h.name, h.up) for h in health] == [("postgres", True), ("redis", True)]
    finally:
        await backends.close()


async def test_stores_over_different_cold_stores_share_one_redis_without_sharing_copies(
    settings_for: Callable[..., Settings],
) -> None:
    stores: list[TieredStateStore] = []
    async with AsyncExitStack() as stack:
        for overrides in (
            {},
            {"cosmos_container": "state-second"},
            {"state_cold_backend": "postgres"},
        ):
            backends = await stack.enter_async_context(backends_for(settings_for(**overrides)))
            stores.append(TieredStateStore.from_backends(backends))
        thread = _thread()
        # The same thread id in every store, each cached right after its create.
        records = [
            await store.create(thread, {"owner": owner}, agent_id="a")
            for owner, store in enumerate(stores)
        ]
        for store, record in zip(stores, records, strict=True):
            assert await store.get(thread) == record
            assert store.stats.hits == 1
        held = await stores[0].lock(thread)
        assert await stores[1].lock(thread) and await stores[2].lock(thread)
        assert await stores[0].unlock(held)


# --------------------------------------------------------------------------- size management


@pytest.fixture
def windowed(
    cold: CosmosStateStore, hot: RedisHotStore, settings_for: Callable[..., Settings]
) -> TieredStateStore:
    """A store whose settings name `messages`, and only it, as a window of 5 messages."""
    settings = settings_for(state_message_sections="messages", state_message_window=5)
    return TieredStateStore(cold, hot, settings)


def _messages(start: int, stop: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"m{n}"} for n in range(start, stop)]


async def test_a_message_window_keeps_the_newest_and_counts_what_it_dropped(
    windowed: TieredStateStore, cold: CosmosStateStore, hot: RedisHotStore
) -> None:
    thread = _thread()
    await windowed.create(thread, {"messages": [], "notes": _messages(0, 12)}, agent_id="a")
    # One message per write, as agents append them: the summary count accumulates.
    for n in range(12):
        current = await windowed.get(thread)
        assert current is not None
        record = await windowed.update_section(
            thread,
            "messages",
            [*current.sections["messages"], *_messages(n, n + 1)],
            agent_id="a",
            expected_version=current.version,
        )
    # Unconfigured sections keep every message, whether created or updated.
    record = await windowed.update_section(thread, "notes", _messages(0, 13), agent_id="a")
    assert record.sections == {
        "messages": [pruned_summary(7), *_messages(7, 12)],
        "notes": _messages(0, 13),
    }
    assert await windowed.get(thread) == record
    # Pruned in what both tiers store, not only in what callers see.
    assert await cold.get(thread) == record and await hot.get(thread) == record

    created = await windowed.create(_thread(), {"messages": _messages(0, 12)}, agent_id="a")
    assert created.sections["messages"] == [pruned_summary(7), *_messages(7, 12)]


async def test_a_section_that_would_push_the_record_past_an_item_is_offloaded(
    tiered: TieredStateStore, cold: CosmosStateStore, hot: RedisHotStore, settings: Settings
) -> None:
    """Under a quarter item alone, but the record already holds most of one (written raw)."""
    randomness = random.Random(7)

    def incompressible() -> str:
        # Compressing base64 of random bytes gains less than re-encoding it costs.
        return base64.b64encode(randomness.randbytes(300_000)).decode()

    thread = _thread()
    await cold.create(thread, {f"s{n}": incompressible() for n in range(4)}, agent_id="raw")
    value = incompressible()
    assert len(value) < settings.state_max_item_bytes // 4  # inline on its own
    record = await tiered.update_section(thread, "s4", value, agent_id="a")
    assert record.version == 2 and record.sections["s4"] == value
    stored = await cold.get(thread)
    assert stored is not None and is_offloaded(stored.sections["s4"])
    assert await hot.get(thread) == stored
    assert [entry.version for entry in await tiered.audit_trail(thread)] == [2, 1]
    fetched = await tiered.get(thread)
    assert fetched is not None and fetched.sections == record.sections


async def test_a_completed_archivable_section_is_archived_and_fetched_only_when_asked(
    cold: CosmosStateStore, hot: RedisHotStore, settings_for: Callable[..., Settings]
) -> None:
    store = TieredStateStore(cold, hot, settings_for(state_archivable_sections="billing"))
    thread = _thread()
    billing = {"refund": 120.0, "charges": list(range(50))}
    await store.create(thread, {"billing": billing, "account": "ok"}, agent_id="a")
    # Completed, but not configured archivable: stays inline.
    kept = await store.update_section(thread, "account", "ok", agent_id="a", completed=True)
    assert kept.sections["account"] == "ok"
    done = await store.update_section(thread, "billing", billing, agent_id="a", completed=True)
    assert is_archived(done.sections["billing"])  # the workflow said it is done with it
    assert await hot.get(thread) == await cold.get(thread)
    fetched = await store.get(thread, fetch_archived=True)
    assert fetched is not None and fetched.sections == {"billing": billing, "account": "ok"}


# --------------------------------------------------------------------------- locks


async def test_locks_fence_out_an_older_holder_in_the_cold_store(
    tiered: TieredStateStore,
) -> None:
    thread = _thread()
    await tiered.create(thread, {"s": 0}, agent_id="a")
    # Long enough that a loaded machine's pause between these calls does not end it.
    first = await tiered.lock(thread, ttl_ms=1_000)
    with pytest.raises(LockNotAcquired):
        await tiered.lock(thread)
    await tiered.update_section(thread, "s", 1, agent_id="a", fencing_token=first.fence)

    await asyncio.sleep(1.1)  # the first holder stalls past its TTL
    second = await tiered.lock(thread)
    assert second.fence > first.fence
    await tiered.update_section(thread, "s", 2, agent_id="b", fencing_token=second.fence)
    with pytest.raises(StaleFencingToken):
        await tiered.update_section(thread, "s", 99, agent_id="a", fencing_token=first.fence)
    assert not await tiered.unlock(first)
    assert await tiered.unlock(second)
    record = await tiered.get(thread)
    assert record is not None and (record.sections["s"], record.fence) == (2, second.fence)


async def test_without_a_hot_tier_everything_but_locks_works(
    cold: CosmosStateStore, settings_for: Callable[..., Settings]
) -> None:
    tiered = TieredStateStore(cold, None, settings_for(redis_url=None))
    thread = _thread()
    await tiered.create(thread, {"s": 0}, agent_id="a")
    updated = await tiered.update_section(thread, "s", 1, agent_id="a")
    assert await tiered.get(thread) == updated
    with pytest.raises(BackendUnavailable):
        await tiered.lock(thread)
    assert [(h.name, h.up) for h in await tiered.health()] == [("cosmos", True)]
    assert tiered.stats.hot_errors == 0


# --------------------------------------------------------------------------- Redis outages


@pytest.fixture
def dedicated_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(port=free_port(), workdir=tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def on_dedicated_redis(
    dedicated_redis: RedisServer, cold: CosmosStateStore, settings_for: Callable[..., Settings]
) -> AsyncIterator[Callable[..., tuple[RedisHotStore, TieredStateStore]]]:
    """Builds a tiered store over `cold` (or a wrapper of it) and the test's own Redis;
    whatever it built is closed after the test."""
    settings = settings_for(redis_url=dedicated_redis.url)
    opened: list[tuple[RedisHotStore, TieredStateStore]] = []

    def build(cold_store: ColdStateStore = cold) -> tuple[RedisHotStore, TieredStateStore]:
        hot = RedisHotStore(create_redis_client(settings), namespace=hot_namespace(settings))
        opened.append((hot, TieredStateStore(cold_store, hot, settings)))
        return opened[-1]

    yield build
    for hot, tiered in opened:
        await tiered.close()
        await hot.close()


async def test_redis_stopped_mid_run_then_restarted(
    dedicated_redis: RedisServer,
    cold: CosmosStateStore,
    on_dedicated_redis: Callable[..., tuple[RedisHotStore, TieredStateStore]],
) -> None:
    hot, tiered = on_dedicated_redis()
    thread, second_thread, untouched = _thread(), _thread(), _thread()
    await tiered.create(thread, {"billing": 0}, agent_id="intake")
    kept = await tiered.create(untouched, {"billing": 0}, agent_id="intake")
    assert await tiered.get(thread) is not None and tiered.stats.hits == 1

    dedicated_redis.stop()
    for amount in range(1, 6):
        record = await tiered.update_section(thread, "billing", amount, agent_id="billing")
    assert record.version == 6
    assert await tiered.get(thread) == record
    created = await tiered.create(second_thread, {"account": "locked"}, agent_id="intake")
    health = {h.name: h for h in await tiered.health()}
    assert health["cosmos"].up and not health["redis"].up
    assert tiered.stats.hot_errors >= 1
    with pytest.raises(BackendUnavailable):
        await tiered.lock(thread)
    assert await cold.get(thread) == record  # nothing lost

    dedicated_redis.start()  # no persistence: it comes back empty
    health = {h.name: h for h in await tiered.health()}
    assert health["cosmos"].up and health["redis"].up
    errors_before = tiered.stats.hot_errors
    assert await tiered.get(thread) == record
    assert await tiered.get(second_thread) == created
    await tiered.settled()  # the reads started settling, in the background
    assert await hot.get(thread) == record and await hot.get(second_thread) == created
    misses = tiered.stats.misses
    assert await tiered.get(untouched) == kept and tiered.stats.misses == misses + 1
    assert await hot.get(untouched) == kept
    hits = tiered.stats.hits
    assert await tiered.get(thread) == record and tiered.stats.hits == hits + 1
    assert tiered.stats.hot_errors == errors_before
    trail = await tiered.audit_trail(thread)
    assert [e.version for e in trail] == [6, 5, 4, 3, 2, 1]
    print(f"\nredis outage: stats {tiered.stats}")


async def test_a_copy_left_in_an_unreachable_redis_is_replaced_when_it_returns(
    dedicated_redis: RedisServer,
    on_dedicated_redis: Callable[..., tuple[RedisHotStore, TieredStateStore]],
) -> None:
    hot, tiered = on_dedicated_redis()
    thread = _thread()
    await tiered.create(thread, {"s": 0}, agent_id="a")
    dedicated_redis.pause()  # hung, not gone: it keeps version 1
    try:
        updated = await tiered.update_section(thread, "s", 1, agent_id="a")
    finally:
        dedicated_redis.resume()
    assert updated.version == 2 and tiered.stats.hot_errors >= 1
    await asyncio.sleep(FAIL_FAST_SECONDS)  # the timeout made the process rest the server
    assert (await hot.get(thread)).version == 1  # type: ignore[union-attr]

    await tiered.health()  # reachable again
    assert await tiered.get(thread) == updated
    await tiered.settled()
    assert await hot.get(thread) == updated


async def test_a_read_during_settling_is_served_from_cold(
    dedicated_redis: RedisServer,
    cold: CosmosStateStore,
    on_dedicated_redis: Callable[..., tuple[RedisHotStore, TieredStateStore]],
) -> None:
    gated = GatedCold(cold)
    hot, tiered = on_dedicated_redis(gated)
    thread = _thread()
    await tiered.create(thread, {"s": 0}, agent_id="a")
    dedicated_redis.pause()  # hung, not gone: it keeps version 1
    try:
        updated = await tiered.update_section(thread, "s", 1, agent_id="a")
    finally:
        dedicated_redis.resume()
    await tiered.health()  # reachable again; the thread still waits to be settled

    gated.gate.clear()
    first = asyncio.create_task(tiered.get(thread))
    # The read starts settling in the background and goes to cold itself.
    assert [await gated.arrivals.get(), await gated.arrivals.get()] == [thread, thread]
    second = asyncio.create_task(tiered.get(thread))  # settling's cold read is held
    assert await gated.arrivals.get() == thread  # so this one goes to cold too
    gated.gate.set()
    assert await first == updated  # never the version-1 copy still in Redis
    assert await second == updated
    await tiered.settled()
    assert await hot.get(thread) == updated


class HeldThreadsCold:
    """The real cold store, whose reads of `held` threads wait at a gate (settling's reads)."""

    def __init__(self, inner: ColdStateStore) -> None:
        self._inner = inner
        self.name = inner.name
        self.held: set[str] = set()
        self.gate = asyncio.Event()
        self.waiting = 0
        self.most_waiting = 0
        self.arrived = asyncio.Event()

    async def get(self, thread_id: str) -> WorkflowRecord | None:
        if thread_id in self.held and not self.gate.is_set():
            self.waiting += 1
            self.most_waiting = max(self.most_waiting, self.waiting)
            self.arrived.set()
            try:
                await self.gate.wait()
            finally:
                self.waiting -= 1
        return await self._inner.get(thread_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


OUTAGE_THREADS = 3 * SETTLE_CONCURRENCY


async def test_the_first_read_after_an_outage_does_not_settle_every_thread_on_its_path(
    dedicated_redis: RedisServer,
    cold: CosmosStateStore,
    on_dedicated_redis: Callable[..., tuple[RedisHotStore, TieredStateStore]],
) -> None:
    held = HeldThreadsCold(cold)
    hot, tiered = on_dedicated_redis(held)
    untouched = _thread()
    kept = await tiered.create(untouched, {"s": 0}, agent_id="a")
    dedicated_redis.stop()
    written = [_thread() for _ in range(OUTAGE_THREADS)]
    records = {t: await tiered.create(t, {"s": 1}, agent_id="a") for t in written}
    dedicated_redis.start()  # back, empty
    await tiered.health()  # reachable again; the outage's threads wait to be settled

    held.held.update(written)  # settling them now waits at the gate
    assert await asyncio.wait_for(tiered.get(untouched), timeout=5) == kept
    while held.waiting < SETTLE_CONCURRENCY:  # settling goes on in the background...
        held.arrived.clear()
        await asyncio.wait_for(held.arrived.wait(), timeout=5)
    await asyncio.sleep(0.2)  # time for more to arrive, were it not bounded
    assert held.most_waiting == SETTLE_CONCURRENCY  # ...bounded
    assert await hot.get(untouched) == kept

    held.gate.set()
    await tiered.settled()
    for thread, record in records.items():
        assert await hot.get(thread) == record
        assert await tiered.get(thread) == record
    assert held.most_waiting == SETTLE_CONCURRENCY


async def test_a_record_gone_from_cold_is_not_served_from_hot_after_a_write_finds_it_gone(
    tiered: TieredStateStore, cold: CosmosStateStore
) -> None:
    """Cold retention (TTL, sweep) removes records behind Redis's back; the next write notices."""
    thread_id = _thread()
    await tiered.create(thread_id, {"a": 1}, agent_id="t")
    assert await tiered.get(thread_id) is not None  # cached
    await cold.delete(thread_id)
    with pytest.raises(WorkflowNotFound):
        await tiered.update_section(thread_id, "a", 2, agent_id="t", expected_version=1)
    assert await tiered.get(thread_id) is None


# ---------------------------------------------------------------- installs under eviction
# No install puts an older record on an entry eviction emptied after a newer one was
# installed and acknowledged: each needs its writer's intent or its reader's lease still
# in the entry. Eviction is what a volatile-* policy does to the entry (a DEL here).


class SlowInstalls(RedisHotStore):
    """A worker's hot store whose installs wait for `resume`; its `begin_write` fails while
    `refuse_intents` is set (Redis out of reach for a moment)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.paused = asyncio.Event()
        self.resume = asyncio.Event()
        self.refuse_intents = False

    async def install(self, record: WorkflowRecord, **kwargs: Any) -> bool:
        if not self.resume.is_set():
            self.paused.set()
            await self.resume.wait()
        return await super().install(record, **kwargs)

    async def begin_write(self, *args: Any, **kwargs: Any) -> Any:
        if self.refuse_intents:
            raise BackendUnavailable("redis", "TimeoutError: injected")
        return await super().begin_write(*args, **kwargs)


@pytest.fixture
async def slow(
    cold: CosmosStateStore, settings: Settings
) -> AsyncIterator[tuple[SlowInstalls, TieredStateStore]]:
    hot_store = SlowInstalls(create_redis_client(settings), namespace=hot_namespace(settings))
    yield hot_store, TieredStateStore(cold, hot_store, settings)
    hot_store.resume.set()
    await hot_store.close()


async def _until_install(hot_store: SlowInstalls, call: Awaitable[Any]) -> asyncio.Future[Any]:
    started = asyncio.ensure_future(call)
    await asyncio.wait_for(hot_store.paused.wait(), 10)
    return started


async def _served_after_eviction(
    hot: RedisHotStore,
    slow_store: SlowInstalls,
    slow_call: asyncio.Future[Any],
    reader: TieredStateStore,
    thread: str,
) -> tuple[tuple[int, Any], Any]:
    """The entry evicted, then the slow call let go to its end: what a reader is served,
    and what the slow call returned (or raised)."""
    await hot._client.delete(hot.key(thread))
    slow_store.resume.set()
    [outcome] = await asyncio.gather(slow_call, return_exceptions=True)
    served = await reader.get(thread)
    assert served is not None
    return (served.version, served.sections["s"]), outcome


async def test_a_conflicted_writers_reinstall_serves_no_older_record_after_eviction(
    tiered: TieredStateStore, hot: RedisHotStore, slow: tuple[SlowInstalls, TieredStateStore]
) -> None:
    """A and B hold v1, B writes v2; A's write conflicts and its re-install (of v2, read
    again from cold) is slow; B writes v3; the entry is evicted; A's re-install lands."""
    slow_hot, a = slow
    thread = _thread()
    await tiered.create(thread, {"s": "v1"}, agent_id="b")
    await tiered.update_section(thread, "s", "v2", expected_version=1, agent_id="b")
    conflicted = await _until_install(
        slow_hot, a.update_section(thread, "s", "a", expected_version=1, agent_id="a")
    )
    await tiered.update_section(thread, "s", "v3", expected_version=2, agent_id="b")
    served, outcome = await _served_after_eviction(hot, slow_hot, conflicted, tiered, thread)
    assert served == (3, "v3") and isinstance(outcome, VersionConflict)


async def test_a_slow_creates_install_serves_no_older_record_after_eviction(
    tiered: TieredStateStore, hot: RedisHotStore, slow: tuple[SlowInstalls, TieredStateStore]
) -> None:
    """Process 1 creates the thread (v1), its install slow; process 2 reads v1 and writes
    v2; the entry is evicted; process 1's install of v1 lands."""
    slow_hot, one = slow
    thread = _thread()
    created = await _until_install(slow_hot, one.create(thread, {"s": "v1"}, agent_id="one"))
    await tiered.update_section(thread, "s", "v2", expected_version=1, agent_id="two")
    served, outcome = await _served_after_eviction(hot, slow_hot, created, tiered, thread)
    assert served == (2, "v2") and outcome.version == 1


async def test_a_reader_that_missed_on_another_schemas_copy_installs_no_older_record(
    tiered: TieredStateStore, hot: RedisHotStore, slow: tuple[SlowInstalls, TieredStateStore]
) -> None:
    """The entry holds a copy of another schema version (a rolling deploy's): a miss that
    must take a lease like any. The reader's install of v1 is slow; a writer writes v2;
    the entry is evicted; the reader's install lands."""
    slow_hot, reader = slow
    thread = _thread()
    await tiered.create(thread, {"s": "v1"}, agent_id="w")
    await hot._client.hset(hot.key(thread), "schema_version", "0")
    read = await _until_install(slow_hot, reader.get(thread))
    await tiered.update_section(thread, "s", "v2", expected_version=1, agent_id="w")
    served, outcome = await _served_after_eviction(hot, slow_hot, read, tiered, thread)
    assert served == (2, "v2") and outcome.version == 1


async def test_a_writer_without_an_intent_installs_no_older_record_after_eviction(
    tiered: TieredStateStore,
    hot: RedisHotStore,
    slow: tuple[SlowInstalls, TieredStateStore],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A's `begin_write` fails, so it writes v2 without an intent; its cold write outlasts
    the hot tier's back-off (set to 0 rather than waited for); B writes v3; the entry is
    evicted; whatever A installs must not be served over v3."""
    monkeypatch.setattr(tiered_module, "HOT_RETRY_AFTER_SECONDS", 0.0)
    slow_hot, a = slow
    slow_hot.refuse_intents = True
    thread = _thread()
    await tiered.create(thread, {"s": "v1"}, agent_id="b")
    written = asyncio.ensure_future(
        a.update_section(thread, "s", "v2", expected_version=1, agent_id="a")
    )
    paused = asyncio.ensure_future(slow_hot.paused.wait())
    await asyncio.wait([written, paused], timeout=10, return_when=asyncio.FIRST_COMPLETED)
    paused.cancel()
    await tiered.update_section(thread, "s", "v3", expected_version=2, agent_id="b")
    served, outcome = await _served_after_eviction(hot, slow_hot, written, tiered, thread)
    assert served == (3, "v3") and outcome.version == 2
