"""Page workers (source/page_workers.py): a process per plain page socket, forked by the page
server's fork server; their board (source/answers.py); and what happens when any of them dies."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import pytest

from postcopy.destination.client import FetchError, SyncPageConnection
from postcopy.source.answers import Board, Counts
from postcopy.source.page_server import PageServer
from postcopy.source.page_socket import ThreadedPageSocket, WorkerPageSocket
from proto import PAGE_SIZE
from tests.postcopy.test_transport import GPA, TOKEN, serve
from vmm.machine import Machine
from vmm.memory import GuestMemory


def _children(pid: int) -> list[int]:
    return [int(c) for t in os.listdir(f"/proc/{pid}/task") for c in open(f"/proc/{pid}/task/{t}/children").read().split()]


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for child in _children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def _gone(pids: list[int], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [p for p in pids if os.path.exists(f"/proc/{p}") and _state(p) != "Z"]:
            return True
        time.sleep(0.02)
    return False


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


# -- the board -------------------------------------------------------------------------------------

def test_a_board_gives_zeroed_slots_carries_close_requests_and_runs_out_with_a_clear_none() -> None:
    board = Board.create()
    try:
        slot = board.take_slot()
        assert slot is not None
        board.counts(slot)[Counts.FAST_PAGES] = 7
        assert board.close_requested(slot) is None
        board.request_close(slot, 1001, "server shutdown " + "x" * 500)  # a reason longer than a slot holds
        code, reason = board.close_requested(slot)  # type: ignore[misc]
        assert code == 1001 and reason.startswith("server shutdown") and len(reason) == Board.CLOSE_REASON_MAX
        board.give_back(slot)
        again = [board.take_slot() for _ in range(Board.MAX_SLOTS)]
        assert slot in again and None not in again and board.take_slot() is None
        assert board.counts(slot).tolist() == [0] * len(Counts.FIELDS) and board.close_requested(slot) is None
        with pytest.raises(ValueError, match="no slot"):
            board.counts(Board.MAX_SLOTS)
        # a worker's view of the same memfd sees the same bytes, and keeps no descriptor
        fd = os.dup(board.fd)
        theirs = Board.attach(fd)
        with pytest.raises(OSError):
            os.fstat(fd)
        board.set_state("serving")
        theirs.counts(3)[Counts.PAGES_DATA] = 5
        assert theirs.state[0] == 1 and board.counts(3)[Counts.PAGES_DATA] == 5
    finally:
        board.close()


def test_counts_read_as_the_server_stats_fields() -> None:
    counts = [0] * len(Counts.FIELDS)
    counts[Counts.FAST_PAGES], counts[Counts.PAGES_DATA], counts[Counts.REQUESTS["demand"]] = 3, 2, 1
    counts[Counts.ERRORS[416]] = 4
    stats = Counts.as_stats(counts)
    assert stats["pages_data"] == 5 and stats["requests"]["demand"] == 4  # type: ignore[index]
    assert stats["errors"] == {416: 4}


# -- workers through a real page server -----------------------------------------------------------

def _fetch(url: str, gpa: int = GPA) -> SyncPageConnection:
    conn = SyncPageConnection(url, TOKEN)
    conn.fetch(gpa, 1, "demand")
    return conn


@pytest.mark.usefixtures("kvm_available")
def test_a_killed_worker_ends_its_socket_and_the_rest_go_on() -> None:
    async def body(server: PageServer, machine: Machine, url: str) -> None:
        first, second = await asyncio.gather(asyncio.to_thread(_fetch, url), asyncio.to_thread(_fetch, url))
        try:
            sockets = list(server._sockets)
            assert all(isinstance(s, WorkerPageSocket) for s in sockets)
            victim = sockets[0]
            signal.pidfd_send_signal(victim.pidfd, signal.SIGKILL)  # type: ignore[attr-defined]
            await asyncio.wait_for(victim.closed, 5)
            assert victim not in server._sockets
            answered = 0
            for conn in (first, second):  # one of them lost its socket; the other still answers
                try:
                    batch = await asyncio.to_thread(conn.fetch, GPA + PAGE_SIZE, 1, "demand")
                except FetchError:  # the killed worker's client: its connection is gone
                    continue
                assert batch.data == machine.memory.read(GPA + PAGE_SIZE, PAGE_SIZE)
                answered += 1
            assert answered == 1
            assert server.stats()["requests"]["demand"] >= 3  # the dead worker's counts stay
        finally:
            await asyncio.gather(asyncio.to_thread(first.close), asyncio.to_thread(second.close))

    serve(body)


@pytest.mark.usefixtures("kvm_available")
def test_without_its_fork_server_a_page_server_serves_by_threads_and_a_dead_one_leaves_no_worker() -> None:
    async def body(server: PageServer, machine: Machine, url: str) -> None:
        conn = await asyncio.to_thread(_fetch, url)
        try:
            (worker,) = server._sockets
            assert isinstance(worker, WorkerPageSocket)
            workers = server._workers
            assert workers is not None
            fork_server = workers._proc.pid
            pids = _descendants(os.getpid())
            assert fork_server in pids
            os.kill(fork_server, signal.SIGKILL)  # its workers die with it (PR_SET_PDEATHSIG)
            await asyncio.wait_for(worker.closed, 5)
            later = await asyncio.to_thread(SyncPageConnection, url, TOKEN)
            try:
                batch = await asyncio.to_thread(later.fetch, GPA, 1, "demand")
                assert batch.data == machine.memory.read(GPA, PAGE_SIZE)
                assert [type(s) for s in server._sockets] == [ThreadedPageSocket]
                assert not workers.alive
            finally:
                await asyncio.to_thread(later.close)
        finally:
            await asyncio.to_thread(conn.close)

    serve(body)


@pytest.mark.usefixtures("kvm_available")
def test_closing_the_page_server_ends_its_workers_and_its_fork_server() -> None:
    before = set(_descendants(os.getpid()))
    left: list[int] = []

    async def body(server: PageServer, machine: Machine, url: str) -> None:
        conns = await asyncio.gather(*(asyncio.to_thread(_fetch, url) for _ in range(3)))
        left.extend(set(_descendants(os.getpid())) - before)
        assert len(left) == 4  # the fork server and a worker per socket
        # the clients keep their sockets open: close() must end them, not wait for them
        for conn in conns:
            conn.ws.sock.settimeout(5)

    serve(body)  # leaves the PageServer's context: close()
    # Within 3 s, under the clients' 5 s socket timeouts: close() ended them, they did not time
    # out (1 s was once too short in a full run, on a busy host).
    assert left and _gone(left, 3.0), [(p, _state(p)) for p in left]


@pytest.mark.usefixtures("kvm_available")
def test_a_killed_source_vmm_leaves_no_page_worker() -> None:
    from postcopy.bench.common import source_process, tasks  # a VMM in a process of its own
    with source_process(16 << 20, 1) as source:
        conn = SyncPageConnection(source.url, source.token)
        try:
            deadline = time.monotonic() + 10
            while len(_descendants(source.proc.pid)) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            family = _descendants(source.proc.pid)
            assert len(family) == 2, family  # the fork server, one worker
            assert len(tasks(source.proc.pid)) > len(family)
            source.proc.kill()
            source.proc.wait()
            assert _gone(family), [(p, _state(p)) for p in family]
        finally:
            conn.close()


def test_the_fork_server_refuses_to_start_without_its_page_server() -> None:
    """Started with a parent that is not its own (its page server gone already), it exits at
    once, before it maps or forks anything."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    board = Board.create()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "postcopy.source.fork_server", "--parent", "1",
                                 "--board", str(board.fd), "--control", str(theirs.fileno())],
                                pass_fds=(board.fd, theirs.fileno()))
        theirs.close()
        assert proc.wait(30) == 0
        ours.settimeout(5)
        assert ours.recv(16) == b""  # no READY: the socket just closed
    finally:
        ours.close()
        board.close()


@pytest.mark.usefixtures("kvm_available")
def test_a_page_socket_past_the_boards_slots_is_refused_with_503_before_the_upgrade() -> None:
    async def body(server: PageServer, machine: Machine, url: str) -> None:
        taken = []
        while (slot := server._board.take_slot()) is not None:
            taken.append(slot)
        with pytest.raises(Exception, match="503") as refused:
            await asyncio.to_thread(SyncPageConnection, url, TOKEN)
        assert "too many page sockets" in str(refused.value)
        server._board.give_back(taken.pop())
        conn = await asyncio.to_thread(_fetch, url)  # a slot again: served
        await asyncio.to_thread(conn.close)
        assert server.stats()["errors"] == {"503": 1}

    serve(body)


class _Waiting:
    """A WorkerPageSocket's part that PageWorkers talks to."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.calls: list[object] = []

    def served_by(self, pidfd: int) -> None:
        self.calls.append(("served", pidfd))

    def not_served(self) -> None:
        self.calls.append("not served")


class _Proc:
    def __init__(self) -> None:
        self.killed = False

    def poll(self) -> int | None:
        return None

    def kill(self) -> None:
        self.killed = True

    def wait(self, timeout: float | None = None) -> int:
        return 0


def test_the_page_server_takes_every_answer_of_a_fork_server_as_it_comes() -> None:
    """A worker started, a fork that failed (threads from then on), a worker for a slot nobody
    waits for (killed), and a fork server gone (every waiting socket told, the server killed)."""
    from postcopy.source.fork_server import REPLY, send_fd
    from postcopy.source.page_workers import PageWorkers

    async def scenario() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        proc = _Proc()
        workers = PageWorkers(proc, ours)  # type: ignore[arg-type]
        served, failed, left = _Waiting(), _Waiting(), _Waiting()
        try:
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            pidfd = os.pidfd_open(child.pid)
            for slot, waiting in ((1, served), (2, failed), (4, left)):
                workers._waiting[slot] = waiting  # type: ignore[assignment]
            send_fd(theirs, REPLY.pack(1, 0), pidfd)
            theirs.send(REPLY.pack(2, -11))  # EAGAIN: the fork failed
            send_fd(theirs, REPLY.pack(3, 0), pidfd)  # slot 3: nobody waits
            for _ in range(100):
                if served.calls and failed.calls and child.poll() is not None:
                    break
                await asyncio.sleep(0.01)
            assert served.calls and served.calls[0][0] == "served"  # type: ignore[index]
            assert failed.calls == ["not served"] and not workers.alive  # threads from now on
            assert child.wait(5) == -signal.SIGKILL  # the orphan worker was killed
            theirs.close()  # the fork server goes
            for _ in range(100):
                if left.calls:
                    break
                await asyncio.sleep(0.01)
            assert left.calls == ["not served"] and proc.killed
        finally:
            os.close(pidfd)
            for call in served.calls:
                os.close(call[1])  # type: ignore[index]
            for w in (served, failed, left):
                w.sock.close()
            await workers.close()

    asyncio.run(scenario())


def _cpu_ticks(pid: int) -> int:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, clock ticks


def _worker_pid(socket_: WorkerPageSocket) -> int:
    for line in open(f"/proc/self/fdinfo/{socket_.pidfd}"):
        if line.startswith("Pid:"):
            return int(line.split()[1])
    raise AssertionError("no Pid in the pidfd's fdinfo")


def _voluntary_switches(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


@pytest.mark.usefixtures("kvm_available")
@pytest.mark.parametrize(("poll_us", "client_polls", "polls"), [(10_000, True, True), (10_000, False, False),
                                                                (0, True, False)])
def test_a_page_worker_polls_for_the_next_request_where_its_client_polls(poll_us: int, client_polls: bool,
                                                                          polls: bool) -> None:
    # Twenty requests ~2 ms apart: a worker that polls 10 ms never sleeps between them (a
    # sched_yield is no voluntary switch); one that does not sleeps in recv before each. It
    # polls where its client asked (?poll=1, a client that polls for its answers) and the page
    # server allows it (page_poll_us). Once requests stop it sleeps: no CPU over 150 idle ms.
    ticks = os.sysconf("SC_CLK_TCK")

    async def body(server: PageServer, machine: Machine, url: str) -> None:
        conn = await asyncio.to_thread(SyncPageConnection, url, TOKEN, poll_ns=200_000 if client_polls else 0)
        try:
            await asyncio.to_thread(conn.fetch, GPA, 1, "demand")
            worker, = server._sockets
            assert isinstance(worker, WorkerPageSocket) and server.page_poll_us == poll_us
            pid = _worker_pid(worker)
            before = _voluntary_switches(pid)
            for i in range(20):
                batch = await asyncio.to_thread(conn.fetch, GPA + i * PAGE_SIZE, 1, "demand")
                assert batch.data == machine.memory.read(GPA + i * PAGE_SIZE, PAGE_SIZE)
                await asyncio.sleep(0.002)
            slept = _voluntary_switches(pid) - before
            assert slept <= 5 if polls else slept >= 15
            await asyncio.sleep(0.02)  # past the window: asleep in recv from here on
            idle = _cpu_ticks(pid)
            await asyncio.sleep(0.15)
            assert (_cpu_ticks(pid) - idle) * 1000 / ticks <= 20
        finally:
            await asyncio.to_thread(conn.close)

    serve(body, page_poll_us=poll_us)


@pytest.mark.usefixtures("kvm_available")
def test_a_page_socket_ignores_query_parameters_it_does_not_know() -> None:
    # A later destination may send more; this source serves the socket.
    async def through_query(server: PageServer, machine: Machine, url: str) -> None:
        from postcopy.destination.websocket import BlockingWebSocket
        ws = await asyncio.to_thread(BlockingWebSocket, f"{url}/v1/pages/ws?later=2&poll=1",
                                     {"Authorization": f"Bearer {TOKEN}"}, max_message=1 << 20)
        try:
            await asyncio.sleep(0.05)
            assert len(server._sockets) == 1
        finally:
            ws.close()

    serve(through_query)


@pytest.mark.usefixtures("kvm_available")
@pytest.mark.parametrize("query", ["?poll=2", "?poll=", "?poll=1&poll=1", "?poll=yes&x=1"])
def test_a_page_socket_with_another_query_is_refused(query: str) -> None:
    async def body(server: PageServer, machine: Machine, url: str) -> None:
        async with aiohttp.ClientSession() as http, http.get(
                f"{url}/v1/pages/ws{query}", headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            assert response.status == 400
            assert b"poll is 0 or 1, once" in await response.read()
        assert not server._sockets

    serve(body)


def test_a_page_server_refuses_a_poll_window_out_of_range() -> None:
    from postcopy.source.page_workers import MAX_POLL_US
    memory = GuestMemory.create(1 << 20, "memfd", "poll-range")
    try:
        for bad in (-1, MAX_POLL_US + 1):
            with pytest.raises(ValueError, match="page_poll_us must be 0 to"):
                PageServer(None, token="t", migration_id="m", workload={}, memory=memory, page_poll_us=bad)
    finally:
        memory.close()
