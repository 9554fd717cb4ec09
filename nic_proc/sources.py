"""Traffic sources: what arrives on the NIC's wire (the emulated TCP senders).

The wire has no real sender (DESIGN §9): these classes model it.  A source hands
the NIC a batch of frames at a time (:meth:`Source.poll`) and is told afterwards
which of them the NIC took off the wire (:meth:`Source.commit`).  Frames the NIC
did not take (its queue had no buffer and paused the source, 802.3x) are offered
again, byte for byte, on a later poll: a paused source resumes exactly where it
stopped, so nothing is lost or re-sent.  The NIC steers every flow to one queue
and places a queue's frames strictly in order, so the frames it takes of one flow
are always a prefix of that flow's frames in the batch; sources rely on that.

Sources (all pure logic plus, for the gateway, non-blocking sockets):

* :class:`Generator` -- K TCP flows carrying :mod:`shared.pattern` bytes.
* :class:`WireGateway` -- a real TCP listener on loopback; each accepted
  connection becomes one emulated flow (``nc 127.0.0.1 PORT < file`` works).
* :class:`RawSource` -- ready-made frames (a pcap replay, tests), which the NIC
  parses with :func:`parse_raw` (the generic MAC path).

Addresses (the defaults of :class:`WireInfo`, chosen for this emulator): netdev
number ``d`` (0 for ``eth0``) has IPv4 ``10.0.d.1``, IPv6 ``fd00:0:0:d::1`` and
MAC ``02:00:00:00:dd:01``; generated flows come from one peer host, the netdev's
address + 1 (``10.0.d.2``, ``fd00:0:0:d::2``, MAC ``02:00:00:00:dd:02``), and differ
by source port.

Stream ids: **the pattern stream of a generated flow is its TCP source port**, so a
receiver that knows the connection's 4-tuple (it accepted it) verifies any chunk
from its stream offset alone: ``pattern.verify(sport, offset, data)``.  Source
ports are ``sport, sport + 1, ...`` (default base ``20000 + 1024 * (source id %
40)``), so flows of one generator never share a stream.

Sequence numbers follow :mod:`shared.wire`: the SYN has ``seq = isn``, the byte at
stream offset ``o`` has ``seq = isn + 1 + o``, the FIN after ``n`` bytes has
``seq = isn + 1 + n``.  Every segment but the SYN carries ACK.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from nic_proc.dma import GRO_MAX_SEGS, Frames
from nic_proc.rss import Flows
from shared import pattern, wire
from shared.errors import Misuse

__all__ = [
    "DEFAULT_BATCH",
    "MAX_BATCH",
    "Blocked",
    "FrameBuilder",
    "Generator",
    "GeneratorSpec",
    "RawBatch",
    "RawSource",
    "Source",
    "WireGateway",
    "WireInfo",
    "default_batch",
    "flows_of",
    "parse_raw",
]

#: Frames per generator batch unless the spec says otherwise: this many at least, and more
#: for small segments, up to :data:`DEFAULT_BATCH_BYTES` of payload (:func:`default_batch`).
DEFAULT_BATCH = 512
#: Payload bytes a default batch of small segments carries at most.
DEFAULT_BATCH_BYTES = 256 << 10
#: The largest batch a spec may ask for.
MAX_BATCH = 4096
#: Payload bytes a default batch carries at most when the device coalesces (HW-GRO).
GRO_BATCH_BYTES = 3 << 20


def default_batch(seg: int, gro_room: int = 0) -> int:
    """Frames per batch for ``seg``-byte segments when the spec does not say: 512, or up to
    4096 small segments (256 KiB of payload).  Each batch costs the NIC a fixed number of
    numpy calls; at 64 bytes a batch of 512 is mostly that fixed cost.

    With HW-GRO on the device (``gro_room``: the bytes of one flow an rx buffer takes, its
    rx-buf-len), a buffer holds up to :data:`~nic_proc.dma.GRO_MAX_SEGS` segments and a
    batch of 512 frames is a handful of completions: the batch grows by the segments per
    buffer, up to :data:`GRO_BATCH_BYTES` of payload.  Without coalescing, bigger batches
    only delay the kernel's first completions (4 KiB segments: 1.5-1.8 GB/s at 512 a batch,
    1.1-1.3 at 1024)."""
    seg = max(1, seg)
    base = max(DEFAULT_BATCH, min(MAX_BATCH, DEFAULT_BATCH_BYTES // seg))
    per_buf = min(GRO_MAX_SEGS, gro_room // seg)
    if per_buf < 2:
        return base
    return max(base, min(MAX_BATCH, base * per_buf, GRO_BATCH_BYTES // seg))


#: Most flows one generator drives.
MAX_FLOWS = 4096
#: Per-flow entries listed in a progress report (the control header is bounded).
MAX_PROGRESS_FLOWS = 64
_UNBOUNDED = 1 << 62
_S_SYN, _S_DATA, _S_DONE = 0, 1, 2
_STATE_NAMES = ("syn", "data", "done")

Blocked = Callable[[Flows, Hashable | None], npt.NDArray[np.bool_]]
"""``blocked(flows, key)``: per flow of the table, True if its queue is paused."""


@dataclass(frozen=True)
class WireInfo:
    """What a source needs to know about the netdev it feeds."""

    name: str = "eth0"
    index: int = 0
    mtu: int = 4096
    addr: str = ""
    addr6: str = ""
    mac: bytes = b""

    def __post_init__(self) -> None:
        d = self.index
        if not self.addr:
            object.__setattr__(self, "addr", f"10.0.{d}.1")
        if not self.addr6:
            object.__setattr__(self, "addr6", str(ipaddress.IPv6Address(f"fd00:0:0:{d:x}::1")))
        if not self.mac:
            object.__setattr__(self, "mac", bytes([2, 0, 0, 0, d & 0xFF, 1]))

    @property
    def peer_mac(self) -> bytes:
        """MAC of the emulated peer that sends the traffic."""
        return bytes([2, 0, 0, 0, self.index & 0xFF, 2])


def flows_of(spec: wire.FlowSpec) -> Flows:
    """The steering view of a :class:`shared.wire.FlowSpec` (IPv4 moved to bytes 0..3)."""
    v4 = spec.family == wire.FAMILY_V4
    src = spec.src_addr.copy()
    dst = spec.dst_addr.copy()
    for a, b in ((src, spec.src_addr), (dst, spec.dst_addr)):
        a[v4, :4] = b[v4, 12:]
        a[v4, 4:] = 0
    return Flows(src, dst, spec.sport, spec.dport, ~v4)


class FrameBuilder:
    """Builds :class:`~nic_proc.dma.Frames` batches for the flows of one FlowSpec.

    Headers come from :func:`shared.wire.build_frames` (payload not filled) into a
    reused scratch array; payload rows are either the flows' pattern bytes (one
    gather) or rows the caller supplies (the gateway's socket buffer).
    """

    def __init__(self, spec: wire.FlowSpec, max_batch: int, max_payload: int,
                 key: Hashable | None = None) -> None:
        """Prepare for batches of up to ``max_batch`` frames of ``max_payload`` bytes."""
        self.spec = spec
        self.flows = flows_of(spec)
        self.key = key
        self.hlen = np.where(spec.family == wire.FAMILY_V6, wire.FRAME6_HLEN,
                             wire.FRAME4_HLEN).astype(np.int64)
        self._hmax = int(self.hlen.max()) if len(spec) else wire.FRAME4_HLEN
        self._uniform_h = len(spec) > 0 and int(self.hlen.min()) == self._hmax
        self._phase = pattern.phases(spec.stream)
        width = max(self._hmax + max_payload, wire.ETH_ZLEN)
        self._scratch = np.empty((max_batch, width), np.uint8)
        self.max_payload = max_payload
        self.max_batch = max_batch
        # Full-segment templates (build_data), made on first use.
        self._tmpl_seg = -1
        self._tmpl = np.empty((0, 0), np.uint8)
        self._hbuf = np.empty((max_batch, self._hmax), np.uint8)
        fam6 = len(spec) > 0 and int(spec.family[0]) == wire.FAMILY_V6
        hdr_dt = wire.FRAME6_HDR if fam6 else wire.FRAME4_HDR
        assert hdr_dt.fields is not None and wire.TCPHDR.fields is not None
        so = hdr_dt.fields["tcp"][1] + wire.TCPHDR.fields["seq"][1]
        self._seqv = self._hbuf[:, so:so + 4].view(">u4")
        self._isn1 = spec.isn.astype(np.int64) + 1
        self._flow0 = np.zeros(max_batch, np.intp)

    def build(self, flow: npt.NDArray[np.intp], offset: npt.NDArray[np.int64],
              length: npt.NDArray[np.int64], flags: npt.ArrayLike,
              pay: npt.NDArray[np.uint8] | None = None) -> Frames:
        """Frames for ``(flow, stream offset, payload length, tcp flags)`` per entry.

        ``pay`` (``(n, >= max length)`` rows) replaces the pattern payload.  The
        returned batch views the builder's scratch: use it before the next build.
        """
        n = int(flow.shape[0])
        if n > self._scratch.shape[0] or (n and int(length.max()) > self.max_payload):
            raise Misuse(f"batch of {n} frames / {int(length.max()) if n else 0} bytes "
                         f"exceeds the builder's {self._scratch.shape[0]} / {self.max_payload}")
        flen = wire.build_frames(self.spec, self._scratch, flow, offset, length, flags,
                                 ip_id=0, fill_payload=False).astype(np.int64)
        lo = int(length.min()) if n else 0
        hi = int(length.max()) if n else 0
        if pay is None:
            pos = (offset % pattern.PERIOD) + self._phase[flow]
            pay = pattern.rows_at(pos, hi)
        hl = (np.full(n, self._hmax, np.int64) if self._uniform_h else self.hlen[flow])
        uniform = None
        if self._uniform_h and lo == hi:
            uniform = (self._hmax, hi, max(self._hmax + hi, wire.ETH_ZLEN))
        return Frames(self._scratch[:n, :self._hmax], hl, pay, length, flen, flow,
                      self.flows, self.key, uniform)

    def build_data(self, flow: npt.NDArray[np.intp], offset: npt.NDArray[np.int64],
                   seg: int) -> Frames:
        """Full ``seg``-byte ACK segments of one family, from per-flow header templates.

        Identical bytes to :meth:`build` with ``flags=ACK`` (the IPv4 id is 0 in both,
        so a flow's headers differ only in the TCP sequence number, patched in place);
        a handful of numpy calls instead of a full header build.
        """
        n = int(flow.shape[0])
        if not self._uniform_h or n > self.max_batch or seg > self.max_payload:
            raise Misuse("build_data needs one address family and a batch that fits")
        k = len(self.spec)
        if self._tmpl_seg != seg:
            tmp = np.empty((k, max(self._hmax + seg, wire.ETH_ZLEN)), np.uint8)
            wire.build_frames(self.spec, tmp, np.arange(k), 0, seg, wire.TCP_ACK, ip_id=0,
                              fill_payload=False)
            self._tmpl = tmp[:, :self._hmax].copy()
            self._tmpl_seg = seg
            self._c_hl = np.full(self.max_batch, self._hmax, np.int64)
            self._c_pl = np.full(self.max_batch, seg, np.int64)
            self._c_fl = np.full(self.max_batch, max(self._hmax + seg, wire.ETH_ZLEN), np.int64)
        hdr = self._hbuf[:n]
        if k == 1:
            hdr[...] = self._tmpl[0]
            seq = offset + int(self._isn1[0])
            pos = offset % pattern.PERIOD + int(self._phase[0])
        else:
            np.take(self._tmpl, flow, axis=0, out=hdr)
            seq = offset + self._isn1[flow]
            pos = offset % pattern.PERIOD + self._phase[flow]
        self._seqv[:n, 0] = seq & 0xFFFFFFFF
        pay = pattern.rows_at(pos, seg)
        fl = int(self._c_fl[0])
        return Frames(hdr, self._c_hl[:n], pay, self._c_pl[:n], self._c_fl[:n], flow,
                      self.flows, self.key, (self._hmax, seg, fl))


# ------------------------------------------------------------------------------ sources


class Source(ABC):
    """One traffic source attached to a netdev.  Owned and driven by the NIC loop."""

    kind = "source"

    def __init__(self, source_id: int, info: WireInfo) -> None:
        self.id = source_id
        self.info = info
        #: frames and payload bytes the NIC took from this source
        self.frames_sent = 0
        self.bytes_sent = 0
        self.stopped = False
        #: bytes of one flow an rx buffer of the device takes (its rx-buf-len) while HW-GRO
        #: is on, else 0: set by the NIC before each :meth:`poll`, for sizing batches
        self.gro_room = 0

    @property
    def dev(self) -> str:
        return self.info.name

    @abstractmethod
    def poll(self, blocked: Blocked | None = None, now: float | None = None
             ) -> Frames | RawBatch | None:
        """The next batch, or None when there is nothing to send right now.

        Flows for which ``blocked`` says True are not offered (their queue waits for
        buffers).  The batch stays valid until :meth:`commit`.
        """

    @abstractmethod
    def commit(self, batch: Frames | RawBatch, consumed: npt.NDArray[np.bool_]) -> None:
        """Which frames of the last batch the NIC took (per flow: a prefix)."""

    @property
    @abstractmethod
    def done(self) -> bool:
        """True when the source has nothing more to send, ever."""

    def progress(self) -> dict[str, Any]:
        """JSON-friendly progress for ``nic.sources``."""
        return {"source": self.id, "kind": self.kind, "dev": self.dev, "done": self.done,
                "frames": self.frames_sent, "bytes": self.bytes_sent}

    def close(self) -> None:
        """Release sockets and the like (idempotent)."""
        self.stopped = True


# ---------------------------------------------------------------------------- generator


def _opt_int(d: Mapping[str, Any], key: str, lo: int, hi: int) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise Misuse(f"traffic spec: {key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _opt_float(d: Mapping[str, Any], key: str) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
        raise Misuse(f"traffic spec: {key} must be a positive number, got {v!r}")
    return float(v)


def _opt_bool(d: Mapping[str, Any], key: str, default: bool) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise Misuse(f"traffic spec: {key} must be true or false, got {v!r}")
    return v


@dataclass
class GeneratorSpec:
    """What ``nic.traffic`` asks for (the ``spec`` dict, validated).

    ``dport`` (required): destination port.  ``flows``: K (1).  ``family``: 4 or 6.
    ``payload``: bytes per segment (the MSS of the netdev's MTU).  ``src``: the peer's
    address (default: the netdev's address + 1).  ``bytes``: per-flow
    stream length (unbounded when absent).  ``duration``: seconds, after which every
    flow ends (FIN) after what it sent.  ``rate``: payload bytes/s of the whole
    source (unlimited when absent).  ``batch``: frames per batch (0: :func:`default_batch`
    of the segment size).  ``sport``: first
    source port.  ``isn``: initial sequence number of
    every flow (default: derived from the source port).  ``syn`` / ``fin``: open with
    a SYN / end with a FIN (both true).
    """

    dport: int
    flows: int = 1
    family: int = 4
    payload: int | None = None
    bytes: int | None = None
    duration: float | None = None
    rate: float | None = None
    batch: int = 0
    sport: int | None = None
    src: str | None = None
    isn: int | None = None
    syn: bool = True
    fin: bool = True

    KEYS = ("dport", "flows", "family", "payload", "bytes", "duration", "rate", "batch",
            "sport", "src", "isn", "syn", "fin")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GeneratorSpec:
        """Validate a spec dict; :class:`Misuse` (EINVAL) names the bad key."""
        unknown = sorted(set(d) - set(cls.KEYS))
        if unknown:
            raise Misuse(f"traffic spec: unknown key {unknown[0]!r}")
        dport = _opt_int(d, "dport", 1, 0xFFFF)
        if dport is None:
            raise Misuse("traffic spec: dport is required")
        family = _opt_int(d, "family", 4, 6) or 4
        if family not in (4, 6):
            raise Misuse("traffic spec: family must be 4 or 6")
        src = d.get("src")
        if src is not None and not isinstance(src, str):
            raise Misuse("traffic spec: src must be an address string")
        return cls(
            dport=dport,
            flows=_opt_int(d, "flows", 1, MAX_FLOWS) or 1,
            family=family,
            payload=_opt_int(d, "payload", 1, wire.MAX_PAYLOAD_V4),
            bytes=_opt_int(d, "bytes", 0, _UNBOUNDED - 1),
            duration=_opt_float(d, "duration"),
            rate=_opt_float(d, "rate"),
            batch=_opt_int(d, "batch", 1, MAX_BATCH) or 0,
            sport=_opt_int(d, "sport", 1, 0xFFFF),
            src=src,
            isn=_opt_int(d, "isn", 0, 0xFFFFFFFF),
            syn=_opt_bool(d, "syn", True),
            fin=_opt_bool(d, "fin", True),
        )


def default_isn(sport: npt.ArrayLike) -> npt.NDArray[np.uint32]:
    """Deterministic per-port ISNs spread over the u32 space (Knuth's multiplier)."""
    return ((np.asarray(sport, np.uint64) * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)
            ).astype(np.uint32)


class Generator(Source):
    """K TCP flows of pattern bytes: SYN, data, FIN, interleaved round robin.

    State per flow (numpy arrays): ``state`` (syn / data / done), ``sent`` (stream
    bytes the NIC took) and ``total`` (stream length).  Each poll builds one batch
    for the flows that are not done and not blocked: up to ``batch // m`` frames per
    flow for ``m`` such flows (one each, rotating, when there are more flows than
    frames), ordered round robin (frame ``j`` of every flow before frame ``j + 1``)
    so RSS spreads consecutive frames over queues.  Frames the NIC does not take
    are built again, identically, on a later poll.
    """

    kind = "generator"

    def __init__(self, source_id: int, info: WireInfo, spec: GeneratorSpec | Mapping[str, Any],
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        """Validate ``spec`` against the netdev (:class:`Misuse`, EINVAL) and set up K flows."""
        super().__init__(source_id, info)
        sp = spec if isinstance(spec, GeneratorSpec) else GeneratorSpec.from_dict(spec)
        self.spec = sp
        self.clock = clock
        k = sp.flows
        mss = wire.mss(sp.family, info.mtu)
        if mss < 1:
            raise Misuse(f"MTU {info.mtu} leaves no room for IPv{sp.family} TCP payload")
        self.seg = sp.payload if sp.payload is not None else mss
        if self.seg > mss:
            raise Misuse(f"traffic spec: payload {self.seg} exceeds the MSS {mss} of MTU "
                         f"{info.mtu}")
        base = sp.sport if sp.sport is not None else 20000 + 1024 * (source_id % 40)
        if base + k - 1 > 0xFFFF:
            raise Misuse(f"traffic spec: {k} flows from port {base} run past 65535")
        sport = np.arange(base, base + k, dtype=np.int64)
        src, dst = self._addresses(sp, info, k)
        isn = (np.full(k, sp.isn, np.uint32) if sp.isn is not None else default_isn(sport))
        try:
            fs = wire.FlowSpec.from_addresses(
                src, dst, sport, sp.dport, isn=isn, stream=sport,
                src_mac=np.frombuffer(info.peer_mac, np.uint8),
                dst_mac=np.frombuffer(info.mac, np.uint8))
        except Misuse as e:
            raise Misuse(f"traffic spec: {e}") from None
        #: the most frames a poll builds: the spec's batch, or the largest
        #: :func:`default_batch` (each poll takes it for the device's HW-GRO setting then)
        self.max_batch = sp.batch or default_batch(self.seg, GRO_MAX_SEGS * self.seg)
        self.builder = FrameBuilder(fs, self.max_batch, self.seg, key=("gen", source_id))
        self.flows = self.builder.flows
        self.isn = isn
        self.sport = sport.astype(np.uint16)
        self.state = np.full(k, _S_SYN if sp.syn else _S_DATA, np.int8)
        self.sent = np.zeros(k, np.int64)
        self.total = np.full(k, sp.bytes if sp.bytes is not None else _UNBOUNDED, np.int64)
        if not sp.fin:
            self.state[(self.state == _S_DATA) & (self.total == 0)] = _S_DONE
        self._nsyn = int(np.count_nonzero(self.state == _S_SYN))
        self._steps = np.arange(self.max_batch, dtype=np.int64) * self.seg
        self._t0: float | None = None
        self._expired = False
        self._rr = 0
        self._last: tuple[npt.NDArray[Any], ...] | None = None

    @staticmethod
    def _addresses(sp: GeneratorSpec, info: WireInfo, k: int) -> tuple[list[str], list[str]]:
        """One peer host for every flow: the flows differ by source port only.

        (Varying the address in step with the port would make their Toeplitz
        contributions cancel in the low hash bits, and RSS would not spread them.)
        """
        try:
            if sp.family == 4:
                dst = info.addr
                src = sp.src or str(ipaddress.IPv4Address(int(ipaddress.IPv4Address(dst)) + 1))
                ipaddress.IPv4Address(src)
            else:
                dst = info.addr6
                src = sp.src or str(ipaddress.IPv6Address(int(ipaddress.IPv6Address(dst)) + 1))
                ipaddress.IPv6Address(src)
        except (ValueError, ipaddress.AddressValueError) as e:
            raise Misuse(f"traffic spec: bad address: {e}") from None
        return [src] * k, [dst] * k

    # -- batches ---------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.stopped or bool((self.state == _S_DONE).all())

    def _expire(self) -> None:
        """Duration over: every flow ends after what the NIC already took."""
        live = self.state != _S_DONE
        self.total[live] = np.minimum(self.total[live], self.sent[live])
        if not self.spec.fin:
            self.state[live & (self.state == _S_DATA)] = _S_DONE
        self._expired = True

    def poll(self, blocked: Blocked | None = None, now: float | None = None) -> Frames | None:
        if self.done:
            return None
        t = self.clock() if now is None else now
        if self._t0 is None:
            self._t0 = t
        sp = self.spec
        if sp.duration is not None and not self._expired and t - self._t0 >= sp.duration:
            self._expire()
        live = self.state != _S_DONE
        if blocked is not None:
            live &= ~blocked(self.flows, self.builder.key)
        ids = np.flatnonzero(live)
        m = int(ids.shape[0])
        if m == 0:
            return None
        cap = sp.batch or default_batch(self.seg, self.gro_room)
        seg = self.seg
        if sp.rate is not None:
            budget = sp.rate * (t - self._t0) - self.bytes_sent
            cap = min(cap, int(budget // seg))
            if cap < 1:
                return None
        if m > cap:
            start = self._rr % m
            ids = np.concatenate((ids[start:], ids[:start]))[:cap]
            self._rr = start + cap
            m = cap
        per = max(1, cap // m)
        if self._nsyn == 0:
            fast = self._poll_fast(ids, m, per)
            if fast is not None:
                return fast
        st = self.state[ids]
        syn = (st == _S_SYN).astype(np.int64)
        sent = self.sent[ids]
        total = self.total[ids]
        rem = total - sent
        dn = (rem + (seg - 1)) // seg
        # A SYN goes out alone: the flow's data follows from the next poll, as a TCP
        # sender's does after the handshake.  (A SYN with a full batch of data behind it
        # held every other source's SYN back by a batch: 64 one-flow sources, one per
        # queue, took ~0.6 s to open their last connection.)
        dk = np.where(syn == 1, 0, np.minimum(dn, per))
        fk = ((syn == 0) & (total < _UNBOUNDED) & (dk == dn) & (dk < per)).astype(np.int64)
        if not sp.fin:
            fk[:] = 0
        nfr = syn + dk + fk
        n = int(nfr.sum())
        if n == 0:
            return None
        flow = np.repeat(ids, nfr)
        k = np.arange(n) - np.repeat(np.cumsum(nfr) - nfr, nfr)
        q = k - np.repeat(syn, nfr)
        is_syn = q < 0
        is_data = (q >= 0) & (q < np.repeat(dk, nfr))
        is_fin = ~is_syn & ~is_data
        off = np.repeat(sent, nfr) + q * seg
        tot = np.repeat(total, nfr)
        length = np.where(is_data, np.minimum(seg, tot - off), 0)
        off = np.where(is_data, off, np.where(is_fin, tot, 0))
        flags = np.where(is_syn, wire.TCP_SYN,
                         np.where(is_fin, wire.TCP_FIN | wire.TCP_ACK, wire.TCP_ACK))
        if m > 1 and per > 1:  # round robin: frame j of every flow, then frame j + 1
            order = np.argsort(k, kind="stable")
            flow, off, length, flags = flow[order], off[order], length[order], flags[order]
            is_syn, is_data, is_fin = is_syn[order], is_data[order], is_fin[order]
        self._last = (flow, length, is_syn, is_data, is_fin)
        return self.builder.build(flow, off, length, flags)

    def _poll_fast(self, ids: npt.NDArray[np.intp], m: int, per: int) -> Frames | None:
        """Every chosen flow is mid-stream with ``per`` full segments left: no SYN, no FIN,
        no short segment in this batch."""
        seg = self.seg
        k = len(self.state)
        if m == 1:
            i = int(ids[0])
            sent0 = int(self.sent[i])
            if int(self.total[i]) - sent0 < per * seg:
                return None
            flow = self.builder._flow0[:per] if i == 0 else np.full(per, i, np.intp)
            off = self._steps[:per] + sent0
        else:
            sent = self.sent if m == k else self.sent[ids]
            total = self.total if m == k else self.total[ids]
            if int((total - sent).min()) < per * seg:
                return None
            flow = np.tile(ids, per)
            off = (sent[None, :] + self._steps[:per, None]).reshape(-1)
        self._last = (ids, np.array([per, m]))
        return self.builder.build_data(flow, off, seg)

    def commit(self, batch: Frames | RawBatch, consumed: npt.NDArray[np.bool_]) -> None:
        if self._last is None:
            return
        last = self._last
        self._last = None
        if len(last) == 2:  # fast batch: `per` full segments of each of m flows, interleaved
            ids, pm = last
            per, m = int(pm[0]), int(pm[1])
            if m == 1:
                took = int(np.count_nonzero(consumed))
                self.sent[ids[0]] += took * self.seg
            else:
                cnt = np.count_nonzero(consumed.reshape(per, m), axis=0)
                self.sent[ids] += cnt * self.seg
                took = int(cnt.sum())
            self.frames_sent += took
            self.bytes_sent += took * self.seg
            if not self.spec.fin:
                self.state[(self.state == _S_DATA) & (self.sent >= self.total)] = _S_DONE
            return
        flow, length, is_syn, is_data, is_fin = last
        c = np.asarray(consumed, bool)
        took = int(np.count_nonzero(c))
        if took == 0:
            return
        self.frames_sent += took
        cs = c & is_syn
        if cs.any():
            self.state[flow[cs]] = _S_DATA
            self._nsyn -= int(np.count_nonzero(cs))
        cd = c & is_data
        if cd.any():
            add = np.bincount(flow[cd], weights=length[cd], minlength=len(self.state))
            self.sent += add.astype(np.int64)
            self.bytes_sent += int(length[cd].sum())
        cf = c & is_fin
        if cf.any():
            self.state[flow[cf]] = _S_DONE
        if not self.spec.fin:
            self.state[(self.state == _S_DATA) & (self.sent >= self.total)] = _S_DONE

    def progress(self) -> dict[str, Any]:
        out = super().progress()
        fs = self.builder.spec
        k = len(self.state)
        flows = []
        for i in range(min(k, MAX_PROGRESS_FLOWS)):
            fam = int(fs.family[i])
            flows.append({
                "src": wire.addr_str(fs.src_addr[i], fam), "sport": int(fs.sport[i]),
                "dst": wire.addr_str(fs.dst_addr[i], fam), "dport": int(fs.dport[i]),
                "stream": int(fs.stream[i]), "isn": int(fs.isn[i]),
                "sent": int(self.sent[i]),
                "total": None if self.total[i] >= _UNBOUNDED else int(self.total[i]),
                "state": _STATE_NAMES[int(self.state[i])]})
        out.update({"nflows": k, "flows": flows, "payload": self.seg,
                    "flows_done": int(np.count_nonzero(self.state == _S_DONE))})
        return out


# -------------------------------------------------------------------------- wire gateway


_LOOPBACK = {"127.0.0.1": socket.AF_INET, "localhost": socket.AF_INET, "::1": socket.AF_INET6}
#: Bytes a gateway connection reads ahead of what the NIC took.
GATEWAY_BUFFER = 256 << 10


@dataclass(eq=False)
class _Conn:
    cid: int
    sock: socket.socket | None
    peer: tuple[str, int]
    builder: FrameBuilder
    buf: npt.NDArray[np.uint8]
    isn: int
    state: int = _S_SYN
    lo: int = 0  # buf[lo:hi] read from the socket, not yet taken by the NIC
    hi: int = 0
    sent: int = 0  # stream offset of buf[lo]
    read: int = 0
    eof: bool = False
    reset: bool = False
    last: tuple[int, npt.NDArray[np.int64], bool] | None = field(default=None, repr=False)


class WireGateway(Source):
    """A real TCP listener on loopback whose connections become emulated flows.

    Accepted connection ``c`` becomes a flow from the client's address and port to
    the netdev's address (IPv4 or IPv6 like the listener) and the listener's port.
    Its bytes are read with ``recv_into`` into a preallocated per-connection buffer
    (non-blocking, up to :data:`GATEWAY_BUFFER` ahead of the NIC) and cut into
    MSS-sized segments with the right sequence numbers; the payload rows are a
    strided view of that buffer, no copy.  EOF becomes a FIN, a reset an RST
    (after the bytes read before it).  When the connection's queue is paused the
    gateway stops reading its socket, and TCP flow control slows the real sender.
    """

    kind = "wire"

    def __init__(self, source_id: int, info: WireInfo, port: int, host: str = "127.0.0.1",
                 *, batch: int = 64) -> None:
        """Bind and listen (:class:`Misuse`: EINVAL for a non-loopback host, or the bind errno)."""
        super().__init__(source_id, info)
        fam = _LOOPBACK.get(host)
        if fam is None:
            raise Misuse(f"wire gateway: {host!r} is not a loopback address", errno.EINVAL)
        if not 0 <= port <= 0xFFFF:
            raise Misuse(f"wire gateway: bad port {port}", errno.EINVAL)
        self.host = "127.0.0.1" if host == "localhost" else host
        self.family = wire.FAMILY_V6 if fam == socket.AF_INET6 else wire.FAMILY_V4
        self.seg = wire.mss(self.family, info.mtu)
        self.batch = batch
        sock = socket.socket(fam, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, port))
            sock.listen(64)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            raise Misuse(f"wire gateway: cannot listen on {host}:{port}: {e.strerror}",
                         e.errno or errno.EINVAL) from None
        self.listener: socket.socket | None = sock
        self.port: int = sock.getsockname()[1]
        self.conns: list[_Conn] = []
        self._next_cid = 0
        self._rr = 0
        self._cur: _Conn | None = None

    @property
    def done(self) -> bool:
        return self.stopped

    def _accept(self) -> None:
        if self.listener is None:
            return
        for _ in range(16):
            try:
                s, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            s.setblocking(False)
            self._add(s, (addr[0], int(addr[1])))

    def _add(self, s: socket.socket, peer: tuple[str, int]) -> None:
        cid = self._next_cid
        self._next_cid += 1
        dst = self.info.addr6 if self.family == wire.FAMILY_V6 else self.info.addr
        isn = int(default_isn([peer[1] + (cid << 16)])[0])
        fs = wire.FlowSpec.from_addresses(
            [peer[0]], [dst], [peer[1]], [self.port], isn=[isn],
            src_mac=np.frombuffer(self.info.peer_mac, np.uint8),
            dst_mac=np.frombuffer(self.info.mac, np.uint8))
        b = FrameBuilder(fs, self.batch + 1, self.seg, key=("wire", self.id, cid))
        buf = np.zeros(GATEWAY_BUFFER + 2 * self.seg, np.uint8)  # + room for the view's rows
        self.conns.append(_Conn(cid, s, peer, b, buf, isn))

    def _read(self, c: _Conn) -> None:
        if c.eof or c.reset or c.sock is None:
            return
        if c.lo == c.hi:
            c.lo = c.hi = 0
        elif c.lo > GATEWAY_BUFFER // 2:
            n = c.hi - c.lo
            c.buf[:n] = c.buf[c.lo:c.hi]
            c.lo, c.hi = 0, n
        room = GATEWAY_BUFFER - c.hi
        if room <= 0:
            return
        try:
            got = c.sock.recv_into(c.buf.data[c.hi:GATEWAY_BUFFER], room)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            c.reset = True
            return
        if got == 0:
            c.eof = True
        c.hi += got
        c.read += got

    def _frames(self, c: _Conn) -> Frames | None:
        z = np.zeros(1, np.intp)
        if c.state == _S_SYN:
            c.last = (1, np.zeros(1, np.int64), False)
            return c.builder.build(z, np.zeros(1, np.int64), np.zeros(1, np.int64),
                                   wire.TCP_SYN, pay=np.empty((1, 0), np.uint8))
        avail = c.hi - c.lo
        seg = self.seg
        k = min(self.batch, (avail + seg - 1) // seg)
        end = (c.eof or c.reset) and k * seg >= avail
        if k == 0 and not end:
            return None
        n = k + (1 if end else 0)
        length = np.minimum(seg, avail - np.arange(n, dtype=np.int64) * seg)
        if end:
            length[-1] = 0
        off = c.sent + np.arange(n, dtype=np.int64) * seg
        flags = np.full(n, wire.TCP_ACK, np.int64)
        if end:
            off[-1] = c.sent + avail
            flags[-1] = wire.TCP_RST | wire.TCP_ACK if c.reset else wire.TCP_FIN | wire.TCP_ACK
        pay = np.ndarray((n, seg), np.uint8, c.buf, c.lo, (seg, 1))
        c.last = (n, length, end)
        return c.builder.build(np.zeros(n, np.intp), off, length, flags, pay=pay)

    def poll(self, blocked: Blocked | None = None, now: float | None = None) -> Frames | None:
        if self.stopped:
            return None
        self._accept()
        live = [c for c in self.conns if c.state != _S_DONE]
        if len(live) != len(self.conns):
            self.conns = live
        m = len(live)
        for i in range(m):
            c = live[(self._rr + i) % m]
            if blocked is not None and bool(blocked(c.builder.flows, c.builder.key)[0]):
                continue  # the queue is paused: stop reading, TCP flow control does the rest
            if c.state != _S_SYN:
                self._read(c)
            fr = self._frames(c)
            if fr is not None:
                self._rr = (self._rr + i + 1) % max(m, 1)
                self._cur = c
                return fr
        return None

    def commit(self, batch: Frames | RawBatch, consumed: npt.NDArray[np.bool_]) -> None:
        c, self._cur = self._cur, None
        if c is None or c.last is None:
            return
        n, length, end = c.last
        c.last = None
        took = int(np.count_nonzero(consumed))
        if took == 0:
            return
        self.frames_sent += took
        if c.state == _S_SYN:
            c.state = _S_DATA
            return
        nbytes = int(length[:took].sum())
        c.lo += nbytes
        c.sent += nbytes
        self.bytes_sent += nbytes
        if end and took == n:
            c.state = _S_DONE
            self._close_conn(c)

    @staticmethod
    def _close_conn(c: _Conn) -> None:
        if c.sock is not None:
            c.sock.close()
            c.sock = None

    def progress(self) -> dict[str, Any]:
        out = super().progress()
        conns = [{"peer": f"{c.peer[0]}:{c.peer[1]}", "sport": c.peer[1], "dport": self.port,
                  "isn": c.isn, "read": c.read, "sent": c.sent,
                  "state": "reset" if c.reset else _STATE_NAMES[c.state]}
                 for c in self.conns[:MAX_PROGRESS_FLOWS]]
        out.update({"host": self.host, "port": self.port, "connections": conns})
        return out

    def close(self) -> None:
        super().close()
        for c in self.conns:
            self._close_conn(c)
        if self.listener is not None:
            self.listener.close()
            self.listener = None


# ---------------------------------------------------------------------------- raw frames


@dataclass(eq=False)
class RawBatch:
    """Frames as bytes on the wire: ``buf[offsets[i] : offsets[i] + lengths[i]]``."""

    buf: npt.NDArray[np.uint8]
    offsets: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.offsets.shape[0])


def _rss_addr(a16: npt.NDArray[np.uint8], v6: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint8]:
    out = a16.copy()
    v4 = ~v6
    out[v4, :4] = a16[v4, 12:]
    out[v4, 4:] = 0
    return out


def parse_raw(raw: RawBatch, mtu: int
              ) -> tuple[Frames, npt.NDArray[np.intp], npt.NDArray[np.uint8]]:
    """The MAC's generic receive path: parse raw frames into a :class:`Frames` batch.

    Returns ``(frames, good, status)``: ``frames`` holds the frames that parsed
    (row ``j`` is raw frame ``good[j]``), ``status`` is the
    :class:`shared.wire.FrameStatus` of every raw frame (the caller counts
    ``OVERSIZE`` as ``rx_oversize``, anything else not OK as ``rx_bad_frame``).
    Each frame is its own steering flow (``flows_key`` None).  Ethernet padding
    past the IP datagram is kept in ``frame_len`` (and written as zeros).
    """
    res = wire.parse_frames(raw.buf, raw.offsets, raw.lengths, mtu)
    status = res["status"]
    good = np.flatnonzero(status == wire.FrameStatus.OK)
    g = res[good]
    n = int(good.shape[0])
    po = g["payload_off"].astype(np.int64)
    pl = g["payload_len"].astype(np.int64)
    fl = raw.lengths[good].astype(np.int64)
    width = int(fl.max()) if n else 0
    b = np.concatenate((np.asarray(raw.buf, np.uint8).reshape(-1), np.zeros(width, np.uint8)))
    if n:
        win = np.ndarray((b.shape[0] - width + 1, width), np.uint8, b, 0, (1, 1))
        rows = win[raw.offsets[good]]
    else:
        rows = np.zeros((0, 0), np.uint8)
    pw = int(pl.max()) if n else 0
    pay = np.zeros((n, pw), np.uint8)
    for p in np.unique(po).tolist():
        sel = np.flatnonzero(po == p)
        w = min(pw, width - p)
        if w > 0:
            pay[sel, :w] = rows[sel, p:p + w]
    v6 = g["family"] == wire.FAMILY_V6
    flows = Flows(_rss_addr(g["src_addr"], v6), _rss_addr(g["dst_addr"], v6), g["sport"],
                  g["dport"], v6)
    frames = Frames(rows, po, pay, pl, fl, np.arange(n, dtype=np.intp), flows, None)
    return frames, good, status


class RawSource(Source):
    """Replays ready-made frames (bytes) in order; unparsable ones are dropped by the NIC."""

    kind = "raw"

    def __init__(self, source_id: int, info: WireInfo, frames: Sequence[bytes],
                 *, batch: int = 64) -> None:
        """Queue ``frames`` (each the bytes of one Ethernet frame, no FCS)."""
        super().__init__(source_id, info)
        self.pending: list[bytes] = list(frames)
        self.batch = batch
        self._last: list[bytes] | None = None

    @property
    def done(self) -> bool:
        return self.stopped or not self.pending

    def poll(self, blocked: Blocked | None = None, now: float | None = None) -> RawBatch | None:
        if self.done:
            return None
        take = self.pending[: self.batch]
        self._last = take
        lengths = np.array([len(f) for f in take], np.int64)
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
        buf = np.frombuffer(b"".join(take), np.uint8)
        return RawBatch(buf, offsets, lengths)

    def commit(self, batch: Frames | RawBatch, consumed: npt.NDArray[np.bool_]) -> None:
        take, self._last = self._last, None
        if take is None:
            return
        keep = [f for f, c in zip(take, consumed.tolist(), strict=True) if not c]
        took = [f for f, c in zip(take, consumed.tolist(), strict=True) if c]
        self.frames_sent += len(took)
        self.bytes_sent += sum(len(f) for f in took)
        self.pending = keep + self.pending[len(take):]
