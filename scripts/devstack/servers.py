"""Real local servers (Redis, Cosmos emulator, Postgres) started as child processes.

Each server binds to loopback on a port chosen by the caller (or a free one),
keeps its data in a directory the caller owns, and is stopped by the pid this
module started: nothing here touches a process it did not launch.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
_PR_SET_PDEATHSIG = 1
# The state column of /proc/net/tcp for a listening socket.
_TCP_LISTEN = "0A"
# Shared by every run on the machine (not the temp dir, which TMPDIR may move per run).
RESERVATIONS_FILE = Path("/tmp/agent-state-ports.lock")
_PORT_ATTEMPTS = 200
_reservations: int | None = None
_reserved: set[int] = set()
_reservations_guard = threading.Lock()
# A forked child inherits the set but none of the locks (they belong to a process).
os.register_at_fork(after_in_child=_reserved.clear)

# The Cosmos emulator's well-known public key (documented by Microsoft; not a secret).
COSMOS_EMULATOR_KEY = (
    "C2y6yDjf5/R+ob0N8A7Cgv30VRDJIWEHLM+4QDU5DE2nQ9nDuVTqobD4b8mGGyPMbIZnqyMsEcaGQy67XIw/Jw=="
)


class ServerStartError(RuntimeError):
    """A local server did not become ready; the message carries its log tail."""


class PortInUse(ServerStartError):
    """The port a server should listen on is taken (by `holder`, when it can be told)."""

    def __init__(self, server: str, port: int, holder: str | None) -> None:
        by = f" by {holder}" if holder else ""
        super().__init__(f"{server}: port {port} is already in use{by}")
        self.server = server
        self.port = port
        self.holder = holder


def port_holder(port: int) -> str | None:
    """`pid N (name)` of the process listening on TCP `port`, if this user can see it
    (Linux /proc); None when it cannot be told."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == _TCP_LISTEN and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{inode}]")
    if not inodes:
        return None
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        # Processes come and go, and others' fds may be unreadable: skip those.
        with contextlib.suppress(OSError):
            for descriptor in (process / "fd").iterdir():
                if os.readlink(descriptor) in inodes:
                    name = (process / "comm").read_text().strip()
                    return f"pid {process.name} ({name})"
    return None


def check_port_free(server: str, port: int) -> None:
    """Raise `PortInUse` if something listens on loopback `port` (`server` would use it)."""
    if _port_open(port):
        raise PortInUse(server, port, port_holder(port))


def process_start(pid: int) -> str | None:
    """When process `pid` started (boot id and clock ticks since boot); None if it is gone
    or a zombie. With the pid it names one process: a later one reusing the pid differs."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        # The fields after the command name, which may itself hold spaces and parentheses.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    state, start_ticks = fields[0], fields[19]
    return None if state == "Z" else f"{boot}:{start_ticks}"


class NoFreePort(ServerStartError):
    """Every port the OS offered was reserved by another process (or this one)."""


def reserve_port(port: int) -> bool:
    """Reserve loopback `port` for this process, for the rest of its life; False if another
    process holds it. A byte-range lock on one shared file, at offset `port`: the kernel
    drops it when the process ends, however it ends, so a killed run leaves nothing that
    blocks, and the file never grows. (A process's own locks never conflict with each
    other, hence the set of ports it holds.)"""
    with _reservations_guard:
        if port in _reserved:
            return True
        try:
            fcntl.lockf(_reservations_fd(), fcntl.LOCK_EX | fcntl.LOCK_NB, 1, port)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        _reserved.add(port)
        return True


def free_port() -> int:
    """A free loopback TCP port, reserved for this process until it exits.

    The OS picks it; other runs and xdist workers skip it while it is reserved, even
    while nothing listens there: between this call and the server's start, and while a
    fault test has the server down for a restart (a stop cannot tell itself from a final
    one, so the reservation lasts as long as the process: as many ports as it asked for).
    """
    for _ in range(_PORT_ATTEMPTS):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
            # Reserved while still bound: no other process can be offered it in between.
            if port not in _reserved and reserve_port(port):
                return port
    raise NoFreePort(f"no unreserved loopback port in {_PORT_ATTEMPTS} offered by the OS")


def _reservations_fd() -> int:
    """This process's descriptor of the reservations file, opened once and never closed:
    closing any descriptor of that file would drop all of this process's locks on it."""
    global _reservations
    if _reservations is None:
        # Opened without O_CREAT when it exists: with fs.protected_regular, O_CREAT on
        # another account's file in /tmp is refused even when its mode allows writing.
        try:
            _reservations = os.open(RESERVATIONS_FILE, os.O_RDWR)
        except FileNotFoundError:
            _reservations = os.open(RESERVATIONS_FILE, os.O_RDWR | os.O_CREAT, 0o666)
            # Writable by every account's runs (the umask would narrow the mode).
            with contextlib.suppress(PermissionError):
                os.fchmod(_reservations, 0o666)
    return _reservations


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((LOOPBACK, port)) == 0


def _tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass(kw_only=True)
class LocalServer:
    """Base for one child-process server with a pid, a port and a log file."""

    name: str
    port: int
    workdir: Path
    # Ask the kernel to stop the server when the thread that started it dies, so a
    # test run killed from outside leaves no server behind. Off for a detached stack.
    die_with_parent: bool = False
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    # The signal that asks this server for a prompt, clean shutdown.
    stop_signal: signal.Signals = field(default=signal.SIGTERM, repr=False)

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        return _port_open(self.port)

    def prepare(self) -> None:
        """Per-server setup before the first start (data directories and the like)."""

    def popen_kwargs(self) -> dict[str, object]:
        return {}

    def start(self, timeout: float = 60.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        check_port_free(self.name, self.port)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=self._child_setup if self.die_with_parent else None,
            **self.popen_kwargs(),  # type: ignore[call-overload]
        )
        try:
            self._wait_ready(self.process, timeout)
        except BaseException:
            # Not ready, or interrupted (Ctrl-C) while waiting: the caller never learns of
            # this process, so it is stopped here rather than left running detached.
            self.stop()
            raise

    def _wait_ready(self, process: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with {process.returncode}:\n{_tail(self.log_path)}"
                )
            if self.ready():
                return
            time.sleep(0.1)
        raise ServerStartError(f"{self.name} not ready after {timeout}s:\n{_tail(self.log_path)}")

    def _child_setup(self) -> None:
        # Runs in the child between fork and exec (after any setuid), so it survives exec.
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(self.stop_signal))

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None:
            return
        stop_pid(self.process.pid, timeout, self.stop_signal)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=1)
        self.process = None

    def pause(self) -> None:
        """SIGSTOP the server (for fault tests): connections hang instead of failing."""
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)


def stop_pid(pid: int, timeout: float = 15.0, sig_stop: signal.Signals = signal.SIGTERM) -> None:
    """Signal the process group we started to stop, then SIGKILL it if it lingers."""
    for sig in (signal.SIGCONT, sig_stop):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie that is not our child still answers kill(0); treat it as gone.
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        return state != "Z"
    return True


@dataclass(kw_only=True)
class RedisServer(LocalServer):
    name: str = "redis"
    maxmemory: str | None = None
    maxmemory_policy: str | None = None

    def command(self) -> list[str]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerStartError("redis-server not found: run scripts/bootstrap.sh")
        argv = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            LOOPBACK,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--protected-mode",
            "yes",
        ]
        if self.maxmemory:
            argv += ["--maxmemory", self.maxmemory]
        if self.maxmemory_policy:
            argv += ["--maxmemory-policy", self.maxmemory_policy]
        return argv

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def env(self) -> dict[str, str]:
        return {"REDIS_URL": self.url}


@dataclass(kw_only=True)
class ClusterRedisServer(RedisServer):
    """A one-node Redis Cluster holding every slot: what Azure Managed Redis is (it runs
    clustered), so a script or transaction whose keys hash to different slots fails here
    with CROSSSLOT as it would there. Database 0 only."""

    name: str = "redis-cluster"
    # The cluster bus defaults to the port + 10000, past 65535 for a high free port.
    bus_port: int = field(default_factory=lambda: free_port())

    def command(self) -> list[str]:
        nodes = self.workdir / "nodes.conf"
        return [
            *super().command(),
            *("--cluster-enabled", "yes", "--cluster-config-file", str(nodes)),
            *("--cluster-port", str(self.bus_port)),
        ]

    def ready(self) -> bool:
        if not super().ready():
            return False
        import redis

        with redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=2) as client:
            try:
                info = client.cluster("INFO")
                if int(info["cluster_slots_assigned"]) == 0:
                    client.execute_command("CLUSTER ADDSLOTSRANGE", 0, 16383)
                    return False
                return bool(info["cluster_state"] == "ok")
            except redis.RedisError:
                return False


@dataclass(kw_only=True)
class CosmosEmulator(LocalServer):
    name: str = "cosmos"

    def command(self) -> list[str]:
        node = shutil.which("node")
        if node is None:
            raise ServerStartError("node not found: install Node.js")
        script = REPO_ROOT / "scripts" / "cosmos-emulator.js"
        if not (REPO_ROOT / "node_modules" / "@vercel" / "cosmosdb-server").exists():
            raise ServerStartError("cosmos emulator not installed: run scripts/bootstrap.sh")
        return [node, str(script), str(self.port), LOOPBACK]

    def popen_kwargs(self) -> dict[str, object]:
        return {"cwd": str(REPO_ROOT)}

    def ready(self) -> bool:
        if not _port_open(self.port):
            return False
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(self.endpoint, context=context, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    @property
    def endpoint(self) -> str:
        return f"https://{LOOPBACK}:{self.port}/"

    def env(self) -> dict[str, str]:
        return {"COSMOS_ENDPOINT": self.endpoint, "COSMOS_KEY": COSMOS_EMULATOR_KEY}


@dataclass(kw_only=True)
class TokenIssuer(LocalServer):
    """The local stand-in for Entra ID (`devstack.issuer`): a new signing key per start."""

    name: str = "issuer"
    audience: str = "api://agent-state-local"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "devstack.issuer",
            "--port",
            str(self.port),
            "--audience",
            self.audience,
        ]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/keys", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AUTH_ISSUER": self.url,
            "AUTH_JWKS_URL": f"{self.url}/keys",
            "AUTH_AUDIENCE": self.audience,
            # Empty: any client application. This issuer mints for any (tests ask for
            # others), and a deployment's list left in the shell would refuse them all.
            "AUTH_ALLOWED_CLIENT_IDS": "",
        }


def _postgres_bin(tool: str) -> str:
    found = shutil.which(tool)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for directory in versions:
        if (directory / tool).exists():
            return str(directory / tool)
    raise ServerStartError(f"{tool} not found: run scripts/bootstrap.sh (installs postgresql)")


@dataclass(kw_only=True)
class PostgresServer(LocalServer):
    """A throwaway cluster; Postgres refuses to run as root, so root drops to `postgres`."""

    name: str = "postgres"
    user: str = "postgres"
    # SIGINT is Postgres's "fast" shutdown; SIGTERM would wait for clients to disconnect.
    stop_signal: signal.Signals = field(default=signal.SIGINT, repr=False)

    @property
    def data_dir(self) -> Path:
        if os.geteuid() != 0:
            return self.workdir / "pgdata"
        # The `postgres` account may not be able to traverse the caller's (often 0700)
        # directories, so as root the cluster lives in a world-traversable temp folder
        # named after the caller's workdir.
        digest = hashlib.sha256(str(self.workdir.resolve()).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"agent-state-pg-{digest}"

    def _server_ids(self) -> tuple[int, int] | None:
        """(uid, gid) to drop to when running as root; None otherwise."""
        if os.geteuid() != 0:
            return None
        account = pwd.getpwnam(self.user)
        return account.pw_uid, account.pw_gid

    @property
    def _owner_marker(self) -> Path:
        return self.data_dir.with_name(f"{self.data_dir.name}.workdir")

    def prepare(self) -> None:
        if os.geteuid() == 0:
            _remove_orphaned_clusters()
            self._owner_marker.write_text(str(self.workdir.resolve()))
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ids = self._server_ids()
        if ids:
            os.chown(self.data_dir, *ids)
        subprocess.run(
            [
                _postgres_bin("initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            user=ids[0] if ids else None,
            group=ids[1] if ids else None,
        )

    def command(self) -> list[str]:
        return [
            _postgres_bin("postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-c",
            f"listen_addresses={LOOPBACK}",
            "-c",
            f"unix_socket_directories={self.data_dir}",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ]

    def popen_kwargs(self) -> dict[str, object]:
        ids = self._server_ids()
        return {"user": ids[0], "group": ids[1]} if ids else {}

    def ready(self) -> bool:
        if not _port_open(self.port):
            return False
        result = subprocess.run(
            [_postgres_bin("pg_isready"), "-h", LOOPBACK, "-p", str(self.port), "-U", "postgres"],
            capture_output=True,
            check=False,
        )
        return result.returncode == 0

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/postgres"

    def env(self) -> dict[str, str]:
        return {"POSTGRES_URL": self.url}

    def remove_data(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self._owner_marker.unlink(missing_ok=True)


def _remove_orphaned_clusters() -> None:
    """Root's clusters live in the temp folder, outside their workdir (`data_dir`): one
    whose workdir is gone (a test run killed before its cleanup) and whose server is not
    running would stay there for good, a few hundred MB each. Its marker names the
    workdir; a cluster without one is left alone."""
    for marker in Path(tempfile.gettempdir()).glob("agent-state-pg-*.workdir"):
        cluster = marker.with_suffix("")
        with contextlib.suppress(OSError):
            if Path(marker.read_text()).exists() or _cluster_running(cluster):
                continue
            shutil.rmtree(cluster, ignore_errors=True)
            marker.unlink(missing_ok=True)


def _cluster_running(cluster: Path) -> bool:
    try:
        pid = int((cluster / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    return _alive(pid)
