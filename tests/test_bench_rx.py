"""Smoke tests of ``zcrx bench copy`` / ``zcrx bench zcrx``: tiny sizes, real processes.

They check that each mode delivers exactly the stream that was sent (the bench verifies every
connection's SHA-256 against the pattern), that the figures are there and have the right
shape, and that nothing is left behind.  No timing is asserted: the numbers are whatever this
machine gives.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from launch.bench_rx import FRAME_HDR, MTU, PAYLOAD, run_zcrx_bench
from launch.cli import main
from shared import wire

pytestmark = pytest.mark.timeout(180)

HAVE_KERNEL_ZCRX = importlib.util.find_spec("driver_proc.zcrx") is not None


@pytest.fixture
def runs_dir(monkeypatch):
    """A private, short ZCRX_RUNS_DIR (ipc socket paths must stay under 107 bytes)."""
    base = Path(tempfile.mkdtemp(prefix="zb", dir="/tmp"))
    monkeypatch.setenv("ZCRX_RUNS_DIR", str(base))
    yield base
    assert list(base.iterdir()) == []  # the run directory went with the run
    shutil.rmtree(base, ignore_errors=True)


def test_frame_geometry():
    assert wire.mss(wire.FAMILY_V4, MTU) == PAYLOAD == 4096
    assert FRAME_HDR == 54


def _row_shape(r: dict) -> None:
    assert set(r) >= {"mode", "flows", "bytes", "seconds", "gbps", "verified",
                      "kernel_cpu_s_per_gb", "moved_per_byte", "problems"}
    assert r["verified"] and r["problems"] == []
    assert r["seconds"] > 0 and r["gbps"] > 0
    assert r["kernel_cpu_s_per_gb"] is not None and r["kernel_cpu_s_per_gb"] >= 0


def test_bench_copy_cli_smoke(runs_dir, tmp_path):
    out = tmp_path / "copy.json"
    total = 1 << 20
    res = CliRunner().invoke(main, ["bench", "copy", "--bytes", str(total), "--flows", "1",
                                    "--flows", "2", "--json-out", str(out), "--timeout", "60"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "copy/loopback 1 flow(s)" in res.output and "verified" in res.output
    r = json.loads(out.read_text())
    assert r["bench"] == "copy" and r["payload"] == 4096 and r["mtu"] == 4136
    assert r["all_verified"] is True
    rows = {(x["mode"], x["flows"]): x for x in r["rows"]}
    assert set(rows) == {("copy", 1), ("copy", 2), ("loopback", 1), ("loopback", 2)}
    for (mode, flows), x in rows.items():
        _row_shape(x)
        assert x["bytes"] == total // flows * flows
        if mode == "copy":
            m = x["moved"]
            # NIC DMA wrote the payload once; the kernel copied all of it; the app read it.
            assert m["nic_dma_write"] == x["bytes"]
            assert m["kernel_copy_read"] == m["kernel_copy_write"] == x["bytes"]
            assert m["app_read"] == x["bytes"] and m["app_copy"] == 0
            assert x["moved_per_byte"] == pytest.approx(4.0)
        else:
            assert x["moved"] is None and x["moved_per_byte"] is None
    assert set(r["ratios"]) == {"copy/loopback 1 flow(s)", "copy/loopback 2 flow(s)"}
    assert all(v is not None and v > 0 for v in r["ratios"].values())


@pytest.mark.skipif(not HAVE_KERNEL_ZCRX, reason="driver_proc.zcrx not there yet")
def test_bench_zcrx_smoke(runs_dir):
    total = 2 << 20
    r = run_zcrx_bench(total, flows=1, repeat=1, timeout=60,
                       zcrx_args=["-S", "16M", "-R", "1024", "-C", "1024"])
    assert r["all_verified"] is True
    rows = {x["mode"]: x for x in r["rows"]}
    assert set(rows) == {"zcrx", "copy", "loopback"}
    for x in rows.values():
        _row_shape(x)
        assert x["bytes"] == total
    zc = rows["zcrx"]
    m = zc["moved"]
    assert m["nic_dma_write"] == total and m["app_read"] == total and m["app_copy"] == 0
    assert m["kernel_copy_read"] == m["kernel_copy_write"] is not None
    fb = zc["copy_fallback"]  # the kernel's own count of what it had to copy (per ifq)
    assert fb is not None and fb["source"] == "kernel"
    assert fb["bytes"] == m["kernel_copy_read"] and fb["zc_bytes"] + fb["bytes"] == total
    assert zc["moved_per_byte"] == pytest.approx(2.0 + 2 * m["kernel_copy_read"] / total)
    assert rows["copy"]["moved_per_byte"] == pytest.approx(4.0)
    assert [c["target"] for c in r["checks"]] == [
        "zero copy >= 1.5 x copy path (GB/s)", "zero copy >= 2 x loopback TCP (GB/s)",
        "bytes moved <= 0.55 x copy path"]
    assert all(isinstance(c["ok"], bool) for c in r["checks"])
    assert os.environ["ZCRX_RUNS_DIR"] == str(runs_dir)


@pytest.mark.skipif(not HAVE_KERNEL_ZCRX, reason="driver_proc.zcrx not there yet")
def test_bench_zcrx_small_segments_with_hw_gro_cli_smoke(runs_dir, tmp_path):
    """``--gro-hw --rx-buf-len``: the settings land in the report and every mode still
    delivers exactly what was sent."""
    out = tmp_path / "gro.json"
    res = CliRunner().invoke(main, ["bench", "zcrx", "--payload", "64", "--mtu", "1500",
                                    "--gro-hw", "--rx-buf-len", "8192", "--bytes", "524288",
                                    "--json-out", str(out), "--timeout", "60"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["gro_hw"] is True and r["rx_buf_len"] == 8192 and r["payload"] == 64
    assert r["all_verified"] is True
    assert {x["mode"]: x["bytes"] for x in r["rows"]} == {
        "zcrx": 524288, "copy": 524288, "loopback": 524288}
    zc = next(x for x in r["rows"] if x["mode"] == "zcrx")
    seg = [c for c in r["checks"] if c["target"] == "zero copy >= 1 M segments/s"]
    assert len(seg) == 1 and seg[0]["value"] == zc["mpps"] and isinstance(seg[0]["ok"], bool)
    assert r["ring"]["batch"] == 4096  # the generator's batch at 64 bytes, GRO on or off
