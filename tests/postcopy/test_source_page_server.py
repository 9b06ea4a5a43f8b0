"""The page server against a real paused guest, over real HTTP and WebSockets on 127.0.0.1."""
from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import msgpack
import pytest

from postcopy.source.page_server import (
    MSGPACK,
    WS_MAX_FRAME_BYTES,
    MigrationState,
    PageServer,
)
from postcopy.source.run import boot_memtouch
from proto.version import MAX_BATCH_MESSAGE_BYTES
from proto import (
    MAX_BATCH_PAGES,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Complete,
    ErrorReply,
    MemoryRegion,
    MigrationHeader,
    PageBatch,
    PageRequest,
    ZeroMap,
    decode_any,
)
from vmm.machine import Machine

pytestmark = pytest.mark.usefixtures("kvm_available")

MiB = 1 << 20
GUEST_BYTES = 32 * MiB
VCPUS = 2
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MIGRATION_ID = "test-migration"
WARMUP_S = 0.2


@dataclass(slots=True)
class Env:
    server: PageServer
    machine: Machine
    url: str
    http: aiohttp.ClientSession

    async def start(self) -> MigrationHeader:
        async with self.http.post(f"{self.url}/v1/migration/start") as response:
            assert response.status == 200, await response.read()
            assert response.content_type == MSGPACK
            return MigrationHeader.decode(await response.read())

    async def zero_map(self, header: MigrationHeader) -> ZeroMap:
        async with self.http.get(f"{self.url}/v1/migration/zero-map") as response:
            assert response.status == 200, await response.read()
            assert response.content_type == MSGPACK
            zero_map = ZeroMap.decode(await response.read())
        header.check_zero_map(zero_map)
        return zero_map

    def ws(self) -> aiohttp.client._WSRequestContextManager:
        return self.http.ws_connect(f"{self.url}/v1/pages/ws", max_msg_size=MAX_BATCH_MESSAGE_BYTES)


def run(body: Callable[[Env], Awaitable[None]], *, guest_bytes: int = GUEST_BYTES, vcpus: int = VCPUS,
        warmup_s: float = WARMUP_S, **server_options: object) -> None:
    async def main() -> None:
        machine, workload = boot_memtouch(guest_bytes, vcpus, seed=11)
        try:
            await asyncio.sleep(warmup_s)
            async with PageServer(machine, token=TOKEN, migration_id=MIGRATION_ID, workload=workload,
                                  **server_options) as server:  # type: ignore[arg-type]
                url = await server.start("127.0.0.1", 0)
                async with aiohttp.ClientSession(headers=AUTH) as http:
                    await body(Env(server, machine, url, http))
        finally:
            machine.close()

    asyncio.run(main())


async def ask(ws: aiohttp.ClientWebSocketResponse, frame: bytes | str) -> PageBatch | ErrorReply:
    if isinstance(frame, str):
        await ws.send_str(frame)
    else:
        await ws.send_bytes(frame)
    reply = await ws.receive(timeout=10)
    assert reply.type is aiohttp.WSMsgType.BINARY, reply
    message = decode_any(reply.data)
    assert isinstance(message, (PageBatch, ErrorReply))
    return message


def request_map(**fields: object) -> bytes:
    wire = {"v": PROTOCOL_VERSION, "t": "page_request", "gpa": 0, "count": 1, "kind": "demand"}
    wire.update(fields)
    return msgpack.packb(wire)


async def assert_good_request_works(ws: aiohttp.ClientWebSocketResponse, env: Env) -> None:
    gpa = 0x200000
    batch = await ask(ws, PageRequest(gpa, 4, "demand").encode())
    assert isinstance(batch, PageBatch) and (batch.gpa, batch.count) == (gpa, 4)
    assert _pages(batch) == env.machine.memory.read(gpa, 4 * PAGE_SIZE)


def _pages(batch: PageBatch) -> bytes:
    """The batch's pages laid out in full, zero pages filled in."""
    out = bytearray()
    for _, npages, data in batch.runs():
        out += bytes(npages * PAGE_SIZE) if data is None else data
    return bytes(out)


def test_start_exports_a_header_with_vcpus_regions_and_eager_pages_equal_to_memory() -> None:
    async def body(env: Env) -> None:
        header = await env.start()
        assert env.server.state is MigrationState.SERVING
        assert all(thread.state.value in ("paused", "halted") for thread in env.machine.vcpus)
        assert header.migration_id == MIGRATION_ID
        assert len(header.vcpus) == VCPUS and {v.id for v in header.vcpus} == set(range(VCPUS))
        assert header.regions == (MemoryRegion(0, GUEST_BYTES),)
        assert header.workload["name"] == "memtouch"
        memory = env.machine.memory
        eager = {run.gpa + i * PAGE_SIZE for run in header.eager for i in range(run.npages)}
        assert {0x1000, 0x2000, 0x3000, 0x13000, 0x14000} <= eager
        for run in header.eager:
            assert run.data == memory.read(run.gpa, len(run.data))
        # The zero map comes after the header, built from the paused guest's RAM.
        zero_map = await env.zero_map(header)
        resident = memory.resident_pages()
        for index in range(0, memory.pages, 7):
            gpa = index * PAGE_SIZE
            zero = zero_map.zero_bitmap[index >> 3] >> (index & 7) & 1 == 1
            assert zero == (not resident[index] & 1 and gpa not in eager)
            if zero:
                assert memory.read(gpa, PAGE_SIZE) == bytes(PAGE_SIZE)
        assert env.server.stats()["zero_map_pages"] == int.from_bytes(zero_map.zero_bitmap, "little").bit_count() > 0
        # Built once: asked again, the same bytes.
        assert await env.zero_map(header) == zero_map
        # Later calls return the same bytes; the guest is not exported twice.
        async with env.http.post(f"{env.url}/v1/migration/start") as again:
            assert again.status == 200 and MigrationHeader.decode(await again.read()) == header
        async with env.http.get(f"{env.url}/v1/health") as health:
            assert await health.json() == {"state": "serving"}

    run(body)


def test_ws_batches_equal_source_memory_and_zero_pages_are_flagged_not_sent() -> None:
    async def body(env: Env) -> None:
        await env.start()
        memory = env.machine.memory
        zero_flagged = data_sent = 0
        kinds = ("demand", "readahead", "background")
        async with env.ws() as ws:
            for n, gpa in enumerate(range(0, GUEST_BYTES, MAX_BATCH_PAGES * PAGE_SIZE)):
                request = PageRequest(gpa, MAX_BATCH_PAGES, kinds[n % 3])
                batch = await ask(ws, request.encode())
                assert isinstance(batch, PageBatch)
                batch.check_answers(request)
                batch.verify()
                assert _pages(batch) == memory.read(gpa, MAX_BATCH_PAGES * PAGE_SIZE)
                zeros = int.from_bytes(batch.zero, "little").bit_count()
                assert len(batch.data) == (MAX_BATCH_PAGES - zeros) * PAGE_SIZE
                zero_flagged += zeros
                data_sent += MAX_BATCH_PAGES - zeros
        assert zero_flagged > 0 and data_sent > 0  # a young guest has both
        stats = env.server.stats()
        assert (stats["pages_zero"], stats["pages_data"]) == (zero_flagged, data_sent)
        assert sum(stats["requests"].values()) == GUEST_BYTES // (MAX_BATCH_PAGES * PAGE_SIZE)

    run(body)


def test_missing_or_wrong_token_is_401_and_health_needs_none() -> None:
    async def body(env: Env) -> None:
        async with aiohttp.ClientSession() as anonymous:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                            {"Authorization": f"Basic {TOKEN}"}):
                for method, path in (("POST", "/v1/migration/start"), ("GET", "/v1/pages/ws"),
                                     ("POST", "/v1/migration/complete"), ("GET", "/v1/vm/status"),
                                     ("POST", "/v1/vm/sweep")):
                    async with anonymous.request(method, env.url + path, headers=headers) as response:
                        assert response.status == 401, (headers, path)
                        assert ErrorReply.decode(await response.read()).code == 401
            async with anonymous.get(f"{env.url}/v1/health") as health:
                assert health.status == 200 and await health.json() == {"state": "running"}
        assert env.server.state is MigrationState.RUNNING  # nothing was exported

    run(body)


def test_pages_and_complete_before_start_are_409() -> None:
    async def body(env: Env) -> None:
        # A destination may open its sockets early (not downtime), but gets no page yet.
        async with env.ws() as ws:
            reply = await ask(ws, PageRequest(0x200000, 1, "demand").encode())
            assert isinstance(reply, ErrorReply) and reply.code == 409
        complete = Complete(MIGRATION_ID, {}).encode()
        async with env.http.post(f"{env.url}/v1/migration/complete", data=complete) as response:
            assert response.status == 409 and ErrorReply.decode(await response.read()).code == 409
        async with env.http.get(f"{env.url}/v1/migration/zero-map") as response:  # no paused guest yet
            assert response.status == 409 and ErrorReply.decode(await response.read()).code == 409
        async with env.http.get(f"{env.url}/v1/vm/status") as status:
            progress = await status.json()
            assert progress["state"] == "running" and len(progress["vcpus"]) == VCPUS
        assert env.server.state is MigrationState.RUNNING and not env.server.completed.is_set()

    run(body)


def test_bad_frames_get_error_replies_and_the_socket_keeps_answering() -> None:
    async def body(env: Env) -> None:
        await env.start()
        bad_frames: list[tuple[bytes | str, int]] = [
            (PageRequest(GUEST_BYTES, 1, "demand").encode(), 416),  # past the end of RAM
            (PageRequest(GUEST_BYTES - PAGE_SIZE, 2, "demand").encode(), 416),  # runs past the end
            (request_map(gpa=0x1001), 416),  # misaligned
            (request_map(gpa=-4096), 416),
            (request_map(count=MAX_BATCH_PAGES + 1), 413),
            (request_map(count=0), 400),
            (request_map(kind="urgent"), 400),
            (request_map(v=99), 400),
            (b"\x00garbage\xff", 400),
            (b"", 400),
            (Complete(MIGRATION_ID, {}).encode(), 400),
            (bytes(1000), 413),  # over MAX_REQUEST_MESSAGE_BYTES, under the frame limit
            ("not a binary frame", 400),
        ]
        async with env.ws() as ws:
            for frame, code in bad_frames:
                reply = await ask(ws, frame)
                assert isinstance(reply, ErrorReply) and reply.code == code, (frame, reply)
                await assert_good_request_works(ws, env)
        # A frame over the WebSocket limit closes that socket only.
        async with env.ws() as ws:
            await ws.send_bytes(bytes(WS_MAX_FRAME_BYTES + 1))
            closed = await ws.receive(timeout=10)
            assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        async with env.ws() as ws:
            await assert_good_request_works(ws, env)
        assert "500" not in env.server.stats()["errors"]

    run(body)


def test_complete_sets_the_event_and_ends_serving() -> None:
    async def body(env: Env) -> None:
        await env.start()
        complete_url = f"{env.url}/v1/migration/complete"
        for data, code in ((b"\xc1", 400), (Complete("other-migration", {}).encode(), 409),
                           (bytes(64 * 1024), 413)):
            async with env.http.post(complete_url, data=data) as response:
                assert response.status == code and ErrorReply.decode(await response.read()).code == code
        assert not env.server.completed.is_set()
        async with env.ws() as ws:
            await assert_good_request_works(ws, env)
            done = Complete(MIGRATION_ID, {"pages": 9}).encode()
            async with env.http.post(complete_url, data=done) as response:
                assert response.status == 204
            assert env.server.completed.is_set() and env.server.state is MigrationState.COMPLETED
            assert env.server.complete_stats == {"pages": 9}
            # The open socket now refuses pages and closes.
            reply = await ask(ws, PageRequest(0x200000, 1, "demand").encode())
            assert isinstance(reply, ErrorReply) and reply.code == 409
        async with env.http.post(complete_url, data=Complete(MIGRATION_ID, {}).encode()) as again:
            assert again.status == 204  # a retried Complete
        async with env.http.post(f"{env.url}/v1/migration/start") as start:
            assert start.status == 409
        async with env.http.get(f"{env.url}/v1/migration/zero-map") as zero_map:
            assert zero_map.status == 409
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with env.ws():
                pass
        assert refused.value.status == 409
        assert env.server.stats()["pause_to_complete_s"] > 0

    run(body)


def test_sweep_verifies_the_guest_before_start_and_is_409_after() -> None:
    async def body(env: Env) -> None:
        async with env.http.post(f"{env.url}/v1/vm/sweep") as response:
            assert response.status == 200
            result = await response.json()
        assert result["finished"] and result["ok"] and result["pages"] > 0 and result["errors"] == 0
        await env.start()
        async with env.http.post(f"{env.url}/v1/vm/sweep") as response:
            assert response.status == 409 and ErrorReply.decode(await response.read()).code == 409

    # One vCPU and 4 MiB: the guest fills its 2 MiB of data in a second or two, then sweeps.
    run(body, guest_bytes=4 * MiB, vcpus=1, sweep_timeout_s=20.0)


def _random_frame(rng: random.Random) -> bytes:
    choice = rng.randrange(5)
    if choice == 0:
        return rng.randbytes(rng.randrange(0, 200))
    gpa = rng.choice([0, GUEST_BYTES, GUEST_BYTES - PAGE_SIZE, rng.randrange(0, 2 * GUEST_BYTES),
                      rng.randrange(0, GUEST_BYTES // PAGE_SIZE) * PAGE_SIZE, -1, 1 << 60, "x", None])
    count = rng.choice([1, 0, -5, MAX_BATCH_PAGES, MAX_BATCH_PAGES + 1, rng.randrange(1, 64), 1.5, b"1"])
    kind = rng.choice(["demand", "readahead", "background", "other", 3])
    if choice == 1:
        return request_map(gpa=gpa, count=count, kind=kind)
    if choice == 2:
        return request_map(extra=1) if rng.random() < 0.5 else msgpack.packb([gpa, count])
    if choice == 3:
        return msgpack.packb(rng.choice([None, 1, "page_request", {"t": "page_request"}, {1: 2}]))
    page = rng.randrange(0, GUEST_BYTES // PAGE_SIZE)
    return PageRequest(page * PAGE_SIZE, rng.randrange(1, min(64, GUEST_BYTES // PAGE_SIZE - page) + 1),
                       "demand").encode()


def test_hundreds_of_random_frames_never_break_the_server() -> None:
    async def body(env: Env) -> None:
        await env.start()
        rng = random.Random(20261125)
        memory = env.machine.memory
        replies = {PageBatch: 0, ErrorReply: 0}
        async with env.ws() as ws:
            for _ in range(400):
                frame = _random_frame(rng)
                reply = await ask(ws, frame)
                replies[type(reply)] += 1
                if isinstance(reply, PageBatch):
                    assert _pages(reply) == memory.read(reply.gpa, reply.count * PAGE_SIZE)
                else:
                    assert reply.code in (400, 413, 416), reply
            await assert_good_request_works(ws, env)
        assert replies[PageBatch] > 50 and replies[ErrorReply] > 50, replies
        async with env.http.get(f"{env.url}/v1/health") as health:
            assert await health.json() == {"state": "serving"}
        assert "500" not in env.server.stats()["errors"]

    run(body)
