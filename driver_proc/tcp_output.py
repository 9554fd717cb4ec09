"""What the host transmits: SYN-ACK, ACKs, window updates, FIN, RST, ARP, NDP and app data.

Pure logic in the h11 style, like :mod:`driver_proc.tcp` beside it: nothing here touches
rings or sockets.  The kernel tells a :class:`TcpOutput` what happened (a connection was
created by a SYN, a NAPI batch was ingested into a socket, a segment reached no socket, the
app closed a socket, an ARP or ICMPv6 frame arrived, time passed) and takes back whole
Ethernet frames per netdev (:meth:`TcpOutput.take`), which the driver queues on the netdev's
TX ring (:meth:`driver_proc.netdev.NetDevice.xmit`).  Counterparts: ``net/ipv4/tcp_output.c``
(``tcp_make_synack``, ``tcp_send_ack``, ``tcp_send_delayed_ack``, ``tcp_send_fin``,
``tcp_select_window``), ``net/ipv4/tcp_input.c`` (``__tcp_ack_snd_check``,
``tcp_data_queue``'s immediate ACKs), ``net/ipv4/tcp_minisocks.c`` (the request and
time-wait sockets), ``net/ipv4/tcp_ipv4.c`` (``tcp_v4_send_reset``), ``net/ipv4/arp.c``,
``net/ipv6/ndisc.c``.

What is sent, and the choices made
----------------------------------
* **SYN-ACK** for a SYN that created a connection: our ISN (a keyed hash of the 4-tuple plus a
  64 ns clock, as ``secure_tcp_seq`` does), ``ack = peer ISN + 1``, window ``min(65535,
  receive space)`` (a SYN's window is never scaled), options MSS (``MTU - 40`` IPv4, ``MTU -
  60`` IPv6) and, only if the peer's SYN offered window scaling, window scale
  :data:`WSCALE` = 7: the shift Linux picks for its default ``tcp_rmem`` maximum of 6 MiB
  (the smallest shift whose scaled 16-bit window covers it).  **No SACK-permitted, no
  timestamps**: the receive side keeps no SACK scoreboard to report from and no RTT samples
  to echo, so offering them would be a lie; a Linux sender falls back to NewReno-style
  recovery with dup ACKs, which we send.  The SYN-ACK is retransmitted after 1 s, doubling,
  :data:`SYNACK_RETRIES` times (``tcp_synack_retries``), then the embryonic connection is
  dropped.
* **ACKs** after every ingested batch, decided per socket (one ACK per batch where Linux
  would send one per two segments; ``__tcp_ack_snd_check``): at once when more than one
  full segment (``rcv_mss``) arrived since the last ACK, when a segment went to the
  out-of-order queue (one duplicate ACK per such segment, ``ack = rcv_nxt``), when an
  out-of-order hole was filled, for duplicates, and for the peer's FIN; otherwise the
  delayed-ACK timer (:data:`DELACK_S`, Linux's ``TCP_DELACK_MIN``) sends it
  (``DelayedACKs``).  No quick-ack mode at connection start.
* **Window**: ``rcvbuf`` (:data:`DEFAULT_RCVBUF`) minus the bytes queued and not yet read and
  the bytes held out of order; for a socket whose queue is bound to a zcrx ifq it is also
  capped by the free buffers of the ifq times the payload a buffer takes (the kernel's
  ``space_fn``), so a sender facing an app that holds every niov sees the window close.
  The right edge never moves left (RFC 7323).
  A socket whose advertised window fell below four segments is watched (every millisecond);
  once the window has at least doubled and grown by a full segment, a window update goes
  out (``tcp_cleanup_rbuf`` decides the same at read time), so the sender resumes when the
  app reads or returns buffers.
* **FIN**: the peer's FIN is ACKed at once.  When the app closes a socket with nothing unread
  we send FIN-ACK (``FIN_WAIT1``, or ``LAST_ACK`` after the peer's FIN) and keep a small
  record of the connection (the socket left the table), retransmitted like the SYN-ACK until
  ACKed; a peer FIN in ``FIN_WAIT2`` is ACKed and the record lingers in ``TIME_WAIT`` for
  :data:`TIME_WAIT_S` (Linux: 60 s; shorter here so runs end promptly).
* **RST**: a segment reaching no socket and no listener (``tcp_v4_send_reset``: ``seq =
  their ack`` if it carried ACK, else ``seq 0, ack = seq + len (+SYN/FIN)``); never in answer
  to a RST.  Data arriving after the app closed (``TCPAbortOnData``), and closing with unread
  data (``TCPAbortOnClose``), reset the connection.
* **Data an app sends** (IORING_OP_SEND, :mod:`driver_proc.net`) is a minimal write side
  (``tcp_sendmsg``, ``tcp_write_xmit``, ``tcp_ack``, ``tcp_retransmit_timer``): a send
  queue of at most :data:`DEFAULT_SNDBUF` bytes per connection; segments of at most the
  peer's MSS (PSH on the one that empties the queue) within the peer's advertised window
  (scaled by its shift) and a congestion window (initial 10 segments, slow start, one
  segment per window above ``ssthresh``, back to one segment after a timeout: Reno without
  fast retransmit); ``snd_una``/``snd_nxt``; an ACK frees the queue and wakes a blocked
  send; the retransmission timer (1 s initial, then RFC 6298 from RTT samples taken as
  Karn says, 200 ms .. 120 s, doubling per timeout) goes back to the first unacknowledged
  segment, and after :data:`SEND_RETRIES` timeouts the connection errs with ``ETIMEDOUT``
  (``tcp_write_err``); a zero window is probed with an old sequence number on the same
  timer.  Closing (or ``shutdown(SHUT_WR)``) with data queued sends the data, then the
  FIN.  **Not emulated:** SACK,
  fast retransmit / recovery on duplicate ACKs, Nagle and corking (every send goes out at
  once), TSO, pacing, timestamps, ``SO_SNDBUF`` autotuning, urgent data.  Only connections
  whose app sent are given their ACK numbers (:attr:`TcpOutput.senders`): the receive path
  of the others is unchanged.  Without a send, ``snd_nxt`` stays ``ISN + 1`` until our FIN.
* **ARP / NDP**: an ARP request for a netdev's IPv4 address gets a reply; an ICMPv6
  neighbour solicitation for its IPv6 address gets a solicited neighbour advertisement
  (flags S and O, target link-layer option, ICMPv6 checksum, hop limit 255).  Senders of
  both are learned into the neighbour table.  The peer's MAC for TCP replies comes from the
  neighbour table, else from the frame that created the connection (departure: Linux would
  resolve the address with ARP/NS; on one link both give the same MAC).

Counters (:attr:`TcpOutput.mib`) use ``nstat`` names: ``TcpOutSegs``, ``TcpRetransSegs``,
``TcpExtTCPTimeouts``, ``TcpExtTCPAbortOnTimeout``, ``TcpExtTCPWinProbe``,
``TcpOutRsts``, ``TcpPassiveOpens``, ``TcpExtDelayedACKs``, ``TcpExtTCPSynRetrans``,
``TcpExtTCPAbortOnData``, ``TcpExtTCPAbortOnClose``, ``TcpExtTCPToZeroWindowAdv``,
``TcpExtTCPFromZeroWindowAdv``, ``TcpExtTCPWindowUpdates`` (ours; Linux has none),
``TcpExtTCPDupAcksSent`` (ours), ``TcpExtTCPReqQFullDrop``-like drops after SYN-ACK
retries (``TcpExtTCPSynAckDropped``, ours), ``ArpOutReplies`` (ours),
``Icmp6OutNeighborAdvertisements``, ``Icmp6InNeighborSolicits``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from driver_proc.tcp import ACK, FIN, PSH, RST, SYN, TcpReceiver, TcpState
from shared.errors import InvariantBroken

__all__ = ["DEFAULT_RCVBUF", "DEFAULT_SNDBUF", "DELACK_S", "INIT_CWND", "RTO_INIT_S",
           "RTO_MAX_S", "RTO_MIN_S", "SEND_RETRIES", "SYNACK_RETRIES", "WSCALE", "Iface",
           "TcpOutput", "arp_reply", "build_tcp", "inet_csum", "na_reply", "parse_tcp_options"]

#: Receive buffer a window is computed from (Linux's autotuning ceiling, tcp_rmem[2]).
DEFAULT_RCVBUF = 6 * 1024 * 1024
#: Our window scale shift: the smallest whose scaled 16-bit window covers DEFAULT_RCVBUF.
WSCALE = 7
assert (0xFFFF << WSCALE) >= DEFAULT_RCVBUF > (0xFFFF << (WSCALE - 1))
#: Delayed-ACK timeout (TCP_DELACK_MIN, HZ/25).
DELACK_S = 0.040
#: SYN-ACK (and FIN) first retransmission timeout (TCP_TIMEOUT_INIT) and retries.
RTO_INIT_S = 1.0
SYNACK_RETRIES = 5
FIN_RETRIES = 5
#: Send buffer (``sk_sndbuf``): bytes a socket queues (sent or not, unacknowledged); a
#: blocking send waits for room beyond it, MSG_DONTWAIT takes what fits.
DEFAULT_SNDBUF = 256 * 1024
#: Retransmission timeout bounds once RTT samples exist (TCP_RTO_MIN, TCP_RTO_MAX).
RTO_MIN_S = 0.200
RTO_MAX_S = 120.0
#: Timeouts of one segment before the connection is given up with ETIMEDOUT (Linux:
#: ``tcp_retries2`` = 15, about 15 minutes; fewer here so a dead peer ends a run promptly).
SEND_RETRIES = 8
#: Initial congestion window in segments (TCP_INIT_CWND, RFC 6928).
INIT_CWND = 10
#: How long a closed connection's record lingers in TIME_WAIT (Linux: 60 s).
TIME_WAIT_S = 2.0
#: How often sockets whose window was small are checked for a window update.
WATCH_S = 0.001
#: A socket is watched for a window update while its advertised window is below this many
#: segments: a sender that still has more is not waiting for one (its next ACK carries the
#: new window anyway), and watching every socket would cost per-socket work per scan.
WATCH_SEGS = 4

_MASK = 0xFFFFFFFF
_V4 = bytes(10) + b"\xff\xff"
ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0800, 0x0806, 0x86DD
IPPROTO_TCP, IPPROTO_ICMPV6 = 6, 58
_BCAST = b"\xff" * 6


def inet_csum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) & 1:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _ip_packet(src: bytes, dst: bytes, proto: int, l4: bytes, *, ttl: int = 64,
               ident: int = 0) -> tuple[int, bytes]:
    """(ethertype, IP header + ``l4`` with the L4 checksum filled at l4_csum_off)."""
    if src[:12] == _V4 and dst[:12] == _V4:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ident & 0xFFFF, 0x4000, ttl,
                          proto, 0, src[12:], dst[12:])
        hdr = hdr[:10] + struct.pack("!H", inet_csum(hdr)) + hdr[12:]
        return ETH_P_IP, hdr + l4
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, ttl, src, dst)
    return ETH_P_IPV6, hdr + l4


def _pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if src[:12] == _V4 and dst[:12] == _V4:
        return src[12:] + dst[12:] + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!IxxxB", length, proto)


def build_tcp(src_mac: bytes, dst_mac: bytes, saddr: bytes, daddr: bytes, sport: int,
              dport: int, seq: int, ack: int, flags: int, window: int,
              options: bytes = b"", *, ident: int = 0, payload: bytes = b"") -> bytes:
    """One TCP segment (``payload`` after the header) as a whole Ethernet frame, checksums
    written.

    Addresses are 16 bytes (IPv4 as ``::ffff:a.b.c.d``, which selects IPv4).  ``options``
    must be a multiple of 4 bytes.  Frames shorter than 60 bytes are zero-padded."""
    assert len(options) % 4 == 0
    doff = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & _MASK, ack & _MASK, doff << 4, flags,
                      window, 0, 0) + options + payload
    csum = inet_csum(_pseudo(saddr, daddr, IPPROTO_TCP, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    etype, ip = _ip_packet(saddr, daddr, IPPROTO_TCP, tcp, ident=ident)
    frame = dst_mac + src_mac + struct.pack("!H", etype) + ip
    return frame.ljust(60, b"\0")


def parse_tcp_options(opts: bytes) -> dict[str, int]:
    """The options of a SYN we use: ``mss``, ``wscale`` (present only if given)."""
    out: dict[str, int] = {}
    i = 0
    while i < len(opts):
        kind = opts[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(opts) or opts[i + 1] < 2 or i + opts[i + 1] > len(opts):
            break  # malformed: ignore the rest, as tcp_parse_options does
        ln = opts[i + 1]
        if kind == 2 and ln == 4:
            out["mss"] = int.from_bytes(opts[i + 2:i + 4], "big")
        elif kind == 3 and ln == 3:
            out["wscale"] = min(opts[i + 2], 14)
        i += ln
    return out


def arp_reply(frame: bytes, mac: bytes, addr4: bytes) -> tuple[bytes, bytes, bytes] | None:
    """For an ARP request asking for ``addr4`` (4 bytes): ``(reply frame, sender ip, sender
    mac)``; None for anything else."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return None
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", frame[14:22])
    if (htype, ptype, hlen, plen, op) != (1, ETH_P_IP, 6, 4, 1):
        return None
    sha, spa, tpa = frame[22:28], frame[28:32], frame[38:42]
    if tpa != addr4:
        return None
    arp = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 2, mac, addr4, sha, spa)
    return (sha + mac + b"\x08\x06" + arp).ljust(60, b"\0"), spa, sha


def na_reply(frame: bytes, mac: bytes, addr6: bytes) -> tuple[bytes, bytes, bytes] | None:
    """For an ICMPv6 neighbour solicitation for ``addr6``: ``(advertisement frame, sender
    address, sender mac)`` (sender mac: the source link-layer option, else the Ethernet
    source); None for anything else."""
    if len(frame) < 14 + 40 + 24 or frame[12:14] != b"\x86\xdd":
        return None
    plen, nh, hop = struct.unpack("!HBB", frame[18:22])
    src, dst = frame[22:38], frame[38:54]
    icmp = frame[54:54 + plen]
    if nh != IPPROTO_ICMPV6 or hop != 255 or len(icmp) < 24 or icmp[0] != 135 or icmp[1]:
        return None
    if inet_csum(_pseudo(src, dst, IPPROTO_ICMPV6, len(icmp)) + icmp) != 0:
        return None
    target = icmp[8:24]
    if target != addr6:
        return None
    peer_mac = frame[6:12]
    i = 24
    while i + 8 <= len(icmp):
        ln = icmp[i + 1] * 8
        if ln == 0:
            return None
        if icmp[i] == 1 and ln == 8:
            peer_mac = icmp[i + 2:i + 8]
        i += ln
    unspecified = src == bytes(16)
    dst6 = bytes.fromhex("ff020000000000000000000000000001") if unspecified else src
    dmac = b"\x33\x33" + dst6[12:] if unspecified else peer_mac
    flags = 0x20000000 if unspecified else 0x60000000  # O, plus S when solicited by unicast
    body = struct.pack("!BBHI16s", 136, 0, 0, flags, addr6) + b"\x02\x01" + mac
    csum = inet_csum(_pseudo(addr6, dst6, IPPROTO_ICMPV6, len(body)) + body)
    body = body[:2] + struct.pack("!H", csum) + body[4:]
    _, ip = _ip_packet(addr6, dst6, IPPROTO_ICMPV6, body, ttl=255)
    return dmac + mac + b"\x86\xdd" + ip, src, peer_mac


@dataclass
class Iface:
    """What the output side needs of a netdev: name, MAC, addresses (16-byte form), MTU."""

    name: str
    mac: bytes
    addr4: bytes | None
    addr6: bytes | None
    mtu: int

    def mss(self, v6: bool) -> int:
        return self.mtu - (60 if v6 else 40)


@dataclass(eq=False)
class _Out:
    """The transmit side of one connection (the parts of ``tcp_sock`` a receiver needs)."""

    sock: TcpReceiver
    dev: str
    peer_mac: bytes
    iss: int                    # our ISN
    snd_nxt: int                # iss + 1 once the SYN-ACK is out (no data is ever sent)
    peer_wscale: int | None     # None: the peer did not offer scaling (we do not scale)
    rcv_mss: int
    acked: int = 0              # rcv_nxt (u32) we last acknowledged
    seen_segs: int = 0          # stats.segs at the last decision
    seen_ooo: int = 0
    seen_dup: int = 0
    seen_ooo_held: int = 0
    fin_acked: bool = False
    adv_right: int = 0          # right edge (u32) of the last advertised window
    adv_win: int = 0            # last advertised window in bytes
    delack_at: float | None = None
    synack_at: float | None = None
    synack_tries: int = 0
    peer_win: int = 0xFFFF      # the window of the peer's SYN (never scaled)
    snd: _Snd | None = None     # the write side, once the app sent data

    @property
    def wscale(self) -> int:
        return WSCALE if self.peer_wscale is not None else 0


@dataclass(eq=False)
class _Snd:
    """The write side of a connection whose app sent data (``tcp_sock``'s ``snd_*``, the
    write queue and the retransmission timer).

    ``buf`` holds the stream bytes from ``snd_una`` on, acknowledged ones are cut off the
    front (so at most :data:`DEFAULT_SNDBUF` bytes).  Offsets below are relative to ``una``:
    ``high`` is ``snd_nxt - snd_una`` (the most ever sent, not counting the FIN), ``nxt`` the
    next byte to (re)transmit (``high``, except after a timeout: go back to 0)."""

    una: int                    # snd_una (u32)
    wnd: int                    # the peer's advertised window in bytes (scaled)
    mss: int
    buf: bytearray = field(default_factory=bytearray)
    high: int = 0
    nxt: int = 0
    fin: bool = False           # a FIN is queued after buf (close)
    fin_sent: bool = False
    fin_acked: bool = False
    fin_retx: bool = False      # the FIN is to be sent again (after a timeout)
    cwnd: int = INIT_CWND       # segments
    ssthresh: int = 1 << 30
    cwnd_acc: int = 0           # bytes acknowledged towards the next congestion-avoidance step
    rto: float = RTO_INIT_S
    srtt: float | None = None
    rttvar: float = 0.0
    backoff: int = 0            # timeouts since the last forward progress
    rto_at: float | None = None  # retransmission (or zero-window probe) timer
    rtt_end: int | None = None   # offset just past the segment being timed (Karn: new data)
    rtt_t0: float = 0.0

    @property
    def flight(self) -> int:
        """Sequence space sent and not acknowledged (the FIN counts one)."""
        return self.high + (1 if self.fin_sent and not self.fin_acked else 0)

    @property
    def end(self) -> int:
        """Sequence number (u32) just past the queued bytes (where our FIN goes)."""
        return (self.una + len(self.buf)) & _MASK


@dataclass(eq=False)
class _Closing:
    """A connection the app closed: FIN_WAIT1/2, LAST_ACK or TIME_WAIT (a time-wait sock)."""

    state: str
    dev: str
    key: bytes
    peer_mac: bytes
    snd_nxt: int                # after our FIN
    rcv_nxt: int
    wscale: int
    retx_at: float | None = None
    tries: int = 0
    expire_at: float | None = None
    #: the connection's write side while its queued data (and then the FIN) is still being
    #: sent and acknowledged; None once the FIN went out the plain way or was acknowledged
    sender: _Out | None = None


@dataclass
class TcpOutput:
    """The kernel's transmit decisions (see the module docstring).

    ``space_fn(sock)``: ``(buffers, buf_len)`` the socket's RX queue can still fill (the free
    niovs of the zcrx ifq it is bound to), or None for no cap.  Each segment takes at least
    one buffer, so the cap is ``buffers x min(buf_len, rcv_mss)`` bytes (Linux scales its
    window by the payload-to-truesize ratio the same way)."""

    ifaces: dict[str, Iface]
    clock: Callable[[], float]
    secret: bytes = field(default_factory=lambda: os.urandom(16))
    rcvbuf: int = DEFAULT_RCVBUF
    space_fn: Callable[[TcpReceiver], tuple[int, int] | None] | None = None
    mib: Counter[str] = field(default_factory=Counter)
    neigh: dict[bytes, bytes] = field(default_factory=dict)
    conns: dict[TcpReceiver, _Out] = field(default_factory=dict)
    closing: dict[bytes, _Closing] = field(default_factory=dict)
    #: frames to send, per netdev, until take()
    out: dict[str, list[bytes]] = field(default_factory=dict)
    sndbuf: int = DEFAULT_SNDBUF
    #: connections that have a write side (their ACK numbers and windows are processed:
    #: :meth:`on_acks`); others cost the RX path nothing
    senders: set[TcpReceiver] = field(default_factory=set)
    _timers: set[TcpReceiver] = field(default_factory=set)
    _wake: list[TcpReceiver] = field(default_factory=list)
    _gave_up: list[TcpReceiver] = field(default_factory=list)
    _watch_win: set[TcpReceiver] = field(default_factory=set)
    _expired: list[TcpReceiver] = field(default_factory=list)
    _ident: int = 0
    #: no timer is due before this (a lower bound: tick() scans only once it has passed)
    _due: float = float("inf")
    #: next scan of the window watch list (at most every WATCH_S)
    _watch_next: float = 0.0

    def _arm(self, t: float) -> float:
        if t < self._due:
            self._due = t
        return t

    # -- frames ----------------------------------------------------------------------------

    def take(self) -> dict[str, list[bytes]]:
        """The frames to transmit per netdev since the last call."""
        out, self.out = self.out, {}
        return out

    def _emit(self, dev: str, key: bytes, peer_mac: bytes, seq: int, ack: int, flags: int,
              window: int, options: bytes = b"", payload: bytes = b"") -> None:
        iface = self.ifaces[dev]
        self._ident = (self._ident + 1) & 0xFFFF
        frame = build_tcp(iface.mac, peer_mac, key[18:34], key[0:16],
                          int.from_bytes(key[34:36], "big"), int.from_bytes(key[16:18], "big"),
                          seq, ack, flags, window, options, ident=self._ident, payload=payload)
        self.out.setdefault(dev, []).append(frame)
        self.mib["TcpOutSegs"] += 1
        if flags & RST:
            self.mib["TcpOutRsts"] += 1

    # -- windows ---------------------------------------------------------------------------

    def space(self, sock: TcpReceiver) -> int:
        """Free receive space in bytes: rcvbuf minus unread and out-of-order bytes, capped by
        ``space_fn``."""
        free = self.rcvbuf - sock.rxq.nbytes - sock.ooo_bytes
        if self.space_fn is not None:
            cap = self.space_fn(sock)
            if cap is not None:
                o = self.conns.get(sock)
                mss = o.rcv_mss if o is not None else 1460
                free = min(free, cap[0] * min(cap[1], mss))
        return max(0, free)

    def _window(self, o: _Out) -> int:
        """The 16-bit window field to send now (``tcp_select_window``): never shrinks the
        right edge already advertised."""
        sock = o.sock
        rcv_nxt = sock.rcv_nxt
        win = self.space(sock)
        win = min(win, 0xFFFF << o.wscale) >> o.wscale << o.wscale
        keep = (o.adv_right - rcv_nxt) & _MASK
        if keep < 1 << 31 and keep > win:  # would shrink: keep the old right edge
            win = min(keep, 0xFFFF << o.wscale)
        if win == 0 and o.adv_win:
            self.mib["TcpExtTCPToZeroWindowAdv"] += 1
        elif win and not o.adv_win and o.adv_right:
            self.mib["TcpExtTCPFromZeroWindowAdv"] += 1
        o.adv_win = win
        o.adv_right = (rcv_nxt + win) & _MASK
        if win < WATCH_SEGS * o.rcv_mss:
            self._watch_win.add(sock)
        else:
            self._watch_win.discard(sock)
        return win >> o.wscale

    def _ack(self, o: _Out, flags: int = 0) -> None:
        sock = o.sock
        assert sock.key is not None
        o.acked = sock.rcv_nxt
        o.delack_at = None
        self._emit(o.dev, sock.key, o.peer_mac, o.snd_nxt, sock.rcv_nxt, ACK | flags,
                   self._window(o))

    # -- connection events -----------------------------------------------------------------

    def iss_for(self, key: bytes) -> int:
        """Our ISN for a 4-tuple: keyed hash plus a 64 ns clock (``secure_tcp_seq``)."""
        h = hashlib.blake2b(key, key=self.secret, digest_size=4).digest()
        return (int.from_bytes(h, "big") + (int(self.clock() * 1e9) >> 6)) & _MASK

    def on_syn(self, sock: TcpReceiver, dev: str, peer_mac: bytes, syn_options: bytes,
               window: int = 0xFFFF) -> None:
        """A SYN created ``sock`` (SYN_RECV): send the SYN-ACK and arm its timer.  ``window``
        is the SYN's (the peer's first send window for us, until its ACKs say more)."""
        if sock in self.conns or sock.key is None or dev not in self.ifaces:
            return
        key = sock.key
        opts = parse_tcp_options(syn_options)
        v6 = key[0:12] != _V4
        iface = self.ifaces[dev]
        mac = self.neigh.get(key[0:16], peer_mac)
        iss = self.iss_for(key)
        o = _Out(sock, dev, mac, iss, (iss + 1) & _MASK, opts.get("wscale"),
                 min(iface.mss(v6), opts.get("mss", 536)))
        o.acked = (sock.isn + 1) & _MASK  # the SYN-ACK acknowledges the SYN
        o.peer_win = window
        o.seen_segs = sock.stats.segs
        self.conns[sock] = o
        self.mib["TcpPassiveOpens"] += 1
        self._synack(o)
        o.synack_at = self._arm(self.clock() + RTO_INIT_S)
        self._timers.add(sock)

    def _synack(self, o: _Out) -> None:
        sock = o.sock
        assert sock.key is not None
        v6 = sock.key[0:12] != _V4
        options = struct.pack("!BBH", 2, 4, self.ifaces[o.dev].mss(v6))
        if o.peer_wscale is not None:
            options += struct.pack("!BBBB", 1, 3, 3, WSCALE)  # NOP, window scale
        win = min(self.space(sock), 0xFFFF)
        o.adv_win, o.adv_right = win, (sock.isn + 1 + win) & _MASK
        self._emit(o.dev, sock.key, o.peer_mac, o.iss, sock.isn + 1, SYN | ACK, win, options)

    def after_ingest(self, sock: TcpReceiver) -> None:
        """A batch went into ``sock``: send the ACKs it calls for, or arm the delayed ACK."""
        o = self.conns.get(sock)
        if o is None:
            return
        st = sock.stats
        if sock.was_established and o.synack_at is not None:
            o.synack_at = None  # the handshake completed
        if sock.state is TcpState.CLOSED:
            self._forget(sock)
            return
        new_ooo = st.ooo_segs - o.seen_ooo
        new_dup = st.dup_segs - o.seen_dup
        filled = sock.ooo_count < o.seen_ooo_held
        o.seen_ooo, o.seen_dup, o.seen_segs = st.ooo_segs, st.dup_segs, st.segs
        o.seen_ooo_held = sock.ooo_count
        if not sock.was_established:
            return  # SYN_RECV: the SYN-ACK timer speaks for us
        fin_now = sock.fin_reached and not o.fin_acked
        if new_ooo > 0:
            # one duplicate ACK per out-of-order segment (tcp_data_queue_ofo: immediate)
            for _ in range(new_ooo):
                self._ack(o)
            self.mib["TcpExtTCPDupAcksSent"] += new_ooo
            if fin_now:
                o.fin_acked = True
            return
        if fin_now:
            o.fin_acked = True
            self._ack(o)
            return
        if filled or new_dup > 0:
            self._ack(o)
            return
        pending = (sock.rcv_nxt - o.acked) & _MASK
        if pending > o.rcv_mss:
            self._ack(o)
        elif pending and o.delack_at is None:
            o.delack_at = self._arm(self.clock() + DELACK_S)
            self._timers.add(sock)

    def on_close(self, sock: TcpReceiver, unread: int) -> None:
        """The app closed ``sock`` (it already left the table): FIN, or RST if ``unread``
        bytes were never read (``TCPAbortOnClose``)."""
        o = self.conns.pop(sock, None)
        self._timers.discard(sock)
        self._watch_win.discard(sock)
        self.senders.discard(sock)
        if o is None or sock.key is None:
            return
        key = sock.key
        if sock.error is not None:
            return  # reset by the peer: nothing to say
        if unread or not sock.was_established:
            if unread:
                self.mib["TcpExtTCPAbortOnClose"] += 1
            self._emit(o.dev, key, o.peer_mac, o.snd_nxt, sock.rcv_nxt, RST | ACK, 0)
            return
        state = "LAST_ACK" if sock.fin_reached else "FIN_WAIT1"
        snd = o.snd
        if snd is not None and snd.fin_acked:
            # shut down for writing earlier and our FIN is acknowledged: FIN_WAIT2, or
            # TIME_WAIT when the peer's FIN came too
            done = sock.fin_reached
            c = _Closing("TIME_WAIT" if done else "FIN_WAIT2", o.dev, key, o.peer_mac,
                         o.snd_nxt, sock.rcv_nxt, o.wscale)
            if done:
                c.expire_at = self._arm(self.clock() + TIME_WAIT_S)
            self.closing[key] = c
            return
        if snd is not None and (snd.buf or snd.high or snd.fin):
            # data still queued or unacknowledged (or the FIN of a shutdown): it goes first,
            # then the FIN (tcp_close queues the FIN behind the write queue); the write side
            # keeps its timer
            snd.fin = True
            c = _Closing(state, o.dev, key, o.peer_mac, (snd.end + 1) & _MASK, sock.rcv_nxt,
                         o.wscale, sender=o)
            self.closing[key] = c
            self._push(o)
            return
        c = _Closing(state, o.dev, key, o.peer_mac, (o.snd_nxt + 1) & _MASK, sock.rcv_nxt,
                     o.wscale, retx_at=self._arm(self.clock() + RTO_INIT_S))
        self.closing[key] = c
        self._send_fin(c)

    def _send_fin(self, c: _Closing) -> None:
        self._emit(c.dev, c.key, c.peer_mac, (c.snd_nxt - 1) & _MASK, c.rcv_nxt, FIN | ACK,
                   min(self.rcvbuf >> c.wscale, 0xFFFF))

    def on_orphan(self, dev: str, key: bytes, src_mac: bytes, seq: int, ack: int, flags: int,
                  plen: int, window: int = 0xFFFF) -> None:
        """A segment that reached no socket and no listener: a closing connection's, or RST."""
        c = self.closing.get(key)
        if c is not None:
            self._closing_segment(c, seq, ack, flags, plen, window)
            return
        if flags & RST or dev not in self.ifaces:
            return
        mac = self.neigh.get(key[0:16], src_mac)
        if flags & ACK:
            self._emit(dev, key, mac, ack, 0, RST, 0)
        else:
            end = seq + plen + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
            self._emit(dev, key, mac, 0, end, RST | ACK, 0)

    def _closing_segment(self, c: _Closing, seq: int, ack: int, flags: int, plen: int,
                         window: int = 0xFFFF) -> None:
        if flags & RST:
            del self.closing[c.key]
            return
        o = c.sender
        if o is not None and o.snd is not None and flags & ACK:
            # the peer acknowledges what the app queued before closing (and then the FIN)
            self._snd_ack(o, ack, window, c)
            if o.snd.fin_acked:
                c.sender = None
        new_data = plen > 0 and 0 < (seq + plen - c.rcv_nxt) & _MASK < 1 << 31
        if new_data and c.state in ("FIN_WAIT1", "FIN_WAIT2"):
            # new data after the app closed: nobody will read it (tcp_rcv_state_process)
            self.mib["TcpExtTCPAbortOnData"] += 1
            self._emit(c.dev, c.key, c.peer_mac, c.snd_nxt, c.rcv_nxt, RST | ACK, 0)
            del self.closing[c.key]
            return
        if flags & ACK and ack == c.snd_nxt:
            if c.state == "LAST_ACK":
                del self.closing[c.key]
                return
            if c.state == "FIN_WAIT1":
                c.state, c.retx_at = "FIN_WAIT2", None
        if flags & FIN and seq == c.rcv_nxt and c.state in ("FIN_WAIT1", "FIN_WAIT2"):
            c.rcv_nxt = (c.rcv_nxt + 1) & _MASK
            c.state = "TIME_WAIT" if c.state == "FIN_WAIT2" else "CLOSING"
            self._emit(c.dev, c.key, c.peer_mac, c.snd_nxt, c.rcv_nxt, ACK, 0xFFFF)
            if c.state == "TIME_WAIT":
                c.expire_at = self._arm(self.clock() + TIME_WAIT_S)
            return
        if c.state == "CLOSING" and flags & ACK and ack == c.snd_nxt:
            c.state, c.retx_at = "TIME_WAIT", None
            c.expire_at = self._arm(self.clock() + TIME_WAIT_S)
            return
        if flags & FIN and c.state == "TIME_WAIT":  # a retransmitted FIN: ACK it again
            self._emit(c.dev, c.key, c.peer_mac, c.snd_nxt, c.rcv_nxt, ACK, 0xFFFF)

    def _forget(self, sock: TcpReceiver) -> None:
        self.conns.pop(sock, None)
        self._timers.discard(sock)
        self._watch_win.discard(sock)
        self.senders.discard(sock)

    def forget(self, sock: TcpReceiver) -> None:
        """Drop ``sock`` without sending anything (reset, or its netdev went away)."""
        self._forget(sock)

    # -- data transmission (tcp_sendmsg, tcp_write_xmit, tcp_ack, tcp_retransmit_timer) ----

    def send_error(self, sock: TcpReceiver) -> int | None:
        """What a send on ``sock`` reports before queueing anything (``tcp_sendmsg``'s
        checks): a pending socket error, taken once (``-ECONNRESET`` after the peer's RST,
        ``-ETIMEDOUT`` after our retransmissions ran out), then ``-EPIPE`` for a connection
        that is closed or whose write side is shut; None when sending is allowed (also in
        CLOSE_WAIT: the peer's FIN closes only its direction)."""
        if sock.error is not None:
            return -(sock.take_error() or errno.EPIPE)
        o = self.conns.get(sock)
        if sock.state is TcpState.CLOSED or o is None or (o.snd is not None and o.snd.fin):
            return -errno.EPIPE
        return None

    def send_space(self, sock: TcpReceiver) -> int:
        """Bytes ``sock``'s send queue takes now (``sk_stream_wspace``)."""
        o = self.conns.get(sock)
        if o is None:
            return 0
        return self.sndbuf - (len(o.snd.buf) if o.snd is not None else 0)

    def send(self, sock: TcpReceiver, data: bytes) -> None:
        """Queue ``data`` (at most :meth:`send_space` bytes) on ``sock`` and transmit what the
        peer's window and our congestion window allow (``tcp_sendmsg`` + ``tcp_push``)."""
        o = self.conns[sock]
        snd = o.snd
        if snd is None:
            snd = o.snd = _Snd(o.snd_nxt, o.peer_win, o.rcv_mss)
            self.senders.add(sock)
        if len(data) > self.sndbuf - len(snd.buf):
            raise InvariantBroken("send beyond the send buffer")
        snd.buf += data
        self._push(o)

    def shutdown_send(self, sock: TcpReceiver) -> None:
        """``shutdown(SHUT_WR)`` (``tcp_shutdown``): a FIN goes behind the queued data; the
        connection keeps receiving.  Later sends are ``-EPIPE``."""
        o = self.conns.get(sock)
        if o is None:
            return
        snd = o.snd
        if snd is None:
            snd = o.snd = _Snd(o.snd_nxt, o.peer_win, o.rcv_mss)
            self.senders.add(sock)
        if snd.fin:
            return
        snd.fin = True
        self._push(o)

    def on_acks(self, sock: TcpReceiver, acks: NDArray[np.uint32],
                windows: NDArray[np.uint16]) -> None:
        """The ACK numbers and windows of one batch of ``sock``'s segments (ACK set), in
        arrival order: the furthest acceptable ACK frees the send queue, the window of the
        last acceptable one is the peer's window (``tcp_ack``, ``tcp_ack_update_window``).
        Called only for :attr:`senders`."""
        o = self.conns.get(sock)
        if o is None or o.snd is None or not len(acks):
            return
        snd = o.snd
        d = (acks.astype(np.int64) - snd.una) & _MASK
        ok = np.flatnonzero(d <= snd.flight)
        if not len(ok):
            return
        best = int(ok[int(np.argmax(d[ok]))])
        self._snd_ack(o, int(acks[best]), int(windows[ok[-1]]), None)

    def _snd_ack(self, o: _Out, ack: int, window: int, c: _Closing | None) -> None:
        snd = o.snd
        assert snd is not None
        d = (ack - snd.una) & _MASK
        if d > snd.flight:
            return  # acknowledges what we never sent (or an old ACK): ignored
        snd.wnd = window << (o.peer_wscale or 0)
        now = self.clock()
        if d:
            data = min(d, len(snd.buf))
            if d > len(snd.buf):
                snd.fin_acked = True
            if snd.rtt_end is not None and d >= snd.rtt_end:
                self._rtt_sample(snd, now - snd.rtt_t0)
                snd.rtt_end = None
            elif snd.rtt_end is not None:
                snd.rtt_end -= data
            del snd.buf[:data]
            snd.una = (snd.una + data) & _MASK
            if snd.fin_acked:
                snd.fin_retx = False
            snd.high -= data
            snd.nxt = max(0, snd.nxt - data)
            snd.backoff = 0
            snd.rto_at = None
            # congestion window: slow start below ssthresh, then one segment per window
            if snd.cwnd < snd.ssthresh:
                snd.cwnd += max(1, data // snd.mss)
            else:
                snd.cwnd_acc += data
                if snd.cwnd_acc >= snd.cwnd * snd.mss:
                    snd.cwnd_acc = 0
                    snd.cwnd += 1
            snd.cwnd = min(snd.cwnd, 1 << 16)
            if c is None:
                self._wake.append(o.sock)  # room in the send queue: a blocked send goes on
        self._push(o, c)

    def _rtt_sample(self, snd: _Snd, rtt: float) -> None:
        """RFC 6298 smoothing (``tcp_rtt_estimator``), RTO clamped to [200 ms, 120 s]."""
        if snd.srtt is None:
            snd.srtt, snd.rttvar = rtt, rtt / 2
        else:
            snd.rttvar = 0.75 * snd.rttvar + 0.25 * abs(snd.srtt - rtt)
            snd.srtt = 0.875 * snd.srtt + 0.125 * rtt
        snd.rto = min(RTO_MAX_S, max(RTO_MIN_S, snd.srtt + 4 * snd.rttvar))

    def _push(self, o: _Out, c: _Closing | None = None) -> None:
        """Transmit from ``snd.nxt`` what the peer's window and the congestion window allow,
        segments of at most the peer's MSS (PSH on the one that empties the queue), then the
        FIN if one is queued; (re)arm the retransmission timer (``tcp_write_xmit``)."""
        snd = o.snd
        assert snd is not None
        if c is None:
            c = self.closing.get(o.sock.key or b"")
            if c is not None and c.sender is not o:
                c = None
        limit = min(snd.wnd, snd.cwnd * snd.mss)
        n = len(snd.buf)
        while snd.nxt < n and snd.nxt < limit:
            end = min(n, snd.nxt + snd.mss, limit)
            retx = end <= snd.high
            fin = snd.fin and end == n and (not snd.fin_sent or retx)
            self._xmit(o, c, snd.nxt, bytes(snd.buf[snd.nxt:end]), fin)
            if retx:
                self.mib["TcpRetransSegs"] += 1
            else:
                if snd.rtt_end is None and snd.backoff == 0:
                    snd.rtt_end, snd.rtt_t0 = end, self.clock()
                snd.high = end
            snd.nxt = end
        if snd.fin and snd.nxt == n and (not snd.fin_sent or snd.fin_retx):
            if snd.fin_sent:
                self.mib["TcpRetransSegs"] += 1
            self._xmit(o, c, n, b"", True)  # a bare FIN behind the data
        if snd.rto_at is not None:
            return
        if snd.flight or snd.nxt < n:  # in flight, or held back by a zero window (probe)
            snd.rto_at = self._arm(self.clock() + min(RTO_MAX_S, snd.rto * (1 << snd.backoff)))
            if c is None:
                self._timers.add(o.sock)

    def _xmit(self, o: _Out, c: _Closing | None, off: int, payload: bytes, fin: bool) -> None:
        """One segment of ``o``'s stream at offset ``off`` (ACK and window piggybacked)."""
        snd = o.snd
        assert snd is not None and o.sock.key is not None
        flags = ACK | (PSH if payload and off + len(payload) == len(snd.buf) else 0)
        if fin:
            flags |= FIN
            snd.fin_sent, snd.fin_retx = True, False
        seq = (snd.una + off) & _MASK
        top = max(snd.high, off + len(payload))
        o.snd_nxt = (snd.una + top + (1 if snd.fin_sent else 0)) & _MASK
        if c is not None:  # closed by the app: the closing record knows rcv_nxt
            self._emit(o.dev, c.key, o.peer_mac, seq, c.rcv_nxt, flags,
                       min(self.rcvbuf >> c.wscale, 0xFFFF), payload=payload)
        else:
            sock = o.sock
            assert sock.key is not None
            o.acked = sock.rcv_nxt
            o.delack_at = None
            self._emit(o.dev, sock.key, o.peer_mac, seq, sock.rcv_nxt, flags,
                       self._window(o), payload=payload)

    def _snd_timer(self, o: _Out, now: float, c: _Closing | None) -> bool:
        """The retransmission timer of ``o`` fired (``tcp_retransmit_timer``,
        ``tcp_probe_timer``).  Returns False when the connection was given up."""
        snd = o.snd
        assert snd is not None
        snd.rto_at = None
        if snd.flight == 0:
            if snd.nxt < len(snd.buf):
                # zero window and nothing in flight: probe with an old sequence number, the
                # peer answers with its window (tcp_xmit_probe_skb)
                self.mib["TcpExtTCPWinProbe"] += 1
                key = c.key if c is not None else o.sock.key
                assert key is not None
                self._emit(o.dev, key, o.peer_mac, (snd.una - 1) & _MASK,
                           c.rcv_nxt if c is not None else o.sock.rcv_nxt, ACK,
                           min(self.rcvbuf >> c.wscale, 0xFFFF) if c is not None
                           else self._window(o))
                snd.backoff = min(snd.backoff + 1, 10)
                snd.rto_at = self._arm(now + min(RTO_MAX_S, snd.rto * (1 << snd.backoff)))
            return True
        if snd.backoff >= SEND_RETRIES:
            self.mib["TcpExtTCPAbortOnTimeout"] += 1
            return False
        snd.backoff += 1
        self.mib["TcpExtTCPTimeouts"] += 1
        # go back to the first unacknowledged segment; the congestion window restarts at one
        snd.ssthresh = max(2, snd.flight // snd.mss // 2)
        snd.cwnd, snd.cwnd_acc = 1, 0
        snd.nxt = 0
        snd.rtt_end = None  # Karn: no RTT sample from a retransmitted segment
        snd.fin_retx = snd.fin_sent and not snd.fin_acked
        self._push(o, c)
        return True

    def _give_up(self, o: _Out) -> None:
        """Retransmissions ran out (``tcp_write_err``): the socket errs with ETIMEDOUT and is
        closed; the kernel unhashes it (:meth:`gave_up`)."""
        sock = o.sock
        self._forget(sock)
        if sock.state is not TcpState.CLOSED:
            sock.error = errno.ETIMEDOUT
            sock.state = TcpState.CLOSED
        self._gave_up.append(sock)
        self._wake.append(sock)

    def gave_up(self) -> list[TcpReceiver]:
        """Connections given up since the last call (ETIMEDOUT; the kernel unhashes them)."""
        out, self._gave_up = self._gave_up, []
        return out

    def take_wakes(self) -> list[TcpReceiver]:
        """Sockets whose send queue got room or that failed, since the last call (their
        armed requests run again)."""
        out, self._wake = self._wake, []
        return out

    # -- ARP / NDP -------------------------------------------------------------------------

    def on_ctl_frame(self, dev: str, frame: bytes) -> None:
        """An ARP or ICMPv6 frame for netdev ``dev``: answer requests for its addresses."""
        iface = self.ifaces.get(dev)
        if iface is None:
            return
        if iface.addr4 is not None:
            r = arp_reply(frame, iface.mac, iface.addr4[12:])
            if r is not None:
                reply, spa, sha = r
                self.neigh[_V4 + spa] = sha
                self.out.setdefault(dev, []).append(reply)
                self.mib["ArpOutReplies"] += 1
                return
        if iface.addr6 is not None:
            n = na_reply(frame, iface.mac, iface.addr6)
            if n is not None:
                reply, src, mac = n
                self.mib["Icmp6InNeighborSolicits"] += 1
                if src != bytes(16):
                    self.neigh[src] = mac
                self.out.setdefault(dev, []).append(reply)
                self.mib["Icmp6OutNeighborAdvertisements"] += 1

    # -- time ------------------------------------------------------------------------------

    def tick(self) -> None:
        """Fire due timers (delayed ACK, SYN-ACK and FIN retransmission, TIME_WAIT) and send
        window updates to watched sockets whose window reopened.  Cheap when nothing is due:
        the timers are scanned only once the earliest may have expired, the watch list at
        most every :data:`WATCH_S`."""
        now = self.clock()
        if self._watch_win and now >= self._watch_next:
            self._watch_next = now + WATCH_S
            self._watch(now)
        if now < self._due:
            return
        self._due = float("inf")
        for sock in list(self._timers):
            o = self.conns.get(sock)
            if o is None:
                self._timers.discard(sock)
                continue
            if o.synack_at is not None and now >= o.synack_at:
                if o.synack_tries >= SYNACK_RETRIES:
                    self.mib["TcpExtTCPSynAckDropped"] += 1
                    self._forget(sock)
                    self._expired.append(sock)
                    continue
                o.synack_tries += 1
                self.mib["TcpRetransSegs"] += 1
                self.mib["TcpExtTCPSynRetrans"] += 1
                self._synack(o)
                o.synack_at = now + RTO_INIT_S * (1 << o.synack_tries)
            if o.synack_at is not None:
                self._arm(o.synack_at)
            if o.delack_at is not None and now >= o.delack_at:
                if (sock.rcv_nxt - o.acked) & _MASK:
                    self.mib["TcpExtDelayedACKs"] += 1
                    self._ack(o)
                o.delack_at = None
            if o.delack_at is not None:
                self._arm(o.delack_at)
            snd = o.snd
            if snd is not None and snd.rto_at is not None:
                if now >= snd.rto_at and not self._snd_timer(o, now, None):
                    self._give_up(o)
                    continue
                if snd.rto_at is not None:
                    self._arm(snd.rto_at)
            if o.synack_at is None and o.delack_at is None and (
                    snd is None or snd.rto_at is None):
                self._timers.discard(sock)
        for key, c in list(self.closing.items()):
            if c.expire_at is not None and now >= c.expire_at:
                del self.closing[key]
                continue
            o = c.sender
            if o is not None and o.snd is not None and o.snd.rto_at is not None:
                if now >= o.snd.rto_at and not self._snd_timer(o, now, c):
                    del self.closing[key]
                    continue
                if o.snd.rto_at is not None:
                    self._arm(o.snd.rto_at)
            if c.retx_at is not None and now >= c.retx_at:
                if c.tries >= FIN_RETRIES:
                    del self.closing[key]
                    continue
                c.tries += 1
                self.mib["TcpRetransSegs"] += 1
                self._send_fin(c)
                c.retx_at = now + RTO_INIT_S * (1 << c.tries)
            for t in (c.retx_at, c.expire_at):
                if t is not None:
                    self._arm(t)

    def _watch(self, now: float) -> None:
        for sock in list(self._watch_win):
            o = self.conns.get(sock)
            if o is None or not sock.was_established:
                self._watch_win.discard(sock)
                continue
            free = self.space(sock)
            if free >= 2 * o.adv_win and free - o.adv_win >= o.rcv_mss:
                self.mib["TcpExtTCPWindowUpdates"] += 1
                self._ack(o)

    def expired(self) -> list[TcpReceiver]:
        """Embryonic connections whose SYN-ACK retries ran out since the last call (the
        kernel closes them: ``SocketTable.close``)."""
        out, self._expired = self._expired, []
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`tick` may have something to do (possibly early), or None."""
        t = self._due
        if self._watch_win:
            t = min(t, self._watch_next)
        return None if t == float("inf") else t
