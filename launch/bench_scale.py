"""``zcrx bench scale``: how setup, goodput and teardown change with the number of zcrx queues.

For every point N (``--queues 1,2,4,...``) the bench brings up a **fresh run** (one run per
point, so "up" and "down" are measured as a user sees them): the NIC and kernel processes with
one netdev ``eth0`` of N+1 RX queues (queue 0 takes RSS default traffic: ``-X eth0 equal 1``),
then N zero-copy queues 1..N, each bound to its own ifq by its own
:mod:`app_proc.zcrx_server` (the server takes one queue) listening on port ``9000 + queue``,
with one ntuple rule per queue (``-N eth0 flow-type tcp4 dst-port 9000+q action q``).  The
device has at most :data:`shared.nicif.MAX_QUEUES` (64) queues: at N = 64 there is no spare
queue, so queue 0 is bound as well and the zero-copy queues are 0..63 (the report says so in
``queues_total`` / ``zc_queues``).

Then one generator flow per queue (``nic.traffic``: ``--mib-per-queue`` MiB of pattern bytes,
stream id = source port) starts, and the bench waits for every server to exit by itself after
its one connection.  Every server verifies every byte against :mod:`shared.pattern` in place
(``-v``, no hash) and checks its byte count; a point whose bytes do not verify says so and its
goodput is not a result.

Figures per point:

* **up s**: the point's topology brought up (:func:`launch.supervise.bring_up`, as ``zcrx up``
  does): ``Run`` creation + NIC + kernel processes ready + its RSS/ntuple ethtool lines.
* **bind s**: starting the servers (all at once, then waiting for each) until every one
  listens (each has registered its ifq, bound its queue and armed its accept by then); with
  the run's fork server (the default; ``--no-fork-server``: a new interpreter each) they are
  forked from its template in one batch (:meth:`launch.run.Run.spawn_apps`: every fork
  asked for before any is waited for, the CAP_NET_ADMIN grants pipelined).  ``setup s`` =
  up + bind.
* **goodput GB/s** (wall): the sum of delivered bytes / (the last server's exit - the start
  of traffic), as the launcher sees it; **app GB/s**: the same bytes / (the latest server's
  last data batch - the earliest server's first data CQE), the apps' own
  ``time.monotonic_ns()`` (a system-wide clock).
* **down s**: :meth:`launch.run.Run.down` (every process stopped, every segment removed).

``--apps`` says how the N queues are served: ``per-queue`` (the default, above: one server
and one port per queue, rules on the destination port), ``one`` (a single server on all N
queues: ``-q`` lists them, one ifq per queue on its one ring, each connection served by the
ifq of its queue as ``SO_INCOMING_NAPI_ID`` tells) or a number A (A servers, the queues dealt
out in contiguous groups).  When a server holds several queues its flows share its port, so
the rules steer each flow by its source port (``-N eth0 flow-type tcp4 src-port 20000+q
action q``).  **ratio** is a point's app GB/s over the 1-queue point's of the same run (or
the first point's when 1 is not measured).

What the curve means on this machine (2 cores shared by NIC, kernel and N app processes):
total goodput **cannot** scale with the number of queues here, because the NIC and kernel
processes are single loops and there are only two cores; more queues only add per-queue work
(more rings to poll, more processes to schedule).  The point of the curve is the cost side:
how setup and teardown grow with N (process starts, region creation, DMA maps, ifq
registration; and their reverse) and how much per-queue overhead eats into goodput.

Memory: sized so 64 queues fit easily: NIC rings of :data:`RX_RING` entries of 4 KiB per
queue, and per server an area of :data:`AREA` bytes with :data:`CQ_ENTRIES` per queue
(``cq_entries_for``) / :data:`RQ_ENTRIES` (64 x (4 MiB ring + 8 MiB area), under 1 GiB,
plus the processes).

Ownership: this module creates and owns nothing in shared memory itself; the run's NIC,
kernel and servers own their regions, and ``Run.down`` removes them whatever happens.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from launch.bench_rx import (
    MTU,
    BenchFailed,
    BenchRun,
    Progress,
    _alive,
    _expected,
    _tail,
    _terminate_as_interrupt,
)
from launch.run import AppStart
from shared.errors import PeerGone, Timeout
from shared.nicif import MAX_QUEUES

#: Queue counts measured by default.
DEFAULT_QUEUES = tuple(1 << i for i in range(MAX_QUEUES.bit_length()))  # 1, 2, ..., 64
#: Default MiB of traffic per queue (one flow each; the CLI's --mib-per-queue default).
#: Large enough that a point's wall time is not all process start and exit.
DEFAULT_MIB = 16
#: NIC RX ring entries per queue (4 KiB buffers): 4 MiB per queue, 256 MiB at 64 queues.
#: 256 entries starved the single-queue point (0.48 GB/s app vs 1.35 with 1024).
RX_RING = 1024
#: Area bytes per server (2048 niovs of 4 KiB: 512 MiB at 64 queues), CQ and RQ entries.
AREA = 8 << 20
#: CQ entries per queue of each server (``app_proc.zcrx_server.cq_entries_for``)
CQ_ENTRIES = 4096
RQ_ENTRIES = 4096
BASE_PORT = 9000
BASE_SPORT = 20000
_READY_S = 60.0


#: ``--apps`` values besides a number.
APPS_PER_QUEUE = "per-queue"
APPS_ONE = "one"


def app_groups(zq: list[int], apps: str) -> list[list[int]]:
    """The zero-copy queues dealt out to servers: ``per-queue`` one each, ``one`` all in one,
    ``"A"`` A contiguous groups (fewer when there are fewer queues)."""
    if apps == APPS_PER_QUEUE:
        return [[q] for q in zq]
    if apps == APPS_ONE:
        return [list(zq)]
    try:
        a = int(apps)
    except ValueError:
        raise BenchFailed(f"--apps {apps!r}: per-queue, one or a number") from None
    if a < 1:
        raise BenchFailed(f"--apps {apps!r}: at least one app")
    a = min(a, len(zq))
    size, extra = divmod(len(zq), a)
    out, i = [], 0
    for g in range(a):
        n = size + (g < extra)
        out.append(list(zq[i:i + n]))
        i += n
    return out


@dataclass
class ScalePoint:
    """One point of the curve."""

    queues: int
    queues_total: int
    zc_queues: list[int]
    apps: int = 0
    ratio: float = 0.0  # app GB/s over the 1-queue point's of the same run
    bytes: int = 0
    up_s: float = 0.0
    bind_s: float = 0.0
    wall_s: float = 0.0
    app_s: float = 0.0
    down_s: float = 0.0
    verified: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def setup_s(self) -> float:
        return self.up_s + self.bind_s

    @property
    def gbps(self) -> float:
        return self.bytes / self.wall_s / 1e9 if self.wall_s > 0 else 0.0

    @property
    def app_gbps(self) -> float:
        return self.bytes / self.app_s / 1e9 if self.app_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(setup_s=self.setup_s, gbps=self.gbps, app_gbps=self.app_gbps)
        return d


class ScaleRun(BenchRun):
    """A :class:`~launch.bench_rx.BenchRun` with small NIC rings (``rx`` entries per queue)
    and the point's RSS and ntuple settings in its topology."""

    def __init__(self, queues: int, rx: int = RX_RING, ethtool: Sequence[str] = (),
                 fork_server: bool = True) -> None:
        super().__init__(queues, rx, kind="scale", ethtool=ethtool, fork_server=fork_server)


def zc_layout(n: int, max_queues: int = MAX_QUEUES) -> tuple[int, list[int]]:
    """``(queues on the netdev, zero-copy queues)`` for ``n`` zero-copy queues: queue 0 stays
    for RSS while there is room (``n + 1 <= max_queues``), else every queue is zero copy."""
    if not 1 <= n <= max_queues:
        raise BenchFailed(f"{n} zero-copy queues: must be in [1, {max_queues}]")
    total = min(n + 1, max_queues)
    return total, list(range(total - n, total))


def measure_point(n: int, mib_per_queue: float = DEFAULT_MIB, *, timeout: float = 300.0,
                  progress: Progress | None = None, apps: str = APPS_PER_QUEUE,
                  fork_server: bool = True, payload: int | None = None) -> ScalePoint:
    """Bring up a run with ``n`` bound zero-copy queues, one flow each, served by the servers
    ``apps`` says, the generator sending ``payload`` bytes per segment (default: the MSS);
    tear it down."""
    from app_proc.zcrx_server import cq_entries_for

    say = progress or (lambda m: None)
    total, zq = zc_layout(n)
    groups = app_groups(zq, apps)
    shared_port = any(len(g) > 1 for g in groups)
    port_of = {q: BASE_PORT + g[0] for g in groups for q in g}
    per_flow = max(1, int(mib_per_queue * (1 << 20)))
    pt = ScalePoint(n, total, zq, apps=len(groups))
    t0 = time.monotonic()
    say(f"{n} queue(s): up")
    # RSS keeps queue 0 when it is not zero copy; one ntuple rule per zero-copy queue (by
    # source port when a server's queues share its port).
    ethtool = [] if 0 in zq else ["-X eth0 equal 1"]
    ethtool += [f"-N eth0 flow-type tcp4 src-port {BASE_SPORT + q} action {q}"
                if shared_port else
                f"-N eth0 flow-type tcp4 dst-port {BASE_PORT + q} action {q}" for q in zq]
    br = ScaleRun(total, ethtool=ethtool, fork_server=fork_server)
    try:
        t1 = time.monotonic()
        pt.up_s = t1 - t0
        say(f"{n} queue(s): binding")
        roles: dict[int, str] = {}  # first queue of each group -> role
        members = {g[0]: g for g in groups}
        starts = []
        for g in groups:
            q = g[0]
            role = f"app:zc{q}"
            out = br.run.dir / f"zc{q}.json"
            args = ["-p", str(BASE_PORT + q), "-i", "eth0", "-q", ",".join(map(str, g)), "-v",
                    "--no-hash", "--quiet", "-n", str(len(g)), "-s", str(per_flow),
                    "-S", str(AREA),
                    "-C", str(cq_entries_for(len(g), CQ_ENTRIES)), "-R", str(RQ_ENTRIES),
                    "--json", str(out),
                    "--seconds", str(timeout)]
            starts.append(AppStart(role, "app_proc.zcrx_server", args, detach=False,
                                   notify=True, ready_timeout=_READY_S, cap_net_admin=True))
            roles[q] = role
        br.run.spawn_apps(starts)  # one batch: forked together, granted together
        for q, role in roles.items():  # all started at once, as a host bringing up its
            try:                        # servers would: their starts overlap
                br.run.wait_started(role)
            except (PeerGone, Timeout) as e:
                failed = br.run.m.procs.get(role)
                raise BenchFailed(f"server of queue {q} did not start: "
                                  f"{_tail(failed.log) if failed else e}") from None
        t2 = time.monotonic()
        pt.bind_s = t2 - t1
        say(f"{n} queue(s): traffic")
        procs = {q: br.run.m.procs[r].process() for q, r in roles.items()}
        t_start = time.monotonic()
        # One pipelined batch: the NIC starts every flow in one pass of its control socket
        # (a call each, a new client apiece, took ~15-30 ms per flow on a NIC already busy
        # with the first flows: the starts of 64 flows spread over up to 2 s).
        br.call_many("nic", [("nic.traffic", {"dev": "eth0", "spec": {
            "dport": port_of[q], "flows": 1, "bytes": per_flow,
            "sport": BASE_SPORT + q, "payload": payload or MTU - 40}}) for q in zq])
        deadline = t_start + timeout + 10
        t_done = t_start
        pending = dict(procs)
        while pending:
            for q, p in list(pending.items()):
                if not _alive(p):
                    t_done = time.monotonic()
                    del pending[q]
            if pending and time.monotonic() > deadline:
                raise BenchFailed(f"{n} queue(s): servers of queues {sorted(pending)} still "
                                  f"running after {timeout:.0f} s")
            time.sleep(0.002)
        pt.wall_s = t_done - t_start
        firsts, lasts = [], []
        for q, role in roles.items():
            br.run.stop(role)
            try:
                s = json.loads((br.run.dir / f"zc{q}.json").read_text())
            except (OSError, ValueError) as e:
                pt.problems.append(f"queue {q}: no summary ({e})")
                continue
            conns = s.get("connections", [])
            pt.bytes += sum(int(c["bytes"]) for c in conns)
            probs = list(s.get("errors", [])) + _expected(
                conns, per_flow, [BASE_SPORT + m for m in members[q]])
            if not s.get("ok"):
                probs.append("server not ok")
            pt.problems += [f"queue {q}: {p}" for p in probs]
            if s.get("first_ns") is not None and s.get("last_ns") is not None:
                firsts.append(int(s["first_ns"]))
                lasts.append(int(s["last_ns"]))
        if firsts:
            pt.app_s = (max(lasts) - min(firsts)) / 1e9
        pt.verified = not pt.problems and pt.bytes == per_flow * n
    finally:
        say(f"{n} queue(s): down")
        t3 = time.monotonic()
        br.down()
        pt.down_s = time.monotonic() - t3
    return pt


def run_scale_bench(queues: tuple[int, ...] = DEFAULT_QUEUES,
                    mib_per_queue: float = DEFAULT_MIB, timeout: float = 300.0,
                    progress: Progress | None = None,
                    apps: str = APPS_PER_QUEUE, fork_server: bool = True,
                    payload: int | None = None) -> dict[str, Any]:
    """Measure every point of ``queues`` (one run each); the JSON-able result.
    ``fork_server`` False starts every server as a new interpreter (``zcrx up
    --no-fork-server``), for the comparison."""
    points = []
    with _terminate_as_interrupt():
        for n in queues:
            points.append(measure_point(n, mib_per_queue, timeout=timeout, progress=progress,
                                        apps=apps, fork_server=fork_server,
                                        payload=payload))
    base = next((p for p in points if p.queues == 1), points[0] if points else None)
    for p in points:
        p.ratio = p.app_gbps / base.app_gbps if base is not None and base.app_gbps else 0.0
    return {
        "bench": "scale", "apps": apps, "fork_server": fork_server,
        "mib_per_queue": mib_per_queue, "rx_ring": RX_RING,
        "area_bytes": AREA, "payload": min(payload or MTU - 40, MTU - 40),
        "points": [p.to_dict() for p in points],
        "all_verified": all(p.verified for p in points),
    }


def plot(result: dict[str, Any], path: str) -> None:
    """Write the curve as a PNG (needs matplotlib: the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchFailed("--plot needs matplotlib: pip install 'zcrx-emu[plot]'") from None
    pts = result["points"]
    xs = [p["queues"] for p in pts]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(xs, [p["gbps"] for p in pts], "o-", label="wall GB/s")
    a1.plot(xs, [p["app_gbps"] for p in pts], "s--", label="app GB/s")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("zero-copy queues")
    a1.set_ylabel("total goodput (GB/s)")
    a1.legend()
    for key, label in (("up_s", "up"), ("bind_s", "bind"), ("down_s", "down")):
        a2.plot(xs, [p[key] for p in pts], "o-", label=label)
    a2.set_xscale("log", base=2)
    a2.set_xlabel("zero-copy queues")
    a2.set_ylabel("seconds")
    a2.legend()
    fig.suptitle(f"zcrx bench scale ({result['mib_per_queue']} MiB per queue, 2 cores)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
