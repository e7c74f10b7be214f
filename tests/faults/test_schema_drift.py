"""State written under schema version N resumes under code at version N+1.

Stored fixtures of the version-1 format (tests/faults/fixtures/) are written by
today's code (version 1); then the code moves to version 2 (CURRENT bumped,
a 1 -> 2 upcaster registered, both under monkeypatch) and must read them in the
new shape through every tier. A support case interrupted for review under
version 1 is resumed and completed under version 2. Finally, code still at
version 1 meets what version 2 wrote and must refuse it with a clear error.
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


def workflow_1_to_2(document: dict[str, Any]) -> dict[str, Any]:
    sections = dict(document["sections"])
    if isinstance(sections.get("customer"), str):
        sections["customer"] = {"id": sections["customer"]}
    return {**document, "sections": sections}


def checkpoint_1_to_2(document: dict[str, Any]) -> dict[str, Any]:
    metadata = document.get("metadata")
    if isinstance(metadata, str):  # a backend may hand metadata over still encoded
        metadata = json.loads(metadata)
    return {**document, "metadata": {**(metadata or {}), "schema_note": "from v1"}}


@pytest.fixture
def move_to_v2(monkeypatch: pytest.MonkeyPatch) -> Callable[[], Upcasts]:
    """Turn this process into version-2 code: bumped CURRENT plus counting upcasters."""
    upcasts = Upcasts()

    def counted(kind: str, step: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
        def run(document: dict[str, Any]) -> dict[str, Any]:
            upcasts.calls[kind] = upcasts.calls.get(kind, 0) + 1
            return step(document)

        return run

    def move() -> Upcasts:
        monkeypatch.setitem(schema.CURRENT, "workflow", 2)
        monkeypatch.setitem(schema.CURRENT, "checkpoint", 2)
        monkeypatch.setitem(
            schema._UPCASTERS, ("workflow", 1), counted("workflow", workflow_1_to_2)
        )
        monkeypatch.setitem(
            schema._UPCASTERS, ("checkpoint", 1), counted("checkpoint", checkpoint_1_to_2)
        )
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
async def test_v1_state_resumes_under_v2(
    backend: str,
    settings_for: Callable[..., Settings],
    move_to_v2: Callable[[], Upcasts],
    monkeypatch: pytest.MonkeyPatch,
    reliability: Recorder,
    request: pytest.FixtureRequest,
) -> None:
    # A store of its own: v2 code rewrites shared records (the run index) in the v2 shape,
    # which the v1 code of every later test would refuse to read.
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
        async with open_runtime(settings) as v1_app:
            await review_case(v1_app, case_id)

        upcasts = move_to_v2()
        expected = workflow_1_to_2({"sections": record_fixture["sections"]})["sections"]
        for _ in range(2):  # the first read may come from cold, the second from hot
            record = await store.get(thread_id)
            assert record is not None
            if record.sections != expected or record.schema_version != 2:
                lost += 1
        assert record is not None
        updated = await store.update_section(
            thread_id, "notes", ["upgraded"], agent_id="v2-code", expected_version=record.version
        )
        assert updated.schema_version == 2 and updated.sections["customer"] == {"id": "cust_1042"}
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

        async with open_runtime(settings) as v2_app:
            decided = await v2_app.decide(case_id, "approve", "reviewer-v2")
            await v2_app.runtime.service.wait_idle()
            view = await v2_app.runtime.service.status(case_id)
        resumed = decided.accepted and view.status.value == "completed"

        # Version-1 code meeting version-2 state refuses it, clearly.
        monkeypatch.setitem(schema.CURRENT, "workflow", 1)
        try:
            await store.get(thread_id)
        except UnsupportedSchemaVersion as error:
            refused = "Upgrade the application" in str(error)
            refusal = type(error).__name__
        else:
            refused, refusal = False, "read it without any error"
        monkeypatch.setitem(schema.CURRENT, "workflow", 2)
        await backends.checkpoints.delete_thread(thread_id)
        await backends.cold.delete(thread_id)

    reliability.record(
        f"Schema drift v1 -> v2 ({backend})",
        injected="fixtures stored by v1 code (record, checkpoint, a case interrupted for "
        "review), then code moved to v2 (CURRENT bumped, 1 -> 2 upcasters)",
        runs=3,
        lost_writes=lost,
        silent_overwrites=0,
        observed=f"record and checkpoint read in the v2 shape through every tier; case resumed "
        f"under v2 {'to completion' if resumed else 'NOT to completion'}; upcaster calls "
        f"{dict(sorted(upcasts.calls.items()))}; v1 code reading v2 state: "
        f"{refusal}",
    )
    assert lost == 0
    assert resumed
    assert refused, refusal
    assert upcasts.calls.get("workflow", 0) > 0 and upcasts.calls.get("checkpoint", 0) > 0
