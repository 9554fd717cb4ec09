"""The ``zcrx`` command line: options and printing only.

Runs are realised by :mod:`launch.supervise` (bring-up, foreground watch, restart policy)
on :mod:`launch.run`'s primitives; this module parses options and prints.

Exit codes: 0 success; 1 a check failed (data not verified, a target missed
with ``--check``); 2 usage error (click's own); 3 an operation failed (a clear
one-line reason is printed, never a traceback for a user mistake).  ``--json`` is always
a flag (JSON on stdout instead of the human output); benches and chaos also take
``--json-out FILE``.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from launch.run import DEFAULT_APP_UID_BASE
from launch.topology import APPS
from shared import abi
from shared.errors import ZcrxError
from shared.nicif import MAX_MTU, MAX_QUEUES, MAX_SNAPLEN, MIN_MTU
from shared.shm import list_run_segments

EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2
EXIT_FAILED = 3

console = Console(stderr=False)
err_console = Console(stderr=True)


JSON_FLAG_HELP = "Print JSON on stdout instead of the human output."
JSON_HELP = "Print the figures as JSON on stdout instead of the human output."
JSON_OUT_HELP = "Also write the figures as JSON to this file."


def _json_options(fn: Any) -> Any:
    """``--json`` (a flag, as in every zcrx command: JSON on stdout instead of the human
    output) and ``--json-out FILE`` (also write the JSON to a file)."""
    fn = click.option("--json-out", "json_out", metavar="FILE",
                      type=click.Path(dir_okay=False, writable=True), help=JSON_OUT_HELP)(fn)
    return click.option("--json", "as_json", is_flag=True, help=JSON_HELP)(fn)


def _write_json(result: Any, as_json: bool, json_out: str | None,
                sort_keys: bool = False) -> None:
    """The figures as JSON: on stdout with ``--json``, to a file with ``--json-out``."""
    text = json.dumps(result, indent=2, sort_keys=sort_keys)
    if json_out:
        Path(json_out).write_text(text + "\n")
    if as_json:
        click.echo(text)


def fail(msg: str, code: int = EXIT_FAILED) -> None:
    err_console.print(f"zcrx: {msg}", highlight=False, markup=False, soft_wrap=True)
    sys.exit(code)


EPILOG = """\b
Exit codes:
  0  success
  1  a check failed (data not verified, a target missed with --check)
  2  usage error (bad option, argument, topology file or role)
  3  an operation failed (a one-line reason is printed)
\b
JSON: --json is always a flag that prints JSON on stdout instead of the human
output; the benches and chaos also take --json-out FILE to write it to a file.
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(package_name="zcrx-emu", prog_name="zcrx")
def main() -> None:
    """zcrx-emu: an emulation of Linux io_uring zero-copy receive in separate processes.

    The NIC, the kernel and the applications run as separate processes that share
    data only through POSIX shared memory laid out as the io_uring zcrx uapi
    lays it out.
    """


# -- bench ------------------------------------------------------------------------------

@main.group(invoke_without_command=True)
@click.pass_context
def bench(ctx: click.Context) -> None:
    """Benchmarks: each runs its baselines in the same run and reports ratios.

    Without a subcommand: `zcrx bench zcrx` (zero copy vs the copy path vs loopback TCP).
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(bench_zcrx)


def _ring_table(result: dict[str, Any]) -> Table:
    t = Table(title="zcrx bench ring (2 processes, one region)")
    for col in ("bench", "batch", "Mentries/s", "GB/s", "x copy", "verified"):
        t.add_column(col, justify="left" if col == "bench" else "right")
    for r in result["rows"]:
        vs = f"{r['vs_copy']:.2f}" if "vs_copy" in r else ""
        t.add_row(r["bench"], str(r["batch"]), f"{r['mpps']:.2f}", f"{r['gbps']:.2f}", vs,
                  "yes" if r["verified"] else "NO")
    t.add_row("numpy copy, 1 process", "", "", f"{result['copy_gbps']:.2f}", "1.00", "")
    return t


@bench.command("ring")
@click.option("--seconds", type=click.FloatRange(0.05, 60), default=0.8, show_default=True,
              help="How long the producer runs for each measurement.")
@click.option("--spin", type=click.IntRange(0), default=2000, show_default=True,
              help="Empty polls before a waiter yields the CPU (then it sleeps).")
@_json_options
@click.option("--check", is_flag=True,
              help="Exit 1 if a target (batch 512 >= 50 Mpps; 4 KiB path >= 0.5 x copy) "
                   "is missed.")
def bench_ring(seconds: float, spin: int, as_json: bool, json_out: str | None,
               check: bool) -> None:
    """Entries/s at batch 1, 64, 512 and the 4 KiB payload path vs numpy copy."""
    from launch.bench_ring import run_ring_bench

    with console.status("running") as status:
        result = run_ring_bench(seconds=seconds, spin=spin,
                                progress=lambda m: status.update(f"running: {m}"))
    if not as_json:
        console.print(_ring_table(result))
        for c in result["checks"]:
            mark = "ok" if c["ok"] else "MISSED"
            console.print(f"target {c['target']}: {c['value']:.2f} {mark}", highlight=False)
    _write_json(result, as_json, json_out)
    if not result["all_verified"]:
        fail("a benchmark did not deliver what was sent (checksum mismatch)",
             EXIT_CHECK_FAILED)
    if check and not all(c["ok"] for c in result["checks"]):
        fail("a target was missed", EXIT_CHECK_FAILED)


def _rx_table(result: dict[str, Any]) -> Table:
    t = Table(title=f"zcrx bench {result['bench']}: {result['payload']} B payloads "
                    f"(mtu {result['mtu']}), best of {result['repeat']}")
    small = result["payload"] < 4096  # segments per second matter below a page
    for col in ("mode", "flows", "MiB", "GB/s", *(["Mpps"] if small else []), "kCPU s/GB",
                "moved/B", "copy fb", "verified"):
        t.add_column(col, justify="left" if col == "mode" else "right")

    def num(v: float | None, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    for r in result["rows"]:
        fb = r.get("copy_fallback")
        t.add_row(r["mode"], str(r["flows"]), f"{r['bytes'] / 2**20:.0f}",
                  f"{r['gbps']:.3f}", *([f"{r.get('mpps', 0.0):.3f}"] if small else []),
                  num(r["kernel_cpu_s_per_gb"], ".2f"),
                  num(r["moved_per_byte"], ".2f"),
                  "" if r["mode"] != "zcrx" else ("n/a" if fb is None else
                                                  f"{fb['bytes']} B"),
                  "yes" if r["verified"] else "NO")
    return t


def _rx_report(result: dict[str, Any], as_json: bool, json_out: str | None,
               check: bool) -> None:
    if not as_json:
        console.print(_rx_table(result))
        console.print("kCPU s/GB: kernel-process CPU seconds per 10^9 delivered bytes; "
                      "moved/B: payload bytes moved (NIC DMA + kernel copy reads and writes "
                      "+ app reads) per delivered byte", highlight=False)
        console.print(f"touch (all modes): {result['touch']}", highlight=False)
        ring = result.get("ring")
        if ring:
            console.print(f"bare shm ring, {ring['payload']} B entries, batch {ring['batch']}: "
                          f"{ring['mpps']:.3f} Mpps ({ring['gbps']:.3f} GB/s), "
                          f"{'verified' if ring['verified'] else 'NOT verified'}",
                          highlight=False)
        for name, v in result["ratios"].items():
            console.print(f"{name}: {'n/a' if v is None else format(v, '.2f')}",
                          highlight=False)
        for c in result["checks"]:
            v = "n/a" if c["value"] is None else format(c["value"], ".2f")
            console.print(f"target {c['target']}: {v} {'ok' if c['ok'] else 'MISSED'}",
                          highlight=False)
        for r in result["rows"]:
            for p in r["problems"]:
                console.print(f"{r['mode']}/{r['flows']}: {p}", highlight=False)
    _write_json(result, as_json, json_out)
    if not result["all_verified"]:
        fail("a receiver did not get exactly the stream that was sent", EXIT_CHECK_FAILED)
    if check and not all(c["ok"] for c in result["checks"]):
        fail("a target was missed", EXIT_CHECK_FAILED)


def _rx_options(fn: Any) -> Any:
    opts = [
        click.option("--bytes", "total", type=click.IntRange(1 << 12), default=None,
                     help="Bytes per measurement (all flows together).  Default: 262,144 "
                          "segments' worth, 1 GiB at 4 KiB (bench zcrx: of --payload, so "
                          "16 MiB at 64 B); a shorter run is dominated by noise."),
        click.option("--repeat", type=click.IntRange(1, 20), default=1, show_default=True,
                     help="Rounds; each mode reports its best verified round."),
        click.option("--copy-buf", type=click.IntRange(4096, 1 << 20), default=16384,
                     show_default=True,
                     help="Receive buffer of the copy path and of loopback TCP."),
        click.option("--timeout", type=click.FloatRange(1, 3600), default=120.0,
                     show_default=True, help="Seconds one measurement may take."),
        _json_options,
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


@bench.command("copy")
@_rx_options
@click.option("--flows", "flows", type=click.IntRange(1, MAX_QUEUES), multiple=True,
              help="Flow counts to measure (default 1 and 4); the run has as many queues as "
                   "the largest.")
def bench_copy(total: int | None, repeat: int, copy_buf: int, timeout: float, as_json: bool,
               json_out: str | None, flows: tuple[int, ...]) -> None:
    """The copy path (NIC -> kernel pages -> RECV copy -> app) at 4 KiB payloads, 1 and 4
    flows, next to loopback TCP between two processes; every byte checked and hashed."""
    from launch.bench_rx import DEFAULT_BYTES, run_copy_bench

    try:
        with console.status("running") as status:
            result = run_copy_bench(total or DEFAULT_BYTES, tuple(flows) or (1, 4), repeat,
                                    copy_buf, timeout,
                                    progress=lambda m: status.update(f"running: {m}"))
    except ZcrxError as e:
        fail(f"bench copy: {e}")
    _rx_report(result, as_json, json_out, False)


@bench.command("zcrx")
@_rx_options
@click.option("--flows", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Flows of each measurement.")
@click.option("--check", is_flag=True, help="Exit 1 if a target is missed.")
@click.option("--payload", type=click.IntRange(1, 65535), default=None,
              help="Payload bytes per segment (default: the MSS of --mtu).  Below 4096 the "
                   "bare shared-memory ring is measured too, at the same entry size and the "
                   "generator's batch (512, up to 4096 small segments); loopback TCP sends "
                   "messages of this size.  "
                   "Rates in Mpps.")
@click.option("--mtu", type=click.IntRange(MIN_MTU, MAX_MTU), default=4136, show_default=True,
              help="The netdev's MTU (4136: an IPv4 MSS of exactly 4 KiB; 1500: Ethernet's "
                   "usual).")
@click.option("--gro-hw/--no-gro-hw", default=False, show_default=True,
              help="Turn HW-GRO on (ethtool -K eth0 rx-gro-hw on; zcrx up's default is off): "
                   "the NIC coalesces consecutive segments of a flow into one completion and "
                   "one data buffer, as zcrx NICs do, so a RECV_ZC CQE covers many small "
                   "segments.  It changes the copy path and zero copy alike.")
@click.option("--rx-buf-len", type=click.Choice(["4096", "8192", "16384", "32768", "65536"]),
              default="4096", show_default=True,
              help="The netdev's rx-buf-len and the zero-copy ifq's rx_buf_len (niov size, "
                   "Linux 6.18+): with --gro-hw a session fills a buffer, so larger buffers "
                   "mean fewer completions and CQEs.")
def bench_zcrx(total: int | None, repeat: int, copy_buf: int, timeout: float, as_json: bool,
               json_out: str | None, flows: int, check: bool, payload: int | None,
               mtu: int, gro_hw: bool, rx_buf_len: str) -> None:
    """Zero copy (ntuple-steered to a queue bound to an ifq) vs the copy path vs loopback
    TCP, by default at 4 KiB payloads: GB/s, Mpps, kernel CPU per GB, payload bytes moved per
    delivered byte; targets: >= 1.5x copy, >= 2x loopback, <= 0.55x the copy path's bytes
    moved.  Every byte is verified in every mode."""
    from launch.bench_rx import DEFAULT_SEGMENTS, run_zcrx_bench, segment_size

    if total is None:
        total = DEFAULT_SEGMENTS * segment_size(payload, mtu)
    try:
        with console.status("running") as status:
            result = run_zcrx_bench(total, flows, repeat, copy_buf, timeout,
                                    progress=lambda m: status.update(f"running: {m}"),
                                    payload=payload, mtu=mtu, gro_hw=gro_hw,
                                    rx_buf_len=int(rx_buf_len))
    except ZcrxError as e:
        fail(f"bench zcrx: {e}")
    _rx_report(result, as_json, json_out, check)


@bench.command("wire")
@click.option("--bytes", "total", type=click.IntRange(1 << 12), default=64 << 20,
              show_default=True, help="Bytes nc sends.")
@click.option("--nobuf", type=click.Choice(["drop", "pause"]), default="drop",
              show_default=True, help="What the queue does without buffers.")
@click.option("--loss", default="", metavar="PCT",
              help="Loss at the port for what it receives, e.g. 1% (default none).")
@click.option("--seed", type=click.IntRange(0), default=1, show_default=True,
              help="Seed of the port's impairments and of the file's bytes.")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=300.0, show_default=True,
              help="Seconds the client may take.")
@click.option("--client", type=click.Choice(["nc", "iperf3", "both"]), default="nc",
              show_default=True,
              help="The Linux sender: nc with a file (sha256 checked), iperf3 -c against "
                   "zcrx-server --iperf3 (iperf3's GB/s and retransmits), or both, one run "
                   "each; with both, --json gives {\"nc\": ..., \"iperf3\": ...}.")
@_json_options
def bench_wire(total: int, nobuf: str, loss: str, seed: int, timeout: float, client: str,
               as_json: bool, json_out: str | None) -> None:
    """A real sender (root): Linux nc in the run's peer namespace sends a random file
    through a TAP port into zcrx-server on a bound queue: GB/s, the sender's retransmitted
    segments, rx_missed and port losses, sha256 of what arrived.  --client iperf3 runs
    iperf3 against zcrx-server --iperf3 instead (or as well)."""
    from launch.bench_wire import describe, run_wire_bench, run_wire_iperf3

    results: dict[str, dict[str, Any]] = {}
    try:
        with console.status("running") as status:
            for which, fn in (("nc", run_wire_bench), ("iperf3", run_wire_iperf3)):
                if client not in (which, "both"):
                    continue

                def progress(m: str, w: str = which) -> None:
                    status.update(f"running {w}: {m}")

                results[which] = fn(total, nobuf=nobuf, loss=loss, seed=seed,
                                    timeout=timeout, progress=progress)
    except ZcrxError as e:
        fail(f"bench wire: {e}")
    if not as_json:
        for r in results.values():
            console.print(describe(r), highlight=False)
    _write_json(results if client == "both" else results[client], as_json, json_out)
    if not all(r["ok"] for r in results.values()):
        fail("the receiver did not get exactly what was sent", EXIT_CHECK_FAILED)


def _queue_list(ctx: Any, param: Any, value: str) -> tuple[int, ...]:
    try:
        qs = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of integers") from None
    if not qs or any(not 1 <= q <= MAX_QUEUES for q in qs):
        raise click.BadParameter(f"queue counts must be in [1, {MAX_QUEUES}]")
    return qs


@bench.command("scale")
@click.option("--queues", "queues", show_default=True,
              default=",".join(str(1 << i) for i in range(MAX_QUEUES.bit_length())),
              callback=_queue_list, help="Zero-copy queue counts to measure (comma list).")
@click.option("--mib-per-queue", type=click.FloatRange(0.01, 1024), default=16.0,
              show_default=True, help="MiB of traffic per queue (one flow each).")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=300.0, show_default=True,
              help="Seconds the traffic of one point may take.")
@click.option("--apps", default="per-queue", show_default=True,
              help="Servers per point: per-queue (one each), one (a single server on all "
                   "queues, one ifq per queue on its ring) or a number of servers.")
@click.option("--fork-server/--no-fork-server", default=True, show_default=True,
              help="Fork the servers from the run's template (as `zcrx up` does), or start "
                   "each as a new interpreter (the slow way, for comparison).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True),
              help="Write the curve as a PNG (needs matplotlib: the 'plot' extra).")
@_json_options
@click.option("--payload", type=click.IntRange(1, 4096), default=None,
              help="Payload bytes per segment (default: the MSS, 4096).")
def bench_scale(queues: tuple[int, ...], mib_per_queue: float, timeout: float, apps: str,
                fork_server: bool, plot_path: str | None, as_json: bool,
                json_out: str | None, payload: int | None) -> None:
    """Setup, goodput and teardown against the number of zero-copy queues (one run per
    point, one zcrx-server and one flow per queue, every byte verified)."""
    from launch.bench_scale import plot, run_scale_bench

    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            fail("--plot needs matplotlib: pip install 'zcrx-emu[plot]'")
    try:
        with err_console.status("running") as status:
            result = run_scale_bench(queues, mib_per_queue, timeout,
                                     progress=lambda m: status.update(f"running: {m}"),
                                     apps=apps, fork_server=fork_server,
                                     payload=payload)
        if plot_path:
            plot(result, plot_path)
    except ZcrxError as e:
        fail(f"bench scale: {e}")
    if not as_json:
        t = Table(title=f"zcrx bench scale: {mib_per_queue:g} MiB per queue, "
                        f"{result['payload']} B segments, apps {apps}, "
                        f"fork server {'on' if fork_server else 'off'}")
        for col in ("queues", "apps", "up s", "bind s", "setup s", "GB/s wall", "GB/s app",
                    "ratio", "down s", "verified"):
            t.add_column(col, justify="right")
        for p in result["points"]:
            t.add_row(str(p["queues"]), str(p["apps"]), f"{p['up_s']:.2f}",
                      f"{p['bind_s']:.2f}", f"{p['setup_s']:.2f}", f"{p['gbps']:.3f}",
                      f"{p['app_gbps']:.3f}", f"{p['ratio']:.2f}", f"{p['down_s']:.2f}",
                      "yes" if p["verified"] else "NO")
        console.print(t)
        for p in result["points"]:
            for msg in p["problems"]:
                console.print(f"{p['queues']} queues: {msg}", highlight=False)
    _write_json(result, as_json, json_out)
    if not result["all_verified"]:
        fail("a receiver did not get exactly the stream that was sent", EXIT_CHECK_FAILED)


# -- cleanup ----------------------------------------------------------------------------

@main.command()
@click.option("--name", "run", help="The run to clean up (its name, or a run id).")
@click.option("--all", "all_runs", is_flag=True, help="Clean up every run on this machine.")
def cleanup(run: str | None, all_runs: bool) -> None:
    """Remove every process, shm segment and file of a run (idempotent, like `mn -c`).

    Works from the run's manifest, with the process tag and the segment name
    prefix as fallbacks, so it also cleans runs whose launcher crashed.
    """
    from launch import run as runmod

    if bool(run) == all_runs:
        fail("give exactly one of --name RUN or --all", 2)
    results = []
    try:
        if all_runs:
            results += [runmod.cleanup(n) for n in runmod.list_runs()]
            results += [runmod.cleanup_run_id(r) for r in runmod.orphan_run_ids()]
            seen = {rid for r in results for rid in r["run_ids"]}
            results += [runmod.cleanup_run_id(r) for r in runmod.orphan_netns_run_ids()
                        if r not in seen]
        elif run in runmod.list_runs() or (runmod.runs_dir() / (run or "")).exists():
            results.append(runmod.cleanup(run or ""))
        else:
            results.append(runmod.cleanup_run_id(run or ""))
    except ZcrxError as e:
        fail(str(e))
    removed = [n for r in results for n in r["segments_removed"]]
    removed += [n for r in results for n in r.get("net_removed", [])]
    killed = [p for r in results for p in r["killed"]]
    for name in removed:
        console.print(f"removed {name}", highlight=False)
    for pid in killed:
        console.print(f"killed process {pid}", highlight=False)
    left = [n for r in results for rid in r["run_ids"] for n in list_run_segments(rid)]
    if left:
        fail(f"could not remove: {', '.join(left)}")
    console.print(f"cleaned {len(results)} run(s), {len(removed)} segment(s), "
                  f"{len(killed)} process(es)", highlight=False)


# -- running a topology -----------------------------------------------------------------

def _pick_run(name: str | None) -> Any:
    """The run a command talks to: --name, or the only run that is up."""
    from launch import run as runmod

    try:
        if name:
            return runmod.Run.open(name)
        runs = runmod.list_runs()
        if len(runs) == 1:
            return runmod.Run.open(runs[0])
    except ZcrxError as e:
        fail(str(e))
    if not runs:
        fail("no run is up (zcrx up)")
    fail(f"several runs are up ({', '.join(runs)}): say which with --name")
    raise AssertionError  # unreachable: fail exits


def _call(run: Any, endpoint: str, type_: str, body: dict[str, Any] | None = None,
          timeout_ms: int = 10_000) -> dict[str, Any]:
    import shared.nicif
    import shared.syscalls  # noqa: F401  (register the message types)
    from shared.control import ControlClient

    entry = run.m.procs.get(endpoint)
    if entry is not None and entry.process() is None:
        fail(f"{type_}: the {endpoint} process of run {run.m.name} (pid {entry.pid}) is not "
             f"running (zcrx down --name {run.m.name})")
    try:
        with ControlClient(run.endpoint(endpoint), timeout_ms=timeout_ms) as c:
            return c.call(type_, body or {})
    except ZcrxError as e:
        fail(f"{type_}: {e}")
    raise AssertionError


def _reason(remote_msg: str) -> str:
    """A relayed error text without the request-type prefixes and errno tags it gathered."""
    import re

    msg = re.sub(r"\s*\[E[A-Z0-9]+\]", "", remote_msg).strip()
    return re.sub(r"^(?:[a-z_.]+: )+", "", msg)


NAME_OPT = click.option("--name", help="Run name (default: the only run that is up).")


def _load_topology(path: str) -> Any:
    from launch.topology import Topology, TopologyError

    try:
        return Topology.from_toml(path)
    except TopologyError as e:
        fail(str(e), 2)


@main.command()
@click.option("-f", "--file", "topo_file", type=click.Path(dir_okay=False),
              help="A topology file (TOML: netdevs with ethtool settings, apps, traffic); "
                   "see examples/.")
@click.option("--name", default=None,
              help="Name of the run (default: the file's name, else 'zcrx').")
@click.option("--netdev", "netdevs", multiple=True, metavar="SPEC",
              help="A netdev, e.g. 'eth0:queues=4,mtu=4096'; repeat for several "
                   "(default: one eth0; not with --file). Keys: queues, max-queues, rx, "
                   "max-rx, mtu, tcp-data-split, hds-thresh, rx-buf-len, gro-hw=on|off "
                   "(HW-GRO, as ethtool -K rx-gro-hw), link=up|down, "
                   "nobuf=pause|drop (a queue without buffers pauses the wire or drops, "
                   "counting rx_missed), addr, addr6, mac; port=tap plugs the wire into a "
                   "TAP device in the run's network namespace zcrx-<run id>-peer (root "
                   "only) with neigh=arp|static, impairments of what it receives (loss=1%, "
                   "dup=, reorder=, delay=5ms) and of what the host sends (tx-loss=1%), "
                   "seed=N.")
@click.option("--queues", type=click.IntRange(1, MAX_QUEUES), default=None,
              help="Combined queues of every netdev that does not say (default 4; not with "
                   "--file).")
@click.option("--detach/--foreground", default=True, show_default=True,
              help="Return once the run is up, or stay (recorded as role 'launcher') and "
                   "bring it down on Ctrl-C or SIGTERM.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's name, id and steps as "
              "JSON on stdout instead of the human output.")
@click.option("--kernel", "kernel", default=None,
              type=click.Choice([abi.kernel_version_name(v) for v in abi.KERNEL_VERSIONS]),
              help="The Linux release the emulated kernel behaves as (RQ layout, query "
                   "results, ctrl ops; see docs/design.md 'Kernel versions'). Default: the "
                   "file's 'kernel', else the newest.")
@click.option("--restart", "restart", default="", metavar="ROLES",
              help="With --foreground: bring these roles back when they die "
                   "(comma list of nic, kernel). A restarted NIC is re-probed by the "
                   "kernel; a restarted kernel needs a fresh NIC, which is restarted too.")
@click.option("--app-uid-base", type=click.IntRange(0, 2**31 - 2000),
              default=DEFAULT_APP_UID_BASE, show_default=True,
              help="As root: app:N runs as uid/gid BASE+N, so no app can open another's "
                   "memory (0: apps run as root, not isolated).")
@click.option("--fork-server/--no-fork-server", default=True, show_default=True,
              help="Keep a template process that has imported the app code and fork the "
                   "sample servers (and `python -m app_proc.X`) from it: an app starts in "
                   "milliseconds instead of a new interpreter's ~0.5 s (role 'forkserver'; "
                   "see docs/design.md 3a).")
def up(topo_file: str | None, name: str | None, netdevs: tuple[str, ...], queues: int | None,
       detach: bool, as_json: bool, kernel: str | None, restart: str,
       app_uid_base: int, fork_server: bool) -> None:
    """Start a run: NIC, kernel, ethtool settings, apps, traffic; each once ready."""
    from launch import supervise
    from launch.run import isolation
    from launch.topology import NetdevConfig, Topology
    from shared.nicif import NetdevSpec

    restart_roles = {r.strip() for r in restart.split(",") if r.strip()}
    if restart_roles - set(supervise.RESTARTABLE):
        fail(f"--restart takes nic and/or kernel, not {restart!r}", 2)
    if restart_roles and detach:
        fail("--restart needs --foreground (the launcher is the supervisor)", 2)
    if topo_file is not None:
        if netdevs or queues is not None:
            fail("--netdev and --queues do not go with --file (put them in the file)", 2)
        topo = _load_topology(topo_file)
    else:
        defaults = {"queues": queues} if queues is not None else {}
        try:
            topo = Topology(name=name or "zcrx", netdevs=[
                NetdevConfig(NetdevSpec.parse(s, **defaults)) for s in netdevs or ["eth0"]])
            topo.validate("--netdev")
        except ZcrxError as e:
            fail(str(e), 2)
    if kernel is not None:
        topo.kernel = kernel
    name = name or topo.name
    base, why_not = isolation(app_uid_base)
    try:
        r, steps = supervise.bring_up(topo, name, detach=detach, fork_server=fork_server,
                                      config={"app_uid_base": base})
    except ZcrxError as e:
        fail(str(e))
    status = _call(r, "kernel", "status")
    devs = ", ".join(f"{d['name']} ({d['queues']} queues)" for d in status["netdevs"])
    if as_json:
        click.echo(json.dumps({"name": name, "run_id": r.run_id, "rundir": str(r.dir),
                               "steps": steps, "apps_isolated": not why_not,
                               **({"not_isolated_because": why_not} if why_not else {})},
                              indent=2))
    else:
        for line in steps:
            if not line.startswith(("nic pid", "kernel pid")):
                console.print(f"  {line}", highlight=False)
        console.print(f"run {name} is up (id {r.run_id}, Linux {status.get('kernel', '?')}): "
                      f"{devs}", highlight=False)
        for line in _reach_hint(r):
            console.print(f"  reach it: {line}", highlight=False)
        if why_not:  # once, at start: the user should know what an app can reach
            err_console.print(f"note: apps are not isolated from each other: {why_not}",
                              highlight=False, soft_wrap=True)
    if detach:
        return
    supervise.supervise(
        r, restart_roles, say=lambda m: console.print(m, highlight=False),
        warn=lambda m: err_console.print(m, highlight=False, soft_wrap=True))


@main.command()
@NAME_OPT
@click.option("--timeout", type=click.FloatRange(0.1, 120), default=5.0, show_default=True,
              help="Seconds each process gets after SIGTERM before SIGKILL.")
def down(name: str | None, timeout: float) -> None:
    """Stop a run: apps, then the kernel, then the NIC; remove its segments."""
    r = _pick_run(name)
    res = r.down(timeout)
    killed = f", killed {', '.join(res['killed'])}" if res["killed"] else ""
    net = f"; removed {', '.join(res['net_removed'])}" if res.get("net_removed") else ""
    console.print(f"run {r.m.name} is down: stopped {', '.join(res['stopped']) or 'nothing'}"
                  f"{killed}; {len(res['segments_removed'])} segment(s) removed{net}",
                  highlight=False)


def _reach_hint(r: Any) -> list[str]:
    """How to reach the run's TAP ports from their namespace (empty without ports)."""
    from launch.port import reach_hint
    from shared.nicif import NetdevSpec

    if not r.m.config.get("netns"):
        return []
    return reach_hint(r.run_id, [NetdevSpec.parse(s) for s in r.m.config.get("netdevs", [])])


@main.command()
@NAME_OPT
@click.option("--signal", "signame", type=click.Choice(["KILL", "TERM", "STOP", "CONT"],
                                                        case_sensitive=False),
              default="KILL", show_default=True, help="Signal to send.")
@click.option("--json", "as_json", is_flag=True, help=JSON_FLAG_HELP)
@click.argument("role")
def kill(name: str | None, signame: str, as_json: bool, role: str) -> None:
    """Send a signal to one process of a run: ROLE is nic, kernel, forkserver, app:N or
    launcher (the launcher exists only for a foreground `zcrx up`).

    Fault injection: the run is not cleaned up (`zcrx down` still is); with KILL this
    returns once the process is gone.
    """
    from launch import run as runmod

    try:
        canon = runmod.parse_role(role)
    except ZcrxError as e:
        fail(str(e), 2)
    r = _pick_run(name)
    signame = signame.upper()
    try:
        entry = r.signal(canon, signame)
    except ZcrxError as err:
        fail(str(err))
    if as_json:
        click.echo(json.dumps({"role": canon, "pid": entry.pid, "signal": signame}))
    else:
        console.print(f"sent SIG{signame} to {canon} (pid {entry.pid})", highlight=False)


@main.command()
@NAME_OPT
@click.option("--json", "as_json", is_flag=True, help=JSON_FLAG_HELP)
def status(name: str | None, as_json: bool) -> None:
    """Processes, netdevs, queues with their bindings and page pools, rings, apps."""
    r = _pick_run(name)
    st = _call(r, "kernel", "status")
    st["processes"] = {role: {"pid": e.pid, "alive": e.process() is not None}
                       for role, e in r.m.procs.items()}
    if r.m.config.get("netns"):
        st["netns"] = r.m.config["netns"]
        st["reach"] = _reach_hint(r)
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    console.print(f"run {r.m.name} (id {r.run_id}), kernel behaves as Linux "
                  f"{st.get('kernel', '?')}", highlight=False)
    for role, p in st["processes"].items():
        console.print(f"  {role:<10} pid {p['pid']:<8} {'up' if p['alive'] else 'DEAD'}",
                      highlight=False)
    console.print(f"  nic: {st.get('nic', '?')} (re-probed {st.get('nic_reprobes', 0)} times)",
                  highlight=False)
    for d in st["netdevs"]:
        console.print(f"{d['name']}: {'up' if d['up'] else 'down'}, {d['queues']} queues, "
                      f"mtu {d['mtu']}, rx-buf-len {d['rx_buf_len']}, tcp-data-split "
                      f"{d['tcp_data_split']}, hds-thresh {d['hds_thresh']}", highlight=False)
        napi = {v["id"]: v.get("napi-id") for v in st.get("queues", [])
                if v.get("ifindex") == d.get("ifindex")}
        for q in d["rx_queues"]:
            console.print(f"  rx-{q['queue']}: {'started' if q['started'] else 'stopped':<8}"
                          f" napi-id {napi.get(q['queue'], '-')} ring {q['ring_size']}"
                          f" page-pool {q['page_pool']} posted "
                          f"{q['posted']} in-flight {q['in_flight']} provider {q['binding']}",
                          highlight=False)
    for line in st.get("reach", []):
        console.print(f"reach it: {line}", highlight=False)


def queue_rates(prev: dict[str, Any], cur: dict[str, Any], dt: float
                ) -> list[dict[str, Any]]:
    """Per-queue rx packet/byte deltas between two kernel ``stats`` replies, and GB/s.

    Plain function (no I/O): rows ``{dev, queue, packets, bytes, d_packets, d_bytes, gbps}``
    in netdev and queue order; a queue new in ``cur`` counts from zero.
    """
    rows = []
    for dev, queues in sorted(cur.get("netdevs", {}).items()):
        before = prev.get("netdevs", {}).get(dev, {})
        for q in sorted(queues, key=lambda k: int(k.rpartition("-")[2])
                        if k.rpartition("-")[2].isdigit() else 1 << 30):
            c = queues[q]
            if not isinstance(c, dict) or "rx_packets" not in c:
                continue
            b = before.get(q, {})
            dp = int(c["rx_packets"]) - int(b.get("rx_packets", 0))
            db = int(c.get("rx_bytes", 0)) - int(b.get("rx_bytes", 0))
            rows.append({"dev": dev, "queue": q, "packets": int(c["rx_packets"]),
                         "bytes": int(c.get("rx_bytes", 0)), "d_packets": dp, "d_bytes": db,
                         "gbps": db / dt / 1e9 if dt > 0 else 0.0})
    return rows


def _rates_table(rows: list[dict[str, Any]], interval: float, n: int) -> Table:
    t = Table(title=f"rx per queue, every {interval:g} s (sample {n}; Ctrl-C to stop)")
    for col in ("netdev", "queue", "packets", "bytes", "Δpackets", "Δbytes", "GB/s"):
        t.add_column(col, justify="left" if col in ("netdev", "queue") else "right")
    for r in rows:
        t.add_row(r["dev"], r["queue"], f"{r['packets']:,}", f"{r['bytes']:,}",
                  f"{r['d_packets']:,}", f"{r['d_bytes']:,}", f"{r['gbps']:.3f}")
    tot = sum(r["gbps"] for r in rows)
    t.add_row("total", "", f"{sum(r['packets'] for r in rows):,}",
              f"{sum(r['bytes'] for r in rows):,}", f"{sum(r['d_packets'] for r in rows):,}",
              f"{sum(r['d_bytes'] for r in rows):,}", f"{tot:.3f}")
    return t


def _watch(r: Any, interval: float, count: int, as_json: bool) -> None:
    import time as _time

    from rich.live import Live

    prev = _call(r, "kernel", "stats")
    t_prev = _time.monotonic()
    n = 0
    live = None if as_json else Live(_rates_table([], interval, 0), console=console,
                                      auto_refresh=False)
    try:
        if live is not None:
            live.start()
        while count == 0 or n < count:
            _time.sleep(interval)
            cur = _call(r, "kernel", "stats")
            now = _time.monotonic()
            rows = queue_rates(prev, cur, now - t_prev)
            prev, t_prev = cur, now
            n += 1
            if live is None:
                click.echo(json.dumps({"sample": n, "seconds": interval, "queues": rows}))
            else:
                live.update(_rates_table(rows, interval, n), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()


def _ledger(st: dict[str, Any], as_json: bool) -> None:
    z = st.get("zcrx", {})
    led = z.get("ledger", {})
    ifqs = {str(i.get("ifq")): i for i in z.get("ifqs", [])}
    if as_json:
        click.echo(json.dumps({"ledger": led, "ifqs": list(ifqs.values())}, indent=2,
                              sort_keys=True))
        return
    per = led.get("ifqs", {})
    if not per:
        console.print("no zcrx ifq is registered", highlight=False)
        return
    states = sorted({k for d in per.values() for k in d})
    t = Table(title="zcrx buffer ledger (niovs per state, per ifq)")
    for col in ("ifq", "dev/queue", *states, "niovs"):
        t.add_column(col, justify="left" if col in ("ifq", "dev/queue") else "right")
    for serial, d in sorted(per.items(), key=lambda kv: kv[0]):
        info = ifqs.get(serial, {})
        where = f"{info.get('dev')}/{info.get('queue')}" if info.get("dev") else "nodev"
        t.add_row(serial, where, *(str(d.get(k, 0)) for k in states), str(sum(d.values())))
        areas = info.get("area_ledgers", [])
        if len(areas) > 1:  # several areas (7.3): ifq 1's area 0 is row "1.a0"
            for a in areas:
                al = a.get("ledger", {})
                t.add_row(f"{serial}.a{a.get('area_id')}", "area",
                          *(str(al.get(k, 0)) for k in states), str(a.get("niovs", 0)))
    tot = led.get("total", {})
    t.add_row("total", "", *(str(tot.get(k, 0)) for k in states), str(led.get("niovs", 0)))
    console.print(t)


@main.command()
@NAME_OPT
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON (with --watch: one JSON object per sample and line).")
@click.option("--watch", is_flag=True,
              help="Live table of per-queue rx packets/bytes deltas and GB/s (Ctrl-C stops).")
@click.option("--interval", type=click.FloatRange(0.05, 3600), default=1.0,
              show_default=True, help="Seconds between samples of --watch.")
@click.option("--count", type=click.IntRange(0), default=0, show_default=True,
              help="Stop --watch after this many samples (0: until Ctrl-C).")
@click.option("--ledger", is_flag=True,
              help="Print the zcrx buffer ledger per ifq and per area (niovs per state).")
def stats(name: str | None, as_json: bool, watch: bool, interval: float, count: int,
          ledger: bool) -> None:
    """Counters of every layer: NIC queues, page pools, TCP, io_uring, zcrx."""
    if watch and ledger:
        fail("--watch and --ledger do not go together", 2)
    r = _pick_run(name)
    if watch:
        _watch(r, interval, count, as_json)
        return
    st = _call(r, "kernel", "stats")
    if ledger:
        _ledger(st, as_json)
        return
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    _print_nested(st)


def _print_nested(d: Any, indent: int = 0) -> None:
    pad = "  " * indent
    if isinstance(d, dict):
        for k, v in d.items():
            if isinstance(v, dict | list):
                console.print(f"{pad}{k}:", highlight=False)
                _print_nested(v, indent + 1)
            else:
                console.print(f"{pad}{k}: {v}", highlight=False)
    elif isinstance(d, list):
        for i, v in enumerate(d):
            console.print(f"{pad}[{i}]", highlight=False)
            _print_nested(v, indent + 1)
    else:
        console.print(f"{pad}{d}", highlight=False)


@main.command(context_settings={"ignore_unknown_options": True})
@NAME_OPT
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def ethtool(name: str | None, args: tuple[str, ...]) -> None:
    """ethtool, with ethtool's own syntax: -l/-L, -g/-G, -x/-X, -n/-N (-u/-U), -S, -c/-C,
    -k/-K (rx-gro-hw on|off: HW-GRO).

    Example: zcrx ethtool -N eth0 flow-type tcp4 dst-port 8000 action 1
    """
    from launch import ethtool as et

    try:
        req = et.parse(list(args))
    except et.EthtoolUsageError as e:
        fail(str(e), 2)
    r = _pick_run(name)
    dev = req["dev"]
    import shared.syscalls  # noqa: F401  (register the message types)
    from shared.control import ControlClient
    from shared.msg import ControlError

    try:
        with ControlClient(r.endpoint("kernel"), timeout_ms=30_000) as c:
            reply = c.call("ethtool", {"dev": dev, "request": req})
    except ControlError as e:
        # One line: what ethtool itself would say, then why (from the kernel or NIC).
        said = et.format_error(req, e.errno or 22).strip().splitlines()
        fail(f"{said[0] if said else 'ethtool'} ({_reason(e.remote_msg)})")
    except ZcrxError as e:
        fail(str(e))
    text = et.format_reply(req, reply)
    if text:
        click.echo(text.rstrip("\n"))


@main.group()
def app() -> None:
    """Applications: run a sample program against the run's kernel."""


def _program_of(entry: Any) -> str:
    """The program name of an app: the sample its recorded module is, or its command."""
    if entry.command:
        import shlex

        return shlex.join(entry.command)
    mod = entry.module
    return next((p for p, m in APPS.items() if m == mod), mod or "?")


@app.command("list")
@NAME_OPT
@click.option("--json", "as_json", is_flag=True, help=JSON_FLAG_HELP)
def app_list(name: str | None, as_json: bool) -> None:
    """Apps of the run: role, program, pid, alive, log path."""
    r = _pick_run(name)
    rows = []
    for role in r.app_roles():
        e = r.m.procs[role]
        rows.append({"role": role, "program": _program_of(e), "pid": e.pid,
                     "alive": e.process() is not None, "log": e.log})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    t = Table(title=f"apps of run {r.m.name}")
    for col in ("role", "program", "pid", "alive", "log"):
        t.add_column(col)
    for row in rows:
        t.add_row(row["role"], row["program"], str(row["pid"]),
                  "yes" if row["alive"] else "DEAD", row["log"])
    console.print(t)


@app.command("stop")
@NAME_OPT
@click.option("--timeout", type=click.FloatRange(0.1, 120), default=5.0, show_default=True,
              help="Seconds the app gets after SIGTERM before SIGKILL.")
@click.argument("index", type=click.IntRange(0))
def app_stop(name: str | None, timeout: float, index: int) -> None:
    """Stop app:INDEX (SIGTERM, wait, SIGKILL) and drop it from the run."""
    r = _pick_run(name)
    role = f"app:{index}"
    if role not in r.m.procs:
        fail(f"run {r.m.name} has no {role}")
    alive = r.m.procs[role].process() is not None
    killed = r.stop(role, timeout)
    how = "killed" if killed else ("stopped" if alive else "was not running; removed")
    console.print(f"{role} {how}", highlight=False)


@app.command("grant")
@NAME_OPT
@click.argument("pid", type=click.IntRange(1))
def app_grant(name: str | None, pid: int) -> None:
    """Grant CAP_NET_ADMIN to the running process PID (one you started by hand after `zcrx
    env`), and to what it runs, for as long as it lives.  Only the run's launcher (its uid)
    may; `zcrx app run --cap-net-admin` does this for the apps it starts."""
    r = _pick_run(name)
    try:
        r.grant_cap(pid)
    except ZcrxError as e:
        fail(f"app grant: {e}")
    console.print(f"pid {pid} has CAP_NET_ADMIN in run {r.m.name}", highlight=False)


@app.command("run", context_settings={"ignore_unknown_options": True,
                                      "allow_interspersed_args": False})
@NAME_OPT
@click.option("--detach", is_flag=True, help="Run in the background as app:N (log in the run "
              "directory); without it the app runs in the foreground, still listed as app:N, "
              "and its exit code is ours.")
@click.option("--ready", "ready", type=click.Choice(["notify", "start"]), default="notify",
              show_default=True,
              help="With --detach, when the app counts as up: 'notify' waits until it says so "
                   "(the sample servers and programs using app_proc.server / "
                   "shared.proc.notify_ready do once they listen), 'start' as soon as it runs.")
@click.option("--ready-timeout", type=click.FloatRange(0.1, 600), default=20.0,
              show_default=True, help="Seconds to wait for --ready notify.")
@click.option("--cap-net-admin", is_flag=True,
              help="Grant the app CAP_NET_ADMIN (registering a zcrx ifq on a hardware queue, "
                   "ethtool changes); off by default, as for a normal user's process.")
@click.argument("program")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def app_run(name: str | None, detach: bool, ready: str, ready_timeout: float,
            cap_net_admin: bool, program: str, args: tuple[str, ...]) -> None:
    """Run PROGRAM with ARGS as an app of the run.

    PROGRAM is a sample (copy-server, zcrx-server) or any executable, e.g.
    `zcrx app run --detach -- python examples/zcrx_receiver.py -p 9000 -q 1`.  Its
    environment names the run (ZCRX_RUN, ZCRX_RUNDIR, as `zcrx env` prints), its death is
    watched like any app's, and `zcrx app list/stop`, `zcrx kill app:N`, `zcrx down` and
    `zcrx cleanup` work on it.
    """
    import shutil

    if args[:1] == ("--",):  # `zcrx app run zcrx-server -- -q 1`: the -- is ours
        args = args[1:]
    r = _pick_run(name)
    command: list[str] | None = None
    module = APPS.get(program, "")
    if not module:
        exe = shutil.which(program)
        if exe is None:
            fail(f"app run: {program}: not a sample ({', '.join(sorted(APPS))}) and no such "
                 "executable", EXIT_USAGE)
        command = [program, *args]
    role = r.next_app_role()
    if detach:
        try:
            e = r.spawn(role, module, list(args), detach=True, notify=ready == "notify",
                        ready_timeout=ready_timeout, command=command,
                        cap_net_admin=cap_net_admin)
        except ZcrxError as err:
            fail(str(err))
        console.print(f"{role} {program} pid {e.pid} (log {e.log})", highlight=False)
        return
    sys.exit(_run_foreground(r, role, module, list(args), command, cap_net_admin))


def _run_foreground(r: Any, role: str, module: str, args: list[str],
                    command: list[str] | None, cap_net_admin: bool = False) -> int:
    """Run an app attached to this terminal, recorded as ``role`` while it lives."""
    import signal

    from launch.run import TAG_ENV, ProcEntry, RoleSpec, exec_uid, popen_app
    from shared.rundir import start_ticks

    env = r.env()
    env[TAG_ENV] = r.tag(role)
    argv = command or [sys.executable, "-m", module, "--tag", r.tag(role), *args]
    uid = r.app_uid(role)
    grant = r.grant_cap if cap_net_admin else None
    proc: Any = None
    try:
        entry_point = r.fork_entry(role, module, args, command)
        if entry_point is not None:  # forked from the run's template, our stdio passed on
            proc = r.fork(role, *entry_point, env=env, cwd=os.getcwd(), uid=uid,
                          new_session=False, stdio=(0, 1, 2), grant=grant)
        if proc is None:
            uid, why = exec_uid(argv, uid)
            if why:
                err_console.print(f"note: {role}: {why}", highlight=False)
            proc = popen_app(argv, uid=uid, grant=grant, env=env)
    except OSError as e:
        fail(f"app run: cannot run {argv[0]!r}: {e.strerror}")
        raise AssertionError from None
    except ZcrxError as e:
        fail(f"app run: {e}" if str(e).startswith("fork server")
             else f"app run: cannot grant CAP_NET_ADMIN: {e}")
        raise AssertionError from None
    r.m.procs[role] = ProcEntry(
        role=role, pid=proc.pid, start_ticks=start_ticks(proc.pid),
        argv=argv, log="", spec=RoleSpec(module=module if command is None else "",
                                         args=args if command is None else [],
                                         detach=False, command=command, cwd=os.getcwd(),
                                         cap_net_admin=cap_net_admin, uid=uid))
    r.save()
    try:
        while True:
            try:
                code = int(proc.wait())
                if getattr(proc, "status_lost", False):
                    err_console.print(f"zcrx: {role} (pid {proc.pid}) outlived the fork "
                                      "server, which had its exit status: unknown",
                                      highlight=False)
                return code
            except KeyboardInterrupt:  # pass it on (a forked app is not in our group)
                proc.send_signal(signal.SIGINT)
    finally:
        if r.dir.exists():
            r.m.procs.pop(role, None)
            r.save()


@main.command("env")
@NAME_OPT
@click.option("--json", "as_json", is_flag=True, help=JSON_FLAG_HELP)
def env_cmd(name: str | None, as_json: bool) -> None:
    """Print the shell exports that make a program started by hand part of a run:
    `eval "$(zcrx env)"`, then run your receiver.  Such a program is not in `zcrx app
    list`; when the run goes down (`zcrx down`) it sees the kernel gone and exits."""
    import shlex

    r = _pick_run(name)
    exports = r.exports()
    if as_json:
        hints = _reach_hint(r)
        click.echo(json.dumps({**exports, **({"ZCRX_NETNS": r.m.config["netns"],
                                              "reach": hints} if hints else {})}, indent=2))
        return
    for k, v in exports.items():
        click.echo(f"export {k}={shlex.quote(v)}")
    if r.m.config.get("netns"):
        click.echo(f"export ZCRX_NETNS={shlex.quote(r.m.config['netns'])}")
        for line in _reach_hint(r):
            click.echo(f"# reach it: {line}")


@main.command()
@NAME_OPT
@click.option("--dev", default="eth0", show_default=True, help="Netdev that receives it.")
@click.option("--flows", type=click.IntRange(1, 4096), default=1, show_default=True,
              help="Number of TCP flows.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="Destination port.")
@click.option("--sport", type=click.IntRange(1, 65535), default=None,
              help="First source port (flows use consecutive ports); a flow's pattern "
                   "stream id is its source port.")
@click.option("--bytes", "total", type=click.IntRange(0), default=64 << 20, show_default=True,
              help="Bytes per flow (0: unbounded, stop with --seconds).")
@click.option("--seconds", type=click.FloatRange(0), default=0.0,
              help="Stop after this long (0: when --bytes are sent).")
@click.option("--rate", type=click.FloatRange(0), default=0.0,
              help="Bytes per second over all flows (0: as fast as the host allows).")
@click.option("--payload", type=click.IntRange(0), default=0,
              help="Payload per segment (0: the MSS for the MTU).")
@click.option("--ipv6", is_flag=True, help="IPv6 flows instead of IPv4.")
@click.option("--pcap", "pcap_file", type=click.Path(dir_okay=False), default=None,
              help="Replay this capture (pcap or pcapng, Ethernet) instead of generating; "
                   "the NIC reads the file.")
@click.option("--dst", default=None, metavar="ADDR:PORT",
              help="With --pcap: replay the TCP packets sent to this endpoint (ADDR, :PORT, "
                   "[ADDR6]:PORT); default: every packet sent to a receiver of the capture.")
@click.option("--rewrite", is_flag=True,
              help="With --pcap: rewrite destination MAC and address to the netdev's own.")
@click.option("--speed", type=click.FloatRange(0), default=0.0,
              help="With --pcap: pace as recorded, X times faster (0: as fast as the "
                   "host allows).")
def traffic(name: str | None, dev: str, flows: int, port: int, sport: int | None, total: int,
            seconds: float, rate: float, payload: int, ipv6: bool, pcap_file: str | None,
            dst: str | None, rewrite: bool, speed: float) -> None:
    """Start the traffic generator: TCP flows (SYN, data, FIN) whose bytes receivers can
    verify from the stream offset alone; or, with --pcap, replay a capture."""
    if pcap_file is not None:
        _traffic_pcap(name, dev, pcap_file, dst, rewrite, speed)
        return
    if dst is not None or rewrite or speed:
        fail("--dst, --rewrite and --speed go with --pcap", 2)
    if total == 0 and seconds == 0:
        fail("--bytes 0 needs --seconds", 2)
    from launch.topology import TrafficSpec

    r = _pick_run(name)
    type_, body = TrafficSpec(dev=dev, flows=flows, port=port, sport=sport, bytes=total,
                              seconds=seconds, rate=rate, payload=payload,
                              ipv6=ipv6).request()
    res = _call(r, "nic", type_, body)
    console.print(f"traffic source {res['source']} started on {dev}", highlight=False)


def _traffic_pcap(name: str | None, dev: str, path: str, dst: str | None, rewrite: bool,
                  speed: float) -> None:
    """``zcrx traffic --pcap``: check the file here for a clear message, the NIC reads it."""
    from launch.capture import pcap_request

    r = _pick_run(name)
    try:
        body = pcap_request(dev, path, dst, rewrite, speed)
    except ZcrxError as e:
        fail(str(e), 2)
    res = _call_usage(r, "nic", "nic.pcap", body)
    console.print(f"pcap replay {res['source']} started on {dev}: {res['frames']} frames, "
                  f"{res['flows']} flow(s) from {path}", highlight=False)


def _call_usage(run: Any, endpoint: str, type_: str, body: dict[str, Any]) -> dict[str, Any]:
    """Like _call, but a request the NIC rejects as invalid (bad input) exits 2."""
    import shared.nicif  # noqa: F401
    from shared.control import ControlClient

    try:
        with ControlClient(run.endpoint(endpoint), timeout_ms=60_000) as c:
            return c.call(type_, body)
    except ZcrxError as e:
        code = 2 if getattr(e, "errno", None) in (errno.EINVAL, errno.ENOENT) else 3
        fail(_reason(str(e)), code)
    raise AssertionError


@main.command()
@NAME_OPT
@click.option("--dev", default="eth0", show_default=True, help="Netdev that receives it.")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Loopback port to listen on (0: pick one); it is also the flows' "
                   "destination port.")
@click.option("--host", type=click.Choice(["both", "127.0.0.1", "::1"]), default="both",
              show_default=True,
              help="Loopback address(es) to listen on; a connection to ::1 becomes an IPv6 "
                   "flow to the netdev's IPv6 address.")
def wire(name: str | None, dev: str, port: int, host: str) -> None:
    """Start the wire gateway: a real TCP listener on 127.0.0.1 and ::1 whose connections
    become flows into the netdev, each its own flow (so `nc 127.0.0.1 PORT < file` and
    `nc ::1 PORT < file` work, several at once)."""
    r = _pick_run(name)
    hosts = ["127.0.0.1", "::1"] if host == "both" else [host]
    for h in hosts:
        if h == "::1" and host == "both" and not _has_ipv6_loopback():
            console.print("wire gateway: no IPv6 loopback here, IPv4 only", highlight=False)
            continue
        res = _call(r, "nic", "nic.wire", {"dev": dev, "port": port, "host": h})
        port = res["port"]  # the second listener takes the port the first one got
        shown = f"[{h}]" if ":" in h else h
        console.print(f"wire gateway listening on {shown}:{res['port']} -> {dev}",
                      highlight=False)


def _has_ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@main.command()
@NAME_OPT
@click.option("--dev", default="eth0", show_default=True, help="Netdev to capture on.")
@click.option("--queue", type=click.IntRange(0, MAX_QUEUES - 1), default=None,
              help="Only the frames steered to this queue (default: every queue).")
@click.option("-c", "count", type=click.IntRange(0), default=0,
              help="Stop after this many frames (0: at Ctrl-C or SIGTERM).")
@click.option("-s", "snaplen", type=click.IntRange(1, MAX_SNAPLEN), default=MAX_SNAPLEN,
              show_default=True, help="Bytes kept of each frame.")
@click.option("-w", "out", required=True, metavar="FILE",
              help="pcap file to write; - streams it to stdout (| tcpdump -r -).")
def capture(name: str | None, dev: str, queue: int | None, count: int, snaplen: int,
            out: str) -> None:
    """Write what the NIC receives on a netdev, before DMA, to a pcap file (nanosecond
    timestamps, Ethernet) that tcpdump and Wireshark read."""
    from launch.capture import run_capture

    r = _pick_run(name)

    def call(type_: str, body: dict[str, Any]) -> dict[str, Any]:
        return _call_usage(r, "nic", type_, body)

    st = run_capture(call, Path(r.dir), dev, out, queue=-1 if queue is None else queue,
                     count=count, snaplen=snaplen)
    err_console.print(f"{st['frames']} packets captured", highlight=False)


# -- chaos ------------------------------------------------------------------------------

@main.command()
@click.option("--trials", type=click.IntRange(1, 1000), default=20, show_default=True,
              help="Trials; each brings up its own run and kills one role in it.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the kill plan (role, app, moment): same seed, same kills.")
@click.option("--roles", default="nic,kernel,app", show_default=True,
              help="Roles that may be killed (comma separated: nic, kernel, app).")
@click.option("--mib", type=click.IntRange(1, 1024), default=4, show_default=True,
              help="MiB per app flow in each trial.")
@click.option("--seconds", type=click.FloatRange(0.1, 60), default=1.0, show_default=True,
              help="Pace each flow to last about this long, so the kill lands mid-stream.")
@_json_options
def chaos(trials: int, seed: int, roles: str, mib: int, seconds: float, as_json: bool,
          json_out: str | None) -> None:
    """SIGKILL a random role of a live run at a random moment, TRIALS times, and check the
    teardown, the survivors' byte-exact streams and that nothing is left; exit 1 on any
    violation.

    A trial is "late" when the app to kill had already finished its stream byte-exact (the
    sampler lagged on a loaded machine): nothing is killed and nothing counted.
    """
    from launch.chaos import run_chaos

    wanted = tuple(r.strip() for r in roles.split(",") if r.strip())
    def say(t: Any) -> None:
        if not as_json:
            verdict = ("ok" if not t.violations else f"{len(t.violations)} VIOLATION(S)") + (
                " (late: the app had already finished)" if t.late else "")
            console.print(f"trial {t.trial}: kill {t.role} at {t.fraction:.0%}: {verdict}",
                          highlight=False)

    try:
        res = run_chaos(trials, seed, wanted, size=mib << 20, say=say, transfer_s=seconds)
    except ZcrxError as e:
        fail(str(e), 2)
    _write_json(res, as_json, json_out, sort_keys=True)
    if not as_json:
        t = Table(title=f"zcrx chaos: seed {seed}")
        for col in ("trial", "role killed", "at fraction", "checks", "violations"):
            t.add_column(col)
        for tr in res["trials"]:
            checks = " ".join(f"{k}{'' if v else '!'}" for k, v in tr["checks"].items())
            checks = "late (nothing killed) " + checks if tr["late"] else checks
            t.add_row(str(tr["trial"]), tr["role"], f"{tr['fraction']:.2f} ({tr['reached']:.2f})",
                      checks, "; ".join(tr["violations"])[:200] or "0")
        console.print(t)
        tot = res["totals"]
        kills = ", ".join(f"{k} {v}" for k, v in sorted(tot["kills"].items())) or "none"
        console.print(f"trials {tot['trials']}, kills: {kills}, late {tot['late']}, "
                      f"violations {tot['violations']}", highlight=False)
    if res["totals"]["violations"]:
        fail(f"{res['totals']['violations']} violation(s)", EXIT_CHECK_FAILED)


# -- soak -------------------------------------------------------------------------------

@main.command()
@click.option("--minutes", type=click.FloatRange(0.1, 1440), default=30.0, show_default=True,
              help="How long to soak (the last round may run over).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the kill plan (which app dies, when): same seed, same kills.")
@click.option("--mib", type=click.IntRange(1, 1024), default=4, show_default=True,
              help="MiB per app flow in each round.")
@click.option("--seconds", type=click.FloatRange(0.1, 60), default=1.0, show_default=True,
              help="Pace each flow to last about this long.")
@click.option("--max-rss-growth", type=click.FloatRange(0), default=None, metavar="MIB",
              help="RSS growth per minute the NIC and the kernel may show with --check "
                   "(default 1.0).")
@click.option("--check", is_flag=True,
              help="Exit 1 if not flat: NIC or kernel RSS growth over the bound, fds or "
                   "segments growing, or an app's task or segment left at idle.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True),
              help="Write RSS, fds and segments over time as a PNG (needs matplotlib: the "
                   "'plot' extra).")
@_json_options
def soak(minutes: float, seed: int, mib: int, seconds: float, max_rss_growth: float | None,
         check: bool, plot_path: str | None, as_json: bool, json_out: str | None) -> None:
    """Mixed traffic (zero copy and the copy path) for MINUTES with apps coming and going and
    random app kills, printing per role (nic, kernel, apps) the RSS, open fds and /dev/shm
    segments over time and their growth; flat is the goal.  Exit 1 on a violation (a
    survivor not byte-exact, a dead app not torn down) and, with --check, if not flat.
    """
    from launch.soak import BOUNDS, ROLES, plot, run_soak, verdict

    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            fail("--plot needs matplotlib: pip install 'zcrx-emu[plot]'")
    say = (lambda m: None) if as_json else (lambda m: err_console.print(m, highlight=False))
    try:
        res = run_soak(minutes, seed, size=mib << 20, transfer_s=seconds, say=say)
    except ZcrxError as e:
        fail(f"soak: {e}")
    if max_rss_growth is not None:
        res["verdict"] = verdict(res["samples"], minutes,
                                 {**BOUNDS, "rss_mib_per_min": max_rss_growth})
    if plot_path:
        plot(res, plot_path)
    _write_json(res, as_json, json_out)
    v = res["verdict"]
    if not as_json:
        t = Table(title=f"zcrx soak: {res['rounds']} rounds in {res['seconds'] / 60:.1f} min, "
                        f"seed {seed} (idle samples; apps: mid-round)")
        t.add_column("min", justify="right")
        for role in ROLES:
            for col in ("MiB", "fds", "segs"):
                t.add_column(f"{role} {col}", justify="right")
        idle = [s for s in res["samples"] if s["phase"] == "idle"]
        busy = {s["round"]: s for s in res["samples"] if s["phase"] == "busy"}
        step = max(1, len(idle) // 20)
        for s in idle[::step] + ([idle[-1]] if (len(idle) - 1) % step else []):
            row = [f"{s['t_s'] / 60:.1f}"]
            for role in ROLES:
                src = busy.get(s["round"], s) if role == "apps" else s
                row += [f"{src[role]['rss'] / 2**20:.1f}", str(src[role]["fds"]),
                        str(src[role]["segments"])]
            t.add_row(*row)
        console.print(t)
        for role in ("nic", "kernel"):
            g = v["growth"][role]
            console.print(f"{role}: RSS {g['rss_first_mib']} -> {g['rss_last_mib']} MiB "
                          f"({g['rss_mib_per_min']:+.2f} MiB/min after a "
                          f"{v['warmup_s']:.0f} s warm-up), fds {g['fds_first']} -> "
                          f"{g['fds_last']}, segments {g['segments_first']} -> "
                          f"{g['segments_last']}", highlight=False)
        console.print(f"kills {res['kills']} (late {res['late']}), violations "
                      f"{len(res['violations'])}; "
                      + ("flat" if v["flat"] else "NOT flat: " + "; ".join(v["problems"])),
                      highlight=False)
        for line in res["violations"][:20]:
            console.print(line, highlight=False, markup=False)
    if res["violations"]:
        fail(f"{len(res['violations'])} violation(s)", EXIT_CHECK_FAILED)
    if check and not v["flat"]:
        fail("not flat: " + "; ".join(v["problems"]), EXIT_CHECK_FAILED)


# -- demo -------------------------------------------------------------------------------

@main.command()
@click.option("--flows", type=click.IntRange(1, 64), default=3, show_default=True,
              help="Generator flows on the copy path (spread by RSS).")
@click.option("--mib", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="MiB per copy-path flow.")
@click.option("--zc-mib", type=click.IntRange(1, 8192), default=256, show_default=True,
              help="MiB of the zero-copy flow.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the summary as JSON on stdout instead of the human output.")
def demo(flows: int, mib: int, zc_mib: int, as_json: bool) -> None:
    """Bring up a default topology, push verified traffic NIC -> kernel -> app, tear down.

    eth0 with 4 queues: an ntuple rule steers port 9000 to queue 3, where zcrx-server
    receives one generator flow zero copy; copy-server receives FLOWS generator flows
    spread by RSS; with nc installed, a random file goes through the wire gateway.
    Every byte is verified; the summary shows bytes, GB/s, copies avoided and the
    buffer ledger, then everything is stopped.
    """
    from launch.demo import run_demo

    say = (lambda m: None) if as_json else (lambda m: console.print(m, highlight=False))
    try:
        res = run_demo(flows=flows, per_flow=mib << 20, zc_bytes=zc_mib << 20, say=say)
    except (ZcrxError, OSError) as e:
        fail(f"demo failed: {e}")
    if as_json:
        click.echo(json.dumps(res, indent=2, sort_keys=True))
    else:
        t = Table(title="zcrx demo: NIC -> kernel -> app")
        for col in ("path", "bytes", "GB/s", "zero copy", "copied", "verified"):
            t.add_column(col, justify="left" if col == "path" else "right")
        for leg in res["legs"]:
            gbps = f"{leg['gbps']:.2f}" if leg["gbps"] else "-"
            ok = "yes" if leg["verified"] else "NO"
            t.add_row(leg["leg"], f"{leg['bytes']:,}", gbps, f"{leg['zero_copy']:,}",
                      f"{leg['copied']:,}", f"{ok} ({leg['how']})")
        console.print(t)
        q = ", ".join(f"rx-{k}: {v}" for k, v in res["frames_per_queue"].items())
        z = res["zcrx"]
        avoided = sum(leg["zero_copy"] for leg in res["legs"])
        console.print(f"frames per queue: {q}; queue bindings: {', '.join(res['bindings'])}",
                      highlight=False)
        console.print(f"copies avoided: {avoided:,} bytes; buffer ledger after close: "
                      f"{z['registered']} ifq registered, {z['destroyed']} destroyed with every "
                      f"niov home ({z['scrubbed_refs']} user refs scrubbed at close)",
                      highlight=False)
        if "areas" in z:
            ev = ", ".join(f"{k} x{v}" for k, v in sorted(z["events"].items())) or "none"
            console.print(f"zcrx events: {ev}; areas: {z['areas']} ({z['area_bytes'] >> 10} KiB"
                          f"{', grown by ALLOC_FAIL' if z['areas'] > 1 else ''})",
                          highlight=False)
        console.print("teardown: every process stopped, "
                      f"{len(res['leftovers_removed'])} leftover segment(s)", highlight=False)
    if not res["verified"]:
        fail("data was not delivered intact", EXIT_CHECK_FAILED)
