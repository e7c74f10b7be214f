"""Account: recognises login / password / locked-account requests and sends a reset link once."""

from __future__ import annotations

import re

from state import JSON

from ..case_state import AccountIssue, AccountResult, CaseState
from .base import StatefulAgent, Step

# A trouble or an error denied: "no problems logging in", "I don't get any errors".
_NOT_DENIED = r"(?<!\bno )(?<!without )(?<!\bany )"
# What a customer says when they cannot get in. A mere mention of logging in ("I log into
# the app every morning") or of a password is no access problem: a reset link is a side
# effect, sent only when the customer is kept out.
_CANNOT = (
    r"(?:can ?not|can'?t|could ?n'?t|could not|unable to|not able to|impossible to"
    r"|fail(?:s|ed|ing)? to|wo ?n'?t let me|does ?n'?t let me|did ?n'?t let me"
    # "I haven't been able to log in since Monday", "I can no longer log in".
    r"|ha(?:ve|s|d) ?(?:n'?t|not|never) been able to|(?:no longer|never) able to"
    r"|can (?:no longer|never)"
    # "No problems logging in", "I don't have any issues logging in" are none.
    rf"|{_NOT_DENIED}(?:trouble|problems?|issues?|difficult(?:y|ies)))"
)
_GET_IN = (
    r"(?:log(?:ging)?(?: back)?[ -]?(?:in|on)(?:to)?|logon"
    r"|sign(?:ing)?(?: back)?[ -]?(?:in|on)(?:to)?|(?:access|get into|get in to) (?:my |the )?account)"
)
_LOGIN_NOUN = r"(?:log[ -]?in|logon|sign[ -]?in)"
_FAILS = (
    r"(?:fail(?:s|ed|ing)?|keeps failing|does ?n'?t work|does not work|did ?n'?t work"
    r"|is ?n'?t working"
    rf"|not working|wo ?n'?t work|stopped working|broken|{_NOT_DENIED}errors?|rejected)"
)
_PASSWORD = r"(?:password|passcode|passphrase)"
# A second factor's code that does not come (or is refused) keeps the customer out too.
_CODE = (
    r"(?:2fa|two[- ]factor(?: authentication)?|mfa|multi[- ]factor|verification|security"
    r"|one[- ]time|otp|authenticator|login|sign[- ]in) (?:codes?|texts?|sms|emails?|app)"
)
_NOT_COMING = (
    r"(?:not|never|no longer|does ?n'?t|did ?n'?t|do ?n'?t|is ?n'?t|has ?n'?t|have ?n'?t"
    r"|wo ?n'?t)(?: \S+){0,2}? (?:arriv\w*|receiv\w*|come|came|get|got|work\w*|sent|accept\w*)"
)

# Most specific first: a locked account needs more than a forgotten password. Each pattern
# is matched within one sentence, so words of different sentences do not combine.
_ISSUE_PATTERNS: tuple[tuple[AccountIssue, re.Pattern[str]], ...] = (
    (
        "locked",
        re.compile(
            r"\b(locked|lock(?:ed)? out|suspended|blocked|disabled)\b.*\baccount\b"
            r"|\baccount\b.*\b(locked|lock(?:ed)? out|suspended|blocked|disabled)\b"
            r"|\blocked out\b"
        ),
    ),
    (
        "password",
        re.compile(
            rf"\b(?:forg[eo]t\w*|lost|reset\w*|recover\w*|wrong|incorrect|invalid|expired"
            rf"|change|(?:can ?not|can'?t|do ?n'?t) remember)(?: \S+){{0,2}}? {_PASSWORD}\b"
            rf"|\b{_PASSWORD} (?:\S+ ){{0,2}}?(?:reset|forgotten|expired|wrong|incorrect"
            rf"|invalid|rejected|not accepted|{_FAILS})\b"
        ),
    ),
    (
        "login",
        re.compile(
            # "log in", "login", "log-in" and "log into" alike, after a "cannot" of any kind.
            rf"\b{_CANNOT}(?: \S+){{0,2}}? {_GET_IN}\b"
            rf"|\b{_LOGIN_NOUN}(?: \S+)?? {_FAILS}\b"
            # "Login page keeps saying error".
            rf"|\b{_LOGIN_NOUN} (?:page|screen|form|button|attempts?)(?: \S+){{0,2}}? {_FAILS}\b"
            # "I keep getting an error when I try to log in".
            rf"|\b{_NOT_DENIED}errors?(?: \S+){{0,4}}? {_GET_IN}\b"
            rf"|\btr(?:y|ies|ied|ying) to {_GET_IN} but (?:\S+ ){{0,2}}?{_FAILS}\b"
            rf"|\b{_CODE}\b(?: \S+){{0,3}}? {_NOT_COMING}\b"
            rf"|\b{_NOT_COMING}(?: \S+){{0,3}}? {_CODE}\b"
            # "The reset link did not arrive": the customer is still kept out.
            rf"|\breset (?:link|email|mail)s?(?: \S+){{0,2}}? {_NOT_COMING}\b"
        ),
    ),
)


# Apostrophes other than the ASCII one, as phones type them and documents paste them.
_APOSTROPHES = str.maketrans(dict.fromkeys("\u2018\u2019\u02bc\u00b4\u2032`", "'"))


def classify_account_request(text: str) -> AccountIssue | None:
    normalized = " ".join(text.casefold().translate(_APOSTROPHES).split())
    # Sentences end at a stop and a space, not at the point of an amount ("49.99").
    sentences = re.split(r"[.!?;]+(?:\s|$)", normalized)
    for issue, pattern in _ISSUE_PATTERNS:
        if any(pattern.search(sentence) for sentence in sentences):
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
