"""A rate-limited TCP link on loopback: a throttling proxy (asyncio, token bucket, both directions).

    python -m sim.throttle --target 127.0.0.1:9092 --listeners 2 --mbit 1 --ready-file ports.json \
        --events-file events.json

Each of the ``--listeners`` ports is one device's link: every connection accepted on
it is forwarded to ``--target``, and all of that listener's connections share one
token bucket per direction (``--mbit`` from the client to the target, ``--down-mbit``
back; default the same). Bytes pass unchanged; only their timing is shaped. Ports are
picked free at start and written to ``--ready-file`` (JSON ``{"ports": [...], "pid": N}``)
once listening. On SIGTERM / SIGINT the proxy closes every socket and writes
``--events-file``: per listener the bytes in each direction and, with ``--record``,
every forwarded chunk as ``[seconds since start, "up"|"down", bytes]``.

With ``--alternate`` each link switches between unlimited and the ``--mbit`` rate at
every exchange: it starts unlimited, and after each reply (an uplink burst of at least
``--exchange-bytes`` with gaps under ``TOGGLE_GAP`` s) it switches at the first
downlink chunk that comes ``TOGGLE_GAP`` s or more after that burst, i.e. before the
next message is fetched. So in a deployment where a SuperNode answers one message per
round, rounds 1, 3, 5, ... run unlimited and 2, 4, 6, ... throttled, interleaved in
time (``sim.link_check --alternate`` calibrates each throttled round on its unlimited
neighbours). Each switch is logged as ``[seconds, "state", 1 (throttled) | 0]``.

Used by ``sim.deploy`` (``throttle_mbit``) between SuperNodes and the SuperLink's
Fleet API, and by ``sim.link_check`` to compare measured round times with the
time-to-accuracy model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("sim.throttle")

#: Largest chunk read and forwarded at once (bytes); also the token bucket's default capacity.
CHUNK = 16 * 1024
#: ``--alternate``: seconds without uplink chunks that end a burst, and that must pass after a reply before
#: the link switches.
TOGGLE_GAP = 0.5
#: ``--alternate``: an uplink burst of at least this many bytes is a reply (a SuperNode's requests while
#: it fetches one message are ~20 KB).
EXCHANGE_BYTES = 50_000


class TokenBucket:
    """``rate`` bytes per second with bursts of at most ``capacity`` bytes; ``rate=None``: unlimited.

    Parameters
    ----------
    rate:
        Bytes per second (> 0), or None for no limit.
    capacity:
        Bucket size in bytes (>= 1); it starts full.
    """

    def __init__(self, rate: float | None, capacity: int = CHUNK) -> None:
        if rate is not None and not rate > 0:
            raise ValueError(f"rate={rate} is out of range; allowed: > 0 bytes/s or None (unlimited)")
        if capacity < 1:
            raise ValueError(f"capacity={capacity} is out of range; allowed: >= 1 byte")
        self.rate = rate
        self.capacity = capacity
        self.tokens = float(capacity)
        self.stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        """Wait until ``n`` bytes may pass (``n`` larger than the capacity is taken in capacity-sized parts)."""
        if self.rate is None:
            return
        async with self._lock:  # connections sharing the link queue in turn
            left = n
            while left > 0:
                part = min(left, self.capacity)
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens < part:
                    await asyncio.sleep((part - self.tokens) / self.rate)
                    continue
                self.tokens -= part
                left -= part


@dataclass
class Link:
    """One listener: its port, a bucket per direction, byte counters and (optionally) the chunk log."""

    up: TokenBucket
    down: TokenBucket
    port: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    connections: int = 0
    events: list[tuple[float, str, int]] = field(default_factory=list)
    alternate: Alternation | None = None


class Alternation:
    """Switches a link between unlimited and its configured rates at every exchange (``--alternate``).

    Parameters
    ----------
    up_rate, down_rate:
        The throttled rates, bytes per second (None: unlimited in that direction).
    exchange_bytes:
        An uplink burst of at least this many bytes is a reply.
    gap:
        Seconds without uplink chunks that end a burst; the switch happens at the first downlink
        chunk ``gap`` seconds or more after the reply's last chunk.
    """

    def __init__(self, up_rate: float | None, down_rate: float | None, exchange_bytes: int = EXCHANGE_BYTES,
                 gap: float = TOGGLE_GAP) -> None:
        if exchange_bytes < 1:
            raise ValueError(f"exchange_bytes={exchange_bytes} is out of range; allowed: >= 1")
        if not gap > 0:
            raise ValueError(f"gap={gap} is out of range; allowed: > 0 seconds")
        self.rates = (up_rate, down_rate)
        self.exchange_bytes = exchange_bytes
        self.gap = gap
        self.throttled = False
        self._burst = 0
        self._last_up: float | None = None
        self._reply_end: float | None = None

    def rates_now(self) -> tuple[float | None, float | None]:
        """(up, down) bytes per second in the current state."""
        return self.rates if self.throttled else (None, None)

    def on_chunk(self, t: float, direction: str, n: int) -> bool:
        """Account a chunk about to pass at time ``t``; return True when the link switches before it."""
        if direction == "up":
            if self._last_up is None or t - self._last_up >= self.gap:
                self._burst = 0
            self._burst += n
            self._last_up = t
            if self._burst >= self.exchange_bytes:
                self._reply_end = t
            return False
        if self._reply_end is not None and t - self._reply_end >= self.gap:
            self._reply_end = None
            self.throttled = not self.throttled
            return True
        return False


class ThrottleProxy:
    """Listeners on 127.0.0.1 forwarding to ``target``, each shaped by its own token buckets.

    Parameters
    ----------
    target:
        ``(host, port)`` every connection is forwarded to.
    listeners:
        Number of listening ports (one per device link), >= 1.
    up_rate, down_rate:
        Bytes per second client → target and target → client (None: unlimited).
    record:
        Keep every forwarded chunk's time, direction and size.
    """

    def __init__(self, target: tuple[str, int], listeners: int, up_rate: float | None, down_rate: float | None,
                 *, record: bool = False, capacity: int = CHUNK, alternate: bool = False,
                 exchange_bytes: int = EXCHANGE_BYTES) -> None:
        if listeners < 1:
            raise ValueError(f"listeners={listeners} is out of range; allowed: >= 1")
        self.target = target
        self.record = record
        if alternate:  # start unlimited; Alternation switches to the rates after the first reply
            self.links = [Link(TokenBucket(None, capacity), TokenBucket(None, capacity),
                               alternate=Alternation(up_rate, down_rate, exchange_bytes)) for _ in range(listeners)]
        else:
            self.links = [Link(TokenBucket(up_rate, capacity), TokenBucket(down_rate, capacity))
                          for _ in range(listeners)]
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.t0 = time.monotonic()

    @property
    def ports(self) -> list[int]:
        return [link.port for link in self.links]

    async def start(self) -> list[int]:
        """Open the listeners on free ports; return the ports."""
        for link in self.links:
            server = await asyncio.start_server(
                lambda r, w, link=link: self._accept(link, r, w), host="127.0.0.1", port=0)
            link.port = server.sockets[0].getsockname()[1]
            self._servers.append(server)
        log.info("throttle: ports %s -> %s:%d", self.ports, *self.target)
        return self.ports

    async def _accept(self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link.connections += 1
        try:
            t_reader, t_writer = await asyncio.open_connection(*self.target)
        except OSError as exc:
            log.warning("throttle: cannot reach %s:%d: %s", *self.target, exc)
            writer.close()
            return
        self._writers.update((writer, t_writer))
        up = asyncio.ensure_future(self._pump(reader, t_writer, link, "up"))
        down = asyncio.ensure_future(self._pump(t_reader, writer, link, "down"))
        self._tasks.update((up, down))
        try:
            await asyncio.gather(up, down, return_exceptions=True)
        except asyncio.CancelledError:
            pass  # stop(): the proxy is closing
        finally:
            self._tasks.difference_update((up, down))
            for w in (writer, t_writer):
                self._writers.discard(w)
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Link,
                    direction: str) -> None:
        bucket = link.up if direction == "up" else link.down
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if link.alternate is not None:
                    now = time.monotonic()
                    if link.alternate.on_chunk(now, direction, len(data)):
                        up_rate, down_rate = link.alternate.rates_now()
                        link.up.rate, link.down.rate = up_rate, down_rate
                        for b in (link.up, link.down):
                            b.tokens, b.stamp = float(b.capacity), now
                        if self.record:
                            link.events.append((round(now - self.t0, 6), "state", int(link.alternate.throttled)))
                    bucket = link.up if direction == "up" else link.down
                await bucket.take(len(data))
                writer.write(data)
                await writer.drain()
                if direction == "up":
                    link.bytes_up += len(data)
                else:
                    link.bytes_down += len(data)
                if self.record:
                    link.events.append((round(time.monotonic() - self.t0, 6), direction, len(data)))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof():
                    writer.write_eof()

    async def stop(self) -> None:
        """Close the listeners and every open connection."""
        for s in self._servers:
            s.close()
        for w in list(self._writers):
            w.close()
        for t in list(self._tasks):
            t.cancel()
        for s in self._servers:
            await s.wait_closed()
        await asyncio.sleep(0)

    def stats(self) -> dict[str, object]:
        """Per listener: port, bytes each way, connections, and the chunk log (with ``record``); ``t0_monotonic``:
        the ``time.monotonic()`` the chunk log's seconds count from (system-wide on Linux)."""
        return {"target": f"{self.target[0]}:{self.target[1]}", "t0_monotonic": self.t0,
                "links": [{"port": k.port, "bytes_up": k.bytes_up, "bytes_down": k.bytes_down,
                           "connections": k.connections,
                           "up_rate_bytes_per_s": k.up.rate, "down_rate_bytes_per_s": k.down.rate,
                           **({"events": k.events} if self.record else {})} for k in self.links]}


def mbit_to_bytes(mbit: float | None) -> float | None:
    """Mbit/s → bytes/s (None or 0: unlimited)."""
    return None if not mbit else mbit * 1e6 / 8.0


async def _serve(args: argparse.Namespace) -> int:
    host, _, port = args.target.rpartition(":")
    proxy = ThrottleProxy((host or "127.0.0.1", int(port)), args.listeners, mbit_to_bytes(args.mbit),
                          mbit_to_bytes(args.down_mbit if args.down_mbit is not None else args.mbit),
                          record=args.record, alternate=args.alternate, exchange_bytes=args.exchange_bytes)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ports = await proxy.start()
    if args.ready_file:
        tmp = Path(str(args.ready_file) + ".tmp")
        tmp.write_text(json.dumps({"ports": ports, "pid": os.getpid()}))
        tmp.replace(args.ready_file)  # atomic: a reader sees all ports or no file
    await stop.wait()
    await proxy.stop()
    if args.events_file:
        Path(args.events_file).write_text(json.dumps(proxy.stats()))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.throttle", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="host:port to forward to (e.g. the SuperLink's)")
    ap.add_argument("--listeners", type=int, default=1, help="ports to open, one per device link")
    ap.add_argument("--mbit", type=float, default=0.0, help="Mbit/s client -> target (0: unlimited)")
    ap.add_argument("--down-mbit", type=float, default=None, help="Mbit/s target -> client (default: --mbit)")
    ap.add_argument("--ready-file", type=Path, help="JSON with the ports, written once listening")
    ap.add_argument("--events-file", type=Path, help="JSON with byte counts (and chunk log), written at exit")
    ap.add_argument("--record", action="store_true", help="log every forwarded chunk (time, direction, bytes)")
    ap.add_argument("--alternate", action="store_true",
                    help="switch each link between unlimited and the rate at every exchange (starts unlimited)")
    ap.add_argument("--exchange-bytes", type=int, default=EXCHANGE_BYTES,
                    help="with --alternate: an uplink burst of at least this many bytes is a reply")
    args = ap.parse_args(argv)
    if args.exchange_bytes < 1:
        ap.error(f"--exchange-bytes={args.exchange_bytes} is out of range; allowed: >= 1")
    if args.listeners < 1:
        ap.error(f"--listeners={args.listeners} is out of range; allowed: >= 1")
    if args.mbit < 0 or (args.down_mbit is not None and args.down_mbit < 0):
        ap.error("--mbit/--down-mbit are out of range; allowed: >= 0 (0: unlimited)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
