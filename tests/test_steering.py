"""RSS (Toeplitz, indirection tables, contexts) and ntuple steering, without processes."""

from __future__ import annotations

import errno
import ipaddress
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nic_proc.ntuple import ACTION_DROP, NtupleRule, NtupleTable, Steering
from nic_proc.rss import (
    DEFAULT_RSS_KEY,
    Flows,
    RssConfig,
    SteeringError,
    Toeplitz,
    fill_default,
    fill_equal,
    fill_weight,
    rss_input,
    toeplitz_hash,
    toeplitz_hash_bits,
    toeplitz_table,
)
from shared.errors import Misuse

# reference/uapi-layouts.md §9: (src, sport, dst, dport, IP-only hash, 4-tuple hash)
V4_VECTORS = [
    ("66.9.149.187", 2794, "161.142.100.80", 1766, 0x323E8FC2, 0x51CCC178),
    ("199.92.111.2", 14230, "65.69.140.83", 4739, 0xD718262A, 0xC626B0EA),
    ("24.19.198.95", 12898, "12.22.207.184", 38024, 0xD2D0A5DE, 0x5C2B394A),
    ("38.27.205.30", 48228, "209.142.163.6", 2217, 0x82989176, 0xAFC7327F),
    ("153.39.163.191", 44251, "202.188.127.2", 1303, 0x5D1809C5, 0x10E828A2),
]
V6_VECTORS = [
    ("3ffe:2501:200:1fff::7", 2794, "3ffe:2501:200:3::1", 1766, 0x2CC18CD5, 0x40207D3D),
    ("3ffe:501:8::260:97ff:fe40:efab", 14230, "ff02::1", 4739, 0x0F0C461C, 0xDDE51BBF),
    ("3ffe:1900:4545:3:200:f8ff:fe21:67cf", 44251, "fe80::200:f8ff:fe21:67cf", 38024,
     0x4B61E985, 0x02D1FEEF),
]
ALL_VECTORS = V4_VECTORS + V6_VECTORS


def _errno(exc: pytest.ExceptionInfo[SteeringError]) -> int | None:
    return exc.value.errno


# --------------------------------------------------------------------------------------------
# Toeplitz


@pytest.mark.parametrize(("src", "sport", "dst", "dport", "ip_only", "four_tuple"), ALL_VECTORS)
def test_verification_vectors_scalar(src: str, sport: int, dst: str, dport: int, ip_only: int,
                                     four_tuple: int) -> None:
    assert toeplitz_hash(src, dst) == ip_only
    assert toeplitz_hash(src, dst, sport, dport) == four_tuple


@pytest.mark.parametrize(("src", "sport", "dst", "dport", "ip_only", "four_tuple"), ALL_VECTORS)
def test_verification_vectors_table_single(src: str, sport: int, dst: str, dport: int,
                                           ip_only: int, four_tuple: int) -> None:
    t = Toeplitz(DEFAULT_RSS_KEY)
    for data, want in ((rss_input(src, dst), ip_only),
                       (rss_input(src, dst, sport, dport), four_tuple)):
        row = np.frombuffer(data, dtype=np.uint8)[None, :]
        assert int(t.hash_bytes(row)[0]) == want


def test_verification_vectors_batch_v4() -> None:
    t = Toeplitz()
    src = np.array([list(ipaddress.IPv4Address(v[0]).packed) for v in V4_VECTORS], np.uint8)
    dst = np.array([list(ipaddress.IPv4Address(v[2]).packed) for v in V4_VECTORS], np.uint8)
    sport = np.array([v[1] for v in V4_VECTORS], np.uint16)
    dport = np.array([v[3] for v in V4_VECTORS], np.uint16)
    assert t.hash_v4(src, dst).tolist() == [v[4] for v in V4_VECTORS]
    assert t.hash_v4(src, dst, sport, dport).tolist() == [v[5] for v in V4_VECTORS]
    # IPv4 addresses may also be given as integers (host value of the address).
    src_int = np.array([int(ipaddress.IPv4Address(v[0])) for v in V4_VECTORS], np.uint32)
    dst_int = np.array([int(ipaddress.IPv4Address(v[2])) for v in V4_VECTORS], np.uint32)
    assert t.hash_v4(src_int, dst_int, sport, dport).tolist() == [v[5] for v in V4_VECTORS]


def test_verification_vectors_batch_v6() -> None:
    t = Toeplitz()
    src = np.array([list(ipaddress.IPv6Address(v[0]).packed) for v in V6_VECTORS], np.uint8)
    dst = np.array([list(ipaddress.IPv6Address(v[2]).packed) for v in V6_VECTORS], np.uint8)
    sport = np.array([v[1] for v in V6_VECTORS], np.uint16)
    dport = np.array([v[3] for v in V6_VECTORS], np.uint16)
    assert t.hash_v6(src, dst).tolist() == [v[4] for v in V6_VECTORS]
    assert t.hash_v6(src, dst, sport, dport).tolist() == [v[5] for v in V6_VECTORS]


def test_verification_vectors_mixed_flow_batch() -> None:
    flows = Flows.from_tuples([(v[0], v[2], v[1], v[3]) for v in ALL_VECTORS])
    assert flows.is_v6.tolist() == [False] * 5 + [True] * 3
    t = Toeplitz()
    assert t.hash_flows(flows).tolist() == [v[5] for v in ALL_VECTORS]
    assert t.hash_flows(flows, ports=False).tolist() == [v[4] for v in ALL_VECTORS]
    # RssConfig hashes with the key of each flow's context.
    rss = RssConfig(4)
    assert rss.hash(flows).tolist() == [v[5] for v in ALL_VECTORS]


def test_table_shape_and_first_window() -> None:
    table = toeplitz_table(DEFAULT_RSS_KEY)
    assert table.shape == (36, 256)
    assert table.dtype == np.uint32
    assert int(table[0, 0]) == 0
    # MSB of byte 0 contributes key bits 0..31.
    assert int(table[0, 0x80]) == int.from_bytes(DEFAULT_RSS_KEY[:4], "big")
    # LSB of byte 0 contributes key bits 7..38.
    k = int.from_bytes(DEFAULT_RSS_KEY, "big")
    assert int(table[0, 0x01]) == (k >> (320 - 32 - 7)) & 0xFFFFFFFF


def test_too_long_input_is_refused() -> None:
    with pytest.raises(SteeringError):
        Toeplitz().hash_bytes(np.zeros((1, 37), np.uint8))
    with pytest.raises(SteeringError):
        toeplitz_hash_bits(bytes(37))
    with pytest.raises(SteeringError):
        toeplitz_table(DEFAULT_RSS_KEY, 40)


def test_empty_batch() -> None:
    assert Toeplitz().hash_bytes(np.zeros((0, 12), np.uint8)).shape == (0,)
    assert Toeplitz().hash_flows(Flows.from_tuples([])).shape == (0,)


@settings(max_examples=60, deadline=None)
@given(key=st.binary(min_size=40, max_size=40),
       rows=st.lists(st.binary(min_size=12, max_size=12), min_size=1, max_size=20))
def test_batch_agrees_with_bitwise_definition_v4(key: bytes, rows: list[bytes]) -> None:
    data = np.array([list(r) for r in rows], dtype=np.uint8)
    got = Toeplitz(key).hash_bytes(data).tolist()
    assert got == [toeplitz_hash_bits(r, key) for r in rows]


@settings(max_examples=40, deadline=None)
@given(key=st.binary(min_size=40, max_size=40),
       rows=st.lists(st.binary(min_size=36, max_size=36), min_size=1, max_size=10))
def test_batch_agrees_with_bitwise_definition_v6(key: bytes, rows: list[bytes]) -> None:
    data = np.array([list(r) for r in rows], dtype=np.uint8)
    got = Toeplitz(key).hash_bytes(data).tolist()
    assert got == [toeplitz_hash_bits(r, key) for r in rows]


_v4 = st.integers(0, 2**32 - 1).map(lambda x: str(ipaddress.IPv4Address(x)))
_v6 = st.integers(0, 2**128 - 1).map(lambda x: str(ipaddress.IPv6Address(x)))
_port = st.integers(0, 65535)
_flow = st.one_of(st.tuples(_v4, _v4, _port, _port), st.tuples(_v6, _v6, _port, _port))


@settings(max_examples=60, deadline=None)
@given(flows=st.lists(_flow, min_size=1, max_size=30), key=st.binary(min_size=40, max_size=40))
def test_flow_batch_agrees_with_scalar(flows: list[tuple[str, str, int, int]],
                                       key: bytes) -> None:
    batch = Flows.from_tuples(flows)
    t = Toeplitz(key)
    assert t.hash_flows(batch).tolist() == [toeplitz_hash(*f, key=key) for f in flows]
    assert t.hash_flows(batch, ports=False).tolist() == [
        toeplitz_hash(f[0], f[1], key=key) for f in flows]


def test_flows_constructors_agree() -> None:
    a = Flows.from_tuples([("1.2.3.4", "5.6.7.8", 1, 2), ("::1", "::2", 3, 4)])
    v4 = Flows.v4(np.array([[1, 2, 3, 4]], np.uint8), np.array([[5, 6, 7, 8]], np.uint8), 1, 2)
    v6 = Flows.v6(np.array([list(ipaddress.IPv6Address("::1").packed)], np.uint8),
                  np.array([list(ipaddress.IPv6Address("::2").packed)], np.uint8), 3, 4)
    b = Flows.concat([v4, v6])
    for name in ("src", "dst", "sport", "dport", "is_v6"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert len(b) == 2
    assert len(b.take([1])) == 1
    with pytest.raises(ValueError, match="different families"):
        Flows.from_tuples([("1.2.3.4", "::1", 1, 2)])


# --------------------------------------------------------------------------------------------
# Indirection table fills


def test_fill_default_and_equal() -> None:
    assert fill_default(8, 3).tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert fill_equal(8, 3).tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert fill_equal(6, 2, start=3).tolist() == [3, 4, 3, 4, 3, 4]
    with pytest.raises(SteeringError):
        fill_equal(8, 0)


def test_fill_weight_reference_example() -> None:
    table = fill_weight(128, [1, 1, 2])
    assert table.tolist() == [0] * 32 + [1] * 32 + [2] * 64


def test_fill_weight_zero_weight_gets_nothing_and_start_offsets() -> None:
    table = fill_weight(128, [1, 0, 1], start=2)
    assert table.tolist() == [2] * 64 + [4] * 64


def test_fill_weight_errors_are_worded_as_ethtool() -> None:
    with pytest.raises(SteeringError, match="At least one weight must be non-zero"):
        fill_weight(128, [0, 0])
    with pytest.raises(SteeringError,
                       match="Total weight exceeds the size of the indirection table"):
        fill_weight(4, [1, 2, 3])
    with pytest.raises(SteeringError):
        fill_weight(4, [1, -1])


@settings(max_examples=100, deadline=None)
@given(size=st.integers(1, 300), weights=st.lists(st.integers(0, 20), min_size=1, max_size=8))
def test_fill_weight_counts_follow_cumulative_boundaries(size: int, weights: list[int]) -> None:
    total = sum(weights)
    if total == 0 or total > size:
        with pytest.raises(SteeringError):
            fill_weight(size, weights)
        return
    table = fill_weight(size, weights)
    assert np.all(np.diff(table) >= 0)
    cum = np.cumsum(weights)
    bounds = [0] + [size * int(c) // total for c in cum]
    for j, w in enumerate(weights):
        count = int((table == j).sum())
        assert count == bounds[j + 1] - bounds[j]
        if w == 0:
            assert count == 0


# --------------------------------------------------------------------------------------------
# RssConfig / contexts


def test_context0_default_and_equal() -> None:
    rss = RssConfig(4)
    ctx = rss.context(0)
    assert len(ctx.indir) == 128
    assert ctx.indir[:6].tolist() == [0, 1, 2, 3, 0, 1]
    assert ctx.hfunc == "toeplitz"
    assert ctx.key == DEFAULT_RSS_KEY
    rss.set_rxfh(equal=3)
    assert set(rss.context(0).indir.tolist()) == {0, 1, 2}
    rss.set_rxfh(weight=[1, 1, 2])
    assert rss.context(0).indir.tolist() == [0] * 32 + [1] * 32 + [2] * 64
    rss.set_rxfh(default=True)
    assert rss.context(0).indir[:4].tolist() == [0, 1, 2, 3]


def test_table_entries_must_be_below_queue_count() -> None:
    rss = RssConfig(4)
    gen = rss.generation
    before = rss.context(0).indir.copy()
    cases: list[dict[str, Any]] = [{"equal": 5}, {"weight": [1, 1, 1, 1, 1]},
                                   {"equal": 2, "start": 3}]
    for kwargs in cases:
        with pytest.raises(SteeringError, match="RX queues") as ei:
            rss.set_rxfh(**kwargs)
        assert _errno(ei) == errno.EINVAL
        assert isinstance(ei.value, Misuse)
    assert np.array_equal(rss.context(0).indir, before)
    assert rss.generation == gen


def test_start_offsets_and_needs_a_fill() -> None:
    rss = RssConfig(8)
    rss.set_rxfh(equal=2, start=5)
    assert set(rss.context(0).indir.tolist()) == {5, 6}
    rss.set_rxfh(weight=[1, 3], start=4)
    assert rss.context(0).indir.tolist() == [4] * 32 + [5] * 96
    with pytest.raises(SteeringError, match="Start must be used with equal or weight"):
        rss.set_rxfh(start=1)
    with pytest.raises(SteeringError, match="mutually exclusive"):
        rss.set_rxfh(equal=2, weight=[1])


def test_key_and_hfunc_validation() -> None:
    rss = RssConfig(4)
    new_key = bytes(range(40))
    rss.set_rxfh(key=new_key.hex())
    assert rss.context(0).key == new_key
    rss.set_rxfh(key=":".join(f"{b:02x}" for b in DEFAULT_RSS_KEY))
    assert rss.context(0).key == DEFAULT_RSS_KEY
    with pytest.raises(SteeringError, match=r"Key is too short for device \(39 < 40\)"):
        rss.set_rxfh(key=bytes(39))
    with pytest.raises(SteeringError, match=r"Key is too long for device \(41 > 40\)"):
        rss.set_rxfh(key=bytes(41))
    with pytest.raises(SteeringError, match="Invalid RSS hash key format"):
        rss.set_rxfh(key="zz")
    with pytest.raises(SteeringError) as ei:
        rss.set_rxfh(hfunc="xor")
    assert _errno(ei) == errno.EOPNOTSUPP
    with pytest.raises(SteeringError, match="Unknown hash function: md5") as ei:
        rss.set_rxfh(hfunc="md5")
    assert _errno(ei) == errno.EINVAL
    rss.set_rxfh(hfunc="toeplitz")


def test_key_change_changes_hash() -> None:
    rss = RssConfig(4)
    flows = Flows.from_tuples([(v[0], v[2], v[1], v[3]) for v in V4_VECTORS])
    before = rss.hash(flows).tolist()
    rss.set_rxfh(key=bytes(range(40)))
    after = rss.hash(flows).tolist()
    assert before != after
    assert after == [toeplitz_hash(v[0], v[2], v[1], v[3], key=bytes(range(40)))
                     for v in V4_VECTORS]


def test_contexts_allocate_lowest_free_id_and_delete() -> None:
    rss = RssConfig(4, max_contexts=3)
    assert rss.create_context() == 1
    assert rss.create_context(equal=1, start=3) == 2
    assert set(rss.context(2).indir.tolist()) == {3}
    assert rss.context(1).indir[:4].tolist() == [0, 1, 2, 3]
    rss.delete_context(1)
    assert rss.create_context() == 1
    assert rss.create_context() == 3
    with pytest.raises(SteeringError) as ei:
        rss.create_context()
    assert _errno(ei) == errno.EBUSY
    with pytest.raises(SteeringError) as ei:
        rss.delete_context(0)
    assert _errno(ei) == errno.EINVAL
    with pytest.raises(SteeringError) as ei:
        rss.delete_context(7)
    assert _errno(ei) == errno.ENOENT
    with pytest.raises(SteeringError) as ei:
        rss.set_rxfh(7, equal=1)
    assert _errno(ei) == errno.ENOENT


def test_new_context_inherits_key_of_context0_unless_given() -> None:
    rss = RssConfig(4, key=bytes(range(40)))
    c1 = rss.create_context()
    c2 = rss.create_context(key=bytes(range(1, 41)))
    assert rss.context(c1).key == bytes(range(40))
    assert rss.context(c2).key == bytes(range(1, 41))


def test_queue_for_is_vectorised_over_contexts() -> None:
    rss = RssConfig(8)
    rss.set_rxfh(equal=4)
    cid = rss.create_context(equal=2, start=6)
    hashes = np.arange(16, dtype=np.uint32) * np.uint32(0x01000001)
    ctx = np.array([0, cid] * 8)
    got = rss.queue_for(hashes, ctx)
    want = [rss.context(int(c)).indir[int(h) % 128] for h, c in zip(hashes, ctx, strict=True)]
    assert got.tolist() == want
    assert rss.queue_for(hashes).tolist() == [int(h) % 128 % 4 for h in hashes]
    with pytest.raises(SteeringError) as ei:
        rss.queue_for(hashes, 5)
    assert _errno(ei) == errno.ENOENT


def test_default_table_follows_queue_count_configured_one_blocks_it() -> None:
    rss = RssConfig(4)
    rss.set_n_rx_queues(2)
    assert set(rss.context(0).indir.tolist()) == {0, 1}
    rss.set_n_rx_queues(6)
    assert set(rss.context(0).indir.tolist()) == set(range(6))
    rss.set_rxfh(equal=5)
    with pytest.raises(SteeringError, match="too low for existing indirection table") as ei:
        rss.set_n_rx_queues(4)
    assert _errno(ei) == errno.EINVAL
    rss.set_n_rx_queues(5)
    assert set(rss.context(0).indir.tolist()) == set(range(5))


def test_indir_size_is_configurable() -> None:
    rss = RssConfig(3, indir_size=64)
    assert len(rss.context(0).indir) == 64
    rss.set_rxfh(weight=[1, 1, 2])
    assert rss.context(0).indir.tolist() == [0] * 16 + [1] * 16 + [2] * 32


# --------------------------------------------------------------------------------------------
# ntuple


def _flows(*tuples: tuple[str, str, int, int]) -> Flows:
    return Flows.from_tuples(list(tuples))


def test_rule_ids_allocate_from_the_top_and_loc_places() -> None:
    t = NtupleTable()
    assert t.add({"flow_type": "tcp4", "dst_port": 1, "action": 0}) == 1023
    assert t.add({"flow_type": "tcp4", "dst_port": 2, "action": 0}) == 1022
    assert t.add({"flow_type": "tcp4", "dst_port": 3, "action": 0, "loc": 1023}) == 1023
    assert [r.loc for r in t.rules()] == [1022, 1023]
    assert t.get(1023).dst_port == 3  # loc overwrote the rule at 1023
    assert t.add({"flow_type": "tcp4", "action": 0}) == 1021
    with pytest.raises(SteeringError) as ei:
        t.add({"flow_type": "tcp4", "loc": 1024})
    assert _errno(ei) == errno.EINVAL


def test_full_table_is_enospc() -> None:
    t = NtupleTable(size=2)
    t.add({"flow_type": "tcp4"})
    t.add({"flow_type": "tcp4"})
    with pytest.raises(SteeringError) as ei:
        t.add({"flow_type": "tcp4"})
    assert _errno(ei) == errno.ENOSPC


def test_delete_and_get_unknown_is_enoent() -> None:
    t = NtupleTable()
    loc = t.add({"flow_type": "tcp6", "dst_port": 5})
    with pytest.raises(SteeringError) as ei:
        t.delete(3)
    assert _errno(ei) == errno.ENOENT
    with pytest.raises(SteeringError) as ei:
        t.get(3)
    assert _errno(ei) == errno.ENOENT
    t.delete(loc)
    assert len(t) == 0


def test_lowest_location_wins_and_deleting_it_lets_the_next_match() -> None:
    t = NtupleTable()
    t.add({"flow_type": "tcp4", "dst_port": 80, "action": 3, "loc": 10})
    t.add({"flow_type": "tcp4", "dst_ip": "10.0.0.1", "action": 1, "loc": 5})
    t.add({"flow_type": "tcp4", "action": 2, "loc": 900})  # catch-all tcp4
    flows = _flows(("1.1.1.1", "10.0.0.1", 1000, 80),   # matches all three -> loc 5
                   ("1.1.1.1", "10.0.0.2", 1000, 80),   # 10 and 900 -> loc 10
                   ("1.1.1.1", "10.0.0.2", 1000, 81),   # only 900
                   ("::1", "::2", 1000, 80))            # tcp6: none
    m = t.match(flows)
    assert m.loc.tolist() == [5, 10, 900, -1]
    assert m.action.tolist() == [1, 3, 2, -1]
    assert m.context.tolist() == [-1, -1, -1, -1]
    t.delete(5)
    assert t.match(flows).loc.tolist() == [10, 10, 900, -1]
    t.delete(10)
    assert t.match(flows).loc.tolist() == [900, 900, 900, -1]


def test_masks_set_bit_means_ignore() -> None:
    t = NtupleTable()
    t.add({"flow_type": "tcp4", "src_ip": "192.168.1.0", "src_ip_mask": "0.0.0.255",
           "dst_port": 0x1200, "dst_port_mask": 0x00FF, "action": 1, "loc": 0})
    flows = _flows(("192.168.1.7", "1.1.1.1", 1, 0x1234),
                   ("192.168.2.7", "1.1.1.1", 1, 0x1234),   # src outside /24
                   ("192.168.1.200", "1.1.1.1", 1, 0x1334))  # dport high byte differs
    assert t.match(flows).loc.tolist() == [0, -1, -1]
    rule = t.get(0)
    d = rule.to_dict()
    assert d["src_ip_mask"] == "0.0.0.255"
    assert d["dst_ip_mask"] == "255.255.255.255"  # not given: ignore everything
    assert d["dst_port_mask"] == 0xFF
    assert d["src_port_mask"] == 0xFFFF


def test_v6_rule_fields_and_masks() -> None:
    t = NtupleTable()
    t.add({"flow_type": "tcp6", "dst_ip": "2001:db8::", "dst_ip_mask": "::ffff:ffff",
           "src_port": 4000, "action": 2, "loc": 1})
    flows = _flows(("::1", "2001:db8::1:2", 4000, 1),
                   ("::1", "2001:db9::1:2", 4000, 1),
                   ("::1", "2001:db8::1:2", 4001, 1),
                   ("1.2.3.4", "5.6.7.8", 4000, 1))
    assert t.match(flows).loc.tolist() == [1, -1, -1, -1]


def test_rule_spec_validation() -> None:
    t = NtupleTable()
    with pytest.raises(SteeringError) as ei:
        t.add({"flow_type": "udp4"})
    assert _errno(ei) == errno.EOPNOTSUPP
    bad_specs: list[dict[str, Any]] = [
        {"flow_type": "bogus"},
        {"flow_type": "tcp4", "src_ip": "::1"},
        {"flow_type": "tcp6", "dst_ip": "1.2.3.4"},
        {"flow_type": "tcp4", "src_port": 70000},
        {"flow_type": "tcp4", "action": -2},
        {"flow_type": "tcp4", "action": -1, "context": 1},
        {"flow_type": "tcp4", "context": -3},
    ]
    for spec in bad_specs:
        with pytest.raises(SteeringError) as ei:
            t.add(spec)
        assert _errno(ei) == errno.EINVAL, spec
    with pytest.raises(SteeringError, match="queue 4 out of range") as ei:
        t.add({"flow_type": "tcp4", "action": 4}, n_rx_queues=4)
    assert len(t) == 0


def test_rule_dataclass_defaults() -> None:
    r = NtupleRule(loc=3, flow_type="tcp6")
    assert r.src_ip_mask == (1 << 128) - 1
    assert NtupleRule(loc=3, flow_type="tcp4").dst_ip_mask == 0xFFFFFFFF
    assert NtupleRule(loc=0, flow_type="tcp4", action=ACTION_DROP).is_drop


# --------------------------------------------------------------------------------------------
# Steering = ntuple first, else RSS


def test_steering_rss_when_no_rule_matches() -> None:
    s = Steering(4)
    flows = Flows.from_tuples([(v[0], v[2], v[1], v[3]) for v in ALL_VECTORS])
    res = s.steer(flows)
    assert res.hash.tolist() == [v[5] for v in ALL_VECTORS]
    assert res.queue.tolist() == [v[5] % 128 % 4 for v in ALL_VECTORS]
    assert res.loc.tolist() == [-1] * len(ALL_VECTORS)
    assert res.context.tolist() == [0] * len(ALL_VECTORS)


def test_steering_drop_direct_and_context_rules() -> None:
    s = Steering(4)
    s.rss_set(equal=3)                                      # RSS over 0..2
    ctx = s.rss_create(start=3, equal=1)                    # the zcrx queue, 3
    assert ctx == 1
    s.rule_add({"flow_type": "tcp6", "dst_port": 9999, "context": ctx})
    s.rule_add({"flow_type": "tcp4", "dst_port": 22, "action": -1})
    s.rule_add({"flow_type": "tcp4", "dst_port": 80, "action": 2})
    flows = _flows(("::1", "::2", 5555, 9999), ("1.1.1.1", "2.2.2.2", 5, 22),
                   ("1.1.1.1", "2.2.2.2", 5, 80), ("1.1.1.1", "2.2.2.2", 5, 81))
    res = s.steer(flows)
    assert res.queue[:3].tolist() == [3, -1, 2]
    assert 0 <= res.queue[3] <= 2
    assert res.context.tolist() == [1, -1, -1, 0]
    assert res.loc[3] == -1
    assert s.queue_for(flows).tolist() == res.queue.tolist()


def test_context_rule_with_offset() -> None:
    s = Steering(8)
    ctx = s.rss_create(equal=2)                             # queues 0,1
    s.rule_add({"flow_type": "tcp4", "dst_port": 7, "context": ctx, "action": 4, "loc": 0})
    many = Flows.from_tuples([(f"10.0.{i // 256}.{i % 256}", "10.1.0.1", 1000 + i, 7)
                              for i in range(200)])
    q = s.queue_for(many)
    assert set(q.tolist()) == {4, 5}
    # Direct RSS on context 0 with a queue offset rule is also allowed.
    s.rule_add({"flow_type": "tcp4", "dst_port": 8, "context": 0, "action": 0, "loc": 1})
    with pytest.raises(SteeringError, match="plus offset") as ei:
        s.rule_add({"flow_type": "tcp4", "context": ctx, "action": 7})
    assert _errno(ei) == errno.EINVAL


def test_validation_against_queue_count() -> None:
    s = Steering(4)
    gen = s.generation
    with pytest.raises(SteeringError) as ei:
        s.rule_add({"flow_type": "tcp4", "action": 4})
    assert _errno(ei) == errno.EINVAL
    with pytest.raises(SteeringError, match="does not exist") as ei:
        s.rule_add({"flow_type": "tcp4", "context": 1})
    assert _errno(ei) == errno.EINVAL
    assert s.generation == gen and len(s.ntuple) == 0
    s.rule_add({"flow_type": "tcp4", "action": 3})
    with pytest.raises(SteeringError, match="too low for existing ntuple filter") as ei:
        s.set_n_rx_queues(3)
    assert _errno(ei) == errno.EINVAL
    assert s.n_rx_queues == 4


def test_context_table_change_cannot_push_rule_past_last_queue() -> None:
    s = Steering(4)
    ctx = s.rss_create(equal=2)
    s.rule_add({"flow_type": "tcp4", "context": ctx, "action": 2})
    with pytest.raises(SteeringError) as ei:
        s.rss_set(ctx, equal=3)          # 2 + 2 = queue 4 of 4
    assert _errno(ei) == errno.EINVAL
    assert set(s.rss.context(ctx).indir.tolist()) == {0, 1}


def test_context_in_use_cannot_be_deleted() -> None:
    s = Steering(4)
    ctx = s.rss_create(start=3, equal=1)
    loc = s.rule_add({"flow_type": "tcp6", "dst_port": 9999, "context": ctx})
    with pytest.raises(SteeringError) as ei:
        s.rss_delete(ctx)
    assert _errno(ei) == errno.EBUSY
    s.rule_delete(loc)
    s.rss_delete(ctx)
    assert list(s.rss.contexts) == [0]


def test_generation_changes_on_every_change_and_only_then() -> None:
    s = Steering(4)
    seen = [s.generation]

    def changed() -> None:
        assert s.generation > seen[-1]
        seen.append(s.generation)

    def unchanged() -> None:
        assert s.generation == seen[-1]

    s.rss_set(equal=2)
    changed()
    s.rss_set(key=bytes(range(40)))
    changed()
    ctx = s.rss_create()
    changed()
    loc = s.rule_add({"flow_type": "tcp4", "dst_port": 1})
    changed()
    s.rule_add({"flow_type": "tcp4", "dst_port": 1, "loc": loc})  # overwrite is a change
    changed()
    s.set_n_rx_queues(3)
    changed()
    s.rule_delete(loc)
    changed()
    s.rss_delete(ctx)
    changed()
    for bad in (lambda: s.rule_delete(5), lambda: s.rss_set(equal=9),
                lambda: s.rule_add({"flow_type": "tcp4", "action": 9}),
                lambda: s.rss_delete(4), lambda: s.set_n_rx_queues(0)):
        with pytest.raises(SteeringError):
            bad()
        unchanged()


def test_handle_requests_and_reply_shapes() -> None:
    s = Steering(4)
    assert s.handle({"cmd": "rss-set", "dev": "eth0", "context": 0, "equal": 3}) == {}
    reply = s.handle({"cmd": "rss-set", "dev": "eth0", "context": "new", "start": 3,
                      "equal": 1})
    assert reply == {"context": 1}
    got = s.handle({"cmd": "rss-get", "dev": "eth0", "context": 1})
    assert got["indir"] == [3] * 128 and got["n_rx_rings"] == 4
    assert got["hkey"] == DEFAULT_RSS_KEY.hex() and got["hfunc"] == "toeplitz"
    add = s.handle({"cmd": "ntuple-add", "dev": "eth0", "flow_type": "tcp6",
                    "dst_port": 9999, "context": 1})
    assert add == {"loc": 1023}
    listing = s.handle({"cmd": "ntuple-get", "dev": "eth0"})
    assert listing["n_rx_rings"] == 4 and [r["loc"] for r in listing["rules"]] == [1023]
    one = s.handle({"cmd": "ntuple-get", "dev": "eth0", "rule": 1023})
    assert one["rule"]["context"] == 1 and one["rule"]["dst_port"] == 9999
    with pytest.raises(SteeringError) as ei:
        s.handle({"cmd": "rss-set", "dev": "eth0", "context": 1, "delete": True})
    assert _errno(ei) == errno.EBUSY
    assert s.handle({"cmd": "ntuple-delete", "dev": "eth0", "loc": 1023}) == {}
    assert s.handle({"cmd": "rss-set", "dev": "eth0", "context": 1, "delete": True}) == {}
    with pytest.raises(SteeringError) as ei:
        s.handle({"cmd": "rss-get", "dev": "eth0", "context": 1})
    assert _errno(ei) == errno.ENOENT
    with pytest.raises(SteeringError) as ei:
        s.handle({"cmd": "rss-set", "dev": "eth0", "context": 0, "weight": [1] * 200})
    assert "Total weight exceeds" in str(ei.value)
    with pytest.raises(SteeringError) as ei:
        s.handle({"cmd": "rings-get", "dev": "eth0"})
    assert _errno(ei) == errno.EOPNOTSUPP


# --------------------------------------------------------------------------------------------
# Vectorised match == a naive per-flow loop


def _naive_match(rules: list[NtupleRule], flow: tuple[str, str, int, int]) -> int:
    src, dst = ipaddress.ip_address(flow[0]), ipaddress.ip_address(flow[1])
    for r in sorted(rules, key=lambda r: r.loc):
        if (src.version == 6) != r.is_v6:
            continue
        if (int(src) ^ r.src_ip) & ~r.src_ip_mask & ((1 << src.max_prefixlen) - 1):
            continue
        if (int(dst) ^ r.dst_ip) & ~r.dst_ip_mask & ((1 << dst.max_prefixlen) - 1):
            continue
        if (flow[2] ^ r.src_port) & ~r.src_port_mask & 0xFFFF:
            continue
        if (flow[3] ^ r.dst_port) & ~r.dst_port_mask & 0xFFFF:
            continue
        return r.loc
    return -1


_small_v4 = st.integers(0, 3).map(lambda x: f"10.0.0.{x}")
_small_v6 = st.integers(0, 3).map(lambda x: f"fd00::{x}")
_small_port = st.integers(0, 3)


@st.composite
def _rule_specs(draw: st.DrawFn) -> dict[str, Any]:
    v6 = draw(st.booleans())
    addr = _small_v6 if v6 else _small_v4
    spec: dict[str, Any] = {"flow_type": "tcp6" if v6 else "tcp4",
                               "loc": draw(st.integers(0, 15))}
    for name, strat, mask in (("src_ip", addr, st.sampled_from(
            ["::1", "::3"] if v6 else ["0.0.0.1", "0.0.0.3"])),
            ("dst_ip", addr, st.sampled_from(["::1", "::3"] if v6 else ["0.0.0.1", "0.0.0.3"])),
            ("src_port", _small_port, st.integers(0, 3)),
            ("dst_port", _small_port, st.integers(0, 3))):
        if draw(st.booleans()):
            spec[name] = draw(strat)
            if draw(st.booleans()):
                spec[name + "_mask"] = draw(mask)
    spec["action"] = draw(st.integers(-1, 3))
    return spec


@settings(max_examples=80, deadline=None)
@given(specs=st.lists(_rule_specs(), max_size=8),
       flows=st.lists(st.one_of(st.tuples(_small_v4, _small_v4, _small_port, _small_port),
                                st.tuples(_small_v6, _small_v6, _small_port, _small_port)),
                      min_size=1, max_size=25))
def test_vectorised_match_equals_naive(specs: list[dict[str, Any]],
                                       flows: list[tuple[str, str, int, int]]) -> None:
    t = NtupleTable()
    for spec in specs:
        t.add(spec)
    m = t.match(Flows.from_tuples(flows))
    rules = t.rules()
    want = [_naive_match(rules, f) for f in flows]
    assert m.loc.tolist() == want
    by_loc = {r.loc: r for r in rules}
    assert m.action.tolist() == [by_loc[w].action if w >= 0 else -1 for w in want]


def test_mixed_contexts_with_different_keys_in_one_batch() -> None:
    s = Steering(8)
    other_key = bytes(range(40))
    ctx = s.rss_create(key=other_key, equal=4, start=4)
    s.rule_add({"flow_type": "tcp4", "dst_port": 443, "context": ctx})
    tuples = [(f"10.0.0.{i}", "10.9.9.9", 2000 + i, 443 if i % 2 else 80) for i in range(40)]
    res = s.steer(Flows.from_tuples(tuples))
    for i, (src, dst, sp, dp) in enumerate(tuples):
        key = other_key if dp == 443 else DEFAULT_RSS_KEY
        h = toeplitz_hash(src, dst, sp, dp, key=key)
        assert int(res.hash[i]) == h
        cid = ctx if dp == 443 else 0
        assert int(res.context[i]) == cid
        assert int(res.queue[i]) == int(s.rss.context(cid).indir[h % 128])
