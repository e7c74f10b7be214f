"""Policy: which refunds go out automatically and which wait for a person."""

from __future__ import annotations

from state import JSON

from ..case_state import BillingResult, CaseState, PolicyResult
from .base import StatefulAgent, Step


def apply_policy(billing: BillingResult, threshold: float) -> PolicyResult:
    amount = billing["refund_amount"]
    if not billing["duplicate_found"]:
        return PolicyResult(
            decision="no_refund",
            refund_amount=0.0,
            threshold=threshold,
            reason="no duplicate charge",
        )
    if billing["currency"] is None:
        return PolicyResult(
            decision="needs_review",
            refund_amount=amount,
            threshold=threshold,
            reason="duplicate charges in several currencies",
        )
    if amount > threshold:
        return PolicyResult(
            decision="needs_review",
            refund_amount=amount,
            threshold=threshold,
            reason=f"refund of {amount:.2f} exceeds the automatic approval limit of {threshold:.2f}",
        )
    return PolicyResult(
        decision="auto_approved",
        refund_amount=amount,
        threshold=threshold,
        reason=f"refund of {amount:.2f} is within the automatic approval limit of {threshold:.2f}",
    )


class PolicyAgent(StatefulAgent):
    agent_id = "policy-agent"
    section = "policy"
    step = "policy"
    node = "policy_agent"

    async def decide(self, state: CaseState, step: Step) -> JSON:
        return apply_policy(state["billing"], self.deps.settings.case_review_threshold)

    def note(self, value: JSON) -> str | None:
        return f"Policy: {value['decision']} ({value['reason']})."
