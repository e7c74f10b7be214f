"""Fault-suite fixtures: the reliability recorder, dedicated servers, settings, deadlines.

Faults only ever hit servers this suite started on 127.0.0.1 (the session
stack from tests/conftest.py, or a dedicated server a test starts and stops).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack import PostgresServer, RedisServer, free_port
from support_cases.settings import AppSettings

from .report import REPORT_PATH, ReliabilityReport, ScenarioRow

REPORT_KEY = pytest.StashKey[ReliabilityReport]()
WRITTEN_KEY = pytest.StashKey[Path | None]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[REPORT_KEY] = ReliabilityReport()
    config.stash[WRITTEN_KEY] = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" or report.failed:
        if hasattr(report, "wasxfail"):
            verdict = "known bug (xfail)" if report.skipped else "FAIL (xpass)"
        else:
            verdict = "pass" if report.passed else "FAIL"
        item.config.stash[REPORT_KEY].verdict(item.nodeid, verdict)
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    report = session.config.stash[REPORT_KEY]
    if report.rows and not report.missing():
        session.config.stash[WRITTEN_KEY] = report.write(REPORT_PATH)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    report = config.stash[REPORT_KEY]
    if not report.rows:
        return
    for name in sorted(report.rows):
        row = report.rows[name]
        terminalreporter.write_line(
            f"{row.verdict}: {name}: runs {row.runs}, lost {row.lost_writes}, "
            f"silent overwrites {row.silent_overwrites}; {row.observed}"
        )
    written = config.stash[WRITTEN_KEY]
    if written is not None:
        terminalreporter.write_line(f"reliability report written to {written}")
    else:
        missing = ", ".join(report.missing())
        terminalreporter.write_line(
            f"reliability report NOT written (scenarios not run: {missing})"
        )


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
