"""Tests of the guest workloads: the assembler, the exception stubs, plan(), the sampled memtouch
pattern, and that the guest code writes exactly what pattern.py says and catches a corrupted
sample (run for real on /dev/kvm)."""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from iced_x86 import Decoder, Formatter, FormatterSyntax, Instruction, Mnemonic, Register

from vmm.guest import pattern, workloads
from vmm.guest.asm import (
    CR2, DX, EAX, R8, R9, R10, R11, RAX, RCX, RSP, AsmError, Assembler, qword,
)
from vmm.guest.layout import (
    CODE_GPA, CODE_MAX, DATA_GPA, GDT_CODE64_SELECTOR, GDT_DATA_SELECTOR, GDT_GPA, GIB, IDT_GPA,
    MAX_GUEST_GIB, MAX_VCPUS, PAGE_SIZE, PD_GPA, PDPT_GPA, PML4_GPA, BootParams, boot_params_gpa,
    pd_pages, stack_top, ENTRY_RFLAGS,
)
from vmm.guest.program import ERROR_CODE_VECTORS, EXCEPTION_VECTORS, GuestProgram
from vmm.guest.services import (
    GS_EXCEPTION, GS_ORDER_CONTINUE, GS_ORDER_HALT, GS_ORDER_SWEEP, GS_PAGE_ERROR, GS_PORT, GS_REPORT,
    GS_SWEEP_DONE,
)
from vmm.guest.workloads import WORKLOADS, WorkloadError, plan

MIB = 1 << 20


def decode(code: bytes, ip: int) -> list[Instruction]:
    return list(Decoder(64, code, ip=ip))


def text(instr: Instruction) -> str:
    return Formatter(FormatterSyntax.NASM).format(instr)


# -- assembler ----------------------------------------------------------------------------------

def test_assembler_resolves_backward_and_forward_labels():
    a = Assembler(0x40000)
    a.label("top")
    a.dec(RCX)
    a.jnz("top")
    a.jmp("end")
    a.mov(RAX, 1)
    a.label("end")
    a.call("top")
    a.ret()
    code = a.assemble()
    instrs = decode(code, 0x40000)
    assert [i.mnemonic for i in instrs] == [Mnemonic.DEC, Mnemonic.JNE, Mnemonic.JMP, Mnemonic.MOV,
                                            Mnemonic.CALL, Mnemonic.RET]
    assert instrs[1].near_branch_target == a.address_of("top") == 0x40000
    assert instrs[2].near_branch_target == a.address_of("end") == instrs[4].ip
    assert instrs[4].near_branch_target == 0x40000


def test_assembler_grows_a_short_branch_whose_target_is_far():
    a = Assembler(CODE_GPA)
    a.jmp("far")
    for _ in range(100):
        a.mov(RAX, 0x1122334455667788)  # 10 bytes each: 1000 bytes, out of rel8 reach
    a.label("far")
    a.ret()
    instrs = decode(a.assemble(), CODE_GPA)
    assert instrs[0].near_branch_target == a.address_of("far") == instrs[-1].ip
    assert instrs[0].len == 5  # jmp rel32


def test_assembler_encodes_the_forms_the_workloads_use():
    a = Assembler(0)
    a.mov(R11, CR2)
    a.out(DX, EAX)
    a.in_(EAX, DX)
    a.mov(R9, qword(RSP, disp=8))
    a.mov(qword(R8, RAX, 8), R10)
    a.and_(RAX, 0xFFFF_FFFF_FFFF_F000)
    a.mov(RAX, 0xFFFF_FFFF)
    assert [text(i) for i in decode(a.assemble(), 0)] == [
        "mov r11,cr2", "out dx,eax", "in eax,dx", "mov r9,[rsp+8]", "mov [r8+rax*8],r10",
        "and rax,0FFFFFFFFFFFFF000h", "mov eax,0FFFFFFFFh"]


@pytest.mark.parametrize("build, message", [
    (lambda a: a.jmp("nowhere"), "nowhere"),
    (lambda a: (a.label("x"), a.label("x")), "defined twice"),
    (lambda a: a.and_(RAX, 1 << 32), "imm32"),
    (lambda a: a.jcc("xx", "l"), "unknown condition"),
])
def test_assembler_errors_name_the_label_or_instruction(build, message):
    a = Assembler(0)
    with pytest.raises(AsmError, match=message):
        build(a)
        a.ret()
        a.assemble()


# -- exception stubs ----------------------------------------------------------------------------

def test_error_code_vectors_are_the_sdms():
    assert ERROR_CODE_VECTORS == {8, 10, 11, 12, 13, 14, 17, 21, 29, 30}


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_each_exception_stub_reads_its_frame_by_the_error_code_convention(name):
    prog = workloads.program(name)
    assert len(prog.exception_entries) == EXCEPTION_VECTORS
    for vector, entry in enumerate(prog.exception_entries):
        stub = decode(prog.code[entry - prog.code_gpa:], entry)[:4]
        if vector in ERROR_CODE_VECTORS:
            assert [text(i) for i in stub[:2]] == ["mov r9,[rsp]", "mov r10,[rsp+8]"], vector
        else:
            assert [text(i) for i in stub[:2]] == ["xor r9,r9", "mov r10,[rsp]"], vector
        assert stub[2].mnemonic == Mnemonic.MOV and stub[2].op0_register in (Register.R8, Register.R8D)
        assert stub[2].immediate(1) == vector
        tail_gpa = stub[3].near_branch_target
        tail = decode(prog.code[tail_gpa - prog.code_gpa:], tail_gpa)[:6]
        assert [text(i) for i in tail] == [
            "mov r11,cr2", f"mov eax,{GS_EXCEPTION}", f"mov edx,{GS_PORT:X}h", "out dx,eax", "cli", "hlt"]


# -- plan() -------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(sorted(WORKLOADS)), nvcpus=st.integers(1, MAX_VCPUS),
       extra_pages=st.integers(0, 300_000))
def test_plan_splits_the_data_region_into_disjoint_slices_that_cover_it(name, nvcpus, extra_pages):
    gen_table = WORKLOADS[name].gen_table
    guest_bytes = DATA_GPA + (nvcpus * (5 if gen_table else 4) + extra_pages) * PAGE_SIZE
    _, params = plan(name, guest_bytes, nvcpus, seed=7)
    assert len(params) == nvcpus
    cursor = DATA_GPA
    for p in params:
        assert p.data_gpa == cursor and p.first_pfn == p.data_gpa // PAGE_SIZE
        pattern_end = p.data_gpa + p.npages * PAGE_SIZE
        if gen_table:
            assert p.gen_gpa == pattern_end  # the table follows the pattern pages
            gen_pages = -(-p.npages * 8 // PAGE_SIZE)
            share_end = pattern_end + gen_pages * PAGE_SIZE
            next_start = params[params.index(p) + 1].data_gpa if p is not params[-1] else guest_bytes
            assert share_end <= next_start
            # no room was wasted: one more pattern page would not fit with its table
            assert p.npages + 1 + -(-(p.npages + 1) * 8 // PAGE_SIZE) > (next_start - p.data_gpa) // PAGE_SIZE
            cursor = next_start
        else:
            assert p.gen_gpa == 0
            cursor = pattern_end
        assert p.npages >= workloads.MIN_PAGES_PER_VCPU
    assert cursor == guest_bytes
    sizes = [p.npages for p in params]
    assert max(sizes) - min(sizes) <= 1


def test_plan_sets_touch_write_and_report_every():
    from vmm.guest.touch import TOUCH_WRITE
    _, params = plan("touch", 8 * MIB, 2, seed=1, write=True, report_every=9)
    assert all(p.flags == TOUCH_WRITE and p.report_every == 9 for p in params)


@pytest.mark.parametrize("args, message", [
    (("nosuch", 64 * MIB, 1), "unknown workload 'nosuch'"),
    (("memtouch", 64 * MIB, 0), "vCPUs must be 1..32"),
    (("memtouch", 64 * MIB, MAX_VCPUS + 1), "vCPUs must be 1..32"),
    (("memtouch", DATA_GPA + 4 * PAGE_SIZE, 1), "need 4"),
    (("touch", DATA_GPA + 7 * PAGE_SIZE, 2), "need 4"),
    (("memtouch", DATA_GPA - PAGE_SIZE, 1), "need 4"),
    (("memtouch", (MAX_GUEST_GIB + 1) * GIB, 1), "above 16 GiB"),
    (("memtouch", 64 * MIB + 1, 1), "multiple of 4096"),
])
def test_plan_rejects_what_it_cannot_run(args, message):
    with pytest.raises(WorkloadError, match=message):
        plan(*args, seed=0)


def test_plan_rejects_a_bad_seed_report_interval_or_write_flag():
    with pytest.raises(WorkloadError, match="report_every"):
        plan("memtouch", 64 * MIB, 1, 0, report_every=0)
    with pytest.raises(WorkloadError, match="seed"):
        plan("memtouch", 64 * MIB, 1, 1 << 64)
    with pytest.raises(WorkloadError, match="write applies only to touch"):
        plan("memtouch", 64 * MIB, 1, 0, write=True)


def test_plan_rejects_a_program_over_code_max(monkeypatch):
    huge = GuestProgram(bytes(CODE_MAX + 1), CODE_GPA, CODE_GPA, (CODE_GPA,) * EXCEPTION_VECTORS)
    monkeypatch.setattr(workloads, "program", lambda name: huge)
    with pytest.raises(WorkloadError, match="above CODE_MAX"):
        plan("touch", 64 * MIB, 1, 0)


def test_every_workload_fits_and_describes_itself():
    for name, workload in WORKLOADS.items():
        assert len(workloads.program(name).code) <= CODE_MAX
        assert workload.describe().startswith(name) and "\n" not in workload.describe()


# -- pattern ------------------------------------------------------------------------------------

def test_pattern_samples_every_512_bytes_and_leaves_the_rest_zero():
    assert pattern.SAMPLES == 8 and pattern.SAMPLE_STRIDE == 64 and pattern.HEAD_SAMPLES == 1
    assert pattern.SAMPLE_QWORDS == tuple(range(0, 512, 64))
    assert {k * 8 // 512 for k in pattern.SAMPLE_QWORDS} == set(range(PAGE_SIZE // 512))
    words = struct.unpack("<512Q", pattern.page_words(5, 600, 3))
    samples = pattern.sample_qwords(5, 600, 3)
    assert [words[k] for k in pattern.SAMPLE_QWORDS] == samples
    assert len(set(samples)) == pattern.SAMPLES and 0 not in samples
    assert all(w == 0 for k, w in enumerate(words) if k not in pattern.SAMPLE_QWORDS)


def test_pattern_differs_by_pfn_seed_and_only_in_the_head_sample_by_gen():
    a, b = pattern.page_words(5, 600, 0), pattern.page_words(5, 600, 1)
    assert len(a) == PAGE_SIZE and a != pattern.page_words(5, 601, 0) != pattern.page_words(6, 600, 0)
    assert a != b  # the generation shows in the head sample
    sa, sb = pattern.sample_qwords(5, 600, 0), pattern.sample_qwords(5, 600, 1)
    head = pattern.HEAD_SAMPLES
    assert all(x != y for x, y in zip(sa[:head], sb[:head])) and sa[head:] == sb[head:]
    base = pattern.page_base(5, 600)
    assert sa == [base ^ ((k * pattern.QWORD_MUL) & pattern.MASK64) for k in pattern.SAMPLE_QWORDS]
    assert pattern.page_checksum(5, 600, 1) == sum(sb) & pattern.MASK64


def test_page_matches_checks_every_sample_and_only_the_samples():
    seed, pfn, gen = 0xC0FFEE, 0x345, 7
    good = pattern.page_words(seed, pfn, gen)
    assert pattern.page_matches(good, seed, pfn, gen)
    for k in pattern.SAMPLE_QWORDS:  # any sampled qword changed, even by one bit, fails
        for bit in (0, 63):
            bad = bytearray(good)
            struct.pack_into("<Q", bad, 8 * k, struct.unpack_from("<Q", good, 8 * k)[0] ^ (1 << bit))
            assert not pattern.page_matches(bytes(bad), seed, pfn, gen), (k, bit)
    other = bytearray(good)  # an unsampled qword is not part of the pattern
    struct.pack_into("<Q", other, 8 * 300, 0xBAD)
    assert pattern.page_matches(bytes(other), seed, pfn, gen)
    assert not pattern.page_matches(bytes(PAGE_SIZE), seed, pfn, gen)  # zeroed
    assert not pattern.page_matches(good, seed, pfn + 1, gen)  # misplaced
    assert not pattern.page_matches(good, seed, pfn, gen + 1)  # stale
    assert not pattern.page_matches(pattern.page_words(seed, pfn, gen - 1), seed, pfn, gen)
    with pytest.raises(ValueError, match="4096"):
        pattern.page_matches(good[:-8], seed, pfn, gen)


# -- the guest on KVM: pattern.py matches what it writes -----------------------------------------
# A minimal long-mode runner (same setup as shared/probes/fault_exits_probe.py).
# TODO(lead): run this through vmm.machine once it lands.

_KVM_CREATE_VM, _KVM_GET_VCPU_MMAP_SIZE, _KVM_CREATE_VCPU = 0xAE01, 0xAE04, 0xAE41
_KVM_SET_USER_MEMORY_REGION, _KVM_RUN = 0x4020AE46, 0xAE80
_KVM_GET_REGS, _KVM_SET_REGS, _KVM_GET_SREGS, _KVM_SET_SREGS = 0x8090AE81, 0x4090AE82, 0x8138AE83, 0x4138AE84
_KVM_GET_SUPPORTED_CPUID, _KVM_SET_CPUID2 = 0xC008AE05, 0x4008AE90
_KVM_EXIT_IO, _KVM_EXIT_HLT, _KVM_EXIT_IO_IN = 2, 5, 0


def _kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
        return True
    except OSError:
        return False


class _MiniVm:
    def __init__(self, guest_bytes: int, prog: GuestProgram, params: BootParams):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
        self.ram = mmap.mmap(-1, guest_bytes)
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        vm = fcntl.ioctl(kvm, _KVM_CREATE_VM, 0)
        host = ctypes.addressof(ctypes.c_char.from_buffer(self.ram))
        fcntl.ioctl(vm, _KVM_SET_USER_MEMORY_REGION, struct.pack("IIQQQ", 0, 0, 0, guest_bytes, host))
        struct.pack_into("Q", self.ram, PML4_GPA, PDPT_GPA | 3)
        for g in range(pd_pages(guest_bytes)):
            struct.pack_into("Q", self.ram, PDPT_GPA + 8 * g, (PD_GPA + g * PAGE_SIZE) | 3)
            for i in range(512):
                struct.pack_into("Q", self.ram, PD_GPA + g * PAGE_SIZE + 8 * i, (g * GIB + (i << 21)) | 0x83)
        struct.pack_into("3Q", self.ram, GDT_GPA, 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF)
        for v, h in enumerate(prog.exception_entries):  # 64-bit interrupt gates
            struct.pack_into("<HHBBHII", self.ram, IDT_GPA + 16 * v, h & 0xFFFF, GDT_CODE64_SELECTOR, 0, 0x8E,
                             (h >> 16) & 0xFFFF, h >> 32, 0)
        self.ram[prog.code_gpa:prog.code_gpa + len(prog.code)] = prog.code
        self.ram[boot_params_gpa(0):boot_params_gpa(0) + 64] = params.pack()
        cpuid = ctypes.create_string_buffer(struct.pack("II", 100, 0) + b"\0" * 40 * 100)
        assert self.libc.ioctl(kvm, _KVM_GET_SUPPORTED_CPUID, cpuid) == 0
        self.vcpu = fcntl.ioctl(vm, _KVM_CREATE_VCPU, 0)
        assert self.libc.ioctl(self.vcpu, _KVM_SET_CPUID2, cpuid) == 0
        self.run = mmap.mmap(self.vcpu, fcntl.ioctl(kvm, _KVM_GET_VCPU_MMAP_SIZE))
        sregs = bytearray(312)
        fcntl.ioctl(self.vcpu, _KVM_GET_SREGS, sregs, True)
        for off, sel, typ, lng, db in [(0, GDT_CODE64_SELECTOR, 11, 1, 0)] + [
                (off, GDT_DATA_SELECTOR, 3, 0, 1) for off in (24, 48, 72, 96, 120)]:
            struct.pack_into("QIHBBBBBBBBBB", sregs, off, 0, 0xFFFFFFFF, sel, typ, 1, 0, db, 1, lng, 1, 0, 0, 0)
        struct.pack_into("QH", sregs, 192, GDT_GPA, 23)
        struct.pack_into("QH", sregs, 208, IDT_GPA, 16 * EXCEPTION_VECTORS - 1)
        struct.pack_into("QQQQ", sregs, 224, 0x80050033, 0, PML4_GPA, 0x20)  # cr0 cr2 cr3 cr4
        struct.pack_into("Q", sregs, 264, 0x500)  # efer: LMA | LME
        fcntl.ioctl(self.vcpu, _KVM_SET_SREGS, bytes(sregs))
        regs = bytearray(144)
        struct.pack_into("QQQ", regs, 32, boot_params_gpa(0), 0, stack_top(0))  # rsi rdi rsp
        struct.pack_into("QQ", regs, 128, prog.entry_gpa, ENTRY_RFLAGS)
        fcntl.ioctl(self.vcpu, _KVM_SET_REGS, bytes(regs))

    def run_until(self, on_out) -> None:
        """Runs until hlt; on_out(cmd, r8, r9, r10, r11) returns the order for the next `in`."""
        order = GS_ORDER_CONTINUE
        while True:
            assert self.libc.ioctl(self.vcpu, _KVM_RUN, None) == 0, os.strerror(ctypes.get_errno())
            reason = struct.unpack_from("I", self.run, 8)[0]
            if reason == _KVM_EXIT_HLT:
                return
            assert reason == _KVM_EXIT_IO, f"exit {reason}"
            direction, size, port, _, off = struct.unpack_from("BBHIQ", self.run, 32)
            assert port == GS_PORT and size == 4
            if direction == _KVM_EXIT_IO_IN:
                struct.pack_into("I", self.run, off, order)
                continue
            regs = bytearray(144)
            fcntl.ioctl(self.vcpu, _KVM_GET_REGS, regs, True)
            order = on_out(struct.unpack_from("I", self.run, off)[0], *struct.unpack_from("4Q", regs, 64))

    def qwords(self, gpa: int, n: int) -> list[int]:
        return list(struct.unpack_from(f"<{n}Q", self.ram, gpa))


@pytest.mark.skipif(not _kvm_usable(), reason="needs /dev/kvm")
@pytest.mark.parametrize("bad_qword", [pattern.SAMPLE_QWORDS[0], pattern.SAMPLE_QWORDS[5], pattern.SAMPLE_QWORDS[-1]])
def test_memtouch_on_kvm_writes_pattern_pages_verifies_them_and_catches_a_corrupted_page(bad_qword):
    guest_bytes = DATA_GPA + 41 * PAGE_SIZE  # 40 pattern pages + their generation table
    prog, (params,) = plan("memtouch", guest_bytes, 1, seed=0xC0FFEE, report_every=16)
    vm = _MiniVm(guest_bytes, prog, params)
    victim = params.first_pfn + 7
    events: list[tuple[int, ...]] = []
    reports = 0

    def on_out(cmd, r8, r9, r10, r11):
        nonlocal reports
        events.append((cmd, r8, r9, r10, r11))
        if cmd != GS_REPORT:
            return GS_ORDER_CONTINUE
        reports += 1
        if reports == 3:  # the vCPU is stopped in this exit: corrupt a sampled qword of the victim,
            # and an unsampled one of another page, which the guest neither checks nor rewrites
            struct.pack_into("Q", vm.ram, victim * PAGE_SIZE + bad_qword * 8, 0xBAD)
            struct.pack_into("Q", vm.ram, (victim + 1) * PAGE_SIZE + 300 * 8, 0xBAD)
            return GS_ORDER_SWEEP
        return GS_ORDER_HALT if reports == 5 else GS_ORDER_CONTINUE

    vm.run_until(on_out)
    kinds = [e[0] for e in events]
    assert GS_EXCEPTION not in kinds
    report_events = [e for e in events if e[0] == GS_REPORT]
    assert [e[1] for e in report_events] == [16, 32, 48, 64, 80]  # pages verified, cumulative
    assert [e[2] for e in report_events] == [0, 0, 0, 1, 1]  # errors
    gens = vm.qwords(params.gen_gpa, params.npages)
    (error,) = [e for e in events if e[0] == GS_PAGE_ERROR]
    (sweep,) = [e for e in events if e[0] == GS_SWEEP_DONE]
    victim_gen_at_sweep = sum(1 for _, k in zip(range(48), pattern.walk(params.seed, 0, params.npages)) if k == 7)
    expected = pattern.page_qwords(params.seed, victim, victim_gen_at_sweep)[bad_qword]
    assert error[1:] == (victim, bad_qword, expected, 0xBAD)
    assert sweep[1:3] == (params.npages, 1)
    # the gen table is the walk's visit count, and every page equals pattern.py at its generation
    visits = [0] * params.npages
    for _, k in zip(range(report_events[-1][4]), pattern.walk(params.seed, 0, params.npages)):
        visits[k] += 1
    assert gens == visits
    for k in range(params.npages):
        gpa = params.data_gpa + k * PAGE_SIZE
        page = bytes(vm.ram[gpa:gpa + PAGE_SIZE])
        assert pattern.page_matches(page, params.seed, params.first_pfn + k, gens[k]), k
        if gpa != (victim + 1) * PAGE_SIZE:  # the fill wrote the samples and nothing else
            assert page == pattern.expected_page(params, k, gens[k]), k
    assert vm.qwords((victim + 1) * PAGE_SIZE + 300 * 8, 1) == [0xBAD]
