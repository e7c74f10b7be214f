"""What the commands that open the stores themselves (`write-behind`, `run-index`) share:
the app's settings from this environment, quiet clients, and a failure said in one line."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

errors = Console(stderr=True)

T = TypeVar("T")

# The clients log each failed connection attempt (azure-identity each credential it tried,
# for the client commands' token too), and the flusher closing with the stores warns when
# it leaves the backlog to another flusher (nothing lost): a failure is said once, in the
# command's own error.
CHATTY_LOGGERS = ("azure", "psycopg", "state.checkpoint.flusher")

SETTINGS_SOURCE = (
    "the app's settings are read from this environment, under the names in"
    " local.settings.sample.json; for the local stack `agent-state stack env` prints them as"
    " shell exports"
)


@contextmanager
def quiet_clients() -> Iterator[None]:
    """The chatty loggers at ERROR for the command only: a program running it in-process
    (a test's CliRunner) gets its own levels back, on an error too."""
    loggers = [logging.getLogger(name) for name in CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def run_on_stores(main: Callable[[], Coroutine[Any, Any, T]], *refused: type[Exception]) -> T:
    """`main()` run to its end; a `StateError` (or one of `refused`) ends the command in one
    line, a wrong or missing setting with where the settings come from."""
    # Imported here, not at the top: every `agent-state` command loads this module, and
    # the state library (with LangGraph) is most of a start-up's time.
    from state import SettingsError, StateError

    said: tuple[type[Exception], ...] = (StateError, *refused)
    with quiet_clients():
        try:
            return asyncio.run(main())
        except SettingsError as wrong:
            errors.print(f"[red]{escape(str(wrong))} ({SETTINGS_SOURCE})[/red]", soft_wrap=True)
            raise typer.Exit(1) from None
        except said as error:
            errors.print(f"[red]{escape(str(error))}[/red]", soft_wrap=True)
            raise typer.Exit(1) from None
