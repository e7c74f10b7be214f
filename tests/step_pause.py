"""Hold a workflow step open so a test can kill the process mid-workflow.

`pause_after("refund=30")` is a hook for the app's `after_step` seam
(`support_cases.agents.AgentDeps`): the refund step, once it has done its work
and written its section, sleeps 30 s before it returns, so LangGraph has not
yet checkpointed it. `create_paused_app` is the API factory a test's uvicorn
process runs instead of the app's own, pausing as `PAUSE_AFTER_ENV` says.
"""

from __future__ import annotations

import asyncio
import os

from fastapi import FastAPI

from support_cases.agents import StepHook
from support_cases.api import create_app
from support_cases.runtime import RuntimeHolder

PAUSE_AFTER_ENV = "TEST_PAUSE_AFTER"
PAUSED_APP = "tests.step_pause:create_paused_app"


def pause_after(rules: str) -> StepHook:
    """`step=seconds[,step=seconds...]`: after each named step, sleep that long."""
    seconds: dict[str, float] = {}
    for rule in rules.split(","):
        name, _, value = rule.partition("=")
        if name.strip() and value.strip():
            seconds[name.strip()] = float(value)

    async def hook(step: str) -> None:
        if seconds.get(step, 0.0) > 0:
            await asyncio.sleep(seconds[step])

    return hook


def create_paused_app() -> FastAPI:
    """The API as `support_cases.api:create_app` builds it, its steps paused per the env."""
    return create_app(
        holder=RuntimeHolder(after_step=pause_after(os.environ.get(PAUSE_AFTER_ENV, "")))
    )
