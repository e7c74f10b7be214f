"""Intake: records what came in (the first message, then each follow-up) and decides which
agents the message needs: billing and account both for a new case; for a follow-up, billing
when it speaks of money, account when it speaks of access, policy alone when neither."""

from __future__ import annotations

import re
from typing import Any

from state import JSON

from ..case_state import CaseState, Message
from .account import classify_account_request
from .base import StatefulAgent, Step

BILLING_WORDS = re.compile(
    r"\b(charged?|charges|refunds?|invoices?|bills?|billing|payments?|paid|pay|receipts?"
    r"|transactions?|money|price|fees?)\b"
)

AGENTS_AFTER_INTAKE = ["billing_agent", "account_agent", "policy_agent"]


def agents_needed(state: CaseState) -> list[str]:
    """The nodes a message goes to after intake."""
    if "billing" not in state or "account" not in state:
        return ["billing_agent", "account_agent"]  # a new case (or one rolled back to it)
    text = state["text"].casefold()
    needed = [
        node
        for node, needs in (
            ("billing_agent", bool(BILLING_WORDS.search(text))),
            ("account_agent", classify_account_request(text) is not None),
        )
        if needs
    ]
    return needed or ["policy_agent"]


class IntakeAgent(StatefulAgent):
    agent_id = "intake-agent"
    section = "intake"
    step = "intake"
    node = "intake"

    async def decide(self, state: CaseState, step: Step) -> JSON:
        return {
            "customer_id": state["customer_id"],
            "transaction_count": len(state.get("transactions", [])),
            "text_length": len(state["text"]),
        }

    def state_update(self, value: JSON) -> dict[str, Any]:
        return {"error": None}

    def messages(self, state: CaseState, value: JSON) -> list[Message]:
        # The customer's own words: the conversation's first message, or a follow-up.
        return [Message(role="customer", content=state["text"])]
