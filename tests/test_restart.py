"""The restart policy: a foreground `zcrx up --restart nic,kernel` brings roles back.

A restarted NIC is re-probed by the kernel and apps can register again; a restarted
kernel comes back with a fresh NIC; `zcrx down` from another shell stops the
supervising launcher first, so nothing is brought back behind its back.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from launch.run import Run
from tests.e2e import foreground_up, nic_reprobed, runs_dir, status, wait_app, zcrx

NAME = "rst"


def _wait(cond: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _pid(role: str) -> int | None:
    try:
        e = Run.open(NAME).m.procs.get(role)
    except Exception:
        return None
    return e.pid if e is not None and e.process() is not None else None


def _zero_copy_works(tmp: Path, tag: str) -> None:
    """An app can register an ifq on queue 1 and receive verified data zero copy."""
    out = tmp / f"{tag}.json"
    zcrx("ethtool", "--name", NAME, "-N", "eth0", "flow-type", "tcp4", "dst-port", "8000",
         "action", "1")
    zcrx("app", "run", "--name", NAME, "--detach", "--cap-net-admin", "zcrx-server", "--",
         "-p", "8000", "-i", "eth0", "-q", "1", "-v", "-n", "1", "-s", str(4 << 20),
         "--json", str(out))
    zcrx("traffic", "--name", NAME, "--flows", "1", "--port", "8000", "--bytes", str(4 << 20))
    role = max(r for r in Run.open(NAME).m.procs if r.startswith("app:"))
    wait_app(NAME, role, 60)
    rep = json.loads(out.read_text())
    assert rep["ok"] and rep["bytes"] == 4 << 20
    assert rep["copy_fallback"]["zc_bytes"] == 4 << 20


@pytest.mark.timeout(180)
def test_restart_policy_brings_nic_and_kernel_back(tmp_path: Path) -> None:
    with runs_dir(), foreground_up(NAME, "--restart", "nic,kernel",
                                   "--netdev", "eth0:queues=2") as up:
        nic0 = _pid("nic")
        assert nic0 is not None

        zcrx("kill", "--name", NAME, "nic")
        _wait(lambda: _pid("nic") not in (None, nic0), "a new NIC")
        _wait(lambda: nic_reprobed(NAME), "the kernel to re-probe the NIC")
        _zero_copy_works(tmp_path, "after-nic")

        kernel0 = _pid("kernel")
        zcrx("kill", "--name", NAME, "kernel")
        _wait(lambda: _pid("kernel") not in (None, kernel0), "a new kernel")
        _wait(lambda: status(NAME).get("nic") == "up", "the new kernel to probe")
        _zero_copy_works(tmp_path, "after-kernel")

        zcrx("down", "--name", NAME)
        assert up.wait(30) == 0
        assert up.stdout is not None
        out = up.stdout.read()
        assert "nic died; restarted" in out and "kernel died; restarted" in out
