"""The HTTP API fuzzed from its own OpenAPI schema: no input may cause a server error.

Schemathesis generates requests for every operation (valid and invalid bodies,
paths, queries and headers, derandomized and bounded per operation) and sends
them in-process through ASGI to the real app over the real tiers, as a caller
holding every app role (a token from the test stack's issuer, validated like
Entra's). The same requests without a token must all be refused with 401,
`/api/health` aside. Any answer of 500 or above counts as a failure.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

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
PUBLIC_OPERATIONS = {"GET /api/health"}


def without_authorization(headers: dict[str, Any] | None) -> dict[str, Any]:
    """The generated headers minus any Authorization schemathesis made up itself."""
    return {k: v for k, v in (headers or {}).items() if k.lower() != "authorization"}


def test_api_fuzz_never_answers_5xx(
    settings_for: Callable[..., Settings],
    reliability: Recorder,
    issue_token: Callable[..., str],
) -> None:
    app_settings = settings_for("cosmos", case_sync_wait_seconds=1)
    # The runtime opens on the first request, on the one loop every ASGI call runs on.
    holder = RuntimeHolder(lambda: app_settings)
    app = create_app(holder=holder)
    schema = schemathesis.openapi.from_asgi(SCHEMA_PATH, app)
    statuses: Counter[int] = Counter()
    anonymous: Counter[int] = Counter()
    server_errors: list[str] = []
    not_refused: list[str] = []
    auth_refused: list[str] = []
    operations = 0
    authorized = {"Authorization": f"Bearer {issue_token('fuzzer')}"}
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
                    case.headers = without_authorization(case.headers)
                    response = case.call(session=client, headers=authorized)
                    statuses[response.status_code] += 1
                    if response.status_code >= 500:
                        server_errors.append(
                            f"{case.method} {case.formatted_path} -> {response.status_code}: "
                            f"{response.text[:200]}"
                        )
                    # The only refusal a caller with every role may get: a review decision
                    # whose body names another reviewer.
                    if response.status_code in (401, 403) and "reviewer_id" not in response.text:
                        auth_refused.append(
                            f"{case.method} {case.formatted_path} -> {response.status_code}: "
                            f"{response.text[:200]}"
                        )
                    refused = case.call(session=client)
                    anonymous[refused.status_code] += 1
                    public = f"{case.method} {case.path}" in PUBLIC_OPERATIONS
                    if refused.status_code >= 500 and not (public and refused.status_code == 503):
                        server_errors.append(
                            f"{case.method} {case.formatted_path} without a token -> "
                            f"{refused.status_code}: {refused.text[:200]}"
                        )
                    if not public and refused.status_code != 401:
                        not_refused.append(
                            f"{case.method} {case.formatted_path} without a token -> "
                            f"{refused.status_code}: {refused.text[:200]}"
                        )

                send()
    finally:
        asgi._get_portal().call(holder.close)

    runs = sum(statuses.values())
    reliability.record(
        "HTTP API fuzzed from its OpenAPI schema",
        injected=f"schemathesis: up to {EXAMPLES_PER_OPERATION} generated requests per "
        f"operation ({operations} operations), in-process over ASGI, each sent with a valid "
        "token (every role) and again without one",
        runs=runs,
        lost_writes=0,
        silent_overwrites=0,
        observed=f"{len(server_errors)} responses >= 500; with a token: "
        + ", ".join(f"{code}x{count}" for code, count in sorted(statuses.items()))
        + "; without: "
        + ", ".join(f"{code}x{count}" for code, count in sorted(anonymous.items()))
        + f" ({len(not_refused)} not refused outside /api/health)",
    )
    assert not server_errors, server_errors[:5]
    assert not not_refused, not_refused[:5]
    assert runs >= operations
    # The valid token got past authentication: the use cases answered.
    assert not auth_refused, auth_refused[:5]
