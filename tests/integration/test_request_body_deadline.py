"""The request deadline (API_REQUEST_DEADLINE_SECONDS) counts the time the request's body
takes to arrive, in a real server: uvicorn, serving the app to a client that writes its body
a byte at a time, answers 408 at the deadline and closes the connection rather than hold
it (and the worker) for as long as the client likes. No store is reached."""

from __future__ import annotations

import asyncio
import time

import uvicorn

from devstack import free_port
from tests.support.slow_body import (
    BODY,
    DEADLINE_SECONDS,
    MARGIN_SECONDS,
    TRICKLE_SECONDS,
    bounded_app,
)


async def test_a_real_server_answers_a_trickling_client_408_in_time() -> None:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            bounded_app(), host="127.0.0.1", port=port, lifespan="off", log_level="warning"
        )
    )
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not serving.done(), "the server did not start"
            await asyncio.sleep(0.02)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = (
            f"POST /api/cases HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
        )
        writer.write(head.encode())
        await writer.drain()

        async def trickle() -> None:
            for byte in BODY:
                await asyncio.sleep(TRICKLE_SECONDS)
                writer.write(bytes([byte]))
                await writer.drain()

        trickling = asyncio.create_task(trickle())
        started = time.monotonic()
        try:
            status_line = await asyncio.wait_for(
                reader.readline(), DEADLINE_SECONDS + MARGIN_SECONDS
            )
            elapsed = time.monotonic() - started
            headers = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
            # Closed after the answer: the bytes still trickling in are not a next request.
            rest = await asyncio.wait_for(reader.read(), MARGIN_SECONDS)
        finally:
            trickling.cancel()
            # Ended either way; the server may have closed the connection under it.
            await asyncio.gather(trickling, return_exceptions=True)
            writer.close()
        assert status_line.startswith(b"HTTP/1.1 408"), status_line
        assert "connection: close\r\n" in headers, headers
        assert b"did not arrive within 0.5 s" in rest, rest
        assert DEADLINE_SECONDS <= elapsed < DEADLINE_SECONDS + MARGIN_SECONDS, elapsed
    finally:
        server.should_exit = True
        await serving
