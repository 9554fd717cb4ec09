"""``zcrx soak``: mixed traffic for minutes, apps coming and going, random app kills; is it flat?

One run for the whole soak (one netdev ``eth0`` with 3 queues, the topology of
:mod:`launch.chaos`: an ntuple rule steers port 8000 to queue 1 where a zcrx-server binds an
ifq, RSS sends the rest to queue 0 where a copy-server listens on port 8001).  The NIC and the
kernel live as long as the soak; the apps do not.  Each *round*:

1. starts a zcrx-server (``app:0``) and a copy-server (``app:1``), each for one connection of
   ``size`` bytes, then one generator flow to each (zero copy and the copy path), paced to last
   about ``transfer_s`` seconds, with a source port of its own per round;
2. with probability ``kill_p`` SIGKILLs one of the two apps once a random fraction of the
   round's bytes went through the NIC (the kill plan comes from ``random.Random(seed)`` alone;
   the moment is the one the kernel's stats show, so a replay kills the same app at about the
   same point); it reuses :mod:`launch.chaos`'s checks: a dead app is torn down, the survivor
   finishes byte-exact (a *late* kill found the app already done: nothing killed);
3. waits until the run is idle again: no task left in the kernel, no ifq, queue 1 back on
   kernel pages, no app segment.  A round that cannot get there within ``idle_bound`` is a
   violation.

Only apps are killed: a killed NIC or kernel would be a new process whose memory starts from
zero, and the point here is whether the long-lived roles leak what the coming and going apps
leave behind (tasks, rings, ifqs, skbs, segments, sockets, fds).  ``zcrx chaos`` kills them.

Samples: after each round at idle (the comparable points) and once mid-round (apps alive),
per role (``nic``, ``kernel``, ``apps`` summed over live apps): RSS, open fds and the run's
``/dev/shm`` segments the role owns (by the owner field of the name; an app's rings are the
kernel's regions and counted there).  The verdict compares the idle samples after a warm-up
(the first quarter of the soak, at least one round): RSS slope (Theil-Sen) in MiB per
minute, fds and segments first vs last.  Flat means within :data:`BOUNDS`.

Ownership: this module owns nothing in shared memory; it reads ``/proc`` (psutil), the
kernel's stats over the control plane and the apps' report files in the run directory, and
:meth:`launch.run.Run.down` removes the run whatever happens.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable
from typing import Any

from launch import chaos
from launch.run import Run
from launch.supervise import bring_up, start_traffic
from launch.topology import Topology, TrafficSpec
from shared.errors import ZcrxError
from shared.shm import list_run_segments

#: The roles sampled; ``apps`` is the sum over the apps alive at the sample.
ROLES = ("nic", "kernel", "apps")
#: What "flat" means for ``--check`` (idle samples after the warm-up): RSS growth of the NIC
#: and the kernel in MiB per minute (Theil-Sen; at about 25 rounds a minute 1 MiB/min is
#: some 40 KiB kept per round, far above what a settled Python heap drifts), open fds (one
#: or two come and go with the control plane) and segments of the NIC and the kernel, last
#: minus first.
BOUNDS = {"rss_mib_per_min": 1.0, "fds": 2, "segments": 0}
#: Idle in the run: every dead app torn down within this many seconds.
IDLE_BOUND = 20.0
SPORT_BASE = 20000
#: Samples the slope looks at, at most (evenly thinned).
MAX_SLOPE_POINTS = 400


def _owner_role(name: str, run_id: str) -> str:
    """``/zcrx.<run>.<owner>.<tag>`` -> nic, kernel or apps."""
    owner = name[len(f"/zcrx.{run_id}."):].split(".", 1)[0]
    return owner if owner in ("nic", "kernel") else "apps"


def sample(run: Run, t0: float, phase: str, rnd: int) -> dict[str, Any]:
    """One sample: per role RSS (bytes), fds and segments, plus the kernel's task count."""
    out: dict[str, Any] = {"t_s": round(time.monotonic() - t0, 2), "phase": phase,
                           "round": rnd}
    for role in ROLES:
        out[role] = {"rss": 0, "fds": 0, "segments": 0, "procs": 0}
    for role, entry in list(run.m.procs.items()):
        key = role if role in ("nic", "kernel") else "apps" if role.startswith("app:") else ""
        p = entry.process() if key else None
        if p is None:
            continue
        with contextlib.suppress(Exception):  # it may exit between the two reads
            rss, fds = p.memory_info().rss, p.num_fds()
            out[key]["rss"] += rss
            out[key]["fds"] += fds
            out[key]["procs"] += 1
    for name in list_run_segments(run.run_id):
        out[_owner_role(name, run.run_id)]["segments"] += 1
    with contextlib.suppress(ZcrxError):
        out["tasks"] = len(chaos._kernel_call(run, "status")["tasks"])
    return out


def _idle(run: Run) -> bool:
    """No app process, no task in the kernel, no ifq, queue 1 back on kernel pages, no app
    segment."""
    if any(run.m.procs[r].process() is not None for r in run.app_roles()):
        return False
    status = chaos._kernel_call(run, "status")
    if status["tasks"] or status["zcrx"]:
        return False
    q = status["netdevs"][0]["rx_queues"][chaos.ZC_QUEUE]
    if q["provider"] != "none" or q["mp_draining"]:
        return False
    return not [n for n in list_run_segments(run.run_id)
                if _owner_role(n, run.run_id) == "apps"]


def _round(run: Run, topo: Topology, rnd: int, rng: random.Random, size: int,
           transfer_s: float, kill_p: float, t0: float,
           samples: list[dict[str, Any]]) -> chaos.Trial:
    """One round of apps and traffic (see the module docstring); returns its trial record
    (``role`` is the app killed, or ``none``)."""
    victim = rng.choice(sorted(chaos.APP_ROLES)) if rng.random() < kill_p else "none"
    fraction = round(rng.uniform(0.05, 0.6), 3)
    t = chaos.Trial(trial=rnd, role=victim, fraction=fraction)
    for rep in chaos.REPORTS.values():
        (run.dir / rep).unlink(missing_ok=True)
    for app in topo.apps:
        role = run.next_app_role()
        run.spawn(role, app.module, app.argv(str(run.dir), topo.name), detach=True,
                  notify=True, cap_net_admin=app.cap_net_admin)
    base = chaos._rx_bytes(chaos._kernel_call(run, "stats"))
    sport = SPORT_BASE + 2 * (rnd % 20000)
    rate = size / transfer_s
    start_traffic(run, [TrafficSpec(port=chaos.ZC_PORT, bytes=size, rate=rate, sport=sport),
                        TrafficSpec(port=chaos.COPY_PORT, bytes=size, rate=rate,
                                    sport=sport + 1)])
    total = 2 * size
    with chaos._kernel_client(run) as kernel:
        def progressed() -> bool:
            t.reached = round((chaos._rx_bytes(kernel.call("stats", {})) - base) / total, 3)
            return t.reached >= fraction

        t.check("progress", chaos._wait_until(progressed, 20.0, 0.005), "no traffic progress")
    samples.append(sample(run, t0, "busy", rnd))
    survivors = [a for a in chaos.APP_ROLES if a != victim]
    if victim != "none":
        try:
            run.signal(victim, "KILL")
            t.check("killed", True)
        except ZcrxError as e:
            t.late = chaos._exact(chaos._report(run, victim), size)[0]
            if not t.late:
                t.check("killed", False, str(e))
    if victim != "none" and not t.late:
        chaos._check_app_kill(t, run, victim, survivors, size, 15.0)
    else:
        chaos._check_survivors(t, run, list(chaos.APP_ROLES) if t.late else survivors, size,
                               15.0)
    for role in run.app_roles():
        run.stop(role)  # reaps it and frees app:0 / app:1 for the next round
    t.check("idle", chaos._wait_until(lambda: _idle(run), IDLE_BOUND, 0.05),
            f"not idle {IDLE_BOUND:.0f} s after the round")
    return t


def slope_per_min(xs_s: list[float], ys: list[float]) -> float:
    """Theil-Sen slope of ``ys`` against ``xs_s`` (seconds), per minute: the median of the
    slopes of every pair of samples, so one sample caught mid-allocation (the NIC's RSS jumps
    by a batch buffer and falls back) does not tilt it; 0 with fewer than 2 points."""
    pts = list(zip(xs_s, ys, strict=True))
    if len(pts) > MAX_SLOPE_POINTS:  # O(n^2) pairs: thin evenly
        step = len(pts) / MAX_SLOPE_POINTS
        pts = [pts[int(i * step)] for i in range(MAX_SLOPE_POINTS)]
    slopes = sorted((y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(pts)
                    for x2, y2 in pts[i + 1:] if x2 != x1)
    if not slopes:
        return 0.0
    mid = len(slopes) // 2
    med = slopes[mid] if len(slopes) % 2 else (slopes[mid - 1] + slopes[mid]) / 2
    return 60.0 * med


def verdict(samples: list[dict[str, Any]], minutes: float,
            bounds: dict[str, float] | None = None) -> dict[str, Any]:
    """Growth per role over the idle samples after the warm-up, and whether it is flat."""
    b = bounds or BOUNDS
    idle = [s for s in samples if s["phase"] == "idle"]
    warm = minutes * 60 / 4
    after = [s for s in idle if s["t_s"] >= warm] or idle[-1:]
    if len(after) < 2 and len(idle) >= 2:
        after = idle[1:] if len(idle) > 2 else idle
    growth: dict[str, Any] = {}
    problems: list[str] = []
    for role in ("nic", "kernel"):
        xs = [s["t_s"] for s in after]
        rss = [s[role]["rss"] / 2**20 for s in after]
        g = {"rss_first_mib": round(rss[0], 1) if rss else 0.0,
             "rss_last_mib": round(rss[-1], 1) if rss else 0.0,
             "rss_mib_per_min": round(slope_per_min(xs, rss), 3),
             "fds_first": after[0][role]["fds"] if after else 0,
             "fds_last": after[-1][role]["fds"] if after else 0,
             "segments_first": after[0][role]["segments"] if after else 0,
             "segments_last": after[-1][role]["segments"] if after else 0}
        growth[role] = g
        if g["rss_mib_per_min"] > b["rss_mib_per_min"]:
            problems.append(f"{role} RSS grows {g['rss_mib_per_min']:.2f} MiB/min "
                            f"(bound {b['rss_mib_per_min']:g})")
        if g["fds_last"] - g["fds_first"] > b["fds"]:
            problems.append(f"{role} fds {g['fds_first']} -> {g['fds_last']}")
        if g["segments_last"] - g["segments_first"] > b["segments"]:
            problems.append(f"{role} segments {g['segments_first']} -> {g['segments_last']}")
    app_left = [s for s in idle if s["apps"]["segments"] or s["apps"]["procs"]
                or s.get("tasks", 0)]
    if app_left:
        problems.append(f"{len(app_left)} idle sample(s) with an app's task, process or "
                        "segment left")
    busy = [s for s in samples if s["phase"] == "busy" and s["apps"]["procs"]]
    growth["apps"] = {
        "rss_per_app_mib_first": round(busy[0]["apps"]["rss"] / busy[0]["apps"]["procs"]
                                       / 2**20, 1) if busy else 0.0,
        "rss_per_app_mib_last": round(busy[-1]["apps"]["rss"] / busy[-1]["apps"]["procs"]
                                      / 2**20, 1) if busy else 0.0,
        "idle_samples_with_leftovers": len(app_left)}
    return {"warmup_s": round(warm, 1), "samples_used": len(after), "bounds": dict(b),
            "growth": growth, "flat": not problems, "problems": problems}


def run_soak(minutes: float, seed: int = 0, *, size: int = 4 << 20, transfer_s: float = 1.0,
             kill_p: float = 0.5, name: str = "soak",
             say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Soak for ``minutes`` (the last round may run over); returns ``{"seed", "minutes",
    "rounds", "kills", "late", "violations": [str], "samples": [...], "verdict": {...}}``."""
    note = say or (lambda _m: None)
    rng = random.Random(seed)
    topo = chaos.topology(name, size, size / transfer_s)
    up = Topology(name=topo.name, netdevs=topo.netdevs)  # apps and traffic come per round
    samples: list[dict[str, Any]] = []
    trials: list[chaos.Trial] = []
    run, _ = bring_up(up, detach=False, launcher=True)
    t0 = time.monotonic()
    try:
        samples.append(sample(run, t0, "idle", -1))
        rnd = 0
        while time.monotonic() - t0 < minutes * 60:
            t = _round(run, topo, rnd, rng, size, transfer_s, kill_p, t0, samples)
            trials.append(t)
            s = sample(run, t0, "idle", rnd)
            samples.append(s)
            note(f"round {rnd} at {s['t_s']:.0f} s: kill {t.role}"
                 f"{' (late)' if t.late else ''}: "
                 + ("ok" if not t.violations else "; ".join(t.violations)[:200])
                 + f"; kernel {s['kernel']['rss'] / 2**20:.1f} MiB {s['kernel']['fds']} fds, "
                 f"nic {s['nic']['rss'] / 2**20:.1f} MiB {s['nic']['fds']} fds")
            if t.violations and not t.checks.get("idle", True):
                break  # the run did not get back to idle: later rounds would not compare
            rnd += 1
    finally:
        with contextlib.suppress(ZcrxError):
            run.down()
    v = verdict(samples, minutes)
    return {"seed": seed, "minutes": minutes, "size": size,
            "seconds": round(time.monotonic() - t0, 1), "rounds": len(trials),
            "kills": sum(1 for t in trials if t.checks.get("killed")),
            "late": sum(t.late for t in trials),
            "violations": [f"round {t.trial}: {v}" for t in trials for v in t.violations],
            "samples": samples, "verdict": v}


def plot(result: dict[str, Any], path: str) -> None:
    """RSS, fds and segments per role over time as a PNG (needs matplotlib: the ``plot``
    extra).  ImportError if matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, label, scale in ((axes[0], "rss", "RSS (MiB)", 2**20),
                                  (axes[1], "fds", "open fds", 1),
                                  (axes[2], "segments", "/dev/shm segments", 1)):
        for role in ROLES:
            pts = [s for s in samples if role != "apps" or s["phase"] == "busy"]
            if role != "apps":
                pts = [s for s in pts if s["phase"] == "idle"]
            ax.plot([s["t_s"] / 60 for s in pts], [s[role][key] / scale for s in pts],
                    ".-", label=role + (" (mid-round)" if role == "apps" else " (idle)"))
        ax.set_xlabel("minutes")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"zcrx soak: {result['rounds']} rounds, seed {result['seed']}, "
                 f"{'flat' if result['verdict']['flat'] else 'NOT flat'}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
