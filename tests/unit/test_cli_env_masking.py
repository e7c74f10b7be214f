"""The settings `agent-state stack up` / `serve` print for a stack show no password, in
whichever form a connection string is written (a URL, or libpq's key=value pairs)."""

from __future__ import annotations

import pytest

from agent_state_cli.cli import _print_env


@pytest.mark.parametrize(
    ("written", "shown"),
    [
        ("postgresql://app:hunter2@127.0.0.1:5440/db", "postgresql://app:***@127.0.0.1:5440/db"),
        ("host=127.0.0.1 password=hunter2 dbname=db", "host=127.0.0.1 password=*** dbname=db"),
        (
            "host=127.0.0.1 password = 'hun ter\\'2' dbname=db",
            "host=127.0.0.1 password = *** dbname=db",
        ),
        (
            "postgresql://app@127.0.0.1/db?password=hunter2&sslmode=disable",
            "postgresql://app@127.0.0.1/db?password=***&sslmode=disable",
        ),
        ("host=127.0.0.1 dbname=db", "host=127.0.0.1 dbname=db"),
        # libpq reads `hun\ ter2` as one value, escaped space and all.
        ("host=127.0.0.1 password=hun\\ ter2 dbname=db", "host=127.0.0.1 password=*** dbname=db"),
        # The client key's passphrase, in either form.
        (
            "host=127.0.0.1 sslpassword=hunter2 dbname=db",
            "host=127.0.0.1 sslpassword=*** dbname=db",
        ),
        (
            "postgresql://app@127.0.0.1/db?sslmode=require&sslpassword=hunter2",
            "postgresql://app@127.0.0.1/db?sslmode=require&sslpassword=***",
        ),
        # Not a keyword libpq knows (it refuses the string), but a password all the same.
        ("host=127.0.0.1 PASSWORD=hunter2", "host=127.0.0.1 PASSWORD=***"),
        (
            "postgresql://app:hunter2@127.0.0.1/db?password=hunter2",
            "postgresql://app:***@127.0.0.1/db?password=***",
        ),
    ],
)
def test_a_connection_strings_password_is_masked_in_either_form(
    written: str, shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _print_env({"env": {"POSTGRES_URL": written}})
    printed = capsys.readouterr().out
    assert f"POSTGRES_URL={shown}" in printed
    assert "ter2" not in printed and "ter\\'2" not in printed
