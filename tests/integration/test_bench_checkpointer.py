"""The checkpointer benchmark's request counting, on real servers.

Its targets read "0 cold requests on the request path" from these counts, so a
count must land on the saver call that made the request, through either API,
and nowhere else.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg
import pytest
import redis.asyncio as aioredis

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_checkpointer.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_checkpointer", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def meter(bench: ModuleType) -> Iterator[Any]:
    meter = bench.Meter()
    meter.install()
    try:
        yield meter
    finally:
        meter.uninstall()


@pytest.fixture
async def observer(bench: ModuleType, stack_env: dict[str, str]) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(stack_env["REDIS_URL"], client_name=bench.OBSERVER)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def base(stack_env: dict[str, str]) -> dict[str, Any]:
    return {
        "cosmos_endpoint": stack_env["COSMOS_ENDPOINT"],
        "cosmos_key": stack_env["COSMOS_KEY"],
        "cosmos_database": "agentstate",
        "cosmos_create_if_missing": True,
        "redis_url": stack_env["REDIS_URL"],
        "postgres_url": stack_env["POSTGRES_URL"],
    }


async def fresh_invokes(
    bench: ModuleType,
    name: str,
    api: str,
    base: dict[str, Any],
    meter: Any,
    observer: aioredis.Redis,
) -> Any:
    contender = next(c for c in bench.contenders(base, observer) if c.name == name)
    scale = bench.QUICK
    messages = [bench.message(random.Random(1), i) for i in range(20)]
    async with contender.open(api) as handle:
        pair = bench.PairRun(contender, api, handle, scale, meter, observer, messages)
        return await pair.invokes(2, 0, 2)


async def test_a_write_through_put_is_charged_its_cold_and_redis_requests(
    bench: ModuleType, base: dict[str, Any], meter: Any, observer: aioredis.Redis
) -> None:
    sample = await fresh_invokes(bench, bench.PGR_WT, "async", base, meter, observer)
    # Per invoke: 6 puts (input, 4 nodes, none left) and 5 put_writes, each written
    # through to Postgres and advanced in Redis.
    assert sample.write_calls == 2 * 11
    assert sample.intermediate_cold >= 2 * 10
    assert sample.redis >= sample.write_calls
    assert sample.cosmos == 0


async def test_the_sync_api_charges_requests_made_on_the_saver_loop_thread(
    bench: ModuleType, base: dict[str, Any], meter: Any, observer: aioredis.Redis
) -> None:
    sample = await fresh_invokes(bench, bench.CO_WT, "sync", base, meter, observer)
    assert sample.write_calls == 2 * 11
    assert sample.intermediate_cold >= 2 * 10
    assert sample.postgres == 0


async def test_the_sync_api_charges_write_behind_appends_made_on_the_callers_thread(
    bench: ModuleType, base: dict[str, Any], meter: Any, observer: aioredis.Redis
) -> None:
    # The first run on a Redis loads the append scripts (a round trip each): not counted.
    await fresh_invokes(bench, bench.COR_WB, "sync", base, meter, observer)
    sample = await fresh_invokes(bench, bench.COR_WB, "sync", base, meter, observer)
    assert sample.write_calls == 2 * 11
    # Each put / put_writes: its one round trip, on the blocking client.
    assert sample.write_redis == sample.write_calls and sample.max_write_redis == 1
    assert sample.intermediate_cold == 0


# Its client skips certificate checks (the emulator's is self-signed): urllib3 warns per request.
@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
async def test_langgraph_checkpoint_cosmosdb_runs_on_the_emulator_and_is_counted(
    bench: ModuleType, base: dict[str, Any], meter: Any, observer: aioredis.Redis
) -> None:
    sample = await fresh_invokes(bench, bench.COSMOSDB_PACKAGE, "async", base, meter, observer)
    # One document per checkpoint and per write, each its own request.
    assert sample.cosmos >= 2 * 11
    assert sample.write_calls == 2 * 11


async def test_requests_after_a_call_returned_are_not_charged_to_it(
    bench: ModuleType, stack_env: dict[str, str], meter: Any
) -> None:
    later = asyncio.Event()

    async def background_statement() -> None:
        # A task the call started (as a flusher might be) outlives the call.
        await later.wait()
        async with await psycopg.AsyncConnection.connect(stack_env["POSTGRES_URL"]) as conn:
            await conn.execute("SELECT 1")

    async with await psycopg.AsyncConnection.connect(stack_env["POSTGRES_URL"]) as conn:
        with meter.window() as calls:
            with meter.call("put") as call:
                await conn.execute("SELECT 1")
                task = asyncio.create_task(background_statement())
            before = meter.totals["postgres"]
            await conn.execute("SELECT 1")  # outside any call
            later.set()
            await task
    assert [c.kind for c in calls] == ["put"]
    assert call.postgres == 1
    assert meter.totals["postgres"] == before + 2


def test_rounds_pool_their_samples_and_keep_what_one_round_measured(bench: ModuleType) -> None:
    """A later round adds its samples to the same measurement (p50 over both rounds, drain
    rate over both drains); stored bytes, measured by the first round alone, stay."""
    first = bench.Results(ping=bench.Sample(seconds=[0.001]))
    first.fresh[("saver", "async")] = bench.Sample(seconds=[0.010, 0.012], cosmos=4)
    first.flush[("saver", "async")] = bench.FlushSample(10, 1.0, 10, 1, 10, 0.5, 2)
    first.stored[("saver", 10)] = (1000, None, 0)
    second = bench.Results(ping=bench.Sample(seconds=[0.003]))
    second.fresh[("saver", "async")] = bench.Sample(seconds=[0.030, 0.040], cosmos=6)
    second.flush[("saver", "async")] = bench.FlushSample(10, 1.0, 10, 1, 10, 1.5, 2)

    pooled = bench.pool_rounds([first, second])

    fresh = pooled.fresh[("saver", "async")]
    assert fresh.operations == 4 and fresh.cosmos == 10
    assert fresh.p50 == pytest.approx(21.0)
    assert pooled.flush[("saver", "async")].flush_rate == pytest.approx(10.0)
    assert pooled.ping.operations == 2
    assert pooled.stored == {("saver", 10): (1000, None, 0)}
