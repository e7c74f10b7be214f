"""`AnswerCircuit`: a cold store that answers nothing is not waited on by every caller."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from state.cold.circuit import AnswerCircuit
from state.errors import BackendUnavailable, NoAnswer, RequestRejected
from tests.support.clock import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def circuit(clock: Clock) -> AnswerCircuit:
    return AnswerCircuit("store", probe_seconds=30.0, open_seconds=1.0, clock=clock)


def answer(circuit: AnswerCircuit) -> None:
    with circuit.call():
        pass


def time_out(circuit: AnswerCircuit, clock: Clock, waited: float = 30.0) -> None:
    with pytest.raises(NoAnswer), circuit.call():
        clock.now += waited
        raise NoAnswer("store", "no answer in time")


def test_a_call_timing_out_with_nothing_answered_meanwhile_opens_it(
    circuit: AnswerCircuit, clock: Clock
) -> None:
    answer(circuit)
    clock.now += 1
    time_out(circuit, clock)
    assert circuit.open
    with pytest.raises(BackendUnavailable, match="answered nothing lately"), circuit.call():
        pytest.fail("sent while the circuit is open")


def test_a_slow_call_while_others_answer_opens_nothing(
    circuit: AnswerCircuit, clock: Clock
) -> None:
    with pytest.raises(NoAnswer), circuit.call():
        clock.now += 10
        answer(circuit)  # another caller is answered while this one waits
        clock.now += 20
        raise NoAnswer("store", "no answer in time")
    assert not circuit.open
    answer(circuit)


def test_after_the_open_period_one_probe_goes_and_its_answer_closes_it(
    circuit: AnswerCircuit, clock: Clock
) -> None:
    time_out(circuit, clock)
    clock.now += 1.0
    with circuit.call(), pytest.raises(BackendUnavailable), circuit.call():  # a probe, then
        pytest.fail("a second caller went while the probe was out")
    assert not circuit.open
    answer(circuit)


def test_an_error_reply_is_an_answer(circuit: AnswerCircuit, clock: Clock) -> None:
    time_out(circuit, clock)
    clock.now += 1.0
    with pytest.raises(RequestRejected), circuit.call():
        raise RequestRejected("store", "refused")
    assert not circuit.open


def test_a_probe_timing_out_opens_it_again(circuit: AnswerCircuit, clock: Clock) -> None:
    time_out(circuit, clock)
    clock.now += 1.0
    time_out(circuit, clock)  # the probe waits its timeout too
    with pytest.raises(BackendUnavailable), circuit.call():
        pytest.fail("sent right after the probe timed out")
    clock.now += 1.0
    answer(circuit)
    assert not circuit.open


def test_a_probe_failing_otherwise_lets_the_next_caller_probe(
    circuit: AnswerCircuit, clock: Clock
) -> None:
    time_out(circuit, clock)
    clock.now += 1.0
    with pytest.raises(BackendUnavailable), circuit.call():
        raise BackendUnavailable("store", "connection refused")
    assert circuit.open
    answer(circuit)  # not held off for the probe's whole timeout
    assert not circuit.open


@pytest.mark.parametrize(
    "ends_with",
    [BackendUnavailable("store", "pool timeout"), asyncio.CancelledError()],
    ids=["unavailable", "cancelled"],
)
def test_a_call_sent_before_it_opened_ending_leaves_the_probe_out(
    circuit: AnswerCircuit, clock: Clock, ends_with: BaseException
) -> None:
    """A call from before the outage (a caller waiting on the pool, one whose client went
    away) ending with nothing told frees no probe slot: callers piling up during an
    outage would otherwise each go out as a probe, holding a connection for its timeout."""
    earlier = circuit.call()
    earlier.__enter__()
    time_out(circuit, clock)
    clock.now += 2.0
    probe = circuit.call()
    probe.__enter__()
    assert not earlier.__exit__(type(ends_with), ends_with, None)
    with pytest.raises(BackendUnavailable, match="answered nothing lately"), circuit.call():
        pytest.fail("sent while the probe is out")
    assert not probe.__exit__(None, None, None)
    assert not circuit.open


def test_a_probe_whose_slot_ran_out_frees_not_its_successors(
    circuit: AnswerCircuit, clock: Clock
) -> None:
    time_out(circuit, clock)
    clock.now += 2.0
    first = circuit.call()
    first.__enter__()
    clock.now += 31.0  # its slot ran out: the next caller probes instead
    second = circuit.call()
    second.__enter__()
    assert not first.__exit__(asyncio.CancelledError, asyncio.CancelledError(), None)
    with pytest.raises(BackendUnavailable, match="answered nothing lately"), circuit.call():
        pytest.fail("sent while the second probe is out")
    assert not second.__exit__(asyncio.CancelledError, asyncio.CancelledError(), None)
    answer(circuit)  # the probe itself ending so frees its slot at once
    assert not circuit.open


def test_an_answer_landing_while_a_timeout_is_recorded_leaves_it_closed() -> None:
    """One thread records its call's timeout while another's call answers: the interleaving
    is forced (the other thread's whole call runs at the clock read inside `_no_answer`,
    after the check for answers, before the circuit opens). The answer is the store's
    latest word, so the circuit ends closed."""

    class Interleaving(Clock):
        hook: Callable[[], None] | None = None

        def __call__(self) -> float:
            hook, self.hook = self.hook, None
            if hook is not None:
                hook()
            return self.now

    clock = Interleaving()
    circuit = AnswerCircuit("store", probe_seconds=30.0, open_seconds=1.0, clock=clock)
    others: list[threading.Thread] = []

    def answer_on_another_thread() -> None:
        other = threading.Thread(target=answer, args=(circuit,))
        others.append(other)
        other.start()
        other.join(0.3)  # done, unless it waits for the lock this thread holds

    record_timeout = circuit._no_answer

    def armed(started: float, probe: object | None) -> None:
        clock.hook = answer_on_another_thread  # its next clock read is past the check
        record_timeout(started, probe)

    circuit._no_answer = armed  # type: ignore[method-assign]
    time_out(circuit, clock)
    others[0].join(5)
    assert not others[0].is_alive()
    assert not circuit.open
