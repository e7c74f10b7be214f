"""The case run metrics over the real app: one logical run is one run, whatever it went through."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from state.errors import HotStateLost
from support_cases import metrics, service
from support_cases.api import create_app
from support_cases.demo import demo_case
from support_cases.runtime import Runtime
from support_cases.settings import AppSettings
from tests.support.metric_points import points


async def test_a_run_redone_after_redis_lost_its_checkpoints_counts_once(
    e2e_settings: Callable[..., AppSettings],
    bearer: Callable[..., dict[str, str]],
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis loses the run's checkpoints mid-run (`HotStateLost`): the run goes on from the
    cold tier and rests. That is one case run, with the outcome it rested in, not a failed
    run and another one (the workbook's runs by outcome, RU per case)."""
    lost: list[str] = []

    async def first_step_loses_redis(step: str) -> None:
        if not lost:
            lost.append(step)
            raise HotStateLost(case_id, "lost-checkpoint")

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    monkeypatch.setattr(service, "app_metrics", metrics.AppMetrics(provider.get_meter("test")))
    runtime = await Runtime.open(e2e_settings("postgres"), after_step=first_step_loses_redis)
    try:
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://e2e.test", headers=bearer("e2e-client")
        ) as http:
            answer = await http.post("/api/cases", json=demo_case(case_id))
            assert answer.status_code == 201, answer.text
            rested = answer.json()["status"]
        await runtime.service.wait_idle()
        assert lost, "the run met the loss"
        assert points(reader, metrics.RUNS) == {(("outcome", rested),): 1}
        (duration,) = points(reader, metrics.RUN_DURATION).values()
        assert duration.count == 1
    finally:
        await runtime.close()
        provider.shutdown()
