"""The guest-services port protocol, shared by the guest workloads and vmm.devices.guest_services.

A guest reports by ``out dx, eax`` with dx = GS_PORT and eax = a GS_* command; arguments are in
r8..r11 (the device reads them with KVM_GET_REGS). After GS_REPORT the guest reads its next
order with ``in eax, dx`` on GS_PORT: one of the GS_ORDER_* values.
"""
from __future__ import annotations

GS_PORT = 0x600

# Guest -> host commands (eax of `out`).
GS_REPORT = 1  # r8 = pages verified (cumulative), r9 = errors (cumulative), r10 = checksum, r11 = pages written
GS_SWEEP_DONE = 2  # r8 = pages swept, r9 = errors found by the sweep, r10 = sweep checksum
GS_PAGE_ERROR = 3  # r8 = pfn, r9 = qword index, r10 = expected, r11 = found
GS_EXCEPTION = 4  # r8 = vector, r9 = error code, r10 = rip of the faulting instruction, r11 = cr2
GS_DONE = 5  # a run-once workload (touch) finished: r8 = pages touched
GS_STOP = 6  # the guest asks the VMM to stop it

# Host -> guest orders (eax of `in` after GS_REPORT).
GS_ORDER_CONTINUE = 0
GS_ORDER_SWEEP = 1  # verify every page of the slice once, then GS_SWEEP_DONE, then go on
GS_ORDER_HALT = 2  # stop working and hlt

UART_COM1_PORT = 0x3F8
