"""Refund: issues the approved refund once, or records why none goes out."""

from __future__ import annotations

from state import JSON

from ..models import CaseState, RefundResult
from .base import StatefulAgent, Step


def refund_approved(state: CaseState) -> bool | None:
    """True / False once decided; None when there is nothing to refund."""
    decision = state["policy"]["decision"]
    if decision == "no_refund":
        return None
    if decision == "auto_approved":
        return True
    return state["review"]["decision"] == "approve"


class RefundAgent(StatefulAgent):
    agent_id = "refund-agent"
    section = "refund"
    step = "refund"
    node = "refund_agent"

    async def decide(self, state: CaseState, step: Step) -> JSON:
        billing = state["billing"]
        approved = refund_approved(state)
        amount = state["policy"]["refund_amount"]
        if approved is None:
            return RefundResult(status="not_applicable", amount=0.0, currency=None, reference=None)
        if not approved:
            # A run rolled back after issuing it leaves the refund issued: money moved,
            # whatever the new run decides, and the case must say so.
            issued = await self.deps.effects.done(state["case_id"], "refund")
            return RefundResult(
                status="refused" if issued is None else "issued",
                amount=amount,
                currency=billing["currency"],
                reference=None if issued is None else issued["reference"],
            )
        issued = await self.deps.effects.once(
            state["case_id"],
            "refund",
            {
                "customer_id": state["customer_id"],
                "amount": amount,
                "currency": billing["currency"],
                "transactions": [charge["transaction_id"] for charge in billing["duplicates"]],
            },
            agent_id=self.agent_id,
            fencing_token=step.fencing_token,
            done_with=step.effects_done,
        )
        return RefundResult(
            status="issued",
            amount=amount,
            currency=billing["currency"],
            reference=issued["reference"],
        )

    def note(self, value: JSON) -> str | None:
        return f"Refund {value['status']}" + (
            f" ({value['reference']})." if value["reference"] else "."
        )
