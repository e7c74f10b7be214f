"""`agent-state stack` and `serve` as a user meets them, each a real CLI process on its own
workdir and free ports: interrupted starts, crashed servers, stale state, bad arguments."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import devstack
from devstack.stack import state_file

REPO_ROOT = Path(__file__).resolve().parents[2]
# The worktree's own code, not whatever the editable install points at.
PYTHONPATH = os.pathsep.join(str(REPO_ROOT / part) for part in (".", "function_app", "scripts"))
CLI = [sys.executable, "-c", "from agent_state_cli.cli import main; main()"]
FREE_PORTS = ("--redis-port", "0", "--cosmos-port", "0", "--issuer-port", "0")


def cli_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": PYTHONPATH, "COLUMNS": "200", **extra}


def agent_state(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        env=cli_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A stack directory whose recorded servers are stopped however the test ends."""
    yield tmp_path
    devstack.down(tmp_path)


@pytest.mark.parametrize(
    "stop",
    [signal.SIGINT, signal.SIGTERM, signal.SIGHUP],
    ids=["ctrl-c", "kill", "terminal-closed"],
)
def test_stack_up_stopped_midway_leaves_nothing_running(
    workdir: Path, stop: signal.Signals
) -> None:
    """`stack up` stopped while it waits for the emulator (Redis already up): no server it
    started outlives it, since none is recorded yet for `stack down` to stop."""
    process = subprocess.Popen(
        [*CLI, "stack", "up", "--workdir", str(workdir), *FREE_PORTS],
        env=cli_env(),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    seen, ports = [], []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("starting "):
            ports.append(int(line.split(":")[1].split()[0]))
        if line.startswith("starting cosmos on"):
            # While the CLI waits for the emulator to answer: its process runs (past the
            # CLI's Popen, which cleans up after itself), and it takes longer than this.
            while not _servers_on(ports[-1]):
                time.sleep(0.01)
            time.sleep(0.2)
            process.send_signal(stop)
            break
    output = "".join(seen) + process.communicate(timeout=60)[0]
    try:
        assert process.returncode != 0, output
        deadline = time.monotonic() + 10
        while any(map(_listening, ports)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [port for port in ports if _listening(port)] == [], output
    finally:
        for port in ports:
            for pid in _servers_on(port):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)


def _servers_on(port: int) -> list[int]:
    """Pids of local servers started for `port` (a session of their own, their command line
    naming the port), so a test kills only what its CLI left behind."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            session = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[3])
        except (OSError, ValueError, IndexError):
            continue
        words = cmdline.replace(":", " ").split()
        named = any(s in cmdline for s in ("redis-server", "cosmos-emulator", "devstack.issuer"))
        if named and session == int(proc.name) and str(port) in words:
            found.append(int(proc.name))
    return found


def test_stack_up_in_a_workdir_that_cannot_be_a_directory_says_so_in_one_line(
    tmp_path: Path,
) -> None:
    """A dangling link (or a path under /proc, or without permission): not mkdir's
    traceback, and no server left running."""
    workdir = tmp_path / "stack"
    workdir.symlink_to(tmp_path / "gone" / "stack")
    result = agent_state("stack", "up", "--workdir", str(workdir), *FREE_PORTS)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"cannot start the stack in {workdir}" in lines[0] and "File exists" in lines[0]
    assert devstack.status(workdir) == {"running": False}


@pytest.mark.parametrize("command", [("stack", "up", *FREE_PORTS), ("stack", "status"), ("serve",)])
def test_a_workdir_that_is_a_file_is_named_as_not_a_directory(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """It blamed the state file (`<file>/stack.json` is unreadable), which the user never
    wrote, and told them to delete it."""
    workdir = tmp_path / "notes.txt"
    workdir.write_text("mine")
    result = agent_state(*command, "--workdir", str(workdir))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"workdir {workdir} is not a directory" in lines[0], lines[0]
    assert "state file" not in lines[0] and "starting redis" not in result.stdout
    assert workdir.read_text() == "mine"


@pytest.mark.parametrize("existing", [False, True], ids=["new-workdir", "existing-workdir"])
def test_a_failed_stack_up_leaves_no_directory_it_made_and_no_server(
    tmp_path: Path, existing: bool
) -> None:
    """Cosmos's port is taken once Redis runs: Redis is stopped, and the workdir (or, in
    one that existed, the server directories) it made were left behind."""
    workdir = tmp_path / "stack"
    if existing:
        workdir.mkdir()
        (workdir / "keep.txt").write_text("mine")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        result = agent_state(
            "stack", "up", "--workdir", str(workdir), *FREE_PORTS, "--cosmos-port", str(busy)
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"port {busy} (cosmos) is already in use" in result.stderr
    started = [line for line in result.stdout.splitlines() if line.startswith("starting redis")]
    assert started and "redis ready" in result.stdout, result.stdout
    redis_port = int(started[0].split(":")[1].split()[0])
    assert not _listening(redis_port)
    if existing:
        assert sorted(p.name for p in workdir.iterdir()) == ["keep.txt"]
    else:
        assert not workdir.exists(), sorted(p.name for p in workdir.iterdir())


@pytest.mark.parametrize("option", ["--redis-port", "--cosmos-port", "--issuer-port"])
def test_stack_up_refuses_a_port_out_of_range(workdir: Path, option: str) -> None:
    ports = dict(zip(FREE_PORTS[::2], FREE_PORTS[1::2], strict=True))
    ports[option] = "70000"
    result = agent_state("stack", "up", "--workdir", str(workdir), *sum(ports.items(), ()))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert option in result.stderr and "65535" in result.stderr
    assert devstack.status(workdir) == {"running": False}


def test_serve_refuses_a_port_out_of_range_before_starting_anything(workdir: Path) -> None:
    result = agent_state("serve", "--workdir", str(workdir), "--port", "70000", *FREE_PORTS)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--port" in result.stderr and "65535" in result.stderr
    assert "starting redis" not in result.stdout
    assert not (workdir / "redis").exists()


def test_serve_on_a_busy_port_says_so_before_starting_the_stack(workdir: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        result = agent_state("serve", "--workdir", str(workdir), "--port", str(busy), *FREE_PORTS)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"port {busy} (api) is already in use by pid {os.getpid()}" in lines[0]
    assert "--port" in lines[0]
    # Refused up front: no stack was started (and stopped) for nothing.
    assert "starting redis" not in result.stdout


def test_serve_with_a_wrong_setting_says_which_in_one_line_before_starting_the_stack(
    workdir: Path,
) -> None:
    """Not uvicorn's startup traceback after "API on ..." was printed: the variable and
    what is wrong with it, checked before the stack starts (it started it first, seconds
    for the emulator, then refused and stopped it)."""
    result = subprocess.run(
        [
            *CLI,
            "serve",
            "--workdir",
            str(workdir),
            "--port",
            str(devstack.free_port()),
            *FREE_PORTS,
        ],
        env=cli_env(CASE_REVIEW_THRESHOLD="-5"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "CASE_REVIEW_THRESHOLD" in lines[0] and "greater than or equal to 0" in lines[0]
    assert "API on" not in result.stdout
    assert "starting redis" not in result.stdout, result.stdout
    assert not (workdir / "redis").exists()
    assert devstack.status(workdir) == {"running": False}


def test_a_server_that_died_under_serve_shows_as_dead(workdir: Path) -> None:
    """`serve` started the stack, so its servers are its children: one killed stays a
    zombie until `serve` ends, and `stack status` must not call it alive."""
    serve = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--workdir",
            str(workdir),
            "--port",
            str(devstack.free_port()),
            *FREE_PORTS,
        ],
        env=cli_env(),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not devstack.status(workdir).get("running") and time.monotonic() < deadline:
            time.sleep(0.2)
        redis_pid = devstack.status(workdir)["servers"]["redis"]["pid"]  # type: ignore[index]
        os.kill(redis_pid, signal.SIGKILL)
        while _alive(redis_pid):
            time.sleep(0.05)
        result = agent_state("stack", "status", "--workdir", str(workdir), "--json")
        assert json.loads(result.stdout)["alive"]["redis"] is False
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        serve.wait(30)


@contextlib.contextmanager
def _serving(workdir: Path, **env: str) -> Iterator[list[str]]:
    """`serve` on a workdir of its own and free ports (with `env` added to its environment),
    once its API listens: the lines it printed, up to how to submit the demo case; once
    Ctrl-C stopped it, all it printed."""
    port = devstack.free_port()
    serve = subprocess.Popen(
        [*CLI, "serve", "--workdir", str(workdir), "--port", str(port), *FREE_PORTS],
        env=cli_env(**env),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    assert serve.stdout is not None
    printed: list[str] = []
    try:
        printed.append(serve.stdout.readline())
        while "submit the demo case:" not in printed[-1]:
            assert printed[-1], "serve ended without printing how to submit the demo case"
            printed.append(serve.stdout.readline())
        deadline = time.monotonic() + 60
        while not _listening(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        yield printed
    finally:
        os.killpg(serve.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's process group
        printed.append(serve.communicate(timeout=30)[0])


def test_the_submit_command_serve_prints_works_against_a_stack_of_its_own_workdir(
    workdir: Path,
) -> None:
    """Client commands find the issuer of the default workdir's stack only: the hint of a
    `serve --workdir` stack sent no token (or a token of another stack's issuer), and the
    API answered 401. Served from a shell holding a deployment's settings (`eval "$(azd env
    get-values)"`), its AUTH_ALLOWED_CLIENT_IDS refused the local issuer's tokens too."""
    deployment = {"AUTH_ALLOWED_CLIENT_IDS": "04b07795-8ddb-461a-bbee-02f9e1bf7b46"}
    with _serving(workdir, **deployment) as printed:
        hint = printed[-1].partition("submit the demo case:")[2].strip()
        command = shlex.split(hint)
        settings: dict[str, str] = {}
        while "=" in command[0]:  # leading NAME=value words, as a shell takes them
            name, _, value = command.pop(0).partition("=")
            settings[name] = value
        assert command[0] == "agent-state", hint
        submitted = subprocess.run(
            [*CLI, *command[1:]],
            env=cli_env(**settings),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert submitted.returncode == 0, (hint, submitted.stderr)
        assert "completed" in submitted.stdout, submitted.stdout


def test_ctrl_c_on_serve_says_the_data_of_the_stack_it_started_is_gone(workdir: Path) -> None:
    """As `stack down` (and so Ctrl-C on scripts/run.sh) says: the emulator and Redis kept
    everything in memory, and stopping the stack `serve` started lost it."""
    with _serving(workdir) as printed:
        pass
    output = "".join(printed)
    assert devstack.status(workdir) == {"running": False}, output
    assert devstack.MEMORY_ONLY_NOTE in output.replace("\n", " "), output


def test_a_recorded_pid_now_used_by_another_program_is_left_alone(workdir: Path) -> None:
    """After a reboot (or long enough), a pid from a stale stack.json belongs to some other
    program: `stack status` must not call it the stack, nor `stack down` stop it."""
    up = agent_state("stack", "up", "--workdir", str(workdir), *FREE_PORTS)
    assert up.returncode == 0, up.stdout + up.stderr
    recorded = json.loads(state_file(workdir).read_text())
    devstack.down(workdir)
    # Another program (its own session, as a daemon's) now holds the pid redis had.
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        recorded["servers"] = {"redis": {**recorded["servers"]["redis"], "pid": other.pid}}
        state_file(workdir).write_text(json.dumps(recorded))

        status = agent_state("stack", "status", "--workdir", str(workdir))
        assert "not running" in status.stdout, status.stdout
        down = agent_state("stack", "down", "--workdir", str(workdir))
        assert other.poll() is None, "stack down stopped a process the stack never started"
        assert down.returncode == 0 and "nothing was running" in down.stdout, down.stdout
    finally:
        other.kill()
        other.wait()


def test_stack_down_names_a_server_that_had_already_died(workdir: Path) -> None:
    up = agent_state("stack", "up", "--workdir", str(workdir), *FREE_PORTS)
    assert up.returncode == 0, up.stdout + up.stderr
    redis_pid = devstack.status(workdir)["servers"]["redis"]["pid"]  # type: ignore[index]
    os.kill(redis_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(redis_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    down = agent_state("stack", "down", "--workdir", str(workdir))
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped: cosmos, issuer" in down.stdout, down.stdout
    assert "already stopped before `stack down`: redis" in down.stdout, down.stdout


def test_stack_status_exits_3_while_a_server_of_the_stack_is_down(workdir: Path) -> None:
    """It showed the server `NO` and exited 0, so a script (or CI step) checking the stack
    with it went on against a stack without Redis."""
    up = agent_state("stack", "up", "--workdir", str(workdir), *FREE_PORTS)
    assert up.returncode == 0, up.stdout + up.stderr
    for extra in ((), ("--json",)):
        healthy = agent_state("stack", "status", "--workdir", str(workdir), *extra)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    redis_pid = devstack.status(workdir)["servers"]["redis"]["pid"]  # type: ignore[index]
    os.kill(redis_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(redis_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    shown = agent_state("stack", "status", "--workdir", str(workdir))
    assert shown.returncode == 3, shown.stdout + shown.stderr
    [redis_row] = [line for line in shown.stdout.splitlines() if "redis" in line.split()[:2]]
    assert "NO" in redis_row.split(), shown.stdout
    [line] = shown.stderr.strip().splitlines()
    assert "not running: redis" in line and "stack down --workdir" in line, line
    as_json = agent_state("stack", "status", "--workdir", str(workdir), "--json")
    assert as_json.returncode == 3, as_json.stdout + as_json.stderr
    assert json.loads(as_json.stdout)["alive"] == {"redis": False, "cosmos": True, "issuer": True}


@pytest.mark.parametrize("command", [("status",), ("down",), ("up", *FREE_PORTS)])
def test_an_unreadable_state_file_is_named_not_a_traceback(
    workdir: Path, command: tuple[str, ...]
) -> None:
    state_file(workdir).write_text("")  # a write cut short
    try:
        result = agent_state("stack", command[0], "--workdir", str(workdir), *command[1:])
    finally:
        state_file(workdir).unlink()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "JSONDecodeError" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(state_file(workdir)) in lines[0], result.stderr


def test_submit_to_a_malformed_api_url_is_a_usage_error() -> None:
    result = subprocess.run(
        [*CLI, "submit", "--demo", "--api", "http://[::1"],
        env=cli_env(AGENT_STATE_TOKEN="x"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "--api" in result.stderr
    assert "'http://[::1' is not a URL" in result.stderr


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "does not exist"),
        ("not json", "is not JSON"),
        ("[1, 2]", "is not a JSON object"),
        # The API refuses a key named twice; the CLI kept the last (`"amount": 612.4` here)
        # and sent a body the API took, the ambiguity settled for the caller.
        (
            '{"transactions": [{"amount": 49.99, "amount": 612.40}]}',
            "the key 'amount' appears more than once in one object",
        ),
    ],
    ids=["missing", "not-json", "not-an-object", "duplicate-key"],
)
def test_submit_a_file_it_cannot_use_is_a_usage_error(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    body = tmp_path / "case.json"
    if content is not None:
        body.write_text(content)
    result = subprocess.run(
        [*CLI, "submit", "--file", str(body), "--case-id", "c1", "--api", "http://127.0.0.1:1"],
        env=cli_env(AGENT_STATE_TOKEN="x"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "--file" in result.stderr
    assert expected in result.stderr


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_serve_stopped_while_the_api_starts_stops_the_stack_it_started(
    workdir: Path, stop: signal.Signals
) -> None:
    """Stopped once its stack runs and while the app loads: that stack stops too."""
    port = devstack.free_port()
    process = subprocess.Popen(
        [*CLI, "serve", "--workdir", str(workdir), "--port", str(port), *FREE_PORTS],
        env=cli_env(),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("submit the demo case"):
            process.send_signal(stop)
            break
    recorded = devstack.status(workdir)
    output = "".join(seen) + process.communicate(timeout=60)[0]
    ports = [info["port"] for info in recorded["servers"].values()]  # type: ignore[attr-defined]
    assert len(ports) == 3, output
    assert [port for port in ports if _listening(port)] == [], output
    assert devstack.status(workdir) == {"running": False}, output


@pytest.mark.parametrize(
    "record", [{"pid": os.getpid()}, "redis"], ids=["without-port", "not-a-mapping"]
)
def test_a_server_record_without_its_port_is_named_not_a_traceback(
    workdir: Path, record: object
) -> None:
    """A state file edited by hand (or by an older `up`): `status` ended in `KeyError:
    'port'` for a live pid, and called a stack running on a record it skipped not running."""
    state_file(workdir).write_text(json.dumps({"servers": {"redis": record}, "env": {}}))
    try:
        result = agent_state("stack", "status", "--workdir", str(workdir))
    finally:
        state_file(workdir).unlink()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "the record of redis has no port" in lines[0], result.stderr


# How the README loads the stack's settings into a shell (said there twice).
README_ENV_SNIPPET = 'settings="$(.venv/bin/agent-state stack env)" && eval "$settings"'


def _readme_env_snippet(workdir: Path) -> str:
    """The README's way to load the stack's settings into a shell, aimed at `workdir`."""
    assert (REPO_ROOT / "README.md").read_text().count(README_ENV_SNIPPET) == 2
    return README_ENV_SNIPPET.replace(
        "stack env", f"stack env --workdir {shlex.quote(str(workdir))}"
    )


def _in_bash(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", script],
        env=cli_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_loading_the_settings_of_a_stack_not_running_fails_in_one_line(tmp_path: Path) -> None:
    """Found by review: the README's snippet piped `stack status --json` into Python that
    ended in a KeyError traceback when the stack was not running (no `env` then)."""
    loaded = _in_bash(_readme_env_snippet(tmp_path / "stack"))
    assert loaded.returncode != 0, loaded.stdout + loaded.stderr
    assert "Traceback" not in loaded.stderr, loaded.stderr
    [line] = loaded.stderr.strip().splitlines()
    assert "the local stack is not running" in line, line
    assert "agent-state stack up --workdir" in line, line


def test_the_settings_of_a_running_stack_load_into_a_shell_as_they_are(tmp_path: Path) -> None:
    """The `export` lines survive the shell: values with spaces, quotes and `$` arrive
    whole. The stack is a record naming this test's own process as its (live) server."""
    env = {"REDIS_URL": "redis://127.0.0.1:6399/0", "ODD_VALUE": "a b 'c' \"d\" $HOME [x] `e`"}
    me = {"pid": os.getpid(), "port": 6399, "started": devstack.servers.process_start(os.getpid())}
    state_file(tmp_path).write_text(
        json.dumps({"workdir": str(tmp_path), "servers": {"redis": me}, "env": env})
    )
    try:
        loaded = _in_bash(
            f'{_readme_env_snippet(tmp_path)} && printf "%s\\n" "$REDIS_URL" "$ODD_VALUE"'
        )
    finally:
        state_file(tmp_path).unlink()  # not `stack down`: it would stop this test's process
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert loaded.stdout.splitlines() == [env["REDIS_URL"], env["ODD_VALUE"]], loaded.stdout


def test_loading_the_settings_of_a_stack_that_lost_a_server_names_it(tmp_path: Path) -> None:
    """Settings pointing at a server that died would load without a word."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    servers = {
        "redis": {"pid": os.getpid(), "port": 6399},
        "cosmos": {"pid": dead.pid, "port": 8099},
    }
    state_file(tmp_path).write_text(json.dumps({"servers": servers, "env": {"A": "1"}}))
    try:
        loaded = _in_bash(_readme_env_snippet(tmp_path))
    finally:
        state_file(tmp_path).unlink()
    assert loaded.returncode != 0, loaded.stdout + loaded.stderr
    [line] = loaded.stderr.strip().splitlines()
    assert "has lost cosmos" in line and "stack up --workdir" in line, line


def test_serve_leaves_running_a_stack_started_after_it_stopped_its_own(workdir: Path) -> None:
    """`stack down` then `stack up` from another terminal while `serve` ran: Ctrl-C on
    `serve` stopped that new stack too, which it never started (and `stack down` is the
    command that owns it), leaving the user's next commands on a dead stack."""
    with _serving(workdir):
        assert agent_state("stack", "down", "--workdir", str(workdir)).returncode == 0
        again = agent_state("stack", "up", "--workdir", str(workdir), *FREE_PORTS)
        assert again.returncode == 0, again.stdout + again.stderr
        theirs = devstack.status(workdir)
    after = devstack.status(workdir)
    assert after.get("running") is True, after
    assert after["servers"] == theirs["servers"]
    assert all(after["alive"].values()), after  # type: ignore[union-attr]


def test_run_sh_on_a_stack_that_lost_a_server_names_it(tmp_path: Path) -> None:
    """`stack status` exits 3 for such a stack: run.sh (`set -o pipefail`) took that for no
    stack and ran `stack up`, which called the stack already running. The stack is a record
    naming this test's own process as its (live) Redis and a finished one as its emulator."""
    repo, workdir = _run_sh_repo(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    servers = {
        "redis": {"pid": os.getpid(), "port": 6399},
        "cosmos": {"pid": dead.pid, "port": 8099},
    }
    env = {"AUTH_ISSUER": "http://127.0.0.1:8098"}
    state_file(workdir).write_text(json.dumps({"servers": servers, "env": env}))
    try:
        run = subprocess.run(
            ["bash", str(repo / "scripts" / "run.sh")],
            env=cli_env(PORT=str(devstack.free_port())),
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        state_file(workdir).unlink()  # not `stack down`: it would stop this test's process
    assert run.returncode != 0, run.stdout + run.stderr
    assert "has lost cosmos" in run.stderr, run.stdout + run.stderr


def _run_sh_repo(tmp_path: Path) -> tuple[Path, Path]:
    """A repo holding scripts/run.sh, whose `.venv/bin/agent-state` is the real CLI aimed
    at a workdir of this test (run.sh names none: the default one); and that workdir."""
    repo, workdir = tmp_path / "repo", tmp_path / "stack"
    (repo / "scripts").mkdir(parents=True)
    (repo / ".venv" / "bin").mkdir(parents=True)
    workdir.mkdir()
    (repo / "scripts" / "run.sh").write_text((REPO_ROOT / "scripts" / "run.sh").read_text())
    (repo / "scripts" / "bootstrap.sh").write_text("exit 0\n")
    cli = repo / ".venv" / "bin" / "agent-state"
    cli.write_text(
        f'#!/usr/bin/env bash\nexec {shlex.join(CLI)} "$@" --workdir {shlex.quote(str(workdir))}\n'
    )
    cli.chmod(0o755)
    return repo, workdir


def test_run_sh_leaves_running_a_stack_started_after_it_stopped_its_own(tmp_path: Path) -> None:
    """As `serve`: Ctrl-C on `scripts/run.sh` ran `stack down` on whatever stack was then
    recorded, also one `stack up` started from another terminal after a `stack down`."""
    repo, workdir = _run_sh_repo(tmp_path)
    port = devstack.free_port()
    zero = {f"AGENT_STATE_{name.upper()}_PORT": "0" for name in ("redis", "cosmos", "issuer")}
    run = subprocess.Popen(
        ["bash", str(repo / "scripts" / "run.sh")],
        env=cli_env(PORT=str(port), **zero),
        cwd=repo,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not _listening(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _listening(port)
        assert agent_state("stack", "down", "--workdir", str(workdir)).returncode == 0
        again = agent_state("stack", "up", "--workdir", str(workdir), *FREE_PORTS)
        assert again.returncode == 0, again.stdout + again.stderr
        theirs = devstack.status(workdir)
    finally:
        os.killpg(run.pid, signal.SIGINT)
        run.wait(60)
    try:
        after = devstack.status(workdir)
        assert after.get("running") is True, after
        assert after["servers"] == theirs["servers"]
    finally:
        devstack.down(workdir)
