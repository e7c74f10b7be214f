"""Without a hot tier (no Redis configured) the workflow still runs: no lock, cold only."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from state.settings import Settings
from support_cases.api import create_app
from support_cases.demo import demo_case
from support_cases.runtime import Runtime
from tests.support.effects import provider_calls


async def test_case_completes_on_the_cold_tier_alone(
    runtime: Runtime,
    e2e_settings: Callable[..., Settings],
    case_id: str,
    bearer: Callable[..., dict[str, str]],
) -> None:
    settings = e2e_settings(runtime.settings.state_cold_backend.value, redis_url=None)
    assert not settings.hot_tier_configured
    cold_only = await Runtime.open(settings)
    try:
        transport = httpx.ASGITransport(app=create_app(cold_only))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://e2e.test", headers=bearer("e2e-client")
        ) as client:
            response = await client.post("/api/cases", json=demo_case(case_id))
            assert response.status_code == 201, response.text
            assert response.json()["status"] == "completed"
            # A follow-up runs too (the run lease is in the cold record); progress events
            # need the hot tier's log: 503, said so.
            follow_up = await client.post(
                f"/api/cases/{case_id}/messages", json={"text": "I can't find my invoice"}
            )
            assert follow_up.status_code == 200, follow_up.text
            assert follow_up.json()["run"]["status"] == "completed"
            events = await client.get(f"/api/cases/{case_id}/events", params={"seconds": 0})
            assert events.status_code == 503 and "hot tier" in events.json()["error"]
            health = (await client.get("/api/health")).json()
        assert [tier["name"] for tier in health["tiers"]] == [settings.state_cold_backend.value]
        for kind in ("refund", "reset_link"):
            done = await provider_calls(cold_only, case_id, kind)
            assert len(done) == 1
    finally:
        await cold_only.close()
