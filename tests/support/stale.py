"""A stale period shorter than a live run's heartbeat may be silent for, which
`AppSettings` refuses: a run hanging in a step (its keeper alive) then reads stalled
within the test, as a frozen worker's run would, without freezing the whole worker."""

from __future__ import annotations

from typing import TypeVar

from state.settings import Settings

AnySettings = TypeVar("AnySettings", bound=Settings)

# Shorter than a live run's heartbeat may be silent for at the lock TTLs of these tests.
QUICK_STALE_SECONDS = 1


def stalling_quickly(settings: AnySettings) -> AnySettings:
    """The app's `settings` with runs reading stalled after QUICK_STALE_SECONDS, unchecked."""
    return settings.model_copy(update={"case_stale_after_seconds": QUICK_STALE_SECONDS})
