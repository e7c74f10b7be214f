"""Redis killed, flushed, and evicting under maxmemory while cases and writers run.

Each scenario gets its own Redis server, so killing or flooding it touches
nothing else. Support cases run through the app while the workload's writers
count in shared records; mid-way the fault hits. The hot tier is a cache:
nothing acknowledged may be lost, every case must complete with the result an
undisturbed run gives, and once Redis is back the hot tier fills up again.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis

from devstack import RedisServer
from state.settings import Settings
from tests.support.effects import provider_calls

from .apps import EFFECT_KEYS, App, normalized, open_runtime, submission
from .conftest import Deadline, Recorder
from .workload import Workload

CASES = 4
WRITES_EACH = 20
FILLER_VALUE = b"x" * 64 * 1024


async def run_cases(app: App, prefix: str, deadline: Deadline) -> list[str]:
    """Submit cases one after another (each waits for its run); the ids of those that completed."""
    completed = []
    for n in range(CASES):
        deadline.check("cases")
        case_id = f"{prefix}-{n}"
        await app.runtime.service.submit(submission(case_id), None)
        await app.runtime.service.wait_idle()
        view = await app.runtime.service.status(case_id)
        if view.status.value == "completed":
            completed.append(case_id)
    return completed


async def check_cases(app: App, case_ids: list[str], reference: dict[str, object]) -> int:
    """How many cases differ from the undisturbed reference, or performed an effect twice."""
    wrong = 0
    for case_id in case_ids:
        record = await app.runtime.backends.cold.get(case_id)
        assert record is not None
        if normalized(dict(record.sections), case_id) != reference:
            wrong += 1
        for kind in EFFECT_KEYS:
            if len(await provider_calls(app.runtime, case_id, kind)) != 1:
                wrong += 1
    return wrong


async def refilled(app: App, thread_ids: list[str]) -> int:
    """Read each thread through the tiers, then count those the hot tier now holds, current."""
    hot = app.runtime.backends.hot
    assert hot is not None
    await asyncio.sleep(1.1)  # the tiered store leaves a failed hot tier alone for a second
    count = 0
    for thread_id in thread_ids:
        await app.runtime.store.get(thread_id)
        await app.runtime.store.settled()  # threads written in the outage settle in the background
        cached = await hot.get(thread_id)
        cold = await app.runtime.backends.cold.get(thread_id)
        if cached is not None and cold is not None and cached.version == cold.version:
            count += 1
    return count


async def kill_and_restart(server: RedisServer) -> str:
    await asyncio.sleep(0.4)
    assert server.pid is not None
    os.kill(server.pid, signal.SIGKILL)
    server.stop()
    await asyncio.sleep(1.0)
    await asyncio.to_thread(server.start)
    return "redis-server SIGKILLed mid-run, down 1 s, restarted empty"


async def flush_twice(server: RedisServer) -> str:
    client = aioredis.Redis.from_url(server.url)
    try:
        for _ in range(2):
            await asyncio.sleep(0.4)
            await client.flushall()
    finally:
        await client.aclose()
    return "FLUSHALL twice mid-run"


async def flood(server: RedisServer, stop: asyncio.Event) -> int:
    """Fill memory with other keys until told to stop (bounded), forcing LRU evictions."""
    client = aioredis.Redis.from_url(server.url)
    try:
        for n in range(5_000):
            if stop.is_set():
                break
            # With a TTL, as the hot tier's cache entries have: evictable under volatile-lru.
            await client.set(f"filler:{n}", FILLER_VALUE, ex=3600)
            await asyncio.sleep(0.002)
        info = await client.info("stats")
        return int(info["evicted_keys"])
    finally:
        await client.aclose()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "flushall", "eviction"])
async def test_redis_fault_mid_workflow(
    fault: str,
    redis_server: Callable[..., RedisServer],
    settings_for: Callable[..., Settings],
    reliability: Recorder,
) -> None:
    # The deployed policy: only keys with a TTL are evicted, never the write-behind log.
    options = (
        {"maxmemory": "3mb", "maxmemory_policy": "volatile-lru"} if fault == "eviction" else {}
    )
    server = redis_server(**options)
    settings = settings_for("cosmos", redis_url=server.url)
    deadline = Deadline(120)
    async with open_runtime(settings) as app:
        # An undisturbed case first: the result every case must reach.
        reference_id = f"redis-{fault}-reference-{os.getpid()}"
        await app.runtime.service.submit(submission(reference_id), None)
        await app.runtime.service.wait_idle()
        reference_record = await app.runtime.backends.cold.get(reference_id)
        assert reference_record is not None
        reference = normalized(dict(reference_record.sections), reference_id)

        workload = Workload(app.runtime.store)
        await workload.setup()
        stop_flood = asyncio.Event()
        evicted = 0
        injected: str
        prefix = f"redis-{fault}-{workload.threads[0][5:13]}"
        writes = workload.run(WRITES_EACH, deadline, pause=0.02)
        cases = run_cases(app, prefix, deadline)
        if fault == "eviction":
            flooding = asyncio.create_task(flood(server, stop_flood))
            completed, _ = await asyncio.gather(cases, writes)
            stop_flood.set()
            evicted = await flooding
            injected = (
                "maxmemory 3mb + volatile-lru (the deployed policy), write-behind, 64 KiB "
                f"filler keys with a TTL written throughout ({evicted} keys evicted)"
            )
        else:
            inject = kill_and_restart(server) if fault == "kill" else flush_twice(server)
            completed, _, injected = await asyncio.gather(cases, writes, inject)
        result = await workload.verify(app.runtime.backends.cold)
        wrong_cases = await check_cases(app, completed, reference)
        threads = [*workload.threads, *completed]
        hot_after = await refilled(app, threads)
        await workload.cleanup(app.runtime.backends.cold)

    reliability.record(
        f"Redis {fault} mid-workflow",
        injected=injected,
        runs=CASES + result.acknowledged,
        lost_writes=result.lost_writes,
        silent_overwrites=result.silent_overwrites,
        observed=f"{len(completed)}/{CASES} cases completed as undisturbed ({wrong_cases} differ), "
        f"{result.acknowledged} writes acknowledged, {sum(result.unavailable.values())} "
        f"unavailable errors retried; hot tier refilled {hot_after}/{len(threads)} after",
    )
    assert result.lost_writes == 0 and result.silent_overwrites == 0
    assert len(completed) == CASES and wrong_cases == 0
    if fault == "eviction":
        assert evicted > 0
    assert hot_after == len(threads)


@pytest.mark.parametrize("losses", [2, 3])
async def test_a_run_that_redis_loses_several_times_goes_on_from_the_cold_tier(
    losses: int,
    redis_server: Callable[..., RedisServer],
    settings_for: Callable[..., Settings],
) -> None:
    """FLUSHALL inside one run, `losses` times (after a step's section is written, before its
    checkpoint): each time the run learns it lost its unflushed checkpoints and goes on from
    the cold tier, redoing those steps; the case completes as an undisturbed one does, each
    effect done once."""
    server = redis_server()
    settings = settings_for("cosmos", redis_url=server.url)
    client = aioredis.Redis.from_url(server.url)
    flushes_left = 0

    async def flush_after_a_step(step: str) -> None:
        # After "policy": the run's checkpoints since its start (or its last redo) are then
        # in Redis only, so each flush costs the run those steps.
        nonlocal flushes_left
        if step == "policy" and flushes_left > 0:
            flushes_left -= 1
            await client.flushall()

    try:
        async with open_runtime(settings, after_step=flush_after_a_step) as app:
            reference_id = f"redis-redo-reference-{os.getpid()}-{losses}"
            await app.runtime.service.submit(submission(reference_id), None)
            await app.runtime.service.wait_idle()
            reference_record = await app.runtime.backends.cold.get(reference_id)
            assert reference_record is not None

            case_id = f"redis-redo-{os.getpid()}-{losses}"
            flushes_left = losses
            await app.runtime.service.submit(submission(case_id), None)
            await app.runtime.service.wait_idle()
            assert flushes_left == 0
            assert (await app.runtime.service.status(case_id)).status.value == "completed"
            assert (
                await check_cases(
                    app, [case_id], normalized(dict(reference_record.sections), reference_id)
                )
                == 0
            )
    finally:
        await client.aclose()


async def test_a_run_redone_after_redis_lost_its_checkpoints_is_not_started_twice(
    redis_server: Callable[..., RedisServer],
    settings_for: Callable[..., Settings],
) -> None:
    """Found by review: the run that went on from the cold tier after a FLUSHALL published
    `run_started` again under its run id, and a follower saw the run start twice. It is
    told once, and the redo as `run_redone`."""
    server = redis_server()
    settings = settings_for("cosmos", redis_url=server.url)
    client = aioredis.Redis.from_url(server.url)
    case_id = f"redis-redo-events-{os.getpid()}"
    # What a follower heard: the events up to the flush (which takes the log with it), then
    # those published after it.
    heard: list[dict[str, object]] = []
    flushes_left = 1

    async def flush_after_policy(step: str) -> None:
        nonlocal flushes_left
        if step == "policy" and flushes_left > 0:
            flushes_left -= 1
            await hear()
            await client.flushall()

    try:
        async with open_runtime(settings, after_step=flush_after_policy) as app:
            events = app.runtime.backends.events
            assert events is not None

            async def hear() -> None:
                heard.extend(e.data for e in await events.read(case_id, count=1000))

            await app.runtime.service.submit(submission(case_id), None)
            await app.runtime.service.wait_idle()
            assert flushes_left == 0
            assert (await app.runtime.service.status(case_id)).status.value == "completed"
            await hear()
    finally:
        await client.aclose()
    kinds = [event["event"] for event in heard]
    assert len({event["run_id"] for event in heard}) == 1, heard
    assert kinds.count("run_started") == 1, kinds
    assert kinds.count("run_redone") == 1, kinds
    assert next(e for e in heard if e["event"] == "run_redone")["redone"] == 1
    assert kinds.index("run_started") < kinds.index("run_redone") < kinds.index("run_completed")
