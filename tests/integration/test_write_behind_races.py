"""Write-behind, the orders LangGraph really saves a step in: with durability "async" a
step's checkpoint put and its tasks' writes are saved concurrently, so a task's result
can reach the saver before the put of the checkpoint it belongs to. A boundary (the
step's interrupt) must not return while that result is in the Redis log alone; real
servers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_client
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import empty_checkpoint

from devstack import RedisServer, free_port
from state.checkpoint import TieredCheckpointSaver
from state.checkpoint.saver import DURABILITY_KEY
from state.errors import BackendUnavailable, HotStateLost
from tests.integration.test_write_behind import settings_for

COLD_BACKENDS = ["cosmos", "postgres"]


def config(thread_id: str | None = None, **extra: Any) -> RunnableConfig:
    thread_id = thread_id or f"wbr-{uuid.uuid4().hex[:12]}"
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": "", **extra}}


@pytest.fixture(params=COLD_BACKENDS)
def own_redis_saver(
    request: pytest.FixtureRequest, stack_env: dict[str, str], tmp_path: Path
) -> Iterator[tuple[TieredCheckpointSaver, str]]:
    """A saver over a Redis of its own (the test may FLUSHALL it), background pass off:
    only boundaries flush."""
    redis = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    redis.start()
    try:
        settings = settings_for(stack_env, request.param, redis.url)
        with TieredCheckpointSaver.open_sync(settings) as saver:
            assert saver.flusher is not None
            saver._sync(saver.flusher.stop())
            yield saver, redis.url
    finally:
        redis.stop()


def _step_zero_flushed(saver: TieredCheckpointSaver) -> tuple[RunnableConfig, Any]:
    """Step 0 put and flushed; step 1's checkpoint made (its put not sent yet)."""
    assert saver.flusher is not None
    base = config(**{DURABILITY_KEY: "async"})
    thread_id = base["configurable"]["thread_id"]
    first = empty_checkpoint()
    at_first = saver.put(base, first, {"source": "loop", "step": 0}, {})
    saver.flush(thread_id)
    second = empty_checkpoint()
    second["channel_values"] = {"messages": ["a" * 1000]}
    second["channel_versions"] = {"messages": saver.get_next_version(None, None)}
    parent = config(thread_id, checkpoint_id=at_first["configurable"]["checkpoint_id"])
    parent["configurable"][DURABILITY_KEY] = "async"
    return parent, second


def _cold_task_ids(saver: TieredCheckpointSaver, thread_id: str, checkpoint_id: str) -> list[str]:
    stored = saver._sync(saver.store.get_writes(thread_id, "", checkpoint_id))
    return sorted(write.task_id for write in stored)


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_sibling_result_sent_before_its_checkpoint_is_not_left_in_the_log_when_redis_blips(
    own_redis_saver: tuple[TieredCheckpointSaver, str], api: str
) -> None:
    """Step 1, durability "async": `sibling`'s result on checkpoint C reaches the log
    before C's own put; Redis blips for the put (C goes to the cold tier whole) and for
    `ask`'s interrupt on C (cold too). C's cold copy says nothing of the writes on it:
    the interrupt must not return while `sibling`'s result is in the log alone."""
    saver, _ = own_redis_saver
    assert saver.flusher is not None
    parent, checkpoint = _step_zero_flushed(saver)
    thread_id = parent["configurable"]["thread_id"]
    at_checkpoint = config(thread_id, checkpoint_id=checkpoint["id"], **{DURABILITY_KEY: "async"})
    saver.put_writes(at_checkpoint, [("messages", ["b"])], "sibling")

    blocking, log = saver._blocking, saver.flusher.log
    assert blocking is not None
    originals = {
        (target, name): getattr(target, name)
        for target, name in [
            (blocking, "append_put_blocking"),
            (blocking, "append_writes_blocking"),
            (log, "append_put"),
            (log, "append_writes"),
        ]
    }

    def out(*_args: Any, **_kwargs: Any) -> Any:
        raise BackendUnavailable("redis", "connection reset")

    async def aout(*_args: Any, **_kwargs: Any) -> Any:
        raise BackendUnavailable("redis", "connection reset")

    for target, name in originals:
        setattr(target, name, out if name.endswith("_blocking") else aout)
    versions = checkpoint["channel_versions"]
    try:
        if api == "sync":
            saver.put(parent, checkpoint, {"source": "loop", "step": 1}, versions)
        else:
            saver._sync(saver.aput(parent, checkpoint, {"source": "loop", "step": 1}, versions))
        outcome = "returned"
        interrupt = [("__interrupt__", "approve?")]
        try:
            if api == "sync":
                saver.put_writes(at_checkpoint, interrupt, "ask")
            else:
                saver._sync(saver.aput_writes(at_checkpoint, interrupt, "ask"))
        except BackendUnavailable:
            outcome = "refused"
    finally:
        for (target, name), original in originals.items():
            setattr(target, name, original)
    tasks = _cold_task_ids(saver, thread_id, checkpoint["id"])
    assert outcome == "refused" or tasks == ["ask", "sibling"], (outcome, tasks)


def test_a_sibling_result_redis_lost_before_its_checkpoint_was_put_fails_the_interrupt(
    own_redis_saver: tuple[TieredCheckpointSaver, str],
) -> None:
    """Step 1, durability "async": `sibling`'s result on checkpoint C reaches the log
    before C's own put; Redis loses it (a restart without persistence); C's put and
    `ask`'s interrupt on C then reach the (empty) log and the interrupt's flush stores
    them. The interrupt must not be acknowledged: `sibling`'s result exists nowhere."""
    saver, redis_url = own_redis_saver
    parent, checkpoint = _step_zero_flushed(saver)
    thread_id = parent["configurable"]["thread_id"]
    at_checkpoint = config(thread_id, checkpoint_id=checkpoint["id"], **{DURABILITY_KEY: "async"})
    saver.put_writes(at_checkpoint, [("messages", ["b"])], "sibling")
    redis_client.Redis.from_url(redis_url).flushall()
    saver.put(parent, checkpoint, {"source": "loop", "step": 1}, checkpoint["channel_versions"])
    outcome = "returned"
    try:
        saver.put_writes(at_checkpoint, [("__interrupt__", "approve?")], "ask")
    except HotStateLost:
        outcome = "HotStateLost"
    tasks = _cold_task_ids(saver, thread_id, checkpoint["id"])
    assert outcome == "HotStateLost" or tasks == ["ask", "sibling"], (outcome, tasks)
