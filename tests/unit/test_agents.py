"""The agents' rules, as pure functions: duplicate charges, account intent, policy, response."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

import pytest

from support_cases.agents.account import classify_account_request
from support_cases.agents.base import AgentDeps
from support_cases.agents.billing import BillingAgent, find_duplicate_charges, summarize_duplicates
from support_cases.agents.policy import apply_policy
from support_cases.agents.response import compose_response
from support_cases.case_state import CaseState

DAY = timedelta(days=1)


def tx(tx_id: str, merchant: str, amount: float, at: str, currency: str = "USD") -> dict[str, Any]:
    return {
        "id": tx_id,
        "merchant": merchant,
        "amount": amount,
        "currency": currency,
        "timestamp": at,
    }


def test_two_identical_charges_close_in_time_are_one_duplicate() -> None:
    transactions = [
        tx("t1", "Acme Streaming", 49.99, "2024-05-01T10:00:00+00:00"),
        tx("t2", "Acme Streaming", 49.99, "2024-05-01T10:03:00+00:00"),
        tx("t3", "Coffee Bar", 4.50, "2024-05-01T11:00:00+00:00"),
    ]
    duplicates = find_duplicate_charges(transactions, DAY)
    assert [d["transaction_id"] for d in duplicates] == ["t2"]
    billing = summarize_duplicates(duplicates)
    assert billing["duplicate_found"] is True
    assert billing["refund_amount"] == 49.99
    assert billing["currency"] == "USD"
    assert billing["merchant"] == "Acme Streaming"


def test_refund_amount_follows_the_transactions_not_a_constant() -> None:
    transactions = [
        tx("a", "Hotel Europa", 612.40, "2024-05-02T08:00:00+00:00"),
        tx("b", "Hotel Europa", 612.40, "2024-05-02T08:00:30+00:00"),
        tx("c", "Hotel Europa", 612.40, "2024-05-02T09:00:00+00:00"),
    ]
    billing = summarize_duplicates(find_duplicate_charges(transactions, DAY))
    assert [d["transaction_id"] for d in billing["duplicates"]] == ["b", "c"]
    assert billing["refund_amount"] == pytest.approx(1224.80)


@pytest.mark.parametrize(
    ("second", "why"),
    [
        (tx("t2", "Acme Streaming", 49.98, "2024-05-01T10:03:00+00:00"), "different amount"),
        (tx("t2", "Other Shop", 49.99, "2024-05-01T10:03:00+00:00"), "different merchant"),
        (tx("t2", "Acme Streaming", 49.99, "2024-05-03T10:00:01+00:00"), "outside the window"),
        (tx("t2", "Acme Streaming", 49.99, "2024-05-01T10:03:00+00:00", "EUR"), "other currency"),
        (tx("t1", "Acme Streaming", 49.99, "2024-05-01T10:00:00+00:00"), "same transaction twice"),
    ],
)
def test_not_a_duplicate(second: dict[str, Any], why: str) -> None:
    first = tx("t1", "Acme Streaming", 49.99, "2024-05-01T10:00:00+00:00")
    assert find_duplicate_charges([first, second], DAY) == [], why


def test_charges_of_less_than_half_a_cent_are_no_duplicates() -> None:
    """They round to no cents: a refund of 0.00 is nothing to issue."""
    transactions = [
        tx("t1", "Acme Streaming", 0.004, "2024-05-01T10:00:00+00:00"),
        tx("t2", "Acme Streaming", 0.004, "2024-05-01T10:03:00+00:00"),
    ]
    assert find_duplicate_charges(transactions, DAY) == []
    assert not summarize_duplicates(find_duplicate_charges(transactions, DAY))["duplicate_found"]


def test_merchant_names_compare_case_and_space_insensitively_and_order_does_not_matter() -> None:
    transactions = [
        tx("late", "ACME  streaming", 10.0, "2024-05-01T12:00:00+00:00"),
        tx("early", "Acme Streaming", 10.0, "2024-05-01T11:00:00+00:00"),
    ]
    assert [d["transaction_id"] for d in find_duplicate_charges(transactions, DAY)] == ["late"]


def test_window_is_configurable() -> None:
    transactions = [
        tx("t1", "Gym", 30.0, "2024-05-01T10:00:00+00:00"),
        tx("t2", "Gym", 30.0, "2024-05-01T10:10:00+00:00"),
    ]
    assert find_duplicate_charges(transactions, timedelta(minutes=5)) == []
    assert len(find_duplicate_charges(transactions, timedelta(minutes=15))) == 1


def test_duplicates_in_several_currencies_have_no_single_currency() -> None:
    transactions = [
        tx("u1", "Shop", 5.0, "2024-05-01T10:00:00+00:00", "USD"),
        tx("u2", "Shop", 5.0, "2024-05-01T10:01:00+00:00", "USD"),
        tx("e1", "Shop", 5.0, "2024-05-01T10:00:00+00:00", "EUR"),
        tx("e2", "Shop", 5.0, "2024-05-01T10:01:00+00:00", "EUR"),
    ]
    billing = summarize_duplicates(find_duplicate_charges(transactions, DAY))
    assert billing["currency"] is None
    assert apply_policy(billing, 500.0)["decision"] == "needs_review"


def test_the_billing_note_tells_each_currencys_amount_not_their_sum() -> None:
    """The note (the case's billing message, the `node_finished` summary `agent-state
    watch` shows) gave "300.30 (several currencies)", a sum in no currency."""
    transactions = [
        tx("u1", "Air", 300.0, "2024-05-01T10:00:00+00:00", "USD"),
        tx("u2", "Air", 300.0, "2024-05-01T10:01:00+00:00", "USD"),
        tx("e1", "Air", 0.3, "2024-05-01T10:00:00+00:00", "EUR"),
        tx("e2", "Air", 0.3, "2024-05-01T10:01:00+00:00", "EUR"),
    ]
    billing = summarize_duplicates(find_duplicate_charges(transactions, DAY))
    # The agent's deps serve its step, not its note.
    agent = BillingAgent(cast(AgentDeps, None))
    assert agent.note(billing) == "2 duplicate charge(s) at Air, 0.30 EUR + 300.00 USD."
    one = summarize_duplicates(find_duplicate_charges(transactions[:2], DAY))
    assert agent.note(one) == "1 duplicate charge(s) at Air, 300.00 USD."


@pytest.mark.parametrize(
    ("text", "issue"),
    [
        ("I was charged twice, and I can't log in", "login"),
        ("I was charged twice, and I can\u2019t log in", "login"),
        ("Cannot sign in to the app since yesterday", "login"),
        ("I can't log-in since Monday", "login"),
        ("Sign-in fails every time", "login"),
        ("I can't log into my account", "login"),
        ("Unable to sign into the portal", "login"),
        ("I logged into the shop and was charged twice", None),
        ("I forgot my password", "password"),
        ("Please reset my PASSWORD", "password"),
        ("My account is locked after three attempts", "locked"),
        ("I am locked out", "locked"),
        ("I was charged twice for my subscription", None),
        ("Where is my parcel?", None),
    ],
)
def test_account_intent(text: str, issue: str | None) -> None:
    assert classify_account_request(text) == issue


@pytest.mark.parametrize(
    "text",
    [
        "I log into the app every morning and saw two charges",
        "I log in every day; I was charged twice",
        "When I sign in I see two charges of 49.99",
        "Whenever I login the balance shows 49.99 twice",
        "I had no problems logging in but was charged twice",
        "My login email is the one on file and I was charged twice",
        "I log in and the payment fails",
        "I changed my password last week and was charged twice",
        "And my password?",
    ],
)
def test_a_mention_of_logging_in_or_a_password_is_no_access_problem(text: str) -> None:
    """Found by review: any "log in(to)" or "password" sent a reset link the customer did
    not ask for."""
    assert classify_account_request(text) is None


@pytest.mark.parametrize(
    ("text", "issue"),
    [
        ("I'm having trouble logging in", "login"),
        ("The app won't let me sign in", "login"),
        ("I couldn't log on yesterday", "login"),
        ("Login doesn't work", "login"),
        ("I paid 49.99. I can't log in", "login"),
        ("The 2FA code never arrives", "login"),
        ("I never receive the verification code", "login"),
        ("I don't get the two-factor authentication code", "login"),
        ("The reset link did not arrive, I still cannot log in", "login"),
        ("My password doesn't work", "password"),
        ("I can't remember my password", "password"),
        ("Password reset please", "password"),
    ],
)
def test_an_access_problem_in_other_words(text: str, issue: str) -> None:
    assert classify_account_request(text) == issue


@pytest.mark.parametrize(
    ("text", "issue"),
    [
        ("I haven't been able to log in since Monday", "login"),
        ("I can no longer log in", "login"),
        ("I'm no longer able to sign in", "login"),
        ("I keep getting an error when I try to log in", "login"),
        ("I get an error when logging in", "login"),
        ("Login page keeps saying error", "login"),
        ("I tried to log in but it didn't work", "login"),
        ("I can't log back in", "login"),
        ("I can't get in to my account", "login"),
        ("I can\u2018t log in", "login"),
        ("I can\u02bct log in", "login"),
    ],
)
def test_an_access_problem_as_customers_also_put_it(text: str, issue: str) -> None:
    """Found by review: each read as an access problem before the classifier asked for one
    (any "log in" did), and none did after: no reset link, and a follow-up saying so never
    reached the account agent."""
    assert classify_account_request(text) == issue


def test_any_issues_logging_in_denied_is_no_access_problem() -> None:
    assert classify_account_request("I don't have any issues logging in, refund please") is None


@pytest.mark.parametrize(
    "text",
    [
        "I don't get any errors logging in, but I was charged twice",
        "No errors when logging in, but I was double charged",
        "The login page showed no errors, but my refund is missing",
    ],
)
def test_errors_logging_in_denied_are_no_access_problem(text: str) -> None:
    """Found by review: errors denied as troubles are ("no errors when logging in") read
    as an access problem once an error on logging in was one, and sent a reset link."""
    assert classify_account_request(text) is None


def _billing(amount: float, found: bool = True) -> Any:
    return {
        "duplicate_found": found,
        "duplicates": [],
        "refund_amount": amount if found else 0.0,
        "currency": "USD",
        "merchant": "Shop",
    }


@pytest.mark.parametrize(
    ("amount", "threshold", "decision"),
    [
        (49.99, 500.0, "auto_approved"),
        (500.0, 500.0, "auto_approved"),  # "exceeds" is strict
        (500.01, 500.0, "needs_review"),
        (120.0, 100.0, "needs_review"),  # the threshold is a setting, not a constant
    ],
)
def test_policy_threshold(amount: float, threshold: float, decision: str) -> None:
    result = apply_policy(_billing(amount), threshold)
    assert result["decision"] == decision
    assert result["refund_amount"] == amount
    assert result["threshold"] == threshold


def test_policy_without_duplicates_refunds_nothing() -> None:
    assert apply_policy(_billing(0.0, found=False), 500.0)["decision"] == "no_refund"


def test_response_confirms_refund_and_reset_link() -> None:
    state: CaseState = {
        "transactions": [{}],
        "billing": _billing(49.99),
        "refund": {"status": "issued", "amount": 49.99, "currency": "USD", "reference": "R-1"},
        "account": {"issue": "login", "reset_link_sent": True, "reset_reference": "L-1"},
    }
    text = compose_response(state)
    assert "refunded 49.99 USD" in text and "R-1" in text
    assert "password reset link" in text and "L-1" in text


def test_response_states_a_refused_refund() -> None:
    state: CaseState = {
        "transactions": [{}],
        "billing": _billing(900.0),
        "refund": {"status": "refused", "amount": 900.0, "currency": "USD", "reference": None},
        "account": {"issue": None, "reset_link_sent": False, "reset_reference": None},
    }
    text = compose_response(state)
    assert "unable to approve a refund" in text
    assert "reset link" not in text
    # A decided review stands for later runs (README): a reply would change nothing, so
    # the answer must not ask for one as if it could.
    assert "reply" not in text
