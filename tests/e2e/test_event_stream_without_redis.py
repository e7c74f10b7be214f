"""An event stream asked for while Redis is out of reach: the API says so (503), as
README's "without Redis the route answers 503" promises, rather than answer 200 with a
stream that ends at once, empty (which `agent-state follow` printed as a case without
events, exiting 0)."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from devstack import free_port
from support_cases.api import create_app
from support_cases.demo import demo_case
from support_cases.runtime import Runtime
from support_cases.settings import AppSettings


async def test_a_stream_opened_while_redis_is_out_of_reach_is_503(
    runtime: Runtime,
    e2e_settings: Callable[..., AppSettings],
    bearer: Callable[..., dict[str, str]],
    case_id: str,
) -> None:
    backend = runtime.settings.state_cold_backend.value
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(runtime)),
        base_url="http://events.test",
        headers=bearer("streamer"),
    ) as client:
        assert (await client.post("/api/cases", json=demo_case(case_id))).status_code == 201
    # The same cold tier, its Redis gone: a port nothing listens on.
    unreachable = e2e_settings(backend, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    redis_down = await Runtime.open(unreachable)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(redis_down)),
            base_url="http://events.test",
            headers=bearer("streamer"),
        ) as client:
            assert (await client.get(f"/api/cases/{case_id}")).status_code == 200
            events = await client.get(f"/api/cases/{case_id}/events", params={"seconds": 0})
            assert events.status_code == 503, events.text
            assert "redis unavailable" in events.json()["error"]
            assert events.headers["Retry-After"] == "1"
    finally:
        await redis_down.close()
