"""Closing an `open_sync` saver while other threads' sync calls are in flight: every
caller gets `SaverClosed` (or its call's own result), none hangs, and no connection the
calls opened outlives the close."""

from __future__ import annotations

import collections
import gc
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import pytest
import redis
from langgraph.checkpoint.base import CheckpointTuple, empty_checkpoint

from devstack import RedisServer, free_port
from state.checkpoint import TieredCheckpointSaver
from state.errors import SaverClosed
from state.hot import redis_checkpoints
from state.settings import Settings, WriteMode
from tests.chat_graph import chat_graph
from tests.integration.test_write_behind import settings_for

THREADS = 16
# Each round closes under a different mix of calls: a few make the race show reliably.
ROUNDS = 3


def _settings(stack_env: dict[str, str], backend: str, mode: str, redis_url: str) -> Settings:
    return settings_for(stack_env, backend, redis_url).model_copy(
        update={"state_write_mode": WriteMode(mode)}
    )


def _config(thread_id: str) -> Any:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}


def _invoke_then_maintain(saver: TieredCheckpointSaver) -> None:
    thread_id = f"close-{uuid.uuid4().hex[:12]}"
    chat_graph(saver).invoke({"messages": ["hi"]}, _config(thread_id))
    saver.get_tuple(_config(thread_id))
    saver.copy_thread(thread_id, f"{thread_id}-copy")
    saver.delete_thread(thread_id)


def _no_connections_left(observer: redis.Redis) -> None:
    """No client of the server is left but `observer`, once the server has seen the closed
    sockets go: on a loaded machine it may run late (a fixed 0.2 s wait was a guess), while
    a connection that outlived the close stays."""
    deadline = time.monotonic() + 10
    while True:
        clients = [c for c in observer.client_list() if c["cmd"] != "client|list"]
        if not clients or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert clients == [], f"connections outlived the close: {clients}"


def _close_while_busy(
    settings: Settings, work: Callable[[TieredCheckpointSaver], None]
) -> collections.Counter[str]:
    """`THREADS` threads call `work` in a loop until the saver, closed after a second
    of it, refuses them; what each loop ended on."""
    stop = threading.Event()

    def loop(saver: TieredCheckpointSaver) -> str:
        try:
            while not stop.is_set():
                work(saver)
        except SaverClosed:
            return "SaverClosed"
        except Exception as exc:
            return f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
        return "stopped"

    with ThreadPoolExecutor(THREADS) as pool:
        with TieredCheckpointSaver.open_sync(settings) as saver:
            calls = [pool.submit(loop, saver) for _ in range(THREADS)]
            time.sleep(1.0)
        done, hung = wait(calls, timeout=30)
        stop.set()
    assert not hung, "a sync call hung past the close"
    return collections.Counter(call.result() for call in done)


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
def test_calls_in_flight_at_close_end_as_saver_closed_and_leave_no_connection(
    backend: str, mode: str, stack_env: dict[str, str], tmp_path: Path
) -> None:
    server = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    server.start()
    observer = redis.Redis.from_url(server.url)
    try:
        outcomes: collections.Counter[str] = collections.Counter()
        for _ in range(ROUNDS):
            outcomes.update(
                _close_while_busy(
                    _settings(stack_env, backend, mode, server.url), _invoke_then_maintain
                )
            )
            _no_connections_left(observer)
        assert set(outcomes) == {"SaverClosed"}, outcomes
    finally:
        observer.close()
        server.stop()


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
def test_a_call_on_its_callers_thread_as_the_saver_closes_is_waited_for_and_reopens_nothing(
    backend: str, mode: str, stack_env: dict[str, str], tmp_path: Path
) -> None:
    """A read answered on the caller's own thread (a cache hit) that had begun as the
    saver closed: the close waits for it before it closes the clients, so the read does
    not open a Redis connection again that nothing would close."""
    server = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    server.start()
    observer = redis.Redis.from_url(server.url)
    begun, closed = threading.Event(), threading.Event()
    outcome: list[object] = []
    try:
        with TieredCheckpointSaver.open_sync(
            _settings(stack_env, backend, mode, server.url)
        ) as saver:
            thread_id = f"close-{uuid.uuid4().hex[:12]}"
            chat_graph(saver).invoke({"messages": ["hi"]}, _config(thread_id))
            checked = saver._with_history

            def held(*args: Any) -> bool:
                # The call has begun: it waits here until the close is under way or done.
                begun.set()
                closed.wait(10)
                return checked(*args)

            saver._with_history = held  # type: ignore[method-assign]

            def read() -> None:
                try:
                    outcome.append(saver.get_tuple(_config(thread_id)))
                except Exception as exc:
                    outcome.append(exc)

            reader = threading.Thread(target=read)
            reader.start()
            assert begun.wait(10)
            threading.Timer(0.5, closed.set).start()
        closed.set()
        reader.join(30)
        assert not reader.is_alive()
        _no_connections_left(observer)
        assert len(outcome) == 1 and isinstance(outcome[0], CheckpointTuple), outcome
    finally:
        closed.set()
        observer.close()
        server.stop()


@pytest.mark.parametrize("backend", ["postgres", "cosmos"])
def test_a_listing_left_part_read_past_the_close_is_dropped_quietly(
    backend: str, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`saver.list` read in part and kept past the close: dropped later, it raises nothing
    (Python would print it as ignored); the close closed what it read from."""
    unraisable: list[sys.UnraisableHookArgs] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with TieredCheckpointSaver.open_sync(
        _settings(stack_env, backend, "write-behind", stack_env["REDIS_URL"])
    ) as saver:
        graph = chat_graph(saver)
        cfg = _config(f"close-{uuid.uuid4().hex[:12]}")
        for _ in range(2):
            graph.invoke({"messages": ["hi"]}, cfg)
        listing = saver.list(cfg)
        assert next(listing).checkpoint["channel_values"]["messages"]
    del listing
    gc.collect()
    assert unraisable == []


def test_a_write_through_put_the_saver_closes_under_leaves_no_stale_hot_copy(
    stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Write-through with Redis on Postgres: a put on its caller's thread whose cold write
    landed as the saver closed, the thread's entry suspect (its drop task not yet through):
    the entry is dropped with the put, not left showing the parent to every other process
    (the loop thread refuses the close's late hand-overs)."""
    # The drop task that would delete the suspect entry waits past the close (cancelled).
    monkeypatch.setattr(redis_checkpoints, "SUSPECT_RETRY_SECONDS", 60.0)
    settings = _settings(stack_env, "postgres", "write-through", stack_env["REDIS_URL"])
    thread_id = f"close-{uuid.uuid4().hex[:12]}"
    cfg = _config(thread_id)
    landed = threading.Event()
    outcome: list[object] = []
    with TieredCheckpointSaver.open_sync(settings) as saver:
        chat_graph(saver).invoke({"messages": ["hi"]}, cfg)
        parent = saver.get_tuple(cfg)
        assert parent is not None and saver.cache is not None
        saver.cache.distrust(thread_id, "")
        store = saver._blocking_cold
        assert store is not None
        stored_here = store.put_checkpoint_blocking

        def then_held(*args: Any) -> None:
            stored_here(*args)
            landed.set()
            deadline = time.monotonic() + 10
            while not saver._closed and time.monotonic() < deadline:
                time.sleep(0.01)

        store.put_checkpoint_blocking = then_held  # type: ignore[method-assign]
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = {"messages": ["later"]}
        checkpoint["channel_versions"] = {"messages": saver.get_next_version(None, None)}

        def put() -> None:
            try:
                outcome.append(
                    saver.put(
                        parent.config,
                        checkpoint,
                        {"source": "loop", "step": 9},
                        checkpoint["channel_versions"],
                    )
                )
            except Exception as exc:
                outcome.append(exc)

        writer = threading.Thread(target=put)
        writer.start()
        assert landed.wait(10)
    writer.join(30)
    assert not writer.is_alive() and len(outcome) == 1, outcome
    with TieredCheckpointSaver.open_sync(settings) as other:
        cold = other._sync(other.store.get_checkpoint(thread_id, "", None))
        latest = other.get_tuple(cfg)
    assert cold is not None and cold.checkpoint_id == checkpoint["id"]
    assert latest is not None and latest.checkpoint["id"] == checkpoint["id"], (
        f"another process read the parent {parent.checkpoint['id']} as the latest"
    )
