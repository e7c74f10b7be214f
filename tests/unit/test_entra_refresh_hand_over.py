"""A refreshed Entra ID token reaches every Redis pool sharing the token source, even when
signing one pool's connections in fails (offline: a fake identity, no server)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from redis.auth.idp import IdentityProviderInterface
from redis.auth.token import SimpleToken, TokenInterface

from state.hot import redis_client
from state.hot.redis_client import EntraTokens

LIFETIME_SECONDS = 2.0


class ShortLivedTokens(IdentityProviderInterface):
    def __init__(self) -> None:
        self.issued = 0

    def request_token(self, force_refresh: bool = False) -> TokenInterface:
        self.issued += 1
        now = time.time() * 1000
        return SimpleToken(
            f"token-{self.issued}", now + LIFETIME_SECONDS * 1000, now, {"oid": "app"}
        )


class PoolRefusing(Exception):
    pass


@pytest.fixture
def tokens(monkeypatch: pytest.MonkeyPatch) -> Iterator[EntraTokens]:
    monkeypatch.setattr(redis_client, "ENTRA_REFRESH_RATIO", 0.05)  # the first in ~0.1 s
    source = EntraTokens(ShortLivedTokens())
    try:
        yield source
    finally:
        source.stop()


async def test_a_pool_failing_to_sign_in_does_not_keep_the_new_token_from_the_others(
    tokens: EntraTokens,
) -> None:
    handed: list[str] = []

    async def failing_pool(token: TokenInterface) -> None:
        raise PoolRefusing("this pool's connections could not be signed in")

    async def other_pool(token: TokenInterface) -> None:
        handed.append(token.get_value())

    tokens.on_next(failing_pool)
    tokens.on_next(other_pool)
    await tokens.get_credentials_async()  # starts the refresh
    for _ in range(100):
        if handed:
            break
        await asyncio.sleep(0.02)
    assert handed, "the new token never reached the pool listed after the failing one"


def test_a_pool_failing_to_sign_in_does_not_keep_the_new_token_from_the_others_blocking(
    tokens: EntraTokens,
) -> None:
    handed = threading.Event()

    def failing_pool(token: TokenInterface) -> None:
        raise PoolRefusing("this pool's connections could not be signed in")

    tokens.on_next(failing_pool)
    tokens.on_next(lambda token: handed.set())
    tokens.get_credentials()  # starts the refresh
    assert handed.wait(2.0), "the new token never reached the pool listed after the failing one"
