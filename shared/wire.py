"""Wire frames: Ethernet / IPv4|IPv6 / TCP formats, batch build and batch parse.

Everything here works on whole batches with a fixed number of numpy calls per
batch (none per frame), as DESIGN.md §7 asks.

Formats
    numpy dtypes mirror the Linux structs, big-endian as on the wire:
    :data:`ETHHDR` (``struct ethhdr``, 14 B), :data:`IPHDR` (``struct iphdr``,
    20 B without options), :data:`IPV6HDR` (``struct ipv6hdr``, 40 B),
    :data:`TCPHDR` (``struct tcphdr``, 20 B without options).  A generated frame
    header is :data:`FRAME4_HDR` (54 B) or :data:`FRAME6_HDR` (74 B).

Addresses
    Every address is 16 bytes.  An IPv4 address is stored **IPv4-mapped**
    (``::ffff:a.b.c.d``, RFC 4291 §2.5.5.2), as a dual-stack Linux socket shows
    an IPv4 peer; the ``family`` field (4 or 6, the IP version) says which it is.

Building (:func:`build_frames`)
    A :class:`FlowSpec` describes K flows and precomputes, per flow, the whole
    54/74-byte header and the constant part of the checksums.  A batch is
    ``(flow index, stream offset, payload length, tcp flags)`` per frame; frame
    ``i`` is written into row ``i`` of a caller-provided 2-D uint8 slot array:
    gather the templates, patch the per-frame fields through a structured view
    (IPv4 header checksum from the precomputed partial sum), gather the payload
    rows from :mod:`shared.pattern`, then two block copies into the slots.

    TCP sequence numbers follow Linux: the SYN has ``seq = isn`` and the data byte
    at stream offset ``o`` has ``seq = isn + 1 + o`` (mod 2**32), so a frame
    carrying a SYN gets ``seq = isn + o`` and a FIN after ``n`` bytes has
    ``seq = isn + 1 + n``.  Offsets are u64, so streams longer than 4 GiB keep
    their pattern offset while ``seq`` wraps.

    **Departure from Linux — TCP checksum.**  By default the TCP checksum field is
    left 0: the emulated NIC reports every frame as checksum-verified, like a
    driver setting ``CHECKSUM_UNNECESSARY``, and the receive path never checks it.
    ``tcp_csum=True`` computes the real checksum (pcap export, dpkt/wireshark
    checks).  The IPv4 *header* checksum is always computed and always checked,
    as ``ip_rcv`` does in software.

Parsing (:func:`parse_frames`, :func:`parse_slots`)
    Never raises on frame content: every frame gets a :class:`FrameStatus`; the
    checks follow the order of Linux's ``ip_rcv_core`` / ``ipv6_rcv`` /
    ``tcp_v4_rcv``, after a MAC-level length check against the MTU (see
    :class:`FrameStatus`).  The first :data:`GATHER_WIDTH` bytes of every frame
    are gathered into one matrix (one call; none for :func:`parse_slots`); the TCP
    header is a slice of it when every frame has it at the same offset (one
    family, no IPv4 options: the normal case), else one ``take_along_axis``.
    Results are native-endian :data:`PARSED` records.  Not supported (counted,
    not parsed): VLAN tags (``BAD_ETHERTYPE``), IPv6 extension headers
    (``NOT_TCP``), IPv4 fragments (``FRAGMENT``).  Ethernet padding after the IP
    datagram is ignored, as ``pskb_trim_rcsum`` does.  The TCP checksum is not
    checked (see above).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from shared import pattern
from shared.errors import Misuse

__all__ = [
    "ETHHDR",
    "ETH_HLEN",
    "ETH_P_IP",
    "ETH_P_IPV6",
    "ETH_ZLEN",
    "FAMILY_V4",
    "FAMILY_V6",
    "FRAME4_HDR",
    "FRAME4_HLEN",
    "FRAME6_HDR",
    "FRAME6_HLEN",
    "GATHER_WIDTH",
    "IPHDR",
    "IPPROTO_TCP",
    "IPV4_HLEN",
    "IPV6HDR",
    "IPV6_HLEN",
    "MAX_PAYLOAD_V4",
    "MAX_PAYLOAD_V6",
    "PARSED",
    "TCPHDR",
    "TCP_ACK",
    "TCP_CWR",
    "TCP_ECE",
    "TCP_FIN",
    "TCP_HLEN",
    "TCP_PSH",
    "TCP_RST",
    "TCP_SYN",
    "TCP_URG",
    "FlowSpec",
    "FrameStatus",
    "addr16",
    "addr_str",
    "build_frames",
    "max_frame_len",
    "mss",
    "parse_frames",
    "parse_slots",
]

# --------------------------------------------------------------------------- constants

ETH_ALEN = 6
ETH_HLEN = 14  #: Ethernet header (no VLAN tag)
ETH_ZLEN = 60  #: minimum frame length without FCS; shorter frames are zero-padded
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPPROTO_TCP = 6
IPV4_HLEN = 20
IPV6_HLEN = 40
TCP_HLEN = 20
IP_DF = 0x4000
IP_MF = 0x2000
IP_OFFSET = 0x1FFF

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80

#: ``family`` values: the IP version number.
FAMILY_V4 = 4
FAMILY_V6 = 6

FRAME4_HLEN = ETH_HLEN + IPV4_HLEN + TCP_HLEN  # 54
FRAME6_HLEN = ETH_HLEN + IPV6_HLEN + TCP_HLEN  # 74
#: Largest payload one frame can carry (IPv4 tot_len / IPv6 payload_len are u16).
MAX_PAYLOAD_V4 = 0xFFFF - IPV4_HLEN - TCP_HLEN
MAX_PAYLOAD_V6 = 0xFFFF - TCP_HLEN

# ------------------------------------------------------------------------------ dtypes

ETHHDR = np.dtype([("h_dest", "u1", (6,)), ("h_source", "u1", (6,)), ("h_proto", ">u2")])
IPHDR = np.dtype(
    [
        ("version_ihl", "u1"),  # version << 4 | ihl (32-bit words)
        ("tos", "u1"),
        ("tot_len", ">u2"),
        ("id", ">u2"),
        ("frag_off", ">u2"),  # flags (DF, MF) << 13 | fragment offset
        ("ttl", "u1"),
        ("protocol", "u1"),
        ("check", ">u2"),
        ("saddr", "u1", (4,)),
        ("daddr", "u1", (4,)),
    ]
)
IPV6HDR = np.dtype(
    [
        ("ver_tc_flow", ">u4"),  # version << 28 | traffic class << 20 | flow label
        ("payload_len", ">u2"),
        ("nexthdr", "u1"),
        ("hop_limit", "u1"),
        ("saddr", "u1", (16,)),
        ("daddr", "u1", (16,)),
    ]
)
TCPHDR = np.dtype(
    [
        ("source", ">u2"),
        ("dest", ">u2"),
        ("seq", ">u4"),
        ("ack_seq", ">u4"),
        ("doff_res", "u1"),  # doff << 4 (32-bit words) | reserved
        ("flags", "u1"),  # CWR ECE URG ACK PSH RST SYN FIN
        ("window", ">u2"),
        ("check", ">u2"),
        ("urg_ptr", ">u2"),
    ]
)
FRAME4_HDR = np.dtype([("eth", ETHHDR), ("ip", IPHDR), ("tcp", TCPHDR)])
FRAME6_HDR = np.dtype([("eth", ETHHDR), ("ip", IPV6HDR), ("tcp", TCPHDR)])

assert ETHHDR.itemsize == ETH_HLEN
assert IPHDR.itemsize == IPV4_HLEN
assert IPV6HDR.itemsize == IPV6_HLEN
assert TCPHDR.itemsize == TCP_HLEN
assert FRAME4_HDR.itemsize == FRAME4_HLEN
assert FRAME6_HDR.itemsize == FRAME6_HLEN


class FrameStatus(enum.IntEnum):
    """Verdict of :func:`parse_frames` for one frame.

    The first failing check wins, in this order: offset/length outside the
    buffer (TRUNCATED); longer than MTU + 14 (OVERSIZE); shorter than the
    Ethernet header (TRUNCATED); ethertype (BAD_ETHERTYPE); shorter than the
    fixed IP header (TRUNCATED); version, IHL < 5 (BAD_IP); shorter than the IPv4
    header with options (TRUNCATED); IPv4 header checksum (BAD_IP_CSUM); IP
    length past the frame end (TRUNCATED); IPv4 tot_len < IHL * 4 (BAD_IP);
    fragment (FRAGMENT); protocol / next header (NOT_TCP); IP payload shorter than
    20 bytes (TRUNCATED); doff < 5 or past the IP payload (BAD_TCP_DOFF).
    """

    OK = 0
    TRUNCATED = 1  #: frame ends before a header / the IP datagram; or bad offset/length
    OVERSIZE = 2  #: frame longer than MTU + 14
    BAD_ETHERTYPE = 3  #: neither IPv4 nor IPv6 (VLAN tags included)
    BAD_IP = 4  #: IP version does not match the ethertype, IHL < 5, tot_len < IHL * 4
    BAD_IP_CSUM = 5  #: IPv4 header checksum wrong
    FRAGMENT = 6  #: IPv4 fragment (MF set or offset != 0): no reassembly here
    NOT_TCP = 7  #: IPv4 protocol / IPv6 next header is not TCP (extension headers too)
    BAD_TCP_DOFF = 8  #: TCP doff < 5, or the header runs past the IP datagram


#: Parse result, one 64-byte record per frame, native byte order.  When
#: ``status != OK`` every field but ``status`` is zero.
PARSED = np.dtype(
    [
        ("seq", "u4"),
        ("ack_seq", "u4"),
        ("payload_len", "u4"),  # TCP payload bytes (IP length minus headers; padding excluded)
        ("sport", "u2"),
        ("dport", "u2"),
        ("window", "u2"),
        ("l4_off", "u2"),  # TCP header offset in the frame
        ("payload_off", "u2"),  # end of the TCP header (options included) = payload offset
        ("status", "u1"),  # FrameStatus
        ("family", "u1"),  # 4 or 6
        ("tcp_flags", "u1"),
        ("ip_proto", "u1"),  # always IPPROTO_TCP when OK
        ("_pad", "u1", (6,)),
        ("src_addr", "u1", (16,)),  # IPv4 as ::ffff:a.b.c.d
        ("dst_addr", "u1", (16,)),
    ]
)
assert PARSED.itemsize == 64
_ADDR_OFF = 32
assert PARSED.fields is not None
assert PARSED.fields["src_addr"][1] == _ADDR_OFF and PARSED.fields["dst_addr"][1] == _ADDR_OFF + 16

#: Bytes of each frame gathered by the parser: Ethernet + the largest IPv4 header
#: (IHL 15 = 60 B) + the fixed TCP header = 94, rounded up.
GATHER_WIDTH = 96

_V4MAPPED_PREFIX = bytes(10) + b"\xff\xff"

# --------------------------------------------------------------------------- helpers


def addr16(addr: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[int, bytes]:
    """``(family, 16-byte address)`` for an address; IPv4 comes back IPv4-mapped."""
    ip = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
    if ip.version == 4:
        return FAMILY_V4, _V4MAPPED_PREFIX + ip.packed
    return FAMILY_V6, ip.packed


def addr_str(a16: npt.ArrayLike | bytes, family: int) -> str:
    """Text form of a 16-byte address from a :class:`FlowSpec` or a parse result."""
    if isinstance(a16, bytes | bytearray | memoryview):
        raw = bytes(a16)
    else:
        raw = np.asarray(a16, dtype=np.uint8).reshape(16).tobytes()
    if len(raw) != 16:
        raise Misuse("address must be 16 bytes")
    if family == FAMILY_V4:
        return str(ipaddress.IPv4Address(raw[12:]))
    return str(ipaddress.IPv6Address(raw))


def max_frame_len(mtu: int) -> int:
    """Longest frame (no FCS, no VLAN) the NIC accepts at ``mtu``."""
    return mtu + ETH_HLEN


def mss(family: int, mtu: int) -> int:
    """Largest TCP payload per frame at ``mtu`` without TCP options."""
    return mtu - (IPV4_HLEN if family == FAMILY_V4 else IPV6_HLEN) - TCP_HLEN


def _be_words_sum(a: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
    """Row sums of the big-endian 16-bit words of a 2-D uint8 array with an even width."""
    sums: npt.NDArray[np.uint64] = a.view(">u2").sum(axis=1, dtype=np.uint64)
    return sums


def _csum(s: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """Internet checksum field for a ones'-complement sum ``s`` taken with the field at 0.

    Folding with end-around carry keeps the value mod 0xffff, so the folded sum is
    ``s % 0xffff`` (0xffff for a multiple) and the field, its complement, is
    ``-s mod 0xffff`` (0 for a multiple, which verifies as well as 0xffff).
    """
    m = np.uint64(0xFFFF)
    return (m - s % m) % m


def _mac_array(mac: npt.ArrayLike | None, k: int, default: bytes) -> npt.NDArray[np.uint8]:
    if mac is None:
        return np.broadcast_to(np.frombuffer(default, np.uint8), (k, ETH_ALEN)).copy()
    if isinstance(mac, bytes | bytearray):
        mac = np.frombuffer(bytes(mac), np.uint8)
    arr = np.asarray(mac, dtype=np.uint8)
    try:
        return np.broadcast_to(arr, (k, ETH_ALEN)).copy()
    except ValueError:
        raise Misuse(f"MAC addresses must broadcast to ({k}, 6), got {arr.shape}") from None


def _per_flow(v: npt.ArrayLike | None, k: int, dtype: str, default: int, name: str) -> np.ndarray:
    if v is None:
        return np.full(k, default, dtype=dtype)
    arr = np.asarray(v)
    try:
        out = np.broadcast_to(arr, (k,)).astype(dtype)
    except ValueError:
        raise Misuse(f"{name} must broadcast to ({k},), got {arr.shape}") from None
    if not np.array_equal(out, np.broadcast_to(arr, (k,))):
        raise Misuse(f"{name} out of range for {dtype}")
    return out


# -------------------------------------------------------------------------- FlowSpec

_DEFAULT_DST_MAC = bytes.fromhex("020000000001")  # the emulated NIC (locally administered)
_DEFAULT_SRC_MAC = bytes.fromhex("020000000002")  # the emulated peer


class FlowSpec:
    """K TCP flows (sender -> emulated host) and their precomputed header templates.

    All per-flow attributes are arrays of length K, index = flow index:

    * ``family`` u1 (4 or 6); ``src_addr``, ``dst_addr`` u1 (K, 16) (IPv4-mapped
      for family 4); ``sport``, ``dport`` u2;
    * ``src_mac``, ``dst_mac`` u1 (K, 6);
    * ``isn`` u4: the sender's initial sequence number (the SYN's ``seq``);
    * ``ack_seq`` u4: value of the ACK field of every frame;
    * ``stream`` i8: the :mod:`shared.pattern` stream id of the flow's payload
      (default ``0..K-1``);
    * ``ttl`` (hop limit for IPv6) and ``window`` are the same for all flows.

    Treat the arrays as read-only: the templates are computed once, here.
    """

    def __init__(
        self,
        family: npt.ArrayLike,
        src_addr: npt.ArrayLike,
        dst_addr: npt.ArrayLike,
        sport: npt.ArrayLike,
        dport: npt.ArrayLike,
        *,
        src_mac: npt.ArrayLike | None = None,
        dst_mac: npt.ArrayLike | None = None,
        isn: npt.ArrayLike | None = None,
        ack_seq: npt.ArrayLike | None = None,
        stream: npt.ArrayLike | None = None,
        ttl: int = 64,
        window: int = 0xFFFF,
    ) -> None:
        """Validate the flow arrays (raise :class:`Misuse`) and build the templates."""
        fam = np.atleast_1d(np.asarray(family))
        if fam.ndim != 1:
            raise Misuse("family must be 1-D")
        k = fam.shape[0]
        if not np.isin(fam, (FAMILY_V4, FAMILY_V6)).all():
            raise Misuse("family must be 4 or 6")
        self.family = fam.astype(np.uint8)
        src = np.array(src_addr, dtype=np.uint8)  # copies: the prefix below writes into it
        dst = np.array(dst_addr, dtype=np.uint8)
        if src.shape != (k, 16) or dst.shape != (k, 16):
            raise Misuse(f"addresses must be ({k}, 16) arrays")
        v4 = self.family == FAMILY_V4
        prefix = np.frombuffer(_V4MAPPED_PREFIX, np.uint8)
        src[v4, :12] = prefix
        dst[v4, :12] = prefix
        self.src_addr = src
        self.dst_addr = dst
        self.sport = _per_flow(sport, k, "u2", 0, "sport")
        self.dport = _per_flow(dport, k, "u2", 0, "dport")
        self.src_mac = _mac_array(src_mac, k, _DEFAULT_SRC_MAC)
        self.dst_mac = _mac_array(dst_mac, k, _DEFAULT_DST_MAC)
        self.isn = _per_flow(isn, k, "u4", 0, "isn")
        self.ack_seq = _per_flow(ack_seq, k, "u4", 0, "ack_seq")
        self.stream = (
            np.arange(k, dtype=np.int64)
            if stream is None
            else _per_flow(stream, k, "i8", 0, "stream")
        )
        if (self.stream < 0).any():
            raise Misuse("stream ids must be non-negative")
        if not (0 <= ttl <= 255 and 0 <= window <= 0xFFFF):
            raise Misuse("ttl must fit u8 and window u16")
        self.ttl = int(ttl)
        self.window = int(window)
        self._build_templates()

    @classmethod
    def from_addresses(
        cls,
        src: Sequence[str | ipaddress.IPv4Address | ipaddress.IPv6Address],
        dst: Sequence[str | ipaddress.IPv4Address | ipaddress.IPv6Address],
        sport: npt.ArrayLike,
        dport: npt.ArrayLike,
        *,
        src_mac: npt.ArrayLike | None = None,
        dst_mac: npt.ArrayLike | None = None,
        isn: npt.ArrayLike | None = None,
        ack_seq: npt.ArrayLike | None = None,
        stream: npt.ArrayLike | None = None,
        ttl: int = 64,
        window: int = 0xFFFF,
    ) -> FlowSpec:
        """Flows from textual / ``ipaddress`` addresses; each pair must share a family.

        The keyword arguments are the constructor's.
        """
        if len(src) != len(dst):
            raise Misuse("src and dst must have the same length")
        fams: list[int] = []
        s16: list[bytes] = []
        d16: list[bytes] = []
        for a, b in zip(src, dst, strict=True):
            try:
                fa, ra = addr16(a)
                fb, rb = addr16(b)
            except ValueError as e:
                raise Misuse(str(e)) from None
            if fa != fb:
                raise Misuse(f"flow {a} -> {b} mixes IPv4 and IPv6")
            fams.append(fa)
            s16.append(ra)
            d16.append(rb)
        k = len(fams)
        return cls(
            fams,
            np.frombuffer(b"".join(s16), np.uint8).reshape(k, 16),
            np.frombuffer(b"".join(d16), np.uint8).reshape(k, 16),
            sport,
            dport,
            src_mac=src_mac,
            dst_mac=dst_mac,
            isn=isn,
            ack_seq=ack_seq,
            stream=stream,
            ttl=ttl,
            window=window,
        )

    def __len__(self) -> int:
        """Number of flows K."""
        return int(self.family.shape[0])

    def _build_templates(self) -> None:
        k = len(self)
        t4 = np.zeros(k, FRAME4_HDR)
        t6 = np.zeros(k, FRAME6_HDR)
        for t in (t4, t6):
            t["eth"]["h_dest"] = self.dst_mac
            t["eth"]["h_source"] = self.src_mac
            tcp = t["tcp"]
            tcp["source"] = self.sport
            tcp["dest"] = self.dport
            tcp["ack_seq"] = self.ack_seq
            tcp["doff_res"] = (TCP_HLEN // 4) << 4
            tcp["window"] = self.window
        t4["eth"]["h_proto"] = ETH_P_IP
        ip4 = t4["ip"]
        ip4["version_ihl"] = 0x45
        ip4["frag_off"] = IP_DF
        ip4["ttl"] = self.ttl
        ip4["protocol"] = IPPROTO_TCP
        ip4["saddr"] = self.src_addr[:, 12:]
        ip4["daddr"] = self.dst_addr[:, 12:]
        t6["eth"]["h_proto"] = ETH_P_IPV6
        ip6 = t6["ip"]
        ip6["ver_tc_flow"] = 6 << 28
        ip6["nexthdr"] = IPPROTO_TCP
        ip6["hop_limit"] = self.ttl
        ip6["saddr"] = self.src_addr
        ip6["daddr"] = self.dst_addr
        self._tmpl4: npt.NDArray[np.uint8] = t4.view(np.uint8).reshape(k, FRAME4_HLEN)
        self._tmpl6: npt.NDArray[np.uint8] = t6.view(np.uint8).reshape(k, FRAME6_HLEN)
        # IPv4 header sum without tot_len, id and check (all 0 in the template).
        self._ipsum4 = _be_words_sum(self._tmpl4[:, ETH_HLEN : ETH_HLEN + IPV4_HLEN])
        # TCP pseudo-header sum without the length: addresses + protocol.
        a4 = np.concatenate([self.src_addr[:, 12:], self.dst_addr[:, 12:]], axis=1)
        a6 = np.concatenate([self.src_addr, self.dst_addr], axis=1)
        self._isn1 = self.isn.astype(np.uint64) + np.uint64(1)  # seq of stream offset 0
        self._phase = pattern.phases(self.stream).astype(np.uint64)
        self._pseudo = np.where(
            self.family == FAMILY_V6, _be_words_sum(a6), _be_words_sum(a4)
        ) + np.uint64(IPPROTO_TCP)


# ------------------------------------------------------------------------------ build

_SYN_BIT = ((np.arange(256) & TCP_SYN) != 0).astype(np.uint64)  # flags -> 1 if SYN


def _as_batch(v: npt.ArrayLike, n: int, dtype: type[np.generic], name: str) -> np.ndarray:
    """``v`` as an (n,) array of ``dtype``; no copy when it already is one."""
    if type(v) is np.ndarray and v.dtype == dtype and v.shape == (n,):
        return v
    arr = np.asarray(v)
    try:
        return np.broadcast_to(arr, (n,)).astype(dtype, copy=False)
    except (ValueError, TypeError, OverflowError):
        raise Misuse(f"{name} must broadcast to ({n},) {np.dtype(dtype)}, got {arr!r}") from None


def build_frames(
    flows: FlowSpec,
    out: npt.NDArray[np.uint8],
    flow: npt.ArrayLike,
    offset: npt.ArrayLike,
    length: npt.ArrayLike,
    flags: npt.ArrayLike = TCP_ACK,
    *,
    ip_id: npt.ArrayLike | None = None,
    fill_payload: bool = True,
    tcp_csum: bool = False,
    min_frame: int = ETH_ZLEN,
) -> npt.NDArray[np.uint32]:
    """Write one frame per batch entry into the rows of ``out``; return the frame lengths.

    :param flows: the flows; ``flow[i]`` indexes it.
    :param out: writable 2-D uint8 array of slots, ``out.shape[0] >= n`` and
        ``out.shape[1] >=`` the longest frame.  Frame ``i`` goes to ``out[i, :len_i]``;
        slot bytes past ``len_i`` are unspecified (they may hold pattern bytes).
    :param flow: (n,) flow indices.
    :param offset: (n,) stream offset (u64) of each frame's first payload byte; a
        scalar broadcasts.  ``seq`` is derived from it (see the module docstring).
    :param length: (n,) payload lengths, ``0 ..`` :data:`MAX_PAYLOAD_V4` / ``_V6``.
    :param flags: (n,) or scalar TCP flag bits (default ACK).
    :param ip_id: (n,) IPv4 identification; default the low 16 bits of ``seq``.
    :param fill_payload: copy the :mod:`shared.pattern` bytes of the flow's stream
        at ``offset``; False leaves the payload bytes as the caller wrote them.
    :param tcp_csum: compute the TCP checksum (default off: field 0, see the
        module docstring for this departure).  Costs about three times the build.
    :param min_frame: pad shorter frames with zeros to this length (Ethernet's 60).
    :raises Misuse: on arguments that do not fit (bad flow index, lengths, slot size).
    """
    f = _as_batch(np.atleast_1d(np.asarray(flow)).reshape(-1), np.size(flow), np.intp, "flow")
    n = f.shape[0]
    frame_len = np.empty(n, dtype=np.uint32)
    if n == 0:
        return frame_len
    off_in = np.asarray(offset)
    if off_in.dtype.kind in "if" and off_in.size and off_in.min() < 0:
        raise Misuse("offsets must be non-negative")
    off = _as_batch(off_in, n, np.uint64, "offset")
    lens = _as_batch(length, n, np.int64, "length")
    fl = _as_batch(flags, n, np.uint8, "flags")
    ids = None if ip_id is None else _as_batch(ip_id, n, np.uint16, "ip_id")
    if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.ndim != 2:
        raise Misuse("out must be a 2-D uint8 array of frame slots")
    if out.shape[0] < n:
        raise Misuse(f"out has {out.shape[0]} slots for {n} frames")
    if f.min() < 0 or f.max() >= len(flows):
        raise Misuse(f"flow index out of range [0, {len(flows)})")
    if lens.min() < 0:
        raise Misuse("negative payload length")
    n6 = int(np.count_nonzero(flows.family[f] == FAMILY_V6))
    if n6 == 0 or n6 == n:
        rows: slice | npt.NDArray[np.intp] = slice(0, n)
        frame_len[:] = _build_group(
            flows, out, rows, f, off, lens, fl, ids, n6 == n, fill_payload, tcp_csum, min_frame
        )
        return frame_len
    is6 = flows.family[f] == FAMILY_V6
    for v6 in (False, True):
        idx = np.flatnonzero(is6 if v6 else ~is6)
        frame_len[idx] = _build_group(
            flows,
            out,
            idx,
            f[idx],
            off[idx],
            lens[idx],
            fl[idx],
            None if ids is None else ids[idx],
            v6,
            fill_payload,
            tcp_csum,
            min_frame,
        )
    return frame_len


def _build_group(
    flows: FlowSpec,
    out: npt.NDArray[np.uint8],
    rows: slice | npt.NDArray[np.intp],
    f: npt.NDArray[np.intp],
    off: npt.NDArray[np.uint64],
    lens: npt.NDArray[np.int64],
    fl: npt.NDArray[np.uint8],
    ids: npt.NDArray[np.uint16] | None,
    v6: bool,
    fill_payload: bool,
    tcp_csum: bool,
    min_frame: int,
) -> npt.NDArray[np.int64]:
    """Build frames of one family into ``out[rows]``; return their lengths."""
    h = FRAME6_HLEN if v6 else FRAME4_HLEN
    w = int(lens.max())
    if w > (MAX_PAYLOAD_V6 if v6 else MAX_PAYLOAD_V4):
        raise Misuse(f"payload length {w} too long for IPv{6 if v6 else 4}")
    short = h + int(lens.min()) < min_frame
    need = max(h + w, min_frame)
    if out.shape[1] < need:
        raise Misuse(f"slot of {out.shape[1]} bytes is too small for a {need}-byte frame")

    hdr = np.take(flows._tmpl6 if v6 else flows._tmpl4, f, axis=0)  # (m, h), contiguous
    hv = hdr.view(FRAME6_HDR if v6 else FRAME4_HDR)[:, 0]
    tcp = hv["tcp"]
    ip = hv["ip"]
    # seq = isn + 1 + offset, minus 1 for a SYN (the SYN itself is at isn); the
    # store into the u32 field wraps mod 2**32.
    seq = flows._isn1[f] + off
    seq -= _SYN_BIT[fl]
    tcp["seq"] = seq
    tcp["flags"] = fl
    if v6:
        ip["payload_len"] = lens + TCP_HLEN
    else:
        tot_len = lens.astype(np.uint64)
        tot_len += np.uint64(IPV4_HLEN + TCP_HLEN)
        ident = (seq & np.uint64(0xFFFF)) if ids is None else ids.astype(np.uint64)
        ip["tot_len"] = tot_len
        ip["id"] = ident
        s = flows._ipsum4[f] + tot_len
        s += ident
        ip["check"] = _csum(s)

    pay: npt.NDArray[np.uint8] | None = None
    if fill_payload and w > 0:
        pos = off % np.uint64(pattern.PERIOD)
        pos += flows._phase[f]
        pay = pattern.rows_at(pos, w)
        out[rows, h : h + w] = pay
    if tcp_csum:
        src = pay if pay is not None else out[rows, h : h + w]
        tcp["check"] = _csum(_tcp_sum(flows, f, hdr[:, h - TCP_HLEN :], src, lens))
    out[rows, :h] = hdr
    flen = lens + h
    if short:  # rare: 0..5-byte IPv4 payloads; zero the Ethernet padding
        pad = flen < min_frame
        r = np.arange(out.shape[0])[rows][pad]
        blk = out[r, :min_frame]
        blk[np.arange(min_frame)[None, :] >= flen[pad][:, None]] = 0
        out[r, :min_frame] = blk
        np.maximum(flen, min_frame, out=flen)
    return flen


def _tcp_sum(
    flows: FlowSpec,
    f: npt.NDArray[np.intp],
    tcph: npt.NDArray[np.uint8],
    payload: npt.NDArray[np.uint8],
    lens: npt.NDArray[np.int64],
) -> npt.NDArray[np.uint64]:
    """Ones'-complement sum (unfolded) of pseudo-header + TCP header (check = 0) + payload."""
    total = flows._pseudo[f] + (lens + TCP_HLEN).astype(np.uint64) + _be_words_sum(tcph)
    nw = payload.shape[1] // 2
    if nw:
        words = payload[:, : 2 * nw].view(">u2")
        full = np.arange(nw)[None, :] < (lens // 2)[:, None]
        total += np.where(full, words, 0).sum(axis=1, dtype=np.uint64)
    r = np.flatnonzero(lens & 1)
    if r.shape[0]:
        total[r] += payload[r, lens[r] - 1].astype(np.uint64) << np.uint64(8)
    return total


# ------------------------------------------------------------------------------ parse

_GATHER_COLS = np.arange(GATHER_WIDTH, dtype=np.intp)
_TCP_COLS = np.arange(TCP_HLEN, dtype=np.intp)
_CSUM_WORDS = np.arange(30)  # 16-bit words of the largest IPv4 header
_ONES5 = np.ones(IPV4_HLEN // 4)  # float64: sums 32-bit words exactly
_V4MAPPED = np.frombuffer(_V4MAPPED_PREFIX, np.uint8)
_V4MAPPED_WORD = np.frombuffer(_V4MAPPED_PREFIX[8:], np.uint32)[0]
# Big-endian 16-bit constants as a native uint16 view of the same two bytes reads them.
_ETH_P_IP_NATIVE = np.frombuffer(ETH_P_IP.to_bytes(2, "big"), np.uint16)[0]
_ETH_P_IPV6_NATIVE = np.frombuffer(ETH_P_IPV6.to_bytes(2, "big"), np.uint16)[0]
_FRAG_MASK_NATIVE = np.frombuffer((IP_MF | IP_OFFSET).to_bytes(2, "big"), np.uint16)[0]

# Lookup tables indexed by a header byte (one fancy index instead of shift/mask/compare).
_B = np.arange(256)
_IHL4 = ((_B & 0x0F) * 4).astype(np.int64)  # version_ihl -> IPv4 header bytes
_BAD_V4 = ((_B >> 4) != 4) | ((_B & 0x0F) < 5)  # version_ihl -> version/IHL invalid
_BAD_V6 = (_B >> 4) != 6  # first IPv6 byte -> version invalid
_DOFF4 = ((_B >> 4) * 4).astype(np.int64)  # doff_res -> TCP header bytes
del _B

# Status codes in check order; the conditions in _parse_core are rows of one bool matrix
# and the first true row wins (the last row is always true: OK).
_S = FrameStatus
_CHECK_CODES = np.array(
    [
        _S.TRUNCATED,  # 0 offset/length outside the buffer or the slot
        _S.OVERSIZE,  # 1 longer than MTU + 14
        _S.TRUNCATED,  # 2 no full Ethernet header
        _S.BAD_ETHERTYPE,  # 3
        _S.TRUNCATED,  # 4 no fixed IP header
        _S.BAD_IP,  # 5 version (IPv4: or IHL < 5)
        _S.TRUNCATED,  # 6 no full IPv4 header with options
        _S.BAD_IP_CSUM,  # 7
        _S.TRUNCATED,  # 8 IP datagram longer than the frame
        _S.BAD_IP,  # 9 tot_len < IHL * 4
        _S.FRAGMENT,  # 10
        _S.NOT_TCP,  # 11
        _S.TRUNCATED,  # 12 IP payload shorter than a TCP header
        _S.BAD_TCP_DOFF,  # 13 doff < 5 or past the datagram
        _S.OK,  # 14
    ],
    dtype=np.uint8,
)
del _S
_NCHECK = len(_CHECK_CODES)
_CHECK_WEIGHTS = 2.0 ** np.arange(_NCHECK - 1)  # bit k = check k failed
_FIRST_BIT_CODE = _CHECK_CODES[
    np.array([(v & -v).bit_length() - 1 if v else _NCHECK - 1 for v in range(1 << (_NCHECK - 1))])
]


def _as_u8_flat(buf: npt.ArrayLike | bytes | bytearray | memoryview) -> npt.NDArray[np.uint8]:
    if isinstance(buf, np.ndarray):
        a = buf
    elif isinstance(buf, bytes | bytearray | memoryview):
        a = np.frombuffer(buf, dtype=np.uint8)
    else:
        a = np.asarray(buf)
    if a.dtype != np.uint8:
        raise Misuse("frame buffer must be uint8")
    return np.ascontiguousarray(a.reshape(-1))


def parse_frames(
    buf: npt.NDArray[np.uint8] | bytes | bytearray | memoryview,
    offsets: npt.ArrayLike,
    lengths: npt.ArrayLike,
    mtu: int = 1500,
    *,
    check_ip_csum: bool = True,
) -> npt.NDArray[np.void]:
    """Parse the frames ``buf[offsets[i] : offsets[i] + lengths[i]]``; one :data:`PARSED` each.

    Never raises on frame content or on offsets/lengths outside ``buf`` (those
    frames are ``TRUNCATED``).  ``offsets`` and ``lengths`` must have one shape
    (else :class:`Misuse`).  ``mtu``: frames longer than ``mtu + 14`` are
    ``OVERSIZE``.  ``check_ip_csum=False`` skips the IPv4 header checksum.
    """
    b = _as_u8_flat(buf)
    off = np.atleast_1d(np.asarray(offsets)).astype(np.int64).reshape(-1)
    ln = np.atleast_1d(np.asarray(lengths)).astype(np.int64).reshape(-1)
    if off.shape != ln.shape:
        raise Misuse("offsets and lengths differ in shape")
    size = b.shape[0]
    bad = (off < 0) | (ln < 0) | (off > size - ln)
    if size >= GATHER_WIDTH:
        # Row gather from a sliding-window view (one memcpy per frame); frames that
        # start in the last GATHER_WIDTH - 1 bytes are gathered byte-wise instead.
        last = size - GATHER_WIDTH
        win = np.ndarray((last + 1, GATHER_WIDTH), np.uint8, b, 0, (1, 1))
        hm = win[np.minimum(np.maximum(off, 0), last)]
        tail = np.flatnonzero(off > last)
        if tail.shape[0]:
            idx = np.minimum(off[tail], size - 1)[:, None] + _GATHER_COLS
            hm[tail] = np.take(b, idx, mode="clip")
    elif size:
        idx = np.minimum(np.maximum(off, 0), size - 1)[:, None] + _GATHER_COLS
        hm = np.take(b, idx, mode="clip")
    else:
        hm = np.zeros((off.shape[0], GATHER_WIDTH), dtype=np.uint8)
    return _parse_core(hm, ln, bad, mtu, check_ip_csum)


def parse_slots(
    slots: npt.NDArray[np.uint8],
    lengths: npt.ArrayLike,
    mtu: int | npt.NDArray[np.int64] = 1500,
    *,
    check_ip_csum: bool = True,
    in_slot: npt.ArrayLike | None = None,
) -> npt.NDArray[np.void]:
    """Parse frame ``i`` = ``slots[i, :lengths[i]]`` for ``i < len(lengths)``.

    The slot layout :func:`build_frames` writes.  A length below 0 or above the
    slot width gives ``TRUNCATED``.  Nothing is copied when slots are at least
    :data:`GATHER_WIDTH` bytes wide.  ``in_slot``: the bytes of each frame that are in
    its slot when that is fewer than ``lengths`` (a header/data split frame: its headers;
    the rest is elsewhere); the width check applies to those.  ``mtu`` may be per frame
    (a HW-GRO session may be longer than the MTU).
    """
    if not isinstance(slots, np.ndarray) or slots.dtype != np.uint8 or slots.ndim != 2:
        raise Misuse("slots must be a 2-D uint8 array")
    ln = np.atleast_1d(np.asarray(lengths)).astype(np.int64).reshape(-1)
    n = ln.shape[0]
    if n > slots.shape[0]:
        raise Misuse(f"{n} lengths for {slots.shape[0]} slots")
    width = slots.shape[1]
    if in_slot is None:
        bad = (ln < 0) | (ln > width)
    else:
        held = np.atleast_1d(np.asarray(in_slot)).astype(np.int64).reshape(-1)
        bad = (ln < 0) | (held < 0) | (held > width) | (held > ln)
    if width >= GATHER_WIDTH and slots.strides[1] == 1:
        hm = slots[:n, :GATHER_WIDTH]
    else:
        hm = np.zeros((n, GATHER_WIDTH), dtype=np.uint8)
        cw = min(width, GATHER_WIDTH)
        hm[:, :cw] = slots[:n, :cw]
    return _parse_core(hm, ln, bad, mtu, check_ip_csum)


def _be16(hm: npt.NDArray[np.uint8], col: int) -> npt.NDArray[np.int64]:
    """Big-endian u16 at byte column ``col`` of every row, as int64."""
    return hm[:, col : col + 2].view(">u2")[:, 0].astype(np.int64)


def _parse_core(
    hm: npt.NDArray[np.uint8],
    ln: npt.NDArray[np.int64],
    bad: npt.NDArray[np.bool_],
    mtu: int | npt.NDArray[np.int64],
    check_ip_csum: bool,
) -> npt.NDArray[np.void]:
    """Classify and decode frames whose first :data:`GATHER_WIDTH` bytes are the rows of ``hm``.

    ``hm`` may be a read-only strided view (last axis contiguous).  Bytes past a
    frame's length hold garbage; the checks are ordered so that garbage can only
    reach frames that an earlier check already rejected, and every field of a
    rejected frame is zeroed at the end.  Batches of one family whose TCP
    headers all sit at one offset (the normal case) take slices; mixed batches
    and IPv4 options take one gather.
    """
    n = hm.shape[0]
    raw = np.zeros((n, PARSED.itemsize), dtype=np.uint8)
    res = raw.view(PARSED).reshape(n)
    if n == 0:
        return res
    chk = np.empty((_NCHECK, n), dtype=np.bool_)
    chk[-1] = True
    # Compare in native (little-endian) order: no byte swapping on the hot path.
    ethertype = hm[:, 12:14].view(np.uint16)[:, 0]
    is4 = np.equal(ethertype, _ETH_P_IP_NATIVE)
    is6 = np.equal(ethertype, _ETH_P_IPV6_NATIVE)
    n4 = int(np.count_nonzero(is4))
    n6 = int(np.count_nonzero(is6))
    all4, all6 = n4 == n, n6 == n
    vihl = hm[:, 14]

    chk[0] = bad
    np.greater(ln, mtu + ETH_HLEN, out=chk[1])
    np.less(ln, ETH_HLEN, out=chk[2])
    if all4 or all6:
        chk[3] = False
    else:
        np.logical_not(is4 | is6, out=chk[3])

    if all6:
        ip_hlen: npt.NDArray[np.int64] | int = IPV6_HLEN
        tot_len = _be16(hm, 18) + IPV6_HLEN
        proto = hm[:, 20]
        chk[4] = ln < ETH_HLEN + IPV6_HLEN
        chk[5] = _BAD_V6[vihl]
    else:
        ihl4 = _IHL4[vihl]
        tot_len = _be16(hm, 16)
        proto = hm[:, 23]
        if all4:
            ip_hlen = ihl4
            chk[4] = ln < ETH_HLEN + IPV4_HLEN
            chk[5] = _BAD_V4[vihl]
        else:
            ip_hlen = np.where(is6, IPV6_HLEN, ihl4)
            tot_len = np.where(is6, _be16(hm, 18) + IPV6_HLEN, tot_len)
            proto = np.where(is6, hm[:, 20], proto)
            chk[4] = ln < np.where(is6, ETH_HLEN + IPV6_HLEN, ETH_HLEN + IPV4_HLEN)
            chk[5] = np.where(is6, _BAD_V6[vihl], _BAD_V4[vihl])
    l4_off = ip_hlen + ETH_HLEN
    ip_end = tot_len + ETH_HLEN
    np.less(ln, l4_off, out=chk[6])

    if all6:
        chk[7] = chk[9] = chk[10] = False
    else:
        uniform5 = int(np.count_nonzero(vihl == 0x45)) == n
        if not check_ip_csum:
            chk[7] = False
        else:
            # A header is valid when its folded ones'-complement sum is 0xffff, i.e. the plain
            # sum of its 16-bit words is a non-zero multiple of 0xffff (an all-zero header
            # already failed check 5).  Folding only needs the value mod 0xffff, and
            # 2**16 == 1 (mod 0xffff), so native little-endian words work (a byte swap is a
            # multiplication by 256, invertible mod 0xffff), and so do native 32-bit words,
            # summed exactly in float64 by one matrix-vector product.
            if uniform5:
                s = hm[:, ETH_HLEN : ETH_HLEN + IPV4_HLEN].view(np.uint32) @ _ONES5
            else:
                words = hm[:, ETH_HLEN : ETH_HLEN + 60].view(np.uint16)
                s = np.where((ihl4 // 2)[:, None] > _CSUM_WORDS, words, 0).sum(axis=1)
            q = s / 0xFFFF  # exact: s < 2**35, so s / 0xffff is an integer only for multiples
            np.not_equal(q, np.floor(q), out=chk[7])
        np.less(tot_len, ihl4, out=chk[9])
        frag = hm[:, 20:22].view(np.uint16)[:, 0] & _FRAG_MASK_NATIVE
        np.not_equal(frag, 0, out=chk[10])
        if not all4:
            chk[7] &= is4
            chk[9] &= is4
            chk[10] &= is4
    np.greater(ip_end, ln, out=chk[8])
    np.not_equal(proto, IPPROTO_TCP, out=chk[11])
    l4_len = ip_end - l4_off
    np.less(l4_len, TCP_HLEN, out=chk[12])

    # TCP header: one slice when every frame has it at the same offset, else one gather.
    if all6 or (all4 and uniform5):
        at = ETH_HLEN + (IPV6_HLEN if all6 else IPV4_HLEN)
        tcpb = hm[:, at : at + TCP_HLEN]
    else:
        cols = np.minimum(l4_off, GATHER_WIDTH - TCP_HLEN)[:, None] + _TCP_COLS
        tcpb = np.take_along_axis(hm, cols, axis=1)
    tcp = tcpb.view(TCPHDR)[:, 0]
    doff4 = _DOFF4[tcp["doff_res"]]
    chk[13] = (doff4 < TCP_HLEN) | (doff4 > l4_len)
    if n <= 128:
        status = _CHECK_CODES[chk.argmax(axis=0)]
    else:  # argmax along the short axis is slow for long batches: first set bit by LUT
        status = _FIRST_BIT_CODE[(_CHECK_WEIGHTS @ chk[:-1]).astype(np.intp)]

    res["seq"] = tcp["seq"]
    res["ack_seq"] = tcp["ack_seq"]
    res["payload_len"] = l4_len - doff4
    res["sport"] = tcp["source"]
    res["dport"] = tcp["dest"]
    res["window"] = tcp["window"]
    res["l4_off"] = l4_off
    res["payload_off"] = l4_off + doff4
    res["tcp_flags"] = tcp["flags"]
    res["ip_proto"] = proto
    addr = raw[:, _ADDR_OFF : _ADDR_OFF + 32]  # src_addr | dst_addr
    if all6:
        res["family"] = FAMILY_V6
        addr[...] = hm[:, 22:54]
    else:
        res["family"] = FAMILY_V4 if all4 else np.where(is6, FAMILY_V6, FAMILY_V4)
        # IPv4-mapped: 32-bit words 2 and 6 are 00 00 ff ff, 3 and 7 the addresses.
        words = addr.view(np.uint32)
        words[:, 2] = _V4MAPPED_WORD
        words[:, 6] = _V4MAPPED_WORD
        words[:, 3] = hm[:, 26:30].view(np.uint32)[:, 0]
        words[:, 7] = hm[:, 30:34].view(np.uint32)[:, 0]
        if not all4:
            r6 = np.flatnonzero(is6)
            addr[r6] = hm[r6, 22:54]
    notok = status != 0
    if np.count_nonzero(notok):
        raw[notok] = 0
    res["status"] = status
    return res
