"""The CLI's client commands pointed at the wrong place, as a user meets them: each a real CLI
process against a real (if foreign) HTTP server on loopback; the answer is one line saying
what is wrong, never a traceback, a bare 404 or a misleading refusal."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from devstack import COSMOS_EMULATOR_KEY, free_port
from support_cases.models import IDEMPOTENCY_KEY_MAX_LENGTH

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHONPATH = os.pathsep.join(str(REPO_ROOT / part) for part in (".", "function_app", "scripts"))
CLI = [sys.executable, "-c", "from agent_state_cli.cli import main; main()"]
# A loopback address the CLI does not treat as the local stack's: it asks no issuer for a
# token there, as for a remote API.
FOREIGN_HOST = "127.0.0.2"
TOKEN_SOURCES = ("AGENT_STATE_TOKEN", "AGENT_STATE_ISSUER", "AGENT_STATE_SCOPE", "AGENT_STATE_API")


def agent_state(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in TOKEN_SOURCES}
    return subprocess.run(
        [*CLI, *args],
        env={**base, "PYTHONPATH": PYTHONPATH, "COLUMNS": "200", **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return " ".join(result.stderr.split())


@pytest.fixture
def foreign_api() -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    yield from _serving(FOREIGN_HOST)


@pytest.fixture
def loopback_api() -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    yield from _serving("127.0.0.1")


def _serving(host: str) -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    """A server that is not this API: it answers each request with the next (status, body)
    queued."""
    answers: list[tuple[int, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            status, body = answers.pop(0)
            self.send_response(status)
            # A web page where this API's JSON was expected, as another server would answer.
            page = body.startswith(b"<")
            self.send_header("content-type", "text/html" if page else "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_GET

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}", answers
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_an_api_without_a_scheme_is_not_a_url_even_with_a_token_set() -> None:
    """It said "refusing to send a bearer token to notaurl unencrypted"."""
    result = agent_state("show", "case_1", "--api", "localhost:7071", AGENT_STATE_TOKEN="t")
    error = one_line_error(result, 2)
    assert "'localhost:7071' is not a URL" in error and "http://127.0.0.1:7071" in error


def test_an_api_naming_the_api_prefix_is_told_its_root() -> None:
    """The CLI adds /api to every path: it said `404: Not Found`."""
    result = agent_state("show", "case_1", "--api", "http://127.0.0.1:7071/api/")
    error = one_line_error(result, 2)
    assert "names the /api prefix" in error and "use http://127.0.0.1:7071" in error


@pytest.mark.parametrize(
    ("command", "limit", "bound"),
    [
        ("checkpoints", "101", "less than or equal to 100"),
        ("audit", "0", "greater than or equal to 1"),
        ("audit", "501", "less than or equal to 500"),
    ],
)
def test_a_page_size_the_api_refuses_is_a_usage_error(command: str, limit: str, bound: str) -> None:
    result = agent_state(command, "case_1", "--limit", limit, "--api", "http://127.0.0.1:1")
    error = one_line_error(result, 2)
    assert "Invalid value for '--limit'" in error and bound in error


def test_a_negative_max_wait_of_resume_is_a_usage_error() -> None:
    """It was taken: the command resumed at once and, asked to wait, "gave up waiting after
    -5 s" without waiting."""
    result = agent_state(
        "resume", "case_1", "--max-wait", "-5", "--api", "http://127.0.0.1:1", AGENT_STATE_TOKEN="t"
    )
    error = one_line_error(result, 2)
    assert "Invalid value for '--max-wait'" in error and "greater than or equal to 0" in error


def test_health_without_a_token_to_be_had_asks_the_api_without_one(
    loopback_api: tuple[str, list[tuple[int, bytes]]],
) -> None:
    """`/api/health` needs no token, yet the stack's issuer out of reach ended `health` with
    "no access token" (exit 2), not the API's report."""
    api, answers = loopback_api
    answers.append((200, json.dumps({"status": "ok", "tiers": None}).encode()))
    result = agent_state("health", "--api", api, AGENT_STATE_ISSUER="http://127.0.0.1:1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "overall: ok (tier details need Cases.Operate)" in result.stdout
    assert "no access token" in result.stderr and "without one" in result.stderr


def test_a_json_answer_that_is_not_an_object_is_named(
    foreign_api: tuple[str, list[tuple[int, bytes]]],
) -> None:
    """Every answer of this API is an object: a list (another service) raised AttributeError."""
    api, answers = foreign_api
    answers.append((200, json.dumps([1, 2]).encode()))
    error = one_line_error(agent_state("show", "case_1", "--api", api), 1)
    assert "answered a JSON list, not this API's answer" in error and "--api" in error


CLIENT_COMMANDS = [
    ["show", "case_1"],
    ["show", "case_1", "--json"],
    ["submit", "--demo"],
    ["checkpoints", "case_1"],
    ["audit", "case_1", "--json"],
    ["review", "case_1", "approve"],
    ["resume", "case_1"],
    ["health"],
    ["health", "--json"],
    ["reply", "case_1", "hi"],
    ["runs", "case_1"],
    ["follow", "case_1"],
]


@pytest.mark.parametrize("command", CLIENT_COMMANDS, ids=" ".join)
def test_a_web_page_answered_with_200_is_named_not_a_traceback(
    foreign_api: tuple[str, list[tuple[int, bytes]]], command: list[str]
) -> None:
    """--api naming another web server: every command raised KeyError (a traceback), and
    `--json` printed `{"error": "<html>..."}` with exit 0, as if the call had succeeded."""
    api, answers = foreign_api
    answers.append((200, b"<html>Welcome to nginx!</html>"))
    result = agent_state(*command, "--api", api)
    error = one_line_error(result, 1)
    assert result.stdout == ""
    assert "answered text/html, not this API's answer (is --api this API's URL?)" in error


@pytest.mark.parametrize("command", CLIENT_COMMANDS, ids=" ".join)
def test_a_json_object_of_another_service_is_named_not_a_traceback(
    foreign_api: tuple[str, list[tuple[int, bytes]]], command: list[str]
) -> None:
    """Another JSON service's object (here one this API never sends): KeyError before."""
    api, answers = foreign_api
    answers.append((200, json.dumps({"name": "another service"}).encode()))
    result = agent_state(*command, "--api", api)
    error = one_line_error(result, 1)
    assert result.stdout == ""
    assert "answered a JSON object without '" in error and "(is --api this API's URL?)" in error


def test_an_empty_200_answer_is_named_not_printed_as_success(
    foreign_api: tuple[str, list[tuple[int, bytes]]],
) -> None:
    """`show --json` printed `{}` with exit 0 (without `--json`: a KeyError)."""
    api, answers = foreign_api
    answers.append((200, b""))
    result = agent_state("show", "case_1", "--json", "--api", api)
    error = one_line_error(result, 1)
    assert result.stdout == ""
    assert error == (
        f"200: {api}/api/cases/case_1 answered nothing, not this API's answer"
        " (is --api this API's URL?)"
    )


@pytest.mark.parametrize("port", ["99999", "65536", "0"])
def test_an_api_port_that_is_no_port_is_not_a_url(port: str) -> None:
    """Port 99999 was taken as given: the command said "Connection refused" (exit 2) as if
    the API were merely down. So was port 0, which urlsplit's range lets through."""
    result = agent_state("show", "case_1", "--api", f"http://127.0.0.1:{port}")
    error = one_line_error(result, 2)
    assert f"'http://127.0.0.1:{port}' is not a URL" in error
    assert "cannot reach" not in error


@pytest.fixture
def no_http_server() -> Iterator[str]:
    """A loopback server that answers every connection with a line that is no HTTP."""
    with socket.create_server(("127.0.0.1", 0)) as server:

        def answer() -> None:
            while True:
                try:
                    client, _ = server.accept()
                except OSError:
                    return  # closed at the end of the test
                with client:
                    client.sendall(b"not http\r\n")

        threading.Thread(target=answer, daemon=True).start()
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.mark.parametrize("case", ["a port that is no number", "a server that is no HTTP"])
def test_an_issuer_that_gives_no_token_is_named_not_a_traceback(
    case: str, no_http_server: str
) -> None:
    """AGENT_STATE_ISSUER with a port that is no number, or naming a server that answers no
    HTTP, ended the command with http.client's InvalidURL or BadStatusLine traceback."""
    issuer = "http://127.0.0.1:x" if case == "a port that is no number" else no_http_server
    result = agent_state("show", "case_1", "--api", "http://127.0.0.1:1", AGENT_STATE_ISSUER=issuer)
    assert f"the local issuer {issuer} gave no token" in one_line_error(result, 2)


@pytest.mark.parametrize("body", [b"[]", b'"token"', b"null"], ids=["list", "string", "null"])
def test_an_issuer_answering_json_that_is_no_object_is_named_not_a_traceback(
    body: bytes, loopback_api: tuple[str, list[tuple[int, bytes]]]
) -> None:
    """An AGENT_STATE_ISSUER naming another service that answers 200 with JSON that is no
    object (so has no `access_token`) ended the command with a TypeError traceback."""
    issuer, answers = loopback_api
    answers.append((200, body))
    result = agent_state("show", "case_1", "--api", "http://127.0.0.1:1", AGENT_STATE_ISSUER=issuer)
    assert f"the local issuer {issuer} gave no token" in one_line_error(result, 2)


def test_no_azure_credential_for_the_scope_is_said_once() -> None:
    """azure-identity's logger printed its report of every credential tried (a dozen lines)
    before the command's own error repeated it whole."""
    result = agent_state(
        "show",
        "case_1",
        "--api",
        f"https://{FOREIGN_HOST}:{free_port()}",
        AGENT_STATE_SCOPE="api://agent-state-test/.default",
        # One credential tried, which finds nothing here: no managed identity probe, no az.
        AZURE_TOKEN_CREDENTIALS="EnvironmentCredential",
        AZURE_CLIENT_ID="",
        AZURE_TENANT_ID="",
    )
    one_line_error(result, 2)
    assert result.stderr.startswith(
        "no access token: azure-identity found no credential for api://agent-state-test/.default"
    ), result.stderr
    assert result.stderr.count("EnvironmentCredential authentication unavailable") == 1, (
        result.stderr
    )


@pytest.mark.parametrize(
    "token", ["eyJ0eXAi…", "eyJ0eXAi\neyJhbGci"], ids=["non-ascii", "two-lines"]
)
def test_a_token_that_is_no_bearer_token_is_named_without_calling(
    loopback_api: tuple[str, list[tuple[int, bytes]]], token: str
) -> None:
    """A token pasted with a character outside ASCII ended the command in httpx's
    UnicodeEncodeError traceback; one with a line break in it said "cannot reach" the API."""
    api, _ = loopback_api  # answers nothing: the command must not call
    result = agent_state("show", "case_1", "--api", api, AGENT_STATE_TOKEN=token)
    error = one_line_error(result, 2)
    assert error.startswith("no access token: AGENT_STATE_TOKEN is not a bearer token"), error
    assert token not in result.stderr  # a secret, not echoed


def test_a_token_read_from_a_file_with_its_line_end_is_sent_without_it(
    loopback_api: tuple[str, list[tuple[int, bytes]]],
) -> None:
    api, answers = loopback_api
    answers.append((200, json.dumps({"status": "ok", "tiers": None}).encode()))
    result = agent_state("health", "--api", api, AGENT_STATE_TOKEN="eyJ0eXAi.x-y_z~+/==\n")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "overall: ok" in result.stdout


@pytest.mark.parametrize("command", [["submit", "--demo"], ["reply", "case_1", "hi"]], ids=" ".join)
@pytest.mark.parametrize("key", ["clé-1", "key\n2"], ids=["non-ascii", "two-lines"])
def test_an_idempotency_key_no_header_can_carry_is_a_usage_error(
    loopback_api: tuple[str, list[tuple[int, bytes]]], command: list[str], key: str
) -> None:
    """A key outside ASCII ended the command in httpx's UnicodeEncodeError traceback; one
    with a line break in it said "cannot reach" the API."""
    api, _ = loopback_api  # answers nothing: the command must not call
    result = agent_state(*command, "--idempotency-key", key, "--api", api, AGENT_STATE_TOKEN="t")
    error = one_line_error(result, 2)
    assert (
        "Invalid value for '--idempotency-key'" in error and "cannot be sent as a header" in error
    )


@pytest.mark.parametrize("command", [["submit", "--demo"], ["reply", "case_1", "hi"]], ids=" ".join)
def test_an_idempotency_key_longer_than_the_api_takes_is_a_usage_error(
    loopback_api: tuple[str, list[tuple[int, bytes]]], command: list[str]
) -> None:
    """Found by review: a key over the API's bound was sent, after a token was fetched, and
    refused there (422); the bound is the API's own."""
    api, answers = loopback_api
    answers.append((503, json.dumps({"error": "asked"}).encode()))
    key = "k" * (IDEMPOTENCY_KEY_MAX_LENGTH + 1)
    result = agent_state(*command, "--idempotency-key", key, "--api", api, AGENT_STATE_TOKEN="t")
    error = one_line_error(result, 2)
    assert "Invalid value for '--idempotency-key'" in error, error
    assert f"the API takes at most {IDEMPOTENCY_KEY_MAX_LENGTH}" in error, error
    assert answers, "the API was called"
    # The longest key the API takes is sent: the server is asked (and answers 503).
    result = agent_state(
        *command, "--idempotency-key", key[1:], "--api", api, AGENT_STATE_TOKEN="t"
    )
    assert "asked" in one_line_error(result, 1) and not answers


def test_a_401_to_a_call_without_a_token_says_where_tokens_come_from(
    foreign_api: tuple[str, list[tuple[int, bytes]]],
) -> None:
    """An API served from another workdir than the CLI's stack: the CLI found no issuer and
    printed the API's `401: missing bearer token` alone."""
    api, answers = foreign_api
    answers.append((401, json.dumps({"error": "missing bearer token"}).encode()))
    error = one_line_error(agent_state("show", "case_1", "--api", api), 1)
    assert error.startswith("401: missing bearer token (no token was sent")
    assert "AGENT_STATE_ISSUER" in error and "agent-state stack status" in error


def test_a_401_to_a_call_with_a_token_is_printed_as_the_api_says(
    loopback_api: tuple[str, list[tuple[int, bytes]]],
) -> None:
    api, answers = loopback_api
    answers.append((401, json.dumps({"error": "token expired"}).encode()))
    error = one_line_error(agent_state("show", "case_1", "--api", api, AGENT_STATE_TOKEN="t"), 1)
    assert error == "401: token expired"


def test_an_empty_error_answer_names_what_answered_it(
    foreign_api: tuple[str, list[tuple[int, bytes]]],
) -> None:
    """A proxy's or another server's bare 404: the CLI printed `404: ` and nothing more."""
    api, answers = foreign_api
    answers.append((404, b""))
    error = one_line_error(agent_state("show", "case_1", "--api", api), 1)
    assert error == f"404: Not Found (an empty answer from {api}/api/cases/case_1)"


def test_write_behind_with_its_stores_unreachable_prints_one_line(tmp_path: Path) -> None:
    """The Cosmos client logged "Marking ... unavailable" (psycopg's pool: "error connecting",
    once per attempt) before the command's own error."""
    closed = free_port()
    result = agent_state(
        "write-behind",
        "stuck",
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        COSMOS_ENDPOINT=f"https://127.0.0.1:{closed}/",
        COSMOS_KEY=COSMOS_EMULATOR_KEY,
        STATE_COLD_BACKEND="cosmos",
        STATE_WRITE_MODE="write-behind",
    )
    error = one_line_error(result, 1)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert error.startswith("cosmos unavailable") or error.startswith("redis unavailable")
