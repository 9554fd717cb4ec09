"""Death of a peer under zero-copy traffic (DESIGN §6), through real processes.

Each test starts a topology, streams a generator flow into a zcrx-server on a bound queue,
waits for progress (the NIC's rx_packets), SIGKILLs one role and checks what the survivors
do: the kernel tears a dead app down and keeps the other app byte-exact; a dead NIC is a
surprise removal (the app ends with a clear error, the kernel keeps answering); a dead
kernel makes the NIC and the app exit by themselves.  ``zcrx down`` (the ``topology``
helper) must then leave no process and no /dev/shm segment (the conftest fixture checks).
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from launch.run import Run, tagged_processes
from shared.watch import PidWatch, Watchlist
from tests.e2e import nic_stats, stats, topology, wait_app, zcrx

NETDEV = "eth0:queues=3,mtu=4136"  # 4096-byte TCP payloads, one niov each
BIG = 4 << 30  # still running when the kill comes


# -- shared.watch (no topology) ----------------------------------------------------------------


def test_pidwatch_sees_a_sigkill_and_the_watchlist_reports_it_once() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        wl: Watchlist[str] = Watchlist()
        fd = wl.add("child", sleeper.pid)
        assert fd >= 0 and wl.fds() == [fd] and wl.reap() == []
        with PidWatch(sleeper.pid) as w:
            assert not w.dead
            sleeper.kill()
            assert select.select([fd], [], [], 10)[0] == [fd]  # readable: no polling loop
            assert w.dead
        assert wl.reap() == ["child"]
        assert wl.discard("child") == fd and wl.fds() == [] and wl.reap() == []
    finally:
        sleeper.kill()
        sleeper.wait()
    # a pid that is already gone is dead from the start, and reported by the next reap
    with PidWatch(sleeper.pid) as gone:
        assert gone.dead and gone.fd == -1
    assert wl.add("late", sleeper.pid) == -1 and wl.reap() == ["late"]
    wl.close()
    assert len(wl) == 0


def _serve(name: str, out: Path, port: int, queue: int, size: int) -> None:
    zcrx("app", "run", "--name", name, "--detach", "--cap-net-admin", "zcrx-server", "--",
         "-p", str(port), "-i", "eth0", "-q", str(queue), "-v", "-n", "1",
         "-s", str(size), "--json", str(out))


def _steer(name: str, port: int, queue: int) -> None:
    zcrx("ethtool", "--name", name, "-N", "eth0", "flow-type", "tcp4",
         "dst-port", str(port), "action", str(queue))


def _rx_packets(name: str, queue: int) -> int:
    return sum(v for k, v in nic_stats(name).items()
               if k.endswith("rx_packets") and f"{queue}" in k.split("rx_packets")[0])


def _wait_progress(name: str, queue: int, packets: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while _rx_packets(name, queue) < packets:
        assert time.monotonic() < deadline, f"no progress on queue {queue}"
        time.sleep(0.02)


def _status(name: str) -> dict[str, Any]:
    return json.loads(zcrx("status", "--name", name, "--json").output)


def _kill(name: str, role: str) -> int:
    pid = Run.open(name).m.procs[role].pid
    os.kill(pid, signal.SIGKILL)
    return pid


def _assert_nothing_left(run_id: str) -> None:
    """After ``zcrx down``: no process of the run, no shm segment of the run."""
    assert tagged_processes(run_id) == []
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"zcrx.{run_id}.")] == []


def _exit_status(pid: int) -> int | None:
    """The exit code of a child of ours (the launcher ran in-process), None if not ours."""
    try:
        _, st = os.waitpid(pid, 0)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(st)


@pytest.mark.timeout(60)
def test_killed_app_is_torn_down_and_the_other_app_stays_byte_exact(tmp_path: Path) -> None:
    name = "d1"
    size = 48 << 20
    with topology(name, "--netdev", NETDEV) as run:
        _steer(name, 8000, 1)
        _steer(name, 8001, 2)
        _serve(name, tmp_path / "victim.json", 8000, 1, BIG)
        _serve(name, tmp_path / "survivor.json", 8001, 2, size)
        zcrx("traffic", "--name", name, "--flows", "1", "--port", "8000",
             "--bytes", str(BIG))
        zcrx("traffic", "--name", name, "--flows", "1", "--port", "8001",
             "--bytes", str(size))
        _wait_progress(name, 1, 2000)
        before = stats(name)["zcrx"]
        assert len(before["ifqs"]) == 2
        pid = Run.open(name).m.procs["app:0"].pid
        (tid,) = [t["tid"] for t in _status(name)["tasks"] if t["pid"] == pid]
        _kill(name, "app:0")
        t0 = time.monotonic()
        # every niov of the dead app's ifq home: its ifq destroyed, queue 1 on kernel pages
        deadline = t0 + 20
        while True:
            st = stats(name)["zcrx"]
            if st["counters"].get("destroyed", 0) >= 1:
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.005)
        home_ms = (time.monotonic() - t0) * 1000
        print(f"\nkill -> all buffers of the dead app home: {home_ms:.1f} ms")
        assert _exit_status(pid) in (None, -signal.SIGKILL)
        q = _status(name)["netdevs"][0]["rx_queues"][1]
        assert q["provider"] == "none" and not q["mp_draining"]
        assert len(st["ifqs"]) == 1  # the survivor's
        k = stats(name)["kernel"]
        # its memory was sealed memfds (no names to unlink); nothing of it is left by name
        assert k["app_deaths"] == 1
        rid = Run.open(name).m.run_id
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"zcrx.{rid}.app{tid}.")]
        wait_app(name, "app:1", 40)
        st = stats(name)["zcrx"]
        assert st["ifqs"] == [] and st["ledger"]["niovs"] == 0
        assert st["counters"]["destroyed"] == st["counters"]["registered"] == 2
    _assert_nothing_left(run.m.run_id)
    rep = json.loads((tmp_path / "survivor.json").read_text())
    assert rep["ok"], rep
    (conn,) = rep["connections"]
    assert conn["bytes"] == size and conn["bad_offset"] is None and conn["ok"]
    assert rep["copy_fallback"]["zc_bytes"] == size


def _zero_copy_flowing(name: str, out: Path) -> None:
    """A zcrx-server on queue 1 receiving a BIG generator flow, well under way."""
    _steer(name, 8000, 1)
    _serve(name, out, 8000, 1, BIG)
    zcrx("traffic", "--name", name, "--flows", "1", "--port", "8000", "--bytes", str(BIG))
    _wait_progress(name, 1, 2000)


@pytest.mark.timeout(60)
def test_killed_nic_is_a_surprise_removal(tmp_path: Path) -> None:
    name = "d2"
    out = tmp_path / "app.json"
    with topology(name, "--netdev", NETDEV) as run:
        _zero_copy_flowing(name, out)
        _kill(name, "nic")
        t0 = time.monotonic()
        wait_app(name, "app:0", 20)  # no hang
        print(f"\nkill NIC -> app exited: {(time.monotonic() - t0) * 1000:.0f} ms")
        app_pid = Run.open(name).m.procs["app:0"].pid
        code = _exit_status(app_pid)
        print(f"app exit code {code}")
        assert code is None or code != 0
        st = _status(name)  # the kernel is up and answers
        assert st["nic"] == "gone" and st["netdevs"] == []
        s = stats(name)
        assert s["kernel"]["nic_deaths"] == 1
        z = s["zcrx"]
        assert z["ifqs"] == [] and z["ledger"]["niovs"] == 0
        assert z["counters"]["destroyed"] == z["counters"]["registered"] == 1
        assert s["skbs"]["in_flight"] == 0
        res = zcrx("ethtool", "--name", name, "-S", "eth0", ok=False)
        assert res.exit_code != 0
    _assert_nothing_left(run.m.run_id)
    rep = json.loads(out.read_text())
    assert not rep["ok"]
    (conn,) = rep["connections"]
    assert conn["error"] == errno.ENETDOWN and not conn["ok"]
    assert conn["bad_offset"] is None and conn["bytes"] > 0  # what arrived was intact


@pytest.mark.timeout(60)
def test_killed_kernel_makes_nic_and_app_exit(tmp_path: Path) -> None:
    name = "d3"
    out = tmp_path / "app.json"
    with topology(name, "--netdev", NETDEV) as run:
        _zero_copy_flowing(name, out)
        _kill(name, "kernel")
        t0 = time.monotonic()
        wait_app(name, "nic", 15)
        t_nic = time.monotonic() - t0
        wait_app(name, "app:0", 15)
        print(f"\nkill kernel -> NIC exited {t_nic * 1000:.0f} ms, "
              f"app exited {(time.monotonic() - t0) * 1000:.0f} ms")
        run = Run.open(name)
        nic_code = _exit_status(run.m.procs["nic"].pid)
        app_code = _exit_status(run.m.procs["app:0"].pid)
        print(f"exit codes: nic {nic_code}, app {app_code}")
        assert nic_code in (None, 0)
        assert app_code is None or app_code != 0
        nic_log = Path(run.m.procs["nic"].log).read_text()
        assert "kernel is gone" in nic_log
        app_log = Path(run.m.procs["app:0"].log).read_text()
        gone = [ln for ln in app_log.splitlines() if "kernel gone" in ln]
        assert len(gone) == 1, app_log  # one line says why
        print(gone[0])
        # the NIC unlinked its stats region on the way out
        assert not [n for n in os.listdir("/dev/shm")
                    if n.startswith(f"zcrx.{run.m.run_id}.nic.")]
    _assert_nothing_left(run.m.run_id)
