"""Reading what an OpenTelemetry in-memory reader collected, for tests."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics.export import InMemoryMetricReader

Points = dict[tuple[tuple[str, Any], ...], Any]


def points(reader: InMemoryMetricReader, name: str) -> Points:
    """{sorted attributes: value} of `name` in one collection of `reader`."""
    data = reader.get_metrics_data()
    found: Points = {}
    for resource in data.resource_metrics if data is not None else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        key = tuple(sorted((point.attributes or {}).items()))
                        found[key] = getattr(point, "value", point)
    return found
