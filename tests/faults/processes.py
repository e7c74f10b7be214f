"""Driving worker.py subprocesses: JSON-line events in, commands out, signals by our own pid."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .report import REPO_ROOT

WORKER = Path(__file__).with_name("worker.py")
# What the editable install puts on the path, spelled out so a worker never depends on it.
PYTHONPATH = os.pathsep.join(str(REPO_ROOT / part) for part in (".", "function_app", "scripts"))
Event = dict[str, Any]


def _unread_bytes(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


class Worker:
    """One worker.py process; `events` collects what it printed, in order."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), *command],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": PYTHONPATH, **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,
        )
        self.events: list[Event] = []
        self._queue: queue.Queue[Event] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with contextlib.suppress(ValueError):
                self._queue.put(json.loads(line))

    def send(self, message: Event | str) -> None:
        assert self.process.stdin is not None
        text = message if isinstance(message, str) else json.dumps(message)
        self.process.stdin.write((text + "\n").encode())
        self.process.stdin.flush()

    def expect(self, predicate: Callable[[Event], bool], timeout: float, what: str) -> Event:
        """The first event (already seen or new) matching `predicate`, within `timeout`."""
        for event in self.events:
            if predicate(event):
                return event
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self._queue.get(timeout=min(left, 0.05))
            except queue.Empty:
                if self.process.poll() is not None and self._queue.empty():
                    break
                continue
            self.events.append(event)
            if predicate(event):
                return event
        self._log.flush()
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise TimeoutError(
            f"worker {self.pid}: no {what} within {timeout}s; saw {self.events[-5:]}\n{tail}"
        )

    def drain_stopped(self) -> list[Event]:
        """Everything a SIGSTOPped worker printed before it stopped: what is still in the
        pipe or in the reader's hands is waited for, so no earlier event arrives later."""
        assert self.process.stdout is not None
        pipe = self.process.stdout.fileno()
        deadline = time.monotonic() + 5
        while _unread_bytes(pipe) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # lines the reader already took from the pipe reach the queue
        return self.drain()

    def drain(self) -> list[Event]:
        while True:
            try:
                self.events.append(self._queue.get_nowait())
            except queue.Empty:
                return self.events

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
                os.killpg(self.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        self._log.close()
