"""CASE_MAX_EVENT_STREAMS above REDIS_MAX_WAITING_READS is refused at start: each open
stream waits at Redis on a connection of that pool, and the streams past its size ended
after a second's wait for one, their clients reconnecting over and over."""

from __future__ import annotations

import pytest

from state.errors import SettingsError
from support_cases.settings import AZURE_HOST_MARKERS, AppSettings
from tests.support.misconfigured import api_from_environment

WITH_REDIS = {"cosmos_endpoint": "https://127.0.0.1:8091/", "redis_url": "redis://127.0.0.1:1/0"}


@pytest.fixture(autouse=True)
def outside_azure(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in AZURE_HOST_MARKERS:
        monkeypatch.delenv(name, raising=False)


def test_more_streams_than_waiting_reads_is_refused_naming_both_settings() -> None:
    with pytest.raises(SettingsError) as refused:
        AppSettings.model_validate(
            {**WITH_REDIS, "case_max_event_streams": 150, "redis_max_waiting_reads": 100}
        )
    assert "CASE_MAX_EVENT_STREAMS (150)" in str(refused.value)
    assert "REDIS_MAX_WAITING_READS (100)" in str(refused.value)


@pytest.mark.parametrize(("streams", "waiting_reads"), [(100, 100), (10, 100)])
def test_as_many_waiting_reads_as_streams_or_more_passes(streams: int, waiting_reads: int) -> None:
    settings = AppSettings.model_validate(
        {
            **WITH_REDIS,
            "case_max_event_streams": streams,
            "redis_max_waiting_reads": waiting_reads,
        }
    )
    assert settings.case_max_event_streams == streams


def test_without_a_hot_tier_the_waiting_reads_are_not_counted() -> None:
    """No stream is served without Redis (the route answers 503): the pool is never opened."""
    settings = AppSettings.model_validate(
        {
            "cosmos_endpoint": WITH_REDIS["cosmos_endpoint"],
            "case_max_event_streams": 150,
            "redis_max_waiting_reads": 100,
        }
    )
    assert settings.case_max_event_streams == 150


async def test_the_api_answers_503_naming_both_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in WITH_REDIS.items():
        monkeypatch.setenv(name.upper(), value)
    monkeypatch.setenv("CASE_MAX_EVENT_STREAMS", "150")
    monkeypatch.setenv("REDIS_MAX_WAITING_READS", "100")
    async with api_from_environment() as client:
        answer = await client.get("/api/cases/case-1", headers={"Authorization": "Bearer x"})
    assert answer.status_code == 503, answer.text
    assert "CASE_MAX_EVENT_STREAMS (150)" in answer.json()["error"]
    assert "REDIS_MAX_WAITING_READS (100)" in answer.json()["error"]
