"""HW-GRO (``ethtool -K DEV rx-gro-hw on``): the NIC coalesces consecutive segments of a flow
into one completion and one data buffer; the driver hands the session up as one skb.

The NIC tests play the kernel with the queue harness of tests/test_nic_dma.py and rebuild
every completion the driver's way (header slot + posted buffers); the driver tests feed
NetDevice completions through the fake NIC of tests/test_netdev.py.  What a user checks:
the bytes of every flow at every sequence number are those sent, with GRO as without it;
the IP length and checksum of a coalesced header are right; the counters add up (wire
packets, sessions); a session never crosses a flow, a gap, a PSH or a buffer.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launch import ethtool as et
from nic_proc.device import Nic
from nic_proc.dma import GRO_MAX_SEGS, NIC_STATUS_DMA_FAULT
from nic_proc.sources import FrameBuilder
from shared import abi, pattern, wire
from shared.errors import Misuse
from shared.nicif import NetdevSpec
from tests.e2e import nic_stats, topology, wait_app, zcrx
from tests.test_netdev import FakeNic, Flow, NetDevice, SkbStore, payload_bytes
from tests.test_nic_dma import DPORT, ISN, SPORT, Kernel, builder, c, frames_of

F_GRO = abi.NIC_CQE_F_SPLIT | abi.NIC_CQE_F_L4_OK | abi.NIC_CQE_F_GRO
F_SPLIT = abi.NIC_CQE_F_SPLIT | abi.NIC_CQE_F_L4_OK
ACK, PSH, FIN, SYN = wire.TCP_ACK, 0x08, wire.TCP_FIN, wire.TCP_SYN


@pytest.fixture
def kern(request: pytest.FixtureRequest, run_id: str) -> Iterator[Kernel]:
    k = Kernel(run_id, **{"ring": 64, "nbufs": 256, **getattr(request, "param", {})})
    k.cfg.gro_hw = True
    yield k
    k.close()


def parse(got: list[tuple[np.void, bytes]]) -> np.ndarray:
    """The driver's parse of rebuilt frames (headers checked, IPv4 checksum included)."""
    width = max(len(f) for _, f in got)
    slots = np.zeros((len(got), width), np.uint8)
    for i, (_, f) in enumerate(got):
        slots[i, :len(f)] = np.frombuffer(f, np.uint8)
    lens = np.array([len(f) for _, f in got])
    held = np.array([int(e["hdr_len"]) for e, _ in got])
    return wire.parse_slots(slots, lens, np.full(len(got), 0xFFFF), in_slot=held)


def streams(got: list[tuple[np.void, bytes]]) -> dict[tuple[int, int], bytes]:
    """(sport, seq) -> payload of every good completion."""
    p = parse(got)
    out = {}
    for i, (e, f) in enumerate(got):
        if int(e["status"]):
            continue
        assert int(p["status"][i]) == 0
        off = int(p["payload_off"][i])
        out[(int(p["sport"][i]), int(p["seq"][i]))] = f[off:]
    return out


def two_flows(batch: int = 512, mtu: int = 4096) -> FrameBuilder:
    fs = wire.FlowSpec.from_addresses(["10.0.0.2"] * 2, ["10.0.0.1"] * 2, [SPORT, SPORT + 1],
                                      [DPORT] * 2, isn=[ISN, ISN], stream=[SPORT, SPORT + 1])
    return FrameBuilder(fs, batch, wire.mss(4, mtu))


# ---------------------------------------------------------------------------------- the NIC


def test_a_run_of_small_segments_becomes_sessions_of_one_buffer(kern: Kernel) -> None:
    fr = frames_of(builder(batch=256), [64] * 130)
    kern.post(8)
    assert kern.dq.place(fr, None, 0x1234) == (130, 130, False, False)
    got = kern.reap()
    assert [int(e["gso_segs"]) for e, _ in got] == [64, 64, 2]
    assert all(int(e["gso_size"]) == 64 and int(e["flags"]) == F_GRO for e, _ in got)
    assert [int(e["data_len"]) for e, _ in got] == [4096, 4096, 128]
    assert all(int(e["nr_frags"]) == 1 and int(e["rss_hash"]) == 0x1234 for e, _ in got)
    p = parse(got)
    assert p["status"].tolist() == [0, 0, 0]  # IP total length and checksum fixed up
    assert p["payload_len"].tolist() == [4096, 4096, 128]
    assert p["seq"].tolist() == [(ISN + 1 + k) & 0xFFFFFFFF for k in (0, 4096, 8192)]
    data = b"".join(f[54:] for _, f in got)
    assert data == b"".join(fr.frame_bytes(i)[54:] for i in range(130))
    assert pattern.verify(SPORT, 0, np.frombuffer(data, np.uint8)) == -1
    st = kern.stats
    assert (c(st, "rx_packets"), c(st, "rx_bytes")) == (130, 130 * 118)
    assert (c(st, "rx_frags"), c(st, "rx_hds_split")) == (3, 130)
    assert (c(st, "rx_hw_gro_packets"), c(st, "rx_hw_gro_wire_packets")) == (3, 130)
    assert c(st, "rx_hw_gro_wire_bytes") == 130 * 118
    assert c(st, "rx_hw_gro_bytes") == 3 * 54 + 130 * 64
    assert kern.dq.completed == 3


def test_gro_off_gives_a_completion_per_frame(kern: Kernel) -> None:
    kern.cfg.gro_hw = False
    fr = frames_of(builder(), [64] * 10)
    kern.post(16)
    assert kern.dq.place(fr).consumed == 10
    got = kern.reap()
    assert len(got) == 10 and all(int(e["gso_segs"]) == 0 for e, _ in got)
    assert c(kern.stats, "rx_hw_gro_packets") == 0


def test_psh_syn_fin_gaps_and_longer_segments_end_sessions(kern: Kernel) -> None:
    b = builder()
    lens = [100, 100, 100, 100, 100, 100, 100, 200, 100, 50, 50, 100, 0]
    offs = np.concatenate(([0], np.cumsum(lens)[:-1])).astype(np.int64)
    offs[6:] += 1000  # a gap before frame 6
    flags = [ACK] * 13
    flags[2] = ACK | PSH  # ends its session (and is part of it)
    flags[4] = ACK | SYN
    flags[12] = ACK | FIN
    fr = b.build(np.zeros(13, np.intp), offs, np.array(lens, np.int64), np.array(flags))
    kern.post(16)
    assert kern.dq.place(fr).consumed == 13
    got = kern.reap()
    # [0 1 2(PSH)] [3] [4 SYN] [5] | gap | [6] [7 longer, 8 shorter: ends it] [9] [10]
    # [11 longer] [12 FIN, no data].  (10 could join 9; a frame after one that was shorter
    # than its predecessor starts a session, which is conservative, never wrong.)
    segs = [max(1, int(e["gso_segs"])) for e, _ in got]
    assert segs == [3, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    assert int(got[-1][0]["flags"]) & abi.NIC_CQE_F_LINEAR  # no payload: linear
    p = parse(got)
    assert int(p["tcp_flags"][0]) == ACK | PSH
    assert int(p["tcp_flags"][2]) == ACK | SYN
    assert (int(got[5][0]["data_len"]), int(got[5][0]["gso_size"])) == (300, 200)
    s = streams(got)
    assert s[(SPORT, (ISN + 1 + 1000 + 600) & 0xFFFFFFFF)] == b"".join(
        fr.frame_bytes(i)[54:] for i in (6,))
    assert c(kern.stats, "rx_packets") == 13


def test_sessions_never_mix_flows_and_stop_at_the_buffer_and_64_segments(run_id: str) -> None:
    k = Kernel(run_id, ring=64, nbufs=64, buf_len=8192)
    k.cfg.gro_hw = True
    try:
        b = two_flows()
        flow = np.array([0] * 70 + [1] * 5 + [0] * 3, np.intp)
        lens = np.array([100] * 70 + [100] * 5 + [100] * 3, np.int64)
        offs = np.concatenate((np.arange(70) * 100, np.arange(5) * 100,
                               70 * 100 + np.arange(3) * 100)).astype(np.int64)
        fr = b.build(flow, offs, lens, np.full(78, ACK))
        k.post(16)
        assert k.dq.place(fr).consumed == 78
        got = k.reap()
        # 8192 // 100 = 81 > 64: the segment cap ends the first session
        assert [int(e["gso_segs"]) for e, _ in got] == [64, 6, 5, 3]
        p = parse(got)
        assert p["sport"].tolist() == [SPORT, SPORT, SPORT + 1, SPORT]
        s = streams(got)
        first = np.frombuffer(s[(SPORT, (ISN + 1) & 0xFFFFFFFF)], np.uint8)
        assert pattern.verify(SPORT, 0, first) == -1
        assert GRO_MAX_SEGS == 64
    finally:
        k.close()


def test_starved_sessions_resume_without_loss(kern: Kernel) -> None:
    fr = frames_of(builder(batch=512), [64] * 300)
    kern.post(2)
    res = kern.dq.place(fr)
    assert res.consumed == 128 and res.starved and kern.dq.need_bufs == 1
    first = kern.reap()
    kern.post(8)
    rest = frames_of(builder(batch=512), [64] * 172, start=128 * 64)
    assert kern.dq.place(rest).consumed == 172
    got = first + kern.reap()
    data = b"".join(f[54:] for _, f in got)
    assert pattern.verify(SPORT, 0, np.frombuffer(data, np.uint8)) == -1
    assert len(data) == 300 * 64


def test_sessions_cross_the_fill_ring_wrap_point(kern: Kernel) -> None:
    b = builder(batch=512)
    done = 0
    for _ in range(5):  # 5 x 32 sessions through a 64-entry ring: it wraps
        kern.post(40)
        fr = frames_of(b, [64] * 512, start=done * 64)
        n = kern.dq.place(fr).consumed
        assert n == 512
        got = kern.reap()
        data = b"".join(f[54:] for _, f in got)
        assert pattern.verify(SPORT, done * 64, np.frombuffer(data, np.uint8)) == -1
        done += n
    assert c(kern.stats, "rx_hw_gro_wire_packets") == 5 * 512


def test_an_iommu_fault_drops_its_session_only(kern: Kernel) -> None:
    kern.av[:] = 0xAA
    fr = frames_of(builder(batch=256), [64] * 192)
    kern.post(1)
    kern.post_raw([(77, 0, 4096)])  # unknown map id
    kern.post(1)
    assert kern.dq.place(fr) == (192, 128, False, False)
    got = kern.reap()
    assert [int(e["status"]) for e, _ in got] == [0, NIC_STATUS_DMA_FAULT, 0]
    e = got[1][0]
    assert (int(e["flags"]), int(e["data_len"]), int(e["gso_segs"])) == (0, 0, 0)
    assert c(kern.stats, "rx_iommu_fault") == 64 and c(kern.stats, "rx_dropped") == 64
    assert c(kern.stats, "rx_packets") == 128 and c(kern.stats, "rx_hw_gro_packets") == 2


def test_ipv6_sessions(kern: Kernel) -> None:
    fr = frames_of(builder(family=6), [1000] * 9)
    kern.post(8)
    assert kern.dq.place(fr).consumed == 9
    got = kern.reap()
    assert [int(e["gso_segs"]) for e, _ in got] == [4, 4, 0]  # 4 x 1000 fit 4096
    p = parse(got)
    assert p["status"].tolist() == [0, 0, 0] and p["payload_len"].tolist() == [4000] * 2 + [1000]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 300), st.booleans(), st.booleans()),
                min_size=1, max_size=120))
def test_gro_delivers_what_gro_off_delivers(run_id: str, segs: list[tuple[int, int, bool, bool]]
                                             ) -> None:
    """Random batches of two flows (lengths, PSH, gaps): the same bytes at the same sequence
    numbers, and the same wire counters, with GRO on and off."""
    b = two_flows()
    flow = np.array([f for f, _, _, _ in segs], np.intp)
    lens = np.array([n for _, n, _, _ in segs], np.int64)
    pos = [0, 0]
    offs = []
    for f, n, _, gap in segs:
        pos[f] += 7 if gap else 0
        offs.append(pos[f])
        pos[f] += n
    flags = np.array([ACK | (PSH if p else 0) for _, _, p, _ in segs])
    seen = []
    for gro in (False, True):
        k = Kernel(f"{run_id}{int(gro)}", ring=256, nbufs=256, buf_len=1024, thresh=0)
        k.cfg.gro_hw = gro
        try:
            fr = b.build(flow, np.array(offs, np.int64), lens, flags)
            k.post(256)
            assert k.dq.place(fr).consumed == len(segs)
            got = k.reap()
            rebuilt: dict[int, bytearray] = {SPORT: bytearray(), SPORT + 1: bytearray()}
            for (sport, seq), data in streams(got).items():
                at = (seq - ISN - 1) & 0xFFFFFFFF
                buf = rebuilt[sport]
                buf.extend(bytes(max(0, at + len(data) - len(buf))))
                buf[at:at + len(data)] = data
            segs_out = [max(1, int(e["gso_segs"])) for e, _ in got if not int(e["status"])]
            seen.append((rebuilt, c(k.stats, "rx_packets"), c(k.stats, "rx_bytes"),
                         sum(segs_out)))
            if gro:
                for e, _ in got:
                    assert int(e["data_len"]) <= 1024 and int(e["gso_segs"]) <= GRO_MAX_SEGS
        finally:
            k.close()
    assert seen[0] == seen[1]


# ------------------------------------------------------------------------------- the driver


@pytest.fixture
def dev(run_id: str) -> Iterator[tuple[NetDevice, FakeNic, SkbStore]]:
    from tests.test_netdev import make_dev, teardown
    nd, nic, store = make_dev(run_id)
    yield nd, nic, store
    teardown(nd, nic, store)


def gro_mark(segs: int, size: int):  # type: ignore[no-untyped-def]
    def mark(i: int, cqe: np.ndarray, row: np.ndarray) -> None:
        cqe["flags"] |= abi.NIC_CQE_F_GRO
        cqe["gso_segs"] = segs
        cqe["gso_size"] = size
    return mark


def test_the_driver_hands_a_session_up_as_one_skb_and_counts_its_segments(
        dev: tuple[NetDevice, FakeNic, SkbStore]) -> None:
    nd, nic, store = dev
    nd.open()
    flow = Flow()
    frames, flen, _offs = flow.frames([4096, 4096])
    assert nic.deliver(0, frames, flen, mutate=gro_mark(64, 64), mtu=0xFFFF) == 2
    b = nd.napi_poll(0)
    assert b.completions == 2 and len(b) == 2 and b.dropped == 0
    assert b.payload_len.tolist() == [4096, 4096]
    assert pattern.verify(flow.stream, 0, payload_bytes(store, b)) == -1
    s = nd.queue_stats(0)
    assert s["rx_packets"] == 128 and s["rx_hw_gro_packets"] == 2
    assert s["rx_hw_gro_wire_packets"] == 128 and s["rx_frags"] == 2
    assert s["rx_bytes"] == int(flen.sum()) + 2 * 63 * 54  # every segment had headers
    store.free(b.handles)
    nd.check_ledger()


@pytest.mark.parametrize("segs,size,nbytes,linear", [
    (1, 4096, 4096, False),  # one segment is not a session
    (65, 64, 4096, False),   # more than GRO_MAX_SEGS
    (64, 0, 4096, False),    # no segment size
    (64, 100, 4096, False),  # 64 x 100 cannot end at 4096 with only the last one short
    (40, 100, 4096, False),  # 40 x 100 is not 4096 either
    (10, 100, 1000, True),   # a session is always split
])
def test_the_driver_refuses_impossible_sessions(dev: tuple[NetDevice, FakeNic, SkbStore],
                                                segs: int, size: int, nbytes: int,
                                                linear: bool) -> None:
    nd, nic, _store = dev
    nd.open()
    flow = Flow()
    frames, flen, _ = flow.frames([nbytes])
    nic.deliver(0, frames, flen, split=not linear, mutate=gro_mark(segs, size),
                mtu=0xFFFF)
    b = nd.napi_poll(0)
    assert len(b) == 0 and b.dropped == 1
    assert nd.queue_stats(0)["bad_completions"] == 1
    nd.check_ledger()


def test_gso_fields_without_the_gro_flag_are_refused(
        dev: tuple[NetDevice, FakeNic, SkbStore]) -> None:
    nd, nic, _store = dev
    nd.open()
    frames, flen, _ = Flow().frames([1000])

    def scribble(i: int, cqe: np.ndarray, row: np.ndarray) -> None:
        cqe["gso_segs"] = 3

    nic.deliver(0, frames, flen, mutate=scribble)
    b = nd.napi_poll(0)
    assert len(b) == 0 and nd.queue_stats(0)["bad_completions"] == 1
    nd.check_ledger()


# ------------------------------------------------------------------------------- ethtool -K


def test_ethtool_k_grammar() -> None:
    assert et.parse(["-k", "eth0"]) == {"cmd": "features-get", "dev": "eth0"}
    assert et.parse(["--offload", "eth0", "rx-gro-hw", "on", "lro", "off"]) == {
        "cmd": "features-set", "dev": "eth0",
        "features": {"rx-gro-hw": True, "large-receive-offload": False}}
    for bad in (["-K", "eth0"], ["-K", "eth0", "rx-gro-hw"], ["-K", "eth0", "rx-gro-hw", "yes"],
                ["-K", "eth0", "gro", "on", "generic-receive-offload", "off"]):
        with pytest.raises(et.EthtoolUsageError):
            et.parse(bad)
    text = et.format_reply({"cmd": "features-get", "dev": "eth0"},
                           {"features": [["rx-checksumming", True, True],
                                         ["rx-gro-hw", False, False]]})
    assert text == "Features for eth0:\nrx-checksumming: on [fixed]\nrx-gro-hw: off\n"


def test_the_nic_turns_rx_gro_hw_on_and_off_and_keeps_fixed_features() -> None:
    nic = Nic([NetdevSpec.parse("eth0:queues=2")])
    try:
        feats = {n: (on, fx) for n, on, fx in nic.ethtool(
            "eth0", {"cmd": "features-get", "dev": "eth0"})["features"]}
        assert feats["rx-gro-hw"] == (False, False)
        assert feats["large-receive-offload"] == (False, True)
        nic.ethtool("eth0", {"cmd": "features-set", "dev": "eth0",
                             "features": {"rx-gro-hw": True}})
        assert nic.dev("eth0").hds.gro_hw
        for want, code in (({"large-receive-offload": True}, errno.EOPNOTSUPP),
                           ({"rx-gro-hw": False, "bogus": True}, errno.EINVAL),
                           ({"rx-gro-hw": "off"}, errno.EINVAL)):
            with pytest.raises(Misuse) as ei:
                nic.ethtool("eth0", {"cmd": "features-set", "dev": "eth0", "features": want})
            assert ei.value.errno == code
        assert nic.dev("eth0").hds.gro_hw  # a refused request changes nothing
    finally:
        nic.close()
    on = Nic([NetdevSpec.parse("eth1:gro-hw=on")])  # a spec may start with it on
    try:
        assert on.dev("eth1").hds.gro_hw
    finally:
        on.close()


# ------------------------------------------------------------------------------ end to end


@pytest.mark.timeout(180)
def test_small_segments_arrive_zero_copy_in_few_cqes(tmp_path: Path) -> None:
    """64-byte segments at MTU 1500 with rx-gro-hw on: every byte verified by zcrx-server,
    zero copy, a CQE per session rather than per segment, and the NIC's and the driver's
    counters agree on the wire packets."""
    size, port = 2 << 20, 8000
    out = tmp_path / "gro.json"
    with topology("gro1", "--netdev", "eth0:queues=2,mtu=1500"):
        zcrx("ethtool", "--name", "gro1", "-K", "eth0", "rx-gro-hw", "on")
        assert "rx-gro-hw: on\n" in zcrx("ethtool", "--name", "gro1", "-k", "eth0").output
        zcrx("ethtool", "--name", "gro1", "-N", "eth0", "flow-type", "tcp4", "dst-port",
             str(port), "action", "1")
        zcrx("app", "run", "--name", "gro1", "--detach", "--cap-net-admin", "zcrx-server",
             "--", "-p", str(port), "-i", "eth0", "-q", "1", "-v", "-n", "1",
             "-s", str(size), "--json", str(out))
        zcrx("traffic", "--name", "gro1", "--flows", "1", "--port", str(port),
             "--payload", "64", "--bytes", str(size))
        wait_app("gro1", "app:0", 150)
        nic = nic_stats("gro1")
    rep = json.loads(out.read_text())
    assert rep["ok"], rep
    (conn,) = rep["connections"]
    assert conn["bytes"] == size and conn["bad_offset"] is None
    fb = rep["copy_fallback"]
    assert fb["zc_bytes"] == size and fb["bytes"] == 0
    segments = size // 64
    assert fb["counters"]["zc_cqes"] <= segments // 8  # sessions, not segments
    assert nic["rx-1.hw_gro_wire_packets"] >= segments - 2 * fb["counters"]["zc_cqes"]
    assert nic["rx-1.drv_rx_packets"] == nic["rx-1.packets"]  # SYN and FIN included
    assert nic["rx-1.drv_rx_hw_gro_packets"] == nic["rx-1.hw_gro_packets"] > 0
    assert nic["rx-1.drv_rx_hw_gro_wire_packets"] == nic["rx-1.hw_gro_wire_packets"]


@pytest.mark.parametrize("n,buf_len", [(512, 4096), (130, 4096), (100, 1024), (7, 65536)])
def test_the_steady_state_path_matches_the_general_one(run_id: str, monkeypatch: pytest.MonkeyPatch,
                                                       n: int, buf_len: int) -> None:
    """One flow of one frame shape takes the fixed-cost path; with it disabled the general
    path must produce the same completions, header slots, buffers and counters."""
    from nic_proc.dma import DmaQueue

    seen = []
    took: list[bool] = []
    real = DmaQueue._place_gro_run

    def spy(*a: object, **kw: object) -> object:
        got = real(*a, **kw)  # type: ignore[arg-type]
        took.append(got is not None)
        return got

    for fast in (True, False):
        monkeypatch.setattr(DmaQueue, "_place_gro_run",
                            spy if fast else (lambda *a, **k: None))
        k = Kernel(f"{run_id}{int(fast)}", ring=512, nbufs=64, buf_len=buf_len)
        k.cfg.gro_hw = True
        try:
            fr = frames_of(builder(batch=512), [64] * n, flags=[ACK] * (n - 1) + [ACK | PSH])
            k.post(64)
            res = k.dq.place(fr, None, 77)
            got = k.reap()
            cqes = [(int(e["flags"]), int(e["gso_segs"]), int(e["gso_size"]), int(e["data_len"]),
                     int(e["hdr_slot"]), int(e["rss_hash"])) for e, _ in got]
            seen.append((res, cqes, [f for _, f in got], k.stats.tolist()))
        finally:
            k.close()
    assert took and all(took)  # the first round did take the steady-state path
    assert seen[0] == seen[1]
    assert seen[0][1][0][1] == min(n, GRO_MAX_SEGS, buf_len // 64)
