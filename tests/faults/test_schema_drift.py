"""State written under schema version N resumes under code at version N+1.

Stored fixtures of the version-1 format (tests/faults/fixtures/) are written by
today's code (version N of each kind: 1 for records, 2 for checkpoints); then the
code moves to N+1 (CURRENT bumped, an N -> N+1 upcaster registered, both under
monkeypatch) and must read them in the new shape through every tier. A support case
interrupted for review under N is resumed and completed under N+1. Finally, code
still at N meets what N+1 wrote and must refuse it with a clear error.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from state import schema
from state.errors import UnsupportedSchemaVersion
from state.factory import backends_for
from state.ports import StoredBlob, StoredCheckpoint
from state.settings import Settings
from state.tiered import TieredStateStore

from .apps import open_runtime, review_case
from .conftest import Recorder

FIXTURES = Path(__file__).with_name("fixtures")


def fixture(name: str) -> dict[str, Any]:
    return dict(json.loads((FIXTURES / name).read_text()))


@dataclass
class Upcasts:
    calls: dict[str, int] = field(default_factory=dict)


def workflow_to_next(document: dict[str, Any]) -> dict[str, Any]:
    sections = dict(document["sections"])
    if isinstance(sections.get("customer"), str):
        sections["customer"] = {"id": sections["customer"]}
    return {**document, "sections": sections}


def checkpoint_to_next(document: dict[str, Any]) -> dict[str, Any]:
    metadata = document.get("metadata")
    if isinstance(metadata, str):  # a backend may hand metadata over still encoded
        metadata = json.loads(metadata)
    return {**document, "metadata": {**(metadata or {}), "schema_note": "from v1"}}


@pytest.fixture
def move_to_next(monkeypatch: pytest.MonkeyPatch) -> Callable[[], Upcasts]:
    """Turn this process into the next version's code: bumped CURRENT plus counting
    upcasters from today's version."""
    upcasts = Upcasts()

    def counted(kind: str, step: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
        def run(document: dict[str, Any]) -> dict[str, Any]:
            upcasts.calls[kind] = upcasts.calls.get(kind, 0) + 1
            return step(document)

        return run

    def move() -> Upcasts:
        for kind, step in (("workflow", workflow_to_next), ("checkpoint", checkpoint_to_next)):
            today = schema.CURRENT[kind]
            monkeypatch.setitem(schema.CURRENT, kind, today + 1)
            monkeypatch.setitem(schema._UPCASTERS, (kind, today), counted(kind, step))
        return upcasts

    return move


def stored_checkpoint(
    thread_id: str, raw: dict[str, Any]
) -> tuple[StoredCheckpoint, list[StoredBlob]]:
    stored = StoredCheckpoint(
        thread_id=thread_id,
        checkpoint_ns=raw["checkpoint_ns"],
        checkpoint_id=raw["checkpoint_id"],
        parent_checkpoint_id=raw["parent_checkpoint_id"],
        checkpoint=(raw["checkpoint"]["type"], raw["checkpoint"]["data"].encode()),
        metadata=raw["metadata"],
        channel_versions=raw["channel_versions"],
    )
    blobs = [
        StoredBlob(blob["channel"], blob["version"], (blob["type"], blob["data"].encode()))
        for blob in raw["blobs"]
    ]
    return stored, blobs


@pytest.mark.parametrize("backend", ["cosmos", "postgres"])
async def test_state_resumes_under_the_next_schema_version(
    backend: str,
    settings_for: Callable[..., Settings],
    move_to_next: Callable[[], Upcasts],
    monkeypatch: pytest.MonkeyPatch,
    reliability: Recorder,
    request: pytest.FixtureRequest,
) -> None:
    # A store of its own: the next version rewrites shared records (the run index) in its shape,
    # which today's code of every later test would refuse to read.
    isolated = (
        {"postgres_url": request.getfixturevalue("fresh_postgres_url")}
        if backend == "postgres"
        else {"cosmos_container": f"drift-{uuid.uuid4().hex[:8]}", "cosmos_create_if_missing": True}
    )
    settings = settings_for(backend, **isolated)
    record_fixture = fixture("workflow_record_v1.json")
    checkpoint_fixture = fixture("checkpoint_v1.json")
    thread_id = f"drift-{backend}-{uuid.uuid4().hex[:8]}"
    case_id = f"drift-case-{backend}-{uuid.uuid4().hex[:8]}"
    lost = 0
    async with backends_for(settings) as backends:
        store = TieredStateStore.from_backends(backends)
        # Version 1 writes: the record (cached hot too), a checkpoint, an interrupted case.
        assert schema.CURRENT["workflow"] == record_fixture["schema_version"] == 1
        await store.create(thread_id, record_fixture["sections"], agent_id="v1-code")
        stored, blobs = stored_checkpoint(thread_id, checkpoint_fixture)
        await backends.checkpoints.put_checkpoint(stored, blobs)
        async with open_runtime(settings) as today_app:
            await review_case(today_app, case_id)

        upcasts = move_to_next()
        expected = workflow_to_next({"sections": record_fixture["sections"]})["sections"]
        for _ in range(2):  # the first read may come from cold, the second from hot
            record = await store.get(thread_id)
            assert record is not None
            if record.sections != expected or record.schema_version != schema.CURRENT["workflow"]:
                lost += 1
        assert record is not None
        updated = await store.update_section(
            thread_id, "notes", ["upgraded"], agent_id="v2-code", expected_version=record.version
        )
        assert updated.schema_version == schema.CURRENT["workflow"]
        assert updated.sections["customer"] == {"id": "cust_1042"}
        checkpoint = await backends.checkpoints.get_checkpoint(thread_id, "", None)
        assert checkpoint is not None
        if (
            checkpoint.metadata.get("schema_note") != "from v1"
            or checkpoint.checkpoint != stored.checkpoint
        ):
            lost += 1
        got = await backends.checkpoints.get_blobs(thread_id, "", stored.channel_versions)
        if got.get("messages") != blobs[0].value:
            lost += 1

        async with open_runtime(settings) as next_app:
            decided = await next_app.decide(case_id, "approve", "reviewer-v2")
            await next_app.runtime.service.wait_idle()
            view = await next_app.runtime.service.status(case_id)
        resumed = decided.accepted and view.status.value == "completed"

        # Today's code meeting the next version's state refuses it, clearly.
        monkeypatch.setitem(schema.CURRENT, "workflow", schema.CURRENT["workflow"] - 1)
        try:
            await store.get(thread_id)
        except UnsupportedSchemaVersion as error:
            refused = "Upgrade the application" in str(error)
            refusal = type(error).__name__
        else:
            refused, refusal = False, "read it without any error"
        monkeypatch.setitem(schema.CURRENT, "workflow", schema.CURRENT["workflow"] + 1)
        await backends.checkpoints.delete_thread(thread_id)
        await backends.cold.delete(thread_id)

    reliability.record(
        f"Schema drift N -> N+1 ({backend})",
        injected="fixtures stored by today's code (record at 1, checkpoint at 2, a case "
        "interrupted for review), then code moved to the next version (CURRENT bumped, "
        "N -> N+1 upcasters)",
        runs=3,
        lost_writes=lost,
        silent_overwrites=0,
        observed=f"record and checkpoint read in the next version's shape through every tier; "
        f"case resumed under it {'to completion' if resumed else 'NOT to completion'}; "
        f"upcaster calls {dict(sorted(upcasts.calls.items()))}; today's code reading that "
        "state: "
        f"{refusal}",
    )
    assert lost == 0
    assert resumed
    assert refused, refusal
    assert upcasts.calls.get("workflow", 0) > 0 and upcasts.calls.get("checkpoint", 0) > 0
