"""A loopback TCP proxy the test controls, to cut the network between app and a store.

It runs its own event loop in a daemon thread, so the same proxy serves clients
in the test's loop, in other threads, or in subprocesses. Only ever forwards
127.0.0.1:<free port> to a server on 127.0.0.1 that the test started.

- `cut("reset")`: every open connection is reset and the listener closes, so
  new connections are refused (a crashed peer, a firewall RST).
- `cut("blackhole")`: connections stay open and new ones are accepted, but no
  byte crosses in either direction (a partition; clients hit their timeouts).
- `restore()`: forward again. Connections that lived through a blackhole are
  reset (bytes were lost, the stream is broken); clients reconnect on their own.
- `latency_seconds`: each chunk is held that long before it is forwarded, either way
  (a slow or distant server: every round trip costs twice that).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal

from devstack import free_port

LOOPBACK = "127.0.0.1"
CutMode = Literal["reset", "blackhole"]


@dataclass
class ProxyStats:
    accepted: int = 0
    reset: int = 0
    bytes_forwarded: int = 0
    bytes_dropped: int = 0


class LoopbackProxy:
    def __init__(self, target_port: int, *, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self.stats = ProxyStats()
        self._mode: CutMode | None = None
        self.latency_seconds = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # ------------------------------------------------------------------ control (any thread)

    def start(self) -> LoopbackProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def cut(self, mode: CutMode = "reset") -> None:
        self._call(self._cut(mode))

    def restore(self) -> None:
        self._call(self._restore())

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    @property
    def is_cut(self) -> bool:
        return self._mode is not None

    def __enter__(self) -> LoopbackProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _call(self, coro: object) -> None:
        future: Future[None] = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        future.result(timeout=10)

    # ------------------------------------------------------------------ the proxy loop

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, LOOPBACK, self.port, reuse_address=True
        )

    async def _cut(self, mode: CutMode) -> None:
        self._mode = mode
        if mode == "reset":
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
                self._server = None
            for writer in list(self._writers):
                _reset(writer)
                self.stats.reset += 1
            self._writers.clear()

    async def _shutdown(self) -> None:
        """Reset, then end every connection's task while the loop still runs: left pending,
        their `finally` ran at garbage collection against the closed loop (a warning)."""
        await self._cut("reset")
        serving = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in serving:
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)

    async def _restore(self) -> None:
        if self._mode == "blackhole":
            # A stream that lost bytes can never be valid again (TCP would have
            # retransmitted them): such connections die, clients reconnect.
            for writer in list(self._writers):
                _reset(writer)
            self._writers.clear()
        self._mode = None
        if self._server is None:
            await self._listen()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        self._writers.add(writer)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            # A blackholed connection never reaches the server at all.
            while self._mode == "blackhole":
                if not await self._drain(reader):
                    return
            up_reader, upstream_writer = await asyncio.open_connection(LOOPBACK, self.target_port)
            self._writers.add(upstream_writer)
            await asyncio.gather(
                self._pump(reader, upstream_writer),
                self._pump(up_reader, writer),
            )
        except OSError:
            pass
        finally:
            for end in (writer, upstream_writer):
                if end is not None:
                    self._writers.discard(end)
                    end.close()

    async def _drain(self, reader: asyncio.StreamReader) -> bool:
        """Swallow what a blackholed client sends; False once it hangs up."""
        try:
            data = await asyncio.wait_for(reader.read(65536), timeout=0.2)
        except TimeoutError:
            return True
        self.stats.bytes_dropped += len(data)
        return bool(data)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await source.read(65536)
                if not data:
                    break
                if self.latency_seconds:
                    await asyncio.sleep(self.latency_seconds)
                if self._mode is not None:
                    self.stats.bytes_dropped += len(data)
                    continue
                sink.write(data)
                await sink.drain()
                self.stats.bytes_forwarded += len(data)
        except (OSError, RuntimeError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                # A partition loses the close too: the peer keeps its end open until
                # restore() resets it (or its own timeouts end it).
                if self._mode != "blackhole" and sink.can_write_eof():
                    sink.write_eof()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0, so the peer sees a reset rather than a clean EOF."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
