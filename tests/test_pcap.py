"""Pcap in, pcap out, and the wire gateway on IPv6 with many connections (issue 10, 4-6).

* A real capture (netcat over a veth pair between network namespaces, MTU 1500, tcpdump)
  replayed into a zero-copy queue: the app's sha256 equals the sender's file, IPv4 (the
  capture kept in ``tests/data/``, and a fresh one where the machine can make it) and IPv6
  (made fresh; root only).
* ``zcrx capture`` of a generator run reads back with dpkt and ``tcpdump -r``.
* Bad input to ``zcrx traffic --pcap``: one clear line, exit 2, nothing left behind.
* The capture reader's handling of mid-stream starts, retransmissions, the other
  direction, VLAN tags, missing FINs (pure logic, no processes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import dpkt
import numpy as np
import pytest

from nic_proc.pcap import PcapSource, load_pcap, parse_dst
from nic_proc.sources import WireInfo
from shared.control import ControlClient
from shared.errors import Misuse
from tests import netns_capture
from tests.e2e import topology, zcrx
from tests.test_own_receiver import finish, program, sha256_file, zero_copy_bytes

DATA = Path(__file__).resolve().parent / "data"
KEPT = DATA / "nc-ipv4.pcap"
#: sha256 of the 65536 bytes the kept capture carries (netns_capture seed 1)
KEPT_SHA = hashlib.sha256(hashlib.shake_256((1).to_bytes(8, "little")).digest(65536)).hexdigest()
ZC_QUEUE = 1
INFO = WireInfo(mtu=1500)


def _zc_replay(tmp_path: Path, pcap: Path, tag: str, ipv6: bool, *extra: str) -> str:
    """Replay ``pcap`` into the bound queue of a fresh run; the sha256 the app wrote."""
    out = tmp_path / f"{tag}.bin"
    flow = ("flow-type", "tcp6" if ipv6 else "tcp4", "dst-port", str(netns_capture.PORT),
            "action", str(ZC_QUEUE))
    with topology(tag, "--netdev", "eth0:queues=2,mtu=1500") as run:
        zcrx("ethtool", "--name", tag, "-N", "eth0", *flow)
        with program([sys.executable, "-m", "app_proc.zcrx_server", "-p",
                      str(netns_capture.PORT), "-q", str(ZC_QUEUE), "-n", "1", "-o", str(out)],
                     run.dir, tmp_path, tag, cap_net_admin=True) as app:
            res = zcrx("traffic", "--name", tag, "--pcap", str(pcap), *extra)
            assert "pcap replay" in res.output and "1 flow(s)" in res.output, res.output
            finish(app, tmp_path, tag)
        zc, copied = zero_copy_bytes(tag)
        assert zc > 0 and copied == 0
    return sha256_file(out)


@pytest.mark.timeout(240)
def test_kept_capture_replays_byte_exact_into_a_zero_copy_queue(tmp_path: Path) -> None:
    assert KEPT.stat().st_size < 200 << 10
    assert _zc_replay(tmp_path, KEPT, "pc4", False) == KEPT_SHA
    assert _zc_replay(tmp_path, KEPT, "pc4r", False, "--rewrite", "--speed", "50") == KEPT_SHA


@pytest.mark.timeout(300)
@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_fresh_netcat_capture_replays_byte_exact(tmp_path: Path, ipv6: bool) -> None:
    why = netns_capture.why_not()
    if why:
        pytest.skip(why)
    pcap = tmp_path / "nc.pcap"
    want = netns_capture.make_capture(pcap, 300_000, ipv6=ipv6, seed=2)
    plan = load_pcap(str(pcap), INFO)
    assert plan.counts["other_direction"] > 0 and plan.flows == 1
    assert _zc_replay(tmp_path, pcap, "pcf6" if ipv6 else "pcf4", ipv6,
                      "--dst", f"[{netns_capture.ADDR6[1]}]:{netns_capture.PORT}" if ipv6
                      else f"{netns_capture.ADDR4[1]}:{netns_capture.PORT}") == want


@pytest.mark.timeout(240)
@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump is not installed")
@pytest.mark.parametrize("stream", [False, True], ids=["file", "stdout"])
def test_capture_of_a_generator_run_reads_back(tmp_path: Path, stream: bool) -> None:
    count = 200
    out = tmp_path / "cap.pcap"
    with topology("cap1") as run:
        cmd = [str(Path(sys.executable).parent / "zcrx"), "capture", "--name", "cap1",
               "--dev", "eth0", "-c", str(count), "-s", "128",
               "-w", "-" if stream else str(out)]
        env_runs = {"ZCRX_RUNS_DIR": str(run.dir.parent)}
        with open(out if stream else os.devnull, "wb") as sink:
            cap = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.PIPE,
                                   env={**os.environ, **env_runs})
            deadline = time.monotonic() + 30
            while not any(run.dir.glob("capture.*.pcap")) and not (
                    not stream and out.exists()):
                assert cap.poll() is None, cap.stderr.read() if cap.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.05)
            zcrx("traffic", "--name", "cap1", "--bytes", str(1 << 20))
            _, err = cap.communicate(timeout=60)
        assert cap.returncode == 0, err
        assert f"{count} packets captured" in err.decode()
        assert not any(run.dir.glob("capture.*.pcap"))
    with open(out, "rb") as f:
        recs = list(dpkt.pcap.Reader(f))
    assert len(recs) == count
    first = dpkt.ethernet.Ethernet(recs[0][1])
    assert isinstance(first.data.data, dpkt.tcp.TCP)
    assert first.data.data.flags & dpkt.tcp.TH_SYN
    assert max(len(b) for _, b in recs) == 128  # -s 128
    lines = subprocess.run(["tcpdump", "-nn", "-r", str(out)], capture_output=True,
                           timeout=30, check=True).stdout.decode().splitlines()
    assert len(lines) == count
    assert "10.0.0.2." in lines[0] and "> 10.0.0.1.8000" in lines[0]


def _bad_files(tmp: Path) -> dict[str, Path]:
    good = KEPT.read_bytes()
    files = {
        "empty": b"",
        "garbage": bytes(range(256)) * 4,
        "truncated": good[: len(good) // 2 + 7],
        "header only": good[:24],
    }
    buf = _pcap([_udp_frame()])
    files["no tcp"] = buf
    out = {}
    for k, v in files.items():
        p = tmp / (k.replace(" ", "_") + ".pcap")
        p.write_bytes(v)
        out[k] = p
    return out


@pytest.mark.timeout(120)
def test_bad_input_one_clear_line_exit_2_nothing_left(tmp_path: Path) -> None:
    files = _bad_files(tmp_path)
    with topology("pcbad") as run:
        for what, p in files.items():
            res = zcrx("traffic", "--name", "pcbad", "--pcap", str(p), ok=False)
            assert res.exit_code == 2, (what, res.output)
            text = res.output.strip()
            assert len(text.splitlines()) == 1 and str(p) in text, (what, text)
            assert "Traceback" not in text
        res = zcrx("traffic", "--name", "pcbad", "--pcap", str(tmp_path / "nope.pcap"),
                   ok=False)
        assert res.exit_code == 2 and "no such file" in res.output
        res = zcrx("traffic", "--name", "pcbad", "--pcap", str(KEPT), "--dst", "1.2.3.4:9",
                   ok=False)
        assert res.exit_code == 2 and "no TCP packet for --dst" in res.output
        res = zcrx("traffic", "--name", "pcbad", "--pcap", str(KEPT), "--dst", "x:y", ok=False)
        assert res.exit_code == 2 and "--dst" in res.output
        with ControlClient(run.endpoint("nic"), timeout_ms=10_000) as c:
            assert c.call("nic.sources", {})["sources"] == []  # no source was added


@pytest.mark.timeout(120)
def test_wire_gateway_on_ipv6_loopback_with_several_connections(tmp_path: Path) -> None:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    port = netns_capture.PORT + 7
    rng = np.random.default_rng(5)
    blobs = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (300_000, 200_001)]
    with topology("wire6", "--netdev", "eth0:queues=2") as run:
        res = zcrx("wire", "--name", "wire6", "--port", str(port))
        assert f"127.0.0.1:{port}" in res.output and f"[::1]:{port}" in res.output
        with program([sys.executable, "-m", "app_proc.copy_server", "-p", str(port), "-n",
                      str(len(blobs)), "-o", str(tmp_path / "w.bin"), "--json",
                      str(tmp_path / "w.json")], run.dir, tmp_path, "w6") as app:
            def send(host: str, data: bytes) -> None:
                with socket.create_connection((host, port), timeout=60) as s:
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
            ts = [threading.Thread(target=send, args=(h, b))
                  for h, b in zip(("::1", "127.0.0.1"), blobs, strict=True)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(60)
            finish(app, tmp_path, "w6")
    report = json.loads((tmp_path / "w.json").read_text())
    got = {c["sha256"]: c["peer"] for c in report["connections"]}
    want = {hashlib.sha256(b).hexdigest() for b in blobs}
    assert set(got) == want, report
    assert any(p.startswith("::1") or p.startswith("[::1]") for p in got.values()), got


# -- pure logic: the capture reader ------------------------------------------------------


def _pcap(frames: list[bytes], ts0: float = 1000.0) -> bytes:
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for i, f in enumerate(frames):
        t = ts0 + i * 0.001
        out.append(struct.pack("<IIII", int(t), int((t % 1) * 1e6), len(f), len(f)) + f)
    return b"".join(out)


def _tcp_frame(seq: int, data: bytes = b"", flags: int = dpkt.tcp.TH_ACK, *, sport: int = 5555,
               dport: int = 9000, rev: bool = False, vlan: bool = False) -> bytes:
    a, b = b"\xc0\x00\x02\x01", b"\xc0\x00\x02\x02"
    if rev:
        a, b, sport, dport = b, a, dport, sport
    tcp = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq, flags=flags, data=data, off=8,
                       opts=b"\x01\x01\x08\x0a" + bytes(8))  # NOP NOP timestamps
    ip = dpkt.ip.IP(src=a, dst=b, p=6, ttl=64, data=tcp)
    eth = dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, data=ip,
                                 type=dpkt.ethernet.ETH_TYPE_IP)
    raw = bytes(eth)
    if vlan:
        raw = raw[:12] + b"\x81\x00\x00\x05" + raw[12:]
    return raw


def _udp_frame() -> bytes:
    ip = dpkt.ip.IP(src=b"\x01\x02\x03\x04", dst=b"\x05\x06\x07\x08", p=17,
                    data=dpkt.udp.UDP(sport=1, dport=2, data=b"x" * 20))
    return bytes(dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, data=ip,
                                        type=dpkt.ethernet.ETH_TYPE_IP))


def test_reader_counts_midstream_retransmits_other_direction_vlan_and_no_fin(
        tmp_path: Path) -> None:
    p = tmp_path / "mid.pcap"
    p.write_bytes(_pcap([
        _tcp_frame(100, b"a" * 50),                 # mid-stream: a SYN is made up
        _tcp_frame(1, rev=True),                    # pure ACK of the other direction
        _tcp_frame(150, b"b" * 50, vlan=True),      # tagged
        _tcp_frame(100, b"a" * 50),                 # retransmission
        _tcp_frame(200, b"c" * 10),
        _udp_frame(),
    ]))
    plan = load_pcap(str(p), INFO)
    c = plan.counts
    assert (c["syn_added"], c["retransmits"], c["other_direction"], c["vlan"], c["no_fin"],
            c["not_tcp"]) == (1, 1, 1, 1, 1, 1)
    assert len(plan.lengths) == 5  # SYN + 4 data segments
    syn = dpkt.ethernet.Ethernet(plan.rows[0, :plan.lengths[0]].tobytes())
    assert syn.data.data.flags == dpkt.tcp.TH_SYN and syn.data.data.seq == 99
    tagged = dpkt.ethernet.Ethernet(plan.rows[2, :plan.lengths[2]].tobytes())
    assert tagged.type == dpkt.ethernet.ETH_TYPE_IP and tagged.data.data.data == b"b" * 50
    rw = load_pcap(str(p), INFO, rewrite=True, dst=":9000")
    f = dpkt.ethernet.Ethernet(rw.rows[1, :rw.lengths[1]].tobytes())
    assert f.dst == INFO.mac and f.data.dst == socket.inet_aton(INFO.addr)
    assert bytes(dpkt.ip.IP(bytes(f.data))) == bytes(f.data)
    # Paced replay: nothing is due before its time.
    src = PcapSource(1, INFO, str(p), speed=1.0)
    first = src.poll(now=5.0)
    assert first is not None and len(first) == 2  # the made-up SYN and the first segment
    src.commit(first, np.ones(2, bool))
    assert src.poll(now=5.0) is None  # the next one is due 2 ms later
    rest = src.poll(now=6.0)
    assert rest is not None and len(rest) == 3
    src.commit(rest, np.array([True, False, True]))  # a paused queue left one on the wire
    again = src.poll(now=6.0)
    assert again is not None and len(again) == 1 and not src.done
    src.commit(again, np.ones(1, bool))
    assert src.done and src.frames_sent == 5


def test_pcapng_and_pcap_give_the_same_frames(tmp_path: Path) -> None:
    ng = tmp_path / "kept.pcapng"
    with open(KEPT, "rb") as f, open(ng, "wb") as g:
        w = dpkt.pcapng.Writer(g)
        for ts, buf in dpkt.pcap.Reader(f):
            w.writepkt(buf, ts)
    a, b = load_pcap(str(KEPT), INFO), load_pcap(str(ng), INFO)
    assert np.array_equal(a.rows, b.rows) and np.array_equal(a.lengths, b.lengths)
    assert a.counts == b.counts and a.counts["syn_added"] == 0 and a.counts["no_fin"] == 0


def test_reader_rejects_bad_files_with_one_line(tmp_path: Path) -> None:
    for what, p in _bad_files(tmp_path).items():
        with pytest.raises(Misuse) as ei:
            load_pcap(str(p), INFO)
        msg = str(ei.value)
        assert str(p) in msg and "\n" not in msg, (what, msg)


def test_parse_dst() -> None:
    assert parse_dst("198.51.100.2:45004") == ("198.51.100.2", 45004)
    assert parse_dst("[2001:db8::2]:80") == ("2001:db8::2", 80)
    assert parse_dst(":80") == (None, 80)
    assert parse_dst("2001:db8::2") == ("2001:db8::2", None)
    for bad in ("x:y", ":0", "", "[::1"):
        with pytest.raises(Misuse):
            parse_dst(bad)


@pytest.mark.parametrize("snaplen", [262144, 60, 14])
def test_capture_records_every_frame_byte_exact(tmp_path: Path, snaplen: int) -> None:
    """The batch-built pcap records hold each taken frame's wire bytes (headers, payload,
    zero padding) cut at the snaplen, with the original length, in order (pure logic)."""
    from nic_proc.capture import Capture
    from nic_proc.dma import Frames

    rng = np.random.default_rng(5)
    n = 40
    hdr_len = rng.integers(14, 80, n)
    pay_len = rng.integers(0, 300, n)
    pay_len[::7] = 0  # pure ACKs
    frame_len = np.maximum(hdr_len + pay_len, 60)  # Ethernet pads short frames with zeros
    hdr = rng.integers(0, 256, (n, 96), dtype=np.uint8)  # bytes past hdr_len are garbage
    pay = rng.integers(0, 256, (n, 320), dtype=np.uint8)
    frames = Frames(hdr=hdr, hdr_len=hdr_len, pay=pay, pay_len=pay_len, frame_len=frame_len,
                    flow=np.zeros(n, np.intp), flows=None)  # type: ignore[arg-type]
    taken = rng.random(n) < 0.7
    path = tmp_path / "c.pcap"
    cap = Capture(1, "eth0", str(path), snaplen=snaplen)
    cap.record(frames, taken, None)
    cap.close()
    want = [frames.frame_bytes(i) for i in np.flatnonzero(taken)]
    with path.open("rb") as f:
        got = [(bytes(buf), len(buf)) for _ts, buf in dpkt.pcap.Reader(f)]
    assert [g for g, _ in got] == [w[:snaplen] for w in want]
    # the original lengths, from the record headers
    data = path.read_bytes()
    pos, orig = 24, []
    while pos < len(data):
        incl, olen = struct.unpack_from("<II", data, pos + 8)
        orig.append(olen)
        pos += 16 + incl
    assert orig == [len(w) for w in want]
    assert cap.frames == len(want) and cap.bytes == sum(len(w) for w in want)
