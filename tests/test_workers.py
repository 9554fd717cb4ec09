"""zcrx-server -w N: the -q queues spread over N worker processes, each its own app.

Real processes (NIC + kernel + zcrx-server and its workers) driven through the CLI.  Each
worker listens on the port with SO_REUSEPORT in turn (worker w is member w of the group) and
the group's classic BPF program sends a SYN to member (rx queue mod N); worker w registered
the ifqs of exactly those queues.  Evidence: the kernel placed every SYN by the program (no
hash fallback), each queue's ifq belongs to the task of worker q mod N, each connection
reported the NAPI id of its queue and came to that worker, no byte was copied, and the NIC's,
kernel's and app's bytes of each queue agree.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from app_proc import workers as W
from app_proc import zcrx_server
from launch.run import Run
from tests.e2e import stats, topology, wait_app, zcrx
from tests.test_multiqueue import PORT, _check, _nic_payload_bytes, _status, _wait_frames


def _serve(name: str, out: Path, queues: str, workers: int, conns: int, size: int,
           *extra: str) -> None:
    zcrx("app", "run", "--name", name, "--detach", "--cap-net-admin", "zcrx-server", "--",
         "-p", str(PORT), "-i", "eth0", "-q", queues, "-w", str(workers), "-v",
         "-n", str(conns), "-s", str(size), "--json", str(out), "--seconds", "150", *extra)


def _workers_of(name: str) -> dict[str, Any]:
    """The running workers as the kernel sees them: their tasks and the queue of each ifq."""
    st = _status(name)
    tasks = {t["tid"]: t for t in st["tasks"] if t["name"].startswith("zcrx_server.w")}
    by_queue = {i["queue"]: tasks[i["task"]] for i in st["zcrx"]}
    return {"tasks": tasks, "by_queue": by_queue}


@pytest.mark.timeout(300)
def test_four_workers_serve_8_queues_each_connection_in_its_queues_worker(
        tmp_path: Path) -> None:
    name, out, nw, flows, size = "w4", tmp_path / "w4.json", 4, 64, 256 << 10
    with topology(name, "--netdev", "eth0:queues=9,mtu=4136"):
        zcrx("ethtool", "--name", name, "-X", "eth0", "start", "1", "equal", "8")
        _serve(name, out, "1-8", nw, flows, size, "-S", str(4 << 20))
        parent = Run.open(name).m.procs["app:0"].pid
        seen = _workers_of(name)
        pids = {t["pid"] for t in seen["tasks"].values()}
        assert len(seen["tasks"]) == nw and len(pids) == nw
        # queue q's ifq is registered by worker q mod 4 (its own task and process)
        for q in range(1, 9):
            assert seen["by_queue"][q]["name"] == f"zcrx_server.w{q % nw}"
        napi = {row["id"]: row["napi-id"] for row in _status(name)["queues"]}
        zcrx("traffic", "--name", name, "--flows", str(flows), "--port", str(PORT),
             "--bytes", str(size))
        _wait_frames(name, 9, flows * (size // 4096), 200)
        wait_app(name, "app:0", 200)
        nic_rx = _nic_payload_bytes(name, 9)
        tcp = stats(name)["tcp"]
    rep = json.loads(out.read_text())
    assert nic_rx[0] == 0  # RSS used queues 1-8 only
    _check(name, rep, 8, flows, size, nic_rx, napi)
    assert tcp["reuseport_by_prog"] == flows and tcp["reuseport_prog_fallback"] == 0
    assert [w["worker"] for w in rep["workers"]] == list(range(nw))
    assert all(w["ok"] and w["exit"] == 0 for w in rep["workers"])
    assert {w["pid"] for w in rep["workers"]} == pids and parent not in pids
    for w in rep["workers"]:
        assert w["queues"] == [q for q in range(1, 9) if q % nw == w["worker"]]
    for c in rep["connections"]:
        assert c["worker"] == c["queue"] % nw
    assert sum(w["connections"] for w in rep["workers"]) == flows
    assert len({c["worker"] for c in rep["connections"]}) == nw


@pytest.mark.timeout(300)
def test_a_worker_sigkilled_mid_stream_the_others_finish_nothing_leaks(tmp_path: Path) -> None:
    name, out, flows, size = "wk", tmp_path / "wk.json", 16, 16 << 20
    with topology(name, "--netdev", "eth0:queues=5,mtu=4136") as run:
        zcrx("ethtool", "--name", name, "-X", "eth0", "start", "1", "equal", "4")
        _serve(name, out, "1-4", 2, flows, size, "-S", str(8 << 20))
        seen = _workers_of(name)
        victim = next(t for t in seen["tasks"].values() if t["name"] == "zcrx_server.w1")
        zcrx("traffic", "--name", name, "--flows", str(flows), "--port", str(PORT),
             "--bytes", str(size))
        _wait_frames(name, 5, flows * (size // 4096) // 8, 120)
        os.kill(victim["pid"], signal.SIGKILL)
        # the dead worker's ifqs are torn down and every niov of theirs comes home
        deadline = time.monotonic() + 30
        while stats(name)["zcrx"]["counters"].get("destroyed", 0) < 2:
            assert time.monotonic() < deadline, stats(name)["zcrx"]
            time.sleep(0.05)
        wait_app(name, "app:0", 200)
        z = stats(name)["zcrx"]
        k = stats(name)["kernel"]
        rid = run.m.run_id
    assert z["ifqs"] == [] and z["ledger"]["niovs"] == 0
    assert z["counters"]["destroyed"] == z["counters"]["registered"] == 4
    assert k["app_deaths"] >= 1
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"zcrx.{rid}.")]
    rep = json.loads(out.read_text())
    assert not rep["ok"]
    dead, alive = rep["workers"][1], rep["workers"][0]
    assert dead["exit"] == -signal.SIGKILL and dead["pid"] == victim["pid"]
    assert any("killed by SIGKILL" in e for e in rep["errors"])
    # the survivor served every connection of its queues (2 and 4) to the last byte
    assert alive["exit"] == 0 and alive["ok"] and alive["queues"] == [2, 4]
    mine = [c for c in rep["connections"] if c["worker"] == 0]
    assert mine and all(c["ok"] and c["bytes"] == size and c["bad_offset"] is None
                        for c in mine)
    assert {c["queue"] for c in mine} <= {2, 4}
    assert rep["copy_fallback"] is None  # the dead worker left no summary
    per_q = {q["queue"]: q for q in rep["queues"]}
    assert set(per_q) == {2, 4}
    assert sum(per_q[q]["kernel"]["zc_bytes"] for q in per_q) == len(mine) * size


def test_worker_option_parses_and_refuses_what_cannot_work() -> None:
    o, _ = zcrx_server.parse_args(["-q", "1-8", "-w", "4"])
    assert o.workers == 4 and o.worker_queues == [[4, 8], [1, 5], [2, 6], [3, 7]]
    o, _ = zcrx_server.parse_args(["-q", "0-5", "-w", "3"])
    assert o.worker_queues == [[0, 3], [1, 4], [2, 5]]
    o, _ = zcrx_server.parse_args(["-q", "3"])
    assert o.workers == 1 and o.worker_queues == []
    for bad in (["-q", "1,3,5,7", "-w", "2"], ["-q", "1-2", "-w", "3"], ["-q", "1", "-w", "0"],
                ["--nodev", "-w", "2"], ["-q", "0-3", "-w", "2", "-o", "x"]):
        with pytest.raises(SystemExit):
            zcrx_server.parse_args(bad)


def test_merge_tags_rows_sums_counters_and_names_the_dead() -> None:
    def rep(q: int, first: int, last: int) -> dict[str, Any]:
        return {"ok": True, "errors": [], "first_ns": first, "last_ns": last,
                "connections": [{"bytes": 10, "ok": True, "queue": q}],
                "queues": [{"queue": q, "bytes": 10}],
                "app": {"read_bytes": 10, "data_cqes": 2},
                "copy_fallback": {"count": 0, "bytes": 0, "zc_cqes": 2, "zc_bytes": 10}}
    m = W.merge([rep(2, 5, 9), rep(1, 3, 7)], [100, 101], [0, 0])
    assert m["ok"] and m["bytes"] == 20 and (m["first_ns"], m["last_ns"]) == (3, 9)
    assert [q["queue"] for q in m["queues"]] == [1, 2]
    assert [c["worker"] for c in m["connections"]] == [0, 1]
    assert m["copy_fallback"]["zc_bytes"] == 20 and m["app"]["data_cqes"] == 4
    m = W.merge([rep(2, 5, 9), None], [100, 101], [0, -signal.SIGKILL])
    assert not m["ok"] and m["copy_fallback"] is None
    assert m["workers"][1]["exit"] == -signal.SIGKILL and not m["workers"][1]["ok"]
    assert "worker 1 (pid 101): killed by SIGKILL" in m["errors"]
