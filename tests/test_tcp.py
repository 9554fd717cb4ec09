"""Receive-side TCP (driver_proc/tcp.py): reassembly by reference, socket table, handle release.

No process and no shared memory: segments are described by (seq, len, flags, handle) and each
handle maps to the bytes of its payload in a plain dict, as the driver maps it to skb buffers.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import random
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driver_proc.tcp import (
    ACK,
    FIN,
    RST,
    SYN,
    Pieces,
    RxQueue,
    SocketTable,
    TcpReceiver,
    TcpState,
    flow_key,
    flow_keys,
    group_by_flow,
    ip_bytes,
    split_flow_key,
)
from shared.errors import Misuse

M32 = (1 << 32) - 1


class Flow:
    """A sender: a byte stream, its ISN, and the payload bytes of every handle it made."""

    def __init__(self, data: bytes, isn: int, first_handle: int = 1) -> None:
        self.data = data
        self.isn = isn
        self.payload: dict[int, bytes] = {}
        self.next_handle = first_handle

    def seg(self, off: int, length: int, flags: int = ACK) -> tuple[int, int, int, int]:
        """Segment carrying stream bytes [off, off+length): (seq, len, flags, handle)."""
        h = self.next_handle
        self.next_handle += 1
        self.payload[h] = self.data[off:off + length]
        return ((self.isn + 1 + off) & M32, length, flags, h)

    def syn(self, length: int = 0, flags: int = SYN) -> tuple[int, int, int, int]:
        """The SYN (optionally with data from stream offset 0)."""
        h = self.next_handle
        self.next_handle += 1
        self.payload[h] = self.data[:length]
        return (self.isn, length, flags, h)

    def resolve(self, p: Pieces) -> bytes:
        """The stream bytes a list of pieces references."""
        return b"".join(self.payload[h][o:o + n]
                        for h, o, n in zip(p.handles.tolist(), p.offsets.tolist(),
                                           p.lengths.tolist(), strict=True))


def arrays(segs: list[tuple[int, int, int, int]]) -> tuple[np.ndarray, ...]:
    a = np.array(segs, dtype=np.int64).reshape(-1, 4)
    return (a[:, 0].astype(np.uint32), a[:, 1], a[:, 2].astype(np.uint8), a[:, 3])


def feed(r: TcpReceiver, segs: list[tuple[int, int, int, int]]) -> list[int]:
    """Ingest segments; return the handles freed now."""
    res = r.ingest(*arrays(segs))
    return res.freed.tolist()


def read(r: TcpReceiver, f: Flow, nbytes: int | None = None) -> tuple[bytes, list[int]]:
    """Peek and consume up to nbytes; return (bytes, released handles)."""
    p = r.rxq.peek(nbytes)
    got = f.resolve(p)
    assert len(got) == p.nbytes
    return got, r.rxq.consume(p.nbytes).tolist()


def established(isn: int = 1000, data: bytes = bytes(range(256)) * 64,
                ooo_limit: int = 1024, rcv_wnd: int = 1 << 30) -> tuple[TcpReceiver, Flow]:
    """A receiver just created by its SYN, and the matching sender."""
    return TcpReceiver(isn, ooo_limit=ooo_limit, rcv_wnd=rcv_wnd), Flow(data, isn)


# ---------------------------------------------------------------------------------------------
# In-order delivery and the receive queue
# ---------------------------------------------------------------------------------------------

def test_in_order_batch_takes_fast_path() -> None:
    r, f = established()
    segs = [f.seg(i * 100, 100) for i in range(64)]
    res = r.ingest(*arrays(segs))
    assert r.stats.fast_batches == 1 and r.stats.slow_batches == 0
    assert r.state is TcpState.ESTABLISHED
    assert res.freed.size == 0
    assert res.pieces.handles.tolist() == [s[3] for s in segs]
    assert res.pieces.offsets.tolist() == [0] * 64
    assert r.rxq.nbytes == 6400 and r.rcv_nxt == 1001 + 6400
    got, released = read(r, f)
    assert got == f.data[:6400]
    assert released == [s[3] for s in segs]
    # a second in-order batch is fast too; a pure ACK in it is freed, not queued
    segs2 = [f.seg(6400, 10), f.seg(6410, 0), f.seg(6410, 5)]
    res = r.ingest(*arrays(segs2))
    assert r.stats.fast_batches == 2
    assert res.freed.tolist() == [segs2[1][3]]
    assert read(r, f)[0] == f.data[6400:6415]


def test_batch_with_flags_or_gap_goes_slow_and_is_still_right() -> None:
    r, f = established()
    feed(r, [f.seg(0, 10), f.seg(10, 10, ACK | FIN)])
    assert r.stats.slow_batches == 1 and r.fin_reached
    assert read(r, f)[0] == f.data[:20]


def test_partially_consumed_piece_is_not_released() -> None:
    r, f = established()
    a, b = f.seg(0, 100), f.seg(100, 50)
    feed(r, [a, b])
    got, released = read(r, f, 30)
    assert got == f.data[:30] and released == []
    p = r.rxq.peek()
    assert p.handles.tolist() == [a[3], b[3]]
    assert p.offsets.tolist() == [30, 0] and p.lengths.tolist() == [70, 50]
    got, released = read(r, f, 100)   # crosses into b
    assert got == f.data[30:130] and released == [a[3]]
    got, released = read(r, f)
    assert got == f.data[130:150] and released == [b[3]]
    assert r.rxq.nbytes == 0 and len(r.rxq) == 0


def test_rx_queue_grows_compacts_and_checks_bounds() -> None:
    q = RxQueue(capacity=4)
    total = 0
    nxt = 0
    for round_ in range(50):
        n = 1 + round_ % 7
        hs = np.arange(nxt, nxt + n, dtype=np.int64)
        nxt += n
        q.append(Pieces(hs, np.zeros(n, np.int64), np.full(n, 3, np.int64)))
        total += 3 * n
        q.consume(min(q.nbytes, 5 + round_ % 11))
    rest = q.nbytes
    assert q.bytes_consumed + rest == total
    assert q.peek(4).nbytes == min(4, rest)
    with pytest.raises(Misuse):
        q.consume(rest + 1)
    with pytest.raises(Misuse):
        q.peek(-1)
    released = q.consume(rest)
    assert released[-1] == nxt - 1 and q.nbytes == 0
    assert q.peek().npieces == 0


# ---------------------------------------------------------------------------------------------
# Out of order, duplicates, overlaps
# ---------------------------------------------------------------------------------------------

def test_out_of_order_held_then_gap_filled() -> None:
    r, f = established()
    s0, s1, s2, s3 = (f.seg(i * 10, 10) for i in range(4))
    assert feed(r, [s0, s2, s3]) == []
    assert r.ooo_count == 2 and r.stats.ooo_segs == 2
    assert read(r, f)[0] == f.data[:10]
    res = r.ingest(*arrays([s1]))
    assert res.pieces.handles.tolist() == [s1[3], s2[3], s3[3]]
    assert r.ooo_count == 0
    got, released = read(r, f)
    assert got == f.data[10:40] and released == [s1[3], s2[3], s3[3]]


def test_fast_path_drains_out_of_order_queue() -> None:
    r, f = established()
    held = f.seg(25, 20)           # overlaps the in-order batch's tail
    assert feed(r, [held]) == []
    res = r.ingest(*arrays([f.seg(0, 10), f.seg(10, 20)]))  # in order from rcv_nxt
    assert r.stats.fast_batches == 1
    assert res.pieces.handles[-1] == held[3] and res.pieces.offsets[-1] == 5
    assert r.stats.overlap_trimmed_bytes == 5
    assert read(r, f)[0] == f.data[:45]


def test_whole_and_partial_duplicates() -> None:
    r, f = established()
    feed(r, [f.seg(0, 100)])
    whole = f.seg(20, 30)
    partial = f.seg(90, 30)
    freed = feed(r, [whole, partial])
    assert freed == [whole[3]]
    assert r.stats.dup_segs == 1 and r.stats.dup_bytes == 30
    assert r.stats.overlap_trimmed_bytes == 10
    p = r.rxq.peek()
    assert p.handles.tolist()[-1] == partial[3] and p.offsets.tolist()[-1] == 10
    assert read(r, f)[0] == f.data[:120]
    # a retransmission of everything is a whole duplicate
    again = f.seg(0, 120)
    assert feed(r, [again]) == [again[3]]


def test_overlaps_inside_the_out_of_order_queue() -> None:
    r, f = established()
    a = f.seg(100, 20)   # [100, 120)
    b = f.seg(140, 20)   # [140, 160)
    assert feed(r, [a, b]) == []
    inside = f.seg(105, 10)            # inside a: duplicate
    assert feed(r, [inside]) == [inside[3]]
    bridge = f.seg(110, 40)            # [110, 150): head trimmed to 120, tail to 140
    assert feed(r, [bridge]) == []
    assert r.stats.overlap_trimmed_bytes == 20
    cover = f.seg(90, 80)              # [90, 170) covers a, bridge and b: they are dropped
    assert sorted(feed(r, [cover])) == sorted([a[3], bridge[3], b[3]])
    assert r.ooo_count == 1
    adjacent = f.seg(90, 5)            # starts where cover starts: duplicate
    assert feed(r, [adjacent]) == [adjacent[3]]
    fill = f.seg(0, 95)                # in order; cover's head trimmed by 5 when drained
    res = r.ingest(*arrays([fill]))
    assert res.pieces.handles.tolist() == [fill[3], cover[3]]
    assert res.pieces.offsets.tolist() == [0, 5]
    got, released = read(r, f)
    assert got == f.data[:170] and released == [fill[3], cover[3]]


def test_ooo_queue_is_bounded_and_drops_the_farthest() -> None:
    r, f = established(ooo_limit=2)
    a, b, c = f.seg(100, 10), f.seg(200, 10), f.seg(300, 10)
    assert feed(r, [a, b]) == []
    assert feed(r, [c]) == [c[3]]            # farthest: dropped itself
    near = f.seg(50, 10)
    assert feed(r, [near]) == [b[3]]         # nearer: evicts the farthest held range
    assert r.stats.ooo_dropped == 2 and r.ooo_count == 2
    feed(r, [f.seg(0, 50), f.seg(60, 40)])
    assert read(r, f)[0] == f.data[:110]


def test_stream_crosses_sequence_wrap() -> None:
    isn = (1 << 32) - 150
    r, f = established(isn=isn)
    segs = [f.seg(i * 50, 50) for i in range(8)]  # seq wraps inside segment 2
    order = [0, 5, 3, 1, 7, 2, 6, 4]
    for i in order:
        feed(r, [segs[i]])
    got, released = read(r, f)
    assert got == f.data[:400]
    assert sorted(released) == sorted(s[3] for s in segs)
    assert r.rcv_nxt == (isn + 1 + 400) & M32
    # a batch fully in order across the wrap uses the fast path
    r2, f2 = established(isn=isn)
    r2.ingest(*arrays([f2.seg(i * 50, 50) for i in range(8)]))
    assert r2.stats.fast_batches == 1 and read(r2, f2)[0] == f2.data[:400]


def test_bad_sequence_and_lengths_are_dropped() -> None:
    r, f = established(rcv_wnd=1 << 20)
    far = f.seg(1 << 20, 10)
    neg = (f.seg(0, 0)[0], -5, ACK, 999)
    assert sorted(feed(r, [far, neg])) == sorted([far[3], 999])
    assert r.stats.bad_seq == 1 and r.stats.bad_len == 1
    noack = f.seg(0, 10, flags=0)
    assert feed(r, [noack]) == [noack[3]] and r.stats.no_ack == 1
    assert r.rxq.nbytes == 0


# ---------------------------------------------------------------------------------------------
# SYN, FIN, RST
# ---------------------------------------------------------------------------------------------

def test_syn_with_data_is_accepted_and_bad_syn_dropped() -> None:
    r, f = established()
    syn = f.syn(5)
    assert feed(r, [syn]) == []
    assert r.state is TcpState.SYN_RECV              # a SYN carries no ACK
    assert r.rxq.peek().offsets.tolist() == [0]      # payload byte 0 is at isn + 1
    feed(r, [f.seg(5, 5)])
    assert r.state is TcpState.ESTABLISHED
    again = f.syn(5)                                  # retransmitted SYN: duplicate data
    bogus = ((f.isn + 7) & M32, 0, SYN, 777)
    assert sorted(feed(r, [again, bogus])) == sorted([again[3], 777])
    assert r.stats.dup_segs == 1 and r.stats.bad_syn == 1
    assert read(r, f)[0] == f.data[:10]


def test_fin_before_missing_data_means_eof_only_after_the_gap_fills() -> None:
    r, f = established()
    a, b, c = f.seg(0, 10), f.seg(10, 10), f.seg(20, 10, ACK | FIN)
    feed(r, [a, c])
    assert r.fin_seq == (f.isn + 1 + 30) & M32
    assert not r.fin_reached and r.state is TcpState.ESTABLISHED
    assert read(r, f)[0] == f.data[:10]
    assert r.end_status() is None and not r.at_eof      # must wait: the gap is open
    feed(r, [b])
    assert r.fin_reached and r.state is TcpState.CLOSE_WAIT
    assert r.rcv_nxt == (f.isn + 1 + 31) & M32          # FIN took one sequence number
    assert not r.at_eof                                 # data still queued
    assert read(r, f)[0] == f.data[10:30]
    assert r.at_eof and r.end_status() == 0
    dup_fin = f.seg(30, 0, ACK | FIN)
    assert feed(r, [dup_fin]) == [dup_fin[3]] and r.stats.bad_fin == 0


def test_data_after_fin_is_dropped() -> None:
    r, f = established()
    held = f.seg(30, 10)                       # out of order, beyond the FIN to come
    straddle = f.seg(15, 10)                   # partly beyond it
    feed(r, [held, straddle])
    fin = f.seg(20, 0, ACK | FIN)              # bare FIN after byte 19: trims held data
    assert sorted(feed(r, [fin])) == sorted([held[3], fin[3]])
    assert r.stats.data_after_fin == 10 + 5 and not r.fin_reached
    head = f.seg(0, 15)
    feed(r, [head])
    assert r.fin_reached
    got, released = read(r, f)
    assert got == f.data[:20] and released == [head[3], straddle[3]]
    late = f.seg(20, 10)
    assert feed(r, [late]) == [late[3]] and r.stats.data_after_fin == 25
    other_fin = f.seg(40, 0, ACK | FIN)
    feed(r, [other_fin])
    assert r.stats.bad_fin == 1 and r.end_status() == 0


def test_rst_mid_stream() -> None:
    r, f = established()
    a, hole_after = f.seg(0, 10), f.seg(20, 10)
    feed(r, [a, hole_after])
    out_of_window = ((f.isn + 1 + (1 << 31) - 1) & M32, 0, RST, 500)
    assert feed(r, [out_of_window]) == [500] and r.stats.bad_rst == 1
    rst = (r.rcv_nxt, 0, RST | ACK, 501)
    after = f.seg(10, 10)
    freed = feed(r, [rst, after])
    assert sorted(freed) == sorted([501, hole_after[3], after[3]])   # OOO data purged
    assert r.state is TcpState.CLOSED and r.stats.resets == 1 and r.stats.after_close == 1
    got, released = read(r, f)                  # queued in-order data is still readable
    assert got == f.data[:10] and released == [a[3]]
    assert r.end_status() == -errno.ECONNRESET
    assert r.take_error() == errno.ECONNRESET
    assert r.end_status() == 0                   # reported once, then shut down
    assert r.close().size == 0


def test_rst_after_fin_keeps_eof() -> None:
    r, f = established()
    feed(r, [f.seg(0, 10, ACK | FIN)])
    feed(r, [(r.rcv_nxt, 0, RST, 42)])
    assert r.state is TcpState.CLOSED and r.end_status() == 0


def test_close_returns_every_held_handle() -> None:
    r, f = established()
    a, b = f.seg(0, 10), f.seg(50, 10)
    feed(r, [a, b])
    read(r, f, 4)
    assert sorted(r.held_handles().tolist()) == [a[3], b[3]]
    assert sorted(r.close().tolist()) == [a[3], b[3]]
    assert r.end_status() == -errno.ENOTCONN
    late = f.seg(10, 10)
    assert feed(r, [late]) == [late[3]] and r.stats.after_close == 1


def test_bad_arguments() -> None:
    with pytest.raises(Misuse):
        TcpReceiver(1 << 32)
    with pytest.raises(Misuse):
        TcpReceiver(0, ooo_limit=0)
    r = TcpReceiver(0)
    with pytest.raises(Misuse):
        r.ingest([1, 2], [1], [ACK], [1])
    assert r.ingest([], [], [], []).freed.size == 0


# ---------------------------------------------------------------------------------------------
# Socket table
# ---------------------------------------------------------------------------------------------

PEER = "10.0.0.2"
LOCAL = "10.0.0.1"


def key(sport: int, dport: int = 80, saddr: str = PEER, daddr: str = LOCAL) -> bytes:
    return flow_key(saddr, sport, daddr, dport)


def table_feed(t: SocketTable, k: bytes, segs: list[tuple[int, int, int, int]]) -> list[int]:
    return t.ingest_flow(k, *arrays(segs)).freed.tolist()


def test_flow_keys_and_addresses() -> None:
    assert ip_bytes("1.2.3.4") == ip_bytes(b"\x01\x02\x03\x04") == ip_bytes(0x01020304)
    assert ip_bytes("1.2.3.4") == ipaddress.IPv6Address("::ffff:1.2.3.4").packed
    k = flow_key("1.2.3.4", 5, "2001:db8::1", 6)
    assert len(k) == 36
    assert split_flow_key(k) == (ipaddress.IPv4Address("1.2.3.4"), 5,
                                 ipaddress.IPv6Address("2001:db8::1"), 6)
    v4 = np.array([[10, 0, 0, 2], [10, 0, 0, 3]], dtype=np.uint8)
    dst = np.array([[10, 0, 0, 1]] * 2, dtype=np.uint8)
    ks = flow_keys(v4, [1000, 1001], dst, [80, 80])
    assert ks[0].tobytes() == key(1000) and ks[1].tobytes() == flow_key("10.0.0.3", 1001,
                                                                        LOCAL, 80)
    with pytest.raises(Misuse):
        ip_bytes("not an address")
    with pytest.raises(Misuse):
        flow_key(PEER, 70000, LOCAL, 80)


def test_group_by_flow_is_stable() -> None:
    keys = np.array([3, 1, 3, 2, 1, 3])
    order, bounds = group_by_flow(keys)
    groups = [order[bounds[g]:bounds[g + 1]].tolist() for g in range(len(bounds) - 1)]
    assert groups == [[1, 4], [3], [0, 2, 5]]
    order, bounds = group_by_flow(np.array([7, 7, 7]))
    assert order.tolist() == [0, 1, 2] and bounds.tolist() == [0, 3]
    order, bounds = group_by_flow(np.array([], dtype=np.int64))
    assert order.size == 0 and bounds.tolist() == [0]


def test_listen_syn_establish_accept() -> None:
    t = SocketTable()
    lst = t.listen(80)
    f = Flow(bytes(range(200)), isn=5)
    k = key(1000)
    assert table_feed(t, k, [f.syn()]) == [f.next_handle - 1]  # bare SYN: nothing to keep
    sock = t.lookup(k)
    assert sock is not None and sock.state is TcpState.SYN_RECV
    assert lst.pending_len == 1 and lst.accept() is None
    res = t.ingest_flow(k, *arrays([f.seg(0, 50)]))
    assert res.listeners == [lst] and res.sockets == [sock]
    assert lst.accept() is sock and lst.accept_queue_len == 0
    assert read(sock, f)[0] == f.data[:50]
    assert t.stats.connections == 1


def test_exact_listener_beats_wildcard_and_port_in_use() -> None:
    t = SocketTable()
    wild = t.listen(80)
    exact = t.listen(80, LOCAL)
    with pytest.raises(Misuse) as exc:
        t.listen(80, "0.0.0.0")
    assert exc.value.errno == errno.EADDRINUSE
    assert t.find_listener(key(1)) is exact
    assert t.find_listener(key(1, daddr="10.9.9.9")) is wild
    assert t.find_listener(flow_key("2001:db8::2", 1, "2001:db8::1", 80)) is wild
    assert t.find_listener(key(1, dport=81)) is None


def test_syn_to_no_listener_and_segment_for_no_socket() -> None:
    t = SocketTable()
    f = Flow(bytes(100), isn=0)
    segs = [f.syn(), f.seg(0, 10), f.seg(10, 10)]
    assert table_feed(t, key(1), segs) == [s[3] for s in segs]
    assert t.stats.no_socket == 3 and len(t) == 0
    t.listen(80)
    stray = f.seg(20, 10)                                  # no SYN: no socket
    assert table_feed(t, key(1), [stray]) == [stray[3]]
    assert t.stats.no_socket == 4
    synack = f.syn(flags=SYN | ACK)
    assert table_feed(t, key(1), [synack]) == [synack[3]] and t.stats.bad_syn == 1


def test_syn_to_full_backlog_is_dropped() -> None:
    t = SocketTable()
    lst = t.listen(80, backlog=2)
    flows = [Flow(bytes(100), isn=i * 1000) for i in range(3)]
    table_feed(t, key(1), [flows[0].syn(), flows[0].seg(0, 10)])   # established, not accepted
    table_feed(t, key(2), [flows[1].syn()])                         # pending
    syn3, data3 = flows[2].syn(), flows[2].seg(0, 10)
    assert table_feed(t, key(3), [syn3, data3]) == [syn3[3], data3[3]]
    assert t.stats.listen_overflow == 1 and t.stats.no_socket == 1
    assert t.lookup(key(3)) is None
    assert lst.accept() is not None                                 # frees a slot
    table_feed(t, key(3), [flows[2].syn(), flows[2].seg(0, 10)])
    assert t.lookup(key(3)) is not None and lst.accept_queue_len == 1


def test_rst_before_handshake_and_after_accept() -> None:
    t = SocketTable()
    lst = t.listen(80)
    f = Flow(bytes(range(100)), isn=77)
    syn = f.syn(10)                                          # SYN with data, no ACK yet
    rst = ((f.isn + 11) & M32, 0, RST, 9999)
    assert sorted(table_feed(t, key(1), [syn, rst])) == sorted([syn[3], 9999])
    assert t.lookup(key(1)) is None and lst.pending_len == 0
    # a new connection on the same 4-tuple, reset after being accepted
    g = Flow(bytes(range(100)), isn=500, first_handle=100)
    table_feed(t, key(1), [g.syn(), g.seg(0, 10)])
    sock = lst.accept()
    assert sock is not None
    table_feed(t, key(1), [((g.isn + 11) & M32, 0, RST, 8888)])
    assert t.lookup(key(1)) is None and sock.state is TcpState.CLOSED
    assert read(sock, g)[0] == g.data[:10]
    assert sock.end_status() == -errno.ECONNRESET
    assert t.close(sock).size == 0


def test_close_and_close_listener_return_handles() -> None:
    t = SocketTable()
    lst = t.listen(80)
    f1, f2 = Flow(bytes(50), isn=1), Flow(bytes(50), isn=2, first_handle=100)
    table_feed(t, key(1), [f1.syn(), f1.seg(0, 10)])
    table_feed(t, key(2), [f2.syn(), f2.seg(20, 10)])        # pending, data held out of order
    s1 = t.lookup(key(1))
    assert s1 is not None
    assert sorted(t.close_listener(lst).tolist()) == [2, 101]
    assert len(t) == 0 and lst.closed
    assert table_feed(t, key(1), [f1.seg(10, 10)]) == [3]    # now for no socket
    assert s1.end_status() == -errno.ENOTCONN


def test_ingest_batch_of_interleaved_flows() -> None:
    t = SocketTable()
    t.listen(80)
    flows = [Flow(bytes(random.Random(i).randbytes(3000)), isn=i * 7919, first_handle=i * 10_000)
             for i in range(3)]
    segs: list[tuple[int, tuple[int, int, int, int]]] = []
    for i, f in enumerate(flows):
        segs.append((i, f.syn()))
        segs.extend((i, f.seg(o, 100)) for o in range(0, 3000, 100))
    rng = random.Random(1)
    # interleave flows but keep each flow's order, then feed in batches of 16
    queues = [[s for s in segs if s[0] == i] for i in range(3)]
    mixed = []
    while any(queues):
        q = rng.choice([q for q in queues if q])
        mixed.append(q.pop(0))
    ks = flow_keys(np.array([[10, 0, 0, 2 + i] for i, _ in mixed], dtype=np.uint8),
                   np.full(len(mixed), 1234), np.array([[10, 0, 0, 1]] * len(mixed), np.uint8),
                   np.full(len(mixed), 80))
    for b in range(0, len(mixed), 16):
        part = mixed[b:b + 16]
        res = t.ingest_batch(ks[b:b + 16], *arrays([s for _, s in part]))
        assert len(res.sockets) == len({i for i, _ in part})
    for i, f in enumerate(flows):
        sock = t.lookup(flow_key(f"10.0.0.{2 + i}", 1234, LOCAL, 80))
        assert sock is not None and sock.stats.slow_batches <= 2
        assert read(sock, f)[0] == f.data


# ---------------------------------------------------------------------------------------------
# Property: any reordering / duplication / re-segmentation reproduces the stream
# ---------------------------------------------------------------------------------------------

@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Flow, list[tuple[int, int, int, int]], list[int],
                                        list[int]]:
    n = draw(st.integers(0, 2000))
    rnd = random.Random(draw(st.integers(0, 2**32)))
    isn = draw(st.one_of(st.integers(0, M32), st.integers((1 << 32) - 2500, M32)))
    f = Flow(rnd.randbytes(n), isn)
    cuts = sorted({c for c in draw(st.lists(st.integers(1, 2000), max_size=40)) if c < n})
    bounds = [0, *cuts, n]
    # the original segmentation; the last one carries the FIN (a bare FIN if n == 0)
    segs = [f.seg(a, b - a, ACK | FIN if b == n else ACK)
            for a, b in itertools.pairwise(bounds)]
    # overlapping re-segmentations and pure ACKs (retransmissions cut differently)
    for a, ln in draw(st.lists(st.tuples(st.integers(0, n), st.integers(0, 300)), max_size=25)):
        b = min(n, a + ln)
        segs.append(f.seg(a, b - a, ACK | FIN if b == n else ACK))
    # exact duplicates
    for i in draw(st.lists(st.integers(0, len(segs) - 1), max_size=10)):
        s = segs[i]
        off = (s[0] - isn - 1) & M32
        segs.append(f.seg(off, s[1], s[2]))
    if draw(st.booleans()):
        order = draw(st.permutations(range(len(segs))))
    else:  # mostly in order (fast path batches mixed with a few displaced segments)
        order = sorted(range(len(segs)), key=lambda i: (segs[i][0] - isn) & M32)
        for i, j in draw(st.lists(st.tuples(st.integers(0, len(segs) - 1),
                                            st.integers(0, len(segs) - 1)), max_size=3)):
            order[i], order[j] = order[j], order[i]
    batches = draw(st.lists(st.integers(1, 20), min_size=1, max_size=30))
    reads = draw(st.lists(st.integers(0, 500), min_size=1, max_size=30))
    return f, [segs[i] for i in order], batches, reads


def _run(f: Flow, segs: list[tuple[int, int, int, int]], batches: list[int], reads: list[int],
         ooo_limit: int) -> tuple[TcpReceiver, bytes, list[int]]:
    r = TcpReceiver(f.isn, ooo_limit=ooo_limit)
    out = bytearray()
    released: list[int] = []
    pos = 0
    step = 0
    while pos < len(segs):
        size = batches[step % len(batches)]
        res = r.ingest(*arrays(segs[pos:pos + size]))
        pos += size
        released += res.freed.tolist()
        got, rel = read(r, f, reads[step % len(reads)])
        out += got
        released += rel
        step += 1
        assert bytes(out) == f.data[:len(out)]           # always a prefix of the stream
        assert not set(r.held_handles().tolist()) & set(released)
    got, rel = read(r, f)
    return r, bytes(out + got), released + rel


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_reorder_dup_resegment_reproduces_stream(
        sc: tuple[Flow, list[tuple[int, int, int, int]], list[int], list[int]]) -> None:
    f, segs, batches, reads = sc
    r, out, released = _run(f, segs, batches, reads, ooo_limit=len(segs) + 1)
    assert out == f.data
    assert r.fin_reached and r.at_eof and r.end_status() == 0
    assert r.ooo_count == 0 and r.rxq.nbytes == 0
    assert Counter(released) == Counter(s[3] for s in segs)   # each handle exactly once
    assert r.close().size == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.integers(1, 4))
def test_small_ooo_queue_still_delivers_a_prefix_and_releases_all(
        sc: tuple[Flow, list[tuple[int, int, int, int]], list[int], list[int]],
        limit: int) -> None:
    f, segs, batches, reads = sc
    r, out, released = _run(f, segs, batches, reads, ooo_limit=limit)
    assert out == f.data[:len(out)]
    assert r.ooo_count <= limit
    released += r.close().tolist()
    assert Counter(released) == Counter(s[3] for s in segs)
    if out != f.data:
        assert r.stats.ooo_dropped > 0 and not r.fin_reached


def test_fin_behind_delivered_data_is_bad() -> None:
    r, f = established()
    feed(r, [f.seg(0, 20)])
    early_fin = f.seg(0, 10, ACK | FIN)      # would end the stream before bytes we delivered
    assert feed(r, [early_fin]) == [early_fin[3]]
    assert r.stats.bad_fin == 1 and r.fin_seq is None and not r.fin_reached


def test_ipv6_single_flow_batch_and_introspection() -> None:
    t = SocketTable()
    lst = t.listen(443, "2001:db8::1")
    f = Flow(bytes(range(256)) * 4, isn=0xFFFFFF00)
    segs = [f.syn(), *(f.seg(o, 128) for o in range(0, 1024, 128))]
    n = len(segs)
    src = np.tile(np.frombuffer(ip_bytes("2001:db8::2"), np.uint8), (n, 1))
    dst = np.tile(np.frombuffer(ip_bytes("2001:db8::1"), np.uint8), (n, 1))
    ks = flow_keys(src, np.full(n, 40000), dst, np.full(n, 443))
    res = t.ingest_batch(ks, *arrays(segs))
    assert res.listeners == [lst] and res.freed.tolist() == [segs[0][3]]
    sock = lst.accept()
    assert sock is not None and read(sock, f)[0] == f.data
    assert "ESTABLISHED" in repr(sock) and "2001:db8::1" in repr(lst)
    assert sock.stats.as_dict()["bytes_delivered"] == 1024
    assert t.stats.as_dict()["connections"] == 1
    with pytest.raises(Misuse):
        t.ingest_batch(np.zeros(n, np.int64), *arrays(segs))   # not V36 flow keys
