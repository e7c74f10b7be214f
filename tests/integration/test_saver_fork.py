"""A saver used in a process forked from the one that opened it: its loop thread and its
connections are the parent's, so every call there is refused (`SaverForked`) at once,
rather than wait forever for a loop thread the child does not have, or talk over the
parent's sockets."""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.connection
import os
import time
import uuid
import warnings
from typing import Any

import pytest

from state.checkpoint import TieredCheckpointSaver
from state.errors import SaverForked
from state.settings import Settings, WriteMode
from tests.chat_graph import NODES, chat_graph
from tests.integration.test_write_behind import settings_for

# Far past a refusal, far short of a run's wait on a hang.
CHILD_SECONDS = 20


def _config(thread_id: str) -> Any:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}


def _in_child(
    saver: TieredCheckpointSaver,
    settings: Settings,
    thread_id: str,
    answer: multiprocessing.connection.Connection,
) -> None:
    outcomes: list[str] = []
    for call in (
        lambda: saver.get_tuple(_config(thread_id)),
        lambda: list(saver.list(_config(thread_id))),
        lambda: chat_graph(saver).invoke({"messages": ["from the child"]}, _config(thread_id)),
    ):
        try:
            call()
            outcomes.append("served")
        except Exception as exc:
            outcomes.append(type(exc).__name__)
    # What the refusal says to do: a saver of the child's own works.
    with TieredCheckpointSaver.open_sync(settings) as own:
        chat_graph(own).invoke({"messages": ["from the child"]}, _config(thread_id))
        own.flush(thread_id)
        outcomes.append("served" if own.get_tuple(_config(thread_id)) else "lost")
    answer.send(outcomes)


@pytest.mark.parametrize(
    ("backend", "mode", "hot"),
    [
        ("postgres", "write-behind", True),
        ("cosmos", "write-behind", True),
        ("postgres", "write-through", True),
        ("postgres", "write-through", False),
    ],
)
def test_a_forked_child_is_refused_and_the_parent_saver_still_works(
    stack_env: dict[str, str], backend: str, mode: str, hot: bool
) -> None:
    settings: Settings = settings_for(stack_env, backend, stack_env["REDIS_URL"]).model_copy(
        update={"state_write_mode": WriteMode(mode)}
    )
    if not hot:
        settings = settings.model_copy(update={"redis_url": None})
    thread_id = f"fork-{uuid.uuid4().hex[:12]}"
    with TieredCheckpointSaver.open_sync(settings) as saver:
        chat_graph(saver).invoke({"messages": ["hi"]}, _config(thread_id))
        saver.flush(thread_id)
        before = saver.get_tuple(_config(thread_id))
        assert before is not None
        context = multiprocessing.get_context("fork")
        receive, send = context.Pipe(duplex=False)
        child = context.Process(
            target=_in_child, args=(saver, settings, f"{thread_id}-other", send)
        )
        child.start()
        try:
            assert receive.poll(CHILD_SECONDS), "the child's calls hung"
            assert receive.recv() == ["SaverForked"] * 3 + ["served"]
        finally:
            child.kill()
            child.join()
        # The parent's connections were not touched: it reads and writes on.
        chat_graph(saver).invoke({"messages": ["again"]}, _config(thread_id))
        saver.flush(thread_id)
        after = saver.get_tuple(_config(thread_id))
        assert after is not None
        assert after.checkpoint["id"] != before.checkpoint["id"]


def _exit_status_within(pid: int, seconds: float) -> int | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    return None


@pytest.mark.parametrize("hot", [True, False])
def test_a_forked_child_leaving_the_open_sync_block_leaves_the_parents_saver_open(
    stack_env: dict[str, str], hot: bool
) -> None:
    """`os.fork()` inside the block, the child going on to its end (a forking server):
    the child's copy is left at once, without waiting for the loop thread it lacks, and
    without ending the connections it shares with the parent."""
    settings = settings_for(stack_env, "postgres", stack_env["REDIS_URL"]).model_copy(
        update={"state_write_mode": WriteMode.WRITE_THROUGH}
    )
    if not hot:
        settings = settings.model_copy(update={"redis_url": None})
    thread_id = f"fork-exit-{uuid.uuid4().hex[:12]}"
    opened = TieredCheckpointSaver.open_sync(settings)
    saver = opened.__enter__()
    try:
        chat_graph(saver).invoke({"messages": ["hi"]}, _config(thread_id))
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                opened.__exit__(None, None, None)
                try:
                    saver.get_tuple(_config(thread_id))
                except SaverForked:
                    code = 0
            finally:
                os._exit(code)
        status = _exit_status_within(pid, CHILD_SECONDS)
        if status is None:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        assert status == 0, "the child's close hung" if status is None else status
        for _ in range(3):  # each pooled connection of the parent's, in turn
            chat_graph(saver).invoke({"messages": ["again"]}, _config(thread_id))
        latest = saver.get_tuple(_config(thread_id))
        assert latest is not None
        assert len(latest.checkpoint["channel_values"]["messages"]) == 4 * (1 + len(NODES))
    finally:
        opened.__exit__(None, None, None)


def _calls_in_child(
    saver: TieredCheckpointSaver, thread_id: str, answer: multiprocessing.connection.Connection
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refused: list[str] = []
        for call in (
            lambda: saver.delete_thread(thread_id),
            lambda: list(saver.list(_config(thread_id))),
            lambda: saver.put_writes(
                {"configurable": {**_config(thread_id)["configurable"], "checkpoint_id": "1"}},
                [("messages", "x")],
                "task",
            ),
        ):
            try:
                call()
                refused.append("served")
            except Exception as exc:
                refused.append(type(exc).__name__)
        gc.collect()
    answer.send((refused, [str(w.message) for w in caught]))


@pytest.mark.parametrize("hot", [True, False])
def test_a_forked_childs_refused_calls_leave_no_coroutine_unawaited(
    stack_env: dict[str, str], hot: bool
) -> None:
    """A refused sync call in a forked child closes what it made for the loop thread: no
    "coroutine ... was never awaited" warning for each call in the child's log."""
    settings = settings_for(stack_env, "postgres", stack_env["REDIS_URL"]).model_copy(
        update={"state_write_mode": WriteMode.WRITE_THROUGH}
    )
    if not hot:
        settings = settings.model_copy(update={"redis_url": None})
    with TieredCheckpointSaver.open_sync(settings) as saver:
        context = multiprocessing.get_context("fork")
        receive, send = context.Pipe(duplex=False)
        child = context.Process(
            target=_calls_in_child, args=(saver, f"fork-warn-{uuid.uuid4().hex[:12]}", send)
        )
        child.start()
        try:
            assert receive.poll(CHILD_SECONDS), "the child's calls hung"
            refused, warned = receive.recv()
        finally:
            child.kill()
            child.join()
    assert refused == ["SaverForked"] * 3
    assert warned == []
