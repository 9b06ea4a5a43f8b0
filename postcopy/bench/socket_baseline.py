"""The yardsticks: what two Python processes reach over a raw loopback TCP socket, measured in
the same run as the page transport so the ratios are honest.

- ping-pong: a ~24-byte request, a 4 KiB answer, one at a time (a demand fetch's shape),
  blocking in ``recv`` on both ends (issue 10's yardstick) or, as the like-for-like yardstick
  of a VM's single vCPU's fetch, polling as it does for the answer and as a page worker does
  for the request;
- stream (StreamYardstick): the bytes a transfer moves, pushed in 1 MiB sends from the peer's
  memory (a memfd of the transfer's size, as guest RAM is, written before the clock starts) into
  a buffer of the same size in this process (touched before too): a socket's transfer of the
  same bytes, with no framing, checksums or installs. Beside it, as a reference, the first
  yardstick: one 1 MiB buffer sent again and again into one 1 MiB buffer. Both stay in the
  CPUs' caches there, so it measures the socket alone: ~8% faster here (a median of twelve
  rounds, 0.92) than moving the guest's 256 MiB, which come from memory and go into memory,
  for the transfer and for a socket alike. Each end on a CPU of its own where there are two:
  left to the scheduler, the two ends sometimes shared a CPU and the rate halved (1,400-1,600
  against 4,000-4,700 MiB/s here, run to run), so the yardstick, not the transfer, decided
  the ratio. The transfer it is compared with uses both CPUs.

The peer is ``python -m postcopy.bench.socket_baseline serve [--memory BYTES]``: it fills its
memory, prints its port, then answers one connection, a hello at a time: each hello's first
byte names the mode, and the connection's end ends the peer.
"""
from __future__ import annotations

import array
import mmap
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
MODE_PINGPONG, MODE_STREAM_CACHED, MODE_STREAM_MEMORY = b"P", b"S", b"M"
_HELLO = struct.Struct("<cQQ")  # mode, rounds or total bytes, the peer's poll window (ns)
_QWORDS_PER_PAGE: Final = PAGE_SIZE // 8


def _recv_exact(sock: socket.socket, view: memoryview, poll_ns: int = 0) -> None:
    """Fill ``view``, polling for its first bytes for ``poll_ns`` (busypoll.py) if given."""
    got = 0
    while got < len(view):
        n = recv_into_polling(sock, view[got:], poll_ns) if poll_ns and not got else sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("peer closed the socket")
        got += n


def _next_hello(conn: socket.socket, hello: memoryview) -> bool:
    """The client's next hello; False once it has closed the connection."""
    try:
        _recv_exact(conn, hello)
    except ConnectionError:
        return False
    return True


def backed_memory(size: int, *, memfd: bool, marked: bool) -> mmap.mmap:
    """``size`` bytes (whole pages), every page written before any clock starts, so every
    page is backed: ``marked``, its first qword is its index + 1 (no page is zero, each is
    told from the others), or else 0."""
    if size <= 0 or size % PAGE_SIZE:
        raise ValueError(f"memory of {size} bytes: a positive multiple of {PAGE_SIZE} is needed")
    if memfd:  # as guest RAM is backed
        fd = os.memfd_create("postcopy-yardstick")
        try:
            os.ftruncate(fd, size)
            memory = mmap.mmap(fd, size)
        finally:
            os.close(fd)
    else:
        memory = mmap.mmap(-1, size)
    pages = size // PAGE_SIZE
    view = memoryview(memory).cast("Q")
    view[::_QWORDS_PER_PAGE] = array.array("Q", range(1, pages + 1) if marked else bytes(8 * pages))
    view.release()
    return memory


def _push(conn: socket.socket, source: memoryview, amount: int) -> None:
    """``amount`` bytes in sends of at most CHUNK_BYTES, walking ``source`` from its start and
    wrapping around at its end (the cached yardstick's one chunk: always its start)."""
    offset, left = 0, amount
    while left:
        if offset == len(source):
            offset = 0
        n = min(left, CHUNK_BYTES, len(source) - offset)
        conn.sendall(source[offset:offset + n])
        offset += n
        left -= n


def serve(listener: socket.socket, memory: memoryview | None = None) -> None:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    hello = memoryview(bytearray(_HELLO.size))
    page = bytes(range(256)) * (PAGE_SIZE // 256)
    chunk = memoryview(bytes(CHUNK_BYTES))
    while _next_hello(conn, hello):
        mode, amount, poll_ns = _HELLO.unpack(hello)
        if mode == MODE_PINGPONG:
            request = memoryview(bytearray(REQUEST_BYTES))
            for _ in range(amount):
                _recv_exact(conn, request, poll_ns)  # with poll_ns, as a page worker waits for its next request
                conn.sendall(page)
        elif mode == MODE_STREAM_MEMORY:
            if memory is None or amount > len(memory):
                raise SystemExit(f"asked for {amount} bytes of memory, the peer has {len(memory or b'')}")
            _push(conn, memory, amount)
        elif mode == MODE_STREAM_CACHED:
            _push(conn, chunk, amount)
        else:
            raise SystemExit(f"unknown yardstick mode {mode!r}")
    conn.close()


class Peer:
    """The serving process and its one connection; with ``memory_bytes``, the memory it sends
    from is filled before it listens."""

    def __init__(self, memory_bytes: int = 0) -> None:
        args = [sys.executable, "-m", "postcopy.bench.socket_baseline", "serve"]
        if memory_bytes:
            args += ["--memory", str(memory_bytes)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, preexec_fn=ends_with_parent())
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"the yardstick's peer ended before it listened (exit {self.proc.returncode})")
        self.sock = socket.create_connection(("127.0.0.1", int(line)))
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


class StreamYardstick:
    """The stream's yardsticks over one peer and one connection, for every round of a run:
    ``rate(total)`` moves ``total`` bytes of the peer's memory into this process's buffer
    (``received``); ``rate(total, cached=True)`` sends one 1 MiB buffer again and again into
    one 1 MiB buffer, the first yardstick, reported as a reference. Both memories (``size``
    bytes each) are filled or touched here, before any round is timed."""

    def __init__(self, size: int) -> None:
        self.received = backed_memory(size, memfd=False, marked=False)
        self._chunk = memoryview(bytearray(CHUNK_BYTES))
        self._peer = Peer(size)
        self._cpus = sorted(os.sched_getaffinity(0))
        if len(self._cpus) > 1:
            os.sched_setaffinity(self._peer.proc.pid, {self._cpus[1]})

    def rate(self, total: int, *, cached: bool = False) -> float:
        """Bytes per second of one push of ``total`` bytes (this thread on one CPU and the peer
        on another, where there are two; this thread's CPUs are given back after)."""
        if not cached and total > len(self.received):
            raise ValueError(f"{total} bytes asked for, the yardstick holds {len(self.received)}")
        sock = self._peer.sock
        into = memoryview(self.received)
        try:
            if len(self._cpus) > 1:
                os.sched_setaffinity(0, {self._cpus[0]})  # 0: this thread
            t0 = time.perf_counter()
            sock.sendall(_HELLO.pack(MODE_STREAM_CACHED if cached else MODE_STREAM_MEMORY, total, 0))
            got = 0
            while got < total:
                n = min(total - got, CHUNK_BYTES)
                n = sock.recv_into(self._chunk[:n] if cached else into[got:got + n])
                if not n:
                    raise ConnectionError("the yardstick's peer closed the stream early")
                got += n
            return total / (time.perf_counter() - t0)
        finally:
            into.release()
            os.sched_setaffinity(0, self._cpus)

    def close(self) -> None:
        self._peer.close()
        try:
            self.received.close()
        except BufferError:  # a view of it still held (a failed round's traceback): unmapped with the view
            pass

    def __enter__(self) -> StreamYardstick:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str]) -> None:
    memory = backed_memory(int(argv[2]), memfd=True, marked=True) if argv[1:2] == ["--memory"] else None
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    serve(listener, memoryview(memory) if memory is not None else None)


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    main(sys.argv[1:])
