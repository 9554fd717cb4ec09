"""The control plane's transport: request/reply and one-way events over ZeroMQ sockets.

ZeroMQ carries control only (setup "syscalls", configuration, wake-ups, death notices, stats);
no payload ever crosses it (DESIGN.md §1, §4).  This module moves messages and nothing else: what
a message is, its schema and its codec (and the errnos a malformed one gets) are
:mod:`shared.msg`'s; it knows no io_uring semantics.  Other modules declare their messages with
:func:`shared.msg.register_type` and serve them with handlers on a :class:`ControlServer`.

Sockets
-------
* :class:`ControlServer`: one ROUTER socket (bind, LINGER 0).  :meth:`ControlServer.poll_once`
  receives one request, validates it, dispatches it to a handler and replies.  Malformed input is
  answered with an ``error`` reply carrying the errno :func:`shared.msg.decode` gave (with the
  request id when it can be read, else id 0) and counted in :attr:`ControlServer.stats`; it
  never raises.  The socket is exposed as ``.socket`` so a process can poll it together with
  anything else.
* Who is calling: over ``ipc://`` the OS tells the server the peer's credentials (libzmq reads
  ``SO_PEERCRED`` when the connection is accepted and reports it as the ``Peer-Address``
  property of every message, ``<host>:<uid>:<gid>:<pid>``).  Handlers get the routing identity
  as a :class:`Peer`, a ``bytes`` that also carries that :class:`PeerCred` (``peer.cred``;
  None over inproc:// or tcp://, where the OS says nothing).  No field of a message can change
  it, so a server decides who may do what from ``peer.cred``, never from the body.  A server
  may also refuse whole peers (:class:`ControlServer` ``admit``): they get EPERM.
* :class:`ControlClient`: one DEALER socket (LINGER 0), one request (or one pipelined batch,
  :meth:`ControlClient.request_many`) in flight at a time.
  Replies are matched by id; anything else is a stale reply and is discarded.  After a timeout
  the socket is closed and recreated ("lazy pirate"): the unsent request is dropped by LINGER 0
  instead of being delivered to a server that appears later.  A timeout means *outcome unknown*:
  the server may have executed the request.
* End of stream is explicit: :meth:`ControlClient.end_stream` sends ``eos`` and waits for its
  ack; the server refuses later requests from that peer with EPIPE.  (A measurement found
  PUSH/PULL losing tail messages at close even with LINGER set; nothing that must arrive relies
  on linger.)
* :class:`EventSender` / :class:`EventReceiver`: a one-way PUSH/PULL channel for best-effort
  notices (wake-ups).  Events can be dropped (full queue, close); use them only for hints whose
  loss the receiver recovers from by itself, e.g. a wake-up followed by a ring re-check.

None of these classes is thread-safe; each belongs to one thread at a time.
"""

from __future__ import annotations

import errno as E
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import zmq

from shared.errors import Misuse, Timeout, ZcrxError
from shared.msg import (
    MAX_ERRNO,
    MAX_MESSAGE_BYTES,
    MAX_REPLY_HEADER_BYTES,
    PROTOCOL_VERSION,
    REGISTRY,
    U64_MAX,
    BadMessage,
    ControlError,
    Message,
    Registry,
    SchemaError,
    decode,
    encode,
    error_frames,
)

__all__ = [
    "DEFAULT_TIMEOUT_MS",
    "DEFER",
    "ControlClient",
    "ControlServer",
    "EventReceiver",
    "EventSender",
    "Handler",
    "HandlerResult",
    "Peer",
    "PeerCred",
    "Reply",
    "ServerStats",
    "ipc_endpoint",
]

log = logging.getLogger("zcrx.control")

SOCKET_MAXMSGSIZE: Final = 4 * MAX_MESSAGE_BYTES
"""libzmq drops the connection of a peer that sends a single frame larger than this, so a peer
cannot make us buffer gigabytes; below it, oversize messages get an EMSGSIZE reply."""
DEFAULT_TIMEOUT_MS: Final = 5000

_ENDPOINT_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
_SUN_PATH_MAX: Final = 107  # sizeof(sockaddr_un.sun_path) - 1 for the NUL
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


# --------------------------------------------------------------------------- endpoints


def ipc_endpoint(run_dir: Path | str, name: str) -> str:
    """The ``ipc://`` endpoint of socket ``name`` in ``run_dir``: ``<run_dir>/<name>.sock``.

    The path is made absolute (processes may run in other directories).  Raises
    :class:`Misuse`: EINVAL for a name that is not ``[A-Za-z0-9_][A-Za-z0-9_.-]*``,
    ENAMETOOLONG when the path exceeds the 107 bytes a unix socket address can hold.
    """
    if not _ENDPOINT_NAME_RE.match(name):
        raise Misuse(f"bad endpoint name {name!r}: use letters, digits, '_', '.', '-'")
    path = Path(run_dir).absolute() / f"{name}.sock"
    size = len(os.fsencode(path))
    if size > _SUN_PATH_MAX:
        raise Misuse(f"ipc socket path is {size} bytes, more than the {_SUN_PATH_MAX} a unix "
                     f"socket address holds: {path} (use a shorter run directory)",
                     E.ENAMETOOLONG)
    return f"ipc://{path}"


def _check_bind_endpoint(endpoint: str) -> None:
    if endpoint.startswith(("ipc://", "inproc://")):
        return
    if endpoint.startswith("tcp://"):
        host = endpoint[len("tcp://"):].rsplit(":", 1)[0]
        if host in _LOOPBACK_HOSTS:
            return
        raise Misuse(f"control endpoint {endpoint!r} must bind to loopback, not {host!r}")
    raise Misuse(f"control endpoint {endpoint!r}: use ipc://, tcp://127.0.0.1:<port> or "
                 f"inproc://")


def _new_socket(ctx: zmq.Context[zmq.Socket[bytes]], kind: int) -> zmq.Socket[bytes]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, SOCKET_MAXMSGSIZE)
    return sock


def _context(ctx: zmq.Context[Any] | None) -> zmq.Context[Any]:
    return zmq.Context.instance() if ctx is None else ctx


# --------------------------------------------------------------------------- peers


@dataclass(frozen=True)
class PeerCred:
    """What the OS says about the process at the other end of a unix socket (SO_PEERCRED):
    the process that connected, its effective uid and gid at ``connect()`` time."""

    pid: int
    uid: int
    gid: int

    @classmethod
    def from_peer_address(cls, text: str | None) -> PeerCred | None:
        """Parse libzmq's ``Peer-Address`` of an ipc connection (``host:uid:gid:pid``);
        None for anything else (a tcp peer's address, inproc, a missing property)."""
        if not text:
            return None
        parts = text.rsplit(":", 3)
        if len(parts) != 4:
            return None
        try:
            uid, gid, pid = int(parts[1]), int(parts[2]), int(parts[3])
        except ValueError:
            return None
        if pid <= 0 or uid < 0 or gid < 0:
            return None
        return cls(pid=pid, uid=uid, gid=gid)


class Peer(bytes):
    """A caller's routing identity (the bytes zmq routes replies by), plus ``cred``: what the
    OS said about the connection the request came over (None when it said nothing).

    Equal to and hashed as its bytes, so state keyed by routing identity keeps working."""

    cred: PeerCred | None

    def __new__(cls, identity: bytes, cred: PeerCred | None = None) -> Peer:
        self = super().__new__(cls, identity)
        self.cred = cred
        return self


def peer_cred(peer: bytes) -> PeerCred | None:
    """The OS credentials carried by ``peer`` (a :class:`Peer`), else None."""
    return peer.cred if isinstance(peer, Peer) else None


def _frame_cred(frame: zmq.Frame) -> PeerCred | None:
    try:
        text = frame.get("Peer-Address")
    except (zmq.ZMQError, UnicodeDecodeError):
        return None
    return PeerCred.from_peer_address(text if isinstance(text, str) else None)


# --------------------------------------------------------------------------- server


@dataclass(frozen=True)
class Reply:
    """What a handler returns for an ``ok`` reply with blobs (a plain dict means body only)."""

    body: Mapping[str, Any] = field(default_factory=dict)
    blobs: Sequence[bytes] = ()


class _Defer:
    def __repr__(self) -> str:
        return "DEFER"


DEFER: Final = _Defer()
"""Handler result meaning "I will answer later" with :meth:`ControlServer.reply`."""

HandlerResult = Reply | Mapping[str, Any] | None | _Defer
Handler = Callable[[Message, bytes], HandlerResult]
"""``handler(request, peer)``: ``peer`` is the caller's routing identity (stable per socket),
a :class:`Peer` whose ``cred`` is what the OS said about the caller (:func:`peer_cred`).

Return None / a dict / a :class:`Reply` for ``ok``, or :data:`DEFER`; raise a
:class:`~shared.errors.ZcrxError` with an errno for an ``error`` reply."""


@dataclass
class ServerStats:
    """Counters of one :class:`ControlServer`."""

    requests: int = 0
    """Well-formed requests dispatched."""
    ok: int = 0
    errors: int = 0
    """Error replies to well-formed requests (handler errors, ENOSYS, EPIPE)."""
    rejected: Counter[int] = field(default_factory=Counter)
    """Malformed messages, per errno."""
    undeliverable: int = 0
    """Replies dropped because the peer is gone or its queue is full."""
    handler_bugs: int = 0
    """Handlers that raised something without an errno (answered with EIO, then re-raised)."""
    refused: int = 0
    """Requests from peers ``admit`` turned away (EPERM)."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form, errnos by name."""
        return {"requests": self.requests, "ok": self.ok, "errors": self.errors,
                "rejected": {E.errorcode.get(k, str(k)): v for k, v in self.rejected.items()},
                "undeliverable": self.undeliverable, "handler_bugs": self.handler_bugs,
                "refused": self.refused}


class ControlServer:
    """A ROUTER socket serving registered request types with handlers.

    Built-in handlers answer ``ping``, ``hello`` (checks the protocol version, replies with
    this server's role, pid and version), ``eos`` (acks and marks the peer ended: later
    requests from it get EPIPE) and ``bye``; a handler given for those names replaces the
    default (for ``eos`` the peer is still marked ended after it succeeds).  A type without a
    handler gets ENOSYS.

    Usage in a loop that also watches other things::

        poller.register(server.socket, zmq.POLLIN)
        ...
        if server.socket in events:
            server.process_pending()
    """

    def __init__(self, endpoint: str, handlers: Mapping[str, Handler] | None = None, *,
                 role: str = "server", context: zmq.Context[Any] | None = None,
                 registry: Registry | None = None,
                 admit: Callable[[Peer, str], bool] | None = None) -> None:
        """Bind ``endpoint`` (ipc://, inproc:// or loopback tcp://, port ``*`` allowed).

        Raises :class:`Misuse` for a disallowed endpoint, ``zmq.ZMQError`` if bind fails.
        """
        _check_bind_endpoint(endpoint)
        self.registry = REGISTRY if registry is None else registry
        self.role = role
        self.handlers: dict[str, Handler] = {
            "ping": self._on_ping, "hello": self._on_hello, "eos": self._on_ping,
            "bye": self._on_ping,
        }
        self.handlers.update(handlers or {})
        self.admit = admit
        self.stats = ServerStats()
        self.ended: set[bytes] = set()
        """Routing identities of peers that sent ``eos``."""
        self.socket: zmq.Socket[bytes] = _new_socket(_context(context), zmq.ROUTER)
        try:
            self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # A client that reconnects after a timeout keeps its identity (the
            # kernel knows its task by it); the new connection takes over.
            self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self.socket.bind(endpoint)
            self.endpoint: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            self.socket.close(0)
            raise

    # -- built-in handlers

    def _on_ping(self, msg: Message, peer: bytes) -> HandlerResult:
        return None

    def _on_hello(self, msg: Message, peer: bytes) -> HandlerResult:
        if msg.body["version"] != PROTOCOL_VERSION:
            raise Misuse(f"peer speaks protocol {msg.body['version']}, server "
                         f"{PROTOCOL_VERSION}", E.EPROTO)
        return {"role": self.role, "pid": os.getpid(), "version": PROTOCOL_VERSION}

    # -- dispatch (no I/O)

    def _respond(self, peer: bytes, frames: Sequence[bytes]
                 ) -> tuple[list[bytes] | None, BaseException | None]:
        """Frames of the reply (None: deferred) and an exception to raise after sending."""
        try:
            msg = decode(frames, self.registry)
        except BadMessage as exc:
            self.stats.rejected[exc.errno or E.EBADMSG] += 1
            log.debug("rejected message from %r: %s", peer, exc)
            return error_frames(exc.msg_id or 0, exc.errno or E.EBADMSG, exc.text), None
        self.stats.requests += 1
        if self.admit is not None:
            who = peer if isinstance(peer, Peer) else Peer(peer)
            if not self.admit(who, msg.type):
                self.stats.refused += 1
                self.stats.errors += 1
                return error_frames(msg.id, E.EPERM, f"{msg.type}: not permitted"), None
        if peer in self.ended and msg.type != "eos":
            self.stats.errors += 1
            return error_frames(msg.id, E.EPIPE, f"{msg.type} after end of stream"), None
        handler = self.handlers.get(msg.type)
        if handler is None:
            self.stats.errors += 1
            return error_frames(msg.id, E.ENOSYS, f"no handler for {msg.type!r}"), None
        try:
            result = handler(msg, peer)
        except ZcrxError as exc:
            if exc.errno is not None and 1 <= exc.errno <= MAX_ERRNO:
                self.stats.errors += 1
                return error_frames(msg.id, exc.errno, str(exc)), None
            return self._bug(msg, exc)
        except Exception as exc:
            return self._bug(msg, exc)
        if result is DEFER:
            return None, None
        try:
            frames_out = self._ok_frames(msg, result)
        except Exception as exc:  # a reply the handler should never have produced
            return self._bug(msg, exc)
        if msg.type == "eos":
            self.ended.add(peer)
        self.stats.ok += 1
        return frames_out, None

    def _ok_frames(self, request: Message, result: HandlerResult) -> list[bytes]:
        if isinstance(result, Reply):
            body, blobs = result.body, result.blobs
        elif result is None:
            body, blobs = {}, ()
        elif isinstance(result, Mapping):
            body, blobs = result, ()
        else:
            raise TypeError(f"handler for {request.type!r} returned {type(result).__name__}")
        mtype = self.registry.get(request.type)
        if mtype is not None and mtype.reply is not None:
            try:
                body = mtype.reply.check(dict(body), list(blobs))
            except SchemaError as exc:
                raise TypeError(f"handler for {request.type!r} returned a reply that does "
                                f"not match its schema: {exc.text}") from None
        return encode("ok", request.id, body, blobs, self.registry,
                      max_header=MAX_REPLY_HEADER_BYTES)

    def _bug(self, msg: Message, exc: BaseException
             ) -> tuple[list[bytes], BaseException]:
        self.stats.handler_bugs += 1
        log.error("handler for %r failed", msg.type, exc_info=exc)
        return error_frames(msg.id, E.EIO, f"internal error handling {msg.type}"), exc

    # -- I/O

    def _send(self, peer: bytes, frames: list[bytes]) -> bool:
        try:
            self.socket.send_multipart([bytes(peer), *frames], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.stats.undeliverable += 1
            return False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self.stats.undeliverable += 1
            return False
        return True

    def poll_once(self, timeout_ms: int | None = 0) -> bool:
        """Wait up to ``timeout_ms`` (None: forever) for one request and answer it.

        Returns True if a message was handled.  Malformed input never raises; a handler that
        raises something without an errno gets the caller an EIO error reply, and the
        exception is then re-raised here so bugs stay loud (the loop may catch and go on).
        """
        if not self.socket.poll(timeout_ms, zmq.POLLIN):
            return False
        try:
            parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        peer = Peer(parts[0].bytes, _frame_cred(parts[-1]))
        frames = [f.bytes for f in parts[1:]]
        reply, exc = self._respond(peer, frames)
        if reply is not None:
            self._send(peer, reply)
        if exc is not None:
            raise exc
        return True

    def process_pending(self, limit: int = 64) -> int:
        """Answer up to ``limit`` requests already queued, without waiting; return how many."""
        done = 0
        while done < limit and self.poll_once(0):
            done += 1
        return done

    def serve(self, until: Callable[[], bool], poll_ms: int = 50) -> None:
        """Answer requests until ``until()`` is true (checked every ``poll_ms`` at most)."""
        while not until():
            self.poll_once(poll_ms)

    def reply(self, peer: bytes, request: Message, result: HandlerResult = None) -> bool:
        """Send the ``ok`` reply to a request whose handler returned :data:`DEFER`.

        Returns False if the peer is gone.  Raises :class:`Misuse`/TypeError on a bad result.
        """
        try:
            frames = self._ok_frames(request, result)
        except TypeError as exc:
            raise Misuse(str(exc)) from None
        self.stats.ok += 1
        return self._send(peer, frames)

    def reply_error(self, peer: bytes, request: Message, errno: int, text: str = "") -> bool:
        """Send an ``error`` reply to a deferred request; False if the peer is gone."""
        if not 1 <= errno <= MAX_ERRNO:
            raise Misuse(f"errno {errno} not in 1..{MAX_ERRNO}")
        self.stats.errors += 1
        return self._send(peer, error_frames(request.id, errno, text or os.strerror(errno)))

    def close(self) -> None:
        """Close the socket (idempotent).  Does not terminate the context."""
        self.socket.close(0)

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --------------------------------------------------------------------------- client


#: Most requests :meth:`ControlClient.request_many` has in flight at once (a longer list goes
#: in several batches): well under zmq's default high-water mark of 1000 messages.
PIPELINE_MAX = 256


class ControlClient:
    """A DEALER socket making one request at a time, with timeouts and lazy-pirate recovery."""

    def __init__(self, endpoint: str, timeout_ms: int = DEFAULT_TIMEOUT_MS, *,
                 context: zmq.Context[Any] | None = None,
                 registry: Registry | None = None) -> None:
        """Prepare a client of ``endpoint``; the socket connects lazily on the first request."""
        if timeout_ms <= 0:
            raise Misuse(f"timeout_ms must be positive, got {timeout_ms}")
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms
        self.registry = REGISTRY if registry is None else registry
        self._ctx = _context(context)
        self._sock: zmq.Socket[bytes] | None = None
        self._next_id = 0
        self._closed = False
        self._ended = False
        self.stale_replies = 0
        """Replies discarded because their id was not the one awaited."""
        self.timeouts = 0
        #: Stable routing identity, kept across socket re-creation (lazy pirate),
        #: so a server that keys state by peer (the kernel's tasks) keeps it.
        self.identity = b"c" + os.urandom(7)

    @property
    def socket(self) -> zmq.Socket[bytes]:
        """The current socket (created on demand; replaced after a timeout)."""
        if self._closed:
            raise Misuse("control client is closed", E.EBADF)
        if self._sock is None:
            sock = _new_socket(self._ctx, zmq.DEALER)
            sock.setsockopt(zmq.ROUTING_ID, self.identity)
            # A server still starting (its socket file not there yet) is retried after 5 ms,
            # not libzmq's 100: a role starting beside another waits for it no longer than
            # that.  Retries back off to 100 ms while it stays away.
            sock.setsockopt(zmq.RECONNECT_IVL, 5)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 100)
            try:
                sock.connect(self.endpoint)
            except BaseException:
                sock.close(0)
                raise
            self._sock = sock
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def request(self, type: str, body: Mapping[str, Any] | None = None,
                blobs: Iterable[bytes | bytearray | memoryview] = (), *,
                timeout_ms: int | None = None) -> Message:
        """Send a request and return its ``ok`` reply.

        Raises :class:`Misuse` for a bad request (nothing is sent) or after :meth:`end_stream`
        (EPIPE) / :meth:`close` (EBADF); :class:`ControlError` for an ``error`` reply;
        :class:`~shared.errors.Timeout` if no reply came in time (outcome unknown; the socket
        is recreated, so the client is usable again); :class:`BadMessage` for a malformed
        reply or one that does not match the request type's reply schema.
        """
        out = self._exchange([(type, body, blobs)], timeout_ms)[0]
        if isinstance(out, ControlError):
            raise out
        return out

    def request_many(self, requests: Sequence[tuple[str, Mapping[str, Any] | None]], *,
                     timeout_ms: int | None = None) -> list[Message | ControlError]:
        """Pipeline ``requests`` (``(type, body)`` pairs): send them all, then await every
        reply; one wake-up of the server and of this process for the lot instead of one
        round trip each.  The server handles them one by one in this order, as if called
        one after the other, so a later request must not depend on an earlier one's reply.

        Returns, in order, each ``ok`` reply or the :class:`ControlError` of an ``error``
        reply (every request was sent: the caller decides what a partial failure undoes).
        ``timeout_ms`` bounds the wait for each next reply, so a long batch that makes
        progress does not time out.  Raises as :meth:`request` for a bad request (nothing
        is sent), a timeout (outcomes unknown) or a malformed reply."""
        out: list[Message | ControlError] = []
        for i in range(0, len(requests), PIPELINE_MAX):  # under the sockets' HWM (1000)
            out += self._exchange([(t, b, ()) for t, b in requests[i:i + PIPELINE_MAX]],
                                  timeout_ms)
        return out

    def _exchange(self, requests: Sequence[tuple[str, Mapping[str, Any] | None,
                                                 Iterable[bytes | bytearray | memoryview]]],
                  timeout_ms: int | None) -> list[Message | ControlError]:
        if self._ended:
            raise Misuse(f"{requests[0][0]}: request after end of stream", E.EPIPE)
        batch: list[tuple[int, str, list[bytes]]] = []
        for type, body, blobs in requests:  # every request encodes before any is sent
            self._next_id = self._next_id + 1 if self._next_id < U64_MAX else 1
            batch.append((self._next_id, type, encode(type, self._next_id, body, blobs,
                                                      self.registry)))
        sock = self.socket
        wait_ms = self.timeout_ms if timeout_ms is None else timeout_ms
        for _, type, frames in batch:
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                self._reset()
                self.timeouts += 1
                raise Timeout(f"{type}: cannot queue request to {self.endpoint}") from None
        index = {rid: i for i, (rid, _, _) in enumerate(batch)}
        out: list[Message | ControlError | None] = [None] * len(batch)
        left = len(batch)
        deadline = time.monotonic() + wait_ms / 1000
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(max(1, math.ceil(remaining * 1000)), zmq.POLLIN):
                if time.monotonic() < deadline:
                    continue
                self._reset()
                self.timeouts += 1
                type = next(t for (_, t, _), o in zip(batch, out, strict=True) if o is None)
                raise Timeout(f"{type}: no reply from {self.endpoint} within {wait_ms} ms")
            parts = sock.recv_multipart()
            try:
                msg = decode(parts, self.registry, max_header=MAX_REPLY_HEADER_BYTES)
            except BadMessage as exc:
                if exc.msg_id is not None and exc.msg_id not in index:
                    self.stale_replies += 1
                    continue
                self._reset()
                raise
            i = index.get(msg.id)
            if i is None or out[i] is not None:
                self.stale_replies += 1
                log.debug("discarding stale %s reply #%d", msg.type, msg.id)
                continue
            try:
                out[i] = self._result(batch[i][1], msg)
            except ControlError as exc:
                out[i] = exc
            left -= 1
            deadline = time.monotonic() + wait_ms / 1000
        return [o for o in out if o is not None]

    def _result(self, type: str, msg: Message) -> Message:
        if msg.type == "error":
            raise ControlError(type, msg.body["errno"], msg.body["msg"])
        if msg.type != "ok":
            self._reset()
            raise BadMessage(E.EPROTO, f"{type}: reply of type {msg.type!r}", msg_id=msg.id)
        mtype = self.registry.get(type)
        if mtype is not None and mtype.reply is not None:
            try:
                body = mtype.reply.check(msg.body, msg.blobs)
            except SchemaError as exc:
                raise BadMessage(exc.errno, f"{type} reply: {exc.text}", msg_id=msg.id) from None
            msg = Message(msg.type, msg.id, body, msg.blobs)
        return msg

    def call(self, type: str, body: Mapping[str, Any] | None = None,
             blobs: Iterable[bytes | bytearray | memoryview] = (), *,
             timeout_ms: int | None = None) -> dict[str, Any]:
        """:meth:`request` returning just the reply body."""
        return self.request(type, body, blobs, timeout_ms=timeout_ms).body

    def call_many(self, requests: Sequence[tuple[str, Mapping[str, Any] | None]], *,
                  timeout_ms: int | None = None) -> list[dict[str, Any] | ControlError]:
        """:meth:`request_many` returning each reply's body (or its ``ControlError``)."""
        return [r if isinstance(r, ControlError) else r.body
                for r in self.request_many(requests, timeout_ms=timeout_ms)]

    def ping(self, timeout_ms: int | None = None) -> None:
        """Round trip a ``ping``."""
        self.request("ping", timeout_ms=timeout_ms)

    def hello(self, role: str, timeout_ms: int | None = None) -> dict[str, Any]:
        """Introduce this process (role, pid, protocol version); return the server's hello."""
        return self.call("hello", {"role": role, "pid": os.getpid(),
                                   "version": PROTOCOL_VERSION}, timeout_ms=timeout_ms)

    def end_stream(self, timeout_ms: int | None = None) -> None:
        """Send ``eos`` and wait for its ack: everything sent before has been handled.

        Afterwards every request raises :class:`Misuse` (EPIPE); :meth:`close` remains.
        """
        self.request("eos", timeout_ms=timeout_ms)
        self._ended = True

    def close(self) -> None:
        """Close the socket, dropping anything unsent (idempotent)."""
        self._reset()
        self._closed = True

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --------------------------------------------------------------------------- events


class EventSender:
    """The sending end of a best-effort one-way channel (PUSH, connects)."""

    def __init__(self, endpoint: str, *, context: zmq.Context[Any] | None = None,
                 registry: Registry | None = None, hwm: int = 1000) -> None:
        """Connect to the :class:`EventReceiver` bound at ``endpoint``."""
        self.registry = REGISTRY if registry is None else registry
        self.socket: zmq.Socket[bytes] = _new_socket(_context(context), zmq.PUSH)
        try:
            self.socket.setsockopt(zmq.SNDHWM, hwm)
            self.socket.connect(endpoint)
        except BaseException:
            self.socket.close(0)
            raise
        self._seq = 0
        self.sent = 0
        self.dropped = 0

    def send(self, type: str, body: Mapping[str, Any] | None = None,
             blobs: Iterable[bytes | bytearray | memoryview] = ()) -> bool:
        """Queue one event without blocking; False (and counted) if the queue is full.

        Raises :class:`Misuse` for an invalid event.  The id is a per-sender sequence number.
        """
        self._seq += 1
        frames = encode(type, self._seq, body, blobs, self.registry)
        try:
            self.socket.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        """Close, dropping anything unsent (idempotent)."""
        self.socket.close(0)


class EventReceiver:
    """The receiving end of a one-way channel (PULL, binds).  Malformed events are counted."""

    def __init__(self, endpoint: str, *, context: zmq.Context[Any] | None = None,
                 registry: Registry | None = None) -> None:
        """Bind ``endpoint`` (same rules as :class:`ControlServer`)."""
        _check_bind_endpoint(endpoint)
        self.registry = REGISTRY if registry is None else registry
        self.socket: zmq.Socket[bytes] = _new_socket(_context(context), zmq.PULL)
        try:
            self.socket.bind(endpoint)
            self.endpoint: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            self.socket.close(0)
            raise
        self.rejected: Counter[int] = Counter()

    def recv(self, timeout_ms: int | None = 0) -> Message | None:
        """The next valid event within ``timeout_ms`` (None: wait forever), or None."""
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        while True:
            wait = (None if deadline is None
                    else max(0, math.ceil((deadline - time.monotonic()) * 1000)))
            if not self.socket.poll(wait, zmq.POLLIN):
                return None
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return None
            try:
                return decode(frames, self.registry)
            except BadMessage as exc:
                self.rejected[exc.errno or E.EBADMSG] += 1
                log.debug("dropping malformed event: %s", exc)

    def drain(self, limit: int = 1024) -> list[Message]:
        """Every valid event already queued (up to ``limit``), without waiting."""
        out: list[Message] = []
        while len(out) < limit:
            msg = self.recv(0)
            if msg is None:
                break
            out.append(msg)
        return out

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self.socket.close(0)
