"""Chaos (random SIGKILLs, ``zcrx chaos``) and SIGSTOP/SIGCONT of every role, through real
processes (DESIGN §6).

The chaos run kills a role chosen by ``random.Random(seed)`` in each of 20 small runs and
must find zero violations; the stop test freezes each role in turn under traffic to a
zcrx-server and a copy-server and checks that both streams still arrive byte-exact and that
nobody died (a stopped kernel is not a dead kernel).  The conftest fixture checks that no
process and no /dev/shm segment is left.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

import shared.nicif
import shared.syscalls  # noqa: F401  (register the message types)
from launch.chaos import APP_ROLES, REPORTS, plan, run_trial, topology
from launch.run import Run, cleanup, tagged_processes
from launch.supervise import bring_up
from shared.control import ControlClient
from tests.e2e import runs_dir, zcrx

SEED = 2  # kills: nic 6, kernel 7, app 7 (zcrx-server 3, copy-server 4)


def test_plan_is_deterministic_and_validated() -> None:
    assert plan(20, SEED) == plan(20, SEED)
    assert plan(20, SEED) != plan(20, SEED + 1)
    assert {p["role"] for p in plan(20, SEED)} == {"nic", "kernel", "app:0", "app:1"}
    assert all(0.05 <= p["fraction"] <= 0.6 for p in plan(20, SEED))
    assert {p["role"] for p in plan(10, 1, ("kernel",))} == {"kernel"}
    res = zcrx("chaos", "--trials", "1", "--roles", "nic,disk", ok=False)
    assert res.exit_code == 2 and "disk" in res.output


@pytest.mark.timeout(150)
def test_twenty_chaos_trials_find_no_violation(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    with runs_dir():
        res = zcrx("chaos", "--trials", "20", "--seed", str(SEED), "--mib", "3",
                   "--seconds", "0.8", "--json-out", str(out), ok=False)
    print(res.output)
    rep = json.loads(out.read_text())
    assert res.exit_code == 0, res.output
    tot = rep["totals"]
    assert tot["trials"] == 20 and tot["violations"] == 0
    # A late trial (the app had already finished byte-exact when its kill came: the
    # sampler lagged on a loaded machine) kills nothing; it must stay the exception.
    assert tot["late"] <= 3, f"{tot['late']} late trials: the kills did not land mid-stream"
    assert set(tot["kills"]) == {"nic", "kernel", "app"}
    assert sum(tot["kills"].values()) + tot["late"] == 20
    assert [t["role"] for t in rep["trials"]] == [p["role"] for p in plan(20, SEED)]
    for t in rep["trials"]:
        assert t["violations"] == [] and all(t["checks"].values()), t
        assert t["checks"]["down"]
        if t["late"]:
            assert t["role"] in APP_ROLES and t["checks"]["survivor"]
            continue
        assert t["checks"]["killed"]
        if t["role"] in APP_ROLES:
            assert t["checks"]["teardown"] and t["checks"]["survivor"]
        else:
            assert t["checks"]["exit"] and t["exit_s"] is not None
    print("exit after nic/kernel kill (s):",
          sorted(t["exit_s"] for t in rep["trials"] if t["exit_s"] is not None))


@pytest.mark.timeout(60)
def test_a_kill_after_the_app_finished_is_late_not_a_violation() -> None:
    """The app to kill finished its stream byte-exact first: nothing killed, nothing broken;
    an app that exits early without its whole stream would still be a violation."""
    with runs_dir():
        t = run_trial(0, "app:1", 0.05, 1 << 20, name="late", transfer_s=0.2, delay_s=20)
    assert t.late and t.violations == [], t
    assert "killed" not in t.checks and t.checks["survivor"] and t.checks["down"]


def _stats(run: Run) -> dict[str, Any]:
    with ControlClient(run.endpoint("kernel"), timeout_ms=5000) as c:
        st: dict[str, Any] = c.call("stats", {})
    return st


def _rx_bytes(run: Run) -> int:
    return sum(q["rx_bytes"] for d in _stats(run)["netdevs"].values() for q in d.values())


def _wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.timeout(60)
def test_sigstop_sigcont_of_each_role_loses_nothing() -> None:
    size = 12 << 20
    with runs_dir():
        run, _ = bring_up(topology("stop", size, rate=size / 3.0))  # ~3 s per flow
        try:
            _wait(lambda: _rx_bytes(run) > size // 10, 20, "no traffic progress")
            frozen_at = []
            for role in ("nic", "kernel", "app:0", "app:1"):
                before = _rx_bytes(run)
                run.signal(role, "STOP")
                time.sleep(0.5)  # the freeze itself: nothing to wait for
                run.signal(role, "CONT")
                frozen_at.append((role, before))
                assert all(e.process() is not None for e in run.m.procs.values()), role
            print("\nstopped/continued at rx_bytes:", frozen_at, "of", 2 * size)
            assert frozen_at[-1][1] < 2 * size  # the last stop still came under traffic
            for app in APP_ROLES:
                _wait(lambda app=app: run.m.procs[app].process() is None, 30,
                      f"{app} did not finish")
            # nobody died: NIC and kernel up, no death noticed by the kernel
            assert run.m.procs["nic"].process() is not None
            assert run.m.procs["kernel"].process() is not None
            st = _stats(run)
            k = st["kernel"]
            assert k.get("app_deaths", 0) == 0 and k.get("nic_deaths", 0) == 0, k
            assert st["nic"] == "up"
            z = st["zcrx"]
            assert z["ifqs"] == [] and z["counters"]["registered"] == z["counters"]["destroyed"]
            for app in APP_ROLES:
                rep = json.loads((run.dir / REPORTS[app]).read_text())
                assert rep["ok"], rep
                (conn,) = rep["connections"]
                assert conn["bytes"] == size and conn["bad_offset"] is None and conn["ok"]
                assert conn["error"] is None
            zc = json.loads((run.dir / REPORTS["app:0"]).read_text())
            assert zc["copy_fallback"]["zc_bytes"] == size
            run_id = run.run_id
            run.down()
            assert tagged_processes(run_id) == []
        finally:
            cleanup("stop")
