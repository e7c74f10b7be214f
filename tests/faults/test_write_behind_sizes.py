"""Large states and values in write-behind mode: what the log acknowledges, the flusher
stores, on each cold backend, within Azure's request limits (`LimitedTransport`)."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypedDict

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import CheckpointMetadata, empty_checkpoint
from langgraph.graph import END, START, StateGraph

from state.checkpoint import TieredCheckpointSaver
from state.cold import cosmos_client
from state.errors import InvalidValue, StateTooLarge
from state.factory import Backends, backends_for
from state.settings import Settings
from tests.support.cosmos_limits import LimitedTransport


def text(size: int) -> str:
    """Incompressible ASCII of `size` characters."""
    return base64.b64encode(os.urandom(size))[:size].decode()


class Big(TypedDict, total=False):
    a: str
    b: str
    c: str


def big_graph(saver: TieredCheckpointSaver) -> Any:
    def fill(state: Big) -> Big:
        return {"a": text(1_500_000), "b": text(1_500_000), "c": text(1_500_000)}

    builder = StateGraph(Big)
    builder.add_node("fill", fill)
    builder.add_edge(START, "fill")
    builder.add_edge("fill", END)
    return builder.compile(checkpointer=saver)


@asynccontextmanager
async def write_behind(
    settings_for: Callable[..., Settings], backend: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Backends, TieredCheckpointSaver, LimitedTransport]]:
    transport = LimitedTransport()
    monkeypatch.setattr(cosmos_client, "EnvironmentProxyTransport", lambda: transport)
    async with backends_for(settings_for(backend, state_write_mode="write-behind")) as backends:
        yield backends, TieredCheckpointSaver.from_backends(backends), transport


@pytest.mark.parametrize("backend", ["cosmos", "postgres"])
async def test_a_fork_of_a_large_state_is_flushed_whole(
    settings_for: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    async with write_behind(settings_for, backend, monkeypatch) as (backends, saver, transport):
        graph = big_graph(saver)
        thread = f"wb-fork-{uuid.uuid4().hex[:8]}"
        cfg = {"configurable": {"thread_id": thread}}
        await graph.ainvoke({"a": "x"}, cfg, durability="async")
        state = await graph.aget_state(cfg)
        fork = await graph.aupdate_state(state.config, None, as_node="__copy__")
        await saver.aflush(thread)
        assert backends.flusher is not None
        assert not await backends.flusher.log.pending(thread)  # the backlog is shared
        assert transport.violations == []
        assert backends.hot_checkpoints is not None
        await backends.hot_checkpoints.invalidate(thread)
        forked = await graph.aget_state(fork)
        assert forked.values == state.values
        assert (
            forked.config["configurable"]["checkpoint_id"] == fork["configurable"]["checkpoint_id"]
        )


@pytest.mark.parametrize("call", ["async", "sync"])
async def test_a_put_no_flush_could_store_is_refused_before_the_log_holds_it(
    settings_for: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    """Metadata stays in the checkpoint's document whatever spills (queries filter on it):
    over an item, Cosmos refuses the put written through. Written behind, the log must
    refuse it too, with nothing appended: acknowledged, its flush would fail for good and
    hold back every entry of the thread after (and before) it."""
    async with write_behind(settings_for, "cosmos", monkeypatch) as (backends, saver, transport):
        thread = f"wb-meta-{uuid.uuid4().hex[:8]}"
        cfg: RunnableConfig = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
        first = await saver.aput(cfg, empty_checkpoint(), {"source": "input", "step": -1}, {})
        too_large: CheckpointMetadata = {"source": "loop", "step": 0}
        too_large["note"] = text(2_500_000)  # type: ignore[typeddict-unknown-key]
        with pytest.raises(StateTooLarge):
            if call == "async":
                await saver.aput(first, empty_checkpoint(), too_large, {})
            else:
                await asyncio.to_thread(saver.put, first, empty_checkpoint(), too_large, {})
        assert backends.flusher is not None
        await saver.aflush(thread)
        assert not await backends.flusher.log.pending(thread)  # the backlog is shared
        assert backends.hot_checkpoints is not None
        await backends.hot_checkpoints.invalidate(thread)
        latest = await saver.aget_tuple(cfg)
        assert latest is not None
        assert (
            latest.config["configurable"]["checkpoint_id"] == first["configurable"]["checkpoint_id"]
        )
        assert transport.violations == []


@pytest.mark.parametrize("backend", ["cosmos", "postgres"])
async def test_metadata_json_cannot_carry_is_refused_before_the_log_holds_it(
    settings_for: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """A NaN in the metadata: refused by either store written through (`InvalidValue`), so
    refused by the log too, before it holds a put that no flush could ever store."""
    async with write_behind(settings_for, backend, monkeypatch) as (backends, saver, _):
        thread = f"wb-nan-{uuid.uuid4().hex[:8]}"
        cfg: RunnableConfig = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
        first = await saver.aput(cfg, empty_checkpoint(), {"source": "input", "step": -1}, {})
        invalid: CheckpointMetadata = {"source": "loop", "step": 0}
        invalid["score"] = float("nan")  # type: ignore[typeddict-unknown-key]
        with pytest.raises(InvalidValue):
            await saver.aput(first, empty_checkpoint(), invalid, {})
        assert backends.flusher is not None
        await saver.aflush(thread)
        assert not await backends.flusher.log.pending(thread)  # the backlog is shared
