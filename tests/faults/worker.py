"""Worker processes the fault tests start, stop, pause and kill (run by path, not imported).

Settings come from the environment (the app's own names). Every worker talks
JSON lines: events on stdout, commands on stdin, each bounded in count and time.

- `fence-hold THREAD LOCK TTL_MS`: take the lock, then keep writing the
  `holder` section with its fencing token until the store rejects it (the test
  SIGSTOPs it past the TTL and SIGCONTs it after another worker took over).
- `fence-take THREAD LOCK TTL_MS`: wait for "go" on stdin, take the lock
  (retrying until the old holder's TTL ran out), write once, exit.
- `cp-hold THREAD LOCK TTL_MS`: take the lock, then keep running a one-node graph on
  the thread with the lock's fencing token (a checkpoint per run) until a checkpoint
  write is refused (paused and resumed by the test as `fence-hold` is).
- `cp-take THREAD LOCK TTL_MS`: wait for "go", take the lock once the old holder's
  TTL ran out, run the graph once with its fence, flush, report the checkpoint, exit.
  Both run in the write mode STATE_WRITE_MODE sets.
- `drain`: open the backends in write-behind mode and drain the write-behind
  backlog into the cold tier (the test SIGKILLs it part-way).
- `drain-paused PREFIX`: the same, but the process SIGSTOPs itself inside its first
  cold batch of a thread whose id starts with PREFIX, past the flush lock's check
  and before the batch's request (the test lets the lock run out, deletes the
  thread, then SIGCONTs it); reports how the batch ended.
- `zygote`: import the app once, then for each `{"case_id", "mode", "pause"}`
  line fork a child that runs the support-case graph with that LangGraph
  durability mode and reports each node update, so a test can SIGKILL the
  child at any point without paying interpreter start-up per run.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import operator
import os
import signal
import sys
import time
from typing import Annotated, Any, TypedDict

from state.errors import LockNotAcquired, StaleFencingToken, VersionConflict, WorkflowExists
from state.factory import open_backends
from state.ports import Lock
from state.settings import Settings
from state.tiered import TieredStateStore

MAX_WRITES = 400
WRITE_INTERVAL_S = 0.02
TAKE_DEADLINE_S = 20.0


def emit(**event: Any) -> None:
    # One write(2) per line: lines from forked children never interleave.
    os.write(1, (json.dumps(event) + "\n").encode())


async def take_when_told(store: TieredStateStore, lock_name: str, ttl_ms: int) -> Lock | None:
    """Say "ready", wait for a line on stdin, then take the lock, retrying until the old
    holder's TTL has run out (None, reported, if it never does)."""
    emit(event="ready")
    await asyncio.to_thread(sys.stdin.readline)
    deadline = time.monotonic() + TAKE_DEADLINE_S
    while True:
        try:
            return await store.lock(lock_name, ttl_ms=ttl_ms)
        except LockNotAcquired:
            if time.monotonic() > deadline:
                emit(event="never-locked")
                return None
            await asyncio.sleep(0.02)


async def fence_hold(thread_id: str, lock_name: str, ttl_ms: int) -> None:
    backends = await open_backends(Settings())
    store = TieredStateStore.from_backends(backends)
    try:
        # The first requests of a process open its connections (and Cosmos reads its
        # container's metadata): done before the lock, so its TTL times the writes alone.
        await store.get(thread_id)
        lock = await store.lock(lock_name, ttl_ms=ttl_ms)
        # CLOCK_MONOTONIC is system-wide on Linux: the test compares it with its own.
        emit(event="locked", fence=lock.fence, pid=os.getpid(), at=time.monotonic())
        for i in range(MAX_WRITES):
            record = await store.get(thread_id)
            assert record is not None
            try:
                written = await store.update_section(
                    thread_id,
                    "holder",
                    {"pid": os.getpid(), "fence": lock.fence, "i": i},
                    agent_id="fence-hold",
                    expected_version=record.version,
                    fencing_token=lock.fence,
                )
            except StaleFencingToken as stale:
                emit(event="stale", i=i, presented=stale.presented, highest=stale.highest)
                return
            except VersionConflict:
                emit(event="conflict", i=i)
            else:
                emit(event="wrote", i=i, version=written.version, at=time.monotonic())
            await asyncio.sleep(WRITE_INTERVAL_S)
        emit(event="exhausted")
    finally:
        await backends.close()


async def fence_take(thread_id: str, lock_name: str, ttl_ms: int) -> None:
    backends = await open_backends(Settings())
    store = TieredStateStore.from_backends(backends)
    try:
        lock = await take_when_told(store, lock_name, ttl_ms)
        if lock is None:
            return
        # The paused holder may have written cold but not yet hot: a conflict means
        # "re-read", exactly as the app's writers do.
        for _ in range(MAX_WRITES):
            record = await store.get(thread_id)
            assert record is not None
            try:
                written = await store.update_section(
                    thread_id,
                    "holder",
                    {"pid": os.getpid(), "fence": lock.fence, "i": -1},
                    agent_id="fence-take",
                    expected_version=record.version,
                    fencing_token=lock.fence,
                )
            except VersionConflict:
                emit(event="conflict")
                continue
            emit(event="took", fence=lock.fence, version=written.version)
            return
        emit(event="never-wrote")
    finally:
        await backends.close()


# --------------------------------------------------------------------------- fenced checkpoints


class Chat(TypedDict, total=False):
    messages: Annotated[list[str], operator.add]


def chat_graph(saver: Any) -> Any:
    from langgraph.graph import END, START, StateGraph

    def note(state: Chat) -> Chat:
        return {"messages": [f"note-{len(state.get('messages', []))}"]}

    graph = StateGraph(Chat)
    graph.add_node("note", note)
    graph.add_edge(START, "note")
    graph.add_edge("note", END)
    return graph.compile(checkpointer=saver)


def fenced_config(thread_id: str, fence: int) -> dict[str, Any]:
    from state.checkpoint import FENCING_TOKEN_KEY

    return {"configurable": {"thread_id": thread_id, FENCING_TOKEN_KEY: fence}}


async def checkpoint_hold(thread_id: str, lock_name: str, ttl_ms: int) -> None:
    from state.checkpoint import TieredCheckpointSaver

    backends = await open_backends(Settings())
    store = TieredStateStore.from_backends(backends)
    graph = chat_graph(TieredCheckpointSaver.from_backends(backends))
    try:
        lock = await store.lock(lock_name, ttl_ms=ttl_ms)
        emit(event="locked", fence=lock.fence, pid=os.getpid(), at=time.monotonic())
        for i in range(MAX_WRITES):
            try:
                state = await graph.ainvoke(
                    {"messages": [f"hold-{i}"]}, fenced_config(thread_id, lock.fence)
                )
            except StaleFencingToken as stale:
                emit(event="stale", i=i, presented=stale.presented, highest=stale.highest)
                return
            emit(event="wrote", i=i, messages=len(state["messages"]), at=time.monotonic())
            await asyncio.sleep(WRITE_INTERVAL_S)
        emit(event="exhausted")
    finally:
        await backends.close()


async def checkpoint_take(thread_id: str, lock_name: str, ttl_ms: int) -> None:
    from state.checkpoint import TieredCheckpointSaver

    backends = await open_backends(Settings())
    store = TieredStateStore.from_backends(backends)
    saver = TieredCheckpointSaver.from_backends(backends)
    graph = chat_graph(saver)
    try:
        lock = await take_when_told(store, lock_name, ttl_ms)
        if lock is None:
            return
        config = fenced_config(thread_id, lock.fence)
        state = await graph.ainvoke({"messages": ["take"]}, config)
        await saver.aflush(thread_id)
        latest = await saver.aget_tuple(config)
        assert latest is not None
        emit(
            event="took",
            fence=lock.fence,
            checkpoint_id=latest.config["configurable"]["checkpoint_id"],
            messages=state["messages"],
        )
    finally:
        await backends.close()


# --------------------------------------------------------------------------- kill runs

# What a kill run imports: the app, and the backends' adapters, which `state.factory`
# imports only on first open (0.9 s of a child's start-up if left to each child).
PRELOADED = (
    "aiohttp",
    "state.checkpoint.flusher",
    "state.cold.cosmos_checkpoints",
    "state.cold.cosmos_client",
    "state.cold.cosmos_retention",
    "state.cold.cosmos_store",
    "state.hot.redis_checkpoints",
    "state.hot.redis_events",
    "state.hot.redis_store",
    "state.hot.redis_write_behind",
    "support_cases.demo",
    "support_cases.runtime",
    "support_cases.service",
    "tests.step_pause",
)


async def run_case(case_id: str, mode: str, pause: str | None) -> None:
    # Imported here: the fence workers do not need the app (nor its start-up time).
    from support_cases.agents import RunContext
    from support_cases.demo import demo_case
    from support_cases.effects import REQUEST_SECTION
    from support_cases.models import CaseStatus
    from support_cases.runs import RUN_SECTION, new_run_section
    from support_cases.runtime import Runtime
    from support_cases.service import case_config
    from support_cases.settings import AppSettings
    from tests.step_pause import pause_after

    runtime = await Runtime.open(AppSettings(), after_step=pause_after(pause) if pause else None)
    try:
        request = demo_case(case_id)
        with contextlib.suppress(WorkflowExists):  # a re-run of the same case
            await runtime.store.create(
                case_id,
                {REQUEST_SECTION: request, RUN_SECTION: new_run_section(CaseStatus.RUNNING)},
                agent_id="kill-test",
            )
        emit(case_id=case_id, event="started", pid=os.getpid())
        graph_input = {
            "case_id": case_id,
            "customer_id": request["customer_id"],
            "text": request["text"],
            "transactions": request["transactions"],
        }
        async for update in runtime.graph.astream(
            graph_input,
            case_config(case_id),
            context=RunContext(),
            stream_mode="updates",
            durability=mode,
        ):
            emit(case_id=case_id, event="update", nodes=sorted(update))
        emit(case_id=case_id, event="done")
    finally:
        await runtime.close()


def zygote() -> None:
    # Import everything a run needs before forking: children start in milliseconds.
    for module in PRELOADED:
        importlib.import_module(module)

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    emit(event="ready", pid=os.getpid())
    for _ in range(10_000):
        line = sys.stdin.readline()
        if not line:
            return
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                asyncio.run(run_case(job["case_id"], job["mode"], job.get("pause")))
            except BaseException as error:
                emit(case_id=job["case_id"], event="error", error=repr(error))
                status = 1
            finally:
                os._exit(status)
        emit(case_id=job["case_id"], event="forked", pid=pid)


async def drain() -> None:
    backends = await open_backends(Settings())
    assert backends.flusher is not None, "drain needs STATE_WRITE_MODE=write-behind"
    before = await backends.flusher.backlog()
    emit(event="draining", entries=before.entries, pid=os.getpid())
    applied = await backends.flusher.drain()
    emit(event="drained", applied=applied)
    await backends.close()


async def drain_paused(prefix: str) -> None:
    backends = await open_backends(Settings())
    assert backends.flusher is not None, "drain-paused needs STATE_WRITE_MODE=write-behind"
    store = backends.flusher.store
    apply_batch = store.apply_batch
    paused: list[str] = []

    async def pausing(ops: Any, **options: Any) -> None:
        if not paused and ops[0].thread_id.startswith(prefix):
            paused.append(ops[0].thread_id)
            emit(event="paused", thread_id=ops[0].thread_id, entries=len(ops))
            os.kill(os.getpid(), signal.SIGSTOP)
        try:
            await apply_batch(ops, **options)
        except StaleFencingToken as exc:
            emit(event="refused", thread_id=exc.thread_id)
            raise
        emit(event="applied", thread_id=ops[0].thread_id, entries=len(ops))

    store.apply_batch = pausing  # type: ignore[method-assign]
    emit(event="draining", pid=os.getpid())
    applied = await backends.flusher.drain()
    emit(event="drained", applied=applied)
    await backends.close()


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "fence-hold":
        asyncio.run(fence_hold(args[0], args[1], int(args[2])))
    elif command == "fence-take":
        asyncio.run(fence_take(args[0], args[1], int(args[2])))
    elif command == "cp-hold":
        asyncio.run(checkpoint_hold(args[0], args[1], int(args[2])))
    elif command == "cp-take":
        asyncio.run(checkpoint_take(args[0], args[1], int(args[2])))
    elif command == "zygote":
        zygote()
    elif command == "drain":
        asyncio.run(drain())
    elif command == "drain-paused":
        asyncio.run(drain_paused(args[0]))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
