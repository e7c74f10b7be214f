"""Account: recognises login / password / locked-account requests and sends a reset link once."""

from __future__ import annotations

import re

from state import JSON

from ..case_state import AccountIssue, AccountResult, CaseState
from .base import StatefulAgent, Step

# Most specific first: a locked account needs more than a forgotten password.
_ISSUE_PATTERNS: tuple[tuple[AccountIssue, re.Pattern[str]], ...] = (
    (
        "locked",
        re.compile(
            r"\b(locked|lock(?:ed)? out|suspended|blocked|disabled)\b.*\baccount\b"
            r"|\baccount\b.*\b(locked|lock(?:ed)? out|suspended|blocked|disabled)\b"
            r"|\blocked out\b"
        ),
    ),
    ("password", re.compile(r"\b(password|passcode|passphrase)\b")),
    (
        "login",
        re.compile(
            # "log in", "login", "log-in" and "log into" alike.
            r"\b(log[ -]?in(?:to)?|logon|sign[ -]?in(?:to)?)\b"
            r"|\b(can ?not|can't|cannot|unable to) (access|get into) (my )?account\b"
        ),
    ),
)


def classify_account_request(text: str) -> AccountIssue | None:
    normalized = " ".join(text.casefold().replace("\u2019", "'").split())
    for issue, pattern in _ISSUE_PATTERNS:
        if pattern.search(normalized):
            return issue
    return None


class AccountAgent(StatefulAgent):
    agent_id = "account-agent"
    section = "account"
    step = "account"
    node = "account_agent"

    async def decide(self, state: CaseState, step: Step) -> JSON:
        issue = classify_account_request(state["text"])
        if issue is None:
            # A rolled-back run may have sent one (its message gone with it): the link went
            # out all the same, and the case says so, as for a refund.
            performed = await self.deps.effects.performed(
                state["case_id"], "reset_link", agent_id=self.agent_id, done_with=step.effects_done
            )
            if performed is not None:
                request, result = performed
                return AccountResult(
                    issue=request["issue"],
                    reset_link_sent=True,
                    reset_reference=result["reference"],
                )
            return AccountResult(issue=None, reset_link_sent=False, reset_reference=None)
        sent = await self.deps.effects.once(
            state["case_id"],
            "reset_link",
            {"customer_id": state["customer_id"], "issue": issue},
            agent_id=self.agent_id,
            fencing_token=step.fencing_token,
            done_with=step.effects_done,
        )
        return AccountResult(issue=issue, reset_link_sent=True, reset_reference=sent["reference"])

    def note(self, value: JSON) -> str | None:
        if value["issue"] is None:
            return "No account access problem mentioned."
        return f"Account issue '{value['issue']}': reset link sent ({value['reset_reference']})."
