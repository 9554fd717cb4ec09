"""The emulated kernel as one object: every subsystem the kernel process runs.

``Kernel`` owns all kernel state and is the single authority over buffers
(DESIGN §5 "buffer ledger").  It does no I/O of its own: the process loop in
:mod:`driver_proc.main` feeds it control messages and interrupts and calls
:meth:`Kernel.poll` to run NAPI and io_uring work; tests drive it directly.

Subsystems (one module each, kernel-style):

* ``netdevs``  - :mod:`driver_proc.netdev`: the NIC driver; RX queues with their
  rings, header slots and page pools; NAPI poll building skbs.
* ``skbs``     - :mod:`driver_proc.skb`: skb records (linear part + frags) and
  their buffer references; freeing an skb recycles its buffers.
* ``sockets``  - :mod:`driver_proc.tcp` behind :mod:`driver_proc.files`:
  listeners and connections; receive queues of (skb, offset, length) pieces.
* ``ctx.tasks`` - :mod:`driver_proc.files`: one per attached process: its file
  table (sockets, rings) and emulated mm (:mod:`driver_proc.mm`).
* ``ctx.rings`` - :mod:`driver_proc.setup` (the io_uring subsystem) over
  :mod:`driver_proc.io_uring` (instances and requests): see docs/design.md "Module map".
* ``zcrx``     - :mod:`driver_proc.zcrx`: zero-copy receive ifqs, their areas (memory
  providers of bound queues), RECV_ZC; its delayed destructions are reaped every poll.
* ``watch``    - :mod:`shared.watch`: pidfds on the NIC and on every attached app
  (DESIGN §6); :meth:`Kernel.check_peers` acts on deaths.

Death of a peer (DESIGN §6):

* an app (:meth:`Kernel.task_died`): the same teardown as its ``bye`` / ring close
  (:func:`driver_proc.syscalls.task_exit`: requests cancelled, user refs scrubbed, queue
  restarted without the provider, delayed destruction), then the kernel **unlinks the dead
  app's shm names** (every ``/zcrx.<run>.app<tid>.*``: its areas and buffers).  The kernel
  is the one that knows them (they are the names its mm accepted), and unlinking a name
  does not disturb a mapping still in use, so the NIC's DMA mapping of an area whose
  destruction is delayed stays valid until it is unmapped.  ``zcrx cleanup`` remains the
  fallback when the kernel itself is gone.
* the NIC (:meth:`Kernel.nic_gone`): surprise removal.  Every queue goes down without
  asking the NIC (``NetDevice.close(nic_alive=False)``), the netdevs are unregistered
  (later ethtool / zcrx registration: ``-ENODEV``), and every open connection gets the
  socket error ``ENETDOWN`` (what Linux reports for I/O through a network that went
  down; the sender cannot be reached anymore, but nothing reset the connection, so not
  ``ECONNRESET``): data already queued is still read first, then armed and later
  RECV/RECV_ZC requests end with ``-ENETDOWN``.  Niovs come home as sockets and skbs are
  freed; zcrx ifqs are destroyed when their rings close.  The NIC is not re-probed.

Who may do what (DESIGN §10; the connection's peer credentials decide, never a message):

* the run's **launcher** is a peer whose uid is ``launcher_uid`` (the uid ``zcrx up`` ran as,
  given with ``--launcher-uid``; by default the kernel's own) and that is not an attached task.
  Only it may ``shutdown`` the kernel and ``cap_grant``; ``stats``/``status`` show it
  everything.  Run as root, every app has its own uid, so no app is the launcher; run as a
  normal user, apps share the launcher's uid and are not isolated (``zcrx up`` says so).
* an **app** (an attached task) gets CAP_NET_ADMIN only as granted by the launcher
  (:class:`driver_proc.files.CapGrants`); ethtool writes need it (or the launcher), reads do
  not; ``stats``/``status`` show it only its own tasks (their rings and ifqs); device
  state (like sysfs) stays visible.
* every task is watched through a pidfd on the pid the OS gave: a process that went away
  without ``bye`` is reaped at once, whatever it ever said.

Its own death: an exception out of the loop is an oops (:meth:`Kernel.crash`): no teardown
and no ``bye`` to the NIC, which then acts on the kernel's exit as on a SIGKILL.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from driver_proc import syscalls as sc
from driver_proc.mm import MM_COUNTERS
from driver_proc.netdev import NapiBatch, NetDevice
from driver_proc.skb import SkbStore
from driver_proc.tcp import (
    ACK,
    RST,
    SYN,
    SocketTable,
    TcpReceiver,
    TcpState,
    group_by_flow,
    ip_bytes,
)
from driver_proc.tcp_output import Iface, TcpOutput
from shared import abi
from shared.bpf import SkbInfo
from shared.control import ControlClient, ControlServer, Handler, HandlerResult, peer_cred
from shared.errors import Misuse, ZcrxError
from shared.msg import Message
from shared.shm import owner_prefix, remove_prefix_segments
from shared.syscalls import MIN_NAPI_ID
from shared.watch import Watchlist

#: Frames one queue may complete per NAPI poll (the driver's budget).
NAPI_BUDGET = 1024
#: One NAPI pass over the poll lists stops once it has handled this many completions or run
#: this long, and the rest of the list waits for the next pass (``net_rx_action``'s
#: ``netdev_budget`` and ``netdev_budget_usecs``; Linux: 300 and 2000 us, counted in
#: ``time_squeeze``).  The packet budget is scaled like :data:`NAPI_BUDGET` (Linux's NAPI
#: weight is 64).  Without it one pass over 64 busy queues ran for 30-270 ms, and every
#: syscall, accept and re-arm waited for the end of it.
NETDEV_BUDGET = 4096
NETDEV_BUDGET_USECS = 2000
#: How long the idle loop sleeps while a queue waits for buffers to come home.
STARVED_POLL_MS = 1
#: How often a kernel whose NIC died asks whether a restarted one answers.
REPROBE_INTERVAL_S = 0.25
#: CPUs the emulated host has (SKF_AD_CPU; see :func:`napi_cpu`)
NR_CPUS = os.cpu_count() or 1


def napi_cpu(queue: int) -> int:
    """The CPU queue ``queue``'s NAPI runs on, as a reuseport program sees it
    (``SKF_AD_CPU``): queue q's interrupt is taken on CPU ``q % NR_CPUS``, the spread a driver
    sets with one vector per queue.  (The kernel process itself runs wherever the host puts
    it: this is the CPU the emulated machine would use.)"""
    return queue % NR_CPUS


#: How long the kernel waits for each NIC answer while it shuts down.
SHUTDOWN_NIC_TIMEOUT_MS = 2_000


class Kernel:
    """All kernel state plus the verbs the process loop drives."""

    def __init__(self, run: str, rundir: str, nic: Any, *,
                 log: logging.Logger | None = None, launcher_uid: int | None = None,
                 kernel: tuple[int, int] = abi.LINUX_VERSION) -> None:
        self.run = run
        #: the uid of the run's launcher (see the module docstring)
        self.launcher_uid = os.geteuid() if launcher_uid is None else launcher_uid
        self.rundir = rundir
        self.nic = nic
        self.log = log or logging.getLogger("kernel")
        self.skbs = SkbStore()
        self.table = SocketTable()
        self.ctx = sc.KernelContext.create(run, self.skbs, self.table, kernel=kernel)
        # io_uring NAPI busy polling polls every queue with completions, scheduled or not
        self.ctx.rings.napi_poll = lambda: self.napi_pass(busy_poll=True)
        self.netdevs: dict[str, NetDevice] = {}
        assert self.ctx.zcrx is not None
        self.zcrx = self.ctx.zcrx
        self.zcrx.netdevs = self.netdevs
        self.stats: Counter[str] = Counter()
        #: where the next NAPI pass starts (after a squeezed one: the netdev it stopped in)
        self._napi_next_dev = 0
        self.shutdown_requested = False
        self.server: ControlServer | None = None
        self._doorbells: list[tuple[str, int]] = []
        self._starved = False
        self._next_reprobe = 0.0
        self._started = time.monotonic()
        #: pidfds on peers: "nic" and "task:<tid>"
        self.watch: Watchlist[str] = Watchlist()
        self.nic_dead = False
        #: monotonic time of the last app death and of its teardown's end (tests, stats)
        self.deaths: list[dict[str, Any]] = []
        #: NAPI id of each (netdev, queue): one NAPI instance per RX queue, numbered from
        #: MIN_NAPI_ID in probe order (a re-probe makes new instances with new ids)
        self.napi_ids: dict[tuple[str, int], int] = {}
        self._next_napi_id = MIN_NAPI_ID
        #: what a reuseport program reads of an skb, per (ifindex, queue)
        self._rx_info: dict[tuple[int, int], SkbInfo] = {}
        #: TCP's transmit side (driver_proc.tcp_output): its frames go out on the TX rings
        self.output = TcpOutput({}, time.monotonic, space_fn=self._zc_space)
        #: _zc_space per NAPI id, valid for one poll pass (a ledger is a pass over the niovs)
        self._zc_cache: dict[int, tuple[int, int] | None] = {}
        self.ctx.sockets.on_close = self.output.on_close
        self.ctx.sockets.tx = self.output  # IORING_OP_SEND queues on TCP's write side

    # -- setup ------------------------------------------------------------------------

    def attach_server(self, server: ControlServer) -> None:
        self.server = server

    def probe(self) -> None:
        """Probe the NIC and bring every netdev up (the driver's probe + ndo_open)."""
        info = self.nic.call("nic.probe", {})
        if isinstance(self.nic, ControlClient):
            pid = self.nic.hello("kernel").get("pid")
            if isinstance(pid, int) and pid > 0:
                self.watch.add("nic", pid)
        for nd in info["netdevs"]:
            dev = NetDevice(nd, self.nic, self.run, skbs=self.skbs)
            self.netdevs[dev.name] = dev
            dev.open()
            self.output.ifaces[dev.name] = Iface(
                dev.name, _mac(dev.mac), ip_bytes(dev.addr) if dev.addr else None,
                ip_bytes(dev.addr6) if dev.addr6 else None, dev.mtu)
            for key in [k for k in self.napi_ids if k[0] == dev.name]:
                del self.napi_ids[key]  # a (re-)probe makes new NAPI instances
            for q in sorted(dev.queues):
                self.napi_id(dev.name, q)

    def reprobe(self) -> int:
        """After a surprise removal, probe again once a (restarted) NIC answers.

        Called every loop pass; asks at most every :data:`REPROBE_INTERVAL_S` with a
        short timeout, so a missing NIC never stalls the kernel.  Apps can then
        register again (until then registration gives ``-ENODEV``).
        """
        if not self.nic_dead or not isinstance(self.nic, ControlClient):
            return 0
        now = time.monotonic()
        if now < self._next_reprobe:
            return 0
        self._next_reprobe = now + REPROBE_INTERVAL_S
        try:
            self.nic.ping(timeout_ms=100)
        except ZcrxError:
            return 0
        try:
            self.nic_dead = False
            self.probe()
        except ZcrxError as e:
            self.log.warning("re-probe failed: %s", e)
            self.nic_gone()
            return 0
        self.stats["nic_reprobes"] += 1
        self.log.warning("NIC is back: re-probed %s", ", ".join(self.netdevs))
        return 1

    def handlers(self) -> dict[str, Handler]:
        h = dict(sc.handlers(self.ctx))
        attach = h["attach"]

        def watched_attach(msg: Message, peer: bytes) -> HandlerResult:
            res = attach(msg, peer)
            task = self.ctx.tasks.find_peer(peer)
            if task is not None and self.watch.add(f"task:{task.tid}", task.pid) < 0:
                # gone between connect and attach: reap it now, never keep it unwatched
                self.task_died(task.tid)
                raise Misuse(f"process {task.pid} is gone", errno=errno.ESRCH)
            if task is not None:
                task.watch = self.watch.get(f"task:{task.tid}")
            return res

        h["attach"] = watched_attach
        h.update({"ethtool": self._sys_ethtool, "stats": self._sys_stats,
                  "if_nametoindex": self._sys_if_nametoindex,
                  "status": self._sys_status, "shutdown": self._sys_shutdown,
                  "cap_grant": self._sys_cap_grant})
        return h

    # -- who is calling -----------------------------------------------------------------

    def is_launcher(self, peer: bytes) -> bool:
        """True if ``peer`` speaks for the run's launcher: the OS says its uid is the
        launcher's, and it is not an attached task (an app)."""
        cred = peer_cred(peer)
        if cred is None or cred.uid != self.launcher_uid:
            return False
        return self.ctx.tasks.find_peer(peer) is None

    def _require_launcher(self, peer: bytes, what: str) -> None:
        if not self.is_launcher(peer):
            self.stats["refused_not_launcher"] += 1
            raise Misuse(f"{what}: only the run's launcher may do this", errno=errno.EPERM)

    # -- the loop's verbs -------------------------------------------------------------

    def poll(self) -> int:
        """One pass of softirq + task work: NAPI on every queue, TCP, io_uring."""
        self._zc_cache.clear()
        work = self.reprobe()
        work += self.napi_pass()
        if self.server is not None:
            work += sc.service(self.ctx, self.server)
        work += self.zcrx.poll()  # requeued RECV_ZC passes, delayed ifq destruction
        work += self.transmit()
        return work

    def transmit(self) -> int:
        """TCP's timers and window updates, ARP/NDP, then every frame due onto the TX rings
        (one batch per netdev).  Returns the frames queued."""
        out = self.output
        for dev in self.netdevs.values():
            for frame in dev.ctl_frames():
                out.on_ctl_frame(dev.name, frame)
        out.tick()
        for sock in out.expired():  # SYN-ACK retries ran out: drop the embryonic connection
            self.ctx.sockets.free(self.table.close(sock))
        for sock in out.gave_up():  # retransmissions ran out: ETIMEDOUT, unhashed
            self.table.unhash(sock)
        woken = out.take_wakes()
        if woken:
            self.ctx.rings.run(woken)
        n = 0
        for name, frames in out.take().items():
            nd = self.netdevs.get(name)
            if nd is not None:
                n += nd.xmit(frames)
        return n

    def _zc_space(self, sock: TcpReceiver) -> tuple[int, int] | None:
        """``(niovs, buf_len)``: what the zcrx ifq bound to the socket's RX queue can still
        take (niovs not held by the app or by skbs), or None for a queue with kernel pages."""
        if sock.napi_id in self._zc_cache:
            return self._zc_cache[sock.napi_id]
        self._zc_cache[sock.napi_id] = None
        for ifq in self.zcrx.ifqs:
            dev = ifq.dev
            if dev is None or ifq.state != "live":
                continue
            if self.napi_ids.get((dev.name, ifq.rxq)) == sock.napi_id:
                led = ifq.ledger()
                free = ifq.niovs - led.get("user", 0) - led.get("in_skb", 0)
                got = int(free), int(ifq.area.buf_len)
                self._zc_cache[sock.napi_id] = got
                return got
        return None

    def napi_pass(self, *, busy_poll: bool = False) -> int:
        """NAPI on every queue of each netdev's poll list (drained frames first); returns the
        completions handled.

        A queue is on its netdev's poll list (``napi_schedule``) from its interrupt until a
        poll finds it idle: nothing completed and nothing to post.  Then ``napi_complete``
        arms its interrupt and it leaves the list, so an idle queue costs the loop nothing
        until the NIC interrupts for it again (Linux: ``napi_complete_done`` re-enables the
        queue's IRQ; the softirq walks only the poll list).  ``busy_poll`` (io_uring's NAPI
        busy polling, ``IoUring.napi_poll``) polls every queue with completions published,
        scheduled or not, as a busy-polling syscall does.

        Like ``net_rx_action`` a pass (not a busy poll) ends early once it has handled
        :data:`NETDEV_BUDGET` completions or run :data:`NETDEV_BUDGET_USECS` (counted in
        ``stats["time_squeeze"]``), so syscalls are served between passes; a queue that was
        polled moves to the tail of its poll list, so the next pass starts with the others."""
        work = 0
        limit = None if busy_poll else time.perf_counter() + NETDEV_BUDGET_USECS / 1e6
        devs = list(self.netdevs.values())
        first = self._napi_next_dev % len(devs) if devs else 0
        for i in range(len(devs)):  # from the netdev the last squeezed pass stopped in
            dev = devs[(first + i) % len(devs)]
            for batch in dev.take_drained():
                work += self._deliver(batch, self.napi_id(dev.name, batch.queue), dev)
            queues = list(dev.queues) if busy_poll else list(dev.poll_list)
            for q in queues:
                if limit is not None and work and (
                        work >= NETDEV_BUDGET or time.perf_counter() >= limit):
                    self.stats["time_squeeze"] += 1
                    self._napi_next_dev = (first + i) % len(devs)
                    return work
                if not dev.napi_pending(q):
                    if not busy_poll and not dev.napi_complete(q):
                        dev.poll_list.pop(q, None)
                    continue
                batch = dev.napi_poll(q, NAPI_BUDGET)
                if batch.doorbell:
                    self._doorbells.append((dev.name, q))
                if batch.completions:
                    work += batch.completions
                    self._deliver(batch, self.napi_id(dev.name, q), dev)
                if not busy_poll and q in dev.poll_list:  # list_move_tail
                    del dev.poll_list[q]
                    dev.poll_list[q] = None
        return work

    def irq(self, dev: Any, queue: Any) -> None:
        """The NIC interrupted for ``dev`` queue ``queue``: put it on the poll list
        (``napi_schedule``); an unknown device or queue is ignored (counted)."""
        nd = self.netdevs.get(dev) if isinstance(dev, str) else None
        if nd is None or not isinstance(queue, int) or not nd.napi_schedule(queue):
            self.stats["irq_unknown_queue"] += 1

    def _deliver(self, batch: NapiBatch, napi_id: int = 0, dev: NetDevice | None = None) -> int:
        """Hand a NAPI batch to TCP, free what TCP refused, run woken requests.  Every socket
        that took a segment is marked with the batch's NAPI id (``sk_mark_napi_id``).  The
        batch's skbs carry their RX queue (``skb_record_rx_queue``), device and CPU for a
        reuseport program (read only by a SYN that reaches a group).  Then TCP's transmit
        side answers: a SYN-ACK per new connection, the ACKs the batch calls for, a RST per
        segment that reached no socket."""
        if not len(batch):
            return 0
        ifindex = dev.ifindex if dev is not None else 0
        name = dev.name if dev is not None else ""
        rx = self._rx_info.get((ifindex, batch.queue))
        if rx is None:
            rx = self._rx_info[ifindex, batch.queue] = SkbInfo(
                queue_mapping=batch.queue + 1, ifindex=ifindex, cpu=napi_cpu(batch.queue))
        keys = batch.keys
        if len(keys) == 1 or bool(np.all(keys == keys[0])):
            flows = [keys[0].tobytes()]
        else:  # one key per flow, not per segment
            order, bounds = group_by_flow(keys)
            flows = [keys[order[b]].tobytes() for b in bounds[:-1].tolist()]
        known = {k for k in flows if self.table.lookup(k) is not None}
        res = self.table.ingest_batch(batch.keys, batch.seq, batch.payload_len,
                                      batch.tcp_flags, batch.handles, rx)
        out = self.output
        senders = out.senders
        for sock in res.sockets:
            sock.napi_id = napi_id
            if sock.key not in known and sock.key is not None:
                rows = np.flatnonzero((keys == np.void(sock.key)) & (batch.tcp_flags & SYN != 0))
                if len(rows):
                    r = int(rows[0])
                    out.on_syn(sock, name, bytes(batch.src_mac[r]),
                               batch.syn_options.get(r, b""), int(batch.window[r]))
            if senders and sock in senders:  # only connections whose app sent data
                self._peer_acks(sock, batch, len(flows) == 1)
            out.after_ingest(sock)
        if len(known) < len(flows):
            self._orphans(batch, name, [k for k in flows if k not in known])
        if len(res.freed):
            self.skbs.free(res.freed)
        if res.sockets or res.listeners:
            self.ctx.rings.run(res.sockets, res.listeners)
        return len(batch)

    def _peer_acks(self, sock: TcpReceiver, batch: NapiBatch, single: bool) -> None:
        """The ACK numbers and windows ``sock``'s segments of this batch carry, for its write
        side (``tcp_ack``); connections that never sent data never come here."""
        if single or sock.key is None:
            rows: Any = slice(None)
        else:
            rows = np.flatnonzero(batch.keys == np.void(sock.key))
        acked = (batch.tcp_flags[rows] & ACK) != 0
        self.output.on_acks(sock, batch.ack_seq[rows][acked], batch.window[rows][acked])

    def _orphans(self, batch: NapiBatch, dev: str, flows: list[bytes]) -> None:
        """Segments of flows that had no socket before the batch and still have none (no
        listener, a full backlog, or a connection the app closed): the output side answers
        (a RST, or the closing connection's handshake).  A pure SYN to a listener is not an
        orphan: a full backlog drops it silently, as Linux does.  A flow with no connection
        at all gets one RST per batch (for its first segment), not one per segment: a
        stream into a closed port must not cost per-packet work in the kernel loop."""
        out = self.output
        for key in flows:
            if self.table.lookup(key) is not None:
                continue
            listening = self.table.find_listener(key) is not None
            closing = key in out.closing
            for r in np.flatnonzero(batch.keys == np.void(key)).tolist():
                flags = int(batch.tcp_flags[r])
                if flags & SYN and not flags & ACK and listening:
                    continue
                out.on_orphan(dev, key, bytes(batch.src_mac[r]), int(batch.seq[r]),
                              int(batch.ack_seq[r]), flags, int(batch.payload_len[r]),
                              int(batch.window[r]))
                if not closing and not flags & RST:
                    break

    def take_doorbells(self) -> list[tuple[str, int]]:
        """Doorbells due: ``(dev, queue)`` for an RX fill ring (``nic.doorbell``), ``(dev, -1)``
        for a TX ring (``nic.tx_doorbell``).

        A TX doorbell only wakes the NIC, whose loop then polls every TX ring; when an RX
        doorbell goes out in the same pass it wakes the NIC just as well, so the TX one is
        not sent (one message, one wake-up, where an ACK follows a refill)."""
        out, self._doorbells = self._doorbells, []
        tx = [dev.name for dev in self.netdevs.values() if dev.take_tx_doorbell()]
        if tx and not out:
            out = [(name, -1) for name in tx]
        return out

    def arm_interrupts(self) -> bool:
        """Before sleeping: refill starved queues, arm the interrupt of every queue still on
        a poll list and take it off (queues off the list are armed already).

        Returns True if work appeared meanwhile.  A queue whose pool came back
        short is refilled here too: buffers come home without any event (an app
        writing RQEs, a socket consuming skbs), and the NIC, paused for lack of
        buffers, waits for our doorbell.  Such a queue stays on the poll list; while
        one does, the loop sleeps only briefly (:meth:`next_timer_ms`).
        """
        pending = False
        self._starved = False
        for dev in self.netdevs.values():
            for q in list(dev.poll_list):
                rq = dev.queues.get(q)
                if rq is None or not rq.started:
                    dev.poll_list.pop(q, None)
                    continue
                if len(rq.posted) < rq.ring_size:
                    posted, bell = dev.refill(q)
                    if bell:
                        self._doorbells.append((dev.name, q))
                    if posted:
                        pending = True
                    elif len(rq.posted) < rq.ring_size:
                        # stays scheduled (the pool is short, not the queue idle), with
                        # its interrupt armed too so completions still wake us early
                        self._starved = True
                        pending |= dev.napi_complete(q)
                        continue
                if dev.napi_complete(q):
                    pending = True
                else:
                    dev.poll_list.pop(q, None)
        return pending

    def next_timer_ms(self) -> int:
        if self._starved:
            return STARVED_POLL_MS
        deadline = self.ctx.rings.next_deadline()
        tcp = self.output.next_deadline()
        if tcp is not None:
            deadline = tcp if deadline is None else min(deadline, tcp)
        if deadline is None:
            return 1_000
        return max(0, int((deadline - time.monotonic()) * 1000))

    # -- peer deaths (DESIGN §6) -------------------------------------------------------------

    def check_peers(self) -> int:
        """Act on every watched peer that died since the last call; returns how many."""
        dead = self.watch.reap()
        for key in dead:
            self.watch.discard(key)
            if key == "nic":
                self.nic_gone()
            elif key.startswith("task:"):
                self.task_died(int(key[5:]))
            elif key.startswith("grant:"):
                self.ctx.tasks.grants.revoke_pid(int(key[6:]))
        return len(dead)

    def task_died(self, tid: int) -> None:
        """An attached app died: tear its task down as its ``bye`` would, unlink its shm."""
        task = self.ctx.tasks.by_tid(tid)
        if task is None:
            return  # said bye before dying: nothing left
        self.log.warning("app %s (pid %d, task %d) died: tearing down", task.name, task.pid,
                         tid)
        self.stats["app_deaths"] += 1
        prefix = task.mm.allowed_prefix or owner_prefix(self.run, self.ctx.tasks.owner(tid))
        try:
            sc.task_exit(self.ctx, task)
        except ZcrxError as e:
            self.stats["teardown_errors"] += 1
            self.log.warning("task %d exit: %s", tid, e)
        self.stats["app_segments_unlinked"] += _unlink_prefix(prefix)
        self.deaths.append({"tid": tid, "pid": task.pid, "at": time.monotonic()})

    def nic_gone(self) -> None:
        """Surprise removal: the NIC process is gone (see the module docstring)."""
        if self.nic_dead:
            return
        self.nic_dead = True
        self.stats["nic_deaths"] += 1
        self.log.warning("NIC gone: surprise removal of %s", ", ".join(self.netdevs) or "-")
        for dev in self.netdevs.values():
            try:
                for batch in dev.close(nic_alive=False):
                    if len(batch):
                        self.skbs.free(batch.handles)
                for batch in dev.take_drained():
                    if len(batch):
                        self.skbs.free(batch.handles)
            except ZcrxError as e:
                self.stats["teardown_errors"] += 1
                self.log.warning("%s surprise removal: %s", dev.name, e)
        self.netdevs.clear()  # unregistered (the dict is shared with zcrx: -ENODEV there)
        self._doorbells.clear()
        conns = list(getattr(self.table, "_conns", {}).values())
        for conn in conns:
            if conn.fin_reached or conn.state is TcpState.CLOSED:
                continue
            freed: list[int] = []
            conn._reset(freed)  # purge out-of-order data, shut the receive side
            conn.error = errno.ENETDOWN
            if freed:
                self.skbs.free(np.asarray(freed, dtype=np.int64))
        self.ctx.rings.run(conns, ())
        self.zcrx.poll()

    def crash(self) -> None:
        """The loop died of an exception (an oops): no orderly teardown, no ``bye``.

        A Linux driver that oopses does not unbind: nothing is said to the NIC (no queue stop,
        no DMA unmap, no ``bye``), since the state that would be walked to do it is suspect.
        The NIC then sees this process exit through its pidfd and handles a kernel death
        (stops every queue and source, drops its mappings, exits), exactly as after SIGKILL.
        Locally the kernel only drops its pidfds and unlinks the names of its own segments
        (``/zcrx.<run>.kernel.*``; the mappings stay valid for whoever still holds them).
        """
        self.stats["oops"] += 1
        self.shutdown_requested = True
        try:
            self.watch.close()
        except OSError:
            pass
        _unlink_prefix(owner_prefix(self.run, "kernel"))

    def shutdown(self) -> None:
        """Close every task's files and rings, then every netdev (unlinking regions).

        Peers that died before the stop are acted on first: a NIC that is already gone
        (killed together with us, as a test or ``zcrx down`` may do) is a surprise removal,
        not a device to ask for queue stops it can no longer answer.  A NIC that stops
        answering during the close is not asked again for the netdevs after it."""
        try:
            self.check_peers()
        except ZcrxError as e:
            self.log.warning("peers at shutdown: %s", e)
        for task in list(self.ctx.tasks):
            try:
                sc.task_exit(self.ctx, task)
            except ZcrxError as e:
                self.log.warning("task %s exit: %s", task.tid, e)
        answering = not self.nic_dead
        if isinstance(self.nic, ControlClient):
            # A NIC stopping with us answers in milliseconds or not at all: do not wait the
            # running timeout for each netdev (an unanswered close is the NIC's to clean up
            # when it sees us exit, as after SIGKILL).
            self.nic.timeout_ms = min(self.nic.timeout_ms, SHUTDOWN_NIC_TIMEOUT_MS)
        for dev in self.netdevs.values():
            try:
                for batch in dev.close(nic_alive=answering):
                    if len(batch):
                        self.skbs.free(batch.handles)
            except ZcrxError as e:
                self.log.warning("%s close: %s", dev.name, e)
                answering = False
                dev.close(nic_alive=False)
        self.zcrx.shutdown()
        self.watch.close()
        if answering and not self.nic_dead and isinstance(self.nic, ControlClient):
            # An orderly exit, not a death: the NIC stops watching us and keeps running.
            try:
                self.nic.call("bye", {}, timeout_ms=1000)
            except ZcrxError as e:
                self.log.warning("NIC bye: %s", e)

    # -- admin syscalls ---------------------------------------------------------------

    def _dev(self, name: str) -> NetDevice:
        dev = self.netdevs.get(name)
        if dev is None:
            raise Misuse(f"no such device {name!r}", errno=errno.ENODEV)
        return dev

    def _sys_ethtool(self, msg: Message, peer: bytes) -> HandlerResult:
        req = msg.body["request"]
        cmd = req.get("cmd") if isinstance(req, Mapping) else None
        if not (isinstance(cmd, str) and cmd.endswith("-get")):
            task = self.ctx.tasks.find_peer(peer)
            if not (task.cap_net_admin if task is not None else self.is_launcher(peer)):
                self.stats["refused_no_cap"] += 1
                raise Misuse(f"ethtool {cmd}: needs CAP_NET_ADMIN", errno=errno.EPERM)
        if self.nic_dead:
            raise Misuse("the NIC is gone (surprise removal)", errno=errno.ENODEV)
        return self._dev(msg.body["dev"]).ethtool(req)

    def _sys_stats(self, msg: Message, peer: bytes) -> HandlerResult:
        mine = None if self.is_launcher(peer) else self._own_tids(peer)
        out: dict[str, Any] = {"kernel": dict(self.stats), "nic": "gone" if self.nic_dead
                               else "up"}
        out["netdevs"] = {}
        for name, dev in self.netdevs.items():
            out["netdevs"][name] = {f"rx-{q}": dev.queue_stats(q) for q in sorted(dev.queues)}
        out["tcp"] = dict(_as_dict(self.table.stats))
        out["tcp_mib"] = dict(self.output.mib)
        out["tx"] = {name: dict(dev.tx_stats) for name, dev in self.netdevs.items()}
        out["io_uring"] = self.ctx.rings.stats()
        out["skbs"] = {"in_flight": len(self.skbs.live_handles())}
        out["zcrx"] = self.zcrx.stats()
        out["memory_traffic"] = out["zcrx"]["memory_traffic"]
        out["mm"] = dict(MM_COUNTERS)
        if mine is not None:  # an app sees only its own rings and ifqs
            out["io_uring"]["rings"] = [r for r in out["io_uring"]["rings"]
                                        if r.get("task") in mine]
            out["zcrx"]["ifqs"] = [i for i in out["zcrx"]["ifqs"] if i.get("task") in mine]
            own = {i["ifq"] for i in out["zcrx"]["ifqs"]}
            out["zcrx"]["bound"] = {k: v for k, v in out["zcrx"]["bound"].items() if v in own}
        return out

    def _own_tids(self, peer: bytes) -> set[int]:
        """Task ids of the calling process (by the pid the OS gave): what an app may see."""
        cred = peer_cred(peer)
        if cred is None:
            return set()
        return {t.tid for t in self.ctx.tasks.by_pid(cred.pid)}

    def _sys_status(self, msg: Message, peer: bytes) -> HandlerResult:
        mine = None if self.is_launcher(peer) else self._own_tids(peer)
        tasks = [{"tid": t.tid, "pid": t.pid, "name": t.name} for t in self.ctx.tasks
                 if mine is None or t.tid in mine]
        ifqs = [i for i in self.zcrx.status() if mine is None or i.get("task") in mine]
        return {"run": self.run, "uptime_s": round(time.monotonic() - self._started, 3),
                "kernel": self.zcrx.kernel_name,
                "netdevs": [dev.status() for dev in self.netdevs.values()],
                "queues": self.queue_view(),
                "nic": "gone" if self.nic_dead else "up",
                "nic_reprobes": self.stats["nic_reprobes"],
                "tasks": tasks, "zcrx": ifqs}

    def _sys_if_nametoindex(self, msg: Message, peer: bytes) -> HandlerResult:
        """SIOCGIFINDEX: one netdev's index, without building the whole status."""
        dev = self.netdevs.get(msg.body["name"])
        if dev is None:
            raise Misuse(f"no such device {msg.body['name']!r}", errno=errno.ENODEV)
        return {"ifindex": dev.ifindex}

    def napi_id(self, dev: str, q: int) -> int:
        """The NAPI id of RX queue ``q`` of ``dev`` (a queue added later, ``ethtool -L``,
        gets the next id when first seen)."""
        napi_id = self.napi_ids.get((dev, q))
        if napi_id is None:
            napi_id = self.napi_ids[dev, q] = self._next_napi_id
            self._next_napi_id += 1
        return napi_id

    def queue_view(self) -> list[dict[str, Any]]:
        """Every RX queue as ``ynl netdev queue-get`` shows it: id, type, napi-id, ifindex
        and, for a queue bound to a zcrx ifq, the ``io-uring`` provider attribute."""
        out: list[dict[str, Any]] = []
        for dev in self.netdevs.values():
            for q in sorted(dev.queues):
                row: dict[str, Any] = {"id": q, "type": "rx", "ifindex": dev.ifindex}
                row["napi-id"] = self.napi_id(dev.name, q)
                if dev.binding(q) == "io-uring":
                    row["io-uring"] = {}
                out.append(row)
        return out

    def _sys_shutdown(self, msg: Message, peer: bytes) -> HandlerResult:
        self._require_launcher(peer, "shutdown")
        self.shutdown_requested = True
        return {}

    def _sys_cap_grant(self, msg: Message, peer: bytes) -> HandlerResult:
        """``cap_grant``: the launcher says a process it started has CAP_NET_ADMIN.  The
        grant lasts while that process lives (a pidfd drops it at death: no pid reuse)."""
        self._require_launcher(peer, "cap_grant")
        pid = msg.body["pid"]
        if pid <= 0 or self.watch.add(f"grant:{pid}", pid) < 0:
            raise Misuse(f"no process {pid}", errno=errno.ESRCH)
        self.ctx.tasks.grants.grant(pid)
        return {}

    def grant_cap(self, pid: int) -> None:
        """In-process form of ``cap_grant`` (tests, an embedding launcher)."""
        self.ctx.tasks.grants.grant(pid)


def _as_dict(stats: Any) -> Mapping[str, Any]:
    if hasattr(stats, "as_dict"):
        return dict(stats.as_dict())
    if isinstance(stats, Mapping):
        return stats
    return {k: v for k, v in vars(stats).items() if not k.startswith("_")}


def _unlink_prefix(prefix: str) -> int:
    """Unlink every shm segment whose name starts with ``prefix`` (``/zcrx.<run>.app7.``);
    returns how many.  Only the name goes: live mappings stay valid."""
    return len(remove_prefix_segments(prefix))


def _mac(text: object) -> bytes:
    """A MAC from the NIC's probe (``02:00:...``), or the emulator's default host MAC."""
    if isinstance(text, str):
        try:
            b = bytes.fromhex(text.replace(":", ""))
            if len(b) == 6:
                return b
        except ValueError:
            pass
    return bytes([2, 0, 0, 0, 0, 1])
