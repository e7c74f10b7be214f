"""The report machinery itself: deterministic output, and no write from a partial run."""

from __future__ import annotations

from pathlib import Path

import pytest

from .report import ReliabilityReport, ScenarioRow


def row(name: str, runs: int = 1) -> ScenarioRow:
    return ScenarioRow(name, "x | y", runs, 0, 0, "ok")


def test_rows_are_sorted_escaped_and_dated() -> None:
    report = ReliabilityReport(expected=("b", "a"))
    report.record("t::2", row("b", 2))
    report.record("t::1", row("a"))
    report.verdict("t::1", "pass")
    text = report.render("2025-01-02")
    assert "on 2025-01-02" in text
    table = [line for line in text.splitlines() if line.startswith("| a") or line.startswith("| b")]
    assert table == [
        "| a | x \\| y | 1 | 0 | 0 | pass: ok |",
        "| b | x \\| y | 2 | 0 | 0 | did not finish: ok |",
    ]
    assert report.render("2025-01-02") == text


def test_unknown_or_repeated_scenarios_are_rejected() -> None:
    report = ReliabilityReport(expected=("a",))
    with pytest.raises(KeyError, match="unknown scenario"):
        report.record("t", row("zzz"))
    report.record("t", row("a"))
    with pytest.raises(KeyError, match="twice"):
        report.record("t", row("a"))


def test_partial_run_reports_what_is_missing(tmp_path: Path) -> None:
    report = ReliabilityReport(expected=("a", "b"))
    report.record("t", row("a"))
    assert report.missing() == ["b"]
    report.record("u", row("b"))
    assert report.missing() == []
    written = report.write(tmp_path / "docs" / "R.md", today="2025-01-02")
    assert written.read_text() == report.render("2025-01-02")
