"""The graph's typed state of a support case.

Graph sections are TypedDicts of plain JSON, because each one is also stored
verbatim as a section of the case's workflow record.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Annotated, Any, Literal, NotRequired, TypedDict

from langgraph.channels.delta import DeltaChannel

from .models import ReviewVerdict

CONVERSATION_SNAPSHOT_EVERY = 50


class Charge(TypedDict):
    transaction_id: str
    merchant: str
    amount: float
    currency: str
    timestamp: str


class BillingResult(TypedDict):
    duplicate_found: bool
    duplicates: list[Charge]  # the extra charges (each one after the first of its group)
    refund_amount: float
    currency: str | None
    merchant: str | None


AccountIssue = Literal["login", "password", "locked"]


class AccountResult(TypedDict):
    issue: AccountIssue | None
    reset_link_sent: bool
    reset_reference: str | None


PolicyDecision = Literal["auto_approved", "needs_review", "no_refund"]


class PolicyResult(TypedDict):
    decision: PolicyDecision
    refund_amount: float
    threshold: float
    reason: str


class ReviewResult(TypedDict):
    decision: ReviewVerdict
    reviewer_id: str  # the deciding caller's object id (from the token, never the body)
    reviewer_name: str | None
    note: str | None


RefundStatus = Literal["issued", "refused", "not_applicable"]


class RefundResult(TypedDict):
    status: RefundStatus
    amount: float
    currency: str | None
    reference: str | None
    # Duplicates in several currencies (`currency` None): the amount in each one, which is
    # what is refunded (`amount` is only the policy's figure).
    amounts: NotRequired[dict[str, float]]


class Message(TypedDict):
    role: str
    content: str


def append_messages(conversation: list[Message], batches: Sequence[list[Message]]) -> list[Message]:
    """The conversation's reducer: each batch of new messages appended, in order (the same
    result however LangGraph groups the batches when it replays them)."""
    return [*conversation, *(message for batch in batches for message in batch)]


class CaseState(TypedDict, total=False):
    case_id: str
    customer_id: str
    # The customer's latest message: the first one, then each follow-up's.
    text: str
    transactions: list[dict[str, Any]]
    # The conversation (customer messages and agent replies) grows with every step: a
    # DeltaChannel stores each step's new messages, with a whole copy every 50 updates,
    # instead of the whole list at every checkpoint.
    messages: Annotated[
        list[Message], DeltaChannel(append_messages, snapshot_frequency=CONVERSATION_SNAPSHOT_EVERY)
    ]
    # Each node appends its own name once; a re-run step's writes replace, never repeat.
    completed_steps: Annotated[list[str], operator.add]
    billing: BillingResult
    account: AccountResult
    policy: PolicyResult
    review: ReviewResult
    refund: RefundResult
    final_response: str
    error: str | None
