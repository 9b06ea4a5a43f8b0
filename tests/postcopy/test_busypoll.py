"""recv_into_polling: polls (yielding the CPU between tries) for its window, then blocks; what
comes is what a plain recv_into would have read."""
from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

from postcopy.busypoll import recv_into_polling


def _later(sock: socket.socket, data: bytes | None, after_s: float) -> threading.Thread:
    def send() -> None:
        time.sleep(after_s)
        if data is None:
            sock.shutdown(socket.SHUT_WR)
        else:
            sock.sendall(data)
    thread = threading.Thread(target=send)
    thread.start()
    return thread


@pytest.fixture
def yields(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    counted: list[int] = []
    real = os.sched_yield
    monkeypatch.setattr(os, "sched_yield", lambda: counted.append(1) or real())
    return counted


def test_bytes_that_come_within_the_window_are_taken_by_polling(yields: list[int]) -> None:
    a, b = socket.socketpair()
    with a, b:
        sender = _later(b, b"page", 0.005)
        buf = bytearray(16)
        n = recv_into_polling(a, memoryview(buf), 2_000_000_000)  # 2 s: never reached
        sender.join()
        assert buf[:n] == b"page" and yields  # it polled until they came


def test_after_the_window_it_sleeps_in_recv(yields: list[int]) -> None:
    a, b = socket.socketpair()
    with a, b:
        sender = _later(b, b"late", 0.05)
        buf = bytearray(16)
        t0 = time.monotonic()
        n = recv_into_polling(a, memoryview(buf), 1_000_000)  # 1 ms of polling, then blocking
        sender.join()
        assert buf[:n] == b"late" and time.monotonic() - t0 >= 0.04
        polled = len(yields)
        assert polled < 100_000  # it stopped polling long before the bytes came (blocked in recv)


def test_a_closed_peer_reads_as_zero_and_a_socket_timeout_still_holds(yields: list[int]) -> None:
    a, b = socket.socketpair()
    with a, b:
        _later(b, None, 0.002).join()
        assert recv_into_polling(a, memoryview(bytearray(8)), 10_000_000) == 0
    a, b = socket.socketpair()
    with a, b:  # the kernel's receive timeout, as BlockingWebSocket sets it: EAGAIN once it runs out
        a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 50_000))
        t0 = time.monotonic()
        with pytest.raises(BlockingIOError):
            recv_into_polling(a, memoryview(bytearray(8)), 1_000_000)
        assert 0.04 <= time.monotonic() - t0 < 1
