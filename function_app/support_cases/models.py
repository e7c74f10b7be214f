"""The HTTP contract of a support case: the API's models, id patterns and page sizes.

The models are pydantic, so malformed input is refused before anything is written.
The graph's typed state is `case_state` (kept apart: it needs LangGraph, which a
client of the contract, the CLI, should not pay for at start).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Case ids are Cosmos item ids and partition keys: no '/', '\\', '?', '#'.
CASE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
CUSTOMER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$"
CHECKPOINT_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
# The Idempotency-Key header (and the body's `client_key`), which the CLI checks too.
IDEMPOTENCY_KEY_MAX_LENGTH = 200
# Page sizes the API serves (and the CLI offers) for a case's history and audit trail.
HISTORY_PAGE_MAX = 100
AUDIT_PAGE_MAX = 500
# A reviewer's verdict: the review route's body, and the graph's review section.
ReviewVerdict = Literal["approve", "reject"]


class CaseStatus(StrEnum):
    ACCEPTED = "accepted"
    RUNNING = "running"
    STALLED = "stalled"
    AWAITING_REVIEW = "awaiting_review"
    COMPLETED = "completed"
    FAILED = "failed"


def merchant_key(merchant: str) -> str:
    """A merchant as billing matches it: neither case nor runs of whitespace tell two apart."""
    return " ".join(merchant.casefold().split())


def amount_cents(amount: float) -> int:
    """An amount as billing matches (and refunds) it: to the cent."""
    return round(amount * 100)


class Transaction(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    id: str = Field(min_length=1, max_length=128)
    merchant: str = Field(min_length=1, max_length=256)
    # Strict: a JSON number only (an integer too); lax, `true` would be a charge of 1.00
    # and "612.40" a number, each able to become a refund's amount.
    amount: float = Field(gt=0, le=1_000_000_000, allow_inf_nan=False, strict=True)
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    timestamp: datetime

    @field_validator("timestamp")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("timestamp needs a time zone (e.g. 2024-05-01T10:00:00Z)")
        return value

    def charge_key(self) -> tuple[str, str, int, datetime]:
        """What billing judges this charge by; an aware datetime compares as an instant."""
        return merchant_key(self.merchant), self.currency, amount_cents(self.amount), self.timestamp


class CaseSubmission(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    customer_id: str = Field(pattern=CUSTOMER_ID_PATTERN)
    text: str = Field(min_length=1, max_length=10_000)
    transactions: list[Transaction] = Field(default_factory=list, max_length=1000)
    case_id: str | None = Field(default=None, pattern=CASE_ID_PATTERN)
    # Alternative to the Idempotency-Key header for clients that cannot set headers.
    client_key: str | None = Field(
        default=None, min_length=1, max_length=IDEMPOTENCY_KEY_MAX_LENGTH
    )

    @field_validator("transactions")
    @classmethod
    def _one_charge_per_id(cls, value: list[Transaction]) -> list[Transaction]:
        # Billing counts an id once (a repeat as billing sees it is one charge), so an id
        # listed with other details would be judged at whichever listing came first.
        seen: dict[str, Transaction] = {}
        for transaction in value:
            first = seen.setdefault(transaction.id, transaction)
            if first.charge_key() != transaction.charge_key():
                raise ValueError(
                    f"transaction {transaction.id!r} is listed more than once with different "
                    "details (merchant, amount, currency or timestamp): which one was meant "
                    "cannot be told"
                )
        return value


class ReviewDecision(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    decision: ReviewVerdict
    # The reviewer is the caller (the token's principal). Optional, and if given it must
    # name the caller (object id or name): a decision cannot be made in someone else's name.
    reviewer_id: str | None = Field(default=None, min_length=1, max_length=128)
    note: str | None = Field(default=None, max_length=2000)

    @field_validator("note")
    @classmethod
    def _storable(cls, value: str | None) -> str | None:
        # The run writes the note after this request is answered, so a note a cold store
        # refuses (Postgres JSON holds no NUL) would fail the case, not the request.
        if value is not None and "\x00" in value:
            raise ValueError("note must not contain NUL characters (U+0000)")
        return value


class EffectView(BaseModel):
    kind: str
    idempotency_key: str
    status: str
    result: dict[str, Any] | None = None


class CaseLinks(BaseModel):
    self: str
    checkpoints: str
    audit: str
    review: str
    resume: str
    messages: str
    events: str
    runs: str


class FollowUpStrategy(StrEnum):
    """What a follow-up message does to a run in progress (LangGraph's double-texting)."""

    REJECT = "reject"  # 409 while a run is in progress
    ENQUEUE = "enqueue"  # runs after the current one, in arrival order
    INTERRUPT = "interrupt"  # the current run stops at its next step; its progress is kept
    ROLLBACK = "rollback"  # the current run stops and its checkpoints are discarded


class FollowUp(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    text: str = Field(min_length=1, max_length=10_000)
    # Unset: CASE_DEFAULT_STRATEGY.
    strategy: FollowUpStrategy | None = None


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    AWAITING_REVIEW = "awaiting_review"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    ROLLED_BACK = "rolled_back"


class RunView(BaseModel):
    run_id: str
    kind: Literal["intake", "message"]
    status: RunStatus
    strategy: FollowUpStrategy | None = None
    text: str | None = None
    queued_at: str
    started_at: str | None = None
    ended_at: str | None = None
    duration_seconds: float | None = None
    # A run stopped by a follow-up: the run that stopped it.
    stopped_by: str | None = None
    # A rolled-back run's side effects: done, kept in the case's effect ledger, and never
    # performed again (a later run that needs the same effect gets this result).
    discarded_effects: list[EffectView] = Field(default_factory=list)
    error: str | None = None


class RunsView(BaseModel):
    case_id: str
    runs: list[RunView]


class MessageAccepted(BaseModel):
    case_id: str
    run: RunView
    links: CaseLinks | None = None


class CallerView(BaseModel):
    id: str
    name: str


class CaseView(BaseModel):
    case_id: str
    status: CaseStatus
    customer_id: str
    submitted_by: CallerView | None = None
    completed_steps: list[str] = Field(default_factory=list)
    billing: dict[str, Any] | None = None
    account: dict[str, Any] | None = None
    policy: dict[str, Any] | None = None
    review: dict[str, Any] | None = None
    refund: dict[str, Any] | None = None
    final_response: str | None = None
    awaiting_review: dict[str, Any] | None = None
    error: str | None = None
    effects: list[EffectView] = Field(default_factory=list)
    heartbeat_at: str | None = None
    # When the runner holding the case (live, or dead if stalled) loses its lease; None
    # when nobody holds one. A resume before then is refused with 409 and Retry-After.
    lease_ends_at: str | None = None
    version: int
    links: CaseLinks | None = None


class CheckpointView(BaseModel):
    checkpoint_id: str
    parent_checkpoint_id: str | None
    step: int | None
    source: str | None
    created_at: str | None
    next: list[str]
    completed_steps: list[str]
    interrupts: list[dict[str, Any]]


class CheckpointPageView(BaseModel):
    case_id: str
    checkpoints: list[CheckpointView]
    next_before: str | None = None


class AuditEntryView(BaseModel):
    version: int
    agent_id: str
    # The authenticated caller the write was made for (None: the system's own work).
    caller: CallerView | None = None
    section: str
    before: Any
    after: Any
    at: str


class AuditTrailView(BaseModel):
    case_id: str
    entries: list[AuditEntryView]


class TierView(BaseModel):
    name: str
    up: bool
    detail: str = ""
    latency_ms: float | None = None


class StuckEntryView(BaseModel):
    """A write-behind entry the cold store refused for good: its thread's later entries
    wait behind it (`agent-state write-behind stuck` / `discard`)."""

    thread_id: str
    entry_id: str
    checkpoint_id: str
    reason: str
    since: float  # epoch seconds


class BacklogView(BaseModel):
    """Write-behind work acknowledged in Redis and not yet in the cold tier."""

    entries: int
    threads: int
    oldest_age_seconds: float | None
    stuck_threads: int = 0
    oldest_stuck: StuckEntryView | None = None


class HealthView(BaseModel):
    status: Literal["ok", "degraded", "down"]
    # Only for callers with Cases.Operate; everyone else sees the status alone.
    tiers: list[TierView] | None = None
    # Write-behind mode only (same audience as `tiers`).
    backlog: BacklogView | None = None
    # Run index shards whose stored record is unreadable: the timer does not resume their
    # cases nor sweep until `agent-state run-index repair` (same audience as `tiers`).
    damaged_index_shards: list[str] | None = None


class ResumeReport(BaseModel):
    resumed: list[str]
    skipped: dict[str, str] = Field(default_factory=dict)
    # Cases whose resume raised something other than a refusal (tier down, bad record).
    failed: dict[str, str] = Field(default_factory=dict)
    # Run index shards (under `failed` too) whose stored record is unreadable: no later
    # tick reads them either, until they are repaired.
    damaged: list[str] = Field(default_factory=list)


class ErrorBody(BaseModel):
    error: str
    detail: Any = None
