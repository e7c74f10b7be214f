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
    # 2: the checkpoint record may leave out its channel versions and be deflated, a
    # write's value may be deflated (`state.checkpoint.values`); code at 1 cannot read them.
    "checkpoint": 2,
    "blob": 1,
    "write": 2,
}

_UPCASTERS: dict[tuple[str, int], Upcaster] = {}


def upcaster(kind: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Register the step that turns a `kind` document at `from_version` into `from_version + 1`."""

    def register(step: Upcaster) -> Upcaster:
        _UPCASTERS[(kind, from_version)] = step
        return step

    return register


def check_readable(kind: str, version: int) -> None:
    """`UnsupportedSchemaVersion` if a `kind` document at `version` is newer than this code."""
    if version > CURRENT[kind]:
        raise UnsupportedSchemaVersion(kind, version, CURRENT[kind])


def upcast(kind: str, document: Document) -> Document:
    version = int(document.get("schema_version", 1))
    current = CURRENT[kind]
    check_readable(kind, version)
    while version < current:
        document = _UPCASTERS[(kind, version)](dict(document))
        version += 1
        document["schema_version"] = version
    return document


def _readable_as_is(document: Document) -> Document:
    return document


# Checkpoints and writes at 1 are what version 2 reads anyway: a record with its channel
# versions, values as the serde wrote them (no deflated type prefix).
_UPCASTERS[("checkpoint", 1)] = _readable_as_is
_UPCASTERS[("write", 1)] = _readable_as_is
