"""Test-only fault hook: hold a step open so a test can kill the process mid-workflow.

Set SUPPORT_CASES_FAULT_PAUSE_AFTER="refund=30" and the refund step, after it
has done its work and written its section, sleeps 30 s before it returns (so
LangGraph has not yet checkpointed it). Unset in every real deployment; it is
deliberately not a `Settings` field so it never reaches app settings.
"""

from __future__ import annotations

import asyncio
import os

PAUSE_AFTER_ENV = "SUPPORT_CASES_FAULT_PAUSE_AFTER"


def pause_seconds(step: str) -> float:
    for rule in os.environ.get(PAUSE_AFTER_ENV, "").split(","):
        name, _, seconds = rule.partition("=")
        if name.strip() == step and seconds.strip():
            return float(seconds)
    return 0.0


async def pause_after(step: str) -> None:
    seconds = pause_seconds(step)
    if seconds > 0:
        await asyncio.sleep(seconds)
