"""Zero-copy receive end to end through real processes: NIC -> kernel -> zcrx-server.

The zero-copy issue's acceptance tests: a flow steered by an ntuple rule to the
bound queue arrives zero copy (no byte copied, every byte verified, every niov
home after close); a flow that lands on another queue, and linear frames on the
bound queue, arrive through the copy fallback, intact and counted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared import nicif  # noqa: F401  (registers nic.* messages)
from shared.control import ControlClient
from tests.e2e import stats, topology, wait_app, zcrx

PORT = 8000
ZC_QUEUE = 1
NETDEV = "eth0:queues=2,mtu=4136"  # 4096-byte TCP payloads, one niov each


def _serve(name: str, out: Path, size: int) -> None:
    zcrx("app", "run", "--name", name, "--detach", "--cap-net-admin", "zcrx-server", "--",
         "-p", str(PORT), "-i", "eth0", "-q", str(ZC_QUEUE), "-v", "-n", "1",
         "-s", str(size), "--json", str(out))


def _status(name: str) -> dict[str, Any]:
    return json.loads(zcrx("status", "--name", name, "--json").output)


def _assert_everything_home(name: str) -> None:
    """After the app exits: the ifq is destroyed (so no niov is out) and the queue runs
    on kernel pages again."""
    st = stats(name)["zcrx"]
    assert st["ifqs"] == [] and st["ledger"]["niovs"] == 0
    assert st["counters"]["destroyed"] == st["counters"]["registered"] == 1
    q = _status(name)["netdevs"][0]["rx_queues"][ZC_QUEUE]
    assert q["provider"] == "none" and not q["mp_draining"]


@pytest.mark.timeout(300)
def test_512mib_steered_to_the_bound_queue_arrive_zero_copy(tmp_path: Path) -> None:
    size = 512 << 20
    out = tmp_path / "zc.json"
    with topology("zc1", "--netdev", NETDEV):
        zcrx("ethtool", "--name", "zc1", "-N", "eth0", "flow-type", "tcp4",
             "dst-port", str(PORT), "action", str(ZC_QUEUE))
        _serve("zc1", out, size)
        q = _status("zc1")["netdevs"][0]["rx_queues"][ZC_QUEUE]
        assert q["provider"] == "io-uring"  # netlink queue-get would show io-uring
        zcrx("traffic", "--name", "zc1", "--flows", "1", "--port", str(PORT),
             "--bytes", str(size))
        wait_app("zc1", "app:0", 240)
        _assert_everything_home("zc1")
    rep = json.loads(out.read_text())
    assert rep["ok"], rep
    (conn,) = rep["connections"]
    assert conn["bytes"] == size and conn["bad_offset"] is None and conn["ok"]
    fb = rep["copy_fallback"]
    assert fb["count"] == 0 and fb["bytes"] == 0
    assert fb["zc_bytes"] == size
    assert rep["app"]["copy_bytes"] == 0 and rep["app"]["read_bytes"] == size
    # One RQE per CQE came back, and the kernel never saw a bad one.
    c = fb["counters"]
    assert rep["zcrx"]["rqes_returned"] == c["zc_cqes"]
    assert c["rq_invalid"] == 0 and c["rq_head_tampered"] == 0


@pytest.mark.timeout(300)
def test_flow_on_another_queue_arrives_through_the_copy_fallback(tmp_path: Path) -> None:
    size = 64 << 20
    out = tmp_path / "fb.json"
    with topology("zc2", "--netdev", NETDEV):
        # RSS sends everything to queue 0; no rule steers the flow to the bound queue.
        zcrx("ethtool", "--name", "zc2", "-X", "eth0", "equal", "1")
        _serve("zc2", out, size)
        zcrx("traffic", "--name", "zc2", "--flows", "1", "--port", str(PORT),
             "--bytes", str(size))
        wait_app("zc2", "app:0", 240)
        _assert_everything_home("zc2")
    rep = json.loads(out.read_text())
    assert rep["ok"], rep
    (conn,) = rep["connections"]
    assert conn["bytes"] == size and conn["bad_offset"] is None
    fb = rep["copy_fallback"]
    assert fb["bytes"] == size and fb["count"] >= size // 4096
    assert fb["zc_bytes"] == 0


@pytest.mark.timeout(300)
def test_linear_frames_on_the_bound_queue_are_copied_intact(tmp_path: Path) -> None:
    """tcp-data-split off on the bound queue.  Linux refuses to turn it off while a
    memory provider is bound, and so do we; a device that stops splitting anyway
    (here: told directly, behind the driver's back) must still deliver intact data
    through the copy fallback."""
    size = 64 << 20
    out = tmp_path / "lin.json"
    with topology("zc3", "--netdev", NETDEV) as run:
        zcrx("ethtool", "--name", "zc3", "-N", "eth0", "flow-type", "tcp4",
             "dst-port", str(PORT), "action", str(ZC_QUEUE))
        _serve("zc3", out, size)
        res = zcrx("ethtool", "--name", "zc3", "-G", "eth0", "tcp-data-split", "off", ok=False)
        assert res.exit_code == 3 and "Invalid argument" in res.output
        with ControlClient(run.endpoint("nic"), timeout_ms=10_000) as nic:
            nic.call("nic.ethtool", {"dev": "eth0", "request": {
                "cmd": "rings-set", "dev": "eth0", "tcp_data_split": "off"}})
        zcrx("traffic", "--name", "zc3", "--flows", "1", "--port", str(PORT),
             "--bytes", str(size))
        wait_app("zc3", "app:0", 240)
        nic_linear = {k: v for k, v in stats("zc3")["netdevs"]["eth0"][f"rx-{ZC_QUEUE}"]
                      .items() if k == "rx_linear"}
        _assert_everything_home("zc3")
    rep = json.loads(out.read_text())
    assert rep["ok"], rep
    (conn,) = rep["connections"]
    assert conn["bytes"] == size and conn["bad_offset"] is None
    fb = rep["copy_fallback"]
    assert fb["bytes"] == size and fb["zc_bytes"] == 0
    assert nic_linear["rx_linear"] >= size // 4096
