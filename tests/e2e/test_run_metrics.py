"""The case run metrics over the real app: one logical run is one run, whatever it went through."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from e2e_payloads import duplicate_charges
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from state.errors import HotStateLost
from support_cases import metrics, service
from support_cases.api import create_app
from support_cases.demo import demo_case
from support_cases.models import CaseStatus, CaseSubmission
from support_cases.runtime import Runtime
from support_cases.service import RunUnfinished
from support_cases.settings import AppSettings
from tests.support.metric_points import points
from tests.support.stale import stalling_quickly


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


async def test_a_run_that_loses_its_case_while_waiting_out_a_claim_counts_as_lost(
    e2e_settings: Callable[..., AppSettings],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A resume meets the refund's claim still leased and waits it out; a newer runner takes
    the case meanwhile and the run stops there. The one run's outcome is why it stopped
    (`LockLost`), not the claim it was waiting out (which reads as the wait limit)."""
    caplog.set_level(logging.INFO, logger="support_cases.service")
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    monkeypatch.setattr(service, "app_metrics", metrics.AppMetrics(provider.get_meter("test")))
    own = await Runtime.open(e2e_settings("postgres", state_lock_ttl_ms=3_000))
    try:
        perform = own.provider.perform
        lost: list[dict[str, Any]] = []

        async def reply_lost(key: str, kind: str, request: dict[str, Any]) -> dict[str, Any]:
            done = await perform(key, kind, request)
            if kind == "refund" and not lost:
                lost.append(done)
                raise ConnectionError("the provider's reply was lost")
            return done

        monkeypatch.setattr(own.provider, "perform", reply_lost)
        renew = own.store.renew

        async def taken_once_waiting(lock: Any) -> bool:
            # Another runner has the case from the moment this run starts waiting.
            waiting = any("waits for its lease" in r.getMessage() for r in caplog.records)
            return False if waiting else await renew(lock)

        monkeypatch.setattr(own.store, "renew", taken_once_waiting)
        case_id = f"case-fx-{uuid.uuid4().hex[:12]}"
        submission = CaseSubmission(
            case_id=case_id,
            customer_id="cust-fx",
            text="I was charged twice for my subscription",
            transactions=duplicate_charges(42.0),
        )
        failed = await own.service.submit(submission, None)
        assert failed.view.status is CaseStatus.FAILED, failed.view
        with pytest.raises(RunUnfinished):
            await own.service.resume(case_id, wait_until_rest=True)
        await own.service.wait_idle()
        assert any("a newer run took over" in r.getMessage() for r in caplog.records)
        assert points(reader, metrics.RUNS) == {
            (("outcome", "ConnectionError"),): 1,
            (("outcome", "LockLost"),): 1,
        }
    finally:
        await own.service.wait_idle()
        await own.close()
        provider.shutdown()


async def test_a_run_fenced_off_while_waiting_out_a_claim_stops_as_taken_over(
    e2e_settings: Callable[..., AppSettings],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As above, but the newer runner is one cut off from Redis: it raises the record's
    fence (its cold-tier lease) and the run lock renews on. The waiting run's heartbeat,
    which its guard's keeper writes, meets the fence: the run stops as taken over, not as a
    failed run task with the fence error (found by the heartbeat-in-keeper review)."""
    caplog.set_level(logging.INFO, logger="support_cases.service")
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    monkeypatch.setattr(service, "app_metrics", metrics.AppMetrics(provider.get_meter("test")))
    own = await Runtime.open(stalling_quickly(e2e_settings("postgres", state_lock_ttl_ms=3_000)))
    try:
        perform = own.provider.perform
        lost: list[dict[str, Any]] = []

        async def reply_lost(key: str, kind: str, request: dict[str, Any]) -> dict[str, Any]:
            done = await perform(key, kind, request)
            if kind == "refund" and not lost:
                lost.append(done)
                raise ConnectionError("the provider's reply was lost")
            return done

        monkeypatch.setattr(own.provider, "perform", reply_lost)
        renew = own.store.renew
        fenced: list[int] = []

        async def fenced_once_waiting(lock: Any) -> bool:
            # The cut-off runner claims its lease from the moment this run starts waiting.
            waiting = any("waits for its lease" in r.getMessage() for r in caplog.records)
            if waiting and not fenced:
                record = await own.store.get_fresh(case_id)
                assert record is not None
                fenced.append(record.fence + 1)
                await own.store.update_section(
                    case_id,
                    "run_lease",
                    {"token": "cut-off-worker", "until": 0},
                    agent_id="case-runner",
                    expected_version=record.version,
                    fencing_token=fenced[0],
                )
            return await renew(lock)

        monkeypatch.setattr(own.store, "renew", fenced_once_waiting)
        case_id = f"case-fx-{uuid.uuid4().hex[:12]}"
        submission = CaseSubmission(
            case_id=case_id,
            customer_id="cust-fx",
            text="I was charged twice for my subscription",
            transactions=duplicate_charges(42.0),
        )
        failed = await own.service.submit(submission, None)
        assert failed.view.status is CaseStatus.FAILED, failed.view
        with pytest.raises(RunUnfinished):
            await own.service.resume(case_id, wait_until_rest=True)
        await own.service.wait_idle()
        assert fenced, "the run waited out the claim"
        assert any("a newer run took over" in r.getMessage() for r in caplog.records)
        assert points(reader, metrics.RUNS) == {
            (("outcome", "ConnectionError"),): 1,
            (("outcome", "StaleFencingToken"),): 1,
        }
    finally:
        await own.service.wait_idle()
        await own.close()
        provider.shutdown()
