"""The process's runtime holder freezes what the process holds once its runtime is open
(`gc.freeze`), so a full collection no longer walks it, and thaws it when it closes."""

from __future__ import annotations

import gc
from collections.abc import Callable

from support_cases.runtime import RuntimeHolder
from support_cases.settings import AppSettings


async def test_an_open_runtime_is_out_of_the_collectors_walk_until_it_closes(
    env_for: Callable[..., dict[str, str]],
) -> None:
    values = {key.lower(): value for key, value in env_for("postgres").items()}
    holder = RuntimeHolder(lambda: AppSettings.model_validate(values), freeze_when_open=True)
    assert gc.get_freeze_count() == 0
    try:
        await holder.get()
        frozen = gc.get_freeze_count()
        # Modules, clients and compiled graphs: the bulk of what the process tracks.
        assert frozen > 50_000
        assert len(gc.get_objects()) < frozen / 10
    finally:
        await holder.close()
    assert gc.get_freeze_count() == 0
