"""The yardsticks: what two Python processes reach over a raw loopback TCP socket, measured in
the same run as the page transport so the ratios are honest.

- ping-pong: a ~24-byte request, a 4 KiB answer, one at a time (a demand fetch's shape),
  blocking in ``recv`` on both ends (issue 10's yardstick) or, as the like-for-like yardstick
  of a VM's single vCPU's fetch, polling as it does for the answer and as a page worker does
  for the request;
- stream: N bytes pushed in 1 MiB sends into a reused 1 MiB receive buffer (the background
  transfer's shape, with no framing, checksums or installs), each end on a CPU of its own
  where there are two: left to the scheduler, the two ends sometimes shared a CPU and the
  rate halved (1,400-1,600 against 4,000-4,700 MiB/s here, run to run), so the yardstick,
  not the transfer, decided the ratio. The transfer it is compared with uses both CPUs.

The peer is ``python -m postcopy.bench.socket_baseline serve``: it prints its port, then
answers one connection in the mode the client's first byte names.
"""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from typing import Final

from postcopy.busypoll import recv_into_polling
from proto.version import PAGE_SIZE
from vmm.libc import ends_with_parent

REQUEST_BYTES: Final = 24  # about a msgpack PageRequest
CHUNK_BYTES: Final = 1 << 20
MODE_PINGPONG, MODE_STREAM = b"P", b"S"
_HELLO = struct.Struct("<cQQ")  # mode, rounds or total bytes, the peer's poll window (ns)


def _recv_exact(sock: socket.socket, view: memoryview, poll_ns: int = 0) -> None:
    """Fill ``view``, polling for its first bytes for ``poll_ns`` (busypoll.py) if given."""
    got = 0
    while got < len(view):
        n = recv_into_polling(sock, view[got:], poll_ns) if poll_ns and not got else sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("peer closed the socket")
        got += n


def serve(listener: socket.socket) -> None:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    hello = bytearray(_HELLO.size)
    _recv_exact(conn, memoryview(hello))
    mode, amount, poll_ns = _HELLO.unpack(hello)
    if mode == MODE_PINGPONG:
        request = memoryview(bytearray(REQUEST_BYTES))
        page = bytes(range(256)) * (PAGE_SIZE // 256)
        for _ in range(amount):
            _recv_exact(conn, request, poll_ns)  # with poll_ns, as a page worker waits for its next request
            conn.sendall(page)
    else:
        chunk = memoryview(bytes(CHUNK_BYTES))
        left = amount
        while left:
            n = min(left, CHUNK_BYTES)
            conn.sendall(chunk[:n])
            left -= n
    conn.close()


class Peer:
    """The serving process; one measurement per Peer."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "postcopy.bench.socket_baseline", "serve"],
                                     stdout=subprocess.PIPE, preexec_fn=ends_with_parent())
        assert self.proc.stdout is not None
        port = int(self.proc.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def pingpong_ns(rounds: int, *, poll_ns: int = 0, peer_poll_ns: int = 0, cpu: int | None = None,
                peer_cpu: int | None = None) -> list[int]:
    """Round-trip times of ``rounds`` request/4 KiB-answer exchanges, in ns, this thread on
    ``cpu`` and the peer on ``peer_cpu`` where given. With ``poll_ns`` the client waits for
    each answer as a polling vCPU's fetch does, and with ``peer_poll_ns`` the peer for each
    request as a page worker does (busypoll.py): the like-for-like yardstick of a polling fetch."""
    peer = Peer()
    cpus = os.sched_getaffinity(0)
    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})  # 0: this thread
        if peer_cpu is not None:
            os.sched_setaffinity(peer.proc.pid, {peer_cpu})
        sock = peer.sock
        sock.sendall(_HELLO.pack(MODE_PINGPONG, rounds, peer_poll_ns))
        request = bytes(REQUEST_BYTES)
        answer = memoryview(bytearray(PAGE_SIZE))
        samples = [0] * rounds
        clock = time.perf_counter_ns
        for i in range(rounds):
            t0 = clock()
            sock.sendall(request)
            _recv_exact(sock, answer, poll_ns)
            samples[i] = clock() - t0
        return samples
    finally:
        os.sched_setaffinity(0, cpus)
        peer.close()


def stream_bytes_per_s(total: int) -> float:
    """Rate of receiving ``total`` bytes pushed by the peer (this thread and the peer on two
    CPUs, where there are two; this thread's CPUs are given back after)."""
    peer = Peer()
    cpus = sorted(os.sched_getaffinity(0))
    try:
        if len(cpus) > 1:
            os.sched_setaffinity(0, {cpus[0]})  # 0: this thread
            os.sched_setaffinity(peer.proc.pid, {cpus[1]})
        sock = peer.sock
        buf = memoryview(bytearray(CHUNK_BYTES))
        t0 = time.perf_counter()
        sock.sendall(_HELLO.pack(MODE_STREAM, total, 0))
        left = total
        while left:
            n = sock.recv_into(buf[:min(left, CHUNK_BYTES)])
            if not n:
                raise ConnectionError("peer closed the stream early")
            left -= n
        return total / (time.perf_counter() - t0)
    finally:
        os.sched_setaffinity(0, cpus)
        peer.close()


def main() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    serve(listener)


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    main()
