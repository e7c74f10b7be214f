"""LangGraph's own checkpointer conformance suite against the saver on real servers.

Every base and extended capability, by name, for each cold backend: with the
Redis hot tier in each write mode, and on the cold tier alone; and for the in-memory
fakes of the same ports in the same three shapes. The suite's report only counts what it
detects, so each capability is asserted explicitly: detected, run, and all its tests passed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import (
    BASE_CAPABILITIES,
    EXTENDED_CAPABILITIES,
    Capability,
)

from state.checkpoint import TieredCheckpointSaver
from state.settings import WriteMode
from tests.contract.conftest import OpenBackends

CAPABILITIES = sorted(BASE_CAPABILITIES | EXTENDED_CAPABILITIES, key=lambda c: c.value)


CONFIGURATIONS = [
    (True, WriteMode.WRITE_THROUGH),
    (True, WriteMode.WRITE_BEHIND),
    (False, WriteMode.WRITE_THROUGH),
]


@pytest.mark.parametrize(
    ("hot", "mode"),
    CONFIGURATIONS,
    ids=["redis-write-through", "redis-write-behind", "cold-only"],
)
@pytest.mark.parametrize("capability", CAPABILITIES, ids=[c.value for c in CAPABILITIES])
async def test_capability_passes(
    any_backend: str,
    hot: bool,
    mode: WriteMode,
    capability: Capability,
    open_tiers: OpenBackends,
) -> None:
    async with open_tiers(any_backend, hot=hot, mode=mode) as backends:
        assert (backends.hot_checkpoints is not None) is hot
        assert (backends.flusher is not None) is (mode is WriteMode.WRITE_BEHIND)

        @checkpointer_test(name=f"TieredCheckpointSaver[{any_backend}, hot={hot}, {mode}]")
        async def saver() -> AsyncIterator[BaseCheckpointSaver]:
            yield TieredCheckpointSaver.from_backends(backends)

        report = await validate(saver, capabilities={capability.value})

    result = report.results[capability.value]
    assert result.detected, f"{capability.value} is not implemented"
    assert result.passed is True, "\n".join(result.failures)
    assert result.tests_passed > 0 and result.tests_failed == 0
