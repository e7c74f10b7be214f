"""Where the CLI's token for a loopback API comes from when the local stack is gone."""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import pytest

import devstack.stack
from agent_state_cli import tokens
from devstack.servers import process_start
from devstack.stack import state_file


@pytest.fixture
def recorded_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state file `stack up` left in `tmp_path`, read by the token lookup instead of the
    checkout's own stack; no other token source set."""
    for name in ("AGENT_STATE_TOKEN", "AGENT_STATE_ISSUER", "AGENT_STATE_SCOPE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(
        devstack.stack, "status", functools.partial(devstack.stack.status, tmp_path)
    )
    return tmp_path


def record(workdir: Path, *, issuer_started: str) -> None:
    # This test's own pid stands for the issuer; its start time says whether it is that one.
    server = {"port": 9, "pid": os.getpid(), "started": issuer_started}
    state_file(workdir).write_text(
        json.dumps(
            {
                "workdir": str(workdir),
                "servers": {"issuer": server},
                "env": {"AUTH_ISSUER": "http://127.0.0.1:9"},
            }
        )
    )


def test_a_stack_that_is_gone_lends_no_issuer(recorded_stack: Path) -> None:
    """The state file outlived the stack (killed, rebooted): the call goes without a token
    and fails as a call to an API that is not there, not as the issuer's refusal."""
    record(recorded_stack, issuer_started="another boot:0")
    assert tokens.access_token("http://127.0.0.1:7071") is None


def test_a_running_stacks_issuer_is_asked(recorded_stack: Path) -> None:
    started = process_start(os.getpid())
    assert started is not None
    record(recorded_stack, issuer_started=started)
    with pytest.raises(tokens.TokenUnavailable, match=re.escape("http://127.0.0.1:9")):
        tokens.access_token("http://127.0.0.1:7071")


@pytest.mark.parametrize(
    "api", ["http://api.example.com", "http://10.0.0.4:7071", "HTTP://api.example.com"]
)
def test_a_token_never_travels_unencrypted_to_another_machine(
    recorded_stack: Path, monkeypatch: pytest.MonkeyPatch, api: str
) -> None:
    monkeypatch.setenv("AGENT_STATE_TOKEN", "secret")
    with pytest.raises(tokens.InsecureApi, match="https"):
        tokens.access_token(api)


@pytest.mark.parametrize(
    "api", ["https://api.example.com", "http://127.0.0.1:7071", "http://[::1]:7071"]
)
def test_a_token_goes_over_https_or_to_loopback(
    recorded_stack: Path, monkeypatch: pytest.MonkeyPatch, api: str
) -> None:
    monkeypatch.setenv("AGENT_STATE_TOKEN", "secret")
    assert tokens.access_token(api) == "secret"


def test_an_api_without_a_token_is_called_over_http(recorded_stack: Path) -> None:
    """Nothing to leak: the API answers 401 itself, saying what is missing."""
    assert tokens.access_token("http://api.example.com") is None
