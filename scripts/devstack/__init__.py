"""Start and stop the local stack (Redis, Cosmos emulator, Postgres, token issuer) without Docker."""

from .servers import (
    COSMOS_EMULATOR_KEY,
    ClusterRedisServer,
    CosmosEmulator,
    PortInUse,
    PostgresServer,
    RedisServer,
    ServerStartError,
    TokenIssuer,
    check_port_free,
    free_port,
)
from .stack import (
    DEFAULT_PORTS,
    MEMORY_ONLY_NOTE,
    Stack,
    StateFileUnreadable,
    Stopped,
    down,
    planned_env,
    running,
    status,
    up,
)

__all__ = [
    "COSMOS_EMULATOR_KEY",
    "DEFAULT_PORTS",
    "MEMORY_ONLY_NOTE",
    "ClusterRedisServer",
    "CosmosEmulator",
    "PortInUse",
    "PostgresServer",
    "RedisServer",
    "ServerStartError",
    "Stack",
    "StateFileUnreadable",
    "Stopped",
    "TokenIssuer",
    "check_port_free",
    "down",
    "free_port",
    "planned_env",
    "running",
    "status",
    "up",
]
