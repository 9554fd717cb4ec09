"""TCP's write side (driver_proc.tcp_output: data an app sends), in memory, frames by dpkt.

The host of tests/test_tcp_output.py (a SocketTable, a TcpOutput with a fake clock) gets
bytes to send as IORING_OP_SEND would queue them; the peer's ACKs reach the write side as
the kernel hands them over (:meth:`TcpOutput.on_acks`, per batch).  Checked: segments of at
most the peer's MSS within its window, an ACK frees the queue, the retransmission timer
resends the first unacknowledged segment with backoff and gives up with ETIMEDOUT, a FIN
follows the queued data on close, a zero window is probed, and a send after the peer's RST
reports ECONNRESET once, then EPIPE.
"""

from __future__ import annotations

import errno
from typing import Any

import dpkt
import numpy as np
import pytest

from app_proc import liburing as L
from driver_proc.net import MSG_DONTWAIT, MSG_WAITALL
from driver_proc.tcp import ACK, FIN, RST, TcpState
from driver_proc.tcp_output import (
    DEFAULT_SNDBUF,
    INIT_CWND,
    RTO_INIT_S,
    RTO_MIN_S,
    SEND_RETRIES,
)
from tests.test_io_uring import Sender, app, ctx, reap, skbs  # noqa: F401  (fixtures)
from tests.test_tcp_output import PEER_ISN, PEER_MAC, Host, tcp_of

WIN_SCALE = 7  # the peer's shift (syn_opts offers 7)


def established(v6: bool = False) -> tuple[Host, int]:
    """A host with one established connection; returns it and our first data seq."""
    h = Host(v6=v6)
    sa = h.handshake()
    return h, (sa.seq + 1) & 0xFFFFFFFF


def ack(h: Host, n: int, win: int = 0xFFFF, flags: int = ACK) -> None:
    """The peer acknowledges sequence number ``n`` with window field ``win`` (scaled by its
    shift), as a pure ACK: ingest, then the write side sees its ACK number and window."""
    sock = h.sock
    assert sock is not None
    h.seg(sock.rcv_nxt, 0, flags)
    if sock in h.out.senders:
        h.out.on_acks(sock, np.array([n], np.uint32), np.array([win], np.uint16))


def payload_frames(h: Host) -> list[dpkt.tcp.TCP]:
    return [f for f in h.frames() if f.data or f.flags & dpkt.tcp.TH_FIN]


def mss(h: Host) -> int:
    return 1440 if h.v6 else 1460


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_segments_of_the_peer_mss_and_an_ack_frees_the_queue(v6: bool) -> None:
    h, iss1 = established(v6)
    sock = h.sock
    assert sock is not None
    m = mss(h)
    data = bytes(range(256)) * 20  # 5120 bytes: 3 full segments + a short one (v4)
    assert h.out.send_space(sock) == DEFAULT_SNDBUF
    h.out.send(sock, data)
    segs = payload_frames(h)
    assert b"".join(bytes(s.data) for s in segs) == data
    assert [s.seq for s in segs] == [iss1 + i * m for i in range(len(segs))]
    assert all(len(s.data) <= m for s in segs)
    assert all(s.ack == PEER_ISN + 1 and s.flags & dpkt.tcp.TH_ACK for s in segs)
    assert segs[-1].flags & dpkt.tcp.TH_PUSH and not segs[0].flags & dpkt.tcp.TH_PUSH
    assert h.out.send_space(sock) == DEFAULT_SNDBUF - len(data)
    assert h.out.mib["TcpOutSegs"] >= len(segs)
    ack(h, iss1 + 2 * m)
    assert h.out.send_space(sock) == DEFAULT_SNDBUF - (len(data) - 2 * m)
    assert h.out.take_wakes() == [sock]  # a blocked send may go on
    ack(h, iss1 + len(data))
    assert h.out.send_space(sock) == DEFAULT_SNDBUF
    h.clock.t += 10 * RTO_INIT_S
    h.out.tick()
    assert h.frames() == [] and h.out.mib["TcpRetransSegs"] == 0
    # a pure ACK from us now carries snd_nxt past the data
    h.data(0, 10)
    h.clock.t += 1
    h.out.tick()
    (a,) = h.frames()
    assert a.seq == iss1 + len(data) and not a.data


def test_the_peer_window_and_the_congestion_window_limit_what_is_sent() -> None:
    h, iss1 = established()
    sock = h.sock
    assert sock is not None
    m = mss(h)
    h.out.send(sock, b"x")  # makes the write side; the SYN's window (65535) applies
    ack(h, iss1 + 1, win=(3 * m) >> WIN_SCALE)  # scaled by the peer's shift
    limit = ((3 * m) >> WIN_SCALE) << WIN_SCALE
    h.frames()
    h.out.send(sock, bytes(20 * m))
    segs = payload_frames(h)
    assert sum(len(s.data) for s in segs) == limit  # no byte past the window
    ack(h, iss1 + 1 + limit, win=0xFFFF)  # window opens wide: the congestion window rules
    segs = payload_frames(h)
    sent = sum(len(s.data) for s in segs)
    assert 0 < sent <= (INIT_CWND + 8) * m and sent < 20 * m - limit
    assert max(len(s.data) for s in segs) == m


def test_rto_retransmits_the_first_unacked_segment_with_backoff() -> None:
    h, iss1 = established()
    sock = h.sock
    assert sock is not None
    m = mss(h)
    h.out.send(sock, bytes(range(200)) * 30)  # 6000 bytes
    first = payload_frames(h)
    assert len(first) == 5
    h.clock.t += 0.1
    ack(h, iss1 + m)  # the first segment arrived after 100 ms, the rest was lost
    snd = h.out.conns[sock].snd
    assert snd is not None
    rto = snd.rto  # one RTT sample: srtt + 4 rttvar = 300 ms (RFC 6298)
    assert rto == pytest.approx(0.3) and rto >= RTO_MIN_S
    h.clock.t += rto / 2
    h.out.tick()
    assert h.frames() == []
    h.clock.t += rto / 2 + 1e-6
    h.out.tick()
    (r,) = payload_frames(h)
    assert r.seq == iss1 + m and bytes(r.data) == bytes(first[1].data)
    assert h.out.mib["TcpRetransSegs"] == 1 and h.out.mib["TcpExtTCPTimeouts"] == 1
    h.clock.t += rto + 1e-6  # backed off: twice the RTO now
    h.out.tick()
    assert h.frames() == []
    h.clock.t += rto
    h.out.tick()
    (r2,) = payload_frames(h)
    assert r2.seq == iss1 + m and h.out.mib["TcpRetransSegs"] == 2
    ack(h, iss1 + 2 * m)  # progress: the rest goes again (go back N, slow start)
    again = payload_frames(h)
    assert again and again[0].seq == iss1 + 2 * m
    assert h.out.mib["TcpRetransSegs"] == 2 + len(again)


def test_no_acks_at_all_give_up_with_etimedout() -> None:
    h, _ = established()
    sock = h.sock
    assert sock is not None
    h.out.send(sock, b"hello")
    h.frames()
    for _ in range(SEND_RETRIES + 1):
        h.clock.t += 200.0
        h.out.tick()
    assert h.out.gave_up() == [sock]
    assert sock.state is TcpState.CLOSED
    assert h.out.mib["TcpRetransSegs"] == SEND_RETRIES
    assert h.out.mib["TcpExtTCPAbortOnTimeout"] == 1
    assert h.out.send_error(sock) == -errno.ETIMEDOUT
    assert h.out.send_error(sock) == -errno.EPIPE  # the error is reported once


def test_fin_follows_the_queued_data_on_close() -> None:
    h, iss1 = established()
    sock = h.sock
    assert sock is not None
    m = mss(h)
    h.out.send(sock, b"a")
    ack(h, iss1 + 1, win=(2 * m) >> WIN_SCALE)  # room for about two segments
    h.frames()
    h.out.send(sock, bytes(4 * m))
    h.frames()
    h.out.on_close(sock, 0)  # the app closes with data still queued
    assert h.frames() == []  # the window is full: neither data nor FIN yet
    limit = ((2 * m) >> WIN_SCALE) << WIN_SCALE
    h.out.on_orphan("eth0", h.key, b"\0" * 6, sock.rcv_nxt, iss1 + 1 + limit, ACK, 0, 0xFFFF)
    tail = payload_frames(h)
    end = iss1 + 1 + 4 * m
    assert tail[-1].flags & dpkt.tcp.TH_FIN and tail[-1].seq + len(tail[-1].data) == end
    assert all(not f.flags & dpkt.tcp.TH_FIN for f in tail[:-1])
    c = h.out.closing[h.key]
    assert c.state == "FIN_WAIT1" and c.snd_nxt == end + 1
    h.out.on_orphan("eth0", h.key, b"\0" * 6, sock.rcv_nxt, end + 1, ACK, 0, 0xFFFF)
    assert c.state == "FIN_WAIT2" and c.sender is None
    h.out.on_orphan("eth0", h.key, b"\0" * 6, sock.rcv_nxt, end + 1, FIN | ACK, 0, 0xFFFF)
    (last,) = h.frames()
    assert last.ack == sock.rcv_nxt + 1 and c.state == "TIME_WAIT"


def test_a_lost_fin_is_sent_again() -> None:
    h, iss1 = established()
    sock = h.sock
    assert sock is not None
    h.out.send(sock, b"bye")
    h.out.on_close(sock, 0)
    segs = payload_frames(h)
    assert segs[-1].flags & dpkt.tcp.TH_FIN
    h.out.on_orphan("eth0", h.key, b"\0" * 6, sock.rcv_nxt, iss1 + 3, ACK, 0, 0xFFFF)
    h.clock.t += RTO_INIT_S + 1e-3
    h.out.tick()
    (fin,) = payload_frames(h)
    assert fin.flags & dpkt.tcp.TH_FIN and fin.seq == iss1 + 3 and not fin.data


def test_a_zero_window_is_probed_and_sending_resumes_when_it_opens() -> None:
    h, iss1 = established()
    sock = h.sock
    assert sock is not None
    h.out.send(sock, b"a")
    ack(h, iss1 + 1, win=0)
    h.frames()
    h.out.send(sock, b"more")
    assert payload_frames(h) == []
    h.clock.t += RTO_INIT_S + 1e-3
    h.out.tick()
    (probe,) = h.frames()
    assert probe.seq == iss1 and not probe.data  # an old sequence number: answer me
    assert h.out.mib["TcpExtTCPWinProbe"] == 1
    ack(h, iss1 + 1, win=100)
    (d,) = payload_frames(h)
    assert bytes(d.data) == b"more"


def test_send_after_the_peer_reset_reports_econnreset_then_epipe() -> None:
    h, _ = established()
    sock = h.sock
    assert sock is not None
    assert h.out.send_error(sock) is None
    h.seg(sock.rcv_nxt, 0, RST)
    assert sock.state is TcpState.CLOSED and sock not in h.out.conns
    assert h.out.send_error(sock) == -errno.ECONNRESET
    assert h.out.send_error(sock) == -errno.EPIPE


def test_a_socket_that_never_sent_costs_the_rx_path_nothing() -> None:
    h, _ = established()
    assert not h.out.senders  # the kernel hands ACK numbers only to these
    h.data(0, 1000)
    assert not h.out.senders


def _accepted(ctx: Any, skbs: Any, app: Any, h: Host, sport: int  # noqa: F811
              ) -> tuple[Any, int, int, Sender, Any]:
    """A ring, a listener on 8000 and a connection from ``sport`` accepted through the ring,
    its output side on ``h.out``: ``(ring, listener fd, connection fd, peer, socket)``."""
    ctx.sockets.tx = h.out
    ring = L.io_uring_queue_init(8, kernel=app)
    lfd = app.listen_tcp(8000)
    peer = Sender(ctx, skbs, sport=sport)
    peer.connect()
    sock = ctx.sockets.table.lookup(peer.key)
    assert sock is not None
    h.out.on_syn(sock, "eth0", PEER_MAC, b"")
    h.out.after_ingest(sock)
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_accept(sqe, lfd)
    L.io_uring_submit(ring)
    [(_, cfd, _)] = reap(ring)
    return ring, lfd, cfd, peer, sock


def test_iouring_send_op_queues_copies_waits_and_reports_errors(
        ctx, skbs, app) -> None:  # noqa: F811
    """IORING_OP_SEND through the io_uring layer onto a TcpOutput: bytes come from the app's
    memory (-EFAULT when they do not resolve), MSG_DONTWAIT takes what fits (a short count,
    then -EAGAIN), MSG_WAITALL completes once the peer's ACKs made room for the rest, and
    after the peer's RST a send reports ECONNRESET once, then EPIPE."""
    h = Host()
    out = h.out
    out.sndbuf = 6000
    ring, _, cfd, peer, sock = _accepted(ctx, skbs, app, h, 40010)
    out.take()
    mem = app.alloc_memory(16384)
    data = np.random.default_rng(5).integers(0, 256, 16384, dtype=np.uint8)
    mem.view[:] = data

    def send(ud: int, off: int, n: int, flags: int = 0, addr: int | None = None) -> None:
        sqe = L.io_uring_get_sqe(ring)
        L.io_uring_prep_send(sqe, cfd, mem.addr + off if addr is None else addr, n, flags)
        L.io_uring_sqe_set_data64(sqe, ud)
        L.io_uring_submit(ring)

    send(1, 0, 5000)
    send(2, 0, 100, addr=0x1000)
    assert reap(ring) == [(1, 5000, 0), (2, -errno.EFAULT, 0)]
    frames = [tcp_of(f) for f in out.take()["eth0"]]
    assert b"".join(bytes(f.data) for f in frames) == data[:5000].tobytes()
    iss1 = frames[0].seq
    send(3, 5000, 5000, MSG_DONTWAIT)  # 1000 bytes of room
    send(4, 6000, 10, MSG_DONTWAIT)
    assert reap(ring) == [(3, 1000, 0), (4, -errno.EAGAIN, 0)]
    send(5, 6000, 3000, MSG_WAITALL)  # waits for room
    assert reap(ring) == []
    out.on_acks(sock, np.array([iss1 + 2000], np.uint32), np.array([0xFFFF], np.uint16))
    ctx.rings.run(out.take_wakes())
    assert reap(ring) == []  # 2000 queued, 1000 to go
    out.on_acks(sock, np.array([iss1 + 6000], np.uint32), np.array([0xFFFF], np.uint16))
    ctx.rings.run(out.take_wakes())
    assert reap(ring) == [(5, 3000, 0)]
    sent = b"".join(bytes(tcp_of(f).data) for f in out.take()["eth0"])
    assert sent == data[5000:9000].tobytes()
    peer.rst()
    out.after_ingest(sock)
    send(6, 0, 10)
    send(7, 0, 10)
    assert reap(ring) == [(6, -errno.ECONNRESET, 0), (7, -errno.EPIPE, 0)]
    assert ctx.rings.rings[0].stats.send_bytes == 9000
    L.io_uring_queue_exit(ring)


def test_shutdown_wr_sends_the_fin_behind_the_data_and_keeps_receiving() -> None:
    h, iss1 = established()
    sock = h.sock
    assert sock is not None
    h.out.send(sock, b"last words")
    h.out.shutdown_send(sock)
    segs = payload_frames(h)
    assert bytes(segs[0].data) == b"last words" and segs[-1].flags & dpkt.tcp.TH_FIN
    assert segs[-1].seq + len(segs[-1].data) == iss1 + 10
    assert h.out.send_error(sock) == -errno.EPIPE
    ack(h, iss1 + 11)  # data and FIN acknowledged
    snd = h.out.conns[sock].snd
    assert snd is not None and snd.fin_acked and snd.flight == 0
    h.data(0, 3000)  # half closed: the peer's data still comes in, and is ACKed
    (a,) = h.frames()
    assert a.ack == PEER_ISN + 1 + 3000 and a.seq == iss1 + 11
    assert sock.rxq.nbytes == 3000
    h.out.on_close(sock, 0)  # the app closes: our FIN is acknowledged already
    assert h.out.closing[h.key].state == "FIN_WAIT2" and h.frames() == []


def test_iouring_shutdown_op(ctx, skbs, app) -> None:  # noqa: F811
    """IORING_OP_SHUTDOWN: SHUT_WR then SEND is -EPIPE; SHUT_RD makes a RECV end with 0
    after the queued data; a listener or a bad ``how`` gives -ENOTCONN / -EINVAL."""
    h = Host()
    ring, lfd, cfd, peer, _ = _accepted(ctx, skbs, app, h, 40011)
    mem = app.alloc_memory(4096)
    for ud, (fd, how) in enumerate(((cfd, 1), (lfd, 1), (cfd, 7)), start=1):
        sqe = L.io_uring_get_sqe(ring)
        L.io_uring_prep_shutdown(sqe, fd, how)
        L.io_uring_sqe_set_data64(sqe, ud)
        L.io_uring_submit(ring)  # one by one: a failed SQE ends a submission batch
    assert reap(ring) == [(1, 0, 0), (2, -errno.ENOTCONN, 0), (3, -errno.EINVAL, 0)]
    frames = [tcp_of(f) for f in h.out.take()["eth0"]]
    assert frames[-1].flags & dpkt.tcp.TH_FIN
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_send(sqe, cfd, mem.addr, 10)
    L.io_uring_sqe_set_data64(sqe, 4)
    L.io_uring_submit(ring)
    assert reap(ring) == [(4, -errno.EPIPE, 0)]
    peer.send(b"abc")
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_shutdown(sqe, cfd, 0)
    L.io_uring_sqe_set_data64(sqe, 5)
    for ud in (6, 7):
        sqe = L.io_uring_get_sqe(ring)
        L.io_uring_prep_recv(sqe, cfd, mem.addr, 100)
        L.io_uring_sqe_set_data64(sqe, ud)
    L.io_uring_submit(ring)
    assert reap(ring) == [(5, 0, 0), (6, 3, 0), (7, 0, 0)]
    L.io_uring_queue_exit(ring)
