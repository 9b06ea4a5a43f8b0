"""Port-I/O bus: routes KVM_EXIT_IO to the device that owns the port.

Unknown ports are not fatal (a real PC ignores them too): a read returns all ones, a write is
dropped, and each unknown port is logged once and counted.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

log = logging.getLogger("vmm.devices")


class PioDevice(Protocol):
    name: str
    ports: range

    def pio_read(self, vcpu: Any, port: int, size: int) -> int: ...

    def pio_write(self, vcpu: Any, port: int, size: int, value: int) -> None: ...

    def get_state(self) -> dict[str, Any]: ...

    def set_state(self, state: dict[str, Any]) -> None: ...


class PioBus:
    def __init__(self) -> None:
        self._by_port: dict[int, PioDevice] = {}
        self.devices: list[PioDevice] = []
        self.unknown_accesses = 0
        self._warned: set[int] = set()
        self._lock = threading.Lock()

    def add(self, device: PioDevice) -> None:
        for port in device.ports:
            if port in self._by_port:
                raise ValueError(f"port {port:#x} of {device.name} is already taken by {self._by_port[port].name}")
            self._by_port[port] = device
        self.devices.append(device)

    def read(self, vcpu: Any, port: int, size: int) -> int:
        device = self._by_port.get(port)
        if device is None:
            self.report_unknown(vcpu, port, "read")
            return (1 << (8 * size)) - 1
        return device.pio_read(vcpu, port, size)

    def write(self, vcpu: Any, port: int, size: int, value: int) -> None:
        device = self._by_port.get(port)
        if device is None:
            self.report_unknown(vcpu, port, f"write of {value:#x}")
            return
        device.pio_write(vcpu, port, size, value)

    def report_unknown(self, vcpu: Any, port: int, what: str) -> None:
        """Count an access nobody serves (port I/O here, MMIO from the vCPU loop); log it once per address."""
        with self._lock:
            self.unknown_accesses += 1
            if port in self._warned:
                return
            self._warned.add(port)
        log.error("vCPU %s: port I/O %s at unknown port %#x (no device there; ignored)", getattr(vcpu, "id", "?"), what, port)
