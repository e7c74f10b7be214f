"""Keeps workflow state bounded: measure, prune, truncate, compress, archive by reference.

What each step may touch is configuration (`SizePolicy`, read from `Settings`),
never inferred from content:

- message sections (`STATE_MESSAGE_SECTIONS`) keep the newest
  `STATE_MESSAGE_WINDOW` messages; what was dropped is counted in a summary
  message at the head of the list, so the count survives repeated pruning;
- reasoning sections (`STATE_REASONING_SECTIONS`) have every string cut to
  `STATE_REASONING_MAX_CHARS`, with a marker saying how much was cut;
- archivable sections (`STATE_ARCHIVABLE_SECTIONS`) that the caller says the
  workflow has completed move to the cold tier and leave a reference behind;
- any section whose canonical JSON exceeds `STATE_COMPRESS_THRESHOLD_BYTES`
  is stored compressed;
- what still does not fit one item (`STATE_MAX_ITEM_BYTES`, under Cosmos's
  2 MB) is offloaded to the cold tier by reference, whatever its name: that
  moves data, it never drops any.

Pruning and truncation are lossy on purpose and only ever apply to the
sections configured for them; compression, archiving and offloading are
reversed by `expand`. Archived and offloaded values live in the cold store as
ordinary workflow records under a derived, content-addressed thread id,
chunked to fit an item (`ColdRecordArchive`), so the same code works on Cosmos
and Postgres; retention deletes them with the thread that owns them
(`ColdRetention`), never by their own age while it lives.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import codec
from .errors import CorruptState, InvalidValue, WorkflowExists, WorkflowNotFound
from .ports import JSON, ColdStateStore, SectionArchive, WorkflowRecord
from .settings import Settings

# json.dumps writes a NUL character as \u0000. Preceded by an even run of backslashes it
# is that escape; after an odd one it is literal text.
NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")

# Reserved single-key envelopes that replace a section's value.
COMPRESSED_KEY = "$compressed"
ARCHIVED_KEY = "$archived"  # completed, no longer needed by the workflow
OFFLOADED_KEY = "$offloaded"  # still needed, stored apart only because of its size
# The summary message that heads a pruned message list.
PRUNED_SUMMARY_TYPE = "pruned_summary"
ARCHIVE_AGENT_ID = "state-size"
ARCHIVE_SEPARATOR = "~archive~"


def canonical_json(value: JSON) -> bytes:
    """The bytes a value occupies as stored: sorted keys, no whitespace, UTF-8."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if "\\u0000" in text and NUL_ESCAPE.search(text):
        raise InvalidValue("records", "a NUL character in a section name or value")
    return storable_text("records", "section name or value", text)


def storable_text(backend: str, what: str, text: str) -> bytes:
    """`text` as UTF-8, refused as a value the store cannot hold, on every backend alike,
    if one cannot: a NUL character (Postgres text and jsonb refuse it; Cosmos and the
    in-memory tiers took it, so a thread worked on one backend only), or text that is not
    UTF-8 (a lone surrogate: JSON's "\\ud800" decodes to one; each client failed on it
    with a plain UnicodeEncodeError, the in-memory tiers not at all)."""
    if "\0" in text:
        raise InvalidValue(backend, f"a NUL character in a {what}")
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise InvalidValue(backend, f"a lone surrogate (not UTF-8) in a {what}") from None


def storable_json(backend: str, what: str, value: Any) -> None:
    """Every string in `value`, object keys too, as `storable_text` takes it. Checkpoint
    metadata and a listing's metadata filter: Postgres jsonb refused a NUL or a lone
    surrogate in either (a write-behind put acknowledged, then its flush refused for good),
    Cosmos and the in-memory tiers stored it or found nothing."""
    if isinstance(value, str):
        storable_text(backend, what, value)
    elif isinstance(value, dict):
        for key, item in value.items():
            storable_json(backend, what, key)
            storable_json(backend, what, item)
    elif isinstance(value, list | tuple):
        for item in value:
            storable_json(backend, what, item)


@dataclass(frozen=True)
class SizeReport:
    """Canonical-JSON bytes per section and of the whole sections document."""

    sections: dict[str, int]
    total: int

    def largest(self, count: int = 3) -> list[tuple[str, int]]:
        return sorted(self.sections.items(), key=lambda item: (-item[1], item[0]))[:count]


def measure(sections: Mapping[str, JSON]) -> SizeReport:
    sizes = {name: len(canonical_json(value)) for name, value in sections.items()}
    return _report(sections, sizes)


def _report(sections: Mapping[str, JSON], sizes: dict[str, int]) -> SizeReport:
    """The report of `sections` given each one's canonical size: the whole document's is
    summed from them (`{"name":value,...}`) instead of encoding every value again."""
    if not all(isinstance(name, str) for name in sections):
        # JSON turns other keys into strings of its own: measured as encoded.
        return SizeReport(dict(sizes), len(canonical_json(dict(sections))))
    members = sum(len(canonical_json(name)) + 1 + size for name, size in sizes.items())
    return SizeReport(dict(sizes), 2 + members + max(len(sizes) - 1, 0))


@dataclass(frozen=True)
class SizePolicy:
    message_window: int
    message_sections: frozenset[str]
    reasoning_sections: frozenset[str]
    reasoning_max_chars: int
    compress_threshold_bytes: int
    archivable_sections: frozenset[str]
    max_item_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> SizePolicy:
        return cls(
            message_window=settings.state_message_window,
            message_sections=frozenset(settings.state_message_sections),
            reasoning_sections=frozenset(settings.state_reasoning_sections),
            reasoning_max_chars=settings.state_reasoning_max_chars,
            compress_threshold_bytes=settings.state_compress_threshold_bytes,
            archivable_sections=frozenset(settings.state_archivable_sections),
            max_item_bytes=settings.state_max_item_bytes,
        )


@dataclass
class SizeActions:
    """What one `shrink` did, for logs, metrics and tests."""

    before: SizeReport
    after: SizeReport
    pruned: dict[str, int] = field(default_factory=dict)  # section -> messages dropped
    truncated: dict[str, int] = field(default_factory=dict)  # section -> characters dropped
    archived: dict[str, str] = field(default_factory=dict)  # section -> reference
    offloaded: dict[str, str] = field(default_factory=dict)  # section -> reference
    compressed: dict[str, tuple[int, int]] = field(default_factory=dict)  # bytes before, after


# --------------------------------------------------------------------------- the steps


def pruned_summary(count: int) -> dict[str, Any]:
    return {
        "type": PRUNED_SUMMARY_TYPE,
        "role": "system",
        "content": f"[{count} earlier messages pruned]",
        "pruned_count": count,
    }


def _is_summary(message: JSON) -> bool:
    return isinstance(message, dict) and message.get("type") == PRUNED_SUMMARY_TYPE


def pruned_count(messages: list[JSON]) -> int:
    """How many messages were pruned from this list so far (0 if never)."""
    return int(messages[0]["pruned_count"]) if messages and _is_summary(messages[0]) else 0


def prune_messages(messages: list[JSON], window: int) -> tuple[list[JSON], int]:
    """Keep the newest `window` messages behind a summary counting every pruned one."""
    earlier = pruned_count(messages)
    body = messages[1:] if earlier else messages
    dropped = max(0, len(body) - window)
    if not dropped:
        return messages, 0
    return [pruned_summary(earlier + dropped), *body[-window:]], dropped


def _truncation_marker(cut: int) -> str:
    return f"…[truncated {cut} chars]"


def truncate_strings(value: JSON, max_chars: int) -> tuple[JSON, int]:
    """Cut every string inside `value` to at most `max_chars` (marker included).

    Idempotent: a truncated string already fits, so a second pass keeps it.
    """
    if isinstance(value, str):
        if len(value) <= max_chars:
            return value, 0
        # The marker's length depends on the count it reports; the count only shrinks
        # as the marker does, so this settles within a few rounds (one per digit).
        cut = len(value)
        for _ in range(8):
            keep = max_chars - len(_truncation_marker(cut))
            if len(value) - keep == cut:
                break
            cut = len(value) - keep
        return value[:keep] + _truncation_marker(cut), cut
    if isinstance(value, list):
        total = 0
        items = []
        for item in value:
            new, cut = truncate_strings(item, max_chars)
            items.append(new)
            total += cut
        return items, total
    if isinstance(value, dict):
        total = 0
        mapping = {}
        for key, item in value.items():
            new, cut = truncate_strings(item, max_chars)
            mapping[key] = new
            total += cut
        return mapping, total
    return value, 0


def is_compressed(value: JSON) -> bool:
    return isinstance(value, dict) and set(value) == {COMPRESSED_KEY}


def is_archived(value: JSON) -> bool:
    return isinstance(value, dict) and set(value) == {ARCHIVED_KEY}


def is_offloaded(value: JSON) -> bool:
    return isinstance(value, dict) and set(value) == {OFFLOADED_KEY}


def _is_reference(value: JSON) -> bool:
    return is_archived(value) or is_offloaded(value)


def escaped(value: JSON) -> JSON:
    """A caller's plain value in the form `shrink` takes: one shaped like an envelope (a
    one-key object under a reserved key) goes inside a raw compressed envelope of its own,
    which no step takes for a reference and `expand` unwraps to the value as written.
    `shrink` also takes its own output (stored forms), so only a caller knows a value is
    plain: the store layer escapes what it is given."""
    if not (is_compressed(value) or _is_reference(value)):
        return value
    raw = canonical_json(value)
    return {COMPRESSED_KEY: {"codec": codec.RAW, "bytes": len(raw), "data": codec.to_text(raw)}}


def wrap_compressed(value: JSON, threshold_bytes: int, *, size: int | None = None) -> JSON:
    """A JSON value in its compressed envelope (bytes via `codec.compress`); the value
    itself below the threshold, or when the envelope would not be smaller. `size`: the
    value's canonical size if known, which spares encoding a value below the threshold."""
    if is_compressed(value) or _is_reference(value):
        return value
    if size is not None and codec.stays_raw(size, threshold_bytes):
        return value
    raw = canonical_json(value)
    encoding, payload = codec.compress(raw, threshold_bytes)
    if encoding == codec.RAW:
        return value
    envelope = {
        COMPRESSED_KEY: {"codec": encoding, "bytes": len(raw), "data": codec.to_text(payload)}
    }
    # base64 costs a third: only worth it when the compressed text is still smaller.
    return envelope if len(canonical_json(envelope)) < len(raw) else value


def unwrap_compressed(value: JSON) -> JSON:
    """The value a compressed envelope holds; any other value as it is."""
    if not is_compressed(value):
        return value
    body = value[COMPRESSED_KEY]
    if not isinstance(body, dict):
        raise CorruptState(f"compressed section's envelope is {type(body).__name__}, not an object")
    raw = codec.decompress(str(body.get("codec")), codec.from_text(str(body.get("data", ""))))
    if len(raw) != body.get("bytes"):
        raise CorruptState(f"compressed section holds {len(raw)} bytes, not {body.get('bytes')}")
    try:
        return json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        # Typed, as any other damage: a reader reports this record, not a bare crash.
        raise CorruptState(f"compressed section does not hold JSON: {exc}") from exc


# --------------------------------------------------------------------------- archive


class ColdRecordArchive:
    """`SectionArchive` over any `ColdStateStore`: values kept as ordinary workflow records.

    A value is compressed and split (state.codec) into chunk records
    `<ref>~<n>`, each small enough that it and its audit entry fit one Cosmos
    item, then a head record `<ref>` naming the chunks is written last, so a
    crash mid-archive leaves no head and nothing readable half-done. The
    reference `<thread_id>~archive~<sha256>` is content-addressed: archiving
    the same value again finds every record already there. Each record is its
    own logical partition on Cosmos and its own row on Postgres; retention
    deletes it with its thread (the id's prefix), or by its own age once no
    such thread is left.
    """

    # Room for what surrounds a chunk in its record and audit documents (ids, metadata).
    ENVELOPE_BYTES = 4096

    def __init__(
        self, cold: ColdStateStore, *, max_item_bytes: int, compress_threshold_bytes: int
    ) -> None:
        self._cold = cold
        self._chunk_bytes = codec.base64_chunk_budget(max_item_bytes, self.ENVELOPE_BYTES)
        self._compress_threshold = compress_threshold_bytes

    @classmethod
    def from_settings(cls, cold: ColdStateStore, settings: Settings) -> ColdRecordArchive:
        return cls(
            cold,
            max_item_bytes=settings.state_max_item_bytes,
            compress_threshold_bytes=settings.state_compress_threshold_bytes,
        )

    @staticmethod
    def reference(thread_id: str, value: JSON) -> str:
        return f"{thread_id}{ARCHIVE_SEPARATOR}{hashlib.sha256(canonical_json(value)).hexdigest()}"

    async def archive(self, thread_id: str, section: str, value: JSON) -> str:
        raw = canonical_json(value)
        ref = self.reference(thread_id, value)
        encoded = codec.encode(
            raw, compress_threshold=self._compress_threshold, chunk_bytes=self._chunk_bytes
        )
        for index, chunk in enumerate(encoded.chunks):
            await self._create(f"{ref}~{index}", {"data": codec.to_text(chunk)})
        head = {
            "source": {"thread_id": thread_id, "section": section},
            "encoding": encoded.encoding,
            "chunks": len(encoded.chunks),
            "bytes": len(raw),
        }
        await self._create(ref, head)
        return ref

    async def _create(self, record_id: str, sections: dict[str, JSON]) -> None:
        # Content-addressed: an existing record under this id already holds these bytes.
        with contextlib.suppress(WorkflowExists):
            await self._cold.create(record_id, sections, agent_id=ARCHIVE_AGENT_ID)

    @staticmethod
    def _digest_of(ref: str) -> str:
        """The value's sha256 a reference names. Refused before any record is read: a
        reference without the separator names some other record (a workflow's own)."""
        _, separator, digest = ref.rpartition(ARCHIVE_SEPARATOR)
        if not separator:
            raise CorruptState(f"{ref!r} is not an archive reference")
        return digest

    @staticmethod
    def _head_of(ref: str, head: WorkflowRecord) -> tuple[int, str]:
        """The chunk count and encoding a head record holds; damaged ones read as damage
        (typed), never as a KeyError or ValueError."""
        count, encoding = head.sections.get("chunks"), head.sections.get("encoding")
        if (
            not isinstance(count, int)
            or isinstance(count, bool)
            or count < 0
            or not isinstance(encoding, str)
        ):
            raise CorruptState(f"archived value {ref!r} has a damaged head record")
        return count, encoding

    async def fetch_archived(self, ref: str) -> JSON:
        digest = self._digest_of(ref)
        head = await self._cold.get(ref)
        if head is None:
            raise WorkflowNotFound(ref)
        count, encoding = self._head_of(ref, head)
        chunks = []
        for index in range(count):
            record = await self._cold.get(f"{ref}~{index}")
            if record is None:
                raise CorruptState(f"archived value {ref!r} lost chunk {index}")
            data = record.sections.get("data")
            if not isinstance(data, str):
                raise CorruptState(f"archived value {ref!r} has a damaged chunk {index}")
            chunks.append(codec.from_text(data))
        raw = codec.decode(encoding, chunks)
        if hashlib.sha256(raw).hexdigest() != digest:
            raise CorruptState(f"archived value {ref!r} does not match its reference")
        return json.loads(raw)

    async def delete(self, ref: str) -> None:
        """Remove an archived value (its head first, so it is never half-readable). One
        whose head is damaged is left as it is (`CorruptState`): which records are its
        chunks is unknown, and retention removes them with their owner's thread."""
        self._digest_of(ref)
        head = await self._cold.get(ref)
        if head is None:
            return
        count, _ = self._head_of(ref, head)
        await self._cold.delete(ref)
        for index in range(count):
            await self._cold.delete(f"{ref}~{index}")


# --------------------------------------------------------------------------- the manager


def _reference(ref: str, value: JSON) -> dict[str, JSON]:
    raw = canonical_json(value)
    return {"ref": ref, "sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}


class StateSizeManager:
    def __init__(self, policy: SizePolicy, archive: SectionArchive | None = None) -> None:
        self.policy = policy
        self._archive = archive

    @classmethod
    def from_settings(
        cls, settings: Settings, archive: SectionArchive | None = None
    ) -> StateSizeManager:
        return cls(SizePolicy.from_settings(settings), archive)

    def measure(self, sections: Mapping[str, JSON]) -> SizeReport:
        return measure(sections)

    def compact(self, sections: Mapping[str, JSON]) -> tuple[dict[str, JSON], SizeActions]:
        """Prune, truncate and compress (no I/O): `shrink` short of moving anything cold."""
        before = measure(sections)
        return self._compact(
            dict(sections), SizeActions(before, measure({})), dict(before.sections)
        )

    async def shrink(
        self,
        thread_id: str,
        sections: Mapping[str, JSON],
        *,
        completed: Collection[str] = (),
    ) -> tuple[dict[str, JSON], SizeActions]:
        """Every step, then whatever still does not fit one item moves to the archive.

        Sections in `completed` that are configured archivable are archived
        (only the caller knows what the workflow has finished with). A section
        still larger than a quarter of an item after compression is offloaded,
        so its audit entry (before and after) fits one item too; then the
        largest sections are offloaded while the record exceeds half an item.
        Offloading keeps every byte: `expand` always brings offloaded sections back.
        """
        result = dict(sections)
        actions = SizeActions(measure(sections), measure({}))
        # Canonical size of each value in `result`, kept up to date as values are
        # replaced, so an unchanged section is encoded once, not at every step.
        sizes = dict(actions.before.sections)
        for name in sorted(completed):
            if (
                name in self.policy.archivable_sections
                and name in result
                and not _is_reference(result[name])
            ):
                value = unwrap_compressed(result[name])
                ref = await self._require_archive().archive(thread_id, name, value)
                result[name] = {ARCHIVED_KEY: _reference(ref, value)}
                sizes[name] = len(canonical_json(result[name]))
                actions.archived[name] = ref
        result, actions = self._compact(result, actions, sizes)
        limit = self.policy.max_item_bytes
        total = actions.after.total
        for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
            if _is_reference(result[name]):
                continue
            if sizes[name] <= limit // 4 and total <= limit // 2:
                break
            result[name] = await self.offload(thread_id, name, result[name])
            offloaded = len(canonical_json(result[name]))
            total += offloaded - sizes[name]
            sizes[name] = offloaded
            actions.offloaded[name] = result[name][OFFLOADED_KEY]["ref"]
        actions.after = _report(result, sizes)
        return result, actions

    async def offload(self, thread_id: str, section: str, value: JSON) -> JSON:
        """Move a section's value (plain or compressed) to the archive; return the reference.

        Lossless and not tied to the policy: for a caller that learns only from the
        cold store that a record will not fit (`StateTooLarge`).
        """
        plain = unwrap_compressed(value)
        ref = await self._require_archive().archive(thread_id, section, plain)
        return {OFFLOADED_KEY: _reference(ref, plain)}

    async def make_room(
        self, thread_id: str, sections: Mapping[str, JSON], *, keep: Collection[str]
    ) -> dict[str, JSON]:
        """References for the largest inline sections not in `keep`, offloaded until
        `sections` (stored forms) are within half an item: for a record the cold store
        refused as too large though each section fits alone (sections written one at a
        time pass a quarter of an item only together). Lossless, as `offload`."""
        moved: dict[str, JSON] = {}
        report = measure(sections)
        sizes, total = report.sections, report.total
        for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
            if total <= self.policy.max_item_bytes // 2:
                break
            if name in keep or _is_reference(sections[name]):
                continue
            moved[name] = await self.offload(thread_id, name, sections[name])
            total -= sizes[name] - len(canonical_json(moved[name]))
        return moved

    def _require_archive(self) -> SectionArchive:
        if self._archive is None:
            raise ValueError("moving sections to the cold tier needs a SectionArchive")
        return self._archive

    def _compact(
        self, result: dict[str, JSON], actions: SizeActions, sizes: dict[str, int]
    ) -> tuple[dict[str, JSON], SizeActions]:
        """`sizes`: the canonical size of each value in `result`, updated here for every
        value replaced (the others are not encoded again)."""
        policy = self.policy
        for name in sorted(result):
            value = stored = result[name]
            if _is_reference(value):
                continue
            if name in policy.message_sections and value is not None:
                messages = unwrap_compressed(value)
                if not isinstance(messages, list):
                    raise TypeError(
                        f"section {name!r} is configured as a message window but holds "
                        f"{type(messages).__name__}, not a list"
                    )
                pruned, dropped = prune_messages(messages, policy.message_window)
                if dropped:
                    value = pruned
                    actions.pruned[name] = dropped
            if name in policy.reasoning_sections:
                truncated, cut = truncate_strings(
                    unwrap_compressed(value), policy.reasoning_max_chars
                )
                if cut:
                    value = truncated
                    actions.truncated[name] = cut
            if value is not stored:
                # Pruned or truncated from what `unwrap_compressed` gave: plain again.
                value = escaped(value)
            size = sizes[name] if value is stored else len(canonical_json(value))
            packed = wrap_compressed(value, policy.compress_threshold_bytes, size=size)
            if packed is not value:
                actions.compressed[name] = (size, len(canonical_json(packed)))
            if packed is not stored:
                sizes[name] = size if packed is value else actions.compressed[name][1]
            result[name] = packed
        actions.after = _report(result, sizes)
        return result, actions

    async def expand(
        self, sections: Mapping[str, JSON], *, fetch_archived: bool = True
    ) -> dict[str, JSON]:
        """Undo compression and offloading (and archiving, if asked); checks digests."""
        result: dict[str, JSON] = {}
        for name, value in sections.items():
            key = next(iter(value)) if _is_reference(value) else None
            if key == OFFLOADED_KEY or (key == ARCHIVED_KEY and fetch_archived):
                envelope = value[key]
                # Only this layer writes a reference (a caller's look-alike is `escaped`).
                if not (
                    isinstance(envelope, dict)
                    and isinstance(envelope.get("ref"), str)
                    and isinstance(envelope.get("sha256"), str)
                ):
                    raise CorruptState(f"section {name!r} holds a damaged reference")
                fetched = await self._require_archive().fetch_archived(envelope["ref"])
                if hashlib.sha256(canonical_json(fetched)).hexdigest() != envelope["sha256"]:
                    raise CorruptState(f"section {name!r} does not match its stored digest")
                result[name] = fetched
            else:
                result[name] = unwrap_compressed(value)
        return result
