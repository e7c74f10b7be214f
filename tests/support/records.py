"""Thread ids and workflow records for tests of any suite."""

from __future__ import annotations

import uuid

from state.ports import WorkflowRecord
from state.schema import CURRENT


def unique_thread(prefix: str = "t") -> str:
    """A thread id no other test (or earlier run against the same servers) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def workflow_record(thread_id: str, version: int = 1, **sections: object) -> WorkflowRecord:
    """A record as a cold store would return it (current schema, fixed times, no fence)."""
    return WorkflowRecord(
        thread_id=thread_id,
        version=version,
        sections=dict(sections),
        schema_version=CURRENT["workflow"],
        created_at="2025-01-01T00:00:00+00:00",
        updated_at="2025-01-01T00:00:00+00:00",
        fence=0,
    )
