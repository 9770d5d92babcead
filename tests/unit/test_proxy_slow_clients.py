"""The proxy against clients that send slowly (issue 18, item 2): headers and bodies trickled in
to hold its descriptors. Real sockets against a real proxy in front of a fake vLLM instance (the
double of test_proxy); the timeouts are short here, the defaults 10 s and 30 s."""
from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

from pd.config import ProxyConfig
from pd.proxy.server import Proxy
from tests.unit.test_proxy import REQ, FakeVLLM, run

KEY = "sesame"
SHORT = 0.3  # header and body timeouts of these tests
KEEPALIVE = 8.0  # far longer: what closes the connections here is the header clock


@asynccontextmanager
async def proxy_on(**cfg):
    fake = FakeVLLM("c0")
    frunner = web.AppRunner(fake.app())
    await frunner.setup()
    await web.TCPSite(frunner, "127.0.0.1", 0).start()
    fake.url = f"http://127.0.0.1:{frunner.addresses[0][1]}"
    cfg.setdefault("first_token", "decode")
    proxy = Proxy([], [fake.url], ProxyConfig(header_timeout_s=SHORT, body_timeout_s=SHORT, **cfg), None,
                  mode="colocated")
    proxy.api_key = KEY
    prunner, port = await proxy.start(limit=64, keepalive_s=KEEPALIVE)
    try:
        yield proxy, port
    finally:
        await prunner.cleanup()
        await frunner.cleanup()


async def _read_to_close(reader: asyncio.StreamReader, within: float) -> bytes:
    """All the peer sends until it closes the connection (a reset counts as closed); fails the
    test if it is still open after ``within`` seconds."""
    got = b""
    try:
        while True:
            more = await asyncio.wait_for(reader.read(65536), within)
            if not more:
                return got
            got += more
    except ConnectionResetError:
        return got


def _request(body: bytes, key: str = KEY) -> bytes:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def test_headers_sent_slowly_are_cut_off_before_the_key_is_checked():
    """Half a request line, then a byte every 50 ms, never the end of the headers: the connection
    is closed after the header timeout, though it is never idle (before, aiohttp kept it for its
    keep-alive time, 75 s in older releases)."""
    async def go():
        async with proxy_on() as (proxy, port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/compl")

            async def trickle():
                for _ in range(200):
                    await asyncio.sleep(0.05)
                    writer.write(b"e")

            t = asyncio.ensure_future(trickle())
            try:
                assert await _read_to_close(reader, KEEPALIVE / 2) == b""  # closed, nothing answered
            finally:
                t.cancel()
                writer.close()
            assert proxy.clock.slow.count == 1
            # a client that connects and sends nothing at all is let go as soon
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await _read_to_close(reader, KEEPALIVE / 2) == b""
            writer.close()
            assert proxy.clock.slow.count == 2
    run(go())


def test_a_body_sent_slowly_gets_408_and_the_connection_closed_even_with_the_key():
    async def go():
        async with proxy_on() as (proxy, port):
            body = json.dumps(REQ).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_request(body)[:-len(body) // 2])  # the headers and half the body, then nothing
            answer = await _read_to_close(reader, KEEPALIVE / 2)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
            assert b"proxy.body_timeout_s" in answer
            assert proxy.clock.slow.count == 0  # its headers came in time
    run(go())


def test_clients_that_send_in_time_are_unaffected():
    """A kept-alive connection idle between its requests for longer than the header timeout (the
    idle time is the keep-alive's, not the headers'), and ordinary requests and answers."""
    async def go():
        async with proxy_on() as (proxy, port):
            body = json.dumps(REQ).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(2):
                writer.write(_request(body))
                status = await reader.readline()
                assert status.startswith(b"HTTP/1.1 200 "), status
                length = 0
                while (line := await reader.readline()) != b"\r\n":
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                await asyncio.sleep(3 * SHORT)  # idle, longer than the header timeout
            writer.close()
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as c:
                for _ in range(3):
                    async with c.post(f"http://127.0.0.1:{port}/v1/completions", json=REQ) as r:
                        assert r.status == 200
                        await r.read()
            assert proxy.clock.slow.count == 0
    run(go())
