"""Fault-suite fixtures: the reliability recorder, dedicated servers, settings, deadlines.

Faults only ever hit servers this suite started on 127.0.0.1 (the session
stack from tests/conftest.py, or a dedicated server a test starts and stops). The
report the recorder feeds is collected by the `faults.reliability` plugin.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack import PostgresServer, RedisServer, free_port
from support_cases.settings import AppSettings

from .reliability import REPORT_KEY
from .report import ReliabilityReport, ScenarioRow


class Recorder:
    """What one test hands the report: record the counts first, then assert on them."""

    def __init__(self, report: ReliabilityReport, nodeid: str) -> None:
        self._report = report
        self._nodeid = nodeid

    def record(
        self,
        scenario: str,
        *,
        injected: str,
        runs: int,
        lost_writes: int,
        silent_overwrites: int,
        observed: str,
    ) -> None:
        self._report.record(
            self._nodeid,
            ScenarioRow(scenario, injected, runs, lost_writes, silent_overwrites, observed),
        )


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Recorder:
    return Recorder(request.config.stash[REPORT_KEY], request.node.nodeid)


class Deadline:
    """Bounds a loop in time as well as in count."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self._end

    def check(self, what: str) -> None:
        if self.expired():
            raise TimeoutError(f"{what}: gave up after {self.seconds}s")


@pytest.fixture
def settings_for(env_for: Callable[..., dict[str, str]]) -> Callable[..., AppSettings]:
    """The same, as an `AppSettings` object (the process environment is not read)."""

    def build(backend: str, **overrides: object) -> AppSettings:
        return AppSettings.model_validate(
            {name.lower(): value for name, value in env_for(backend, **overrides).items()}
        )

    return build


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start dedicated Redis servers (this test may kill or flush them); all stopped after."""
    started: list[RedisServer] = []

    def start(**options: Any) -> RedisServer:
        server = RedisServer(
            port=free_port(), workdir=tmp_path / f"redis-{len(started)}", **options
        )
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def postgres_server(tmp_path: Path) -> Iterator[PostgresServer]:
    """A dedicated Postgres this test may restart; stopped and removed after."""
    server = PostgresServer(port=free_port(), workdir=tmp_path / "postgres")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        server.remove_data()
