"""A run: its directory, its manifest, and the processes it starts and stops.

These are the primitives; :mod:`launch.supervise` realises a topology with them (every
way of starting a run goes through it).  The manifest records, per role, how it was
started (:class:`RoleSpec`).  Everything a run creates is
findable afterwards without the launcher's memory:

* the run directory ``$ZCRX_RUNS_DIR/<name>/`` (default ``/tmp/zcrx-runs``)
  holds ``manifest.json``, the control sockets (``*.sock``) and one log per
  process;
* every process carries ``zcrx:<run_id>:<role>`` in its argv;
* every shm segment is ``/dev/shm/zcrx.<run_id>.*``.

* a run with ``port=tap`` netdevs has a network namespace ``zcrx-<run_id>-peer`` holding
  TAP devices ``zcrx<token>t<N>`` (:mod:`launch.port`).

So :func:`cleanup` removes a crashed run from the manifest, with the argv tag
and the name prefix as fallbacks, and is idempotent.

The launcher owns the run directory; each role owns the segments it creates.

Identity and privilege (DESIGN §10): the manifest records the launcher's uid (and, for a
foreground ``zcrx up``, its pid as role ``launcher``); NIC and kernel are told that uid
(``--launcher-uid``) and serve privileged requests only to peers the OS says have it.  An app
gets CAP_NET_ADMIN only if started with it (:meth:`Run.spawn` ``cap_net_admin``): the
launcher tells the kernel its pid (``cap_grant``) while the new process holds before
``exec`` (:func:`popen_app`), so the grant is there before the app runs.  Run as root with
``app_uid_base`` in the config (``zcrx up --app-uid-base``), app ``app:N`` runs as uid/gid
``base + N``, so its segments are its own (0600) and no other app can open them.

Fast start: a run brought up with a fork server (role ``forkserver``,
:mod:`launch.forkserver`) has the apps that are our own Python programs forked from that
pre-imported template (:meth:`Run.fork`) with the same uid, session, stdio and grant rules;
any other program, or any app when the template is gone, is fork+exec'd here.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from shared.control import ControlClient, ipc_endpoint
from shared.errors import Misuse, PeerGone, Timeout, ZcrxError
from shared.msg import all_ok
from shared.proc import NOTIFY_ENV
from shared.rundir import live_process, start_ticks
from shared.shm import list_run_segments, remove_run_segments

if TYPE_CHECKING:
    from launch.forkserver import ForkedApp

DEFAULT_RUNS_DIR = "/tmp/zcrx-runs"
MANIFEST = "manifest.json"
#: Roles in start order; stop runs in reverse, apps first.
ROLE_ORDER = ("nic", "kernel")
#: The foreground ``zcrx up`` records itself under this role (never stopped by ``down``).
LAUNCHER = "launcher"
#: The run's fork server (:mod:`launch.forkserver`), the template apps are forked from.
FORKSERVER = "forkserver"
#: The role's tag (``zcrx:<run_id>:<role>``) in the environment of every process we start.
TAG_ENV = "ZCRX_TAG"
#: Default first uid of the per-app uids a root run reserves (``zcrx up --app-uid-base``).
DEFAULT_APP_UID_BASE = 60000
#: How many app uids a run reserves from its base (app:0 .. app:N-1).
APP_UID_RANGE = 1000
#: Signals ``zcrx kill`` may send.
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "STOP": signal.SIGSTOP,
           "CONT": signal.SIGCONT}


#: Runs for which this process already said that apps start the slow way.
_SAID_SLOW: set[str] = set()


def parse_role(text: str) -> str:
    """``nic``, ``kernel``, ``forkserver``, ``launcher`` or ``app:N`` -> the manifest role
    (Misuse EINVAL)."""
    t = text.strip().lower()
    if t in (*ROLE_ORDER, LAUNCHER, FORKSERVER):
        return t
    kind, colon, idx = t.partition(":")
    if kind == "app" and colon and idx.isdigit():
        return f"app:{int(idx)}"
    raise Misuse(f"unknown role {text!r}: nic, kernel, forkserver, launcher or app:N",
                 errno=22)


def runs_dir() -> Path:
    return Path(os.environ.get("ZCRX_RUNS_DIR", DEFAULT_RUNS_DIR))


def popen_app(argv: list[str], *, uid: int | None = None,
              grant: Callable[[int], None] | None = None,
              **kw: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(argv, **kw)`` for an app: as ``uid`` (and gid, no supplementary
    groups) when given, and with ``grant`` the child holds before ``exec`` until
    ``grant(its pid)`` returned, so the app cannot reach a privileged call before the
    kernel knows its capability.  A failed grant kills the child before it runs anything
    and is raised here."""
    if uid is not None:
        kw.update(user=uid, group=uid, extra_groups=[])
    if grant is None:
        return subprocess.Popen(argv, **kw)
    pid_r, pid_w = os.pipe()
    go_r, go_w = os.pipe()
    failed: list[BaseException] = []

    def granter() -> None:
        try:
            data = os.read(pid_r, 32)
            if data:
                grant(int(data))
                os.write(go_w, b"1")
        except BaseException as e:
            failed.append(e)
        finally:
            os.close(pid_r)
            os.close(go_w)  # a child still holding reads EOF and exits

    def hold() -> None:  # in the child, between fork and exec
        os.close(go_w)  # else our own copy keeps the "go" pipe from ever reading EOF
        os.close(pid_r)
        os.write(pid_w, str(os.getpid()).encode())
        if os.read(go_r, 1) != b"1":
            os._exit(126)

    t = threading.Thread(target=granter, name="cap-grant", daemon=True)
    t.start()
    try:
        proc = subprocess.Popen(argv, preexec_fn=hold, **kw)
    finally:
        os.close(pid_w)
        os.close(go_r)
        t.join(30)
    if failed:
        proc.kill()
        proc.wait()
        raise failed[0]
    return proc


def reachable(path: str | Path) -> bool:
    """Whether every uid can run ``path``: it and each directory above it are searchable
    (``o+x``).  A program that is not cannot be exec'd once a process dropped to an app's
    uid."""
    p = Path(os.path.realpath(path))
    try:
        return all(os.stat(d).st_mode & 0o001 for d in (p, *p.parents))
    except OSError:
        return False


def exec_uid(argv: list[str], uid: int | None) -> tuple[int | None, str]:
    """The uid an exec'd app may run as: ``uid``, or None (the launcher's) with the reason
    when its program (``argv[0]`` on ``$PATH``; for a script, its interpreter too) is not
    reachable by other uids.  Apps forked from the run's template need no exec and keep
    their uid."""
    if uid is None or not argv:
        return uid, ""
    exe = shutil.which(argv[0]) or argv[0]
    if not reachable(exe):
        return None, (f"{exe} is not reachable by other uids, so this app runs as the "
                      f"launcher's uid, not isolated (install it where every user can run it)")
    return uid, ""


def isolation(app_uid_base: int | None) -> tuple[int | None, str]:
    """Whether a run started now can give each app its own uid: ``(base, "")`` if so, else
    ``(None, why not)``.  Needs root (only root can run a process as another uid), a base,
    and a runs directory every uid can reach (apps find their sockets there).  Our own
    programs are forked from the run's template and need no interpreter of their own; a
    program exec'd from a place other uids cannot reach runs unisolated (:func:`exec_uid`).
    """
    if os.geteuid() != 0:
        return None, ("zcrx up runs as a normal user, so every app runs under your uid: "
                      "apps can open each other's shared memory and speak to the kernel as "
                      "the launcher (run as root to give each app its own uid)")
    if app_uid_base is None or app_uid_base <= 0:
        return None, "--app-uid-base 0: every app runs as root, apps are not isolated"
    base = runs_dir().absolute()
    base.mkdir(parents=True, exist_ok=True)
    for d in (base, *base.parents):
        if not os.stat(d).st_mode & 0o001:
            return None, (f"{d} is not searchable by other uids, so apps cannot run under "
                          f"their own uid (set ZCRX_RUNS_DIR elsewhere)")
    return app_uid_base, ""


def check_name(name: str) -> str:
    if not name or len(name) > 32 or not all(c.isalnum() or c in "_-" for c in name):
        raise Misuse(f"bad run name {name!r}: up to 32 letters, digits, '_' or '-'")
    return name


@dataclass
class AppStart:
    """One app for :meth:`Run.spawn_apps`: :meth:`Run.spawn`'s arguments."""

    role: str
    module: str
    args: list[str]
    detach: bool = True
    notify: bool = False
    ready_timeout: float = 20.0
    cap_net_admin: bool = False


@dataclass
class RoleSpec:
    """How a role was started, as :meth:`Run.spawn` was asked: ``python -m module args``.

    Recorded in the manifest with the role, so a supervisor restarts a dead role from what
    it was started with (:meth:`Run.respawn`), never from argv positions.  The NIC's args
    carry its netdev specs (``--netdev`` :meth:`shared.nicif.NetdevSpec.format` strings).
    """

    module: str
    args: list[str] = field(default_factory=list)
    detach: bool = True
    ready: str | None = None
    notify: bool = False
    ready_timeout: float = 20.0
    #: Any program instead of a module (``zcrx app run -- COMMAND``): its whole argv, run in
    #: ``cwd``; it carries the role's tag in ``$ZCRX_TAG`` since its argv is not ours.
    command: list[str] | None = None
    cwd: str | None = None
    #: CAP_NET_ADMIN granted by the launcher (``zcrx app run --cap-net-admin``)
    cap_net_admin: bool = False
    #: the uid (and gid) it runs as, when a root run gives each app its own; None: ours
    uid: int | None = None


@dataclass
class ProcEntry:
    role: str
    pid: int
    #: when it started, in clock ticks after boot (:func:`shared.rundir.start_ticks`)
    start_ticks: int
    argv: list[str]
    log: str
    #: What it was started with (None for the recorded ``launcher``).
    spec: RoleSpec | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProcEntry:
        spec = d.pop("spec", None)
        if "start_ticks" not in d:  # a manifest from before start_ticks: never matches
            d.pop("create_time", None)
            d["start_ticks"] = -1
        return cls(spec=RoleSpec(**spec) if spec is not None else None, **d)

    @property
    def module(self) -> str:
        """The module it runs (``python -m MODULE``), or '' if it is not a spawned role."""
        return self.spec.module if self.spec is not None else ""

    @property
    def command(self) -> list[str] | None:
        """The program's argv when the role runs any program, not one of our modules."""
        return self.spec.command if self.spec is not None else None

    def process(self) -> psutil.Process | None:
        """The live process, or None if it is gone (or the pid was reused)."""
        return live_process(self.pid, self.start_ticks)


def _entry_dict(e: ProcEntry) -> dict[str, Any]:
    """``asdict(e)`` without the deep copy (JSON encoding only reads it)."""
    d = dict(vars(e))
    if e.spec is not None:
        d["spec"] = dict(vars(e.spec))
    return d


@dataclass
class Manifest:
    name: str
    run_id: str
    rundir: str
    created: float
    launcher_pid: int
    config: dict[str, Any] = field(default_factory=dict)
    procs: dict[str, ProcEntry] = field(default_factory=dict)
    #: the launcher's uid: only peers with it may stop the kernel or configure the NIC
    launcher_uid: int = field(default_factory=os.geteuid)

    def to_json(self) -> str:
        """The manifest file's text.  Written at every spawn and stop, so built field by
        field rather than with ``dataclasses.asdict`` (a deep copy of everything), and on
        one line: ``json``'s C encoder does not indent, and its pure-Python one took 2.5 ms
        a save at 66 roles against 0.7 (one server per queue saves at every spawn).
        ``python -m json.tool`` shows it indented."""
        d = dict(vars(self))
        d["procs"] = {k: _entry_dict(e) for k, e in self.procs.items()}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        d = json.loads(text)
        procs = {k: ProcEntry.from_dict(v) for k, v in d.pop("procs", {}).items()}
        return cls(procs=procs, **d)


class Run:
    """A live (or crashed) run, found by name."""

    def __init__(self, manifest: Manifest) -> None:
        self.m = manifest
        self.dir = Path(manifest.rundir)
        #: roles spawned and not yet waited for: process, ready endpoint, note, timeout
        self._starting: dict[str, tuple[Any, str | None, Path | None, float]] = {}

    # -- create / open ------------------------------------------------------------

    @classmethod
    def create(cls, name: str, config: dict[str, Any] | None = None) -> Run:
        check_name(name)
        base = runs_dir()
        base.mkdir(parents=True, exist_ok=True)
        rundir = base / name
        if rundir.exists():
            try:
                old = cls.open(name)
            except ZcrxError:
                old = None
            if old is not None and old.alive_roles():
                raise Misuse(f"run {name!r} is already up (zcrx down --name {name})",
                             errno=17)
            cleanup(name)
        rundir.mkdir(mode=0o700)
        if (config or {}).get("app_uid_base") is not None:
            # Apps under their own uids write their ready notes and reports here, like in
            # /tmp: sticky (nobody removes or replaces what is not theirs), not listable by
            # them; the sockets are reached by path and decide by peer credentials.
            rundir.chmod(0o1733)
        run_id = f"{name}-{secrets.token_hex(3)}"
        m = Manifest(name=name, run_id=run_id, rundir=str(rundir), created=time.time(),
                     launcher_pid=os.getpid(), config=config or {})
        run = cls(m)
        run.save()
        return run

    @classmethod
    def open(cls, name: str) -> Run:
        check_name(name)
        path = runs_dir() / name / MANIFEST
        try:
            return cls(Manifest.from_json(path.read_text()))
        except FileNotFoundError as e:
            raise Misuse(f"no run named {name!r} (zcrx up --name {name})", errno=2) from e
        except (ValueError, TypeError, KeyError) as e:
            raise Misuse(f"run {name!r} has a damaged manifest: {e}", errno=22) from e

    def save(self) -> None:
        if not self.dir.exists():
            return  # the run is being removed (zcrx down elsewhere): nothing to record
        tmp = self.dir / (MANIFEST + ".tmp")
        tmp.write_text(self.m.to_json())
        os.replace(tmp, self.dir / MANIFEST)

    # -- properties ---------------------------------------------------------------

    @property
    def run_id(self) -> str:
        return self.m.run_id

    def endpoint(self, name: str) -> str:
        return ipc_endpoint(self.dir, name)

    def tag(self, role: str) -> str:
        return f"zcrx:{self.run_id}:{role}"

    def alive_roles(self) -> list[str]:
        return [r for r, e in self.m.procs.items() if e.process() is not None]

    def app_uid(self, role: str) -> int | None:
        """The uid ``role`` (``app:N``) runs as: ``app_uid_base + N`` in a run that
        reserved a range (root only), else None (ours)."""
        base = self.m.config.get("app_uid_base")
        if base is None or not role.startswith("app:") or os.geteuid() != 0:
            return None
        n = int(role.partition(":")[2])
        if n >= APP_UID_RANGE:
            raise Misuse(f"{role}: the run reserved uids for {APP_UID_RANGE} apps", errno=28)
        return int(base) + n

    def grant_cap(self, pid: int) -> None:
        """Tell the kernel that process ``pid`` (an app we started) has CAP_NET_ADMIN."""
        self.grant_caps([pid])

    def exports(self) -> dict[str, str]:
        """The variables that make a process part of this run (``zcrx env`` prints them):
        the app library needs only ``ZCRX_RUNDIR``; ``ZCRX_RUN`` is the run id it names."""
        return {"ZCRX_RUN": self.run_id, "ZCRX_RUNDIR": str(self.dir)}

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.exports())
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # -- processes ------------------------------------------------------------------

    def _prepare(self, role: str, notify: bool) -> tuple[dict[str, str], Path, Path]:
        """What starting ``role`` needs, the same for :meth:`spawn` and :meth:`spawn_apps`:
        its environment (the run's, its tag, the ready file when ``notify``), its log and
        its ready file (a stale one removed).  Misuse EEXIST if it is running already."""
        if role in self.m.procs and self.m.procs[role].process() is not None:
            raise Misuse(f"{role} is already running in run {self.m.name}", errno=17)
        slug = role.replace(":", "-")
        env = self.env()
        env[TAG_ENV] = self.tag(role)
        notify_path = self.dir / f"{slug}.ready"
        notify_path.unlink(missing_ok=True)
        if notify:
            env[NOTIFY_ENV] = str(notify_path)
        return env, self.dir / f"{slug}.log", notify_path

    def spawn(self, role: str, module: str, args: list[str], *, detach: bool = True,
              ready: str | None = None, notify: bool = False,
              ready_timeout: float = 20.0, command: list[str] | None = None,
              cwd: str | None = None, cap_net_admin: bool = False,
              wait: bool = True) -> ProcEntry:
        """Start ``python -m module args`` as ``role`` and wait until it is ready.

        ``ready`` names a control endpoint to ping; ``notify`` waits for the
        process to call :func:`shared.proc.notify_ready` (apps do once they
        listen); with neither the process is ready once started.  Processes get
        their own session when ``detach`` so they survive the launcher (``zcrx
        down`` still stops them); otherwise they exit when it dies.

        With ``command`` (any program: ``zcrx app run -- COMMAND``) that argv runs instead,
        in ``cwd`` (default: ours, so relative paths mean what the user typed); ``module``
        and ``args`` are ignored.  Misuse ENOENT if the program is not found.

        An ``app:N`` role runs as :meth:`app_uid` when that is set, and gets CAP_NET_ADMIN
        from the kernel only with ``cap_net_admin`` (granted to its pid once started).
        """
        env, log_path, notify_path = self._prepare(role, notify)
        if command is not None:
            argv = list(command)
            cwd = cwd or os.getcwd()
            module, args = "", []
        else:
            argv = [sys.executable, "-m", module, "--tag", self.tag(role), *args]
        uid = self.app_uid(role)
        grant = self.grant_cap if cap_net_admin else None
        proc: subprocess.Popen[bytes] | ForkedApp | None = None
        try:
            with open(log_path, "ab") as log, open(os.devnull, "rb") as null:
                entry_point = self.fork_entry(role, module, args, command)
                if entry_point is not None:
                    proc = self.fork(role, *entry_point, env=env, cwd=cwd or str(self.dir),
                                     uid=uid, new_session=detach,
                                     stdio=(null.fileno(), log.fileno(), log.fileno()),
                                     grant=grant)
                if proc is None:
                    uid, why = exec_uid(argv, uid)
                    if why:
                        log.write(f"zcrx: note: {role}: {why}\n".encode())
                        log.flush()
                    proc = popen_app(argv, uid=uid, grant=grant, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log, env=env,
                                     cwd=cwd or str(self.dir), start_new_session=detach)
        except OSError as e:
            raise Misuse(f"{role}: cannot run {argv[0]!r}: {e.strerror}",
                         errno=e.errno or 2) from None
        entry = ProcEntry(role=role, pid=proc.pid,
                          start_ticks=start_ticks(proc.pid),
                          argv=argv, log=str(log_path),
                          spec=RoleSpec(module=module, args=list(args), detach=detach,
                                        ready=ready, notify=notify,
                                        ready_timeout=ready_timeout, command=command,
                                        cwd=cwd, cap_net_admin=cap_net_admin, uid=uid))
        self.m.procs[role] = entry
        self.save()
        self._starting[role] = (proc, ready, notify_path if notify else None, ready_timeout)
        if wait:
            self.wait_started(role)
        return entry

    def wait_started(self, role: str) -> None:
        """Wait until ``role``, started with ``spawn(wait=False)``, is ready as its spawn
        asked (at once if it was already waited for).  Starting several apps, then waiting
        for each, overlaps their starts."""
        start = self._starting.pop(role, None)
        if start is None:
            return
        proc, ready, notify_path, ready_timeout = start
        try:
            if ready is not None:
                self._wait_ready(proc, role, ready, ready_timeout)
            if notify_path is not None:
                self._wait_notify(proc, role, notify_path, ready_timeout)
        finally:
            if not isinstance(proc, subprocess.Popen):
                proc.close()  # the template reaps it; nobody here waits for its status

    # -- the fork server ------------------------------------------------------------

    def fork_entry(self, role: str, module: str, args: list[str],
                   command: list[str] | None) -> tuple[str, list[str]] | None:
        """``(module, args)`` to ask the fork server for, when ``role`` is an app, the run
        has a fork server, and the program is one of our entry points (a sample, or
        ``python -m app_proc.X``); None: fork+exec it."""
        from launch import forkserver as fs

        if not role.startswith("app:") or FORKSERVER not in self.m.procs:
            return None
        if command is not None:
            return fs.entry_point(command)
        if not module.startswith(fs.ENTRY_PACKAGE):
            return None
        return module, ["--tag", self.tag(role), *args]

    def fork(self, role: str, module: str, args: list[str], *, env: dict[str, str], cwd: str,
             uid: int | None, new_session: bool, stdio: tuple[int, int, int],
             grant: Callable[[int], None] | None) -> ForkedApp | None:
        """Have the run's fork server fork ``role`` (see :func:`launch.forkserver.fork_app`).

        None when the template cannot (dead, or its socket is not its own): the caller
        starts the app the slow way.  Then this says so once on stderr and, if the template
        is dead, re-makes it for the next apps (its stale socket file goes first)."""
        from launch import forkserver as fs

        entry = self.m.procs.get(FORKSERVER)
        if entry is None:
            return None
        try:
            return fs.fork_app(self.dir, entry.pid, lambda: entry.process() is not None,
                               module=module, args=args, env=env, cwd=cwd, uid=uid,
                               new_session=new_session, stdio=stdio, grant=grant)
        except fs.TemplateGone as e:
            self._template_failed(entry, role, str(e))
        return None

    def _template_failed(self, entry: ProcEntry, role: str, why: str) -> None:
        """The fork server could not fork ``role``: say so once; if it is dead, re-make it
        for the next apps (its stale socket file goes first)."""
        from launch import forkserver as fs

        dead = entry.process() is None
        remade = ""
        if dead:
            _reap(entry.pid)
            fs.socket_path(self.dir).unlink(missing_ok=True)
            self.m.procs.pop(FORKSERVER, None)
            spec = entry.spec
            try:
                if spec is not None:
                    e2 = self.spawn(FORKSERVER, spec.module, spec.args, detach=spec.detach)
                    remade = f"; a new fork server (pid {e2.pid}) serves the next ones"
            except ZcrxError as err:
                remade = f"; could not start a new one: {err}"
            self.save()
        if self.run_id not in _SAID_SLOW:
            _SAID_SLOW.add(self.run_id)
            print(f"zcrx: {why}: {role} starts the slow way (a new interpreter){remade}",
                  file=sys.stderr, flush=True)

    def spawn_apps(self, starts: list[AppStart]) -> list[ProcEntry]:
        """Start several apps at once, as :meth:`spawn` with ``wait=False`` each (wait
        with :meth:`wait_started`), but in one go: the fork server forks them all before
        any is waited for, their CAP_NET_ADMIN grants reach the kernel in one pipelined
        batch, and the manifest is written once.  Starting 64 servers one by one waited
        for the template and the kernel 128 times (25 ms a server on two busy cores).
        Apps that are not our entry points, or a run without a working fork server,
        start one by one the usual way.  All or nothing on the fork server's path: if one
        fails, none of the batch runs and the error is raised."""
        from launch import forkserver as fs

        def one_by_one() -> list[ProcEntry]:
            return [self.spawn(a.role, a.module, a.args, detach=a.detach, notify=a.notify,
                               ready_timeout=a.ready_timeout, cap_net_admin=a.cap_net_admin,
                               wait=False) for a in starts]

        entry = self.m.procs.get(FORKSERVER)
        if entry is None or any(not a.role.startswith("app:") or
                                not a.module.startswith(fs.ENTRY_PACKAGE) for a in starts):
            return one_by_one()
        prepared = [self._prepare(a.role, a.notify) for a in starts]
        with contextlib.ExitStack() as files:
            null = files.enter_context(open(os.devnull, "rb"))
            reqs: list[dict[str, Any]] = []
            for a, (env, log_path, _) in zip(starts, prepared, strict=True):
                log = files.enter_context(open(log_path, "ab"))
                reqs.append({"module": a.module, "args": ["--tag", self.tag(a.role), *a.args],
                             "env": env, "cwd": str(self.dir), "uid": self.app_uid(a.role),
                             "new_session": a.detach,
                             "stdio": (null.fileno(), log.fileno(), log.fileno()),
                             "hold": a.cap_net_admin})
            try:
                apps = fs.fork_apps(self.dir, entry.pid, lambda: entry.process() is not None,
                                    reqs, self.grant_caps)
            except fs.TemplateGone as e:
                self._template_failed(entry, starts[0].role, str(e))
                apps = None
        if apps is None:
            return one_by_one()
        out: list[ProcEntry] = []
        for a, app, req, (_, log_path, notify_path) in zip(starts, apps, reqs, prepared,
                                                           strict=True):
            pe = ProcEntry(role=a.role, pid=app.pid, start_ticks=start_ticks(app.pid),
                           argv=[sys.executable, "-m", a.module, *req["args"]],
                           log=str(log_path),
                           spec=RoleSpec(module=a.module, args=list(a.args), detach=a.detach,
                                         notify=a.notify, ready_timeout=a.ready_timeout,
                                         cap_net_admin=a.cap_net_admin, uid=req["uid"]))
            self.m.procs[a.role] = pe
            self._starting[a.role] = (app, None, notify_path if a.notify else None,
                                      a.ready_timeout)
            out.append(pe)
        self.save()
        return out

    def grant_caps(self, pids: list[int]) -> None:
        """Tell the kernel that processes ``pids`` (apps we started) have CAP_NET_ADMIN, in
        one pipelined round trip; the first refusal is raised."""
        import shared.syscalls  # noqa: F401  (registers cap_grant)

        with ControlClient(self.endpoint("kernel"), timeout_ms=10_000) as kernel:
            all_ok(kernel.call_many([("cap_grant", {"pid": p}) for p in pids]))

    def respawn(self, role: str) -> ProcEntry:
        """Start ``role`` again from the spec it was recorded with (a dead NIC or kernel
        under ``zcrx up --foreground --restart``).  Misuse ENOENT if there is no such role
        or it has no recorded spec."""
        entry = self.m.procs.get(role)
        if entry is None or entry.spec is None:
            raise Misuse(f"run {self.m.name} has no recorded spec for {role}", errno=2)
        s = entry.spec
        self.m.procs.pop(role)
        return self.spawn(role, s.module, s.args, detach=s.detach, ready=s.ready,
                          notify=s.notify, ready_timeout=s.ready_timeout, command=s.command,
                          cwd=s.cwd, cap_net_admin=s.cap_net_admin)

    def _wait_notify(self, proc: subprocess.Popen[bytes] | ForkedApp, role: str, path: Path,
                     timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if proc.poll() is not None:
                raise PeerGone(f"{role} exited with code {proc.returncode} before it was "
                               f"ready; see {self.m.procs[role].log}")
            if time.monotonic() > deadline:
                raise Timeout(f"{role} did not say it was ready in {timeout:.0f} s; "
                              f"see {self.m.procs[role].log}")
            time.sleep(0.01)

    def _wait_ready(self, proc: subprocess.Popen[bytes] | ForkedApp, role: str,
                    endpoint_name: str,
                    timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with ControlClient(self.endpoint(endpoint_name), timeout_ms=200) as client:
            while True:
                if proc.poll() is not None:
                    raise PeerGone(f"{role} exited with code {proc.returncode} during start; "
                                   f"see {self.m.procs[role].log}")
                try:
                    client.ping()
                    return
                except Timeout:
                    if time.monotonic() > deadline:
                        raise Timeout(f"{role} did not become ready in {timeout:.0f} s; "
                                      f"see {self.m.procs[role].log}") from None

    def stop(self, role: str, timeout: float = 5.0) -> bool:
        """TERM, wait, KILL.  Returns True if the process had to be killed."""
        entry = self.m.procs.get(role)
        if entry is None:
            return False
        killed = _terminate(entry, timeout)
        _reap(entry.pid)
        self.m.procs.pop(role, None)
        self.save()
        return killed

    def record_launcher(self) -> ProcEntry:
        """Record this process (a foreground ``zcrx up``) as the run's ``launcher``."""
        me = os.getpid()
        entry = ProcEntry(role=LAUNCHER, pid=me, start_ticks=start_ticks(me),
                          argv=list(sys.argv), log="")
        self.m.procs[LAUNCHER] = entry
        self.save()
        return entry

    def app_roles(self) -> list[str]:
        """``app:N`` roles of the manifest, by N."""
        apps = [r for r in self.m.procs if r.startswith("app:")]
        return sorted(apps, key=lambda r: int(r.partition(":")[2]))

    def next_app_role(self) -> str:
        n = 0
        while f"app:{n}" in self.m.procs:
            n += 1
        return f"app:{n}"

    def signal(self, role: str, signame: str, timeout: float = 5.0) -> ProcEntry:
        """Send ``signame`` (KILL, TERM, STOP, CONT) to ``role``'s process.

        The entry stays in the manifest (so ``zcrx app list`` shows it dead).  After KILL
        this waits until the process is gone.  Misuse ENOENT if the run has no such role,
        ESRCH if its process is not running.
        """
        entry = self.m.procs.get(role)
        if entry is None:
            have = ", ".join(self.m.procs) or "none"
            raise Misuse(f"run {self.m.name} has no {role} (roles: {have})", errno=2)
        p = entry.process()
        if p is None:
            _reap(entry.pid)
            raise Misuse(f"{role} (pid {entry.pid}) is not running", errno=3)
        try:
            p.send_signal(SIGNALS[signame])
        except psutil.Error as e:
            raise Misuse(f"{role} (pid {entry.pid}): {e}", errno=3) from None
        if signame == "KILL" and not _wait_gone(entry, timeout):
            raise Timeout(f"{role} (pid {entry.pid}) survived SIGKILL for {timeout:.0f} s")
        return entry

    def down(self, timeout: float = 5.0) -> dict[str, Any]:
        """Stop every process (apps first, then kernel, then NIC) and remove the run.

        A recorded ``launcher`` (a foreground ``zcrx up``) other than ourselves is asked
        to stop first (SIGTERM): it may be supervising with ``--restart`` and would
        otherwise bring back the roles we stop.  It brings the run down itself; we
        then finish whatever is left.
        """
        launcher = self.m.procs.pop(LAUNCHER, None)
        if launcher is not None and launcher.pid != os.getpid():
            _terminate(launcher, timeout)
            if not self.dir.exists():  # the launcher brought the run down itself
                for e in self.m.procs.values():
                    _wait_gone(e, timeout)  # reaps those that are children of ours
                return {"stopped": [LAUNCHER, *self.m.procs], "killed": [],
                        "segments_removed": remove_run_segments(self.run_id)}
        # The fork server first (it forks nothing more), then the apps, kernel, NIC.
        order = [r for r in self.m.procs if r == FORKSERVER]
        order += [r for r in self.m.procs if r not in (*ROLE_ORDER, FORKSERVER)]
        order += [r for r in reversed(ROLE_ORDER) if r in self.m.procs]
        killed = [r for r in order if self.stop(r, timeout)]
        removed = remove_run_segments(self.run_id)
        net = teardown_ports([self.run_id]) if self.m.config.get("netns") else []
        shutil.rmtree(self.dir, ignore_errors=True)
        return {"stopped": order, "killed": killed, "segments_removed": removed,
                "net_removed": net}


def _reap(pid: int) -> bool | None:
    """Collect the exit status of a child of ours that already exited (no zombie).

    True if it was reaped now, False if it is a child of ours still running, None if it is
    not (or no longer) a child of ours.
    """
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        return None
    return done == pid


def _wait_gone(entry: ProcEntry, timeout: float) -> bool:
    """Wait until the process has exited; True if it did within ``timeout``.

    A zombie counts as exited: a detached process's new parent (init) may take seconds to
    reap it, and a child of ours is reaped here.
    """
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        # A child of ours is gone once reaped; anyone else's once it is a zombie or gone.
        reaped = _reap(entry.pid)
        if reaped or (reaped is None and entry.process() is None):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def _terminate(entry: ProcEntry, timeout: float) -> bool:
    """TERM, wait up to ``timeout``, KILL.  True if it had to be killed."""
    p = entry.process()
    if p is None:
        _reap(entry.pid)
        return False
    with contextlib.suppress(psutil.Error):
        p.send_signal(signal.SIGTERM)
    if _wait_gone(entry, timeout):
        return False
    with contextlib.suppress(psutil.Error):
        p.kill()
    _wait_gone(entry, timeout)
    return True


def tagged_processes(run_id: str) -> list[psutil.Process]:
    """Processes that carry this run's tag, in their argv (our roles) or in ``$ZCRX_TAG``
    (any program run with ``zcrx app run -- COMMAND``): the fallback when a manifest is lost.
    A shell that merely imported ``zcrx env`` carries no tag and is never matched."""
    needle = f"zcrx:{run_id}:"

    def tagged(cmd: list[str], env: dict[str, str]) -> bool:
        return any(needle in a for a in cmd) or env.get(TAG_ENV, "").startswith(needle)

    found, blank = [], []
    for p in psutil.process_iter(["cmdline", "ppid"]):
        if p.pid == os.getpid():
            continue
        try:
            cmd = p.info["cmdline"] or []
            env = p.environ()
        except psutil.Error:
            continue
        if tagged(cmd, env):
            found.append(p)
        elif not cmd and not env and p.pid != 2 and p.info["ppid"] not in (0, 2):
            blank.append(p)  # not a kernel thread: caught inside execve, look again
    for _ in range(10):  # exec sets up argv and environ after the parent saw it succeed
        if not blank:
            break
        time.sleep(0.01)
        again = []
        for p in blank:
            try:
                cmd, env = p.cmdline(), p.environ()
            except psutil.Error:
                continue
            if tagged(cmd, env):
                found.append(p)
            elif not cmd and not env:
                again.append(p)
        blank = again
    return found


def cleanup(name: str) -> dict[str, Any]:
    """Remove every process, segment and file of a run.  Idempotent."""
    check_name(name)
    rundir = runs_dir() / name
    run_ids: set[str] = set()
    killed: list[int] = []
    try:
        m = Manifest.from_json((rundir / MANIFEST).read_text())
        run_ids.add(m.run_id)
        for entry in m.procs.values():
            if entry.process() is not None:
                _terminate(entry, 2.0)
                killed.append(entry.pid)
    except (FileNotFoundError, ValueError, TypeError, KeyError):
        pass
    # Fallback: a run whose manifest is gone still has its tag on processes and
    # its id prefix on segments.
    for rid in list(run_ids) or []:
        for p in tagged_processes(rid):
            with contextlib.suppress(psutil.Error):
                p.kill()
                killed.append(p.pid)
    removed: list[str] = []
    for rid in run_ids:
        removed += remove_run_segments(rid)
    net = teardown_ports(run_ids)
    shutil.rmtree(rundir, ignore_errors=True)
    return {"name": name, "run_ids": sorted(run_ids), "killed": killed,
            "segments_removed": removed, "net_removed": net}


def list_runs() -> list[str]:
    base = runs_dir()
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if (p / MANIFEST).exists())


def orphan_run_ids() -> list[str]:
    """Run ids with shm segments but no run directory (their manifest is lost)."""
    from shared.shm import list_all_runs

    known = set()
    for name in list_runs():
        with contextlib.suppress(ZcrxError):
            known.add(Run.open(name).run_id)
    return [r for r in list_all_runs() if r not in known]


def cleanup_run_id(run_id: str) -> dict[str, Any]:
    """Clean a run known only by its id (segments and tagged processes)."""
    killed = []
    for p in tagged_processes(run_id):
        with contextlib.suppress(psutil.Error):
            p.kill()
            killed.append(p.pid)
    return {"run_ids": [run_id], "killed": killed,
            "segments_removed": remove_run_segments(run_id),
            "net_removed": teardown_ports([run_id]),
            "left": list_run_segments(run_id)}


def orphan_netns_run_ids() -> list[str]:
    """Run ids of peer network namespaces (``port=tap``) whose run is gone: no run of ours
    knows it and no process carries its tag (a run under another runs directory is alive)."""
    from launch.port import list_netns, run_id_of

    known = set()
    for name in list_runs():
        with contextlib.suppress(ZcrxError):
            known.add(Run.open(name).run_id)
    return [rid for rid in map(run_id_of, list_netns())
            if rid not in known and not tagged_processes(rid)]


def teardown_ports(run_ids: Any) -> list[str]:
    """Delete the runs' peer namespaces and TAP devices (:mod:`launch.port`)."""
    from launch.port import teardown

    return teardown(list(run_ids))
