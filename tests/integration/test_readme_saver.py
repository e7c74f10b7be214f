"""The README's "saver from any LangGraph program" example runs as written on the test stack.

The example imports from `state` (the public API) and reads its settings from the
environment; the `state` module docstring shows the same code.
"""

from __future__ import annotations

import operator
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.graph import END, START, StateGraph

import state
from state import Settings, TieredCheckpointSaver, WriteMode

README_INTRO = "Using the saver from any LangGraph program:"
DOCSTRING_INTRO = "(the README's example)::\n"
EXAMPLE_THREAD = "case_8842"


class Chat(TypedDict):
    messages: Annotated[list[str], operator.add]


def readme_example(repo_root: Path) -> str:
    after = (repo_root / "README.md").read_text().split(README_INTRO, 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_module_docstring_shows_the_readme_example(repo_root: Path) -> None:
    assert state.__doc__ is not None
    shown = textwrap.dedent(state.__doc__.split(DOCSTRING_INTRO, 1)[1])
    assert shown.strip() == readme_example(repo_root).strip()


@pytest.mark.parametrize("backend", ["cosmos", "postgres"])
def test_the_readme_saver_example_runs(
    backend: str,
    repo_root: Path,
    env_for: Callable[..., dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in env_for(backend).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("STATE_WRITE_MODE", raising=False)
    assert Settings().write_mode is WriteMode.WRITE_BEHIND  # the default with Redis

    builder = StateGraph(Chat)
    builder.add_node("reply", lambda chat: {"messages": [f"seen {len(chat['messages'])}"]})
    builder.add_edge(START, "reply")
    builder.add_edge("reply", END)
    thread_id = f"readme-{uuid.uuid4().hex[:12]}"
    code = readme_example(repo_root)
    assert code.count(f'"{EXAMPLE_THREAD}"') == 2
    namespace: dict[str, Any] = {"builder": builder, "inputs": {"messages": ["hello"]}}
    exec(code.replace(EXAMPLE_THREAD, thread_id), namespace)

    # The cold tier alone (no Redis) holds the run's final state.
    monkeypatch.delenv("REDIS_URL")
    with TieredCheckpointSaver.open_sync(Settings()) as cold_only:
        saved = cold_only.get_tuple({"configurable": {"thread_id": thread_id}})
    assert saved is not None
    assert saved.checkpoint["channel_values"]["messages"] == ["hello", "seen 1"]
