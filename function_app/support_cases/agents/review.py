"""Human review: the graph stops here until a person approves or rejects the refund."""

from __future__ import annotations

from typing import Any

from langgraph.types import interrupt

from state import JSON

from ..case_state import CaseState, ReviewResult
from .base import StatefulAgent, Step
from .billing import amounts_by_currency


def review_request(state: CaseState) -> dict[str, Any]:
    """What a reviewer is shown (the interrupt payload)."""
    billing = state["billing"]
    policy = state["policy"]
    request = {
        "question": "approve or reject the refund",
        "case_id": state["case_id"],
        "customer_id": state["customer_id"],
        "refund_amount": policy["refund_amount"],
        "currency": billing["currency"],
        "merchant": billing["merchant"],
        "reason": policy["reason"],
        "duplicates": billing["duplicates"],
    }
    if billing["currency"] is None:
        # `refund_amount` adds up several currencies: the reviewer decides on each one's.
        request["amounts"] = amounts_by_currency(billing["duplicates"])
    return request


class HumanReview(StatefulAgent):
    agent_id = "reviewer"
    section = "review"
    step = "human_review"
    node = "human_review"

    async def decide(self, state: CaseState, step: Step) -> JSON:
        # Nothing before interrupt() may have effects: the node restarts from the top on resume.
        answer = interrupt(review_request(state))
        return ReviewResult(
            decision=answer["decision"],
            reviewer_id=answer["reviewer_id"],
            reviewer_name=answer.get("reviewer_name"),
            note=answer.get("note"),
        )

    def author(self, value: JSON) -> str:
        return f"reviewer:{value['reviewer_id']}"

    def note(self, value: JSON) -> str | None:
        reviewer = value.get("reviewer_name") or value["reviewer_id"]
        return f"Reviewer {reviewer} chose to {value['decision']} the refund."
