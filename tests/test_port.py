"""The real port (nic_proc.port, launch.port): a netdev's wire plugged into a Linux TAP.

The first half drives :class:`TapPort` over a SOCK_SEQPACKET socket pair (whole frames per
read and write, like a TAP fd), so it runs anywhere: the spec grammar, seeded impairment
counters that add up, pause (frames held, the port stops reading) against drop (the NIC
counts ``rx_missed``), and transmit.  The second half needs root (a network namespace, a
TAP device, AF_PACKET): ``zcrx up --netdev eth0:port=tap``, frames sent from the peer
namespace delivered byte-exact to an app, and nothing left behind after ``zcrx down`` or
``zcrx cleanup`` of a killed run.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import nic_proc.port as port_mod
from launch.port import netns_name
from nic_proc.device import Nic
from nic_proc.port import Impairment, TapPort
from nic_proc.sources import RawBatch, WireInfo
from shared import wire
from shared.errors import Misuse
from shared.nicif import QC, NetdevSpec, tap_ifname
from tests.e2e import nic_stats, topology, wait_app, zcrx
from tests.port_inject import frames as conn_frames
from tests.test_nic_proc import setup_queues, stat

# -- grammar ------------------------------------------------------------------------------


def test_port_spec_grammar_round_trips_and_rejects_nonsense() -> None:
    s = NetdevSpec.parse("eth1:port=tap,nobuf=drop,loss=1%,dup=0.5%,reorder=2%,delay=5ms,"
                         "tx-loss=3%,seed=7,neigh=arp")
    assert (s.port, s.pause, s.neigh, s.seed) == ("tap", False, "arp", 7)
    assert s.impairments == pytest.approx({"loss": 0.01, "dup": 0.005, "reorder": 0.02,
                                           "delay": 0.005, "tx_loss": 0.03})
    assert NetdevSpec.parse(s.format()) == s
    assert "nobuf=drop" in s.format()
    assert NetdevSpec.parse("eth0:pause=off").pause is False  # the old spelling still works
    assert NetdevSpec.parse("eth0:nobuf=pause").pause is True
    assert NetdevSpec.from_options("eth0", {"port": "tap", "nobuf": "drop"}).pause is False
    assert NetdevSpec.parse("eth0:port=tap,delay=200us").impairments["delay"] == \
        pytest.approx(200e-6)
    for bad in ("eth0:port=veth", "eth0:loss=1%", "eth0:port=tap,loss=120%", "eth0:tx_loss=1%",
                "eth0:port=tap,tx_loss=-1%",
                "eth0:port=tap,loss=x", "eth0:port=tap,delay=soon", "eth0:port=tap,delay=1h",
                "eth0:port=tap,neigh=guess", "eth0:nobuf=maybe"):
        with pytest.raises(Misuse):
            NetdevSpec.parse(bad)
    assert tap_ifname("zcrx-0a1b2c", 3) == "zcrx0a1b2ct3"
    assert len(tap_ifname("a-very-long-run-name-ffffffff", 7)) <= 15


# -- the port over a socket pair ----------------------------------------------------------


@pytest.fixture
def wire_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the port's end, the Linux side's end): a frame per send, like a TAP fd."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    yield a, b
    a.close()
    b.close()


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def numbered(n: int) -> list[bytes]:
    return [i.to_bytes(4, "big") + bytes(60) for i in range(n)]


def drain(p: TapPort, rounds: int = 64) -> list[int]:
    """Poll and commit everything; the frame numbers in delivery order."""
    got: list[int] = []
    for _ in range(rounds):
        b = p.poll()
        if b is None:
            continue
        assert isinstance(b, RawBatch)
        for o in b.offsets.tolist():
            got.append(int.from_bytes(b.buf[o:o + 4].tobytes(), "big"))
        p.commit(b, np.ones(len(b), bool))
    return got


def run_impaired(seed: int, pair: tuple[socket.socket, socket.socket], n: int = 2000
                 ) -> tuple[list[int], dict[str, int]]:
    a, b = pair
    p = TapPort(1, WireInfo(), a.fileno(), owns_fd=False,
                impair=Impairment(loss=0.05, dup=0.03, reorder=0.04, seed=seed))
    got: list[int] = []
    for i in range(0, n, 100):
        for f in numbered(n)[i:i + 100]:
            b.send(f)
        got += drain(p, 8)
    got += drain(p)
    return got, p.counters


def test_seeded_impairments_add_up_and_repeat(
        wire_pair: tuple[socket.socket, socket.socket]) -> None:
    n = 2000
    got, c = run_impaired(11, wire_pair, n)
    assert c["port_rx_frames"] == n
    assert c["port_rx_lost"] > 0 and c["port_rx_dup"] > 0 and c["port_rx_reordered"] > 0
    # Every frame read is delivered once, plus its duplicate, minus the lost ones.
    assert len(got) == n - c["port_rx_lost"] + c["port_rx_dup"] == c["port_rx_offered"]
    counts = np.bincount(got, minlength=n)
    assert int(np.count_nonzero(counts == 0)) == c["port_rx_lost"]
    assert int(np.count_nonzero(counts == 2)) == c["port_rx_dup"]
    assert counts.max() <= 2
    late = sum(1 for i in range(1, len(got)) if got[i] < got[i - 1])
    assert 0 < late <= c["port_rx_reordered"]
    # The same seed impairs the same frames the same way.
    again, c2 = run_impaired(11, wire_pair, n)
    assert again == got and c2 == c
    other, _ = run_impaired(12, wire_pair, n)
    assert other != got


def test_delay_holds_frames_until_their_time(
        wire_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = wire_pair
    clock = Clock()
    p = TapPort(1, WireInfo(), a.fileno(), owns_fd=False, clock=clock,
                impair=Impairment(delay=0.005))
    for f in numbered(10):
        b.send(f)
    assert p.poll() is None and p.pending  # read, held for 5 ms
    assert p.counters["port_rx_delayed"] == 10
    clock.t = 0.004
    assert p.poll() is None
    clock.t = 0.005
    assert drain(p) == list(range(10))  # a fixed delay keeps the order


def test_transmit_writes_whole_frames(wire_pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = wire_pair
    p = TapPort(1, WireInfo(), a.fileno(), owns_fd=False)
    fs = [bytes([i]) * (60 + i) for i in range(5)]
    assert p.transmit(fs) == 5
    lengths = np.array([len(f) for f in fs], np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    assert p.transmit(RawBatch(np.frombuffer(b"".join(fs), np.uint8), offsets, lengths)) == 5
    assert [b.recv(4096) for _ in range(10)] == fs + fs
    assert p.counters["port_tx_frames"] == 10
    assert p.counters["port_tx_bytes"] == 2 * sum(map(len, fs))
    assert isinstance(p, port_mod.TxSink)
    b.shutdown(socket.SHUT_RDWR)  # the far side refuses: the batch ends at the first frame
    assert p.transmit(fs) == 0 and p.counters["port_tx_dropped"] == 1


def test_tx_loss_drops_what_the_host_sends_seeded_and_leaves_rx_draws_alone(
        wire_pair: tuple[socket.socket, socket.socket]) -> None:
    """tx_loss: the frames it drops are counted, reported sent to the NIC (the wire lost
    them), never written; the same seed drops the same frames; the receive side's loss
    draws are the same with and without it."""
    a, b = wire_pair
    fs = [i.to_bytes(2, "big") * 40 for i in range(200)]
    lost_sets = []
    for _ in range(2):
        p = TapPort(1, WireInfo(), a.fileno(), owns_fd=False,
                    impair=Impairment(tx_loss=0.25, seed=7))
        assert p.transmit(fs) == 200
        got = [b.recv(4096) for _ in range(p.counters["port_tx_frames"])]
        assert p.counters["port_tx_frames"] + p.counters["port_tx_lost"] == 200
        assert 20 < p.counters["port_tx_lost"] < 80
        assert got == [f for f in fs if f in set(got)]  # in order, whole, no extras
        assert p.counters["port_tx_bytes"] == sum(map(len, got))
        lost_sets.append({f for f in fs if f not in set(got)})
    assert lost_sets[0] == lost_sets[1]
    assert p.counters["port_tx_lost_data"] == 0  # not TCP at all
    rx = [Impairment(loss=0.3, seed=7, tx_loss=t).rng.random(50) for t in (0.0, 0.5)]
    assert (rx[0] == rx[1]).all()


def test_tx_loss_counts_the_lost_segments_tcp_must_send_again(
        wire_pair: tuple[socket.socket, socket.socket]) -> None:
    """Of the frames tx_loss drops, those with payload, SYN or FIN are counted
    ``port_tx_lost_data`` (their sender must retransmit them); lost pure ACKs are not."""
    from driver_proc.tcp_output import build_tcp

    a, b = wire_pair
    info = WireInfo()
    syn_data_fin = conn_frames(info.addr, "10.0.0.2", 9000, 40000, bytes(20 * 1460), 1500,
                               info.mac, info.peer_mac)
    _, here = wire.addr16(info.addr)
    _, there = wire.addr16("10.0.0.2")
    acks = [build_tcp(info.mac, info.peer_mac, here, there, 9000, 40000, 1, 1000 + i,
                      wire.TCP_ACK, 512) for i in range(20)]
    assert len(syn_data_fin) == len(acks) + 2  # SYN, 20 data segments, FIN
    fs = [f for pair in zip(syn_data_fin, acks, strict=False) for f in pair]
    fs += syn_data_fin[len(acks):]
    p = TapPort(1, WireInfo(), a.fileno(), owns_fd=False,
                impair=Impairment(tx_loss=0.5, seed=3))
    assert p.transmit(fs) == len(fs)
    got = {b.recv(65536) for _ in range(p.counters["port_tx_frames"])}
    lost_segments = sum(f not in got for f in syn_data_fin)
    lost_acks = sum(f not in got for f in acks)
    assert lost_segments > 0 and lost_acks > 0
    assert p.counters["port_tx_lost"] == lost_segments + lost_acks
    assert p.counters["port_tx_lost_data"] == lost_segments


def tcp_frames(n: int, mtu: int = 4096) -> tuple[list[bytes], bytes]:
    """``n`` data segments of one connection to eth0 (10.0.0.1:9000), no SYN or FIN."""
    data = np.random.default_rng(5).integers(0, 256, n * wire.mss(wire.FAMILY_V4, mtu),
                                             dtype=np.uint8).tobytes()
    info = WireInfo()
    fr = conn_frames("10.0.0.2", info.addr, 40000, 9000, data, mtu, info.peer_mac, info.mac)
    return fr[1:-1], data


def nic_with_port(spec: str, fd: int) -> Nic:
    n = Nic([NetdevSpec.parse(spec)])
    n.add_port("eth0", os.dup(fd), "test")  # the port owns (and closes) its fd
    return n


@pytest.mark.parametrize("nobuf", ["pause", "drop"])
def test_a_queue_without_buffers_pauses_or_drops(
        nobuf: str, wire_pair: tuple[socket.socket, socket.socket], run_id: str) -> None:
    """16 buffers posted, 40 segments sent: pause keeps 24 in the port (nothing lost) until
    buffers come back; drop takes them all and counts 24 rx_missed."""

    a, b = wire_pair
    n = nic_with_port(f"eth0:queues=1,rx=16,nobuf={nobuf},port=tap", a.fileno())
    regions: list[Any] = []
    try:
        _, qs = setup_queues(n, run_id, regions, [0])
        port = n.dev("eth0").port
        assert port is not None
        segs, _ = tcp_frames(40)
        for f in segs:
            b.send(f)
        qs[0].post()
        for _ in range(10):
            n.step()
        got = qs[0].reap()
        assert len(got) == 16
        assert port.counters["port_rx_frames"] == 40
        if nobuf == "drop":
            assert stat(n, 0, "rx_missed") == stat(n, 0, "rx_dropped") == 24
            assert stat(n, 0, "rx_pause") == 0 and not port.pending
        else:
            assert stat(n, 0, "rx_missed") == 0 and stat(n, 0, "rx_pause") > 0
            assert len(port.ready) == 24 and n.starved
            for _ in range(10):  # the kernel returns and reposts buffers: the rest arrives
                qs[0].area.free.extend(qs[0].posted)
                qs[0].posted.clear()
                qs[0].post()
                n.step()
                got += qs[0].reap()
            assert len(got) == 40 and not port.pending
            assert stat(n, 0, "rx_packets") == 40
        assert int(n.stats[0, 0, QC["rx_bad_frame"]]) == 0
        rows = {r[0]: r[1] for r in n.stats_list(n.dev("eth0"))}
        assert rows["port_rx_frames"] == 40
    finally:
        n.close()
        for r in regions:
            r.close()


def test_a_full_port_stops_reading(wire_pair: tuple[socket.socket, socket.socket],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Pause: once MAX_PENDING frames wait for a paused queue the port reads nothing more
    (so the TAP's own queue fills and Linux drops there) and leaves its fd out of the
    loop's poll; the NIC loop does not count the port as active work."""
    monkeypatch.setattr(port_mod, "MAX_PENDING", 8)
    a, b = wire_pair
    n = nic_with_port("eth0:queues=1,port=tap", a.fileno())
    try:
        n.queue_stop("eth0", 0)  # never started: its frames are dropped (rx_queue_stopped)
        port = n.dev("eth0").port
        assert port is not None
        assert not n.active and len(n.port_fds()) == 1
        for f in numbered(20):
            b.send(f)
        for _ in range(2):  # what a paused queue does: the NIC takes nothing
            batch = port.poll()
            assert batch is not None
            port.commit(batch, np.zeros(len(batch), bool))
        assert port.counters["port_rx_frames"] == 8 and port.full
        assert port.counters["port_pending_full"] == 1
        assert n.port_fds() == [] and n.active
    finally:
        n.close()


# -- root: a real TAP in a real namespace ----------------------------------------------


def _why_not_root() -> str | None:
    if os.geteuid() != 0:
        return "a TAP port needs root (network namespace, TAP device, AF_PACKET)"
    if not os.path.exists("/dev/net/tun"):
        return "a TAP port needs /dev/net/tun"
    if shutil.which("ip") is None:
        return "a TAP port needs the ip command (iproute2)"
    r = subprocess.run(["ip", "netns", "add", f"zcrxprobe{os.getpid()}"], capture_output=True)
    if r.returncode != 0:
        return "cannot create a network namespace here: " + r.stderr.decode().strip()
    subprocess.run(["ip", "netns", "del", f"zcrxprobe{os.getpid()}"], capture_output=True)
    return None


WHY_NOT = _why_not_root()
needs_root = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


def netns_exists(ns: str) -> bool:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return any(line.split()[0] == ns for line in out.splitlines() if line.strip())


def link_in(ns: str | None, ifname: str) -> bool:
    args = ["ip", *(["-n", ns] if ns else []), "link", "show", "dev", ifname]
    return subprocess.run(args, capture_output=True).returncode == 0


def link_addrs(ns: str, ifname: str) -> str:
    """`ip addr show` of a device that is up in ``ns`` ("" while it is down or missing)."""
    out = subprocess.run(["ip", "-n", ns, "addr", "show", "dev", ifname, "up"],
                         capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else ""


def test_port_without_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.e2e import runs_dir

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with runs_dir() as base:
        res = zcrx("up", "--name", "noroot", "--netdev", "eth0:port=tap", ok=False)
        assert res.exit_code != 0
        assert "port=tap needs root" in res.output and "Traceback" not in res.output
        assert not (base / "noroot").exists()


#: The injected connection's source: on the peer's link but not the peer's address, so
#: whatever the host answers (once its kernel transmits) is dropped by the peer's Linux
#: instead of answered with RSTs for a connection it never made.
INJECT_SRC = "10.0.0.3"


def inject(ns: str, ifname: str, dport: int, path: Path) -> int:
    """Send ``path`` as one connection's frames from the peer namespace; frames sent."""
    sent = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "tests.port_inject",
                           ifname, INJECT_SRC, "10.0.0.1", "40001", str(dport), str(path),
                           "4136"], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parent.parent)
    assert sent.returncode == 0, sent.stderr
    nframes, dropped = map(int, sent.stdout.split())
    assert dropped == 0, "Linux dropped frames at the TAP: the NIC did not read in time"
    return nframes


@needs_root
@pytest.mark.timeout(180)
@pytest.mark.parametrize("app", ["copy-server", "zcrx-server"])
def test_frames_from_the_namespace_reach_an_app_byte_exact(app: str, tmp_path: Path) -> None:
    """zcrx up with a TAP port: the namespace and device exist and are configured; a
    connection's frames sent from the namespace (AF_PACKET on the TAP) arrive through the
    NIC's generic path at a copy-server, or zero copy at a zcrx-server on a bound queue,
    sha256 equal; zcrx down removes everything."""
    data = np.random.default_rng(3).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    src = tmp_path / "random.bin"
    src.write_bytes(data)
    out_json = tmp_path / "app.json"
    with topology("tap1", "--netdev", "eth0:queues=2,mtu=4136,port=tap") as run:
        ns = netns_name(run.run_id)
        ifname = tap_ifname(run.run_id, 0)
        assert netns_exists(ns) and link_in(ns, ifname) and not link_in(None, ifname)
        addrs = subprocess.run(["ip", "-n", ns, "addr", "show", "dev", ifname],
                               capture_output=True, text=True).stdout
        assert "10.0.0.2/24" in addrs and "fd00::2/64" in addrs
        env = json.loads(zcrx("env", "--name", "tap1", "--json").output)
        assert env["ZCRX_NETNS"] == ns and f"ip netns exec {ns} nc 10.0.0.1" in env["reach"][0]
        assert f"ip netns exec {ns} nc" in zcrx("status", "--name", "tap1").output
        if app == "copy-server":
            zcrx("app", "run", "--name", "tap1", "--detach", "copy-server", "--",
                 "-p", "9100", "-n", "1", "--json", str(out_json))
        else:
            zcrx("ethtool", "--name", "tap1", "-N", "eth0", "flow-type", "tcp4",
                 "dst-port", "9100", "action", "1")
            zcrx("app", "run", "--name", "tap1", "--detach", "--cap-net-admin", "zcrx-server",
                 "--", "-p", "9100", "-i", "eth0", "-q", "1", "-n", "1", "--json",
                 str(out_json))
        nframes = inject(ns, ifname, 9100, src)
        wait_app("tap1", "app:0", 60)
        st = nic_stats("tap1")
        assert st["port_rx_frames"] >= nframes  # plus what the peer's stack sends (MLD)
        assert st["rx_packets"] >= nframes and st["rx_missed"] == 0
        if app == "zcrx-server":
            assert st["rx-1.packets"] >= nframes  # and whatever the peer answers to the host
    report = json.loads(out_json.read_text())
    assert report["ok"], report
    (conn,) = report["connections"]
    assert conn["bytes"] == len(data)
    assert conn["sha256"] == hashlib.sha256(data).hexdigest()
    assert conn["peer"].startswith(f"{INJECT_SRC}:")
    if app == "zcrx-server":
        assert report["copy_fallback"]["zc_bytes"] == len(data)
    assert not netns_exists(ns) and not link_in(None, ifname)


@needs_root
@pytest.mark.timeout(120)
def test_cleanup_of_a_killed_run_removes_namespace_and_device() -> None:
    from tests.e2e import runs_dir

    with runs_dir():
        zcrx("up", "--name", "tapk", "--netdev", "eth0:port=tap,nobuf=drop,loss=1%")
        from launch.run import Run

        run = Run.open("tapk")
        ns, ifname = netns_name(run.run_id), tap_ifname(run.run_id, 0)
        try:
            assert netns_exists(ns) and link_in(ns, ifname)
            zcrx("kill", "--name", "tapk", "kernel")
            zcrx("kill", "--name", "tapk", "nic")
            assert not link_in(ns, ifname)  # the device went with the NIC's fd
            assert netns_exists(ns)
        finally:
            res = zcrx("cleanup", "--name", "tapk")
        assert f"removed netns {ns}" in res.output
        assert not netns_exists(ns) and not link_in(None, ifname)


def udp_frame(src_mac: bytes, dst_mac: bytes, src: str, dst: str, dport: int,
              payload: bytes) -> bytes:
    """An Ethernet / IPv4 / UDP frame (UDP checksum 0: none, allowed over IPv4)."""
    udp = struct.pack("!HHHH", 40000, dport, 8 + len(payload), 0) + payload
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                               socket.inet_aton(src), socket.inet_aton(dst)))
    words = struct.unpack("!10H", bytes(ip))
    s = sum(words)
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    ip[10:12] = struct.pack("!H", ~s & 0xFFFF)
    return dst_mac + src_mac + b"\x08\x00" + bytes(ip) + udp


@needs_root
@pytest.mark.timeout(60)
def test_transmitted_frames_reach_a_socket_in_the_namespace() -> None:
    """The TX half through a real TAP: a frame the port transmits (a UDP datagram from the
    host's address) is received by a plain socket in the peer namespace, which
    launch.port set up (addresses, MAC, neighbour entries) exactly as for a run."""
    from launch import port as lport

    rid = f"tx-{os.getpid():x}"
    spec = NetdevSpec.parse("eth0:port=tap,neigh=static")
    ns = lport.create_netns(rid)
    fd = -1
    try:
        fd = port_mod.open_tap(tap_ifname(rid, 0))
        assert any("TAP" in line for line in lport.attach(rid, [spec]))
        neigh = subprocess.run(["ip", "-n", ns, "neigh", "show"], capture_output=True,
                               text=True).stdout
        assert "10.0.0.1 dev" in neigh and "02:00:00:00:00:01" in neigh
        p = TapPort(1, WireInfo(), fd, ifname=tap_ifname(rid, 0))
        fd = -1  # the port owns it now
        rcv = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c",
             "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
             "s.bind(('10.0.0.2', 9999)); s.settimeout(30); print(s.recv(100).decode())"],
            stdout=subprocess.PIPE, text=True)
        info = WireInfo()
        frame = udp_frame(info.mac, info.peer_mac, info.addr, "10.0.0.2", 9999, b"hello tap")
        out = ""
        try:
            for _ in range(600):  # until the receiver has bound and got one
                assert p.transmit([frame]) == 1
                try:
                    out, _ = rcv.communicate(timeout=0.05)
                    break
                except subprocess.TimeoutExpired:
                    continue
        finally:
            if rcv.poll() is None:
                rcv.kill()
                rcv.wait()
        assert out.strip() == "hello tap"
        assert p.counters["port_tx_frames"] >= 1 and p.counters["port_tx_dropped"] == 0
        p.close()
    finally:
        if fd >= 0:
            os.close(fd)
        assert f"netns {ns}" in lport.teardown([rid])
    assert not netns_exists(ns)


@needs_root
@pytest.mark.timeout(180)
def test_a_restarted_nic_gets_its_tap_back_in_the_namespace(tmp_path: Path) -> None:
    """zcrx up --foreground --restart nic: the dead NIC's TAP device went with it; the new
    NIC's is moved into the same namespace and configured, and frames flow again."""
    import time

    from launch.run import Run
    from tests.e2e import foreground_up, nic_reprobed, runs_dir

    data = np.random.default_rng(4).integers(0, 256, 256 << 10, dtype=np.uint8).tobytes()
    src = tmp_path / "random.bin"
    src.write_bytes(data)
    with runs_dir(), foreground_up("taprs", "--restart", "nic", "--netdev",
                                   "eth0:queues=2,mtu=4136,port=tap") as up:
        run = Run.open("taprs")
        ns, ifname = netns_name(run.run_id), tap_ifname(run.run_id, 0)
        nic0 = run.m.procs["nic"].pid
        zcrx("kill", "--name", "taprs", "nic")
        deadline = time.monotonic() + 30
        # Back means: a new NIC, its TAP in the namespace with its address and up, and
        # the kernel's re-probe done (frames before it would find no started queue).
        while not (Run.open("taprs").m.procs["nic"].pid != nic0 and link_in(ns, ifname)
                   and "10.0.0.2/24" in link_addrs(ns, ifname) and nic_reprobed("taprs")):
            assert time.monotonic() < deadline, "the NIC and its TAP did not come back"
            time.sleep(0.05)
        out_json = tmp_path / "copy.json"
        zcrx("app", "run", "--name", "taprs", "--detach", "copy-server", "--",
             "-p", "9100", "-n", "1", "--json", str(out_json))
        inject(ns, ifname, 9100, src)
        wait_app("taprs", "app:0", 60)
        (conn,) = json.loads(out_json.read_text())["connections"]
        assert conn["sha256"] == hashlib.sha256(data).hexdigest()
        zcrx("down", "--name", "taprs")
        assert up.wait(30) == 0
        assert not netns_exists(ns)
