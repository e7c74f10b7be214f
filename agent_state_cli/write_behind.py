"""`agent-state write-behind`: the entries the cold store refuses for good, and their discard.

    agent-state write-behind stuck                      list them, one per thread
    agent-state write-behind discard THREAD ENTRY       drop one (and what depends on it)

Unlike the client commands these open the stores themselves, with the app's settings from
this environment (the same names as `local.settings.sample.json`): run them where the app's
settings and network reach Redis and the cold tier.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .stores import run_on_stores

if TYPE_CHECKING:
    from state import EntryStuck, Flusher
    from state.ports import LogEntry, StuckEntry

write_behind_app = typer.Typer(
    help="Write-behind entries the cold store refuses for good (stuck threads).",
    no_args_is_help=True,
)
console = Console()
errors = Console(stderr=True)

T = TypeVar("T")


def _with_flusher(work: Callable[[Flusher], Awaitable[T]]) -> T:
    """`work` on the write-behind flusher of the stores this environment's settings name."""
    # Imported here, not at the top: every `agent-state` command loads this module, and
    # the state library (with LangGraph) is most of a start-up's time.
    from state import open_backends
    from support_cases.settings import AppSettings

    async def run() -> T:
        backends = await open_backends(AppSettings())
        try:
            if backends.flusher is None:
                raise typer.BadParameter("the app is not in write-behind mode: nothing is logged")
            return await work(backends.flusher)
        finally:
            await backends.close()

    return run_on_stores(run)


@write_behind_app.command("stuck")
def stuck(
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")] = False,
) -> None:
    """The stuck entries, oldest first: each holds back its thread's later entries."""
    found: list[StuckEntry] = _with_flusher(lambda flusher: flusher.stuck())
    if as_json:
        console.print_json(json.dumps([asdict(entry) for entry in found]))
        return
    if not found:
        console.print("no stuck write-behind entries")
        return
    table = Table("thread", "entry", "checkpoint", "kind", "stuck since", "reason")
    for entry in found:
        since = datetime.fromtimestamp(entry.since, UTC).isoformat(timespec="seconds")
        table.add_row(
            escape(entry.thread_id),
            entry.entry_id,
            entry.checkpoint_id,
            entry.kind,
            since,
            escape(entry.reason),
        )
    console.print(table)


@write_behind_app.command("discard")
def discard(
    thread_id: Annotated[str, typer.Argument(help="The stuck entry's thread id.")],
    entry_id: Annotated[str, typer.Argument(help="The stuck entry's id (see `stuck`).")],
    yes: Annotated[bool, typer.Option("--yes", help="Discard without asking.")] = False,
) -> None:
    """Drop a stuck entry and the later entries that depend on it; flush the rest.

    Dependents are the thread's later entries that refer to a checkpoint dropped with it
    (a put on it, writes to it). What is dropped is lost: the run goes on from the
    thread's last stored checkpoint. A run appending meanwhile goes on: a step of it on a
    discarded checkpoint is discarded too, or finds its parent gone and resumes from there."""
    if not yes:
        typer.confirm(
            f"Discard write-behind entry {entry_id} of {thread_id!r} and the entries that"
            " depend on it? They will never reach the cold tier",
            abort=True,
        )

    from state import EntryStuck
    from state.checkpoint.flusher import described

    async def work(flusher: Flusher) -> tuple[list[LogEntry], EntryStuck | None]:
        dropped = await flusher.discard_stuck(thread_id, entry_id)
        try:
            await flusher.flush_thread(thread_id)
        except EntryStuck as next_stuck:
            return dropped, next_stuck
        return dropped, None

    dropped, next_stuck = _with_flusher(work)
    console.print(f"discarded {len(dropped)} write-behind entries of {escape(thread_id)!r}:")
    for entry in dropped:
        console.print(f"  {escape(described(entry))}")
    if len(dropped) > 1:
        console.print(
            f"{len(dropped) - 1} later entries referred to a discarded checkpoint (a put on it,"
            " writes to it) and were discarded with it: the cold tier never holds a reference"
            " to a checkpoint it does not have."
        )
    if next_stuck is not None:
        errors.print(f"[red]{escape(str(next_stuck))}[/red]", soft_wrap=True)
        raise typer.Exit(1)
    console.print("the thread's other entries are in the cold tier")
