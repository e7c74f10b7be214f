"""LangGraph checkpointer over the state tiers (cold store + optional hot cache), and the
write-behind flusher that moves acknowledged work to the cold store."""

from .flusher import Flusher
from .saver import FENCING_TOKEN_KEY, TieredCheckpointSaver

__all__ = ["FENCING_TOKEN_KEY", "Flusher", "TieredCheckpointSaver"]
