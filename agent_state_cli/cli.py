"""`agent-state`: run the local stack and API, submit cases, read them back, decide reviews.

    agent-state stack up|down|status       the local Redis + Cosmos emulator (+ Postgres)
    agent-state serve                      stack up (if needed) + the API on 127.0.0.1:7071
    agent-state submit --demo              submit case_8842
    agent-state show CASE | checkpoints CASE | audit CASE
    agent-state review CASE approve|reject [--note TEXT]
    agent-state resume CASE [--no-wait] | health

Every client command takes `--api URL` (default $AGENT_STATE_API or
http://127.0.0.1:7071) and `--json` for the raw JSON answer. It calls with an
access token (see `tokens.py`): $AGENT_STATE_TOKEN, else one from the local
stack's issuer for a loopback API, else azure-identity for $AGENT_STATE_SCOPE.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import httpx
import typer
from rich.console import Console
from rich.table import Table

from support_cases.demo import demo_case

from .tokens import TokenUnavailable, access_token

DEFAULT_API = "http://127.0.0.1:7071"
DEFAULT_PORT = 7071

app = typer.Typer(help=__doc__.splitlines()[0], no_args_is_help=True, add_completion=False)
stack_app = typer.Typer(help="Start, stop or inspect the local stack.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
console = Console()
# Notices and errors go to stderr, so `--json` leaves stdout parseable.
errors = Console(stderr=True)

ApiOption = Annotated[
    str, typer.Option("--api", envvar="AGENT_STATE_API", help="Base URL of the API.")
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
    )


RedisPort = Annotated[int, _port_option("redis")]
CosmosPort = Annotated[int, _port_option("cosmos")]
PostgresPort = Annotated[int, _port_option("postgres")]


def _start_stack(workdir: Path, *, with_postgres: bool, ports: dict[str, int]) -> dict[str, object]:
    """`devstack.up`; a server that cannot start ends the command with one line saying why."""
    import devstack

    try:
        return devstack.up(workdir, with_postgres=with_postgres, ports=ports)
    except devstack.PortInUse as busy:
        holder = f" by {busy.holder}" if busy.holder else ""
        errors.print(
            f"[red]port {busy.port} ({busy.server}) is already in use{holder}[/red]; pick "
            f"another with --{busy.server}-port N (0: any free port), or stop that process",
            soft_wrap=True,
        )
    except devstack.ServerStartError as failed:
        # Its message may carry the server's log tail: the first line says what failed.
        errors.print(f"[red]{str(failed).splitlines()[0]}[/red]", soft_wrap=True)
    raise typer.Exit(1)


@stack_app.command("up")
def stack_up(
    postgres: Annotated[bool, typer.Option(help="Also start Postgres.")] = False,
    redis_port: RedisPort = 6390,
    cosmos_port: CosmosPort = 8091,
    postgres_port: PostgresPort = 5440,
    workdir: WorkdirOption = None,
) -> None:
    """Start Redis and the Cosmos emulator (and Postgres) detached on loopback."""
    ports = {"redis": redis_port, "cosmos": cosmos_port, "postgres": postgres_port}
    description = _start_stack(_stack_workdir(workdir), with_postgres=postgres, ports=ports)
    _print_env(description)
    console.print(f"note: {_memory_only_note()}")


@stack_app.command("down")
def stack_down(workdir: WorkdirOption = None) -> None:
    """Stop the servers `stack up` started (Cosmos emulator and Redis data is lost)."""
    import devstack

    stopped = devstack.down(_stack_workdir(workdir))
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
    if stopped:
        console.print(f"note: {_memory_only_note()}")


def _memory_only_note() -> str:
    from devstack import MEMORY_ONLY_NOTE

    return MEMORY_ONLY_NOTE


@stack_app.command("status")
def stack_status(workdir: WorkdirOption = None, as_json: JsonOption = False) -> None:
    """Show which local servers run and the settings that point at them."""
    import devstack

    status = devstack.status(_stack_workdir(workdir))
    if as_json:
        _print_json(status)
        return
    if not status.get("running"):
        console.print("the local stack is not running (agent-state stack up)")
        return
    table = Table("server", "port", "pid", "alive")
    alive = status.get("alive")
    servers = status.get("servers")
    for name, info in (servers if isinstance(servers, dict) else {}).items():
        up = isinstance(alive, dict) and alive.get(name)
        table.add_row(name, str(info["port"]), str(info["pid"]), "yes" if up else "NO")
    console.print(table)
    _print_env(status)


def _stack_env(description: dict[str, object]) -> dict[str, str]:
    env = description.get("env")
    return {str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {}


def _print_env(description: dict[str, object]) -> None:
    env = _stack_env(description)
    console.print("settings for this stack:")
    for name, value in env.items():
        console.print(f"  {name}={_masked(name, value)}")


def _masked(name: str, value: str) -> str:
    """Keys hidden whole; a URL (REDIS_URL, POSTGRES_URL) only loses its password."""
    if "KEY" in name:
        return "***"
    parts = urlsplit(value)
    if parts.password is None:
        return value
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = DEFAULT_PORT,
    backend: Annotated[str, typer.Option(help="Cold backend: cosmos or postgres.")] = "cosmos",
    redis_port: RedisPort = 6390,
    cosmos_port: CosmosPort = 8091,
    postgres_port: PostgresPort = 5440,
    workdir: WorkdirOption = None,
) -> None:
    """Run the API on 127.0.0.1 against the local stack (started if it is not running)."""
    import uvicorn

    import devstack

    if backend not in ("cosmos", "postgres"):
        raise typer.BadParameter("backend must be cosmos or postgres")
    where = _stack_workdir(workdir)
    status = devstack.status(where)
    started_here = not status.get("running")
    if started_here:
        ports = {"redis": redis_port, "cosmos": cosmos_port, "postgres": postgres_port}
        status = _start_stack(where, with_postgres=backend == "postgres", ports=ports)
    env = _stack_env(status)
    if backend == "postgres" and "POSTGRES_URL" not in env:
        raise typer.BadParameter("the running stack has no Postgres: stack down, then serve again")
    os.environ.update(env)
    os.environ["STATE_COLD_BACKEND"] = backend
    os.environ.setdefault("COSMOS_CREATE_IF_MISSING", "true")
    console.print(f"API on http://127.0.0.1:{port}/api  (OpenAPI: /api/docs)")
    console.print(f"submit the demo case:  agent-state submit --demo --api http://127.0.0.1:{port}")
    try:
        uvicorn.run("support_cases.api:create_app", factory=True, host="127.0.0.1", port=port)
    finally:
        if started_here:
            devstack.down(where)


# --------------------------------------------------------------------------- API client


def _call(method: str, api: str, path: str, **kwargs: Any) -> dict[str, Any]:
    return _answer(*_send(method, api, path, **kwargs))


def _send(method: str, api: str, path: str, **kwargs: Any) -> tuple[httpx.Response, dict[str, Any]]:
    try:
        token = access_token(api)
    except TokenUnavailable as error:
        errors.print(f"[red]no access token: {error}[/red]")
        raise typer.Exit(2) from error
    headers = dict(kwargs.pop("headers", None) or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = httpx.request(
            method, f"{api.rstrip('/')}/api{path}", timeout=60, headers=headers, **kwargs
        )
    except httpx.TransportError as error:
        errors.print(f"[red]cannot reach {api}: {error}[/red] (is `agent-state serve` running?)")
        raise typer.Exit(2) from error
    try:
        body: dict[str, Any] = response.json() if response.content else {}
    except ValueError:  # not JSON: a proxy's or the Functions host's own error page
        body = {"error": response.text}
    return response, body


def _answer(response: httpx.Response, body: dict[str, Any]) -> dict[str, Any]:
    """The body of a successful answer; an error is printed and ends the command."""
    if response.status_code >= 400:
        errors.print(f"[red]{response.status_code}: {body.get('error', response.text)}[/red]")
        raise typer.Exit(1)
    if response.status_code == 202:
        errors.print(f"[yellow]still running; status at {response.headers.get('location')}[/]")
    return body


def _print_json(value: object) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


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
            f"{len(billing['duplicates'])} duplicate(s), {billing['refund_amount']:.2f} "
            f"{billing['currency'] or ''} at {billing['merchant'] or '-'}",
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
        table.add_row("lease ends", f"{case['lease_ends_at']} (a resume waits until then)")
    if case.get("error"):
        table.add_row("error", f"[red]{case['error']}[/red]")
    table.add_row("response", case.get("final_response") or "-")
    console.print(table)


@app.command()
def submit(
    demo: Annotated[bool, typer.Option("--demo", help="Submit the case_8842 demo.")] = False,
    file: Annotated[
        Path | None, typer.Option("--file", help="A JSON request body to submit.")
    ] = None,
    case_id: Annotated[str | None, typer.Option("--case-id", help="Override the case id.")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option("--idempotency-key", help="Makes a retried submit safe.")
    ] = None,
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """Submit a support case (the demo, or a JSON body from a file)."""
    if demo == (file is not None):
        raise typer.BadParameter("give exactly one of --demo or --file")
    body: dict[str, Any] = demo_case() if demo else json.loads(file.read_text())  # type: ignore[union-attr]
    if case_id:
        body["case_id"] = case_id
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    case = _call("POST", api, "/cases", json=body, headers=headers)
    _print_json(case) if as_json else _print_case(case)


@app.command()
def show(case: str, api: ApiOption = DEFAULT_API, as_json: JsonOption = False) -> None:
    """A case's status and result."""
    answer = _call("GET", api, f"/cases/{case}")
    _print_json(answer) if as_json else _print_case(answer)


@app.command()
def checkpoints(
    case: str,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """A case's checkpoint history, newest first."""
    answer = _call("GET", api, f"/cases/{case}/checkpoints", params={"limit": limit})
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
    case: str,
    limit: Annotated[int, typer.Option(help="How many entries, newest first.")] = 100,
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """A case's audit trail: who wrote which section, at which version."""
    answer = _call("GET", api, f"/cases/{case}/audit", params={"limit": limit})
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
    case: str,
    decision: Annotated[str, typer.Argument(help="approve or reject")],
    note: Annotated[str | None, typer.Option(help="Why.")] = None,
    api: ApiOption = DEFAULT_API,
    as_json: JsonOption = False,
) -> None:
    """Approve or reject an escalated refund (as the token's caller); the case then runs on."""
    if decision not in ("approve", "reject"):
        raise typer.BadParameter("decision must be approve or reject")
    answer = _call("POST", api, f"/cases/{case}/review", json={"decision": decision, "note": note})
    _print_json(answer) if as_json else _print_case(answer)


@app.command()
def resume(
    case: str,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait",
            help="While a previous runner's lease keeps the case, wait for it to end "
            "(the answer's Retry-After), then resume.",
        ),
    ] = True,
    max_wait: Annotated[
        float, typer.Option(help="Give up waiting after this many seconds in all.")
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
    answer = _answer(response, body)
    _print_json(answer) if as_json else _print_case(answer)


@app.command()
def health(api: ApiOption = DEFAULT_API, as_json: JsonOption = False) -> None:
    """Up or down; each tier's health too for a caller with Cases.Operate."""
    answer = _call("GET", api, "/health")
    if as_json:
        _print_json(answer)
        return
    if answer.get("tiers") is None:
        console.print(f"overall: {answer['status']} (tier details need Cases.Operate)")
        return
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


def main() -> None:
    app()
