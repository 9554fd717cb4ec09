"""Chaos: kill a random role of a live run at a random moment and check the survivors.

Each trial brings up its own small run (one netdev ``eth0`` with 3 queues; an ntuple rule
steers port 8000 to queue 1 where a zcrx-server binds an ifq; RSS sends everything else to
queue 0 where a copy-server listens on port 8001; one generator flow of ``size`` bytes per
app), waits until a random fraction of the transfer went through the NIC (progress in the
kernel's stats), SIGKILLs a random role and checks what DESIGN §6 promises:

* ``teardown``: after an app kill the kernel counts the death; after a zcrx-server kill its
  ifq is destroyed and queue 1 is back on kernel pages (polled with a deadline);
* ``survivor``: a surviving app's JSON report is ok and byte-exact (verified, full size);
* ``exit``: after a NIC or kernel kill every app exits by itself within ``exit_bound``
  seconds with a clear error (a failed report or a "kernel gone" line in its log), or
  with a byte-exact report: its whole stream was verified before the kill reached it;
* ``down``: :meth:`Run.down` then no process tagged with the run and no ``/dev/shm``
  segment of the run.

A kill is *late* when the victim is an app that already finished its whole stream
byte-exact (the progress sampler lagged behind a fast transfer, e.g. on a loaded
machine): nothing was tested, nothing broke; the trial says so and counts no kill and no
violation.  A NIC or kernel that exited before its kill is a violation.

The choice sequence (role, app, fraction per trial) comes from ``random.Random(seed)`` alone,
so a seed always replays the same kills.  This module owns no shared memory: it only reads
stats over the control plane and the apps' report files in the run directory.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from launch.run import Run, cleanup, tagged_processes
from launch.supervise import bring_up
from launch.topology import Topology
from shared.errors import Misuse, ZcrxError
from shared.shm import list_run_segments

#: Roles ``--roles`` accepts.
ROLES = ("nic", "kernel", "app")
ZC_PORT = 8000
COPY_PORT = 8001
ZC_QUEUE = 1
#: The zcrx-server is app:0, the copy-server app:1 (file order of the topology).
APP_ROLES = {"app:0": "zcrx-server", "app:1": "copy-server"}
REPORTS = {"app:0": "zc.json", "app:1": "cp.json"}


def topology(name: str, size: int, rate: float = 0.0) -> Topology:
    """The per-trial topology: zcrx-server on queue 1, copy-server on queue 0."""
    gen: dict[str, Any] = {"kind": "generator", "dev": "eth0", "flows": 1, "bytes": size}
    if rate:
        gen["rate"] = rate
    return Topology.from_dict({
        "name": name,
        "netdev": [{"name": "eth0", "queues": 3, "mtu": 4136,
                    "ethtool": [f"-N eth0 flow-type tcp4 dst-port {ZC_PORT} action {ZC_QUEUE}",
                                "-X eth0 equal 1"]}],
        "app": [
            {"program": "zcrx-server", "cap_net_admin": True,
             "args": ["-p", str(ZC_PORT), "-i", "eth0", "-q", str(ZC_QUEUE), "-v", "-n", "1",
                      "-s", str(size), "--json", "{rundir}/" + REPORTS["app:0"]]},
            {"program": "copy-server",
             "args": ["-p", str(COPY_PORT), "-v", "-n", "1", "-s", str(size),
                      "--json", "{rundir}/" + REPORTS["app:1"]]},
        ],
        "traffic": [{**gen, "port": ZC_PORT}, {**gen, "port": COPY_PORT}],
    })


def plan(trials: int, seed: int, roles: tuple[str, ...] = ROLES) -> list[dict[str, Any]]:
    """The deterministic kill plan: per trial the role (``nic``, ``kernel``, ``app:N``) and
    the fraction of the transfer at which it dies.  Misuse EINVAL on an unknown role."""
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise Misuse(f"bad --roles {','.join(roles)}: choose from {','.join(ROLES)}", errno=22)
    rng = random.Random(seed)
    out = []
    for _ in range(trials):
        kind = rng.choice(roles)
        role = rng.choice(sorted(APP_ROLES)) if kind == "app" else kind
        out.append({"role": role, "fraction": round(rng.uniform(0.05, 0.6), 3)})
    return out


@dataclass
class Trial:
    """One trial's outcome: ``checks`` maps a check name to passed; ``violations`` says why
    each failed one failed."""

    trial: int
    role: str
    fraction: float
    reached: float = 0.0
    checks: dict[str, bool] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: After a NIC or kernel kill: seconds until every app (and the NIC) had exited.
    exit_s: float | None = None
    #: The victim app had already finished its stream byte-exact: nothing was killed.
    late: bool = False

    def check(self, name: str, ok: bool, why: str = "") -> bool:
        self.checks[name] = self.checks.get(name, True) and ok
        if not ok:
            self.violations.append(f"{name}: {why}" if why else name)
        return ok


def _kernel_client(run: Run, timeout_ms: int = 3000) -> Any:
    import shared.nicif
    import shared.syscalls  # noqa: F401  (register the message types)
    from shared.control import ControlClient

    return ControlClient(run.endpoint("kernel"), timeout_ms=timeout_ms)


def _kernel_call(run: Run, type_: str, timeout_ms: int = 3000) -> dict[str, Any]:
    with _kernel_client(run, timeout_ms) as c:
        res: dict[str, Any] = c.call(type_, {})
        return res


def _rx_bytes(st: dict[str, Any]) -> int:
    return sum(q.get("rx_bytes", 0) for dev in st.get("netdevs", {}).values()
               for q in dev.values())


def _wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ZcrxError):
            if cond():
                return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step)


def _report(run: Run, role: str) -> dict[str, Any] | None:
    try:
        rep: dict[str, Any] = json.loads((run.dir / REPORTS[role]).read_text())
        return rep
    except (OSError, ValueError):
        return None


def _exact(rep: dict[str, Any] | None, size: int) -> tuple[bool, str]:
    """Whether an app report says ok and byte-exact for one connection of ``size`` bytes."""
    if rep is None:
        return False, "no report"
    conns = rep.get("connections") or []
    ok = (bool(rep.get("ok")) and len(conns) == 1 and conns[0].get("bytes") == size
          and conns[0].get("bad_offset") is None and conns[0].get("ok"))
    return ok, "" if ok else json.dumps(rep)[:300]


def _log_tail(run: Run, role: str) -> str:
    e = run.m.procs.get(role)
    if e is None:
        return ""
    try:
        return Path(e.log).read_text()[-2000:]
    except OSError:
        return ""


def _gone(run: Run, role: str) -> bool:
    e = run.m.procs.get(role)
    return e is None or e.process() is None


def run_trial(index: int, role: str, fraction: float, size: int, *, name: str = "chaos",
              exit_bound: float = 15.0, transfer_s: float = 1.0,
              delay_s: float = 0.0) -> Trial:
    """Bring up a run, kill ``role`` at ``fraction`` of the transfer, check, tear down.

    Each flow is paced to last about ``transfer_s`` seconds so the kill lands mid-stream;
    ``delay_s``: before the kill, wait up to that long for the victim to exit by itself
    (tests use it to force a late kill).
    """
    t = Trial(trial=index, role=role, fraction=fraction)
    t0 = time.monotonic()
    total = 2 * size
    run: Run | None = None
    try:
        run, _ = bring_up(topology(name, size, size / transfer_s))
        reached = [0]
        # One client for the whole sampling loop: a connect per sample is slower, and
        # on a loaded machine the kill would land later than planned.
        with _kernel_client(run) as kernel:
            def progressed() -> bool:
                reached[0] = _rx_bytes(kernel.call("stats", {}))
                return reached[0] >= fraction * total

            t.check("progress", _wait_until(progressed, 20.0, 0.005), "no traffic progress")
        t.reached = round(reached[0] / total, 3)
        if delay_s:
            _wait_until(functools.partial(_gone, run, role), delay_s, 0.02)
        t_kill = time.monotonic()
        try:
            run.signal(role, "KILL")
            t.check("killed", True)
        except Misuse as e:  # it already exited: the transfer outran the sampling
            # finished byte-exact before the kill: late (see the module docstring)
            t.late = role in APP_ROLES and _exact(_report(run, role), size)[0]
            if not t.late:
                t.check("killed", False, str(e))
        survivors = [a for a in APP_ROLES if a != role]
        if t.late:
            _check_survivors(t, run, survivors, size, exit_bound)
        elif role in APP_ROLES:
            _check_app_kill(t, run, role, survivors, size, exit_bound)
        else:
            _check_peer_kill(t, run, role, size, exit_bound)
            t.exit_s = round(time.monotonic() - t_kill, 2)
    except ZcrxError as e:
        t.check("run", False, f"{type(e).__name__}: {e}")
    finally:
        if run is not None:
            _check_down(t, run)
        else:
            with contextlib.suppress(ZcrxError):
                cleanup(name)
    t.seconds = round(time.monotonic() - t0, 2)
    return t


def _check_app_kill(t: Trial, run: Run, role: str, survivors: list[str], size: int,
                    exit_bound: float) -> None:
    def teardown_done() -> bool:
        st = _kernel_call(run, "stats")
        if st.get("kernel", {}).get("app_deaths", 0) < 1:
            return False
        if role != "app:0":
            return True
        if st["zcrx"]["counters"].get("destroyed", 0) < 1:
            return False
        q = _kernel_call(run, "status")["netdevs"][0]["rx_queues"][ZC_QUEUE]
        return bool(q["provider"] == "none" and not q["mp_draining"])

    t.check("teardown", _wait_until(teardown_done, 10.0),
            "dead app not torn down (ifq / queue provider)")
    _check_survivors(t, run, survivors, size, exit_bound)
    if role == "app:0":
        st = _kernel_call(run, "stats")["zcrx"]
        t.check("ledger", st["ifqs"] == [] and st["ledger"]["niovs"] == 0,
                f"ifqs left {st['ifqs']}")


def _check_survivors(t: Trial, run: Run, survivors: list[str], size: int,
                     exit_bound: float) -> None:
    for s in survivors:
        finished = _wait_until(functools.partial(_gone, run, s), exit_bound + 20, 0.02)
        ok, why = _exact(_report(run, s), size)
        t.check("survivor", finished and ok,
                f"{s} {'' if finished else 'still running '}{why} {_log_tail(run, s)[-300:]}")


def _check_peer_kill(t: Trial, run: Run, role: str, size: int, exit_bound: float) -> None:
    waiting = list(APP_ROLES) + (["nic"] if role == "kernel" else [])
    for w in waiting:
        exited = _wait_until(functools.partial(_gone, run, w), exit_bound, 0.02)
        t.check("exit", exited, f"{w} still running {exit_bound:.0f} s after {role} kill")
        if not exited or w == "nic":
            continue
        rep = _report(run, w)
        log = _log_tail(run, w)
        if _exact(rep, size)[0]:
            clear = True  # its whole stream arrived, verified, before the kill reached it
        elif role == "kernel":
            clear = "kernel gone" in log
        else:
            failed = rep is not None and not rep.get("ok")
            said = rep is not None and (bool(rep.get("errors")) or any(
                c.get("error") for c in rep.get("connections", [])))
            clear = failed and said
        t.check("exit", clear, f"{w} gave no clear error: {json.dumps(rep)[:200]} {log[-200:]}")


def _check_down(t: Trial, run: Run) -> None:
    entries = list(run.m.procs.values())
    try:
        run.down()
    except ZcrxError as err:
        t.check("down", False, f"down: {err}")
    for e in entries:  # collect every exit status of a child of ours (no zombie left)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(e.pid, os.WNOHANG)
    left = tagged_processes(run.run_id)
    left += [p for e in entries if (p := e.process()) is not None and p not in left]
    segs = list_run_segments(run.run_id)
    t.check("down", not left and not segs,
            f"left processes {[p.pid for p in left]} segments {segs}")
    for p in left:  # never leak into the next trial
        with contextlib.suppress(Exception):
            p.kill()
    with contextlib.suppress(ZcrxError):
        cleanup(run.m.name)


def run_chaos(trials: int, seed: int, roles: tuple[str, ...] = ROLES, size: int = 4 << 20,
              say: Callable[[Trial], None] | None = None,
              transfer_s: float = 1.0) -> dict[str, Any]:
    """Run the plan; returns ``{"seed", "roles", "size", "trials": [Trial dicts], "totals":
    {"trials", "kills": {kind: n}, "violations"}}``.  Misuse EINVAL on a bad role."""
    results = []
    for i, p in enumerate(plan(trials, seed, roles)):
        t = run_trial(i, p["role"], p["fraction"], size, transfer_s=transfer_s)
        results.append(t)
        if say is not None:
            say(t)
    kills: dict[str, int] = {}
    for t in results:
        if t.checks.get("killed"):
            kind = "app" if t.role.startswith("app") else t.role
            kills[kind] = kills.get(kind, 0) + 1
    return {"seed": seed, "roles": list(roles), "size": size,
            "trials": [asdict(t) for t in results],
            "totals": {"trials": len(results), "kills": kills,
                       "late": sum(t.late for t in results),
                       "violations": sum(len(t.violations) for t in results)}}
