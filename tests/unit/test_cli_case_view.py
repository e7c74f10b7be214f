"""How `agent-state show` prints a case: what a reader is told to do follows its status."""

from __future__ import annotations

from typing import Any

import pytest

from agent_state_cli import cli


def case(status: str) -> dict[str, Any]:
    return {
        "case_id": "case_1",
        "status": status,
        "customer_id": "cust_1",
        "completed_steps": ["intake"],
        "lease_ends_at": "2026-12-06T16:30:00+00:00",
    }


def shown(view: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> str:
    cli._print_case(view)
    return " ".join(capsys.readouterr().out.split())


def test_a_stalled_case_says_a_resume_waits_for_the_dead_runners_lease(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert "(a resume waits until then)" in shown(case("stalled"), capsys)


def test_a_running_case_shows_its_lease_without_a_resume_hint(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A case still running (a submit answered 202) was shown as if it needed a resume."""
    out = shown(case("running"), capsys)
    assert "2026-12-06T16:30:00+00:00" in out and "resume" not in out
