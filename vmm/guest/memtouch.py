"""memtouch: a guest that keeps verifying and rewriting its RAM, so a migration that loses,
misplaces or serves a stale page is caught by the guest itself.

The pattern is sampled (vmm.guest.pattern): a page carries it in SAMPLES qwords, one every
512 bytes, and only those are written and checked. Guest code at CPL0 is emulated on this host
(kvm_pvm, shared/HOST.md: ~0.7 us an instruction), so a page costs its instruction count; the
whole-page pattern this replaced (~4 k instructions a page) ran ~375 pages/s per vCPU. The page
code is therefore inlined and unrolled: ~45 instructions to fill a page, 60 to verify one
(16 of them page_base), ~83 for one page of the walk including the LCG, the generation table,
the rewrite and the counters; ~70 for one page of a sweep.

Per vCPU, over the slice its BootParams describe (pattern: vmm.guest.pattern):
  1. fill: write the samples of every page at generation 0 and zero its generation-table entry;
     no report. The other qwords are left as they are (zero on a fresh guest).
  2. forever: pick a page by the LCG walk, verify its samples (a bad page is reported once
     with GS_PAGE_ERROR, repaired, and counted as one error), add the samples it read to the
     checksum, then bump the page's generation and rewrite its head sample. Every report_every
     pages: GS_REPORT, then read an order (`in eax, dx`): continue, sweep (verify every page in
     order, no rewrite, then GS_SWEEP_DONE) or halt.

Registers held across the main loop: rsi = BootParams, r15 = first pfn, r14 = npages,
r13 = generation table gpa, r12 = seed, rbp = walk state, rbx = pages verified. Counters that
change once per page live in a frame on the stack ([rsp + slot]), and so do the offsets
k * QWORD_MUL of samples 1.. (SAMPLE_OFFSETS), which the verify compares against in memory.
The inline page code (_emit_verify, _emit_write_samples) clobbers rax, rcx, r11 and says what
else it uses. Pattern pages and the generation table, which a migration may not have delivered
yet, are touched only by plain `mov` (the one instruction form every exit path can complete);
the stack, which like the code is always present, is also read and updated by ALU instructions.
"""
from __future__ import annotations

from vmm.guest.asm import (
    DX, EAX, ECX, EDX, R8, R9, R10, R11, R12, R13, R14, R15, RAX, RBP, RBX, RCX, RDI, RDX, RSP,
    Assembler, qword,
)
from vmm.guest.layout import CODE_GPA, PAGE_SHIFT, PAGE_SIZE
from vmm.guest.pattern import (
    GEN_MUL, HEAD_SAMPLES, LCG_INC, LCG_MUL, MIX_MUL1, MIX_MUL2, MIX_SHIFT1, MIX_SHIFT2, MIX_SHIFT3,
    PFN_MUL, SAMPLE_QWORDS, WALK_SEED_MUL, WALK_SHIFT, sample_offset,
)
from vmm.guest.program import ENTRY_LABEL, GuestProgram, boot_param, emit_exception_stubs, link
from vmm.guest.services import (
    GS_ORDER_HALT, GS_ORDER_SWEEP, GS_PAGE_ERROR, GS_PORT, GS_REPORT, GS_SWEEP_DONE,
)

# The code below keeps the generation term in one register and checks sample 0 against it: it
# handles exactly one head sample, sample 0 (whose k * QWORD_MUL is 0).
if HEAD_SAMPLES != 1 or SAMPLE_QWORDS[0] != 0:
    raise ValueError("memtouch assembles exactly one head sample, at qword 0")

# The main loop's stack frame: one qword per slot, then the offsets k * QWORD_MUL of samples 1..
# (a compare with the slot is one instruction where an imm64 needs a load and a compare).
ERRORS, CHECKSUM, WRITTEN, COUNTDOWN, SWEEP_INDEX, SWEEP_ERRORS, SWEEP_SUM = (8 * i for i in range(7))
SAMPLE_OFFSETS = 64  # slot of sample 1's offset; sample j's is at SAMPLE_OFFSETS + 8 * (j - 1)
FRAME_BYTES = SAMPLE_OFFSETS + 8 * (len(SAMPLE_QWORDS) - 1)


def slot(offset: int):
    return qword(RSP, disp=offset)


def offset_slot(j: int):
    return slot(SAMPLE_OFFSETS + 8 * (j - 1))


def _emit_page_base(a: Assembler) -> None:
    """rax = pattern.page_base(r12 = seed, r8 = pfn). Clobbers rcx."""
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


def _emit_write_samples(a: Assembler, *, gen_zero: bool = False) -> None:
    """Writes every sample of page rdi (gpa, base rax) at generation r9 (taken as 0 with
    gen_zero). Preserves rax, rdi, r8, r9; clobbers rcx, r11."""
    if gen_zero:
        a.mov(qword(RDI), RAX)
    else:
        a.mov(R11, GEN_MUL)
        a.imul(R11, R9)
        a.xor(R11, RAX)
        a.mov(qword(RDI), R11)
    for j in range(1, len(SAMPLE_QWORDS)):
        a.mov(RCX, sample_offset(SAMPLE_QWORDS[j]))
        a.xor(RCX, RAX)
        a.mov(qword(RDI, disp=8 * SAMPLE_QWORDS[j]), RCX)


def _emit_verify(a: Assembler, name: str) -> None:
    """Verifies page r8 = pfn at generation r9, adding the samples it reads to r10 (checksum).

    Leaves rax = the page's base and rdi = its gpa, for a rewrite. A bad sample jumps out of
    line (_emit_verify_bad): GS_PAGE_ERROR (r8 = pfn, r9 = qword index, r10 = expected,
    r11 = found), a repair of the page at generation r9 (so that one bad page counts once), +1 to
    the error slots, and back to the end of the check, with r10 holding the samples up to and
    including the bad one. Clobbers rcx, r11; preserves r8, r9, rdx.
    """
    _emit_page_base(a)
    a.mov(RDI, R8)
    a.shl(RDI, PAGE_SHIFT)
    a.mov(R11, GEN_MUL)
    a.imul(R11, R9)  # the head's generation term
    a.mov(RCX, qword(RDI))
    a.add(R10, RCX)
    a.xor(RCX, R11)
    a.cmp(RCX, RAX)
    a.jne(f"{name}_bad0")
    for j in range(1, len(SAMPLE_QWORDS)):
        a.mov(RCX, qword(RDI, disp=8 * SAMPLE_QWORDS[j]))  # found
        a.add(R10, RCX)
        a.xor(RCX, RAX)  # found ^ base must be k * QWORD_MUL
        a.cmp(RCX, offset_slot(j))
        a.jne(f"{name}_bad{j}")
    a.label(f"{name}_ok")


def _emit_verify_bad(a: Assembler, name: str, error_slots: tuple[int, ...]) -> None:
    """The out-of-line half of _emit_verify(name): one stub per sample, then the report."""
    for j, k in enumerate(SAMPLE_QWORDS):
        a.label(f"{name}_bad{j}")
        a.mov(ECX, k)
        a.jmp(f"{name}_bad")
    a.label(f"{name}_bad")  # rcx = qword index, rax = base, rdi = page gpa
    a.push(R8)
    a.push(R9)
    a.push(R10)
    a.push(RDX)
    a.push(RAX)
    a.mov(R11, qword(RDI, RCX, 8))  # found
    a.mov(RDX, sample_offset(1))  # QWORD_MUL
    a.mov(R10, RCX)
    a.imul(R10, RDX)
    a.xor(R10, RAX)  # expected = base ^ k * QWORD_MUL ...
    a.test(RCX, RCX)
    a.jnz(f"{name}_bad_report")
    a.mov(RDX, GEN_MUL)
    a.imul(RDX, R9)
    a.xor(R10, RDX)  # ... ^ gen * GEN_MUL for the head sample
    a.label(f"{name}_bad_report")
    a.mov(R9, RCX)
    a.mov(EAX, GS_PAGE_ERROR)
    a.mov(EDX, GS_PORT)
    a.out(DX, EAX)
    a.pop(RAX)
    a.pop(RDX)
    a.pop(R10)
    a.pop(R9)
    a.pop(R8)
    _emit_write_samples(a)  # repair, so that one bad page counts once
    for offset in error_slots:
        _emit_add_slot(a, offset, 1)
    a.jmp(f"{name}_ok")


def _emit_add_slot(a: Assembler, offset: int, value) -> None:
    a.mov(RCX, slot(offset))
    a.add(RCX, value)
    a.mov(slot(offset), RCX)


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
    for j in range(1, len(SAMPLE_QWORDS)):
        a.mov(RAX, sample_offset(SAMPLE_QWORDS[j]))
        a.mov(offset_slot(j), RAX)
    a.test(R14, R14)
    a.jz("halt")  # an empty slice has nothing to walk

    # fill: rbx = page index, r8 = its pfn, rdi = its gpa, rdx = its generation-table entry
    a.xor(RBX, RBX)
    a.mov(R8, R15)
    a.mov(RDI, R15)
    a.shl(RDI, PAGE_SHIFT)
    a.mov(RDX, R13)
    a.label("fill")
    a.mov(qword(RDX), 0)
    _emit_page_base(a)
    _emit_write_samples(a, gen_zero=True)
    a.add(RDX, 8)
    a.add(RDI, PAGE_SIZE)
    a.inc(R8)
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
    a.lea(RDX, qword(R13, RAX, 8))  # its generation-table entry
    a.lea(R8, qword(R15, RAX))
    a.mov(R9, qword(RDX))
    a.mov(R10, slot(CHECKSUM))
    _emit_verify(a, "walk_verify")
    a.mov(slot(CHECKSUM), R10)
    a.inc(RBX)
    a.inc(R9)  # rewrite: the next generation of the head
    a.mov(qword(RDX), R9)
    a.mov(R11, GEN_MUL)
    a.imul(R11, R9)
    a.xor(R11, RAX)
    a.mov(qword(RDI), R11)
    a.inc(slot(WRITTEN))
    a.dec(slot(COUNTDOWN))
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
    _emit_verify(a, "sweep_verify")
    a.mov(slot(SWEEP_SUM), R10)
    _emit_add_slot(a, SWEEP_INDEX, 1)
    a.cmp(RCX, R14)
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

    _emit_verify_bad(a, "walk_verify", (ERRORS,))
    _emit_verify_bad(a, "sweep_verify", (SWEEP_ERRORS, ERRORS))


def build(code_gpa: int = CODE_GPA) -> GuestProgram:
    a = Assembler(code_gpa)
    _emit_main(a)
    emit_exception_stubs(a)
    return link(a)
