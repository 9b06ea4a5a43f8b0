"""Page workers: each plain-TCP page socket served by a process of its own.

Why: a thread per socket put the sockets of a destination's vCPUs under one GIL, and a thread
that found it held slept until it was woken across CPUs (tens of us on this host): a fifth of
the 2-vCPU fault's p99, and it grows with vCPUs (docs/performance.md, fetch).

How: the page server spawns one fork server (``PageWorkers.spawn``): a fresh interpreter, not
a fork of the VMM. A fork of the VMM would share its memory copy-on-write, and the VMM would
then copy each page it writes first: measured, the source's pause grew by ~3 ms. The fork
server maps guest RAM read-only from its memfds (or RAM file) and the page server's board
(answers.Board) from its memfd, then waits on a SOCK_SEQPACKET socket for work: a slot and a
connection's descriptor (SCM_RIGHTS). For each it forks a worker, which closes everything but
that connection and serves it (page_socket.WorkerLoop) until the connection ends, and answers
with the worker's pidfd, through which the page server learns of its end
(page_socket.WorkerPageSocket). Guest RAM is never written here.

Lifetimes: the fork server dies with the page server's process (PR_SET_PDEATHSIG) and exits when
its socket closes (PageWorkers.close, after the page server has closed its page sockets); a worker
dies with the fork server. So a killed VMM leaves no process serving its guest's pages.
"""
from __future__ import annotations

import argparse
import array
import asyncio
import gc
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
from typing import TYPE_CHECKING, Final

from postcopy.source.answers import Board, PageAnswerer, Span
from postcopy.source.page_socket import WorkerLoop
from vmm.libc import PR_SET_PDEATHSIG, map_fd, prctl

if TYPE_CHECKING:
    from postcopy.source.page_socket import WorkerPageSocket
    from vmm.memory import GuestMemory

__all__ = ["PageWorkers", "main"]

log = logging.getLogger("postcopy.source.page_workers")

REQUEST: Final = struct.Struct("<II")  # slot, max frame; the connection as SCM_RIGHTS
REPLY: Final = struct.Struct("<Ii")  # slot, 0 or -errno; the worker's pidfd as SCM_RIGHTS
FD_SPACE: Final = socket.CMSG_SPACE(array.array("i", [0]).itemsize)
READY: Final = REPLY.pack(0xFFFFFFFF, 0)  # the fork server's first message: it maps what it serves
REAP_INTERVAL_S: Final = 0.5  # how often an idle fork server collects its workers' exits
START_TIMEOUT_S: Final = 10.0
STOP_TIMEOUT_S: Final = 2.0


def _send_fd(sock: socket.socket, data: bytes, fd: int) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return list(fds)


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
        args = [sys.executable, "-m", "postcopy.source.page_workers", "--parent", str(os.getpid()),
                "--board", str(board.fd), "--control", str(theirs.fileno()), *(a for r in regions for a in ("--region", r))]
        try:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                    pass_fds=(board.fd, theirs.fileno(), *(r.fd for r in memory.regions)))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        return proc, ours

    async def serve(self, socket_: WorkerPageSocket, slot: int, max_frame: int) -> bool:
        """Hand the connection of ``socket_`` (board slot ``slot``) to a new worker, once it
        runs; False if there are no workers any more (the caller serves the socket another way)."""
        if not self.alive:
            return False
        try:
            _send_fd(self._control, REQUEST.pack(slot, max_frame), socket_.sock.fileno())
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
            fds = _received_fds(ancdata)
            slot, status = REPLY.unpack(data)
            socket_ = self._waiting.pop(slot, None)
            if status or len(fds) != 1 or socket_ is None:
                for fd in fds:
                    os.close(fd)
                if socket_ is not None:
                    socket_.not_served()
                self.alive = False  # a fork failed: threads from now on
                log.error("page worker for slot %d not started: %s", slot,
                          os.strerror(-status) if status else "no pidfd in the fork server's answer")
                continue
            socket_.served_by(fds[0])

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


# -- the fork server ---------------------------------------------------------------------------

def _die_with(parent: int) -> None:
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # gone before the prctl
        os._exit(0)


def _map_regions(regions: list[str]) -> list[Span]:
    """Guest RAM, read-only: gpa:size:fd:offset per region; the descriptors are closed."""
    spans: list[Span] = []
    for text in regions:
        gpa, size, fd, offset = (int(x) for x in text.split(":"))
        try:
            spans.append((gpa, gpa + size, map_fd(fd, size, offset, writable=False)))
        finally:
            os.close(fd)
    return spans


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return


def _worker(conn_fd: int, control: socket.socket, board: Board, slot: int, spans: list[Span], max_frame: int) -> None:
    """In the forked worker: serve the connection, then exit."""
    control.close()  # the page server's requests are the fork server's alone
    _die_with(os.getppid())
    with open("/proc/self/comm", "w") as comm:  # what ps and top show
        comm.write("page-worker")
    gc.disable()  # the loop makes no cycles; a collection would only pause an answer
    WorkerLoop(conn_fd, PageAnswerer(board, slot, spans), board, slot, max_frame=max_frame).run()


def serve_forever(control: socket.socket, board: Board, spans: list[Span]) -> None:
    """Fork a worker per request until the page server closes its end."""
    control.settimeout(REAP_INTERVAL_S)
    gc.freeze()  # what the workers inherit stays shared: no collection writes to it
    while True:
        try:
            data, ancdata, _, _ = control.recvmsg(REQUEST.size, FD_SPACE)
        except TimeoutError:
            _reap()
            continue
        if not data:
            return
        fds = _received_fds(ancdata)
        if len(data) != REQUEST.size or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            log.error("a malformed request from the page server: %d bytes, %d descriptors", len(data), len(fds))
            continue
        slot, max_frame = REQUEST.unpack(data)
        try:
            pid = os.fork()
        except OSError as error:
            os.close(fds[0])
            control.sendall(REPLY.pack(slot, -(error.errno or 1)))
            continue
        if pid == 0:
            status = 1
            try:
                _worker(fds[0], control, board, slot, spans, max_frame)
                status = 0
            finally:
                os._exit(status)
        os.close(fds[0])
        pidfd = os.pidfd_open(pid)
        try:
            _send_fd(control, REPLY.pack(slot, 0), pidfd)
        finally:
            os.close(pidfd)
        _reap()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="postcopy.source.page_workers",
                                     description="a page server's fork server (started by the page server)")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--board", type=int, required=True)
    parser.add_argument("--control", type=int, required=True)
    parser.add_argument("--region", action="append", default=[], help="gpa:size:fd:offset")
    args = parser.parse_args(argv)
    _die_with(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C: the page server decides
    logging.basicConfig(level=logging.WARNING, format="page worker %(process)d: %(levelname)s %(message)s")
    board = Board.attach(args.board)
    spans = _map_regions(args.region)
    with socket.socket(fileno=args.control) as control:
        control.sendall(READY)
        serve_forever(control, board, spans)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
