"""Write-behind under faults: a flusher SIGKILLed mid-drain, and the cold store down while
runs go on at Redis speed.

What must hold: every checkpoint and pending write acknowledged in Redis reaches the
cold tier exactly once (re-applied batches leave the same documents), and nothing a
run wrote while the cold store was down is lost once it is back.
"""

from __future__ import annotations

import asyncio
import random
import signal
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from langchain_core.runnables import RunnableConfig

from devstack import PostgresServer
from state.checkpoint import TieredCheckpointSaver
from state.factory import backends_for
from state.settings import Settings
from tests.chat_graph import CHECKPOINTS_PER_INVOKE, chat_graph

from .conftest import Deadline, Recorder
from .processes import Worker

THREADS = 12
INVOKES_EACH = 2
KILLS = 3
PAUSE_ROUNDS = 2
SEED = 8842


def config(thread_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id}}


async def count_missing_and_duplicated(
    saver: TieredCheckpointSaver, threads: list[str], invokes: int
) -> tuple[int, int]:
    """(checkpoints or values missing from the cold tier, duplicated ones) over `threads`.

    Read after the backlog drained, so the listing is the cold tier's own.
    """
    missing = duplicated = 0
    for thread_id in threads:
        hot = await saver.aget_tuple(config(thread_id))
        assert hot is not None
        history = [item async for item in saver.alist(config(thread_id))]
        ids = [item.config["configurable"]["checkpoint_id"] for item in history]
        duplicated += len(ids) - len(set(ids))
        missing += max(0, invokes * CHECKPOINTS_PER_INVOKE - len(set(ids)))
        if (
            not ids
            or ids[0] != hot.config["configurable"]["checkpoint_id"]
            or history[0].checkpoint["channel_values"] != hot.checkpoint["channel_values"]
        ):
            missing += 1
        for item in history:
            keys = [(task_id, channel) for task_id, channel, _ in item.pending_writes or []]
            duplicated += len(keys) - len(set(keys))
    return missing, duplicated


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cosmos", "postgres"])
async def test_flusher_killed_mid_drain_loses_and_duplicates_nothing(
    backend: str,
    env_for: Callable[..., dict[str, str]],
    settings_for: Callable[..., Settings],
    reliability: Recorder,
    tmp_path: Path,
) -> None:
    rng = random.Random(SEED)
    deadline = Deadline(150)
    overrides = {
        "state_write_mode": "write-behind",
        "state_lock_ttl_ms": 1000,
        "state_flush_lock_ttl_ms": 1000,
    }
    settings = settings_for(backend, **overrides)
    killed_mid_drain = runs = 0
    missing_total = duplicated_total = 0
    async with backends_for(settings) as backends:
        assert backends.flusher is not None
        saver = TieredCheckpointSaver.from_backends(backends)
        # This process's background flusher must not race the one the test kills.
        await backends.flusher.stop()
        graph = chat_graph(saver)
        for kill in range(KILLS):
            deadline.check("kills")
            threads = [f"wb-kill-{uuid.uuid4().hex[:10]}" for _ in range(THREADS)]
            for _ in range(INVOKES_EACH):
                await asyncio.gather(
                    *(
                        graph.ainvoke({"messages": ["hi"]}, config(t), durability="async")
                        for t in threads
                    )
                )
            backlog = await backends.flusher.backlog()
            worker = Worker(
                ["drain"], env_for(backend, **overrides), tmp_path / f"drain-{kill}.log"
            )
            try:
                worker.expect(lambda e: e.get("event") == "draining", 30, "drain start")
                # Killed once a seeded share of the backlog is in the cold tier: mid-drain,
                # with batches applied and others in flight.
                target = backlog.entries * rng.uniform(0.2, 0.8)
                while (await backends.flusher.backlog()).entries > target:
                    deadline.check("the drain to get going")
                    await asyncio.sleep(0.002)
                worker.signal(signal.SIGKILL)
                worker.wait(10)
            finally:
                worker.stop()
            left = await backends.flusher.backlog()
            killed_mid_drain += 0 < left.entries < backlog.entries
            # The dead flusher's locks expire (1 s); then everything drains here.
            while (await backends.flusher.backlog()).entries:
                deadline.check("drain after the kill")
                await backends.flusher.drain()
                await asyncio.sleep(0.2)
            missing, duplicated = await count_missing_and_duplicated(saver, threads, INVOKES_EACH)
            missing_total += missing
            duplicated_total += duplicated
            runs += len(threads)
            for thread_id in threads:
                await saver.adelete_thread(thread_id)

    reliability.record(
        f"Write-behind flusher SIGKILLed mid-drain ({backend})",
        injected=f"{KILLS} drains of {THREADS} threads x {INVOKES_EACH} invokes SIGKILLed once a "
        f"seeded share of the backlog was applied; the next flusher takes over once the dead "
        f"one's locks expire",
        runs=runs,
        lost_writes=missing_total,
        silent_overwrites=0,
        observed=f"{killed_mid_drain}/{KILLS} kills landed mid-drain; "
        f"{missing_total} checkpoints or writes missing, {duplicated_total} duplicated",
    )
    assert missing_total == 0 and duplicated_total == 0
    assert killed_mid_drain >= 1  # the precondition: at least one drain was cut short


@pytest.mark.slow
async def test_cold_store_down_while_write_behind_runs_continue(
    postgres_server: PostgresServer,
    settings_for: Callable[..., Settings],
    reliability: Recorder,
) -> None:
    settings = settings_for(
        "postgres",
        postgres_url=postgres_server.url,
        state_write_mode="write-behind",
        postgres_operation_timeout_seconds=2,
        postgres_pool_timeout_seconds=1,
    )
    deadline = Deadline(120)
    threads = [f"wb-cold-down-{uuid.uuid4().hex[:10]}" for _ in range(4)]
    invokes_during = 0
    async with backends_for(settings) as backends:
        assert backends.flusher is not None
        saver = TieredCheckpointSaver.from_backends(backends)
        graph = chat_graph(saver)
        for thread_id in threads:
            await graph.ainvoke({"messages": ["hi"]}, config(thread_id), durability="async")
            await saver.aflush(thread_id)

        postgres_server.stop()
        down_until = asyncio.get_running_loop().time() + 10
        try:
            while asyncio.get_running_loop().time() < down_until:
                deadline.check("runs while the cold store is down")
                for thread_id in threads:
                    await graph.ainvoke(
                        {"messages": ["while down"]}, config(thread_id), durability="async"
                    )
                    invokes_during += 1
                await asyncio.sleep(0.5)
            backlog_during = await backends.flusher.backlog()
        finally:
            postgres_server.start()

        while (await backends.flusher.backlog()).entries:
            deadline.check("drain after the cold store is back")
            await backends.flusher.drain()
            await asyncio.sleep(0.2)
        invokes_each = 1 + invokes_during // len(threads)
        missing, duplicated = await count_missing_and_duplicated(saver, threads, invokes_each)
        for thread_id in threads:
            latest = await saver.aget_tuple(config(thread_id))
            assert latest is not None
            assert len(latest.checkpoint["channel_values"]["messages"]) == 5 * invokes_each
            await saver.adelete_thread(thread_id)

    reliability.record(
        "Cold store (postgres) down for 10 s while write-behind runs continue",
        injected="Postgres stopped for 10 s while 4 threads kept invoking a 4-node graph "
        "(durability async), then started again",
        runs=invokes_during,
        lost_writes=missing,
        silent_overwrites=0,
        observed=f"{invokes_during} invokes finished on Redis while Postgres was down "
        f"(backlog {backlog_during.entries} entries, oldest {backlog_during.oldest_age_seconds:.1f} s); "
        f"drained after: {missing} checkpoints missing, {duplicated} duplicated",
    )
    assert invokes_during >= len(threads) * 5
    assert missing == 0 and duplicated == 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cosmos", "postgres"])
async def test_flusher_paused_inside_a_batch_cannot_bring_a_deleted_thread_back(
    backend: str,
    env_for: Callable[..., dict[str, str]],
    settings_for: Callable[..., Settings],
    reliability: Recorder,
    tmp_path: Path,
) -> None:
    """A flusher process stopped inside a cold batch (its lock checked, its request not yet
    sent) outlives its flush lock; meanwhile the thread is deleted under a new lock. When
    the process goes on, the batch it was sending must not land: the thread stays deleted."""
    deadline = Deadline(120)
    overrides = {"state_write_mode": "write-behind", "state_flush_lock_ttl_ms": 1000}
    settings = settings_for(backend, **overrides)
    refused = resurrected = 0
    async with backends_for(settings) as backends:
        assert backends.flusher is not None
        saver = TieredCheckpointSaver.from_backends(backends)
        await backends.flusher.stop()  # only the paused worker flushes
        graph = chat_graph(saver)
        for round_ in range(PAUSE_ROUNDS):
            deadline.check("rounds")
            # Other tests' threads may wait in the same log: the worker pauses on these.
            prefix = f"wb-paused-{uuid.uuid4().hex[:10]}"
            threads = [f"{prefix}-{n}" for n in range(3)]
            for thread_id in threads:
                await graph.ainvoke({"messages": ["hi"]}, config(thread_id), durability="async")
            worker = Worker(
                ["drain-paused", prefix],
                env_for(backend, **overrides),
                tmp_path / f"paused-{round_}.log",
            )
            try:
                paused = worker.expect(lambda e: e.get("event") == "paused", 60, "the pause")
                # Its lease cannot be renewed while it is stopped: past the TTL, the lock
                # is free, and the thread is deleted under a lock of its own.
                await asyncio.sleep(1.5)
                for thread_id in threads:
                    await asyncio.wait_for(saver.adelete_thread(thread_id), timeout=30)
                worker.signal(signal.SIGCONT)
                worker.expect(lambda e: e.get("event") == "drained", 60, "the drain's end")
            finally:
                worker.stop()
            refused += any(
                e.get("event") == "refused" and e.get("thread_id") == paused["thread_id"]
                for e in worker.events
            )
            for thread_id in threads:
                resurrected += (
                    await backends.checkpoints.get_checkpoint(thread_id, "", None) is not None
                )

    reliability.record(
        f"Write-behind flusher paused inside a batch past its lock, thread deleted ({backend})",
        injected=f"{PAUSE_ROUNDS} times: a flusher process SIGSTOPped inside its first cold "
        "batch (lock checked, request not sent), held past its 1 s flush lock while the "
        "thread was deleted under a new lock, then SIGCONTed",
        runs=PAUSE_ROUNDS,
        lost_writes=0,
        silent_overwrites=resurrected,
        observed=f"{refused}/{PAUSE_ROUNDS} late batches refused with StaleFencingToken by the "
        f"cold store's fence; {resurrected} deleted threads came back",
    )
    assert resurrected == 0
    assert refused == PAUSE_ROUNDS
