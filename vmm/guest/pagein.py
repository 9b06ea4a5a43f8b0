"""pagein: the demand-paging benchmark guest (like KVM selftests' demand_paging_test), with its
own check.

Each vCPU visits every page of its slice once, in order: it reads the page's first qword, which
the page source filled with the page's own gpa (``expected``), counts a mismatch in r9, and
writes the bitwise NOT of what it read back (so the host can check afterwards that every read
saw the right data: ``written``). One qword per page, read then write. Then it reports GS_DONE
(r8 = pages visited, r9 = mismatches) and halts; r8/r9 keep those values while it is halted.
"""
from __future__ import annotations

from vmm.guest.asm import DX, EAX, EDX, R8, R9, RAX, RBX, RCX, Assembler, qword
from vmm.guest.layout import CODE_GPA, PAGE_SIZE
from vmm.guest.program import ENTRY_LABEL, GuestProgram, boot_param, emit_exception_stubs, link
from vmm.guest.services import GS_DONE, GS_PORT

U64 = (1 << 64) - 1


def expected(gpa: int) -> int:
    """The first qword of the data page at ``gpa``, as the page source must serve it."""
    return gpa


def written(gpa: int) -> int:
    """The first qword of the page at ``gpa`` after the guest has visited it."""
    return ~gpa & U64


def build(code_gpa: int = CODE_GPA) -> GuestProgram:
    a = Assembler(code_gpa)
    a.label(ENTRY_LABEL)  # rsi = BootParams
    a.mov(RBX, boot_param("data_gpa"))
    a.mov(RCX, boot_param("npages"))
    a.mov(R8, RCX)
    a.xor(R9, R9)
    a.test(RCX, RCX)
    a.jz("done")

    a.label("page")  # six instructions per page on the fast path: each costs ~0.7 us emulated here
    a.mov(RAX, qword(RBX))  # the read that faults
    a.cmp(RAX, RBX)
    a.jne("mismatch")
    a.label("write")
    a.xor(RAX, -1)  # not rax
    a.mov(qword(RBX), RAX)
    a.add(RBX, PAGE_SIZE)
    a.dec(RCX)
    a.jnz("page")

    a.label("done")
    a.mov(EAX, GS_DONE)
    a.mov(EDX, GS_PORT)
    a.out(DX, EAX)
    a.label("halt")
    a.cli()
    a.hlt()
    a.jmp("halt")

    a.label("mismatch")
    a.inc(R9)
    a.jmp("write")

    emit_exception_stubs(a)
    return link(a)
