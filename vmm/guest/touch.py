"""touch: the page-in benchmark guest (like KVM selftests' demand_paging_test).

Each vCPU visits one qword in every page of its slice once, in order, then reports GS_DONE
(r8 = pages visited, r9 = mismatches) and halts. BootParams.flags picks the access:
- 0: read it;
- TOUCH_WRITE: write the page's own gpa into it;
- TOUCH_CHECK: read it, count in r9 the pages where it is not ``check_expected(gpa)`` (what the
  page source serves), and write back its NOT, so that afterwards every page holds
  ``check_written(gpa)`` only if the read saw the right data (`postcopy bench pagein`).
The read and write loops are four instructions: access, advance, count, branch.
"""
from __future__ import annotations

from vmm.guest.asm import DX, EAX, EDX, R8, R9, RAX, RBX, RCX, Assembler, qword
from vmm.guest.layout import CODE_GPA, PAGE_SIZE
from vmm.guest.program import ENTRY_LABEL, GuestProgram, boot_param, emit_exception_stubs, link
from vmm.guest.services import GS_DONE, GS_PORT

TOUCH_WRITE = 1  # BootParams.flags: write each page instead of reading it
TOUCH_CHECK = 2  # BootParams.flags: read, check and write back each page
U64 = (1 << 64) - 1


def check_expected(gpa: int) -> int:
    """TOUCH_CHECK: the first qword of the data page at ``gpa`` as the page source serves it."""
    return gpa


def check_written(gpa: int) -> int:
    """TOUCH_CHECK: the first qword of the page at ``gpa`` after the guest has visited it."""
    return ~check_expected(gpa) & U64


def build(code_gpa: int = CODE_GPA) -> GuestProgram:
    a = Assembler(code_gpa)
    a.label(ENTRY_LABEL)  # rsi = BootParams
    a.mov(RBX, boot_param("data_gpa"))
    a.mov(RCX, boot_param("npages"))
    a.mov(R8, RCX)
    a.xor(R9, R9)
    a.test(RCX, RCX)
    a.jz("done")
    a.mov(RAX, boot_param("flags"))
    a.test(RAX, TOUCH_CHECK)
    a.jnz("check")
    a.test(RAX, TOUCH_WRITE)
    a.jnz("write")

    a.label("read")
    a.mov(RAX, qword(RBX))
    a.add(RBX, PAGE_SIZE)
    a.dec(RCX)
    a.jnz("read")
    a.jmp("done")

    a.label("write")
    a.mov(qword(RBX), RBX)
    a.add(RBX, PAGE_SIZE)
    a.dec(RCX)
    a.jnz("write")
    a.jmp("done")

    a.label("check")  # check_expected(gpa) == gpa: compare with rbx itself
    a.mov(RAX, qword(RBX))  # the read that faults the page in
    a.cmp(RAX, RBX)
    a.jne("mismatch")
    a.label("check_write")
    a.xor(RAX, -1)  # not rax
    a.mov(qword(RBX), RAX)
    a.add(RBX, PAGE_SIZE)
    a.dec(RCX)
    a.jnz("check")

    a.label("done")  # r8 = pages visited, r9 = mismatches
    a.mov(EAX, GS_DONE)
    a.mov(EDX, GS_PORT)
    a.out(DX, EAX)
    a.label("halt")
    a.cli()
    a.hlt()
    a.jmp("halt")

    a.label("mismatch")
    a.inc(R9)
    a.jmp("check_write")

    emit_exception_stubs(a)
    return link(a)
