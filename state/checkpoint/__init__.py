"""LangGraph checkpointer over the state tiers (cold store + optional hot cache)."""

from .saver import TieredCheckpointSaver

__all__ = ["TieredCheckpointSaver"]
