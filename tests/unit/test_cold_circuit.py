"""`AnswerCircuit`: a cold store that answers nothing is not waited on by every caller."""

from __future__ import annotations

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
