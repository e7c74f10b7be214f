"""States of 1.9, 2.0, 2.1 and 10 MB round-trip on every backend, within Cosmos's 2 MB items.

The values are random bytes (incompressible: the worst case for size limits).
Per size and backend:

- a LangGraph checkpoint holding a channel value of that size goes through the
  tiered saver and comes back byte for byte;
- a workflow record with a section of that size is created through the tiered
  store, then that section is replaced by another value of that size through
  `update_section`; `get` (and each call's result) gives back exactly what was
  written, while both tiers hold the offloaded, by-reference form, because
  the store size-manages what it writes by itself;
- the same record written raw to the cold store (no size management) is
  stored whole where the backend can (Postgres), or refused with a typed
  `StateTooLarge` and nothing written (Cosmos);
- every document the Cosmos container holds for it (record, audit entries,
  offloaded chunks of both values) is inspected: none may pass 2 MiB, since
  the local emulator does not enforce the limit itself.
"""

from __future__ import annotations

import base64
import json
import random
import uuid
from collections.abc import Callable

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import empty_checkpoint

from state.checkpoint import TieredCheckpointSaver
from state.errors import StateTooLarge
from state.factory import backends_for
from state.ports import JSON, ColdStateStore
from state.settings import Settings
from state.size import ARCHIVED_KEY, OFFLOADED_KEY, is_offloaded
from state.tiered import TieredStateStore
from tests.support.cosmos import partition_of

from .conftest import Recorder

COSMOS_ITEM_LIMIT = 2 * 1024 * 1024
SIZES_MB = [1.9, 2.0, 2.1, 10.0]


def payload(megabytes: float, seed: int) -> bytes:
    return random.Random(seed).randbytes(int(megabytes * 1_000_000))


async def cosmos_items(settings: Settings, thread_ids: list[str]) -> list[int]:
    """Sizes of every stored document in these threads' partitions, as Cosmos would count them."""
    return [
        len(json.dumps(item, separators=(",", ":")).encode())
        for thread_id in thread_ids
        for item in await partition_of(settings, thread_id)
    ]


def references(value: JSON) -> set[str]:
    """Every offloaded or archived reference inside a stored value."""
    if isinstance(value, dict):
        if set(value) in ({OFFLOADED_KEY}, {ARCHIVED_KEY}):
            return {next(iter(value.values()))["ref"]}
        return {ref for item in value.values() for ref in references(item)}
    if isinstance(value, list):
        return {ref for item in value for ref in references(item)}
    return set()


async def archive_threads(cold: ColdStateStore, thread_id: str) -> list[str]:
    """The cold record ids (heads and chunks) of every value the thread's record or its
    audit trail refers to: what a replaced section left behind is stored there too."""
    stored = await cold.get(thread_id)
    assert stored is not None
    refs = references(stored.sections)
    for entry in await cold.audit_trail(thread_id):
        refs |= references(entry.before) | references(entry.after)
    ids = []
    for ref in sorted(refs):
        head = await cold.get(ref)
        assert head is not None
        ids += [ref, *(f"{ref}~{n}" for n in range(int(head.sections["chunks"])))]
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("megabytes", SIZES_MB)
async def test_large_state_round_trips(
    megabytes: float, settings_for: Callable[..., Settings], reliability: Recorder
) -> None:
    runs = mismatches = 0
    largest_item = 0
    refused_raw: dict[str, bool] = {}
    for backend in ("cosmos", "postgres"):
        settings = settings_for(backend)
        async with backends_for(settings) as backends:
            store = TieredStateStore.from_backends(backends)
            saver = TieredCheckpointSaver.from_backends(backends)
            thread_id = f"size-{backend}-{megabytes}-{uuid.uuid4().hex[:8]}"
            data = payload(megabytes, seed=int(megabytes * 10))

            # 1. checkpoint with a channel value of that size
            checkpoint = empty_checkpoint()
            version = saver.get_next_version(None, None)
            checkpoint["channel_values"] = {"big": data}
            checkpoint["channel_versions"] = {"big": version}
            config: RunnableConfig = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
            stored_config = await saver.aput(config, checkpoint, {"step": 1}, {"big": version})
            back = await saver.aget_tuple(stored_config)
            runs += 1
            if back is None or back.checkpoint["channel_values"].get("big") != data:
                mismatches += 1

            # 2. workflow record through the tiered store alone: create, then update_section
            sections = {"attachment": base64.b64encode(data).decode(), "status": "open"}
            created = await store.create(thread_id, sections, agent_id="size-test")
            read = await store.get(thread_id)
            runs += 1
            if created.sections != sections or read is None or read.sections != sections:
                mismatches += 1
            replacement = base64.b64encode(payload(megabytes, seed=int(megabytes * 10) + 1))
            updated_sections = {**sections, "attachment": replacement.decode()}
            updated = await store.update_section(
                thread_id,
                "attachment",
                updated_sections["attachment"],
                agent_id="size-test",
                expected_version=1,
            )
            read = await store.get(thread_id)
            runs += 1
            read_back = None if read is None else read.sections
            if updated.sections != updated_sections or read_back != updated_sections:
                mismatches += 1
            # Stored bounded in both tiers, and the same form in each: nothing this big
            # stays inline.
            stored = await backends.cold.get(thread_id)
            assert stored is not None and stored.version == 2
            assert is_offloaded(stored.sections["attachment"])
            assert backends.hot is not None and await backends.hot.get(thread_id) == stored
            touched = [thread_id, *await archive_threads(backends.cold, thread_id)]

            # 3. the same record raw to the cold store (no size management): stored whole,
            # or refused typed with nothing written
            raw_id = f"{thread_id}-raw"
            try:
                await backends.cold.create(raw_id, sections, agent_id="size-test")
            except StateTooLarge:
                refused_raw[backend] = True
                assert await backends.cold.get(raw_id) is None
            else:
                refused_raw[backend] = False
                raw = await backends.cold.get(raw_id)
                runs += 1
                if raw is None or raw.sections != sections:
                    mismatches += 1
                await backends.cold.delete(raw_id)

            if backend == "cosmos":
                sizes = await cosmos_items(settings, [*touched, raw_id])
                largest_item = max(sizes)
                assert largest_item <= COSMOS_ITEM_LIMIT, sorted(sizes)[-3:]

            await saver.adelete_thread(thread_id)
            for record_id in touched:
                await backends.cold.delete(record_id)

    raw_note = ", ".join(
        f"{backend} {'refused (StateTooLarge)' if refused else 'stored whole'}"
        for backend, refused in refused_raw.items()
    )
    reliability.record(
        f"State of {megabytes:g} MB round trip",
        injected=f"a {megabytes:g} MB random (incompressible) value as a checkpoint channel "
        "and as a workflow-record section (create, then update_section), on Cosmos and "
        "Postgres with Redis in front",
        runs=runs,
        lost_writes=mismatches,
        silent_overwrites=0,
        observed=f"checkpoint and record (size-managed by TieredStateStore itself, offloaded "
        f"by reference) came back equal; largest Cosmos item {largest_item / 1_048_576:.2f} "
        f"MiB (limit 2 MiB); raw record written past the store: {raw_note}",
    )
    assert mismatches == 0
    assert refused_raw["postgres"] is False


async def test_a_checkpoint_spilling_many_values_keeps_every_document_within_an_item(
    settings_for: Callable[..., Settings],
) -> None:
    """Many mid-sized channel values: the checkpoint document spills most of them into
    chunks. The document left must still fit the configured item limit (the emulator would
    take it anyway; Cosmos refuses an item over its limit), and read back whole."""
    from state.cold.cosmos_checkpoints import CosmosCheckpointStore
    from state.cold.cosmos_client import CosmosConnection
    from state.ports import StoredBlob, StoredCheckpoint

    item_bytes = 20_000
    settings = settings_for("cosmos")
    connection = CosmosConnection(settings.cosmos)
    try:
        store = CosmosCheckpointStore(
            connection, max_item_bytes=item_bytes, compress_threshold_bytes=10**9
        )
        await store.setup()
        thread_id = f"spill-{uuid.uuid4().hex[:8]}"
        rng = random.Random(5)
        values = {f"channel-{n}": rng.randbytes(300) for n in range(100)}
        checkpoint = StoredCheckpoint(
            thread_id=thread_id,
            checkpoint_ns="",
            checkpoint_id="1",
            parent_checkpoint_id=None,
            checkpoint=("json", b"{}"),
            metadata={},
            channel_versions=dict.fromkeys(values, 1),
        )
        await store.put_checkpoint(
            checkpoint, [StoredBlob(ch, 1, ("bytes", v)) for ch, v in values.items()]
        )

        sizes = await cosmos_items(settings, [thread_id])
        assert max(sizes) <= item_bytes, sorted(sizes)[-3:]
        stored = await store.get_checkpoint(thread_id, "", "1")
        assert stored is not None and stored.blobs is not None
        assert {channel: value[1] for channel, value in stored.blobs.items()} == values
    finally:
        await connection.close()
