"""Start and stop the local stack (Redis, Cosmos emulator, Postgres, token issuer) without Docker."""

from .servers import (
    COSMOS_EMULATOR_KEY,
    CosmosEmulator,
    PostgresServer,
    RedisServer,
    ServerStartError,
    TokenIssuer,
    free_port,
)
from .stack import Stack, down, running, status, up

__all__ = [
    "COSMOS_EMULATOR_KEY",
    "CosmosEmulator",
    "PostgresServer",
    "RedisServer",
    "ServerStartError",
    "Stack",
    "TokenIssuer",
    "down",
    "free_port",
    "running",
    "status",
    "up",
]
