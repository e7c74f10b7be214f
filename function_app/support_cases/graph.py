"""The support-case graph: intake -> (billing || account) -> policy -> [human review] -> refund -> response.

A follow-up message runs the graph again on the case's thread: intake sends it to the
agents it needs (`agents_needed`), and the response answers the whole conversation."""

from __future__ import annotations

from typing import Any, Literal

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph

from .agents import (
    AGENTS_AFTER_INTAKE,
    AccountAgent,
    AgentDeps,
    BillingAgent,
    HumanReview,
    IntakeAgent,
    PolicyAgent,
    RefundAgent,
    ResponseAgent,
    RunContext,
    agents_needed,
)
from .case_state import CaseState

CaseGraph = CompiledStateGraph[CaseState, RunContext, Any, Any]


def route_after_policy(state: CaseState) -> Literal["human_review", "refund_agent"]:
    # A decision a reviewer already made on the case stands for its follow-ups.
    if state["policy"]["decision"] == "needs_review" and "review" not in state:
        return "human_review"
    return "refund_agent"


def build_graph(deps: AgentDeps, checkpointer: BaseCheckpointSaver[Any]) -> CaseGraph:
    builder = StateGraph(CaseState, context_schema=RunContext)
    agents = [
        IntakeAgent(deps),
        BillingAgent(deps),
        AccountAgent(deps),
        PolicyAgent(deps),
        HumanReview(deps),
        RefundAgent(deps),
        ResponseAgent(deps),
    ]
    for agent in agents:
        builder.add_node(agent.node, agent)
    builder.add_edge(START, IntakeAgent.node)
    # Billing and account run in the same superstep when both are needed; policy runs
    # once in the next (either edge triggers it), or right after intake when neither is.
    builder.add_conditional_edges(IntakeAgent.node, agents_needed, AGENTS_AFTER_INTAKE)
    builder.add_edge(BillingAgent.node, PolicyAgent.node)
    builder.add_edge(AccountAgent.node, PolicyAgent.node)
    builder.add_conditional_edges(
        PolicyAgent.node, route_after_policy, [HumanReview.node, RefundAgent.node]
    )
    builder.add_edge(HumanReview.node, RefundAgent.node)
    builder.add_edge(RefundAgent.node, ResponseAgent.node)
    builder.add_edge(ResponseAgent.node, END)
    return builder.compile(checkpointer=checkpointer)
