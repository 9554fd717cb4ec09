"""``zcrx demo``: a default topology, real traffic through NIC -> kernel -> app, a verified
summary, and a teardown that leaves nothing behind.

The demo is a topology (:func:`demo_topology`) brought up by the same supervisor as ``zcrx
up`` (:func:`launch.supervise.bring_up`), then traffic, then ``zcrx down``; it prints the
sequence a user would type for the same (``zcrx up``, ``zcrx ethtool``, ``zcrx app run``,
``zcrx traffic``, ``zcrx wire``, ``zcrx down``):

* eth0 with 4 queues; an ntuple rule steers port 9000 to queue 3;
* ``zcrx-server`` bound to queue 3 receives one generator flow zero copy, starting with a
  small area and events on (``-S 4M --grow 16M``, Linux 7.3): when the queue's page pool
  finds no buffer the ALLOC_FAIL event fires and the server adds an area (the summary
  line shows the events seen and the areas);
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
from typing import Any

from launch.run import Run
from launch.supervise import bring_up, start_traffic
from launch.topology import APPS, AppSpec, NetdevConfig, Topology, TrafficSpec
from shared import nicif, syscalls  # noqa: F401  (register the message types)
from shared.control import ControlClient
from shared.errors import Timeout
from shared.nicif import NetdevSpec

COPY_PORT = 8000
ZC_PORT = 9000
ZC_QUEUE = 3
#: The zero-copy leg's first area and what ``--grow`` may add up to (events + areas, 7.3).
ZC_AREA, ZC_GROW = "4M", "16M"


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


def demo_topology(name: str, flows: int, per_flow: int, zc_bytes: int, queues: int = 4
                  ) -> Topology:
    """The demo's run as data: eth0 with ``queues`` queues and the ntuple rule to
    :data:`ZC_QUEUE`; zcrx-server there (app:0), copy-server on RSS (app:1).  Traffic is
    separate (:func:`demo_traffic`): the demo reads the queue bindings before it starts."""
    zc = ["-p", str(ZC_PORT), "-i", "eth0", "-q", str(ZC_QUEUE), "-v", "-n", "1",
          "-s", str(zc_bytes), "-E", "-S", ZC_AREA, "--grow", ZC_GROW,
          "--json", "{rundir}/zcrx-server.json"]
    cp = ["-p", str(COPY_PORT), "-v", "-n", str(flows), "-s", str(per_flow),
          "--json", "{rundir}/copy-server.json"]
    rule = f"-N eth0 flow-type tcp4 dst-port {ZC_PORT} action {ZC_QUEUE}"
    return Topology(name=name, netdevs=[NetdevConfig(NetdevSpec(queues=queues), [rule])],
                    apps=[AppSpec("zcrx-server", zc, cap_net_admin=True),
                          AppSpec("copy-server", cp)])


def demo_traffic(flows: int, per_flow: int, zc_bytes: int) -> list[TrafficSpec]:
    """The demo's generator sources, in start order."""
    return [TrafficSpec(port=ZC_PORT, flows=1, bytes=zc_bytes),
            TrafficSpec(port=COPY_PORT, flows=flows, bytes=per_flow)]


def run_demo(flows: int = 3, per_flow: int = 64 << 20, zc_bytes: int = 256 << 20,
             queues: int = 4, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; return the summary.  Raises (after teardown) if anything failed."""
    if queues <= ZC_QUEUE:
        raise ValueError(f"the demo needs at least {ZC_QUEUE + 1} queues")
    name = f"demo-{secrets.token_hex(2)}"
    topo = demo_topology(name, flows, per_flow, zc_bytes, queues)
    # What the topology amounts to, as a user would type it.
    say(f"$ zcrx up --name {name} --netdev eth0:queues={queues}")
    for line in topo.netdevs[0].ethtool:
        say(f"$ zcrx ethtool {line}")
    for app in topo.apps:
        say(f"$ zcrx app run --detach {app.program} -- "
            f"{' '.join(a for a in app.args[:app.args.index('--json')])}")
    run, _ = bring_up(topo, traffic=False)
    zc_json = run.dir / "zcrx-server.json"
    cp_json = run.dir / "copy-server.json"
    legs: list[dict[str, Any]] = []
    grow: dict[str, Any] = {}
    try:
        kernel = ControlClient(run.endpoint("kernel"), timeout_ms=20_000)
        binding = [q["binding"] for q in kernel.call("status", {})["netdevs"][0]["rx_queues"]]

        t0 = time.monotonic()
        for t in demo_traffic(flows, per_flow, zc_bytes):
            say(f"$ zcrx traffic --flows {t.flows} --port {t.port} --bytes {t.bytes}")
            start_traffic(run, [t])
        if shutil.which("nc"):
            # As `zcrx app run` and `zcrx wire` in the live run, once the generator flows
            # are going (the port is picked just before it is used).
            port = _free_port()
            nc_json = run.dir / "nc-server.json"
            run.spawn("app:2", APPS["copy-server"],
                      ["-p", str(port), "-n", "1", "--json", str(nc_json)], notify=True)
            say(f"$ zcrx wire --port {port}; nc -N 127.0.0.1 {port} < random-16MiB")
            start_traffic(run, [TrafficSpec(kind="wire", port=port)])
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
            if role == "app:0" and rep.get("zcrx"):
                z0 = rep["zcrx"]
                grow = {"events": z0.get("events", {}), "areas": z0.get("areas", 1),
                        "area_bytes": z0.get("area_bytes", 0)}
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
                 "live_ifqs": len(zc["ifqs"]), **grow},
        "tcp": st["tcp"], "leftovers_removed": down["segments_removed"],
        "verified": all(leg["verified"] for leg in legs),
    }
