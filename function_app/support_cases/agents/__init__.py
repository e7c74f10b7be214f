"""One module per agent; each owns one section of the case record."""

from .account import AccountAgent
from .base import AgentDeps, RunContext, RunObserver, StatefulAgent, StepHook
from .billing import BillingAgent
from .intake import AGENTS_AFTER_INTAKE, IntakeAgent, agents_needed
from .policy import PolicyAgent
from .refund import RefundAgent
from .response import ResponseAgent
from .review import HumanReview

__all__ = [
    "AGENTS_AFTER_INTAKE",
    "AccountAgent",
    "AgentDeps",
    "BillingAgent",
    "HumanReview",
    "IntakeAgent",
    "PolicyAgent",
    "RefundAgent",
    "ResponseAgent",
    "RunContext",
    "RunObserver",
    "StatefulAgent",
    "StepHook",
    "agents_needed",
]
