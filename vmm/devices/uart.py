"""A 16550-style UART on COM1: what the guest writes reaches the host console and the log.

Only what a polling guest needs is modelled: THR writes, LSR always ready, the divisor latch
and scratch registers readable back. No interrupts (our guests run with IF=0).
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from vmm.guest.services import UART_COM1_PORT

log = logging.getLogger("vmm.guest.console")

UART_THR, UART_IER, UART_IIR, UART_LCR, UART_MCR, UART_LSR, UART_MSR, UART_SCR = range(8)
UART_LCR_DLAB = 0x80
UART_LSR_THRE, UART_LSR_TEMT = 0x20, 0x40
UART_IIR_NO_INT = 0x01
MAX_LINE = 1024


class Uart:
    name = "uart"

    def __init__(self, base: int = UART_COM1_PORT, console: Callable[[str], None] | None = None) -> None:
        self.ports = range(base, base + 8)
        self.base = base
        self.console = console
        self.regs = bytearray(8)  # IER, LCR, MCR, SCR by offset; THR/LSR are not stored
        self.divisor = 0
        self.lines: list[str] = []
        self._pending = bytearray()
        self._lock = threading.Lock()

    def pio_read(self, vcpu: Any, port: int, size: int) -> int:
        off = port - self.base
        if off == UART_LSR:
            return UART_LSR_THRE | UART_LSR_TEMT
        if off == UART_IIR:
            return UART_IIR_NO_INT
        if self.regs[UART_LCR] & UART_LCR_DLAB and off in (UART_THR, UART_IER):
            return (self.divisor >> (8 * off)) & 0xFF
        return self.regs[off] if off in (UART_IER, UART_LCR, UART_MCR, UART_SCR) else 0

    def pio_write(self, vcpu: Any, port: int, size: int, value: int) -> None:
        off, value = port - self.base, value & 0xFF
        if self.regs[UART_LCR] & UART_LCR_DLAB and off in (UART_THR, UART_IER):
            shift = 8 * off
            self.divisor = (self.divisor & ~(0xFF << shift)) | (value << shift)
        elif off == UART_THR:
            self._put(value)
        elif off in (UART_IER, UART_LCR, UART_MCR, UART_SCR):
            self.regs[off] = value

    def _put(self, byte: int) -> None:
        with self._lock:
            if byte != ord("\n") and len(self._pending) < MAX_LINE:
                self._pending.append(byte)
                return
            line = self._pending.decode("latin-1").rstrip("\r")
            self._pending.clear()
            self.lines.append(line)
        log.info("%s", line)
        if self.console is not None:
            self.console(line)

    def get_state(self) -> dict[str, Any]:
        return {"regs": bytes(self.regs), "divisor": self.divisor, "pending": bytes(self._pending)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.regs[:] = state["regs"]
        self.divisor = int(state["divisor"])
        self._pending[:] = state["pending"]
