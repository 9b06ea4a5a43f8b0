"""Page workers: each plain-TCP page socket served by a process of its own.

Why: a thread per socket put the sockets of a destination's vCPUs under one GIL, and a thread
that found it held slept until it was woken across CPUs (tens of us on this host): a fifth of
the 2-vCPU fault's p99, and it grows with vCPUs (docs/perf/journal.md, fetch).

How: the page server spawns one fork server (``PageWorkers.start``, fork_server.py): a fresh
interpreter, not a fork of the VMM. A fork of the VMM would share its memory copy-on-write, and the VMM would
then copy each page it writes first: measured, the source's pause grew by ~3 ms. The fork
server maps guest RAM read-only from its memfds (or RAM file) and the page server's board
(answers.Board) from its memfd, then waits on a SOCK_SEQPACKET socket for work: a slot and a
connection's descriptor (SCM_RIGHTS). For each it forks a worker, which closes everything but
that connection and serves it (page_loop.WorkerLoop) until the connection ends, and answers
with the worker's pidfd, through which the page server learns of its end
(page_socket.WorkerPageSocket). Guest RAM is never written here.

Polling: a worker whose client polls for its answers (a destination's single vCPU, which asks
with ``?poll=1``) polls for that client's next request for ``poll_us`` after each answer before
it sleeps in ``recv`` (busypoll.py). A vCPU walking its memory asks again within tens of us; a
worker that slept would be woken through the host each time. A 1-vCPU one-page scan of 64 MiB,
four rounds alternated: fault p50 52.9 -> 24.3 us, p99 93.8 -> 56.3, 15.4 -> 26.1 k pages/s.
What it costs is CPU on the source, where the guest is paused: at most ``poll_us`` after each
request, none once requests stop. Other sockets do not poll: with 2 vCPUs on this 2-core host
the workers share the vCPUs' CPUs, and polling for them cost the fetch (p50 40.2 -> 56.5 us, p99
129.7 -> 162.0; docs/performance.md, fetch). ``page_poll_us`` (API) or ``--page-poll-us`` sets
the window; 0 turns polling off.

Lifetimes: the fork server dies with the page server's process (PR_SET_PDEATHSIG) and exits when
its socket closes (PageWorkers.close, after the page server has closed its page sockets); a worker
dies with the fork server. So a killed VMM leaves no process serving its guest's pages.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import TYPE_CHECKING, Final

from postcopy.logs import child_env
from postcopy.source.fork_server import FD_SPACE, READY, REPLY, REQUEST, received_fds, send_fd

if TYPE_CHECKING:
    from postcopy.source.answers import Board
    from postcopy.source.page_socket import WorkerPageSocket
    from vmm.memory import GuestMemory

__all__ = ["DEFAULT_POLL_US", "MAX_POLL_US", "PageWorkers"]

log = logging.getLogger("postcopy.source.page_workers")

START_TIMEOUT_S: Final = 10.0
DEFAULT_POLL_US: Final = 100  # 50, 100 and 200 us did alike on this host; less CPU than 200
MAX_POLL_US: Final = 10_000
STOP_TIMEOUT_S: Final = 2.0


class PageWorkers:
    """The page server's side: its fork server, and the sockets waiting for a worker."""

    def __init__(self, proc: subprocess.Popen[bytes], control: socket.socket) -> None:
        self._proc = proc
        self._control = control
        self._waiting: dict[int, WorkerPageSocket] = {}  # by slot
        self.alive = True
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(control.fileno(), self._on_reply)

    @classmethod
    async def start(cls, board: Board, memory: GuestMemory) -> PageWorkers | None:
        """The fork server for ``memory`` (memfd- or file-backed) and ``board``, once it is
        ready to fork (a fresh interpreter: ~0.1 s here), so that no page socket waits for it
        after the switchover. None, with the reason logged, if it cannot start: the page
        server then serves its sockets by threads."""
        try:
            proc, control = cls._spawn(board, memory)
        except (OSError, ValueError) as error:
            log.error("page workers: cannot start the fork server: %s; page sockets are served by threads", error)
            return None
        try:
            ready = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(control, REPLY.size), START_TIMEOUT_S)
        except (OSError, TimeoutError) as error:
            ready = repr(error).encode()
        if ready != READY:
            control.close()
            proc.kill()
            await asyncio.to_thread(proc.wait)
            log.error("page workers: the fork server did not start (%r, status %s); page sockets are served by "
                      "threads", ready, proc.returncode)
            return None
        return cls(proc, control)

    @staticmethod
    def _spawn(board: Board, memory: GuestMemory) -> tuple[subprocess.Popen[bytes], socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        regions = [f"{r.gpa}:{r.size}:{r.fd}:{r.offset}" for r in memory.regions]
        if any(r.fd < 0 for r in memory.regions):
            raise ValueError("page workers need guest RAM with a file descriptor (memfd or file backing)")
        args = [sys.executable, "-m", "postcopy.source.fork_server", "--parent", str(os.getpid()),
                "--board", str(board.fd), "--control", str(theirs.fileno()), *(a for r in regions for a in ("--region", r))]
        try:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, env=dict(os.environ, **child_env()),
                                    pass_fds=(board.fd, theirs.fileno(), *(r.fd for r in memory.regions)))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        return proc, ours

    async def serve(self, socket_: WorkerPageSocket, slot: int, max_frame: int, poll_us: int = 0) -> bool:
        """Hand the connection of ``socket_`` (board slot ``slot``) to a new worker, which polls
        for each next request for ``poll_us``, once it runs; False if there are no workers any
        more (the caller serves the socket another way)."""
        if not self.alive:
            return False
        try:
            send_fd(self._control, REQUEST.pack(slot, max_frame, poll_us), socket_.sock.fileno())
        except OSError as error:  # gone, or (never here) its queue full
            self._failed(f"cannot reach the fork server: {error}")
            return False
        self._waiting[slot] = socket_
        try:
            return await asyncio.wait_for(asyncio.shield(socket_.started), START_TIMEOUT_S)
        except TimeoutError:
            self._failed(f"no worker started within {START_TIMEOUT_S} s")
            return False

    def _on_reply(self) -> None:
        while True:
            try:
                data, ancdata, _, _ = self._control.recvmsg(REPLY.size, FD_SPACE)
            except BlockingIOError:
                return
            except OSError as error:
                self._failed(f"the fork server's socket failed: {error}")
                return
            if not data:
                self._failed(f"the fork server exited (status {self._proc.poll()})")
                return
            fds = received_fds(ancdata)
            slot, status = REPLY.unpack(data)
            socket_ = self._waiting.pop(slot, None)
            if not status and len(fds) == 1 and socket_ is not None:
                socket_.served_by(fds[0])
                continue
            for fd in fds:
                if socket_ is None:  # a worker for a connection nobody waits for: it must not serve
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                os.close(fd)
            if socket_ is not None:
                socket_.not_served()
            if status:
                self.alive = False  # a fork failed: threads from now on
            log.error("page worker for slot %d: %s", slot, os.strerror(-status) if status else
                      "no pidfd in the fork server's answer" if socket_ is not None else "no socket waits for it")

    def _failed(self, why: str) -> None:
        """No workers any more: the fork server is killed, and its workers with it (a late
        worker must not serve a connection the page server serves another way)."""
        if self.alive:
            log.error("page workers: %s; page sockets are served by threads from now on", why)
        self.alive = False
        if self._proc.poll() is None:
            self._proc.kill()
        self._loop.remove_reader(self._control.fileno())
        for socket_ in self._waiting.values():
            socket_.not_served()
        self._waiting.clear()

    async def close(self) -> None:
        """Stop the fork server (its workers, if any are left, die with it)."""
        if self.alive:
            self._loop.remove_reader(self._control.fileno())
            self.alive = False
        self._control.close()
        try:
            await asyncio.to_thread(self._proc.wait, STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            await asyncio.to_thread(self._proc.wait)
