"""The app's own durations are finite numbers: `inf` is no bound at all, and pydantic reads
`inf` and `nan` into a float unless told not to."""

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
