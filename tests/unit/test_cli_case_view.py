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


def test_duplicates_in_several_currencies_show_each_currencys_amount(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The billing row showed their sum with no currency ("600.00 at ..."), the figure a
    reviewer deciding the case must not go by."""
    charges = [
        {"transaction_id": "u2", "amount": 300.0, "currency": "USD", "merchant": "Air"},
        {"transaction_id": "j2", "amount": 0.1, "currency": "EUR", "merchant": "Air"},
        {"transaction_id": "j3", "amount": 0.2, "currency": "EUR", "merchant": "Air"},
    ]
    view = case("awaiting_review") | {
        "billing": {
            "duplicate_found": True,
            "duplicates": charges,
            "refund_amount": 300.3,
            "currency": None,
            "merchant": "Air",
        }
    }
    assert "3 duplicate(s), 0.30 EUR + 300.00 USD at Air" in shown(view, capsys)


def test_duplicates_in_one_currency_show_their_sum_in_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    view = case("completed") | {
        "billing": {
            "duplicate_found": True,
            "duplicates": [{"amount": 49.99, "currency": "USD"}],
            "refund_amount": 49.99,
            "currency": "USD",
            "merchant": "Air",
        }
    }
    assert "1 duplicate(s), 49.99 USD at Air" in shown(view, capsys)
