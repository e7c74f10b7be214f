"""Metrics from real tiers: Redis + the Cosmos emulator, Redis + Postgres.

The runtime registers `AppMetrics.register_backends`; here it is called on an
AppMetrics with an in-memory reader, and the store is driven through real servers.
"""

from __future__ import annotations

import uuid

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from state.factory import backends_for
from state.settings import Settings
from state.tiered import TieredStateStore
from support_cases import metrics
from support_cases.metrics import AppMetrics
from tests.support.metric_points import points


@pytest.mark.parametrize("backend", ["cosmos", "postgres"])
async def test_store_traffic_shows_in_the_metrics(backend: str, stack_env: dict[str, str]) -> None:
    settings = Settings.model_validate(
        {
            "state_cold_backend": backend,
            "cosmos_endpoint": stack_env["COSMOS_ENDPOINT"],
            "cosmos_key": stack_env["COSMOS_KEY"],
            "cosmos_create_if_missing": True,
            "cosmos_container": f"metrics-{uuid.uuid4().hex[:8]}",
            "postgres_url": stack_env["POSTGRES_URL"],
            "redis_url": stack_env["REDIS_URL"],
        }
    )
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    app = AppMetrics(provider.get_meter("test"))
    thread = f"metrics-{uuid.uuid4().hex[:12]}"
    try:
        async with backends_for(settings) as backends:
            store = TieredStateStore.from_backends(backends)
            app.register_backends(backends, store)
            created = await store.create(thread, {"request": {"text": "x" * 500}}, agent_id="a")
            await store.update_section(
                thread, "billing", {"ok": True}, agent_id="b", expected_version=created.version
            )
            assert await store.get(thread) is not None  # served by Redis
            await backends.cold.delete(thread)

        lookups = points(reader, metrics.CACHE_LOOKUPS)
        assert lookups[(("cache", "record"), ("result", "hit"))] >= 1
        assert points(reader, metrics.CACHE_HIT_RATIO)[(("cache", "record"),)] > 0

        requests = points(reader, metrics.COLD_REQUESTS)
        by_operation = {dict(key)["operation"]: value for key, value in requests.items()}
        assert {dict(key)["backend"] for key in requests} == {backend}
        if backend == "cosmos":
            # The Cosmos hook names a round trip by the state operation it served.
            assert by_operation["state.create"] >= 1
            assert by_operation["state.update_section"] >= 1
            charge = points(reader, metrics.COLD_REQUEST_CHARGE)
            assert charge[(("backend", "cosmos"), ("operation", "state.create"))] > 0
        else:
            # Postgres names each statement's operation itself.
            assert by_operation["create"] >= 1
            assert by_operation["update_section"] >= 1

        sizes = points(reader, metrics.STATE_SIZE)
        assert sizes[(("operation", "create"),)].max > 500
        assert sizes[(("operation", "update_section"),)].count == 1
    finally:
        provider.shutdown()
