"""The HTTP API fuzzed from its own OpenAPI schema: no input may cause a server error, and
every answer keeps to HTTP and to the document.

Schemathesis generates requests for every operation (valid and invalid bodies,
paths, queries and headers, derandomized and bounded per operation) and sends
them in-process through ASGI to the real app over the real tiers, as a caller
holding every app role (a token from the test stack's issuer, validated like
Entra's). The same requests without a token must all be refused with 401,
`/api/health` aside. Any answer of 500 or above counts as a failure. Then the
schemathesis CLI runs with every check (`--checks all`: status codes, content
types and headers as documented, `Allow` on 405, ...) against the app served by
uvicorn, as a client holding every role would see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Err
from schemathesis.python import asgi

from devstack import free_port
from state.settings import Settings
from support_cases.api import create_app
from support_cases.runtime import RuntimeHolder
from tests.support.cosmos import drop_container

from .conftest import Deadline, Recorder
from .processes import PYTHONPATH
from .report import REPO_ROOT

EXAMPLES_PER_OPERATION = 25
SCHEMA_PATH = "/api/openapi.json"
PUBLIC_OPERATIONS = {"GET /api/health"}


def without_authorization(headers: dict[str, Any] | None) -> dict[str, Any]:
    """The generated headers minus any Authorization schemathesis made up itself."""
    return {k: v for k, v in (headers or {}).items() if k.lower() != "authorization"}


CLI_CONFIG = Path(__file__).with_name("schemathesis.toml")
CLI_EXAMPLES_PER_OPERATION = 10
CLI_BUDGET_SECONDS = 55
# Operations the OpenAPI document declares: submit, status, checkpoints, audit, review,
# resume, messages, runs, events, health.
SERVED_OPERATIONS = 10


def test_api_fuzz_never_answers_5xx(
    settings_for: Callable[..., Settings],
    reliability: Recorder,
    issue_token: Callable[..., str],
) -> None:
    # A container of its own (see the served test below), dropped at the end.
    app_settings = settings_for(
        "cosmos", case_sync_wait_seconds=1, cosmos_container=f"fuzz-{uuid.uuid4().hex[:12]}"
    )
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
        asyncio.run(drop_container(app_settings))

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


def test_served_api_passes_every_schemathesis_check(
    env_for: Callable[..., dict[str, str]],
    settings_for: Callable[..., Settings],
    issue_token: Callable[..., str],
    tmp_path: Path,
) -> None:
    # A container of its own: the emulator's cross-partition queries scan a container, so on
    # the one the suite shares, the same requests take longer the more the suite has written.
    container = f"fuzz-{uuid.uuid4().hex[:12]}"
    env = {**env_for("cosmos", cosmos_container=container), "CASE_SYNC_WAIT_SECONDS": "1"}
    started = time.monotonic()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(
            asyncio.run, drop_container(settings_for("cosmos", cosmos_container=container))
        )
        run = run_schemathesis(env, issue_token, tmp_path, started)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert time.monotonic() - started < CLI_BUDGET_SECONDS
    # Every operation of the document was exercised (one JUnit test case each).
    report = ElementTree.parse(tmp_path / "junit.xml").getroot()
    operations = {case.get("name") for case in report.iter("testcase")}
    assert len(operations) >= SERVED_OPERATIONS, operations


def run_schemathesis(
    env: dict[str, str], issue_token: Callable[..., str], tmp_path: Path, started: float
) -> subprocess.CompletedProcess[str]:
    """`st run --checks all` against the app served with `env`, within the time left."""
    with served_api(env, tmp_path / "api.log") as base_url:
        command = [
            str(Path(sys.executable).with_name("st")),
            "--config-file",
            str(CLI_CONFIG),
            "run",
            f"{base_url}{SCHEMA_PATH}",
            "--checks",
            "all",
            "--max-examples",
            str(CLI_EXAMPLES_PER_OPERATION),
            "--seed",
            "1",
            "--header",
            f"Authorization: Bearer {issue_token('schemathesis')}",
            "--workers",
            "1",
            "--request-timeout",
            "10",
            "--report",
            "junit",
            "--report-junit-path",
            str(tmp_path / "junit.xml"),
        ]
        left = CLI_BUDGET_SECONDS - (time.monotonic() - started)
        return subprocess.run(command, capture_output=True, text=True, timeout=left, cwd=tmp_path)


@contextlib.contextmanager
def served_api(env: dict[str, str], log: Path) -> Iterator[str]:
    """The app's own factory under uvicorn on a free loopback port; stopped by its pid."""
    port = free_port()
    with log.open("ab") as output:
        server = subprocess.Popen(
            [
                *(sys.executable, "-m", "uvicorn", "support_cases.api:create_app", "--factory"),
                *("--host", "127.0.0.1", "--port", str(port)),
            ],
            env={**os.environ, "PYTHONPATH": PYTHONPATH, **env},
            cwd=REPO_ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = Deadline(30)
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base_url}/api/health", timeout=5).status_code == 200:
                    break
            deadline.check("the API to start")
            time.sleep(0.2)
        yield base_url
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(5)
