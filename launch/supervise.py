"""The supervisor: every way of starting a run goes through here.

``zcrx up`` (with ``-f``, with ``--netdev``, detached or ``--foreground``), ``zcrx demo``,
the benches that need a run (``bench copy``, ``bench zcrx``, ``bench scale``) and ``zcrx
chaos`` all describe what they want as a :class:`launch.topology.Topology` (topology as
data, Mininet's lesson) and realise it with :func:`bring_up`.  A foreground ``zcrx up``
then stays in :func:`supervise`, the watch loop, whose restart policy (:func:`restart`)
brings dead roles back from the spec the manifest recorded for them
(:class:`launch.run.RoleSpec`).

Ownership: the supervisor owns nothing in shared memory.  The run directory and manifest
are :mod:`launch.run`'s; each role owns the segments it creates, and a role that died
without unlinking them has them removed here (by its owner prefix, :mod:`shared.shm`)
before its successor creates the same names exclusively.
"""

from __future__ import annotations

import shlex
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

from launch.run import FORKSERVER, MANIFEST, Run
from launch.topology import Topology, TrafficSpec
from shared.control import ControlClient
from shared.errors import Misuse, ZcrxError
from shared.shm import owner_prefix, remove_prefix_segments

Say = Callable[[str], None]
#: Roles the restart policy may bring back, in start order.
RESTARTABLE = ("nic", "kernel")


def _quiet(_msg: str) -> None:
    pass


def nic_args(run: Run, topo: Topology, *, detach: bool) -> list[str]:
    """The NIC's arguments: the run, and one ``--netdev`` per netdev of ``topo``."""
    args = ["--run", run.run_id, "--rundir", str(run.dir),
            "--launcher-uid", str(run.m.launcher_uid)]
    for spec in topo.netdev_specs():
        args += ["--netdev", spec]
    return args + (["--detached"] if detach else [])


def kernel_args(run: Run, topo: Topology, *, detach: bool) -> list[str]:
    """The kernel's arguments: the run, its launcher's uid, and the Linux release it
    behaves as."""
    return (["--run", run.run_id, "--rundir", str(run.dir), "--launcher-uid",
             str(run.m.launcher_uid), "--kernel", topo.kernel]
            + (["--detached"] if detach else []))


def forkserver_args(run: Run, *, detach: bool) -> list[str]:
    """The fork server's arguments: the run, and the one uid it serves."""
    return (["--run", run.run_id, "--rundir", str(run.dir), "--launcher-uid",
             str(run.m.launcher_uid)] + (["--detached"] if detach else []))


def bring_up(topo: Topology, name: str | None = None, *, detach: bool = True,
             launcher: bool | None = None, traffic: bool = True,
             config: dict[str, Any] | None = None, fork_server: bool = True,
             say: Say | None = None) -> tuple[Run, list[str]]:
    """Realise ``topo``, in order, each step once ready.

    NIC, then kernel (each pinged; started together unless TAP ports must be plugged into
    the NIC before the kernel probes it), then every netdev's ethtool settings in order (through
    the kernel, as ``zcrx ethtool`` sends them), then the apps (detached, ``app:N``, each
    once it says it is ready), then the traffic sources (unless ``traffic`` is False: the
    caller starts them later with :func:`start_traffic`).  NIC and kernel get their own
    session when ``detach`` (they survive the caller), else they exit when it dies.
    ``launcher`` (default: ``not detach``) records this process as the run's ``launcher``
    (a foreground ``zcrx up``).  ``config`` adds keys to the manifest's config.

    With ``fork_server`` the run's template (:mod:`launch.forkserver`, role
    ``forkserver``) is started once the NIC is up and imports the app code while the
    kernel probes and the ethtool lines are applied; nobody waits for it here (the first
    app that needs it does).

    Returns the run and one line per step.  On any failure (Ctrl-C included) the run is
    brought down and the error re-raised, a :class:`ZcrxError` as Misuse naming the step
    that failed; nothing is left behind.
    """
    import shared.nicif
    import shared.syscalls  # noqa: F401  (register the nic.* and syscall message types)
    from launch import ethtool as et
    from launch import port
    from shared.msg import ControlError

    note = say or _quiet
    name = name or topo.name
    topo.validate()
    specs = [nd.spec for nd in topo.netdevs]
    ports = any(s.port for s in specs)
    if ports:
        port.check_can()  # before anything exists: a clear error, nothing to undo
    run = Run.create(name, {"netdevs": topo.netdev_specs(), "topology": topo.to_dict(),
                            "fork_server": fork_server, **(config or {})})
    steps: list[str] = []
    step = "start"

    def done(line: str) -> None:
        steps.append(line)
        note(line)

    try:
        if launcher if launcher is not None else not detach:
            run.record_launcher()
        if ports:
            step = "netns"
            run.m.config["netns"] = port.netns_name(run.run_id)  # down removes it from now on
            run.save()
            done(f"netns {port.create_netns(run.run_id)}")
        step = "nic"
        nic_e = run.spawn("nic", "nic_proc", nic_args(run, topo, detach=detach),
                          detach=detach, ready="nic", wait=False)
        if ports:
            run.wait_started("nic")
            done(f"nic pid {nic_e.pid}")
            step = "port"
            for line in port.attach(run.run_id, specs):
                done(line)
        # Without ports to plug in first, the kernel starts while the NIC is still starting
        # (both are mostly interpreter start and imports, one core each): its probe waits
        # for the NIC to answer, as a driver's probe waits for the device.
        step = "kernel"
        kernel_e = run.spawn("kernel", "driver_proc", kernel_args(run, topo, detach=detach),
                             detach=detach, ready="kernel", wait=False)
        if not ports:
            step = "nic"
            run.wait_started("nic")
            done(f"nic pid {nic_e.pid}")
        if fork_server:
            # Once the NIC is up: its imports then overlap the kernel's probe, which leaves
            # a core free while it allocates queue memory and waits on the NIC (started
            # beside NIC and kernel, a third interpreter would slow both down).
            step = FORKSERVER
            e = run.spawn(FORKSERVER, "launch.forkserver",
                          forkserver_args(run, detach=detach), detach=detach)
            note(f"{FORKSERVER} pid {e.pid}")  # a helper, not a step of the topology
        step = "kernel"
        run.wait_started("kernel")
        done(f"kernel pid {kernel_e.pid}")
        # Every ethtool line in one pipelined batch: the kernel applies them one by one, in
        # order, as if sent one after the other; the first refusal fails the step.
        lines = []
        for nd in topo.netdevs:
            for line in nd.ethtool:
                step = f"ethtool {line}"
                lines.append((step, et.parse(shlex.split(line))))
        with ControlClient(run.endpoint("kernel"), timeout_ms=30_000) as kernel:
            replies = kernel.call_many([("ethtool", {"dev": req["dev"], "request": req})
                                        for _, req in lines])
        for (line_step, req), reply in zip(lines, replies, strict=True):
            step = line_step
            if isinstance(reply, ControlError):
                said = et.format_error(req, reply.errno or 22).strip().splitlines()
                raise Misuse(f"{said[0] if said else 'ethtool'} ({reply.remote_msg})",
                             errno=reply.errno or 22)
            done(step)
        for app in topo.apps:
            role = run.next_app_role()
            step = f"{role} {app.program}"
            e = run.spawn(role, app.module, app.argv(str(run.dir), name), detach=True,
                          notify=True, cap_net_admin=app.cap_net_admin)
            done(f"{role} {app.program} pid {e.pid} (log {e.log})")
        for t in topo.traffic if traffic else ():
            step = f"traffic {t.kind} on {t.dev}"
            start_traffic(run, [t], say=done)
    except (ZcrxError, ValueError) as err:
        run.down()
        msg = err.remote_msg if isinstance(err, ControlError) else str(err)
        errno_ = getattr(err, "errno", None) or 5
        raise Misuse(f"run {name} did not come up: {step}: {msg}", errno=errno_) from None
    except BaseException:
        run.down()
        raise
    return run, steps


def start_traffic(run: Run, traffic: Sequence[TrafficSpec], *, say: Say | None = None
                  ) -> list[dict[str, Any]]:
    """Start each traffic source in order (the NIC's ``nic.traffic`` / ``nic.wire``);
    returns the NIC's replies."""
    note = say or _quiet
    replies = []
    with ControlClient(run.endpoint("nic"), timeout_ms=10_000) as nic:
        for t in traffic:
            type_, body = t.request()
            res = nic.call(type_, body)
            if t.kind == "wire":
                note(f"wire gateway 127.0.0.1:{res.get('port')} -> {t.dev}")
            else:
                note(f"traffic source {res.get('source')} on {t.dev}")
            replies.append(res)
    return replies


def restart(run: Run, dead: set[str], say: Say | None = None) -> None:
    """The restart policy: bring ``dead`` roles back in start order, each from the spec the
    manifest recorded for it (:meth:`launch.run.Run.respawn`).

    The NIC exits when the kernel dies (it can no longer trust its DMA mappings), so a
    kernel restart waits for it and restarts it too.  A SIGKILLed role never unlinked what
    it owned and its successor creates the same names exclusively, so the dead role's
    segments (its owner prefix) go first.
    """
    note = say or _quiet
    if "kernel" in dead:
        entry = run.m.procs.get("nic")
        deadline = time.monotonic() + 5
        while entry is not None and entry.process() is not None and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        dead = dead | ({"nic"} if entry is None or entry.process() is None else set())
    for role in RESTARTABLE:
        if role not in dead:
            continue
        remove_prefix_segments(owner_prefix(run.run_id, role))
        e = run.respawn(role)
        note(f"{role} died; restarted as pid {e.pid}")
        if role == "nic" and run.m.config.get("netns"):
            from launch import port
            from shared.nicif import NetdevSpec

            # The dead NIC's TAP devices went with it; plug the new ones in again.
            port.attach(run.run_id, [NetdevSpec.parse(s) for s in run.m.config["netdevs"]])


def supervise(run: Run, restart_roles: set[str], *, say: Say | None = None,
              warn: Say | None = None, interval: float = 0.2) -> None:
    """The foreground watch loop of ``zcrx up --foreground``: until Ctrl-C, SIGTERM (``zcrx
    down`` elsewhere asks this way), or the death of a role not in ``restart_roles``
    (whose members are restarted by :func:`restart`), then bring the run down.  If the run
    was brought down by someone else meanwhile, just return."""
    note = say or _quiet
    stop = {"now": False}

    def _stop(*_: Any) -> None:
        stop["now"] = True

    name = run.m.name
    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop["now"]:
            if not (run.dir / MANIFEST).exists():
                note(f"run {name} was brought down")
                return  # someone ran `zcrx down`: nothing left to supervise
            dead = set(RESTARTABLE) - set(run.alive_roles())
            if dead and not dead <= restart_roles:
                break
            if dead:
                restart(run, dead, say=note)
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
    except (ZcrxError, OSError) as e:
        (warn or note)(f"zcrx: restart failed: {e}")
    run.down()
    note(f"run {name} is down")
