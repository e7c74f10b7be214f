"""Cosmos throttling, 503s and timeouts injected at the SDK's HTTP transport.

Each fault hits the next matching request of one store operation, the way
Azure would answer it; the caller behaves like the app (re-read before any
retry, never a blind re-send). Checked per call:

- retries are bounded, and a write whose outcome is unknown (the response
  was lost after the service applied it) is not re-sent blindly by anyone:
  either the store reconciles it (the SDK retried on a dropped connection and
  the store recognised its own write) or the caller sees `BackendUnavailable`
  and reconciles by reading;
- the end state has each logical write exactly once: one version step and one
  audit entry per write, nothing lost, nothing applied twice.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import pytest

from state.cold.circuit import OPEN_SECONDS
from state.cold.cosmos_checkpoints import CosmosCheckpointStore
from state.cold.cosmos_client import CosmosConnection
from state.cold.cosmos_store import CosmosStateStore
from state.errors import BackendUnavailable, VersionConflict, WorkflowExists
from state.ports import StoredBlob, StoredCheckpoint
from state.settings import Settings
from tests.support.cosmos import stores_over
from tests.support.cosmos_faults import Fault, FaultKind, FaultyTransport, Operation

from .conftest import Recorder

REPEATS = 3
CALLER_TRIES = 4
# A record change is one transactional batch (its audit entries and the record): a
# fault on a write targets the batch that carries the record document.
RECORD_BODY = '"type":"workflow"'


@dataclass
class Tally:
    calls: int = 0
    lost_writes: int = 0
    duplicates: int = 0
    surfaced: int = 0  # BackendUnavailable the caller saw (and reconciled)
    store_reconciled: int = 0  # the store returned success for a write the SDK re-sent
    max_attempts: int = 0
    blind_resends: int = 0  # an unknown-outcome write sent again without reconciling
    notes: list[str] = field(default_factory=list)


@dataclass
class Cosmos:
    cold: CosmosStateStore
    checkpoints: CosmosCheckpointStore
    transport: FaultyTransport


@pytest.fixture
async def cosmos(settings_for: Callable[..., Settings]) -> AsyncIterator[Cosmos]:
    settings = settings_for("cosmos", redis_url=None)
    transport = FaultyTransport()
    async with stores_over(settings, transport) as (_, cold, checkpoints):
        yield Cosmos(cold, checkpoints, transport)


def arm(cosmos: Cosmos, kind: FaultKind, operations: Sequence[Operation], body: str | None) -> None:
    cosmos.transport.clear()
    cosmos.transport.inject(
        Fault(kind, frozenset(operations), times=1, retry_after_ms=20, body_contains=body)
    )


def attempts(cosmos: Cosmos, operations: Sequence[Operation]) -> int:
    return sum(cosmos.transport.count(op) for op in operations)


async def create_like_the_app(cosmos: Cosmos, thread_id: str, tally: Tally) -> None:
    sections = {"n": 0, "owner": thread_id}
    for _ in range(CALLER_TRIES):
        try:
            await cosmos.cold.create(thread_id, sections, agent_id="caller")
            return
        except BackendUnavailable:
            tally.surfaced += 1
        except WorkflowExists:
            pass
        # Unknown outcome: read before deciding to send again.
        found = await cosmos.cold.get(thread_id)
        if found is not None and found.sections == sections and found.version == 1:
            return
    raise AssertionError(f"create of {thread_id} never acknowledged")


async def update_like_the_app(cosmos: Cosmos, thread_id: str, value: int, tally: Tally) -> None:
    for _ in range(CALLER_TRIES):
        current = await cosmos.cold.get(thread_id)
        assert current is not None
        if current.sections["n"] == value:
            return  # an earlier attempt whose answer was lost did land
        try:
            await cosmos.cold.update_section(
                thread_id, "n", value, expected_version=current.version, agent_id="caller"
            )
            return
        except BackendUnavailable:
            tally.surfaced += 1
        except VersionConflict:
            pass
    raise AssertionError(f"update of {thread_id} never acknowledged")


def checkpoint(thread_id: str, index: int) -> tuple[StoredCheckpoint, list[StoredBlob]]:
    stored = StoredCheckpoint(
        thread_id=thread_id,
        checkpoint_ns="",
        checkpoint_id=f"1ef{index:05d}-0000-6000-8000-000000000000",
        parent_checkpoint_id=None,
        checkpoint=("json", b'{"v": 1}'),
        metadata={"step": index},
        channel_versions={"messages": f"{index:032d}"},
    )
    return stored, [StoredBlob("messages", f"{index:032d}", ("json", f'["m{index}"]'.encode()))]


@pytest.mark.parametrize(
    "kind", ["throttle", "unavailable", "timeout_before", "timeout_after", "reset_after"]
)
async def test_cosmos_transport_fault(
    kind: FaultKind, cosmos: Cosmos, reliability: Recorder
) -> None:
    tally = Tally()
    unknown_outcome = kind in ("timeout_after", "reset_after")
    for repeat in range(REPEATS):
        thread_id = f"cf-{kind}-{repeat}-{uuid.uuid4().hex[:8]}"

        # create: the batch creating the record fails
        arm(cosmos, kind, ["batch"], RECORD_BODY)
        await create_like_the_app(cosmos, thread_id, tally)
        tally.calls += 1
        sent = sum(
            1 for a in cosmos.transport.attempts if a.operation == "batch" and a.injected is None
        )
        tally.max_attempts = max(tally.max_attempts, attempts(cosmos, ["batch"]))
        if kind == "timeout_after" and sent > 1:
            tally.blind_resends += 1  # at most our own, after reading

        # update: the batch replacing the record fails
        for value in (1, 2):
            arm(cosmos, kind, ["batch"], RECORD_BODY)
            await update_like_the_app(cosmos, thread_id, value, tally)
            tally.calls += 1
            tally.max_attempts = max(tally.max_attempts, attempts(cosmos, ["batch"]))
            retried = [a for a in cosmos.transport.attempts if a.operation == "batch"]
            if kind == "reset_after" and len(retried) > 1:
                tally.store_reconciled += 1
            if kind == "timeout_after" and len(retried) > 1:
                tally.blind_resends += 1

        # read and audit query (idempotent: retried freely)
        arm(cosmos, kind, ["read"], None)
        for _ in range(CALLER_TRIES):
            try:
                record = await cosmos.cold.get(thread_id)
                break
            except BackendUnavailable:
                tally.surfaced += 1
        tally.calls += 1
        tally.max_attempts = max(tally.max_attempts, attempts(cosmos, ["read"]))
        arm(cosmos, kind, ["query"], None)
        for _ in range(CALLER_TRIES):
            try:
                trail = await cosmos.cold.audit_trail(thread_id, limit=20)
                break
            except BackendUnavailable:
                tally.surfaced += 1
        tally.calls += 1

        # checkpoint put: every document it writes is idempotent (fixed ids)
        stored, blobs = checkpoint(thread_id, repeat)
        arm(cosmos, kind, ["create", "upsert", "replace", "batch"], None)
        for _ in range(CALLER_TRIES):
            try:
                await cosmos.checkpoints.put_checkpoint(stored, blobs)
                break
            except BackendUnavailable:
                tally.surfaced += 1
        tally.calls += 1
        cosmos.transport.clear()
        latest = await cosmos.checkpoints.get_checkpoint(thread_id, "", None)
        if latest is None or latest.checkpoint_id != stored.checkpoint_id:
            tally.lost_writes += 1
        else:
            got = await cosmos.checkpoints.get_blobs(thread_id, "", latest.channel_versions)
            if got.get("messages") != blobs[0].value:
                tally.lost_writes += 1

        # Oracle: version 3 = create + two updates, each exactly once in the trail.
        record = await cosmos.cold.get(thread_id)
        trail = await cosmos.cold.audit_trail(thread_id, limit=20)
        assert record is not None
        if record.sections["n"] != 2:
            tally.lost_writes += 1
        tally.duplicates += max(0, record.version - 3)
        versions = [entry.version for entry in trail]
        tally.duplicates += len(versions) - len(set(versions))
        if sorted(versions) != [1, 2, 3]:
            tally.notes.append(f"{thread_id}: audit versions {sorted(versions)}")
            tally.lost_writes += max(0, 3 - len(set(versions)))
        await cosmos.checkpoints.delete_thread(thread_id)
        await cosmos.cold.delete(thread_id)

    names = {
        "throttle": "Cosmos 429 throttling (x-ms-retry-after-ms)",
        "unavailable": "Cosmos 503 service unavailable",
        "timeout_before": "Cosmos timeout before the request was sent",
        "timeout_after": "Cosmos timeout after a write was applied (unknown outcome)",
        "reset_after": "Cosmos connection dropped after a write was applied (unknown outcome)",
    }
    reliability.record(
        names[kind],
        injected=f"FaultyTransport: one {kind} on each record batch (create, update), read, "
        "query and checkpoint write",
        runs=tally.calls,
        lost_writes=tally.lost_writes,
        silent_overwrites=tally.duplicates,
        observed=f"at most {tally.max_attempts} requests of the faulted kind per call; "
        f"{tally.surfaced} BackendUnavailable reconciled by reading; "
        f"{tally.store_reconciled} SDK re-sends recognised by the store; "
        f"{tally.blind_resends} blind re-sends",
    )
    assert tally.lost_writes == 0, tally.notes
    assert tally.duplicates == 0, tally.notes
    assert tally.blind_resends == 0
    assert tally.max_attempts <= 3
    if kind in ("throttle", "unavailable", "timeout_before"):
        assert tally.surfaced == 0  # never applied, so the SDK's own retry is safe and enough
    if unknown_outcome and kind == "reset_after":
        assert tally.store_reconciled == 2 * REPEATS


async def _bounded_store(
    settings_for: Callable[..., Settings], bound: float
) -> tuple[CosmosConnection, CosmosStateStore, FaultyTransport]:
    """A record store whose calls are bounded by `bound` seconds, behind a fault transport."""
    settings = settings_for("cosmos", redis_url=None, cosmos_operation_timeout_seconds=bound)
    transport = FaultyTransport()
    connection = CosmosConnection(settings.cosmos, transport=transport)
    cold = CosmosStateStore(connection, max_item_bytes=settings.state_max_item_bytes)
    await cold.setup()
    return connection, cold, transport


# What a bounded call may take beyond its bound (scheduling on a loaded machine).
BOUND_SLACK_SECONDS = 1.5


async def test_a_cosmos_call_with_no_answer_fails_typed_within_its_bound(
    settings_for: Callable[..., Settings],
) -> None:
    """A cut network answers nothing: the SDK would wait out its read timeout (65 s by
    default) and retry a read three times, holding the caller (an HTTP request, a flush
    lock) for minutes. Every call is bounded by COSMOS_OPERATION_TIMEOUT_SECONDS."""
    bound = 1.0
    connection, cold, transport = await _bounded_store(settings_for, bound)
    thread_id = f"cf-stall-{uuid.uuid4().hex[:8]}"
    try:
        await cold.create(thread_id, {"n": 0}, agent_id="caller")
        calls = {
            "read": lambda: cold.get(thread_id),
            "query": lambda: cold.audit_trail(thread_id, limit=20),
            "batch": lambda: cold.update_section(
                thread_id, "n", 1, expected_version=1, agent_id="caller"
            ),
        }
        for operation, call in calls.items():
            # Each call after a timeout goes as the probe (`AnswerCircuit`), not refused.
            await asyncio.sleep(OPEN_SECONDS)
            transport.clear()
            transport.inject(Fault("stall", frozenset({operation}), times=10))
            started = time.monotonic()
            with pytest.raises(
                BackendUnavailable, match="cosmos unavailable: no answer within 1 s"
            ):
                await call()
            took = time.monotonic() - started
            assert bound <= took < bound + BOUND_SLACK_SECONDS, (operation, took)
            assert transport.count(operation) == 1
        # The connection is not left broken: the next calls answer (and the update that
        # got no answer was never sent).
        transport.clear()
        await asyncio.sleep(OPEN_SECONDS)
        updated = await cold.update_section(
            thread_id, "n", 1, expected_version=1, agent_id="caller"
        )
        assert updated.version == 2
        await cold.delete(thread_id)
    finally:
        await connection.close()


async def test_a_call_that_outlasts_its_bound_on_throttling_opens_no_circuit(
    settings_for: Callable[..., Settings],
) -> None:
    """Sustained 429s make the SDK retry past the call's bound: the caller gets
    `BackendUnavailable`, but the service answered all along, so the next call goes
    ahead at once instead of being refused as if the store had gone silent."""
    connection, cold, transport = await _bounded_store(settings_for, 1.0)
    thread_id = f"cf-throttled-{uuid.uuid4().hex[:8]}"
    try:
        await cold.create(thread_id, {"n": 0}, agent_id="caller")
        transport.clear()
        transport.inject(Fault("throttle", frozenset({"read"}), times=1000, retry_after_ms=300))
        with pytest.raises(BackendUnavailable, match="no answer within 1 s"):
            await cold.get(thread_id)
        assert transport.count("read", "throttle") >= 3
        transport.clear()
        record = await cold.get(thread_id)
        assert record is not None and record.version == 1
        await cold.delete(thread_id)
    finally:
        await connection.close()
