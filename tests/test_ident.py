"""Identity from the OS, privilege from the launcher, memory only its owner reaches (issue 11).

Findings of the hostile-app test these pin down:

* 2: a peer that is not the run's launcher sends ``shutdown``: EPERM, the kernel keeps serving;
* 3: ``attach`` believes no pid it is told (2^40, 1, the kernel's own): the task gets the pid
  the OS gives (SO_PEERCRED), is watched, and is reaped when its process vanishes without
  ``bye``;
* 4: CAP_NET_ADMIN is what the launcher granted, not what the app says (ethtool writes and
  ifq registration: EPERM); the NIC's control socket refuses anyone but the launcher's uid;
  ``stats``/``status`` show an app only its own tasks;
* 5 (the uid half, root only): each app of a root run has its own uid; app B cannot open any
  segment of app A (EACCES) nor register A's memory in any way.
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from test_zcrx import KernelThread, setup_zcrx, zring

from app_proc import syscall as S
from nic_proc.main import NicProcess
from shared import abi
from shared.control import ControlClient, Peer, PeerCred, ipc_endpoint
from shared.msg import ControlError
from shared.nicif import NetdevSpec


def _child(endpoint: str, code: str, *args: str) -> dict[str, Any]:
    """Run ``code`` in another process (``endpoint`` and ``args`` in ``sys.argv``); the JSON
    it prints."""
    res = subprocess.run([sys.executable, "-c", code, endpoint, *args], capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


# -- the transport: what the OS says ------------------------------------------------------------


def test_peer_address_of_an_ipc_connection_is_the_callers_credentials() -> None:
    """libzmq's Peer-Address for ipc is ``host:uid:gid:pid`` (SO_PEERCRED); anything else
    (a tcp address, nothing) gives no credentials."""
    assert PeerCred.from_peer_address("localhost:1000:100:4242") == PeerCred(4242, 1000, 100)
    for text in (None, "", "127.0.0.1", "127.0.0.1:5555", "a:b:c:d", "h:0:0:0", "h:-1:0:5"):
        assert PeerCred.from_peer_address(text) is None
    p = Peer(b"id", PeerCred(1, 2, 3))
    assert p == b"id" and hash(p) == hash(b"id") and p.cred == PeerCred(1, 2, 3)


# -- finding 2: only the launcher stops the kernel ----------------------------------------------


def test_shutdown_from_anyone_but_the_launcher_is_refused(kt: KernelThread, tmp_path: Path
                                                          ) -> None:
    endpoint = ipc_endpoint(tmp_path, "kernel")
    # An attached app (same uid as the launcher here) is an app, not the launcher.
    app = S.Kernel(tmp_path, run=kt.kernel.run, name="app")
    app.attach()
    with pytest.raises(ControlError) as ei:
        app.syscall("shutdown")
    assert ei.value.errno == errno.EPERM
    # A peer that never attached, whose uid is not the launcher's.
    kt.call(lambda k: setattr(k, "launcher_uid", os.geteuid() + 4242))
    with ControlClient(endpoint, timeout_ms=5000) as c, pytest.raises(ControlError) as ei:
        c.call("shutdown")
    assert ei.value.errno == errno.EPERM
    assert not kt.call(lambda k: k.shutdown_requested)
    assert kt.call(lambda k: k.stats["refused_not_launcher"]) == 2
    app.close()
    # The launcher may.
    kt.call(lambda k: setattr(k, "launcher_uid", os.geteuid()))
    with ControlClient(endpoint, timeout_ms=5000) as c:
        c.call("shutdown")
    assert kt.call(lambda k: k.shutdown_requested)


# -- finding 3: the pid is the OS's, and a vanished client is reaped ------------------------------

_LIAR = """
import json, os, sys
import shared.syscalls
from shared.control import ControlClient
c = ControlClient(sys.argv[1], timeout_ms=10000)
pid = os.getppid() if sys.argv[2] == "parent" else int(sys.argv[2])
task = c.call("attach", {"pid": pid, "name": "liar"})["task"]
c.call("io_uring_setup", {"entries": 8}, [bytes(PARAMS)])
print(json.dumps({"task": task, "pid": os.getpid()}))
os._exit(0)   # no bye
""".replace("PARAMS", str(abi.io_uring_params.itemsize))


@pytest.mark.parametrize("claimed", [str(2**40), "1", "parent"],
                         ids=["pid-2^40", "pid-1", "kernel-pid"])
def test_attach_takes_the_pid_from_the_os_and_reaps_a_client_gone_without_bye(
        kt: KernelThread, tmp_path: Path, claimed: str) -> None:
    got = _child(ipc_endpoint(tmp_path, "kernel"), _LIAR, claimed)
    tid = got["task"]
    assert got["pid"] != os.getpid()
    # The task was known by the child's real pid, and its death reaps it (and its ring).
    deadline = time.monotonic() + 10
    while kt.call(lambda k: k.ctx.tasks.by_tid(tid) is not None):
        kt.call(lambda k: k.check_peers())
        assert time.monotonic() < deadline, "the vanished client's task was never reaped"
        time.sleep(0.01)
    deaths = kt.call(lambda k: list(k.deaths))
    assert [d["pid"] for d in deaths if d["tid"] == tid] == [got["pid"]]
    assert kt.call(lambda k: [r for r in k.ctx.rings.rings if not r.closed]) == []


def test_a_request_over_another_processs_connection_is_not_that_task(kt: KernelThread,
                                                                     tmp_path: Path) -> None:
    """A routing identity taken over by another process (ROUTER_HANDOVER) does not carry the
    task with it: the task is the (identity, pid) the OS saw at attach."""
    app = S.Kernel(tmp_path, run=kt.kernel.run, name="victim")
    app.attach()
    tasks = kt.kernel.ctx.tasks
    task = kt.call(lambda k: k.ctx.tasks.by_tid(app.task))
    thief = Peer(bytes(task.peer), PeerCred(task.pid + 1, os.geteuid(), os.getegid()))
    assert kt.call(lambda k: tasks.find_peer(thief)) is None
    assert kt.call(lambda k: tasks.find_peer(task.peer)) is task
    app.close()


# -- finding 4: privilege comes from the launcher -----------------------------------------------


def test_self_declared_cap_net_admin_is_not_a_capability(kt: KernelThread, tmp_path: Path
                                                         ) -> None:
    kt.call(lambda k: k.ctx.tasks.grants.pids.clear())  # the launcher granted nobody
    app = S.Kernel(tmp_path, run=kt.kernel.run, name="claims-cap")
    app.attach(cap_net_admin=True)
    rule = {"cmd": "ntuple-add", "dev": "eth0", "flow_type": "tcp4", "dst_port": 9000,
            "action": 1}
    with pytest.raises(ControlError) as ei:
        app.syscall("ethtool", {"dev": "eth0", "request": rule})
    assert ei.value.errno == errno.EPERM
    with pytest.raises(ControlError) as ei:
        app.syscall("ethtool", {"dev": "eth0",
                                "request": {"cmd": "ntuple-delete", "dev": "eth0", "loc": 0}})
    assert ei.value.errno == errno.EPERM
    # reads need no capability
    app.syscall("ethtool", {"dev": "eth0", "request": {"cmd": "channels-get", "dev": "eth0"}})
    # ... and once the launcher grants this process, the same calls go through
    kt.call(lambda k: k.grant_cap(os.getpid()))
    app.syscall("ethtool", {"dev": "eth0", "request": rule})
    app.close()


def test_zcrx_registration_needs_the_launchers_grant(kt: KernelThread, tmp_path: Path) -> None:
    kt.call(lambda k: k.ctx.tasks.grants.pids.clear())
    app = S.Kernel(tmp_path, run=kt.kernel.run, name="claims-cap")
    app.attach(cap_net_admin=True)
    ring = zring(app)
    with pytest.raises(ControlError) as ei:
        setup_zcrx(app, ring, nodev=False, if_idx=2, if_rxq=1)
    assert ei.value.errno == errno.EPERM
    app.close()


def test_cap_grant_is_the_launchers_only(kt: KernelThread, tmp_path: Path) -> None:
    app = S.Kernel(tmp_path, run=kt.kernel.run, name="wants-cap")
    app.attach()
    with pytest.raises(ControlError) as ei:
        app.syscall("cap_grant", {"pid": os.getpid()})
    assert ei.value.errno == errno.EPERM
    app.close()


_PEEK = """
import json, os, sys
import shared.syscalls
from shared.control import ControlClient
c = ControlClient(sys.argv[1], timeout_ms=10000)
task = c.call("attach", {"pid": 1, "name": "peeker"})["task"]
status, stats = c.call("status"), c.call("stats")
print(json.dumps({"task": task, "pid": os.getpid(), "status": status, "stats": stats}))
c.call("bye")
"""


def test_stats_and_status_show_an_app_only_its_own_tasks(kt: KernelThread, tmp_path: Path
                                                         ) -> None:
    a = S.Kernel(tmp_path, run=kt.kernel.run, name="neighbour")
    a.attach()
    setup_zcrx(a, zring(a), nodev=False, if_idx=2, if_rxq=1)
    got = _child(ipc_endpoint(tmp_path, "kernel"), _PEEK)
    assert got["status"]["tasks"] == [{"tid": got["task"], "pid": got["pid"],
                                       "name": "peeker"}]
    assert got["status"]["zcrx"] == []
    assert got["stats"]["zcrx"]["ifqs"] == [] and got["stats"]["zcrx"]["bound"] == {}
    assert got["stats"]["io_uring"]["rings"] == []
    assert str(os.getpid()) not in json.dumps(got["status"]) + json.dumps(got["stats"])
    # the launcher (not attached, its uid) sees everything
    with ControlClient(ipc_endpoint(tmp_path, "kernel"), timeout_ms=5000) as c:
        status = c.call("status")
    assert a.task in [t["tid"] for t in status["tasks"]] and len(status["zcrx"]) == 1
    a.close()


def test_the_nic_serves_only_the_launchers_uid(run_id: str, tmp_path: Path) -> None:
    proc = NicProcess(run_id, tmp_path, [NetdevSpec.parse("eth0:queues=2")], watch_parent=False,
                      launcher_uid=os.geteuid() + 4242)   # we are not the launcher here
    try:
        t = threading.Thread(target=lambda: [proc.server.poll_once(5000) for _ in range(2)])
        t.start()
        with ControlClient(ipc_endpoint(tmp_path, "nic"), timeout_ms=5000) as c:
            for type_, body in (("nic.probe", {}), ("nic.link", {"dev": "eth0", "up": False})):
                with pytest.raises(ControlError) as ei:
                    c.call(type_, body)
                assert ei.value.errno == errno.EPERM
        t.join(10)
        assert proc.server.stats.refused == 2
    finally:
        proc.close()


# -- the uid half of finding 5: app B cannot reach app A's memory (root) -----------------------

A_UID, B_UID = 61000, 61001
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="per-app uids need root (run the suite as root, as CI does); as "
    "a normal user every app has the launcher's uid and apps are not isolated")


@contextmanager
def _root_run(name: str) -> Iterator[Any]:
    """A run whose directory every uid can reach (``zcrx up`` as root)."""
    from tests.e2e import topology

    with topology(name, "--netdev", "eth0:queues=2", "--app-uid-base", str(A_UID),
                  runs_mode=0o755) as run:
        if run.dir.stat().st_mode & 0o777 == 0o700:
            run.dir.chmod(0o711)  # not isolated by zcrx up here (see isolation()): apps
            # forked below under their own uids still find the kernel's socket
        yield run


class _AsUid:
    """A child process forked from this one (the interpreter already loaded, so it needs
    nothing under a directory only root reaches) running ``fn()`` as ``uid``; ``fn`` may
    send JSON-able values (:meth:`recv` reads them) and waits for :meth:`release`."""

    def __init__(self, uid: int, fn: Any) -> None:
        go_r, self._go = os.pipe()
        self._out, out_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child
            code = 1
            try:
                os.close(self._go)
                os.close(self._out)
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)

                def send(value: Any) -> None:
                    data = json.dumps(value).encode() + b"\n"
                    os.write(out_w, data)

                def wait() -> None:
                    os.read(go_r, 1)

                fn(send, wait)
                code = 0
            except BaseException as e:  # report, never return into pytest
                try:
                    os.write(out_w, json.dumps({"error": repr(e)}).encode() + b"\n")
                except BaseException:
                    pass
            finally:
                os._exit(code)
        os.close(go_r)
        os.close(out_w)
        self._buf = b""

    def recv(self, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            r, _, _ = select.select([self._out], [], [], max(0.0, deadline - time.monotonic()))
            assert r, "the child said nothing"
            chunk = os.read(self._out, 65536)
            assert chunk, "the child exited without a word"
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        value = json.loads(line)
        assert not (isinstance(value, dict) and "error" in value), value["error"]
        return value

    def release(self) -> int:
        try:
            os.write(self._go, b"x")
        except OSError:
            pass
        _, status = os.waitpid(self.pid, 0)
        os.close(self._go)
        os.close(self._out)
        return os.waitstatus_to_exitcode(status)


@pytest.mark.timeout(180)
@needs_root
def test_root_app_b_cannot_open_or_register_any_memory_of_app_a() -> None:
    import posix_ipc

    from shared.shm import list_run_segments

    with _root_run("iso") as run:
        ifindex = run_status(run)["netdevs"][0]["ifindex"]

        def app_a(send: Any, wait: Any) -> None:
            wait()  # until the launcher granted CAP_NET_ADMIN
            a = S.Kernel(run.dir, run=run.run_id, name="A")
            a.attach()
            zq = setup_zcrx(a, zring(a), nodev=False, if_idx=ifindex, if_rxq=1)
            named = a.alloc_memory(4096, tag="named", named=True)  # a name B could aim at
            # A's registered memory is sealed memfds: no names; B may try their numbers
            fds = [m.fd for m in (zq.b.area, zq.b.rq, zq.b.params) if m is not None]
            send({"task": a.task, "pid": os.getpid(), "fds": fds})
            wait()
            zq.close()
            named.close()
            a.close()

        a = _AsUid(A_UID, app_a)
        try:
            run.grant_cap(a.pid)
            os.write(a._go, b"x")
            got_a = a.recv()
            segs = [n.lstrip("/") for n in list_run_segments(run.run_id)]
            mine = [n for n in segs if f".app{got_a['task']}." in n
                    or f".kernel.t{got_a['task']}." in n]
            assert any(".app" in n for n in mine) and any(".kernel.t" in n for n in mine), segs
            for n in mine:  # A's memory, and the kernel regions that are A's: A's uid, 0600
                st = os.stat(f"/dev/shm/{n}")
                assert (st.st_uid, st.st_mode & 0o777) == (A_UID, 0o600), n

            def app_b(send: Any, wait: Any) -> None:
                opened = {}
                for n in mine:
                    try:
                        posix_ipc.SharedMemory("/" + n).close_fd()
                        opened[n] = 0
                    except posix_ipc.PermissionsError:
                        opened[n] = errno.EACCES
                b = S.Kernel(run.dir, run=run.run_id, name="B")
                b.attach()
                own = f"zcrx.{run.run_id}.app{b.task}."
                mapped = {}

                def try_map(label: str, name: str) -> None:
                    try:
                        b.mm_map(name, 4096)
                        mapped[label] = 0
                    except ControlError as e:
                        mapped[label] = e.errno or -1

                for n in mine:
                    try_map(f"name {n}", "/" + n)
                    sym = f"/dev/shm/{own}sym"
                    os.symlink(f"/dev/shm/{n}", sym)
                    try_map(f"symlink {n}", "/" + own + "sym")
                    os.unlink(sym)
                    try:
                        os.link(f"/dev/shm/{n}", f"/dev/shm/{own}hard")
                    except OSError as e:
                        mapped[f"hardlink {n}"] = e.errno or -1
                    else:
                        try_map(f"hardlink {n}", "/" + own + "hard")
                        os.unlink(f"/dev/shm/{own}hard")
                for fd in got_a["fds"]:  # A's memfds: through /proc, or their numbers
                    try:
                        os.close(os.open(f"/proc/{got_a['pid']}/fd/{fd}", os.O_RDWR))
                        opened[f"proc fd {fd}"] = 0
                    except OSError as e:
                        opened[f"proc fd {fd}"] = e.errno or -1
                    try:
                        b.mm_map_fd(fd, 4096)
                        mapped[f"fd {fd}"] = 0
                    except ControlError as e:
                        mapped[f"fd {fd}"] = e.errno or -1
                send({"uid": os.geteuid(), "opened": opened, "mapped": mapped})
                b.close()

            b = _AsUid(B_UID, app_b)
            got_b = b.recv()
            assert b.release() == 0
            assert got_b["uid"] == B_UID
            assert got_b["opened"] == {**{n: errno.EACCES for n in mine},
                                       **{f"proc fd {fd}": errno.EACCES
                                          for fd in got_a["fds"]}}
            assert got_b["mapped"] and 0 not in got_b["mapped"].values(), got_b["mapped"]
        finally:
            a.release()


def run_status(run: Any) -> dict[str, Any]:
    with ControlClient(run.endpoint("kernel"), timeout_ms=10_000) as c:
        return c.call("status")


@pytest.mark.timeout(180)
@needs_root
def test_root_zcrx_app_run_starts_each_app_under_its_own_uid() -> None:
    from launch.run import Run, isolation
    from tests.e2e import zcrx

    with _root_run("isu") as run:
        if isolation(A_UID)[0] is None:
            pytest.skip(isolation(A_UID)[1])
        zcrx("app", "run", "--name", "isu", "--detach", "--ready", "start", "--",
             "sleep", "30")
        zcrx("app", "run", "--name", "isu", "--detach", "--ready", "start", "--",
             "sleep", "31")
        procs = Run.open(run.m.name).m.procs
        uids = [procs[r].process().uids().effective for r in ("app:0", "app:1")]
        assert uids == [A_UID, A_UID + 1]


@pytest.mark.timeout(180)
@needs_root
def test_root_forked_sample_server_runs_under_its_own_uid_and_serves() -> None:
    """Our own programs are forked from the run's template (no exec, so no interpreter the
    app's uid must reach): as root, each still drops to its own uid before running, and it
    receives a stream byte-exact as that uid (its summary file is that uid's)."""
    from launch.run import Run
    from tests.e2e import wait_app, zcrx

    out_dir = Path(tempfile.mkdtemp(prefix="zro", dir="/tmp"))
    os.chmod(out_dir, 0o777)
    size = 1 << 20
    try:
        with _root_run("isf") as run:
            zcrx("app", "run", "--name", "isf", "--detach", "copy-server", "--", "-p", "8002",
                 "-v", "-n", "1", "-s", str(size), "--json", str(out_dir / "cs.json"))
            proc = Run.open(run.m.name).m.procs["app:0"].process()
            assert proc is not None and proc.uids().effective == A_UID
            assert proc.ppid() != os.getpid()  # forked by the template, not by us
            zcrx("traffic", "--name", "isf", "--port", "8002", "--bytes", str(size))
            wait_app("isf", "app:0", 120)
        rep = json.loads((out_dir / "cs.json").read_text())
        assert rep["ok"] and [c["bytes"] for c in rep["connections"]] == [size], rep
        assert (out_dir / "cs.json").stat().st_uid == A_UID
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def test_a_granted_app_holds_before_exec_until_the_kernel_knows(tmp_path: Path) -> None:
    """The launcher's grant reaches the kernel before the app runs a single instruction of
    its own (no race with its first registration); a failed grant means it never runs."""
    from launch.run import popen_app
    from shared.errors import Misuse

    seen: list[int] = []
    marker = tmp_path / "ran"

    def grant(pid: int) -> None:
        assert not marker.exists()  # the program has not started yet
        time.sleep(0.2)
        seen.append(pid)

    proc = popen_app(["sh", "-c", f"touch {marker}"], grant=grant)
    assert proc.wait(10) == 0 and marker.exists() and seen == [proc.pid]

    def refuse(pid: int) -> None:
        raise Misuse("no", errno.EPERM)

    marker.unlink()
    with pytest.raises(Misuse):
        popen_app(["sh", "-c", f"touch {marker}"], grant=refuse)
    assert not marker.exists()
