"""An unmodified iperf3 client against zcrx-server --iperf3 on a zero-copy queue.

``iperf3 -c`` in the run's peer namespace reaches the emulated host through a TAP port;
zcrx-server's iperf3 mode (app_proc/iperf3.py) talks iperf3's control protocol over a
connection it reads with RECV and writes with SEND (the kernel's TCP transmits what the app
sends: driver_proc/tcp_output.py) and receives the data streams zero copy on queue 1 (an
ntuple rule steers the port there).  Checked: the client exits 0 with no error in its JSON,
its ``end.sum_sent.bytes`` equals ``end.sum_received.bytes`` (what the server reported), the
server's own count and the kernel's zero-copy byte count; the queue's ledger is whole and
nothing is left behind.  With 1 % loss at the port in drop mode the same holds and both
sides saw retransmissions.  Root only; every step bounded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from launch.port import netns_name
from tests.e2e import nic_stats, runs_dir, stats, topology, wait_app, zcrx
from tests.test_port import WHY_NOT

PORT = 5201


def _why_not() -> str | None:
    if WHY_NOT is not None:
        return WHY_NOT
    if shutil.which("iperf3") is None:
        return "iperf3 is not installed"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")


def serve(name: str, out: Path, tests: int = 1) -> None:
    zcrx("ethtool", "--name", name, "-N", "eth0", "flow-type", "tcp4", "dst-port", str(PORT),
         "action", "1")
    zcrx("app", "run", "--name", name, "--detach", "--cap-net-admin", "zcrx-server", "--",
         "--iperf3", "-p", str(PORT), "-i", "eth0", "-q", "1", "-n", str(tests),
         "--json", str(out))


def iperf3(ns: str, *args: str, timeout: float) -> tuple[int, dict[str, Any]]:
    p = subprocess.run(["ip", "netns", "exec", ns, "iperf3", "-c", "10.0.0.1", "-p",
                        str(PORT), "-J", *args], capture_output=True, text=True,
                       timeout=timeout)
    try:
        rep = json.loads(p.stdout)
    except ValueError:
        raise AssertionError(f"iperf3 said: {p.stdout[-2000:]} {p.stderr[-2000:]}") from None
    return p.returncode, rep


def all_home(name: str) -> None:
    """After the server exited: its ifq destroyed, every niov home, no skb in flight."""
    s = stats(name)
    z = s["zcrx"]
    assert z["ifqs"] == [] and z["ledger"]["niovs"] == 0, z["ledger"]
    assert z["counters"]["destroyed"] == z["counters"]["registered"] == 1
    assert s["skbs"]["in_flight"] == 0


def check(code: int, rep: dict[str, Any], out: Path, streams: int) -> dict[str, Any]:
    assert code == 0 and "error" not in rep, rep.get("error")
    end = rep["end"]
    sent, got = end["sum_sent"]["bytes"], end["sum_received"]["bytes"]
    assert sent == got > 0
    srv = json.loads(out.read_text())
    assert srv["ok"], srv["errors"]
    (test,) = srv["iperf3"]
    assert test["status"] == "done" and len(test["streams"]) == streams
    assert test["bytes"] == test["client_sent"] == got
    assert srv["copy_fallback"]["zc_bytes"] == got  # every data byte came zero copy
    assert srv["copy_fallback"]["bytes"] == 0
    assert len(srv["connections"]) == streams and all(c["ok"] for c in srv["connections"])
    return srv


@pytest.mark.timeout(300)
def test_iperf3_client_against_a_zero_copy_queue(tmp_path: Path) -> None:
    with topology("ip1", "--netdev", "eth0:queues=2,mtu=4136,port=tap") as run:
        ns = netns_name(run.run_id)
        out = tmp_path / "srv.json"
        serve("ip1", out)
        code, rep = iperf3(ns, "-n", "16M", timeout=180)
        wait_app("ip1", "app:0", 60)
        mib = stats("ip1")["tcp_mib"]
        all_home("ip1")
        srv = check(code, rep, out, 1)
        assert rep["end"]["sum_sent"]["bytes"] >= 16 << 20  # whole blocks: maybe one more
        assert mib["TcpOutSegs"] > 0
        print(f"iperf3 -n 16M: {rep['end']['sum_received']['bits_per_second'] / 8e9:.3f} GB/s"
              f", sender retransmits {rep['end']['sum_sent'].get('retransmits')}, server "
              f"{srv['bytes']} bytes zero copy")


@pytest.mark.timeout(300)
def test_iperf3_parallel_streams_for_a_time_and_refused_modes(tmp_path: Path) -> None:
    with topology("ip2", "--netdev", "eth0:queues=2,mtu=4136,port=tap") as run:
        ns = netns_name(run.run_id)
        out = tmp_path / "srv.json"
        serve("ip2", out, tests=2)
        code, rep = iperf3(ns, "-R", "-n", "1M", timeout=60)
        assert "not implemented" in rep.get("error", ""), rep.get("error")
        code, rep = iperf3(ns, "-P", "3", "-t", "2", timeout=180)
        wait_app("ip2", "app:0", 60)
        all_home("ip2")
        assert code == 0 and "error" not in rep, rep.get("error")
        end = rep["end"]
        assert end["sum_sent"]["bytes"] == end["sum_received"]["bytes"] > 0
        srv = json.loads(out.read_text())
        assert srv["ok"], srv["errors"]
        refused, test = srv["iperf3"]
        assert refused["status"] == "refused" and test["status"] == "done"
        assert [s["id"] for s in test["streams"]] == [1, 3, 4]
        assert test["bytes"] == end["sum_received"]["bytes"] == srv["copy_fallback"][
            "zc_bytes"]


def impaired(name: str, impair: str, size: str, tmp_path: Path, timeout: float,
             settled: Callable[[dict[str, int], dict[str, int]], bool] | None = None
             ) -> tuple[dict[str, Any], dict[str, int], dict[str, int]]:
    """One ``iperf3 -n size`` through a port with ``impair`` options, checked as every test
    here is; returns the client's JSON, the NIC's counters and the host's TCP MIB, read
    once ``settled(counters, mib)`` holds (or after 30 s: the caller's asserts then say
    what did not happen)."""
    spec = f"eth0:queues=2,mtu=4136,port=tap,{impair}"
    with topology(name, "--netdev", spec) as run:
        out = tmp_path / "srv.json"
        serve(name, out)
        code, rep = iperf3(netns_name(run.run_id), "-n", size, timeout=timeout)
        wait_app(name, "app:0", 120)
        deadline = time.monotonic() + 30
        while True:
            st = nic_stats(name)
            mib = stats(name)["tcp_mib"]
            if settled is None or settled(st, mib) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        all_home(name)
        check(code, rep, out, 1)
    return rep, st, mib


@pytest.mark.timeout(600)
def test_iperf3_with_1pct_loss_in_drop_mode(tmp_path: Path) -> None:
    rep, st, mib = impaired("ip3", "nobuf=drop,loss=1%,seed=11", "16M", tmp_path, 500)
    assert st["port_rx_lost"] > 0
    retrans = rep["end"]["sum_sent"]["retransmits"]
    assert retrans > 0  # the client resent what the port lost
    assert mib["TcpExtTCPDupAcksSent"] > 0  # the host saw the holes
    print(f"iperf3 -n 16M at 1% loss: port lost {st['port_rx_lost']}, rx_missed "
          f"{st.get('rx_missed')}, client retransmits {retrans}, host dup ACKs "
          f"{mib['TcpExtTCPDupAcksSent']}, "
          f"{rep['end']['sum_received']['bits_per_second'] / 8e9:.3f} GB/s")


@pytest.mark.timeout(300)
def test_bench_wire_has_an_iperf3_line() -> None:
    with runs_dir():
        res = zcrx("bench", "wire", "--client", "iperf3", "--bytes", str(4 << 20), "--json")
    r = json.loads(res.output)
    assert r["ok"] and r["client"] == "iperf3" and r["error"] is None
    assert r["sent"] == r["received"] == r["zc_bytes"] >= 4 << 20
    assert r["gbps"] > 0 and r["retransmits"] >= 0


@pytest.mark.timeout(400)
def test_iperf3_when_the_port_loses_a_third_of_what_the_host_sends(tmp_path: Path) -> None:
    """tx_loss=33%: a third of the host's frames never reach Linux: ACKs, SYN-ACKs, the
    segments zcrx-server sends on the control connection, FINs.  The host's retransmission
    gets its segments through, the sender copes with the lost ACKs, and the test completes
    with every byte zero copy.  When a lost frame carried data, a SYN or a FIN (the port
    counts them, ``port_tx_lost_data``) the host retransmitted (one retransmission may
    carry several lost segments' bytes; a lost last FIN is resent after its timeout, which
    the test waits for)."""
    def resent(st: dict[str, int], mib: dict[str, int]) -> bool:
        return not st["port_tx_lost_data"] or mib.get("TcpRetransSegs", 0) > 0

    _, st, mib = impaired("ip4", "tx_loss=33%,seed=5", "1M", tmp_path, 300, resent)
    assert st["port_tx_lost"] > 0 and st["port_tx_frames"] > 0
    assert resent(st, mib)
    print(f"iperf3 -n 1M, tx_loss 33%: port lost {st['port_tx_lost']} of "
          f"{st['port_tx_lost'] + st['port_tx_frames']} host frames, "
          f"{st['port_tx_lost_data']} of them segments to resend; host retransmitted "
          f"{mib.get('TcpRetransSegs', 0)}")
