"""A hot copy the cold tier moved past while Redis was out of reach: a worker cut off from
Redis (a partition: Redis keeps its data) writes its checkpoint to the cold tier alone.
Redis answers again still holding the older checkpoint, which every other worker would
be served as the thread's latest (and go on from: a fork past an acknowledged
boundary). The worker that could not advance it drops it as soon as Redis answers, not
on its own next contact with the thread, which may never come."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import create_checkpoint, empty_checkpoint

from devstack import RedisServer, free_port
from state.checkpoint import TieredCheckpointSaver
from state.factory import backends_for
from state.settings import Settings
from tests.faults.proxy import LoopbackProxy
from tests.integration.test_write_behind import settings_for

# A test bound, far above the cache's retry period.
DROPPED_WITHIN_SECONDS = 5.0


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
@pytest.mark.parametrize("backend", ["cosmos", "postgres"])
async def test_a_hot_copy_left_behind_by_a_partition_is_dropped_once_redis_answers(
    backend: str, mode: str, stack_env: dict[str, str], tmp_path: Path
) -> None:
    redis = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    redis.start()
    proxy = LoopbackProxy(redis.port).start()
    try:
        other = Settings.model_validate(
            {**settings_for(stack_env, backend, redis.url).model_dump(), "state_write_mode": mode}
        )
        cut_off = Settings.model_validate(
            {**other.model_dump(), "redis_url": f"redis://127.0.0.1:{proxy.port}/0"}
        )
        async with backends_for(cut_off) as a_tiers, backends_for(other) as b_tiers:
            a = TieredCheckpointSaver.from_backends(a_tiers)
            b = TieredCheckpointSaver.from_backends(b_tiers)
            thread_id = f"partition-{uuid.uuid4().hex[:10]}"
            latest: RunnableConfig = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
            first = create_checkpoint(empty_checkpoint(), None, 1)
            at = await a.aput(latest, first, {"source": "loop", "step": 1}, {})
            await a.aflush(thread_id)
            seen = await b.aget_tuple(latest)
            assert seen is not None and seen.metadata["step"] == 1

            proxy.cut("reset")
            second = create_checkpoint(first, None, 2)
            await a.aput(at, second, {"source": "loop", "step": 2}, {})
            await a.aflush(thread_id)  # acknowledged: the cold tier has step 2
            proxy.restore()

            deadline = time.monotonic() + DROPPED_WITHIN_SECONDS
            steps = []
            while time.monotonic() < deadline:
                found = await b.aget_tuple(latest)
                assert found is not None
                steps.append(found.metadata["step"])
                if steps[-1] == 2:
                    break
                await asyncio.sleep(0.1)
            assert steps[-1] == 2, (
                f"another worker was served step {steps[-1]} for {len(steps)} reads"
            )
    finally:
        proxy.stop()
        redis.stop()
