"""The run's fork server (issue 9, item 1): apps forked from a pre-imported template.

Through real processes and the CLI: a forked app is its own process that the kernel tears
down like any other when it is SIGKILLed mid-stream (every niov home, the template forks
the next); the template's own death leaves its apps running and the next ``zcrx app run``
working (the slow way, and a new template for the ones after), with nothing left behind; a
foreground app's exit code comes back through the template; and only the launcher's uid may
use the template's socket.  ``zcrx down`` must leave no process and no /dev/shm segment
(the conftest fixture checks).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch import forkserver as fs
from launch.run import FORKSERVER, Run, parse_role
from tests.e2e import stats, topology, wait_app, zcrx
from tests.test_death import BIG, _assert_nothing_left, _serve, _steer, _wait_progress

NETDEV = "eth0:queues=3,mtu=4136"


def _template(name: str) -> psutil.Process:
    p = Run.open(name).m.procs[FORKSERVER].process()
    assert p is not None, "the run's fork server is not running"
    return p


def _forked(name: str, role: str) -> bool:
    """Whether ``role`` was forked by the run's (current) template."""
    app = Run.open(name).m.procs[role].process()
    assert app is not None, f"{role} is not running"
    return app.ppid() == _template(name).pid


def _counters(name: str) -> dict[str, int]:
    run = Run.open(name)
    return fs.stats(run.dir, run.m.procs[FORKSERVER].pid)


def _byte_exact(report: Path, size: int) -> None:
    rep = json.loads(report.read_text())
    assert rep["ok"], rep
    (conn,) = rep["connections"]
    assert conn["bytes"] == size and conn["bad_offset"] is None and conn["ok"]


def test_forkserver_is_a_role_and_knows_its_entry_points() -> None:
    assert parse_role("ForkServer") == FORKSERVER
    assert fs.entry_point([sys.executable, "-m", "app_proc.copy_server", "-p", "1"]) == (
        "app_proc.copy_server", ["-p", "1"])
    assert fs.entry_point([sys.executable, "-m", "json.tool"]) is None  # not ours
    assert fs.entry_point(["/bin/true", "-m", "app_proc.copy_server"]) is None
    assert fs.entry_point([sys.executable, "examples/zcrx_receiver.py"]) is None


@pytest.mark.timeout(90)
def test_forked_app_sigkilled_midstream_every_niov_home(tmp_path: Path) -> None:
    """A forked zcrx-server killed mid-stream is torn down like any app: its ifq destroyed,
    every niov home, the queue back on kernel pages; the template forks the next one,
    which receives byte-exact."""
    name, size = "fk1", 8 << 20
    with topology(name, "--netdev", NETDEV) as run:
        _steer(name, 8000, 1)
        _serve(name, tmp_path / "victim.json", 8000, 1, BIG)
        assert _forked(name, "app:0")
        victim = Run.open(name).m.procs["app:0"].pid
        tasks = json.loads(zcrx("status", "--name", name, "--json").output)["tasks"]
        assert victim in [t["pid"] for t in tasks]  # the kernel knows it by its own pid
        zcrx("traffic", "--name", name, "--port", "8000", "--bytes", str(BIG))
        _wait_progress(name, 1, 2000)
        zcrx("kill", "--name", name, "app:0")
        deadline = time.monotonic() + 20
        while (st := stats(name)["zcrx"])["counters"].get("destroyed", 0) < 1:
            assert time.monotonic() < deadline, st
            time.sleep(0.01)
        assert st["ifqs"] == [] and st["ledger"]["niovs"] == 0, st
        q = json.loads(zcrx("status", "--name", name, "--json").output)
        assert q["netdevs"][0]["rx_queues"][1]["provider"] == "none"
        assert stats(name)["kernel"]["app_deaths"] == 1
        # the template is untouched and forks the next server, on the same queue
        _steer(name, 8001, 1)
        _serve(name, tmp_path / "next.json", 8001, 1, size)
        assert _forked(name, "app:1")
        zcrx("traffic", "--name", name, "--port", "8001", "--bytes", str(size))
        wait_app(name, "app:1", 40)
        st = stats(name)["zcrx"]
        assert st["ifqs"] == [] and st["ledger"]["niovs"] == 0
        assert st["counters"]["destroyed"] == st["counters"]["registered"] == 2
        assert _counters(name)["forked"] == 2
    _assert_nothing_left(run.m.run_id)
    _byte_exact(tmp_path / "next.json", size)


@pytest.mark.timeout(90)
def test_apps_started_in_one_batch_and_a_failed_batch_leaves_nothing() -> None:
    """Run.spawn_apps: the template forks every app before any is waited for and the
    kernel grants their CAP_NET_ADMIN in one round trip; they listen, each its own
    process, recorded in the manifest.  A batch that fails (one request the template
    refuses, or a refused grant) runs none of its apps and leaves no process behind."""
    from launch.run import AppStart
    from shared.errors import Misuse

    name = "fkb"
    with topology(name, "--netdev", NETDEV) as run:
        template = _template(name)
        starts = [AppStart(f"app:b{i}", "app_proc.copy_server", ["-p", str(8100 + i)],
                           notify=True, cap_net_admin=True) for i in range(3)]
        entries = run.spawn_apps(starts)
        for a in starts:
            run.wait_started(a.role)
        assert [e.role for e in entries] == ["app:b0", "app:b1", "app:b2"]
        saved = Run.open(name).m.procs
        for e in entries:
            p = saved[e.role].process()
            assert p is not None and p.ppid() == template.pid
        assert _counters(name)["forked"] == 3
        for e in entries:
            run.stop(e.role)

        def forked_now() -> set[int]:
            return {c.pid for c in template.children()}

        before = forked_now()
        # one request the template refuses: the other two (one held for its grant, one
        # not) are forked, then stopped; nothing of the batch runs or is recorded
        bad = [AppStart("app:c0", "app_proc.copy_server", ["-p", "8200"], cap_net_admin=True),
               AppStart("app:c1", "app_proc.no_such_app", []),
               AppStart("app:c2", "app_proc.copy_server", ["-p", "8201"])]
        with pytest.raises(Misuse) as ei:
            run.spawn_apps(bad)
        assert "not an entry point" in str(ei.value)
        # a grant the kernel refuses: every held child exits without running
        def refuse(pids: list[int]) -> None:
            raise Misuse("refused by the test", errno=1)

        run.grant_caps = refuse  # type: ignore[method-assign]
        with pytest.raises(Misuse) as ei:
            run.spawn_apps([AppStart(f"app:d{i}", "app_proc.copy_server",
                                     ["-p", str(8300 + i)], cap_net_admin=True)
                            for i in range(2)])
        assert ei.value.errno == 1
        deadline = time.monotonic() + 10
        while forked_now() - before:
            assert time.monotonic() < deadline, forked_now() - before
            time.sleep(0.02)
        assert not [r for r in Run.open(name).m.procs if r[4:5] in ("c", "d")]
        assert _counters(name)["forked"] == 3 + 2 + 2


@pytest.mark.timeout(120)
def test_killed_template_leaves_its_apps_and_the_next_app_run_works(tmp_path: Path) -> None:
    """SIGKILL the template: the app it forked keeps running (reparented); the next `zcrx
    app run` says once that it starts the slow way and re-makes the template, whose socket
    replaces the dead one's; the app after that is forked again; every byte arrives and
    `zcrx down` leaves no process, segment or socket file."""
    name, size = "fk2", 4 << 20
    with topology(name, "--netdev", NETDEV) as run:
        _steer(name, 8000, 1)
        _steer(name, 8001, 2)
        _serve(name, tmp_path / "a.json", 8000, 1, size)
        assert _forked(name, "app:0")
        old = _template(name).pid
        sock = fs.socket_path(run.dir)
        old_ino = sock.stat().st_ino
        zcrx("kill", "--name", name, FORKSERVER)
        app0 = Run.open(name).m.procs["app:0"].process()
        assert app0 is not None and app0.ppid() != old  # still running, reparented
        res = zcrx("app", "run", "--name", name, "--detach", "--cap-net-admin", "zcrx-server",
                   "--", "-p", "8001", "-i", "eth0", "-q", "2", "-v", "-n", "1",
                   "-s", str(size), "--json", str(tmp_path / "b.json"))
        assert res.output.count("slow way") == 1, res.output
        new = _template(name).pid
        assert new != old
        app1 = Run.open(name).m.procs["app:1"].process()
        assert app1 is not None and app1.ppid() != new  # the slow way: exec'd by us
        # the new template serves the next app (once it is listening)
        zcrx("app", "run", "--name", name, "--detach", "copy-server", "--", "-p", "8002")
        assert _forked(name, "app:2")
        assert sock.stat().st_ino != old_ino and stat.S_IMODE(sock.stat().st_mode) == 0o600
        zcrx("traffic", "--name", name, "--port", "8000", "--sport", "40000",
             "--bytes", str(size))
        zcrx("traffic", "--name", name, "--port", "8001", "--sport", "41000",
             "--bytes", str(size))
        wait_app(name, "app:0", 40)
        wait_app(name, "app:1", 40)
        st = stats(name)["zcrx"]
        assert st["ifqs"] == [] and st["ledger"]["niovs"] == 0
    _assert_nothing_left(run.m.run_id)
    assert not run.dir.exists()  # the socket file went with the run directory
    _byte_exact(tmp_path / "a.json", size)
    _byte_exact(tmp_path / "b.json", size)


@pytest.mark.timeout(60)
def test_a_forked_foreground_app_exit_code_is_ours(capfd: pytest.CaptureFixture[str]) -> None:
    """`zcrx app run` (foreground) of a forked app exits with the app's code: argparse's 2
    for a bad option, 0 for --help of `python -m app_proc.X`; its stdio is ours (the
    terminal's: passed to the template with SCM_RIGHTS)."""
    name = "fk3"
    with topology(name):
        res = zcrx("app", "run", "--name", name, "zcrx-server", "--", "--no-such-option",
                   ok=False)
        assert res.exit_code == 2, res.output
        assert "unrecognized arguments: --no-such-option" in capfd.readouterr().err
        res = zcrx("app", "run", "--name", name, "--", sys.executable, "-m",
                   "app_proc.copy_server", "--help")
        assert res.exit_code == 0, res.output
        assert capfd.readouterr().out.startswith("usage: python -m app_proc.copy_server")
        c = _counters(name)
        assert c["forked"] == 2 and c["reaped"] == 2 and c["running"] == 0, c
        assert Run.open(name).app_roles() == []  # foreground apps leave the manifest


_PROBE = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    s.connect(sys.argv[1])
    try:
        s.send(json.dumps({"op": "stats"}).encode())
    except BrokenPipeError:
        pass  # refused at accept: the reason is waiting to be read
    print(s.recv(4096).decode() or "closed")
except OSError as e:
    print(f"OSError {e.errno}")
"""


@pytest.mark.skipif(os.geteuid() != 0 or not os.access("/usr/bin/python3", os.X_OK),
                    reason="needs root (to act as another uid) and /usr/bin/python3")
@pytest.mark.timeout(60)
def test_another_uid_cannot_use_the_template() -> None:
    """The socket is 0600; and even where another uid can reach it, the template asks the
    OS who is calling (SO_PEERCRED), refuses, and counts it."""
    name, uid = "fk4", 60999

    def probe(path: Path) -> str:
        out = subprocess.run(["/usr/bin/python3", "-c", _PROBE, str(path)], user=uid,
                             group=uid, extra_groups=[], cwd="/", capture_output=True,
                             timeout=20, check=True)
        return out.stdout.decode().strip()

    with topology(name) as run:
        path = fs.socket_path(run.dir)
        deadline = time.monotonic() + 20
        while not path.exists():  # the template imports while we go on
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        dirs = [run.dir, run.dir.parent]
        modes = [d.stat().st_mode for d in dirs]
        try:
            for d in dirs:
                d.chmod(0o711)
            assert probe(path) == "OSError 13"  # EACCES: the file mode
            path.chmod(0o666)
            reply = probe(path)
            assert json.loads(reply)["errno"] == 1, reply  # EPERM: the peer's uid
        finally:
            for d, m in zip(dirs, modes, strict=True):
                d.chmod(stat.S_IMODE(m))
        assert _counters(name)["refused"] == 1
        # the launcher's own requests still work
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.connect(str(path))
            s.send(b'{"op": "stats"}')
            assert json.loads(s.recv(4096))["refused"] == 1
