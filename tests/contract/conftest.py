"""Contract fixtures: the same cases run against every cold backend (real servers) and,
where a case names `any_backend`, against the in-memory fakes too (tests/support/fakes.py),
which proves the fakes the unit tests use behave as the real adapters do."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import pytest

from state.factory import Backends, backends_for
from state.settings import Settings, WriteMode
from tests.support.fakes import MEMORY, memory_backends

COLD_BACKENDS = ["cosmos", "postgres"]

OpenBackends = Callable[..., AbstractAsyncContextManager[Backends]]


# Each saver shape a contract runs against: Redis in front in either write mode, cold only.
every_configuration = pytest.mark.parametrize(
    ("hot", "mode"),
    [(True, WriteMode.WRITE_THROUGH), (True, WriteMode.WRITE_BEHIND), (False, None)],
    ids=["redis-write-through", "redis-write-behind", "cold-only"],
)


@pytest.fixture(params=COLD_BACKENDS)
def cold_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=[*COLD_BACKENDS, MEMORY])
def any_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_tiers(request: pytest.FixtureRequest) -> OpenBackends:
    """Opens the tiers of one backend, as `backends_for` does: real servers for a cold
    backend (the stack starts only then), every tier a fake for `memory`."""

    def open_(
        backend: str, *, hot: bool = True, mode: WriteMode | None = None
    ) -> AbstractAsyncContextManager[Backends]:
        if backend == MEMORY:
            # The settings' default: write-behind whenever there is a hot tier.
            write_behind = hot and mode is not WriteMode.WRITE_THROUGH
            return memory_backends(hot=hot, write_behind=write_behind)
        make_settings: Callable[..., Settings] = request.getfixturevalue("make_settings")
        return backends_for(make_settings(backend, hot=hot, state_write_mode=mode))

    return open_


@pytest.fixture(scope="session")
def make_settings(stack_env: dict[str, str]) -> Callable[..., Settings]:
    """Settings for one backend against the test stack; overrides by field name."""

    def build(backend: str, *, hot: bool = True, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "state_cold_backend": backend,
            "cosmos_endpoint": stack_env["COSMOS_ENDPOINT"],
            "cosmos_key": stack_env["COSMOS_KEY"],
            "cosmos_create_if_missing": True,
            "postgres_url": stack_env["POSTGRES_URL"],
        }
        if hot:
            values["redis_url"] = stack_env["REDIS_URL"]
        values.update(overrides)
        return Settings.model_validate(values)

    return build
