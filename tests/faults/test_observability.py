"""What an operator sees under faults: `/api/health` and the write-behind backlog.

Real servers behind a `LoopbackProxy` the test cuts: health must name the tier out
within about 1.5 s (not hang), the backlog must grow while the cold tier is out and
turn health `degraded` once older than `STATE_BACKLOG_DEGRADED_SECONDS`, and a thread
held back by an entry no flusher can apply must keep the backlog's age growing.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis as redis_client
from langchain_core.runnables import RunnableConfig
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from devstack import PostgresServer, RedisServer
from state.errors import BackendUnavailable
from support_cases import metrics
from support_cases.api import create_app
from support_cases.metrics import AppMetrics, BacklogSampler
from support_cases.models import HealthView
from support_cases.settings import AppSettings
from tests.chat_graph import chat_graph

from .apps import App, open_runtime, submission
from .conftest import Deadline
from .proxy import LoopbackProxy

# README: health answers within about 1.5 s whatever the network does.
HEALTH_BOUND_SECONDS = 2.5


def config(thread_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id}}


def proxied(url: str, proxy: LoopbackProxy) -> str:
    scheme, rest = url.split("://", 1)
    netloc, _, path = rest.partition("/")
    userinfo = netloc.rsplit("@", 1)[0] + "@" if "@" in netloc else ""
    return f"{scheme}://{userinfo}127.0.0.1:{proxy.port}/{path}"


async def timed_health(app: App) -> tuple[HealthView, float]:
    started = time.monotonic()
    health = await app.runtime.service.health()
    return health, time.monotonic() - started


def tier(health: HealthView, name: str) -> Any:
    return next(t for t in health.tiers or [] if t.name == name)


@pytest.fixture
def wired(
    redis_server: Callable[..., RedisServer],
    postgres_server: PostgresServer,
    settings_for: Callable[..., AppSettings],
) -> Iterator[tuple[Callable[..., AppSettings], LoopbackProxy, LoopbackProxy, RedisServer]]:
    """Write-behind on a dedicated Redis and Postgres, each behind its own proxy."""
    redis = redis_server()
    redis_proxy = LoopbackProxy(redis.port).start()
    postgres_proxy = LoopbackProxy(postgres_server.port).start()

    def settings(**overrides: object) -> AppSettings:
        return settings_for(
            "postgres",
            redis_url=proxied(redis.url, redis_proxy),
            postgres_url=proxied(postgres_server.url, postgres_proxy),
            state_write_mode="write-behind",
            postgres_operation_timeout_seconds=2,
            postgres_pool_timeout_seconds=1,
            **overrides,
        )

    yield settings, redis_proxy, postgres_proxy, redis
    redis_proxy.stop()
    postgres_proxy.stop()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["reset", "blackhole"])
async def test_health_names_redis_out_within_its_bound(mode: str, wired: Any) -> None:
    settings, redis_proxy, _, _ = wired
    async with open_runtime(settings()) as app:
        assert (await app.runtime.service.health()).status == "ok"
        redis_proxy.cut(mode)
        try:
            health, took = await timed_health(app)
        finally:
            redis_proxy.restore()
        assert took < HEALTH_BOUND_SECONDS, took
        assert health.status == "degraded"
        assert not tier(health, "redis").up
        assert health.backlog is None  # unknown, not an empty backlog


@pytest.mark.slow
async def test_backlog_grows_while_the_cold_tier_is_out_then_recovers(wired: Any) -> None:
    settings, _, postgres_proxy, _ = wired
    deadline = Deadline(90)
    async with open_runtime(settings(state_backlog_degraded_seconds=1)) as app:
        graph = chat_graph(app.runtime.saver)
        thread = f"obs-backlog-{uuid.uuid4().hex[:10]}"
        await graph.ainvoke({"messages": ["hi"]}, config(thread), durability="async")
        while (health := await app.runtime.service.health()).backlog.entries:
            deadline.check("the first run's backlog to drain")
            await asyncio.sleep(0.2)
        assert health.status == "ok"

        postgres_proxy.cut("blackhole")
        try:
            await graph.ainvoke({"messages": ["while out"]}, config(thread), durability="async")
            first, took = await timed_health(app)
            assert took < HEALTH_BOUND_SECONDS, took
            assert first.status == "down" and not tier(first, "postgres").up
            assert first.backlog is not None and first.backlog.entries > 0
            await asyncio.sleep(1.5)
            await graph.ainvoke({"messages": ["still out"]}, config(thread), durability="async")
            later = await app.runtime.service.health()
            assert later.backlog is not None
            assert later.backlog.entries > first.backlog.entries
            assert (later.backlog.oldest_age_seconds or 0) > (first.backlog.oldest_age_seconds or 0)
            assert (later.backlog.oldest_age_seconds or 0) > 1
        finally:
            postgres_proxy.restore()

        while (health := await app.runtime.service.health()).backlog.entries:
            deadline.check("the backlog to drain once the cold tier is back")
            await asyncio.sleep(0.2)
        assert health.status == "ok"
        assert health.backlog is not None
        assert health.backlog.threads == 0 and health.backlog.oldest_age_seconds is None


@pytest.mark.slow
async def test_a_thread_held_back_by_a_bad_entry_keeps_the_backlog_age_growing(
    wired: Any,
) -> None:
    settings, _, _, _ = wired
    async with open_runtime(settings(state_backlog_degraded_seconds=1)) as app:
        flusher = app.runtime.backends.flusher
        assert flusher is not None
        graph = chat_graph(app.runtime.saver)
        stuck, healthy = (f"obs-stuck-{n}-{uuid.uuid4().hex[:8]}" for n in range(2))
        await graph.ainvoke({"messages": ["hi"]}, config(stuck), durability="async")
        await flusher.flush_thread(stuck)
        # An entry of a format this release cannot read: no flusher can apply it.
        log_key = flusher.log._key(stuck, "wb-log")
        client = flusher.log._client
        await client.xadd(log_key, {"op": "put", "f": "999", "ns": ""})
        await flusher.log.mark_dirty(stuck)

        ages = []
        for _ in range(3):
            await graph.ainvoke({"messages": ["go on"]}, config(healthy), durability="async")
            await flusher.drain()
            health = await app.runtime.service.health()
            assert health.backlog is not None and health.backlog.threads == 1
            ages.append(health.backlog.oldest_age_seconds or 0)
            await asyncio.sleep(0.7)
        assert ages == sorted(ages) and ages[-1] > 1
        assert health.status == "degraded"
        await client.delete(log_key)
        await flusher.drain()
        assert (await app.runtime.service.health()).status == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["reset", "blackhole"])
async def test_cold_tier_out_health_is_down_and_requests_answer_503_with_retry_after(
    mode: str, wired: Any, issue_token: Callable[..., str]
) -> None:
    settings, _, postgres_proxy, _ = wired
    headers = {"Authorization": f"Bearer {issue_token()}"}
    async with open_runtime(settings()) as app:
        transport = httpx.ASGITransport(app=create_app(app.runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://f.test") as http:
            assert (await http.get("/api/health")).status_code == 200
            postgres_proxy.cut(mode)
            try:
                started = time.monotonic()
                health = await http.get("/api/health", headers=headers)
                took = time.monotonic() - started
                assert took < HEALTH_BOUND_SECONDS, took
                assert health.status_code == 503 and health.json()["status"] == "down"
                case_id = f"obs-cold-out-{uuid.uuid4().hex[:8]}"
                body = submission(case_id).model_dump(mode="json")
                for answer in (
                    await http.get(f"/api/cases/{case_id}", headers=headers),
                    await http.post("/api/cases", json=body, headers=headers),
                ):
                    assert answer.status_code == 503, answer.text
                    assert int(answer.headers["Retry-After"]) >= 1
            finally:
                postgres_proxy.restore()


def metered() -> tuple[InMemoryMetricReader, AppMetrics]:
    """The app's meters on a reader of the test's own."""
    reader = InMemoryMetricReader()
    return reader, AppMetrics(MeterProvider(metric_readers=[reader]).get_meter("test"))


def sampled_backlog(app: Any, meters: AppMetrics) -> BacklogSampler:
    """A backlog sampler the test refreshes itself, its gauges on `meters`."""
    flusher = app.runtime.backends.flusher
    assert flusher is not None
    sampler = BacklogSampler(flusher.backlog, interval_seconds=3600)
    meters.register_backlog_source(sampler.latest)
    return sampler


def read_metrics(reader: InMemoryMetricReader) -> dict[str, dict[tuple[Any, ...], Any]]:
    found: dict[str, dict[tuple[Any, ...], Any]] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data is not None else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points = found.setdefault(metric.name, {})
                for point in metric.data.data_points:
                    key = tuple(sorted((point.attributes or {}).items()))
                    points[key] = getattr(point, "value", None)
    return found


@pytest.mark.slow
async def test_cache_metrics_count_no_cold_fallback_as_a_hit(wired: Any) -> None:
    settings, redis_proxy, _, _ = wired
    reader, meters = metered()
    async with open_runtime(settings()) as app:
        store = app.runtime.store
        meters.register_backends(app.runtime.backends, store)
        threads = [f"obs-hits-{n}-{uuid.uuid4().hex[:8]}" for n in range(3)]
        for thread in threads:
            await store.create(thread, {"request": {"text": "x"}}, agent_id="a")
            assert await store.get(thread) is not None
        before = read_metrics(reader)
        hits = before[metrics.CACHE_LOOKUPS][(("cache", "record"), ("result", "hit"))]
        redis_proxy.cut("reset")
        try:
            for _ in range(3):
                for thread in threads:
                    assert await store.get(thread) is not None  # from the cold tier
        finally:
            redis_proxy.restore()
        after = read_metrics(reader)
        assert after[metrics.CACHE_LOOKUPS][(("cache", "record"), ("result", "hit"))] == hits

        def lookups(found: dict[str, Any]) -> int:
            points = found[metrics.CACHE_LOOKUPS].items()
            return sum(value for key, value in points if ("cache", "record") in key)

        # Each of the nine reads is a lookup, the ones sent straight to the cold tier while
        # the hot tier backs off included (before: uncounted, an outage looked idle).
        assert lookups(after) - lookups(before) == 9
        assert after[metrics.HOT_ERRORS][(("cache", "record"),)] >= 1
        ratio = after[metrics.CACHE_HIT_RATIO][(("cache", "record"),)]
        assert ratio <= before[metrics.CACHE_HIT_RATIO][(("cache", "record"),)]


@pytest.mark.slow
async def test_backlog_gauges_after_flushall(wired: Any) -> None:
    settings, _, postgres_proxy, redis = wired
    reader, meters = metered()
    async with open_runtime(settings()) as app:
        sampler = sampled_backlog(app, meters)
        flusher = app.runtime.backends.flusher
        assert flusher is not None
        graph = chat_graph(app.runtime.saver)
        thread, other = (f"obs-flushall-{n}-{uuid.uuid4().hex[:8]}" for n in range(2))
        for started in (thread, other):  # a new thread's first read needs the cold tier
            await graph.ainvoke({"messages": ["hi"]}, config(started), durability="async")
            await flusher.flush_thread(started)
        postgres_proxy.cut("reset")
        try:
            await graph.ainvoke({"messages": ["while out"]}, config(thread), durability="async")
            await sampler.refresh()
            during = read_metrics(reader)
            assert during[metrics.BACKLOG_ENTRIES][()] > 0
            assert during[metrics.BACKLOG_THREADS][()] == 1
            client = redis_client.Redis(port=redis.port)
            client.flushall()
            client.close()
            await sampler.refresh()
            after = read_metrics(reader)
            assert after[metrics.BACKLOG_ENTRIES][()] == 0
            assert after[metrics.BACKLOG_THREADS][()] == 0
            assert () not in after.get(metrics.BACKLOG_OLDEST_AGE, {})
        finally:
            postgres_proxy.restore()
        deadline = Deadline(30)
        while True:  # cached again after the loss, once the pool has replaced its connections
            try:
                await app.runtime.saver.aget_tuple(config(other))
                break
            except BackendUnavailable:
                deadline.check("the cold tier back")
                await asyncio.sleep(0.2)
        postgres_proxy.cut("reset")
        try:
            # Appends after the loss are counted from zero, not net of the lost ones.
            await graph.ainvoke({"messages": ["after"]}, config(other), durability="async")
            await sampler.refresh()
            backlog = sampler.latest()
            assert backlog is not None and backlog.threads == 1 and backlog.entries > 0
        finally:
            postgres_proxy.restore()


@pytest.mark.slow
async def test_backlog_gauges_go_silent_not_stale_while_redis_is_blackholed(wired: Any) -> None:
    settings, redis_proxy, postgres_proxy, _ = wired
    reader, meters = metered()
    async with open_runtime(settings()) as app:
        sampler = sampled_backlog(app, meters)
        flusher = app.runtime.backends.flusher
        assert flusher is not None
        graph = chat_graph(app.runtime.saver)
        thread = f"obs-silent-{uuid.uuid4().hex[:8]}"
        await graph.ainvoke({"messages": ["hi"]}, config(thread), durability="async")
        await flusher.flush_thread(thread)
        postgres_proxy.cut("reset")
        try:
            await graph.ainvoke({"messages": ["while out"]}, config(thread), durability="async")
            await sampler.refresh()
            assert read_metrics(reader)[metrics.BACKLOG_ENTRIES][()] > 0
            redis_proxy.cut("blackhole")
            started = time.monotonic()
            await sampler.refresh()
            assert time.monotonic() - started < 5
            assert () not in read_metrics(reader).get(metrics.BACKLOG_ENTRIES, {})
        finally:
            redis_proxy.restore()
            postgres_proxy.restore()
