"""`ServerCircuit`: after a Redis server timed out, the process's calls to it fail at once,
and one caller at a time probes it; an answer closes the circuit. What that does to runs
against a frozen server: `tests/faults/test_redis_frozen.py`."""

from __future__ import annotations

import pytest

from state.hot import redis_client
from state.hot.redis_client import (
    FAIL_FAST_SECONDS,
    PROBE_SECONDS,
    RETRY_GRACE_SECONDS,
    ServerCircuit,
    ServerTimedOutLately,
)
from tests.support.clock import Clock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(redis_client.time, "monotonic", clock)
    return clock


def test_after_a_timeout_calls_fail_at_once_then_one_probes_and_an_answer_closes_it(
    clock: Clock,
) -> None:
    circuit, first, second = ServerCircuit("redis:6380"), object(), object()
    circuit.check(first)  # closed: nothing refused
    circuit.timed_out(object())
    with pytest.raises(ServerTimedOutLately):
        circuit.check(first)
    clock.now += FAIL_FAST_SECONDS
    circuit.check(first)  # probes
    circuit.check(first)  # and may go on (connect, then send)
    with pytest.raises(ServerTimedOutLately):
        circuit.check(second)  # while it probes, the others still fail at once
    circuit.answered()
    circuit.check(second)


def test_a_probe_that_times_out_opens_it_again_and_one_never_heard_of_frees_its_turn(
    clock: Clock,
) -> None:
    circuit, first, second = ServerCircuit("redis:6380"), object(), object()
    circuit.timed_out(object())
    clock.now += FAIL_FAST_SECONDS
    circuit.check(first)
    circuit.timed_out(object())  # the probe met the timeout too
    with pytest.raises(ServerTimedOutLately):
        circuit.check(first)
    clock.now += FAIL_FAST_SECONDS
    circuit.check(first)  # probes again, then is cancelled: it reports nothing
    clock.now += PROBE_SECONDS - 0.1
    with pytest.raises(ServerTimedOutLately):
        circuit.check(second)
    clock.now += 0.1
    circuit.check(second)  # its turn


def test_every_client_of_a_server_shares_its_circuit() -> None:
    assert redis_client.circuit_for("10.0.0.5", 6380) is redis_client.circuit_for("10.0.0.5", 6380)
    assert redis_client.circuit_for("10.0.0.5", 6380) is not redis_client.circuit_for(
        "10.0.0.5", 6381
    )


def test_the_clients_retry_of_the_call_that_timed_out_goes_ahead(clock: Clock) -> None:
    """A call whose reply was lost learns its outcome from the retry (a lock taken twice
    with one token holds it): that retry is not refused, other calls are."""
    circuit, timed_out, other = ServerCircuit("redis:6380"), object(), object()
    circuit.timed_out(timed_out)
    clock.now += 0.05  # the client's backoff
    circuit.check(timed_out)
    with pytest.raises(ServerTimedOutLately):
        circuit.check(other)
    circuit.timed_out(timed_out)  # the retry timed out too
    clock.now += 0.05
    with pytest.raises(ServerTimedOutLately):
        circuit.check(timed_out)  # once: pooled, its next call would wait again
    clock.now += RETRY_GRACE_SECONDS
    circuit.timed_out(other)
    clock.now += 0.05
    circuit.check(other)  # another connection's call has its own
