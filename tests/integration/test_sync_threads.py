"""The sync API as LangGraph programs call it from several Python threads at once
(`open_sync`, both write modes, each cold backend): every thread's graph ends in the state,
history and interrupts InMemorySaver gives the same calls."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import BaseCheckpointSaver, empty_checkpoint
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from state import (
    SaverClosed,
    SaverLoopStopped,
    StateError,
    SyncCallOnSaverLoop,
    open_backends,
)
from state.checkpoint import TieredCheckpointSaver
from state.checkpoint.saver import LOOP_START_WAIT_SECONDS
from state.settings import Settings, WriteMode
from tests.chat_graph import chat_graph
from tests.integration.test_write_behind import settings_for

WORKERS = 8


def _settings(stack_env: dict[str, str], backend: str, mode: str) -> Settings:
    return settings_for(stack_env, backend, stack_env["REDIS_URL"]).model_copy(
        update={"state_write_mode": WriteMode(mode)}
    )


def _config(thread_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id}}


def _conversation(saver: BaseCheckpointSaver[Any], thread_id: str) -> dict[str, Any]:
    """Ask, resume, update, ask again: what a user sees of it (state, history, interrupts)."""
    graph = chat_graph(saver, ask=True)
    cfg = _config(thread_id)
    paused = graph.invoke({"messages": ["hello"]}, cfg)
    question = [i.value for i in paused["__interrupt__"]]
    done = graph.invoke(Command(resume=True), cfg)
    graph.update_state(cfg, {"messages": ["edited"]})
    streamed = [list(chunk) for chunk in graph.stream({"messages": ["again"]}, cfg)]
    state = graph.get_state(cfg)
    history = list(graph.get_state_history(cfg))
    return {
        "question": question,
        "done": done,
        "streamed": streamed,
        "values": state.values,
        "next": state.next,
        "interrupts": [i.value for i in state.interrupts],
        "history": [
            (
                h.metadata["step"] if h.metadata else None,
                h.metadata and h.metadata["source"],
                h.next,
            )
            for h in history
        ],
        "history_values": [h.values for h in history],
    }


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
@pytest.mark.parametrize("backend", ["cosmos", "postgres"])
def test_eight_threads_see_what_an_in_memory_saver_gives(
    backend: str, mode: str, stack_env: dict[str, str]
) -> None:
    expected = _conversation(InMemorySaver(), "memory")
    before = set(threading.enumerate())
    with (
        TieredCheckpointSaver.open_sync(_settings(stack_env, backend, mode)) as saver,
        ThreadPoolExecutor(WORKERS) as pool,
    ):
        runs = [
            pool.submit(_conversation, saver, f"sync-{uuid.uuid4().hex[:12]}")
            for _ in range(WORKERS * 2)
        ]
        seen = [run.result(timeout=240) for run in runs]
    for got in seen:
        assert got == expected
    left = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert left == [], left


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
@pytest.mark.parametrize("backend", ["cosmos", "postgres"])
def test_a_sync_call_from_inside_a_running_loop(
    backend: str, mode: str, stack_env: dict[str, str]
) -> None:
    with TieredCheckpointSaver.open_sync(_settings(stack_env, backend, mode)) as saver:
        graph = chat_graph(saver)
        cfg = _config(f"sync-{uuid.uuid4().hex[:12]}")

        async def inside() -> Any:
            return graph.invoke({"messages": ["hi"]}, cfg)

        done = asyncio.run(inside())
        assert len(done["messages"]) == 5

        async def on_saver_loop() -> Any:
            return graph.get_state(cfg)

        with pytest.raises(SyncCallOnSaverLoop):
            asyncio.run_coroutine_threadsafe(on_saver_loop(), saver.loop).result(30)


@pytest.mark.parametrize("mode", ["write-through", "write-behind"])
@pytest.mark.parametrize("backend", ["cosmos", "postgres"])
def test_threads_invoking_one_thread_id(backend: str, mode: str, stack_env: dict[str, str]) -> None:
    settings = _settings(stack_env, backend, mode)
    thread_id = f"same-{uuid.uuid4().hex[:12]}"
    cfg = _config(thread_id)
    with (
        TieredCheckpointSaver.open_sync(settings) as saver,
        ThreadPoolExecutor(WORKERS) as pool,
    ):
        graph = chat_graph(saver)

        def one(i: int) -> str:
            try:
                graph.invoke({"messages": [f"u{i}"]}, cfg)
                return "ok"
            except Exception as exc:
                return f"{type(exc).__module__}.{type(exc).__name__}: {exc}"

        outcomes = [c.result(timeout=240) for c in [pool.submit(one, i) for i in range(16)]]
        state = graph.get_state(cfg)
        history = list(graph.get_state_history(cfg))
        saver.flush(thread_id)
    print(outcomes)
    with TieredCheckpointSaver.open_sync(settings.model_copy(update={"redis_url": None})) as cold:
        cold_state = chat_graph(cold).get_state(cfg)
        cold_history = list(chat_graph(cold).get_state_history(cfg))
    assert cold_state.values == state.values
    assert [h.config for h in cold_history] == [h.config for h in history]
    assert all(o == "ok" or o.startswith("state.") for o in outcomes), outcomes


@pytest.mark.parametrize(
    ("backend", "mode", "hot"),
    [
        ("cosmos", "write-through", True),
        ("postgres", "write-behind", True),
        # No hot tier on Postgres: the sync API runs its statements on the caller's thread.
        ("postgres", "write-through", False),
    ],
)
async def test_every_sync_call_on_the_saver_loop_is_refused_with_a_typed_error(
    backend: str, mode: str, hot: bool, stack_env: dict[str, str]
) -> None:
    """Waiting on the loop it blocks would hang: each sync entry point refuses at once, with
    the library's own error (still the `asyncio.InvalidStateError` LangGraph's async savers
    raise), and sends nothing."""
    settings = _settings(stack_env, backend, mode)
    if not hot:
        settings = settings.model_copy(update={"redis_url": None, "state_write_mode": None})
    backends = await open_backends(settings)
    try:
        saver = TieredCheckpointSaver.from_backends(backends)
        thread_id = f"on-loop-{uuid.uuid4().hex[:12]}"
        cfg: RunnableConfig = {"configurable": {"thread_id": thread_id, "checkpoint_ns": ""}}
        checkpoint = empty_checkpoint()
        written = {"configurable": {**cfg["configurable"], "checkpoint_id": checkpoint["id"]}}
        calls: dict[str, Any] = {
            "get_tuple": lambda: saver.get_tuple(cfg),
            "get": lambda: saver.get(cfg),
            "list": lambda: list(saver.list(cfg)),
            "put": lambda: saver.put(cfg, checkpoint, {}, {}),
            "put_writes": lambda: saver.put_writes(written, [("messages", "hi")], "task-1"),
            "get_delta_channel_history": lambda: saver.get_delta_channel_history(
                config=cfg, channels=["messages"]
            ),
            "flush": lambda: saver.flush(thread_id),
            "seed_fence": lambda: saver.seed_fence(thread_id, 7),
            "delete_thread": lambda: saver.delete_thread(thread_id),
            "delete_for_runs": lambda: saver.delete_for_runs(["run-1"]),
            "copy_thread": lambda: saver.copy_thread(thread_id, f"{thread_id}-copy"),
            "prune": lambda: saver.prune([thread_id]),
        }
        for name, call in calls.items():
            with pytest.raises(StateError) as refused:
                call()
            assert isinstance(refused.value, SyncCallOnSaverLoop), (name, refused.value)
            assert isinstance(refused.value, asyncio.InvalidStateError), name
            assert "use the async methods" in str(refused.value), name
        assert await saver.aget_tuple(cfg) is None
        assert [t async for t in saver.alist(cfg)] == []
    finally:
        await backends.close()


def _outcome_within(seconds: float, call: Any) -> BaseException | None:
    """What `call` raised on a thread of its own, or None; the test fails if it hangs."""
    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            raised.append(None)
        except BaseException as exc:  # whatever it is, the test looks at it
            raised.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "the call hangs"
    return raised[0]


def test_calls_handed_to_a_loop_that_is_not_running_are_refused_typed(
    stack_env: dict[str, str],
) -> None:
    """The saver built on a loop its owner runs only in turns (`run_until_complete`), and
    on one `asyncio.run` has closed: a call that would wait for that loop is refused at
    once with `SaverLoopStopped` (sync, and async from another loop), not left hanging or
    raised as a bare RuntimeError. Cosmos: every call goes through the loop."""
    settings = _settings(stack_env, "cosmos", "write-through")
    cfg = _config(f"stopped-{uuid.uuid4().hex[:12]}")
    loop = asyncio.new_event_loop()
    try:
        backends = loop.run_until_complete(open_backends(settings))
        saver = TieredCheckpointSaver.from_backends(backends, loop=loop)
        try:
            graph = chat_graph(saver)
            invoked = _outcome_within(30, lambda: graph.invoke({"messages": ["hi"]}, cfg))
            assert isinstance(invoked, SaverLoopStopped), invoked
            read = _outcome_within(30, lambda: asyncio.run(saver.aget_tuple(cfg)))
            assert isinstance(read, SaverLoopStopped), read
        finally:
            loop.run_until_complete(backends.close())
    finally:
        loop.close()

    async def opened_and_closed() -> TieredCheckpointSaver:
        backends = await open_backends(settings)
        await backends.close()
        return TieredCheckpointSaver.from_backends(backends)

    closed = asyncio.run(opened_and_closed())
    listed = _outcome_within(30, lambda: list(closed.list(cfg)))
    assert isinstance(listed, SaverLoopStopped), listed


def test_a_call_made_while_the_saver_loop_is_starting_is_served(
    stack_env: dict[str, str],
) -> None:
    """The backends opened with `run_until_complete`, then the loop served on a thread of
    its own (as `LoopThread` does): a call made before that thread's `run_forever` has
    begun waits for it, as before `SaverLoopStopped`, instead of being refused."""
    settings = _settings(stack_env, "cosmos", "write-through")
    cfg = _config(f"starting-{uuid.uuid4().hex[:12]}")
    loop = asyncio.new_event_loop()
    backends = loop.run_until_complete(open_backends(settings))
    saver = TieredCheckpointSaver.from_backends(backends, loop=loop)
    go = threading.Event()

    def serve() -> None:
        go.wait()  # a thread slow to start: the first call is made before the loop runs
        loop.run_forever()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        threading.Timer(0.3, go.set).start()
        assert _outcome_within(30, lambda: saver.get_tuple(cfg)) is None
        assert _outcome_within(30, lambda: asyncio.run(saver.aget_tuple(cfg))) is None
    finally:
        go.set()
        asyncio.run_coroutine_threadsafe(backends.close(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        server.join()
        loop.close()


def test_a_call_handed_over_as_the_saver_loop_stops_is_refused_when_it_closes(
    stack_env: dict[str, str],
) -> None:
    """A call handed to the loop while it still runs its owner's last turn, which ends
    before the call ran, then the loop closed: the caller gets `SaverLoopStopped` (sync,
    and async from another loop) instead of waiting forever for the closed loop."""
    settings = _settings(stack_env, "cosmos", "write-through")
    cfg = _config(f"stopping-{uuid.uuid4().hex[:12]}")
    opener = asyncio.new_event_loop()
    backends = opener.run_until_complete(open_backends(settings))
    # Given a loop of its own (the calls never run there): the backends stay on the
    # loop that opened them, which closes them.
    loop = asyncio.new_event_loop()
    saver = TieredCheckpointSaver.from_backends(backends, loop=loop)
    handed: list[threading.Thread] = []
    outcomes: list[BaseException | None] = [None, None]

    def call(index: int, read: Any) -> None:
        try:
            read()
        except BaseException as exc:  # whatever it is, the test looks at it
            outcomes[index] = exc

    async def last_turn() -> None:
        # The loop runs, blocked here so that it does not get to the calls handed over
        # meanwhile; this turn is its last.
        for index, read in enumerate(
            [lambda: saver.get_tuple(cfg), lambda: asyncio.run(saver.aget_tuple(cfg))]
        ):
            handed.append(threading.Thread(target=call, args=(index, read), daemon=True))
            handed[-1].start()
        time.sleep(1.0)  # noqa: ASYNC251

    try:
        try:
            loop.run_until_complete(last_turn())
        finally:
            loop.close()
        for caller in handed:
            caller.join(30)
            assert not caller.is_alive(), "the call hangs"
        assert all(isinstance(outcome, SaverLoopStopped) for outcome in outcomes), outcomes
    finally:
        opener.run_until_complete(backends.close())
        opener.close()


def test_an_async_caller_cancelled_cancels_its_call_on_the_saver_loop(
    stack_env: dict[str, str],
) -> None:
    """An async call from another loop, cancelled while it waits for the saver's loop
    thread: the call there is cancelled too, not left to run on."""
    settings = _settings(stack_env, "postgres", "write-through")
    with TieredCheckpointSaver.open_sync(settings) as saver:
        started = threading.Event()
        cancelled = threading.Event()

        async def long_call() -> None:
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        async def caller() -> None:
            waiting = asyncio.ensure_future(saver._on_loop(long_call()))
            await asyncio.to_thread(started.wait, 10)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting

        asyncio.run(caller())
        assert cancelled.wait(10), "the call on the saver loop runs on"


def test_an_async_call_from_another_loop_cut_off_by_the_close_is_saver_closed(
    stack_env: dict[str, str],
) -> None:
    """An async call from another loop still running on an `open_sync` saver's loop as the
    saver closes: its caller gets `SaverClosed`, as a sync caller does, not the cancellation
    of the call on the saver loop (a `CancelledError` its own task never asked for)."""
    settings = _settings(stack_env, "postgres", "write-through")
    started = threading.Event()
    outcome: list[BaseException | None] = []

    async def long_call() -> None:
        started.set()
        await asyncio.sleep(30)

    async def caller(saver: TieredCheckpointSaver) -> None:
        await saver._on_loop(long_call())

    def call(saver: TieredCheckpointSaver) -> None:
        try:
            asyncio.run(caller(saver))
            outcome.append(None)
        except BaseException as exc:  # whatever it is, the test looks at it
            outcome.append(exc)

    with TieredCheckpointSaver.open_sync(settings) as saver:
        calling = threading.Thread(target=call, args=(saver,), daemon=True)
        calling.start()
        assert started.wait(10)
    calling.join(30)
    assert not calling.is_alive(), "the call hangs"
    assert len(outcome) == 1 and isinstance(outcome[0], SaverClosed), outcome


@pytest.mark.parametrize("caller", ["sync", "async"])
def test_a_call_that_ends_as_the_saver_loop_closes_gets_its_result(
    caller: str, stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call that ends on the saver's loop just before its owner closes that loop, while
    its caller's look for a closed loop is due: the caller gets the call's result (a put
    that was stored is not reported refused), not `SaverLoopStopped`. The look is held
    until the call has ended and the loop closed, so the race shows every time."""
    settings = _settings(stack_env, "postgres", "write-through")
    opener = asyncio.new_event_loop()
    backends = opener.run_until_complete(open_backends(settings))
    # Given a loop of its own (the call never touches the backends), served on a thread
    # that closes it once it stops.
    loop = asyncio.new_event_loop()
    saver = TieredCheckpointSaver.from_backends(backends, loop=loop)
    gate = asyncio.Event()
    closed = threading.Event()

    def serve() -> None:
        loop.run_forever()
        loop.close()
        closed.set()

    async def stored() -> str:
        await gate.wait()
        # Stops the loop right after the call's result went to its caller.
        task = asyncio.current_task()
        assert task is not None
        task.add_done_callback(lambda _: loop.stop())
        return "stored"

    refuse_loop_closed = saver._refuse_loop_closed

    def looked_late(*handed: Any) -> None:
        # The first look, due while the call waits: the call ends and its loop closes
        # before the look is made.
        loop.call_soon_threadsafe(gate.set)
        assert closed.wait(10), "the saver loop did not close"
        refuse_loop_closed(*handed)

    monkeypatch.setattr(saver, "_refuse_loop_closed", looked_late)
    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        result: list[str] = []

        def call() -> None:
            if caller == "sync":
                result.append(saver._sync(stored()))
            else:
                result.append(asyncio.run(saver._on_loop(stored())))

        assert _outcome_within(30, call) is None
        assert result == ["stored"]
    finally:
        if not closed.is_set():  # the test failed early: the loop still serves
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(loop.stop)
        server.join(10)
        opener.run_until_complete(backends.close())
        opener.close()


@pytest.mark.parametrize("caller", ["sync", "async"])
def test_a_call_that_ends_in_the_turn_its_loop_stops_gets_its_result(
    caller: str, stack_env: dict[str, str]
) -> None:
    """The loop's owner stops it in the very turn the call ends, then closes it: the
    call's end would reach its future only a turn later, which never comes. Its caller
    still gets what it returned (a put that was stored), not `SaverLoopStopped`."""
    settings = _settings(stack_env, "postgres", "write-through")
    opener = asyncio.new_event_loop()
    backends = opener.run_until_complete(open_backends(settings))
    loop = asyncio.new_event_loop()
    saver = TieredCheckpointSaver.from_backends(backends, loop=loop)
    running = threading.Event()

    def serve() -> None:
        loop.call_soon(running.set)
        loop.run_forever()
        loop.close()

    async def stored() -> str:
        loop.stop()  # this turn is the loop's last
        return "stored"

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        assert running.wait(10)
        result: list[str] = []

        def call() -> None:
            if caller == "sync":
                result.append(saver._sync(stored()))
            else:
                result.append(asyncio.run(saver._on_loop(stored())))

        assert _outcome_within(30, call) is None
        assert result == ["stored"]
    finally:
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(loop.stop)
        server.join(10)
        opener.run_until_complete(backends.close())
        opener.close()


def test_calls_running_as_their_loops_asyncio_run_ends_are_saver_loop_stopped(
    stack_env: dict[str, str],
) -> None:
    """The saver used on a loop its caller owns (`asyncio.run`), which returns while a sync
    call and an async call from another loop still run there: `asyncio.run` cancels them,
    and each caller gets `SaverLoopStopped`, not a bare `CancelledError` it never asked for."""
    settings = _settings(stack_env, "postgres", "write-through")
    outcomes: list[BaseException | None] = [None, None]
    started = [threading.Event(), threading.Event()]

    async def long_call(index: int) -> None:
        started[index].set()
        await asyncio.sleep(30)

    def call(index: int, run: Any) -> None:
        try:
            run()
        except BaseException as exc:  # whatever it is, the test looks at it
            outcomes[index] = exc

    async def owner() -> list[threading.Thread]:
        backends = await open_backends(settings)
        saver = TieredCheckpointSaver.from_backends(backends)
        callers = [
            threading.Thread(target=call, args=(0, lambda: saver._sync(long_call(0)))),
            threading.Thread(
                target=call, args=(1, lambda: asyncio.run(saver._on_loop(long_call(1))))
            ),
        ]
        for caller in callers:
            caller.daemon = True
            caller.start()
        for event in started:
            assert await asyncio.to_thread(event.wait, 10)
        # Once both calls run (a call made after would be `SaverClosed`): they never touch them.
        await backends.close()
        return callers  # the calls still run: `asyncio.run` cancels them

    for caller in asyncio.run(owner()):
        caller.join(30)
        assert not caller.is_alive(), "the call hangs"
    assert all(isinstance(outcome, SaverLoopStopped) for outcome in outcomes), outcomes


def test_a_listing_on_a_stopped_loop_is_refused_after_one_wait(
    stack_env: dict[str, str],
) -> None:
    """A sync `list` on a loop its owner runs only in turns, between them: refused with
    `SaverLoopStopped` after the one wait for a starting loop, not a second one for closing
    the listing it never began."""
    settings = _settings(stack_env, "postgres", "write-through")
    cfg = _config(f"stopped-list-{uuid.uuid4().hex[:12]}")
    loop = asyncio.new_event_loop()
    try:
        backends = loop.run_until_complete(open_backends(settings))
        saver = TieredCheckpointSaver.from_backends(backends, loop=loop)
        try:
            began = time.monotonic()
            listed = _outcome_within(30, lambda: list(saver.list(cfg)))
            took = time.monotonic() - began
            assert isinstance(listed, SaverLoopStopped), listed
            assert took < 1.5 * LOOP_START_WAIT_SECONDS, took
        finally:
            loop.run_until_complete(backends.close())
    finally:
        loop.close()
