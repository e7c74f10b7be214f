"""Closing an `open_sync` saver while other threads' sync calls are in flight: every
caller gets `SaverClosed` (or its call's own result), none hangs, and no connection the
calls opened outlives the close."""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import pytest
import redis

from devstack import RedisServer, free_port
from state.checkpoint import TieredCheckpointSaver
from state.errors import SaverClosed
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
            time.sleep(0.2)  # the server notices closed sockets
            clients = [c for c in observer.client_list() if c["cmd"] != "client|list"]
            assert clients == [], f"connections outlived the close: {clients}"
        assert set(outcomes) == {"SaverClosed"}, outcomes
    finally:
        observer.close()
        server.stop()
