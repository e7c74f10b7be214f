"""Maintenance racing live work in write-behind mode, each race forced at the point it
bites (a step landing inside the maintenance call): `delete_thread` and
`delete_for_runs` never let a late step of what they deleted come back as the thread's
latest, `prune` and `copy_thread` never read a thread half flushed, and the retention
sweep never deletes a step acknowledged after its first look."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypedDict

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import CheckpointTuple
from langgraph.checkpoint.base.id import uuid6
from langgraph.graph import END, START, StateGraph

import state.checkpoint.flusher as flusher_module
from state.checkpoint import TieredCheckpointSaver
from state.errors import BackendUnavailable, HotStateLost, LockLost, RunsStillWriting, StateError
from tests.chat_graph import chat_graph
from tests.integration.delta_graph import delta_graph, open_stack
from tests.integration.delta_graph import settings_for as stack_settings
from tests.integration.test_write_behind import WriteBehind, open_write_behind, settings_for
from tests.support.cosmos import drop_container

COLD_BACKENDS = ["postgres", "cosmos"]


@asynccontextmanager
async def tiers_for(stack_env: dict[str, str], backend: str) -> AsyncIterator[WriteBehind]:
    async with open_write_behind(settings_for(stack_env, backend, stack_env["REDIS_URL"])) as t:
        yield t


def config(prefix: str = "race") -> RunnableConfig:
    return {"configurable": {"thread_id": f"{prefix}-{uuid.uuid4().hex[:12]}"}}


def with_run(cfg: RunnableConfig, run_id: str) -> RunnableConfig:
    return {"configurable": {**cfg["configurable"], "run_id": run_id}}


async def put_child(
    saver: TieredCheckpointSaver, parent: CheckpointTuple, text: str, *, run_id: str = ""
) -> RunnableConfig:
    """The run's next step on `parent`, appending `text` to `messages`, as LangGraph puts it."""
    checkpoint = copy.deepcopy(parent.checkpoint)
    checkpoint["id"] = str(uuid6(clock_seq=-2))
    version = saver.get_next_version(checkpoint["channel_versions"].get("messages"), None)
    checkpoint["channel_versions"]["messages"] = version
    checkpoint["channel_values"]["messages"] = [
        *checkpoint["channel_values"].get("messages", []),
        text,
    ]
    metadata: dict[str, Any] = {
        "source": "loop",
        "step": int(parent.metadata.get("step", 0)) + 1,
        "parents": {},
    }
    configurable = dict(parent.config["configurable"])
    if run_id:
        metadata["run_id"] = configurable["run_id"] = run_id
    return await saver.aput(
        {"configurable": configurable}, checkpoint, metadata, {"messages": version}
    )  # type: ignore[arg-type]


async def put_delta_step(
    saver: TieredCheckpointSaver, parent: CheckpointTuple, run_id: str
) -> RunnableConfig:
    """One more step of a DeltaChannel graph's node: its writes on the parent, then the
    child checkpoint, which holds no value of the channel (rebuilt from those writes)."""
    await saver.aput_writes(parent.config, [("messages", ["late a", "late b"])], str(uuid.uuid4()))
    checkpoint = copy.deepcopy(parent.checkpoint)
    checkpoint["id"] = str(uuid6(clock_seq=-2))
    version = saver.get_next_version(checkpoint["channel_versions"].get("messages"), None)
    checkpoint["channel_versions"]["messages"] = version
    checkpoint["channel_values"].pop("messages", None)
    metadata = dict(parent.metadata)
    counters = dict(metadata.get("counters_since_delta_snapshot") or {})
    was = counters.get("messages") or [0, 0]
    counters["messages"] = [was[0] + 1, *was[1:]]
    metadata.update(
        source="loop",
        step=int(parent.metadata.get("step", 0)) + 1,
        run_id=run_id,
        counters_since_delta_snapshot=counters,
    )
    return await saver.aput(
        with_run(parent.config, run_id),
        checkpoint,
        metadata,  # type: ignore[arg-type]
        {"messages": version},
    )


async def kept_then_doomed_run(
    saver: TieredCheckpointSaver, cfg: RunnableConfig
) -> tuple[str, CheckpointTuple, CheckpointTuple]:
    """A run that stays, then one about to be deleted, each flushed: the doomed run's id,
    the state before it, and its latest step."""
    graph = chat_graph(saver)
    thread_id = cfg["configurable"]["thread_id"]
    kept, doomed = str(uuid.uuid4()), str(uuid.uuid4())
    await graph.ainvoke({"messages": ["first"]}, with_run(cfg, kept))
    await saver.aflush(thread_id)
    before = await saver.aget_tuple(cfg)
    await graph.ainvoke({"messages": ["second"]}, with_run(cfg, doomed))
    await saver.aflush(thread_id)
    latest = await saver.aget_tuple(cfg)
    assert before is not None and latest is not None
    return doomed, before, latest


async def delete_run_as_it_steps(
    tiers: WriteBehind, run_id: str, step: Callable[[], Awaitable[RunnableConfig]]
) -> None:
    """`adelete_for_runs([run_id])` while that run takes its next `step`, landing after the
    saver's flush and before the cold delete (refused, or stored and deleted with its run);
    then any worker's background flush."""
    cold_delete = tiers.store.delete_for_runs
    stepped: list[bool] = []

    async def delete_for_runs(run_ids: Sequence[str]) -> set[str]:
        if not stepped:
            stepped.append(True)
            with contextlib.suppress(StateError):
                await step()
        return await cold_delete(run_ids)

    tiers.store.delete_for_runs = delete_for_runs  # type: ignore[method-assign]
    try:
        await tiers.saver.adelete_for_runs([run_id])
    finally:
        tiers.store.delete_for_runs = cold_delete  # type: ignore[method-assign]
    await tiers.flusher.drain()


@dataclass
class LateStep:
    """The run's next step (one more invoke, then its flush), started once from inside a
    maintenance call and given a second there: a call that holds the flush off goes on
    without it. `done()` waits for it."""

    graph: Any
    saver: TieredCheckpointSaver
    config: RunnableConfig
    task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.task is not None:
            return
        self.task = asyncio.create_task(self._step())
        await asyncio.wait([self.task], timeout=1.0)

    async def _step(self) -> None:
        await self.graph.ainvoke({"messages": ["user late"]}, self.config)
        await self.saver.aflush(self.config["configurable"]["thread_id"])

    async def done(self) -> None:
        if self.task is not None:
            await self.task


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_step_landing_inside_delete_thread_does_not_bring_the_thread_back(
    backend: str, stack_env: dict[str, str]
) -> None:
    """The run's next step lands after `delete_thread` dropped the backlog, before the
    cold delete: its parent is still cold, so it would be appended, then flushed back
    onto the deleted thread. Appends are refused until the delete is done."""
    async with tiers_for(stack_env, backend) as tiers:
        saver = tiers.saver
        cfg = config()
        thread_id = cfg["configurable"]["thread_id"]
        await chat_graph(saver).ainvoke({"messages": ["hello"]}, cfg)
        await saver.aflush(thread_id)
        latest = await saver.aget_tuple(cfg)
        assert latest is not None
        cold_delete = tiers.store.delete_thread
        raced: list[object] = []

        async def delete_thread(thread: str, *, fence: int | None = None) -> None:
            try:
                raced.append(await put_child(saver, latest, "late step"))
            except StateError as exc:
                raced.append(exc)
            await cold_delete(thread, fence=fence)

        tiers.store.delete_thread = delete_thread  # type: ignore[method-assign]
        await saver.adelete_thread(thread_id)
        tiers.store.delete_thread = cold_delete  # type: ignore[method-assign]
        assert isinstance(raced[0], StateError)
        await tiers.flusher.drain()  # any worker's background pass
        assert await TieredCheckpointSaver(tiers.store).aget_tuple(cfg) is None
        assert await saver.aget_tuple(cfg) is None


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_step_of_a_run_delete_for_runs_deletes_landing_meanwhile_never_is_the_latest(
    backend: str, stack_env: dict[str, str]
) -> None:
    async with tiers_for(stack_env, backend) as tiers:
        saver = tiers.saver
        cfg = config()
        doomed, before, latest = await kept_then_doomed_run(saver, cfg)
        await delete_run_as_it_steps(
            tiers, doomed, lambda: put_child(saver, latest, "late step", run_id=doomed)
        )
        now = await TieredCheckpointSaver(tiers.store).aget_tuple(cfg)
        assert now is not None
        assert now.checkpoint["id"] == before.checkpoint["id"]


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_delta_step_of_a_run_delete_for_runs_deletes_leaves_a_state_the_thread_had(
    backend: str, stack_env: dict[str, str]
) -> None:
    async with tiers_for(stack_env, backend) as tiers:
        saver = tiers.saver
        graph = delta_graph(saver, snapshot_frequency=3, message="m" * 64)
        cfg = config()
        thread_id = cfg["configurable"]["thread_id"]
        doomed = str(uuid.uuid4())
        for n in range(4):
            await graph.ainvoke({"messages": [f"u{n}"]}, with_run(cfg, str(uuid.uuid4())))
        await saver.aflush(thread_id)
        want = (await graph.aget_state(cfg)).values
        await graph.ainvoke({"messages": ["doomed"]}, with_run(cfg, doomed))
        await saver.aflush(thread_id)
        latest = await saver.aget_tuple(cfg)
        assert latest is not None
        await delete_run_as_it_steps(tiers, doomed, lambda: put_delta_step(saver, latest, doomed))
        async with tiers_for(stack_env, backend) as other:
            fresh = delta_graph(
                TieredCheckpointSaver(other.store), snapshot_frequency=3, message="m" * 64
            )
            assert (await fresh.aget_state(cfg)).values == want


@pytest.mark.parametrize("after_pass", [1, 2])
async def test_a_cosmos_copy_while_the_source_flushes_is_a_state_the_source_had(
    after_pass: int, stack_env: dict[str, str]
) -> None:
    """Cosmos copies a thread in passes (values and writes, holders, checkpoints): a step
    of the source flushed between two of them must not be copied without its writes."""
    async with tiers_for(stack_env, "cosmos") as tiers:
        await _copy_with_a_step_after_pass(tiers, tiers.saver, after_pass, flushed=True)


@pytest.mark.parametrize("after_pass", [1, 2])
async def test_a_write_through_cosmos_copy_while_the_source_steps_is_a_state_the_source_had(
    after_pass: int, stack_env: dict[str, str]
) -> None:
    """Write-through, no flush lock to hold the run off: a step of the source stored
    between two of the copy's passes must not be copied without its values or writes."""
    async with tiers_for(stack_env, "cosmos") as tiers:
        saver = TieredCheckpointSaver(tiers.store)
        await _copy_with_a_step_after_pass(tiers, saver, after_pass, flushed=False)


async def _copy_with_a_step_after_pass(
    tiers: WriteBehind, saver: TieredCheckpointSaver, after_pass: int, *, flushed: bool
) -> None:
    """A DeltaChannel thread copied while a step of its run is stored after the copy's
    pass `after_pass`: the copy is a state the source had, every parent copied too."""
    graph = delta_graph(saver, message="m" * 64)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    for n in range(7):
        await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
    if flushed:
        await saver.aflush(thread_id)
    maintenance = tiers.store._maintenance  # type: ignore[attr-defined]
    copy_pass = maintenance._copy
    passes = 0
    late = LateStep(graph, saver, cfg)

    async def copy_one_pass(*args: Any, **kwargs: Any) -> None:
        nonlocal passes
        await copy_pass(*args, **kwargs)
        passes += 1
        if passes == after_pass:
            await late.start()

    maintenance._copy = copy_one_pass
    target = config("race-copy")
    try:
        await saver.acopy_thread(thread_id, target["configurable"]["thread_id"])
    finally:
        maintenance._copy = copy_pass
    await late.done()
    copied = await graph.aget_state(target)
    at = copied.config["configurable"]["checkpoint_id"]
    source = await graph.aget_state({"configurable": {"thread_id": thread_id, "checkpoint_id": at}})
    assert copied.values == source.values
    async for state in graph.aget_state_history(target):  # every parent copied too
        if state.parent_config is not None:
            assert await saver.aget_tuple(state.parent_config) is not None


@pytest.mark.parametrize("kind", ["chat", "delta"])
async def test_a_cosmos_prune_while_the_run_flushes_keeps_its_latest_readable(
    kind: str, stack_env: dict[str, str]
) -> None:
    """The chunk collector reads the manifests, then the chunks: a step flushed between
    them must not lose the chunks it added (collected as unreached)."""

    def build(saver: TieredCheckpointSaver) -> Any:
        return chat_graph(saver) if kind == "chat" else delta_graph(saver, snapshot_frequency=2)

    async with tiers_for(stack_env, "cosmos") as tiers:
        saver = tiers.saver
        graph = build(saver)
        cfg = config()
        thread_id = cfg["configurable"]["thread_id"]
        for n in range(4):
            await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
        await saver.aflush(thread_id)
        store = tiers.store
        read_chunks = store._chunks  # type: ignore[attr-defined]
        late = LateStep(graph, saver, cfg)

        async def chunks(*args: Any, **kwargs: Any) -> Any:
            await late.start()
            return await read_chunks(*args, **kwargs)

        store._chunks = chunks  # type: ignore[attr-defined]
        try:
            await saver.aprune([thread_id], strategy="keep_latest")
        finally:
            store._chunks = read_chunks  # type: ignore[attr-defined]
        await late.done()
        want = (await graph.aget_state(cfg)).values
        async with tiers_for(stack_env, "cosmos") as other:  # no memory of the splits
            assert (await build(TieredCheckpointSaver(other.store)).aget_state(cfg)).values == want


async def test_a_postgres_prune_while_the_run_flushes_keeps_its_latest_readable(
    stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Postgres collects chunks in three statements (manifests, chunks, delete): a batch
    committed between them must not lose the chunks it added."""
    from state.cold import postgres_checkpoints

    async with tiers_for(stack_env, "postgres") as tiers:
        saver = tiers.saver
        graph = chat_graph(saver)
        cfg = config()
        thread_id = cfg["configurable"]["thread_id"]
        for n in range(4):
            await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
        await saver.aflush(thread_id)
        late = LateStep(graph, saver, cfg)

        collect_chunks = postgres_checkpoints._collect_chunks

        async def collect(conn: Any, threads: Any) -> Any:
            class StepAfterManifests:
                async def execute(self, sql: Any, *args: Any, **kwargs: Any) -> Any:
                    if sql is postgres_checkpoints.CHUNK_NODES_SQL:
                        await late.start()
                    return await conn.execute(sql, *args, **kwargs)

            return await collect_chunks(StepAfterManifests(), threads)

        monkeypatch.setattr(postgres_checkpoints, "_collect_chunks", collect)
        await saver.aprune([thread_id], strategy="keep_latest")
        monkeypatch.setattr(postgres_checkpoints, "_collect_chunks", collect_chunks)
        await late.done()
        want = (await graph.aget_state(cfg)).values
        async with tiers_for(stack_env, "postgres") as other:
            assert (
                await chat_graph(TieredCheckpointSaver(other.store)).aget_state(cfg)
            ).values == (want)


@pytest.mark.parametrize("cached", [False, True])
async def test_a_write_through_postgres_prune_while_the_run_steps_keeps_its_latest_readable(
    cached: bool, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Write-through, no flush lock to hold the run off: a step committed between the
    chunk collector's statements (manifests, chunks, delete) must not lose the chunks it
    added. The prune takes the thread's maintenance lock, which every put of a child
    shares, so the step waits for the prune."""
    from state.cold import postgres_checkpoints

    async with tiers_for(stack_env, "postgres") as tiers:
        saver = TieredCheckpointSaver(tiers.store, tiers.cache if cached else None)
        graph = chat_graph(saver)
        cfg = config()
        thread_id = cfg["configurable"]["thread_id"]
        for n in range(4):
            await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
        late = LateStep(graph, saver, cfg)
        collect_chunks = postgres_checkpoints._collect_chunks

        async def collect(conn: Any, threads: Any) -> Any:
            class StepAfterManifests:
                async def execute(self, sql: Any, *args: Any, **kwargs: Any) -> Any:
                    if sql is postgres_checkpoints.CHUNK_NODES_SQL:
                        await late.start()
                    return await conn.execute(sql, *args, **kwargs)

            return await collect_chunks(StepAfterManifests(), threads)

        monkeypatch.setattr(postgres_checkpoints, "_collect_chunks", collect)
        await saver.aprune([thread_id], strategy="keep_latest")
        monkeypatch.setattr(postgres_checkpoints, "_collect_chunks", collect_chunks)
        await asyncio.wait_for(late.done(), timeout=10)
        await _the_late_step_is_latest(graph, cfg, stack_env, "postgres")


@pytest.mark.parametrize("cached", [False, True])
async def test_a_write_through_cosmos_prune_while_the_run_steps_keeps_its_latest_readable(
    cached: bool, stack_env: dict[str, str]
) -> None:
    """Write-through, nothing holds the run off: a step stored between the block
    collector's read of the manifests and its listing of the thread's blocks adds blocks
    no manifest it read reaches. They are too new to be judged, so they stay."""
    async with tiers_for(stack_env, "cosmos") as tiers:
        saver = TieredCheckpointSaver(tiers.store, tiers.cache if cached else None)
        graph = chat_graph(saver)
        cfg = config()
        thread_id = cfg["configurable"]["thread_id"]
        for n in range(4):
            await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
        store = tiers.store
        read_chunks = store._chunks  # type: ignore[attr-defined]
        stepped: list[bool] = []

        async def chunks(*args: Any, **kwargs: Any) -> Any:
            # The collector's first request after the manifests: the whole step lands here.
            if not stepped:
                stepped.append(True)
                await graph.ainvoke({"messages": ["user late"]}, cfg)
            return await read_chunks(*args, **kwargs)

        store._chunks = chunks  # type: ignore[attr-defined]
        try:
            await saver.aprune([thread_id], strategy="keep_latest")
        finally:
            store._chunks = read_chunks  # type: ignore[attr-defined]
        assert stepped
        await _the_late_step_is_latest(graph, cfg, stack_env, "cosmos")


async def _the_late_step_is_latest(
    graph: Any, cfg: RunnableConfig, stack_env: dict[str, str], backend: str
) -> None:
    """The step acknowledged during the prune is kept as the thread's latest, and a store
    with no memory of its splits reads the same state."""
    want = (await graph.aget_state(cfg)).values
    assert "user late" in want["messages"]
    async with tiers_for(stack_env, backend) as other:
        assert (await chat_graph(TieredCheckpointSaver(other.store)).aget_state(cfg)).values == want


@pytest.mark.parametrize("mode", ["write-behind", "write-through"])
async def test_a_postgres_sweep_spares_a_thread_whose_run_resumed_after_its_first_look(
    mode: str, stack_env: dict[str, str], fresh_postgres_url: str
) -> None:
    import state.cold.postgres_retention as postgres_retention

    settings = stack_settings(
        stack_env,
        "postgres",
        True,
        mode,
        state_cold_ttl_seconds=1,
        postgres_url=fresh_postgres_url,
    )
    async with open_stack(settings) as opened:
        saver = opened.saver
        graph = chat_graph(saver)
        cfg = config()
        thread_id = cfg["configurable"]["thread_id"]
        await graph.ainvoke({"messages": ["old"]}, cfg)
        await saver.aflush(thread_id)
        await asyncio.sleep(2.5)  # idle for more than the TTL
        find_expired = postgres_retention._expired
        resumed: list[object] = []

        async def expired(conn: Any, params: Any, limit: int) -> Any:
            found = await find_expired(conn, params, limit)
            if thread_id in found and not resumed:
                # The run resumes now, and its boundary is acknowledged durable.
                resumed.append(await graph.ainvoke({"messages": ["resumed"]}, cfg))
                await saver.aflush(thread_id)
            return found

        postgres_retention._expired = expired  # type: ignore[assignment]
        try:
            await opened.backends.retention.sweep(limit=10)  # type: ignore[union-attr]
        finally:
            postgres_retention._expired = find_expired  # type: ignore[assignment]
        assert resumed
        assert await TieredCheckpointSaver(opened.backends.checkpoints).aget_tuple(cfg) is not None


@pytest.mark.parametrize("mode", ["write-behind", "write-through"])
async def test_a_cosmos_sweep_spares_a_thread_whose_run_resumed_after_its_first_look(
    mode: str, stack_env: dict[str, str]
) -> None:
    settings = stack_settings(
        stack_env,
        "cosmos",
        True,
        mode,
        state_cold_ttl_seconds=1,
        cosmos_container=f"race-sweep-{uuid.uuid4().hex[:8]}",
    )
    try:
        async with open_stack(settings) as opened:
            saver = opened.saver
            graph = chat_graph(saver)
            cfg = config()
            thread_id = cfg["configurable"]["thread_id"]
            await graph.ainvoke({"messages": ["old"]}, cfg)
            await saver.aflush(thread_id)
            await asyncio.sleep(2.5)  # idle for more than the TTL
            cold = opened.backends.retention._cold  # type: ignore[union-attr]
            is_held = cold._held
            resumed: list[object] = []

            async def held(thread: str) -> bool:
                # Just after the sweep found the thread expired: the run resumes, and its
                # boundary is acknowledged durable.
                if thread == thread_id and not resumed:
                    resumed.append(await graph.ainvoke({"messages": ["resumed"]}, cfg))
                    await saver.aflush(thread_id)
                return bool(await is_held(thread))

            cold._held = held
            try:
                await opened.backends.retention.sweep(limit=10)  # type: ignore[union-attr]
            finally:
                cold._held = is_held
            assert resumed
            latest = await TieredCheckpointSaver(opened.backends.checkpoints).aget_tuple(cfg)
            assert latest is not None
    finally:
        await drop_container(settings)


async def test_a_prune_and_a_sweep_taking_two_threads_locks_in_opposite_orders_both_finish(
    stack_env: dict[str, str], fresh_postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweep holds each expiring thread's flush lock (`discarding`) until it deleted
    them all, in the order the cold tier lists them. A prune holding A while it waited for
    B, as the sweep holding B came to A, would leave each waiting for the other until its
    lock wait ran out (60 s; 3 s here): a prune holds one thread's lock at a time."""
    import state.cold.postgres_retention as postgres_retention

    monkeypatch.setattr(flusher_module, "LOCK_WAIT_SECONDS", 3.0)
    settings = stack_settings(
        stack_env,
        "postgres",
        True,
        "write-behind",
        state_cold_ttl_seconds=1,
        postgres_url=fresh_postgres_url,
    )
    async with open_stack(settings) as opened:
        saver = opened.saver
        graph = chat_graph(saver)
        suffix = uuid.uuid4().hex[:8]
        a, b = f"race-a-{suffix}", f"race-b-{suffix}"
        for thread_id in (a, b):
            await graph.ainvoke({"messages": ["old"]}, {"configurable": {"thread_id": thread_id}})
            await saver.aflush(thread_id)
        await asyncio.sleep(2.5)  # both idle for more than the TTL
        find_expired = postgres_retention._expired

        async def expired(conn: Any, params: Any, limit: int) -> Any:
            found = await find_expired(conn, params, limit)
            # The order the cold tier happens to list them in: B before A.
            return sorted(found, key=lambda t: (t != b, t != a, t))

        monkeypatch.setattr(postgres_retention, "_expired", expired)
        retention = opened.backends.retention
        forget = retention._forget  # type: ignore[union-attr]
        pruning: list[asyncio.Task[None]] = []

        async def forget_then_prune(thread_id: str, held: Any, deadline: Any) -> Any:
            fence = await forget(thread_id, held, deadline)
            if thread_id == b and not pruning:
                # A prune of both threads starts while the sweep holds B.
                pruning.append(asyncio.create_task(saver.aprune([a, b])))
                await asyncio.sleep(0.5)  # it takes A's lock, then waits for B's
            return fence

        retention._forget = forget_then_prune  # type: ignore[union-attr]
        outcomes = []
        try:
            outcomes.append(
                await asyncio.gather(
                    retention.sweep(limit=10),  # type: ignore[union-attr]
                    return_exceptions=True,
                )
            )
        finally:
            retention._forget = forget  # type: ignore[union-attr]
        outcomes.append(await asyncio.gather(*pruning, return_exceptions=True))
        errors = [o for group in outcomes for o in group if isinstance(o, BaseException)]
        assert errors == [], errors


@pytest.mark.parametrize("operation", ["prune", "copy"])
async def test_a_flush_lock_lost_during_a_prune_or_copy_does_not_fail_the_finished_call(
    operation: str, stack_env: dict[str, str]
) -> None:
    """The flush lock lost while the store call ran (its lease ran out: a flush may have
    interleaved): the prune or copy is done again under a new lock (it is idempotent),
    not failed with `LockLost` after it changed the cold tier."""
    from state.hot.redis_write_behind import FLUSH_LOCK_KIND, _thread_key

    async with tiers_for(stack_env, "postgres") as tiers:
        saver = tiers.saver
        cfg = config("race-lost")
        thread_id = cfg["configurable"]["thread_id"]
        graph = chat_graph(saver)
        for n in range(3):
            await graph.ainvoke({"messages": [f"user {n}"]}, cfg)
        await saver.aflush(thread_id)
        lock_key = _thread_key(tiers.cache, thread_id, FLUSH_LOCK_KIND)
        name = "prune" if operation == "prune" else "copy_thread"
        original = getattr(tiers.store, name)

        lost: list[bool] = []

        async def slow(*args: Any, **kwargs: Any) -> Any:
            result = await original(*args, **kwargs)
            if lost:
                return result
            lost.append(True)
            # Once, the lock key goes (evicted, or it lapsed under a Redis hiccup) while the
            # store call finishes: the renewer finds it gone (ttl 2 s, renewed every 0.67 s).
            await tiers.redis.delete(lock_key)
            await asyncio.sleep(1.0)
            return result

        setattr(tiers.store, name, slow)
        try:
            if operation == "prune":
                await saver.aprune([thread_id])
            else:
                await saver.acopy_thread(thread_id, f"race-copy-{uuid.uuid4().hex[:8]}")
        except LockLost as exc:
            pytest.fail(f"{operation} finished in the cold tier, then raised {exc!r}")
        finally:
            setattr(tiers.store, name, original)


async def test_a_run_stepping_through_every_late_round_then_stopping_is_deleted_without_error(
    stack_env: dict[str, str],
) -> None:
    """The run steps once inside each of `delete_for_runs`' first cold deletes (after the
    saver's flush, then after each late round's flush), then stops: the last round flushes
    and deletes its last step, so the call succeeds, the run gone."""
    from state.checkpoint.saver import LATE_RUN_PUT_ROUNDS

    async with tiers_for(stack_env, "postgres") as tiers:
        saver = tiers.saver
        cfg = config("race-rounds")
        doomed, before, _ = await kept_then_doomed_run(saver, cfg)
        cold_delete = tiers.store.delete_for_runs
        steps: list[RunnableConfig] = []

        async def delete_for_runs(run_ids: Sequence[str]) -> set[str]:
            if len(steps) < LATE_RUN_PUT_ROUNDS:
                # The run's latest: the step the round before just flushed.
                parent = await saver.aget_tuple(cfg)
                assert parent is not None
                steps.append(await put_child(saver, parent, f"late {len(steps)}", run_id=doomed))
            return await cold_delete(run_ids)

        tiers.store.delete_for_runs = delete_for_runs  # type: ignore[method-assign]
        try:
            await saver.adelete_for_runs([doomed])
        finally:
            tiers.store.delete_for_runs = cold_delete  # type: ignore[method-assign]
        assert len(steps) == LATE_RUN_PUT_ROUNDS
        await tiers.flusher.drain()
        now = await TieredCheckpointSaver(tiers.store).aget_tuple(cfg)
        assert now is not None
        assert now.checkpoint["id"] == before.checkpoint["id"]


async def test_a_run_stepping_past_every_late_round_is_refused_as_still_writing(
    stack_env: dict[str, str],
) -> None:
    """The run steps inside each of `delete_for_runs`' cold deletes, one more than its late
    rounds: the call gives up saying the run is still writing (Redis and the cold store
    answered every call), typed for a caller to tell apart, retried as an outage is."""
    from state.checkpoint.saver import LATE_RUN_PUT_ROUNDS

    async with tiers_for(stack_env, "postgres") as tiers:
        saver = tiers.saver
        cfg = config("race-still-writing")
        doomed, _, _ = await kept_then_doomed_run(saver, cfg)
        cold_delete = tiers.store.delete_for_runs
        steps: list[RunnableConfig] = []

        async def delete_for_runs(run_ids: Sequence[str]) -> set[str]:
            parent = await saver.aget_tuple(cfg)
            assert parent is not None
            steps.append(await put_child(saver, parent, f"late {len(steps)}", run_id=doomed))
            return await cold_delete(run_ids)

        tiers.store.delete_for_runs = delete_for_runs  # type: ignore[method-assign]
        try:
            with pytest.raises(RunsStillWriting) as raised:
                await saver.adelete_for_runs([doomed])
        finally:
            tiers.store.delete_for_runs = cold_delete  # type: ignore[method-assign]
        assert len(steps) == LATE_RUN_PUT_ROUNDS + 1
        assert isinstance(raised.value, BackendUnavailable)
        message = str(raised.value)
        assert "unavailable" not in message, message
        assert f"runs ['{doomed}'] are still writing to" in message, message


async def test_delete_for_runs_deletes_a_run_whose_checkpoints_were_all_unflushed(
    stack_env: dict[str, str],
) -> None:
    """A run whose every checkpoint is still only in the write-behind log when
    `delete_for_runs` starts is flushed by it first, then deleted: none comes back."""
    async with tiers_for(stack_env, "postgres") as tiers:
        saver = tiers.saver
        graph = chat_graph(saver)
        cfg, other = config("race-unflushed"), config("race-unflushed")
        doomed = str(uuid.uuid4())
        await graph.ainvoke({"messages": ["only in the log"]}, with_run(cfg, doomed))
        await graph.ainvoke({"messages": ["same run, other thread"]}, with_run(other, doomed))
        for c in (cfg, other):
            assert await tiers.flusher.log.pending(c["configurable"]["thread_id"])
        await saver.adelete_for_runs([doomed])
        await tiers.flusher.drain()
        cold = TieredCheckpointSaver(tiers.store)
        for c in (cfg, other):
            assert await cold.aget_tuple(c) is None
            assert await saver.aget_tuple(c) is None


async def test_a_thread_deleted_as_redis_fails_to_end_the_refusal_takes_a_new_run_once_back(
    stack_env: dict[str, str],
) -> None:
    """`delete_thread` refuses appends to the thread until its cold delete is done; Redis
    cut exactly as it ends the refusal leaves the mark set. Once Redis is back, the next
    flush pass ends it: a new run on the thread id is not refused for the mark's hour."""
    from urllib.parse import urlsplit

    from tests.faults.proxy import LoopbackProxy

    url = urlsplit(stack_env["REDIS_URL"])
    assert url.port is not None
    with LoopbackProxy(url.port) as proxy:
        proxied = url._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
        async with open_write_behind(settings_for(stack_env, "postgres", proxied)) as tiers:
            saver = tiers.saver
            graph = chat_graph(saver)
            cfg = config("race-refusal")
            thread_id = cfg["configurable"]["thread_id"]
            await graph.ainvoke({"messages": ["old conversation"]}, cfg)
            await saver.aflush(thread_id)
            log = tiers.flusher.log
            accept = log.accept_appends

            async def accept_appends(thread: str) -> None:
                proxy.cut("reset")
                try:
                    await accept(thread)
                finally:
                    proxy.restore()

            log.accept_appends = accept_appends  # type: ignore[method-assign]
            try:
                await saver.adelete_thread(thread_id)
            finally:
                log.accept_appends = accept  # type: ignore[method-assign]
            assert await saver.aget_tuple(cfg) is None
            await tiers.flusher.drain()  # any pass of this worker's flusher
            await graph.ainvoke({"messages": ["new conversation"]}, cfg)
            state = await graph.aget_state(cfg)
            assert "old conversation" not in str(state.values)


async def test_a_flush_cancelled_while_its_lease_stops_its_renewer_is_cancelled(
    stack_env: dict[str, str],
) -> None:
    """A caller cancelled while `_Lease.release` waits for its renewer to stop (here, in
    a slow renewal) is cancelled, not returned from as if it had finished; the lock is
    released all the same."""
    async with tiers_for(stack_env, "postgres") as tiers:
        thread_id = config("race-cancel")["configurable"]["thread_id"]
        log = tiers.flusher.log
        renew = log.renew_thread_lock
        renewing = asyncio.Event()

        async def slow_renewal(thread: str, token: str, *, ttl_ms: int) -> bool:
            renewing.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                await asyncio.sleep(0.5)  # a renewal's reply still on its way
                raise
            return await renew(thread, token, ttl_ms=ttl_ms)

        log.renew_thread_lock = slow_renewal  # type: ignore[method-assign]
        went_on: list[bool] = []

        async def hold() -> None:
            async with tiers.flusher.holding(thread_id):
                await renewing.wait()
            went_on.append(True)

        try:
            task = asyncio.create_task(hold())
            await renewing.wait()
            await asyncio.sleep(0.1)  # inside release, waiting for the renewer
            task.cancel()
            await asyncio.wait([task])
        finally:
            log.renew_thread_lock = renew  # type: ignore[method-assign]
        assert task.cancelled(), "the cancelled caller went on"
        assert went_on == []
        assert await log.lock_thread(thread_id, ttl_ms=2_000) is not None


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_sweep_given_a_deadline_leaves_a_thread_whose_flush_lock_is_held_for_the_next(
    backend: str,
    stack_env: dict[str, str],
    fresh_postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sweep waited LOCK_WAIT_SECONDS (60 s; 8 s here) for each expired thread whose flush
    lock another process held (a second sweeper, a stuck flusher), whatever the timer's
    deadline, then failed: it waits until its deadline at most, and leaves that thread,
    whole in both tiers, to the next sweep."""
    monkeypatch.setattr(flusher_module, "LOCK_WAIT_SECONDS", 8.0)
    settings = stack_settings(
        stack_env,
        backend,
        True,
        "write-behind",
        state_cold_ttl_seconds=1,
        postgres_url=fresh_postgres_url,
        cosmos_container=f"race-busy-{uuid.uuid4().hex[:8]}",
    )
    try:
        async with open_stack(settings) as opened, open_stack(settings) as other:
            saver = opened.saver
            graph = chat_graph(saver)
            busy, idle = config("busy"), config("idle")
            for cfg in (busy, idle):
                await graph.ainvoke({"messages": ["old"]}, cfg)
                await saver.aflush(cfg["configurable"]["thread_id"])
            busy_id = busy["configurable"]["thread_id"]
            before = await saver.aget_tuple(busy)
            assert before is not None and other.backends.flusher is not None
            token = await other.backends.flusher.log.lock_thread(busy_id, ttl_ms=60_000)
            assert token is not None
            retention = opened.backends.retention
            later = time.time() + 3600  # both idle for more than the TTL by then
            started = time.monotonic()
            try:
                swept = await retention.sweep(limit=10, now=later, deadline=started + 0.5)
            finally:
                elapsed = time.monotonic() - started
                await other.backends.flusher.log.unlock_thread(busy_id, token)
            assert elapsed < 5.0, elapsed  # the lock wait (8 s) not waited out
            cold = TieredCheckpointSaver(opened.backends.checkpoints)
            kept = await cold.aget_tuple(busy)
            assert kept is not None and kept.checkpoint["id"] == before.checkpoint["id"]
            hot = await saver.aget_tuple(busy)
            assert hot is not None and hot.checkpoint == before.checkpoint
            # Its runs write on, and the next sweep takes it once it is idle again.
            await graph.ainvoke({"messages": ["again"]}, busy)
            await saver.aflush(busy_id)
            resumed = await cold.aget_tuple(busy)
            assert resumed is not None
            assert "again" in resumed.checkpoint["channel_values"]["messages"]
            # The idle thread too, unless the first sweep got to it (Postgres: in the
            # same batch; Cosmos, a thread at a time, may have met the deadline first).
            assert swept + await retention.sweep(limit=10, now=later + 3600) == 2
            assert await cold.aget_tuple(busy) is None
            assert await cold.aget_tuple(idle) is None
            assert await saver.aget_tuple(busy) is None
    finally:
        if backend == "cosmos":
            await drop_container(settings)


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_late_step_another_flusher_flushes_right_after_delete_for_runs_is_deleted_too(
    backend: str, stack_env: dict[str, str]
) -> None:
    """The doomed run's next step is appended on its cached parent before the cold delete;
    a second worker's flusher (its own store, sharing this Redis) flushes it just after
    the delete, before `delete_for_runs` looks at the log for late steps: the log is empty
    by then, yet the step must not stay as the thread's latest state, its parent gone."""
    async with tiers_for(stack_env, backend) as tiers, tiers_for(stack_env, backend) as other:
        saver = tiers.saver
        cfg = config("race-other-flusher")
        thread_id = cfg["configurable"]["thread_id"]
        doomed, before, latest = await kept_then_doomed_run(saver, cfg)
        cold_delete = tiers.store.delete_for_runs
        flushed: list[int] = []

        async def delete_for_runs(run_ids: Sequence[str]) -> set[str]:
            if not flushed:
                await put_child(saver, latest, "late step", run_id=doomed)
                deleted = await cold_delete(run_ids)
                flushed.append(await other.flusher.flush_thread(thread_id))
                return deleted
            return await cold_delete(run_ids)

        tiers.store.delete_for_runs = delete_for_runs  # type: ignore[method-assign]
        try:
            await saver.adelete_for_runs([doomed])
        finally:
            tiers.store.delete_for_runs = cold_delete  # type: ignore[method-assign]
        assert flushed == [1]  # the late step reached the cold tier after the delete
        await tiers.flusher.drain()
        now = await TieredCheckpointSaver(tiers.store).aget_tuple(cfg)
        assert now is not None
        assert now.metadata.get("run_id") != doomed
        assert now.checkpoint["id"] == before.checkpoint["id"]


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_step_another_flusher_moves_from_a_backlog_delete_for_runs_left_is_deleted_too(
    backend: str, stack_env: dict[str, str]
) -> None:
    """The doomed run's steps are only in the log, and `delete_for_runs`' own flush of the
    thread fails (a cold hiccup): the call goes on without it, nothing of the run being
    cold. A second worker's flusher moves them to the cold tier just after the delete,
    before the call looks at the log: the log is empty by then, yet no step of the run may
    stay as the thread's latest state."""
    async with tiers_for(stack_env, backend) as tiers, tiers_for(stack_env, backend) as other:
        saver = tiers.saver
        graph = chat_graph(saver)
        cfg = config("race-left-backlog")
        thread_id = cfg["configurable"]["thread_id"]
        doomed = str(uuid.uuid4())
        await graph.ainvoke({"messages": ["kept"]}, with_run(cfg, str(uuid.uuid4())))
        await saver.aflush(thread_id)
        before = await saver.aget_tuple(cfg)
        assert before is not None
        await graph.ainvoke({"messages": ["doomed"]}, with_run(cfg, doomed))
        assert await tiers.flusher.log.pending(thread_id)
        apply, cold_delete = tiers.store.apply_batch, tiers.store.delete_for_runs
        failed: list[bool] = []
        flushed: list[int] = []

        async def apply_batch(ops: Sequence[Any], *, fence: int | None = None) -> None:
            if not failed and any(
                getattr(op, "thread_id", None) == thread_id
                or getattr(getattr(op, "checkpoint", None), "thread_id", None) == thread_id
                for op in ops
            ):
                failed.append(True)
                raise BackendUnavailable(backend, "a hiccup in this worker's flush")
            await apply(ops, fence=fence)

        async def delete_for_runs(run_ids: Sequence[str]) -> set[str]:
            deleted = await cold_delete(run_ids)
            if not flushed:
                flushed.append(await other.flusher.flush_thread(thread_id))
            return deleted

        tiers.store.apply_batch = apply_batch  # type: ignore[method-assign]
        tiers.store.delete_for_runs = delete_for_runs  # type: ignore[method-assign]
        try:
            await saver.adelete_for_runs([doomed])
        finally:
            tiers.store.apply_batch = apply  # type: ignore[method-assign]
            tiers.store.delete_for_runs = cold_delete  # type: ignore[method-assign]
        assert failed and flushed and flushed[0] > 0  # the run's steps landed after the delete
        await tiers.flusher.drain()
        now = await TieredCheckpointSaver(tiers.store).aget_tuple(cfg)
        assert now is not None
        assert now.metadata.get("run_id") != doomed
        assert now.checkpoint["id"] == before.checkpoint["id"]


@pytest.mark.parametrize("operation", ["prune", "copy"])
@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_step_put_during_a_prune_or_copy_then_lost_with_redis_fails_its_boundary(
    backend: str, operation: str, stack_env: dict[str, str]
) -> None:
    """A run's step appended while this process prunes its thread (or copies onto it)
    stays in the log (those calls delete nothing of it); Redis then loses it (FLUSHALL)
    before any flush. The run's boundary must report the loss, not acknowledge a state
    that only Redis held."""
    async with tiers_for(stack_env, backend) as tiers:
        saver = tiers.saver
        cfg, source = config("race-lost"), config("race-lost-src")
        thread_id = cfg["configurable"]["thread_id"]
        for c in (cfg, source):
            await chat_graph(saver).ainvoke({"messages": ["hello"]}, c)
            await saver.aflush(c["configurable"]["thread_id"])
        latest = await saver.aget_tuple(cfg)
        assert latest is not None
        name = "prune" if operation == "prune" else "copy_thread"
        cold_call = getattr(tiers.store, name)
        stepped: list[RunnableConfig] = []

        async def during(*args: Any, **kwargs: Any) -> None:
            stepped.append(await put_child(saver, latest, "during maintenance"))
            await cold_call(*args, **kwargs)

        setattr(tiers.store, name, during)
        try:
            if operation == "prune":
                await saver.aprune([thread_id], strategy="keep_latest")
            else:
                await saver.acopy_thread(source["configurable"]["thread_id"], thread_id)
        finally:
            setattr(tiers.store, name, cold_call)
        assert stepped and await tiers.flusher.log.pending(thread_id)
        await tiers.redis.flushall()
        with pytest.raises(HotStateLost):
            await saver.aflush(thread_id)


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_step_of_another_run_put_during_delete_for_runs_then_lost_fails_its_boundary(
    backend: str, stack_env: dict[str, str]
) -> None:
    """As for a prune: delete_for_runs of an earlier run while the thread's current run
    appends a step (not of the deleted runs, left in the log); Redis then loses it. The
    current run's boundary must report the loss."""
    async with tiers_for(stack_env, backend) as tiers:
        saver = tiers.saver
        graph = chat_graph(saver)
        cfg = config("race-lost-runs")
        thread_id = cfg["configurable"]["thread_id"]
        doomed, current = str(uuid.uuid4()), str(uuid.uuid4())
        await graph.ainvoke({"messages": ["first"]}, with_run(cfg, doomed))
        await graph.ainvoke({"messages": ["second"]}, with_run(cfg, current))
        await saver.aflush(thread_id)
        latest = await saver.aget_tuple(cfg)
        assert latest is not None and latest.metadata.get("run_id") == current
        cold_delete = tiers.store.delete_for_runs
        stepped: list[RunnableConfig] = []

        async def delete_for_runs(run_ids: Sequence[str]) -> set[str]:
            if not stepped:
                stepped.append(await put_child(saver, latest, "during", run_id=current))
            return await cold_delete(run_ids)

        tiers.store.delete_for_runs = delete_for_runs  # type: ignore[method-assign]
        try:
            await saver.adelete_for_runs([doomed])
        finally:
            tiers.store.delete_for_runs = cold_delete  # type: ignore[method-assign]
        assert stepped and await tiers.flusher.log.pending(thread_id)
        await tiers.redis.flushall()
        with pytest.raises(HotStateLost):
            await saver.aflush(thread_id)


class Said(TypedDict, total=False):
    word: str


def remembering_graph(saver: TieredCheckpointSaver) -> Any:
    """A word goes to a subgraph with a state of its own across runs (namespace "mem") if
    it starts with "mem", else to a root node alone."""
    inner = StateGraph(Said)
    inner.add_node("remember", lambda s: {"word": f"{s['word']}!"})
    inner.add_edge(START, "remember")
    inner.add_edge("remember", END)
    outer = StateGraph(Said)
    outer.add_node("talk", lambda s: {"word": f"{s['word']}?"})
    outer.add_node("mem", inner.compile(checkpointer=True))
    outer.add_conditional_edges(
        START, lambda s: "mem" if s["word"].startswith("mem") else "talk", ["mem", "talk"]
    )
    outer.add_edge("talk", END)
    outer.add_edge("mem", END)
    return outer.compile(checkpointer=saver)


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_boundary_after_a_prune_took_an_earlier_runs_superseded_step_is_not_a_loss(
    backend: str, stack_env: dict[str, str]
) -> None:
    """This worker's run leaves a subgraph's steps in the log (no boundary); another
    worker's run goes on from them in that namespace and its boundary flushes both; a
    prune then takes this worker's steps, no longer the namespace's latest. This worker's
    next run (not in the subgraph) must reach its boundary: nothing was lost."""
    async with tiers_for(stack_env, backend) as tiers, tiers_for(stack_env, backend) as other:
        cfg = config("race-superseded")
        thread_id = cfg["configurable"]["thread_id"]
        mine, theirs = remembering_graph(tiers.saver), remembering_graph(other.saver)
        await mine.ainvoke({"word": "mem one"}, cfg, durability="async")
        await theirs.ainvoke({"word": "mem two"}, cfg, durability="async")
        await other.saver.aflush(thread_id)
        await other.saver.aprune([thread_id], strategy="keep_latest")
        await mine.ainvoke({"word": "talk"}, cfg, durability="async")
        await tiers.saver.aflush(thread_id)
        assert tiers.saver.losses_found == 0
        state = await mine.aget_state(
            {"configurable": {**cfg["configurable"], "checkpoint_ns": "mem"}}
        )
        assert state.values == {"word": "mem two!"}


@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_boundary_after_a_prune_took_writes_another_worker_went_on_from_is_not_a_loss(
    backend: str, stack_env: dict[str, str]
) -> None:
    """As for a step: a task's writes this worker appended (no boundary since), which
    another worker flushed and went on from with a step of its own; a prune then takes the
    checkpoint they were on, and them with it. This worker's boundary lost nothing."""
    async with tiers_for(stack_env, backend) as tiers, tiers_for(stack_env, backend) as other:
        cfg = config("race-superseded-writes")
        thread_id = cfg["configurable"]["thread_id"]
        await chat_graph(tiers.saver).ainvoke({"messages": ["hello"]}, cfg)
        await tiers.saver.aflush(thread_id)
        latest = await tiers.saver.aget_tuple(cfg)
        assert latest is not None
        await tiers.saver.aput_writes(latest.config, [("messages", ["a result"])], "task-1")
        theirs = await other.saver.aget_tuple(cfg)
        assert theirs is not None and theirs.pending_writes
        await put_child(other.saver, theirs, "their step")
        await other.saver.aflush(thread_id)
        await other.saver.aprune([thread_id], strategy="keep_latest")
        await tiers.saver.aflush(thread_id)
        assert tiers.saver.losses_found == 0


@pytest.mark.parametrize("deletion", ["delete_for_runs", "delete_thread"])
@pytest.mark.parametrize("backend", COLD_BACKENDS)
async def test_a_run_after_another_worker_deleted_this_workers_unflushed_run_reaches_its_boundary(
    backend: str, deletion: str, stack_env: dict[str, str]
) -> None:
    """This worker's run leaves a subgraph's steps in the log (durability async: no
    boundary); another worker flushes the thread and deletes that run (or the thread).
    This worker's next run (not in the subgraph) starts from what the tiers hold: its
    boundary has nothing of the deleted run to find, and lost nothing."""
    async with tiers_for(stack_env, backend) as tiers, tiers_for(stack_env, backend) as other:
        cfg = config("race-deleted-elsewhere")
        thread_id = cfg["configurable"]["thread_id"]
        graph, run_id = remembering_graph(tiers.saver), str(uuid.uuid4())
        await graph.ainvoke({"word": "mem one"}, with_run(cfg, run_id), durability="async")
        await other.saver.aflush(thread_id)
        if deletion == "delete_for_runs":
            await other.saver.adelete_for_runs([run_id])
        else:
            await other.saver.adelete_thread(thread_id)
        await graph.ainvoke({"word": "talk"}, cfg, durability="async")
        await tiers.saver.aflush(thread_id)
        assert tiers.saver.losses_found == 0
        assert (await graph.aget_state(cfg)).values == {"word": "talk?"}
