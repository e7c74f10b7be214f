"""The local stack: which servers run, where, and how to find them again.

`up` starts the servers detached and records their pids and ports in a state
file; `down` stops exactly those pids. Tests use `Stack` directly with their
own workdir and free ports, so they never collide with a developer's stack.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .servers import (
    REPO_ROOT,
    CosmosEmulator,
    LocalServer,
    PostgresServer,
    RedisServer,
    ServerStartError,
    TokenIssuer,
    free_port,
    process_start,
    stop_pid,
)

DEFAULT_WORKDIR = REPO_ROOT / ".local" / "stack"
DEFAULT_PORTS = {"redis": 6390, "cosmos": 8091, "postgres": 5440, "issuer": 8095}
# Redis runs without persistence and the emulator keeps everything in memory.
MEMORY_ONLY_NOTE = (
    "the Cosmos emulator (and Redis) keep data in memory only: what they held is gone "
    "once stopped; Postgres keeps its data"
)


def stack_command(verb: str, workdir: Path) -> str:
    """`agent-state stack VERB` for the stack of `workdir`: a hint without its `--workdir`
    would act on the default workdir's stack (a developer's own), not this one."""
    if workdir.resolve() == DEFAULT_WORKDIR.resolve():
        return f"agent-state stack {verb}"
    return f"agent-state stack {verb} --workdir {shlex.quote(str(workdir))}"


class StateFileUnreadable(RuntimeError):
    """The file recording a stack's servers cannot be read: which servers run is unknown."""


class WorkdirNotADirectory(StateFileUnreadable):
    """The workdir is a file (or lies under one): no stack runs or can be recorded there."""


@dataclass
class Stack:
    workdir: Path
    redis: RedisServer | None = None
    cosmos: CosmosEmulator | None = None
    postgres: PostgresServer | None = None
    issuer: TokenIssuer | None = None
    started: list[LocalServer] = field(default_factory=list)

    @classmethod
    def plan(
        cls,
        workdir: Path,
        *,
        with_redis: bool = True,
        with_cosmos: bool = True,
        with_postgres: bool = False,
        with_issuer: bool = True,
        ports: dict[str, int] | None = None,
        detached: bool = False,
    ) -> Stack:
        """Describe the servers to run; a port of 0 (or none given) means any free one.

        A stack that is not `detached` dies with the process (thread) that starts it.
        """
        chosen = ports or {}
        attached = not detached

        def port(name: str) -> int:
            return chosen.get(name) or free_port()

        return cls(
            workdir=workdir,
            redis=RedisServer(
                port=port("redis"), workdir=workdir / "redis", die_with_parent=attached
            )
            if with_redis
            else None,
            cosmos=CosmosEmulator(
                port=port("cosmos"), workdir=workdir / "cosmos", die_with_parent=attached
            )
            if with_cosmos
            else None,
            postgres=PostgresServer(
                port=port("postgres"), workdir=workdir / "postgres", die_with_parent=attached
            )
            if with_postgres
            else None,
            issuer=TokenIssuer(
                port=port("issuer"), workdir=workdir / "issuer", die_with_parent=attached
            )
            if with_issuer
            else None,
        )

    @property
    def servers(self) -> list[LocalServer]:
        return [s for s in (self.redis, self.cosmos, self.postgres, self.issuer) if s is not None]

    def start(self, progress: bool = False) -> None:
        for server in self.servers:
            if progress:
                print(f"starting {server.name} on 127.0.0.1:{server.port} ...", flush=True)
            server.start()
            self.started.append(server)
            if progress:
                print(f"  {server.name} ready (pid {server.pid})", flush=True)

    def stop(self) -> None:
        for server in reversed(self.started):
            server.stop()
        self.started.clear()

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for server in self.servers:
            values.update(server.env())  # type: ignore[attr-defined]
        return values

    def describe(self) -> dict[str, object]:
        return {
            "workdir": str(self.workdir),
            # With its start, a pid still names this server once the pid is reused.
            "servers": {
                s.name: {
                    "port": s.port,
                    "pid": s.pid,
                    "started": process_start(s.pid) if s.pid else None,
                }
                for s in self.servers
            },
            "env": self.env(),
        }


@contextmanager
def running(stack: Stack) -> Iterator[Stack]:
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def state_file(workdir: Path) -> Path:
    return workdir / "stack.json"


def up(
    workdir: Path = DEFAULT_WORKDIR,
    *,
    with_postgres: bool = False,
    ports: dict[str, int] | None = None,
) -> dict[str, object]:
    """Start the stack detached (it outlives this process) and record what was started.
    Asked for Postgres while a stack without it runs, add Postgres to that stack."""
    existing = status(workdir)
    chosen = {**DEFAULT_PORTS, **(ports or {})}
    if existing.get("running"):
        alive = existing.get("alive")
        if with_postgres and not (isinstance(alive, dict) and alive.get("postgres")):
            return _add_postgres(workdir, existing, chosen["postgres"])
        raise ServerStartError(
            f"a stack is already running from {workdir}; stop it first "
            f"({stack_command('down', workdir)})"
        )
    return _started(
        _planned(workdir, with_postgres=with_postgres, ports=ports),
        {"workdir": str(workdir), "servers": {}, "env": {}},
    )


def planned_env(
    workdir: Path = DEFAULT_WORKDIR,
    *,
    with_postgres: bool = False,
    ports: dict[str, int] | None = None,
) -> dict[str, str]:
    """The settings a stack `up` starts would give, before any server starts (a port of 0
    stands for a free one, which the start itself may choose differently)."""
    return _planned(workdir, with_postgres=with_postgres, ports=ports).env()


def _planned(workdir: Path, *, with_postgres: bool, ports: dict[str, int] | None) -> Stack:
    chosen = {**DEFAULT_PORTS, **(ports or {})}
    return Stack.plan(workdir, with_postgres=with_postgres, ports=chosen, detached=True)


def _add_postgres(workdir: Path, existing: dict[str, object], port: int) -> dict[str, object]:
    postgres = PostgresServer(port=port or free_port(), workdir=workdir / "postgres")
    recorded = {key: existing[key] for key in ("workdir", "servers", "env")}
    return _started(Stack(workdir, postgres=postgres), recorded)


def _started(stack: Stack, recorded: dict[str, object]) -> dict[str, object]:
    """Start `stack`'s servers, then record them with those `recorded` already running.
    Should one fail, those started are stopped and the directories made for them removed."""
    # Only those absent now: an existing one may hold a running stack's files, or data.
    made = [path for path in _directories(stack) if not os.path.lexists(path)]
    try:
        stack.start(progress=True)
    except BaseException:
        stack.stop()
        for path in made:
            shutil.rmtree(path, ignore_errors=True)
        raise
    started = stack.describe()
    description = {
        "workdir": started["workdir"],
        "servers": {**_mapping(recorded["servers"]), **_mapping(started["servers"])},
        "env": {**_mapping(recorded["env"]), **_mapping(started["env"])},
    }
    stack.workdir.mkdir(parents=True, exist_ok=True)
    # Replaced whole: a write cut short must not leave a half file naming no servers.
    path = state_file(stack.workdir)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(description, indent=2))
    partial.replace(path)
    return description


def _directories(stack: Stack) -> list[Path]:
    """What starting `stack` may create, outermost first."""
    found = [stack.workdir, *(server.workdir for server in stack.servers)]
    if stack.postgres is not None:
        found.append(stack.postgres.data_dir)  # outside the workdir when run as root
    return found


def _mapping(value: object) -> dict[str, object]:
    return dict(value) if isinstance(value, dict) else {}


def _recorded(path: Path) -> dict[str, object] | None:
    """What `up` recorded in `path`, None if nothing is."""
    try:
        description = json.loads(path.read_text())
        servers = description["servers"]
        if not isinstance(servers, dict):
            raise TypeError("servers is not a mapping")
        # Each as `up` writes it: `status` shows its port, `down` stops its pid.
        for name, info in servers.items():
            if not (isinstance(info, dict) and isinstance(info.get("port"), int)):
                raise TypeError(f"the record of {name} has no port")
    except FileNotFoundError:
        return None
    except NotADirectoryError as error:
        # Not the state file's fault: it would name a file the user never wrote.
        raise WorkdirNotADirectory(
            f"the stack's workdir {path.parent} is not a directory: choose another"
        ) from error
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise StateFileUnreadable(
            f"the stack's state file {path} is unreadable ({error}): stop the servers it "
            "recorded by hand if any still run, then delete it"
        ) from error
    return dict(description)


def status(workdir: Path = DEFAULT_WORKDIR) -> dict[str, object]:
    description = _recorded(state_file(workdir))
    if description is None:
        return {"running": False}
    servers = _mapping(description["servers"]).items()
    alive = {
        name: _alive(info) for name, info in servers if isinstance(info, dict) and info.get("pid")
    }
    return {**description, "alive": alive, "running": any(alive.values())}


@dataclass(frozen=True)
class Stopped:
    """What `down` found: servers it stopped, and recorded ones that had already died."""

    stopped: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)


def down(workdir: Path = DEFAULT_WORKDIR) -> Stopped:
    """Stop the servers recorded by `up` (by pid), then forget them."""
    path = state_file(workdir)
    description = _recorded(path)
    if description is None:
        return Stopped()
    found = Stopped()
    for name, info in _mapping(description["servers"]).items():
        if isinstance(info, dict) and _alive(info):
            stop_pid(int(info["pid"]))
            found.stopped.append(name)
        else:
            found.dead.append(name)
    path.unlink()
    return found


def _alive(info: dict[str, object]) -> bool:
    """Whether the recorded server still runs: its pid, started when recorded (a pid
    reused since by another program, or a zombie, is not the server)."""
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if info.get("started"):
        return process_start(pid) == info["started"]
    # Recorded without its start (an older stack file, or no /proc): the pid alone.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
