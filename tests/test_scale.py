"""Scaling queue counts: channel changes under a bound queue, re-binding after an app's
death, and a smoke run of ``zcrx bench scale``.

Real processes (NIC + kernel + zcrx-server) driven through the CLI (:mod:`tests.e2e`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from shared import nicif  # noqa: F401  (registers nic.* messages)
from tests.e2e import stats, topology, wait_app, zcrx

PORT = 8000
ZC_QUEUE = 1
NETDEV = "eth0:queues=2,mtu=4136"  # 4096-byte TCP payloads, one niov each


def _status(name: str) -> dict[str, Any]:
    return json.loads(zcrx("status", "--name", name, "--json").output)


def _queues(name: str) -> list[dict[str, Any]]:
    q: list[dict[str, Any]] = _status(name)["netdevs"][0]["rx_queues"]
    return q


def _serve(name: str, out: Path, size: int, *extra: str) -> None:
    zcrx("app", "run", "--name", name, "--detach", "--cap-net-admin", "zcrx-server", "--",
         "-p", str(PORT), "-i", "eth0", "-q", str(ZC_QUEUE), "-v", "-n", "1",
         "-s", str(size), "-S", str(8 << 20), "--json", str(out), *extra)


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.timeout(120)
def test_channels_grow_and_shrink_around_a_bound_queue(tmp_path: Path) -> None:
    """``-L combined 16`` then ``combined 2`` while a zero-copy flow runs on queue 1: the
    flow stays byte exact and the queues grow and shrink; queue 1 keeps its provider."""
    size = 8 << 20
    out = tmp_path / "zc.json"
    with topology("sc1", "--netdev", NETDEV):
        zcrx("ethtool", "--name", "sc1", "-N", "eth0", "flow-type", "tcp4",
             "dst-port", str(PORT), "action", str(ZC_QUEUE))
        _serve("sc1", out, size)
        # Rate limited (about 4 s) so the flow is still running during the changes.
        zcrx("traffic", "--name", "sc1", "--flows", "1", "--port", str(PORT),
             "--bytes", str(size), "--rate", str(2 << 20))
        zcrx("ethtool", "--name", "sc1", "-L", "eth0", "combined", "16")
        qs = _queues("sc1")
        assert len(qs) == 16 and qs[ZC_QUEUE]["provider"] == "io-uring"
        zcrx("ethtool", "--name", "sc1", "-L", "eth0", "combined", "2")
        qs = _queues("sc1")
        assert len(qs) == 2 and qs[ZC_QUEUE]["provider"] == "io-uring"
        wait_app("sc1", "app:0", 60)
        st = stats("sc1")["zcrx"]
        assert st["ifqs"] == [] and st["ledger"]["niovs"] == 0
    rep = json.loads(out.read_text())
    assert rep["ok"], rep
    (conn,) = rep["connections"]
    assert conn["bytes"] == size and conn["bad_offset"] is None and conn["ok"]
    assert rep["copy_fallback"]["zc_bytes"] == size


@pytest.mark.timeout(60)
def test_shrinking_below_a_bound_queue_is_refused(tmp_path: Path) -> None:
    """``-L combined 1`` while queue 1 has a memory provider: refused (EINVAL), and the
    queue keeps its provider (no ntuple rule here: the NIC has no reason of its own)."""
    with topology("sc3", "--netdev", NETDEV):
        _serve("sc3", tmp_path / "zc.json", 1 << 20)
        res = zcrx("ethtool", "--name", "sc3", "-L", "eth0", "combined", "1", ok=False)
        qs = _queues("sc3")
        assert res.exit_code == 3 and "Invalid argument" in res.output, res.output
        assert len(qs) == 2 and qs[ZC_QUEUE]["provider"] == "io-uring"


def _rebind(name: str, out: Path, ok: bool) -> Any:
    return zcrx("app", "run", "--name", name, "--detach", "--cap-net-admin", "zcrx-server", "--",
                "-p", str(PORT), "-i", "eth0", "-q", str(ZC_QUEUE), "-n", "1",
                "-S", str(8 << 20), "--json", str(out), ok=ok)


@pytest.mark.timeout(120)
def test_rebinding_after_sigkill_is_eexist_while_niovs_drain(tmp_path: Path) -> None:
    """The zcrx app is SIGKILLed while another (stopped) app's socket holds unread data that
    landed zero copy on the bound queue: those skbs keep niovs of the dead ifq, so its pool
    stays alive, the queue counts as bound and re-binding is ``-EEXIST``.  Once that app
    reads its data (copied out of the niovs) the niovs come home and binding succeeds."""
    hold_port, hold_size = PORT + 1, 256 << 10
    out_hold = tmp_path / "hold.json"
    name = "sc2"
    with topology(name, "--netdev", NETDEV):
        # The holder's flow lands on the zero-copy queue too.
        zcrx("ethtool", "--name", name, "-N", "eth0", "flow-type", "tcp4",
             "dst-port", str(hold_port), "action", str(ZC_QUEUE))
        zcrx("app", "run", "--name", name, "--detach", "copy-server", "--",
             "-p", str(hold_port), "-v", "-n", "1", "-s", str(hold_size),
             "--json", str(out_hold))  # app:0
        _serve(name, tmp_path / "zc.json", 1 << 20)  # app:1: binds queue 1
        assert _queues(name)[ZC_QUEUE]["provider"] == "io-uring"
        zcrx("kill", "--name", name, "--signal", "STOP", "app:0")
        zcrx("traffic", "--name", name, "--flows", "1", "--port", str(hold_port),
             "--bytes", str(hold_size))
        # Wait until the holder's bytes are in its socket, in niovs of the ifq's area.
        _wait(lambda: stats(name)["zcrx"]["ledger"]["niovs"] > 0
              and nic_rx1(name) >= hold_size, 30, "the held data")
        zcrx("kill", "--name", name, "--signal", "KILL", "app:1")
        wait_app(name, "app:1", 30)
        # Scrubbed and restarted without the provider; delayed destruction waits for niovs.
        _wait(lambda: [i["state"] for i in stats(name)["zcrx"]["ifqs"]] == ["closing"], 30,
              "the ifq's teardown")
        q = _queues(name)[ZC_QUEUE]
        assert q["mp_draining"], q
        res = _rebind(name, tmp_path / "r1.json", ok=False)
        assert res.exit_code != 0, res.output
        log = Path(res.output.split("see ")[1].split()[0].rstrip(";")).read_text()
        assert "EEXIST" in log or "File exists" in log, log
        assert _queues(name)[ZC_QUEUE]["mp_draining"]
        # The holder reads: its bytes are copied out of the niovs, which come home.
        zcrx("kill", "--name", name, "--signal", "CONT", "app:0")
        wait_app(name, "app:0", 30)
        _wait(lambda: not _queues(name)[ZC_QUEUE]["mp_draining"], 30, "the drain")
        st = stats(name)["zcrx"]
        assert st["ledger"]["niovs"] == 0 and st["ifqs"] == [], st
        _rebind(name, tmp_path / "r2.json", ok=True)
        assert _queues(name)[ZC_QUEUE]["provider"] == "io-uring"
    rep = json.loads(out_hold.read_text())
    assert rep["ok"], rep
    (conn,) = rep["connections"]
    assert conn["bytes"] == hold_size and conn["bad_offset"] is None


def nic_rx1(name: str) -> int:
    """Payload-carrying bytes the driver took from queue 1."""
    from tests.e2e import nic_stats

    return nic_stats(name).get(f"rx-{ZC_QUEUE}.drv_rx_bytes", 0)


@pytest.mark.timeout(120)
def test_bench_scale_smoke() -> None:
    """``zcrx bench scale --queues 1,4 --mib-per-queue 2 --json -``: every point verified,
    every byte delivered, the figures present (no timing asserted)."""
    from tests.e2e import runs_dir

    with runs_dir():
        res = zcrx("bench", "scale", "--queues", "1,4", "--mib-per-queue", "2", "--json")
    out = json.loads(res.output)
    assert out["bench"] == "scale" and out["all_verified"]
    pts = out["points"]
    assert [p["queues"] for p in pts] == [1, 4]
    for p, n in zip(pts, (1, 4), strict=True):
        assert p["verified"] and p["problems"] == []
        assert p["bytes"] == n * (2 << 20)
        assert p["queues_total"] == n + 1 and p["zc_queues"] == list(range(1, n + 1))
        for key in ("up_s", "bind_s", "setup_s", "wall_s", "app_s", "down_s", "gbps",
                    "app_gbps"):
            assert isinstance(p[key], float) and p[key] >= 0.0, (key, p[key])


def test_app_groups() -> None:
    from launch.bench_scale import app_groups

    assert app_groups([1, 2, 3], "per-queue") == [[1], [2], [3]]
    assert app_groups([1, 2, 3], "one") == [[1, 2, 3]]
    assert app_groups([1, 2, 3, 4, 5], "2") == [[1, 2, 3], [4, 5]]
    assert app_groups([1, 2], "8") == [[1], [2]]


def test_a_server_on_many_queues_gets_a_cq_per_queue_up_to_the_maximum() -> None:
    """zcrx-server sizes its CQ by the queues it serves (``-C`` unset), a power of two as
    io_uring_setup wants, and the bench asks the same helper for its own per-queue size."""
    from app_proc.zcrx_server import CQ_PER_QUEUE, cq_entries_for, parse_args
    from launch.bench_scale import CQ_ENTRIES
    from shared import abi

    assert abi.IORING_MAX_CQ_ENTRIES == 2 * abi.IORING_MAX_ENTRIES
    assert cq_entries_for(1) == CQ_PER_QUEUE and cq_entries_for(4) == 4 * CQ_PER_QUEUE
    assert cq_entries_for(5, CQ_ENTRIES) == 32768  # 20480 rounded up to a power of two
    assert cq_entries_for(64) == cq_entries_for(64, CQ_ENTRIES) == abi.IORING_MAX_CQ_ENTRIES
    assert parse_args(["-q", "1"])[0].cq_entries == CQ_PER_QUEUE
    assert parse_args(["-q", "0-3"])[0].cq_entries == 4 * CQ_PER_QUEUE
    assert parse_args(["-q", "0-3", "-w", "2"])[0].cq_entries == 2 * CQ_PER_QUEUE
    assert parse_args(["-q", "0-3", "-C", "1024"])[0].cq_entries == 1024
    assert parse_args(["--nodev"])[0].cq_entries == CQ_PER_QUEUE


@pytest.mark.timeout(120)
def test_bench_scale_one_app_for_all_queues() -> None:
    """``--apps one``: one zcrx-server on every queue of the point, each flow steered to its
    queue by source port, every byte verified; the ratio to the 1-queue point is reported."""
    from tests.e2e import runs_dir

    with runs_dir():
        res = zcrx("bench", "scale", "--queues", "1,4", "--mib-per-queue", "2", "--apps",
                   "one", "--json")
    out = json.loads(res.output)
    assert out["apps"] == "one" and out["all_verified"], out
    pts = out["points"]
    assert [(p["queues"], p["apps"]) for p in pts] == [(1, 1), (4, 1)]
    assert all(p["bytes"] == p["queues"] * (2 << 20) for p in pts)
    assert pts[0]["ratio"] == 1.0 and pts[1]["ratio"] > 0.0


@pytest.mark.timeout(120)
def test_stats_and_status_of_a_64_queue_host() -> None:
    """`zcrx stats` and `zcrx status` on 64 queues, each bound by one server's ifq: their
    answers (about 100 KB of JSON) come back whole; they used to fail with EIO."""
    with topology("sc64", "--netdev", "eth0:queues=64,mtu=4136"):
        zcrx("app", "run", "--name", "sc64", "--detach", "--cap-net-admin", "zcrx-server",
             "--", "-p", str(PORT), "-i", "eth0", "-q", "0-63", "-S", str(2 << 20),
             "-R", "256", "-n", "1", "--seconds", "60")
        _wait(lambda: len(stats("sc64")["zcrx"]["ifqs"]) == 64, 60, "64 ifqs")
        st = stats("sc64")
        assert len(json.dumps(st)) > 64 << 10  # past the bound a request's header keeps
        assert sorted(i["queue"] for i in st["zcrx"]["ifqs"]) == list(range(64))
        assert len(_queues("sc64")) == 64
        assert "ifq" in zcrx("stats", "--name", "sc64", "--ledger").output
