"""The cold stores' `delete_for_runs` against a run still writing: a checkpoint of the runs
stored before the call's last look does not survive the call, and a run that goes on
writing to new threads is not chased for ever. The same cases on every cold backend; the
seam is where each deletes (Postgres: each batch's lock, Cosmos: each thread's removal)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from state.cold import cosmos_maintenance, postgres_checkpoints
from state.cold.cosmos_maintenance import CheckpointMaintenance
from state.errors import BackendUnavailable, RunsPartlyDeleted, RunsStillWriting
from state.ports import CheckpointStore, StoredCheckpoint
from state.settings import WriteMode
from tests.contract.conftest import OpenBackends
from tests.support.records import unique_thread

Step = Callable[[], Awaitable[None]]

LATE_RUN_ROUNDS = {
    "postgres": postgres_checkpoints.LATE_RUN_ROUNDS,
    "cosmos": cosmos_maintenance.LATE_RUN_ROUNDS,
}


@pytest.fixture
def before_each_delete(
    cold_backend: str, monkeypatch: pytest.MonkeyPatch
) -> Callable[[Step], None]:
    """Runs a step just before each of the store's deletes of the runs' checkpoints."""

    def install(step: Step) -> None:
        if cold_backend == "postgres":
            lock_threads = postgres_checkpoints._lock_threads

            async def step_then_lock(conn: Any, thread_ids: list[str]) -> None:
                await step()
                await lock_threads(conn, thread_ids)

            monkeypatch.setattr(postgres_checkpoints, "_lock_threads", step_then_lock)
        else:
            remove = CheckpointMaintenance._remove

            async def step_then_remove(
                self: CheckpointMaintenance, *args: Any, **kwargs: Any
            ) -> None:
                await step()
                await remove(self, *args, **kwargs)

            monkeypatch.setattr(CheckpointMaintenance, "_remove", step_then_remove)

    return install


def first_checkpoint(thread_id: str, run_id: str) -> StoredCheckpoint:
    checkpoint_id = f"1f000001-0000-6000-8000-{uuid.uuid4().hex[:12]}"
    return StoredCheckpoint(
        thread_id=thread_id,
        checkpoint_ns="",
        checkpoint_id=checkpoint_id,
        parent_checkpoint_id=None,
        checkpoint=("json", b'{"n": 1}'),
        metadata={"step": 1, "run_id": run_id},
        channel_versions={},
    )


async def stored_ids(store: CheckpointStore, thread_id: str) -> list[str]:
    listed = store.list_checkpoints(
        thread_id=thread_id, checkpoint_ns=None, before=None, limit=None, metadata_filter=None
    )
    return [c.checkpoint_id async for c in listed]


async def test_delete_for_runs_deletes_a_thread_the_run_first_wrote_to_after_its_listing(
    cold_backend: str, open_tiers: OpenBackends, before_each_delete: Callable[[Step], None]
) -> None:
    """The call lists the runs' threads (or checkpoints), then deletes: a run's first
    checkpoint on another thread, stored after that listing and before the call returned,
    survived it (a checkpoint of a deleted run, the thread's latest)."""
    listed, unlisted = unique_thread(), unique_thread()
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    async with open_tiers(cold_backend, hot=False, mode=WriteMode.WRITE_THROUGH) as backends:
        store = backends.checkpoints
        await store.put_checkpoint(first_checkpoint(listed, run_id), [])
        stepped: list[bool] = []

        async def step() -> None:
            # The run's step on a thread of its own lands between the listing and the delete.
            if not stepped:
                stepped.append(True)
                await store.put_checkpoint(first_checkpoint(unlisted, run_id), [])

        before_each_delete(step)
        assert await store.delete_for_runs([run_id]) == {listed, unlisted}
        assert stepped
        for thread_id in (listed, unlisted):
            assert await stored_ids(store, thread_id) == []


async def test_delete_for_runs_of_a_run_that_goes_on_writing_to_new_threads_gives_up(
    cold_backend: str, open_tiers: OpenBackends, before_each_delete: Callable[[Step], None]
) -> None:
    """A run writing to another thread during every pass is not chased for ever: the call
    raises, naming the threads it deleted from (a cache drops them), and stops."""
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    written = [unique_thread()]
    async with open_tiers(cold_backend, hot=False, mode=WriteMode.WRITE_THROUGH) as backends:
        store = backends.checkpoints
        await store.put_checkpoint(first_checkpoint(written[0], run_id), [])

        async def step() -> None:
            written.append(unique_thread())
            await store.put_checkpoint(first_checkpoint(written[-1], run_id), [])

        before_each_delete(step)
        with pytest.raises(RunsPartlyDeleted) as raised:
            await store.delete_for_runs([run_id])
    passes = LATE_RUN_ROUNDS[cold_backend] + 1
    assert len(written) == passes + 1
    assert raised.value.thread_ids == set(written[:-1])


async def test_giving_up_on_a_run_still_writing_says_so_not_that_the_store_is_unavailable(
    cold_backend: str, open_tiers: OpenBackends, before_each_delete: Callable[[Step], None]
) -> None:
    """The store answered every call: the refusal names the runs and what they write to
    (typed, for a caller to tell it apart), and is still retried as an outage is."""
    run_id = f"run-{uuid.uuid4().hex[:8]}"
    written = [unique_thread()]
    async with open_tiers(cold_backend, hot=False, mode=WriteMode.WRITE_THROUGH) as backends:
        store = backends.checkpoints
        await store.put_checkpoint(first_checkpoint(written[0], run_id), [])

        async def step() -> None:
            written.append(unique_thread())
            await store.put_checkpoint(first_checkpoint(written[-1], run_id), [])

        before_each_delete(step)
        with pytest.raises(RunsPartlyDeleted) as raised:
            await store.delete_for_runs([run_id])
    assert isinstance(raised.value.cause, RunsStillWriting)
    assert isinstance(raised.value, BackendUnavailable)
    message = str(raised.value)
    assert "unavailable" not in message, message
    assert f"runs ['{run_id}'] are still writing to" in message, message
