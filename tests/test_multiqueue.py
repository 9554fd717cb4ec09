"""One zcrx-server, many queues: one ifq per queue on one ring, each connection served by the
ifq of the queue RSS steered its flow to, learned through ``SO_INCOMING_NAPI_ID``.

Real processes (NIC + kernel + zcrx-server) driven through the CLI (:mod:`tests.e2e`).  The
evidence that every connection used its own queue's ifq is the kernel's: a RECV_ZC on the
wrong ifq would find another provider's niovs (or kernel pages) and copy or fail; here no
byte is copied, each ifq's zero-copy bytes are exactly its connections' bytes, and those equal
the NIC's bytes of that queue.

The 4096-flow test starts every flow at once: one burst of 4096 SYNs over 16 queues, all
accepted and served by the one server on its one ring.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from app_proc import zcrx_server
from shared import nicif  # noqa: F401  (registers nic.* messages)
from tests.e2e import stats, topology, wait_app, zcrx

PORT = 8000


def _status(name: str) -> dict[str, Any]:
    return json.loads(zcrx("status", "--name", name, "--json").output)


def _serve(name: str, out: Path, queues: str, conns: int, size: int, *extra: str) -> None:
    zcrx("app", "run", "--name", name, "--detach", "--cap-net-admin", "zcrx-server",
         "--",
         "-p", str(PORT), "-i", "eth0", "-q", queues, "-v", "-n", str(conns),
         "-s", str(size), "--json", str(out), "--seconds", "150", *extra)


def _check(name: str, rep: dict[str, Any], nq: int, flows: int, size: int,
           nic_rx: dict[int, int], napi: dict[int, int]) -> None:
    assert rep["ok"], rep["errors"]
    conns = rep["connections"]
    assert len(conns) == flows
    assert all(c["ok"] and c["bytes"] == size and c["bad_offset"] is None for c in conns)
    # Each connection on the queue whose NAPI id its socket reported.
    assert all(c["napi_id"] == napi[c["queue"]] for c in conns)
    per_conn: dict[int, int] = {}
    for c in conns:
        per_conn[c["queue"]] = per_conn.get(c["queue"], 0) + c["bytes"]
    # RSS spread the flows over several queues.
    assert len(per_conn) > 1
    # NIC, kernel and app counters of each queue add up (and nothing was copied).
    fb = rep["copy_fallback"]
    assert fb["count"] == 0 and fb["bytes"] == 0 and fb["zc_bytes"] == flows * size
    for pq in rep["queues"]:
        q = pq["queue"]
        assert pq["bytes"] == per_conn.get(q, 0)
        assert pq["kernel"]["zc_bytes"] == pq["bytes"]
        assert pq["kernel"]["copy_bytes"] == 0
        assert pq["kernel"]["zc_cqes"] == pq["data_cqes"]
        assert nic_rx[q] == pq["bytes"], (q, nic_rx, rep["queues"])
    assert sum(pq["connections"] for pq in rep["queues"]) == flows
    assert len(rep["queues"]) == nq


def _nic_payload_bytes(name: str, nq: int) -> dict[int, int]:
    """Payload bytes the driver received per queue: at MTU 4136 every data frame carries
    4096 payload bytes in one data buffer (``rx_split``); SYN and FIN carry none."""
    dev = stats(name)["netdevs"]["eth0"]
    return {q: int(dev[f"rx-{q}"]["rx_split"]) * 4096 for q in range(nq)}


def _wait_frames(name: str, nq: int, frames: int, timeout: float) -> None:
    """Until the driver has taken ``frames`` data frames over all queues."""
    deadline = time.monotonic() + timeout
    while sum(_nic_payload_bytes(name, nq).values()) < frames * 4096:
        assert time.monotonic() < deadline, f"timed out waiting for {frames} frames"
        time.sleep(0.2)


def _run(name: str, tmp_path: Path, nq: int, flows: int, size: int, timeout: float,
         *extra: str) -> None:
    out = tmp_path / "mq.json"
    with topology(name, "--netdev", f"eth0:queues={nq},mtu=4136"):
        _serve(name, out, f"0-{nq - 1}", flows, size, *extra)
        view = _status(name)["queues"]
        napi = {row["id"]: row["napi-id"] for row in view}
        assert sorted(napi) == list(range(nq))
        assert len(set(napi.values())) == nq and min(napi.values()) >= 8193
        assert all(row["type"] == "rx" and "io-uring" in row for row in view)
        zcrx("traffic", "--name", name, "--flows", str(flows), "--port", str(PORT),
             "--bytes", str(size), "--sport", "20000")
        _wait_frames(name, nq, flows * (size // 4096), timeout)
        wait_app(name, "app:0", timeout)
        nic_rx = _nic_payload_bytes(name, nq)
    _check(name, json.loads(out.read_text()), nq, flows, size, nic_rx, napi)


@pytest.mark.timeout(300)
def test_one_server_on_8_queues_serves_64_rss_flows_each_on_its_queue(tmp_path: Path) -> None:
    _run("mq8", tmp_path, 8, 64, 256 << 10, 240, "-S", str(4 << 20))


@pytest.mark.timeout(300)
def test_4096_flows_over_16_queues_byte_exact(tmp_path: Path) -> None:
    _run("mq16", tmp_path, 16, 4096, 16 << 10, 200, "-S", str(2 << 20),
         "-C", "16384", "--sq-entries", "4096", "-b", "4096")


def test_queue_lists_parse() -> None:
    o, _ = zcrx_server.parse_args(["-q", "1-4"])
    assert (o.rxq, o.rxqs) == (1, [1, 2, 3, 4])
    o, _ = zcrx_server.parse_args(["-q", "1,3,5"])
    assert o.rxqs == [1, 3, 5]
    o, _ = zcrx_server.parse_args(["-q", "0,4-6,4"])
    assert o.rxqs == [0, 4, 5, 6]
    o, _ = zcrx_server.parse_args(["-q", "3"])
    assert (o.rxq, o.rxqs) == (3, [])
    with pytest.raises(SystemExit):
        zcrx_server.parse_args(["-q", "5-1"])


def test_area_maker_hands_areas_in_order_and_frees_the_rest(run_id: str) -> None:
    """A server on several queues has its areas made ahead by a helper thread; after a
    failed registration, the areas nobody took are freed (their descriptors closed)."""
    import os

    from shared.shm import region_name

    class K:  # what _AreaMaker uses of the kernel connection: no syscall
        seq = 0

        def memory_name(self, tag: str) -> str:
            K.seq += 1
            return region_name(run_id, "app1", f"{tag}{K.seq}")

        def new_memory(self, length: int, tag: str = "mem", name: str | None = None) -> Any:
            from shared.shm import Region
            return Region.memfd(name or self.memory_name(tag), length)

    fds = set(os.listdir("/proc/self/fd"))
    maker = zcrx_server._AreaMaker(K(), 1 << 20, 4)  # type: ignore[arg-type]
    a, b = maker.next(), maker.next()
    assert [r.name.rsplit(".", 1)[1] for r in (a, b)] == ["zcrx_area1", "zcrx_area2"]
    assert a.size == 1 << 20 and a.fd >= 0
    maker.close()  # areas 3 and 4 were never taken
    for r in (a, b):
        r.close()
    assert set(os.listdir("/proc/self/fd")) <= fds
    assert zcrx_server._AreaMaker(K(), 1 << 20, 1).next() is None  # one queue: the library's


@pytest.mark.timeout(180)
def test_idle_queues_cost_the_kernel_no_poll(tmp_path: Path) -> None:
    """Traffic on one queue of 16: the other 15 queues stay off the NAPI poll list (no
    interrupt ever fired for them), so the kernel never polls them, however many passes its
    loop makes for the busy one."""
    name, out, nq, size = "mqidle", tmp_path / "idle.json", 16, 4 << 20
    with topology(name, "--netdev", f"eth0:queues={nq},mtu=4136"):
        zcrx("ethtool", "--name", name, "-N", "eth0", "flow-type", "tcp4", "dst-port",
             str(PORT), "action", "3")
        _serve(name, out, "3", 1, size, "-S", str(2 << 20))
        zcrx("traffic", "--name", name, "--port", str(PORT), "--bytes", str(size))
        wait_app(name, "app:0", 120)
        dev = stats(name)["netdevs"]["eth0"]
    rep = json.loads(out.read_text())
    assert rep["ok"] and rep["connections"][0]["bytes"] == size, rep
    polls = {q: int(dev[f"rx-{q}"]["napi_polls"]) for q in range(nq)}
    arms = {q: int(dev[f"rx-{q}"]["irq_arms"]) for q in range(nq)}
    assert polls[3] >= size // (4096 * 64), polls  # at least a poll per NAPI budget
    assert all(polls[q] == 0 for q in range(nq) if q != 3), polls
    # armed once when started, never again: the loop did not visit them when it slept
    assert all(arms[q] == 1 for q in range(nq) if q != 3), arms
    assert arms[3] > 1, arms
