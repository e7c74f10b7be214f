"""Pending writes survive a crash mid-step: a real process is SIGKILLed between a parallel
node finishing and the step committing, and the run resumes without re-running that node.

Run as a script, this module is the worker that gets killed:
`python tests/integration/test_crash_resume.py <workdir> <thread_id>` (settings from the environment).
"""

from __future__ import annotations

import asyncio
import operator
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph

from state.checkpoint import TieredCheckpointSaver
from state.factory import backends_for
from state.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
# Side effects, one line per node execution: what a resume must not repeat.
RUNS_LOG = "runs.log"
# The slow node waits for this file; the crashed worker never sees it.
RELEASE = "release"
SLOW_NODE_WAIT_SECONDS = 60.0
DEADLINE_SECONDS = 60.0


class RunState(TypedDict, total=False):
    completed_steps: Annotated[list[str], operator.add]


def _record(workdir: Path, event: str) -> None:
    with (workdir / RUNS_LOG).open("a") as log:
        log.write(event + "\n")
        log.flush()
        os.fsync(log.fileno())


def build_graph(
    checkpointer: TieredCheckpointSaver, workdir: Path
) -> CompiledStateGraph[Any, Any, Any, Any]:
    """intake -> fast || slow -> join -> done; every node logs its execution."""

    def step(name: str) -> Any:
        def run(state: RunState) -> RunState:
            _record(workdir, name)
            return {"completed_steps": [name]}

        return run

    def slow(state: RunState) -> RunState:
        _record(workdir, "slow-start")
        deadline = time.monotonic() + SLOW_NODE_WAIT_SECONDS
        while not (workdir / RELEASE).exists():
            if time.monotonic() > deadline:
                raise TimeoutError("slow node was never released")
            time.sleep(0.02)
        _record(workdir, "slow")
        return {"completed_steps": ["slow"]}

    graph = StateGraph(RunState)
    graph.add_node("intake", step("intake"))
    graph.add_node("fast", step("fast"))
    graph.add_node("slow", slow)
    graph.add_node("join", step("join"))
    graph.add_node("done", step("done"))
    graph.add_edge(START, "intake")
    graph.add_edge("intake", "fast")
    graph.add_edge("intake", "slow")
    graph.add_edge(["fast", "slow"], "join")
    graph.add_edge("join", "done")
    graph.add_edge("done", END)
    return graph.compile(checkpointer=checkpointer)


def worker(workdir: Path, thread_id: str) -> None:
    """The process that gets killed: a plain synchronous `graph.invoke`, durability sync."""
    with TieredCheckpointSaver.open_sync(Settings()) as saver:
        config: RunnableConfig = {"configurable": {"thread_id": thread_id}}
        build_graph(saver, workdir).invoke({"completed_steps": []}, config, durability="sync")


def _events(workdir: Path) -> list[str]:
    path = workdir / RUNS_LOG
    return path.read_text().split() if path.exists() else []


def _settings(stack_env: dict[str, str], hot: bool) -> dict[str, str]:
    env = {
        "COSMOS_ENDPOINT": stack_env["COSMOS_ENDPOINT"],
        "COSMOS_KEY": stack_env["COSMOS_KEY"],
        "COSMOS_CREATE_IF_MISSING": "true",
        "STATE_COLD_BACKEND": "cosmos",
    }
    if hot:
        env["REDIS_URL"] = stack_env["REDIS_URL"]
    return env


@pytest.mark.parametrize("hot", [True, False], ids=["with-redis", "cold-only"])
async def test_killed_mid_step_resumes_without_rerunning_the_finished_node(
    stack_env: dict[str, str], tmp_path: Path, hot: bool
) -> None:
    thread_id = f"crash-{os.urandom(6).hex()}"
    config: RunnableConfig = {"configurable": {"thread_id": thread_id}}
    values = _settings(stack_env, hot)
    settings = Settings.model_validate({key.lower(): value for key, value in values.items()})
    env = {**os.environ, **values, "PYTHONPATH": str(REPO_ROOT)}
    for name in ("REDIS_URL", "REDIS_HOST"):
        if name not in values:
            env.pop(name, None)

    errors = (tmp_path / "worker.err").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        str(tmp_path),
        thread_id,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=errors,
    )
    try:
        async with backends_for(settings) as backends:
            observer = TieredCheckpointSaver(backends.checkpoints)  # reads the cold tier only
            # Kill once "fast" has finished and its write is durable, while "slow" still runs.
            deadline = time.monotonic() + DEADLINE_SECONDS
            while True:
                assert process.returncode is None, (tmp_path / "worker.err").read_text()
                assert time.monotonic() < deadline, f"no crash point reached: {_events(tmp_path)}"
                latest = await observer.aget_tuple(config)
                saved = [(w[1], w[2]) for w in latest.pending_writes or []] if latest else []
                if "slow-start" in _events(tmp_path) and ("completed_steps", ["fast"]) in saved:
                    break
                await asyncio.sleep(0.05)
            process.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(process.wait(), 10) == -signal.SIGKILL
            assert sorted(_events(tmp_path)) == ["fast", "intake", "slow-start"]
            assert latest is not None
            assert "join" not in latest.checkpoint["channel_values"].get("completed_steps", [])

            # A new worker (this process, a fresh saver) resumes the thread from its checkpoint.
            (tmp_path / RELEASE).touch()
            resumed = build_graph(TieredCheckpointSaver.from_backends(backends), tmp_path)
            final = await resumed.ainvoke(None, config, durability="sync")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        errors.close()

    events = _events(tmp_path)
    assert events.count("fast") == 1, events  # the finished node did not run again
    assert events.count("intake") == 1
    assert events.count("slow-start") == 2  # the interrupted node ran again, to completion
    assert events[-3:] == ["slow", "join", "done"]
    assert sorted(final["completed_steps"]) == sorted(["intake", "fast", "slow", "join", "done"])


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
