"""Write-behind, one step of a thread saved with durability "async" in every order, with
Redis failing on the way; real servers. LangGraph sends the step's checkpoint put and
each task's writes concurrently, so {put(C), a sibling's result on C, an interrupt on C}
reach the saver in any order. Whatever the order and the faults, once the interrupt (and
every call at C after it) returned, the cold tier holds C, the interrupt and the
sibling's result, unless a call raised (`BackendUnavailable`, `HotStateLost`: the run
stops and resumes from the cold tier). Never a write held twice, nor a checkpoint whose
parent is missing."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis as redis_client
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from state.checkpoint import TieredCheckpointSaver
from state.checkpoint import saver as saver_module
from state.checkpoint.saver import DURABILITY_KEY
from state.errors import BackendUnavailable, HotStateLost
from tests.integration.test_write_behind_races import (
    COLD_BACKENDS,
    _cold_task_ids,
    _step_zero_flushed,
    boundaries_only_saver,
    config,
)

CALLS = ("put", "sibling", "interrupt")
# What happens to Redis at one delivery: nothing; the call's append fails before it is
# made (a blip); the append is made but its reply is lost; Redis loses everything just
# before the call (FLUSHALL); Redis is out for the whole call (appends and flushes fail).
FAULTS = ("none", "blip", "reply_lost", "flushall", "out")
EXAMPLES = int(os.environ.get("ORDERINGS_EXAMPLES", "200"))


@pytest.fixture(scope="module", params=COLD_BACKENDS)
def shared_saver(
    request: pytest.FixtureRequest,
    stack_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[TieredCheckpointSaver, str]]:
    """A saver over a Redis of its own, background pass off (only boundaries flush, and the
    test's own background flushes); a thread per example. Redis out gives up after 0.2 s."""
    patience = saver_module.REDIS_RETURN_SECONDS, saver_module.REDIS_RETRY_POLL_SECONDS
    saver_module.REDIS_RETURN_SECONDS, saver_module.REDIS_RETRY_POLL_SECONDS = 0.2, 0.05
    try:
        workdir = tmp_path_factory.mktemp("redis")
        with boundaries_only_saver(stack_env, request.param, workdir) as opened:
            yield opened
    finally:
        saver_module.REDIS_RETURN_SECONDS, saver_module.REDIS_RETRY_POLL_SECONDS = patience


class _Faults:
    """Redis failing for one call of the saver: its appends (sync and async API), and with
    `out` its flushes too."""

    def __init__(self, saver: TieredCheckpointSaver) -> None:
        assert saver.flusher is not None and saver._blocking is not None
        self.targets = [
            (saver._blocking, "append_put_blocking"),
            (saver._blocking, "append_writes_blocking"),
            (saver.flusher.log, "append_put"),
            (saver.flusher.log, "append_writes"),
        ]
        self.flusher = saver.flusher

    def inject(self, fault: str) -> Callable[[], None]:
        if fault not in ("blip", "reply_lost", "out"):
            return lambda: None
        patched: list[tuple[Any, str]] = []
        for target, name in self.targets:
            original = getattr(target, name)
            setattr(target, name, self._failing(original, name, applied=fault == "reply_lost"))
            patched.append((target, name))
        if fault == "out":

            async def flush_out(*_args: Any, **_kwargs: Any) -> Any:
                raise BackendUnavailable("redis", "connection refused")

            self.flusher.flush_thread = flush_out  # type: ignore[method-assign]
            patched.append((self.flusher, "flush_thread"))

        def restore() -> None:
            for target, name in patched:
                delattr(target, name)  # the instance's patch: the class's method again

        return restore

    @staticmethod
    def _failing(original: Callable[..., Any], name: str, *, applied: bool) -> Any:
        if name.endswith("_blocking"):

            def blocking(*args: Any, **kwargs: Any) -> Any:
                if applied:
                    original(*args, **kwargs)
                raise BackendUnavailable("redis", "connection reset")

            return blocking

        async def appending(*args: Any, **kwargs: Any) -> Any:
            if applied:
                await original(*args, **kwargs)
            raise BackendUnavailable("redis", "connection reset")

        return appending


delivery = st.tuples(st.sampled_from(("sync", "async")), st.sampled_from(FAULTS), st.booleans())


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(order=st.permutations(CALLS), deliveries=st.lists(delivery, min_size=3, max_size=3))
def test_a_step_saved_in_any_order_with_redis_failing_is_durable_once_its_interrupt_returns(
    shared_saver: tuple[TieredCheckpointSaver, str],
    order: list[str],
    deliveries: list[tuple[str, str, bool]],
) -> None:
    saver, redis_url = shared_saver
    assert saver.flusher is not None
    parent, checkpoint = _step_zero_flushed(saver)
    thread_id = parent["configurable"]["thread_id"]
    at_c = config(thread_id, checkpoint_id=checkpoint["id"], **{DURABILITY_KEY: "async"})
    versions = checkpoint["channel_versions"]
    metadata: Any = {"source": "loop", "step": 1}
    calls: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "put": (
            lambda: saver.put(parent, checkpoint, metadata, versions),
            lambda: saver._sync(saver.aput(parent, checkpoint, metadata, versions)),
        ),
        "sibling": (
            lambda: saver.put_writes(at_c, [("messages", ["b"])], "sibling"),
            lambda: saver._sync(saver.aput_writes(at_c, [("messages", ["b"])], "sibling")),
        ),
        "interrupt": (
            lambda: saver.put_writes(at_c, [("__interrupt__", "approve?")], "ask"),
            lambda: saver._sync(saver.aput_writes(at_c, [("__interrupt__", "approve?")], "ask")),
        ),
    }
    faults = _Faults(saver)
    trace: list[str] = []
    delivered: list[str] = []
    raised = False
    for call, (api, fault, background_first) in zip(order, deliveries, strict=True):
        if background_first:
            trace.append("background flush")
            saver._sync(saver.flusher.flush_thread(thread_id))
        if fault == "flushall":
            redis_client.Redis.from_url(redis_url).flushall()
        trace.append(f"{call} ({api}, {fault})")
        restore = faults.inject(fault)
        try:
            calls[call][0 if api == "sync" else 1]()
        except (BackendUnavailable, HotStateLost) as exc:
            trace.append(f"  raised {type(exc).__name__}")
            event(f"{call} ({fault}) raised {type(exc).__name__}")
            raised = True
            break
        finally:
            restore()
        delivered.append(call)
        if "interrupt" in delivered:
            _assert_durable(saver, thread_id, checkpoint["id"], delivered, trace)
    if not raised:
        event("every call returned")
    _assert_consistent(saver, thread_id, checkpoint["id"], trace)
    assert raised or "interrupt" in delivered


def _assert_durable(
    saver: TieredCheckpointSaver,
    thread_id: str,
    checkpoint_id: str,
    delivered: list[str],
    trace: list[str],
) -> None:
    """Every call so far returned and the interrupt is among them: what they sent is cold."""
    tasks = _cold_task_ids(saver, thread_id, checkpoint_id)
    wanted = sorted({"sibling": "sibling", "interrupt": "ask"}[c] for c in delivered if c != "put")
    stored = saver._sync(saver.store.get_checkpoint(thread_id, "", checkpoint_id))
    assert sorted(set(tasks)) == wanted, (trace, "cold writes", tasks)
    if "put" in delivered:
        assert stored is not None, (trace, "C not in the cold tier")
        latest = saver._sync(saver.store.get_checkpoint(thread_id, "", None))
        assert latest is not None and latest.checkpoint_id == checkpoint_id, (trace, "latest")


def _assert_consistent(
    saver: TieredCheckpointSaver, thread_id: str, checkpoint_id: str, trace: list[str]
) -> None:
    """Whatever happened: no write twice, no checkpoint without its parent."""
    writes = saver._sync(saver.store.get_writes(thread_id, "", checkpoint_id))
    keys = [(w.task_id, w.idx) for w in writes]
    assert len(keys) == len(set(keys)), (trace, "a write held twice", keys)

    async def listed() -> list[Any]:
        return [
            stored
            async for stored in saver.store.list_checkpoints(
                thread_id=thread_id,
                checkpoint_ns="",
                before=None,
                limit=None,
                metadata_filter=None,
            )
        ]

    checkpoints = saver._sync(listed())
    ids = {c.checkpoint_id for c in checkpoints}
    assert len(ids) == len(checkpoints), (trace, "a checkpoint held twice")
    for stored in checkpoints:
        parent = stored.parent_checkpoint_id
        assert parent is None or parent in ids, (trace, "parent missing", stored.checkpoint_id)
