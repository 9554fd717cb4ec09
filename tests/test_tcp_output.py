"""The kernel's transmit decisions (driver_proc.tcp_output), in memory, frames parsed by dpkt.

A SocketTable gets segments as NAPI would hand them; a TcpOutput with a fake clock decides
what to send; every frame it makes is parsed with dpkt (checksums verified) and checked:
SYN-ACK options, delayed vs immediate ACKs, duplicate ACKs, the window closing while the app
holds the buffers and the update once it returns them, the FIN handshakes, RSTs, ARP and NDP.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import dpkt
import numpy as np
import pytest

from driver_proc.tcp import ACK, FIN, PSH, RST, SYN, SocketTable, TcpReceiver, flow_key, ip_bytes
from driver_proc.tcp_output import (
    DEFAULT_RCVBUF,
    DELACK_S,
    SYNACK_RETRIES,
    WSCALE,
    Iface,
    TcpOutput,
    inet_csum,
)

HOST_MAC = bytes([2, 0, 0, 0, 0, 1])
PEER_MAC = bytes([2, 0, 0, 0, 0, 2])
MSS = 1460
PEER_ISN = 1000


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Host:
    """A table, an output side and a handle counter: one emulated host on eth0."""

    def __init__(self, v6: bool = False, space: int | None = None) -> None:
        self.clock = Clock()
        self.v6 = v6
        self.table = SocketTable()
        self.table.listen(5000)
        self.cap: int | None = space
        self.out = TcpOutput(
            {"eth0": Iface("eth0", HOST_MAC, ip_bytes("10.0.0.1"), ip_bytes("fd00::1"), 1500)},
            self.clock, secret=b"k" * 16,
            space_fn=lambda s: None if self.cap is None else (self.cap, 4096))
        self.peer = "fd00::2" if v6 else "10.0.0.2"
        self.host = "fd00::1" if v6 else "10.0.0.1"
        self.key = flow_key(self.peer, 40000, self.host, 5000)
        self.h = 0
        self.sock: TcpReceiver | None = None

    def seg(self, seq: int, n: int, flags: int = ACK, key: bytes | None = None) -> None:
        self.h += 1
        key = key or self.key
        res = self.table.ingest_flow(key, [seq], [n], [flags], [self.h])
        for s in res.sockets:
            if s not in self.out.conns and flags & SYN:
                self.out.on_syn(s, "eth0", PEER_MAC, syn_opts())
                self.sock = s
            else:
                self.out.after_ingest(s)
        if not res.sockets and self.table.lookup(key) is None:
            self.out.on_orphan("eth0", key, PEER_MAC, seq, 7, flags, n)

    def data(self, off: int, n: int) -> None:
        """Peer bytes [off, off + n) of the stream."""
        self.seg(PEER_ISN + 1 + off, n, ACK | PSH)

    def frames(self) -> list[dpkt.tcp.TCP]:
        out = []
        for f in self.out.take().get("eth0", []):
            out.append(tcp_of(f))
        return out

    def handshake(self) -> dpkt.tcp.TCP:
        self.seg(PEER_ISN, 0, SYN)
        (synack,) = self.frames()
        self.seg(PEER_ISN + 1, 0, ACK)
        self.clock.t += 1
        self.out.tick()
        assert self.frames() == []  # a pure ACK is not answered, not even late
        return synack


def syn_opts(wscale: int | None = 7) -> bytes:
    o = struct.pack("!BBH", 2, 4, 1460)
    if wscale is not None:
        o += struct.pack("!BBBB", 1, 3, 3, wscale)
    return o


def tcp_of(frame: bytes) -> dpkt.tcp.TCP:
    """Parse with dpkt and verify the IP and TCP checksums against our own computation."""
    eth = dpkt.ethernet.Ethernet(frame)
    assert eth.src == HOST_MAC and eth.dst == PEER_MAC
    ip = eth.data
    raw_tcp = bytes(ip.data)
    if isinstance(ip, dpkt.ip.IP):
        assert ip.ttl == 64 and ip.off & dpkt.ip.IP_DF
        assert inet_csum(bytes(frame[14:34])) == 0  # IPv4 header checksum
        pseudo = ip.src + ip.dst + struct.pack("!BBH", 0, 6, len(raw_tcp))
    else:
        pseudo = ip.src + ip.dst + struct.pack("!IxxxB", len(raw_tcp), 6)
    assert inet_csum(pseudo + raw_tcp) == 0  # TCP checksum
    tcp = ip.data
    assert isinstance(tcp, dpkt.tcp.TCP)
    return tcp


@pytest.fixture(params=[False, True], ids=["v4", "v6"])
def host(request: pytest.FixtureRequest) -> Iterator[Host]:
    yield Host(v6=request.param)


def test_synack_carries_mss_and_window_scale_and_is_retransmitted(host: Host) -> None:
    host.seg(PEER_ISN, 0, SYN)
    (sa,) = host.frames()
    assert sa.flags == dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK
    assert sa.ack == PEER_ISN + 1 and (sa.sport, sa.dport) == (5000, 40000)
    opts = dict(dpkt.tcp.parse_opts(sa.opts))
    assert struct.unpack("!H", opts[dpkt.tcp.TCP_OPT_MSS])[0] == (1440 if host.v6 else 1460)
    assert opts[dpkt.tcp.TCP_OPT_WSCALE] == bytes([WSCALE])
    assert dpkt.tcp.TCP_OPT_SACKOK not in opts and dpkt.tcp.TCP_OPT_TIMESTAMP not in opts
    assert sa.win == 0xFFFF  # a SYN-ACK's window is never scaled
    assert host.out.mib["TcpPassiveOpens"] == 1
    # no handshake ACK: the same SYN-ACK again after 1 s, then 2 s, ...
    host.clock.t += 0.5
    host.out.tick()
    assert host.frames() == []
    host.clock.t += 0.5
    host.out.tick()
    (again,) = host.frames()
    assert (again.seq, again.ack, again.flags) == (sa.seq, sa.ack, sa.flags)
    assert host.out.mib["TcpRetransSegs"] == host.out.mib["TcpExtTCPSynRetrans"] == 1
    for _ in range(SYNACK_RETRIES + 1):
        host.clock.t += 64
        host.out.tick()
    assert host.out.mib["TcpExtTCPSynRetrans"] == SYNACK_RETRIES
    assert host.out.expired() == [host.sock] and host.out.expired() == []


def test_no_window_scale_unless_the_peer_offers_it() -> None:
    h = Host()
    h.h += 1
    res = h.table.ingest_flow(h.key, [PEER_ISN], [0], [SYN], [1])
    h.out.on_syn(res.sockets[0], "eth0", PEER_MAC, syn_opts(None))
    (sa,) = h.frames()
    assert dpkt.tcp.TCP_OPT_WSCALE not in dict(dpkt.tcp.parse_opts(sa.opts))
    h.seg(PEER_ISN + 1, 0, ACK)
    h.data(0, 3 * MSS)
    (ack,) = h.frames()
    assert ack.win == 0xFFFF  # unscaled: the 6 MiB space shows as 65535


def test_delayed_ack_for_one_segment_immediate_for_two(host: Host) -> None:
    sa = host.handshake()
    host.data(0, 100)
    assert host.frames() == []  # one small segment: delayed
    host.clock.t += DELACK_S / 2
    host.out.tick()
    assert host.frames() == []
    host.clock.t += DELACK_S / 2 + 1e-6
    host.out.tick()
    (d,) = host.frames()
    assert d.ack == PEER_ISN + 1 + 100 and d.seq == sa.seq + 1
    assert d.flags == dpkt.tcp.TH_ACK
    assert host.out.mib["TcpExtDelayedACKs"] == 1
    m = 1440 if host.v6 else 1460  # the segment size the peer uses
    host.data(100, m)
    assert host.frames() == []  # one full segment: still delayed
    host.data(100 + m, m)  # more than one full segment unacked: ACK now
    (now,) = host.frames()
    assert now.ack == PEER_ISN + 1 + 100 + 2 * m
    host.clock.t += 1
    host.out.tick()
    assert host.frames() == [] and host.out.mib["TcpExtDelayedACKs"] == 1


def test_out_of_order_segments_get_immediate_duplicate_acks(host: Host) -> None:
    host.handshake()
    host.data(0, MSS)
    host.frames()
    host.data(2 * MSS, MSS)  # hole at [MSS, 2 MSS)
    host.data(3 * MSS, MSS)
    dups = host.frames()
    assert [d.ack for d in dups] == [PEER_ISN + 1 + MSS] * 2
    assert host.out.mib["TcpExtTCPDupAcksSent"] == 2
    host.data(MSS, MSS)  # fills the hole: ACK everything at once
    (fill,) = host.frames()
    assert fill.ack == PEER_ISN + 1 + 4 * MSS
    host.data(0, MSS)  # an old duplicate: ACK at once
    (dup,) = host.frames()
    assert dup.ack == PEER_ISN + 1 + 4 * MSS


def test_window_closes_while_the_app_holds_buffers_and_reopens_with_an_update() -> None:
    h = Host()
    h.cap = 4  # the ifq's free niovs: 4 segments' worth
    sa = h.handshake()
    assert sa.win == 4 * MSS
    h.data(0, 2 * MSS)
    (a,) = h.frames()
    w1 = a.win << WSCALE
    assert 2 * MSS <= w1 <= 4 * MSS
    h.cap = 0  # the app holds every niov; the sender fills what was offered
    h.data(2 * MSS, w1)
    (z,) = h.frames()
    assert z.win == 0 and h.out.mib["TcpExtTCPToZeroWindowAdv"] == 1
    h.clock.t += 1
    h.out.tick()
    assert h.frames() == []  # still closed: nothing to say
    h.cap = 64  # the app returned its buffers
    h.clock.t += 0.01
    h.out.tick()
    (u,) = h.frames()
    assert u.flags == dpkt.tcp.TH_ACK and u.ack == z.ack and u.win << WSCALE >= 32 * MSS
    assert h.out.mib["TcpExtTCPWindowUpdates"] == 1
    assert h.out.mib["TcpExtTCPFromZeroWindowAdv"] == 1
    h.clock.t += 0.01
    h.out.tick()
    assert h.frames() == []  # one update, not one per tick


def test_unread_bytes_count_against_the_window() -> None:
    h = Host()
    h.handshake()
    h.data(0, 2 * MSS)
    (a,) = h.frames()
    assert a.win << WSCALE == (DEFAULT_RCVBUF - 2 * MSS) >> WSCALE << WSCALE
    assert h.sock is not None
    # the app reads everything
    h.sock.rxq.consume(2 * MSS)
    h.data(2 * MSS, 2 * MSS)
    (b,) = h.frames()
    assert b.win << WSCALE == (DEFAULT_RCVBUF - 2 * MSS) >> WSCALE << WSCALE


def test_fin_from_the_peer_is_acked_then_our_fin_and_last_ack(host: Host) -> None:
    sa = host.handshake()
    host.data(0, 10)
    host.seg(PEER_ISN + 11, 0, FIN | ACK)
    (a,) = host.frames()
    assert a.ack == PEER_ISN + 12  # data and FIN acknowledged at once
    sock = host.sock
    assert sock is not None
    sock.rxq.consume(10)
    host.table.close(sock)
    host.out.on_close(sock, 0)
    (fin,) = host.frames()
    assert fin.flags == dpkt.tcp.TH_FIN | dpkt.tcp.TH_ACK and fin.seq == sa.seq + 1
    assert host.out.closing[host.key].state == "LAST_ACK"
    host.out.on_orphan("eth0", host.key, PEER_MAC, PEER_ISN + 12, sa.seq + 2, ACK, 0)
    assert host.key not in host.out.closing and host.frames() == []


def test_active_close_fin_wait_and_time_wait(host: Host) -> None:
    sa = host.handshake()
    sock = host.sock
    assert sock is not None
    host.table.close(sock)
    host.out.on_close(sock, 0)
    (fin,) = host.frames()
    assert fin.flags == dpkt.tcp.TH_FIN | dpkt.tcp.TH_ACK
    host.clock.t += 1.0
    host.out.tick()
    (re,) = host.frames()  # not ACKed: retransmitted
    assert re.seq == fin.seq and host.out.mib["TcpRetransSegs"] == 1
    o = host.out
    o.on_orphan("eth0", host.key, PEER_MAC, PEER_ISN + 1, sa.seq + 2, ACK, 0)
    assert o.closing[host.key].state == "FIN_WAIT2"
    o.on_orphan("eth0", host.key, PEER_MAC, PEER_ISN + 1, sa.seq + 2, FIN | ACK, 0)
    (last,) = host.frames()
    assert last.flags == dpkt.tcp.TH_ACK and last.ack == PEER_ISN + 2
    assert o.closing[host.key].state == "TIME_WAIT"
    host.clock.t += 10
    o.tick()
    assert host.key not in o.closing


def test_data_after_close_and_close_with_unread_data_reset(host: Host) -> None:
    sa = host.handshake()
    sock = host.sock
    assert sock is not None
    host.table.close(sock)
    host.out.on_close(sock, 0)
    host.frames()
    host.out.on_orphan("eth0", host.key, PEER_MAC, PEER_ISN + 1, sa.seq + 1, ACK, 500)
    (rst,) = host.frames()
    assert rst.flags & dpkt.tcp.TH_RST and rst.seq == sa.seq + 2
    assert host.out.mib["TcpExtTCPAbortOnData"] == 1
    # a second connection closed with 100 unread bytes: RST instead of FIN
    key2 = flow_key(host.peer, 40001, host.host, 5000)
    host.seg(PEER_ISN, 0, SYN, key=key2)
    host.frames()
    host.seg(PEER_ISN + 1, 0, ACK, key=key2)
    host.seg(PEER_ISN + 1, 100, ACK, key=key2)
    host.frames()
    s2 = host.table.lookup(key2)
    assert s2 is not None
    host.table.close(s2)
    host.out.on_close(s2, 100)
    (r2,) = host.frames()
    assert r2.flags & dpkt.tcp.TH_RST and host.out.mib["TcpExtTCPAbortOnClose"] == 1


def test_rst_to_a_closed_port_and_never_to_a_rst(host: Host) -> None:
    key = flow_key(host.peer, 40000, host.host, 6000)  # nobody listens on 6000
    host.seg(777, 0, SYN, key=key)
    (r,) = host.frames()
    assert r.flags == dpkt.tcp.TH_RST | dpkt.tcp.TH_ACK and r.seq == 0 and r.ack == 778
    host.seg(900, 10, ACK, key=key)  # carries ACK 7 (the helper's): seq = their ack
    (r2,) = host.frames()
    assert r2.flags == dpkt.tcp.TH_RST and r2.seq == 7
    host.seg(900, 0, RST, key=key)
    assert host.frames() == []
    assert host.out.mib["TcpOutRsts"] == 2


def test_arp_reply_is_byte_exact() -> None:
    h = Host()
    req = dpkt.ethernet.Ethernet(
        dst=b"\xff" * 6, src=PEER_MAC, type=dpkt.ethernet.ETH_TYPE_ARP,
        data=dpkt.arp.ARP(sha=PEER_MAC, spa=bytes([10, 0, 0, 2]), tha=b"\0" * 6,
                          tpa=bytes([10, 0, 0, 1]), op=dpkt.arp.ARP_OP_REQUEST))
    h.out.on_ctl_frame("eth0", bytes(req))
    (f,) = h.out.take()["eth0"]
    want = (PEER_MAC + HOST_MAC + b"\x08\x06" + bytes.fromhex("0001080006040002") + HOST_MAC
            + bytes([10, 0, 0, 1]) + PEER_MAC + bytes([10, 0, 0, 2]))
    assert f == want.ljust(60, b"\0")
    assert h.out.neigh[ip_bytes("10.0.0.2")] == PEER_MAC
    # a request for someone else's address is not answered
    other = bytes(req)[:38] + bytes([10, 0, 0, 9]) + bytes(req)[42:]
    h.out.on_ctl_frame("eth0", other)
    assert h.out.take() == {} and h.out.mib["ArpOutReplies"] == 1


def _ns(target: bytes, src: bytes, dst: bytes) -> bytes:
    body = struct.pack("!BBHI16s", 135, 0, 0, 0, target) + b"\x01\x01" + PEER_MAC
    csum = inet_csum(src + dst + struct.pack("!IxxxB", len(body), 58) + body)
    body = body[:2] + struct.pack("!H", csum) + body[4:]
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(body), 58, 255, src, dst)
    return b"\x33\x33\xff\x00\x00\x01" + PEER_MAC + b"\x86\xdd" + ip6 + body


def test_neighbour_solicitation_gets_an_advertisement() -> None:
    h = Host()
    me, peer = ip_bytes("fd00::1"), ip_bytes("fd00::2")
    sn = bytes.fromhex("ff0200000000000000000001ff000001")
    h.out.on_ctl_frame("eth0", _ns(me, peer, sn))
    (f,) = h.out.take()["eth0"]
    eth = dpkt.ethernet.Ethernet(f)
    assert eth.dst == PEER_MAC and eth.src == HOST_MAC
    ip6 = eth.data
    assert ip6.hlim == 255 and ip6.src == me and ip6.dst == peer and ip6.nxt == 58
    icmp = bytes(f[54:])
    assert inet_csum(me + peer + struct.pack("!IxxxB", len(icmp), 58) + icmp) == 0
    assert icmp[0] == 136 and icmp[1] == 0
    assert struct.unpack("!I", icmp[4:8])[0] == 0x60000000  # solicited, override
    assert icmp[8:24] == me and icmp[24:32] == b"\x02\x01" + HOST_MAC
    assert h.out.neigh[peer] == PEER_MAC
    assert h.out.mib["Icmp6OutNeighborAdvertisements"] == 1
    # wrong target, or a broken checksum: no answer
    h.out.on_ctl_frame("eth0", _ns(ip_bytes("fd00::9"), peer, sn))
    bad = bytearray(_ns(me, peer, sn))
    bad[-1] ^= 1
    h.out.on_ctl_frame("eth0", bytes(bad))
    assert h.out.take() == {}


def test_isn_depends_on_the_tuple_and_the_clock() -> None:
    h = Host()
    a = h.out.iss_for(h.key)
    assert a == h.out.iss_for(h.key)
    assert a != h.out.iss_for(flow_key(h.peer, 40001, h.host, 5000))
    h.clock.t += 1e-3
    assert abs(((h.out.iss_for(h.key) - a) & 0xFFFFFFFF) - 1_000_000 // 64) <= 1
    assert np.uint32(a) == a
