"""The fork server: a per-run template process that apps are forked from (fast app start).

Starting an app the ordinary way costs a new interpreter importing numpy, zmq and the app
library (~0.45 s).  :func:`launch.supervise.bring_up` therefore starts, beside NIC and
kernel, the role ``forkserver``: ``python -m launch.forkserver``, which imports that code
once (:data:`PRELOAD`), creates no zmq context or socket (zmq is not fork-safe), and
listens on ``<rundir>/fork.sock`` (mode 0600).  The launcher (:meth:`launch.run.Run.spawn`,
a foreground ``zcrx app run``) asks it over that socket to fork an app that is one of our
entry points (a module under ``app_proc``); any other program keeps the fork+exec path.

One request, one connection (``SOCK_SEQPACKET``, one JSON object a message):

* launcher -> template: ``{"op": "spawn", "module", "args", "env", "cwd", "uid",
  "new_session", "hold"}`` with stdin, stdout, stderr (and, with ``hold``, the read end of
  the "go" pipe) as ``SCM_RIGHTS``;
* template -> launcher: ``{"pid": P}`` once forked (or ``{"error", "errno"}``), later
  ``{"exit": code}`` when the template reaped it (``-N`` for death by signal N), if the
  launcher still listens.  ``{"op": "stats"}`` answers the template's counters.

The child sets up what exec would have: its stdio, environment, cwd, session, uid/gid
(:func:`launch.run.popen_app`'s rules), waits with ``hold`` until the launcher writes "1"
to the go pipe (after ``cap_grant``: the capability is there before the app runs; EOF
instead means "die", exit 126), reseeds numpy's global generator, runs the module (a
preloaded one's ``main()``, any other as ``__main__``) and ``os._exit``\\ s with its
status.  It is its own process (pid, pidfd, mm, regions); the kernel still learns who it is
from ``SO_PEERCRED``.

Who may ask: only peers whose ``SO_PEERCRED`` uid is the run's launcher uid; others are
refused and counted (``refused``).  The launcher checks the other way round that the socket
is served by the template the manifest records (its pid and uid), so nothing else squatting
on the path in a shared run directory gets an app's environment.

Ownership: the template owns its socket file (removed when it stops) and nothing in shared
memory; the apps it forks own theirs as any app does.  Its death is survivable: apps already
forked keep running (reparented), and the launcher starts the next app the slow way and
re-makes the template (:class:`TemplateGone`).
"""

from __future__ import annotations

import contextlib
import errno as E
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

ROLE = "forkserver"
#: The socket's name in the run directory (``fork.sock``).
SOCK_NAME = "fork"
#: What the template imports before it forks anything (the cost an app no longer pays).
PRELOAD = ("argparse", "hashlib", "json", "runpy", "shutil", "traceback", "secrets", "random",
           "numpy.random", "selectors", "socket", "struct", "tempfile", "contextlib",
           "numpy", "zmq", "psutil", "shared.abi", "shared.ring", "shared.shm", "shared.msg",
           "shared.control", "shared.pattern", "shared.syscalls", "shared.watch",
           "app_proc.syscall", "app_proc.liburing", "app_proc.server", "app_proc.verify",
           "app_proc.zcrx_server", "app_proc.copy_server", "app_proc.workers", "shared.bpf",
           "app_proc.iperf3")
#: Entry points the template runs: modules of ours under this package.
ENTRY_PACKAGE = "app_proc."
#: Largest request (the environment is the big part).
MAX_REQUEST = 1 << 20
#: Exit statuses kept for children nobody asked about yet.
KEEP_STATUSES = 4096
#: Exit code of a child told not to run (the launcher closed the go pipe: a failed grant).
NOT_GRANTED = 126
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def socket_path(rundir: str | Path) -> Path:
    return Path(rundir).absolute() / f"{SOCK_NAME}.sock"


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the other end, as the OS recorded it at connect."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
    return pid, uid, gid


def entry_point(command: list[str]) -> tuple[str, list[str]] | None:
    """``(module, args)`` when ``command`` is ``python -m app_proc.X ARGS`` run by our own
    interpreter (so forking it from the template is the same program); else None."""
    import shutil

    if len(command) < 3 or command[1] != "-m" or not command[2].startswith(ENTRY_PACKAGE):
        return None
    exe = shutil.which(command[0])
    if exe is None or os.path.abspath(exe) != os.path.abspath(sys.executable):
        return None
    return command[2], list(command[3:])


# --------------------------------------------------------------------------- launcher side


class TemplateGone(Exception):
    """The template does not answer (dead, not yet listening, or not ours): start the app
    the slow way.  No child was forked for the request."""


class ForkedApp:
    """An app forked by the template, as :class:`subprocess.Popen` is for an exec'd one:
    ``pid``, :meth:`poll`, :meth:`wait`, ``returncode``.

    The exit status comes over the request's connection; :meth:`close` stops listening
    (the template still reaps the child).  If the template dies first, the status is
    lost (the child was reparented): :meth:`poll` then says :data:`LOST_STATUS` once the
    process is gone.
    """

    LOST_STATUS = 255

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock: socket.socket | None = sock
        self.pid = pid
        self.returncode: int | None = None
        self.status_lost = False

    def _take(self, data: bytes) -> None:
        if not data:  # the template is gone: follow the process itself
            self.close()
            return
        with contextlib.suppress(ValueError):
            msg = json.loads(data)
            if "exit" in msg:
                self.returncode = int(msg["exit"])
                self.close()

    def _gone(self) -> bool:
        import psutil

        try:
            return psutil.Process(self.pid).status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if self.sock is not None:
            try:
                self._take(self.sock.recv(4096, socket.MSG_DONTWAIT))
            except BlockingIOError:
                return None
            except OSError:
                self.close()
        if self.returncode is None and self.sock is None and self._gone():
            self.returncode, self.status_lost = self.LOST_STATUS, True
        return self.returncode

    def wait(self) -> int:
        while self.returncode is None:
            if self.sock is not None:
                try:
                    self._take(self.sock.recv(4096))
                except OSError:
                    self.close()
            elif self.poll() is None:
                time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _connect(path: Path, pid: int, uid: int, alive: Any, timeout: float) -> socket.socket:
    """Connect to the template ``pid`` (run by ``uid``) at ``path``, waiting while it is
    alive but not listening yet (it imports while NIC and kernel start)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            if not alive():
                raise TemplateGone(f"the fork server (pid {pid}) is not running") from None
            if time.monotonic() > deadline:
                raise TemplateGone(f"the fork server (pid {pid}) is not listening after "
                                   f"{timeout:.0f} s: {e}") from None
            time.sleep(0.005)
            continue
        except OSError as e:
            sock.close()
            raise TemplateGone(f"cannot reach the fork server at {path}: {e}") from None
        got = peer_cred(sock)
        if got[0] != pid or got[1] != uid:
            sock.close()
            raise TemplateGone(f"{path} is served by pid {got[0]} uid {got[1]}, not by the "
                               f"run's fork server (pid {pid} uid {uid})")
        return sock


def _ask(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None
         ) -> dict[str, Any]:
    _send(sock, msg, fds)
    return _recv(sock)


def _send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(msg).encode()
    try:
        if fds:
            socket.send_fds(sock, [data], fds)
        else:
            sock.send(data)
    except OSError as e:
        raise TemplateGone(f"the fork server went away: {e}") from None


def _recv(sock: socket.socket) -> dict[str, Any]:
    try:
        reply = sock.recv(65536)
    except OSError as e:
        raise TemplateGone(f"the fork server went away: {e}") from None
    if not reply:
        raise TemplateGone("the fork server closed the connection")
    out: dict[str, Any] = json.loads(reply)
    return out


def stats(rundir: str | Path, pid: int, uid: int | None = None) -> dict[str, Any]:
    """The template's counters (``forked``, ``refused``, ``running``, ``reaped``)."""
    sock = _connect(socket_path(rundir), pid, os.geteuid() if uid is None else uid,
                    lambda: True, 0.0)
    try:
        return _ask(sock, {"op": "stats"})
    finally:
        sock.close()


def fork_app(rundir: str | Path, template_pid: int, alive: Any, *, module: str,
             args: list[str], env: dict[str, str], cwd: str, uid: int | None,
             new_session: bool, stdio: tuple[int, int, int],
             grant: Any = None, timeout: float = 30.0) -> ForkedApp:
    """Have the template fork ``python -m module args`` (see the module doc).

    ``alive()`` says whether the template process still runs (while its socket is not up
    yet); ``grant(pid)`` runs before the child may start, as with
    :func:`launch.run.popen_app`, and a failure there kills the child and is raised.
    Raises :class:`TemplateGone` when the template cannot fork it (start it the slow way);
    an error the template reports about the request itself is a :class:`Misuse`.
    """
    req = {"module": module, "args": list(args), "env": env, "cwd": cwd, "uid": uid,
           "new_session": new_session, "stdio": stdio, "hold": grant is not None}
    return fork_apps(rundir, template_pid, alive, [req],
                     None if grant is None else lambda pids: grant(pids[0]), timeout)[0]


def fork_apps(rundir: str | Path, template_pid: int, alive: Any,
              requests: list[dict[str, Any]], grant_many: Any = None,
              timeout: float = 30.0) -> list[ForkedApp]:
    """:func:`fork_app` of several apps at once: every request is sent before any reply is
    read (the template forks them one after the other meanwhile), ``grant_many(pids)``
    runs once for the apps whose request says ``hold``, then each of those may start.

    ``requests``: ``module``, ``args``, ``env``, ``cwd``, ``uid``, ``new_session``,
    ``stdio`` (three descriptors), ``hold``.  All or nothing: if any request fails (the
    template refuses one or goes away, or the grant fails), every child forked for the
    batch is stopped and reaped (a held one reads EOF and exits 126 without running) and
    the error is raised (:class:`TemplateGone`, :class:`Misuse`, the grant's)."""
    from shared.errors import Misuse

    path = socket_path(rundir)
    socks: list[socket.socket] = []  # one per request sent
    gos: list[int] = []  # the write end of each held child's "go" pipe, else -1
    apps: list[ForkedApp] = []
    held: list[int] = []  # pids of the apps that wait for their grant
    done = False
    try:
        failure: Exception | None = None
        for r in requests:
            try:
                sock = _connect(path, template_pid, os.geteuid(), alive, timeout)
            except TemplateGone as e:
                failure = e
                break
            socks.append(sock)
            fds = list(r["stdio"])
            go_r = go_w = -1
            if r["hold"]:
                go_r, go_w = os.pipe()
                fds.append(go_r)
            gos.append(go_w)
            try:
                _send(sock, {"op": "spawn", "module": r["module"], "args": r["args"],
                             "env": r["env"], "cwd": r["cwd"], "uid": r["uid"],
                             "new_session": r["new_session"], "hold": r["hold"]}, fds)
            except TemplateGone as e:  # not sent: nothing to wait for on this one
                socks.pop().close()
                if gos.pop() >= 0:
                    os.close(go_w)
                failure = e
                break
            finally:
                if go_r >= 0:
                    os.close(go_r)
        for sock, go in zip(socks, gos, strict=True):  # every request sent gets its answer,
            try:                                       # so a child forked is never lost
                reply = _recv(sock)
            except TemplateGone as e:
                failure = failure or e
                continue
            if "error" in reply:
                failure = failure or Misuse(f"fork server: {reply['error']}",
                                            errno=int(reply.get("errno", 5)))
                continue
            apps.append(ForkedApp(sock, int(reply["pid"])))
            if go >= 0:
                held.append(apps[-1].pid)
        if failure is not None:
            raise failure
        if grant_many is not None and held:
            grant_many(held)
        for go in gos:
            if go >= 0:
                os.write(go, b"1")
        done = True
        return apps
    finally:
        for go in gos:
            if go >= 0:
                os.close(go)  # a held child not told "1" reads EOF: exits, running nothing
        owned = {id(a.sock) for a in apps}
        for sock in socks:
            if id(sock) not in owned:
                sock.close()
        if not done:
            for a in apps:
                if a.pid not in held:
                    a.kill()
                a.wait()


# --------------------------------------------------------------------------- the template


class Template:
    """The template's loop: accept requests from the launcher's uid, fork, reap."""

    def __init__(self, rundir: str, launcher_uid: int, log: Any) -> None:
        self.path = socket_path(rundir)
        self.launcher_uid = launcher_uid
        self.log = log
        self.sel = selectors.DefaultSelector()
        self.counters = {"forked": 0, "refused": 0, "reaped": 0, "bad_requests": 0}
        self.children: dict[int, int] = {}  # pid -> pidfd
        self.waiters: dict[int, socket.socket] = {}  # pid -> connection asking its exit
        self.statuses: dict[int, int] = {}
        self.conns: dict[int, socket.socket] = {}
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a dead predecessor's (the launcher checks who serves)
        old = os.umask(0o177)
        try:
            self.listener.bind(str(self.path))  # born 0600: only the launcher's uid
        finally:
            os.umask(old)
        self.ino = os.stat(self.path).st_ino
        self.listener.listen(64)
        self.sel.register(self.listener, selectors.EVENT_READ, ("listen", None))

    def close(self) -> None:
        """Stop serving: remove the socket; children keep running (``zcrx down`` stops
        them through the manifest)."""
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.ino:  # ours, not a successor's
                self.path.unlink()
        self.listener.close()
        for c in self.conns.values():
            c.close()
        for fd in self.children.values():
            os.close(fd)

    def serve(self, stopping: Any) -> None:
        while not stopping():
            for key, _ in self.sel.select(0.2):
                kind, obj = key.data
                if kind == "listen":
                    self._accept()
                elif kind == "conn":
                    self._request(obj)
                else:
                    self._reap(obj)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        pid, uid, _gid = peer_cred(conn)
        if uid != self.launcher_uid:
            self.counters["refused"] += 1
            self.log(f"refused pid {pid} uid {uid}: only the launcher's uid "
                     f"{self.launcher_uid} may ask")
            with contextlib.suppress(OSError):
                conn.send(json.dumps({"error": "only the run's launcher may use the fork "
                                               "server", "errno": E.EPERM}).encode())
                # No more from it; what it already sent is dropped here, since closing over
                # unread data would reset the connection before it reads why.
                conn.shutdown(socket.SHUT_RDWR)
                while conn.recv(MAX_REQUEST, socket.MSG_DONTWAIT):
                    pass
            conn.close()
            return
        self.conns[conn.fileno()] = conn
        self.sel.register(conn, selectors.EVENT_READ, ("conn", conn))

    def _drop(self, conn: socket.socket) -> None:
        self.sel.unregister(conn)
        self.conns.pop(conn.fileno(), None)
        for pid in [p for p, c in self.waiters.items() if c is conn]:
            del self.waiters[pid]
        conn.close()

    def _reply(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        try:
            conn.send(json.dumps(msg).encode())
        except OSError:
            self._drop(conn)

    def _request(self, conn: socket.socket) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 8)
        except OSError:
            data, fds = b"", []
        if not data:
            for fd in fds:
                os.close(fd)
            self._drop(conn)
            return
        try:
            req = json.loads(data)
            op = req.get("op")
            if op == "stats":
                self._reply(conn, {**self.counters, "running": len(self.children)})
            elif op == "spawn":
                self._spawn(conn, req, fds)
            else:
                raise ValueError(f"unknown op {op!r}")
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            self.counters["bad_requests"] += 1
            self._reply(conn, {"error": f"bad request: {e}", "errno": E.EINVAL})
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _spawn(self, conn: socket.socket, req: dict[str, Any], fds: list[int]) -> None:
        import importlib.util

        module = str(req["module"])
        args = [str(a) for a in req["args"]]
        env = {str(k): str(v) for k, v in dict(req["env"]).items()}
        cwd = str(req["cwd"])
        uid = None if req.get("uid") is None else int(req["uid"])
        hold = bool(req.get("hold"))
        if len(fds) != 3 + hold:
            raise ValueError(f"{len(fds)} descriptors, want {3 + hold}")
        if not module.startswith(ENTRY_PACKAGE) or importlib.util.find_spec(module) is None:
            self._reply(conn, {"error": f"{module}: not an entry point of ours",
                               "errno": E.ENOENT})
            return
        if not os.path.isdir(cwd):
            self._reply(conn, {"error": f"{cwd}: no such directory", "errno": E.ENOENT})
            return
        for f in (sys.stdout, sys.stderr):
            f.flush()
        pid = os.fork()
        if pid == 0:
            _child(module, args, env, cwd, uid, bool(req.get("new_session")), fds[:3],
                   fds[3] if hold else -1)  # never returns
        self.counters["forked"] += 1
        pidfd = os.pidfd_open(pid)
        self.children[pid] = pidfd
        self.sel.register(pidfd, selectors.EVENT_READ, ("child", pid))
        self.waiters[pid] = conn
        self._reply(conn, {"pid": pid})

    def _reap(self, pid: int) -> None:
        fd = self.children.pop(pid)
        self.sel.unregister(fd)
        os.close(fd)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return
        code = os.waitstatus_to_exitcode(status)
        self.counters["reaped"] += 1
        self.statuses[pid] = code
        while len(self.statuses) > KEEP_STATUSES:
            del self.statuses[next(iter(self.statuses))]
        conn = self.waiters.pop(pid, None)
        if conn is not None:
            self._reply(conn, {"exit": code})


def _stdio(fd: int, write: bool, unbuffered: bool) -> Any:
    """A fresh ``sys.std*`` over ``fd``, as a new interpreter would make it."""
    import io

    if not write:
        return io.TextIOWrapper(open(fd, "rb", closefd=False), line_buffering=False)
    tty = os.isatty(fd)
    raw = open(fd, "wb", buffering=0 if unbuffered else -1, closefd=False)  # noqa: SIM115
    return io.TextIOWrapper(raw, line_buffering=tty, write_through=unbuffered,
                            errors="backslashreplace" if fd == 2 else "strict")


def _prctl(option: int, arg: int | bytes) -> None:
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)


def _child(module: str, args: list[str], env: dict[str, str], cwd: str, uid: int | None,
           new_session: bool, stdio: list[int], go: int) -> None:
    """In the forked child: become the app, run it, exit with its status.  Never returns."""
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if new_session:
            os.setsid()
        for i, fd in enumerate(stdio):
            os.dup2(fd, i)
        # Everything else the template holds (listener, connections, pidfds, epoll) is not
        # the app's; their objects stay referenced in the template's frames, so nothing
        # closes these numbers again once the app reuses them.
        top = os.sysconf("SC_OPEN_MAX")
        if go >= 0:
            os.closerange(3, go)
            os.closerange(go + 1, top)
        else:
            os.closerange(3, top)
        os.chdir(cwd)
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            _prctl(4, 1)  # PR_SET_DUMPABLE, as exec would reset it: ps and py-spy work
        if go >= 0:
            ok = os.read(go, 1) == b"1"
            os.close(go)
            if not ok:
                os._exit(NOT_GRANTED)
        os.environ.clear()
        os.environ.update(env)
        unbuffered = bool(env.get("PYTHONUNBUFFERED"))
        sys.stdin = _stdio(0, False, unbuffered)
        sys.stdout = _stdio(1, True, unbuffered)
        sys.stderr = _stdio(2, True, unbuffered)
        import logging

        for lg in (logging.getLogger(), logging.getLogger(ROLE)):
            for h in list(lg.handlers):
                lg.removeHandler(h)
        if "numpy" in sys.modules:  # Python's random reseeds itself at fork; numpy's not
            sys.modules["numpy"].random.seed()
        _prctl(15, module.rpartition(".")[2].encode()[:15])  # PR_SET_NAME: ps shows it
        sys.path[0] = cwd  # python -m puts the working directory first
        sys.argv = [module, *args]
        code = _run(module)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        _exit(code)


def _run(module: str) -> int:
    """Run ``module`` with the interpreter's exit rules: a module the template preloaded
    that has a ``main()`` (its ``if __name__ == "__main__": sys.exit(main())``) gets that
    called, its body having run once in the template (dataclasses and all, ~3 ms an app);
    any other runs afresh as ``__main__``."""
    import runpy
    import traceback

    try:
        entry = getattr(sys.modules.get(module), "main", None) if module in PRELOAD else None
        if callable(entry):
            sys.exit(entry())
        sys.modules.pop(module, None)
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as e:
        if e.code is None:
            return 0
        if isinstance(e.code, int):
            return e.code
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        return 1


def _exit(code: int) -> None:
    """What the interpreter does at exit (threads, atexit, flush), then ``os._exit``."""
    import atexit
    import threading

    with contextlib.suppress(BaseException):
        threading._shutdown()  # type: ignore[attr-defined]
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            f.flush()
    if code < 0:  # died of a signal: die of it again, as the interpreter does for SIGINT
        with contextlib.suppress(BaseException):
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code & 0xFF)


class _Stop(Exception):
    pass


def _on_stop(signum: int, _frame: Any) -> None:
    # Raised wherever the template is (importing, or waiting in select): it holds nothing
    # that needs more than closing its socket, so it stops at once, not at the next tick.
    raise _Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    from shared.proc import base_parser

    signal.signal(signal.SIGTERM, _on_stop)
    signal.signal(signal.SIGINT, _on_stop)
    parent = os.getppid()
    p = base_parser("forkserver", "The run's fork server: apps are forked from it.")
    p.add_argument("--launcher-uid", type=int, default=os.geteuid(),
                   help="only peers with this uid may ask (default: ours)")
    try:
        a = p.parse_args(argv)
        return _main(a, parent)
    except _Stop:
        return 0


def _main(a: Any, parent: int) -> int:

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} forkserver[{os.getpid()}] {msg}", file=sys.stderr,
              flush=True)

    # One thread, fork-safe: BLAS pools would be threads the children do not get.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    t0 = time.monotonic()
    import importlib

    for mod in PRELOAD:
        importlib.import_module(mod)
    import zmq

    if getattr(zmq.Context, "_instance", None) is not None:
        log("a zmq context exists before any fork: refusing to serve")
        return 1
    import gc

    gc.collect()
    gc.freeze()
    tpl = Template(a.rundir, a.launcher_uid, log)
    log(f"serving {tpl.path} for uid {a.launcher_uid}; preloaded {len(PRELOAD)} modules in "
        f"{time.monotonic() - t0:.2f} s")
    why = "parent exited"
    try:
        # Like every role, it exits with the process that started it unless --detached.
        tpl.serve(lambda: not a.detached and os.getppid() != parent)
    except _Stop as e:
        why = str(e)
    finally:
        tpl.close()
        log(f"stopped ({why}): {tpl.counters}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
