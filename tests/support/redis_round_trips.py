"""A Redis client's round trips, counted or refused by a test: its commands and pipelines
(`execute_command`, `pipeline`), and the hot path's lean round trips
(`state.hot.redis_client.round_trip`, which bypass both)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from state.hot import redis_client


@dataclass
class RedisRoundTrips:
    count: int = 0
    # Each round trip's first command: a lean round trip of several commands is one entry.
    commands: list[str] = field(default_factory=list)
    # Raised instead of sending, while set.
    refuse: BaseException | None = None

    def watch(self, client: aioredis.Redis) -> Callable[[], None]:
        """From now on, every round trip of `client`; returns the undo."""
        single = client.execute_command
        make_pipeline = client.pipeline
        lean = redis_client.round_trip

        def seen(command: object) -> None:
            if self.refuse is not None:
                raise self.refuse
            self.count += 1
            self.commands.append(str(command))

        async def counted(*args: Any, **options: Any) -> Any:
            seen(args[0])
            return await single(*args, **options)

        def pipeline(*args: Any, **options: Any) -> Any:
            pipe = make_pipeline(*args, **options)
            execute = pipe.execute

            async def counted_execute(*a: Any, **k: Any) -> Any:
                seen("PIPELINE")
                return await execute(*a, **k)

            pipe.execute = counted_execute  # type: ignore[method-assign]
            return pipe

        async def counted_lean(
            target: aioredis.Redis, commands: Sequence[Any], **options: Any
        ) -> list[Any]:
            if target is client:
                seen(commands[0][0])
            return await lean(target, commands, **options)

        client.execute_command = counted  # type: ignore[method-assign]
        client.pipeline = pipeline  # type: ignore[method-assign]
        redis_client.round_trip = counted_lean  # type: ignore[assignment]

        def undo() -> None:
            client.execute_command = single  # type: ignore[method-assign]
            client.pipeline = make_pipeline  # type: ignore[method-assign]
            redis_client.round_trip = lean

        return undo

    def reset(self) -> None:
        self.count = 0
        self.commands.clear()
