"""A reviewer cannot decide in someone else's name: the token's principal is the reviewer.

Over HTTP, on both cold backends, with tokens from the test stack's issuer: a
caller holding Cases.Review ("mallory") sends decisions whose body names another
reviewer (by name, by object id, by a made-up id). Each must be refused (403)
without touching the case; the decision mallory then sends without naming
anyone is recorded under mallory's object id and name, in the review section and
on the audit entries of everything the resumed run wrote.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx

from devstack.issuer import object_id_for
from state.settings import Settings
from support_cases.api import create_app
from support_cases.auth import ROLE_REVIEW, ROLE_SUBMIT

from .apps import open_runtime, submission
from .conftest import Recorder

BACKENDS = ("cosmos", "postgres")
IMPERSONATIONS = (
    "alice",  # another reviewer's name
    object_id_for("alice"),  # another reviewer's object id
    "00000000-0000-0000-0000-000000000000",  # an id nobody has
)


async def test_review_decision_naming_someone_else(
    settings_for: Callable[..., Settings],
    issue_token: Callable[..., str],
    reliability: Recorder,
) -> None:
    mallory = {"Authorization": f"Bearer {issue_token('mallory', [ROLE_REVIEW])}"}
    owner = {"Authorization": f"Bearer {issue_token('identity-owner', [ROLE_SUBMIT])}"}
    mallory_id = object_id_for("mallory")
    runs = refused = changed = misattributed = 0
    for backend in BACKENDS:
        async with open_runtime(settings_for(backend)) as app:
            transport = httpx.ASGITransport(app=create_app(app.runtime))
            async with httpx.AsyncClient(transport=transport, base_url="http://f.test") as http:
                case_id = f"case-identity-{backend}-{uuid.uuid4().hex[:10]}"
                body = submission(case_id, amount=750.0).model_dump(mode="json")
                created = await http.post("/api/cases", json=body, headers=owner)
                assert created.json()["status"] == "awaiting_review", created.text
                before = await app.runtime.store.get(case_id)
                assert before is not None

                for someone in IMPERSONATIONS:
                    runs += 1
                    answer = await http.post(
                        f"/api/cases/{case_id}/review",
                        json={"decision": "approve", "reviewer_id": someone},
                        headers=mallory,
                    )
                    refused += answer.status_code == 403
                    after = await app.runtime.store.get(case_id)
                    assert after is not None
                    changed += after.version != before.version

                runs += 1
                decided = await http.post(
                    f"/api/cases/{case_id}/review", json={"decision": "reject"}, headers=mallory
                )
                assert decided.status_code == 200, decided.text
                review = decided.json()["review"]
                misattributed += (review["reviewer_id"], review["reviewer_name"]) != (
                    mallory_id,
                    "mallory",
                )
                trail = await app.runtime.store.audit_trail(case_id, limit=100)
                after_review = [e for e in trail if e.version > before.version]
                assert after_review, "the decision wrote nothing"
                misattributed += sum(
                    1
                    for e in after_review
                    if e.caller is None or e.caller.id != mallory_id or e.caller.name != "mallory"
                )
                await app.runtime.service.wait_idle()

    impersonations = runs - len(BACKENDS)
    reliability.record(
        "Review decision naming someone else than the token's caller",
        injected=f"over HTTP on {' and '.join(BACKENDS)}: a Cases.Review token for 'mallory' "
        "with reviewer_id naming another reviewer (name, object id, unknown id), then a "
        "decision naming no one",
        runs=runs,
        lost_writes=0,
        silent_overwrites=changed,
        observed=f"{refused}/{impersonations} impersonations refused with 403, "
        f"{changed} changed the case; the plain decision recorded under mallory's object id "
        f"and name ({misattributed} review or audit entries attributed to anyone else)",
    )
    assert refused == impersonations
    assert changed == 0
    assert misattributed == 0
