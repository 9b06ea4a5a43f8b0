"""A small x86-64 assembler over iced-x86 for the guest workloads.

One method per mnemonic for the forms the workloads use, named labels, and ``assemble()``, which
hands the instructions to iced's BlockEncoder so that short/near branches resolve and grow as needed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from iced_x86 import BlockEncoder, Code, Decoder, Instruction, MemoryOperand, Register

# Branch targets are placeholder IPs, one per instruction, that BlockEncoder maps to the final
# addresses; they live far from any real guest address so that they cannot collide with one.
_PLACEHOLDER_IP = 0x7FFF_0000_0000_0000
_U64 = (1 << 64) - 1


class AsmError(Exception):
    """An instruction cannot be encoded or a label is wrong; the message names which."""


@dataclass(frozen=True, slots=True)
class Reg:
    name: str
    iced: int  # an iced_x86.Register value
    bits: int  # 8, 16, 32 or 64; 0 for control registers

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class Mem:
    """A qword memory operand: [base + index * scale + disp]."""

    base: Reg | None = None
    index: Reg | None = None
    scale: int = 1
    disp: int = 0

    def operand(self) -> MemoryOperand:
        base = self.base.iced if self.base else Register.NONE
        index = self.index.iced if self.index else Register.NONE
        return MemoryOperand(base, index, self.scale, self.disp, 1 if self.disp else 0)

    def __str__(self) -> str:
        parts = [str(r) if self.scale == 1 or r is self.base else f"{r}*{self.scale}"
                 for r in (self.base, self.index) if r is not None]
        if self.disp or not parts:
            parts.append(hex(self.disp))
        return "qword [" + " + ".join(parts) + "]"


def qword(base: Reg | None = None, index: Reg | None = None, scale: int = 1, disp: int = 0) -> Mem:
    return Mem(base, index, scale, disp)


_NAMES64 = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi"] + [f"r{i}" for i in range(8, 16)]
_NAMES32 = ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"] + [f"r{i}d" for i in range(8, 16)]
_REG64 = {n: Reg(n, getattr(Register, n.upper()), 64) for n in _NAMES64}
_REG32 = {n: Reg(n, getattr(Register, n.upper()), 32) for n in _NAMES32}
_TO32 = {_REG64[a].iced: _REG32[b] for a, b in zip(_NAMES64, _NAMES32)}

RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = (_REG64[n] for n in _NAMES64[:8])
R8, R9, R10, R11, R12, R13, R14, R15 = (_REG64[n] for n in _NAMES64[8:])
EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI = (_REG32[n] for n in _NAMES32[:8])
R8D, R9D, R10D, R11D, R12D, R13D, R14D, R15D = (_REG32[n] for n in _NAMES32[8:])
DX = Reg("dx", Register.DX, 16)
AL = Reg("al", Register.AL, 8)
CL = Reg("cl", Register.CL, 8)
CR2 = Reg("cr2", Register.CR2, 0)

Operand = Reg | Mem | int

# Condition-code suffixes accepted by jcc(); aliases map onto iced's canonical names.
_CONDITIONS = {
    "e": "E", "z": "E", "ne": "NE", "nz": "NE", "b": "B", "c": "B", "ae": "AE", "nc": "AE",
    "be": "BE", "a": "A", "l": "L", "ge": "GE", "le": "LE", "g": "G", "s": "S", "ns": "NS",
}


def _signed(imm: int) -> int:
    """Reads imm as a 64-bit value (signed or unsigned spelling) and returns it signed."""
    if not -(1 << 63) <= imm <= _U64:
        raise AsmError(f"immediate {imm:#x} does not fit in 64 bits")
    return imm - (1 << 64) if imm >= 1 << 63 else imm


def _fits(imm: int, bits: int) -> bool:
    return -(1 << (bits - 1)) <= imm < 1 << (bits - 1)


@dataclass(slots=True)
class _Item:
    text: str  # for error messages
    instr: Instruction | None = None
    branch_code: int | None = None  # a branch to `target`, built at assemble() time
    target: str | None = None


@dataclass
class Assembler:
    """Collects instructions at ``base_gpa``; ``assemble()`` returns the machine code."""

    base_gpa: int
    _items: list[_Item] = field(default_factory=list)
    _labels: dict[str, int] = field(default_factory=dict)  # label -> index of the next item
    _offsets: list[int] | None = None  # byte offset of each item, after assemble()
    _size: int = 0

    # -- labels and output ------------------------------------------------------------------

    def label(self, name: str) -> None:
        if name in self._labels:
            raise AsmError(f"label {name!r} defined twice")
        self._labels[name] = len(self._items)

    def assemble(self) -> bytes:
        instrs = []
        for i, item in enumerate(self._items):
            if item.branch_code is not None:
                assert item.target is not None
                index = self._labels.get(item.target)
                if index is None:
                    raise AsmError(f"{item.text}: undefined label {item.target!r}")
                if index == len(self._items):
                    raise AsmError(f"{item.text}: label {item.target!r} has no instruction after it")
                instr = Instruction.create_branch(item.branch_code, _PLACEHOLDER_IP + index)
            else:
                assert item.instr is not None
                instr = item.instr.copy()
            instr.ip = _PLACEHOLDER_IP + i
            instrs.append(instr)
        encoder = BlockEncoder(64)
        encoder.add_many(instrs)
        try:
            code = encoder.encode(self.base_gpa)
        except ValueError as exc:
            raise AsmError(f"cannot encode the block at {self.base_gpa:#x}: {exc}") from None
        decoded = list(Decoder(64, code, ip=self.base_gpa))
        if len(decoded) != len(self._items):  # BlockEncoder turned one instruction into several
            raise AsmError(f"encoded {len(decoded)} instructions for {len(self._items)} given")
        self._offsets = [d.ip - self.base_gpa for d in decoded]
        self._size = len(code)
        return code

    def address_of(self, name: str) -> int:
        """The gpa of a label; valid after assemble()."""
        if self._offsets is None:
            raise AsmError(f"address_of({name!r}) before assemble()")
        if name not in self._labels:
            raise AsmError(f"undefined label {name!r}")
        index = self._labels[name]
        offset = self._size if index == len(self._offsets) else self._offsets[index]
        return self.base_gpa + offset

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self._labels)

    # -- plumbing ----------------------------------------------------------------------------

    def _emit(self, text: str, make) -> None:  # make: () -> Instruction
        try:
            instr = make()
        except (ValueError, TypeError) as exc:
            raise AsmError(f"{text}: {exc}") from None
        self._items.append(_Item(text, instr))
        self._offsets = None

    def _branch(self, mnemonic: str, code: int, target: str) -> None:
        self._items.append(_Item(f"{mnemonic} {target}", branch_code=code, target=target))
        self._offsets = None

    def _bad(self, mnemonic: str, *ops: Operand) -> AsmError:
        return AsmError(f"{mnemonic} {', '.join(map(str, ops))}: unsupported operand form")

    def _alu(self, op: str, dst: Operand, src: Operand) -> None:
        """The two-operand ALU forms: reg,reg  reg,mem  mem,reg  reg/mem,imm (64- or 32-bit)."""
        text = f"{op.lower()} {dst}, {src}"
        width = dst.bits if isinstance(dst, Reg) else 64
        if width not in (32, 64) or (isinstance(src, Reg) and src.bits != width):
            raise self._bad(op.lower(), dst, src)
        w = str(width)
        if isinstance(dst, Reg) and isinstance(src, Reg):
            self._emit(text, lambda: Instruction.create_reg_reg(getattr(Code, f"{op}_RM{w}_R{w}"), dst.iced, src.iced))
        elif isinstance(dst, Reg) and isinstance(src, Mem):
            self._emit(text, lambda: Instruction.create_reg_mem(getattr(Code, f"{op}_R{w}_RM{w}"), dst.iced, src.operand()))
        elif isinstance(dst, Mem) and isinstance(src, Reg):
            self._emit(text, lambda: Instruction.create_mem_reg(getattr(Code, f"{op}_RM{w}_R{w}"), dst.operand(), src.iced))
        elif isinstance(src, int) and not isinstance(src, bool):
            imm = _signed(src) if width == 64 else (src - (1 << 32) if src >= 1 << 31 else src)
            if not _fits(imm, 32):
                raise AsmError(f"{text}: immediate does not fit in a sign-extended imm32; load it into a register")
            code = getattr(Code, f"{op}_RM{w}_IMM8" if _fits(imm, 8) else f"{op}_RM{w}_IMM32")
            if isinstance(dst, Reg):
                self._emit(text, lambda: Instruction.create_reg_i32(code, dst.iced, imm))
            else:
                self._emit(text, lambda: Instruction.create_mem_i32(code, dst.operand(), imm))
        else:
            raise self._bad(op.lower(), dst, src)

    def _unary(self, op: str, dst: Reg | Mem) -> None:
        width = dst.bits if isinstance(dst, Reg) else 64
        if width not in (32, 64):
            raise self._bad(op.lower(), dst)
        code = getattr(Code, f"{op}_RM{width}")
        if isinstance(dst, Reg):
            self._emit(f"{op.lower()} {dst}", lambda: Instruction.create_reg(code, dst.iced))
        else:
            self._emit(f"{op.lower()} {dst}", lambda: Instruction.create_mem(code, dst.operand()))

    def _shift(self, op: str, dst: Reg, count: Reg | int) -> None:
        text = f"{op.lower()} {dst}, {count}"
        if not isinstance(dst, Reg) or dst.bits != 64:
            raise self._bad(op.lower(), dst, count)
        if count == CL:
            self._emit(text, lambda: Instruction.create_reg_reg(getattr(Code, f"{op}_RM64_CL"), dst.iced, CL.iced))
        elif isinstance(count, int) and 0 <= count < 64:
            self._emit(text, lambda: Instruction.create_reg_u32(getattr(Code, f"{op}_RM64_IMM8"), dst.iced, count))
        else:
            raise self._bad(op.lower(), dst, count)

    # -- data movement -----------------------------------------------------------------------

    def mov(self, dst: Reg | Mem, src: Operand) -> None:
        text = f"mov {dst}, {src}"
        if isinstance(dst, Reg) and src == CR2:
            if dst.bits != 64:
                raise self._bad("mov", dst, src)
            self._emit(text, lambda: Instruction.create_reg_reg(Code.MOV_R64_CR, dst.iced, CR2.iced))
        elif isinstance(dst, Reg) and isinstance(src, int) and not isinstance(src, bool):
            if dst.bits == 32:
                if not 0 <= src < 1 << 32:
                    raise AsmError(f"{text}: immediate does not fit in 32 bits")
                self._emit(text, lambda: Instruction.create_reg_u32(Code.MOV_R32_IMM32, dst.iced, src))
                return
            if dst.bits != 64:
                raise self._bad("mov", dst, src)
            imm = _signed(src)
            if 0 <= imm < 1 << 32:  # mov r32, imm32 zero-extends: the shortest form
                r32 = _TO32[dst.iced]
                self._emit(text, lambda: Instruction.create_reg_u32(Code.MOV_R32_IMM32, r32.iced, imm))
            elif _fits(imm, 32):
                self._emit(text, lambda: Instruction.create_reg_i32(Code.MOV_RM64_IMM32, dst.iced, imm))
            else:
                self._emit(text, lambda: Instruction.create_reg_u64(Code.MOV_R64_IMM64, dst.iced, imm & _U64))
        elif isinstance(dst, Mem) and isinstance(src, int) and not isinstance(src, bool):
            imm = _signed(src)
            if not _fits(imm, 32):
                raise AsmError(f"{text}: immediate does not fit in a sign-extended imm32")
            self._emit(text, lambda: Instruction.create_mem_i32(Code.MOV_RM64_IMM32, dst.operand(), imm))
        else:
            self._alu("MOV", dst, src)

    def lea(self, dst: Reg, src: Mem) -> None:
        if not (isinstance(dst, Reg) and dst.bits == 64 and isinstance(src, Mem)):
            raise self._bad("lea", dst, src)
        self._emit(f"lea {dst}, {src}", lambda: Instruction.create_reg_mem(Code.LEA_R64_M, dst.iced, src.operand()))

    def push(self, src: Reg) -> None:
        if not (isinstance(src, Reg) and src.bits == 64):
            raise self._bad("push", src)
        self._emit(f"push {src}", lambda: Instruction.create_reg(Code.PUSH_R64, src.iced))

    def pop(self, dst: Reg) -> None:
        if not (isinstance(dst, Reg) and dst.bits == 64):
            raise self._bad("pop", dst)
        self._emit(f"pop {dst}", lambda: Instruction.create_reg(Code.POP_R64, dst.iced))

    # -- arithmetic and logic ----------------------------------------------------------------

    def add(self, dst: Reg | Mem, src: Operand) -> None:
        self._alu("ADD", dst, src)

    def sub(self, dst: Reg | Mem, src: Operand) -> None:
        self._alu("SUB", dst, src)

    def xor(self, dst: Reg | Mem, src: Operand) -> None:
        self._alu("XOR", dst, src)

    def and_(self, dst: Reg | Mem, src: Operand) -> None:
        self._alu("AND", dst, src)

    def or_(self, dst: Reg | Mem, src: Operand) -> None:
        self._alu("OR", dst, src)

    def cmp(self, dst: Reg | Mem, src: Operand) -> None:
        self._alu("CMP", dst, src)

    def test(self, dst: Reg, src: Reg | int) -> None:
        text = f"test {dst}, {src}"
        if not (isinstance(dst, Reg) and dst.bits == 64):
            raise self._bad("test", dst, src)
        if isinstance(src, Reg) and src.bits == 64:
            self._emit(text, lambda: Instruction.create_reg_reg(Code.TEST_RM64_R64, dst.iced, src.iced))
        elif isinstance(src, int) and _fits(_signed(src), 32):
            self._emit(text, lambda: Instruction.create_reg_i32(Code.TEST_RM64_IMM32, dst.iced, _signed(src)))
        else:
            raise self._bad("test", dst, src)

    def shl(self, dst: Reg, count: Reg | int) -> None:
        self._shift("SHL", dst, count)

    def shr(self, dst: Reg, count: Reg | int) -> None:
        self._shift("SHR", dst, count)

    def imul(self, dst: Reg, src: Reg | Mem, imm: int | None = None) -> None:
        """imul dst, src (low 64 bits of the product) or imul dst, src, imm32."""
        text = f"imul {dst}, {src}" + ("" if imm is None else f", {imm}")
        if not (isinstance(dst, Reg) and dst.bits == 64 and isinstance(src, (Reg, Mem))):
            raise self._bad("imul", dst, src)
        op = src.operand() if isinstance(src, Mem) else None
        if imm is None:
            if op is not None:
                self._emit(text, lambda: Instruction.create_reg_mem(Code.IMUL_R64_RM64, dst.iced, op))
            else:
                self._emit(text, lambda: Instruction.create_reg_reg(Code.IMUL_R64_RM64, dst.iced, src.iced))
            return
        value = _signed(imm)
        if not _fits(value, 32) or op is not None:
            raise AsmError(f"{text}: only imul reg, reg, imm32 is supported")
        code = Code.IMUL_R64_RM64_IMM8 if _fits(value, 8) else Code.IMUL_R64_RM64_IMM32
        self._emit(text, lambda: Instruction.create_reg_reg_i32(code, dst.iced, src.iced, value))

    def inc(self, dst: Reg | Mem) -> None:
        self._unary("INC", dst)

    def dec(self, dst: Reg | Mem) -> None:
        self._unary("DEC", dst)

    # -- control flow ------------------------------------------------------------------------

    def jmp(self, target: str | Reg) -> None:
        if isinstance(target, Reg):  # an indirect jump, e.g. to provoke a #GP in a test guest
            if target.bits != 64:
                raise self._bad("jmp", target)
            self._emit(f"jmp {target}", lambda: Instruction.create_reg(Code.JMP_RM64, target.iced))
        else:
            self._branch("jmp", Code.JMP_REL8_64, target)

    def jcc(self, condition: str, target: str) -> None:
        cc = _CONDITIONS.get(condition.lower())
        if cc is None:
            raise AsmError(f"j{condition} {target}: unknown condition {condition!r}")
        self._branch(f"j{condition}", getattr(Code, f"J{cc}_REL8_64"), target)

    def je(self, target: str) -> None:
        self.jcc("e", target)

    def jne(self, target: str) -> None:
        self.jcc("ne", target)

    def jz(self, target: str) -> None:
        self.jcc("z", target)

    def jnz(self, target: str) -> None:
        self.jcc("nz", target)

    def jb(self, target: str) -> None:
        self.jcc("b", target)

    def jae(self, target: str) -> None:
        self.jcc("ae", target)

    def jbe(self, target: str) -> None:
        self.jcc("be", target)

    def ja(self, target: str) -> None:
        self.jcc("a", target)

    def call(self, target: str) -> None:
        self._branch("call", Code.CALL_REL32_64, target)

    def ret(self) -> None:
        self._emit("ret", lambda: Instruction.create(Code.RETNQ))

    # -- system ------------------------------------------------------------------------------

    def out(self, port: Reg, src: Reg) -> None:
        """out dx, eax  or  out dx, al."""
        if port != DX or src not in (EAX, AL):
            raise self._bad("out", port, src)
        code = Code.OUT_DX_EAX if src == EAX else Code.OUT_DX_AL
        self._emit(f"out {port}, {src}", lambda: Instruction.create_reg_reg(code, DX.iced, src.iced))

    def in_(self, dst: Reg, port: Reg) -> None:
        """in eax, dx  or  in al, dx."""
        if port != DX or dst not in (EAX, AL):
            raise self._bad("in", dst, port)
        code = Code.IN_EAX_DX if dst == EAX else Code.IN_AL_DX
        self._emit(f"in {dst}, {port}", lambda: Instruction.create_reg_reg(code, dst.iced, DX.iced))

    def hlt(self) -> None:
        self._emit("hlt", lambda: Instruction.create(Code.HLT))

    def cli(self) -> None:
        self._emit("cli", lambda: Instruction.create(Code.CLI))

    def pause(self) -> None:
        self._emit("pause", lambda: Instruction.create(Code.PAUSE))
