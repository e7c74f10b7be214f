"""Checkpoint writes are fenced in every write mode, on real servers, for each cold backend.

A run presents its fencing token (`configurable["fencing_token"]`); a checkpoint
write presenting a lower token than one the thread has seen is refused with
`StaleFencingToken` before it reaches the cold tier. With Redis, both write modes
share one fence per thread; without it, the thread's workflow record's fence (raised
by fenced record writes) is what a checkpoint write is checked against.
"""

from __future__ import annotations

import operator
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph

from devstack import free_port
from state.checkpoint import TieredCheckpointSaver
from state.checkpoint.fencing import RecordFence
from state.checkpoint.flusher import Flusher
from state.errors import BackendUnavailable, StaleFencingToken
from state.factory import Backends, backends_for
from state.hot.redis_checkpoints import RedisCheckpointCache
from state.hot.redis_client import create_redis_client, hot_key, hot_namespace
from state.hot.redis_write_behind import RedisCheckpointFence, RedisWriteBehindLog
from state.settings import Settings

COLD_BACKENDS = ["cosmos", "postgres"]


class Chat(TypedDict, total=False):
    messages: Annotated[list[str], operator.add]


def chat_graph(saver: TieredCheckpointSaver) -> CompiledStateGraph[Any, Any, Any, Any]:
    def reply(state: Chat) -> Chat:
        return {"messages": ["reply"]}

    graph = StateGraph(Chat)
    graph.add_node("reply", reply)
    graph.add_edge(START, "reply")
    graph.add_edge("reply", END)
    return graph.compile(checkpointer=saver)


def config(thread_id: str, fence: int) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "fencing_token": fence}}


Open = Callable[..., AbstractAsyncContextManager[Backends]]


@pytest.fixture(params=COLD_BACKENDS)
def open_tiers(request: pytest.FixtureRequest, stack_env: dict[str, str]) -> Open:
    """Backends on the session stack for one cold backend; `mode=None` means no Redis."""

    def build(mode: str | None) -> AbstractAsyncContextManager[Backends]:
        values: dict[str, Any] = {
            "state_cold_backend": request.param,
            "cosmos_endpoint": stack_env["COSMOS_ENDPOINT"],
            "cosmos_key": stack_env["COSMOS_KEY"],
            "cosmos_create_if_missing": True,
            "postgres_url": stack_env["POSTGRES_URL"],
        }
        if mode is not None:
            values.update(redis_url=stack_env["REDIS_URL"], state_write_mode=mode)
        return backends_for(Settings.model_validate(values))

    return build


async def cold_messages(backends: Backends, thread_id: str) -> list[str]:
    """The latest checkpoint's messages as the cold tier alone has them."""
    latest = await TieredCheckpointSaver(backends.checkpoints).aget_tuple(
        {"configurable": {"thread_id": thread_id}}
    )
    assert latest is not None
    return list(latest.checkpoint["channel_values"]["messages"])


@pytest.fixture
def thread_id() -> str:
    return f"fence-cp-{uuid.uuid4().hex[:12]}"


async def test_write_through_refuses_a_stale_token_before_the_cold_write(
    open_tiers: Open, thread_id: str
) -> None:
    async with open_tiers("write-through") as backends:
        graph = chat_graph(TieredCheckpointSaver.from_backends(backends))
        await graph.ainvoke({"messages": ["first"]}, config(thread_id, 7))
        before = await backends.checkpoints.get_checkpoint(thread_id, "", None)

        with pytest.raises(StaleFencingToken) as refused:
            await graph.ainvoke({"messages": ["late"]}, config(thread_id, 6))

        assert (refused.value.presented, refused.value.highest) == (6, 7)
        after = await backends.checkpoints.get_checkpoint(thread_id, "", None)
        assert before is not None and after is not None
        assert after.checkpoint_id == before.checkpoint_id  # nothing reached the cold tier
        await graph.ainvoke({"messages": ["newer"]}, config(thread_id, 8))
        assert "late" not in await cold_messages(backends, thread_id)
        assert "newer" in await cold_messages(backends, thread_id)


async def test_both_write_modes_share_one_fence_per_thread(
    open_tiers: Open, thread_id: str
) -> None:
    async with open_tiers("write-behind") as behind, open_tiers("write-through") as through:
        await chat_graph(TieredCheckpointSaver.from_backends(behind)).ainvoke(
            {"messages": ["behind"]}, config(thread_id, 9)
        )
        with pytest.raises(StaleFencingToken):
            await chat_graph(TieredCheckpointSaver.from_backends(through)).ainvoke(
                {"messages": ["through"]}, config(thread_id, 8)
            )
        await chat_graph(TieredCheckpointSaver.from_backends(through)).ainvoke(
            {"messages": ["through"]}, config(thread_id, 10)
        )
        with pytest.raises(StaleFencingToken):
            await chat_graph(TieredCheckpointSaver.from_backends(behind)).ainvoke(
                {"messages": ["late"]}, config(thread_id, 9)
            )
        assert "late" not in await cold_messages(through, thread_id)


async def test_without_a_hot_tier_the_records_fence_guards_checkpoint_writes(
    open_tiers: Open, thread_id: str
) -> None:
    async with open_tiers(None) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        graph = chat_graph(saver)
        await backends.cold.create(thread_id, {"run": {}}, agent_id="fence-test")
        await backends.cold.update_section(
            thread_id, "run", {"by": 7}, expected_version=1, agent_id="fence-test", fencing_token=7
        )
        await graph.ainvoke({"messages": ["first"]}, config(thread_id, 7))

        with pytest.raises(StaleFencingToken) as refused:
            await graph.ainvoke({"messages": ["late"]}, config(thread_id, 6))

        assert (refused.value.presented, refused.value.highest) == (6, 7)
        assert "late" not in await cold_messages(backends, thread_id)
        # A thread with no workflow record has no fence to hold a checkpoint to.
        await graph.ainvoke({"messages": ["free"]}, config(f"{thread_id}-bare", 1))
        await backends.cold.delete(thread_id)


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
async def test_with_redis_unreachable_the_records_fence_guards_checkpoint_writes(
    open_tiers: Open, thread_id: str, mode: str
) -> None:
    async with open_tiers(None) as backends:
        # A Redis nobody listens on: every call to it fails with BackendUnavailable.
        dead = Settings.model_validate(
            {**backends.settings.model_dump(), "redis_url": f"redis://127.0.0.1:{free_port()}"}
        )
        client = create_redis_client(dead)
        try:
            cache = RedisCheckpointCache(
                client, namespace=hot_namespace(dead), ttl_seconds=dead.state_hot_ttl_seconds
            )
            saver = TieredCheckpointSaver(
                backends.checkpoints,
                cache,
                flusher=(
                    Flusher(RedisWriteBehindLog(client, cache), backends.checkpoints, lock_ttl_ms=1)
                    if mode == "write-behind"
                    else None
                ),
                fence=RedisCheckpointFence(client, cache),
                record_fence=RecordFence(backends.cold),
            )
            graph = chat_graph(saver)
            await backends.cold.create(thread_id, {"run": {}}, agent_id="fence-test")
            await backends.cold.update_section(
                thread_id, "run", {}, expected_version=1, agent_id="fence-test", fencing_token=7
            )
            await graph.ainvoke({"messages": ["first"]}, config(thread_id, 7))

            with pytest.raises(StaleFencingToken) as refused:
                await graph.ainvoke({"messages": ["late"]}, config(thread_id, 6))

            assert (refused.value.presented, refused.value.highest) == (6, 7)
            assert await cold_messages(backends, thread_id) == ["first", "reply"]
        finally:
            await client.aclose()
            await backends.cold.delete(thread_id)


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
async def test_a_stale_writer_is_refused_after_redis_lost_the_fence(
    open_tiers: Open, thread_id: str, mode: str
) -> None:
    """Redis may evict the thread's fence (it has a TTL; `volatile-lru`): the first fenced
    write after that is checked against the workflow record's fence before Redis holds
    the fence again, so a stale writer does not pass for the first one."""
    async with open_tiers(mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        graph = chat_graph(saver)
        redis = create_redis_client(backends.settings)
        key = hot_key(thread_id, "wb-fence", namespace=hot_namespace(backends.settings))
        try:
            await backends.cold.create(thread_id, {"run": {}}, agent_id="fence-test")
            await graph.ainvoke({"messages": ["older"]}, config(thread_id, 7))
            stale = await saver.aget_tuple(config(thread_id, 7))
            assert stale is not None
            # The newer run (8) raises the record's fence, as its lease claim does.
            await backends.cold.update_section(
                thread_id, "run", {}, expected_version=1, agent_id="fence-test", fencing_token=8
            )
            await graph.ainvoke({"messages": ["newer"]}, config(thread_id, 8))
            await saver.aflush(thread_id)
            await redis.delete(key)  # evicted

            # The older run goes on from its own last checkpoint.
            resumed = {"configurable": {**stale.config["configurable"], "fencing_token": 7}}
            with pytest.raises(StaleFencingToken) as refused:
                await graph.ainvoke({"messages": ["stale"]}, resumed)
            assert (refused.value.presented, refused.value.highest) == (7, 8)
            await saver.aflush(thread_id)
            assert "stale" not in await cold_messages(backends, thread_id)
            # The newest goes on, and Redis holds its fence again.
            await graph.ainvoke({"messages": ["on"]}, config(thread_id, 8))
            assert await redis.get(key) == b"8"
        finally:
            await redis.aclose()
            await backends.cold.delete(thread_id)


def _cold_writes(saver: TieredCheckpointSaver, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The checkpoints the saver writes straight to the cold tier (not through the log)."""
    direct: list[str] = []
    put_checkpoint = saver.store.put_checkpoint

    async def recorded(stored: Any, *args: Any, **kwargs: Any) -> Any:
        direct.append(stored.checkpoint_id)
        return await put_checkpoint(stored, *args, **kwargs)

    monkeypatch.setattr(saver.store, "put_checkpoint", recorded)
    return direct


def _input(thread_id: str, fence: int) -> tuple[RunnableConfig, Any, Any, Any]:
    return config(thread_id, fence), empty_checkpoint(), {"source": "input", "step": -1}, {}


def _first_record_read_fails(backends: Backends, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cold tier down for the next read of a record (the fence's), then back."""
    cold_get = backends.cold.get
    failures = [BackendUnavailable(backends.cold.name, "down")]

    async def down_once(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return await cold_get(*args, **kwargs)

    monkeypatch.setattr(backends.cold, "get", down_once)


async def test_a_fence_check_the_cold_tier_cannot_answer_fails_the_write_not_redis(
    open_tiers: Open, thread_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis up, no fence there yet, the cold tier down: the write cannot be checked, so it
    fails, naming the cold tier; it is not taken for Redis out (and written to the cold
    tier instead)."""
    async with open_tiers("write-behind") as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        direct = _cold_writes(saver, monkeypatch)
        _first_record_read_fails(backends, monkeypatch)
        with pytest.raises(BackendUnavailable) as failed:
            await saver.aput(*_input(thread_id, 7))
        assert failed.value.backend == backends.cold.name
        await saver.aput(*_input(thread_id, 7))
        assert direct == [] and thread_id not in saver._written_through


async def test_write_through_a_fence_check_the_cold_tier_cannot_answer_fails_the_write(
    open_tiers: Open, thread_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same in write-through: the failed read fails the write, naming the cold tier
    (it was taken for Redis out, and the record read again)."""
    async with open_tiers("write-through") as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        _first_record_read_fails(backends, monkeypatch)
        with pytest.raises(BackendUnavailable) as failed:
            await saver.aput(*_input(thread_id, 7))
        assert failed.value.backend == backends.cold.name
        assert await saver.aget_tuple(config(thread_id, 7)) is None
        stored = await saver.aput(*_input(thread_id, 7))
        assert (await saver.aget_tuple(stored)) is not None


async def test_a_token_of_zero_seeds_the_fence(
    open_tiers: Open, thread_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_tiers("write-behind") as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        direct = _cold_writes(saver, monkeypatch)
        await saver.aput(*_input(thread_id, 0))
        assert direct == [] and thread_id not in saver._written_through
        redis = create_redis_client(backends.settings)
        try:
            key = hot_key(thread_id, "wb-fence", namespace=hot_namespace(backends.settings))
            assert await redis.get(key) == b"0"
        finally:
            await redis.aclose()


def _record_reads(backends: Backends, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The threads whose record the cold tier is asked for."""
    asked: list[str] = []
    cold_get = backends.cold.get

    async def counted(thread_id: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(thread_id)
        return await cold_get(thread_id, *args, **kwargs)

    monkeypatch.setattr(backends.cold, "get", counted)
    return asked


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
async def test_a_fence_seeded_by_the_runs_lock_spares_its_first_write_a_record_read(
    open_tiers: Open, thread_id: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new thread's first fenced write finds no fence in Redis and is checked against its
    record. A run that has just taken the thread's lock seeds Redis's fence with its token
    (`aseed_fence`): its first write reads no record, and a stale runner, even one whose
    record check would have come first, is refused at Redis."""
    async with open_tiers(mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        graph = chat_graph(saver)
        other = f"{thread_id}-unseeded"
        try:
            for created in (thread_id, other):
                await backends.cold.create(created, {"run": {}}, agent_id="fence-test")
            asked = _record_reads(backends, monkeypatch)
            await saver.aseed_fence(thread_id, 8)
            # Redis holds no fence yet: the seed (not the write) checks the record.
            assert asked == [thread_id]
            asked.clear()
            await graph.ainvoke({"messages": ["first"]}, config(thread_id, 8))
            await graph.ainvoke({"messages": ["first"]}, config(other, 8))
            assert thread_id not in asked and other in asked
            with pytest.raises(StaleFencingToken):
                await graph.ainvoke({"messages": ["stale"]}, config(thread_id, 7))
            with pytest.raises(StaleFencingToken):
                await saver.aseed_fence(thread_id, 7)  # an older holder's, come late
            await saver.aflush(thread_id)
            assert "stale" not in await cold_messages(backends, thread_id)
        finally:
            for created in (thread_id, other):
                await backends.cold.delete(created)


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
async def test_a_seed_the_caller_vouches_for_reads_no_record(
    open_tiers: Open, thread_id: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller that knows the record's fence is not above its token (the first run of a
    case it has just created) seeds without reading the record (one request less per
    case), and an older holder's token is still refused at Redis after it."""
    async with open_tiers(mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        graph = chat_graph(saver)
        try:
            await backends.cold.create(thread_id, {"run": {}}, agent_id="fence-test")
            asked = _record_reads(backends, monkeypatch)
            await saver.aseed_fence(thread_id, 8, record_checked=True)
            await graph.ainvoke({"messages": ["first"]}, config(thread_id, 8))
            assert asked == []
            with pytest.raises(StaleFencingToken):
                await saver.aseed_fence(thread_id, 7, record_checked=True)
            with pytest.raises(StaleFencingToken):
                await graph.ainvoke({"messages": ["stale"]}, config(thread_id, 7))
            await saver.aflush(thread_id)
            assert "stale" not in await cold_messages(backends, thread_id)
        finally:
            await backends.cold.delete(thread_id)


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
async def test_a_stale_runner_is_refused_on_a_thread_declared_new(
    open_tiers: Open, thread_id: str, mode: str
) -> None:
    """The case's record is created and declared new; run A (token 7, its lease claim
    raised the record's fence to 7) stalls before its first checkpoint write; run B takes
    the case over (token 8, record fence 8). A wakes and writes: Redis holds no fence yet,
    so the token is checked durably - and must be refused (7 < 8)."""
    async with open_tiers(mode) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
        graph = chat_graph(saver)
        try:
            await backends.cold.create(thread_id, {"run": {}}, agent_id="fence-test")
            saver.expect_new_thread(thread_id)
            await backends.cold.update_section(
                thread_id, "run", {}, expected_version=1, agent_id="fence-test", fencing_token=7
            )
            # B takes over before A's first checkpoint write.
            await backends.cold.update_section(
                thread_id, "run", {}, expected_version=2, agent_id="fence-test", fencing_token=8
            )
            outcome: Any
            try:
                await graph.ainvoke({"messages": ["stale"]}, config(thread_id, 7))
                outcome = "accepted"
            except StaleFencingToken as exc:
                outcome = (exc.presented, exc.highest)
            await saver.aflush(thread_id)
            stored = await cold_messages(backends, thread_id) if outcome == "accepted" else []
            assert (outcome, stored) == ((7, 8), []), (outcome, stored)
        finally:
            await backends.cold.delete(thread_id)


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
async def test_a_thread_another_process_wrote_is_not_new_after_redis_lost_the_fence(
    open_tiers: Open, thread_id: str, mode: str
) -> None:
    """Process 1 created the case (declared new) but process 2's run (token 8) wrote its
    checkpoints; then Redis evicted the fence. Process 1's stale run (token 7) must be
    refused: the memo says 'new', the record says fence 8."""
    async with open_tiers(mode) as backends:
        one = TieredCheckpointSaver.from_backends(backends)
        two = TieredCheckpointSaver.from_backends(backends)
        redis = create_redis_client(backends.settings)
        key = hot_key(thread_id, "wb-fence", namespace=hot_namespace(backends.settings))
        try:
            await backends.cold.create(thread_id, {"run": {}}, agent_id="fence-test")
            one.expect_new_thread(thread_id)
            await backends.cold.update_section(
                thread_id, "run", {}, expected_version=1, agent_id="fence-test", fencing_token=8
            )
            await chat_graph(two).ainvoke({"messages": ["newer"]}, config(thread_id, 8))
            await two.aflush(thread_id)
            await redis.delete(key)  # evicted
            outcome: Any
            try:
                await chat_graph(one).ainvoke({"messages": ["stale"]}, config(thread_id, 7))
                outcome = "accepted"
            except StaleFencingToken as exc:
                outcome = (exc.presented, exc.highest)
            await one.aflush(thread_id)
            stored = await cold_messages(backends, thread_id)
            assert (outcome, "stale" in stored) == ((7, 8), False), (outcome, stored)
        finally:
            await redis.aclose()
            await backends.cold.delete(thread_id)


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
async def test_a_stale_runs_seed_after_redis_lost_the_fence_is_checked_against_the_record(
    open_tiers: Open, mode: str
) -> None:
    """Run A (token 7) marked its case running, then stalled before its seed; run B took
    the case over (token 8), seeded Redis with 8 and wrote; Redis then lost the fence key
    (it has a TTL). A's seed must be checked against the record, not admitted as checked."""
    thread_id = f"seed-{uuid.uuid4().hex[:12]}"
    async with open_tiers(mode) as backends:
        a = TieredCheckpointSaver.from_backends(backends)
        b = TieredCheckpointSaver.from_backends(backends)
        redis = create_redis_client(backends.settings)
        key = hot_key(thread_id, "wb-fence", namespace=hot_namespace(backends.settings))
        try:
            await backends.cold.create(thread_id, {"run": {}}, agent_id="review")
            # A (token 7) marks the case running, then stalls before `aseed_fence`.
            await backends.cold.update_section(
                thread_id, "run", {"by": 7}, expected_version=1, agent_id="a", fencing_token=7
            )
            # B takes the case over: its mark, its seed, its run.
            await backends.cold.update_section(
                thread_id, "run", {"by": 8}, expected_version=2, agent_id="b", fencing_token=8
            )
            await b.aseed_fence(thread_id, 8)
            await chat_graph(b).ainvoke({"messages": ["newer"]}, config(thread_id, 8))
            await b.aflush(thread_id)
            await redis.delete(key)  # the fence key evicted (it has a TTL)
            # A wakes: the service seeds, then runs the graph.
            outcome: Any
            try:
                await a.aseed_fence(thread_id, 7)
                await chat_graph(a).ainvoke({"messages": ["stale"]}, config(thread_id, 7))
                outcome = "accepted"
            except StaleFencingToken as exc:
                outcome = (exc.presented, exc.highest)
            await a.aflush(thread_id)
            stored = await cold_messages(backends, thread_id)
            assert (outcome, "stale" in stored) == ((7, 8), False), (outcome, stored)
        finally:
            await redis.aclose()
            await backends.cold.delete(thread_id)


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
@pytest.mark.parametrize("backend", COLD_BACKENDS)
def test_a_sync_run_seeds_its_fence_so_an_older_holder_starting_late_is_refused(
    backend: str, mode: str, stack_env: dict[str, str], thread_id: str
) -> None:
    """The newer holder (token 4) took the lock but has written nothing yet when the older
    one (token 3) starts its run. Unseeded, token 3's whole run would pass, and its
    checkpoints, newer than any token 4 had made so far, would be served as the latest.
    Seeded as the lock is taken (`seed_fence`, the sync `aseed_fence`), it is refused."""
    settings = Settings.model_validate(
        {
            "state_cold_backend": backend,
            "cosmos_endpoint": stack_env["COSMOS_ENDPOINT"],
            "cosmos_key": stack_env["COSMOS_KEY"],
            "cosmos_create_if_missing": True,
            "postgres_url": stack_env["POSTGRES_URL"],
            "redis_url": stack_env["REDIS_URL"],
            "state_write_mode": mode,
        }
    )
    with TieredCheckpointSaver.open_sync(settings) as saver:
        graph = chat_graph(saver)
        saver.seed_fence(thread_id, 4)
        with pytest.raises(StaleFencingToken):
            graph.invoke({"messages": ["older"]}, config(thread_id, 3))
        graph.invoke({"messages": ["newer"]}, config(thread_id, 4))
        with pytest.raises(StaleFencingToken):
            saver.seed_fence(thread_id, 3)
        saver.flush(thread_id)
        latest = saver.get_tuple({"configurable": {"thread_id": thread_id}})
        assert latest is not None
        assert latest.checkpoint["channel_values"]["messages"] == ["newer", "reply"]
        saver.delete_thread(thread_id)
