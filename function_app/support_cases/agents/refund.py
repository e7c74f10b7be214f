"""Refund: issues the approved refund once, or records why none goes out."""

from __future__ import annotations

from typing import Any

from state import JSON

from ..case_state import BillingResult, CaseState, RefundResult, RefundStatus
from .base import StatefulAgent, Step
from .billing import amounts_by_currency


def refund_approved(state: CaseState) -> bool | None:
    """True / False once decided; None when there is nothing to refund."""
    decision = state["policy"]["decision"]
    if decision == "no_refund":
        return None
    if decision == "auto_approved":
        return True
    return state["review"]["decision"] == "approve"


def _refund(status: RefundStatus, request: dict[str, Any], reference: str | None) -> RefundResult:
    result = RefundResult(
        status=status,
        amount=request["amount"],
        currency=request["currency"],
        reference=reference,
    )
    if "amounts" in request:
        result["amounts"] = request["amounts"]
    return result


def _request(state: CaseState, billing: BillingResult) -> dict[str, Any]:
    request: dict[str, Any] = {
        "customer_id": state["customer_id"],
        "amount": state["policy"]["refund_amount"],
        "currency": billing["currency"],
        "transactions": [charge["transaction_id"] for charge in billing["duplicates"]],
    }
    if billing["currency"] is None:
        # Several currencies: the policy's sum adds up yen and dollars, so each currency's
        # amount is what goes out.
        request["amounts"] = amounts_by_currency(billing["duplicates"])
    return request


class RefundAgent(StatefulAgent):
    agent_id = "refund-agent"
    section = "refund"
    step = "refund"
    node = "refund_agent"

    async def decide(self, state: CaseState, step: Step) -> JSON:
        approved = refund_approved(state)
        if not approved:
            # A run rolled back after issuing it (or that died issuing it) leaves the
            # refund issued: money moved, whatever this run decides, and the case says so.
            performed = await self.deps.effects.performed(
                state["case_id"], "refund", agent_id=self.agent_id, done_with=step.effects_done
            )
            if performed is not None:
                request, result = performed
                return _refund("issued", request, result["reference"])
        if approved is None:
            return RefundResult(status="not_applicable", amount=0.0, currency=None, reference=None)
        request = _request(state, state["billing"])
        if not approved:
            return _refund("refused", request, None)
        issued = await self.deps.effects.once(
            state["case_id"],
            "refund",
            request,
            agent_id=self.agent_id,
            fencing_token=step.fencing_token,
            done_with=step.effects_done,
        )
        return _refund("issued", request, issued["reference"])

    def note(self, value: JSON) -> str | None:
        return f"Refund {value['status']}" + (
            f" ({value['reference']})." if value["reference"] else "."
        )
