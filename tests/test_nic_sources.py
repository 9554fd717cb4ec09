"""Traffic sources (nic_proc.sources): generator, wire gateway, raw frames.

The generator's frames are checked the way the kernel will see them: parsed with
shared.wire, sequence numbers against the ISN, payload against shared.pattern with the
flow's source port as stream id.  Pausing is exercised by committing random per-flow
prefixes: the streams must still come out exact.  The gateway is driven through a real
loopback socket.
"""

from __future__ import annotations

import errno
import random
import socket
import struct
import time
from collections.abc import Callable

import numpy as np
import pytest

from nic_proc.dma import Frames
from nic_proc.sources import (
    GRO_BATCH_BYTES,
    Blocked,
    FrameBuilder,
    Generator,
    RawBatch,
    RawSource,
    WireGateway,
    WireInfo,
    default_batch,
    parse_raw,
)
from shared import pattern, wire
from shared.errors import Misuse

INFO = WireInfo("eth0", 0, 4096)


def parsed(fr: Frames, mtu: int = 4096) -> np.ndarray:
    """Parse the batch as wire bytes (headers + payload + padding glued back)."""
    raw = [fr.frame_bytes(i) for i in range(len(fr))]
    lens = [len(f) for f in raw]
    res = wire.parse_frames(b"".join(raw), np.cumsum([0, *lens])[:-1], lens, mtu)
    assert (res["status"] == wire.FrameStatus.OK).all()
    return res


class Receiver:
    """Collects what a generator delivered, per flow (sport), checking TCP order."""

    def __init__(self, gen: Generator) -> None:
        self.isn = {int(p): int(i) for p, i in zip(gen.sport, gen.isn, strict=True)}
        self.data: dict[int, bytearray] = {p: bytearray() for p in self.isn}
        self.syn: dict[int, int] = dict.fromkeys(self.isn, 0)
        self.fin: dict[int, int] = dict.fromkeys(self.isn, 0)

    def take(self, fr: Frames, consumed: np.ndarray) -> None:
        res = parsed(fr)
        for i in np.flatnonzero(consumed):
            r = res[i]
            sp = int(r["sport"])
            isn = self.isn[sp]
            flags = int(r["tcp_flags"])
            seq = int(r["seq"])
            if flags & wire.TCP_SYN:
                assert seq == isn and not self.data[sp] and self.syn[sp] == 0
                assert flags == wire.TCP_SYN
                self.syn[sp] += 1
                continue
            assert flags & wire.TCP_ACK
            assert self.fin[sp] == 0, "segment after FIN"
            assert seq == (isn + 1 + len(self.data[sp])) % 2**32
            po, pl = int(r["payload_off"]), int(r["payload_len"])
            self.data[sp] += fr.frame_bytes(int(i))[po:po + pl]
            if flags & wire.TCP_FIN:
                assert pl == 0
                self.fin[sp] += 1


def run_all(gen: Generator, rx: Receiver, take: Callable[[Frames], np.ndarray] | None = None,
            limit: int = 10_000) -> None:
    for _ in range(limit):
        fr = gen.poll()
        if fr is None:
            break
        consumed = np.ones(len(fr), bool) if take is None else take(fr)
        rx.take(fr, consumed)
        gen.commit(fr, consumed)
    assert gen.done


def test_generator_streams_verify_with_pattern_and_seqs() -> None:
    gen = Generator(1, INFO, {"dport": 9000, "flows": 3, "bytes": 50_000, "payload": 1400,
                              "batch": 16})
    rx = Receiver(gen)
    run_all(gen, rx)
    for sp, data in rx.data.items():
        assert len(data) == 50_000 and pattern.verify(sp, 0, data) == -1
        assert rx.syn[sp] == 1 and rx.fin[sp] == 1
    p = gen.progress()
    assert p["done"] and p["bytes"] == 150_000 and p["nflows"] == 3
    assert [f["sent"] for f in p["flows"]] == [50_000] * 3
    assert {f["stream"] for f in p["flows"]} == {f["sport"] for f in p["flows"]}


def test_generator_defaults_follow_the_netdev() -> None:
    info = WireInfo("eth1", 1, 9000)
    gen = Generator(3, info, {"dport": 80, "flows": 2, "bytes": 20_000})
    fr = gen.poll()
    assert fr is not None
    r = parsed(fr, 9000)
    assert {wire.addr_str(a, 4) for a in r["dst_addr"]} == {"10.0.1.1"}
    assert {wire.addr_str(a, 4) for a in r["src_addr"]} == {"10.0.1.2"}
    assert r["sport"].tolist()[:2] == [20000 + 3 * 1024, 20000 + 3 * 1024 + 1]
    assert gen.seg == wire.mss(4, 9000) == 8960
    assert fr.hdr[0, :6].tobytes() == info.mac


def test_default_batch_grows_with_hw_gro_and_the_stream_stays_exact() -> None:
    """A batch is 512 frames (more for small segments); with HW-GRO on the device (the NIC
    sets ``gro_room`` to its rx-buf-len) it grows by the segments one buffer holds, up to
    3 MiB of payload, and the stream is the same bytes whatever the batch."""
    assert default_batch(4096) == default_batch(1448) == 512
    assert default_batch(64) == 4096
    assert default_batch(1448, 4096) == 1024           # two segments per 4 KiB buffer
    assert default_batch(1448, 65536) == GRO_BATCH_BYTES // 1448 == 2172
    assert default_batch(4096, 4096) == 512            # one segment per buffer: no coalescing
    assert default_batch(64, 65536) == 4096
    info = WireInfo("eth0", 0, 1500)
    total = 9_000_000
    gen = Generator(1, info, {"dport": 9000, "flows": 1, "bytes": total, "syn": False})
    rx = Receiver(gen)
    sizes = []
    for room in (0, 65536, 4096, 0):
        gen.gro_room = room
        fr = gen.poll()
        assert fr is not None
        sizes.append(len(fr))
        ok = np.ones(len(fr), bool)
        rx.take(fr, ok)
        gen.commit(fr, ok)
    assert gen.seg == 1460
    assert sizes == [512, GRO_BATCH_BYTES // 1460, 1024, 512]
    gen.gro_room = 65536
    run_all(gen, rx)
    (sp, data), = rx.data.items()
    assert len(data) == total and pattern.verify(sp, 0, data) == -1
    fixed = Generator(2, info, {"dport": 9000, "flows": 1, "bytes": total, "batch": 100})
    fixed.gro_room = 65536
    syn = fixed.poll()  # the SYN goes out alone (data after the handshake's round trip)
    assert syn is not None and len(syn) == 1 and syn.pay_len.tolist() == [0]
    fixed.commit(syn, np.ones(1, bool))
    fr = fixed.poll()
    assert fr is not None and len(fr) == 100  # the spec's batch is kept


def test_pause_and_resume_is_exact_with_random_per_flow_prefixes() -> None:
    gen = Generator(2, INFO, {"dport": 7, "flows": 4, "bytes": 30_001, "payload": 1000,
                              "batch": 24, "isn": 0xFFFFFF00})
    rx = Receiver(gen)
    rng = random.Random(7)

    def take(fr: Frames) -> np.ndarray:
        sport = parsed(fr)["sport"]
        keep = {int(p): rng.randint(0, 6) for p in np.unique(sport)}
        out = np.zeros(len(fr), bool)
        seen: dict[int, int] = {}
        for i, p in enumerate(sport.tolist()):
            seen[p] = seen.get(p, 0) + 1
            out[i] = seen[p] <= keep[p]  # a prefix of each flow's frames
        return out

    run_all(gen, rx, take)
    for sp, data in rx.data.items():
        assert len(data) == 30_001 and pattern.verify(sp, 0, data) == -1
        assert rx.fin[sp] == 1


def test_flows_interleave_round_robin() -> None:
    gen = Generator(1, INFO, {"dport": 7, "flows": 4, "batch": 12, "syn": False})
    fr = gen.poll()
    assert fr is not None and len(fr) == 12
    assert fr.flow.tolist() == [0, 1, 2, 3] * 3
    assert fr.uniform == (54, wire.mss(4, 4096), 54 + wire.mss(4, 4096))


def test_more_flows_than_frames_rotates_fairly() -> None:
    gen = Generator(1, INFO, {"dport": 7, "flows": 10, "batch": 4, "syn": False,
                              "bytes": 4056})
    seen = []
    for _ in range(3):
        fr = gen.poll()
        assert fr is not None
        seen += fr.flow.tolist()
        gen.commit(fr, np.ones(len(fr), bool))
    assert sorted(seen[:10]) == list(range(10))


def test_fast_path_headers_equal_a_full_build() -> None:
    for fam in (4, 6):
        gen = Generator(1, INFO, {"dport": 7, "flows": 3, "batch": 9, "syn": False,
                                  "family": fam, "isn": 0xFFFFFFF0})
        fr = gen.poll()  # steady state: the template fast path
        assert fr is not None and fr.uniform is not None
        fs = gen.builder.spec
        ref = FrameBuilder(fs, 9, gen.seg)
        full = ref.build(fr.flow, np.arange(9, dtype=np.int64) // 3 * gen.seg,
                         fr.pay_len, wire.TCP_ACK)
        for i in range(9):
            assert fr.frame_bytes(i) == full.frame_bytes(i)


def test_blocked_flows_are_held_back() -> None:
    gen = Generator(1, INFO, {"dport": 7, "flows": 3, "bytes": 5000, "syn": False})
    fr = gen.poll(lambda flows, key: np.array([False, True, False]))
    assert fr is not None and set(fr.flow.tolist()) == {0, 2}
    gen.commit(fr, np.ones(len(fr), bool))
    assert gen.poll(lambda flows, key: np.ones(3, bool)) is None
    p = gen.progress()["flows"]
    assert [f["sent"] for f in p] == [5000, 0, 5000]


def test_duration_ends_every_flow_with_a_fin_after_what_was_sent() -> None:
    now = [100.0]
    gen = Generator(1, INFO, {"dport": 7, "flows": 2, "duration": 1.5, "batch": 4},
                    clock=lambda: now[0])
    rx = Receiver(gen)
    for _ in range(3):
        fr = gen.poll()
        assert fr is not None
        rx.take(fr, np.ones(len(fr), bool))
        gen.commit(fr, np.ones(len(fr), bool))
    now[0] += 2.0
    run_all(gen, rx)
    for sp, data in rx.data.items():
        assert rx.fin[sp] == 1 and len(data) > 0 and pattern.verify(sp, 0, data) == -1


def test_rate_limit_paces_the_bytes() -> None:
    now = [0.0]
    gen = Generator(1, INFO, {"dport": 7, "rate": 10_000.0, "payload": 1000, "syn": False},
                    clock=lambda: now[0])
    sent = 0
    for step in range(1, 40):
        now[0] = step * 0.1
        fr = gen.poll()
        if fr is not None:
            gen.commit(fr, np.ones(len(fr), bool))
        sent = gen.bytes_sent
        assert sent <= 10_000 * now[0] + 1000
    assert sent >= 10_000 * now[0] - 2000


def test_ipv6_generator() -> None:
    gen = Generator(1, INFO, {"dport": 443, "family": 6, "bytes": 9000})
    rx = Receiver(gen)
    run_all(gen, rx)
    sp = int(gen.sport[0])
    assert pattern.verify(sp, 0, rx.data[sp]) == -1 and len(rx.data[sp]) == 9000
    fr = Generator(1, INFO, {"dport": 443, "family": 6}).poll()
    assert fr is not None
    r = parsed(fr)
    assert r["family"][0] == 6 and wire.addr_str(r["dst_addr"][0], 6) == "fd00::1"
    assert INFO.addr6 == "fd00::1" and WireInfo("eth3", 3).addr6 == "fd00:0:0:3::1"


@pytest.mark.parametrize("spec", [
    {"flows": 2},  # no dport
    {"dport": 7, "nope": 1},
    {"dport": 7, "payload": 5000},  # over the MSS of MTU 4096
    {"dport": 70000},
    {"dport": 7, "family": 5},
    {"dport": 7, "flows": 2, "sport": 65535},
    {"dport": 7, "rate": -1},
    {"dport": 7, "syn": 1},
])
def test_bad_specs_are_refused(spec: dict) -> None:
    with pytest.raises(Misuse) as ei:
        Generator(1, INFO, spec)
    assert ei.value.errno == errno.EINVAL


# ------------------------------------------------------------------------------- gateway


def drive(gw: WireGateway, frames: list[bytes], until: Callable[[], bool],
          timeout: float = 10.0, blocked: Blocked | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "gateway made no progress"
        fr = gw.poll(blocked)
        if fr is None:
            time.sleep(0.001)
            continue
        frames.extend(fr.frame_bytes(i) for i in range(len(fr)))
        gw.commit(fr, np.ones(len(fr), bool))


def test_wire_gateway_turns_a_connection_into_a_flow() -> None:
    gw = WireGateway(4, INFO, 0)
    try:
        assert gw.port > 0
        cli = socket.create_connection(("127.0.0.1", gw.port))
        cport = cli.getsockname()[1]
        payload = bytes(random.Random(1).randbytes(100_000))
        cli.sendall(payload)
        cli.shutdown(socket.SHUT_WR)
        frames: list[bytes] = []
        drive(gw, frames, lambda: bool(frames) and bool(frames[-1][47] & wire.TCP_FIN))
        cli.close()
        lens = [len(f) for f in frames]
        res = wire.parse_frames(b"".join(frames), np.cumsum([0, *lens])[:-1], lens, 4096)
        assert (res["status"] == 0).all()
        assert int(res["sport"][0]) == cport and int(res["dport"][0]) == gw.port
        assert wire.addr_str(res["src_addr"][0], 4) == "127.0.0.1"
        assert wire.addr_str(res["dst_addr"][0], 4) == INFO.addr
        isn = int(res["seq"][0])
        assert res["tcp_flags"][0] == wire.TCP_SYN
        data = bytearray()
        for r, f in zip(res[1:], frames[1:], strict=True):
            assert int(r["seq"]) == (isn + 1 + len(data)) % 2**32
            assert int(r["payload_len"]) <= wire.mss(4, 4096)
            data += f[int(r["payload_off"]):int(r["payload_off"]) + int(r["payload_len"])]
        assert bytes(data) == payload
        assert res["tcp_flags"][-1] == wire.TCP_FIN | wire.TCP_ACK
        prog = gw.progress()
        assert prog["port"] == gw.port and prog["bytes"] == 100_000
    finally:
        gw.close()


def test_wire_gateway_reset_becomes_rst_and_pause_stops_reading() -> None:
    gw = WireGateway(4, INFO, 0)
    try:
        cli = socket.create_connection(("127.0.0.1", gw.port))
        frames: list[bytes] = []
        drive(gw, frames, lambda: len(frames) >= 1)  # the SYN
        cli.sendall(b"x" * 5000)
        # paused: the gateway neither reads the socket nor sends
        assert gw.poll(lambda flows, key: np.ones(1, bool)) is None
        assert gw.conns[0].read == 0
        drive(gw, frames, lambda: gw.conns[0].sent == 5000)
        cli.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        cli.close()  # RST
        drive(gw, frames, lambda: bool(frames[-1][47] & wire.TCP_RST))
        lens = [len(f) for f in frames]
        res = wire.parse_frames(b"".join(frames), np.cumsum([0, *lens])[:-1], lens, 4096)
        assert int(res["seq"][-1]) == (int(res["seq"][0]) + 1 + 5000) % 2**32
    finally:
        gw.close()


def test_wire_gateway_refuses_non_loopback_and_reports_bind_errors() -> None:
    with pytest.raises(Misuse) as ei:
        WireGateway(1, INFO, 0, "0.0.0.0")
    assert ei.value.errno == errno.EINVAL
    gw = WireGateway(1, INFO, 0)
    try:
        with pytest.raises(Misuse) as ei:
            WireGateway(2, INFO, gw.port)
        assert ei.value.errno == errno.EADDRINUSE
    finally:
        gw.close()


# ------------------------------------------------------------------------------ raw path


def test_parse_raw_keeps_good_frames_and_flags_bad_ones() -> None:
    gen = Generator(1, INFO, {"dport": 7, "bytes": 3000, "payload": 1000})
    good = []
    while (fr := gen.poll()) is not None:
        good += [fr.frame_bytes(i) for i in range(len(fr))]
        gen.commit(fr, np.ones(len(fr), bool))
    assert len(good) == 5  # SYN, 3 x 1000 bytes, FIN
    frames = [good[0], good[1][:30], good[1], b"\x00" * 70, good[2], good[2] + b"\x00" * 5000,
              good[3]]
    src = RawSource(1, INFO, frames)
    raw = src.poll()
    assert isinstance(raw, RawBatch)
    out, idx, status = parse_raw(raw, 4096)
    S = wire.FrameStatus
    assert status.tolist() == [S.OK, S.TRUNCATED, S.OK, S.BAD_ETHERTYPE, S.OK, S.OVERSIZE, S.OK]
    assert idx.tolist() == [0, 2, 4, 6]
    assert [out.frame_bytes(i) for i in range(len(out))] == [good[0], good[1], good[2], good[3]]
    assert out.hdr_len.tolist() == [54] * 4
    consumed = np.array([True, True, False, True, True, True, False])
    src.commit(raw, consumed)
    assert src.pending == [good[1], good[3]]  # resumes exactly where it stopped
