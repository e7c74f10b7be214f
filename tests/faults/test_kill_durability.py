"""A worker process SIGKILLed mid-workflow, per LangGraph durability mode.

A fork server (worker.py `zygote`) runs the support-case graph in a child per
case; the test kills the child at a seeded random moment, either anywhere in
the run or inside the window right after a step wrote its section and before
LangGraph heard back from it (the app's own fault hook holds the step open).
Then it resumes the case in this process, the way the timer would, and checks:

- nothing acknowledged is lost or silently changed: every section stored
  before the kill is still there with the same value after the resume;
- side effects happen once: the provider's ledger has one refund and one
  reset link per case, whatever re-ran;
- what is redone is what the mode promises and no more: `sync` re-runs at
  most the superstep in flight, `async` at most that one and the one whose
  checkpoint was still being written, `exit` may redo the whole run (it only
  checkpoints when the run exits) but never leaves a partial checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from state.factory import backends_for
from state.ports import ColdStateStore
from state.settings import Settings
from state.tiered import TieredStateStore
from support_cases.agents import RunContext
from support_cases.effects import EffectInProgress, SimulatedProvider, effect_key
from support_cases.service import case_config
from tests.support.effects import provider_calls

from .apps import AUTO_APPROVED_SECTIONS, EFFECT_KEYS, App, normalized, open_runtime
from .conftest import Deadline, Recorder
from .processes import Worker

KILLS_PER_MODE = 20
SEED = 8842
# Supersteps of the auto-approved demo case: billing and account run side by side.
SUPERSTEP = {
    "intake": 0,
    "billing_agent": 1,
    "account_agent": 1,
    "policy_agent": 2,
    "refund_agent": 3,
    "response_agent": 4,
}
NODE_SECTION = {
    "intake": "intake",
    "billing_agent": "billing",
    "account_agent": "account",
    "policy_agent": "policy",
    "refund_agent": "refund",
    "response_agent": "response",
}
# Supersteps a resume may redo after a kill, per durability mode (None: no bound).
REDO_BOUND: dict[str, int | None] = {"sync": 1, "async": 2, "exit": None}
STALE_RUNS = 5
# Effect claims are leased for the lock TTL: short, so a resume need not wait long.
LOCK_TTL_MS = 400
# Likewise the write-behind flush lock a killed child may hold: a read of its thread
# waits for it to lapse (5 s by default; renewed at a third of it while held).
FLUSH_LOCK_TTL_MS = 1_000
LEASE_WAITS = 10


@dataclass
class Tally:
    kills: int = 0
    mid_run: int = 0
    in_pause_window: int = 0
    lost_writes: int = 0
    silent_overwrites: int = 0
    duplicate_effects: int = 0
    partial_checkpoints: int = 0
    redone_supersteps: list[int] = field(default_factory=list)
    # Records whose hot copy, as served, was older than cold right after the kill.
    stale_hot: int = 0


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    return False


@pytest.fixture
def zygote(env_for: Callable[..., dict[str, str]], tmp_path: Path) -> Iterator[Worker]:
    env = env_for(
        "cosmos", state_lock_ttl_ms=LOCK_TTL_MS, state_flush_lock_ttl_ms=FLUSH_LOCK_TTL_MS
    )
    worker = Worker(["zygote"], env, tmp_path / "zygote.log")
    try:
        worker.expect(lambda e: e.get("event") == "ready" and "case_id" not in e, 60, "zygote")
        yield worker
    finally:
        # The zygote's session holds every child it forked: one group kill ends them all.
        worker.stop()


@pytest.fixture
async def app(settings_for: Callable[..., Settings]) -> AsyncIterator[App]:
    async with open_runtime(
        settings_for(
            "cosmos", state_lock_ttl_ms=LOCK_TTL_MS, state_flush_lock_ttl_ms=FLUSH_LOCK_TTL_MS
        )
    ) as opened:
        yield opened


async def stale_hot_copies(app: App, case_id: str) -> list[str]:
    """The case's records (itself and its effect ledgers) whose hot copy lags cold."""
    hot = app.runtime.backends.hot
    assert hot is not None
    stale = []
    record = await app.runtime.backends.cold.get(case_id)
    assert record is not None
    ledgers = (SimulatedProvider.ledger_id(effect_key(record, kind)) for kind in EFFECT_KEYS)
    ids = [case_id, *ledgers]
    for record_id in ids:
        cached = await hot.get(record_id)
        cold = await app.runtime.backends.cold.get(record_id)
        if cached is not None and cold is not None and cached.version < cold.version:
            stale.append(record_id)
    return stale


async def sections_of(app: App, case_id: str) -> dict[str, Any]:
    record = await app.runtime.backends.cold.get(case_id)
    return dict(record.sections) if record else {}


async def resume(app: App, case_id: str, mode: str) -> list[str]:
    """Drive the case to its end from whatever was checkpointed; the nodes that ran.

    A side effect the killed attempt had claimed stays leased to it until the
    lease (the lock TTL) runs out; the resume waits for that, as the timer would.
    """
    for _ in range(LEASE_WAITS):
        try:
            return await resume_once(app, case_id, mode)
        except EffectInProgress:
            await asyncio.sleep(LOCK_TTL_MS / 1000)
    return await resume_once(app, case_id, mode)


async def resume_once(app: App, case_id: str, mode: str) -> list[str]:
    graph = app.runtime.graph
    config = case_config(case_id)
    latest = await app.runtime.saver.aget_tuple(config)
    # No `next` does not mean finished: a superstep whose tasks all saved their writes
    # has none either, yet still has to be applied. Streaming from a finished
    # checkpoint runs nothing, so every case with a checkpoint just continues. A run
    # killed under durability="exit" may have stored only its stub (LangGraph's anchor
    # for DeltaChannel writes: no channel versions), which LangGraph cannot resume
    # from: the input goes again, as for a case with no checkpoint.
    graph_input: dict[str, Any] | None = None
    if latest is None or not latest.checkpoint["channel_versions"]:
        request = (await sections_of(app, case_id))["request"]
        graph_input = {key: request[key] for key in ("customer_id", "text", "transactions")}
        graph_input["case_id"] = case_id
    ran: list[str] = []
    async for update in graph.astream(
        graph_input,
        config,
        context=RunContext(),
        stream_mode="updates",
        durability=mode,
    ):
        # A task whose writes were saved before the kill is replayed, not re-run.
        if not update.get("__metadata__", {}).get("cached"):
            ran.extend(node for node in update if node in SUPERSTEP)
    return ran


def start_case(zygote: Worker, mode: str, pause: str | None) -> tuple[str, int]:
    case_id = f"kill-{mode}-{uuid.uuid4().hex[:10]}"
    zygote.send({"case_id": case_id, "mode": mode, "pause": pause})
    forked = zygote.expect(
        lambda e: e.get("case_id") == case_id and e.get("event") == "forked", 30, "fork"
    )
    zygote.expect(
        lambda e: e.get("case_id") == case_id and e.get("event") in ("started", "error"),
        60,
        "child start",
    )
    return case_id, int(forked["pid"])


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = Deadline(10)
    while not pid_gone(pid):
        deadline.check(f"child {pid} to die")
        time.sleep(0.01)


def finished(zygote: Worker, case_id: str) -> bool:
    zygote.drain()
    return any(e.get("case_id") == case_id and e.get("event") == "done" for e in zygote.events)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async", "exit"])
async def test_kill_mid_node(mode: str, zygote: Worker, app: App, reliability: Recorder) -> None:
    rng = random.Random(f"{SEED}-{mode}")
    # Calibrate: how long an undisturbed run takes, and what it stores.
    # Waits on the zygote run in a thread: this loop's own flusher must keep renewing its
    # (short) flush lock meanwhile, or another flusher could take a thread it is applying.
    reference_id, _ = await asyncio.to_thread(start_case, zygote, mode, None)
    started = time.monotonic()
    await asyncio.to_thread(
        zygote.expect,
        lambda e: e.get("case_id") == reference_id and e.get("event") == "done",
        60,
        "reference",
    )
    run_seconds = time.monotonic() - started
    reference = await sections_of(app, reference_id)
    assert all(section in reference for section in AUTO_APPROVED_SECTIONS)

    tally = Tally()
    budget = Deadline(240)
    for kill_number in range(KILLS_PER_MODE):
        budget.check(f"{mode} kill runs")
        pause_step: str | None = None
        if kill_number % 2:
            # Hold a random step open right after it stored its section, and kill there.
            pause_step = rng.choice(["billing", "account", "policy", "refund", "response"])
        case_id, pid = await asyncio.to_thread(
            start_case, zygote, mode, f"{pause_step}=30" if pause_step else None
        )
        if pause_step:
            wait = Deadline(30)
            while pause_step not in await sections_of(app, case_id):
                wait.check(f"{pause_step} section of {case_id}")
                await asyncio.sleep(0.005)
            tally.in_pause_window += 1
        else:
            await asyncio.sleep(rng.uniform(0, run_seconds))
        await asyncio.to_thread(kill, pid)
        tally.kills += 1
        if not finished(zygote, case_id):
            tally.mid_run += 1

        at_kill = await sections_of(app, case_id)
        stale = await stale_hot_copies(app, case_id)
        tally.stale_hot += len(stale)
        snapshot = await app.runtime.graph.aget_state(case_config(case_id))
        if mode == "exit" and snapshot.created_at is not None and snapshot.next:
            # `exit` writes a checkpoint only when the run ends: never one mid-run.
            tally.partial_checkpoints += 1

        ran = await resume(app, case_id, mode)
        after = await sections_of(app, case_id)
        final = await app.runtime.graph.aget_state(case_config(case_id))

        for section, value in at_kill.items():
            if section == "run":
                continue  # run bookkeeping: status and heartbeat move on by design
            if section not in after:
                tally.lost_writes += 1
            elif after[section] != value and not (
                section.startswith("effect_") and value.get("status") == "pending"
            ):
                tally.silent_overwrites += 1
        expected = normalized(reference, reference_id)
        got = normalized(after, case_id)
        tally.lost_writes += sum(1 for name in expected if got.get(name) != expected[name])
        steps = list(final.values.get("completed_steps", []))
        assert sorted(steps) == sorted(set(steps)), f"a step recorded twice: {steps}"
        for kind in EFFECT_KEYS:
            performed = await provider_calls(app.runtime, case_id, kind)
            tally.duplicate_effects += max(0, len(performed) - 1)
            assert performed, f"{kind} never happened for {case_id}: ran {ran}, at kill {at_kill}"

        redone = {SUPERSTEP[node] for node in ran if NODE_SECTION[node] in at_kill}
        tally.redone_supersteps.append(len(redone))

    bound = REDO_BOUND[mode]
    most = max(tally.redone_supersteps)
    reliability.record(
        f"Process killed mid-node (durability={mode})",
        injected=f"SIGKILL the worker process at a seeded random point ({KILLS_PER_MODE} kills; "
        "half inside the window after a step stored its section, before LangGraph saw it); "
        f"Cosmos + Redis, {app.runtime.settings.write_mode} (the next worker continues from "
        "what Redis holds)",
        runs=tally.kills,
        lost_writes=tally.lost_writes,
        silent_overwrites=tally.silent_overwrites,
        observed=f"{tally.mid_run} kills mid-run, all resumed to the reference result; "
        f"at most {most} superstep(s) redone (mode allows "
        f"{'any' if bound is None else bound}); {tally.duplicate_effects} duplicate effects; "
        f"{tally.partial_checkpoints} partial checkpoints; {tally.stale_hot} hot copies served "
        "older than cold after a kill",
    )
    assert tally.lost_writes == 0
    assert tally.silent_overwrites == 0
    assert tally.duplicate_effects == 0
    assert tally.stale_hot == 0
    assert tally.partial_checkpoints == 0
    assert tally.mid_run >= KILLS_PER_MODE // 2
    if bound is not None:
        assert most <= bound, tally.redone_supersteps


class WorkerKilled(BaseException):
    """The worker process dying: no handler of the store may run (none catches this)."""


class KilledAfterCommit:
    """The real cold store, whose writer is killed the moment a write is committed."""

    def __init__(self, inner: ColdStateStore) -> None:
        self._inner = inner
        self.name = inner.name

    async def update_section(self, thread_id: str, section: str, value: Any, **kwargs: Any) -> Any:
        await self._inner.update_section(thread_id, section, value, **kwargs)
        raise WorkerKilled

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.mark.parametrize("backend", ["cosmos", "postgres"])
async def test_writer_killed_between_cold_and_hot(
    backend: str, settings_for: Callable[..., Settings], reliability: Recorder
) -> None:
    """The kill window above, made deterministic: the cold write lands, the hot update never does."""
    stale_reads = 0
    async with backends_for(settings_for(backend)) as backends:
        reader = TieredStateStore.from_backends(backends)
        writer = TieredStateStore(
            KilledAfterCommit(backends.cold),  # type: ignore[arg-type]
            backends.hot,
            backends.settings,
        )
        for attempt in range(STALE_RUNS):
            thread_id = f"half-{backend}-{attempt}-{uuid.uuid4().hex[:8]}"
            record = await reader.create(thread_id, {"performed": []}, agent_id="t")
            assert await reader.get(thread_id) is not None  # cached hot
            with pytest.raises(WorkerKilled):
                await writer.update_section(
                    thread_id,
                    "performed",
                    ["REFUND-1"],
                    expected_version=record.version,
                    agent_id="t",
                )
            seen = await reader.get(thread_id)
            if seen is None or seen.sections["performed"] != ["REFUND-1"]:
                stale_reads += 1
            await backends.cold.delete(thread_id)
            await reader.get(thread_id)
    reliability.record(
        f"Writer killed between its cold write and its hot update ({backend})",
        injected="a write through the tiers whose worker dies right after the cold store "
        "committed it, before the hot-tier update, then a read through the tiers",
        runs=STALE_RUNS,
        lost_writes=stale_reads,
        silent_overwrites=0,
        observed=f"{stale_reads}/{STALE_RUNS} reads returned the older hot copy (the "
        "writer's intent hides it until a read after its deadline re-installs from cold)",
    )
    assert stale_reads == 0
