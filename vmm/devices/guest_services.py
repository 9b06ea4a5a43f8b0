"""The guest-services port: how a workload reports progress, page errors and exceptions, and
receives orders (sweep, halt). Protocol in vmm/guest/services.py."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from vmm.guest import services as gs

log = logging.getLogger("vmm.devices.guest_services")
MAX_RECORDED = 16  # page errors and exceptions kept per vCPU for the report


@dataclass(slots=True)
class VcpuProgress:
    verified: int = 0  # pages verified (cumulative, as the guest counts them)
    errors: int = 0
    checksum: int = 0
    written: int = 0
    reports: int = 0
    last_report_ns: int = 0
    sweeps: int = 0
    sweep_pages: int = 0
    sweep_errors: int = 0
    sweep_checksum: int = 0
    done_pages: int = -1  # GS_DONE of a run-once workload; -1 until then
    done_errors: int = 0  # r9 at GS_DONE: what the workload found wrong (touch's check mismatches)
    done_ns: int = 0  # CLOCK_MONOTONIC of GS_DONE (hlt does not exit with an in-kernel irqchip)
    page_errors: list[tuple[int, int, int, int]] = field(default_factory=list)
    exceptions: list[tuple[int, int, int, int]] = field(default_factory=list)


class GuestServices:
    name = "guest_services"

    def __init__(self, nvcpus: int, on_report: Callable[[int, VcpuProgress], None] | None = None) -> None:
        self.ports = range(gs.GS_PORT, gs.GS_PORT + 4)
        self.progress = [VcpuProgress() for _ in range(nvcpus)]
        self.orders = [gs.GS_ORDER_CONTINUE] * nvcpus
        self.stop_requested = threading.Event()
        self.on_report = on_report
        self._changed = threading.Condition()

    # -- port I/O (called on vCPU threads) -------------------------------------------------
    def pio_read(self, vcpu: Any, port: int, size: int) -> int:
        order = self.orders[vcpu.id]
        if order == gs.GS_ORDER_SWEEP:
            self.orders[vcpu.id] = gs.GS_ORDER_CONTINUE
        return order

    def pio_write(self, vcpu: Any, port: int, size: int, value: int) -> None:
        regs = vcpu.vcpu.get_regs()
        args = (regs.r8, regs.r9, regs.r10, regs.r11)
        p = self.progress[vcpu.id]
        if value == gs.GS_REPORT:
            p.verified, p.errors, p.checksum, p.written = args
            p.reports += 1
            p.last_report_ns = time.monotonic_ns()
            if self.on_report is not None:
                self.on_report(vcpu.id, p)
        elif value == gs.GS_SWEEP_DONE:
            p.sweep_pages, p.sweep_errors, p.sweep_checksum = args[:3]
            p.sweeps += 1
        elif value == gs.GS_DONE:
            p.done_ns = time.monotonic_ns()
            p.done_pages, p.done_errors = args[:2]
        elif value == gs.GS_PAGE_ERROR:
            pfn, index, expected, found = args
            log.error("vCPU %d: guest found a bad page: gpa %#x qword %d expected %#018x found %#018x",
                      vcpu.id, pfn << 12, index, expected, found)
            if len(p.page_errors) < MAX_RECORDED:
                p.page_errors.append(args)
        elif value == gs.GS_EXCEPTION:
            vector, code, rip, cr2 = args
            log.error("vCPU %d: guest exception vector %d error code %#x at rip %#x (cr2 %#x)",
                      vcpu.id, vector, code, rip, cr2)
            if len(p.exceptions) < MAX_RECORDED:
                p.exceptions.append(args)
        elif value == gs.GS_STOP:
            self.stop_requested.set()
        else:
            log.error("vCPU %d: unknown guest-services command %#x", vcpu.id, value)
        with self._changed:
            self._changed.notify_all()

    # -- host side -----------------------------------------------------------------------------
    def order_all(self, order: int) -> None:
        self.orders = [order] * len(self.orders)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def sweep(self, timeout: float) -> bool:
        """Order every vCPU to verify its whole slice once; True when all have reported."""
        before = [p.sweeps for p in self.progress]
        self.order_all(gs.GS_ORDER_SWEEP)
        return self.wait_for(lambda: all(p.sweeps > b for p, b in zip(self.progress, before)), timeout)

    @property
    def verified(self) -> int:
        return sum(p.verified for p in self.progress)

    @property
    def errors(self) -> int:
        return sum(p.errors for p in self.progress)

    @property
    def exceptions(self) -> list[tuple[int, int, int, int]]:
        return [e for p in self.progress for e in p.exceptions]

    def get_state(self) -> dict[str, Any]:
        return {"progress": [asdict(p) for p in self.progress], "orders": list(self.orders)}

    def set_state(self, state: dict[str, Any]) -> None:
        if len(state["progress"]) != len(self.progress):  # one per vCPU: a vCPU's report indexes it
            raise ValueError(f"progress of {len(state['progress'])} vCPUs for a machine of {len(self.progress)}")
        self.progress = [VcpuProgress(**{k: (list(map(tuple, v)) if isinstance(v, list) else v)
                                         for k, v in p.items()}) for p in state["progress"]]
        self.orders = list(state["orders"])
