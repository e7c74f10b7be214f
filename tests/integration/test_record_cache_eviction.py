"""Cached workflow records under eviction, on the real tiers (Cosmos emulator,
redis-server): no install puts an older record on an entry that eviction emptied after a
newer one was installed and acknowledged. Each install needs its writer's intent or its
reader's lease still in the entry: the re-install after a `VersionConflict`, `create`'s
install, a reader's install after a miss on another schema version's copy, and a write
whose `begin_write` failed (it installs nothing; the settle pass does). Eviction is what
a volatile-* policy does to the entry, done here as the contract tests do (DEL); a slow
process is an install held until `resume`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from state import tiered as tiered_module
from state.cold.cosmos_client import CosmosConnection
from state.cold.cosmos_store import CosmosStateStore
from state.errors import BackendUnavailable, VersionConflict
from state.hot.redis_client import create_redis_client, hot_namespace
from state.hot.redis_store import RedisHotStore
from state.ports import WorkflowRecord
from state.settings import Settings
from state.tiered import TieredStateStore


class PausedInstalls(RedisHotStore):
    """A hot store whose installs wait for `resume` (a slow process)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.paused = asyncio.Event()
        self.resume = asyncio.Event()

    async def install(self, record: WorkflowRecord, **kwargs: Any) -> bool:
        if not self.resume.is_set():
            self.paused.set()
            await self.resume.wait()
        return await super().install(record, **kwargs)


@pytest.fixture
def settings(stack_env: dict[str, str]) -> Settings:
    return Settings.model_validate(
        {
            "cosmos_endpoint": stack_env["COSMOS_ENDPOINT"],
            "cosmos_key": stack_env["COSMOS_KEY"],
            "cosmos_create_if_missing": True,
            "postgres_url": stack_env["POSTGRES_URL"],
            "redis_url": stack_env["REDIS_URL"],
        }
    )


@pytest.fixture
async def cold(settings: Settings) -> AsyncIterator[CosmosStateStore]:
    connection = CosmosConnection(settings.cosmos)
    store = CosmosStateStore(connection, max_item_bytes=settings.state_max_item_bytes)
    await store.setup()
    yield store
    await connection.close()


@pytest.fixture
async def fast(settings: Settings) -> AsyncIterator[RedisHotStore]:
    store = RedisHotStore(create_redis_client(settings), namespace=hot_namespace(settings))
    yield store
    await store.close()


def _thread() -> str:
    return f"review-cache-{uuid.uuid4().hex[:12]}"


async def _run_paused(slow: PausedInstalls, call: Any) -> asyncio.Task[Any]:
    task = asyncio.ensure_future(call)
    await asyncio.wait_for(slow.paused.wait(), 10)
    return task


async def test_a_conflicted_writers_reinstall_after_eviction_serves_no_older_record(
    cold: CosmosStateStore, fast: RedisHotStore, settings: Settings
) -> None:
    """A and B both hold v1. B writes v2. A's write conflicts; A re-reads cold (v2) and its
    re-install is slow. B writes v3 (acknowledged); the entry is evicted; A's re-install
    of v2 lands on the empty entry and every reader is served v2, older than B's ack."""
    slow_hot = PausedInstalls(
        create_redis_client(settings),
        namespace=hot_namespace(settings),
    )
    a = TieredStateStore(cold, slow_hot, settings)
    b = TieredStateStore(cold, fast, settings)
    thread = _thread()
    try:
        await b.create(thread, {"s": "v1"}, agent_id="b")
        await b.update_section(thread, "s", "v2", expected_version=1, agent_id="b")
        conflicted = await _run_paused(
            slow_hot, a.update_section(thread, "s", "a", expected_version=1, agent_id="a")
        )
        acked = await b.update_section(thread, "s", "v3", expected_version=2, agent_id="b")
        assert acked.version == 3
        await fast._client.delete(fast.key(thread))  # evicted
        slow_hot.resume.set()
        with pytest.raises(VersionConflict):
            await conflicted
        served = await b.get(thread)
        assert served is not None
        assert (served.version, served.sections["s"]) == (3, "v3")
    finally:
        slow_hot.resume.set()
        await cold.delete(thread)
        await slow_hot.close()


async def test_a_slow_creates_install_after_eviction_serves_no_older_record(
    cold: CosmosStateStore, fast: RedisHotStore, settings: Settings
) -> None:
    """Process 1 creates the thread (v1) and its install is slow. Process 2 reads v1 and
    writes v2 (acknowledged); the entry is evicted; process 1's install of v1 lands on the
    empty entry and is served, older than process 2's ack."""
    slow_hot = PausedInstalls(
        create_redis_client(settings),
        namespace=hot_namespace(settings),
    )
    one = TieredStateStore(cold, slow_hot, settings)
    two = TieredStateStore(cold, fast, settings)
    thread = _thread()
    try:
        created = await _run_paused(slow_hot, one.create(thread, {"s": "v1"}, agent_id="one"))
        seen = await two.get(thread)
        assert seen is not None and seen.version == 1
        acked = await two.update_section(thread, "s", "v2", expected_version=1, agent_id="two")
        assert acked.version == 2
        await fast._client.delete(fast.key(thread))  # evicted
        slow_hot.resume.set()
        assert (await created).version == 1
        served = await two.get(thread)
        assert served is not None
        assert (served.version, served.sections["s"]) == (2, "v2")
    finally:
        slow_hot.resume.set()
        await cold.delete(thread)
        await slow_hot.close()


async def test_a_reader_that_missed_on_another_schemas_copy_installs_no_older_record(
    cold: CosmosStateStore, fast: RedisHotStore, settings: Settings
) -> None:
    """The entry holds a copy of another schema version (code of a rolling deploy): the
    read script counts it as served and takes no lease, but the store calls it a miss.
    The reader reads v1 from cold, its install is slow; a writer writes v2 (acknowledged);
    the entry is evicted; the reader's lease-less install of v1 lands and is served."""
    slow_hot = PausedInstalls(create_redis_client(settings), namespace=hot_namespace(settings))
    reader = TieredStateStore(cold, slow_hot, settings)
    writer = TieredStateStore(cold, fast, settings)
    thread = _thread()
    try:
        await writer.create(thread, {"s": "v1"}, agent_id="w")
        await fast._client.hset(fast.key(thread), "schema_version", "0")  # older code's copy
        read = await _run_paused(slow_hot, reader.get(thread))
        acked = await writer.update_section(thread, "s", "v2", expected_version=1, agent_id="w")
        assert acked.version == 2
        await fast._client.delete(fast.key(thread))  # evicted
        slow_hot.resume.set()
        assert (await read).version == 1
        served = await writer.get(thread)
        assert served is not None
        assert (served.version, served.sections["s"]) == (2, "v2")
    finally:
        slow_hot.resume.set()
        await cold.delete(thread)
        await slow_hot.close()


class FailingBeginWrite(PausedInstalls):
    """Its next `begin_write` times out (Redis out of reach for a moment)."""

    async def begin_write(self, *args: Any, **kwargs: Any) -> Any:
        raise BackendUnavailable("redis", "TimeoutError: injected")


async def test_a_writer_without_an_intent_installs_no_older_record_after_eviction(
    cold: CosmosStateStore,
    fast: RedisHotStore,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A's `begin_write` fails (Redis blip), so it writes v2 without an intent; its cold
    write outlasts the hot tier's back-off (HOT_RETRY_AFTER_SECONDS, set to 0 here rather
    than sleeping), so it installs, slowly, with nothing required. B writes v3
    (acknowledged); the entry is evicted; A's v2 lands and is served to every process."""
    monkeypatch.setattr(tiered_module, "HOT_RETRY_AFTER_SECONDS", 0.0)
    slow_hot = FailingBeginWrite(create_redis_client(settings), namespace=hot_namespace(settings))
    a = TieredStateStore(cold, slow_hot, settings)
    b = TieredStateStore(cold, fast, settings)
    thread = _thread()
    try:
        await b.create(thread, {"s": "v1"}, agent_id="b")
        written = asyncio.ensure_future(
            a.update_section(thread, "s", "v2", expected_version=1, agent_id="a")
        )
        paused = asyncio.ensure_future(slow_hot.paused.wait())
        await asyncio.wait([written, paused], timeout=10, return_when=asyncio.FIRST_COMPLETED)
        paused.cancel()
        acked = await b.update_section(thread, "s", "v3", expected_version=2, agent_id="b")
        assert acked.version == 3
        await fast._client.delete(fast.key(thread))  # evicted
        slow_hot.resume.set()
        assert (await written).version == 2
        served = await b.get(thread)
        assert served is not None
        assert (served.version, served.sections["s"]) == (3, "v3")
    finally:
        slow_hot.resume.set()
        await cold.delete(thread)
        await slow_hot.close()
