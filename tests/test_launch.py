"""Launch, supervise and survive: topology files, `zcrx up -f`, `zcrx kill`, `zcrx app
list/stop`, `zcrx stats --watch/--ledger`, and up/down cycles that leak nothing."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from launch.cli import main, queue_rates
from launch.run import Run, parse_role
from launch.topology import Topology, TopologyError, TrafficSpec
from shared.errors import Misuse
from shared.nicif import MAX_QUEUES, NetdevSpec
from tests.e2e import runs_dir, topology, wait_app, zcrx

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ZC_SIZE = 32 << 20  # what examples/zero-copy.toml sends and expects

FULL = """
name = "full"

[[netdev]]
name = "eth0"
queues = 2
mtu = 4136
tcp_data_split = true
ethtool = ["-N eth0 flow-type tcp4 dst-port 8000 action 1", "-G eth0 rx 1024"]

[[netdev]]
name = "eth1"
link = false
addr = "10.0.1.1"

[[app]]
program = "zcrx-server"
args = ["-p", "8000", "-q", "1", "--json", "{rundir}/zc.json"]
cap_net_admin = true

[[traffic]]
dev = "eth0"
flows = 2
port = 8000
sport = 30000
bytes = 1024
rate = 1e6

[[traffic]]
kind = "wire"
dev = "eth1"
port = 0
"""


# -- topology as data (no processes) -----------------------------------------------------


def test_topology_round_trips_through_dict_and_keeps_every_field() -> None:
    topo = Topology.from_toml("full.toml", text=FULL)
    assert topo.name == "full"
    assert [n.name for n in topo.netdevs] == ["eth0", "eth1"]
    # The NIC's spec strings carry what differs from NetdevSpec's defaults (tcp_data_split
    # on is the default).
    assert topo.netdev_specs() == ["eth0:queues=2,mtu=4136", "eth1:link=down,addr=10.0.1.1"]
    assert topo.netdevs[0].spec.tcp_data_split is True and topo.netdevs[1].spec.link is False
    assert topo.netdevs[0].ethtool[1] == "-G eth0 rx 1024"
    (app,) = topo.apps
    assert app.module == "app_proc.zcrx_server"
    assert app.argv("/r/full", "full")[-1] == "/r/full/zc.json"
    gen, wire = topo.traffic
    assert gen.request() == ("nic.traffic", {"dev": "eth0", "spec": {
        "dport": 8000, "flows": 2, "family": 4, "bytes": 1024, "rate": 1e6,
        "sport": 30000}})
    assert wire.request() == ("nic.wire", {"dev": "eth1", "port": 0})
    again = Topology.from_dict(json.loads(json.dumps(topo.to_dict())))
    assert again == topo
    assert again.to_dict() == topo.to_dict()


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_shipped_examples_parse_and_round_trip(example: str) -> None:
    topo = Topology.from_toml(EXAMPLES / example)
    # A TAP port's traffic comes from Linux in the run's namespace, not from the topology.
    assert topo.netdevs and topo.apps and (topo.traffic or any(n.spec.port for n in topo.netdevs))
    assert Topology.from_dict(topo.to_dict()) == topo


def test_examples_cover_copy_zero_copy_and_two_netdevs() -> None:
    topos = [Topology.from_toml(p) for p in sorted(EXAMPLES.glob("*.toml"))]
    assert any(len(t.netdevs) == 2 for t in topos)
    assert any(t.apps[0].program == "copy-server" and len(t.netdevs) == 1 for t in topos)
    zc = Topology.from_toml(EXAMPLES / "zero-copy.toml")
    assert zc.netdevs[0].ethtool == ["-N eth0 flow-type tcp4 dst-port 8000 action 1"]
    assert zc.apps[0].program == "zcrx-server" and "-q" in zc.apps[0].args
    assert zc.apps[0].args[zc.apps[0].args.index("-q") + 1] == "1"
    assert len(zc.traffic) == 1 and zc.traffic[0].flows == 1
    assert zc.traffic[0].bytes == ZC_SIZE


BAD = [
    ("nmae = 'x'", "unknown key 'nmae'"),
    ("name = 'a.b'", "bad name 'a.b'"),
    ("name = 3", "name must be a string"),
    ("[[netdev]]\nname = 'eth0'\nqueus = 2", "netdev[0]: unknown key 'queus'"),
    ("[[netdev]]\nname = 'eth0'\nqueues = '2'", "netdev[0]: queues must be an integer"),
    ("[[netdev]]\nname = 'eth0'\nqueues = true", "queues must be an integer, not bool"),
    ("[[netdev]]\nqueues = 2", "netdev[0]: missing key 'name'"),
    ("[[netdev]]\nname = 'eth0'\n[[netdev]]\nname = 'eth0'", "netdev names repeat"),
    ("[[netdev]]\nname = 'eth0'\nethtool = '-G eth0 rx 64'",
     "ethtool must be a list"),
    ("[[netdev]]\nname = 'eth0'\nethtool = ['-N eth0 flow-type sctp4']",
     "netdev[0] ethtool '-N eth0 flow-type sctp4'"),
    ("[[netdev]]\nname = 'eth0'\nethtool = ['-G eth9 rx 64']", "no netdev 'eth9'"),
    ("[[app]]\nprogram = 'nginx'", "app[0]: unknown program 'nginx'"),
    ("[[app]]\nprogram = 'copy-server'\nargs = [1]", "args must be a list of strings"),
    ("[[app]]\nprogram = 'copy-server'\ndetach = true", "app[0]: unknown key 'detach'"),
    ("[[traffic]]\nkind = 'udp'", "kind must be one of"),
    ("[[traffic]]\ndev = 'eth1'", "traffic[0]: no netdev 'eth1'"),
    ("[[traffic]]\nport = 70000", "port 70000 not in"),
    ("[[traffic]]\nbytes = 0", "bytes = 0 needs seconds"),
    ("[[traffic]]\nkind = 'wire'\nflows = 2", "traffic[0]: unknown key 'flows'"),
    ("netdev = 'eth0'", "netdev must be a list"),
    ("[netdev", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "want"), BAD)
def test_topology_errors_are_one_clear_line(text: str, want: str) -> None:
    with pytest.raises(TopologyError) as ei:
        Topology.from_toml("t.toml", text=text)
    msg = str(ei.value)
    assert want in msg, msg
    assert msg.startswith("t.toml") and "\n" not in msg
    assert ei.value.errno == 22


def test_netdev_spec_strings_parse_into_options() -> None:
    nd = NetdevSpec.parse("eth1:queues=3,ring=1024,tcp-data-split=off")
    assert nd.options() == {"queues": 3, "rx": 1024, "tcp_data_split": False}
    assert nd.format() == "eth1:queues=3,rx=1024,tcp_data_split=off"
    assert NetdevSpec.parse(nd.format()) == nd
    for bad in ("eth0:queues=x", "eth0:colour=red", "eth0:queues", "bad.name",
                f"eth0:queues={MAX_QUEUES + 1}", "eth0:link=sideways"):
        with pytest.raises(Misuse) as ei:
            NetdevSpec.parse(bad)
        assert ei.value.errno == 22


def test_queues_option_fills_only_netdevs_that_do_not_say() -> None:
    """``zcrx up --queues N`` sets the field on the parsed spec, never through text."""
    assert NetdevSpec.parse("eth0", queues=2).queues == 2
    assert NetdevSpec.parse("eth0:queues=3", queues=2).queues == 3
    assert NetdevSpec.parse("eth0:mtu=9000", queues=8).format() == "eth0:queues=8,mtu=9000"


def test_topology_checks_netdev_ranges_before_anything_starts() -> None:
    with pytest.raises(TopologyError) as ei:
        Topology.from_toml("t.toml", text="[[netdev]]\nname = 'eth0'\nqueues = 100")
    assert str(ei.value).startswith("t.toml: netdev[0]: ") and "queues 100" in str(ei.value)


def test_bench_knobs_are_topology_fields() -> None:
    from launch.bench_rx import MTU, bench_topology

    topo = bench_topology("b", 2, 1024, ["-X eth0 equal 1"])
    assert topo.netdev_specs() == [f"eth0:queues=2,rx=1024,mtu={MTU}"]
    assert topo.netdevs[0].ethtool == ["-X eth0 equal 1"] and not topo.apps
    assert Topology.from_dict(topo.to_dict()) == topo


@pytest.mark.timeout(60)
def test_manifest_records_each_role_spec_and_respawn_uses_it() -> None:
    """Restart re-spawns from the spec recorded in the manifest, not from argv positions."""
    from launch.supervise import bring_up, restart

    topo = Topology.from_dict({"name": "rs", "netdev": [{"name": "eth0", "queues": 2}]})
    with runs_dir():
        run, _ = bring_up(topo, detach=False, launcher=False)
        try:
            again = Run.open("rs")
            nic = again.m.procs["nic"]
            assert nic.spec is not None and nic.spec.module == "nic_proc"
            assert nic.spec.args[nic.spec.args.index("--netdev") + 1] == "eth0:queues=2"
            assert not nic.spec.detach and nic.spec.ready == "nic"
            assert again.m.config["netdevs"] == ["eth0:queues=2"]
            old_pid = nic.pid
            run.signal("nic", "KILL")
            restart(run, {"nic"})  # removes the dead NIC's segments, then Run.respawn
            entry = run.m.procs["nic"]
            assert entry.pid != old_pid and entry.spec == nic.spec
            assert Run.open("rs").m.procs["nic"].spec == nic.spec
        finally:
            run.down()


def test_tagged_processes_looks_again_at_a_process_inside_execve(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Right after Popen returns, the child may still be inside execve: no argv and no
    environment yet in /proc.  Such a process is looked at again, so a command that
    ``zcrx app run`` has just started is found by its $ZCRX_TAG; kernel threads (ppid 2)
    are not waited for."""
    from launch import run as R

    class Fake:
        def __init__(self, pid: int, ppid: int, reads: list[tuple[list[str], dict[str, str]]]
                     ) -> None:
            self.pid, self.reads = pid, reads
            self.info = {"cmdline": reads[0][0], "ppid": ppid}

        def environ(self) -> dict[str, str]:
            return self.reads.pop(0)[1] if len(self.reads) > 1 else self.reads[0][1]

        def cmdline(self) -> list[str]:
            return self.reads[0][0]

    tag = {R.TAG_ENV: "zcrx:r-1:app:1"}
    procs = [Fake(101, 1, [([], {}), ([], {}), (["sleep", "301"], tag)]),  # mid-exec
             Fake(102, 2, [([], {})]),                                      # a kthread
             Fake(103, 1, [(["python", "-m", "nic_proc", "--tag", "zcrx:r-1:nic"], {})])]
    monkeypatch.setattr(R.psutil, "process_iter", lambda attrs=None: iter(procs))
    assert sorted(p.pid for p in R.tagged_processes("r-1")) == [101, 103]


def test_manifest_text_is_every_field_and_reads_back() -> None:
    """The manifest is written field by field (it is saved at every spawn): the same text
    ``dataclasses.asdict`` gives, and it reads back equal."""
    from dataclasses import asdict

    from launch.run import Manifest, ProcEntry, RoleSpec

    m = Manifest(name="m", run_id="m-1", rundir="/x", created=1.5, launcher_pid=7,
                 config={"netdevs": [{"name": "eth0"}], "bench": "scale"})
    m.procs["launcher"] = ProcEntry(role="launcher", pid=7, start_ticks=11, argv=["zcrx"],
                                    log="")
    m.procs["app:0"] = ProcEntry(role="app:0", pid=8, start_ticks=12, argv=["python", "-m"],
                                 log="/x/app-0.log",
                                 spec=RoleSpec(module="app_proc.zcrx_server", args=["-p", "1"],
                                               detach=True, notify=True, uid=1000))
    assert m.to_json() == json.dumps(asdict(m), sort_keys=True)
    assert Manifest.from_json(m.to_json()) == m


def test_old_manifests_without_role_specs_still_open() -> None:
    from launch.run import Manifest

    m = Manifest.from_json(json.dumps({
        "name": "old", "run_id": "old-1", "rundir": "/x", "created": 0.0, "launcher_pid": 1,
        "procs": {"nic": {"role": "nic", "pid": 1, "create_time": 0.0,
                          "argv": ["python", "-m", "nic_proc"], "log": ""}}}))
    assert m.procs["nic"].spec is None and m.procs["nic"].module == ""


def test_roles_parse_and_unknown_roles_are_refused() -> None:
    assert [parse_role(r) for r in ("nic", "KERNEL", "app:0", "app:12", "launcher")] == [
        "nic", "kernel", "app:0", "app:12", "launcher"]
    for bad in ("app", "app:x", "app:-1", "nicc", "", "kernel:0"):
        with pytest.raises(Misuse):
            parse_role(bad)


def test_queue_rates_are_deltas_per_queue() -> None:
    prev = {"netdevs": {"eth0": {"rx-0": {"rx_packets": 10, "rx_bytes": 1000},
                                 "rx-1": {"rx_packets": 0, "rx_bytes": 0}}}}
    cur = {"netdevs": {"eth0": {"rx-1": {"rx_packets": 5, "rx_bytes": 2_000_000_000},
                                "rx-0": {"rx_packets": 30, "rx_bytes": 3000},
                                "rx-10": {"rx_packets": 1, "rx_bytes": 60}}}}
    rows = queue_rates(prev, cur, 2.0)
    assert [r["queue"] for r in rows] == ["rx-0", "rx-1", "rx-10"]
    assert [(r["d_packets"], r["d_bytes"]) for r in rows] == [(20, 2000), (5, 2_000_000_000),
                                                              (1, 60)]
    assert rows[1]["gbps"] == 1.0


def test_cli_usage_errors_exit_2_in_one_line_before_anything_starts(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[netdev]]\nname = 'eth0'\nqueus = 2\n")
    with runs_dir() as base:
        for args in (["up", "-f", str(bad)], ["up", "-f", str(tmp_path / "none.toml")],
                     ["up", "-f", str(bad), "--queues", "2"],
                     ["up", "--netdev", "eth0:colour=red"],
                     ["kill", "bogus"], ["kill", "app"]):
            res = CliRunner().invoke(main, args)
            assert res.exit_code == 2, (args, res.output)
            assert len(res.output.strip().splitlines()) == 1, res.output
            assert "Traceback" not in res.output
        # click's own usage errors (exit 2) keep its usage hint.
        res = CliRunner().invoke(main, ["kill", "nic", "--signal", "HUP"])
        assert res.exit_code == 2 and "'HUP' is not one of" in res.output
        assert list(base.iterdir()) == []  # no run was created


def test_help_lists_exit_codes_and_every_new_command() -> None:
    out = CliRunner().invoke(main, ["--help"]).output
    assert "Exit codes" in out and "3  an operation failed" in out
    for cmd in ("kill", "app", "stats", "up"):
        assert cmd in out
    assert "--file" in CliRunner().invoke(main, ["up", "--help"]).output
    assert "--signal" in CliRunner().invoke(main, ["kill", "--help"]).output
    stats_help = CliRunner().invoke(main, ["stats", "--help"]).output
    for opt in ("--watch", "--interval", "--count", "--ledger", "--json"):
        assert opt in stats_help


# -- real runs ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_up_names_the_refused_ethtool_line_and_leaves_nothing(tmp_path: Path) -> None:
    """The ethtool lines go to the kernel in one pipelined batch; the failure still names
    the line the kernel refused (not the batch's last), once, and the run is gone."""
    topo = tmp_path / "et.toml"
    topo.write_text('[[netdev]]\nname = "eth0"\nqueues = 2\nethtool = ["-X eth0 equal 1", '
                    '"-N eth0 flow-type tcp4 dst-port 8000 action 5", "-G eth0 rx 1024"]\n')
    with runs_dir() as base:
        res = zcrx("up", "-f", str(topo), "--name", "etr", ok=False)
        assert res.exit_code == 3, res.output
        out = res.output.strip()
        assert len(out.splitlines()) == 1 and "Traceback" not in out
        assert "ethtool -N eth0 flow-type tcp4 dst-port 8000 action 5:" in out
        assert "rx 1024" not in out and "queue 5 out of range" in out
        assert "[EINVAL] [EINVAL]" not in out
        assert list(base.iterdir()) == []


@pytest.mark.timeout(120)
def test_up_zero_copy_example_end_to_end_then_kill_and_list_apps() -> None:
    with runs_dir():
        res = zcrx("up", "-f", str(EXAMPLES / "zero-copy.toml"), "--name", "zct", "--json")
        up = json.loads(res.output)
        assert up["name"] == "zct"
        assert up["steps"][2] == "ethtool -N eth0 flow-type tcp4 dst-port 8000 action 1"
        assert up["steps"][3].startswith("app:0 zcrx-server pid")
        assert up["steps"][4].startswith("traffic source")
        try:
            wait_app("zct", "app:0", 90)
            rep = json.loads((Path(up["rundir"]) / "zcrx-server.json").read_text())
            ledger = json.loads(zcrx("stats", "--name", "zct", "--ledger", "--json").output)
            rates = [json.loads(line) for line in zcrx(
                "stats", "--name", "zct", "--watch", "--interval", "0.05", "--count", "2",
                "--json").output.splitlines()]

            # A second app, alive, then killed: app list shows both dead.
            zcrx("app", "run", "--name", "zct", "--detach", "copy-server", "--",
                 "-p", "9000", "-n", "1")
            apps = json.loads(zcrx("app", "list", "--name", "zct", "--json").output)
            assert [(a["role"], a["program"], a["alive"]) for a in apps] == [
                ("app:0", "zcrx-server", False), ("app:1", "copy-server", True)]
            pid = apps[1]["pid"]
            res = zcrx("kill", "--name", "zct", "app:1")
            assert res.output.strip() == f"sent SIGKILL to app:1 (pid {pid})"
            apps = json.loads(zcrx("app", "list", "--name", "zct", "--json").output)
            assert [(a["role"], a["alive"]) for a in apps] == [("app:0", False),
                                                               ("app:1", False)]
            assert all(Path(a["log"]).exists() for a in apps)
            text = zcrx("app", "list", "--name", "zct").output
            assert "DEAD" in text and "zcrx-server" in text
            # Killing a dead app, or a role the run does not have: one line, exit 3.
            for args in (["kill", "--name", "zct", "app:1"],
                         ["kill", "--name", "zct", "app:7"],
                         ["kill", "--name", "zct", "launcher"],
                         ["app", "stop", "--name", "zct", "7"]):
                res = zcrx(*args, ok=False)
                assert res.exit_code == 3, (args, res.output)
                assert len(res.output.strip().splitlines()) == 1
            assert zcrx("app", "stop", "--name", "zct", "1").output.strip() == (
                "app:1 was not running; removed")
            assert "app:1" not in Run.open("zct").m.procs
            # The NIC, the kernel and the fork server are untouched by all this.
            assert set(Run.open("zct").alive_roles()) == {"nic", "kernel", "forkserver"}
        finally:
            res = zcrx("down", "--name", "zct", ok=False)
            if res.exit_code != 0:
                zcrx("cleanup", "--name", "zct", ok=False)

    # The app verified every byte of the generator's flow, all of it zero copy.
    assert rep["ok"], rep
    (conn,) = rep["connections"]
    assert conn["ok"] and conn["bytes"] == ZC_SIZE and conn["bad_offset"] is None
    assert rep["copy_fallback"]["zc_bytes"] == ZC_SIZE
    assert rep["copy_fallback"]["bytes"] == 0
    # After the app closed its ring, no niov is out (its ifq is gone).
    assert ledger["ledger"]["niovs"] == 0 and ledger["ifqs"] == []
    # --watch sampled both queues; queue 1 (the bound one) carried the flow.
    assert [r["sample"] for r in rates] == [1, 2]
    q = {r["queue"]: r for r in rates[-1]["queues"]}
    assert set(q) == {"rx-0", "rx-1"}
    assert q["rx-1"]["bytes"] >= ZC_SIZE and q["rx-1"]["d_bytes"] == 0


@pytest.mark.timeout(60)
def test_kill_nic_then_down_still_cleans_everything() -> None:
    with runs_dir():
        zcrx("up", "--name", "kn", "--queues", "1")
        try:
            nic_pid = Run.open("kn").m.procs["nic"].pid
            res = zcrx("kill", "--name", "kn", "nic", "--json")
            assert json.loads(res.output) == {"role": "nic", "pid": nic_pid,
                                              "signal": "KILL"}
            assert "nic" not in Run.open("kn").alive_roles()
            zcrx("kill", "--name", "kn", "kernel")
            # the launcher's fork server forks no more apps now, but only down stops it
            assert Run.open("kn").alive_roles() == ["forkserver"]
            res = zcrx("stats", "--name", "kn", ok=False)
            assert res.exit_code == 3 and "kernel process of run kn" in res.output
            assert len(res.output.strip().splitlines()) == 1
        finally:
            res = zcrx("down", "--name", "kn", ok=False)
            if res.exit_code != 0:
                zcrx("cleanup", "--name", "kn", ok=False)
        assert res.exit_code == 0, res.output


def _zcrx_segments(name: str) -> set[str]:
    """This run's segments (other engineers' runs may share /dev/shm)."""
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"zcrx.{name}-")}


@pytest.mark.timeout(120)
def test_twenty_up_down_cycles_leak_no_process_segment_or_fd() -> None:
    me = psutil.Process()
    with runs_dir():
        zcrx("up", "--name", "cyc", "--queues", "1")  # warm up (zmq context, imports)
        zcrx("down", "--name", "cyc")
        kids, segs, fds = len(me.children(recursive=True)), _zcrx_segments("cyc"), me.num_fds()
        for _ in range(20):
            zcrx("up", "--name", "cyc", "--queues", "1")
            zcrx("down", "--name", "cyc")
            assert len(me.children(recursive=True)) <= kids
            assert _zcrx_segments("cyc") <= segs
        assert segs == set()
        assert me.num_fds() <= fds


def test_traffic_bytes_zero_means_unbounded_until_seconds() -> None:
    """`--bytes 0 --seconds N` is an unbounded flow cut after N seconds (the help says so),
    not an empty one: the NIC gets no length (absent = unbounded), and data frames arrive."""
    _, body = TrafficSpec(port=8000, bytes=0, seconds=0.4).request()
    assert "bytes" not in body["spec"] and body["spec"]["duration"] == 0.4
    assert TrafficSpec(port=8000, bytes=5).request()[1]["spec"]["bytes"] == 5
    with topology("tb0", "--netdev", "eth0:queues=1"):
        zcrx("traffic", "--name", "tb0", "--port", "8000", "--bytes", "0", "--seconds", "0.4",
             "--rate", "20000000")
        deadline = time.monotonic() + 20
        while True:  # an empty flow (the bug) is SYN + FIN: a few hundred bytes at most
            st = json.loads(zcrx("stats", "--name", "tb0", "--json").output)
            rx = sum(q["rx_bytes"] for d in st["netdevs"].values() for q in d.values())
            if rx > 1 << 20 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert rx > 1 << 20, f"only {rx} bytes reached the NIC"


def test_up_kernel_release_reaches_the_kernel_and_status(tmp_path: Path) -> None:
    """`zcrx up --kernel 7.1` (or a file's `kernel = "7.2"`) makes the kernel process behave
    as that release; `zcrx status` says which; an unknown release is one line, exit 2."""
    with topology("kv1", "--netdev", "eth0:queues=1", "--kernel", "7.1"):
        st = json.loads(zcrx("status", "--name", "kv1", "--json").output)
        assert st["kernel"] == "7.1"
        assert "Linux 7.1" in zcrx("status", "--name", "kv1").output
    f = tmp_path / "k.toml"
    f.write_text('name = "kv2"\nkernel = "7.2"\n[[netdev]]\nname = "eth0"\nqueues = 1\n')
    topo = Topology.from_toml(f)
    assert topo.kernel == "7.2" and Topology.from_dict(topo.to_dict()) == topo
    with runs_dir():
        zcrx("up", "-f", str(f))
        try:
            assert json.loads(zcrx("status", "--name", "kv2", "--json").output)["kernel"] == "7.2"
        finally:
            zcrx("down", "--name", "kv2")
    f.write_text('name = "kv3"\nkernel = "6.1"\n')
    res = zcrx("up", "-f", str(f), ok=False)
    assert res.exit_code == 2 and "6.1" in res.output and len(res.output.splitlines()) == 1
    assert zcrx("up", "--kernel", "9.9", ok=False).exit_code == 2
