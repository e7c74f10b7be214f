"""Intake: records what came in and opens the message log; billing and account fan out from here."""

from __future__ import annotations

from typing import Any

from state import JSON

from ..models import CaseState, Message
from .base import StatefulAgent


class IntakeAgent(StatefulAgent):
    agent_id = "intake-agent"
    section = "intake"
    step = "intake"
    node = "intake"

    async def decide(self, state: CaseState, fencing_token: int | None) -> JSON:
        return {
            "customer_id": state["customer_id"],
            "transaction_count": len(state.get("transactions", [])),
            "text_length": len(state["text"]),
        }

    def state_update(self, value: JSON) -> dict[str, Any]:
        return {"error": None}

    def messages(self, state: CaseState, value: JSON) -> list[Message]:
        # The customer's own words open the conversation.
        return [Message(role="customer", content=state["text"])]
