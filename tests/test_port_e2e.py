"""A real Linux TCP sender through a TAP port into a zero-copy queue (issue 13 end to end).

``nc`` in the run's peer namespace connects to the emulated host (which answers ARP / NDP,
SYN-ACKs and ACKs: the kernel's transmit side), sends a file, and ``zcrx-server`` on queue
1 (an ntuple rule steers the port there) receives it zero copy; the sha256 of what arrived
is the file's.  With 1 % loss at the port and ``nobuf=drop`` a 64 MiB transfer still arrives
byte-exact, recovered by Linux's retransmissions (counted in the peer namespace's own
``/proc/net/snmp``) while the host sees the gaps (a duplicate ACK per out-of-order
segment).  An app that stops returning its buffers (SIGSTOP) closes the advertised window;
the sender waits and finishes once the app runs again.  Root only; every step bounded.

iperf3 against a zero-copy queue is tests/test_iperf3_e2e.py (zcrx-server --iperf3).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from launch.port import netns_name
from tests.e2e import nic_stats, stats, topology, wait_app, zcrx
from tests.test_port import WHY_NOT

PORT = 8000


def _why_not() -> str | None:
    if WHY_NOT is not None:
        return WHY_NOT
    if shutil.which("nc") is None:
        return "netcat (nc) is not installed"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")


def random_file(path: Path, size: int, seed: int) -> str:
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def serve(name: str, out: Path, *args: str, ipv6: bool = False) -> None:
    zcrx("ethtool", "--name", name, "-N", "eth0", "flow-type", "tcp6" if ipv6 else "tcp4",
         "dst-port", str(PORT), "action", "1")
    zcrx("app", "run", "--name", name, "--detach", "--cap-net-admin", "zcrx-server", "--",
         "-p", str(PORT), *(("-a", "::") if ipv6 else ()), "-i", "eth0", "-q", "1",
         "-n", "1", "--json", str(out), *args)


def nc(ns: str, host: str, src: Path, timeout: float) -> subprocess.Popen[bytes]:
    with open(src, "rb") as f:
        return subprocess.Popen(["ip", "netns", "exec", ns, "nc", "-N", host, str(PORT)],
                                stdin=f, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(p: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        _, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err


def snmp_tcp(ns: str) -> dict[str, int]:
    out = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"],
                         capture_output=True, text=True, timeout=10).stdout
    rows = [line.split()[1:] for line in out.splitlines() if line.startswith("Tcp:")]
    return {k: int(v) for k, v in zip(rows[0], rows[1], strict=False)}


def received(out: Path) -> dict[str, Any]:
    rep = json.loads(out.read_text())
    assert rep["ok"], rep
    (conn,) = rep["connections"]
    return {**conn, "zc_bytes": rep["copy_fallback"]["zc_bytes"]}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_nc_into_a_zero_copy_queue_byte_exact(ipv6: bool, tmp_path: Path) -> None:
    """No static neighbour entries: the peer resolves the host with ARP / NDP."""
    size = 16 << 20
    want = random_file(tmp_path / "f.bin", size, 1)
    out = tmp_path / "zs.json"
    with topology("e2e1", "--netdev", "eth0:queues=2,mtu=4136,port=tap,neigh=arp") as run:
        ns = netns_name(run.run_id)
        serve("e2e1", out, ipv6=ipv6)
        finish(nc(ns, "fd00::1" if ipv6 else "10.0.0.1", tmp_path / "f.bin", 120), 120)
        wait_app("e2e1", "app:0", 60)
        st = nic_stats("e2e1")
        assert st["port_tx_frames"] > 0 and st["rx-1.packets"] >= size // 4096
    conn = received(out)
    assert conn["bytes"] == size and conn["sha256"] == want
    assert conn["zc_bytes"] == size
    assert conn["peer"].startswith("fd00::2" if ipv6 else "10.0.0.2:")


@pytest.mark.timeout(600)
def test_64mib_with_1pct_loss_in_drop_mode_arrives_byte_exact(tmp_path: Path) -> None:
    size = 64 << 20
    want = random_file(tmp_path / "f.bin", size, 2)
    out = tmp_path / "zs.json"
    spec = "eth0:queues=2,mtu=4136,port=tap,nobuf=drop,loss=1%,seed=7"
    with topology("e2e2", "--netdev", spec) as run:
        ns = netns_name(run.run_id)
        serve("e2e2", out)
        before = snmp_tcp(ns)
        finish(nc(ns, "10.0.0.1", tmp_path / "f.bin", 500), 500)
        wait_app("e2e2", "app:0", 60)
        retrans = snmp_tcp(ns)["RetransSegs"] - before["RetransSegs"]
        st = nic_stats("e2e2")
        mib = stats("e2e2")["tcp_mib"]
    conn = received(out)
    assert conn["bytes"] == size and conn["sha256"] == want
    lost = st["port_rx_lost"]
    assert lost > 0 and st["port_rx_frames"] > size // 4096
    assert retrans >= 1  # Linux resent what the port lost (and what the NIC dropped)
    # The host saw the holes: a duplicate ACK for every segment past one.
    assert mib["TcpExtTCPDupAcksSent"] > 0
    print(f"64 MiB at 1% loss: port lost {lost}, rx_missed {st['rx_missed']}, sender "
          f"retransmitted {retrans}, host dup ACKs {mib['TcpExtTCPDupAcksSent']}")


@pytest.mark.timeout(300)
def test_an_app_that_holds_its_buffers_closes_the_window(tmp_path: Path) -> None:
    """zcrx-server with an 8 MiB area is stopped (SIGSTOP) while nc sends 32 MiB: it
    returns no buffer, the window the host advertises closes and the sender waits (nc does
    not finish); after SIGCONT the window reopens and every byte arrives."""
    size = 32 << 20
    want = random_file(tmp_path / "f.bin", size, 3)
    out = tmp_path / "zs.json"
    with topology("e2e3", "--netdev", "eth0:queues=2,mtu=4136,port=tap") as run:
        ns = netns_name(run.run_id)
        serve("e2e3", out, "-S", str(8 << 20))
        zcrx("kill", "--name", "e2e3", "--signal", "STOP", "app:0")
        p = nc(ns, "10.0.0.1", tmp_path / "f.bin", 240)
        try:
            deadline = time.monotonic() + 120
            while stats("e2e3").get("tcp_mib", {}).get("TcpExtTCPToZeroWindowAdv", 0) < 1:
                assert time.monotonic() < deadline, "the window never closed"
                assert p.poll() is None, "nc finished against a stopped app"
                time.sleep(0.1)
            assert p.poll() is None
        finally:
            zcrx("kill", "--name", "e2e3", "--signal", "CONT", "app:0")
        finish(p, 240)
        wait_app("e2e3", "app:0", 60)
        mib = stats("e2e3")["tcp_mib"]
        assert mib["TcpExtTCPFromZeroWindowAdv"] + mib.get("TcpExtTCPWindowUpdates", 0) >= 1
    conn = received(out)
    assert conn["bytes"] == size and conn["sha256"] == want
