"""Pcap in: a capture file replayed onto the NIC's wire (``zcrx traffic --pcap FILE``).

Owned by the NIC process: the launcher passes the file's path over the control plane
and the NIC reads it here (DESIGN §1: no payload ever crosses zmq).  The file is read
and classified once, when the source is added, with dpkt (pcap and pcapng, Ethernet
link type, with or without 802.1Q tags); the frames to replay end up as rows of one
padded ``uint8`` array, so the hot path is a row gather per batch and the NIC's generic
MAC path (:func:`nic_proc.sources.parse_raw`) does the rest.

What is replayed, and what a real capture brings along:

* **Which packets.**  A flow filter ``dst`` (``ADDR:PORT``, ``ADDR`` or ``:PORT``) keeps
  the TCP packets sent to that endpoint.  Without one, every TCP packet addressed to a
  *receiver* is kept: the endpoint a SYN (without ACK) was sent to, or, for a connection
  whose handshake is not in the capture, the side that received more payload bytes.
* **The other direction** (pure ACKs and anything the receiver sent) is not replayed: the
  emulated NIC receives, it does not answer.  Counted in ``other_direction``.
* **Mid-stream starts.**  A flow whose first kept packet is not a SYN gets a SYN made up
  just before its first byte (``seq - 1``), so the kernel's listener takes it as a new
  connection (as our generated senders' SYNs are): counted in ``syn_added``.  Without it
  Linux would answer "no socket" and the bytes would be lost.
* **Retransmissions and reordering** are replayed as captured; the kernel's TCP drops
  duplicates and reassembles, as Linux does.  Segments whose bytes the flow already
  carried are counted in ``retransmits``.
* **No FIN.**  Flows without a FIN or RST are counted in ``no_fin``; the receiver then
  sees no end of stream, as it would on Linux.
* **VLAN tags** are stripped (hardware VLAN stripping): counted in ``vlan``.
* **Snapped frames** (captured length below the wire length) cannot be replayed and are
  counted in ``snapped``; non-TCP frames in ``not_tcp``.

``rewrite=True`` writes the netdev's own MAC and address (IPv4 or IPv6, as the packet)
as the destination and the emulated peer's MAC as the source, fixing the checksums; the
sources' addresses stay, so connections stay apart.  Pacing: ``speed`` 0 sends as fast
as the queues take it; ``speed`` X > 0 sends packet ``i`` at ``(ts_i - ts_0) / X``
after the first poll.
"""

from __future__ import annotations

import errno
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from nic_proc.dma import Frames
from nic_proc.sources import Blocked, RawBatch, Source, WireInfo
from shared.errors import Misuse

__all__ = ["PcapSource", "ReplayPlan", "load_pcap", "parse_dst"]

#: Frames per replay batch.
PCAP_BATCH = 64
#: Largest capture the NIC reads (bytes of file).
MAX_PCAP_BYTES = 1 << 30
_DLT_EN10MB = 1
_TCP_SYN, _TCP_FIN, _TCP_RST, _TCP_ACK = 0x02, 0x01, 0x04, 0x10


def parse_dst(text: str) -> tuple[str | None, int | None]:
    """``ADDR:PORT``, ``[ADDR6]:PORT``, ``ADDR`` or ``:PORT`` -> (address or None, port or None).

    :class:`Misuse` (EINVAL) for anything else.
    """
    t = text.strip()
    addr: str | None
    port: str | None
    if t.startswith("["):
        a, sep, rest = t[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise Misuse(f"--dst {text!r}: expected [ADDR6]:PORT", errno.EINVAL)
        addr, port = a, (rest[1:] or None)
    elif t.count(":") == 1:
        a, _, p = t.partition(":")
        addr, port = (a or None), (p or None)
    else:
        addr, port = (t or None), None
    try:
        if addr is not None:
            addr = str(ipaddress.ip_address(addr))
        pn = int(port) if port is not None else None
    except ValueError:
        raise Misuse(f"--dst {text!r}: not ADDR:PORT", errno.EINVAL) from None
    if pn is not None and not 0 < pn <= 0xFFFF:
        raise Misuse(f"--dst {text!r}: bad port", errno.EINVAL)
    if addr is None and pn is None:
        raise Misuse(f"--dst {text!r}: empty filter", errno.EINVAL)
    return addr, pn


@dataclass
class ReplayPlan:
    """The frames of a capture to replay, and what was left out (counters by name)."""

    rows: npt.NDArray[np.uint8]  #: (n, width) frame bytes, zero padded
    lengths: npt.NDArray[np.int64]
    times: npt.NDArray[np.float64]  #: seconds after the first kept packet
    counts: dict[str, int] = field(default_factory=dict)
    flows: int = 0


_CLASSIC = {  # magic -> (byte order, fraction of a second per timestamp unit)
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
_PCAPNG = b"\x0a\x0d\x0d\x0a"


def _not_ethernet(path: str, dl: int) -> Misuse:
    return Misuse(f"{path}: link type {dl} is not Ethernet (capture with -i DEV, not -i any)",
                  errno.EINVAL)


def _classic_records(path: str, data: bytes) -> list[tuple[float, bytes, int]]:
    """Records of a classic pcap file, read in one pass (dpkt's reader hides the wire
    length and stops silently at a record cut short; both matter here)."""
    order, unit = _CLASSIC[data[:4]]
    if len(data) < 24:
        raise Misuse(f"{path}: not a pcap or pcapng capture (short header)", errno.EINVAL)
    dl = int.from_bytes(data[20:24], "little" if order == "<" else "big") & 0x0FFFFFFF
    if dl != _DLT_EN10MB:
        raise _not_ethernet(path, dl)
    hdr = np.dtype([("sec", order + "u4"), ("frac", order + "u4"),
                    ("caplen", order + "u4"), ("len", order + "u4")])
    out: list[tuple[float, bytes, int]] = []
    pos, end = 24, len(data)
    while pos < end:
        if end - pos < 16:
            raise Misuse(f"{path}: truncated capture ({end - pos} stray byte(s) after "
                         f"{len(out)} packet(s))", errno.EINVAL)
        h = np.frombuffer(data, hdr, 1, pos)[0]
        cap = int(h["caplen"])
        if pos + 16 + cap > end:
            raise Misuse(f"{path}: truncated or corrupt capture after {len(out)} "
                         f"packet(s) (short record)", errno.EINVAL)
        out.append((int(h["sec"]) + int(h["frac"]) * unit, data[pos + 16:pos + 16 + cap],
                    int(h["len"])))
        pos += 16 + cap
    return out


def _records(path: str) -> list[tuple[float, bytes, int]]:
    """(timestamp, captured bytes, wire length) of every record (:class:`Misuse` on bad input)."""
    import io

    import dpkt

    try:
        size = os.path.getsize(path)
        if size > MAX_PCAP_BYTES:
            raise Misuse(f"{path}: larger than {MAX_PCAP_BYTES >> 20} MiB", errno.EFBIG)
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise Misuse(f"{path}: {e.strerror}", e.errno or errno.EINVAL) from None
    if len(data) < 4:
        raise Misuse(f"{path}: empty or truncated capture (no pcap header)", errno.EINVAL)
    if data[:4] in _CLASSIC:
        return _classic_records(path, data)
    if data[:4] != _PCAPNG:
        raise Misuse(f"{path}: not a pcap or pcapng capture (bad header)", errno.EINVAL)
    out: list[tuple[float, bytes, int]] = []
    try:
        r = dpkt.pcapng.Reader(io.BytesIO(data))
        dl = r.datalink()
        if dl != _DLT_EN10MB:
            raise _not_ethernet(path, dl)
        for ts, buf in r:
            out.append((float(ts), bytes(buf), len(buf)))
    except (ValueError, dpkt.dpkt.Error, EOFError) as e:
        raise Misuse(f"{path}: truncated or corrupt capture after {len(out)} "
                     f"packet(s) ({e or 'short record'})", errno.EINVAL) from None
    return out


def load_pcap(path: str, info: WireInfo, *, dst: str | None = None,
              rewrite: bool = False) -> ReplayPlan:
    """Read and classify a capture; the frames to replay in capture order.

    :class:`Misuse` (EINVAL) with one line for a missing, empty, truncated or garbage
    file, a non-Ethernet capture, or a capture with no TCP packet to replay.
    """
    import dpkt

    want_addr, want_port = parse_dst(dst) if dst else (None, None)
    recs = _records(path)
    if not recs:
        raise Misuse(f"{path}: the capture holds no packet", errno.EINVAL)
    counts = dict.fromkeys(("packets", "not_tcp", "vlan", "snapped", "other_direction",
                            "filtered_out", "syn_added", "retransmits", "no_fin"), 0)
    counts["packets"] = len(recs)
    pkts: list[tuple[float, Any, Any, Any, str, str]] = []
    for ts, buf, wlen in recs:
        try:
            eth = dpkt.ethernet.Ethernet(buf)
        except (dpkt.dpkt.Error, ValueError):
            counts["not_tcp"] += 1
            continue
        ip = eth.data
        if not isinstance(ip, dpkt.ip.IP | dpkt.ip6.IP6) or not isinstance(ip.data,
                                                                           dpkt.tcp.TCP):
            counts["not_tcp"] += 1
            continue
        if wlen > len(buf):
            counts["snapped"] += 1
            continue
        if getattr(eth, "vlan_tags", None):
            counts["vlan"] += 1
        fam = 6 if isinstance(ip, dpkt.ip6.IP6) else 4
        conv = ipaddress.IPv6Address if fam == 6 else ipaddress.IPv4Address
        pkts.append((ts, eth, ip, ip.data, str(conv(ip.src)), str(conv(ip.dst))))
    if not pkts:
        raise Misuse(f"{path}: no TCP packet in the capture ({len(recs)} packet(s))",
                     errno.EINVAL)

    # Receivers: endpoints a SYN was sent to; else the side with more payload per connection.
    receivers: set[tuple[str, int]] = set()
    bytes_to: dict[tuple[str, int, str, int], int] = {}
    for _ts, _eth, _ip, tcp, s, d in pkts:
        if tcp.flags & _TCP_SYN and not tcp.flags & _TCP_ACK:
            receivers.add((d, tcp.dport))
        k = (s, tcp.sport, d, tcp.dport)
        bytes_to[k] = bytes_to.get(k, 0) + len(tcp.data)
    for (s, sp, d, dp), n in bytes_to.items():
        if (s, sp) in receivers or (d, dp) in receivers:
            continue
        if n > 0 and n >= bytes_to.get((d, dp, s, sp), 0):
            receivers.add((d, dp))

    def kept(d: str, dp: int) -> bool:
        if want_addr is None and want_port is None:
            return (d, dp) in receivers
        return (want_addr is None or d == want_addr) and (want_port is None or dp == want_port)

    frames: list[bytes] = []
    times: list[float] = []
    seen: dict[tuple[str, int, str, int], int] = {}  # flow -> highest seq end (unwrapped)
    ended: set[tuple[str, int, str, int]] = set()
    for ts, eth, ip, tcp, s, d in pkts:
        k = (s, tcp.sport, d, tcp.dport)
        if not kept(d, tcp.dport):
            rk = (d, tcp.dport, s, tcp.sport)
            counts["other_direction" if (s, tcp.sport) in receivers or rk in seen
                   else "filtered_out"] += 1
            continue
        if tcp.flags & (_TCP_FIN | _TCP_RST):
            ended.add(k)
        end = tcp.seq + len(tcp.data) + (1 if tcp.flags & (_TCP_SYN | _TCP_FIN) else 0)
        if k not in seen:
            if not tcp.flags & _TCP_SYN:
                counts["syn_added"] += 1
                syn = dpkt.tcp.TCP(sport=tcp.sport, dport=tcp.dport,
                                   seq=(tcp.seq - 1) & 0xFFFFFFFF, flags=_TCP_SYN,
                                   win=tcp.win)
                frames.append(_frame(eth, ip, syn, info, rewrite))
                times.append(ts)
            seen[k] = tcp.seq
        elif len(tcp.data) and not 0 < ((end - seen[k]) & 0xFFFFFFFF) < 0x80000000:
            counts["retransmits"] += 1  # every byte already carried
        if ((end - seen[k]) & 0xFFFFFFFF) < 0x80000000:
            seen[k] = end & 0xFFFFFFFF
        frames.append(_frame(eth, ip, tcp, info, rewrite))
        times.append(ts)
    if not frames:
        what = f"for --dst {dst}" if dst else "addressed to a receiver"
        raise Misuse(f"{path}: no TCP packet {what} in the capture", errno.EINVAL)
    counts["no_fin"] = len(set(seen) - ended)
    width = max(len(f) for f in frames)
    rows = np.zeros((len(frames), width), np.uint8)
    lengths = np.array([len(f) for f in frames], np.int64)
    for i, fb in enumerate(frames):
        rows[i, :len(fb)] = np.frombuffer(fb, np.uint8)
    t = np.asarray(times, np.float64)
    return ReplayPlan(rows, lengths, t - t[0], counts, len(seen))


def _frame(eth: Any, ip: Any, tcp: Any, info: WireInfo, rewrite: bool) -> bytes:
    """The frame as the NIC gets it: VLAN tags stripped, addresses rewritten if asked."""
    import dpkt

    v6 = isinstance(ip, dpkt.ip6.IP6)
    if rewrite:
        ip.dst = ipaddress.ip_address(info.addr6 if v6 else info.addr).packed
        src, dstm = info.peer_mac, info.mac
        tcp.sum = 0
        if not v6:
            ip.sum = 0
    else:
        src, dstm = eth.src, eth.dst
    if ip.data is not tcp:  # a made-up segment (the SYN of a mid-stream flow)
        ip = dpkt.ip6.IP6(src=ip.src, dst=ip.dst, nxt=6, hlim=ip.hlim, data=tcp,
                          plen=len(tcp)) if v6 else dpkt.ip.IP(
            src=ip.src, dst=ip.dst, p=6, ttl=ip.ttl, data=tcp)
        tcp.sum = 0
    if v6:
        ip.plen = len(ip.data) + sum(len(bytes(h)) for h in getattr(ip, "extension_hdrs",
                                                                     {}).values() if h)
    else:
        ip.len = 20 + len(ip.opts) + len(ip.data)
    etype = dpkt.ethernet.ETH_TYPE_IP6 if v6 else dpkt.ethernet.ETH_TYPE_IP
    return bytes(dstm) + bytes(src) + etype.to_bytes(2, "big") + bytes(ip)


class PcapSource(Source):
    """Replays the frames of a :class:`ReplayPlan` in capture order, paced or not."""

    kind = "pcap"

    def __init__(self, source_id: int, info: WireInfo, path: str, *,
                 dst: str | None = None, rewrite: bool = False, speed: float = 0.0,
                 batch: int = PCAP_BATCH) -> None:
        """Read ``path`` now (:class:`Misuse` with one line on bad input)."""
        super().__init__(source_id, info)
        if speed < 0:
            raise Misuse(f"--speed {speed}: must be >= 0", errno.EINVAL)
        self.path = path
        self.plan = load_pcap(path, info, dst=dst, rewrite=rewrite)
        self.speed = speed
        self.batch = batch
        self.pending = np.arange(len(self.plan.lengths), dtype=np.intp)
        self._last: npt.NDArray[np.intp] | None = None
        self._t0: float | None = None

    @property
    def done(self) -> bool:
        return self.stopped or self.pending.shape[0] == 0

    def poll(self, blocked: Blocked | None = None, now: float | None = None
             ) -> RawBatch | None:
        if self.done:
            return None
        take = self.pending[: self.batch]
        if self.speed > 0 and now is not None:
            if self._t0 is None:
                self._t0 = now
            due = (now - self._t0) * self.speed
            k = int(np.searchsorted(self.plan.times[take], due, side="right"))
            if k == 0:
                return None
            take = take[:k]
        self._last = take
        p = self.plan
        w = p.rows.shape[1]
        return RawBatch(p.rows[take].reshape(-1), np.arange(take.shape[0], dtype=np.int64) * w,
                        p.lengths[take])

    def commit(self, batch: Frames | RawBatch, consumed: npt.NDArray[np.bool_]) -> None:
        take, self._last = self._last, None
        if take is None:
            return
        k = take.shape[0]
        took = take[consumed[:k]]
        self.frames_sent += int(took.shape[0])
        self.bytes_sent += int(self.plan.lengths[took].sum())
        if took.shape[0] == k:
            self.pending = self.pending[k:]
        else:
            self.pending = np.concatenate((take[~consumed[:k]], self.pending[k:]))

    def progress(self) -> dict[str, Any]:
        out = super().progress()
        out.update({"path": self.path, "replay": len(self.plan.lengths),
                    "left": int(self.pending.shape[0]), "flows": self.plan.flows,
                    "speed": self.speed, **self.plan.counts})
        return out

