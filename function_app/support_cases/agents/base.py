"""The StatefulAgent: one graph node that owns one section of the case record.

An agent decides from the graph state, writes its result as its own section
through the state library (cold: versioned update + audit entry under its
agent id; hot: the new record installed) and returns the same result to the
graph. The sections are written at the step in both write modes: deferring them to
the run's boundary lost them when Redis lost the run's unflushed checkpoints. An
agent that performed a side effect records the effect `done` in the same record
write as its section (one audit entry each), not in a write of its own. Writes
carry the run's fencing token, so a run that lost its lock cannot overwrite a newer
run's state. A re-run (after a crash) recomputes the same value and finds it already
stored, so it writes nothing twice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from langgraph.errors import GraphBubbleUp
from langgraph.runtime import Runtime

from state import JSON, SectionWrite, TieredStateStore, WorkflowRecord

from ..case_state import CaseState, Message
from ..effects import Effects
from ..records import set_section, write_sections
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
    observer: RunObserver | None = None


@dataclass
class Step:
    """What an agent's decision works with: the run's fencing token, and the effects it
    performed, recorded `done` with the agent's own section (`Effects.once(done_with=...)`)."""

    fencing_token: int | None
    effects_done: list[SectionWrite] = field(default_factory=list)


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
        observer = runtime.context.observer if runtime.context else None
        if observer is not None:
            await observer.node_started(self.node)
        with traced(
            f"agent.{self.step}",
            expected=(GraphBubbleUp,),
            agent_id=self.agent_id,
            case_id=case_id,
        ):
            step = Step(fencing_token)
            value = await self.decide(state, step)
            update = self.state_update(value)
            await self._record(case_id, value, step)
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

    async def _record(self, case_id: str, value: JSON, step: Step) -> None:
        """The section, with the effects the step performed: one record write."""
        mine = SectionWrite(self.section, value, self.author(value))
        if not step.effects_done:
            await set_section(
                self.deps.store,
                case_id,
                mine.section,
                mine.value,
                agent_id=mine.agent_id,
                fencing_token=step.fencing_token,
            )
            return
        writes = [*step.effects_done, mine]

        def still_needed(record: WorkflowRecord) -> list[SectionWrite]:
            return [w for w in writes if record.sections.get(w.section) != w.value]

        await write_sections(
            self.deps.store, case_id, still_needed, fencing_token=step.fencing_token
        )

    @abstractmethod
    async def decide(self, state: CaseState, step: Step) -> JSON:
        """The section's new value (effects, if any, go through `self.deps.effects` with
        `done_with=step.effects_done`)."""

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
