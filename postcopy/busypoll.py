"""Waiting for a socket's next bytes by polling, as KVM's halt polling waits for a vCPU's next
interrupt: ``recv`` with MSG_DONTWAIT for up to a window, ``sched_yield`` between tries, then a
blocking ``recv``. On this host a thread that sleeps in ``recv`` leaves its CPU idle, the idle
CPU halts at once (haltpoll, guest_halt_poll_ns=0), and the answer that wakes it takes an
interrupt through the host: tens of us, and cold caches. A thread that polls is still on its
CPU when the bytes come. Used on both ends of a one-page fetch: the destination's single vCPU
waiting for its page (websocket.BlockingWebSocket), and the source's page worker waiting for
the next request (page_loop.WorkerLoop); and by the bench's polling yardstick.
"""
from __future__ import annotations

import os
import socket
from time import monotonic_ns

__all__ = ["recv_into_polling"]


def recv_into_polling(sock: socket.socket, target: memoryview, window_ns: int) -> int:
    """``sock.recv_into(target)``, polling for up to ``window_ns`` before it blocks (then within
    the socket's SO_RCVTIMEO, if it has one). ``sock`` is in blocking mode: with a Python-level
    timeout every try would wait. Whatever else is runnable on this CPU runs between tries: a
    peer woken here (loopback) answers at once."""
    deadline = monotonic_ns() + window_ns
    recv_into = sock.recv_into
    while True:
        try:
            return recv_into(target, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            if monotonic_ns() >= deadline:
                return recv_into(target)
            os.sched_yield()
