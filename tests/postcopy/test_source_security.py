"""The page server's security and robustness, on a server that serves known memory (no guest):
TLS with a throwaway CA (and a wrong CA refused), listening only where told, and a soak of
thousands of random requests, valid and hostile, over HTTP and the page socket."""
from __future__ import annotations

import asyncio
import ctypes
import random
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import aiohttp
import msgpack
import pytest

from postcopy import wsframe
from postcopy.destination.client import FetchError, SyncPageConnection
from postcopy.destination.retry import FatalFetchError
from postcopy.destination.run import source_json
from postcopy.source.answers import Counts
from postcopy.source.page_server import PageServer
from postcopy.tls import TlsError, client_context, server_context
from proto import MAX_BATCH_PAGES, PAGE_SIZE, PROTOCOL_VERSION, Complete, ErrorReply, PageBatch, PageRequest, decode_any
from proto.version import MAX_BATCH_MESSAGE_BYTES

from served_memory import SERVED_TOKEN, Served  # type: ignore[import-not-found]

if TYPE_CHECKING:
    from tests.conftest import TlsFiles  # the session fixture tls_files

AUTH = {"Authorization": f"Bearer {SERVED_TOKEN}"}


def pages_of(batch: PageBatch) -> bytes:
    return b"".join(bytes(n * PAGE_SIZE) if data is None else bytes(data) for _, n, data in batch.runs())


def serve(served: Served, body: Callable[[PageServer, str], Awaitable[None]], *, host: str = "127.0.0.1",
          tls: ssl.SSLContext | None = None) -> None:
    async def main() -> None:
        header = served.header
        async with PageServer.resumed(served.memory, header, header.encode(), token=SERVED_TOKEN) as server:
            url = await server.start(host, 0, ssl_context=tls)
            await body(server, url)
    asyncio.run(main())


# -- TLS -------------------------------------------------------------------------------------

def test_pages_over_tls_verified_by_the_ca_match_memory(served: Served, tls_files: TlsFiles) -> None:
    async def body(server: PageServer, url: str) -> None:
        assert url.startswith("https://127.0.0.1:")
        conn = await asyncio.to_thread(SyncPageConnection, url, SERVED_TOKEN,
                                       ssl_context=client_context(str(tls_files.ca)))
        try:
            batch = await asyncio.to_thread(conn.fetch, 5 * PAGE_SIZE, 4, "demand")
            one = await asyncio.to_thread(conn.fetch, 9 * PAGE_SIZE, 1, "demand")
            # Only the event loop's SSL transport can read a TLS socket: no thread takes it.
            assert [type(s).__name__ for s in server._sockets] == ["PageSocket"]
        finally:
            await asyncio.to_thread(conn.close)
        assert pages_of(batch) == served.memory.read(5 * PAGE_SIZE, 4 * PAGE_SIZE)
        assert pages_of(one) == served.memory.read(9 * PAGE_SIZE, PAGE_SIZE)

    serve(served, body, tls=server_context(str(tls_files.cert), str(tls_files.key)))


def test_a_tls_client_that_pipelines_requests_and_reads_nothing_is_answered_only_as_it_reads(
        served: Served, tls_files: TlsFiles) -> None:
    """Sixty-four requests of every page in one write, then no reading: the server answers a
    few, until its transport is full, not all sixty-four (each would sit in its buffer,
    encrypted: a few hundred bytes of requests pinned a gigabyte). Then the client reads, and
    every answer comes, in order, right."""
    requests = 64

    async def body(server: PageServer, url: str) -> None:
        conn = await asyncio.to_thread(SyncPageConnection, url, SERVED_TOKEN,
                                       ssl_context=client_context(str(tls_files.ca)))
        try:
            request = PageRequest(0, MAX_BATCH_PAGES, "background")
            payload, key = request.encode(), b"\x01\x02\x03\x04"
            frame = wsframe.header(wsframe.OP_BINARY, len(payload), masked=True) + key + wsframe.mask(payload, key)
            await asyncio.to_thread(conn.ws.send_frame, frame * requests)  # one TLS record: one read there
            sent = [request] * requests
            await asyncio.sleep(0.5)  # the server's loop runs meanwhile; the client reads nothing
            answered = server.stats()["requests"]["background"]
            assert 1 <= answered <= 4, answered
            want = served.memory.read(0, MAX_BATCH_PAGES * PAGE_SIZE)
            for request in sent:
                assert pages_of(await asyncio.to_thread(conn.receive, request)) == want
            assert server.stats()["requests"]["background"] == requests
        finally:
            await asyncio.to_thread(conn.close)

    serve(served, body, tls=server_context(str(tls_files.cert), str(tls_files.key)))


def test_the_fault_paths_one_page_fetch_over_tls(served: Served, tls_files: TlsFiles) -> None:
    """fetch_page over TLS: the event loop's socket answers the demand frame on its fast path
    too; a zero page comes as a batch; the client does not poll a TLS socket."""
    async def body(server: PageServer, url: str) -> None:
        conn = await asyncio.to_thread(SyncPageConnection, url, SERVED_TOKEN, poll_ns=1_000_000,
                                       ssl_context=client_context(str(tls_files.ca)))
        try:
            assert conn.ws.poll_ns == 0
            address = await asyncio.to_thread(conn.fetch_page, 9 * PAGE_SIZE)
            zero = await asyncio.to_thread(conn.fetch_page, 8 * PAGE_SIZE)  # every 8th page is zero
            assert isinstance(address, int)
            assert ctypes.string_at(address, PAGE_SIZE) == served.memory.read(9 * PAGE_SIZE, PAGE_SIZE)
            assert isinstance(zero, PageBatch) and zero.zero == b"\x01"
            assert [server._board.counts(slot)[Counts.FAST_PAGES] for slot in server._sockets.values()] == [1]
            assert server._workers is None  # no fork server where every socket is TLS
        finally:
            await asyncio.to_thread(conn.close)

    serve(served, body, tls=server_context(str(tls_files.cert), str(tls_files.key)))


def test_a_server_certificate_from_another_ca_is_refused_with_a_clear_error(served: Served, tls_files: TlsFiles) -> None:
    async def body(server: PageServer, url: str) -> None:
        wrong = client_context(str(tls_files.other_ca))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=wrong)) as session:
            with pytest.raises(FatalFetchError, match="certificate is not trusted by the given CA"):
                await source_json(session, "GET", f"{url}/v1/vm/status", SERVED_TOKEN)
        with pytest.raises(FetchError, match="certificate verify failed"):
            await asyncio.to_thread(SyncPageConnection, url, SERVED_TOKEN, ssl_context=wrong)
        # Nor does a plain-HTTP client get anything from a TLS server.
        with pytest.raises(FetchError):
            await asyncio.to_thread(SyncPageConnection, url.replace("https", "http"), SERVED_TOKEN)
        assert server.stats()["ws_connections"] == 0

    serve(served, body, tls=server_context(str(tls_files.cert), str(tls_files.key)))


def test_unreadable_tls_files_are_a_clear_error(tls_files: TlsFiles) -> None:
    with pytest.raises(TlsError, match="cannot load TLS certificate /nonexistent"):
        server_context("/nonexistent", str(tls_files.key))
    with pytest.raises(TlsError, match="cannot load TLS CA certificate"):
        client_context(str(tls_files.key))  # a key is not a CA certificate


# -- where it listens ------------------------------------------------------------------------

def test_the_server_binds_only_the_address_it_is_given(served: Served) -> None:
    async def body(server: PageServer, url: str) -> None:
        port = int(url.rsplit(":", 1)[1])
        assert url == f"http://127.0.0.2:{port}"
        with socket.create_connection(("127.0.0.2", port), timeout=2):
            pass
        for other in ("127.0.0.1", "127.0.0.3"):  # other loopback addresses: not listened on
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((other, port), timeout=2).close()

    serve(served, body, host="127.0.0.2")


# -- authentication --------------------------------------------------------------------------

ROUTES = (("GET", "/v1/vm/status"), ("POST", "/v1/vm/sweep"), ("GET", "/v1/pages/ws"),
          ("POST", "/v1/migration/start"), ("POST", "/v1/migration/complete"), ("GET", "/v1/nowhere"))


def test_every_route_but_health_refuses_a_missing_or_wrong_token(served: Served) -> None:
    async def body(server: PageServer, url: str) -> None:
        async with aiohttp.ClientSession() as http:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": SERVED_TOKEN},
                            {"Authorization": f"bearer {SERVED_TOKEN}"}, {"Authorization": f"Bearer  {SERVED_TOKEN}"}):
                for method, path in ROUTES:
                    async with http.request(method, url + path, headers=headers) as resp:
                        assert resp.status == 401, (headers, path)
                        assert resp.headers["WWW-Authenticate"] == "Bearer"
                        assert "token" in ErrorReply.decode(await resp.read()).message
            async with http.get(f"{url}/v1/health") as resp:  # open by design: the state only
                assert resp.status == 200 and await resp.json() == {"state": "serving"}
        assert server.stats()["ws_connections"] == 0

    serve(served, body)


# -- the soak --------------------------------------------------------------------------------

SOAK_REQUESTS = 5000


def _random_frame(rng: random.Random, pages: int) -> bytes | str:
    roll = rng.random()
    if roll < 0.35:  # valid
        page = rng.randrange(pages)
        return PageRequest(page * PAGE_SIZE, rng.randint(1, min(64, pages - page)), rng.choice(
            ["demand", "readahead", "background"])).encode()
    if roll < 0.5:  # out of range or misaligned
        return msgpack.packb({"v": PROTOCOL_VERSION, "t": "page_request", "kind": "demand",
                              "gpa": rng.choice([pages * PAGE_SIZE, (pages - 1) * PAGE_SIZE, 1 << 51, 7, -4096]),
                              "count": rng.choice([1, 2, MAX_BATCH_PAGES])})
    if roll < 0.6:  # oversized (but under the 64 KiB frame limit)
        return bytes(rng.randint(129, 60_000))
    if roll < 0.7:
        return "text " * rng.randint(1, 20)
    if roll < 0.85:  # random bytes
        return rng.randbytes(rng.randint(0, 128))
    fields = {"v": rng.choice([PROTOCOL_VERSION, 0, 2, "1"]), "t": rng.choice(["page_request", "complete", 5]),
              "gpa": rng.choice([0, 4096, None, 1.5]), "count": rng.choice([0, 1, -1, MAX_BATCH_PAGES + 1, True]),
              "kind": rng.choice(["demand", "nope", 3])}
    for key in rng.sample(sorted(fields), rng.randint(0, 2)):
        del fields[key]
    return msgpack.packb(fields)


async def _random_http(http: aiohttp.ClientSession, url: str, rng: random.Random) -> tuple[int, bytes]:
    roll = rng.random()
    headers = dict(AUTH)
    if roll < 0.3:  # bad auth on any route
        headers = rng.choice([{}, {"Authorization": "Bearer " + rng.randbytes(8).hex()},
                              {"Authorization": "Basic " + SERVED_TOKEN}, {"Authorization": "x" * 4000}])
        method, path = rng.choice(ROUTES)
        body = b""
    elif roll < 0.45:  # oversized body
        method, path, body = "POST", "/v1/migration/complete", bytes(rng.randint(16 * 1024 + 1, 100_000))
    elif roll < 0.6:  # unknown path or wrong method
        method, path = rng.choice([("GET", "/v1/x"), ("DELETE", "/v1/migration/start"), ("PUT", "/v1/health"),
                                   ("GET", "/v1/migration/complete"), ("POST", "/" + "a" * 300)])
        body = b""
    elif roll < 0.8:  # malformed Complete, or another migration's
        method, path = "POST", "/v1/migration/complete"
        body = rng.choice([rng.randbytes(rng.randint(0, 200)), Complete("mig-other", {}).encode(),
                           msgpack.packb({"v": PROTOCOL_VERSION, "t": "complete", "migration_id": "mig-served"})])
    else:  # status needs a guest: a resumed server has none
        method, path, body = "GET", "/v1/vm/status", b""
    async with http.request(method, url + path, headers=headers, data=body) as resp:
        return resp.status, await resp.read()


def test_thousands_of_random_requests_never_break_the_server(served: Served) -> None:
    async def body(server: PageServer, url: str) -> None:
        rng = random.Random(20261125)
        pages = served.memory.pages
        seen: dict[str, int] = {}
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"{url}/v1/pages/ws", headers=AUTH, max_msg_size=MAX_BATCH_MESSAGE_BYTES)
            for _ in range(SOAK_REQUESTS):
                if rng.random() < 0.6:
                    frame = _random_frame(rng, pages)
                    await (ws.send_str(frame) if isinstance(frame, str) else ws.send_bytes(frame))
                    reply = await ws.receive(timeout=10)
                    assert reply.type is aiohttp.WSMsgType.BINARY, reply
                    message = decode_any(reply.data)
                    if isinstance(message, PageBatch):
                        assert pages_of(message) == served.memory.read(message.gpa, message.count * PAGE_SIZE)
                        seen["ws page batch"] = seen.get("ws page batch", 0) + 1
                    else:
                        assert isinstance(message, ErrorReply) and message.code in (400, 413, 416), message
                        assert message.message
                        seen[f"ws {message.code}"] = seen.get(f"ws {message.code}", 0) + 1
                else:
                    status, raw = await _random_http(http, url, rng)
                    assert 400 <= status < 500, (status, raw[:200])
                    assert ErrorReply.decode(raw).code == status and ErrorReply.decode(raw).message
                    seen[f"http {status}"] = seen.get(f"http {status}", 0) + 1
            # The socket and the server still serve the right page.
            await ws.send_bytes(PageRequest(9 * PAGE_SIZE, 3, "demand").encode())
            batch = decode_any((await ws.receive(timeout=10)).data)
            assert isinstance(batch, PageBatch) and pages_of(batch) == served.memory.read(9 * PAGE_SIZE, 3 * PAGE_SIZE)
            await ws.close()
            async with http.get(f"{url}/v1/health") as resp:
                assert await resp.json() == {"state": "serving"}
        assert "500" not in server.stats()["errors"]
        assert {"ws page batch", "ws 400", "ws 413", "ws 416", "http 401", "http 413", "http 404", "http 405",
                "http 400", "http 409"} <= set(seen), seen
        print(f"soak: {SOAK_REQUESTS} requests: {dict(sorted(seen.items()))}")

    serve(served, body)
