"""The StatefulAgent: one graph node that owns one section of the case record.

An agent decides from the graph state, writes its result as its own section
through the state library (cold: versioned update + audit entry under its
agent id; hot: the new record installed) and returns the same result to the
graph. In a write-behind run of the case service (`RunContext.defer_sections`) the
section write waits for the run's boundary: the agent hands it to the graph state
and the run writes every pending section in one record write (still one audit
entry per section, under each agent's id). Writes
carry the run's fencing token, so a run that lost its lock cannot overwrite a newer
run's state. A re-run (after a crash) recomputes the same value and finds it already
stored, so it writes nothing twice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from langgraph.errors import GraphBubbleUp
from langgraph.runtime import Runtime

from state import JSON, TieredStateStore

from ..effects import Effects
from ..models import CaseState, Message, PendingSection
from ..records import set_section
from ..settings import AppSettings
from ..telemetry import traced


class RunObserver(Protocol):
    """Told of each agent step of a run: the case's progress events, and the step boundary
    where a run a follow-up asked to stop does stop (`node_started` raises `RunStopped`)."""

    async def node_started(self, node: str) -> None: ...

    async def node_finished(self, node: str, section: str, summary: str | None) -> None: ...


@dataclass(frozen=True)
class RunContext:
    """Per-run values LangGraph hands every node (not checkpointed: each run brings its own)."""

    fencing_token: int | None = None
    # Write-behind runs of the case service: sections go to the graph state, and the run
    # writes them to the record at its boundary in one write (`CaseState.record_sections`)
    # instead of one write per step. Without it (write-through, or a graph driven by
    # other code) each agent writes its section at its step.
    defer_sections: bool = False
    observer: RunObserver | None = None


# Awaited with the step's name once its section is written, before LangGraph checkpoints
# the step: the seam a test uses to hold a step open and kill the process there.
StepHook = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class AgentDeps:
    store: TieredStateStore
    effects: Effects
    settings: AppSettings
    after_step: StepHook | None = None


class StatefulAgent(ABC):
    agent_id: ClassVar[str]
    section: ClassVar[str]  # the one record section this agent writes
    step: ClassVar[str]  # its name in completed_steps
    node: ClassVar[str]  # its graph node name (LangGraph forbids reusing a state key)

    def __init__(self, deps: AgentDeps) -> None:
        self.deps = deps

    async def __call__(self, state: CaseState, runtime: Runtime[RunContext]) -> dict[str, Any]:
        case_id = state["case_id"]
        fencing_token = runtime.context.fencing_token if runtime.context else None
        defer = runtime.context.defer_sections if runtime.context else False
        observer = runtime.context.observer if runtime.context else None
        if observer is not None:
            await observer.node_started(self.node)
        with traced(
            f"agent.{self.step}",
            expected=(GraphBubbleUp,),
            agent_id=self.agent_id,
            case_id=case_id,
        ):
            value = await self.decide(state, fencing_token)
            update = self.state_update(value)
            if defer:
                pending: PendingSection = {"agent_id": self.author(value)}
                if update.get(self.section) != value:
                    pending["value"] = value  # not in the state under its own name
                update["record_sections"] = {self.section: pending}
            else:
                await set_section(
                    self.deps.store,
                    case_id,
                    self.section,
                    value,
                    agent_id=self.author(value),
                    fencing_token=fencing_token,
                )
            if self.deps.after_step is not None:
                await self.deps.after_step(self.step)
            update["completed_steps"] = [self.step]
            messages = self.messages(state, value)
            if messages:
                update["messages"] = messages
            if observer is not None:
                summary = " ".join(message["content"] for message in messages) or None
                await observer.node_finished(self.node, self.section, summary)
            return update

    @abstractmethod
    async def decide(self, state: CaseState, fencing_token: int | None) -> JSON:
        """The section's new value (effects, if any, go through `self.deps.effects`)."""

    def author(self, value: JSON) -> str:
        """Who the audit trail names for this write."""
        return self.agent_id

    def state_update(self, value: JSON) -> dict[str, Any]:
        return {self.section: value}

    def note(self, value: JSON) -> str | None:
        """A short line for the case's message log."""
        return None

    def messages(self, state: CaseState, value: JSON) -> list[Message]:
        note = self.note(value)
        return [Message(role=self.agent_id, content=note)] if note else []
