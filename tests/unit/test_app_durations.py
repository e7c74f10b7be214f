"""The app's own durations and limits are finite numbers: `inf` is no bound at all, and
pydantic reads `inf` and `nan` into a float unless told not to."""

from __future__ import annotations

import pytest

from state.errors import SettingsError
from support_cases.settings import AZURE_HOST_MARKERS, AppSettings


@pytest.fixture(autouse=True)
def outside_azure(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in AZURE_HOST_MARKERS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("value", ["inf", "nan", "1e400"])
@pytest.mark.parametrize(
    "variable",
    ["CASE_EFFECT_TIMEOUT_SECONDS", "CASE_SYNC_WAIT_SECONDS", "API_REQUEST_DEADLINE_SECONDS"],
)
def test_a_duration_that_is_not_finite_is_refused_naming_its_variable(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:8091/")
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as refused:
        AppSettings()
    assert str(refused.value).startswith(f"{variable}: "), refused.value
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("value", ["inf", "nan", "1e400", "-1"])
def test_a_review_threshold_that_is_not_a_finite_amount_is_refused(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An infinite threshold sent no refund to human review, however large, and said nothing.
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:8091/")
    monkeypatch.setenv("CASE_REVIEW_THRESHOLD", value)
    with pytest.raises(SettingsError) as refused:
        AppSettings()
    assert str(refused.value).startswith("CASE_REVIEW_THRESHOLD: "), refused.value
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("stale_after", "lock_ttl_ms"),
    # A live run's heartbeat is up to stale/4 + TTL/3 old: 1 s against a 30 s lock read it
    # stalled most of the time; 1 s against 2.25 s is exactly at that bound.
    [("1", "30000"), ("1", "2250"), ("13", "30000"), ("40", "90000")],
)
def test_a_stale_period_a_live_run_may_be_silent_for_is_refused_naming_both(
    stale_after: str, lock_ttl_ms: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:8091/")
    monkeypatch.setenv("CASE_STALE_AFTER_SECONDS", stale_after)
    monkeypatch.setenv("STATE_LOCK_TTL_MS", lock_ttl_ms)
    with pytest.raises(SettingsError) as refused:
        AppSettings()
    message = str(refused.value)
    assert "CASE_STALE_AFTER_SECONDS" in message and "STATE_LOCK_TTL_MS" in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("stale_after", "lock_ttl_ms"),
    [(None, None), ("300", "30000"), ("1", "2249"), ("14", "30000"), ("1", "300")],
)
def test_a_stale_period_longer_than_a_live_runs_silence_is_taken(
    stale_after: str | None, lock_ttl_ms: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:8091/")
    for name, value in (
        ("CASE_STALE_AFTER_SECONDS", stale_after),
        ("STATE_LOCK_TTL_MS", lock_ttl_ms),
    ):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    settings = AppSettings()
    if stale_after is not None:
        assert settings.case_stale_after_seconds == int(stale_after)


@pytest.mark.parametrize(
    ("variable", "longest"),
    [
        ("CASE_STALE_AFTER_SECONDS", 24 * 24 * 3600),
        ("CASE_DUPLICATE_WINDOW_SECONDS", 366 * 24 * 3600),
    ],
)
def test_a_window_past_its_documented_longest_is_refused(
    variable: str, longest: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each becomes a timedelta: 10**14 s overflowed it (a bare OverflowError at the runtime's
    # start, or at every run's billing step).
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:8091/")
    monkeypatch.setenv(variable, str(longest))
    assert getattr(AppSettings(), variable.lower()) == longest
    for value in (longest + 1, 10**14):
        monkeypatch.setenv(variable, str(value))
        with pytest.raises(SettingsError) as refused:
            AppSettings()
        assert str(refused.value).startswith(f"{variable}: "), refused.value
