"""sim.throttle's ``--alternate`` mode: the link switches between unlimited and throttled at every exchange."""

from __future__ import annotations

import asyncio

import pytest

from sim.throttle import EXCHANGE_BYTES, TOGGLE_GAP, Alternation, ThrottleProxy


def test_alternation_switches_after_each_reply_before_the_next_fetch() -> None:
    a = Alternation(up_rate=125_000.0, down_rate=250_000.0, exchange_bytes=50_000, gap=0.5)
    assert not a.throttled and a.rates_now() == (None, None)
    # round 1: the message comes down with ~20 KB of requests going up: not a reply
    for i in range(10):
        assert not a.on_chunk(0.01 * i, "down", 16_000)
        assert not a.on_chunk(0.01 * i, "up", 2_000)
    # the reply: 80 KB up; the server's responses come down during it (no switch mid-reply)
    for i in range(5):
        assert not a.on_chunk(5.0 + 0.01 * i, "up", 16_000)
        assert not a.on_chunk(5.0 + 0.01 * i, "down", 100)
    # a poll right after the reply (less than the gap): still unlimited
    assert not a.on_chunk(5.2, "up", 300) and not a.on_chunk(5.21, "down", 300)
    # the first downlink chunk a gap after the reply: switch to throttled, once
    assert a.on_chunk(6.0, "down", 300)
    assert a.throttled and a.rates_now() == (125_000.0, 250_000.0)
    assert not a.on_chunk(6.1, "down", 16_000)
    # round 2's reply, then the switch back
    for i in range(4):
        a.on_chunk(20.0 + 0.1 * i, "up", 16_000)
    assert a.on_chunk(21.0, "down", 100) and not a.throttled


def test_alternation_needs_a_reply_sized_burst() -> None:
    a = Alternation(None, None, exchange_bytes=50_000, gap=0.5)
    # 60 KB of small polls, each a gap apart: never one burst of 50 KB
    for i in range(200):
        a.on_chunk(1.0 * i, "up", 300)
        assert not a.on_chunk(1.0 * i + 0.6, "down", 300)
    assert not a.throttled


@pytest.mark.parametrize("kw", [{"exchange_bytes": 0}, {"gap": 0.0}])
def test_alternation_rejects_bad_settings(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="out of range"):
        Alternation(1.0, 1.0, **kw)  # type: ignore[arg-type]


def test_proxy_alternates_and_logs_the_switch() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def scenario() -> tuple[list[tuple[float, str, int]], float | None, bool]:
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        proxy = ThrottleProxy(("127.0.0.1", server.sockets[0].getsockname()[1]), 1, up_rate=50e6,
                              down_rate=40e6, record=True, alternate=True)
        port = (await proxy.start())[0]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x" * (EXCHANGE_BYTES + 10_000))  # a reply-sized upload
        await writer.drain()
        await reader.readexactly(EXCHANGE_BYTES + 10_000)
        await asyncio.sleep(TOGGLE_GAP + 0.3)
        writer.write(b"ping")  # its echo is the first downlink chunk after the gap
        await writer.drain()
        await reader.readexactly(4)
        link = proxy.links[0]
        rate, throttled = link.down.rate, link.alternate is not None and link.alternate.throttled
        writer.close()
        await proxy.stop()
        server.close()
        await server.wait_closed()
        return link.events, rate, throttled

    events, rate, throttled = asyncio.run(scenario())
    states = [e for e in events if e[1] == "state"]
    assert throttled and rate == 40e6
    assert len(states) == 1 and states[0][2] == 1
    # the switch comes after every chunk of the upload and before the ping's echo
    last_big_up = max(t for t, d, n in events if d == "up" and n > 4)
    assert last_big_up <= states[0][0] <= [t for t, d, n in events if d == "down"][-1]
