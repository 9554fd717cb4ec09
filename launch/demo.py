"""``zcrx demo``: a default topology, real traffic through NIC -> kernel -> app, a verified
summary, and a teardown that leaves nothing behind.

The demo is the sequence a user would type (``zcrx up``, ``zcrx ethtool``, ``zcrx app
run``, ``zcrx traffic``, ``zcrx wire``, ``zcrx down``), driven through
:mod:`launch.run` and printed as it goes:

* eth0 with 4 queues; an ntuple rule steers port 9000 to queue 3;
* ``zcrx-server`` bound to queue 3 receives one generator flow zero copy;
* ``copy-server`` receives three generator flows on port 8000, spread by RSS over the
  other queues, through the copy path;
* when ``nc`` is installed, a random file goes through the wire gateway to a second
  copy-server and its SHA-256 is compared;
* every byte of the generator flows is checked against the pattern.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launch.run import Run
from shared import nicif, syscalls  # noqa: F401  (register the message types)
from shared.control import ControlClient
from shared.errors import Timeout

COPY_PORT = 8000
ZC_PORT = 9000
ZC_QUEUE = 3


def _wait_exit(run: Run, role: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while run.m.procs[role].process() is not None:
        if time.monotonic() > deadline:
            raise Timeout(f"{role} did not finish in {timeout:.0f} s "
                          f"(see {run.m.procs[role].log})")
        time.sleep(0.02)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(flows: int = 3, per_flow: int = 64 << 20, zc_bytes: int = 256 << 20,
             queues: int = 4, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; return the summary.  Raises (after teardown) if anything failed."""
    if queues <= ZC_QUEUE:
        raise ValueError(f"the demo needs at least {ZC_QUEUE + 1} queues")
    name = f"demo-{secrets.token_hex(2)}"
    spec = f"eth0:queues={queues}"
    run = Run.create(name, {"netdevs": [spec]})
    legs: list[dict[str, Any]] = []
    nc_file: Path | None = None
    try:
        say(f"$ zcrx up --name {name} --netdev {spec}")
        common = ["--run", run.run_id, "--rundir", str(run.dir), "--detached"]
        run.spawn("nic", "nic_proc", [*common, "--netdev", spec], ready="nic")
        run.spawn("kernel", "driver_proc", common, ready="kernel")
        kernel = ControlClient(run.endpoint("kernel"), timeout_ms=20_000)
        nic = ControlClient(run.endpoint("nic"), timeout_ms=20_000)
        rule = {"cmd": "ntuple-add", "dev": "eth0", "flow_type": "tcp4",
                "dst_port": ZC_PORT, "action": ZC_QUEUE}
        say(f"$ zcrx ethtool -N eth0 flow-type tcp4 dst-port {ZC_PORT} action {ZC_QUEUE}")
        kernel.call("ethtool", {"dev": "eth0", "request": rule})

        zc_json = run.dir / "zcrx-server.json"
        say(f"$ zcrx app run --detach zcrx-server -- -p {ZC_PORT} -i eth0 -q {ZC_QUEUE} -v "
            f"-n 1 -s {zc_bytes}")
        run.spawn("app:0", "app_proc.zcrx_server",
                  ["-p", str(ZC_PORT), "-i", "eth0", "-q", str(ZC_QUEUE), "-v", "-n", "1",
                   "-s", str(zc_bytes), "--json", str(zc_json)], notify=True)
        cp_json = run.dir / "copy-server.json"
        say(f"$ zcrx app run --detach copy-server -- -p {COPY_PORT} -v -n {flows} "
            f"-s {per_flow}")
        run.spawn("app:1", "app_proc.copy_server",
                  ["-p", str(COPY_PORT), "-v", "-n", str(flows), "-s", str(per_flow),
                   "--json", str(cp_json)], notify=True)
        binding = [q["binding"] for q in kernel.call("status", {})["netdevs"][0]["rx_queues"]]

        t0 = time.monotonic()
        say(f"$ zcrx traffic --flows 1 --port {ZC_PORT} --bytes {zc_bytes}")
        nic.call("nic.traffic", {"dev": "eth0", "spec": {"dport": ZC_PORT, "flows": 1,
                                                         "bytes": zc_bytes}})
        say(f"$ zcrx traffic --flows {flows} --port {COPY_PORT} --bytes {per_flow}")
        nic.call("nic.traffic", {"dev": "eth0", "spec": {"dport": COPY_PORT, "flows": flows,
                                                         "bytes": per_flow}})
        if shutil.which("nc"):
            port = _free_port()
            nc_json = run.dir / "nc-server.json"
            run.spawn("app:2", "app_proc.copy_server",
                      ["-p", str(port), "-n", "1", "--json", str(nc_json)], notify=True)
            say(f"$ zcrx wire --port {port}; nc -N 127.0.0.1 {port} < random-16MiB")
            nic.call("nic.wire", {"dev": "eth0", "port": port})
            nc_file = run.dir / "random-16MiB"
            data = os.urandom(16 << 20)
            nc_file.write_bytes(data)
            with open(nc_file, "rb") as f:
                subprocess.run(["nc", "-N", "127.0.0.1", str(port)], stdin=f, timeout=120,
                               check=True)
            _wait_exit(run, "app:2", 120)
            rep = json.loads(nc_json.read_text())
            (conn,) = rep["connections"]
            legs.append({"leg": "nc -> wire -> copy", "bytes": conn["bytes"],
                         "gbps": None, "verified": conn["sha256"] ==
                         hashlib.sha256(data).hexdigest() and rep["ok"],
                         "how": "sha256", "copied": conn["bytes"],
                         "zero_copy": 0})
        for role, path, leg in (("app:0", zc_json, "generator -> q3 -> zero copy"),
                                ("app:1", cp_json, "generator -> RSS -> copy")):
            _wait_exit(run, role, 600)
            wall = time.monotonic() - t0
            rep = json.loads(path.read_text())
            fb = rep.get("copy_fallback")
            legs.append({"leg": leg, "bytes": rep["bytes"],
                         # zcrx-server times first to last byte; copy-server: wall clock
                         "gbps": rep.get("gbps") or rep["bytes"] / wall / 1e9,
                         "verified": bool(rep["ok"]), "how": "pattern",
                         "copied": fb["bytes"] if fb else rep["bytes"],
                         "zero_copy": fb["zc_bytes"] if fb else 0})
        st = kernel.call("stats", {})
        counters = dict(kernel.call("ethtool", {"dev": "eth0", "request": {
            "cmd": "stats-get", "dev": "eth0"}})["stats"])
        kernel.close()
        nic.close()
    finally:
        say(f"$ zcrx down --name {name}")
        down = run.down()
    zc = st["zcrx"]
    return {
        "run": name, "legs": legs, "bindings": binding,
        "frames_per_queue": {q: int(counters.get(f"rx-{q}.packets", 0)) for q in range(queues)},
        "zcrx": {"registered": zc["counters"].get("registered", 0),
                 "destroyed": zc["counters"].get("destroyed", 0),
                 "scrubbed_refs": zc.get("retired", {}).get("scrubbed_refs", 0),
                 "live_ifqs": len(zc["ifqs"])},
        "tcp": st["tcp"], "leftovers_removed": down["segments_removed"],
        "verified": all(leg["verified"] for leg in legs),
    }
