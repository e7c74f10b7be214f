"""The support-case graph: intake -> (billing || account) -> policy -> [human review] -> refund -> response."""

from __future__ import annotations

from typing import Any, Literal

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph

from .agents import (
    AccountAgent,
    AgentDeps,
    BillingAgent,
    HumanReview,
    IntakeAgent,
    PolicyAgent,
    RefundAgent,
    ResponseAgent,
    RunContext,
)
from .models import CaseState

CaseGraph = CompiledStateGraph[CaseState, RunContext, Any, Any]


def route_after_policy(state: CaseState) -> Literal["human_review", "refund_agent"]:
    return "human_review" if state["policy"]["decision"] == "needs_review" else "refund_agent"


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
    # Billing and account run in the same superstep; policy waits for both.
    builder.add_edge(IntakeAgent.node, BillingAgent.node)
    builder.add_edge(IntakeAgent.node, AccountAgent.node)
    builder.add_edge([BillingAgent.node, AccountAgent.node], PolicyAgent.node)
    builder.add_conditional_edges(
        PolicyAgent.node, route_after_policy, [HumanReview.node, RefundAgent.node]
    )
    builder.add_edge(HumanReview.node, RefundAgent.node)
    builder.add_edge(RefundAgent.node, ResponseAgent.node)
    builder.add_edge(ResponseAgent.node, END)
    return builder.compile(checkpointer=checkpointer)
