"""A Redis at its `maxmemory` with nothing it may evict (`noeviction`, or only keys
without a TTL left, as unflushed write-behind entries are): it answers PING, but refuses
every write. For this app that tier is down (each write goes to the cold tier instead),
and health says so (`degraded`, the hot tier down with the server's reason) rather than
`ok`; once Redis takes writes again, health is `ok` again."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import redis.asyncio as aioredis

from devstack import RedisServer
from support_cases.api import create_app
from support_cases.settings import AppSettings

from .apps import open_runtime


async def test_health_reports_a_redis_that_refuses_writes_for_want_of_memory(
    settings_for: Callable[..., AppSettings],
    redis_server: Callable[..., RedisServer],
    bearer: Callable[..., dict[str, str]],
) -> None:
    server = redis_server()
    admin = aioredis.Redis.from_url(server.url)
    try:
        async with open_runtime(settings_for("postgres", redis_url=server.url)) as app:
            transport = httpx.ASGITransport(app=create_app(app.runtime))
            async with httpx.AsyncClient(
                transport=transport, base_url="http://oom.test", headers=bearer("operator")
            ) as client:
                assert (await client.get("/api/health")).json()["status"] == "ok"
                used = (await admin.info("memory"))["used_memory"]
                await admin.config_set("maxmemory-policy", "noeviction")
                await admin.config_set("maxmemory", used)
                try:
                    full = (await client.get("/api/health")).json()
                finally:
                    await admin.config_set("maxmemory", 0)
                assert full["status"] == "degraded", full
                [hot] = [tier for tier in full["tiers"] if tier["name"] == "redis"]
                assert not hot["up"] and "maxmemory" in hot["detail"], hot
                assert (await client.get("/api/health")).json()["status"] == "ok"
    finally:
        await admin.aclose()
