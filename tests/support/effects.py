"""What the simulated provider did for a case's side effects, for tests of any suite."""

from __future__ import annotations

from typing import Any

import httpx

from support_cases.effects import effect_key
from support_cases.runs import RUN_SECTION
from support_cases.runtime import Runtime
from support_cases.service import run_lock_name


async def provider_calls(runtime: Runtime, case_id: str, kind: str) -> list[dict[str, Any]]:
    """Every call the provider honoured for the case's effect of `kind` (its key carries the
    case's incarnation, read from the case record)."""
    record = await runtime.store.get_fresh(case_id)
    assert record is not None, f"case {case_id!r} is gone"
    return await runtime.provider.performed(effect_key(record, kind))


async def run_once_outcome(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str
) -> tuple[str, int, int, int, float | None]:
    """The case's status, its run's attempt (2 once resumed after going stale), the
    provider's refund and reset-link calls, and what is left of its run lock: a demo case
    run once by its first attempt, its lock let go, gives ("completed", 1, 1, 1, None)."""
    status = (await client.get(f"/api/cases/{case_id}")).json()["status"]
    record = await runtime.store.get_fresh(case_id)
    assert record is not None, f"case {case_id!r} is gone"
    return (
        status,
        record.sections[RUN_SECTION]["attempt"],
        len(await provider_calls(runtime, case_id, "refund")),
        len(await provider_calls(runtime, case_id, "reset_link")),
        await runtime.store.lock_expires_in(run_lock_name(case_id)),
    )
