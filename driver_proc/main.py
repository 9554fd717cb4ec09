"""The kernel process loop: the only I/O the kernel does.

One thread, one loop, like a CPU running softirq and syscalls by turns:

1. serve pending syscalls on the control socket (non-blocking, bounded batch);
2. drain interrupt events from the NIC;
3. ``Kernel.poll()``: NAPI on every queue, TCP, io_uring work;
4. send doorbells the driver asked for;
5. idle: spin, yield, then arm every queue's interrupt and block in
   ``zmq.Poller`` on the control and interrupt sockets (need-wakeup protocol),
   waking at least every few milliseconds for timers.

Peers are watched with pidfds (:mod:`shared.watch`): the NIC's and every attached app's
pidfd sits in the same ``zmq.Poller``, and :meth:`Kernel.check_peers` (one zero-timeout
poll of all of them) runs every iteration, so a death is acted on at once.

Everything the kernel owns lives in :class:`driver_proc.kernel.Kernel`.

Exit: asked to stop (``shutdown``, SIGTERM, the parent gone), the kernel tears everything down
in order and says ``bye`` to the NIC (:meth:`Kernel.shutdown`: the driver unbinds, the NIC
keeps running).  An exception out of the loop is an oops: a crashed Linux driver does not
unbind either, so the kernel logs it, says nothing to the NIC (:meth:`Kernel.crash`) and exits
with status 1; the NIC sees the pid go through its pidfd and acts on a kernel death (stops
all DMA, exits).
"""

from __future__ import annotations

import os
import sys
import time

import zmq

from driver_proc.kernel import Kernel
from shared import abi, nicif, syscalls  # noqa: F401  (registers the message types)
from shared.control import ControlClient, ControlServer, EventReceiver, EventSender, ipc_endpoint
from shared.errors import Timeout
from shared.proc import Lifecycle, base_parser, setup_logging
from shared.ring import Backoff

#: Longest the loop sleeps in zmq poll when fully idle (timers, parent watch).
IDLE_POLL_MS = 20


def _wait_for_nic(nic: ControlClient, life: Lifecycle, timeout_s: float) -> None:
    """Ping the NIC until it answers, for at most ``timeout_s`` or until asked to stop (the
    launcher starts the NIC and the kernel at once; the NIC may still be importing); the
    probe then reports a NIC that never came."""
    deadline = time.monotonic() + timeout_s
    while not life.should_stop() and time.monotonic() < deadline:
        try:
            nic.ping(timeout_ms=500)
            return
        except Timeout:
            continue


def main(argv: list[str] | None = None) -> int:
    p = base_parser("driver_proc", "The emulated kernel: driver, page pools, TCP, io_uring.")
    p.add_argument("--nic-timeout-ms", type=int, default=10_000,
                   help="Timeout of admin requests to the NIC.")
    p.add_argument("--kernel", default=abi.kernel_version_name(abi.LINUX_VERSION), metavar="X.Y",
                   help="The Linux release to behave as: "
                   + ", ".join(abi.kernel_version_name(v) for v in abi.KERNEL_VERSIONS)
                   + " (default: the newest).")
    p.add_argument("--launcher-uid", type=int, default=None,
                   help="uid of the run's launcher: only it may shut the kernel down or grant "
                        "CAP_NET_ADMIN (default: the kernel's own uid).")
    args = p.parse_args(argv)
    try:
        kernel_version = abi.parse_kernel_version(args.kernel)
    except ValueError as e:
        p.error(str(e))
    log = setup_logging("kernel", args.quiet)
    if not args.run or not args.rundir:
        p.error("--run and --rundir (or $ZCRX_RUN / $ZCRX_RUNDIR) are required")
    life = Lifecycle(watch_parent=not args.detached)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    nic = ControlClient(ipc_endpoint(args.rundir, "nic"), timeout_ms=args.nic_timeout_ms,
                        context=ctx)
    doorbells = EventSender(ipc_endpoint(args.rundir, "nic-events"), context=ctx)
    irqs = EventReceiver(ipc_endpoint(args.rundir, "kernel-events"), context=ctx)
    kernel = Kernel(args.run, args.rundir, nic, log=log, launcher_uid=args.launcher_uid,
                    kernel=kernel_version)
    endpoint = ipc_endpoint(args.rundir, "kernel")
    server = ControlServer(endpoint, kernel.handlers(), role="kernel", context=ctx)
    # Every app connects here, under its own uid when the run is root's: the socket is open
    # to all, and the kernel decides what each caller may do from its peer credentials.
    os.chmod(endpoint[len("ipc://"):], 0o666)
    kernel.attach_server(server)
    oops = False
    try:
        _wait_for_nic(nic, life, args.nic_timeout_ms / 1000)
        kernel.probe()
        log.info("up: %s (Linux %s)", ", ".join(kernel.netdevs), args.kernel)
        poller = zmq.Poller()
        poller.register(server.socket, zmq.POLLIN)
        poller.register(irqs.socket, zmq.POLLIN)
        wait = Backoff(spin=200, yields=200, max_sleep=0.0005)
        watched: set[int] = set()
        while not (life.should_stop() or kernel.shutdown_requested):
            work = 0
            try:
                work += server.process_pending(64)
            except Exception:  # a handler bug: replied EIO already; keep serving
                log.exception("syscall handler failed")
                kernel.stats["handler_bugs"] += 1
            for ev in irqs.drain(256):
                if ev.type == "irq":
                    kernel.irq(ev.body.get("dev"), ev.body.get("queue"))
                work += 1
            work += kernel.check_peers()
            work += kernel.poll()
            for dev, q in kernel.take_doorbells():
                if q < 0:
                    doorbells.send("nic.tx_doorbell", {"dev": dev})
                else:
                    doorbells.send("nic.doorbell", {"dev": dev, "queue": q})
            if work:
                wait.reset()
                continue
            if not wait.sleeping:
                wait.idle()
                continue
            # About to sleep: arm interrupts, then re-check (need-wakeup protocol).
            if kernel.arm_interrupts():
                continue
            _sync_watch(poller, watched, kernel.watch.fds())
            poller.poll(min(IDLE_POLL_MS, kernel.next_timer_ms()))
    except Exception:
        oops = True
        log.critical("kernel oops: the loop failed; exiting without unbinding the driver",
                     exc_info=True)
    finally:
        if oops:
            kernel.crash()
        else:
            log.info("stopping (%s)", life.reason or "shutdown requested")
            kernel.shutdown()
        server.close()
        irqs.close()
        doorbells.close()
        nic.close()
    return 1 if oops else 0


def _sync_watch(poller: zmq.Poller, watched: set[int], fds: list[int]) -> None:
    """Keep the poller's pidfds equal to the kernel's watch list."""
    now = set(fds)
    for fd in watched - now:
        poller.unregister(fd)
    for fd in now - watched:
        poller.register(fd, zmq.POLLIN)
    watched.clear()
    watched.update(now)


if __name__ == "__main__":
    sys.exit(main())
