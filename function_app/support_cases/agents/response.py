"""Response: the customer-facing answer, composed from what the other agents decided."""

from __future__ import annotations

from typing import Any

from state import JSON

from ..case_state import CaseState, Message, RefundResult
from .base import StatefulAgent, Step


def _money(amount: float, currency: str | None) -> str:
    return f"{amount:.2f} {currency}" if currency else f"{amount:.2f}"


def _refund_money(refund: RefundResult) -> str:
    # A refund in several currencies is told in each one, not as their sum.
    amounts = refund.get("amounts")
    if amounts:
        return " and ".join(_money(amount, currency) for currency, amount in amounts.items())
    return _money(refund["amount"], refund["currency"])


def compose_response(state: CaseState) -> str:
    billing = state["billing"]
    refund = state["refund"]
    account = state["account"]
    parts = ["Thank you for contacting us."]
    asked = [m["content"] for m in state.get("messages", []) if m["role"] == "customer"]
    if len(asked) > 1:
        # A follow-up: answered together with everything the customer wrote before.
        parts = [
            f'Thank you for your follow-up ("{asked[-1]}"); here is where your whole case '
            f"stands ({len(asked)} messages from you)."
        ]
    if refund["status"] == "issued":
        parts.append(
            f"We found a duplicate charge at {billing['merchant']} and have refunded "
            f"{_refund_money(refund)} (refund reference {refund['reference']})."
        )
    elif refund["status"] == "refused":
        parts.append(
            f"We reviewed the duplicate charge at {billing['merchant']} of "
            f"{_refund_money(refund)} and are unable to approve a refund for it."
        )
    elif billing["duplicate_found"] is False and state.get("transactions"):
        parts.append("We did not find a duplicate charge among the transactions you sent.")
    if account["reset_link_sent"]:
        problem = {
            "login": "you cannot log in",
            "password": "of your password",
            "locked": "your account is locked",
        }[account["issue"] or "login"]
        parts.append(
            f"Because {problem}, we have sent a password reset link to the email address on "
            f"your account (reference {account['reset_reference']})."
        )
    return " ".join(parts)


class ResponseAgent(StatefulAgent):
    agent_id = "response-agent"
    section = "response"
    step = "response"
    node = "response_agent"

    async def decide(self, state: CaseState, step: Step) -> JSON:
        return {"text": compose_response(state)}

    def state_update(self, value: JSON) -> dict[str, Any]:
        return {"final_response": value["text"]}

    def messages(self, state: CaseState, value: JSON) -> list[Message]:
        return [Message(role="agent", content=value["text"])]
