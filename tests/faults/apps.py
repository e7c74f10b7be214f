"""The support-case app as the fault tests drive it: runtimes, cases, decisions, expectations."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from state.errors import BackendUnavailable
from support_cases.agents import StepHook
from support_cases.demo import demo_case
from support_cases.models import CaseStatus, CaseSubmission, ReviewDecision
from support_cases.runtime import Runtime
from support_cases.service import CaseConflict, CaseError
from support_cases.settings import AppSettings

from .conftest import Deadline

# Sections the graph writes for the demo case when the refund is auto-approved,
# and the fields of each that must come out the same however often a step re-ran.
AUTO_APPROVED_SECTIONS = ("intake", "billing", "account", "policy", "refund", "response")
EFFECT_KEYS = ("refund", "reset_link")


def submission(case_id: str, *, amount: float | None = None) -> CaseSubmission:
    """The demo case; with `amount`, its duplicate charge is that large (over 500: review)."""
    body = demo_case(case_id)
    if amount is not None:
        for charge in body["transactions"][:2]:
            charge["amount"] = amount
    return CaseSubmission.model_validate(body)


@dataclass(frozen=True)
class Decided:
    decision: str
    accepted: bool
    conflict: bool
    status: CaseStatus | None = None


@dataclass
class App:
    runtime: Runtime

    async def decide(self, case_id: str, decision: str, reviewer: str) -> Decided:
        verdict = ReviewDecision.model_validate({"decision": decision, "reviewer_id": reviewer})
        try:
            outcome = await self.runtime.service.decide(case_id, verdict)
        except CaseConflict:
            return Decided(decision, accepted=False, conflict=True)
        return Decided(decision, accepted=True, conflict=False, status=outcome.view.status)


@asynccontextmanager
async def open_runtime(
    settings: AppSettings, after_step: StepHook | None = None
) -> AsyncIterator[App]:
    runtime = await Runtime.open(settings, after_step=after_step)
    try:
        yield App(runtime)
    finally:
        await runtime.close()


async def review_case(app: App, case_id: str) -> None:
    """Submit a case whose refund needs a human, and wait until it waits for one."""
    outcome = await app.runtime.service.submit(submission(case_id, amount=750.0), None)
    await app.runtime.service.wait_idle()
    status = (await app.runtime.service.status(case_id)).status
    assert outcome.created and status is CaseStatus.AWAITING_REVIEW, status


def normalized(sections: dict[str, Any], case_id: str) -> dict[str, Any]:
    """Sections without what legitimately differs between two runs of the same case.

    Provider references (refund, reset link) are minted per call and the case id
    differs between cases; both are replaced by placeholders wherever they appear.
    """
    text = json.dumps({name: sections[name] for name in AUTO_APPROVED_SECTIONS if name in sections})
    for name, entry in sections.items():
        if name.startswith("effect_") and isinstance(entry, dict) and entry.get("result"):
            text = text.replace(str(entry["result"]["reference"]), "<reference>")
    return dict(json.loads(text.replace(case_id, "<case>")))


async def submit_until_accepted(app: App, case_id: str, deadline: Deadline) -> int:
    """Submit like a client that retries on errors (safe: the case id makes it idempotent).

    Returns how many attempts failed with a typed `BackendUnavailable`.
    """
    failures = 0
    while True:
        deadline.check(f"submitting {case_id}")
        try:
            await app.runtime.service.submit(submission(case_id), None)
            return failures
        except BackendUnavailable:
            failures += 1
            await asyncio.sleep(0.2)


async def settle(app: App, case_ids: list[str], deadline: Deadline) -> dict[str, CaseStatus]:
    """Resume stalled or failed runs (what the timer and an operator do) until all complete."""
    service = app.runtime.service
    while True:
        await service.wait_idle()
        statuses: dict[str, CaseStatus] = {}
        for case_id in case_ids:
            try:
                statuses[case_id] = (await service.status(case_id)).status
            except BackendUnavailable:
                statuses[case_id] = CaseStatus.STALLED
        pending = [c for c, status in statuses.items() if status is not CaseStatus.COMPLETED]
        if not pending or deadline.expired():
            return statuses
        for case_id in pending:
            if statuses[case_id] in (CaseStatus.STALLED, CaseStatus.FAILED):
                with contextlib.suppress(CaseError, BackendUnavailable):
                    await service.resume(case_id, wait_until_rest=True)
        await asyncio.sleep(0.3)
