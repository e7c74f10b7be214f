"""`write_sections` under a record the cold store refuses as too large with all of its
sections at once (Cosmos's item limit, `StateTooLarge`): the write goes again another way.
What another writer stored meanwhile must survive that, as it survives a conflict."""

from __future__ import annotations

import random
import string
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from state.errors import StateTooLarge
from state.ports import SectionWrite, WorkflowRecord
from support_cases.models import CaseStatus, FollowUpStrategy, RunStatus
from support_cases.records import write_sections
from support_cases.runs import new_run_entry, new_run_section
from support_cases.settings import AppSettings

from .apps import open_runtime

ITEM_BYTES = 20_000


def filler(seed: int, size: int = 4_600) -> str:
    """Incompressible text, under a quarter of an item (kept inline)."""
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters) for _ in range(size))


@pytest.mark.parametrize("backend", ["cosmos"])
async def test_a_follow_up_queued_while_a_too_large_run_start_falls_back_is_kept(
    backend: str, settings_for: Callable[..., AppSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue's runner starts the next run, restoring agents' sections after a failed
    run (`start_next`): with them the record passes the item limit (`StateTooLarge`).
    Another worker's follow-up, queued (and acknowledged) between the refused write and
    the fallback, must still be queued afterwards."""
    async with open_runtime(settings_for(backend, state_max_item_bytes=ITEM_BYTES)) as app:
        store = app.runtime.store
        tracker = app.runtime.service._tracker
        case_id = f"too-large-{uuid.uuid4().hex[:8]}"
        first = new_run_entry("run-first", "message", RunStatus.QUEUED, text="hello?")
        await store.create(
            case_id,
            {
                "request": {"text": "charged twice"},
                "run": {**new_run_section(CaseStatus.FAILED), "run_id": "run-intake"},
                "runs": [
                    {**new_run_entry("run-intake", "intake", RunStatus.FAILED)},
                    first,
                ],
            },
            agent_id="t",
        )
        for seed, name in enumerate(("billing", "account", "response")):
            current = await store.get(case_id)
            assert current is not None
            await store.update_section(
                case_id, name, filler(seed), agent_id="t", expected_version=current.version
            )

        second = new_run_entry(
            "run-second",
            "message",
            RunStatus.QUEUED,
            text="any news?",
            strategy=FollowUpStrategy.ENQUEUE,
        )
        refused: list[list[str]] = []
        update_sections = store.update_sections

        async def refuse_then_enqueue(
            thread_id: str, writes: list[SectionWrite], **kw: Any
        ) -> WorkflowRecord:
            try:
                return await update_sections(thread_id, writes, **kw)
            except StateTooLarge:
                refused.append([w.section for w in writes])
                # Another worker's follow-up lands now (its enqueue: read, append, write).
                record = await store.get_fresh(case_id)
                assert record is not None
                await store.update_section(
                    case_id,
                    "runs",
                    [*record.sections["runs"], second],
                    agent_id="case-api",
                    expected_version=record.version,
                )
                raise

        monkeypatch.setattr(store, "update_sections", refuse_then_enqueue)
        # The state after the failed run holds two more agents' sections than the record.
        started = await tracker.start_next(
            case_id,
            fencing_token=None,
            sections={"policy": filler(10), "review": filler(11), "billing": filler(0)},
        )
        full = await store.get_fresh(case_id)
        assert full is not None
        runs = {e["run_id"]: e["status"] for e in full.sections["runs"]}
        assert refused, "the multi-section write was not refused: sizes need adjusting"
        assert started is not None and started["run_id"] == "run-first"
        assert runs.get("run-second") == RunStatus.QUEUED.value, (
            f"the acknowledged follow-up run-second is gone from the queue: runs {runs}"
        )


@pytest.mark.parametrize("backend", ["cosmos"])
async def test_a_record_filled_by_inline_sections_still_takes_small_writes(
    backend: str, settings_for: Callable[..., AppSettings]
) -> None:
    """Sections each under a quarter of an item stay inline, one write at a time, until
    together they fill the record: a small write after that (a heartbeat, a note) must
    still land, the inline sections moving out by reference, and every section read back."""
    async with open_runtime(settings_for(backend, state_max_item_bytes=ITEM_BYTES)) as app:
        store = app.runtime.store
        case_id = f"too-large-{uuid.uuid4().hex[:8]}"
        written: dict[str, Any] = {"run": {"status": "running"}}
        await store.create(case_id, dict(written), agent_id="t")
        for seed, name in enumerate(("billing", "account", "response", "policy")):
            written[name] = filler(seed)
            await store.update_section(case_id, name, written[name], agent_id="t")
        for n in range(20):
            written[f"note-{n}"] = filler(100 + n, size=250)
            await store.update_section(case_id, f"note-{n}", written[f"note-{n}"], agent_id="t")

        for read in (await store.get(case_id), await store.get_fresh(case_id)):
            assert read is not None
            assert read.sections == written


@pytest.mark.parametrize("backend", ["cosmos"])
async def test_a_record_filled_by_inline_sections_still_takes_multi_section_writes(
    backend: str, settings_for: Callable[..., AppSettings]
) -> None:
    """The same through `write_sections` (a run's status and its runs, written together)."""
    async with open_runtime(settings_for(backend, state_max_item_bytes=ITEM_BYTES)) as app:
        store = app.runtime.store
        case_id = f"too-large-{uuid.uuid4().hex[:8]}"
        written: dict[str, Any] = {"run": {"status": "running"}}
        await store.create(case_id, dict(written), agent_id="t")
        for seed, name in enumerate(("billing", "account", "response", "policy")):
            written[name] = filler(seed)
            await store.update_section(case_id, name, written[name], agent_id="t")
        for n in range(10):
            notes = {f"note-{n}-{m}": filler(100 * n + m, size=150) for m in range(2)}
            written.update(notes)
            await write_sections(
                store,
                case_id,
                lambda _, notes=notes: [SectionWrite(k, v, "t") for k, v in notes.items()],
            )

        for read in (await store.get(case_id), await store.get_fresh(case_id)):
            assert read is not None
            assert read.sections == written
