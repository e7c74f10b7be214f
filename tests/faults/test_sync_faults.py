"""The sync API (`open_sync`) under LangGraph programs on several Python threads while a
server goes away mid-invoke: Redis stopped and started again, or the cold store's
connections cut. Every call ends in time, in its result or one of the state library's
typed errors, and once the server is back the same saver works again."""

from __future__ import annotations

import collections
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from devstack import CosmosEmulator, RedisServer, free_port
from state.checkpoint import TieredCheckpointSaver
from state.errors import StateError
from state.settings import Settings, WriteMode
from tests.chat_graph import chat_graph
from tests.integration.test_write_behind import settings_for

from .proxy import LoopbackProxy
from .test_network_cut import cosmos_behind, proxies  # noqa: F401 (fixtures)

WORKERS = 8
CUT_SECONDS = 1.5


def _conversation(saver: Any, thread_id: str) -> Any:
    graph = chat_graph(saver, ask=True)
    cfg = {"configurable": {"thread_id": thread_id}}
    graph.invoke({"messages": ["hello"]}, cfg)
    graph.invoke(Command(resume=True), cfg)
    return graph.get_state(cfg).values


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
@pytest.mark.parametrize(
    ("backend", "fault"),
    [("postgres", "redis"), ("cosmos", "redis"), ("postgres", "cold"), ("cosmos", "cold")],
)
def test_sync_calls_on_many_threads_through_a_fault_end_typed_then_recover(
    backend: str,
    fault: str,
    mode: str,
    stack_env: dict[str, str],
    tmp_path: Path,
    proxies: Callable[..., LoopbackProxy],  # noqa: F811
    cosmos_behind: Callable[[int], CosmosEmulator],  # noqa: F811
) -> None:
    redis_server = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    redis_server.start()
    settings = settings_for(stack_env, backend, redis_server.url).model_copy(
        update={"state_write_mode": WriteMode(mode)}
    )
    proxy: LoopbackProxy | None = None
    if fault == "cold" and backend == "cosmos":
        proxy_port = free_port()
        emulator = cosmos_behind(proxy_port)
        proxy = proxies(emulator.port, port=proxy_port)
        settings = Settings.model_validate(
            {**settings.model_dump(), "cosmos_endpoint": f"https://127.0.0.1:{proxy.port}/"}
        )
    elif fault == "cold":
        target = urlparse(stack_env["POSTGRES_URL"])
        assert target.port is not None
        proxy = proxies(target.port)
        netloc = f"{target.netloc.rsplit(':', 1)[0]}:{proxy.port}"
        settings = Settings.model_validate(
            {**settings.model_dump(), "postgres_url": target._replace(netloc=netloc).geturl()}
        )
    expected = _conversation(InMemorySaver(), "memory")
    outcomes: collections.Counter[str] = collections.Counter()
    stop = threading.Event()
    try:
        with (
            TieredCheckpointSaver.open_sync(settings) as saver,
            ThreadPoolExecutor(WORKERS) as pool,
        ):

            def loop() -> None:
                while not stop.is_set():
                    try:
                        _conversation(saver, f"fault-{uuid.uuid4().hex[:12]}")
                        outcomes["ok"] += 1
                    except StateError as exc:
                        outcomes[type(exc).__name__] += 1
                    except Exception as exc:
                        outcomes[f"{type(exc).__module__}.{type(exc).__name__}: {exc}"] += 1

            running = [pool.submit(loop) for _ in range(WORKERS)]
            time.sleep(1.0)
            if fault == "redis":
                redis_server.stop()
                time.sleep(CUT_SECONDS)
                redis_server.start()
            else:
                assert proxy is not None
                proxy.cut("reset")
                time.sleep(CUT_SECONDS)
                proxy.restore()
            time.sleep(2.0)
            stop.set()
            for run in running:
                run.result(timeout=120)
            # Back: the same saver serves every thread's run again, as InMemorySaver does.
            again = [
                pool.submit(_conversation, saver, f"after-{uuid.uuid4().hex[:12]}")
                for _ in range(WORKERS)
            ]
            assert [run.result(timeout=120) for run in again] == [expected] * WORKERS
        untyped = [o for o in outcomes if "." in o or ":" in o]
        assert not untyped, outcomes
        print(outcomes)
    finally:
        stop.set()
        redis_server.stop()
