"""Telemetry setup: no connection string means no exporter and no failure; AAD ingestion parsing;
with a connection string, Azure Monitor configured once per process."""

from __future__ import annotations

from typing import Any, ClassVar

import azure.identity
import azure.monitor.opentelemetry
import pytest
from azure.identity import ManagedIdentityCredential
from opentelemetry.sdk.resources import SERVICE_NAME

from state.errors import SettingsError
from support_cases import telemetry
from support_cases.settings import AppSettings
from tests.support.misconfigured import api_from_environment

EMULATOR = {"cosmos_endpoint": "https://127.0.0.1:8091/"}


def test_without_connection_string_spans_work_and_nothing_is_exported() -> None:
    outcome = telemetry.configure_telemetry(AppSettings.model_validate(EMULATOR))
    assert outcome in {"sdk", "already-configured"}
    with telemetry.traced("unit.span", answer=42) as span:
        assert span.get_span_context().is_valid


def test_aad_authentication_string_gives_a_managed_identity_credential() -> None:
    settings = AppSettings.model_validate(
        {
            **EMULATOR,
            "applicationinsights_authentication_string": "Authorization=AAD;ClientId=0000-1111",
        }
    )
    assert isinstance(telemetry._ingestion_credential(settings), ManagedIdentityCredential)


def test_no_aad_means_no_credential() -> None:
    assert telemetry._ingestion_credential(AppSettings.model_validate(EMULATOR)) is None


# ---------------------------------------------------------------------- Azure Monitor setup

CONNECTION_STRING = "InstrumentationKey=00000000-0000-0000-0000-000000000000"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"


class RecordingManagedIdentityCredential(ManagedIdentityCredential):
    """The real credential (built offline), remembering the arguments it was built with."""

    built: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, **kwargs: Any) -> None:
        RecordingManagedIdentityCredential.built.append(kwargs)
        super().__init__(**kwargs)


@pytest.fixture
def azure_monitor_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """A process that has not set telemetry up yet, with configure_azure_monitor recorded."""
    calls: list[dict[str, Any]] = []
    # The one-per-process guard: restored after the test, so other tests' state stands.
    monkeypatch.setattr(telemetry, "_configured", False)
    # configure_telemetry imports it when it needs it, so the module attribute is what runs.
    monkeypatch.setattr(
        azure.monitor.opentelemetry, "configure_azure_monitor", lambda **kw: calls.append(kw)
    )
    RecordingManagedIdentityCredential.built = []
    monkeypatch.setattr(
        azure.identity, "ManagedIdentityCredential", RecordingManagedIdentityCredential
    )
    for name in (
        "APPLICATIONINSIGHTS_CONNECTION_STRING",
        "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
        "AZURE_CLIENT_ID",
        "OTEL_SERVICE_NAME",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COSMOS_ENDPOINT", EMULATOR["cosmos_endpoint"])
    return calls


def test_connection_string_configures_azure_monitor_once_with_the_managed_identity(
    azure_monitor_calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APPLICATIONINSIGHTS_CONNECTION_STRING", CONNECTION_STRING)
    monkeypatch.setenv(
        "APPLICATIONINSIGHTS_AUTHENTICATION_STRING", f"Authorization=AAD;ClientId={CLIENT_ID}"
    )
    settings = AppSettings()
    assert telemetry.configure_telemetry(settings) == "azure-monitor"
    assert telemetry.configure_telemetry(settings) == "already-configured"

    (call,) = azure_monitor_calls
    assert call["connection_string"] == CONNECTION_STRING
    assert isinstance(call["credential"], ManagedIdentityCredential)
    assert RecordingManagedIdentityCredential.built == [{"client_id": CLIENT_ID}]
    assert call["resource"].attributes[SERVICE_NAME] == "support-cases"


def test_connection_string_without_aad_configures_without_a_credential(
    azure_monitor_calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APPLICATIONINSIGHTS_CONNECTION_STRING", CONNECTION_STRING)
    assert telemetry.configure_telemetry(AppSettings()) == "azure-monitor"
    (call,) = azure_monitor_calls
    assert call["credential"] is None
    assert RecordingManagedIdentityCredential.built == []


@pytest.mark.parametrize(
    "written",
    [
        f"authorization=aad;clientid={CLIENT_ID}",
        f"Authorization=AAD; ClientId={CLIENT_ID}",
        f" ClientId = {CLIENT_ID} ;Authorization = AAD ",
    ],
)
def test_the_authentication_string_is_read_in_any_case_and_spacing(
    azure_monitor_calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, written: str
) -> None:
    """As the Functions host reads it: otherwise the app exported without its credential,
    every batch refused (local auth is disabled), with the host's own telemetry arriving."""
    monkeypatch.setenv("APPLICATIONINSIGHTS_CONNECTION_STRING", CONNECTION_STRING)
    monkeypatch.setenv("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", written)
    assert telemetry.configure_telemetry(AppSettings()) == "azure-monitor"
    (call,) = azure_monitor_calls
    assert isinstance(call["credential"], ManagedIdentityCredential)
    assert RecordingManagedIdentityCredential.built == [{"client_id": CLIENT_ID}]


def test_no_connection_string_never_configures_azure_monitor(
    azure_monitor_calls: list[dict[str, Any]],
) -> None:
    assert telemetry.configure_telemetry(AppSettings()) == "sdk"
    assert telemetry.configure_telemetry(AppSettings()) == "already-configured"
    assert azure_monitor_calls == []


def test_a_worker_that_would_export_too_is_reported(
    azure_monitor_calls: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The worker's own configure_azure_monitor() (no credential) must stay off."""
    monkeypatch.setenv(telemetry.WORKER_EXPORTER_SETTING, "true")
    with caplog.at_level("WARNING", logger=telemetry.__name__):
        telemetry.configure_telemetry(AppSettings())
    assert any(telemetry.WORKER_EXPORTER_SETTING in r.getMessage() for r in caplog.records)


def test_the_deployed_setting_keeps_the_worker_quiet(
    azure_monitor_calls: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(telemetry.WORKER_EXPORTER_SETTING, "false")
    with caplog.at_level("WARNING", logger=telemetry.__name__):
        telemetry.configure_telemetry(AppSettings())
    assert not any(telemetry.WORKER_EXPORTER_SETTING in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- a wrong connection string

VALID_KEY = "00000000-0000-0000-0000-000000000000"


@pytest.mark.parametrize(
    "connection_string",
    [
        VALID_KEY,  # the instrumentation key alone
        "InstrumentationKey=not-a-guid-but-hunter2",
        f"InstrumentationKey={VALID_KEY.upper().replace('0', 'A')}",  # the exporter wants lower case
        f"InstrumentationKey={VALID_KEY};IngestionEndpoint",
        f"InstrumentationKey={VALID_KEY};IngestionEndpoint=https://x.example/;",  # trailing `;`
    ],
)
def test_a_connection_string_the_exporter_refuses_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, connection_string: str
) -> None:
    monkeypatch.setenv("COSMOS_ENDPOINT", EMULATOR["cosmos_endpoint"])
    monkeypatch.setenv("APPLICATIONINSIGHTS_CONNECTION_STRING", connection_string)
    with pytest.raises(SettingsError) as refused:
        AppSettings()
    assert str(refused.value).startswith("APPLICATIONINSIGHTS_CONNECTION_STRING is not")
    assert "hunter2" not in str(refused.value)


def test_the_portals_connection_string_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    portal = (
        f"InstrumentationKey={VALID_KEY};IngestionEndpoint=https://westeurope-5.in."
        "applicationinsights.azure.com/;LiveEndpoint=https://westeurope.livediagnostics."
        f"monitor.azure.com/;ApplicationId={VALID_KEY}"
    )
    monkeypatch.setenv("COSMOS_ENDPOINT", EMULATOR["cosmos_endpoint"])
    monkeypatch.setenv("APPLICATIONINSIGHTS_CONNECTION_STRING", portal)
    connection = AppSettings().applicationinsights_connection_string
    assert connection is not None and connection.get_secret_value() == portal


async def test_an_api_with_a_wrong_connection_string_answers_503_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not a bare 500 on the first request (the exporter's ValueError as the runtime opened)
    and then, telemetry counted as set up, an API that runs on exporting nothing."""
    monkeypatch.setattr(telemetry, "_configured", False)
    monkeypatch.setenv("COSMOS_ENDPOINT", "https://127.0.0.1:1/")
    monkeypatch.setenv("AUTH_DISABLED", "true")
    monkeypatch.setenv("APPLICATIONINSIGHTS_CONNECTION_STRING", "InstrumentationKey=not-a-guid")
    async with api_from_environment() as client:
        for _ in range(2):
            health = await client.get("/api/health")
            assert health.status_code == 503, health.text
            assert "APPLICATIONINSIGHTS_CONNECTION_STRING" in health.json()["error"]


# ------------------------------------------------------------- a wrong authentication string


@pytest.mark.parametrize(
    "written",
    [
        f"ClientId={CLIENT_ID}",  # Authorization=AAD left out
        f"Authorisation=AAD;ClientId={CLIENT_ID}",
        f"Authorization=Entra;ClientId={CLIENT_ID}",
        "Authorization=ikey",
    ],
)
def test_an_authentication_string_not_asking_for_aad_is_refused_at_start(
    monkeypatch: pytest.MonkeyPatch, written: str
) -> None:
    """Read as no credential, it exported without one: every batch refused (local auth is
    disabled), the host's own telemetry arriving, nothing said."""
    monkeypatch.setenv("COSMOS_ENDPOINT", EMULATOR["cosmos_endpoint"])
    monkeypatch.setenv("APPLICATIONINSIGHTS_CONNECTION_STRING", CONNECTION_STRING)
    monkeypatch.setenv("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", written)
    with pytest.raises(SettingsError) as refused:
        AppSettings()
    assert str(refused.value).startswith("APPLICATIONINSIGHTS_AUTHENTICATION_STRING must")
