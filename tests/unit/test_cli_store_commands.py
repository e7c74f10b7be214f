"""The commands that open the stores themselves (`write-behind`, `run-index`), run
in-process as a program or test runs them, with settings that name no cold store: they end
in one line saying where the settings come from, and leave the process's logging as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from agent_state_cli.cli import app

# The loggers the commands quiet while they run (the clients', the flusher's).
CHATTY_LOGGERS = ("azure", "psycopg", "state.checkpoint.flusher")

COMMANDS = [["write-behind", "stuck"], ["run-index", "repair"]]

# Cosmos named as the cold tier, but not where it is (whatever this process's env holds).
NO_ENDPOINT: dict[str, str | None] = {
    "COLUMNS": "200",
    "STATE_COLD_BACKEND": "cosmos",
    "COSMOS_ENDPOINT": None,
    "STATE_WRITE_MODE": "write-behind",
}


@pytest.fixture
def levels() -> Iterator[dict[str, int]]:
    """The chatty loggers at levels of the test's own, put back after it."""
    before = {name: logging.getLogger(name).level for name in CHATTY_LOGGERS}
    mine = {name: level for name, level in zip(CHATTY_LOGGERS, (0, 10, 30), strict=True)}
    for name, level in mine.items():
        logging.getLogger(name).setLevel(level)
    yield mine
    for name, level in before.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_missing_setting_says_where_the_settings_come_from(command: list[str]) -> None:
    """Found by review: the line named the missing setting only, not where the command
    reads settings from (this environment, not a local.settings file)."""
    result = CliRunner().invoke(app, command, env=NO_ENDPOINT)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith("STATE_COLD_BACKEND=cosmos needs COSMOS_ENDPOINT ("), line
    assert "this environment" in line, line
    assert "local.settings.sample.json" in line, line
    assert "`agent-state stack env` prints them as shell exports" in line, line


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_failed_command_gives_back_the_logger_levels(
    command: list[str], levels: dict[str, int]
) -> None:
    """Found by review: the command set the client loggers to ERROR for the whole process,
    so a program running it in-process lost their warnings for good."""
    result = CliRunner().invoke(app, command, env=NO_ENDPOINT)
    assert result.exit_code == 1, result.output
    assert {name: logging.getLogger(name).level for name in CHATTY_LOGGERS} == levels
