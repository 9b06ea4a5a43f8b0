"""Where the time of one exit-mode fault goes, for section `pagein`: the pieces measured alone
on real objects (a KVM vCPU's kvm_run page, userfaultfd-registered RAM), no guest running.

- decode: FaultDecoder.decode of an MMIO exit inside RAM (this host's data-access fault).
- uffdio_copy: one page, DONTWAKE, from the source image into registered, missing RAM.
- resolve: ExitModeResolver.on_fault_exit whole (decode, tracker, fetch from the local source,
  UFFDIO_COPY, tracker update, MMIO completion): the general path. This host's usual fault is
  taken by the vCPU's own loop (ExitModeResolver._run) with the same pieces but no decode
  record, which cannot be timed alone; its Python per fault is less than this.
Each is the median of per-call times.
The rest of a fault (exit and re-entry: KVM_RUN, the guest's emulated instructions) is the
run's time per fault minus ``resolve``.
"""
from __future__ import annotations

import time
from array import array

from postcopy.bench.source import LocalPageConnection, SourceImage
from postcopy.destination.exit_mode import ExitModeResolver
from postcopy.destination.install import Installer
from postcopy.destination.pages import Arrival, PageTracker
from postcopy.faults import FaultDecoder
from vmm.abi import kvm as abi
from vmm.abi.userfaultfd import UFFD_FEATURE_SIGBUS, UFFDIO_COPY_MODE_DONTWAKE
from vmm.guest.layout import DATA_GPA, PAGE_SIZE
from vmm.machine import Machine, MachineConfig
from vmm.memory import GuestMemory
from vmm.uffd import Uffd

SAMPLES = 2000


def _p50_us(samples: array) -> float:
    """Median of per-call times: robust to the preemptions of a shared machine."""
    return round(sorted(samples)[len(samples) // 2] / 1e3, 2)


def measure(image: SourceImage, samples: int = SAMPLES) -> dict[str, float]:
    size = image.size
    n = min(samples, (size - DATA_GPA) // PAGE_SIZE // 2)
    memory = GuestMemory.create(size, "anon", "bench-costs")
    machine = Machine.create(MachineConfig(size, 1), memory=memory)  # a real vCPU's kvm_run page
    uffd = Uffd(UFFD_FEATURE_SIGBUS)
    resolver: ExitModeResolver | None = None
    try:
        for region in memory.regions:
            uffd.register(region.hva, region.size)
        thread = machine.vcpus[0]
        run = thread.vcpu.run_struct
        run.exit_reason, run.mmio.len, run.mmio.is_write = abi.KVM_EXIT_MMIO, 8, 0
        pages = range(DATA_GPA, DATA_GPA + n * PAGE_SIZE, PAGE_SIZE)

        clock = time.perf_counter_ns
        decode, copy, resolve = array("Q"), array("Q"), array("Q")
        decoder = FaultDecoder(memory)
        for gpa in pages:
            run.mmio.phys_addr = gpa
            t0 = clock()
            decoder.decode(thread, 0)
            decode.append(clock() - t0)

        hva0, src0 = memory.hva(0), image.address
        for gpa in pages:  # the first half of the slice: fresh, missing pages
            t0 = clock()
            uffd.copy(hva0 + gpa, src0 + gpa, PAGE_SIZE, UFFDIO_COPY_MODE_DONTWAKE)
            copy.append(clock() - t0)

        tracker = PageTracker(memory)
        tracker.mark_present(0, DATA_GPA // PAGE_SIZE + n, Arrival.EAGER)
        # on_fault_exit called here, on this thread: no private loop (it would hold an interpreter)
        resolver = ExitModeResolver(Installer(uffd, memory, tracker, wake=False), readahead_base=1, readahead_max=1,
                                    private_loops=False)
        resolver.prepare(thread, LocalPageConnection(image))  # type: ignore[arg-type]
        second = range(DATA_GPA + n * PAGE_SIZE, DATA_GPA + 2 * n * PAGE_SIZE, PAGE_SIZE)
        for gpa in second:
            run.mmio.phys_addr = gpa
            t0 = clock()
            resolver.on_fault_exit(thread, 0)
            resolve.append(clock() - t0)
        return {"decode_us": _p50_us(decode), "uffdio_copy_us": _p50_us(copy), "resolve_us": _p50_us(resolve)}
    finally:
        if resolver is not None:
            resolver.close()
        machine.close()
        uffd.close()
