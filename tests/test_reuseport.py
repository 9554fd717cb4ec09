"""SO_REUSEPORT groups and their classic BPF programs (no processes).

The interpreter (:mod:`shared.bpf`): attach-time checks with Linux's EINVAL cases and the ones
we do not emulate, and what programs compute.  The groups (:mod:`driver_proc.sock_reuseport`,
:class:`driver_proc.tcp.SocketTable`): listen order is the index, a program's index picks the
listener, an index past the group falls back to the hash, no program means hash, a member that
leaves is replaced by the last.  The syscall path (``setsockopt``) through in-process tasks:
SO_REUSEPORT bind sharing for one owner only, the program read from the caller's memory.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import numpy as np
import pytest

from app_proc import syscall as S
from driver_proc.sock_reuseport import ReuseportGroup, flow_hash, reciprocal_scale
from driver_proc.syscalls import KernelContext, task_exit
from driver_proc.tcp import SYN, Listener, SocketTable, flow_key
from shared import bpf
from shared.bpf import (
    BPF_A,
    BPF_ABS,
    BPF_ADD,
    BPF_ALU,
    BPF_AND,
    BPF_B,
    BPF_DIV,
    BPF_IMM,
    BPF_IND,
    BPF_JA,
    BPF_JEQ,
    BPF_JGE,
    BPF_JGT,
    BPF_JMP,
    BPF_JSET,
    BPF_K,
    BPF_LD,
    BPF_LDX,
    BPF_LEN,
    BPF_LSH,
    BPF_MEM,
    BPF_MISC,
    BPF_MOD,
    BPF_MUL,
    BPF_NEG,
    BPF_OR,
    BPF_RET,
    BPF_RSH,
    BPF_ST,
    BPF_SUB,
    BPF_TAX,
    BPF_TXA,
    BPF_W,
    BPF_X,
    BPF_XOR,
    SKF_AD_ALU_XOR_X,
    SKF_AD_CPU,
    SKF_AD_IFINDEX,
    SKF_AD_NLATTR,
    SKF_AD_OFF,
    SKF_AD_PROTOCOL,
    SKF_AD_QUEUE,
    SKF_AD_RXHASH,
    SkbInfo,
    jump,
    stmt,
)
from shared.control import Peer, PeerCred
from shared.errors import Misuse
from shared.msg import ControlError
from tests.test_io_uring import Direct, FakeSkbs

RET_A = stmt(BPF_RET | BPF_A)
LD_QUEUE = stmt(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_QUEUE)


def _run(insns: list[tuple[int, int, int, int]], **skb: Any) -> int:
    return bpf.check(insns).run(SkbInfo(**skb))


# -- the uapi facts ----------------------------------------------------------------------------


def test_uapi_layouts_and_constants() -> None:
    assert bpf.sock_filter.itemsize == 8 and bpf.sock_fprog.itemsize == 16
    assert bpf.sock_fprog.fields["filter"][1] == 8
    assert (bpf.SO_REUSEPORT, bpf.SO_ATTACH_REUSEPORT_CBPF, bpf.SO_DETACH_REUSEPORT_BPF) == (
        15, 51, 68)
    assert (SKF_AD_OFF, SKF_AD_QUEUE, SKF_AD_CPU) == (-0x1000, 24, 36)
    insns = [LD_QUEUE, jump(BPF_JMP | BPF_JEQ | BPF_K, 7, 0, 1), stmt(BPF_RET | BPF_K, 3),
             RET_A]
    raw = bpf.pack(insns)
    assert len(raw) == 32 and raw[:8] == bytes([0x20, 0, 0, 0, 0x18, 0xF0, 0xFF, 0xFF])
    assert bpf.unpack(raw) == insns


# -- the interpreter -------------------------------------------------------------------------


def test_queue_modulo_program_maps_each_rx_queue() -> None:
    prog = bpf.check(bpf.queue_modulo(4))
    # queue_mapping is rx queue + 1 (skb_record_rx_queue); the program subtracts the 1
    assert [prog.run(SkbInfo(queue_mapping=q + 1)) for q in range(9)] == [
        0, 1, 2, 3, 0, 1, 2, 3, 0]
    # the bare modulo of queue_mapping, as often written, is off by one
    bare = bpf.check([LD_QUEUE, stmt(BPF_ALU | BPF_MOD | BPF_K, 4), RET_A])
    assert bare.run(SkbInfo(queue_mapping=1)) == 1


def test_alu_jumps_and_ancillary_words() -> None:
    alu = [(BPF_ADD, 5, 15), (BPF_SUB, 12, 0xFFFFFFFE), (BPF_MUL, 3, 30), (BPF_DIV, 3, 3),
           (BPF_MOD, 4, 2), (BPF_OR, 1, 11), (BPF_AND, 6, 2), (BPF_XOR, 3, 9),
           (BPF_LSH, 30, 0x80000000), (BPF_RSH, 2, 2)]
    for op, k, want in alu:
        assert _run([stmt(BPF_LD | BPF_W | BPF_IMM, 10), stmt(BPF_ALU | op | BPF_K, k),
                     RET_A]) == want, hex(op)
        assert _run([stmt(BPF_LDX | BPF_W | BPF_IMM, k), stmt(BPF_LD | BPF_W | BPF_IMM, 10),
                     stmt(BPF_ALU | op | BPF_X, 0), RET_A]) == want, hex(op)
    assert _run([stmt(BPF_LD | BPF_W | BPF_IMM, 5), stmt(BPF_ALU | BPF_NEG), RET_A]) == 2**32 - 5
    # division or modulo by X == 0 ends the program with 0
    for op in (BPF_DIV, BPF_MOD):
        assert _run([stmt(BPF_LD | BPF_W | BPF_IMM, 9), stmt(BPF_ALU | op | BPF_X), RET_A]) == 0
    # conditional jumps with K and X, JA, RET K, TAX/TXA, LEN
    prog = [LD_QUEUE,
            jump(BPF_JMP | BPF_JGT | BPF_K, 4, 0, 1),
            stmt(BPF_RET | BPF_K, 100),
            stmt(BPF_JMP | BPF_JA, 1),
            stmt(BPF_RET | BPF_K, 200),
            jump(BPF_JMP | BPF_JSET | BPF_K, 1, 0, 1),
            stmt(BPF_RET | BPF_K, 300),
            stmt(BPF_MISC | BPF_TAX),
            stmt(BPF_LD | BPF_W | BPF_LEN),
            jump(BPF_JMP | BPF_JGE | BPF_X, 0, 0, 1),
            stmt(BPF_RET | BPF_K, 400),
            stmt(BPF_MISC | BPF_TXA),
            RET_A]
    assert _run(prog, queue_mapping=5) == 100
    assert _run(prog, queue_mapping=3) == 300
    assert _run(prog, queue_mapping=2, length=9) == 400
    assert _run(prog, queue_mapping=2, length=1) == 2
    anc = {SKF_AD_CPU: ("cpu", 3), SKF_AD_IFINDEX: ("ifindex", 7),
           SKF_AD_PROTOCOL: ("protocol", 0x86DD)}
    for off, (field, val) in anc.items():
        assert _run([stmt(BPF_LD | BPF_B | BPF_ABS, SKF_AD_OFF + off), RET_A],
                    **{field: val}) == val
    xor = [stmt(BPF_LDX | BPF_W | BPF_IMM, 6), stmt(BPF_LD | BPF_W | BPF_IMM, 3),
           stmt(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_ALU_XOR_X), RET_A]
    assert _run(xor) == 5


@pytest.mark.parametrize("insns, why", [
    ([], "0 instructions"),
    ([RET_A] * (bpf.BPF_MAXINSNS + 1), "4097 instructions"),
    ([LD_QUEUE], "last instruction"),
    ([stmt(BPF_ALU | BPF_DIV | BPF_K, 0), RET_A], "division by constant 0"),
    ([stmt(BPF_ALU | BPF_MOD | BPF_K, 0), RET_A], "division by constant 0"),
    ([stmt(BPF_ALU | BPF_LSH | BPF_K, 32), RET_A], "shift"),
    ([stmt(BPF_JMP | BPF_JA, 1), RET_A], "past the end"),
    ([jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 0), RET_A], "past the end"),
    ([stmt(0x0E), RET_A], "unknown opcode"),
    ([stmt(BPF_RET | BPF_X), RET_A], "unknown opcode"),
    ([stmt(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + 64), RET_A], "unknown ancillary"),
    # not emulated (Linux accepts these): packet bytes, scratch memory, words we lack
    ([stmt(BPF_LD | BPF_W | BPF_ABS, 0), RET_A], "packet data"),
    ([stmt(BPF_LD | BPF_B | BPF_IND, 0), RET_A], "packet data"),
    ([stmt(BPF_ST, 0), RET_A], "scratch memory"),
    ([stmt(BPF_LD | BPF_W | BPF_MEM, 0), RET_A], "scratch memory"),
    ([stmt(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_RXHASH), RET_A], "not emulated"),
    ([stmt(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_NLATTR), RET_A], "not emulated"),
])
def test_check_refuses_with_einval(insns: list[tuple[int, int, int, int]], why: str) -> None:
    with pytest.raises(Misuse, match=why) as exc:
        bpf.check(insns)
    assert exc.value.errno == errno.EINVAL


# -- groups and selection --------------------------------------------------------------------


def _syn(t: SocketTable, sport: int, queue: int, dport: int = 80, handle: int = 0,
         free: Any = None) -> Listener:
    """A SYN from 10.0.0.2:sport received on ``queue``; the listener its connection joined
    (``free`` gets the handles the TCP layer gives back)."""
    key = flow_key("10.0.0.2", sport, "10.0.0.1", dport)
    rx = SkbInfo(queue_mapping=queue + 1, ifindex=2)
    res = t.ingest_flow(key, np.array([1000], dtype=np.uint32), np.array([0]),
                  np.array([SYN], dtype=np.uint8),
                  np.array([handle or sport], dtype=np.int64), rx)
    if free is not None:
        free(res.freed)
    sock = t.lookup(key)
    assert sock is not None and sock.listener is not None
    return sock.listener


def test_program_picks_the_listener_by_rx_queue_and_falls_back_to_hash() -> None:
    t = SocketTable()
    prog = bpf.check(bpf.queue_modulo(4))
    lsts = [t.listen(80, None, 64, reuseport=True, uid=7, prog=prog if i == 0 else None)
            for i in range(3)]  # 3 members, a program for 4
    assert lsts[0].reuse is lsts[2].reuse and len(lsts[0].reuse or []) == 3
    for q in range(3):
        assert _syn(t, 1000 + q, q) is lsts[q]
    # queue 3: index 3 >= 3 members -> the flow hash, reciprocal_scale(hash, 3)
    key = flow_key("10.0.0.2", 2000, "10.0.0.1", 80)
    assert _syn(t, 2000, 3) is lsts[reciprocal_scale(flow_hash(key), 3)]
    assert (t.stats.reuseport_by_prog, t.stats.reuseport_prog_fallback) == (3, 1)
    # a member leaves: the last takes its index (queue 0 now reaches the old member 2)
    t.close_listener(lsts[0])
    assert (lsts[0].reuse, lsts[1].reuse and lsts[1].reuse.socks) == (None, [lsts[2], lsts[1]])
    assert _syn(t, 3000, 0) is lsts[2] and _syn(t, 3001, 1) is lsts[1]
    assert _syn(t, 3002, 2) in (lsts[1], lsts[2])  # index 2 of 2: hash
    assert t.stats.reuseport_prog_fallback == 2
    for lst in lsts[1:]:
        t.close_listener(lst)
    assert not t._reuse


def test_no_program_spreads_by_hash_and_exact_address_wins() -> None:
    t = SocketTable()
    lsts = [t.listen(80, None, 512, reuseport=True, uid=None) for _ in range(4)]
    got = [_syn(t, 5000 + i, 1) for i in range(200)]
    for i, lst in enumerate(got):
        key = flow_key("10.0.0.2", 5000 + i, "10.0.0.1", 80)
        assert lst is lsts[reciprocal_scale(flow_hash(key), 4)]
    assert {id(x) for x in got} == {id(x) for x in lsts}  # all four used
    assert t.stats.reuseport_by_hash == 200
    exact = t.listen(80, "10.0.0.1", 8)
    assert _syn(t, 9999, 1) is exact


def test_group_membership_rules() -> None:
    t = SocketTable()
    t.listen(80, None, 8, reuseport=True, uid=1)
    with pytest.raises(Misuse) as e1:
        t.listen(80, None, 8, reuseport=True, uid=2)  # another owner
    with pytest.raises(Misuse) as e2:
        t.listen(80, None, 8)  # without SO_REUSEPORT
    assert e1.value.errno == e2.value.errno == errno.EADDRINUSE
    t.listen(81, None, 8)
    with pytest.raises(Misuse):
        t.listen(81, None, 8, reuseport=True, uid=1)
    a, b, c, d, z = (object() for _ in range(5))
    g: ReuseportGroup[object] = ReuseportGroup(None)
    assert [g.add(x) for x in (a, b, c, d)] == [0, 1, 2, 3]
    assert not g.detach(b) and g.socks == [a, d, c] and g.index(c) == 2
    assert not g.detach(c) and g.socks == [a, d]
    assert not g.detach(z) and g.index(z) == -1 and not g.detach(a) and g.detach(d)


# -- the syscalls ------------------------------------------------------------------------------


class _As(Direct):
    """An in-process transport whose connection the OS says belongs to ``uid``."""

    def __init__(self, ctx: KernelContext, peer: bytes, uid: int) -> None:
        super().__init__(ctx, peer)
        self.peer = Peer(peer, PeerCred(os.getpid(), uid, os.getegid()))


@pytest.fixture
def ctx(run_id: str) -> Any:
    skbs = FakeSkbs()
    c = KernelContext.create(run_id, skbs)
    yield c
    for t in c.tasks:
        task_exit(c, t)
    assert skbs.data == {}


def _app(ctx: KernelContext, run_id: str, peer: bytes, uid: int | None = None) -> S.Kernel:
    tr = Direct(ctx, peer) if uid is None else _As(ctx, peer, uid)
    k = S.Kernel(run=run_id, name=peer.decode(), transport=tr)
    k.attach()
    return k


def _errno(fn: Any, *args: Any) -> int:
    with pytest.raises(ControlError) as exc:
        fn(*args)
    return exc.value.errno or 0


def test_setsockopt_reuseport_and_cbpf_through_the_syscalls(ctx: KernelContext,
                                                            run_id: str) -> None:
    w0, w1 = _app(ctx, run_id, b"w0"), _app(ctx, run_id, b"w1")
    other = _app(ctx, run_id, b"other", uid=os.geteuid() + 1)
    try:
        # without SO_REUSEPORT a second bind of the port is refused, as before
        plain = w0.listen_tcp(7000)
        assert _errno(w1.listen_tcp, 7000) == errno.EADDRINUSE
        assert _errno(w0.attach_reuseport_cbpf, plain, bpf.queue_modulo(2)) == errno.EINVAL
        w0.close_fd(plain)
        fds = [w0.listen_tcp(7000, reuseport=True), w1.listen_tcp(7000, reuseport=True)]
        assert _errno(lambda: other.listen_tcp(7000, reuseport=True)) == errno.EADDRINUSE
        assert _errno(w1.setsockopt, fds[1], 1, bpf.SO_DETACH_REUSEPORT_BPF,
                      bytes(4)) == errno.ENOENT
        w1.attach_reuseport_cbpf(fds[1], bpf.queue_modulo(2))  # any member: the group's
        group = ctx.sockets.table._reuse[(None, 7000)]
        assert group.prog is not None and len(group) == 2
        # the program travels in the caller's memory; a bad pointer is -EFAULT
        bad = np.zeros(1, dtype=bpf.sock_fprog)
        bad["len"], bad["filter"] = 2, 0x1000
        assert _errno(w0.setsockopt, fds[0], 1, bpf.SO_ATTACH_REUSEPORT_CBPF,
                      bad.tobytes()) == errno.EFAULT
        assert _errno(w0.setsockopt, fds[0], 1, bpf.SO_ATTACH_REUSEPORT_CBPF,
                      bytes(8)) == errno.EINVAL
        assert _errno(w0.attach_reuseport_cbpf, fds[0],
                      [stmt(BPF_ALU | BPF_DIV | BPF_K, 0), RET_A]) == errno.EINVAL
        assert _errno(w0.setsockopt, fds[0], 1, bpf.SO_REUSEPORT, b"\x01") == errno.EINVAL
        assert _errno(w0.setsockopt, fds[0], 6, 1, bytes(4)) == errno.ENOPROTOOPT
        # SYNs on queues 0..3 reach w0, w1, w0, w1 (queue % 2 = listen order)
        for q in range(4):
            skbs = ctx.sockets.skbs
            assert isinstance(skbs, FakeSkbs)
            lst = _syn(ctx.sockets.table, 100 + q, q, dport=7000, handle=skbs.add(b""),
                       free=ctx.sockets.free)
            sf = ctx.sockets.file_of_listener(lst)
            owner = ctx.tasks.by_tid(w0.task if q % 2 == 0 else w1.task)
            assert sf is owner.files[fds[q % 2]]
        w1.setsockopt(fds[1], 1, bpf.SO_DETACH_REUSEPORT_BPF, bytes(4))
        assert group.prog is None
    finally:
        for k in (w0, w1, other):
            k.close()

