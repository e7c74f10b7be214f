"""One module per agent; each owns one section of the case record."""

from .account import AccountAgent
from .base import AgentDeps, RunContext, StatefulAgent, StepHook
from .billing import BillingAgent
from .intake import IntakeAgent
from .policy import PolicyAgent
from .refund import RefundAgent
from .response import ResponseAgent
from .review import HumanReview

__all__ = [
    "AccountAgent",
    "AgentDeps",
    "BillingAgent",
    "HumanReview",
    "IntakeAgent",
    "PolicyAgent",
    "RefundAgent",
    "ResponseAgent",
    "RunContext",
    "StatefulAgent",
    "StepHook",
]
