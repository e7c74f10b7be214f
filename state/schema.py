"""Schema versions of stored documents and the upcasters that read older ones.

Every document a store writes carries `schema_version` (its kind's current
version). On read, `upcast` runs the registered steps N -> N+1 in order, so
state written by older code resumes under newer code; a version newer than
this code knows fails with `UnsupportedSchemaVersion` instead of being
misread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import UnsupportedSchemaVersion

Document = dict[str, Any]
Upcaster = Callable[[Document], Document]

# Current version per document kind; bump it together with an upcaster from the old one.
CURRENT: dict[str, int] = {
    "workflow": 1,
    "audit": 1,
    "checkpoint": 1,
    "blob": 1,
    "write": 1,
}

_UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def upcaster(kind: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register the step that turns a `kind` document at `from_version` into `from_version + 1`."""

    def register(step: Upcaster) -> Upcaster:
        _UPCASTERS[(kind, from_version)] = step
        return step

    return register


def upcast(kind: str, document: Document) -> Document:
    version = int(document.get("schema_version", 1))
    current = CURRENT[kind]
    if version > current:
        raise UnsupportedSchemaVersion(kind, version, current)
    while version < current:
        document = _UPCASTERS[(kind, version)](dict(document))
        version += 1
        document["schema_version"] = version
    return document
