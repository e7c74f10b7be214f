"""Spans per agent node and per store call, recorded by the SDK provider the app installs."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from azure.functions.timer import TimerRequest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from support_cases.demo import demo_case
from support_cases.runtime import Runtime


@pytest.fixture
def spans(runtime: Runtime) -> Iterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), "the app installs an SDK provider"
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    try:
        yield exporter
    finally:
        exporter.clear()
        # SDK providers cannot drop a processor; a shut-down one ignores further spans.
        processor.shutdown()


async def test_each_agent_node_and_store_call_has_a_span(
    client: httpx.AsyncClient, runtime: Runtime, case_id: str, spans: InMemorySpanExporter
) -> None:
    assert (await client.post("/api/cases", json=demo_case(case_id))).status_code == 201
    finished = spans.get_finished_spans()
    agent_spans = {
        span.name: span for span in finished if span.attributes.get("case_id") == case_id
    }
    for step in ("intake", "billing", "account", "policy", "refund", "response"):
        span = agent_spans[f"agent.{step}"]
        assert span.status.is_ok
        assert str(span.attributes["agent_id"]).endswith("-agent")
    mine = [span for span in finished if span.attributes.get("state.thread_id") == case_id]
    writes = [span for span in mine if span.name == "state.update_section"]
    batches = [span for span in mine if span.name == "state.update_sections"]
    written = {str(span.attributes["state.section"]) for span in writes} | {
        section for span in batches for section in str(span.attributes["state.sections"]).split(",")
    }
    assert written >= {"intake", "billing", "account", "policy", "refund", "response", "run"}
    billing = agent_spans["agent.billing"]
    # Store calls nest under the agent node that made them, in both write modes.
    assert any(
        span.parent is not None
        and span.parent.span_id == billing.context.span_id
        and span.attributes.get("state.section") == "billing"
        for span in writes
    )
    # An effect is recorded done in the same record write as its agent's section, under
    # that agent's span (its claim is a write of its own, before the call out).
    trail = await runtime.store.audit_trail(case_id, limit=500)
    for step, section, effect in (
        ("refund", "refund", "effect_refund"),
        ("account", "account", "effect_reset_link"),
    ):
        agent = agent_spans[f"agent.{step}"]
        together = [
            span
            for span in batches
            if str(span.attributes["state.sections"]).split(",") == [effect, section]
        ]
        assert len(together) == 1, (step, [s.attributes for s in batches])
        assert together[0].parent is not None
        assert together[0].parent.span_id == agent.context.span_id
        done = [e for e in trail if e.section == effect and e.after["status"] == "done"]
        (mine,) = [e for e in trail if e.section == section]
        assert len(done) == 1 and done[0].version == mine.version - 1


def load_function_app() -> ModuleType:
    """The worker entry file, imported by its stem as the Functions worker does."""
    path = Path(__file__).resolve().parents[2] / "function_app" / "function_app.py"
    spec = importlib.util.spec_from_file_location("function_app_entry", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_timer_tick_is_one_span_over_its_resume_and_sweep(
    runtime: Runtime, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = load_function_app()
    # The tick uses the process runtime; here, the test's runtime on the local stack.
    monkeypatch.setattr(entry.process_runtime, "_runtime", runtime)
    timer = TimerRequest(past_due=False)
    await entry.resume_stale_runs._function.get_user_function()(timer)

    finished = spans.get_finished_spans()
    (tick,) = [span for span in finished if span.name == "timer.resume_stale_runs"]
    assert tick.status.is_ok
    assert tick.attributes["past_due"] is False
    assert isinstance(tick.attributes["swept"], int)
    children = {
        span.name
        for span in finished
        if span.parent is not None and span.parent.span_id == tick.context.span_id
    }
    assert {"case.resume_stale", "case.sweep_expired"} <= children
