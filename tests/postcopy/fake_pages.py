"""A fake page server for the tests that need one to answer wrongly: an aiohttp WebSocket
endpoint at /v1/pages/ws that answers each binary request with ``answer(request)``."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
from aiohttp import web

from proto import PageRequest


def serve_answers(answer: Callable[[PageRequest], bytes | None], client: Callable[[str], None], *,
                  ping: bool = False, drop_on_none: bool = False) -> None:
    """Serve on loopback while ``client(base_url)`` runs on a thread; a ping goes before every
    answer if ``ping``; where ``answer`` gives None (``drop_on_none``), the TCP connection is
    dropped instead of answering."""
    async def main() -> None:
        async def handler(request: web.Request) -> web.WebSocketResponse:
            ws = web.WebSocketResponse(max_msg_size=0)
            await ws.prepare(request)
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.BINARY:
                    continue
                if ping:
                    await ws.ping(b"are you there")
                reply = answer(PageRequest.decode(msg.data))
                if reply is None and drop_on_none:
                    assert request.transport is not None
                    request.transport.abort()
                    break
                assert reply is not None
                await ws.send_bytes(reply)
            return ws

        app = web.Application()
        app.add_routes([web.get("/v1/pages/ws", handler)])
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            await asyncio.to_thread(client, f"http://127.0.0.1:{runner.addresses[0][1]}")
        finally:
            await runner.cleanup()

    asyncio.run(main())
