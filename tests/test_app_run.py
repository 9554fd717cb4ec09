"""Any program as an app of a run (issue 10, part 1, the CLI half): ``zcrx app run -- COMMAND``
and ``zcrx env``.

A user's own receiver joins a run either through the launcher (listed, killable, stopped by
``zcrx down`` and ``zcrx cleanup`` like the sample servers) or by hand with the exports ``zcrx
env`` prints (then it sees the kernel go at ``zcrx down`` and exits by itself).  Either way
the bytes it wrote hash to what was sent, and nothing is left behind.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch.run import Run, tagged_processes
from shared import pattern
from shared.proc import NOTIFY_ENV
from shared.shm import list_run_segments
from tests.e2e import runs_dir, topology, wait_app, zcrx
from tests.test_own_receiver import EXAMPLES, sha256_file, steer

NETDEV = "eth0:queues=2"
ZC_QUEUE = 1


def receiver(*args: str) -> list[str]:
    """The tutorial's zero-copy receiver, as a user would type it (any executable)."""
    return [sys.executable, str(EXAMPLES / "zcrx_receiver.py"), *args]


def exports(name: str) -> dict[str, str]:
    """Parse ``zcrx env`` as a shell would (``export K=V`` lines, shell-quoted)."""
    out = zcrx("env", "--name", name).output
    env = {}
    for line in out.splitlines():
        word, assignment = shlex.split(line)
        assert word == "export"
        key, _, value = assignment.partition("=")
        env[key] = value
    return env


def gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.timeout(180)
def test_app_run_any_command_is_an_app_of_the_run(tmp_path: Path) -> None:
    """``zcrx app run --detach -- python examples/zcrx_receiver.py``: listed as app:0 with its
    command, waited for until it listens, byte-exact, and its exit is seen."""
    size = 4 << 20
    out = tmp_path / "received.bin"
    with topology("ar1", "--netdev", NETDEV):
        steer("ar1", 8000, ZC_QUEUE)
        res = zcrx("app", "run", "--name", "ar1", "--detach", "--cap-net-admin", "--",
                   *receiver("-p", "8000", "-q", str(ZC_QUEUE), "-o", str(out)))
        assert res.output.startswith("app:0 "), res.output
        rows = json.loads(zcrx("app", "list", "--name", "ar1", "--json").output)
        assert [r["role"] for r in rows] == ["app:0"]
        assert "zcrx_receiver.py" in rows[0]["program"] and rows[0]["alive"]
        zcrx("traffic", "--name", "ar1", "--port", "8000", "--sport", "40000",
             "--bytes", str(size))
        wait_app("ar1", "app:0", 60)
        log = Path(Run.open("ar1").m.procs["app:0"].log).read_text()
        assert f"{size} bytes" in log, log
    assert sha256_file(out) == pattern.expected_sha256(40000, size)


@pytest.mark.timeout(120)
def test_app_run_command_is_stopped_by_down_and_cleanup(tmp_path: Path) -> None:
    """A command that never says it is ready (``--ready start``) is still the run's: ``zcrx
    kill app:N`` reaches it, ``zcrx down`` stops it, ``zcrx cleanup`` finds it by its tag."""
    with topology("ar2", "--netdev", NETDEV) as run:
        zcrx("app", "run", "--name", "ar2", "--detach", "--ready", "start", "--",
             "sleep", "300")
        zcrx("app", "run", "--name", "ar2", "--detach", "--ready", "start", "--",
             "sleep", "301")
        procs = Run.open("ar2").m.procs
        first, second = procs["app:0"].pid, procs["app:1"].pid
        tagged = {p.pid for p in tagged_processes(run.run_id)}
        assert {first, second} <= tagged  # found by $ZCRX_TAG, not by argv
        zcrx("kill", "--name", "ar2", "app:0")
        assert gone(first, 5)
    assert gone(second, 5), "zcrx down left the command running"
    with runs_dir():
        zcrx("up", "--name", "ar3", "--netdev", NETDEV)
        zcrx("app", "run", "--name", "ar3", "--detach", "--ready", "start", "--",
             "sleep", "302")
        pid = Run.open("ar3").m.procs["app:0"].pid
        run_id = Run.open("ar3").run_id
        zcrx("cleanup", "--name", "ar3")
        assert gone(pid, 5), "zcrx cleanup left the command running"
        assert list_run_segments(run_id) == []


@pytest.mark.timeout(180)
def test_hand_started_program_with_zcrx_env(tmp_path: Path) -> None:
    """``eval "$(zcrx env)"`` then the receiver by hand: byte-exact; a second one, still
    waiting for a connection at ``zcrx down`` (the copy twin), exits by itself with one clear
    line."""
    size = 3 << 20
    out = tmp_path / "by-hand.bin"
    base = {k: v for k, v in os.environ.items() if not k.startswith("ZCRX_RUN")}
    with topology("ar4", "--netdev", NETDEV):
        env = {**base, **exports("ar4")}
        assert set(exports("ar4")) == {"ZCRX_RUN", "ZCRX_RUNDIR"}
        steer("ar4", 8000, ZC_QUEUE)
        # By hand, as a user would: binding a hardware queue needs CAP_NET_ADMIN, which the
        # launcher's uid grants to the process (`zcrx app grant PID`) before it gets that far:
        # the shell holds until granted, then becomes the receiver (same pid).
        ready = tmp_path / "zc.ready"  # it says when it listens (notify_ready)
        listening = tmp_path / "copy.ready"  # and so does the one that will wait
        proc = subprocess.Popen(["sh", "-c", 'read go && exec "$@"', "sh",
                                 *receiver("-p", "8000", "-q", str(ZC_QUEUE), "-o", str(out))],
                                env={**env, NOTIFY_ENV: str(ready)}, stdin=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        zcrx("app", "grant", "--name", "ar4", str(proc.pid))
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        proc.stdin = None
        waiting = subprocess.Popen([sys.executable, str(EXAMPLES / "copy_receiver.py"),
                                    "-p", "8001"], env={**env, NOTIFY_ENV: str(listening)},
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        try:
            # The generator never resends a SYN: both must listen before traffic starts.
            deadline = time.monotonic() + 60
            while not (ready.exists() and listening.exists()) and proc.poll() is None \
                    and waiting.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert ready.exists() and listening.exists(), "a receiver never said it listens"
            zcrx("traffic", "--name", "ar4", "--port", "8000", "--sport", "41000",
                 "--bytes", str(size))
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err.decode()
            assert waiting.poll() is None
        except BaseException:
            proc.kill()
            waiting.kill()
            raise
    try:
        _, err = waiting.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        waiting.kill()
        waiting.wait()
        raise AssertionError("a hand-started app outlived `zcrx down`") from None
    assert waiting.returncode not in (0, None)
    lines = [x for x in err.decode().splitlines() if x.strip()]
    assert lines and "Traceback" not in err.decode(), err.decode()
    assert sha256_file(out) == pattern.expected_sha256(41000, size)


def test_app_run_unknown_program_is_a_usage_error() -> None:
    with topology("ar5", "--netdev", "eth0:queues=1"):
        res = zcrx("app", "run", "--name", "ar5", "--", "no-such-program-xyz", ok=False)
        assert res.exit_code == 2
        assert "no-such-program-xyz" in res.output and len(res.output.splitlines()) == 1
        assert zcrx("app", "list", "--name", "ar5", "--json").output.strip() == "[]"


@pytest.mark.timeout(90)
def test_hand_started_program_exits_at_zcrx_cleanup(tmp_path: Path) -> None:
    """`zcrx cleanup` (a crashed run's remedy) also ends a program that joined by hand: it
    sees the kernel gone and exits with one line; nothing of the run is left."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("ZCRX_RUN")}
    listening = tmp_path / "copy.ready"
    with runs_dir():
        zcrx("up", "--name", "ar6", "--netdev", "eth0:queues=1")
        run_id = Run.open("ar6").run_id
        env = {**base, **exports("ar6"), NOTIFY_ENV: str(listening)}
        proc = subprocess.Popen([sys.executable, str(EXAMPLES / "copy_receiver.py"), "-p",
                                 "8001"], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not listening.exists() and proc.poll() is None:
                assert time.monotonic() < deadline, "the receiver never said it listens"
                time.sleep(0.02)
            zcrx("cleanup", "--name", "ar6")
            _, err = proc.communicate(timeout=20)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    assert proc.returncode not in (0, None)
    assert err.strip() and b"Traceback" not in err, err.decode()
    assert list_run_segments(run_id) == []
