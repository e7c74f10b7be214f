"""The local stack mechanism itself: real servers up on loopback, stopped by pid."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import devstack
from devstack import PostgresServer, RedisServer, ServerStartError, Stack, free_port, running
from devstack.stack import state_file


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_session_stack_serves_every_tier(stack: Stack) -> None:
    assert stack.redis and stack.cosmos and stack.postgres
    for server in stack.servers:
        assert _listening(server.port), server.name
    env = stack.env()
    assert env["COSMOS_ENDPOINT"].startswith("https://127.0.0.1:")
    assert env["REDIS_URL"].startswith("redis://127.0.0.1:")
    assert env["POSTGRES_URL"].startswith("postgresql://postgres@127.0.0.1:")
    assert env["AUTH_ISSUER"].startswith("http://127.0.0.1:")
    assert env["AUTH_JWKS_URL"] == f"{env['AUTH_ISSUER']}/keys"


def test_the_stack_issuer_signs_tokens_its_jwks_verifies(stack: Stack) -> None:
    """The local stand-in for Entra: RS256 with a key made at start, Entra's v2 claims."""
    import json
    import urllib.request

    import jwt

    from devstack.issuer import object_id_for, request_token

    env = stack.env()
    token = request_token(env["AUTH_ISSUER"], "dana", ["Cases.Review"])
    with urllib.request.urlopen(env["AUTH_JWKS_URL"], timeout=5) as answer:
        keys = jwt.PyJWKSet.from_dict(json.loads(answer.read()))
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in keys.keys if k.key_id == kid)
    claims = jwt.decode(
        token,
        key.key,
        algorithms=["RS256"],
        audience=env["AUTH_AUDIENCE"],
        issuer=env["AUTH_ISSUER"],
    )
    assert claims["roles"] == ["Cases.Review"] and claims["name"] == "dana"
    assert claims["oid"] == object_id_for("dana") and claims["nbf"] <= claims["exp"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/token"), ("GET", "/keys"), ("GET", "/.well-known/openid-configuration")],
)
def test_the_stack_issuer_answers_no_page_that_rebound_its_own_name_to_loopback(
    stack: Stack, method: str, path: str
) -> None:
    """DNS rebinding: a web page the developer opens re-points its own host name at
    127.0.0.1, and its script then reads the issuer's answers as same-origin ones, a
    token for any role included. A browser names that page's host in `Host`; the
    stack's own clients name the loopback address the issuer listens on."""
    import http.client
    import json
    from urllib.parse import urlsplit

    port = urlsplit(stack.env()["AUTH_ISSUER"]).port
    assert port is not None
    for host, expected in ((f"rebound.example:{port}", 421), (f"127.0.0.1:{port}", 200)):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            body = json.dumps({"name": "page", "roles": ["Cases.Operate"]}).encode()
            connection.request(
                method,
                path,
                body=body if method == "POST" else None,
                headers={"Host": host, "Content-Type": "application/json"},
            )
            answer = connection.getresponse()
            text = answer.read().decode()
        finally:
            connection.close()
        assert answer.status == expected, (host, text)
        if expected == 421:
            assert "access_token" not in text and "keys" not in text


def test_second_stack_gets_other_ports_and_stops_its_own(tmp_path: Path, stack: Stack) -> None:
    other = Stack.plan(tmp_path, with_cosmos=False)
    with running(other):
        assert other.redis is not None and stack.redis is not None
        assert other.redis.port != stack.redis.port
        assert _listening(other.redis.port)
    assert not _listening(other.redis.port)
    # the session's own server is untouched
    assert _listening(stack.redis.port)


def test_port_in_use_is_reported(tmp_path: Path, stack: Stack) -> None:
    assert stack.redis is not None
    clash = RedisServer(port=stack.redis.port, workdir=tmp_path)
    with pytest.raises(ServerStartError, match="already in use"):
        clash.start()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def _python(code: str, **popen: Any) -> subprocess.Popen[str]:
    """`code` in a fresh interpreter that imports devstack: another xdist worker or run."""
    scripts = str(Path(devstack.__file__).resolve().parents[1])
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": scripts},
        stdout=subprocess.PIPE,
        text=True,
        **popen,
    )


def _ports(line: str) -> set[int]:
    return {int(port) for port in line.split()}


def test_a_port_reserved_by_another_process_is_never_handed_out() -> None:
    """Another run's free ports, not yet (or no longer) bound, are skipped; once that run
    is gone (killed here), they are free again. Enough ports on each side that an OS
    choice alone would hand out some of the holder's (about 70 expected)."""
    count = 1000
    holder = _python(
        "import sys\n"
        "from devstack import free_port\n"
        f"print(*(free_port() for _ in range({count})), flush=True)\n"
        "sys.stdin.read()\n",
        stdin=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        held = _ports(holder.stdout.readline())
        taker = _python(
            f"from devstack import free_port\nprint(*(free_port() for _ in range({count})))"
        )
        taken = _ports(taker.communicate(timeout=60)[0])
        assert taken & held == set()
        # Nor does one process get a port twice while it holds it.
        assert len(held) == len(taken) == count
    finally:
        holder.kill()
        holder.wait(timeout=10)
    some = sorted(held)[:20]
    again = _python(f"from devstack import reserve_port\nprint(*(reserve_port(p) for p in {some}))")
    assert again.communicate(timeout=60)[0].split() == ["True"] * len(some)


def test_a_restarted_server_keeps_its_port_reserved(tmp_path: Path) -> None:
    """While a fault test has its server down, no other run may take the port for itself."""
    server = RedisServer(port=free_port(), workdir=tmp_path / "redis")
    server.start()
    try:
        server.stop()
        other = _python(f"from devstack import reserve_port\nprint(reserve_port({server.port}))")
        assert other.communicate(timeout=60)[0].strip() == "False"
        server.start()
        assert _listening(server.port)
    finally:
        server.stop()


def test_an_attached_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """A test run killed from outside leaves no server behind."""
    import time

    port = free_port()
    starter = (
        "import sys, time, pathlib\n"
        "from devstack import RedisServer\n"
        f"RedisServer(port={port}, workdir=pathlib.Path({str(tmp_path)!r}), die_with_parent=True).start()\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", starter], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
        assert _listening(port)
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _listening(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _listening(port)
    finally:
        proc.kill()


def _stack_cli(*args: str) -> tuple[int, str, str]:
    """Exit code, what a terminal shows (stdout and stderr together), and stderr alone."""
    from typer.testing import CliRunner

    from agent_state_cli.cli import app

    result = CliRunner().invoke(app, ["stack", *args], env={"COLUMNS": "200"})
    return result.exit_code, result.output, result.stderr


def test_stack_up_on_a_busy_port_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        code, output, error = _stack_cli(
            "up", "--workdir", str(tmp_path), "--redis-port", str(busy), "--cosmos-port", "0"
        )
    assert code == 1 and "Traceback" not in output
    lines = error.strip().splitlines()
    assert len(lines) == 1, output
    assert f"port {busy} (redis) is already in use" in lines[0]
    assert f"pid {os.getpid()}" in lines[0]  # this test's own process holds it
    assert "--redis-port" in lines[0]
    assert devstack.status(tmp_path) == {"running": False}


def test_stack_down_says_the_emulator_data_is_gone(tmp_path: Path) -> None:
    code, output, _ = _stack_cli(
        "up",
        "--workdir",
        str(tmp_path),
        "--redis-port",
        "0",
        "--cosmos-port",
        "0",
        "--issuer-port",
        "0",  # free ports only: a developer's own stack (or a second run) may hold 8095
    )
    try:
        assert code == 0, output
        assert "memory only" in output
    finally:
        code, output, _ = _stack_cli("down", "--workdir", str(tmp_path))
    assert code == 0 and "stopped: redis, cosmos" in output
    assert "memory only" in output and "gone" in output


def test_serve_with_postgres_adds_it_to_the_running_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stack started without Postgres, then `serve --backend postgres` (what
    `STATE_COLD_BACKEND=postgres scripts/run.sh` runs against a stack it reuses): Postgres
    joins that stack, the API gets its URL, and `stack down` stops it with the rest."""
    from typer.testing import CliRunner

    from agent_state_cli.cli import app

    served: list[str] = []
    monkeypatch.setattr(
        "uvicorn.run", lambda *_args, **_kw: served.append(os.environ["POSTGRES_URL"])
    )
    # `serve` exports the stack's settings into its process: kept to this test.
    monkeypatch.setattr(os, "environ", dict(os.environ))
    free = ("--redis-port", "0", "--cosmos-port", "0", "--issuer-port", "0")
    code, output, _ = _stack_cli("up", "--workdir", str(tmp_path), *free)
    try:
        assert code == 0, output
        first = devstack.status(tmp_path)
        serve = ["serve", "--workdir", str(tmp_path), "--backend", "postgres"]
        result = CliRunner().invoke(app, [*serve, "--postgres-port", "0"])
        assert result.exit_code == 0, result.output
        assert "adding Postgres to the running stack" in result.output
        added = devstack.status(tmp_path)
        assert added["alive"] == {name: True for name in ("redis", "cosmos", "issuer", "postgres")}
        assert added["servers"]["redis"] == first["servers"]["redis"]  # type: ignore[index]
        assert served == [added["env"]["POSTGRES_URL"]]  # type: ignore[index]
        assert _listening(added["servers"]["postgres"]["port"])  # type: ignore[index]

        code, _, error = _stack_cli("up", "--workdir", str(tmp_path), "--postgres")
        assert code == 1 and "already running" in error
    finally:
        code, output, _ = _stack_cli("down", "--workdir", str(tmp_path))
        # `down` keeps Postgres's data (a dev stack's); as root it lives outside tmp_path.
        PostgresServer(port=0, workdir=tmp_path / "postgres").remove_data()
    assert code == 0 and "stopped: redis, cosmos, issuer, postgres" in output


def serving_a_recorded_stack(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, servers: dict[str, int]
) -> list[int]:
    """A stack recorded as running on `servers`' ports (its pids: this test's own process,
    alive), and `serve`'s server stubbed: the ports it would serve on are returned."""
    served: list[int] = []
    monkeypatch.setattr("uvicorn.run", lambda *_args, port, **_kw: served.append(port))
    monkeypatch.setattr(os, "environ", dict(os.environ))  # what `serve` exports stays here
    state_file(workdir).write_text(
        json.dumps(
            {
                "workdir": str(workdir),
                "servers": {name: {"port": p, "pid": os.getpid()} for name, p in servers.items()},
                # What `stack up` records for its clients (serve checks the app's settings).
                "env": {
                    "COSMOS_ENDPOINT": f"https://127.0.0.1:{servers['cosmos']}/",
                    "REDIS_URL": f"redis://127.0.0.1:{servers['redis']}/0",
                },
            }
        )
    )
    return served


def test_serve_refuses_a_port_the_running_stack_does_not_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from agent_state_cli.cli import app

    served = serving_a_recorded_stack(
        tmp_path, monkeypatch, {"redis": 6390, "cosmos": 8091, "issuer": 8095}
    )
    runner = CliRunner()
    serve = ["serve", "--workdir", str(tmp_path), "--port", "7171"]
    env = {"COLUMNS": "200"}
    result = runner.invoke(app, [*serve, "--redis-port", "7001"], env=env)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert "--redis-port 7001 cannot apply" in lines[0] and "redis on port 6390" in lines[0]

    result = runner.invoke(app, serve, env={**env, "AGENT_STATE_POSTGRES_PORT": "5440"})
    assert result.exit_code == 2 and "has postgres not running" in result.stderr
    assert served == []

    # The running stack's own port, or none given: it serves against that stack.
    assert runner.invoke(app, [*serve, "--redis-port", "6390"], env=env).exit_code == 0
    assert runner.invoke(app, serve, env=env).exit_code == 0
    assert served == [7171, 7171]


def test_serve_takes_port_zero_as_whatever_the_running_stack_chose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`AGENT_STATE_REDIS_PORT=0 bash scripts/run.sh` (README: `0`, any free port): `stack
    up` picks a free port, then `serve`, reading the same variables, refused the stack it
    had just started ("--redis-port 0 cannot apply: ... redis on port 59249")."""
    from typer.testing import CliRunner

    from agent_state_cli.cli import app

    # Ports `stack up` chose.
    servers = {"redis": 59249, "cosmos": 44813, "issuer": 36021}
    served = serving_a_recorded_stack(tmp_path, monkeypatch, servers)
    zero = {f"AGENT_STATE_{name.upper()}_PORT": "0" for name in (*servers, "postgres")}
    result = CliRunner().invoke(
        app,
        ["serve", "--workdir", str(tmp_path), "--port", "7171"],
        env={"COLUMNS": "200", **zero},
    )
    assert result.exit_code == 0, result.output
    assert served == [7171]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root's clusters live outside their workdir")
def test_a_cluster_whose_workdir_is_gone_is_removed_when_the_next_one_is_prepared(
    tmp_path: Path,
) -> None:
    """A test run killed before its cleanup leaves root's cluster in the temp folder; the
    next cluster prepared removes it, and not one whose workdir is still there."""
    orphan = PostgresServer(port=free_port(), workdir=tmp_path / "killed" / "postgres")
    kept = PostgresServer(port=free_port(), workdir=tmp_path / "kept" / "postgres")
    orphan.start()
    orphan.stop()
    kept.workdir.mkdir(parents=True)
    kept.prepare()
    shutil.rmtree(tmp_path / "killed")
    assert (orphan.data_dir / "PG_VERSION").exists()
    following = PostgresServer(port=free_port(), workdir=tmp_path / "next" / "postgres")
    following.workdir.mkdir(parents=True)
    try:
        following.prepare()
        assert not orphan.data_dir.exists()
        assert (kept.data_dir / "PG_VERSION").exists()
    finally:
        for server in (orphan, kept, following):
            server.remove_data()


def test_serve_refuses_a_running_stack_that_lost_a_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis crashed while the emulator runs: `serve` once started the API against the dead
    Redis, saying nothing (its health then `degraded`, every run without a hot tier)."""
    from typer.testing import CliRunner

    from agent_state_cli.cli import app

    served: list[int] = []
    monkeypatch.setattr("uvicorn.run", lambda *_args, port, **_kw: served.append(port))
    monkeypatch.setattr(os, "environ", dict(os.environ))  # what `serve` exports stays here
    alive = {"port": 8091, "pid": os.getpid()}
    # This process's pid recorded with another start: a pid reused since, i.e. dead Redis.
    dead = {"port": 6390, "pid": os.getpid(), "started": "another-boot:1"}
    state_file(tmp_path).write_text(
        json.dumps(
            {
                "workdir": str(tmp_path),
                "servers": {"redis": dead, "cosmos": alive, "issuer": {**alive, "port": 8095}},
                "env": {
                    "COSMOS_ENDPOINT": "https://127.0.0.1:8091/",
                    "REDIS_URL": "redis://127.0.0.1:6390/0",
                },
            }
        )
    )
    result = CliRunner().invoke(
        app, ["serve", "--workdir", str(tmp_path), "--port", str(free_port())]
    )
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "has lost redis" in lines[0] and "stack down" in lines[0]
    assert served == []
    assert state_file(tmp_path).exists()  # nothing stopped or forgotten


def test_the_stack_commands_a_message_suggests_name_its_workdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stack run from another `--workdir` was told to stop with a bare `agent-state stack
    down`, which stops the default workdir's stack (a developer's own) or finds nothing."""
    from typer.testing import CliRunner

    from agent_state_cli.cli import app

    served = serving_a_recorded_stack(
        tmp_path, monkeypatch, {"redis": 6390, "cosmos": 8091, "issuer": 8095}
    )
    named = f"--workdir {tmp_path}"
    code, _, error = _stack_cli("up", "--workdir", str(tmp_path))
    assert code == 1 and f"(agent-state stack down {named})" in error
    serve = ["serve", "--workdir", str(tmp_path), "--port", "7171", "--redis-port", "7001"]
    result = CliRunner().invoke(app, serve, env={"COLUMNS": "200"})
    assert result.exit_code == 2 and f"(agent-state stack down {named})" in result.stderr
    code, output, _ = _stack_cli("status", "--workdir", str(tmp_path / "idle"))
    assert code == 0 and f"(agent-state stack up {named}/idle)" in output
    assert served == []
