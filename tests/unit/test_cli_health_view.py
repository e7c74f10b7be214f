"""How `agent-state health` prints the report of a caller with Cases.Operate: what made the
status degraded is shown, not left to `--json`."""

from __future__ import annotations

from typing import Any

import pytest

from agent_state_cli import cli
from support_cases.models import BacklogView, HealthView, TierView


def shown(report: HealthView, capsys: pytest.CaptureFixture[str]) -> str:
    answer: dict[str, Any] = report.model_dump(mode="json")
    cli._print_tiers(answer)
    return " ".join(capsys.readouterr().out.split())


def test_a_damaged_run_index_shard_is_named_with_its_repair(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = HealthView(
        status="degraded",
        tiers=[TierView(name="postgres", up=True, latency_ms=1.0, detail="")],
        damaged_index_shards=["support-cases-active-runs-3"],
    )
    out = shown(report, capsys)
    assert "run index shards damaged: support-cases-active-runs-3" in out
    assert "agent-state run-index repair" in out


def test_the_write_behind_backlog_is_told_with_its_stuck_threads(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = HealthView(
        status="degraded",
        tiers=[TierView(name="redis", up=True, latency_ms=0.5, detail="")],
        backlog=BacklogView(entries=12, threads=3, oldest_age_seconds=4.25, stuck_threads=1),
    )
    out = shown(report, capsys)
    assert "write-behind backlog: 12 entries on 3 threads, the oldest 4.2 s old" in out
    assert "1 threads stuck" in out


def test_a_healthy_report_says_nothing_more_than_its_tiers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    report = HealthView(
        status="ok",
        tiers=[TierView(name="redis", up=True, latency_ms=0.5, detail="")],
        damaged_index_shards=[],
    )
    out = shown(report, capsys)
    assert "backlog" not in out and "damaged" not in out
