"""A lock holder paused past its TTL (SIGSTOP) must not write once another worker took over.

Worker A takes the lock and keeps writing with its fencing token. The test
SIGSTOPs it, waits past the lock TTL, lets worker B take the lock (a higher
fence) and write, then SIGCONTs A. A's very next accepted write would be a
silent overwrite; the store must reject it with `StaleFencingToken`: the cold
store for record writes, and for checkpoint writes the thread's fence, checked
atomically with the append in write-behind mode and before the cold write in
write-through mode. That check-then-write leaves a window in write-through: a
checkpoint admitted just before the pause is written after it. It is older than
the new run's checkpoints, so it lands beside their chain and is never served
as the latest; the checkpoint row reports how many did.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from langchain_core.runnables import RunnableConfig

from state.checkpoint import TieredCheckpointSaver
from state.factory import backends_for
from state.settings import Settings
from state.tiered import TieredStateStore

from .conftest import Recorder
from .processes import Worker

RUNS_PER_BACKEND = 3
LOCK_TTL_MS = 1500


@pytest.mark.parametrize("backend", ["cosmos", "postgres"])
async def test_paused_lock_holder_is_fenced_off(
    backend: str,
    env_for: Callable[..., dict[str, str]],
    settings_for: Callable[..., Settings],
    tmp_path: Path,
    reliability: Recorder,
) -> None:
    env = env_for(backend)
    stale_rejections = 0
    silent_overwrites = 0
    lost_writes = 0
    version_rejections = 0
    async with backends_for(settings_for(backend)) as backends:
        store = TieredStateStore.from_backends(backends)
        for run in range(RUNS_PER_BACKEND):
            thread_id = f"fence-{backend}-{uuid.uuid4().hex[:10]}"
            lock_name = f"lock-{thread_id}"
            await store.create(thread_id, {"holder": None}, agent_id="fence-test")
            args = [thread_id, lock_name, str(LOCK_TTL_MS)]
            # B starts first (it only waits), so both interpreters boot in parallel.
            taker = Worker(["fence-take", *args], env, tmp_path / f"take-{run}.log")
            holder = Worker(["fence-hold", *args], env, tmp_path / f"hold-{run}.log")
            try:
                taker.expect(lambda e: e.get("event") == "ready", 60, "taker ready")
                locked = holder.expect(lambda e: e.get("event") == "locked", 60, "holder's lock")
                holder.expect(lambda e: e.get("event") == "wrote", 60, "holder's first write")
                holder.signal(signal.SIGSTOP)
                paused_at = time.monotonic()
                # A is paused while its lock is still valid ...
                assert paused_at < locked["at"] + LOCK_TTL_MS / 1000
                taker.send("go")
                took = taker.expect(lambda e: e.get("event") == "took", 30, "takeover")
                # ... and B could only lock once that TTL had run out while A was stopped.
                assert time.monotonic() >= locked["at"] + LOCK_TTL_MS / 1000
                assert took["fence"] > locked["fence"]
                holder.signal(signal.SIGCONT)
                ending = holder.expect(
                    lambda e: e.get("event") in ("stale", "exhausted"), 30, "holder's end"
                )
                # Versions only grow: a write accepted after the takeover is newer than it.
                after = [
                    e
                    for e in holder.events
                    if e.get("event") == "wrote" and e["version"] > took["version"]
                ]
                version_rejections += sum(1 for e in holder.events if e.get("event") == "conflict")
                if ending["event"] == "stale":
                    stale_rejections += 1
                    assert ending["presented"] < ending["highest"] == took["fence"]
                silent_overwrites += len(after)

                final = await backends.cold.get(thread_id)
                assert final is not None
                if (
                    final.sections["holder"]["fence"] != took["fence"]
                    or final.version != took["version"]
                ):
                    lost_writes += 1
                # The hot tier agrees with cold (the rejected write touched neither).
                cached = await store.get(thread_id)
                assert cached is not None and cached.sections == final.sections
            finally:
                holder.stop()
                taker.stop()
            await backends.cold.delete(thread_id)

    reliability.record(
        f"Lock holder paused past its TTL ({backend})",
        injected=f"SIGSTOP the lock-holding worker process for > {LOCK_TTL_MS} ms TTL, "
        "another worker takes the lock and writes, then SIGCONT",
        runs=RUNS_PER_BACKEND,
        lost_writes=lost_writes,
        silent_overwrites=silent_overwrites,
        observed=f"{stale_rejections}/{RUNS_PER_BACKEND} late writes rejected with "
        f"StaleFencingToken ({version_rejections} first refused as VersionConflict)",
    )
    assert silent_overwrites == 0
    assert lost_writes == 0
    assert stale_rejections == RUNS_PER_BACKEND


CHECKPOINT_RUNS = 2


async def stored_checkpoints(
    saver: TieredCheckpointSaver, cold_only: TieredCheckpointSaver, thread_id: str
) -> set[str]:
    """Ids of every checkpoint the thread holds once its write-behind backlog is flushed."""
    await saver.aflush(thread_id)
    config: RunnableConfig = {"configurable": {"thread_id": thread_id}}
    return {c.config["configurable"]["checkpoint_id"] async for c in cold_only.alist(config)}


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
@pytest.mark.parametrize("backend", ["cosmos", "postgres"])
async def test_a_paused_runners_late_checkpoint_is_refused(
    backend: str,
    mode: str,
    env_for: Callable[..., dict[str, str]],
    settings_for: Callable[..., Settings],
    tmp_path: Path,
    reliability: Recorder,
) -> None:
    env = env_for(backend, state_write_mode=mode)
    stale_rejections = 0
    silent_overwrites = 0
    beside = 0
    lost_writes = 0
    async with backends_for(settings_for(backend, state_write_mode=mode)) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        cold_only = TieredCheckpointSaver(backends.checkpoints)
        for run in range(CHECKPOINT_RUNS):
            thread_id = f"cp-fence-{backend}-{uuid.uuid4().hex[:10]}"
            args = [thread_id, f"lock-{thread_id}", str(LOCK_TTL_MS)]
            taker = Worker(["cp-take", *args], env, tmp_path / f"cp-take-{run}.log")
            holder = Worker(["cp-hold", *args], env, tmp_path / f"cp-hold-{run}.log")
            try:
                taker.expect(lambda e: e.get("event") == "ready", 60, "taker ready")
                locked = holder.expect(lambda e: e.get("event") == "locked", 60, "holder's lock")
                holder.expect(lambda e: e.get("event") == "wrote", 60, "holder's first run")
                holder.signal(signal.SIGSTOP)
                assert time.monotonic() < locked["at"] + LOCK_TTL_MS / 1000
                taker.send("go")
                took = taker.expect(lambda e: e.get("event") == "took", 30, "takeover")
                assert time.monotonic() >= locked["at"] + LOCK_TTL_MS / 1000
                assert took["fence"] > locked["fence"]
                # Judged by the store, not by when the holder printed: a pause between an
                # accepted put and its "wrote" line is not a late write.
                stored_at_takeover = await stored_checkpoints(saver, cold_only, thread_id)
                holder.signal(signal.SIGCONT)
                ending = holder.expect(
                    lambda e: e.get("event") in ("stale", "exhausted"), 30, "holder's end"
                )
                holder.wait(30)
                late = await stored_checkpoints(saver, cold_only, thread_id) - stored_at_takeover
                # A late checkpoint newer than the new run's would shadow it. An older one
                # was admitted before the pause and written after it (write-through checks
                # the fence, then writes): it lands beside the new run's chain, never on it.
                silent_overwrites += sum(1 for cid in late if cid > took["checkpoint_id"])
                beside += sum(1 for cid in late if cid < took["checkpoint_id"])
                if ending["event"] == "stale":
                    stale_rejections += 1
                    assert ending["presented"] < ending["highest"] == took["fence"]

                # The newer run's checkpoint is the latest, whole, in the cold tier and in
                # what readers are served.
                config = {"configurable": {"thread_id": thread_id}}
                for reader in (cold_only, saver):
                    latest = await reader.aget_tuple(config)
                    if (
                        latest is None
                        or latest.config["configurable"]["checkpoint_id"] != took["checkpoint_id"]
                        or latest.checkpoint["channel_values"]["messages"] != took["messages"]
                    ):
                        lost_writes += 1
            finally:
                holder.stop()
                taker.stop()
            await saver.adelete_thread(thread_id)

    reliability.record(
        f"Runner paused past its TTL writes a late checkpoint ({backend}, {mode})",
        injected=f"SIGSTOP the lock-holding runner (a graph checkpointing with its fencing "
        f"token) for > {LOCK_TTL_MS} ms TTL, another runner takes the lock and checkpoints, "
        "then SIGCONT",
        runs=CHECKPOINT_RUNS,
        lost_writes=lost_writes,
        silent_overwrites=silent_overwrites,
        observed=f"{stale_rejections}/{CHECKPOINT_RUNS} late checkpoints refused with "
        f"StaleFencingToken; the newer run's checkpoint was the latest in "
        f"{2 * CHECKPOINT_RUNS - lost_writes}/{2 * CHECKPOINT_RUNS} reads (cold tier, served); "
        f"{beside} checkpoint(s) admitted before the pause landed after it, older than the "
        "newer run's, beside its chain",
    )
    assert silent_overwrites == 0
    if mode == "write-behind":
        assert beside == 0  # the fence is checked atomically with the append
    assert lost_writes == 0
    assert stale_rejections == CHECKPOINT_RUNS
