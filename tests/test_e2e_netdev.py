"""End to end through real processes: generator or netcat -> NIC -> kernel -> copy-server.

These are the netdev issue's acceptance tests: a user brings up a host with
`zcrx up`, steers flows with `zcrx ethtool`, runs the copy server and pushes real
bytes; every byte is verified and the per-queue counters add up.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from nic_proc.ntuple import Steering
from nic_proc.rss import Flows
from tests.e2e import nic_stats, stats, topology, wait_app, zcrx

PORT = 8000
FLOWS = 4
PER_FLOW = 64 << 20  # 4 x 64 MiB = 256 MiB


def _rss_spread(n_queues: int = 4) -> tuple[int, int]:
    """A first source port such that RSS alone puts flows 0..2 on three different
    queues, and the queue left over, which flow 3 gets through an ntuple rule.

    Flows come from 10.0.0.2 to 10.0.0.1:PORT with consecutive source ports (the
    generator's convention).  The hash is the emulated NIC's own (Toeplitz, default
    key, indirection table i % n), so the choice is deterministic.
    """
    steer = Steering(n_queues)
    for base in range(20000, 40000):
        sports = np.arange(base, base + FLOWS - 1)
        flows = Flows.v4(np.tile([10, 0, 0, 2], (len(sports), 1)),
                         np.tile([10, 0, 0, 1], (len(sports), 1)), sports,
                         np.full(len(sports), PORT))
        queues = set(steer.queue_for(flows).tolist())
        if len(queues) == FLOWS - 1:
            (left,) = set(range(n_queues)) - queues
            return base, left
    raise AssertionError("no source port base spreads the flows")


@pytest.mark.timeout(300)
def test_four_flows_256mib_spread_by_rss_and_ntuple_copy_server_verifies(tmp_path: Path
                                                                          ) -> None:
    base, last_queue = _rss_spread()
    out_json = tmp_path / "copy.json"
    with topology("rss4", "--queues", "4"):
        res = zcrx("ethtool", "--name", "rss4", "-N", "eth0", "flow-type", "tcp4",
                   "src-port", str(base + 3), "dst-port", str(PORT), "action",
                   str(last_queue))
        assert "Added rule with ID" in res.output
        zcrx("app", "run", "--name", "rss4", "--detach", "copy-server", "--",
             "-p", str(PORT), "-v", "-n", str(FLOWS), "-s", str(PER_FLOW),
             "--json", str(out_json))
        zcrx("traffic", "--name", "rss4", "--flows", str(FLOWS), "--port", str(PORT),
             "--sport", str(base), "--bytes", str(PER_FLOW))
        wait_app("rss4", "app:0", 240)
        report = json.loads(out_json.read_text())
        st = stats("rss4")
        nic = nic_stats("rss4")

    # The application's view: every byte of every flow verified against the pattern.
    assert report["ok"], report
    assert len(report["connections"]) == FLOWS
    assert sorted(c["stream"] for c in report["connections"]) == list(range(base, base + FLOWS))
    assert all(c["ok"] and c["bytes"] == PER_FLOW for c in report["connections"])
    assert report["bytes"] == FLOWS * PER_FLOW

    # The NIC's view: each queue got exactly one flow; per-queue counters add up.
    per_q = [nic[f"rx-{q}.packets"] for q in range(4)]
    assert all(p > 0 for p in per_q), per_q
    assert sum(per_q) == nic["rx_packets"]
    assert nic["rx_dropped"] == 0
    # Frames carry 4 x 64 MiB of payload plus one SYN and one FIN per flow.
    mss_frames = [nic[f"rx-{q}.packets"] for q in range(4)]
    assert max(mss_frames) - min(mss_frames) <= 1

    # The kernel's view: what NAPI completed is what the NIC completed, queue by queue.
    drv = st["netdevs"]["eth0"]
    for q in range(4):
        assert drv[f"rx-{q}"]["rx_packets"] == nic[f"rx-{q}.packets"]
        assert drv[f"rx-{q}"]["bad_completions"] == 0
    assert st["tcp"]["connections"] == FLOWS
    assert st["tcp"]["no_socket"] == 0


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("nc") is None, reason="netcat (nc) is not installed")
def test_netcat_64mib_random_file_through_the_wire_gateway(tmp_path: Path) -> None:
    data = np.random.default_rng(7).integers(0, 256, 64 << 20, dtype=np.uint8).tobytes()
    src = tmp_path / "random.bin"
    src.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    out_json = tmp_path / "copy.json"
    received = tmp_path / "received.bin"
    with socket.socket() as probe:  # a free loopback port for the gateway
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with topology("wire1", "--queues", "2"):
        # The gateway's flows go to its own port number, so the app listens on it.
        zcrx("app", "run", "--name", "wire1", "--detach", "copy-server", "--",
             "-p", str(port), "-n", "1", "-o", str(received), "--json", str(out_json))
        res = zcrx("wire", "--name", "wire1", "--port", str(port))
        assert f"127.0.0.1:{port}" in res.output
        with open(src, "rb") as f:
            nc = subprocess.run(["nc", "-N", "127.0.0.1", str(port)], stdin=f,
                                timeout=120, check=False)
        assert nc.returncode == 0
        wait_app("wire1", "app:0", 120)
    report = json.loads(out_json.read_text())
    assert report["ok"], report
    (conn,) = report["connections"]
    assert conn["bytes"] == len(data)
    assert conn["sha256"] == want
    assert conn["peer"].startswith("127.0.0.1:")
    assert hashlib.sha256(received.read_bytes()).hexdigest() == want
    os.unlink(received)
