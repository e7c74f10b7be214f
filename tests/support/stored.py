"""Stored checkpoints of a numbered chain, for tests of the tiers' storage."""

from __future__ import annotations

from state.ports import StoredCheckpoint


def checkpoint(thread_id: str, n: int) -> StoredCheckpoint:
    """Checkpoint `n` of the thread's root namespace, the child of `n - 1` (1 is the root)."""
    return StoredCheckpoint(
        thread_id=thread_id,
        checkpoint_ns="",
        checkpoint_id=f"{n:08}",
        parent_checkpoint_id=f"{n - 1:08}" if n > 1 else None,
        checkpoint=("json", b'{"n": %d}' % n),
        metadata={"step": n},
        channel_versions={"chat": n},
    )
