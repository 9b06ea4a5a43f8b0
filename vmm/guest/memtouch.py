"""memtouch: a guest that keeps verifying and rewriting its RAM, so a migration that loses,
misplaces or serves a stale page is caught by the guest itself.

Per vCPU, over the slice its BootParams describe (pattern: vmm.guest.pattern):
  1. fill: write every page at generation 0 and zero its generation-table entry; no report.
  2. forever: pick a page by the LCG walk, verify its 512 qwords (a bad page is reported once
     with GS_PAGE_ERROR, repaired, and counted as one error), add what it read to the checksum,
     then bump the page's generation and rewrite its head qwords. Every report_every pages:
     GS_REPORT, then read an order (`in eax, dx`): continue, sweep (verify every page in order,
     no rewrite, then GS_SWEEP_DONE) or halt.

Registers held across the main loop: rsi = BootParams, r15 = first pfn, r14 = npages,
r13 = generation table gpa, r12 = seed, rbp = walk state, rbx = pages verified. Counters that
change once per page live in a frame on the stack ([rsp + slot]). Subroutines may clobber
rax, rcx, rdx, rdi, r11 and say what else they use. Memory is touched only by plain `mov`
(the one instruction form every exit path can complete).
"""
from __future__ import annotations

from vmm.guest.asm import (
    DX, EAX, ECX, EDX, R8, R9, R10, R11, R12, R13, R14, R15, RAX, RBP, RBX, RCX, RDI, RDX, RSP,
    Assembler, qword,
)
from vmm.guest.layout import CODE_GPA, PAGE_SHIFT, PAGE_SIZE
from vmm.guest.pattern import (
    GEN_MUL, HEAD_QWORDS, LCG_INC, LCG_MUL, MIX_MUL1, MIX_MUL2, MIX_SHIFT1, MIX_SHIFT2, MIX_SHIFT3,
    PFN_MUL, QWORD_MUL, QWORDS_PER_PAGE, WALK_SEED_MUL, WALK_SHIFT,
)
from vmm.guest.program import ENTRY_LABEL, GuestProgram, boot_param, emit_exception_stubs, link
from vmm.guest.services import (
    GS_ORDER_HALT, GS_ORDER_SWEEP, GS_PAGE_ERROR, GS_PORT, GS_REPORT, GS_SWEEP_DONE,
)

HEAD_BYTES = HEAD_QWORDS * 8

# The main loop's stack frame: one qword per slot.
ERRORS, CHECKSUM, WRITTEN, COUNTDOWN, INDEX, SWEEP_INDEX, SWEEP_ERRORS, SWEEP_SUM = (8 * i for i in range(8))
FRAME_BYTES = 64


def slot(offset: int):
    return qword(RSP, disp=offset)


def _emit_page_base(a: Assembler) -> None:
    """page_base: rax = pattern.page_base(r12 = seed, r8 = pfn). Clobbers rcx."""
    a.label("page_base")
    a.mov(RAX, PFN_MUL)
    a.imul(RAX, R8)
    a.xor(RAX, R12)
    for shift, mul in ((MIX_SHIFT1, MIX_MUL1), (MIX_SHIFT2, MIX_MUL2), (MIX_SHIFT3, None)):
        a.mov(RCX, RAX)
        a.shr(RCX, shift)
        a.xor(RAX, RCX)
        if mul is not None:
            a.mov(RCX, mul)
            a.imul(RAX, RCX)
    a.ret()


def _emit_verify_run(a: Assembler, name: str) -> None:
    """Checks qwords [rdi + rbp] for rbp = -n*8 .. -8 against rax ^ rdx, rdx += rbx each step.

    The loop stays in registers: load, checksum, compare, advance (8 instructions a qword).
    """
    a.label(name)
    a.mov(RCX, qword(RDI, RBP))  # found
    a.add(R10, RCX)  # checksum: sum of every qword read
    a.xor(RCX, RDX)  # found ^ k*QWORD_MUL must equal the run's base
    a.cmp(RCX, RAX)
    a.jne("verify_bad")
    a.add(RDX, RBX)
    a.add(RBP, 8)
    a.jnz(name)


def _emit_verify_page(a: Assembler) -> None:
    """verify_page: r8 = pfn, r9 = gen, r10 = checksum in/out; rcx = 1 if the page was bad
    (reported with GS_PAGE_ERROR and rewritten at gen), else 0. Preserves r8, r9, rbx, rbp."""
    a.label("verify_page")
    a.push(RBX)
    a.push(RBP)
    a.call("page_base")
    a.mov(RBX, QWORD_MUL)
    a.mov(R11, GEN_MUL)
    a.imul(R11, R9)  # r11 = gen * GEN_MUL
    a.xor(RAX, R11)  # head qwords carry the generation
    a.mov(RDI, R8)
    a.shl(RDI, PAGE_SHIFT)
    a.add(RDI, HEAD_BYTES)
    a.mov(RBP, -HEAD_BYTES)
    a.xor(RDX, RDX)
    _emit_verify_run(a, "verify_head")
    a.xor(RAX, R11)
    a.add(RDI, PAGE_SIZE - HEAD_BYTES)
    a.mov(RBP, -(PAGE_SIZE - HEAD_BYTES))
    _emit_verify_run(a, "verify_tail")
    a.xor(RCX, RCX)
    a.pop(RBP)
    a.pop(RBX)
    a.ret()

    # A mismatch: rdi + rbp = its address, rcx = found ^ rdx, rax = expected ^ rdx.
    a.label("verify_bad")
    a.xor(RCX, RDX)
    a.xor(RAX, RDX)
    a.add(RDI, RBP)
    a.push(R8)
    a.push(R9)
    a.push(R10)
    a.mov(R9, RDI)
    a.and_(R9, PAGE_SIZE - 1)
    a.shr(R9, 3)  # qword index
    a.mov(R10, RAX)
    a.mov(R11, RCX)
    a.mov(EAX, GS_PAGE_ERROR)
    a.mov(EDX, GS_PORT)
    a.out(DX, EAX)
    a.pop(R10)
    a.pop(R9)
    a.pop(R8)
    a.mov(ECX, QWORDS_PER_PAGE)
    a.call("write_page")  # repair, so that one bad page counts once
    a.mov(ECX, 1)
    a.pop(RBP)
    a.pop(RBX)
    a.ret()


def _emit_write_page(a: Assembler) -> None:
    """write_page: writes qwords 0 .. rcx-1 (HEAD_QWORDS or QWORDS_PER_PAGE) of page r8 = pfn
    at generation r9. Preserves r8, r9, r10, rbx, rbp."""
    a.label("write_page")
    a.push(RBX)
    a.push(RBP)
    a.push(R10)
    a.push(RCX)
    a.call("page_base")
    a.pop(RCX)
    a.shl(RCX, 3)  # end offset in bytes
    a.mov(RBX, QWORD_MUL)
    a.mov(R11, GEN_MUL)
    a.imul(R11, R9)
    a.xor(RAX, R11)
    a.mov(RDI, R8)
    a.shl(RDI, PAGE_SHIFT)
    a.xor(RBP, RBP)  # byte offset in the page
    a.xor(RDX, RDX)  # k * QWORD_MUL
    a.label("write_head")
    a.mov(R10, RAX)
    a.xor(R10, RDX)
    a.mov(qword(RDI, RBP), R10)
    a.add(RDX, RBX)
    a.add(RBP, 8)
    a.cmp(RBP, HEAD_BYTES)
    a.jne("write_head")
    a.xor(RAX, R11)
    a.cmp(RBP, RCX)
    a.jae("write_done")
    a.label("write_tail")
    a.mov(R10, RAX)
    a.xor(R10, RDX)
    a.mov(qword(RDI, RBP), R10)
    a.add(RDX, RBX)
    a.add(RBP, 8)
    a.cmp(RBP, RCX)
    a.jb("write_tail")
    a.label("write_done")
    a.pop(R10)
    a.pop(RBP)
    a.pop(RBX)
    a.ret()


def _emit_add_slot(a: Assembler, offset: int, value) -> None:
    a.mov(RAX, slot(offset))
    a.add(RAX, value)
    a.mov(slot(offset), RAX)


def _emit_main(a: Assembler) -> None:
    a.label(ENTRY_LABEL)  # rdi = vCPU index, rsi = BootParams
    a.sub(RSP, FRAME_BYTES)
    a.mov(R15, boot_param("first_pfn"))
    a.mov(R14, boot_param("npages"))
    a.mov(R13, boot_param("gen_gpa"))
    a.mov(R12, boot_param("seed"))
    a.lea(RBP, qword(RDI, disp=1))
    a.mov(RAX, WALK_SEED_MUL)
    a.imul(RBP, RAX)
    a.xor(RBP, R12)  # walk state = seed ^ ((vcpu + 1) * WALK_SEED_MUL)
    a.xor(RAX, RAX)
    for offset in (ERRORS, CHECKSUM, WRITTEN):
        a.mov(slot(offset), RAX)
    a.mov(RAX, boot_param("report_every"))
    a.mov(slot(COUNTDOWN), RAX)
    a.test(R14, R14)
    a.jz("halt")  # an empty slice has nothing to walk

    a.xor(RBX, RBX)
    a.label("fill")
    a.xor(RAX, RAX)
    a.mov(qword(R13, RBX, 8), RAX)
    a.lea(R8, qword(R15, RBX))
    a.xor(R9, R9)
    a.mov(ECX, QWORDS_PER_PAGE)
    a.call("write_page")
    a.inc(RBX)
    a.cmp(RBX, R14)
    a.jb("fill")
    a.xor(RBX, RBX)

    a.label("walk")
    a.mov(RAX, LCG_MUL)
    a.imul(RBP, RAX)
    a.mov(RAX, LCG_INC)
    a.add(RBP, RAX)
    a.mov(RAX, RBP)
    a.shr(RAX, WALK_SHIFT)
    a.imul(RAX, R14)
    a.shr(RAX, WALK_SHIFT)  # page index in [0, npages)
    a.mov(slot(INDEX), RAX)
    a.lea(R8, qword(R15, RAX))
    a.mov(R9, qword(R13, RAX, 8))
    a.mov(R10, slot(CHECKSUM))
    a.call("verify_page")
    a.mov(slot(CHECKSUM), R10)
    _emit_add_slot(a, ERRORS, RCX)
    a.inc(RBX)
    a.mov(RAX, slot(INDEX))  # rewrite: next generation of the head
    a.mov(R9, qword(R13, RAX, 8))
    a.inc(R9)
    a.mov(qword(R13, RAX, 8), R9)
    a.lea(R8, qword(R15, RAX))
    a.mov(ECX, HEAD_QWORDS)
    a.call("write_page")
    _emit_add_slot(a, WRITTEN, 1)
    _emit_add_slot(a, COUNTDOWN, -1)
    a.jnz("walk")

    a.mov(RAX, boot_param("report_every"))
    a.mov(slot(COUNTDOWN), RAX)
    a.mov(R8, RBX)
    a.mov(R9, slot(ERRORS))
    a.mov(R10, slot(CHECKSUM))
    a.mov(R11, slot(WRITTEN))
    a.mov(EAX, GS_REPORT)
    a.mov(EDX, GS_PORT)
    a.out(DX, EAX)
    a.in_(EAX, DX)  # the order
    a.cmp(EAX, GS_ORDER_SWEEP)
    a.je("sweep")
    a.cmp(EAX, GS_ORDER_HALT)
    a.je("halt")
    a.jmp("walk")  # GS_ORDER_CONTINUE (and anything unknown)

    a.label("sweep")
    a.xor(RAX, RAX)
    for offset in (SWEEP_INDEX, SWEEP_ERRORS, SWEEP_SUM):
        a.mov(slot(offset), RAX)
    a.label("sweep_page")
    a.mov(RAX, slot(SWEEP_INDEX))
    a.lea(R8, qword(R15, RAX))
    a.mov(R9, qword(R13, RAX, 8))
    a.mov(R10, slot(SWEEP_SUM))
    a.call("verify_page")
    a.mov(slot(SWEEP_SUM), R10)
    _emit_add_slot(a, SWEEP_ERRORS, RCX)
    _emit_add_slot(a, ERRORS, RCX)
    _emit_add_slot(a, SWEEP_INDEX, 1)
    a.cmp(RAX, R14)
    a.jb("sweep_page")
    a.mov(R8, R14)
    a.mov(R9, slot(SWEEP_ERRORS))
    a.mov(R10, slot(SWEEP_SUM))
    a.xor(R11, R11)
    a.mov(EAX, GS_SWEEP_DONE)
    a.mov(EDX, GS_PORT)
    a.out(DX, EAX)
    a.jmp("walk")

    a.label("halt")
    a.cli()
    a.hlt()
    a.jmp("halt")


def build(code_gpa: int = CODE_GPA) -> GuestProgram:
    a = Assembler(code_gpa)
    _emit_main(a)
    _emit_page_base(a)
    _emit_verify_page(a)
    _emit_write_page(a)
    emit_exception_stubs(a)
    return link(a)
