"""``zcrx demo``: a default topology, real traffic through NIC -> kernel -> app, a verified
summary, and a teardown that leaves nothing behind.

The demo is the same sequence a user types (``zcrx up``, ``zcrx ethtool``, ``zcrx app
run``, ``zcrx traffic``, ``zcrx down``) driven through :mod:`launch.run`, so it shows
the commands it stands for.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launch.run import Run
from shared import nicif, syscalls  # noqa: F401  (register the message types)
from shared.control import ControlClient
from shared.errors import Timeout

PORT = 8000


def _wait_exit(run: Run, role: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while run.m.procs[role].process() is not None:
        if time.monotonic() > deadline:
            raise Timeout(f"{role} did not finish in {timeout:.0f} s "
                          f"(see {run.m.procs[role].log})")
        time.sleep(0.05)


def run_demo(flows: int = 4, per_flow: int = 64 << 20, queues: int = 4,
             say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the copy-path demo; return the summary (raises on any failure after teardown)."""
    name = f"demo-{secrets.token_hex(2)}"
    run = Run.create(name, {"netdevs": [f"eth0:queues={queues}"]})
    try:
        say(f"$ zcrx up --name {name} --netdev eth0:queues={queues}")
        common = ["--run", run.run_id, "--rundir", str(run.dir), "--detached"]
        run.spawn("nic", "nic_proc", [*common, "--netdev", f"eth0:queues={queues}"],
                  ready="nic")
        run.spawn("kernel", "driver_proc", common, ready="kernel")
        report_path = run.dir / "copy-server.json"
        say(f"$ zcrx app run --detach copy-server -- -p {PORT} -v -n {flows} -s {per_flow}")
        run.spawn("app:0", "app_proc.copy_server",
                  ["-p", str(PORT), "-v", "-n", str(flows), "-s", str(per_flow),
                   "--json", str(report_path)], notify=True)
        say(f"$ zcrx traffic --flows {flows} --port {PORT} --bytes {per_flow}")
        with ControlClient(run.endpoint("nic"), timeout_ms=10_000) as nic:
            nic.call("nic.traffic", {"dev": "eth0", "spec": {
                "dport": PORT, "flows": flows, "bytes": per_flow}})
        t0 = time.monotonic()
        _wait_exit(run, "app:0", 600)
        elapsed = time.monotonic() - t0
        report = json.loads(Path(report_path).read_text())
        with ControlClient(run.endpoint("kernel"), timeout_ms=10_000) as k:
            st = k.call("stats", {})
            nic_st = k.call("ethtool", {"dev": "eth0", "request": {"cmd": "stats-get",
                                                                    "dev": "eth0"}})
    finally:
        say(f"$ zcrx down --name {name}")
        down = run.down()
    counters = dict(nic_st["stats"])  # ethtool -S: [name, value] pairs
    per_queue = {q: int(counters.get(f"rx-{q}.packets", 0)) for q in range(queues)}
    return {
        "run": name, "flows": flows, "bytes": report["bytes"], "seconds": elapsed,
        "gbps": report["bytes"] / elapsed / 1e9, "verified": bool(report["ok"]),
        "connections": report["connections"], "queues": per_queue,
        "tcp": st["tcp"], "leftovers_removed": down["segments_removed"],
    }
