"""OpenTelemetry for the app: one setup per process, spans per agent node and store call,
metrics (support_cases/metrics.py).

With APPLICATIONINSIGHTS_CONNECTION_STRING set, `azure-monitor-opentelemetry`
exports traces, metrics and logs to Application Insights (Entra-authenticated
when APPLICATIONINSIGHTS_AUTHENTICATION_STRING says `Authorization=AAD`). This
exporter is the only one: in Azure Functions, host.json's `"telemetryMode":
"OpenTelemetry"` and the app setting `PYTHON_ENABLE_OPENTELEMETRY=true` only make
the worker hand each invocation's trace context to the app (host and worker
share one trace), while `PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY` must stay
false: with it the worker calls `configure_azure_monitor()` itself, without a
credential. Without a connection string a plain SDK TracerProvider is installed,
so spans still exist (tests read them) and nothing is exported or fails.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span, Status, StatusCode

from .settings import AppSettings, authentication_parts

log = logging.getLogger(__name__)

TRACER_NAME = "support_cases"
# A proxy until the app installs its provider, then that provider's tracer: one lookup, not
# one per span.
_TRACER = trace.get_tracer(TRACER_NAME)
# The Functions Python worker's own Azure Monitor setup; this app must be the only exporter.
WORKER_EXPORTER_SETTING = "PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY"
_configured = False
_configure_lock = threading.Lock()


def configure_telemetry(settings: AppSettings) -> str:
    """Install the tracer provider once per process; returns which exporter is active."""
    global _configured
    with _configure_lock:
        if _configured:
            return "already-configured"
        _configured = True
        if os.environ.get(WORKER_EXPORTER_SETTING, "").strip().lower() == "true":
            log.warning(
                "%s=true: the Functions worker exports telemetry itself, without an Entra "
                "credential and besides this app's exporter; set it to false",
                WORKER_EXPORTER_SETTING,
            )
        connection = settings.applicationinsights_connection_string
        if connection is not None:
            from azure.monitor.opentelemetry import configure_azure_monitor

            configure_azure_monitor(
                connection_string=connection.get_secret_value(),
                credential=_ingestion_credential(settings),
                resource=Resource.create({SERVICE_NAME: settings.otel_service_name}),
            )
            return "azure-monitor"
        if not isinstance(trace.get_tracer_provider(), TracerProvider):
            trace.set_tracer_provider(
                TracerProvider(resource=Resource.create({SERVICE_NAME: settings.otel_service_name}))
            )
        return "sdk"


def _ingestion_credential(settings: AppSettings) -> object | None:
    """An Entra credential when the authentication string asks for AAD ingestion."""
    raw = settings.applicationinsights_authentication_string
    if raw is None:
        return None
    # Set, it asks for AAD: the settings refuse any other value.
    parts = authentication_parts(raw)
    from azure.identity import ManagedIdentityCredential

    client_id = parts.get("clientid") or settings.azure_client_id
    return (
        ManagedIdentityCredential(client_id=client_id) if client_id else ManagedIdentityCredential()
    )


@contextmanager
def traced(
    name: str,
    *,
    expected: tuple[type[BaseException], ...] = (),
    **attributes: str | int | float | bool | None,
) -> Iterator[Span]:
    """A span named `name`; an exception marks it as an error (unless `expected`) and propagates."""
    clean = {key: value for key, value in attributes.items() if value is not None}
    with _TRACER.start_as_current_span(
        name, attributes=clean, record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield span
        except expected as signal:
            # Control flow such as LangGraph's interrupt is not a failure.
            span.set_attribute("outcome", type(signal).__name__)
            raise
        except BaseException as error:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            raise
