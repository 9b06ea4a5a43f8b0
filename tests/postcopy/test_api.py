"""The control API: a whole migration driven through it alone (two `vmm serve` processes on unix
sockets), its refusals (clear 4xx JSON errors that change nothing), its token, its startup
checks, and the progress line."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from postcopy.api.client import ApiClient, ApiClientError
from postcopy.api.models import ApiError, IncomingSpec, OutgoingSpec
from postcopy.api.server import ApiAddress, ApiServer, ApiStartError, local_vmm, make_app
from postcopy.api.service import VmmService
from postcopy.demo import start_vmm, stop_vmm
from postcopy.destination import private_loop
from postcopy.orchestrate import MigrateOptions, run_migration
from postcopy.progress import ProgressLine, render_line
from postcopy.source.page_server import PageServer
from postcopy.source.page_workers import DEFAULT_POLL_US
from vmm import cli as vmm_cli

needs_kvm = pytest.mark.usefixtures("kvm_available")
MEM = "32M"
TOKEN = "migration-token-for-the-test"


async def _raw(client: ApiClient, method: str, path: str, body: Any = None, data: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """One request, its status and JSON body, whatever the status (ApiClient raises on errors)."""
    session = client._session
    async with session.request(method, client._base + path, json=body, data=data, headers=headers) as resp:
        return resp.status, (await resp.json(content_type=None) if resp.status != 204 else {})


def _children(pid: int) -> list[str]:
    return [c for t in os.listdir(f"/proc/{pid}/task") for c in open(f"/proc/{pid}/task/{t}/children").read().split()]


# -- a whole migration, through the API alone -----------------------------------------------------

@pytest.mark.integration
@pytest.mark.usefixtures("kvm_available", "uffd_available")
@pytest.mark.parametrize("readahead", [4, 1])
def test_a_migration_driven_through_the_api_alone_is_verified_and_can_go_back(tmp_path: Path, readahead: int) -> None:
    # readahead 1 (and readahead_max 1): one page a fault, the vCPUs' loops in private
    # interpreters, which the adopted guest's vCPUs keep running when it migrates back.
    async def scenario() -> None:
        src_proc, src_addr = await start_vmm(tmp_path / "src.sock", "source")
        dst_proc, dst_addr = await start_vmm(tmp_path / "dst.sock", "destination")
        async with ApiClient(src_addr) as src, ApiClient(dst_addr) as dst:
            try:
                status, vm = await _raw(src, "PUT", "/v1/vm", {"mem": MEM, "vcpus": 2, "workload": "memtouch", "seed": 3})
                assert status == 201 and vm["state"] == "running" and vm["mem"] == 32 << 20 and vm["vcpus"] == 2
                await asyncio.sleep(0.3)
                status, before = await _raw(src, "POST", "/v1/vm/sweep")
                assert status == 200 and before["ok"] is True and before["pages"] > 0
                # There by threads of the page server, back (the default) by page worker processes.
                status, out = await _raw(src, "PUT", "/v1/migration/outgoing",
                                         {"listen": "127.0.0.1:0", "token": TOKEN, "page_workers": False})
                assert status == 201 and out["role"] == "source" and out["state"] == "listen"
                assert out["url"].startswith("http://127.0.0.1:")
                status, inc = await _raw(dst, "PUT", "/v1/migration/incoming", {
                    "source_url": out["url"], "token": TOKEN, "fault_mode": "exit", "after_s": 0.3,
                    "readahead": readahead, "vcpu_nice": 5, "source_check": before,
                    **({"readahead_max": 1} if readahead == 1 else {})})
                assert status == 202 and inc["role"] == "destination"
                seen = set()
                deadline = time.monotonic() + 60
                while True:
                    status, mig = await _raw(dst, "GET", "/v1/migration")
                    assert status == 200
                    seen.add(mig["state"])
                    if mig["state"] in ("completed", "failed") or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.05)
                assert mig["state"] == "completed", mig
                report = mig["report"]
                assert report["verified"] is True and report["guest_errors"] == 0
                assert report["private_fault_loops"] == (2 if private_loop.unavailable() is None else 0)
                assert report["guest"]["before"]["swept_pages"] == before["pages"]
                assert mig["pages_present"] == mig["pages_total"] == 32 << 20 >> 12
                assert mig["pages_remaining"] == 0 and sum(mig["pages"].values()) == mig["pages_total"]
                assert mig["downtime_ms"] == report["downtime_ms"] and mig["errors"] == []
                # The guest is this VMM's now, still running; the source let its copy go.
                status, vm = await _raw(dst, "GET", "/v1/vm")
                assert status == 200 and vm["state"] == "running" and vm["origin"] == "migrated"
                # ... on its own pages: the destination's userfaultfd (registration) is gone.
                assert await _uffds_closed(dst_proc.pid), "the adopted guest's userfaultfd is still open"
                status, err = await _raw(src, "GET", "/v1/vm")
                assert status == 404 and err["code"] == 404 and "no VM" in err["error"]
                status, smig = await _raw(src, "GET", "/v1/migration")
                assert smig["state"] == "completed" and smig["migration_id"] == mig["migration_id"]
                assert smig["report"]["destination_stats"] == report["pages"]
                # And back, by the orchestrator `postcopy migrate` runs: the migrated guest is
                # an ordinary VM of its new VMM, and the old source takes an incoming one.
                back = await run_migration(dst, src, MigrateOptions(token=TOKEN, after_s=0.3))
                assert back["verified"] is True and back["guest"]["before"]["swept_pages"] == before["pages"]
                assert (await src.vm())["origin"] == "migrated" and (await src.vm())["seed"] == 3
                assert (await dst.migration())["role"] == "source"
                for _ in range(300):  # the VMM closes its page server once the destination has every page
                    if not _children(dst_proc.pid):
                        break
                    await asyncio.sleep(0.01)
                assert not _children(dst_proc.pid), "a page worker outlived its migration"
            finally:
                await asyncio.gather(stop_vmm(src_proc, src), stop_vmm(dst_proc, dst))
        assert src_proc.returncode == 0 and dst_proc.returncode == 0
        assert not (tmp_path / "src.sock").exists() and not (tmp_path / "dst.sock").exists()

    asyncio.run(scenario())


async def _uffds_closed(pid: int, timeout_s: float = 5.0) -> bool:
    """Whether process ``pid`` holds no userfaultfd (within ``timeout_s``: closing follows the report)."""
    deadline = time.monotonic() + timeout_s
    while True:
        links = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        if not any("userfaultfd" in link for link in links):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)


# -- refusals -------------------------------------------------------------------------------------

@needs_kvm
def test_bad_requests_get_a_clear_400_or_409_and_change_nothing() -> None:
    async def scenario() -> None:
        async with local_vmm() as vmm:
            cases: list[tuple[str, str, Any, int, str]] = [
                ("PUT", "/v1/vm", {"mem": "32M", "colour": "red"}, 400, "unknown field(s) 'colour'"),
                ("PUT", "/v1/vm", {"mem": "lots"}, 400, "cannot read memory size 'lots'"),
                ("PUT", "/v1/vm", {"mem": "infG"}, 400, "cannot read memory size 'infG'"),  # an OverflowError
                ("PUT", "/v1/vm", {"mem": "1e400M"}, 400, "cannot read memory size '1e400M'"),
                ("PUT", "/v1/vm", {"mem": "4097"}, 400, "not a positive multiple of 4 KiB"),
                ("PUT", "/v1/vm", {"vcpus": "2"}, 400, "field 'vcpus' must be an integer"),
                ("PUT", "/v1/vm", {"workload": "bitcoin"}, 400, "field 'workload' must be one of"),
                ("PUT", "/v1/vm", {"prefill": 1.5}, 400, "field 'prefill' must be a number from 0.0 to 1.0"),
                ("PUT", "/v1/vm", {"workload": "touch", "prefill": 0.5}, 400, "'prefill' applies only to workload memtouch"),
                ("PUT", "/v1/vm", [1, 2], 400, "must be a JSON object"),
                ("PUT", "/v1/migration/incoming", {"source_url": "http://127.0.0.1:9"}, 400, "field 'token' is required"),
                ("PUT", "/v1/migration/incoming", {"source_url": "ftp://x", "token": "t"}, 400, "http:// or https://"),
                ("PUT", "/v1/migration/incoming", {"source_url": "http://h:1", "token": "t", "fault_mode": "fast"},
                 400, "field 'fault_mode' must be one of exit, classic, auto"),
                ("PUT", "/v1/migration/incoming", {"source_url": "http://h:1", "token": "t", "vcpu_nice": 20},
                 400, "field 'vcpu_nice'"),
                ("PUT", "/v1/migration/incoming", {"source_url": "http://h:1", "token": "t", "vcpu_nice": -1},
                 400, "field 'vcpu_nice'"),
                ("PUT", "/v1/migration/outgoing", {"listen": "127.0.0.1:0", "token": "t"}, 404, "no VM"),
                ("PUT", "/v1/migration/outgoing", {"listen": "nowhere", "token": "t"}, 400, "want HOST:PORT"),
                ("PUT", "/v1/migration/outgoing", {"listen": "127.0.0.1:0", "token": "a\r\nX-Evil: 1"}, 400,
                 "field 'token' must hold only the characters"),
                ("PUT", "/v1/migration/outgoing", {"listen": "127.0.0.1:0", "token": "t", "resume": "/tmp/x"}, 400,
                 "give no 'token'"),
                ("PUT", "/v1/migration/outgoing", {"listen": "127.0.0.1:0", "token": "t", "page_workers": 1}, 400,
                 "field 'page_workers' must be true or false"),
                ("PUT", "/v1/migration/outgoing", {"listen": "127.0.0.1:0", "token": "t", "page_poll_us": 10_001}, 400,
                 "field 'page_poll_us' must be an integer from 0 to 10000"),
                ("PUT", "/v1/migration/outgoing", {"listen": "127.0.0.1:0", "token": "t", "page_poll_us": "100"}, 400,
                 "field 'page_poll_us' must be an integer from 0 to 10000"),
                ("PUT", "/v1/migration/incoming", {"source_url": "https://127.0.0.1:9", "token": "t"}, 400,
                 "'source_url' must be https:// exactly when 'tls_ca' is given"),
                ("PUT", "/v1/migration/incoming", {"source_url": "http://127.0.0.1:9", "token": "t",
                                                   "tls_ca": "/tmp/ca.pem"}, 400, "must be https://"),
                ("GET", "/v1/vm", None, 404, "no VM"),
                ("POST", "/v1/vm/pause", None, 404, "no VM"),
                ("DELETE", "/v1/migration", None, 409, "no migration in progress"),
                ("GET", "/v1/nothing", None, 404, "Not Found"),
                ("PATCH", "/v1/vm", None, 405, "Method Not Allowed"),
            ]
            for method, path, body, code, words in cases:
                status, answer = await _raw(vmm, method, path, body)
                assert (status, answer["code"]) == (code, code), (method, path, body, answer)
                assert words in answer["error"], (method, path, answer)
            status, answer = await _raw(vmm, "PUT", "/v1/vm", data=b"{not json", headers={"Content-Type": "application/json"})
            assert status == 400 and "not valid JSON" in answer["error"]
            status, answer = await _raw(vmm, "PUT", "/v1/vm", data=b"[" * 50_000,  # a RecursionError in json
                                        headers={"Content-Type": "application/json"})
            assert status == 400 and "not valid JSON" in answer["error"]
            assert (await vmm.health())["vm"] == "none"  # nothing was created by any of them

            vm = await vmm.create_vm("16M", 1, "memtouch", 5)
            assert vm["state"] == "running"
            with pytest.raises(ApiClientError) as e:
                await vmm.create_vm("16M", 1)
            assert e.value.code == 409 and "one VM per VMM" in e.value.message
            with pytest.raises(ApiClientError) as e:
                await vmm.incoming("http://127.0.0.1:9", TOKEN)
            assert e.value.code == 409 and "already has a VM" in e.value.message
            with pytest.raises(ApiClientError) as e:
                await vmm.outgoing("127.0.0.1:99999", TOKEN)
            assert e.value.code == 400 and "listen" in e.value.message
            children = _children(os.getpid())
            for host in ("..", "x" * 64):  # names IDNA refuses (a ValueError), after the page workers started
                with pytest.raises(ApiClientError) as e:
                    await vmm.outgoing(f"{host}:0", TOKEN)
                assert e.value.code == 400 and "cannot listen" in e.value.message
            assert _children(os.getpid()) == children  # the page server closed, its page workers with it
            assert (await vmm.migration())["state"] == "none"
            assert (await vmm.vm())["seed"] == 5  # the first VM is untouched
            await vmm.delete_vm()
            assert (await vmm.health())["vm"] == "none"

    asyncio.run(scenario())


@needs_kvm
def test_vm_control_pause_resume_and_a_cancelled_outgoing_migration_leave_the_guest_running() -> None:
    async def scenario() -> None:
        async with local_vmm() as vmm:
            await vmm.create_vm("16M", 2, "memtouch", 9)
            assert (await vmm.pause())["state"] == "paused"
            assert (await vmm.resume())["state"] == "running"
            out = await vmm.outgoing("127.0.0.1:0", TOKEN)
            assert out["state"] == "listen"
            async with aiohttp.ClientSession() as s, s.get(out["url"] + "/v1/health") as resp:
                assert resp.status == 200  # the page server answers
            for action in (vmm.pause, vmm.sweep, vmm.delete_vm):
                with pytest.raises(ApiClientError) as e:
                    await action()
                assert e.value.code == 409 and "outgoing migration is listen" in e.value.message
            cancelled = await vmm.cancel_migration()
            assert cancelled["state"] == "failed" and "cancelled" in cancelled["errors"][0]
            with pytest.raises(aiohttp.ClientConnectionError):  # the page server is gone
                async with aiohttp.ClientSession() as s:
                    await s.get(out["url"] + "/v1/health")
            before = (await vmm.vm())["guest"]["verified"]
            sweep = await vmm.sweep()  # and the guest still runs and checks itself
            assert sweep["ok"] is True and (await vmm.vm())["guest"]["verified"] >= before

    asyncio.run(scenario())


def test_an_incoming_migration_from_an_unreachable_source_fails_with_the_reason() -> None:
    async def scenario() -> None:
        async with local_vmm() as vmm:
            with socket.socket() as s:  # a port nobody listens on
                s.bind(("127.0.0.1", 0))
                url = f"http://127.0.0.1:{s.getsockname()[1]}"
            # Nobody there is an outage like any other: retried until the deadline, then failed.
            started = await vmm.incoming(url, TOKEN, fault_mode="classic", retry_deadline_s=0.3)
            assert started["role"] == "destination" and started["state"] in ("setup", "failed")
            for _ in range(100):
                status = await vmm.migration()
                if status["state"] == "failed":
                    break
                await asyncio.sleep(0.02)
            assert status["state"] == "failed" and status["report"] is None
            assert url in status["errors"][0] and "/v1/vm/status" in status["errors"][0]
            assert "retry deadline 0.3 s" in status["errors"][0]
            assert (await vmm.health())["vm"] == "none"
            with pytest.raises(ApiClientError) as e:
                await vmm.cancel_migration()
            assert e.value.code == 409
            assert (await vmm.incoming(url, TOKEN))["role"] == "destination"  # a failed one may be retried

    asyncio.run(scenario())


@pytest.mark.usefixtures("kvm_available", "uffd_available")
def test_cancelling_an_incoming_migration_fails_it_and_the_source_refuses_to_cancel_after_switchover() -> None:
    async def scenario() -> None:
        async with local_vmm() as src, local_vmm() as dst:
            await src.create_vm("64M", 1, "memtouch", 2)
            out = await src.outgoing("127.0.0.1:0", TOKEN)
            await dst.incoming(out["url"], TOKEN, fault_mode="exit", after_s=5.0)
            for _ in range(500):
                status = await dst.migration()
                if status["state"] in ("running", "completed", "failed"):
                    break
                await asyncio.sleep(0.01)
            assert status["state"] == "running", status
            cancelled = await dst.cancel_migration()
            assert cancelled["state"] == "failed" and cancelled["errors"] == ["cancelled by DELETE /v1/migration"]
            assert cancelled["report"] is None and (await dst.health())["vm"] == "none"
            with pytest.raises(ApiClientError) as e:
                await src.cancel_migration()
            assert e.value.code == 409 and "runs there now" in e.value.message

    asyncio.run(scenario())


# -- the API's own token and address --------------------------------------------------------------

@needs_kvm
def test_the_api_token_is_enforced_when_set() -> None:
    async def scenario() -> None:
        server = ApiServer(VmmService(), ApiAddress(host="127.0.0.1", port=0), token="api-secret")
        async with server, ApiClient(server.address) as anonymous, \
                    ApiClient(server.address, "wrong") as wrong, ApiClient(server.address, "api-secret") as right:
            assert (await anonymous.health())["status"] == "ok"  # liveness stays public
            for client in (anonymous, wrong):
                status, answer = await _raw(client, "GET", "/v1/migration")
                assert status == 401 and answer == {"error": "missing or wrong API bearer token", "code": 401}
                status, _ = await _raw(client, "PUT", "/v1/vm", {"mem": "16M"})
                assert status == 401
            assert (await right.migration())["state"] == "none"
            assert (await right.health())["vm"] == "none"  # the refused PUT created nothing

    asyncio.run(scenario())


def test_a_tcp_api_without_a_token_is_refused_at_startup(capsys: pytest.CaptureFixture[str]) -> None:
    assert vmm_cli.main(["serve", "--api", "tcp:127.0.0.1:0"]) == 2
    assert "a TCP API needs --api-token-file" in capsys.readouterr().err
    assert vmm_cli.main(["serve", "--api", "udp:somewhere"]) == 2
    assert "--api wants unix:" in capsys.readouterr().err


def test_a_socket_a_live_vmm_answers_on_is_refused_and_a_stale_one_replaced(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen()

    async def start() -> None:
        async with ApiServer(VmmService(), ApiAddress(path=path)):
            pass

    with pytest.raises(ApiStartError, match="another VMM serves its API there"):
        asyncio.run(start())
    live.close()  # the file stays: a stale socket
    assert path.exists()
    asyncio.run(start())
    assert not path.exists()


def test_vmm_serve_prints_ready_json_and_stops_on_shutdown(tmp_path: Path) -> None:
    async def scenario() -> None:
        proc, address = await start_vmm(tmp_path / "api.sock", "test")
        assert address == f"unix:{tmp_path / 'api.sock'}"
        assert oct((tmp_path / "api.sock").stat().st_mode & 0o777) == oct(0o600)
        async with ApiClient(address) as api:
            assert (await api.health()) == {"status": "ok", "vm": "none", "migration": "none"}
            assert (await api.shutdown()) == {"stopping": True}
            await asyncio.wait_for(proc.wait(), 15)
        assert proc.returncode == 0 and not (tmp_path / "api.sock").exists()

    asyncio.run(scenario())


# -- the progress line ----------------------------------------------------------------------------

STATUS = {"state": "running", "pages_total": 1000, "pages_present": 250, "rate": 12000.0, "eta_s": 0.0625,
          "pages": {"eager": 8, "demand": 40, "readahead": 100, "background": 90, "zero": 12}}


def test_the_progress_line_shows_pages_kinds_rate_and_time_left() -> None:
    line = render_line(STATUS)
    assert "250/1000 pages ( 25.0%)" in line and "demand 40 + readahead 100" in line
    assert "background 90" in line and "12.0 k pages/s" in line and "left 0.1 s" in line
    assert render_line({"state": "setup"}) == "migration setup"
    assert "left 0 s, the guest checks itself" in render_line({**STATUS, "pages_present": 1000})


def test_the_progress_line_redraws_in_place_on_a_terminal_and_is_silent_otherwise() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        line = ProgressLine(stream)
        line.update(STATUS, force=True)
        line.update({**STATUS, "state": "completed", "pages_present": 1000}, force=True)
        line.close()
    assert pipe.getvalue() == ""
    out = tty.getvalue()
    assert out.count("\r") == 2 and out.endswith("\n") and "1000/1000 pages" in out
    quiet = Tty()
    ProgressLine(quiet, enabled=False).update(STATUS, force=True)  # --json turns it off
    assert quiet.getvalue() == ""


def test_every_route_is_documented_in_api_md_and_openapi_yaml() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs"
    api_md = (docs / "api.md").read_text()
    openapi = (docs / "openapi.yaml").read_text()
    routes = {(r.method, r.resource.canonical) for r in make_app(VmmService()).router.routes()
              if r.method != "HEAD" and r.resource is not None}
    assert len(routes) == 13
    for method, path in routes:
        assert f"`{method} {path}`" in api_md, (method, path)
        section = "\n" + openapi.split(f"\n  {path}:\n", 1)[1].split("\n  /", 1)[0]
        assert f"\n    {method.lower()}:\n" in section, (method, path)


@pytest.mark.parametrize(("schema", "fields"), [
    ("Outgoing", ("listen", "token", "advertise_url", "tls_cert", "tls_key", "resume", "page_workers", "page_poll_us")),
    ("Incoming", tuple(f.name for f in dataclasses.fields(IncomingSpec))),
])
def test_every_field_a_migration_request_takes_is_documented(schema: str, fields: tuple[str, ...]) -> None:
    docs = Path(__file__).resolve().parents[2] / "docs"
    api_md = (docs / "api.md").read_text()
    after = (docs / "openapi.yaml").read_text().split(f"\n    {schema}:\n", 1)[1]
    section = re.split(r"\n    (?=\S)", after, maxsplit=1)[0]  # up to the next schema
    for name in fields:
        assert f"\n        {name}:" in "\n" + section, (schema, name)
        assert f"`{name}`" in api_md, (schema, name)


def test_the_outgoing_spec_takes_a_page_poll_window() -> None:
    spec = OutgoingSpec.parse({"listen": "127.0.0.1:0", "token": "t"})
    assert spec.page_poll_us == DEFAULT_POLL_US
    assert OutgoingSpec.parse({"listen": "127.0.0.1:0", "token": "t", "page_poll_us": 0}).page_poll_us == 0


@needs_kvm
def test_the_page_poll_window_given_to_the_api_reaches_the_page_server(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int | None] = []
    init = PageServer.__init__

    def spy(self: PageServer, *args: Any, **kwargs: Any) -> None:
        seen.append(kwargs.get("page_poll_us"))
        init(self, *args, **kwargs)

    monkeypatch.setattr(PageServer, "__init__", spy)

    async def scenario() -> None:
        async with local_vmm() as vmm:
            await vmm.create_vm("16M", 1, "memtouch", 9)
            for poll_us in (0, None):
                await vmm.outgoing("127.0.0.1:0", TOKEN, page_poll_us=poll_us)
                await vmm.cancel_migration()
    asyncio.run(scenario())
    assert seen == [0, DEFAULT_POLL_US]


def test_the_source_command_takes_a_page_poll_window(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from postcopy import cli
    seen: list[int | None] = []
    monkeypatch.setattr(cli, "cmd_source", lambda args: seen.append(args.page_poll_us) or 0)
    assert cli.main(["source", "--page-poll-us", "0"]) == 0
    assert cli.main(["source"]) == 0
    assert seen == [0, None]  # None: the API's default
    with pytest.raises(SystemExit) as e:
        cli.main(["source", "--page-poll-us", "10001"])
    assert e.value.code == 2 and "microseconds from 0 to 10000" in capsys.readouterr().err


def test_an_incoming_migration_that_completed_is_not_cancelled_while_its_guest_is_checked() -> None:
    """After COMPLETE the source has let its copy go, and the incoming task goes on a while
    (the guest watched, swept, then adopted): a cancel then is a 409, and the task goes on."""
    from postcopy.api.models import IncomingSpec
    from postcopy.api.models import ApiError
    from postcopy.api.service import Incoming, VmmService
    from postcopy.destination.migration import Destination, DestinationState

    async def scenario() -> None:
        service = VmmService()
        dest = Destination("http://127.0.0.1:9", TOKEN, fault_mode="exit")
        dest.state = DestinationState.COMPLETE  # as wait_complete() leaves it
        checking = asyncio.get_running_loop().create_future()  # the task, still checking the guest
        spec = IncomingSpec("http://127.0.0.1:9", TOKEN, "exit", 1.0, 256, None, False)  # type: ignore[arg-type]
        service.incoming = Incoming(spec, task=asyncio.ensure_future(checking), dest=dest)
        with pytest.raises(ApiError) as e:
            await service.cancel_migration()
        assert e.value.code == 409 and "complete" in e.value.message
        assert not service.incoming.task.done()  # type: ignore[union-attr]
        checking.set_result(None)
        await service.incoming.task  # type: ignore[misc]

    asyncio.run(scenario())


def test_an_incoming_readahead_max_below_readahead_is_refused() -> None:
    body = {"source_url": "http://127.0.0.1:1", "token": "t" * 32, "readahead": 8, "readahead_max": 4}
    with pytest.raises(ApiError, match="'readahead_max' \\(4\\) is below 'readahead' \\(8\\)"):
        IncomingSpec.parse(body)
    assert IncomingSpec.parse({**body, "readahead": 1, "readahead_max": 1}).readahead_max == 1
    assert IncomingSpec.parse({k: v for k, v in body.items() if k != "readahead_max"}).readahead_max == 256
