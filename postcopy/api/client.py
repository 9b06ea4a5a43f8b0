"""ApiClient: the control API from the other side, over a unix socket or TCP.

ADDR is ``unix:/path/api.sock``, ``http://host:port`` or ``tcp:HOST:PORT``. Every method
returns the answer's JSON; an error answer raises ApiClientError with its code and message.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Final, Self

import aiohttp

from postcopy.destination.readahead import DEFAULT_BASE

__all__ = ["ApiClient", "ApiClientError"]

REQUEST_TIMEOUT_S: Final = 120.0  # a sweep may take up to a minute on a large guest


class ApiClientError(Exception):
    """The API answered an error (``code`` is its HTTP status) or could not be reached (code 0)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {code})" if code else message)
        self.code = code
        self.message = message


class ApiClient:
    def __init__(self, address: str, token: str | None = None, *, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.address = address
        if address.startswith("unix:"):
            self._connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=address.removeprefix("unix:"))
            self._base = "http://vmm"
        elif address.startswith(("http://", "https://")):
            self._connector = aiohttp.TCPConnector()
            self._base = address.rstrip("/")
        elif address.startswith("tcp:"):
            self._connector = aiohttp.TCPConnector()
            self._base = "http://" + address.removeprefix("tcp:")
        else:
            raise ValueError(f"API address {address!r}: want unix:/path, http://host:port or tcp:HOST:PORT")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session = aiohttp.ClientSession(connector=self._connector, headers=headers,
                                              timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def close(self) -> None:
        await self._session.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            async with self._session.request(method, self._base + path, json=body) as resp:
                data = await resp.json(content_type=None) if resp.status != 204 else {}
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as e:
            raise ApiClientError(0, f"{method} {path} at {self.address}: {type(e).__name__}: {e}") from None
        if resp.status >= 400:
            message = data.get("error") if isinstance(data, dict) else None
            raise ApiClientError(resp.status, f"{method} {path} at {self.address}: {message or resp.reason}")
        return data if isinstance(data, dict) else {"value": data}

    async def wait_ready(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Poll GET /v1/health until the VMM answers (or ApiClientError after ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return await self.health()
            except ApiClientError:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.05)

    # -- the routes (docs/api.md) ----------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/health")

    async def create_vm(self, mem: str | int = "256M", vcpus: int = 2, workload: str = "memtouch",
                        seed: int = 7, *, state_dir: str | None = None,
                        prefill: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"mem": mem, "vcpus": vcpus, "workload": workload, "seed": seed}
        return await self.request("PUT", "/v1/vm", _with(body, state_dir=state_dir, prefill=prefill))

    async def vm(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/vm")

    async def pause(self) -> dict[str, Any]:
        return await self.request("POST", "/v1/vm/pause")

    async def resume(self) -> dict[str, Any]:
        return await self.request("POST", "/v1/vm/resume")

    async def sweep(self) -> dict[str, Any]:
        return await self.request("POST", "/v1/vm/sweep")

    async def delete_vm(self) -> None:
        await self.request("DELETE", "/v1/vm")

    async def outgoing(self, listen: str, token: str | None, advertise_url: str | None = None, *,
                       tls_cert: str | None = None, tls_key: str | None = None,
                       resume: str | None = None, page_workers: bool | None = None,
                       page_poll_us: int | None = None) -> dict[str, Any]:
        body = _with({"listen": listen}, token=token, advertise_url=advertise_url, tls_cert=tls_cert,
                     tls_key=tls_key, resume=resume, page_workers=page_workers, page_poll_us=page_poll_us)
        return await self.request("PUT", "/v1/migration/outgoing", body)

    async def incoming(self, source_url: str, token: str, *, fault_mode: str = "exit", after_s: float = 1.0,
                       readahead: int = DEFAULT_BASE, source_check: dict[str, Any] | None = None,
                       timeline: bool = False, tls_ca: str | None = None,
                       retry_deadline_s: float | None = None, vcpu_nice: int | None = None,
                       readahead_max: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"source_url": source_url, "token": token, "fault_mode": fault_mode,
                                "after_s": after_s, "readahead": readahead, "timeline": timeline}
        body = _with(body, source_check=source_check, tls_ca=tls_ca, retry_deadline_s=retry_deadline_s,
                     vcpu_nice=vcpu_nice, readahead_max=readahead_max)
        return await self.request("PUT", "/v1/migration/incoming", body)

    async def migration(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/migration")

    async def cancel_migration(self) -> dict[str, Any]:
        return await self.request("DELETE", "/v1/migration")

    async def metrics(self) -> str:
        """GET /metrics: the Prometheus text exposition."""
        try:
            async with self._session.get(self._base + "/metrics") as resp:
                text = await resp.text()
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise ApiClientError(0, f"GET /metrics at {self.address}: {type(e).__name__}: {e}") from None
        if resp.status >= 400:
            raise ApiClientError(resp.status, f"GET /metrics at {self.address}: HTTP {resp.status}")
        return text

    async def shutdown(self) -> dict[str, Any]:
        return await self.request("POST", "/v1/shutdown")


def _with(body: dict[str, Any], **optional: Any) -> dict[str, Any]:
    """``body`` plus the optional fields that have a value (absent ones take the API's default)."""
    body.update({name: value for name, value in optional.items() if value is not None})
    return body
