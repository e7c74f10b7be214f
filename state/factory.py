"""Builds the configured tiers from settings: the one place that picks adapters.

`STATE_COLD_BACKEND` chooses Cosmos or Postgres for the whole app; the Redis
hot tier sits in front of either when REDIS_URL / REDIS_HOST is set, and
`STATE_WRITE_MODE` (write-behind by default with Redis) adds the write-behind
log and its flusher, which runs in the background on the loop that opened the
backends until they close.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .ports import (
    BlockingAppends,
    BlockingCache,
    BlockingCheckpointStore,
    CheckpointCache,
    CheckpointFence,
    CheckpointStore,
    ColdRetention,
    ColdStateStore,
    Counters,
    EventLog,
    HotStateStore,
)
from .retention import TieredRetention
from .settings import ColdBackend, Settings, WriteMode

# A thread's event log: its last thousand events, for a week after the last one.
EVENTS_PER_THREAD = 1000
EVENTS_TTL_SECONDS = 7 * 24 * 3600

if TYPE_CHECKING:
    import redis

    from .checkpoint.flusher import Flusher


@dataclass
class Backends:
    settings: Settings
    cold: ColdStateStore
    checkpoints: CheckpointStore
    hot: HotStateStore | None
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list, repr=False)
    # Hot cache of the latest checkpoint per thread (None without a hot tier).
    hot_checkpoints: CheckpointCache | None = None
    # Keyword-only: required, yet after fields with defaults (positional callers unchanged).
    retention: ColdRetention = field(kw_only=True)
    # Write-behind mode only: drains the hot log into the cold checkpoint store.
    flusher: Flusher | None = field(default=None, kw_only=True)
    # The hot tier's calls the saver's sync API makes on its callers' threads: appends in
    # write-behind mode only, cache-hit reads whenever there is a hot tier.
    blocking_appends: BlockingAppends | None = field(default=None, kw_only=True)
    blocking_cache: BlockingCache | None = field(default=None, kw_only=True)
    # The cold tier's checkpoint calls the sync API makes on its callers' threads (Postgres
    # signed in through POSTGRES_URL), used when there is no hot tier.
    blocking_store: BlockingCheckpointStore | None = field(default=None, kw_only=True)
    # The hot tier's per-thread checkpoint fence (None without a hot tier).
    checkpoint_fence: CheckpointFence | None = field(default=None, kw_only=True)
    # Per-thread event logs (None without a hot tier).
    events: EventLog | None = field(default=None, kw_only=True)
    # Round trips (and request charge) of the cold connection, by operation (metrics).
    cold_counters: Counters = field(default_factory=Counters, kw_only=True)
    # Set as `close` begins: a saver built on these backends refuses its calls from then on.
    closed: bool = field(default=False, init=False)

    async def close(self) -> None:
        self.closed = True
        for close in reversed(self._closers):
            await close()
        self._closers.clear()


async def open_backends(settings: Settings) -> Backends:
    """Connect every configured tier and run its setup (container / migrations)."""
    closers: list[Callable[[], Awaitable[None]]] = []
    cold: ColdStateStore
    checkpoints: CheckpointStore
    retention: ColdRetention
    cold_counters: Counters
    blocking_store: BlockingCheckpointStore | None = None
    if settings.state_cold_backend is ColdBackend.COSMOS:
        from .cold.cosmos_checkpoints import CosmosCheckpointStore
        from .cold.cosmos_client import CosmosConnection
        from .cold.cosmos_retention import CosmosRetention
        from .cold.cosmos_store import CosmosStateStore

        connection = CosmosConnection(settings.cosmos)
        closers.append(connection.close)
        cold = CosmosStateStore(connection, max_item_bytes=settings.state_max_item_bytes)
        checkpoints = CosmosCheckpointStore(
            connection,
            max_item_bytes=settings.state_max_item_bytes,
            compress_threshold_bytes=settings.state_compress_threshold_bytes,
        )
        retention = CosmosRetention(connection, ttl_seconds=settings.state_cold_ttl_seconds)
        cold_counters = connection.counters
    else:
        from .cold.postgres_checkpoints import PostgresCheckpointStore
        from .cold.postgres_client import PostgresConnection
        from .cold.postgres_retention import PostgresRetention
        from .cold.postgres_store import PostgresStateStore

        pg = PostgresConnection(settings.postgres)
        closers.append(pg.close)
        cold = PostgresStateStore(pg)
        checkpoints = PostgresCheckpointStore(
            pg, marks_deletions=settings.state_cold_ttl_seconds >= 0
        )
        if pg.blocking_available:
            blocking_store = checkpoints
        retention = PostgresRetention(pg, ttl_seconds=settings.state_cold_ttl_seconds)
        cold_counters = pg.counters

    hot: HotStateStore | None = None
    hot_checkpoints: CheckpointCache | None = None
    flusher: Flusher | None = None
    blocking_appends: BlockingAppends | None = None
    blocking_cache: BlockingCache | None = None
    checkpoint_fence: CheckpointFence | None = None
    events: EventLog | None = None
    if settings.hot_tier_configured:
        from .hot.redis_checkpoints import RedisCheckpointCache
        from .hot.redis_client import (
            PROBE_CONNECTIONS,
            create_blocking_redis_client,
            create_redis_client,
            hot_namespace,
        )
        from .hot.redis_events import RedisEventLog
        from .hot.redis_store import RedisHotStore
        from .hot.redis_write_behind import RedisCheckpointFence, RedisWriteBehindLog

        client = create_redis_client(settings)
        namespace = hot_namespace(settings)
        # The health probe's own client (connecting on first use only), signing in with
        # `client`'s Entra ID tokens, as the waiting reads' client below.
        probe_client = create_redis_client(
            settings, max_connections=PROBE_CONNECTIONS, sharing=client
        )
        hot = RedisHotStore(client, namespace=namespace, probe_client=probe_client)
        closers.append(hot.close)
        write_behind = settings.write_mode is WriteMode.WRITE_BEHIND
        # The saver's sync API reads a cache hit (and, in write-behind mode, appends: a
        # write is one Redis round trip) on its callers' threads with this one; it connects
        # on first use only.
        blocking_client = create_blocking_redis_client(settings)
        closers.append(_closing(blocking_client))
        # Shares the hot store's client (one per process), which the hot store closes.
        cache = RedisCheckpointCache(
            client,
            namespace=namespace,
            ttl_seconds=settings.state_hot_ttl_seconds,
            blocking_client=blocking_client,
        )
        closers.append(cache.close)
        hot_checkpoints = cache
        blocking_cache = cache
        checkpoint_fence = RedisCheckpointFence(client, cache)
        # Its waiting reads' own client, connecting on first use only.
        waiting_client = create_redis_client(
            settings, max_connections=settings.redis_max_waiting_reads, sharing=client
        )
        closers.append(waiting_client.aclose)
        events = RedisEventLog(
            client,
            namespace=namespace,
            max_events=EVENTS_PER_THREAD,
            ttl_seconds=EVENTS_TTL_SECONDS,
            waiting_client=waiting_client,
        )
        if write_behind:
            from .checkpoint.flusher import Flusher

            write_behind_log = RedisWriteBehindLog(client, cache, blocking_client=blocking_client)
            blocking_appends = write_behind_log
            flusher = Flusher(
                write_behind_log, checkpoints, lock_ttl_ms=settings.state_flush_lock_ttl_ms
            )

    if hot is not None:
        # A thread the cold sweep expires is forgotten by Redis too (`state.retention`).
        retention = TieredRetention(
            retention, records=hot, checkpoints=hot_checkpoints, flusher=flusher, events=events
        )
    backends = Backends(
        settings,
        cold,
        checkpoints,
        hot,
        closers,
        hot_checkpoints,
        retention=retention,
        flusher=flusher,
        blocking_appends=blocking_appends,
        blocking_cache=blocking_cache,
        blocking_store=blocking_store,
        checkpoint_fence=checkpoint_fence,
        events=events,
        cold_counters=cold_counters,
    )
    try:
        await cold.setup()
        await checkpoints.setup()
    except BaseException:
        await backends.close()
        raise
    if flusher is not None:
        flusher.start()
        # Closed first (closers run in reverse): its last drain still has every client.
        closers.append(flusher.close)
    return backends


def _closing(client: redis.Redis) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        client.close()  # drops idle sockets: nothing to wait for

    return close


@asynccontextmanager
async def backends_for(settings: Settings) -> AsyncIterator[Backends]:
    backends = await open_backends(settings)
    try:
        yield backends
    finally:
        await backends.close()
