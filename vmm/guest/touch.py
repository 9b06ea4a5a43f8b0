"""touch: the page-in benchmark guest (like KVM selftests' demand_paging_test).

Each vCPU touches one qword in every page of its slice once, in order, reading it or (with
BootParams.flags & TOUCH_WRITE) writing the page's own gpa into it, then reports GS_DONE with
r8 = pages touched and halts. The loop is four instructions: access, advance, count, branch.
"""
from __future__ import annotations

from vmm.guest.asm import DX, EAX, EDX, R8, RAX, RBX, RCX, Assembler, qword
from vmm.guest.layout import CODE_GPA, PAGE_SIZE
from vmm.guest.program import ENTRY_LABEL, GuestProgram, boot_param, emit_exception_stubs, link
from vmm.guest.services import GS_DONE, GS_PORT

TOUCH_WRITE = 1  # BootParams.flags: write each page instead of reading it


def build(code_gpa: int = CODE_GPA) -> GuestProgram:
    a = Assembler(code_gpa)
    a.label(ENTRY_LABEL)  # rsi = BootParams
    a.mov(RBX, boot_param("data_gpa"))
    a.mov(RCX, boot_param("npages"))
    a.mov(R8, RCX)
    a.test(RCX, RCX)
    a.jz("done")
    a.mov(RAX, boot_param("flags"))
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

    a.label("done")  # r8 = pages touched
    a.mov(EAX, GS_DONE)
    a.mov(EDX, GS_PORT)
    a.out(DX, EAX)
    a.label("halt")
    a.cli()
    a.hlt()
    a.jmp("halt")

    emit_exception_stubs(a)
    return link(a)
