"""The sync API in write-behind mode (`TieredCheckpointSaver.open_sync`), on real servers for
each cold backend: a write is the caller's own Redis round trip, made on the caller's
thread, and keeps every guarantee of the async path (boundaries, fencing, Redis out). A
cache hit is read on the caller's thread in write-through mode too."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypedDict, TypeVar

import pytest
import redis as redis_py
from langchain_core.runnables import RunnableConfig
from langgraph._internal._constants import CONFIG_KEY_RUNTIME
from langgraph.channels.delta import DeltaChannel
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from devstack import RedisServer, free_port
from state.checkpoint import TieredCheckpointSaver
from state.checkpoint import saver as saver_module
from state.checkpoint.saver import DURABILITY_KEY
from state.errors import BackendUnavailable, HotStateLost, SaverClosed, StaleFencingToken
from state.hot.redis_checkpoints import RedisCheckpointCache
from state.ports import CheckpointPut
from state.settings import Settings, WriteMode
from tests.chat_graph import chat_graph
from tests.integration.test_write_behind import settings_for
from tests.integration.test_write_behind_loss import Loss, two_steps

COLD_BACKENDS = ["cosmos", "postgres"]
T = TypeVar("T")


def config(thread_id: str | None = None, **extra: Any) -> RunnableConfig:
    thread_id = thread_id or f"wbs-{uuid.uuid4().hex[:12]}"
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": "", **extra}}


def in_thread(call: Callable[[], T], *, timeout: float) -> T:
    """`call()` on a thread of its own; fails if it has not returned within `timeout`."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), f"still waiting after {timeout} s"
    if failure:
        raise failure[0]
    return outcome[0]


@contextmanager
def loop_thread_held(saver: TieredCheckpointSaver) -> Iterator[None]:
    """The saver's loop thread stuck in a callback (as under a long flush) until the end."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(30)

    saver.loop.call_soon_threadsafe(hold)
    assert held.wait(5)
    try:
        yield
    finally:
        release.set()


@pytest.fixture(params=COLD_BACKENDS)
def saver(
    request: pytest.FixtureRequest, stack_env: dict[str, str]
) -> Iterator[TieredCheckpointSaver]:
    settings = settings_for(stack_env, request.param, stack_env["REDIS_URL"])
    with TieredCheckpointSaver.open_sync(settings) as opened:
        yield opened


def test_a_sync_write_and_a_read_of_it_do_not_wait_for_the_loop_thread(
    saver: TieredCheckpointSaver,
) -> None:
    base = config()
    thread_id = base["configurable"]["thread_id"]
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {"messages": ["a" * 2000]}
    checkpoint["channel_versions"] = {"messages": saver.get_next_version(None, None)}
    with loop_thread_held(saver):
        stored = in_thread(
            lambda: saver.put(
                base, checkpoint, {"source": "input", "step": -1}, checkpoint["channel_versions"]
            ),
            timeout=10,
        )
        in_thread(lambda: saver.put_writes(stored, [("messages", ["b"])], "task-1"), timeout=10)
        # Reading it back is a hit: answered on this thread too.
        latest = in_thread(lambda: saver.get_tuple(config(thread_id)), timeout=10)

    assert latest is not None and latest.checkpoint["id"] == checkpoint["id"]
    assert latest.checkpoint["channel_values"]["messages"] == ["a" * 2000]
    assert latest.pending_writes == [("task-1", "messages", ["b"])]
    assert saver.flusher is not None
    saver.flush(thread_id)
    cold = saver._sync(saver.store.get_checkpoint(thread_id, "", None))
    assert cold is not None and cold.checkpoint_id == checkpoint["id"]
    assert [(w.task_id, w.channel) for w in cold.writes or []] == [("task-1", "messages")]


@pytest.mark.parametrize("backend", COLD_BACKENDS)
def test_in_write_through_mode_a_sync_read_of_a_hit_does_not_wait_for_the_loop_thread(
    backend: str, stack_env: dict[str, str]
) -> None:
    """Write-through with Redis: the latest checkpoint, a cache hit, is read on the
    caller's thread."""
    settings = settings_for(stack_env, backend, stack_env["REDIS_URL"]).model_copy(
        update={"state_write_mode": WriteMode.WRITE_THROUGH}
    )
    with TieredCheckpointSaver.open_sync(settings) as saver:
        assert saver.flusher is None
        cfg = config()
        chat_graph(saver).invoke({"messages": ["hello"]}, cfg)
        written = saver.get_tuple(cfg)
        with loop_thread_held(saver):
            latest = in_thread(lambda: saver.get_tuple(cfg), timeout=10)
    assert written is not None and latest is not None
    assert latest.checkpoint == written.checkpoint
    assert latest.pending_writes == written.pending_writes


def test_in_write_through_mode_sync_writes_to_postgres_do_not_wait_for_the_loop_thread(
    stack_env: dict[str, str],
) -> None:
    """Write-through with Redis on Postgres: a whole run's puts and writes go to both tiers
    from the caller's thread. The hot copy it leaves is a hit, the cold tier holds the
    same checkpoint and writes."""
    settings = settings_for(stack_env, "postgres", stack_env["REDIS_URL"]).model_copy(
        update={"state_write_mode": WriteMode.WRITE_THROUGH}
    )
    with TieredCheckpointSaver.open_sync(settings) as saver:
        cfg = config()
        thread_id = cfg["configurable"]["thread_id"]
        graph = chat_graph(saver)
        with loop_thread_held(saver):
            in_thread(lambda: graph.invoke({"messages": ["hello"]}, cfg), timeout=20)
            hot = in_thread(lambda: saver.get_tuple(cfg), timeout=10)
        cold = saver._sync(saver.store.get_checkpoint(thread_id, "", None))
    assert hot is not None and cold is not None
    assert hot.checkpoint["id"] == cold.checkpoint_id
    assert hot.checkpoint["channel_values"]["messages"][0] == "hello"
    assert sorted((w.task_id, w.channel) for w in cold.writes or []) == sorted(
        (task_id, channel) for task_id, channel, _ in hot.pending_writes or []
    )


def test_with_redis_stalled_a_sync_write_through_put_to_postgres_leaves_no_stale_hot_copy(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    """Write-through with Redis on Postgres, Redis answering nothing as a put's cache update
    goes out: the put completes on the caller's thread (the loop thread stuck), stored
    cold, and the hot copy still showing its parent is suspected there and dropped once
    Redis answers again: neither this process nor another is served the parent."""
    with write_through_on_own_redis(stack_env, tmp_path) as (redis, settings):
        cfg = config()
        with TieredCheckpointSaver.open_sync(settings) as saver:
            chat_graph(saver).invoke({"messages": ["hello"]}, cfg)
            parent = saver.get_tuple(cfg)
            assert parent is not None
            checkpoint = empty_checkpoint()
            checkpoint["channel_values"] = {"messages": ["after the stall"]}
            checkpoint["channel_versions"] = {"messages": saver.get_next_version(None, None)}
            with redis_paused(redis, seconds=6), loop_thread_held(saver):
                stored = in_thread(
                    lambda: saver.put(
                        parent.config,
                        checkpoint,
                        {"source": "update", "step": 9},
                        checkpoint["channel_versions"],
                    ),
                    timeout=15,
                )
            assert stored["configurable"]["checkpoint_id"] == checkpoint["id"]
            # Another process first: this one's next read would drop the entry itself.
            deadline = time.monotonic() + 10
            with TieredCheckpointSaver.open_sync(settings) as other:
                while True:
                    seen = other.get_tuple(cfg)
                    assert seen is not None
                    if seen.checkpoint["id"] == checkpoint["id"]:
                        break
                    assert time.monotonic() < deadline, "another process is served the parent"
                    time.sleep(0.1)
            latest = saver.get_tuple(cfg)
            assert latest is not None and latest.checkpoint["id"] == checkpoint["id"]


def test_with_redis_stalled_a_sync_read_goes_to_postgres_after_one_timeout(
    stack_env: dict[str, str], tmp_path: Path
) -> None:
    """Write-through with Redis on Postgres, Redis answering nothing: a sync read of the
    latest checkpoint waits out the cache lookup once, then reads the cold tier on the
    caller's thread (not a second lookup from the loop thread, held here, which would
    wait out the same stalled Redis again)."""
    with write_through_on_own_redis(stack_env, tmp_path) as (redis, settings):
        cfg = config()
        with TieredCheckpointSaver.open_sync(settings) as saver:
            chat_graph(saver).invoke({"messages": ["hello"]}, cfg)
            written = saver.get_tuple(cfg)
            with redis_paused(redis, seconds=6), loop_thread_held(saver):
                read = in_thread(lambda: saver.get_tuple(cfg), timeout=5)
            assert written is not None and read is not None
            assert read.checkpoint == written.checkpoint
            assert read.pending_writes == written.pending_writes


@contextmanager
def write_through_on_own_redis(
    stack_env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[RedisServer, Settings]]:
    """Write-through settings on Postgres with a Redis of this test's own (to pause)."""
    redis = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    redis.start()
    try:
        yield (
            redis,
            settings_for(stack_env, "postgres", redis.url).model_copy(
                update={"state_write_mode": WriteMode.WRITE_THROUGH}
            ),
        )
    finally:
        redis.stop()


@contextmanager
def redis_paused(redis: RedisServer, *, seconds: float) -> Iterator[None]:
    """Redis answering no client for `seconds` (CLIENT PAUSE), from entering the block to
    leaving it at the earliest: an UNPAUSE would wait behind the pause itself (a new
    client's handshake is paused too)."""
    with redis_py.Redis.from_url(redis.url) as admin:
        admin.execute_command("CLIENT", "PAUSE", int(seconds * 1000))
    ends = time.monotonic() + seconds
    try:
        yield
    finally:
        time.sleep(max(0.0, ends - time.monotonic()))


@pytest.mark.parametrize("mode", [WriteMode.WRITE_THROUGH, WriteMode.WRITE_BEHIND])
def test_a_sync_read_of_a_new_thread_does_not_wait_for_the_loop_thread(
    mode: WriteMode, stack_env: dict[str, str]
) -> None:
    """A new thread misses the cache: its lease and the cold read (Postgres reads from the
    caller's thread) find nothing, with no hand-over; a run then goes on as usual."""
    settings = settings_for(stack_env, "postgres", stack_env["REDIS_URL"]).model_copy(
        update={"state_write_mode": mode}
    )
    with TieredCheckpointSaver.open_sync(settings) as saver:
        cfg = config()
        with loop_thread_held(saver):
            assert in_thread(lambda: saver.get_tuple(cfg), timeout=10) is None
        chat_graph(saver).invoke({"messages": ["hello"]}, cfg)
        latest = saver.get_tuple(cfg)
    assert latest is not None
    assert latest.checkpoint["channel_values"]["messages"][0] == "hello"


def test_a_sync_read_of_an_older_checkpoint_reads_postgres_on_the_callers_thread(
    stack_env: dict[str, str],
) -> None:
    """Write-through with Redis on Postgres: a checkpoint older than the cached latest
    (time travel, a fork) is read from the cold tier on the caller's thread, as the loop
    thread would read it, with no second cache lookup."""
    settings = settings_for(stack_env, "postgres", stack_env["REDIS_URL"]).model_copy(
        update={"state_write_mode": WriteMode.WRITE_THROUGH}
    )
    with TieredCheckpointSaver.open_sync(settings) as saver:
        cfg = config()
        graph = chat_graph(saver)
        graph.invoke({"messages": ["hello"]}, cfg)
        graph.invoke({"messages": ["again"]}, cfg)
        older = list(saver.list(cfg))[3]
        via_loop = saver._sync(saver.aget_tuple(older.config))
        with loop_thread_held(saver):
            here = in_thread(lambda: saver.get_tuple(older.config), timeout=10)
    assert via_loop is not None and here is not None
    assert here.checkpoint == via_loop.checkpoint == older.checkpoint
    assert here.pending_writes == via_loop.pending_writes
    assert here.parent_config == via_loop.parent_config


@pytest.mark.parametrize("mode", [WriteMode.WRITE_THROUGH, WriteMode.WRITE_BEHIND])
def test_a_sync_read_the_cache_misses_fills_it_from_the_cold_tier(
    mode: WriteMode, stack_env: dict[str, str]
) -> None:
    """The hot copy gone, a sync read of the latest checkpoint returns what the cold tier
    holds and puts it back in the cache: the next read is a hit, on the caller's thread."""
    settings = settings_for(stack_env, "postgres", stack_env["REDIS_URL"]).model_copy(
        update={"state_write_mode": mode}
    )
    with TieredCheckpointSaver.open_sync(settings) as saver:
        cfg = config()
        thread_id = cfg["configurable"]["thread_id"]
        chat_graph(saver).invoke({"messages": ["hello"]}, cfg)
        written = saver.get_tuple(cfg)
        saver.flush(thread_id)
        assert saver.cache is not None
        saver._sync(saver.cache.invalidate(thread_id))
        missed = saver.get_tuple(cfg)
        with loop_thread_held(saver):
            hit = in_thread(lambda: saver.get_tuple(cfg), timeout=10)
    assert written is not None and missed is not None and hit is not None
    assert missed.checkpoint == written.checkpoint == hit.checkpoint
    assert missed.pending_writes == written.pending_writes == hit.pending_writes


@pytest.mark.parametrize("mode", [WriteMode.WRITE_THROUGH, WriteMode.WRITE_BEHIND])
def test_a_sync_read_the_cache_misses_is_one_miss_in_its_stats(
    mode: WriteMode, stack_env: dict[str, str]
) -> None:
    """A sync read of a checkpoint the cache does not hold, a named one (read through the
    loop thread) or the latest (its lease taken on the caller's thread), counts one miss:
    the hit ratio the app reports."""
    settings = settings_for(stack_env, "postgres", stack_env["REDIS_URL"]).model_copy(
        update={"state_write_mode": mode}
    )
    with TieredCheckpointSaver.open_sync(settings) as saver:
        cfg = config()
        thread_id = cfg["configurable"]["thread_id"]
        chat_graph(saver).invoke({"messages": ["hello"]}, cfg)
        written = saver.get_tuple(cfg)
        assert written is not None
        saver.flush(thread_id)
        cache = saver.cache
        assert isinstance(cache, RedisCheckpointCache)
        saver._sync(cache.invalidate(thread_id))
        counted = [cache.stats.misses]
        named = saver.get_tuple(config(thread_id, checkpoint_id=written.checkpoint["id"]))
        counted.append(cache.stats.misses)
        latest = saver.get_tuple(cfg)
        counted.append(cache.stats.misses)
    assert named is not None and latest is not None
    assert named.checkpoint == latest.checkpoint == written.checkpoint
    assert [later - earlier for earlier, later in itertools.pairwise(counted)] == [1, 1]


def test_a_sync_run_leaves_one_log_entry_per_write_and_flushes_at_its_boundaries(
    saver: TieredCheckpointSaver,
) -> None:
    assert saver.flusher is not None
    log = saver.flusher.log
    graph = chat_graph(saver, ask=True)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    writes: list[str] = []
    for name in ("put", "put_writes"):
        original = getattr(saver, name)

        def counted(*args: Any, _original: Any = original, _name: str = name) -> Any:
            writes.append(_name)
            return _original(*args)

        setattr(saver, name, counted)

    # Stopped by the review's question: a boundary, so the whole run is cold already.
    paused = graph.invoke({"messages": ["hello"]}, cfg, durability="async")
    assert "__interrupt__" in paused
    assert not saver._sync(log.pending(thread_id))
    cold = saver._sync(saver.store.get_checkpoint(thread_id, "", None))
    assert cold is not None
    assert any(write.channel == "__interrupt__" for write in cold.writes or [])

    # Answered without a boundary: each write is one entry in the log, none cold yet.
    writes.clear()
    done = graph.invoke(Command(resume=True), cfg, durability="async")
    assert done["approved"] is True
    entries = saver._sync(log.read(thread_id, count=1000))
    assert len(entries) == len(writes) >= 3
    assert saver.get_tuple(cfg) is not None

    saver.flush(thread_id)
    assert not saver._sync(log.pending(thread_id))
    fresh = saver._sync(saver.store.get_checkpoint(thread_id, "", None))
    latest = saver.get_tuple(cfg)
    assert fresh is not None and latest is not None
    assert fresh.checkpoint_id == latest.checkpoint["id"]


def test_a_stale_fencing_token_is_refused_on_the_sync_path(saver: TieredCheckpointSaver) -> None:
    graph = chat_graph(saver)
    thread_id = f"wbs-{uuid.uuid4().hex[:12]}"
    graph.invoke({"messages": ["first"]}, config(thread_id, fencing_token=7))

    with pytest.raises(StaleFencingToken) as refused:
        graph.invoke({"messages": ["late"]}, config(thread_id, fencing_token=6))

    assert (refused.value.presented, refused.value.highest) == (6, 7)
    latest = saver.get_tuple(config(thread_id))
    assert latest is not None
    assert not any("late" in message for message in latest.checkpoint["channel_values"]["messages"])


@pytest.mark.parametrize("backend", COLD_BACKENDS)
def test_with_redis_out_a_sync_write_goes_to_the_cold_tier_and_loses_nothing(
    backend: str, stack_env: dict[str, str], tmp_path: Path
) -> None:
    redis = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    redis.start()
    try:
        settings = settings_for(stack_env, backend, redis.url)
        cfg = config()
        thread_id = cfg["configurable"]["thread_id"]
        with TieredCheckpointSaver.open_sync(settings) as saver:
            graph = chat_graph(saver)
            graph.invoke({"messages": ["hello"]}, cfg)
            redis.stop()
            done = graph.invoke({"messages": ["while Redis is out"]}, cfg)
            assert "while Redis is out" in done["messages"]
            saver.flush(thread_id)  # the newest state is cold: nothing waits on Redis

        # Another process, Redis still out: the cold tier holds every message.
        with TieredCheckpointSaver.open_sync(settings) as fresh:
            latest = fresh.get_tuple(cfg)
            assert latest is not None
            assert latest.checkpoint["channel_values"]["messages"] == done["messages"]
    finally:
        redis.stop()


@pytest.mark.parametrize("backend", COLD_BACKENDS)
def test_a_sync_run_whose_unflushed_checkpoints_redis_lost_stops_at_its_next_put(
    backend: str, stack_env: dict[str, str], tmp_path: Path
) -> None:
    redis = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    redis.start()
    try:
        cfg = config()
        thread_id = cfg["configurable"]["thread_id"]
        with TieredCheckpointSaver.open_sync(settings_for(stack_env, backend, redis.url)) as saver:
            assert saver.flusher is not None
            saver._sync(saver.flusher.stop())  # only boundaries flush
            graph = two_steps(saver, "add")
            graph.invoke({"messages": ["u1"]}, cfg)
            saver.flush(thread_id)
            Loss.url = redis.url
            with pytest.raises(HotStateLost):
                graph.invoke({"messages": ["u2"]}, cfg)
            state = graph.get_state(cfg)
        assert state.values["messages"] == ["u1", "first", "second"]
    finally:
        Loss.url = None
        redis.stop()


@pytest.mark.parametrize("backend", COLD_BACKENDS)
@pytest.mark.usefixtures("impatient_for_redis")
def test_an_interrupt_whose_checkpoint_only_redis_held_is_not_acknowledged_when_redis_dies(
    backend: str, stack_env: dict[str, str], tmp_path: Path
) -> None:
    """Redis dies (no persistence) in the node that then asks: the question's writes go to
    the cold tier, but the checkpoint they belong to was in the Redis log alone. The run
    must fail, not return the interrupt as if a fresh process could find it."""
    redis = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    redis.start()

    def ask(_: dict[str, Any]) -> dict[str, Any]:
        redis.stop()
        return {"answer": interrupt("approve?")}

    graph_builder = StateGraph(Asked)
    graph_builder.add_node("ask", ask)
    graph_builder.add_edge(START, "ask")
    graph_builder.add_edge("ask", END)
    try:
        settings = settings_for(stack_env, backend, redis.url)
        with TieredCheckpointSaver.open_sync(settings) as saver:
            assert saver.flusher is not None
            saver._sync(saver.flusher.stop())  # only boundaries flush
            graph = graph_builder.compile(checkpointer=saver)
            with pytest.raises(BackendUnavailable):
                graph.invoke({"answer": ""}, config())
    finally:
        redis.stop()


class Asked(TypedDict):
    answer: str


@pytest.mark.parametrize("backend", COLD_BACKENDS)
def test_a_sync_call_in_flight_when_the_saver_closes_fails_instead_of_waiting_forever(
    backend: str, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The close's waits for its callers, then for its loop's calls (5 s each in the app).
    monkeypatch.setattr(saver_module, "CLOSE_WAIT_SECONDS", 1.0)
    # A named checkpoint the cache misses: read on the loop thread whatever the store.
    cfg = config(checkpoint_id=str(uuid.uuid4()))
    started = threading.Event()
    outcome: list[BaseException] = []
    with TieredCheckpointSaver.open_sync(
        settings_for(stack_env, backend, stack_env["REDIS_URL"])
    ) as saver:

        async def stuck(*_: Any, **__: Any) -> None:
            started.set()
            await asyncio.sleep(60)

        saver.store.get_checkpoint = stuck  # type: ignore[method-assign]

        def read() -> None:
            try:
                saver.get_tuple(cfg)
            except BaseException as exc:
                outcome.append(exc)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert started.wait(10)
    reader.join(10)
    assert not reader.is_alive(), "still waiting on a saver closed under it"
    assert [type(exc) for exc in outcome] == [SaverClosed]
    with pytest.raises(SaverClosed):
        saver.get_tuple(cfg)
    with pytest.raises(SaverClosed):
        saver.put(cfg, empty_checkpoint(), {"source": "input", "step": -1}, {})


def _append(state: list[str], batches: Sequence[list[str]]) -> list[str]:
    return [*state, *(message for batch in batches for message in batch)]


class Noted(TypedDict):
    messages: Annotated[list[str], DeltaChannel(_append, snapshot_frequency=100)]
    answer: str


@pytest.mark.parametrize("backend", COLD_BACKENDS)
@pytest.mark.usefixtures("impatient_for_redis")
def test_a_run_whose_delta_history_only_redis_held_is_not_acknowledged_when_redis_dies(
    backend: str, stack_env: dict[str, str], tmp_path: Path
) -> None:
    """Redis dies (no persistence) in the run's one node: the put after it goes to the cold
    tier, but a DeltaChannel's value is rebuilt from its ancestors' writes, which were
    in the Redis log alone. The run's flush must fail, not report a durable state."""
    redis = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    redis.start()

    def note(_: dict[str, Any]) -> dict[str, Any]:
        redis.stop()
        return {"messages": ["noted"]}

    builder = StateGraph(Noted)
    builder.add_node("note", note)
    builder.add_edge(START, "note")
    builder.add_edge("note", END)
    cfg = config()
    try:
        with TieredCheckpointSaver.open_sync(settings_for(stack_env, backend, redis.url)) as saver:
            assert saver.flusher is not None
            saver._sync(saver.flusher.stop())  # only boundaries flush
            graph = builder.compile(checkpointer=saver)
            assert graph.invoke({"messages": ["hello"], "answer": ""}, cfg)["messages"] == [
                "hello",
                "noted",
            ]
            with pytest.raises(BackendUnavailable):
                saver.flush(cfg["configurable"]["thread_id"])
    finally:
        redis.stop()


@pytest.mark.parametrize("backend", COLD_BACKENDS)
def test_an_interrupt_over_a_checkpoint_already_flushed_is_acknowledged_with_redis_out(
    backend: str, stack_env: dict[str, str], tmp_path: Path
) -> None:
    """The background flusher stored the checkpoint the node runs from; Redis dies, the
    node asks: the question and its checkpoint are in the cold tier, so the run returns it."""
    redis = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    redis.start()
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]
    opened: list[TieredCheckpointSaver] = []

    def ask(_: dict[str, Any]) -> dict[str, Any]:
        saver = opened[0]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            cold = saver._sync(saver.store.get_checkpoint(thread_id, "", None))
            if cold is not None and cold.metadata.get("step") == 0:
                break
            time.sleep(0.05)
        redis.stop()
        return {"answer": interrupt("approve?")}

    builder = StateGraph(Noted)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", END)
    try:
        settings = settings_for(stack_env, backend, redis.url)
        with TieredCheckpointSaver.open_sync(settings) as saver:
            opened.append(saver)
            graph = builder.compile(checkpointer=saver)
            paused = graph.invoke({"messages": ["hello"], "answer": ""}, cfg)
            assert "__interrupt__" in paused
        cold_only = Settings.model_validate(
            {**settings.model_dump(), "redis_url": None, "state_write_mode": "write-through"}
        )
        with TieredCheckpointSaver.open_sync(cold_only) as fresh:
            state = builder.compile(checkpointer=fresh).get_state(cfg)
        assert state.values["messages"] == ["hello"]
        assert state.next == ("ask",) and state.interrupts
    finally:
        redis.stop()


class Counted(TypedDict):
    x: int


@pytest.mark.parametrize("backend", COLD_BACKENDS)
@pytest.mark.usefixtures("impatient_for_redis")
def test_a_subgraphs_cold_write_does_not_make_its_parents_interrupt_look_durable(
    backend: str, stack_env: dict[str, str], tmp_path: Path
) -> None:
    """Redis dies, a subgraph then writes its own namespace to the cold tier, the node
    asks: the parent's newest state (a DeltaChannel's history) was in the log alone, so
    the run fails rather than return a question no fresh process could find."""
    redis = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    redis.start()
    inner = StateGraph(Counted)
    inner.add_node("inc", lambda state: {"x": state["x"] + 1})
    inner.add_edge(START, "inc")
    inner.add_edge("inc", END)
    counting = inner.compile()  # the parent's checkpointer, a namespace of its own
    cfg = config()
    opened: list[TieredCheckpointSaver] = []

    def ask(_: dict[str, Any]) -> dict[str, Any]:
        # Durability "async" saves step 0 while this node runs: wait until it is in the
        # log, or it may reach the cold tier directly once Redis is gone. Looked at in the
        # log itself: a read of the thread would flush it.
        saver = opened[0]
        assert saver.flusher is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            logged = saver._sync(saver.flusher.log.read(cfg["configurable"]["thread_id"], count=50))
            if any(
                isinstance(entry.op, CheckpointPut)
                and entry.op.checkpoint.metadata.get("step") == 0
                for entry in logged
            ):
                break
            time.sleep(0.05)
        redis.stop()
        counting.invoke({"x": 0})
        return {"answer": interrupt("approve?")}

    builder = StateGraph(Noted)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", END)
    try:
        with TieredCheckpointSaver.open_sync(settings_for(stack_env, backend, redis.url)) as saver:
            assert saver.flusher is not None
            saver._sync(saver.flusher.stop())  # only boundaries flush
            opened.append(saver)
            graph = builder.compile(checkpointer=saver)
            with pytest.raises(BackendUnavailable):
                graph.invoke({"messages": ["hello"], "answer": ""}, cfg)
    finally:
        redis.stop()


def test_a_checkpoint_put_after_its_interrupt_was_written_is_a_boundary_too(
    saver: TieredCheckpointSaver,
) -> None:
    """With durability "async" LangGraph saves a step's checkpoint and its tasks' writes
    concurrently, so an interrupt's write can arrive before the checkpoint it belongs to:
    that late put is part of the boundary and returns only once it is cold."""
    assert saver.flusher is not None
    base = config(**{DURABILITY_KEY: "async"})
    thread_id = base["configurable"]["thread_id"]
    checkpoint = empty_checkpoint()
    checkpoint["channel_values"] = {"messages": ["a" * 1000]}
    checkpoint["channel_versions"] = {"messages": saver.get_next_version(None, None)}
    at_checkpoint = config(thread_id, checkpoint_id=checkpoint["id"])
    saver.put_writes(at_checkpoint, [("__interrupt__", "approve?")], "task-1")
    saver.put(base, checkpoint, {"source": "loop", "step": 0}, checkpoint["channel_versions"])

    assert not saver._sync(saver.flusher.log.pending(thread_id))
    cold = saver._sync(saver.store.get_checkpoint(thread_id, "", None))
    assert cold is not None and cold.checkpoint_id == checkpoint["id"]
    assert [w.channel for w in cold.writes or []] == ["__interrupt__"]


def test_a_sibling_tasks_result_written_after_the_interrupt_is_a_boundary_too(
    saver: TieredCheckpointSaver,
) -> None:
    """Parallel tasks: one interrupts while the other is still running. The other's
    result, written after the interrupt's flush, is part of what the interrupt stands on
    (a resume must not run that task again): its write returns once it is cold. The
    next run's writes to that checkpoint are ordinary again."""
    assert saver.flusher is not None
    base = config(**{DURABILITY_KEY: "async"})
    thread_id = base["configurable"]["thread_id"]
    checkpoint = empty_checkpoint()
    saver.put(base, checkpoint, {"source": "loop", "step": 0}, {})
    at_checkpoint = config(thread_id, checkpoint_id=checkpoint["id"], **{DURABILITY_KEY: "async"})
    saver.put_writes(at_checkpoint, [("__interrupt__", "approve?")], "asker")
    saver.put_writes(at_checkpoint, [("messages", ["a" * 1000])], "sibling")

    assert not saver._sync(saver.flusher.log.pending(thread_id))
    cold = saver._sync(saver.store.get_checkpoint(thread_id, "", None))
    assert cold is not None and cold.checkpoint_id == checkpoint["id"]
    assert sorted(w.task_id for w in cold.writes or []) == ["asker", "sibling"]

    # The resume's run starts with LangGraph's read of the latest checkpoint.
    assert saver.get_tuple(config(thread_id, **{CONFIG_KEY_RUNTIME: None})) is not None
    saver.put_writes(at_checkpoint, [("messages", ["b"])], "resumed")
    assert saver._sync(saver.flusher.log.pending(thread_id))


class Parallel(TypedDict):
    answer: str
    looked_up: int


def test_a_run_that_stops_at_an_interrupt_returns_with_its_slower_siblings_result_cold(
    saver: TieredCheckpointSaver,
) -> None:
    """The same through a graph: `ask` interrupts at once, `look_up` (same step) ends
    later. When invoke returns, both are in the cold tier: the resume does not look up
    again."""
    assert saver.flusher is not None
    looked_up: list[int] = []

    def look_up(_state: Parallel) -> dict[str, Any]:
        time.sleep(0.3)
        looked_up.append(1)
        return {"looked_up": len(looked_up)}

    builder = StateGraph(Parallel)
    builder.add_node("ask", lambda _state: {"answer": interrupt("approve?")})
    builder.add_node("look_up", look_up)
    builder.add_edge(START, "ask")
    builder.add_edge(START, "look_up")
    builder.add_edge("ask", END)
    builder.add_edge("look_up", END)
    graph = builder.compile(checkpointer=saver)
    cfg = config()
    thread_id = cfg["configurable"]["thread_id"]

    paused = graph.invoke({"answer": "", "looked_up": 0}, cfg, durability="async")
    assert "__interrupt__" in paused
    assert not saver._sync(saver.flusher.log.pending(thread_id))
    cold = saver._sync(saver.store.get_checkpoint(thread_id, "", None))
    assert cold is not None
    assert {w.channel for w in cold.writes or []} >= {"__interrupt__", "looked_up"}
    done = graph.invoke(Command(resume="yes"), cfg, durability="async")
    assert done == {"answer": "yes", "looked_up": 1}
    assert looked_up == [1]
