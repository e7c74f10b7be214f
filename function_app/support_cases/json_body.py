"""JSON request bodies as the API reads them: an object that names one key twice is refused.

Python's parser keeps the last of a repeated key, so `{"decision": "approve", "decision":
"reject"}` was a rejection, and a charge with two `amount`s was judged (and refunded) at
whichever came last. What the client meant cannot be known: the body is refused (422).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


class DuplicateKey(ValueError):
    """A JSON object of the body names `key` more than once."""

    def __init__(self, key: str) -> None:
        super().__init__(f"the key {key!r} appears more than once in one object")
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise DuplicateKey(key)
        found[key] = value
    return found


def loads_unique_keys(text: str | bytes) -> Any:
    """`json.loads`, raising `DuplicateKey` for an object that names a key twice."""
    return json.loads(text, object_pairs_hook=_unique_keys)


class UniqueKeysRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads_unique_keys(await self.body())
        return self._json


class UniqueKeysRoute(APIRoute):
    """A route whose JSON body is read by `UniqueKeysRequest` (FastAPI's parse answers 400,
    with the `DuplicateKey` as its cause, which the error handlers answer 422)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def with_unique_keys(request: Request) -> Response:
            return await handle(UniqueKeysRequest(request.scope, request.receive))

        return with_unique_keys
