"""Telemetry setup: no connection string means no exporter and no failure; AAD ingestion parsing."""

from __future__ import annotations

from azure.identity import ManagedIdentityCredential

from state.settings import Settings
from support_cases import telemetry

EMULATOR = {"cosmos_endpoint": "https://127.0.0.1:8091/"}


def test_without_connection_string_spans_work_and_nothing_is_exported() -> None:
    outcome = telemetry.configure_telemetry(Settings.model_validate(EMULATOR))
    assert outcome in {"sdk", "already-configured"}
    with telemetry.traced("unit.span", answer=42) as span:
        assert span.get_span_context().is_valid


def test_aad_authentication_string_gives_a_managed_identity_credential() -> None:
    settings = Settings.model_validate(
        {
            **EMULATOR,
            "applicationinsights_authentication_string": "Authorization=AAD;ClientId=0000-1111",
        }
    )
    assert isinstance(telemetry._ingestion_credential(settings), ManagedIdentityCredential)


def test_no_aad_means_no_credential() -> None:
    assert telemetry._ingestion_credential(Settings.model_validate(EMULATOR)) is None
