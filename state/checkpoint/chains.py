"""Delta histories of the threads this process writes from their root, kept as they grow.

LangGraph asks for a DeltaChannel's history (`get_delta_channel_history`) whenever it
loads a checkpoint: the writes along the parent chain back to the nearest ancestor
holding a value, and that value. The hot tier keeps it for a thread once a reader
filled it from the cold tier; a thread that is new has nothing to fill it from, so
its first load (the case app's at the end of a case's first run) would be a cold
read of a history this process watched being written.

`WrittenChains` follows each thread (namespace) this process found empty (a latest
read that found no checkpoint: how LangGraph starts a thread) and then put the root
checkpoint of; writes that arrive before the root's put (LangGraph sends a step's
writes while its checkpoint is still being stored) wait for it. Every put whose parent is the chain's head moves the head, and the history
moves with it exactly as the base class's walk would find it (the parent's value is
the new seed, else the parent's history grows by the parent's writes); writes of
the head are pending, those of its parent (LangGraph sends them late) join the
history, and those of a newer checkpoint wait for its put (checkpoint ids grow
with time). Anything it cannot place (a put on another parent, writes of an older
checkpoint) drops the chain, and the saver asks the tiers as before. Values are the
serialized bytes the put already made, not copies.

Another process may write the thread too (a resumed case on another worker); a
chain describes only the checkpoints this process put, which are immutable, but
writes another process adds to them are not in it. So a chain answers only for its
head and only for `CHAIN_SECONDS` after its last put; it goes when a read shows a
write on its head this process did not put, or a latest checkpoint other than its
head (`loaded`), and when it would move past a head left with a task unfinished (a
question or an error: that checkpoint can be resumed later, by any process, and
its new writes join every later history); and the saver drops a thread's chains
whenever maintenance touches the thread.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Concatenate, ParamSpec, TypeVar

from langgraph.checkpoint.base import WRITES_IDX_MAP

from ..ports import ChannelHistory, StoredCheckpoint, StoredWrite, TypedBytes

# Chains kept (least recently written dropped first), and how long one is trusted.
CHAINS = 1000
CHAIN_SECONDS = 60.0
# A task that wrote one of these and nothing else stopped without finishing (a question
# asked, an error): its checkpoint can be resumed later, by any process.
UNFINISHED = frozenset({"__interrupt__", "__error__"})

_WriteKey = tuple[str, int]  # (task_id, idx)


@dataclass
class _History:
    seed: TypedBytes | None = None
    seed_at: str | None = None
    writes: dict[tuple[str, str, int], tuple[str, StoredWrite]] = field(default_factory=dict)


@dataclass
class _Chain:
    head: str
    parent: str | None
    # Channels holding a value at the head, with its serialized bytes.
    values: dict[str, TypedBytes]
    # The head's history per channel (walked from its parent).
    history: dict[str, _History]
    head_writes: dict[_WriteKey, StoredWrite] = field(default_factory=dict)
    # Writes of checkpoints not put yet (LangGraph sends a step's writes while the
    # step's checkpoint is still being stored), by checkpoint id.
    early: dict[str, dict[_WriteKey, StoredWrite]] = field(default_factory=dict)
    touched: float = field(default_factory=time.monotonic)


def _add(
    into: dict[tuple[str, str, int], tuple[str, StoredWrite]],
    checkpoint_id: str,
    write: StoredWrite,
    upsert: bool,
) -> None:
    key = (checkpoint_id, write.task_id, write.idx)
    if upsert or key not in into:
        into[key] = (checkpoint_id, write)


P = ParamSpec("P")
R = TypeVar("R")


def _locked(
    method: Callable[Concatenate[WrittenChains, P], R],
) -> Callable[Concatenate[WrittenChains, P], R]:
    @functools.wraps(method)
    def locked(self: WrittenChains, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class WrittenChains:
    """Thread-safe: the sync API's writes update it from their callers' threads while the
    loop thread reads it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._chains: OrderedDict[tuple[str, str], _Chain] = OrderedDict()
        # Threads their caller declared new, until when.
        self._declared: OrderedDict[tuple[str, str], float] = OrderedDict()
        # Threads found empty, with the writes that arrived before their root's put.
        self._empty: OrderedDict[tuple[str, str], dict[str, dict[_WriteKey, StoredWrite]]] = (
            OrderedDict()
        )

    @_locked
    def declare_new(self, thread_id: str) -> None:
        """The caller has just made `thread_id` (its root namespace has no checkpoint): the
        next read of its latest checkpoint may take that as found (`take_new`)."""
        key = (thread_id, "")
        self._declared[key] = time.monotonic() + CHAIN_SECONDS
        self._declared.move_to_end(key)
        while len(self._declared) > CHAINS:
            self._declared.popitem(last=False)

    @_locked
    def take_new(self, thread_id: str, checkpoint_ns: str) -> bool:
        """Whether the thread was declared new (once, within `CHAIN_SECONDS`); if so, it
        counts as found empty."""
        deadline = self._declared.pop((thread_id, checkpoint_ns), None)
        if deadline is None or time.monotonic() > deadline:
            return False
        self.found_empty(thread_id, checkpoint_ns)
        return True

    @_locked
    def found_empty(self, thread_id: str, checkpoint_ns: str) -> None:
        """A read of the latest checkpoint found none: the root put may follow."""
        key = (thread_id, checkpoint_ns)
        self._chains.pop(key, None)
        self._empty[key] = {}
        self._empty.move_to_end(key)
        while len(self._empty) > CHAINS:
            self._empty.popitem(last=False)

    @_locked
    def put(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        parent_id: str | None,
        present: Collection[str],
        stored: Mapping[str, TypedBytes],
    ) -> None:
        """A checkpoint was stored. `present`: the channels holding a value at it;
        `stored`: the bytes of those this put stored (the others kept the parent's)."""
        key = (thread_id, checkpoint_ns)
        chain = self._chains.pop(key, None)
        if parent_id is None:
            early = self._empty.pop(key, None)
            if early is None or set(present) - stored.keys():
                return
            chain = _Chain(
                checkpoint_id,
                None,
                {ch: stored[ch] for ch in present},
                {},
                head_writes=early.pop(checkpoint_id, {}),
                early=early,
            )
        elif chain is None or chain.head != parent_id or _unfinished(chain.head_writes.values()):
            # Left with a task unfinished, the head may yet be resumed, by another process
            # too (an abandoned question answered at its own checkpoint): its writes would
            # join every later history, and no read of the later checkpoints shows them.
            return
        else:
            kept = {
                ch: chain.values[ch] for ch in present if ch not in stored and ch in chain.values
            }
            if len(kept) + len(stored.keys() & set(present)) < len(present):
                return  # a value this chain never saw stored
            history: dict[str, _History] = {}
            for channel in chain.values.keys() | chain.history.keys() | _channels(chain):
                if channel in chain.values:
                    moved = _History(chain.values[channel], chain.head)
                else:
                    before = chain.history.get(channel, _History())
                    moved = _History(before.seed, before.seed_at, dict(before.writes))
                for write in chain.head_writes.values():
                    if write.channel == channel:
                        _add(moved.writes, chain.head, write, upsert=False)
                history[channel] = moved
            values = {ch: stored[ch] for ch in present if ch in stored} | kept
            early = chain.early
            chain = _Chain(
                checkpoint_id,
                chain.head,
                values,
                history,
                head_writes=early.pop(checkpoint_id, {}),
                early={cid: w for cid, w in early.items() if cid > checkpoint_id},
            )
        self._chains[key] = chain
        while len(self._chains) > CHAINS:
            self._chains.popitem(last=False)

    @_locked
    def put_writes(
        self,
        thread_id: str,
        checkpoint_ns: str,
        checkpoint_id: str,
        writes: Sequence[StoredWrite],
        *,
        upsert: bool,
    ) -> None:
        key = (thread_id, checkpoint_ns)
        chain = self._chains.get(key)
        if chain is None:
            early = self._empty.get(key)
            if early is not None:
                into = early.setdefault(checkpoint_id, {})
                for write in writes:
                    if upsert or (write.task_id, write.idx) not in into:
                        into[(write.task_id, write.idx)] = write
            return
        if checkpoint_id == chain.head or checkpoint_id > chain.head:
            into = (
                chain.head_writes
                if checkpoint_id == chain.head
                else chain.early.setdefault(checkpoint_id, {})
            )
            for write in writes:
                if upsert or (write.task_id, write.idx) not in into:
                    into[(write.task_id, write.idx)] = write
        elif checkpoint_id == chain.parent:
            # The parent's writes landing after its child: history of every channel.
            for write in writes:
                moved = chain.history.setdefault(write.channel, _History())
                _add(moved.writes, checkpoint_id, write, upsert)
        else:
            del self._chains[key]

    @_locked
    def loaded(self, found: StoredCheckpoint, *, latest: bool) -> None:
        """A read found this checkpoint (with its pending writes). The chain goes when it
        cannot answer any more: the latest is not its head (another process moved the
        thread on), or its head holds a write this process did not put (another worker
        resumed one of the step's tasks: its child's history would lack that write)."""
        key = (found.thread_id, found.checkpoint_ns)
        chain = self._chains.get(key)
        if chain is None:
            return
        if chain.head != found.checkpoint_id:
            if latest:
                del self._chains[key]
            return
        writes = found.writes or []
        if any((write.task_id, write.idx) not in chain.head_writes for write in writes):
            del self._chains[key]

    @_locked
    def head(self, thread_id: str, checkpoint_ns: str) -> str | None:
        """The id of the checkpoint whose history a chain answers for now, if any."""
        chain = self._chains.get((thread_id, checkpoint_ns))
        if chain is None or time.monotonic() - chain.touched > CHAIN_SECONDS:
            return None
        return chain.head

    @_locked
    def history(
        self, thread_id: str, checkpoint_ns: str, checkpoint_id: str, channels: Sequence[str]
    ) -> dict[str, ChannelHistory] | None:
        """The channels' history at `checkpoint_id` if it is a chain's head, else None."""
        key = (thread_id, checkpoint_ns)
        chain = self._chains.get(key)
        if chain is None or chain.head != checkpoint_id:
            return None
        if time.monotonic() - chain.touched > CHAIN_SECONDS:
            del self._chains[key]
            return None
        found: dict[str, ChannelHistory] = {}
        for channel in channels:
            entry = chain.history.get(channel, _History())
            found[channel] = ChannelHistory(
                list(entry.writes.values()), seed=entry.seed, seed_at=entry.seed_at
            )
        return found

    @_locked
    def forget(self, thread_id: str) -> None:
        for kept in (self._chains, self._empty, self._declared):
            for key in [key for key in kept if key[0] == thread_id]:
                del kept[key]


def _unfinished(writes: Collection[StoredWrite]) -> bool:
    stopped = {write.task_id for write in writes if write.channel in UNFINISHED}
    finished = {write.task_id for write in writes if write.channel not in WRITES_IDX_MAP}
    return bool(stopped - finished)


def _channels(chain: _Chain) -> set[str]:
    return {write.channel for write in chain.head_writes.values()}
