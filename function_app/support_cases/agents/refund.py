"""Refund: issues the approved refund once, or records why none goes out."""

from __future__ import annotations

from state import JSON

from ..case_state import CaseState, RefundResult
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
        if not approved:
            # A run rolled back after issuing it (or that died issuing it) leaves the
            # refund issued: money moved, whatever this run decides, and the case says so.
            performed = await self.deps.effects.performed(
                state["case_id"], "refund", agent_id=self.agent_id, done_with=step.effects_done
            )
            if performed is not None:
                request, result = performed
                return RefundResult(
                    status="issued",
                    amount=request["amount"],
                    currency=request["currency"],
                    reference=result["reference"],
                )
        if approved is None:
            return RefundResult(status="not_applicable", amount=0.0, currency=None, reference=None)
        if not approved:
            return RefundResult(
                status="refused", amount=amount, currency=billing["currency"], reference=None
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
