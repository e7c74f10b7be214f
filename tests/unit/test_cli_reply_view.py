"""How `agent-state reply` prints the run a message became: what to do next follows its status."""

from __future__ import annotations

from typing import Any

import pytest

from agent_state_cli import cli


def run(status: str) -> dict[str, Any]:
    return {
        "run_id": "run-30455437b30841fba584bdd7dfa43721",
        "status": status,
        "strategy": "interrupt",
        "duration_seconds": 0.19,
        "stopped_by": None,
        "discarded_effects": [],
        "error": None,
    }


def shown(view: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> str:
    cli._print_reply("case_9001", view, replayed=False)
    return " ".join(capsys.readouterr().out.split())


def test_a_run_paused_for_review_says_how_to_decide_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It said "the answer: agent-state show case_9001", as for a run that had answered."""
    out = shown(run("awaiting_review"), capsys)
    assert "agent-state review case_9001 approve|reject" in out
    assert "the answer" not in out


@pytest.mark.parametrize(
    ("status", "hint"),
    [("queued", "agent-state follow case_9001"), ("completed", "agent-state show case_9001")],
)
def test_a_busy_run_is_followed_and_an_ended_one_shown(
    status: str, hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hint in shown(run(status), capsys)
