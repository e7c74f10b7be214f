"""A config whose checkpoint namespace is not a str (an int, None, bytes): every call that
reads or writes one namespace refuses it (`InvalidValue`) on every backend alike, before
anything is sent. Postgres refused a read of an int one, Cosmos found nothing for it, and
a write failed with a plain TypeError."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from langgraph.checkpoint.base import empty_checkpoint

from state.checkpoint import TieredCheckpointSaver
from state.errors import InvalidValue
from state.settings import WriteMode
from tests.integration.test_write_behind import settings_for


@pytest.mark.parametrize("namespace", [3, None, b"ns"])
@pytest.mark.parametrize(
    ("backend", "mode"),
    [("postgres", "write-through"), ("postgres", "write-behind"), ("cosmos", "write-behind")],
)
def test_a_checkpoint_namespace_that_is_not_a_str_is_refused(
    stack_env: dict[str, str], backend: str, mode: str, namespace: object
) -> None:
    settings = settings_for(stack_env, backend, stack_env["REDIS_URL"]).model_copy(
        update={"state_write_mode": WriteMode(mode)}
    )
    thread_id = f"ns-{uuid.uuid4().hex[:12]}"
    config: Any = {"configurable": {"thread_id": thread_id, "checkpoint_ns": namespace}}
    at: Any = {"configurable": {**config["configurable"], "checkpoint_id": "1"}}
    calls: list[Callable[[TieredCheckpointSaver], object]] = [
        lambda saver: saver.get_tuple(config),
        lambda saver: saver.put(config, empty_checkpoint(), {}, {}),
        lambda saver: saver.put_writes(at, [("v", 1)], "task-1"),
        lambda saver: saver.get_delta_channel_history(config=config, channels=["v"]),
    ]
    with TieredCheckpointSaver.open_sync(settings) as saver:
        for call in calls:
            with pytest.raises(InvalidValue):
                call(saver)
        # Nothing of it was stored, under any namespace.
        assert list(saver.list({"configurable": {"thread_id": thread_id}})) == []
