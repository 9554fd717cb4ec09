"""Classic BPF (cBPF) as ``SO_ATTACH_REUSEPORT_CBPF`` uses it: uapi facts, a checker and an
interpreter (pure logic, no I/O).

Facts (``include/uapi/linux/filter.h``, ``bpf_common.h``, ``asm-generic/socket.h``):
``struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}`` (8 bytes), ``struct sock_fprog
{unsigned short len; struct sock_filter *filter}`` (16 bytes on 64-bit: the pointer at offset
8), the opcode fields, ``BPF_MAXINSNS`` 4096, ancillary loads at ``SKF_AD_OFF`` (-0x1000) +
``SKF_AD_*`` (``SKF_AD_QUEUE`` is 24, ``SKF_AD_CPU`` 36), ``SO_REUSEPORT`` 15,
``SO_ATTACH_REUSEPORT_CBPF`` 51, ``SO_DETACH_REUSEPORT_BPF`` 68.

Who uses what: the kernel process checks a program when it is attached (:func:`check`,
``-EINVAL`` for anything Linux refuses and for what is not emulated) and runs it per SYN that
reaches a reuseport group (:func:`run`); an app builds its program with :func:`stmt` /
:func:`jump` and may run the same interpreter to learn which socket a queue's SYNs will reach
(zcrx-server ``-w``).

What a SYN's program sees (:class:`SkbInfo`): the skb as ``run_bpf_filter`` hands it over,
data pulled past the TCP header, so ``len`` is the TCP payload length; ``SKF_AD_QUEUE`` loads
``skb->queue_mapping``, which a driver's ``skb_record_rx_queue`` sets to the RX queue **plus
one** (0 means "not recorded").  A program that wants the queue number subtracts 1.

Supported (the rest is ``-EINVAL`` at attach, a departure where Linux would accept it):
``LD``/``LDX`` ``IMM`` and ``LEN``; ``LD ABS`` (any size) of the ancillary words PROTOCOL,
PKTTYPE, IFINDEX, MARK, QUEUE, HATYPE, CPU, ALU_XOR_X, VLAN_TAG, VLAN_TAG_PRESENT, VLAN_TPID
and RANDOM; every ``ALU`` op with ``K`` or ``X``; ``JA`` and ``JEQ/JGT/JGE/JSET`` with ``K`` or
``X``; ``TAX``/``TXA``; ``RET K``/``RET A``.  Not emulated: loads of packet bytes (``ABS``
below ``SKF_AD_OFF``, ``IND``, ``MSH``: the TCP layer sees segment descriptors, not bytes),
the scratch memory (``ST``/``STX``/``MEM``), and the ancillary words the emulated skb does not
carry (NLATTR, NLATTR_NEST, RXHASH, PAY_OFFSET).  Checks as Linux's ``bpf_check_classic``:
0 or more than 4096 instructions, an unknown opcode, a constant division or modulo by 0, a
constant shift of 32 or more, a jump past the end, or a last instruction that is not ``RET``
are ``-EINVAL``.  At run time a division or modulo by ``X == 0`` returns 0, as Linux does.
"""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass
from typing import Final

import numpy as np

from shared.errors import Misuse

# -- socket options (asm-generic/socket.h) ---------------------------------------------------
SO_REUSEPORT: Final = 15
SO_ATTACH_REUSEPORT_CBPF: Final = 51
SO_DETACH_REUSEPORT_BPF: Final = 68

# -- struct layouts (linux/filter.h) ---------------------------------------------------------
#: ``struct sock_filter``: one instruction.
sock_filter: Final = np.dtype([("code", "<u2"), ("jt", "u1"), ("jf", "u1"), ("k", "<u4")])
#: ``struct sock_fprog`` on a 64-bit ABI: ``len`` then (after padding) the user pointer.
sock_fprog: Final = np.dtype({"names": ["len", "filter"], "formats": ["<u2", "<u8"],
                              "offsets": [0, 8], "itemsize": 16})
BPF_MAXINSNS: Final = 4096
BPF_MEMWORDS: Final = 16

# -- opcode fields ---------------------------------------------------------------------------
BPF_LD: Final = 0x00
BPF_LDX: Final = 0x01
BPF_ST: Final = 0x02
BPF_STX: Final = 0x03
BPF_ALU: Final = 0x04
BPF_JMP: Final = 0x05
BPF_RET: Final = 0x06
BPF_MISC: Final = 0x07

BPF_W: Final = 0x00
BPF_H: Final = 0x08
BPF_B: Final = 0x10

BPF_IMM: Final = 0x00
BPF_ABS: Final = 0x20
BPF_IND: Final = 0x40
BPF_MEM: Final = 0x60
BPF_LEN: Final = 0x80
BPF_MSH: Final = 0xA0

BPF_ADD: Final = 0x00
BPF_SUB: Final = 0x10
BPF_MUL: Final = 0x20
BPF_DIV: Final = 0x30
BPF_OR: Final = 0x40
BPF_AND: Final = 0x50
BPF_LSH: Final = 0x60
BPF_RSH: Final = 0x70
BPF_NEG: Final = 0x80
BPF_MOD: Final = 0x90
BPF_XOR: Final = 0xA0

BPF_JA: Final = 0x00
BPF_JEQ: Final = 0x10
BPF_JGT: Final = 0x20
BPF_JGE: Final = 0x30
BPF_JSET: Final = 0x40

BPF_K: Final = 0x00
BPF_X: Final = 0x08
BPF_A: Final = 0x10  # RET A

BPF_TAX: Final = 0x00
BPF_TXA: Final = 0x80

# -- ancillary data (linux/filter.h) -----------------------------------------------------------
SKF_AD_OFF: Final = -0x1000
SKF_AD_PROTOCOL: Final = 0
SKF_AD_PKTTYPE: Final = 4
SKF_AD_IFINDEX: Final = 8
SKF_AD_NLATTR: Final = 12
SKF_AD_NLATTR_NEST: Final = 16
SKF_AD_MARK: Final = 20
SKF_AD_QUEUE: Final = 24
SKF_AD_HATYPE: Final = 28
SKF_AD_RXHASH: Final = 32
SKF_AD_CPU: Final = 36
SKF_AD_ALU_XOR_X: Final = 40
SKF_AD_VLAN_TAG: Final = 44
SKF_AD_VLAN_TAG_PRESENT: Final = 48
SKF_AD_PAY_OFFSET: Final = 52
SKF_AD_RANDOM: Final = 56
SKF_AD_VLAN_TPID: Final = 60
SKF_AD_MAX: Final = 64

_U32: Final = 0xFFFFFFFF
_AD_BASE: Final = SKF_AD_OFF & _U32  # 0xfffff000: k of the first ancillary word
#: Ancillary words an emulated skb carries (the others are -EINVAL at attach).
_ANC_OK: Final = frozenset({SKF_AD_PROTOCOL, SKF_AD_PKTTYPE, SKF_AD_IFINDEX, SKF_AD_MARK,
                            SKF_AD_QUEUE, SKF_AD_HATYPE, SKF_AD_CPU, SKF_AD_ALU_XOR_X,
                            SKF_AD_VLAN_TAG, SKF_AD_VLAN_TAG_PRESENT, SKF_AD_VLAN_TPID,
                            SKF_AD_RANDOM})
_ANC_LINUX: Final = frozenset(range(0, SKF_AD_MAX, 4))  # every word Linux knows

_ALU_OPS: Final = (BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND, BPF_LSH, BPF_RSH,
                   BPF_MOD, BPF_XOR)
_JMP_OPS: Final = (BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET)

#: ETH_P_IP / ETH_P_IPV6 as SKF_AD_PROTOCOL loads them (host order), ARPHRD_ETHER.
ETH_P_IP: Final = 0x0800
ETH_P_IPV6: Final = 0x86DD
ARPHRD_ETHER: Final = 1
PACKET_HOST: Final = 0


def stmt(code: int, k: int = 0) -> tuple[int, int, int, int]:
    """``BPF_STMT(code, k)``: one instruction ``(code, jt, jf, k)``."""
    return (code, 0, 0, k & _U32)


def jump(code: int, k: int, jt: int, jf: int) -> tuple[int, int, int, int]:
    """``BPF_JUMP(code, k, jt, jf)``."""
    return (code, jt, jf, k & _U32)


def pack(insns: list[tuple[int, int, int, int]]) -> bytes:
    """The ``struct sock_filter`` array of ``insns`` (what ``sock_fprog.filter`` points to)."""
    arr = np.zeros(len(insns), dtype=sock_filter)
    for i, (code, jt, jf, k) in enumerate(insns):
        arr[i] = (code, jt, jf, k)
    return arr.tobytes()


def unpack(raw: bytes | np.ndarray) -> list[tuple[int, int, int, int]]:
    """Instructions from ``struct sock_filter`` bytes."""
    arr = np.frombuffer(bytes(raw), dtype=sock_filter)
    return [(int(c), int(t), int(f), int(k)) for c, t, f, k in arr.tolist()]


@dataclass(frozen=True)
class SkbInfo:
    """What a reuseport program may read of the SYN's skb (see the module docstring).

    ``queue_mapping`` is ``rx queue + 1`` (``skb_record_rx_queue``); ``length`` the TCP
    payload length (data pulled past the TCP header); ``cpu`` the CPU NAPI ran on.
    """

    queue_mapping: int = 0
    length: int = 0
    ifindex: int = 0
    cpu: int = 0
    protocol: int = ETH_P_IP
    mark: int = 0


@dataclass(frozen=True)
class Program:
    """A checked program (attach made it; it is immutable afterwards)."""

    insns: tuple[tuple[int, int, int, int], ...]

    def __len__(self) -> int:
        return len(self.insns)

    def run(self, skb: SkbInfo) -> int:
        """Run on ``skb``: the u32 the program returns."""
        return run(self, skb)


def _bad(why: str) -> Misuse:
    return Misuse(f"classic BPF: {why}", errno.EINVAL)


def check(insns: list[tuple[int, int, int, int]]) -> Program:
    """Check a program as ``bpf_check_classic`` does at attach; ``Misuse(EINVAL)`` if refused.

    Also refused (departure, see the module docstring): instructions of a kind this
    interpreter does not run, though Linux would accept them.
    """
    flen = len(insns)
    if flen == 0 or flen > BPF_MAXINSNS:
        raise _bad(f"{flen} instructions (1..{BPF_MAXINSNS})")
    for pc, (code, jt, jf, k) in enumerate(insns):
        cls = code & 0x07
        if code > 0xFFFF or not 0 <= jt <= 0xFF or not 0 <= jf <= 0xFF or not 0 <= k <= _U32:
            raise _bad(f"insn {pc}: field out of range")
        if cls in (BPF_LD, BPF_LDX):
            size, mode = code & 0x18, code & 0xE0
            if code in (BPF_LD | BPF_W | BPF_IMM, BPF_LDX | BPF_W | BPF_IMM,
                        BPF_LD | BPF_W | BPF_LEN, BPF_LDX | BPF_W | BPF_LEN):
                continue
            if cls == BPF_LD and mode == BPF_ABS and size in (BPF_W, BPF_H, BPF_B):
                if k >= _AD_BASE:
                    off = k - _AD_BASE
                    if off not in _ANC_LINUX:
                        raise _bad(f"insn {pc}: unknown ancillary load {off}")
                    if off not in _ANC_OK:
                        raise _bad(f"insn {pc}: ancillary word {off} is not emulated")
                    continue
                raise _bad(f"insn {pc}: packet data loads are not emulated")
            if mode in (BPF_ABS, BPF_IND, BPF_MEM, BPF_MSH) and size in (BPF_W, BPF_H, BPF_B):
                raise _bad(f"insn {pc}: {'scratch memory' if mode == BPF_MEM else 'packet data'}"
                           " loads are not emulated")
            raise _bad(f"insn {pc}: unknown opcode {code:#x}")
        if cls in (BPF_ST, BPF_STX):
            if code == cls:
                raise _bad(f"insn {pc}: scratch memory (ST/STX) is not emulated")
            raise _bad(f"insn {pc}: unknown opcode {code:#x}")
        if cls == BPF_ALU:
            op, src = code & 0xF0, code & 0x08
            if code == BPF_ALU | BPF_NEG:
                continue
            if op not in _ALU_OPS or code > 0xFF:
                raise _bad(f"insn {pc}: unknown opcode {code:#x}")
            if src == BPF_K and op in (BPF_DIV, BPF_MOD) and k == 0:
                raise _bad(f"insn {pc}: division by constant 0")
            if src == BPF_K and op in (BPF_LSH, BPF_RSH) and k >= 32:
                raise _bad(f"insn {pc}: shift by {k}")
            continue
        if cls == BPF_JMP:
            op = code & 0xF0
            if code == BPF_JMP | BPF_JA:
                if k >= flen - pc - 1:
                    raise _bad(f"insn {pc}: jump past the end")
                continue
            if op not in _JMP_OPS or code > 0xFF:
                raise _bad(f"insn {pc}: unknown opcode {code:#x}")
            if pc + jt + 1 >= flen or pc + jf + 1 >= flen:
                raise _bad(f"insn {pc}: jump past the end")
            continue
        if cls == BPF_RET:
            if code not in (BPF_RET | BPF_K, BPF_RET | BPF_A):
                raise _bad(f"insn {pc}: unknown opcode {code:#x}")
            continue
        if code not in (BPF_MISC | BPF_TAX, BPF_MISC | BPF_TXA):
            raise _bad(f"insn {pc}: unknown opcode {code:#x}")
    if insns[-1][0] not in (BPF_RET | BPF_K, BPF_RET | BPF_A):
        raise _bad("the last instruction must be RET")
    return Program(tuple(insns))


def _ancillary(off: int, skb: SkbInfo, x: int, a: int) -> int:
    if off == SKF_AD_QUEUE:
        return skb.queue_mapping & 0xFFFF
    if off == SKF_AD_CPU:
        return skb.cpu
    if off == SKF_AD_IFINDEX:
        return skb.ifindex
    if off == SKF_AD_PROTOCOL:
        return skb.protocol
    if off == SKF_AD_MARK:
        return skb.mark
    if off == SKF_AD_HATYPE:
        return ARPHRD_ETHER
    if off == SKF_AD_ALU_XOR_X:
        return a ^ x
    if off == SKF_AD_RANDOM:
        return random.getrandbits(32)
    return 0  # PKTTYPE (PACKET_HOST), VLAN_* (no tag: tagged frames are dropped earlier)


def run(prog: Program, skb: SkbInfo) -> int:
    """Run a checked program (32-bit unsigned A and X, forward jumps only, so it ends)."""
    a = x = 0
    pc = 0
    insns = prog.insns
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        cls = code & 0x07
        if cls == BPF_RET:
            return a if code & BPF_A else k
        if cls == BPF_LD:
            mode = code & 0xE0
            if mode == BPF_ABS:
                a = _ancillary(k - _AD_BASE, skb, x, a) & _U32
            elif mode == BPF_LEN:
                a = skb.length & _U32
            else:
                a = k
        elif cls == BPF_LDX:
            x = skb.length & _U32 if code & 0xE0 == BPF_LEN else k
        elif cls == BPF_ALU:
            op = code & 0xF0
            v = x if code & BPF_X else k
            if op == BPF_NEG:
                a = -a & _U32
            elif op == BPF_ADD:
                a = (a + v) & _U32
            elif op == BPF_SUB:
                a = (a - v) & _U32
            elif op == BPF_MUL:
                a = (a * v) & _U32
            elif op == BPF_DIV:
                if v == 0:
                    return 0
                a //= v
            elif op == BPF_MOD:
                if v == 0:
                    return 0
                a %= v
            elif op == BPF_OR:
                a |= v
            elif op == BPF_AND:
                a &= v
            elif op == BPF_XOR:
                a ^= v
            elif op == BPF_LSH:
                a = (a << (v & 31)) & _U32
            else:  # BPF_RSH
                a >>= v & 31
        elif cls == BPF_JMP:
            op = code & 0xF0
            if op == BPF_JA:
                pc += k
                continue
            v = x if code & BPF_X else k
            if op == BPF_JEQ:
                taken = a == v
            elif op == BPF_JGT:
                taken = a > v
            elif op == BPF_JGE:
                taken = a >= v
            else:  # BPF_JSET
                taken = bool(a & v)
            pc += jt if taken else jf
        elif code == BPF_MISC | BPF_TAX:
            x = a
        else:  # TXA
            a = x


def queue_modulo(n: int) -> list[tuple[int, int, int, int]]:
    """The program a multi-worker server attaches: the SYN's RX queue modulo ``n``
    (``queue_mapping - 1``, see :class:`SkbInfo`), i.e. queue q reaches socket ``q % n``."""
    if n < 1:
        raise Misuse(f"modulo {n}")
    return [stmt(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_QUEUE),
            stmt(BPF_ALU | BPF_SUB | BPF_K, 1),
            stmt(BPF_ALU | BPF_MOD | BPF_K, n),
            stmt(BPF_RET | BPF_A)]
