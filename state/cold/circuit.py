"""Fail fast while a cold store answers nothing.

A store that stops answering while its host still takes connections (a hung process, a
network path that drops packets) makes every call wait out the operation timeout, 30 s
by default: callers pile up, each holding a connection, a worker and an HTTP request,
only to learn what the first one learned. So once a call times out with nothing
answered by the store since that call began, the circuit opens: for `OPEN_SECONDS`
every call fails at once with `BackendUnavailable`; after that one call at a time goes
ahead as a probe (the others still refused while it is out), and the first answer
closes the circuit. Other calls answering while
one waits mean the store is alive and that call was slow: it opens nothing. An answer
counts from when its request was sent, not from when it was read: one sent before that
call began (a pooled connection's setup, read late on a busy event loop after a link
went silent) tells nothing of the store since. A refused connection (the server down)
opens nothing either, but is not answered fast: a Postgres call waits out the pool
timeout (10 s by default, measured) for a connection the pool cannot make.

Shared by every caller of one connection object (the event loop's and the sync API's
threads alike).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ..errors import BackendUnavailable, NoAnswer

# Short: while the store stays silent, the probe itself (out for up to the operation
# timeout) keeps every other caller away; once it answers again, it is used within this.
OPEN_SECONDS = 1.0


class AnswerCircuit:
    def __init__(
        self,
        backend: str,
        *,
        probe_seconds: float,
        open_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`probe_seconds`: how long a probe may take (the operation timeout) before the
        next caller may probe instead. `open_seconds`: `OPEN_SECONDS` unless given."""
        self.backend = backend
        self._probe_seconds = probe_seconds
        self._open_seconds = OPEN_SECONDS if open_seconds is None else open_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._open_until = 0.0  # 0 while closed
        self._probe_until = 0.0  # while a probe is out
        self._probe: object | None = None  # that probe's own token: only it frees its slot
        self._last_answer = float("-inf")

    @property
    def open(self) -> bool:
        return bool(self._open_until)

    @contextmanager
    def call(self) -> Iterator[None]:
        """One call to the store, its errors already the library's: refused at once while
        the circuit is open (unless it may probe). `NoAnswer` is no answer; any other
        `BackendUnavailable`, or a cancellation, tells nothing; the rest (a normal exit,
        a refusal, a conflict) is an answer."""
        started, probe = self._enter()
        try:
            yield
        except NoAnswer:
            self._no_answer(started, probe)
            raise
        except BackendUnavailable:
            self._settled(probe)
            raise
        except Exception:
            self._answered(started)
            raise
        except BaseException:
            self._settled(probe)
            raise
        self._answered(started)

    def _enter(self) -> tuple[float, object | None]:
        """When the call started, and its probe token if it goes out as the probe."""
        now = self._clock()
        if not self._open_until:
            return now, None
        with self._lock:
            if self._open_until:
                wait = max(self._open_until, self._probe_until) - now
                if wait > 0:
                    raise BackendUnavailable(
                        self.backend,
                        f"answered nothing lately: not tried again for {wait:.1f} s",
                    )
                self._probe_until = now + self._probe_seconds
                self._probe = probe = object()
                return now, probe
        return now, None

    def now(self) -> float:
        """The circuit's clock: when a request is sent, for `heard`."""
        return self._clock()

    def heard(self, sent: float | None = None) -> None:
        """The store answered something (a statement's result within a longer call, a
        cancel request acknowledged): it is alive, whatever the call's outcome. `sent`:
        when that request went out (`now()`), if known; else the answer is taken as new."""
        at = self._clock() if sent is None else sent
        self._last_answer = max(self._last_answer, at)

    def _answered(self, started: float) -> None:
        # Under the lock even while closed: a timeout judged at the same moment on another
        # thread (`_no_answer`) must either see this answer or be closed again by it.
        with self._lock:
            self._last_answer = max(self._last_answer, started)
            if self._open_until:
                self._open_until = self._probe_until = 0.0
                self._probe = None

    def _no_answer(self, started: float, probe: object | None) -> None:
        with self._lock:
            if probe is not None and probe is self._probe:
                self._probe, self._probe_until = None, 0.0
            if self._last_answer >= started:
                return  # answers came meanwhile: the store is alive, this call was slow
            self._open_until = self._clock() + self._open_seconds
            # A probe still out (this call was sent before) keeps its slot.

    def _settled(self, probe: object | None) -> None:
        """A probe that failed without waiting: the next caller may probe at once. Any
        other call ending so (one sent before the circuit opened) leaves the probe out."""
        if probe is not None:
            with self._lock:
                if probe is self._probe:
                    self._probe, self._probe_until = None, 0.0
