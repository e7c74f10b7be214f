"""The reliability report: each fault scenario's counts, written to docs/RELIABILITY.md.

Tests record what they injected and what they counted; the outcome (pass /
fail / known bug) comes from pytest's own verdict on the test. The document is
written at session end only when every scenario in `SCENARIOS` produced a row,
so a partial run (`-k`, one module, an early crash) never clobbers it. Rows are
sorted by scenario name and the only varying text is the date.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
REPORT_PATH = REPO_ROOT / "docs" / "RELIABILITY.md"

# Every scenario the suite reports on; a test records under exactly one of these names.
SCENARIOS: tuple[str, ...] = (
    "Writer killed between its cold write and its hot update (cosmos)",
    "Writer killed between its cold write and its hot update (postgres)",
    "HTTP API fuzzed from its OpenAPI schema",
    "Schema drift N -> N+1 (cosmos)",
    "Schema drift N -> N+1 (postgres)",
    "Retention: Redis TTL (cosmos)",
    "Retention: Redis TTL (postgres)",
    "Retention: Cosmos sweep, case awaiting review exempt",
    "Retention: Postgres sweep, case awaiting review exempt",
    "State of 1.9 MB round trip",
    "State of 2 MB round trip",
    "State of 2.1 MB round trip",
    "State of 10 MB round trip",
    "Network cut to redis (reset)",
    "Network cut to redis (blackhole)",
    "Redis frozen mid-run (write-through)",
    "Redis frozen mid-run (write-behind)",
    "Network cut to postgres (reset)",
    "Postgres answering nothing",
    "Postgres restarted mid-workflow",
    "Cosmos 429 throttling (x-ms-retry-after-ms)",
    "Cosmos 503 service unavailable",
    "Cosmos timeout before the request was sent",
    "Cosmos timeout after a write was applied (unknown outcome)",
    "Cosmos connection dropped after a write was applied (unknown outcome)",
    "Redis kill mid-workflow",
    "Redis flushall mid-workflow",
    "Redis eviction mid-workflow",
    "Process killed mid-node (durability=sync)",
    "Process killed mid-node (durability=async)",
    "Process killed mid-node (durability=exit)",
    "Lock holder paused past its TTL (cosmos)",
    "Lock holder paused past its TTL (postgres)",
    *(
        f"Runner paused past its TTL writes a late checkpoint ({backend}, {mode})"
        for backend in ("cosmos", "postgres")
        for mode in ("write-through", "write-behind")
    ),
    "Two workers write one record at the same version (cosmos)",
    "Two workers write one record at the same version (postgres)",
    "Two workers decide the same review at once (cosmos, with the Redis run lock)",
    "Two workers decide the same review at once (cosmos, cold store only)",
    "Two workers decide the same review at once (postgres, with the Redis run lock)",
    "Two workers decide the same review at once (postgres, cold store only)",
    *(
        f"Two workers resume the same stalled case at once ({backend}, {against}, {tier})"
        for backend in ("cosmos", "postgres")
        for against in ("resume vs resume", "resume vs the timer's resume_stale")
        for tier in ("with the Redis run lock", "cold store only")
    ),
    "Network cut to cosmos (reset)",
    "Cosmos answering nothing",
    "Write-behind flusher SIGKILLed mid-drain (cosmos)",
    "Write-behind flusher SIGKILLed mid-drain (postgres)",
    "Write-behind flusher paused inside a batch past its lock, thread deleted (cosmos)",
    "Write-behind flusher paused inside a batch past its lock, thread deleted (postgres)",
    "Cold store (postgres) down for 10 s while write-behind runs continue",
    "Review decision naming someone else than the token's caller",
    "Workers SIGKILLed while runs are queued (cosmos)",
    "Workers SIGKILLed while runs are queued (postgres)",
    "SSE stream across an API restart",
)


@dataclass
class ScenarioRow:
    scenario: str
    injected: str
    runs: int
    lost_writes: int
    silent_overwrites: int
    observed: str
    verdict: str = "did not finish"


@dataclass
class ReliabilityReport:
    expected: tuple[str, ...] = SCENARIOS
    rows: dict[str, ScenarioRow] = field(default_factory=dict)
    # nodeid -> scenarios it recorded, to attach pytest's verdict afterwards.
    by_test: dict[str, list[str]] = field(default_factory=dict)

    def record(self, nodeid: str, row: ScenarioRow) -> None:
        self.add(row)
        self.by_test.setdefault(nodeid, []).append(row.scenario)

    def add(self, row: ScenarioRow) -> None:
        """A row as recorded (by a test here, or with its verdict by another process)."""
        if row.scenario not in self.expected:
            raise KeyError(f"unknown scenario {row.scenario!r}: add it to report.SCENARIOS")
        if row.scenario in self.rows:
            raise KeyError(f"scenario {row.scenario!r} recorded twice")
        self.rows[row.scenario] = row

    def verdict(self, nodeid: str, verdict: str) -> None:
        for scenario in self.by_test.get(nodeid, []):
            self.rows[scenario].verdict = verdict

    def missing(self) -> list[str]:
        return [name for name in self.expected if name not in self.rows]

    def render(self, today: str) -> str:
        lines = [
            "# Reliability",
            "",
            f"Generated by the fault suite (`pytest tests/faults`) on {today}; do not edit by hand.",
            "Every scenario ran against real servers on loopback (Redis, Postgres, the Cosmos",
            "emulator) started and stopped by the test itself. A *lost write* is an acknowledged",
            "write missing afterwards; a *silent overwrite* is a write that replaced another",
            "without either writer being told (no typed error).",
            "",
            "| Scenario | Injected | Runs | Lost writes | Silent overwrites | Outcome |",
            "| --- | --- | ---: | ---: | ---: | --- |",
        ]
        for name in sorted(self.rows):
            row = self.rows[name]
            cells = [
                row.scenario,
                row.injected,
                str(row.runs),
                str(row.lost_writes),
                str(row.silent_overwrites),
                f"{row.verdict}: {row.observed}",
            ]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        lines.append("")
        return "\n".join(lines)

    def write(self, path: Path = REPORT_PATH, today: str | None = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.render(today or datetime.now(UTC).date().isoformat()))
        return path
