"""A saver kept past the close of the backends it was built on (`async with
backends_for(...)` left, the saver still in use): every call is refused (`SaverClosed`)
in every mode and on every cold backend, and a Cosmos connection, like Postgres, opens
no client again once closed (one nothing would close, its HTTP session leaked)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from langgraph.checkpoint.base import empty_checkpoint

from state import backends_for
from state.checkpoint import TieredCheckpointSaver
from state.errors import BackendClosed, SaverClosed
from state.settings import WriteMode
from tests.chat_graph import chat_graph
from tests.integration.test_write_behind import settings_for


def _config(thread_id: str) -> Any:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
@pytest.mark.parametrize("backend", ["cosmos", "postgres"])
async def test_a_saver_used_after_its_backends_closed_is_refused(
    stack_env: dict[str, str], backend: str, mode: str
) -> None:
    settings = settings_for(stack_env, backend, stack_env["REDIS_URL"]).model_copy(
        update={"state_write_mode": WriteMode(mode)}
    )
    thread_id = f"closed-{uuid.uuid4().hex[:12]}"
    async with backends_for(settings) as backends:
        saver = TieredCheckpointSaver.from_backends(backends)
    with pytest.raises(SaverClosed):
        await saver.aget_tuple(_config(thread_id))
    with pytest.raises(SaverClosed):
        await saver.aput(_config(thread_id), empty_checkpoint(), {}, {})
    with pytest.raises(SaverClosed):
        await chat_graph(saver).ainvoke({"messages": ["late"]}, _config(thread_id))
    # Nothing of it reached either tier (nor the write-behind log a read would flush).
    async with backends_for(settings) as fresh:
        assert (
            await TieredCheckpointSaver.from_backends(fresh).aget_tuple(_config(thread_id)) is None
        )
        assert await fresh.checkpoints.get_checkpoint(thread_id, "", None) is None


async def test_a_closed_cosmos_connection_opens_no_client_again(
    stack_env: dict[str, str],
) -> None:
    settings = settings_for(stack_env, "cosmos", stack_env["REDIS_URL"])
    async with backends_for(settings) as backends:
        pass
    with pytest.raises(BackendClosed):
        await backends.checkpoints.get_checkpoint(f"closed-{uuid.uuid4().hex[:12]}", "", None)
