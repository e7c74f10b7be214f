"""`agent-state run-index repair`: rebuild the timer's run index from the case records.

    agent-state run-index repair [SHARD...]    every shard, or those named (id or number)

A shard whose stored record is unreadable (the timer logs it damaged, `/api/health` names
it) hides its stalled cases from the timer and pauses retention for good: the repair
rewrites it with every case whose record has a run running, stalled, paused or queued.
Like `write-behind`, it opens the stores itself, with the app's settings from this
environment: run it where they reach Redis and the cold tier. Workers may run meanwhile.
A shard that cannot be repaired, or a case record that cannot be read, is printed and the
others repaired all the same; the exit status is then 1 (run it again once that is fixed).
While it reads the records, it says how far it got on stderr every 5 s (`--progress-every`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from .stores import run_on_stores

if TYPE_CHECKING:
    from support_cases.runs import RepairProgress, ShardRepair

run_index_app = typer.Typer(
    help="The timer's index of active cases (8 shard records).", no_args_is_help=True
)
console = Console()
errors = Console(stderr=True)


def _shard_id(name: str) -> str:
    from support_cases.runs import INDEX_IDS, INDEX_PREFIX

    shard_id = f"{INDEX_PREFIX}{name}" if name.isdigit() else name
    if shard_id not in INDEX_IDS:
        raise typer.BadParameter(f"{name!r} is no shard: 0 to {len(INDEX_IDS) - 1}, or its id")
    return shard_id


def _progress_printer(every: float) -> Callable[[RepairProgress], None]:
    """A line on stderr at most every `every` seconds: the records are read one by one
    before any shard is written, and a large store would look hung meanwhile."""
    last = time.monotonic()

    def report(progress: RepairProgress) -> None:
        nonlocal last
        if time.monotonic() - last < every:
            return
        last = time.monotonic()
        errors.print(
            f"read {progress.examined} of {progress.total} records: {progress.active} cases"
            f" with work found, {progress.unread} unreadable",
            soft_wrap=True,
            highlight=False,
        )

    return report


@run_index_app.command("repair")
def repair(
    shards: Annotated[
        list[str] | None,
        typer.Argument(help="Shards to rebuild (number or id); default: every one."),
    ] = None,
    progress_every: Annotated[
        float,
        typer.Option(help="Seconds between progress lines (on stderr) while it reads.", min=0),
    ] = 5.0,
) -> None:
    """Rebuild shards from the case records (a query across every thread).

    A damaged shard is rewritten whole; a readable one only gets the cases it misses. Safe
    to run again, and while workers run. The timer's next tick resumes the stalled cases
    and sweeps again."""
    # Imported here, not at the top: every `agent-state` command loads this module, and
    # the state library (with LangGraph) is most of a start-up's time.
    from state import TieredStateStore, open_backends
    from support_cases.runs import INDEX_IDS, RunIndexBusy, RunTracker
    from support_cases.settings import AppSettings

    wanted = [_shard_id(name) for name in shards] if shards else list(INDEX_IDS)

    async def run() -> list[ShardRepair]:
        settings = AppSettings()
        backends = await open_backends(settings)
        try:
            tracker = RunTracker(
                TieredStateStore.from_backends(backends), backends.retention, settings
            )
            return await tracker.repair_index(
                backends.cold, wanted, _progress_printer(progress_every)
            )
        finally:
            await backends.close()

    done = run_on_stores(run, RunIndexBusy)
    for shard in done:
        cases = ", ".join(escape(case_id) for case_id in shard.indexed)
        listed = f": {cases}" if cases else ""
        if shard.failed is not None:
            # Said once when the damage is what stopped the repair (a newer schema).
            damaged = shard.damaged not in (None, shard.failed)
            state = f"; damaged ({escape(shard.damaged or '')})" if damaged else ""
            before = f"; {len(shard.indexed)} missing cases indexed before{listed}" if cases else ""
            errors.print(
                f"[red]{shard.shard}: not repaired: {escape(shard.failed)}{state}{before}[/red]",
                soft_wrap=True,
            )
        elif shard.merged:
            console.print(
                f"{shard.shard}: damaged ({escape(shard.damaged or '')}); rebuilt meanwhile by"
                f" another repair, merged into: {len(shard.indexed)} missing cases indexed"
                f"{listed}",
                soft_wrap=True,
            )
        elif shard.damaged is not None:
            console.print(
                f"{shard.shard}: damaged ({escape(shard.damaged)}); rebuilt with"
                f" {len(shard.indexed)} cases{listed}",
                soft_wrap=True,
            )
        else:
            console.print(
                f"{shard.shard}: readable; {len(shard.indexed)} missing cases indexed{listed}",
                soft_wrap=True,
            )
        for case_id, why in shard.unread.items():
            errors.print(
                f"[red]{shard.shard}: case {escape(case_id)} not looked at (not indexed): its"
                f" record could not be read: {escape(why)}[/red]",
                soft_wrap=True,
            )
    if any(shard.failed is not None or shard.unread for shard in done):
        # Every shard was tried: what failed is said above, and a run again retries it.
        raise typer.Exit(1)
