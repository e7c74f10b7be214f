"""`agent-state`: run the local stack and API, submit cases, read them back, decide reviews, reply.

    agent-state stack up|down|status       the local Redis + Cosmos emulator (+ Postgres)
    agent-state stack env                  its settings as `export` lines: eval "$(...)"
    agent-state serve                      stack up (if needed) + the API on 127.0.0.1:7071
    agent-state submit --demo              submit case_8842
    agent-state show CASE | checkpoints CASE | audit CASE
    agent-state review CASE approve|reject [--note TEXT]
    agent-state resume CASE [--no-wait] | health
    agent-state reply CASE TEXT [--strategy reject|enqueue|interrupt|rollback]
    agent-state runs CASE                  the case's runs: intake, then one per reply
    agent-state follow CASE                its progress as it happens, until it rests
    agent-state write-behind stuck | discard THREAD ENTRY [--yes]
                                           entries the cold store refuses for good
    agent-state run-index repair [SHARD...]  rebuild the timer's run index from the cases

Every client command takes `--api URL` (default $AGENT_STATE_API or
http://127.0.0.1:7071) and `--json` for the raw JSON answer. It calls with an
access token (see `tokens.py`): $AGENT_STATE_TOKEN, else one from the local
stack's issuer for a loopback API, else azure-identity for $AGENT_STATE_SCOPE.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn
from urllib.parse import urlsplit

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from support_cases.demo import demo_case
from support_cases.models import (
    AUDIT_PAGE_MAX,
    CASE_ID_PATTERN,
    HISTORY_PAGE_MAX,
    IDEMPOTENCY_KEY_MAX_LENGTH,
    FollowUpStrategy,
)

from .run_index import run_index_app
from .tokens import InsecureApi, TokenUnavailable, access_token
from .write_behind import write_behind_app

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from devstack import PortInUse, StateFileUnreadable
    from support_cases.runtime import RuntimeHolder

DEFAULT_API = "http://127.0.0.1:7071"
DEFAULT_PORT = 7071
# A libpq key=value string's password, or sslpassword (its client key's): its value
# unquoted (up to a space) or quoted ('...'), a backslash escaping the next character in
# both (`a\ b` is one value). Any case: libpq refuses `PASSWORD=`, but it was meant.
_CONNINFO_PASSWORD = re.compile(
    r"(\b(?:ssl)?password\s*=\s*)('(?:[^'\\]|\\.)*'|(?:[^\s\\]|\\.)+)", re.IGNORECASE
)
# libpq reads a password from a URL's query as well (`?password=...`).
_QUERY_PASSWORD = re.compile(r"((?:^|&)(?:ssl)?password=)[^&]*", re.IGNORECASE)

app = typer.Typer(help=__doc__.splitlines()[0], no_args_is_help=True, add_completion=False)
stack_app = typer.Typer(help="Start, stop or inspect the local stack.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
app.add_typer(write_behind_app, name="write-behind")
app.add_typer(run_index_app, name="run-index")
console = Console()
# Notices and errors go to stderr, so `--json` leaves stdout parseable.
errors = Console(stderr=True)


def _checked_api(api: str) -> str:
    """A URL that does not parse (`http://[::1`, a port over 65535 or 0), lacks a scheme or
    host (`localhost:7071`), or names the `/api` prefix the CLI adds itself is a usage error,
    not a traceback, a token refusal, a bare 404 or a misleading "connection refused"."""
    try:
        httpx.URL(api)
        where = urlsplit(api)
        host = where.hostname
        # Raises on a port over 65535, which httpx takes as given.
        port = where.port
    except (httpx.InvalidURL, ValueError) as error:
        raise typer.BadParameter(f"{api!r} is not a URL: {error}") from error
    if port == 0:  # urlsplit's range takes it, yet no server listens there
        raise typer.BadParameter(f"{api!r} is not a URL: port 0 is no server's port")
    if where.scheme not in ("http", "https") or not host:
        raise typer.BadParameter(
            f"{api!r} is not a URL: give its scheme and host, e.g. {DEFAULT_API}"
        )
    if where.path.rstrip("/").endswith("/api"):
        root = api.rstrip("/").removesuffix("/api")
        raise typer.BadParameter(
            f"{api!r} names the /api prefix, which every command adds: use {root}"
        )
    return api


def _checked_case(case: str) -> str:
    """The id goes into the URL's path as typed: `x/../case_1` or `case_1?x` would reach
    another case there (or another endpoint), so one the API would refuse is refused here."""
    if not re.fullmatch(CASE_ID_PATTERN, case):
        raise typer.BadParameter(
            f"{case!r} is not a case id (letters, digits, '_', '.', '-'; at most 64)"
        )
    return case


def _checked_idempotency_key(key: str | None) -> str | None:
    """It travels as a header, which holds visible ASCII (and inner spaces) only: anything
    else raised UnicodeEncodeError in httpx, or passed for a connection failure. A longer
    key than the API takes is refused here too, not after a token and a call."""
    if key is not None and not re.fullmatch(r"[!-~]([ -~]*[!-~])?", key):
        raise typer.BadParameter(
            f"{key!r} cannot be sent as a header: use letters, digits and ASCII punctuation"
        )
    if key is not None and len(key) > IDEMPOTENCY_KEY_MAX_LENGTH:
        raise typer.BadParameter(
            f"it has {len(key)} characters: the API takes at most {IDEMPOTENCY_KEY_MAX_LENGTH}"
        )
    return key


CaseArgument = Annotated[str, typer.Argument(help="The case id.", callback=_checked_case)]
ApiOption = Annotated[
    str,
    typer.Option(
        "--api", envvar="AGENT_STATE_API", help="Base URL of the API.", callback=_checked_api
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")]
WorkdirOption = Annotated[
    Path | None, typer.Option("--workdir", help="Where the stack keeps its data and pid file.")
]


# --------------------------------------------------------------------------- local stack


def _stack_workdir(workdir: Path | None) -> Path:
    from devstack.stack import DEFAULT_WORKDIR

    return workdir or DEFAULT_WORKDIR


def _port_option(server: str) -> Any:
    return typer.Option(
        f"--{server}-port",
        envvar=f"AGENT_STATE_{server.upper()}_PORT",
        help=f"Port of {server} on 127.0.0.1 (0: any free port).",
        min=0,
        max=65535,
    )


RedisPort = Annotated[int, _port_option("redis")]
CosmosPort = Annotated[int, _port_option("cosmos")]
PostgresPort = Annotated[int, _port_option("postgres")]
IssuerPort = Annotated[int, _port_option("issuer")]


def _start_stack(workdir: Path, *, with_postgres: bool, ports: dict[str, int]) -> dict[str, object]:
    """`devstack.up`; a server that cannot start ends the command with one line saying why."""
    import devstack

    try:
        with _stops_as_interrupt():
            return devstack.up(workdir, with_postgres=with_postgres, ports=ports)
    except devstack.PortInUse as busy:
        _report_busy(busy, f"--{busy.server}-port N (0: any free port)")
    except devstack.StateFileUnreadable as unreadable:
        _report_unreadable(unreadable)
    except devstack.ServerStartError as failed:
        # Its message may carry the server's log tail: the first line says what failed.
        errors.print(f"[red]{str(failed).splitlines()[0]}[/red]", soft_wrap=True)
    except OSError as unusable:
        # A --workdir that cannot be made a directory (a file, a dangling link, no
        # permission); the servers started so far were stopped.
        errors.print(
            f"[red]cannot start the stack in {workdir}: {escape(str(unusable))}[/red]",
            soft_wrap=True,
        )
    raise typer.Exit(1)


@contextmanager
def _stops_as_interrupt() -> Iterator[None]:
    """`kill` or a closed terminal while servers start acts as Ctrl-C: the servers started
    so far are stopped. By default the CLI would die at once, leaving them running and,
    not recorded yet, out of `stack down`'s reach."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (an in-process test runner)
        return

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = {stop: signal.signal(stop, interrupt) for stop in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)


def _stack_command(verb: str, workdir: Path | None) -> str:
    from devstack import stack_command

    return stack_command(verb, _stack_workdir(workdir))


def _report_busy(busy: PortInUse, option: str) -> None:
    holder = f" by {busy.holder}" if busy.holder else ""
    errors.print(
        f"[red]port {busy.port} ({busy.server}) is already in use{holder}[/red]; pick "
        f"another with {option}, or stop that process",
        soft_wrap=True,
    )


def _report_unreadable(unreadable: StateFileUnreadable) -> None:
    errors.print(f"[red]{escape(str(unreadable))}[/red]", soft_wrap=True)


def _stack_status(workdir: Path) -> dict[str, object]:
    """`devstack.status`; a state file it cannot read ends the command with one line."""
    import devstack

    try:
        return devstack.status(workdir)
    except devstack.StateFileUnreadable as unreadable:
        _report_unreadable(unreadable)
    raise typer.Exit(1)


@stack_app.command("up")
def stack_up(
    postgres: Annotated[bool, typer.Option(help="Also start Postgres.")] = False,
    redis_port: RedisPort = 6390,
    cosmos_port: CosmosPort = 8091,
    postgres_port: PostgresPort = 5440,
    issuer_port: IssuerPort = 8095,
    workdir: WorkdirOption = None,
) -> None:
    """Start Redis and the Cosmos emulator (and Postgres) detached on loopback."""
    ports = {
        "redis": redis_port,
        "cosmos": cosmos_port,
        "postgres": postgres_port,
        "issuer": issuer_port,
    }
    description = _start_stack(_stack_workdir(workdir), with_postgres=postgres, ports=ports)
    _print_env(description)
    console.print(f"note: {_memory_only_note()}")


@stack_app.command("down")
def stack_down(workdir: WorkdirOption = None) -> None:
    """Stop the servers `stack up` started (Cosmos emulator and Redis data is lost)."""
    import devstack

    try:
        found = devstack.down(_stack_workdir(workdir))
    except devstack.StateFileUnreadable as unreadable:
        _report_unreadable(unreadable)
        raise typer.Exit(1) from unreadable
    stopped = ", ".join(found.stopped) if found.stopped else "nothing was running"
    console.print(f"stopped: {stopped}")
    if found.dead:
        # Otherwise a server that crashed earlier would pass unnoticed.
        console.print(
            f"[yellow]already stopped before `stack down`: {', '.join(found.dead)}[/yellow]"
        )
    if found.stopped:
        console.print(f"note: {_memory_only_note()}")


def _memory_only_note() -> str:
    from devstack import MEMORY_ONLY_NOTE

    return MEMORY_ONLY_NOTE


# `stack status` exit status when a server of the stack it shows has stopped: apart from 1
# (the state file is unreadable) and 2 (usage), so a script can tell a broken stack.
STACK_LOST_A_SERVER = 3


@stack_app.command("status")
def stack_status(workdir: WorkdirOption = None, as_json: JsonOption = False) -> None:
    """Show which local servers run and the settings that point at them; exit 3 when
    one of them does not run."""
    status = _stack_status(_stack_workdir(workdir))
    alive = status.get("alive")
    # A stack none of whose servers runs is "not running" (exit 0), as `stack up` can start it.
    dead = (
        [name for name, up in alive.items() if not up]
        if isinstance(alive, dict) and status.get("running")
        else []
    )
    if as_json:
        _print_json(status)
        if dead:
            raise typer.Exit(STACK_LOST_A_SERVER)
        return
    if not status.get("running"):
        console.print(
            f"the local stack is not running ({escape(_stack_command('up', workdir))})",
            soft_wrap=True,
        )
        return
    table = Table("server", "port", "pid", "alive")
    servers = status.get("servers")
    for name, info in (servers if isinstance(servers, dict) else {}).items():
        up = isinstance(alive, dict) and alive.get(name)
        table.add_row(name, str(info["port"]), str(info["pid"]), "yes" if up else "NO")
    console.print(table)
    _print_env(status)
    if dead:
        errors.print(
            f"[red]not running: {', '.join(dead)}[/red]; stop the stack "
            f"({escape(_stack_command('down', workdir))}) and start it again "
            f"({escape(_stack_command('up', workdir))})",
            soft_wrap=True,
        )
        raise typer.Exit(STACK_LOST_A_SERVER)


@stack_app.command("env")
def stack_env(workdir: WorkdirOption = None) -> None:
    """Print the running stack's settings as shell `export` lines, for
    `eval "$(agent-state stack env)"`; a stack not running is an error, not empty output."""
    where = _stack_workdir(workdir)
    status = _stack_status(where)
    if not status.get("running"):
        errors.print(
            f"[red]the local stack is not running[/red] (start it: "
            f"{escape(_stack_command('up', workdir))})",
            soft_wrap=True,
        )
        raise typer.Exit(1)
    _refuse_a_stack_with_dead_servers(
        where, status, f"start it again ({_stack_command('up', where)})"
    )
    for name, value in _stack_env(status).items():
        # Not rich: it would wrap long lines and take `[...]` in a value for markup.
        sys.stdout.write(f"export {name}={shlex.quote(value)}\n")


def _stack_env(description: dict[str, object]) -> dict[str, str]:
    env = description.get("env")
    return {str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {}


def _still_ours(workdir: Path, started: dict[str, object]) -> bool:
    """Whether the stack recorded in `workdir` is still the one `serve` started
    (`started`): one stopped meanwhile (`stack down`) and started again by `stack up` is
    that command's, not for `serve` to stop as it ends."""
    import devstack

    recorded = devstack.status(workdir).get("servers")
    ours = started.get("servers")
    if not isinstance(recorded, dict) or not isinstance(ours, dict):
        return False
    # Same pid and process start: a server `serve` started (Postgres may have joined since).
    return any(recorded.get(name) == info for name, info in ours.items())


def _print_env(description: dict[str, object]) -> None:
    env = _stack_env(description)
    console.print("settings for this stack:")
    for name, value in env.items():
        console.print(f"  {name}={_masked(name, value)}")


def _masked(name: str, value: str) -> str:
    """Keys hidden whole; a URL (REDIS_URL, POSTGRES_URL) or a libpq key=value string
    (`host=... password=...`) only loses its password, in a URL's query too."""
    if "KEY" in name:
        return "***"
    if not re.match(r"\w+://", value):
        return _CONNINFO_PASSWORD.sub(r"\1***", value)
    parts = urlsplit(value)
    if parts.password is not None:
        parts = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@"))
    return parts._replace(query=_QUERY_PASSWORD.sub(r"\1***", parts.query)).geturl()


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.", min=1, max=65535)] = DEFAULT_PORT,
    backend: Annotated[str, typer.Option(help="Cold backend: cosmos or postgres.")] = "cosmos",
    # Unset by default: a stack already running keeps its ports, one started here takes
    # `stack up`'s defaults.
    redis_port: Annotated[int | None, _port_option("redis")] = None,
    cosmos_port: Annotated[int | None, _port_option("cosmos")] = None,
    postgres_port: Annotated[int | None, _port_option("postgres")] = None,
    issuer_port: Annotated[int | None, _port_option("issuer")] = None,
    workdir: WorkdirOption = None,
) -> None:
    """Run the API on 127.0.0.1 against the local stack (started if it is not running)."""
    import uvicorn

    import devstack
    from devstack.stack import DEFAULT_WORKDIR

    if backend not in ("cosmos", "postgres"):
        raise typer.BadParameter("backend must be cosmos or postgres")
    # Checked first: uvicorn would find it taken only after the stack and the app started.
    try:
        devstack.check_port_free("api", port)
    except devstack.PortInUse as busy:
        _report_busy(busy, "--port N")
        raise typer.Exit(1) from busy
    where = _stack_workdir(workdir)
    status = _stack_status(where)
    started_here = not status.get("running")
    asked = {
        server: chosen
        for server, chosen in {
            "redis": redis_port,
            "cosmos": cosmos_port,
            "postgres": postgres_port,
            "issuer": issuer_port,
        }.items()
        if chosen is not None
    }
    os.environ["STATE_COLD_BACKEND"] = backend
    os.environ.setdefault("COSMOS_CREATE_IF_MISSING", "true")
    # Checked before any server starts, with the settings the stack will give (the running
    # one's, else those planned): a wrong value is found at once, not once a stack started
    # for nothing, and not as a traceback after "API on ..." (the app reads them only then).
    os.environ.update(
        {
            **devstack.planned_env(where, with_postgres=backend == "postgres", ports=asked),
            **_stack_env(status),
        }
    )
    _check_app_settings()
    # `kill` while the stack starts, or before uvicorn takes over SIGTERM, must still reach
    # the `finally` that stops a stack started here.
    with _stops_as_interrupt():
        if started_here:
            status = _start_stack(where, with_postgres=backend == "postgres", ports=asked)
        try:
            if not started_here:
                _refuse_a_stack_with_dead_servers(where, status)
                status = _with_postgres_if_asked(where, status, backend, asked)
                _refuse_ports_the_running_stack_ignores(where, status, asked)
            # Its actual ports (a free one chosen at start differs from the planned).
            os.environ.update(_stack_env(status))
            console.print(f"API on http://127.0.0.1:{port}/api  (OpenAPI: /api/docs)")
            # Client commands find the issuer of the default workdir's stack only: another
            # stack's must be named, or the hinted command gets no token (or a stranger's).
            issuer = _stack_env(status).get("AUTH_ISSUER")
            named = f"AGENT_STATE_ISSUER={issuer} " if where != DEFAULT_WORKDIR and issuer else ""
            console.print(
                f"submit the demo case:  {named}agent-state submit --demo "
                f"--api http://127.0.0.1:{port}",
                soft_wrap=True,
            )
            uvicorn.run(serving_app(port), host="127.0.0.1", port=port)
        finally:
            # As `stack down` says it (so Ctrl-C on scripts/run.sh too): what the stack
            # held is lost with it.
            if started_here and _still_ours(where, status) and devstack.down(where).stopped:
                console.print(f"note: {_memory_only_note()}")


def serving_app(port: int, holder: RuntimeHolder | None = None) -> ASGIApp:
    """The API as `serve` runs it on 127.0.0.1:`port`; with AUTH_DISABLED, answering
    loopback host names, and browser pages of loopback origins or those CORS allows, only
    (`LoopbackHostOnly`: any web page could call it otherwise)."""
    from support_cases.api import create_app
    from support_cases.auth import LoopbackHostOnly
    from support_cases.runtime import process_runtime

    holder = holder or process_runtime
    api = create_app(holder=holder)
    settings = holder.settings()
    if not settings.auth_disabled:
        return api
    return LoopbackHostOnly(api, port, settings.cors_allowed_origins)


def _check_app_settings() -> None:
    """The app's settings from this environment; a wrong one ends the command in one line."""
    # Imported here: the app's settings bring the state library (and LangGraph), which the
    # other commands do without, starting in a fraction of the time.
    from state import SettingsError
    from support_cases.settings import AppSettings

    try:
        AppSettings()
    except SettingsError as wrong:
        errors.print(f"[red]cannot serve: {escape(str(wrong))}[/red]", soft_wrap=True)
        raise typer.Exit(1) from None


def _with_postgres_if_asked(
    where: Path, status: dict[str, object], backend: str, asked: dict[str, int]
) -> dict[str, object]:
    """The running stack, with Postgres added when `backend` needs it and it lacks it."""
    if backend != "postgres" or "POSTGRES_URL" in _stack_env(status):
        return status
    console.print("adding Postgres to the running stack (`stack down` stops it too)")
    added = _start_stack(where, with_postgres=True, ports=asked)
    asked.pop("postgres", None)  # applied just now
    return added


def _refuse_a_stack_with_dead_servers(
    where: Path, status: dict[str, object], restart: str = "serve again, which starts it afresh"
) -> None:
    """A stack counts as running while any of its servers does: one that died since
    (a crashed Redis, a killed emulator) would leave the API serving degraded or down,
    or its callers without tokens, with nothing said."""
    alive = status.get("alive")
    dead = [name for name, up in alive.items() if not up] if isinstance(alive, dict) else []
    if dead:
        errors.print(
            f"[red]the stack running from {escape(str(where))} has lost {', '.join(dead)}"
            f"[/red] ({escape(_stack_command('status', where))}): stop it "
            f"({escape(_stack_command('down', where))}) and {escape(restart)}",
            soft_wrap=True,
        )
        raise typer.Exit(1)


def _refuse_ports_the_running_stack_ignores(
    where: Path, status: dict[str, object], asked: dict[str, int]
) -> None:
    """A port asked for (option or environment) that the running stack does not use would
    be silently ignored: say so and stop, rather than serve against other ports."""
    servers = status.get("servers")
    running = servers if isinstance(servers, dict) else {}
    for server, port in asked.items():
        found = running.get(server)
        actual = found.get("port") if isinstance(found, dict) else None
        # 0 names no port ("any free one"): what `stack up` chose for it, as when
        # `AGENT_STATE_REDIS_PORT=0 bash scripts/run.sh` serves the stack it just started.
        if port != 0 and port != actual:
            where_now = f"on port {actual}" if actual is not None else "not running"
            errors.print(
                f"[red]--{server}-port {port} cannot apply[/red]: the stack already running "
                f"from {escape(str(where))} has {server} {where_now}; drop the option, or stop "
                f"that stack first ({escape(_stack_command('down', where))})",
                soft_wrap=True,
            )
            raise typer.Exit(2)


# --------------------------------------------------------------------------- API client


def _call(method: str, api: str, path: str, *, expects: str, **kwargs: Any) -> dict[str, Any]:
    return _answer(*_send(method, api, path, **kwargs), expects=expects)


def _send(method: str, api: str, path: str, **kwargs: Any) -> tuple[httpx.Response, dict[str, Any]]:
    try:
        return _request(method, api, path, **kwargs)
    except httpx.TransportError as error:
        errors.print(f"[red]cannot reach {api}: {error}[/red] (is `agent-state serve` running?)")
        raise typer.Exit(2) from error


def _request(
    method: str, api: str, path: str, *, public: bool = False, **kwargs: Any
) -> tuple[httpx.Response, dict[str, Any]]:
    headers = {**_auth_headers(api, required=not public), **(kwargs.pop("headers", None) or {})}
    response = httpx.request(
        method, f"{api.rstrip('/')}/api{path}", timeout=60, headers=headers, **kwargs
    )
    return response, _body(response)


def _auth_headers(api: str, *, required: bool = True) -> dict[str, str]:
    """The call's Authorization header. Without a token to be had, a call that needs one
    ends the command; one to a path the API serves to anyone (`/health`, where a token
    shows more) goes without it."""
    try:
        token = access_token(api)
    except (InsecureApi, TokenUnavailable) as error:
        if not required:
            errors.print(f"[yellow]no access token ({escape(str(error))}): asking without one[/]")
            return {}
        said = str(error) if isinstance(error, InsecureApi) else f"no access token: {error}"
        errors.print(f"[red]{said}[/red]")
        raise typer.Exit(2) from error
    return {"Authorization": f"Bearer {token}"} if token else {}


def _body(response: httpx.Response) -> dict[str, Any]:
    if not response.content:
        if response.is_success:  # every answer of this API that succeeds has a body
            _refuse_foreign(response, "nothing")
        return {}
    try:
        body = response.json()
    except ValueError:
        if response.is_success:  # another web server's page, not to be shown as an answer
            _refuse_foreign(response, response.headers.get("content-type", "something else"))
        return {"error": response.text}  # a proxy's or the Functions host's own error page
    if not isinstance(body, dict):  # every answer of this API is an object
        _refuse_foreign(response, f"a JSON {type(body).__name__}")
    return body


def _refuse_unless_it_has(response: httpx.Response, body: dict[str, Any], field: str) -> None:
    if field not in body:
        _refuse_foreign(response, f"a JSON object without {field!r}")


def _refuse_foreign(response: httpx.Response, what: str) -> NoReturn:
    """An answer this API never gives ends the command in one line (not a KeyError, nor
    `--json` printing it with exit 0): --api most likely names another server."""
    errors.print(
        f"[red]{response.status_code}: {escape(str(response.request.url))} answered "
        f"{escape(what)}, not this API's answer[/red] (is --api this API's URL?)",
        soft_wrap=True,
    )
    raise typer.Exit(1)


def _refuse_errors(response: httpx.Response, body: dict[str, Any]) -> None:
    """An error answer is printed and ends the command."""
    if response.status_code >= 400:
        said = body.get("error") or response.text
        if not said:  # an empty answer (a proxy's, another server's): say what answered
            said = f"{response.reason_phrase} (an empty answer from {response.request.url})"
        errors.print(
            f"[red]{response.status_code}: {escape(str(said))}[/red]"
            + _unsent_token_hint(response),
            soft_wrap=True,
        )
        raise typer.Exit(1)


def _unsent_token_hint(response: httpx.Response) -> str:
    """A 401 for a call that carried no token says where the CLI looks for one."""
    if response.status_code != 401 or "authorization" in response.request.headers:
        return ""
    return (
        " (no token was sent: for a local stack set AGENT_STATE_ISSUER to the AUTH_ISSUER "
        "`agent-state stack status` shows for its workdir; otherwise AGENT_STATE_TOKEN or "
        "AGENT_STATE_SCOPE)"
    )


def _answer(response: httpx.Response, body: dict[str, Any], *, expects: str) -> dict[str, Any]:
    """The body of a successful answer, which has the field `expects`; an error is printed
    and ends the command."""
    _refuse_errors(response, body)
    _refuse_unless_it_has(response, body, expects)
    if response.status_code == 202:
        errors.print(f"[yellow]still running; status at {response.headers.get('location')}[/]")
    return body


def _print_json(value: object) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def _billed(billing: dict[str, Any]) -> str:
    """The duplicates' amount; in several currencies each one's (`refund_amount` adds them up,
    a figure in no currency), as the reviewer decides on them."""
    if billing["currency"] is not None or not billing["duplicates"]:
        return f"{billing['refund_amount']:.2f} {billing['currency'] or ''}".strip()
    cents: dict[str, int] = {}
    for charge in billing["duplicates"]:
        cents[charge["currency"]] = cents.get(charge["currency"], 0) + round(charge["amount"] * 100)
    return " + ".join(f"{cents[currency] / 100:.2f} {currency}" for currency in sorted(cents))


def _print_case(case: dict[str, Any]) -> None:
    table = Table("field", "value", show_header=False)
    table.add_row("case", case["case_id"])
    table.add_row("status", f"[bold]{case['status']}[/bold]")
    table.add_row("customer", case["customer_id"])
    table.add_row("completed steps", ", ".join(case["completed_steps"]) or "-")
    if case.get("billing"):
        billing = case["billing"]
        table.add_row(
            "billing",
            f"{len(billing['duplicates'])} duplicate(s), {_billed(billing)} "
            f"at {billing['merchant'] or '-'}",
        )
    if case.get("account"):
        table.add_row("account", f"issue: {case['account']['issue'] or 'none'}")
    if case.get("policy"):
        table.add_row("policy", f"{case['policy']['decision']}: {case['policy']['reason']}")
    if case.get("review"):
        review = case["review"]
        reviewer = review.get("reviewer_name") or review["reviewer_id"]
        table.add_row("review", f"{review['decision']} by {reviewer}")
    if case.get("refund"):
        refund = case["refund"]
        table.add_row("refund", f"{refund['status']} {refund['reference'] or ''}".strip())
    for effect in case.get("effects", []):
        result = effect.get("result") or {}
        table.add_row(
            f"effect {effect['kind']}", f"{effect['status']} {result.get('reference', '')}"
        )
    if case.get("awaiting_review"):
        waiting = case["awaiting_review"]
        table.add_row(
            "awaiting review",
            f"{waiting['reason']} -> agent-state review {case['case_id']} approve|reject",
        )
    if case.get("lease_ends_at"):
        # Only a stalled case waits for its dead runner's lease; a running one is renewing it.
        waits = " (a resume waits until then)" if case["status"] == "stalled" else ""
        table.add_row("lease ends", f"{case['lease_ends_at']}{waits}")
    if case.get("error"):
        table.add_row("error", f"[red]{case['error']}[/red]")
    table.add_row("response", case.get("final_response") or "-")
    console.print(table)


@app.command()
def submit(
    demo: Annotated[bool, typer.Option("--demo", help="Submit the case_8842 demo.")] = False,
    file: Annotated[
        Path | None,
        typer.Option("--file", help="A JSON request body to submit.", exists=True, dir_okay=False),
    ] = None,
    case_id: Annotated[str | None, typer.Option("--case-id", help="Override the case id.")] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            help="Makes a retried submit safe.",
            callback=_checked_idempotency_key,
        ),
    ] = None,
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """Submit a support case (the demo, or a JSON body from a file)."""
    if demo == (file is not None):
        raise typer.BadParameter("give exactly one of --demo or --file")
    body = demo_case() if file is None else _request_body(file)
    if case_id:
        body["case_id"] = case_id
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    case = _call("POST", api, "/cases", expects="case_id", json=body, headers=headers)
    _print_json(case) if as_json else _print_case(case)


def _request_body(file: Path) -> dict[str, Any]:
    # Here, not at the top: the module loads FastAPI, which the CLI's start-up otherwise skips.
    from support_cases.json_body import DuplicateKey, loads_unique_keys

    try:
        # As the API reads it: a key named twice is refused, not settled here at the last.
        body = loads_unique_keys(file.read_text())
    except DuplicateKey as error:
        raise typer.BadParameter(f"{file}: {error}", param_hint="--file") from error
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise typer.BadParameter(f"{file} is not JSON: {error}", param_hint="--file") from error
    if not isinstance(body, dict):
        raise typer.BadParameter(f"{file} is not a JSON object", param_hint="--file")
    return body


@app.command()
def show(case: CaseArgument, api: ApiOption = DEFAULT_API, as_json: JsonOption = False) -> None:
    """A case's status and result."""
    answer = _call("GET", api, f"/cases/{case}", expects="case_id")
    _print_json(answer) if as_json else _print_case(answer)


@app.command()
def checkpoints(
    case: CaseArgument,
    limit: Annotated[
        int,
        typer.Option(min=1, max=HISTORY_PAGE_MAX, help="How many, newest first."),
    ] = 20,
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """A case's checkpoint history, newest first."""
    answer = _call(
        "GET", api, f"/cases/{case}/checkpoints", expects="checkpoints", params={"limit": limit}
    )
    if as_json:
        _print_json(answer)
        return
    table = Table("step", "source", "created", "next", "completed steps", "checkpoint id")
    for item in answer["checkpoints"]:
        table.add_row(
            str(item["step"]),
            item["source"] or "",
            (item["created_at"] or "")[:23],
            ", ".join(item["next"]) + (" (interrupted)" if item["interrupts"] else ""),
            ", ".join(item["completed_steps"]),
            item["checkpoint_id"],
        )
    console.print(table)


@app.command()
def audit(
    case: CaseArgument,
    limit: Annotated[
        int,
        typer.Option(min=1, max=AUDIT_PAGE_MAX, help="How many entries, newest first."),
    ] = 100,
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """A case's audit trail: who wrote which section, at which version."""
    answer = _call("GET", api, f"/cases/{case}/audit", expects="entries", params={"limit": limit})
    if as_json:
        _print_json(answer)
        return
    table = Table("version", "agent", "section", "at", "after")
    for entry in answer["entries"]:
        after = json.dumps(entry["after"], default=str)
        table.add_row(
            str(entry["version"]),
            entry["agent_id"],
            entry["section"],
            entry["at"][:23],
            after if len(after) <= 70 else after[:67] + "...",
        )
    console.print(table)


@app.command()
def review(
    case: CaseArgument,
    decision: Annotated[str, typer.Argument(help="approve or reject")],
    note: Annotated[str | None, typer.Option(help="Why.")] = None,
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """Approve or reject an escalated refund (as the token's caller); the case then runs on."""
    if decision not in ("approve", "reject"):
        raise typer.BadParameter("decision must be approve or reject")
    answer = _call(
        "POST",
        api,
        f"/cases/{case}/review",
        expects="case_id",
        json={"decision": decision, "note": note},
    )
    _print_json(answer) if as_json else _print_case(answer)


@app.command()
def resume(
    case: CaseArgument,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait",
            help="While a previous runner's lease keeps the case, wait for it to end "
            "(the answer's Retry-After), then resume.",
        ),
    ] = True,
    max_wait: Annotated[
        float, typer.Option(min=0, help="Give up waiting after this many seconds in all.")
    ] = 600.0,
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """Resume a stalled or failed run from its last checkpoint."""
    give_up_at = time.monotonic() + max_wait
    while True:
        response, body = _send("POST", api, f"/cases/{case}/resume")
        retry_after = response.headers.get("retry-after")
        if not (wait and response.status_code == 409 and retry_after and retry_after.isdigit()):
            break
        pause = int(retry_after)
        if time.monotonic() + pause > give_up_at:
            errors.print(f"[yellow]gave up waiting after {max_wait:.0f} s[/yellow]")
            break
        errors.print(f"[yellow]{body.get('error')}: waiting {pause} s (--no-wait not to)[/yellow]")
        time.sleep(pause)
    answer = _answer(response, body, expects="case_id")
    _print_json(answer) if as_json else _print_case(answer)


@app.command()
def health(api: ApiOption = DEFAULT_API, as_json: JsonOption = False) -> None:
    """Up or down; each tier's health too for a caller with Cases.Operate.

    Exits 1 when the API reports itself down."""
    response, answer = _send("GET", api, "/health", public=True)
    # A `down` API answers 503 with the same report: shown as such, not as an error dump.
    down = response.status_code == 503 and answer.get("status") == "down"
    if not down:
        _answer(response, answer, expects="status")
    if as_json:
        _print_json(answer)
    elif answer.get("tiers") is None:
        console.print(f"overall: {answer['status']} (tier details need Cases.Operate)")
    else:
        _print_tiers(answer)
    if down:
        raise typer.Exit(1)


def _print_tiers(answer: dict[str, Any]) -> None:
    table = Table("tier", "up", "latency ms", "detail")
    for tier in answer["tiers"]:
        latency = tier["latency_ms"]
        table.add_row(
            tier["name"],
            "yes" if tier["up"] else "[red]NO[/red]",
            f"{latency:.1f}" if latency is not None else "-",
            tier["detail"],
        )
    console.print(f"overall: {answer['status']}")
    console.print(table)
    # What else made the status degraded: shown, not left to `--json`.
    backlog = answer.get("backlog")
    if backlog:
        age = backlog["oldest_age_seconds"]
        oldest = f", the oldest {age:.1f} s old" if age is not None else ""
        console.print(
            f"write-behind backlog: {backlog['entries']} entries on {backlog['threads']}"
            f" threads{oldest}; {backlog['stuck_threads']} threads stuck"
        )
    damaged = answer.get("damaged_index_shards")
    if damaged:
        console.print(
            f"[red]run index shards damaged: {', '.join(damaged)}[/red] (stalled cases there"
            " are not resumed, nothing is swept: `agent-state run-index repair` rebuilds them)"
        )


# --------------------------------------------------------------------------- conversations

BUSY_RUNS = frozenset({"queued", "running"})
# Events after which the case may be at rest; the runs list confirms it.
RESTING_EVENTS = frozenset({"run_completed", "run_failed", "interrupt"})
# The API sends a keep-alive every 15 s of quiet: a read that hears nothing for longer
# than this is a dead connection.
STREAM_READ_TIMEOUT_SECONDS = 45.0
# A dropped stream is reconnected this many times in a row, pausing 1 s, 2 s, ... between.
MAX_RECONNECTS = 5
EVENT_STYLES = {
    "run_completed": "green",
    "run_failed": "red",
    "interrupt": "yellow",
    "run_interrupted": "yellow",
    "run_rolled_back": "yellow",
    "run_redone": "yellow",
}


@app.command()
def reply(
    case: CaseArgument,
    text: Annotated[str, typer.Argument(help="The customer's message.")],
    strategy: Annotated[
        FollowUpStrategy | None,
        typer.Option(
            help="If a run is in progress: reject the message (409), enqueue it after the "
            "run, interrupt the run (its progress kept) or rollback the run (its progress "
            "discarded). Default: the API's (enqueue).",
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            help="Makes a retried reply safe.",
            callback=_checked_idempotency_key,
        ),
    ] = None,
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """Send a follow-up message to a case: it becomes a run of the case."""
    body: dict[str, Any] = {"text": text}
    if strategy is not None:
        body["strategy"] = strategy.value
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    response, answer = _send("POST", api, f"/cases/{case}/messages", json=body, headers=headers)
    _refuse_errors(response, answer)
    # Not `_answer`: a 202 is told in the table ("follow it"), not as "still running".
    _refuse_unless_it_has(response, answer, "run")
    if as_json:
        _print_json(answer)
        return
    replayed = response.headers.get("idempotent-replayed") == "true"
    _print_reply(case, answer["run"], replayed=replayed)


def _print_reply(case: str, run: dict[str, Any], *, replayed: bool) -> None:
    table = Table("field", "value", show_header=False)
    table.add_row("case", case)
    table.add_row("run", run["run_id"])
    table.add_row("status", f"[bold]{run['status']}[/bold]{_took(run, ' in {:.2f} s')}")
    table.add_row("strategy", run["strategy"] or "-")
    if replayed:
        table.add_row("replayed", "this Idempotency-Key was used before: that message's run")
    for name, note in _run_notes(run):
        table.add_row(name, note)
    if run["status"] in BUSY_RUNS:
        table.add_row("follow it", f"agent-state follow {case}")
    elif run["status"] == "awaiting_review":
        # Paused before its answer: a reviewer's decision is what it waits for.
        table.add_row("awaiting review", f"agent-state review {case} approve|reject")
    else:
        table.add_row("the answer", f"agent-state show {case}")
    console.print(table)


@app.command("runs")
def list_runs(
    case: CaseArgument, api: ApiOption = DEFAULT_API, as_json: JsonOption = False
) -> None:
    """A case's runs, oldest first: its intake, then one per follow-up message."""
    answer = _call("GET", api, f"/cases/{case}/runs", expects="runs")
    if as_json:
        _print_json(answer)
        return
    notes = [_run_notes(run) for run in answer["runs"]]
    # The notes column only when a run has some (a stopped run, a failed one).
    with_notes = any(notes)
    table = Table("run", "kind", "status", "strategy", "text", "started", "duration")
    if with_notes:
        table.add_column("notes")
    for run, run_notes in zip(answer["runs"], notes, strict=True):
        cells = [
            _short_run(run["run_id"]),
            run["kind"],
            run["status"],
            run["strategy"] or "-",
            escape(_shortened(run["text"] or "-", 32)),
            (run["started_at"] or "-")[:19].replace("T", " "),
            _took(run, "{:.2f} s") or "-",
        ]
        if with_notes:
            cells.append("; ".join(f"{name}: {note}" for name, note in run_notes))
        table.add_row(*cells)
    console.print(table)


@app.command()
def follow(
    case: CaseArgument,
    stream_seconds: Annotated[
        float,
        typer.Option(
            min=1,
            max=200,
            help="How long one connection to the event stream stays open before it is "
            "renewed (the API's `seconds`).",
        ),
    ] = 60.0,
    api: ApiOption = DEFAULT_API,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per event: its data and its id.")
    ] = False,
) -> None:
    """A case's progress as it happens, until no run is queued or running.

    A case at rest shows its events so far."""
    show = _print_event_json if as_json else _print_event
    # An API out of reach now ends the command (as any command); later, it is a dropped
    # connection, tried again.
    at_rest = not _busy(_call("GET", api, f"/cases/{case}/runs", expects="runs")["runs"])
    last_id: str | None = None
    drops = 0
    while True:
        opened = time.monotonic()
        try:
            if at_rest:
                for event in _case_events(api, case, seconds=0, after=last_id):
                    show(event)
                    last_id = event["id"]
                return
            for event in _case_events(api, case, seconds=stream_seconds, after=last_id):
                drops = 0
                show(event)
                last_id = event["id"]
                if (
                    event["event"] in RESTING_EVENTS
                    and event.get("queued") == 0
                    and _told_last_end(_case_runs(api, case), event)
                ):
                    return
            # The stream ended: its time was up, or the API lost its event log for a moment.
            # Publishing events is best effort, so the runs list also decides when to stop.
            at_rest = not _busy(_case_runs(api, case))
        except (httpx.TransportError, StreamRefusedForNow) as error:
            drops += 1
            if drops > MAX_RECONNECTS:
                errors.print(f"[red]lost the event stream of {api}: {escape(str(error))}[/red]")
                raise typer.Exit(2) from error
            errors.print(
                f"[yellow]event stream interrupted ({escape(str(error))}); reconnecting[/yellow]"
            )
            # No sooner than the API asked: a slot freed after that is what a retry needs.
            asked = error.retry_after if isinstance(error, StreamRefusedForNow) else 0.0
            time.sleep(max(drops, asked))
            continue
        drops = 0
        # A stream cut short (its log out of reach) is not reopened in a tight loop.
        if not at_rest and time.monotonic() - opened < stream_seconds:
            time.sleep(1)


def _case_runs(api: str, case: str) -> list[dict[str, Any]]:
    """The case's runs; an API out of reach raises (for `follow` a dropped connection)."""
    response, body = _request("GET", api, f"/cases/{case}/runs")
    return list(_answer(response, body, expects="runs")["runs"])


def _busy(runs: list[dict[str, Any]]) -> bool:
    return any(run["status"] in BUSY_RUNS for run in runs)


def _told_last_end(runs: list[dict[str, Any]], event: dict[str, Any]) -> bool:
    """No run is queued or running, and none ended after `event` was published: it told the
    case's last end (not an earlier one, replayed from the log's start)."""
    at = datetime.fromisoformat(event["at"])
    return not _busy(runs) and all(
        datetime.fromisoformat(run["ended_at"]) <= at for run in runs if run["ended_at"]
    )


def _case_events(
    api: str, case: str, *, seconds: float, after: str | None
) -> Iterator[dict[str, Any]]:
    """The case's events after `after` (from the oldest kept if None), as the API streams
    them for `seconds`: each event's data with its id."""
    headers = _auth_headers(api)
    if after is not None:
        headers["Last-Event-ID"] = after
    with httpx.stream(
        "GET",
        f"{api.rstrip('/')}/api/cases/{case}/events",
        params={"seconds": seconds},
        headers=headers,
        timeout=httpx.Timeout(10, read=STREAM_READ_TIMEOUT_SECONDS),
    ) as response:
        if response.status_code >= 400:
            response.read()
            if response.status_code in (429, 503) and "retry-after" in response.headers:
                # Refused for now (503: the API's event log out of reach, or the worker's
                # streams all taken; 429: this caller's): tried again as a dropped
                # connection is, while the runs list still says how the case goes.
                raise StreamRefusedForNow(
                    f"{response.status_code}: {_body(response).get('error', response.text)}",
                    retry_after=_retry_after_seconds(response),
                )
            _refuse_errors(response, _body(response))
        for frame in sse_frames(response.iter_lines()):
            try:
                data = json.loads(frame.data)
            except ValueError:
                data = {"data": frame.data}
            yield {"id": frame.id, "event": frame.event, **data}


class StreamRefusedForNow(Exception):
    """The API refused the event stream for now (503 or 429 with a Retry-After): its event
    log out of reach, or the streams a worker or a caller may hold all taken."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after_seconds(response: httpx.Response) -> float:
    """The answer's Retry-After in seconds (0 if it gives an HTTP date or nothing usable)."""
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return 0.0


@dataclass(frozen=True)
class SseFrame:
    id: str | None
    event: str
    data: str


def sse_frames(lines: Iterable[str]) -> Iterator[SseFrame]:
    """Server-Sent Events from a stream's lines, parsed as the HTML standard says: the fields
    up to a blank line make one event, its `data` lines joined by newlines; comments, frames
    without data and an unfinished last frame (a dropped connection) yield nothing."""
    last_id: str | None = None
    event = ""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield SseFrame(last_id, event or "message", "\n".join(data))
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
        elif name == "id" and "\0" not in value:
            last_id = value


def _print_event_json(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event, default=str) + "\n")
    sys.stdout.flush()


def _print_event(event: dict[str, Any]) -> None:
    name = event["event"]
    line = Text.assemble(
        (str(event.get("at", ""))[11:23], "dim"),
        "  ",
        (_short_run(event.get("run_id")), "cyan"),
        "  ",
        (f"{name:<15}", EVENT_STYLES.get(name, "bold")),
        " ",
        _event_detail(event),
    )
    line.rstrip()
    console.print(line, soft_wrap=True)


def _event_detail(event: dict[str, Any]) -> str:
    match event["event"]:
        case "run_queued":
            strategy = f" ({event['strategy']})" if event.get("strategy") else ""
            text = f': "{_shortened(event["text"], 60)}"' if event.get("text") else ""
            return f"{event.get('kind', '')}{strategy}{text}"
        case "node_started":
            return str(event.get("node", ""))
        case "node_finished":
            summary = event.get("summary")
            node = str(event.get("node", ""))
            return f"{node}: {_shortened(summary, 90)}" if summary else node
        case "interrupt":
            reason = (event.get("awaiting_review") or {}).get("reason", "")
            return f"awaiting review: {reason}; queued: {event.get('queued')}"
        case "run_completed":
            return f"queued: {event.get('queued')}"
        case "run_failed":
            return f"{event.get('error')}; queued: {event.get('queued')}"
        case "run_redone":
            return f"Redis lost its checkpoints; from the cold tier (redo {event.get('redone')})"
        case "run_interrupted" | "run_rolled_back":
            stopped = f"by {_short_run(event.get('stopped_by'))}"
            effects = _effects(event.get("discarded_effects") or [])
            return f"{stopped}; discarded effects: {effects}" if effects else stopped
    return ""


def _run_notes(run: dict[str, Any]) -> list[tuple[str, str]]:
    notes = []
    if run["stopped_by"]:
        notes.append(("stopped by", _short_run(run["stopped_by"])))
    if run["discarded_effects"]:
        notes.append(("discarded effects", escape(_effects(run["discarded_effects"]))))
    if run["error"]:
        notes.append(("error", f"[red]{escape(run['error'])}[/red]"))
    return notes


def _effects(effects: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"{effect['kind']} {(effect.get('result') or {}).get('reference', '')}".strip()
        for effect in effects
    )


def _took(run: dict[str, Any], form: str) -> str:
    seconds = run["duration_seconds"]
    return form.format(seconds) if seconds is not None else ""


def _short_run(run_id: str | None) -> str:
    """`run-` and 8 hex digits: enough to tell a case's runs apart."""
    return run_id[:12] if run_id else "-"


def _shortened(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def main() -> None:
    app()
