"""Your own receiver (issue 10): the tutorial's two examples and the sample servers' ``-o``.

Each program runs as a separate process that joins a real run (NIC and kernel processes)
through its environment alone: ``ZCRX_RUNDIR`` and nothing else, as ``zcrx env`` sets it.
What it wrote (a file, or its stdout) must hash to what was sent: a generator flow (the
pattern stream of its source port), or real bytes through the wire gateway (a Python
client, or ``nc``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from launch.run import Run
from shared import pattern
from shared.proc import NOTIFY_ENV
from tests.e2e import stats, topology, zcrx

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ZC_QUEUE = 1
#: The copy flows are steered away from the bound queue: a flow still arriving on a queue
#: whose ifq is destroyed (the zero-copy program exits first) loses the frames in flight at
#: the queue restart, and the emulated senders never retransmit.
COPY_QUEUE = 0
NETDEV = "eth0:queues=2"


def run_env(rundir: Path | None, **extra: str) -> dict[str, str]:
    """The environment of a program started by hand: the run named by ZCRX_RUNDIR only."""
    env = {k: v for k, v in os.environ.items() if k not in ("ZCRX_RUN", "ZCRX_RUNDIR")}
    if rundir is not None:
        env["ZCRX_RUNDIR"] = str(rundir)
    env.update(extra)
    return env


@contextmanager
def program(argv: list[str], rundir: Path, tmp: Path, tag: str, *,
            stdout: Path | None = None, cap_net_admin: bool = False
            ) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv`` in the run; yield once it listens (it calls notify_ready); kill it on
    the way out if it is still running.  Its stderr goes to ``tmp/<tag>.err``.  With
    ``cap_net_admin`` we, the run's launcher, grant it CAP_NET_ADMIN."""
    ready = tmp / f"{tag}.ready"
    err = tmp / f"{tag}.err"
    with open(err, "wb") as ef, open(stdout or os.devnull, "wb") as of:
        proc = subprocess.Popen(argv, env=run_env(rundir, **{NOTIFY_ENV: str(ready)}),
                                stdin=subprocess.DEVNULL, stdout=of, stderr=ef)
    try:
        if cap_net_admin:
            Run.open(rundir.name).grant_cap(proc.pid)
        deadline = time.monotonic() + 30
        while not ready.exists():
            if proc.poll() is not None:
                raise AssertionError(f"{tag} exited {proc.returncode}: {err.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{tag} not listening after 30 s: {err.read_text()}")
            time.sleep(0.02)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def finish(proc: subprocess.Popen[bytes], tmp: Path, tag: str, timeout: float = 120) -> str:
    """Wait for the program to exit 0; its stderr."""
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"{tag} still running after {timeout} s: "
                             f"{(tmp / f'{tag}.err').read_text()}") from None
    text = (tmp / f"{tag}.err").read_text()
    assert code == 0, f"{tag} exited {code}: {text}"
    return text


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def steer(name: str, port: int, queue: int) -> None:
    zcrx("ethtool", "--name", name, "-N", "eth0", "flow-type", "tcp4", "dst-port", str(port),
         "action", str(queue))


def send(port: int, data: bytes) -> None:
    """A real TCP client of the wire gateway: connect, send everything, half-close."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)


def zero_copy_bytes(name: str) -> tuple[int, int]:
    """(bytes handed over in place, bytes copied into an area) by every ifq of the run, the
    destroyed ones included: was it really zero copy?"""
    retired = stats(name)["zcrx"]["retired"]
    return int(retired.get("zc_bytes", 0)), int(retired.get("copy_bytes", 0))


def example(name: str, *args: str) -> list[str]:
    return [sys.executable, str(EXAMPLES / name), *args]


@pytest.mark.timeout(240)
def test_examples_write_a_generator_flow_byte_exact(tmp_path: Path) -> None:
    """zcrx_receiver on the bound queue and copy_receiver beside it, one flow each."""
    size = 6 << 20
    zc_out, copy_out = tmp_path / "zc.bin", tmp_path / "copy.bin"
    with topology("ex1", "--netdev", NETDEV) as run:
        steer("ex1", 8000, ZC_QUEUE)
        steer("ex1", 8001, COPY_QUEUE)
        with program(example("zcrx_receiver.py", "-p", "8000", "-q", str(ZC_QUEUE), "-o",
                             str(zc_out)), run.dir, tmp_path, "zc", cap_net_admin=True) as zc, \
                program(example("copy_receiver.py", "-p", "8001"), run.dir, tmp_path, "copy",
                        stdout=copy_out) as cp:
            zcrx("traffic", "--name", "ex1", "--port", "8000", "--sport", "30000",
                 "--bytes", str(size))
            zcrx("traffic", "--name", "ex1", "--port", "8001", "--sport", "31000",
                 "--bytes", str(size))
            assert f"{size} bytes" in finish(zc, tmp_path, "zc")
            assert f"{size} bytes" in finish(cp, tmp_path, "copy")
        assert zero_copy_bytes("ex1") == (size, 0)
    assert sha256_file(zc_out) == pattern.expected_sha256(30000, size)
    assert sha256_file(copy_out) == pattern.expected_sha256(31000, size)


@pytest.mark.timeout(240)
def test_examples_write_real_bytes_from_the_wire_gateway(tmp_path: Path) -> None:
    """A random file through the loopback gateway: to the zero-copy example on the bound
    queue (stdout), and to the copy example (a file)."""
    rng = np.random.default_rng(10)
    data = {p: rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            for p, n in ((free_port(), 3 << 20), (free_port(), (2 << 20) + 12345))}
    (zc_port, zc_data), (cp_port, cp_data) = data.items()
    zc_out, copy_out = tmp_path / "zc.bin", tmp_path / "copy.bin"
    with topology("ex2", "--netdev", NETDEV) as run:
        steer("ex2", zc_port, ZC_QUEUE)
        steer("ex2", cp_port, COPY_QUEUE)
        for port in (zc_port, cp_port):  # the gateway's flows go to its own port number
            zcrx("wire", "--name", "ex2", "--port", str(port))
        with program(example("zcrx_receiver.py", "-p", str(zc_port), "-q", str(ZC_QUEUE)),
                     run.dir, tmp_path, "zc", stdout=zc_out, cap_net_admin=True) as zc, \
                program(example("copy_receiver.py", "-p", str(cp_port), "-o", str(copy_out)),
                        run.dir, tmp_path, "copy") as cp:
            send(zc_port, zc_data)
            send(cp_port, cp_data)
            finish(zc, tmp_path, "zc")
            finish(cp, tmp_path, "copy")
        assert zero_copy_bytes("ex2") == (len(zc_data), 0)
    assert sha256_file(zc_out) == hashlib.sha256(zc_data).hexdigest()
    assert sha256_file(copy_out) == hashlib.sha256(cp_data).hexdigest()


@pytest.mark.timeout(240)
@pytest.mark.skipif(shutil.which("nc") is None, reason="netcat (nc) is not installed")
def test_sample_servers_write_what_nc_sent_with_o(tmp_path: Path) -> None:
    """``-o FILE`` (zcrx-server, on the bound queue) and ``-o -`` (copy-server, stdout): a
    real file sent with ``nc`` through the wire gateway, sha256 equal."""
    src = tmp_path / "random.bin"
    src.write_bytes(np.random.default_rng(11).integers(0, 256, 5 << 20, dtype=np.uint8)
                    .tobytes())
    want = sha256_file(src)
    zc_port, cp_port = free_port(), free_port()
    zc_out, copy_out, zc_log = tmp_path / "zc.bin", tmp_path / "copy.bin", tmp_path / "zc.log"
    server = [sys.executable, "-m"]
    with topology("ex3", "--netdev", NETDEV) as run:
        steer("ex3", zc_port, ZC_QUEUE)
        steer("ex3", cp_port, COPY_QUEUE)
        for port in (zc_port, cp_port):
            zcrx("wire", "--name", "ex3", "--port", str(port))
        with program([*server, "app_proc.zcrx_server", "-p", str(zc_port), "-q", str(ZC_QUEUE),
                      "-n", "1", "-o", str(zc_out), "-S", "16M"], run.dir, tmp_path, "zc",
                     stdout=zc_log, cap_net_admin=True) as zc, \
                program([*server, "app_proc.copy_server", "-p", str(cp_port), "-n", "1",
                         "-o", "-"], run.dir, tmp_path, "copy", stdout=copy_out) as cp:
            for port in (zc_port, cp_port):
                with open(src, "rb") as f:
                    nc = subprocess.run(["nc", "-N", "127.0.0.1", str(port)], stdin=f,
                                        timeout=120, check=False)
                assert nc.returncode == 0
            finish(zc, tmp_path, "zc")
            # With -o - the stream is stdout, so the server's own lines go to stderr.
            assert want in finish(cp, tmp_path, "copy")
        assert zero_copy_bytes("ex3") == (src.stat().st_size, 0)
    assert want in zc_log.read_text()  # the per-connection line, on stdout
    assert sha256_file(zc_out) == want
    assert sha256_file(copy_out) == want


def test_programs_without_a_run_say_what_to_set_and_exit_2(tmp_path: Path) -> None:
    """No variable and no run up: one line naming the variables, exit 2 (not a traceback,
    not an errno from the first syscall)."""
    env = run_env(None, ZCRX_RUNS_DIR=str(tmp_path))
    for argv in (example("zcrx_receiver.py", "-q", "1"), example("copy_receiver.py"),
                 [sys.executable, "-m", "app_proc.zcrx_server", "-q", "1"],
                 [sys.executable, "-m", "app_proc.copy_server"]):
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60,
                             check=False)
        assert res.returncode == 2, (argv, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "no run is up" in lines[0], (argv, res.stderr)
        assert "ZCRX_RUNDIR" in lines[0], lines
    # A run directory that is not one: the same kind of line, naming what was set.
    bad = tmp_path / "nothere"
    res = subprocess.run(example("copy_receiver.py"), env=run_env(bad), capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert f"ZCRX_RUNDIR={bad}: no such directory" in res.stderr


@pytest.mark.timeout(180)
def test_zcrx_server_o_with_small_segments_writes_every_byte_in_order(tmp_path: Path) -> None:
    """64-byte segments: zcrx-server hashes (and writes) short runs from one staged gather,
    so ``-o`` takes that path too; the file must still be the stream, byte for byte."""
    size = 384 << 10
    out, log = tmp_path / "small.bin", tmp_path / "small.log"
    summary = tmp_path / "small.json"
    with topology("ex4", "--netdev", NETDEV) as run:
        steer("ex4", 8000, ZC_QUEUE)
        with program([sys.executable, "-m", "app_proc.zcrx_server", "-p", "8000", "-q",
                      str(ZC_QUEUE), "-n", "1", "-o", str(out), "-S", "16M", "--json",
                      str(summary)], run.dir,
                     tmp_path, "zc", stdout=log, cap_net_admin=True) as zc:
            zcrx("traffic", "--name", "ex4", "--port", "8000", "--sport", "32000",
                 "--bytes", str(size), "--payload", "64")
            finish(zc, tmp_path, "zc")
    assert json.loads(summary.read_text())["app"]["hash_staged_bytes"] > 0  # the gather path
    assert sha256_file(out) == pattern.expected_sha256(32000, size)
