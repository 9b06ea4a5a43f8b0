"""An assembled guest program, and the pieces every workload shares: exception stubs, BootParams access.

Each of the 32 exception vectors gets a stub that reports ``GS_EXCEPTION`` on the guest-services
port (r8 = vector, r9 = error code, r10 = faulting rip, r11 = cr2) and then halts for good.
The VMM builds the IDT from ``GuestProgram.exception_entries``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from vmm.guest.asm import CR2, DX, EAX, EDX, R8, R9, R10, R11, RSI, RSP, Assembler, Mem, qword
from vmm.guest.layout import BootParams
from vmm.guest.services import GS_EXCEPTION, GS_PORT

EXCEPTION_VECTORS = 32
# Vectors for which the CPU pushes an error code (SDM Vol. 3A, 6.3.1 / Table 6-1):
# #DF 8, #TS 10, #NP 11, #SS 12, #GP 13, #PF 14, #AC 17, #CP 21, #VC 29, #SX 30.
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})

ENTRY_LABEL = "entry"
_REPORT_LABEL = "exception_report"
_HALT_LABEL = "exception_halt"

# Byte offset of each BootParams field in the block: it is packed as 8 qwords in field order.
BOOT_PARAM_OFFSETS = {f.name: 8 * i for i, f in enumerate(fields(BootParams))}


@dataclass(slots=True, frozen=True)
class GuestProgram:
    code: bytes  # loaded at code_gpa
    code_gpa: int
    entry_gpa: int  # every vCPU starts here (entry ABI in layout.py)
    exception_entries: tuple[int, ...]  # gpa of the stub for vectors 0..31

    def __post_init__(self) -> None:
        if len(self.exception_entries) != EXCEPTION_VECTORS:
            raise ValueError(f"{len(self.exception_entries)} exception entries, need {EXCEPTION_VECTORS}")
        end = self.code_gpa + len(self.code)
        for gpa in (self.entry_gpa, *self.exception_entries):
            if not self.code_gpa <= gpa < end:
                raise ValueError(f"entry {gpa:#x} outside the code at {self.code_gpa:#x}..{end:#x}")


def boot_param(name: str, params_reg=RSI) -> Mem:
    """The qword of BootParams field ``name`` in the block ``params_reg`` points at."""
    return qword(params_reg, disp=BOOT_PARAM_OFFSETS[name])


def exception_label(vector: int) -> str:
    return f"exception_{vector}"


def emit_exception_stubs(a: Assembler) -> None:
    """The 32 per-vector stubs and the shared report-and-halt tail.

    The frame on entry (64-bit mode, same privilege level) is [error code,] rip, cs, rflags, rsp, ss.
    """
    for vector in range(EXCEPTION_VECTORS):
        a.label(exception_label(vector))
        if vector in ERROR_CODE_VECTORS:
            a.mov(R9, qword(RSP))  # error code
            a.mov(R10, qword(RSP, disp=8))  # rip
        else:
            a.xor(R9, R9)
            a.mov(R10, qword(RSP))  # rip
        a.mov(R8, vector)
        a.jmp(_REPORT_LABEL)
    a.label(_REPORT_LABEL)
    a.mov(R11, CR2)
    a.mov(EAX, GS_EXCEPTION)
    a.mov(EDX, GS_PORT)
    a.out(DX, EAX)
    a.label(_HALT_LABEL)
    a.cli()
    a.hlt()
    a.jmp(_HALT_LABEL)


def link(a: Assembler, entry: str = ENTRY_LABEL) -> GuestProgram:
    """Assembles ``a`` (which must contain the exception stubs) into a GuestProgram."""
    code = a.assemble()
    return GuestProgram(
        code=code,
        code_gpa=a.base_gpa,
        entry_gpa=a.address_of(entry),
        exception_entries=tuple(a.address_of(exception_label(v)) for v in range(EXCEPTION_VECTORS)),
    )
