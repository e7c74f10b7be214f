"""Pytest plugin (registered by tests/conftest.py) that collects the reliability report.

Fault tests record their rows in the process that runs them; pytest's verdict on each
test is attached there too. Under pytest-xdist every worker hands its rows to the
controller when it finishes, and the controller, which saw every worker go down,
prints the rows and writes docs/RELIABILITY.md (only when every scenario has a row).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from .report import REPORT_PATH, ReliabilityReport, ScenarioRow

REPORT_KEY = pytest.StashKey[ReliabilityReport]()
WRITTEN_KEY = pytest.StashKey[Path | None]()
# The key of a worker's rows in what it hands the controller.
WORKER_ROWS = "reliability_rows"


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


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """An xdist worker finished: its rows join the controller's report."""
    report = node.config.stash[REPORT_KEY]
    for row in getattr(node, "workeroutput", {}).get(WORKER_ROWS, []):
        report.add(ScenarioRow(**row))


def pytest_sessionfinish(session: pytest.Session) -> None:
    report = session.config.stash[REPORT_KEY]
    worker_output = getattr(session.config, "workeroutput", None)
    if worker_output is not None:
        worker_output[WORKER_ROWS] = [asdict(row) for row in report.rows.values()]
        return
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
