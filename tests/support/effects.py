"""What the simulated provider did for a case's side effects, for tests of any suite."""

from __future__ import annotations

from typing import Any

from support_cases.effects import effect_key
from support_cases.runtime import Runtime


async def provider_calls(runtime: Runtime, case_id: str, kind: str) -> list[dict[str, Any]]:
    """Every call the provider honoured for the case's effect of `kind` (its key carries the
    case's incarnation, read from the case record)."""
    record = await runtime.store.get_fresh(case_id)
    assert record is not None, f"case {case_id!r} is gone"
    return await runtime.provider.performed(effect_key(record, kind))
