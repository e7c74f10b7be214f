"""The API process starting while a tier is down: it answers /api/health for what it is
(down without the cold tier, degraded without Redis) and serves once the tier is back,
without a restart."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from devstack import PostgresServer, RedisServer
from support_cases.api import create_app
from support_cases.runtime import RuntimeHolder
from support_cases.settings import AppSettings

from .apps import submission
from .conftest import Deadline
from .proxy import LoopbackProxy
from .test_observability import HEALTH_BOUND_SECONDS, proxied


@pytest.fixture
def cut_tiers(
    redis_server: Callable[..., RedisServer],
    postgres_server: PostgresServer,
    settings_for: Callable[..., AppSettings],
) -> Iterator[tuple[AppSettings, dict[str, LoopbackProxy]]]:
    redis = redis_server()
    proxies = {
        "redis": LoopbackProxy(redis.port).start(),
        "postgres": LoopbackProxy(postgres_server.port).start(),
    }
    settings = settings_for(
        "postgres",
        redis_url=proxied(redis.url, proxies["redis"]),
        postgres_url=proxied(postgres_server.url, proxies["postgres"]),
        state_write_mode="write-behind",
        postgres_operation_timeout_seconds=2,
        postgres_pool_timeout_seconds=1,
    )
    yield settings, proxies
    for proxy in proxies.values():
        proxy.stop()


@asynccontextmanager
async def served(settings: AppSettings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the API as a process starts it (its tiers opened on first use), the
    tiers it opened closed after."""
    holder = RuntimeHolder(lambda: settings)
    transport = httpx.ASGITransport(app=create_app(holder=holder))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://s.test") as http:
            yield http
    finally:
        await holder.close()


async def healthy_again(http: httpx.AsyncClient, headers: dict[str, str]) -> httpx.Response:
    """The first health answer of 200, once the tier is back (the open goes on meanwhile)."""
    deadline = Deadline(30)
    while (answer := await http.get("/api/health", headers=headers)).status_code != 200:
        deadline.check("the API to open its tiers once Postgres is back")
        await asyncio.sleep(0.2)
    return answer


@pytest.mark.slow
@pytest.mark.parametrize(
    ("down", "status", "code"), [("redis", "degraded", 200), ("postgres", "down", 503)]
)
async def test_the_api_starting_with_a_tier_down_answers_health_then_serves_once_it_is_back(
    down: str, status: str, code: int, cut_tiers: Any, bearer: Callable[..., dict[str, str]]
) -> None:
    settings, proxies = cut_tiers
    proxies[down].cut("reset")
    headers = bearer(roles=["Cases.Submit", "Cases.Operate"])
    async with served(settings) as http:
        for _ in range(2):
            answer = await http.get("/api/health", headers=headers)
            assert answer.status_code == code, answer.text
            report = answer.json()
            assert report["status"] == status
            assert [t["name"] for t in report["tiers"] if not t["up"]] == [down]
            anonymous = await http.get("/api/health")
            assert anonymous.status_code == code
            assert anonymous.json() == {
                "status": status,
                "tiers": None,
                "backlog": None,
                "damaged_index_shards": None,
            }
        proxies[down].restore()
        answer = await http.get("/api/health", headers=headers)
        assert answer.status_code == 200 and answer.json()["status"] == "ok", answer.text
        body = submission(f"start-down-{uuid.uuid4().hex[:8]}").model_dump(mode="json")
        created = await http.post("/api/cases", json=body, headers=headers)
        assert created.status_code in (200, 201, 202), created.text


@pytest.mark.slow
async def test_health_of_an_api_starting_with_the_cold_tier_partitioned_answers_within_its_bound(
    cut_tiers: Any, bearer: Callable[..., dict[str, str]]
) -> None:
    """No reply, no reset: opening the tiers would wait out the pool's timeout (10 s by
    default). The report is down within its bound; the open goes on, and once the tier is
    back the same process serves."""
    settings, proxies = cut_tiers
    settings = settings.model_copy(update={"postgres_pool_timeout_seconds": 10.0})
    proxies["postgres"].cut("blackhole")
    headers = bearer(roles=["Cases.Operate"])
    async with served(settings) as http:
        started = time.monotonic()
        answer = await http.get("/api/health", headers=headers)
        took = time.monotonic() - started
        assert took < HEALTH_BOUND_SECONDS, took
        assert answer.status_code == 503, answer.text
        [tier] = answer.json()["tiers"]
        assert (tier["name"], tier["up"]) == ("postgres", False)
        assert "no answer within 1.5 s" in tier["detail"]
        proxies["postgres"].restore()
        answer = await healthy_again(http, headers)
        assert answer.json()["status"] == "ok", answer.text


@pytest.mark.slow
async def test_health_probes_during_a_partition_at_start_share_one_open_of_the_tiers(
    cut_tiers: Any, bearer: Callable[..., dict[str, str]]
) -> None:
    """Each report stops waiting at its bound while the open goes on: the probes after it
    wait on that open, not each on one of its own queued behind it (a probe every few
    seconds during an outage longer than an open's timeout would pile them up, each one a
    full open tried in turn)."""
    settings, proxies = cut_tiers
    settings = settings.model_copy(update={"postgres_pool_timeout_seconds": 10.0})
    proxies["postgres"].cut("blackhole")
    headers = bearer(roles=["Cases.Operate"])

    def opens() -> int:
        return sum(
            1
            for task in asyncio.all_tasks()
            if not task.done() and task.get_coro().__qualname__ == "case_service"  # type: ignore[union-attr]
        )

    async with served(settings) as http:
        for _ in range(3):
            answer = await http.get("/api/health", headers=headers)
            assert answer.status_code == 503, answer.text
        assert opens() == 1
        proxies["postgres"].restore()
        await healthy_again(http, headers)
        assert opens() == 0


@pytest.mark.slow
async def test_no_runtime_is_opened_after_the_api_stops_by_a_health_probes_open(
    cut_tiers: Any, bearer: Callable[..., dict[str, str]]
) -> None:
    """The open a report stopped waiting for outlives its request, so the server's
    shutdown does not wait for it: it is ended by the shutdown, not left to open the
    tiers after their close (pools and clients no one closes)."""
    settings, proxies = cut_tiers
    settings = settings.model_copy(update={"postgres_pool_timeout_seconds": 10.0})
    proxies["postgres"].cut("blackhole")
    holder = RuntimeHolder(lambda: settings)
    app = create_app(holder=holder)
    transport = httpx.ASGITransport(app=app)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://s.test") as http,
        ):
            answer = await http.get("/api/health", headers=bearer(roles=["Cases.Operate"]))
            assert answer.status_code == 503, answer.text
        opening = app.state.health_opening
        proxies["postgres"].restore()
        await asyncio.wait({opening}, timeout=30)
        assert opening.done()
        assert holder._runtime is None, "a runtime opened after the API stopped"
    finally:
        await holder.close()
