"""Session fixtures: one real local stack (Redis, Cosmos emulator, Postgres) per test run.

Ports are picked free by the OS, so a second run (or a developer's `agent-state
stack up`) on the same machine never collides; every server is stopped at the end.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devstack import RedisServer, Stack, free_port
from devstack.issuer import ROLES, request_token

# Loaded here, where the xdist controller sees it too: it writes the reliability report.
pytest_plugins = ["faults.reliability"]

# pytest-xdist runs its workers with COLUMNS=80, and a console made at import (the CLI's)
# keeps that width whatever COLUMNS a test's CliRunner sets for one call.
os.environ.pop("COLUMNS", None)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    planned = Stack.plan(tmp_path_factory.mktemp("stack"), with_postgres=True)
    try:
        planned.start()
        yield planned
    finally:
        planned.stop()
        if planned.postgres is not None:
            planned.postgres.remove_data()


@pytest.fixture(scope="session")
def stack_env(stack: Stack) -> dict[str, str]:
    """Environment values (same names as the app settings) pointing at the test stack."""
    return stack.env()


@pytest.fixture(scope="session")
def issue_token(stack_env: dict[str, str]) -> Callable[..., str]:
    """An access token from the stack's own issuer (real RS256, served JWKS): by default for
    every role; claim overrides (expires_in, audience, issuer, ...) make the bad ones."""

    def issue(name: str = "tester", roles: list[str] | None = None, **claims: object) -> str:
        return request_token(
            stack_env["AUTH_ISSUER"], name, list(ROLES) if roles is None else roles, **claims
        )

    return issue


@pytest.fixture(scope="session")
def bearer(issue_token: Callable[..., str]) -> Callable[..., dict[str, str]]:
    """`Authorization` headers for a caller `name` holding `roles` (default: every role)."""

    def headers(name: str = "tester", roles: list[str] | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {issue_token(name, roles)}"}

    return headers


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_postgres_url(stack_env: dict[str, str]) -> Iterator[str]:
    """A new, empty database on the session Postgres server (dropped afterwards)."""
    from tests.support.postgres import own_database

    with own_database(stack_env["POSTGRES_URL"]) as url:
        yield url


@pytest.fixture
def env_for(stack_env: dict[str, str]) -> Callable[..., dict[str, str]]:
    """App settings as environment variables for one backend on the session stack.

    Overrides by field name; `redis_url=None` runs without a hot tier, a URL
    points at a dedicated server (likewise `postgres_url`).
    """

    def build(backend: str, **overrides: object) -> dict[str, str]:
        values = {
            "STATE_COLD_BACKEND": backend,
            "COSMOS_ENDPOINT": stack_env["COSMOS_ENDPOINT"],
            "COSMOS_KEY": stack_env["COSMOS_KEY"],
            "COSMOS_CREATE_IF_MISSING": "true",
            "POSTGRES_URL": stack_env["POSTGRES_URL"],
            # Shared by both backends: hot-tier keys are namespaced by the cold store.
            "REDIS_URL": stack_env["REDIS_URL"],
            # Callers are checked against the stack's own token issuer.
            "AUTH_ISSUER": stack_env["AUTH_ISSUER"],
            "AUTH_JWKS_URL": stack_env["AUTH_JWKS_URL"],
            "AUTH_AUDIENCE": stack_env["AUTH_AUDIENCE"],
        }
        for name, value in overrides.items():
            if value is None:
                values.pop(name.upper(), None)
            else:
                values[name.upper()] = str(value)
        return values

    return build


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server of this test's own, free to flush or stop."""
    server = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
