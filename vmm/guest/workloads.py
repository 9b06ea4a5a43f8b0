"""The guest workloads by name, and plan(): one program plus each vCPU's BootParams for a guest size."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from vmm.guest import memtouch, touch
from vmm.guest.layout import (
    CODE_MAX, DATA_GPA, GIB, MAX_GUEST_GIB, MAX_VCPUS, PAGE_SHIFT, PAGE_SIZE, BootParams,
)
from vmm.guest.program import GuestProgram

MIN_PAGES_PER_VCPU = 4  # pattern/touch pages each vCPU needs at least
GEN_ENTRIES_PER_PAGE = PAGE_SIZE // 8  # generation-table qwords in one page
_U64 = 1 << 64


class WorkloadError(Exception):
    """A workload cannot be planned as asked; the message names the workload and the sizes."""


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    summary: str
    build: Callable[[], GuestProgram]
    gen_table: bool  # each slice also holds a generation table (npages qwords)

    @property
    def verifies(self) -> bool:
        """Whether the guest checks its own pages and answers GS_ORDER_SWEEP (memtouch)."""
        return self.gen_table

    def describe(self) -> str:
        return f"{self.name}: {self.summary}"


WORKLOADS: dict[str, Workload] = {
    "memtouch": Workload(
        "memtouch",
        "fills its RAM with a per-page pattern, then verifies and rewrites random pages forever; "
        "reports progress and bad pages",
        memtouch.build, gen_table=True),
    "touch": Workload(
        "touch",
        "touches one qword of every page once (read, or write with --write, or read, check and "
        "write back for the page-in bench), then reports GS_DONE; the page-in benchmark",
        touch.build, gen_table=False),
}


@cache
def program(name: str) -> GuestProgram:
    """The assembled program of a workload (the same code for every vCPU and guest size)."""
    return WORKLOADS[name].build()


def pattern_pages(share: int) -> int:
    """Most pattern pages n with n + ceil(n / GEN_ENTRIES_PER_PAGE) <= share pages."""
    return share - -(-share // (GEN_ENTRIES_PER_PAGE + 1))


def plan(name: str, guest_bytes: int, nvcpus: int, seed: int, *, write: bool = False,
         check: bool = False, report_every: int = 256) -> tuple[GuestProgram, list[BootParams]]:
    """Splits the data region (DATA_GPA .. guest_bytes) between ``nvcpus`` vCPUs in whole pages.

    vCPU i gets a contiguous share (the first ``data pages % nvcpus`` shares one page more);
    memtouch puts its slice's generation table right after the slice's pattern pages.
    """
    workload = WORKLOADS.get(name)
    if workload is None:
        raise WorkloadError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    what = f"{name} with {nvcpus} vCPUs on {guest_bytes:#x} bytes"
    if not 1 <= nvcpus <= MAX_VCPUS:
        raise WorkloadError(f"{what}: vCPUs must be 1..{MAX_VCPUS}")
    if guest_bytes % PAGE_SIZE:
        raise WorkloadError(f"{what}: guest size is not a multiple of {PAGE_SIZE}")
    if guest_bytes > MAX_GUEST_GIB * GIB:
        raise WorkloadError(f"{what}: guest size is above {MAX_GUEST_GIB} GiB")
    if not 0 <= seed < _U64:
        raise WorkloadError(f"{what}: seed {seed:#x} is not a 64-bit value")
    if report_every < 1:
        raise WorkloadError(f"{what}: report_every must be at least 1, not {report_every}")
    for flag, asked in (("write", write), ("check", check)):
        if asked and name != "touch":
            raise WorkloadError(f"{what}: {flag} applies only to touch")
    if write and check:
        raise WorkloadError(f"{what}: write and check are two different touches; pick one")

    data_pages = max(0, (guest_bytes - DATA_GPA) // PAGE_SIZE)
    share, extra = divmod(data_pages, nvcpus)
    smallest = pattern_pages(share) if workload.gen_table else share
    if smallest < MIN_PAGES_PER_VCPU:
        need = DATA_GPA + nvcpus * (MIN_PAGES_PER_VCPU + (1 if workload.gen_table else 0)) * PAGE_SIZE
        raise WorkloadError(f"{what}: {data_pages} data pages leave {smallest} per vCPU, need "
                            f"{MIN_PAGES_PER_VCPU} (guest size at least {need:#x})")

    prog = program(name)
    if len(prog.code) > CODE_MAX:
        raise WorkloadError(f"{name}: program is {len(prog.code)} bytes, above CODE_MAX {CODE_MAX}")

    flags = touch.TOUCH_WRITE if write else touch.TOUCH_CHECK if check else 0
    params = []
    start = DATA_GPA
    for vcpu in range(nvcpus):
        pages = share + (1 if vcpu < extra else 0)
        npages = pattern_pages(pages) if workload.gen_table else pages
        params.append(BootParams(
            data_gpa=start, npages=npages, first_pfn=start >> PAGE_SHIFT,
            gen_gpa=start + npages * PAGE_SIZE if workload.gen_table else 0,
            seed=seed, report_every=report_every, flags=flags,
        ))
        start += pages * PAGE_SIZE
    return prog, params
