"""Wire frames: build/parse round trips, checksums, and a status for every malformed frame.

Malformed frames are made by hand with ``struct`` (not with the builder under
test).  The dpkt cross-checks run only when dpkt is installed (dev extra).
"""

from __future__ import annotations

import ipaddress
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import pattern, wire
from shared.errors import Misuse
from shared.wire import FlowSpec, FrameStatus

S = FrameStatus
SRC_MAC = bytes.fromhex("020000000002")
DST_MAC = bytes.fromhex("020000000001")

# ---------------------------------------------------------------- reference helpers


def ref_csum(data: bytes) -> int:
    """RFC 1071 Internet checksum, the plain way."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def tcp_hdr(
    sport: int = 1234,
    dport: int = 80,
    seq: int = 1000,
    ack: int = 0,
    flags: int = wire.TCP_ACK,
    doff: int | None = None,
    options: bytes = b"",
    window: int = 0xFFFF,
) -> bytes:
    d = (20 + len(options)) // 4 if doff is None else doff
    return struct.pack("!HHIIBBHHH", sport, dport, seq, ack, d << 4, flags, window, 0, 0) + options


def mk_v4(
    payload: bytes = b"x" * 10,
    *,
    tcp: bytes | None = None,
    ihl: int = 5,
    options: bytes = b"",
    version: int = 4,
    tot_len: int | None = None,
    proto: int = 6,
    frag: int = 0x4000,
    csum: int | None = None,
    ethertype: int = wire.ETH_P_IP,
    src: str = "10.0.0.1",
    dst: str = "10.0.0.2",
) -> bytes:
    seg = (tcp_hdr() if tcp is None else tcp) + payload
    tl = 4 * ihl + len(seg) if tot_len is None else tot_len
    hdr = (
        struct.pack(
            "!BBHHHBBH4s4s",
            (version << 4) | ihl,
            0,
            tl,
            7,
            frag,
            64,
            proto,
            0,
            ipaddress.IPv4Address(src).packed,
            ipaddress.IPv4Address(dst).packed,
        )
        + options
    )
    c = ref_csum(hdr) if csum is None else csum
    hdr = hdr[:10] + struct.pack("!H", c) + hdr[12:]
    return DST_MAC + SRC_MAC + struct.pack("!H", ethertype) + hdr + seg


def mk_v6(
    payload: bytes = b"y" * 10,
    *,
    tcp: bytes | None = None,
    version: int = 6,
    plen: int | None = None,
    nexthdr: int = 6,
    src: str = "fd00::1",
    dst: str = "fd00::2",
) -> bytes:
    seg = (tcp_hdr() if tcp is None else tcp) + payload
    pl = len(seg) if plen is None else plen
    hdr = struct.pack(
        "!IHBB16s16s",
        version << 28,
        pl,
        nexthdr,
        64,
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
    )
    return DST_MAC + SRC_MAC + struct.pack("!H", wire.ETH_P_IPV6) + hdr + seg


def parse_list(frames: list[bytes], mtu: int = 9000, **kw: bool) -> np.ndarray:
    """Parse byte strings packed back to back in one flat buffer."""
    lens = np.array([len(f) for f in frames], dtype=np.int64)
    offs = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    return wire.parse_frames(b"".join(frames), offs, lens, mtu, **kw)


def parse_one(frame: bytes, mtu: int = 9000, **kw: bool) -> np.void:
    res = parse_list([frame], mtu, **kw)
    assert res.shape == (1,)
    return res[0]


def mapped(a: str) -> bytes:
    return wire.addr16(a)[1]


# ---------------------------------------------------------------- layouts


def test_header_dtypes_match_linux_sizes() -> None:
    assert wire.ETHHDR.itemsize == 14
    assert wire.IPHDR.itemsize == 20
    assert wire.IPV6HDR.itemsize == 40
    assert wire.TCPHDR.itemsize == 20
    assert wire.FRAME4_HDR.itemsize == 54 and wire.FRAME6_HDR.itemsize == 74
    assert wire.PARSED.itemsize == 64

    def offset(dt: np.dtype, name: str) -> int:
        assert dt.fields is not None
        return int(dt.fields[name][1])

    assert offset(wire.IPHDR, "check") == 10 and offset(wire.IPHDR, "saddr") == 12
    assert offset(wire.TCPHDR, "seq") == 4 and offset(wire.TCPHDR, "flags") == 13
    assert offset(wire.IPV6HDR, "saddr") == 8
    assert (wire.ETH_P_IP, wire.ETH_P_IPV6, wire.IPPROTO_TCP) == (0x0800, 0x86DD, 6)
    assert (wire.TCP_FIN, wire.TCP_SYN, wire.TCP_RST, wire.TCP_PSH, wire.TCP_ACK, wire.TCP_URG) == (
        1,
        2,
        4,
        8,
        16,
        32,
    )


def test_addresses_are_ipv4_mapped() -> None:
    fam, a = wire.addr16("192.0.2.7")
    assert fam == 4 and a == ipaddress.IPv6Address("::ffff:192.0.2.7").packed
    assert wire.addr_str(a, 4) == "192.0.2.7"
    fam, a = wire.addr16("2001:db8::1")
    assert fam == 6 and wire.addr_str(a, 6) == "2001:db8::1"
    assert wire.mss(4, 1500) == 1460 and wire.mss(6, 1500) == 1440
    assert wire.max_frame_len(9000) == 9014


# ---------------------------------------------------------------- round trip

v4_addr = st.ip_addresses(v=4).map(str)
v6_addr = st.ip_addresses(v=6).map(str)
flow_st = st.one_of(st.tuples(v4_addr, v4_addr), st.tuples(v6_addr, v6_addr))


@st.composite
def batches(draw: st.DrawFn, families: str = "mixed") -> tuple[FlowSpec, dict[str, np.ndarray]]:
    k = draw(st.integers(1, 6))
    pair = {"mixed": flow_st, "v4": st.tuples(v4_addr, v4_addr), "v6": st.tuples(v6_addr, v6_addr)}
    pairs = draw(st.lists(pair[families], min_size=k, max_size=k))
    ports = st.integers(0, 0xFFFF)
    flows = FlowSpec.from_addresses(
        [p[0] for p in pairs],
        [p[1] for p in pairs],
        draw(st.lists(ports, min_size=k, max_size=k)),
        draw(st.lists(ports, min_size=k, max_size=k)),
        isn=draw(st.lists(st.integers(0, 2**32 - 1), min_size=k, max_size=k)),
        ack_seq=draw(st.integers(0, 2**32 - 1)),
        stream=draw(st.lists(st.integers(0, 2**40), min_size=k, max_size=k)),
    )
    n = draw(st.integers(1, 24))
    batch = {
        "flow": np.array(draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))),
        "offset": np.array(
            draw(st.lists(st.integers(0, 2**48), min_size=n, max_size=n)), dtype=np.uint64
        ),
        "length": np.array(
            draw(
                st.lists(st.one_of(st.integers(0, 9000), st.integers(0, 8)), min_size=n, max_size=n)
            )
        ),
        "flags": np.array(draw(st.lists(st.integers(0, 255), min_size=n, max_size=n)), np.uint8),
    }
    return flows, batch


SLOT = 9216
MTU = SLOT - 14


def check_parsed(
    flows: FlowSpec, b: dict[str, np.ndarray], slots: np.ndarray, flen: np.ndarray, res: np.ndarray
) -> None:
    f, off, ln, fl = b["flow"], b["offset"], b["length"], b["flags"]
    fam = flows.family[f]
    h = np.where(fam == 6, 74, 54)
    assert np.array_equal(flen, np.maximum(h + ln, 60))
    assert (res["status"] == S.OK).all(), res["status"]
    assert np.array_equal(res["family"], fam)
    assert np.array_equal(res["src_addr"], flows.src_addr[f])
    assert np.array_equal(res["dst_addr"], flows.dst_addr[f])
    assert np.array_equal(res["sport"], flows.sport[f])
    assert np.array_equal(res["dport"], flows.dport[f])
    syn = (fl & wire.TCP_SYN) != 0
    seq = (flows.isn[f].astype(object) + 1 + off.astype(object) - syn) % 2**32
    assert np.array_equal(res["seq"].astype(object), seq)
    assert np.array_equal(res["ack_seq"], flows.ack_seq[f])
    assert np.array_equal(res["tcp_flags"], fl)
    assert np.array_equal(res["ip_proto"], np.full(len(f), 6))
    assert np.array_equal(res["l4_off"], h - 20)
    assert np.array_equal(res["payload_off"], h)
    assert np.array_equal(res["payload_len"], ln)
    for i in range(len(f)):
        p = slots[i, h[i] : h[i] + ln[i]]
        assert pattern.verify(int(flows.stream[f[i]]), int(off[i]), p) == -1
        assert not slots[i, h[i] + ln[i] : flen[i]].any()  # Ethernet padding is zero


@settings(max_examples=60, deadline=None)
@given(batches())
def test_build_parse_round_trip(fb: tuple[FlowSpec, dict[str, np.ndarray]]) -> None:
    flows, b = fb
    slots = np.full((len(b["flow"]) + 2, SLOT), 0xAA, dtype=np.uint8)
    flen = wire.build_frames(flows, slots, b["flow"], b["offset"], b["length"], b["flags"])
    assert flen.dtype == np.uint32
    res = wire.parse_slots(slots, flen, MTU)
    check_parsed(flows, b, slots, flen, res)
    # The same frames packed back to back in a flat buffer parse identically.
    frames = [slots[i, : flen[i]].tobytes() for i in range(len(flen))]
    assert (parse_list(frames, MTU) == res).all()


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["v4", "v6"]).flatmap(batches))
def test_round_trip_single_family_batches(fb: tuple[FlowSpec, dict[str, np.ndarray]]) -> None:
    flows, b = fb
    slots = np.zeros((len(b["flow"]), SLOT), dtype=np.uint8)
    flen = wire.build_frames(
        flows, slots, b["flow"], b["offset"], b["length"], b["flags"], tcp_csum=True
    )
    check_parsed(flows, b, slots, flen, wire.parse_slots(slots, flen, MTU))
    for i in range(len(flen)):
        assert_checksums(slots[i, : flen[i]].tobytes())


def assert_checksums(frame: bytes) -> None:
    """Reference check of the IPv4 header checksum and the TCP checksum of a built frame."""
    et = struct.unpack_from("!H", frame, 12)[0]
    if et == wire.ETH_P_IP:
        ihl = (frame[14] & 15) * 4
        assert ref_csum(frame[14 : 14 + ihl]) == 0
        tot = struct.unpack_from("!H", frame, 16)[0]
        seg = frame[14 + ihl : 14 + tot]
        pseudo = frame[26:34] + struct.pack("!BBH", 0, 6, len(seg))
    else:
        plen = struct.unpack_from("!H", frame, 18)[0]
        seg = frame[54 : 54 + plen]
        pseudo = frame[22:54] + struct.pack("!IxxxB", len(seg), 6)
    assert ref_csum(pseudo + seg) == 0


@settings(max_examples=40, deadline=None)
@given(batches("v4"), st.lists(st.integers(0, 0xFFFF), min_size=24, max_size=24))
def test_ipv4_header_checksum_matches_reference(
    fb: tuple[FlowSpec, dict[str, np.ndarray]], ids: list[int]
) -> None:
    flows, b = fb
    n = len(b["flow"])
    slots = np.zeros((n, SLOT), dtype=np.uint8)
    flen = wire.build_frames(
        flows, slots, b["flow"], b["offset"], b["length"], b["flags"], ip_id=np.array(ids[:n])
    )
    for i in range(n):
        hdr = bytearray(slots[i, 14:34].tobytes())
        assert struct.unpack_from("!H", hdr, 4)[0] == ids[i]
        field = struct.unpack_from("!H", hdr, 10)[0]
        hdr[10:12] = b"\0\0"
        want = ref_csum(bytes(hdr))
        # 0 and 0xffff are the same ones'-complement value; both verify.
        assert field == want or {field, want} == {0, 0xFFFF}
        assert parse_one(slots[i, : flen[i]].tobytes(), MTU)["status"] == S.OK


def test_tcp_checksum_odd_lengths_and_caller_payload() -> None:
    flows = FlowSpec.from_addresses(
        ["10.1.1.1", "fd00::5"], ["10.2.2.2", "fd00::6"], [5, 6], [7, 8]
    )
    lens = np.array([0, 1, 2, 3, 1459, 1460, 8999, 1, 4097, 0])
    f = np.arange(10) % 2
    slots = np.zeros((10, SLOT), np.uint8)
    off = np.arange(10) * 977
    flen = wire.build_frames(flows, slots, f, off, lens, wire.TCP_ACK, tcp_csum=True)
    for i in range(10):
        assert_checksums(slots[i, : flen[i]].tobytes())
    # Payload written by the caller (fill_payload=False) is what gets checksummed.
    slots2 = np.random.default_rng(1).integers(0, 256, (10, SLOT), dtype=np.uint8)
    flen2 = wire.build_frames(flows, slots2, f, 0, lens, tcp_csum=True, fill_payload=False)
    for i in range(10):
        assert_checksums(slots2[i, : flen2[i]].tobytes())
    # Default: no TCP checksum (the emulated NIC marks frames CHECKSUM_UNNECESSARY).
    wire.build_frames(flows, slots, f, 0, lens)
    assert not slots[0, 50:52].any() and not slots[1, 70:72].any()


def test_seq_syn_fin_and_wrap() -> None:
    flows = FlowSpec.from_addresses(["10.0.0.1"], ["10.0.0.2"], [1], [2], isn=[2**32 - 2])
    slots = np.zeros((4, 2048), np.uint8)
    off = np.array([0, 0, 1, 2**32 + 5], dtype=np.uint64)
    fl = np.array(
        [wire.TCP_SYN, wire.TCP_ACK, wire.TCP_ACK | wire.TCP_PSH, wire.TCP_FIN | wire.TCP_ACK]
    )
    flen = wire.build_frames(flows, slots, [0, 0, 0, 0], off, [0, 100, 10, 0], fl)
    res = wire.parse_slots(slots, flen)
    assert list(res["seq"]) == [2**32 - 2, 2**32 - 1, 0, 4]
    assert list(res["tcp_flags"]) == list(fl)
    assert list(flen) == [60, 154, 64, 60]
    assert list(res["payload_len"]) == [0, 100, 10, 0]


def test_offsets_beyond_4gib_keep_the_pattern() -> None:
    flows = FlowSpec.from_addresses(["10.0.0.1"], ["10.0.0.2"], [1], [2], stream=[99])
    slots = np.zeros((1, 2048), np.uint8)
    wire.build_frames(flows, slots, [0], np.array([2**40 + 3], np.uint64), [1000])
    assert pattern.verify(99, 2**40 + 3, slots[0, 54:1054]) == -1


def test_build_rejects_bad_arguments() -> None:
    flows = FlowSpec.from_addresses(
        ["10.0.0.1", "fd00::1"], ["10.0.0.2", "fd00::2"], [1, 1], [2, 2]
    )
    slots = np.zeros((4, 1600), np.uint8)
    with pytest.raises(Misuse):
        wire.build_frames(flows, slots, [2], 0, [10])  # no flow 2
    with pytest.raises(Misuse):
        wire.build_frames(flows, slots, [0], 0, [1600])  # slot too small
    with pytest.raises(Misuse):
        wire.build_frames(flows, slots, [0] * 5, 0, 10)  # 5 frames, 4 slots
    with pytest.raises(Misuse):
        wire.build_frames(flows, slots, [0], 0, [-1])
    with pytest.raises(Misuse):
        wire.build_frames(flows, slots, [0], [-5], [1])
    with pytest.raises(Misuse):
        wire.build_frames(flows, np.zeros((2, 70000), np.uint8), [0], 0, [wire.MAX_PAYLOAD_V4 + 1])
    with pytest.raises(Misuse):
        wire.build_frames(flows, slots.astype(np.uint16), [0], 0, [1])
    with pytest.raises(Misuse):
        FlowSpec.from_addresses(["10.0.0.1"], ["fd00::1"], [1], [2])
    with pytest.raises(Misuse):
        FlowSpec.from_addresses(["10.0.0.300"], ["10.0.0.1"], [1], [2])
    with pytest.raises(Misuse):
        FlowSpec.from_addresses(["10.0.0.1"], ["10.0.0.2"], [70000], [2])
    with pytest.raises(Misuse):
        FlowSpec([5], np.zeros((1, 16)), np.zeros((1, 16)), 1, 2)
    assert wire.build_frames(flows, slots, [], 0, []).shape == (0,)
    big = np.zeros((1, 70000), np.uint8)
    flen = wire.build_frames(flows, big, [1], 0, [wire.MAX_PAYLOAD_V6])
    assert flen[0] == 74 + wire.MAX_PAYLOAD_V6
    assert parse_one(big[0, : flen[0]].tobytes(), mtu=70000)["payload_len"] == wire.MAX_PAYLOAD_V6


# ---------------------------------------------------------------- malformed frames


def test_valid_hand_made_frames() -> None:
    r = parse_one(mk_v4(b"hello"))
    assert r["status"] == S.OK and r["family"] == 4 and r["payload_len"] == 5
    assert r["payload_off"] == 54 and r["sport"] == 1234 and r["dport"] == 80 and r["seq"] == 1000
    assert bytes(r["src_addr"]) == mapped("10.0.0.1") and bytes(r["dst_addr"]) == mapped("10.0.0.2")
    r = parse_one(mk_v6(b"hello"))
    assert r["status"] == S.OK and r["family"] == 6 and r["payload_len"] == 5
    assert r["payload_off"] == 74 and bytes(r["dst_addr"]) == mapped("fd00::2")


def test_ipv4_options_and_tcp_options() -> None:
    opts = b"\x01" * 12  # NOPs: IHL 8
    topts = b"\x02\x04\x05\xb4" + b"\x01" * 36  # MSS + NOPs: doff 15
    frames = [
        mk_v4(b"abc", ihl=8, options=opts),
        mk_v4(b"abcd", ihl=15, options=b"\x01" * 40, tcp=tcp_hdr(options=topts, seq=77)),
        mk_v4(b"", ihl=6, options=b"\x01" * 4),
        mk_v6(b"xyz", tcp=tcp_hdr(options=topts)),
        mk_v4(b"plain"),
    ]
    res = parse_list(frames)
    assert list(res["status"]) == [S.OK] * 5
    assert list(res["l4_off"]) == [46, 74, 38, 54, 34]
    assert list(res["payload_off"]) == [66, 134, 58, 114, 54]
    assert list(res["payload_len"]) == [3, 4, 0, 3, 5]
    assert res["seq"][1] == 77 and res["dport"][1] == 80
    got = [
        fr[r["payload_off"] : r["payload_off"] + r["payload_len"]]
        for r, fr in zip(res, frames, strict=True)
    ]
    assert got == [b"abc", b"abcd", b"", b"xyz", b"plain"]


def test_truncated_at_each_layer() -> None:
    v4 = mk_v4(b"p" * 40)
    v6 = mk_v6(b"p" * 40)
    v4opt = mk_v4(b"p" * 40, ihl=10, options=b"\x01" * 20)
    cut = [0, 1, 13, 14, 20, 33, 40, 53, 60, len(v4) - 1]
    res = parse_list([v4[:c] for c in cut])
    assert list(res["status"]) == [S.TRUNCATED] * len(cut)
    cut6 = [14, 40, 53, 60, 73, len(v6) - 1]
    assert list(parse_list([v6[:c] for c in cut6])["status"]) == [S.TRUNCATED] * len(cut6)
    # IPv4 options cut off (the fixed header is complete, so version/IHL are read first).
    assert parse_one(v4opt[:40])["status"] == S.TRUNCATED
    assert parse_one(v4opt[:60])["status"] == S.TRUNCATED
    # IP length says more than the frame holds.
    assert parse_one(mk_v4(b"q" * 10, tot_len=100))["status"] == S.TRUNCATED
    assert parse_one(mk_v6(b"q" * 10, plen=100))["status"] == S.TRUNCATED
    # IP datagram too short for a TCP header (frame padded, so the frame is long enough).
    assert parse_one(mk_v4(b"", tot_len=30) + bytes(10))["status"] == S.TRUNCATED
    assert parse_one(mk_v6(b"", plen=19) + bytes(10))["status"] == S.TRUNCATED


def test_unknown_ethertype() -> None:
    for et in (0x0806, 0x8100, 0x88CC, 0x0000, 0xFFFF):
        assert parse_one(mk_v4(ethertype=et))["status"] == S.BAD_ETHERTYPE
    # A 14-byte frame of an unknown type is still judged by its ethertype.
    assert parse_one(mk_v4(ethertype=0x0806)[:14])["status"] == S.BAD_ETHERTYPE


def test_bad_ip_headers() -> None:
    assert parse_one(mk_v4(ihl=4))["status"] == S.BAD_IP
    assert parse_one(mk_v4(ihl=0))["status"] == S.BAD_IP
    assert parse_one(mk_v4(version=6))["status"] == S.BAD_IP
    assert parse_one(mk_v6(version=4))["status"] == S.BAD_IP
    assert parse_one(mk_v4(b"z" * 30, tot_len=19))["status"] == S.BAD_IP
    assert parse_one(mk_v4(b"z" * 30, ihl=6, options=bytes(4), tot_len=22))["status"] == S.BAD_IP


def test_ip_checksum_and_fragments() -> None:
    good = mk_v4()
    c = struct.unpack_from("!H", good, 24)[0]
    bad = mk_v4(csum=c ^ 1)
    assert parse_one(bad)["status"] == S.BAD_IP_CSUM
    assert parse_one(bad, check_ip_csum=False)["status"] == S.OK
    # A header corrupted anywhere, options included, fails its checksum.
    opt = bytearray(mk_v4(ihl=7, options=b"\x01" * 8))
    opt[14 + 22] ^= 0x10
    assert parse_one(bytes(opt))["status"] == S.BAD_IP_CSUM
    assert parse_one(mk_v4(frag=0x2000))["status"] == S.FRAGMENT  # MF
    assert parse_one(mk_v4(frag=0x0010))["status"] == S.FRAGMENT  # offset
    assert parse_one(mk_v4(frag=0x0000))["status"] == S.OK
    assert parse_one(mk_v4(frag=0x4000))["status"] == S.OK  # DF


def test_not_tcp() -> None:
    assert parse_one(mk_v4(proto=17))["status"] == S.NOT_TCP
    assert parse_one(mk_v4(proto=1))["status"] == S.NOT_TCP
    assert parse_one(mk_v6(nexthdr=17))["status"] == S.NOT_TCP
    assert parse_one(mk_v6(nexthdr=0))["status"] == S.NOT_TCP  # hop-by-hop: extension headers


def test_bad_tcp_doff() -> None:
    for doff in (0, 1, 4):
        assert parse_one(mk_v4(tcp=tcp_hdr(doff=doff)))["status"] == S.BAD_TCP_DOFF
        assert parse_one(mk_v6(tcp=tcp_hdr(doff=doff)))["status"] == S.BAD_TCP_DOFF
    # doff points past the end of the IP datagram (10 payload bytes, header claims 60).
    assert parse_one(mk_v4(b"0" * 10, tcp=tcp_hdr(doff=15)))["status"] == S.BAD_TCP_DOFF
    assert parse_one(mk_v4(b"0" * 40, tcp=tcp_hdr(doff=15)))["status"] == S.OK


@pytest.mark.parametrize("mtu", [1500, 4096, 9000])
def test_oversize_against_mtu(mtu: int) -> None:
    fits4 = mk_v4(b"m" * (mtu - 40))
    fits6 = mk_v6(b"m" * (mtu - 60))
    assert len(fits4) == mtu + 14
    res = parse_list(
        [
            fits4,
            fits6,
            mk_v4(b"m" * (mtu - 39)),
            mk_v6(b"m" * (mtu - 59)),
            mk_v4(b"m" * (mtu - 40)) + b"\0",
        ],
        mtu,
    )
    assert list(res["status"]) == [S.OK, S.OK, S.OVERSIZE, S.OVERSIZE, S.OVERSIZE]
    # Oversize wins over anything else wrong with the frame.
    assert parse_one(bytes(mtu + 15), mtu)["status"] == S.OVERSIZE


def test_padding_is_ignored() -> None:
    r = parse_one(mk_v4(b"") + bytes(6))
    assert r["status"] == S.OK and r["payload_len"] == 0
    r = parse_one(mk_v4(b"ab") + b"\xee" * 20)  # junk after the datagram (e.g. FCS)
    assert r["status"] == S.OK and r["payload_len"] == 2


def test_rejected_frames_have_zeroed_fields() -> None:
    res = parse_list([mk_v4(proto=17), mk_v4()])
    assert res["status"][0] == S.NOT_TCP
    z = res[0].copy()
    z["status"] = 0
    assert bytes(z.tobytes()) == bytes(64)
    assert res["status"][1] == S.OK


def test_bad_offsets_and_lengths_never_raise() -> None:
    good = mk_v4(b"g" * 100)
    buf = good * 3
    n = len(good)
    offs = [0, -1, len(buf) - 10, len(buf), len(buf) + 100, n, -(2**40), 2 * n]
    lens = [n, n, n, 0, n, -5, n, n]
    res = wire.parse_frames(buf, offs, lens, 1500)
    assert list(res["status"]) == [
        S.OK,
        S.TRUNCATED,
        S.TRUNCATED,
        S.TRUNCATED,
        S.TRUNCATED,
        S.TRUNCATED,
        S.TRUNCATED,
        S.OK,
    ]
    assert list(wire.parse_frames(b"", [0, 5], [0, 60])["status"]) == [S.TRUNCATED] * 2
    assert list(wire.parse_frames(b"\x00" * 30, [0], [30])["status"]) == [S.BAD_ETHERTYPE]
    assert wire.parse_frames(buf, [], []).shape == (0,)
    with pytest.raises(Misuse):
        wire.parse_frames(buf, [0, 1], [10])
    # Frames that start in the last bytes of the buffer are gathered byte-wise.
    tail = bytes(200) + good
    assert wire.parse_frames(tail, [200], [n])["status"][0] == S.OK
    small = good[:80]
    assert wire.parse_frames(small, [0], [80])["status"][0] == S.TRUNCATED


def test_parse_slots_narrow_and_bad_lengths() -> None:
    frame = np.frombuffer(mk_v4(b""), np.uint8)
    slots = np.zeros((3, 64), np.uint8)  # narrower than GATHER_WIDTH
    slots[:, :54] = frame
    res = wire.parse_slots(slots, [54, 65, -1])
    assert list(res["status"]) == [S.OK, S.TRUNCATED, S.TRUNCATED]
    with pytest.raises(Misuse):
        wire.parse_slots(slots, [54] * 4)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(min_size=0, max_size=400),
    st.lists(st.tuples(st.integers(-500, 500), st.integers(-100, 500)), max_size=12),
    st.sampled_from([64, 1500, 9000]),
)
def test_garbage_never_raises(data: bytes, spans: list[tuple[int, int]], mtu: int) -> None:
    offs = [s[0] for s in spans]
    lens = [s[1] for s in spans]
    res = wire.parse_frames(data, offs, lens, mtu)
    assert res.shape == (len(spans),)
    assert set(res["status"].tolist()) <= {int(s) for s in S}
    ok = res["status"] == S.OK
    end = res["payload_off"].astype(np.int64) + res["payload_len"]
    assert (end[ok] <= np.array(lens, dtype=np.int64)[ok]).all()


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_frames_never_raise(data: st.DataObject) -> None:
    base = data.draw(
        st.sampled_from(
            [mk_v4(b"a" * 30), mk_v6(b"b" * 30), mk_v4(b"c" * 3, ihl=9, options=b"\x01" * 16)]
        )
    )
    fr = bytearray(base)
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(fr) - 1))
        fr[i] = data.draw(st.integers(0, 255))
    r = parse_one(bytes(fr))
    assert r["status"] in {int(s) for s in S}
    if r["status"] == S.OK:
        assert r["payload_off"] + r["payload_len"] <= len(fr)


# ---------------------------------------------------------------- dpkt cross-checks


def test_dpkt_parses_our_frames() -> None:
    dpkt = pytest.importorskip("dpkt")
    flows = FlowSpec.from_addresses(
        ["10.9.8.7", "2001:db8::10", "172.16.0.1"],
        ["10.1.2.3", "2001:db8::20", "172.16.0.2"],
        [40000, 40001, 1],
        [80, 443, 65535],
        isn=[1, 2**31, 2**32 - 1],
        ack_seq=[5, 6, 7],
    )
    rng = np.random.default_rng(7)
    n = 48
    f = rng.integers(0, 3, n)
    lens = rng.integers(0, 1500, n)
    lens[:3] = [0, 1, 1440]
    off = rng.integers(0, 2**40, n).astype(np.uint64)
    fl = rng.integers(0, 256, n).astype(np.uint8)
    slots = np.zeros((n, 2048), np.uint8)
    flen = wire.build_frames(flows, slots, f, off, lens, fl, tcp_csum=True)
    for i in range(n):
        raw = slots[i, : flen[i]].tobytes()
        eth = dpkt.ethernet.Ethernet(raw)
        ip = eth.data
        t = ip.data
        assert isinstance(t, dpkt.tcp.TCP)
        assert (t.sport, t.dport, t.flags) == (flows.sport[f[i]], flows.dport[f[i]], fl[i])
        assert t.ack == flows.ack_seq[f[i]]
        stream = int(flows.stream[f[i]])
        assert bytes(t.data) == pattern.pattern_bytes(stream, int(off[i]), int(lens[i]))
        assert (
            ip.src
            == (
                flows.src_addr[f[i]][12:] if flows.family[f[i]] == 4 else flows.src_addr[f[i]]
            ).tobytes()
        )
        # Let dpkt recompute both checksums from zeroed fields; they must equal ours.
        sums = (getattr(ip, "sum", None), t.sum)
        t.sum = 0
        if isinstance(ip, dpkt.ip.IP):
            ip.sum = 0
        ip.data = t
        again = dpkt.ethernet.Ethernet(bytes(eth)).data
        assert (getattr(again, "sum", None), again.data.sum) == sums


@settings(max_examples=150, deadline=None)
@given(
    st.booleans(),
    st.binary(max_size=64),
    st.integers(0, 10),
    st.integers(0, 10),
    st.integers(0, 255),
    st.integers(0, 2**32 - 1),
    st.integers(0, 0xFFFF),
)
def test_our_parse_agrees_with_dpkt(
    v6: bool, payload: bytes, n_ipopt: int, n_tcpopt: int, flags: int, seq: int, port: int
) -> None:
    dpkt = pytest.importorskip("dpkt")
    tcp = dpkt.tcp.TCP(
        sport=port,
        dport=80,
        seq=seq,
        ack=9,
        flags=flags,
        opts=b"\x01" * (4 * n_tcpopt),
        data=payload,
    )
    tcp.off = 5 + n_tcpopt
    if v6:
        ip = dpkt.ip6.IP6(
            src=ipaddress.IPv6Address("fe80::1").packed,
            dst=ipaddress.IPv6Address("fe80::2").packed,
            nxt=6,
            hlim=64,
            data=tcp,
        )
        ip.plen = len(bytes(tcp))
        et = dpkt.ethernet.ETH_TYPE_IP6
    else:
        ip = dpkt.ip.IP(
            src=bytes([10, 0, 0, 1]),
            dst=bytes([10, 0, 0, 2]),
            p=6,
            opts=b"\x01" * (4 * n_ipopt),
            data=tcp,
        )
        ip.hl = 5 + n_ipopt
        et = dpkt.ethernet.ETH_TYPE_IP
    eth = dpkt.ethernet.Ethernet(src=SRC_MAC, dst=DST_MAC, type=et, data=ip)
    raw = bytes(eth)
    r = parse_one(raw)
    assert r["status"] == S.OK
    back = dpkt.ethernet.Ethernet(raw).data.data
    assert (r["sport"], r["dport"], r["seq"], r["ack_seq"], r["tcp_flags"]) == (
        back.sport,
        back.dport,
        back.seq,
        back.ack,
        back.flags,
    )
    assert raw[r["payload_off"] : r["payload_off"] + r["payload_len"]] == bytes(back.data)
    assert r["family"] == (6 if v6 else 4)


def test_long_batches_match_single_frame_verdicts() -> None:
    """Batches over 128 frames take another path to the status; verdicts must not change."""
    c = struct.unpack_from("!H", mk_v4(), 24)[0]
    kinds = [
        mk_v4(b"a" * 50),
        mk_v6(b"b" * 7),
        mk_v4(proto=17),
        mk_v4(csum=c ^ 1),
        mk_v4(b"c", ihl=7, options=bytes(8)),
        mk_v4(ihl=3),
        mk_v4(frag=0x2000),
        mk_v6(nexthdr=0),
        mk_v4(tcp=tcp_hdr(doff=2)),
        mk_v4(b"x" * 10, tot_len=100),
        mk_v4()[:30],
        mk_v4(ethertype=0x0806),
        mk_v4(b"m" * 1461),
        b"",
        mk_v4(b"", tot_len=30) + bytes(10),
        mk_v6(version=5)[:60],
    ]
    rng = np.random.default_rng(3)
    frames = [kinds[i] for i in rng.integers(0, len(kinds), 300)]
    single = [parse_one(f, 1500) for f in frames]
    res = parse_list(frames, 1500)
    assert set(res["status"].tolist()) == {int(s) for s in S}
    for r, s1 in zip(res, single, strict=True):
        assert r.tobytes() == s1.tobytes()
