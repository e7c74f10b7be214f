"""How many case runs one worker drives at once (CASE_MAX_RUNS).

Without a bound, runs pile up under overload until the stores' connection pools time out
and runs park half-way; refused up front instead, a caller is told to come back (503 with
Retry-After) before anything is written. A request that may start a run takes a slot when
it arrives, before it awaits anything (or requests arriving together would all pass the
bound); the first run it spawns takes the slot over, and holds it to its end. A request
that spawned none gives its slot back when it ends.

A request that needs no slot is not refused for want of one, even when it may start a run
otherwise: a follow-up queued behind a run that is going, to stop it or not (its runner
starts the follow-up's run next, in the slot it holds), a plain one behind a run paused for
review (the decision's run starts it), a replay that starts nothing. A request that would
start a run learns it is refused only once it is known to be the right target: a client
told to come back (503) retries in vain what a 404 or 409 awaits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar


class RunsBusy(Exception):
    """This worker drives as many case runs as it may: maps to 503 with Retry-After."""

    retry_after = 5


class _Slot:
    def __init__(self, slots: RunSlots) -> None:
        self._slots = slots
        self.handed_over = False
        self.given_back = False

    def give_back(self) -> None:
        if not self.given_back:
            self.given_back = True
            self._slots.taken -= 1


# The slot of the request being served in this task, until a run takes it over. Copied into
# the tasks it spawns (asyncio copies the context), where it is already handed over.
_ADMITTED: ContextVar[_Slot | None] = ContextVar("admitted_run", default=None)


class RunSlots:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0
        # Requests answered `RunsBusy`, since the process started (a metric).
        self.refused = 0

    @contextmanager
    def refusals_counted(self) -> Iterator[None]:
        """Serve a request, counted as refused if `RunsBusy` leaves it: not one that
        `admitted` refused and that was answered all the same (a replay, a stop)."""
        try:
            yield
        except RunsBusy:
            self.refused += 1
            raise

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Serve a request that may start a run: `RunsBusy` if every slot is taken. Within
        another admitted request (the timer's resume of a case), its slot serves."""
        held = _ADMITTED.get()
        if held is not None and not held.handed_over:
            yield
            return
        if self.taken >= self.limit:
            raise RunsBusy(
                f"this worker drives {self.taken} case runs, its maximum (CASE_MAX_RUNS); "
                f"retry in {RunsBusy.retry_after} s"
            )
        slot = self._take()
        token = _ADMITTED.set(slot)
        try:
            yield
        finally:
            _ADMITTED.reset(token)
            if not slot.handed_over:
                slot.give_back()

    def for_run(self) -> Callable[[], None]:
        """The slot a run about to be spawned holds, and what gives it back: the admitted
        request's, else one more, past the bound if need be: a run spawned outside a
        request (a case's queue taken up again, a cancelled request's run) was admitted
        before, and is not refused half-way."""
        held = _ADMITTED.get()
        # Not a slot its request gave back as it ended (cancelled): a run spawned after that
        # in a task the request started (a queue taken up as it let go) holds one more.
        if held is not None and not held.handed_over and not held.given_back:
            held.handed_over = True
            return held.give_back
        return self._take().give_back

    def _take(self) -> _Slot:
        self.taken += 1
        return _Slot(self)
