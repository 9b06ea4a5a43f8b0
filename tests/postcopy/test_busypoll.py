"""recv_into_polling: polls (yielding the CPU between tries) for its window, then blocks; what
comes is what a plain recv_into would have read."""
from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable

import pytest

from postcopy.busypoll import recv_into_polling


def _later(sock: socket.socket, data: bytes | None, after_s: float,
           before: Callable[[], None] = lambda: None) -> threading.Thread:
    def send() -> None:
        time.sleep(after_s)
        before()
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
        def polling() -> None:  # the bytes go once the receiver has polled at least once
            while not yields:
                time.sleep(0.0005)
        sender = _later(b, b"page", 0.001, polling)
        buf = bytearray(16)
        n = recv_into_polling(a, memoryview(buf), 2_000_000_000)  # 2 s: never reached
        sender.join()
        assert buf[:n] == b"page" and yields


def test_after_the_window_it_sleeps_in_recv(yields: list[int]) -> None:
    a, b = socket.socketpair()
    with a, b:
        counts: list[int] = []
        checker = threading.Thread(target=lambda: (time.sleep(0.02), counts.append(len(yields))))
        checker.start()
        sender = _later(b, b"late", 0.06, lambda: counts.append(len(yields)))
        buf = bytearray(16)
        n = recv_into_polling(a, memoryview(buf), 1_000_000)  # 1 ms of polling, then blocking
        sender.join()
        checker.join()
        assert buf[:n] == b"late"
        at_20ms, at_60ms = counts
        assert at_20ms == at_60ms  # no try between 20 and 60 ms: it slept in recv


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
