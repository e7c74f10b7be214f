"""Metadata filters compared as LangGraph's InMemorySaver compares them, with Python's `==`,
under which True == 1 == 1.0 and False == 0 == -0.0: JSON (Cosmos SQL, jsonb) holds a
boolean and a number apart, so a cold query asks for each value `==` holds equal."""

from __future__ import annotations

from ..ports import JSON


def equal_scalars(value: JSON) -> list[JSON]:
    """The JSON scalars `==` holds equal to a scalar, each of its own JSON type."""
    if isinstance(value, bool):
        return [value, int(value)]
    if isinstance(value, int | float) and value in (0, 1):
        return [value, value == 1]
    return [value]


def compared_here(value: JSON) -> bool:
    """Whether a list or object holds a boolean, or a number `==` holds equal to one: JSON
    equality would hold apart what `==` holds equal, so it is compared after reading."""
    if isinstance(value, list):
        return any(compared_here(item) or len(equal_scalars(item)) > 1 for item in value)
    if isinstance(value, dict):
        return compared_here(list(value.values()))
    return False
