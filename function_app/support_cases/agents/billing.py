"""Billing: finds duplicate charges in the transactions sent with the case.

A duplicate is a later charge at the same merchant, in the same currency, for
the same amount to the cent, within the configured window of the first such
charge. The same transaction id listed twice is one charge, not a duplicate.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from state import JSON

from ..case_state import BillingResult, CaseState, Charge
from ..models import amount_cents, merchant_key
from .base import StatefulAgent, Step


def _charge(transaction: Mapping[str, Any]) -> Charge:
    timestamp = transaction["timestamp"]
    if isinstance(timestamp, datetime):
        timestamp = timestamp.isoformat()
    return Charge(
        transaction_id=str(transaction["id"]),
        merchant=str(transaction["merchant"]),
        amount=amount_cents(float(transaction["amount"])) / 100,
        currency=str(transaction.get("currency", "USD")),
        timestamp=str(timestamp),
    )


def find_duplicate_charges(
    transactions: Iterable[Mapping[str, Any]], window: timedelta
) -> list[Charge]:
    """The extra charges: each repeat of an earlier charge within `window` of it."""
    unique: dict[str, Charge] = {}
    for transaction in transactions:
        charge = _charge(transaction)
        unique.setdefault(charge["transaction_id"], charge)
    groups: dict[tuple[str, str, int], list[Charge]] = defaultdict(list)
    for charge in unique.values():
        cents = amount_cents(charge["amount"])
        if cents == 0:
            continue  # less than half a cent: nothing a refund could return
        groups[(merchant_key(charge["merchant"]), charge["currency"], cents)].append(charge)
    duplicates: list[Charge] = []
    for group in groups.values():
        group.sort(key=lambda charge: datetime.fromisoformat(charge["timestamp"]))
        original: Charge | None = None
        for charge in group:
            at = datetime.fromisoformat(charge["timestamp"])
            if (
                original is not None
                and at - datetime.fromisoformat(original["timestamp"]) <= window
            ):
                duplicates.append(charge)
            else:
                original = charge
    duplicates.sort(key=lambda charge: (charge["timestamp"], charge["transaction_id"]))
    return duplicates


def amounts_by_currency(charges: list[Charge]) -> dict[str, float]:
    """Each currency's total: amounts in different currencies are refunded apart, never added."""
    cents: dict[str, int] = defaultdict(int)
    for charge in charges:
        cents[charge["currency"]] += amount_cents(charge["amount"])
    return {currency: cents[currency] / 100 for currency in sorted(cents)}


def summarize_duplicates(duplicates: list[Charge]) -> BillingResult:
    currencies = {charge["currency"] for charge in duplicates}
    merchants = sorted({charge["merchant"] for charge in duplicates})
    return BillingResult(
        duplicate_found=bool(duplicates),
        duplicates=duplicates,
        refund_amount=sum(amount_cents(charge["amount"]) for charge in duplicates) / 100,
        # Amounts in several currencies cannot be added up: policy sends those to a person.
        currency=currencies.pop() if len(currencies) == 1 else None,
        merchant=", ".join(merchants) if merchants else None,
    )


class BillingAgent(StatefulAgent):
    agent_id = "billing-agent"
    section = "billing"
    step = "billing"
    node = "billing_agent"

    async def decide(self, state: CaseState, step: Step) -> JSON:
        window = timedelta(seconds=self.deps.settings.case_duplicate_window_seconds)
        return summarize_duplicates(find_duplicate_charges(state.get("transactions", []), window))

    def note(self, value: JSON) -> str | None:
        if not value["duplicate_found"]:
            return "No duplicate charge found."
        if value["currency"] is None:
            # `refund_amount` adds up several currencies, a figure in none: each one's instead.
            amounts = amounts_by_currency(value["duplicates"])
            money = " + ".join(f"{amount:.2f} {currency}" for currency, amount in amounts.items())
        else:
            money = f"{value['refund_amount']:.2f} {value['currency']}"
        return f"{len(value['duplicates'])} duplicate charge(s) at {value['merchant']}, {money}."
