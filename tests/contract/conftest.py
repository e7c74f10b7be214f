"""Contract fixtures: the same cases run against every cold backend (real servers)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from state.settings import Settings

COLD_BACKENDS = ["cosmos", "postgres"]


@pytest.fixture(params=COLD_BACKENDS)
def cold_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


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


def unique_thread(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
