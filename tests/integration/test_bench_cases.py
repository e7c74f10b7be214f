"""The load benchmark (`benchmarks/bench_cases.py`) in a tiny run on the session stack.

Real API worker processes on Postgres + Redis in write-behind mode: every case must
pass the benchmark's own verification, and the counted cases must show the store
work they caused (a counting that read zero would report a free case).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_cases.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_cases", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


async def test_quick_run_verifies_every_case_and_counts_its_store_work(
    bench: ModuleType, stack_env: dict[str, str], tmp_path: Path
) -> None:
    options = bench.Options(
        cases=2,
        counted=3,
        in_flight=2,
        processes=2,
        backends=["postgres"],
        modes=["write-behind"],
    )
    [result] = await bench.run(stack_env, options, tmp_path)

    assert result.misses == []
    phases = {phase.name: phase for phase in result.phases}
    assert set(phases) == {"counted", "baseline", "concurrent", "scale-out"}
    assert (phases["concurrent"].processes, phases["concurrent"].in_flight) == (1, 2)
    assert (phases["scale-out"].processes, phases["scale-out"].in_flight) == (2, 2)
    for phase in phases.values():
        assert not phase.errors()
        assert len(phase.latencies()) == len(phase.cases)
    for name in ("concurrent", "scale-out"):
        # What the phase's workers sent, and the CPU they used doing it.
        assert bench.phase_cold(phases[name]) > 0
        assert phases[name].cpu["API workers"] > 0
    counted = phases["counted"].cases
    assert [run.review for run in counted] == [False, False, True]
    for run in counted:
        assert run.counts["postgres.statements"] > 0
        # Each case performs a refund and a reset link: the provider's ledger is apart.
        assert run.counts["provider.postgres.statements"] > 0
        assert run.redis_commands > 0
        assert run.cold_bytes > 0 and run.hot_bytes > 0
    report = bench.render_cases([result], options, 1.0)
    assert "| postgres + Redis, write-behind | counted |" in report
    assert "Misses:" not in report


class Request:
    def __init__(self, method: str, url: str, **headers: str) -> None:
        self.method, self.url, self.headers = method, url, headers


@pytest.mark.parametrize(
    ("request_", "kind"),
    [
        (Request("GET", "https://h/dbs/d/colls/c/docs/wf"), "read"),
        (Request("POST", "https://h/dbs/d/colls/c/docs", **{"x-ms-documentdb-isquery": "True"}), "query"),
        (Request("POST", "https://h/dbs/d/colls/c/docs", **{"x-ms-documentdb-is-upsert": "True"}), "upsert"),
        (Request("POST", "https://h/dbs/d/colls/c/docs"), "create"),
        (Request("PUT", "https://h/dbs/d/colls/c/docs/wf"), "replace"),
        (Request("PATCH", "https://h/dbs/d/colls/c/docs/wf"), "patch"),
        (Request("DELETE", "https://h/dbs/d/colls/c/docs/wf"), "delete"),
        (Request("GET", "https://h/dbs/d/colls/c"), "meta"),
    ],
)  # fmt: skip
def test_cosmos_requests_are_told_apart(request_: Any, kind: str) -> None:
    sys.path.insert(0, str(BENCH.parent))
    try:
        from cases_worker import cosmos_kind
    finally:
        sys.path.remove(str(BENCH.parent))
    assert cosmos_kind(request_) == kind


def test_estimated_request_charge(bench: ModuleType) -> None:
    counts = {"cosmos.read": 2, "cosmos.query": 1, "cosmos.create": 2, "cosmos.bytes_written": 1024}
    # Two reads, one query, two writes of at least a KB each.
    assert bench.estimated_ru(counts) == pytest.approx(2 * 1.0 + 3.0 + 2 * 5.5)
    assert bench.cold_requests(counts) == 5
    assert bench.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert bench.percentile([], 50) is None
