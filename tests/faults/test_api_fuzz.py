"""The HTTP API fuzzed from its own OpenAPI schema: no input may cause a server error.

Schemathesis generates requests for every operation (valid and invalid bodies,
paths, queries and headers, derandomized and bounded per operation) and sends
them in-process through ASGI to the real app over the real tiers. Any answer
of 500 or above counts as a failure.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Err
from schemathesis.python import asgi

from state.settings import Settings
from support_cases.api import create_app
from support_cases.runtime import RuntimeHolder

from .conftest import Recorder

EXAMPLES_PER_OPERATION = 25
SCHEMA_PATH = "/api/openapi.json"


def test_api_fuzz_never_answers_5xx(
    settings_for: Callable[..., Settings], reliability: Recorder
) -> None:
    app_settings = settings_for("cosmos", case_sync_wait_seconds=1)
    # The runtime opens on the first request, on the one loop every ASGI call runs on.
    holder = RuntimeHolder(lambda: app_settings)
    app = create_app(holder=holder)
    schema = schemathesis.openapi.from_asgi(SCHEMA_PATH, app)
    statuses: Counter[int] = Counter()
    server_errors: list[str] = []
    operations = 0
    try:
        with asgi.get_client(app) as client:
            for result in schema.get_all_operations():
                if isinstance(result, Err):
                    raise result.err()
                operation = result.ok()
                operations += 1

                @settings(
                    max_examples=EXAMPLES_PER_OPERATION,
                    deadline=None,
                    derandomize=True,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )
                @given(case=operation.as_strategy())
                def send(case: schemathesis.Case) -> None:
                    response = case.call(session=client)
                    statuses[response.status_code] += 1
                    if response.status_code >= 500:
                        server_errors.append(
                            f"{case.method} {case.formatted_path} -> {response.status_code}: "
                            f"{response.text[:200]}"
                        )

                send()
    finally:
        asgi._get_portal().call(holder.close)

    runs = sum(statuses.values())
    reliability.record(
        "HTTP API fuzzed from its OpenAPI schema",
        injected=f"schemathesis: up to {EXAMPLES_PER_OPERATION} generated requests per "
        f"operation ({operations} operations), in-process over ASGI",
        runs=runs,
        lost_writes=0,
        silent_overwrites=0,
        observed=f"{len(server_errors)} responses >= 500; status codes "
        + ", ".join(f"{code}x{count}" for code, count in sorted(statuses.items())),
    )
    assert not server_errors, server_errors[:5]
    assert runs >= operations
