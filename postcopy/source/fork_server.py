"""The fork server of a page server's page workers (page_workers.py says why and how).

Started by PageWorkers.start as ``python -m postcopy.source.fork_server``; it imports only what
serving needs (no asyncio, no aiohttp), so that it is ready soon on a busy source. Its protocol
with the page server, on a SOCK_SEQPACKET socket: READY once it has mapped guest RAM and the
board; then per page socket a REQUEST (slot, max frame, poll window; the connection by
SCM_RIGHTS) answered by a REPLY (slot, 0 or -errno; the worker's pidfd by SCM_RIGHTS).
"""
from __future__ import annotations

import argparse
import array
import gc
import logging
import os
import signal
import socket
import struct
from typing import Final

from postcopy.logs import LOG_FORMAT_ENV, LOG_FORMATS, VERBOSE_ENV, setup_logging
from postcopy.source.answers import Board, PageAnswerer, Span
from postcopy.source.page_loop import WorkerLoop
from vmm.libc import PR_SET_PDEATHSIG, map_fd, prctl

__all__ = ["FD_SPACE", "READY", "REPLY", "REQUEST", "main", "received_fds", "send_fd"]

log = logging.getLogger("postcopy.source.fork_server")

REQUEST: Final = struct.Struct("<III")  # slot, max frame, poll us; the connection as SCM_RIGHTS
REPLY: Final = struct.Struct("<Ii")  # slot, 0 or -errno; the worker's pidfd as SCM_RIGHTS
READY: Final = REPLY.pack(0xFFFFFFFF, 0)  # the first message: it maps what it serves
FD_SPACE: Final = socket.CMSG_SPACE(array.array("i", [0]).itemsize)
REAP_INTERVAL_S: Final = 0.5  # how often an idle fork server collects its workers' exits


def send_fd(sock: socket.socket, data: bytes, fd: int) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return list(fds)


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


def _worker(conn_fd: int, control: socket.socket, board: Board, slot: int, spans: list[Span], max_frame: int,
            poll_us: int, fork_server: int) -> None:
    """In the forked worker: serve the connection, then exit."""
    control.close()  # the page server's requests are the fork server's alone
    _die_with(fork_server)
    with open("/proc/self/comm", "w") as comm:  # what ps and top show
        comm.write("page-worker")
    gc.disable()  # the loop makes no cycles; a collection would only pause an answer
    WorkerLoop(conn_fd, PageAnswerer(board, slot, spans), board, slot, max_frame=max_frame,
               poll_ns=poll_us * 1000).run()


def serve_forever(control: socket.socket, board: Board, spans: list[Span]) -> None:
    """Fork a worker per request until the page server closes its end."""
    control.settimeout(REAP_INTERVAL_S)
    me = os.getpid()
    gc.freeze()  # what the workers inherit stays shared: no collection writes to it
    while True:
        try:
            data, ancdata, _, _ = control.recvmsg(REQUEST.size, FD_SPACE)
        except TimeoutError:
            _reap()
            continue
        if not data:
            return
        fds = received_fds(ancdata)
        if len(data) != REQUEST.size or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            log.error("a malformed request from the page server: %d bytes, %d descriptors", len(data), len(fds))
            continue
        slot, max_frame, poll_us = REQUEST.unpack(data)
        try:
            pid = os.fork()
        except OSError as error:
            os.close(fds[0])
            control.sendall(REPLY.pack(slot, -(error.errno or 1)))
            continue
        if pid == 0:
            status = 1
            try:
                _worker(fds[0], control, board, slot, spans, max_frame, poll_us, me)
                status = 0
            finally:
                os._exit(status)
        os.close(fds[0])
        pidfd = os.pidfd_open(pid)
        try:
            send_fd(control, REPLY.pack(slot, 0), pidfd)
        finally:
            os.close(pidfd)
        _reap()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="postcopy.source.fork_server",
                                     description="a page server's fork server (started by the page server)")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--board", type=int, required=True)
    parser.add_argument("--control", type=int, required=True)
    parser.add_argument("--region", action="append", default=[], help="gpa:size:fd:offset")
    args = parser.parse_args(argv)
    _die_with(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C: the page server decides
    fmt = os.environ.get(LOG_FORMAT_ENV, "text")  # as its page server logs (logs.child_env)
    setup_logging(os.environ.get(VERBOSE_ENV) == "1", fmt if fmt in LOG_FORMATS else "text")  # type: ignore[arg-type]
    board = Board.attach(args.board)
    spans = _map_regions(args.region)
    with socket.socket(fileno=args.control) as control:
        control.sendall(READY)
        serve_forever(control, board, spans)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
