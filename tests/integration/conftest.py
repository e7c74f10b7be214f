"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest

from state.checkpoint import saver as saver_module


@pytest.fixture
def impatient_for_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """A boundary whose backlog only a dead Redis holds gives up after 0.3 s, not the
    app's 5 s (what it waits for is what the tests check, not how long)."""
    monkeypatch.setattr(saver_module, "REDIS_RETURN_SECONDS", 0.3)
    monkeypatch.setattr(saver_module, "REDIS_RETRY_POLL_SECONDS", 0.05)
