"""sim.throttle: bytes pass unchanged both ways, are counted, and everything is closed at the end.

Whether the rate holds is a timing claim; ``sim.link_check`` measures it into its JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sim.throttle import ThrottleProxy, TokenBucket

REPO = Path(__file__).resolve().parents[2]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data[::-1])  # reversed: the reply differs from the request, per chunk
        await writer.drain()
    writer.close()


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_bytes_pass_unchanged_and_listeners_close() -> None:
    payload = os.urandom(300_000)

    async def scenario() -> tuple[bytes, dict[str, object], list[int]]:
        echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
        target = echo.sockets[0].getsockname()[1]
        proxy = ThrottleProxy(("127.0.0.1", target), 2, up_rate=50e6, down_rate=50e6)
        ports = await proxy.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", ports[1])
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        got = await reader.read()  # until the echo side closes
        writer.close()
        await asyncio.sleep(0.05)
        stats = proxy.stats()
        await proxy.stop()
        echo.close()
        await echo.wait_closed()
        return got, stats, ports

    got, stats, ports = asyncio.run(scenario())
    # the echo reverses each chunk it reads; the total is the same bytes, each chunk reversed
    assert len(got) == len(payload) and sorted(got) == sorted(payload)
    links = stats["links"]
    assert isinstance(links, list)
    assert links[1]["bytes_up"] == len(payload) and links[1]["bytes_down"] == len(payload)
    assert links[0]["bytes_up"] == 0 and links[0]["connections"] == 0
    assert all(_port_closed(p) for p in ports)


def test_identity_through_plain_forward() -> None:
    """A sink that records what arrives: the bytes are exactly those sent, in order."""
    payload = os.urandom(200_000)
    received = bytearray()

    async def scenario() -> None:
        async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.extend(await reader.read())
            writer.write(b"ok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(sink, "127.0.0.1", 0)
        proxy = ThrottleProxy(("127.0.0.1", server.sockets[0].getsockname()[1]), 1, None, None)
        (port,) = await proxy.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        writer.write_eof()
        assert await reader.read() == b"ok"
        writer.close()
        await proxy.stop()
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())
    assert bytes(received) == payload


@pytest.mark.parametrize("rate,cap", [(0.0, 10), (-1.0, 10), (10.0, 0)])
def test_bucket_rejects_bad_settings(rate: float, cap: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        TokenBucket(rate, cap)


def test_process_writes_ports_and_stats_and_exits_on_sigterm(tmp_path: Path) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    target = srv.getsockname()[1]
    got = bytearray()

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                got.extend(data)
            conn.sendall(b"done")

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    ready, events = tmp_path / "ports.json", tmp_path / "events.json"
    proc = subprocess.Popen([sys.executable, "-m", "sim.throttle", "--target", f"127.0.0.1:{target}",
                             "--listeners", "1", "--mbit", "100", "--ready-file", str(ready),
                             "--events-file", str(events), "--record"], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, "throttle exited before listening"
            assert time.monotonic() < deadline, "throttle did not write its ports"
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert info["pid"] == proc.pid
        (port,) = info["ports"]
        payload = os.urandom(50_000)
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            reply = b""
            while data := c.recv(65536):
                reply += data
        assert reply == b"done" and bytes(got) == payload
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        srv.close()
    stats = json.loads(events.read_text())
    (link,) = stats["links"]
    assert link["bytes_up"] == len(payload) and link["bytes_down"] == 4
    assert sum(n for _, d, n in link["events"] if d == "up") == len(payload)
    assert _port_closed(port)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.json", "ports.json"]  # no .tmp left
