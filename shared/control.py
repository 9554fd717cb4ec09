"""The control plane: a versioned, validated request/reply protocol over ZeroMQ.

ZeroMQ carries control only (setup "syscalls", configuration, wake-ups, death notices, stats);
no payload ever crosses it (DESIGN.md §1, §4).  This module is the schema and the transport and
nothing else: it knows no io_uring semantics.  Other modules declare their messages with
:func:`register_type` and serve them with handlers on a :class:`ControlServer`.

Wire format
-----------
One message is one zmq multipart message::

    frame 0   b"ZCRX" + one version byte          (MAGIC_VERSION, PROTOCOL_VERSION = 1)
    frame 1   compact JSON object {"t": type, "id": request id, "b": {body fields}}
    frame 2.. binary blobs, e.g. the exact 96-byte io_uring_zcrx_ifq_reg a register call carries

A reply carries the request's ``id`` and is either ``"ok"`` (body and blobs free-form, or checked
against the request type's *reply* schema) or ``"error"`` ``{errno, msg}``.

Validation and errnos
---------------------
:func:`decode` returns a :class:`Message` or raises :class:`BadMessage` (a
:class:`~shared.errors.PeerMisbehaved`), checking in this order:

============================================================  =========
condition                                                     errno
============================================================  =========
more than MAX_FRAMES frames or MAX_MESSAGE_BYTES in all       EMSGSIZE
frame 0 is not b"ZCRX" + 1 byte, or the version byte differs  EPROTO
header frame over MAX_HEADER_BYTES                            EMSGSIZE
no frames, no header frame, header not UTF-8 JSON, NaN /      EBADMSG
Infinity literals, duplicate keys, header not an object with
exactly "t" (str), "id" (int in [0, 2**64)) and optional "b"
type name not registered                                      ENOSYS
body not an object; missing, extra or wrongly typed field     EINVAL
(a bool is never an int; ints must fit s64/u64; floats must be
finite; nesting deeper than MAX_DEPTH); wrong number or size
of blobs; a type-specific validator rejects the body
============================================================  =========

:func:`encode` runs the same checks on outgoing messages but raises
:class:`~shared.errors.Misuse` with the same errno: a bad outgoing message is the caller's bug,
a bad incoming one is the peer's.

Sockets
-------
* :class:`ControlServer`: one ROUTER socket (bind, LINGER 0).  :meth:`ControlServer.poll_once`
  receives one request, validates it, dispatches it to a handler and replies.  Malformed input is
  answered with an ``error`` reply carrying the errno above (with the request id when it can be
  read, else id 0) and counted in :attr:`ControlServer.stats`; it never raises.  The socket is
  exposed as ``.socket`` so a process can poll it together with anything else.
* :class:`ControlClient`: one DEALER socket (LINGER 0), one request in flight at a time.
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

import copy
import errno as E
import json
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

from shared.errors import Misuse, PeerMisbehaved, Timeout, ZcrxError

__all__ = [
    "DEFAULT_TIMEOUT_MS",
    "DEFER",
    "MAGIC",
    "MAGIC_VERSION",
    "MAX_BLOBS",
    "MAX_DEPTH",
    "MAX_FRAMES",
    "MAX_HEADER_BYTES",
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "REGISTRY",
    "BadMessage",
    "ControlClient",
    "ControlError",
    "ControlServer",
    "EventReceiver",
    "EventSender",
    "Handler",
    "HandlerResult",
    "Message",
    "MessageType",
    "Registry",
    "Reply",
    "Schema",
    "ServerStats",
    "decode",
    "encode",
    "ipc_endpoint",
    "peek_id",
    "register_type",
]

log = logging.getLogger("zcrx.control")

# --------------------------------------------------------------------------- constants

MAGIC: Final = b"ZCRX"
PROTOCOL_VERSION: Final = 1
MAGIC_VERSION: Final = MAGIC + bytes([PROTOCOL_VERSION])

MAX_MESSAGE_BYTES: Final = 1 << 20
"""Largest message (sum of all frames) accepted or sent."""
MAX_HEADER_BYTES: Final = 64 << 10
"""Largest JSON header frame; keeps parsing cheap."""
MAX_BLOBS: Final = 16
MAX_FRAMES: Final = MAX_BLOBS + 2
MAX_DEPTH: Final = 16
"""Deepest nesting of lists/objects inside a body value."""
MAX_TYPE_NAME: Final = 64
MAX_ERROR_TEXT: Final = 1024
"""Longer ``msg`` strings in error replies are truncated by the server."""
SOCKET_MAXMSGSIZE: Final = 4 * MAX_MESSAGE_BYTES
"""libzmq drops the connection of a peer that sends a single frame larger than this, so a peer
cannot make us buffer gigabytes; below it, oversize messages get an EMSGSIZE reply."""
DEFAULT_TIMEOUT_MS: Final = 5000

S64_MIN: Final = -(1 << 63)
U64_MAX: Final = (1 << 64) - 1
MAX_ERRNO: Final = 4095

_TYPE_NAME_RE = re.compile(r"[a-z][a-z0-9_.]*\Z")
_ENDPOINT_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
_SUN_PATH_MAX: Final = 107  # sizeof(sockaddr_un.sun_path) - 1 for the NUL
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost")
_FIELD_TYPES: Final = (int, bool, str, float, list, dict, type(None))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- errors


class BadMessage(PeerMisbehaved):
    """A received message failed validation; ``errno`` says how (see the module table).

    ``msg_id`` is the request id when it could be read, so an error reply can carry it.
    """

    def __init__(self, errno: int, text: str, *, msg_id: int | None = None) -> None:
        super().__init__(text, errno)
        self.text = text
        self.msg_id = msg_id


class ControlError(ZcrxError):
    """The remote side answered a request with an ``error`` reply; ``errno`` is its errno."""

    default_errno = E.EIO

    def __init__(self, request_type: str, errno: int, remote_msg: str) -> None:
        super().__init__(f"{request_type}: {remote_msg}", errno)
        self.request_type = request_type
        self.remote_msg = remote_msg


class _Invalid(Exception):
    """Internal: a schema check failed (turned into BadMessage or Misuse by the caller)."""

    def __init__(self, text: str, errno: int = E.EINVAL) -> None:
        super().__init__(text)
        self.errno = errno
        self.text = text


# --------------------------------------------------------------------------- schema

FieldType = type | tuple[type, ...] | None


def _norm_ftype(name: str, ftype: FieldType) -> tuple[type, ...]:
    types = ftype if isinstance(ftype, tuple) else (ftype,)
    out = tuple(type(None) if t is None else t for t in types)
    if not out or any(t not in _FIELD_TYPES for t in out):
        raise Misuse(f"field {name!r}: types must be among int, bool, str, float, list, dict, "
                     f"None; got {ftype!r}")
    return out


def _type_names(types: tuple[type, ...]) -> str:
    return "|".join("null" if t is type(None) else t.__name__ for t in types)


def _check_json(where: str, value: Any, depth: int) -> Any:
    """Check a nested JSON value: bounded ints, finite floats, valid str, str keys, depth."""
    if depth > MAX_DEPTH:
        raise _Invalid(f"{where}: nested deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not S64_MIN <= value <= U64_MAX:
            raise _Invalid(f"{where}: integer out of s64/u64 range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Invalid(f"{where}: float is not finite")
        return value
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Invalid(f"{where}: string is not valid Unicode") from None
        return value
    if isinstance(value, list):
        return [_check_json(f"{where}[{i}]", v, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _Invalid(f"{where}: object key {_short(k)} is not a string")
            _check_json(f"{where} key", k, depth + 1)
            out[k] = _check_json(f"{where}.{k}", v, depth + 1)
        return out
    raise _Invalid(f"{where}: {type(value).__name__} is not a JSON value")


def _kind(value: Any) -> type:
    """The schema type of a value: bool is its own kind, never an int."""
    if value is None:
        return type(None)
    for t in (bool, int, float, str, list, dict):
        if isinstance(value, t):
            return t
    return type(value)


def _check_field(name: str, value: Any, types: tuple[type, ...]) -> Any:
    kind = _kind(value)
    if kind not in types:
        if kind is int and float in types:  # JSON does not distinguish 1 from 1.0
            value = float(_check_json(f"field {name!r}", value, 0))
        else:
            raise _Invalid(f"field {name!r}: expected {_type_names(types)}, "
                           f"got {kind.__name__} {_short(value)}")
    return _check_json(f"field {name!r}", value, 0)


Validator = Callable[[dict[str, Any], tuple[bytes, ...]], None]
"""Extra check on a body already type-checked: raise ValueError to reject (EINVAL)."""


@dataclass(frozen=True)
class Schema:
    """The shape of a body plus its blobs.

    Build with :meth:`make`; ``required`` maps field name to type(s), ``optional`` maps name to
    ``(type(s), default)``.  ``blobs`` is an exact count or a ``(min, max)`` range;
    ``blob_sizes[i]`` is the exact size of blob ``i`` (``None``: any size up to
    ``max_blob_size``).  An ``open`` schema accepts extra fields holding any JSON value.
    """

    required: Mapping[str, tuple[type, ...]]
    optional: Mapping[str, tuple[tuple[type, ...], Any]]
    min_blobs: int = 0
    max_blobs: int = 0
    blob_sizes: tuple[int | None, ...] = ()
    max_blob_size: int = MAX_MESSAGE_BYTES
    open: bool = False
    validator: Validator | None = None

    @classmethod
    def make(cls, required: Mapping[str, FieldType] | None = None,
             optional: Mapping[str, tuple[FieldType, Any]] | None = None, *,
             blobs: int | tuple[int, int] = 0, blob_sizes: Sequence[int | None] = (),
             max_blob_size: int | None = None, open: bool = False,
             validator: Validator | None = None) -> Schema:
        """Build a schema, checking the declaration itself (raises :class:`Misuse`)."""
        req = {n: _norm_ftype(n, t) for n, t in (required or {}).items()}
        opt: dict[str, tuple[tuple[type, ...], Any]] = {}
        for n, spec in (optional or {}).items():
            if not (isinstance(spec, tuple) and len(spec) == 2):
                raise Misuse(f"optional field {n!r}: give (type, default)")
            types = _norm_ftype(n, spec[0])
            try:
                default = _check_field(n, spec[1], types)
            except _Invalid as exc:
                raise Misuse(f"optional field {n!r}: bad default: {exc.text}") from None
            opt[n] = (types, default)
        for n in (*req, *opt):
            if not isinstance(n, str) or not n:
                raise Misuse(f"field name {n!r} must be a non-empty str")
        if set(req) & set(opt):
            raise Misuse(f"fields both required and optional: {sorted(set(req) & set(opt))}")
        lo, hi = (blobs, blobs) if isinstance(blobs, int) else blobs
        if not 0 <= lo <= hi <= MAX_BLOBS:
            raise Misuse(f"blob count {blobs!r} must be within 0..{MAX_BLOBS}")
        sizes = tuple(blob_sizes)
        if len(sizes) > hi or any(s is not None and not 0 <= s <= MAX_MESSAGE_BYTES
                                  for s in sizes):
            raise Misuse(f"blob_sizes {sizes!r} do not fit {hi} blobs of at most "
                         f"{MAX_MESSAGE_BYTES} bytes")
        mbs = MAX_MESSAGE_BYTES if max_blob_size is None else max_blob_size
        if not 0 <= mbs <= MAX_MESSAGE_BYTES:
            raise Misuse(f"max_blob_size {mbs} out of range")
        return cls(req, opt, lo, hi, sizes, mbs, open, validator)

    def check(self, body: Any, blobs: Sequence[bytes]) -> dict[str, Any]:
        """Validate ``body`` and ``blobs``; return the body with defaults filled in."""
        if not isinstance(body, dict):
            raise _Invalid(f"body is {type(body).__name__}, not an object")
        out: dict[str, Any] = {}
        for name, types in self.required.items():
            if name not in body:
                raise _Invalid(f"missing field {name!r}")
            out[name] = _check_field(name, body[name], types)
        for name, (types, default) in self.optional.items():
            if name in body:
                out[name] = _check_field(name, body[name], types)
            else:
                out[name] = copy.deepcopy(default)
        for name in body:
            if name in out:
                continue
            if not self.open:
                raise _Invalid(f"unexpected field {_short(name)}")
            if not isinstance(name, str):
                raise _Invalid(f"field name {_short(name)} is not a string")
            _check_json("field name", name, 0)
            out[name] = _check_json(f"field {name!r}", body[name], 0)
        n = len(blobs)
        if not self.min_blobs <= n <= self.max_blobs:
            want = (str(self.min_blobs) if self.min_blobs == self.max_blobs
                    else f"{self.min_blobs}..{self.max_blobs}")
            raise _Invalid(f"expected {want} blob(s), got {n}")
        for i, blob in enumerate(blobs):
            size = len(blob)
            exact = self.blob_sizes[i] if i < len(self.blob_sizes) else None
            if exact is not None and size != exact:
                raise _Invalid(f"blob {i} is {size} bytes, expected exactly {exact}")
            if size > self.max_blob_size:
                raise _Invalid(f"blob {i} is {size} bytes, more than {self.max_blob_size}")
        if self.validator is not None:
            try:
                self.validator(out, tuple(blobs))
            except ValueError as exc:
                raise _Invalid(str(exc) or "rejected by validator") from None
        return out


@dataclass(frozen=True)
class MessageType:
    """A registered message: its name, request schema, and optional ok-reply schema."""

    name: str
    schema: Schema
    reply: Schema | None = None
    doc: str = ""


class Registry:
    """Message types by name.  The module-level :data:`REGISTRY` is the one everyone uses."""

    def __init__(self) -> None:
        self._types: dict[str, MessageType] = {}

    def register(self, mtype: MessageType) -> MessageType:
        """Add ``mtype``; registering an identical type again is a no-op.

        Raises :class:`Misuse` (EEXIST) when the name is taken by a different declaration,
        (EINVAL) when the name is not ``[a-z][a-z0-9_.]*`` of at most MAX_TYPE_NAME chars.
        """
        if not (_TYPE_NAME_RE.match(mtype.name) and len(mtype.name) <= MAX_TYPE_NAME):
            raise Misuse(f"bad message type name {mtype.name!r}")
        old = self._types.get(mtype.name)
        if old is not None:
            if old == mtype:
                return old
            raise Misuse(f"message type {mtype.name!r} already registered differently",
                         E.EEXIST)
        self._types[mtype.name] = mtype
        return mtype

    def get(self, name: str) -> MessageType | None:
        """The type called ``name``, or None."""
        return self._types.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._types)

    def copy(self) -> Registry:
        """An independent registry with the same types (handy in tests)."""
        new = Registry()
        new._types = dict(self._types)
        return new


REGISTRY: Final = Registry()


def register_type(name: str, required: Mapping[str, FieldType] | None = None,
                  optional: Mapping[str, tuple[FieldType, Any]] | None = None, *,
                  blobs: int | tuple[int, int] = 0, blob_sizes: Sequence[int | None] = (),
                  max_blob_size: int | None = None, open: bool = False,
                  validator: Validator | None = None, reply: Schema | None = None,
                  doc: str = "", registry: Registry | None = None) -> MessageType:
    """Declare a message type (see :class:`Schema` for the arguments) and return it.

    ``reply`` is the schema of the body/blobs of the ``ok`` reply to this request; clients check
    replies against it and servers check what handlers return.  Example::

        IFQ_REG = register_type("zcrx_ifq_reg", {"ring_fd": int}, blobs=1, blob_sizes=(96,),
                                reply=Schema.make(blobs=1, blob_sizes=(96,)))
    """
    schema = Schema.make(required, optional, blobs=blobs, blob_sizes=blob_sizes,
                         max_blob_size=max_blob_size, open=open, validator=validator)
    reg = REGISTRY if registry is None else registry
    return reg.register(MessageType(name, schema, reply, doc))


def _check_error_body(body: dict[str, Any], _blobs: tuple[bytes, ...]) -> None:
    if not 1 <= body["errno"] <= MAX_ERRNO:
        raise ValueError(f"errno {body['errno']} not in 1..{MAX_ERRNO}")


OK: Final = register_type("ok", open=True, blobs=(0, MAX_BLOBS),
                          doc="Success reply; body and blobs depend on the request.")
ERROR: Final = register_type("error", {"errno": int, "msg": str}, validator=_check_error_body,
                             doc="Failure reply: positive Linux errno and a text.")
HELLO: Final = register_type(
    "hello", {"role": str, "pid": int, "version": int},
    reply=Schema.make({"role": str, "pid": int, "version": int}),
    doc="Introduce the caller; the reply introduces the server.  Version must match.")
PING: Final = register_type("ping", reply=Schema.make(), doc="Liveness check.")
EOS: Final = register_type("eos", reply=Schema.make(),
                           doc="End of stream: the sender will send nothing more; acked with ok.")
BYE: Final = register_type("bye", reply=Schema.make(), doc="The sender is going away.")


# --------------------------------------------------------------------------- codec


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded, validated message.  ``body`` has every declared field (defaults filled)."""

    type: str
    id: int
    body: dict[str, Any] = field(default_factory=dict)
    blobs: tuple[bytes, ...] = ()


def _valid_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= U64_MAX


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in object")
    return out


def _parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8 only, no NaN/Infinity, no duplicate keys.  Raises ValueError."""
    try:
        text = bytes(raw).decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant,
                          object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def peek_id(frames: Sequence[bytes]) -> int | None:
    """Best-effort request id of a possibly malformed message, for addressing an error reply."""
    try:
        if len(frames) < 2 or len(frames[1]) > MAX_HEADER_BYTES:
            return None
        header = _parse_json(frames[1])
        if isinstance(header, dict) and _valid_id(header.get("id")):
            return int(header["id"])
    except Exception:
        return None
    return None


def decode(frames: Sequence[bytes], registry: Registry | None = None) -> Message:
    """Parse and validate one message (the frames after any routing identity).

    Returns a :class:`Message`; raises :class:`BadMessage` with the errno of the module table.
    Never raises anything else for any input of byte strings.
    """
    reg = REGISTRY if registry is None else registry
    n = len(frames)
    if n == 0:
        raise BadMessage(E.EBADMSG, "empty message")
    if n > MAX_FRAMES:
        raise BadMessage(E.EMSGSIZE, f"{n} frames, at most {MAX_FRAMES} allowed",
                         msg_id=peek_id(frames))
    total = sum(len(f) for f in frames)
    if total > MAX_MESSAGE_BYTES:
        raise BadMessage(E.EMSGSIZE, f"{total} bytes, at most {MAX_MESSAGE_BYTES} allowed",
                         msg_id=peek_id(frames))
    head = bytes(frames[0])
    if len(head) != len(MAGIC_VERSION) or head[: len(MAGIC)] != MAGIC:
        raise BadMessage(E.EPROTO, f"bad magic {_short(head[:16])}", msg_id=peek_id(frames))
    if head[-1] != PROTOCOL_VERSION:
        raise BadMessage(E.EPROTO, f"protocol version {head[-1]}, expected {PROTOCOL_VERSION}",
                         msg_id=peek_id(frames))
    if n < 2:
        raise BadMessage(E.EBADMSG, "truncated: no header frame")
    if len(frames[1]) > MAX_HEADER_BYTES:
        raise BadMessage(E.EMSGSIZE, f"header of {len(frames[1])} bytes, at most "
                                     f"{MAX_HEADER_BYTES} allowed")
    try:
        header = _parse_json(frames[1])
    except ValueError as exc:
        raise BadMessage(E.EBADMSG, f"undecodable header: {exc}") from None
    if not isinstance(header, dict):
        raise BadMessage(E.EBADMSG, "header is not a JSON object")
    msg_id = header.get("id")
    if not _valid_id(msg_id):
        raise BadMessage(E.EBADMSG, f"header id {_short(msg_id)} is not an int in [0, 2**64)")
    assert isinstance(msg_id, int)
    extra = set(header) - {"t", "id", "b"}
    if extra:
        raise BadMessage(E.EBADMSG, f"unknown header keys {sorted(extra)}", msg_id=msg_id)
    name = header.get("t")
    if not isinstance(name, str) or not name:
        raise BadMessage(E.EBADMSG, f"header type {_short(name)} is not a string",
                         msg_id=msg_id)
    mtype = reg.get(name)
    if mtype is None:
        raise BadMessage(E.ENOSYS, f"unknown message type {_short(name)}", msg_id=msg_id)
    blobs = tuple(bytes(f) for f in frames[2:])
    try:
        body = mtype.schema.check(header.get("b", {}), blobs)
    except _Invalid as exc:
        raise BadMessage(exc.errno, f"{name}: {exc.text}", msg_id=msg_id) from None
    return Message(name, msg_id, body, blobs)


def encode(type: str, msg_id: int, body: Mapping[str, Any] | None = None,
           blobs: Iterable[bytes | bytearray | memoryview] = (),
           registry: Registry | None = None) -> list[bytes]:
    """Validate and serialize one message into frames.

    Raises :class:`Misuse` with the errno :func:`decode` would give the peer (ENOSYS, EINVAL,
    EMSGSIZE), so a bad message never leaves this process.
    """
    reg = REGISTRY if registry is None else registry
    mtype = reg.get(type)
    if mtype is None:
        raise Misuse(f"unknown message type {type!r}", E.ENOSYS)
    if not _valid_id(msg_id):
        raise Misuse(f"message id {msg_id!r} is not an int in [0, 2**64)")
    blob_list = [bytes(b) for b in blobs]
    if len(blob_list) + 2 > MAX_FRAMES:
        raise Misuse(f"{len(blob_list)} blobs, at most {MAX_BLOBS}", E.EMSGSIZE)
    try:
        checked = mtype.schema.check(dict(body or {}), blob_list)
    except _Invalid as exc:
        raise Misuse(f"{type}: {exc.text}", exc.errno) from None
    header = json.dumps({"t": type, "id": msg_id, "b": checked}, separators=(",", ":"),
                        allow_nan=False).encode("ascii")
    if len(header) > MAX_HEADER_BYTES:
        raise Misuse(f"{type}: header of {len(header)} bytes, at most {MAX_HEADER_BYTES}",
                     E.EMSGSIZE)
    frames = [MAGIC_VERSION, header, *blob_list]
    total = sum(len(f) for f in frames)
    if total > MAX_MESSAGE_BYTES:
        raise Misuse(f"{type}: {total} bytes, at most {MAX_MESSAGE_BYTES}", E.EMSGSIZE)
    return frames


def _error_frames(msg_id: int, errno: int, text: str) -> list[bytes]:
    """An ``error`` reply; never raises for errno in 1..MAX_ERRNO, whatever the text."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates
    if len(text) > MAX_ERROR_TEXT:
        text = text[: MAX_ERROR_TEXT - 3] + "..."
    return encode("error", msg_id, {"errno": errno, "msg": text})


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
"""``handler(request, peer)``: ``peer`` is the caller's routing identity (stable per socket).

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

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form, errnos by name."""
        return {"requests": self.requests, "ok": self.ok, "errors": self.errors,
                "rejected": {E.errorcode.get(k, str(k)): v for k, v in self.rejected.items()},
                "undeliverable": self.undeliverable, "handler_bugs": self.handler_bugs}


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
                 registry: Registry | None = None) -> None:
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
            return _error_frames(exc.msg_id or 0, exc.errno or E.EBADMSG, exc.text), None
        self.stats.requests += 1
        if peer in self.ended and msg.type != "eos":
            self.stats.errors += 1
            return _error_frames(msg.id, E.EPIPE, f"{msg.type} after end of stream"), None
        handler = self.handlers.get(msg.type)
        if handler is None:
            self.stats.errors += 1
            return _error_frames(msg.id, E.ENOSYS, f"no handler for {msg.type!r}"), None
        try:
            result = handler(msg, peer)
        except ZcrxError as exc:
            if exc.errno is not None and 1 <= exc.errno <= MAX_ERRNO:
                self.stats.errors += 1
                return _error_frames(msg.id, exc.errno, str(exc)), None
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
            except _Invalid as exc:
                raise TypeError(f"handler for {request.type!r} returned a reply that does "
                                f"not match its schema: {exc.text}") from None
        return encode("ok", request.id, body, blobs, self.registry)

    def _bug(self, msg: Message, exc: BaseException
             ) -> tuple[list[bytes], BaseException]:
        self.stats.handler_bugs += 1
        log.error("handler for %r failed", msg.type, exc_info=exc)
        return _error_frames(msg.id, E.EIO, f"internal error handling {msg.type}"), exc

    # -- I/O

    def _send(self, peer: bytes, frames: list[bytes]) -> bool:
        try:
            self.socket.send_multipart([peer, *frames], flags=zmq.NOBLOCK)
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
            parts = self.socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return False
        peer, frames = parts[0], parts[1:]
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
        return self._send(peer, _error_frames(request.id, errno, text or os.strerror(errno)))

    def close(self) -> None:
        """Close the socket (idempotent).  Does not terminate the context."""
        self.socket.close(0)

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --------------------------------------------------------------------------- client


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
        if self._ended:
            raise Misuse(f"{type}: request after end of stream", E.EPIPE)
        self._next_id = self._next_id + 1 if self._next_id < U64_MAX else 1
        rid = self._next_id
        frames = encode(type, rid, body, blobs, self.registry)
        sock = self.socket
        wait_ms = self.timeout_ms if timeout_ms is None else timeout_ms
        deadline = time.monotonic() + wait_ms / 1000
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            self._reset()
            self.timeouts += 1
            raise Timeout(f"{type}: cannot queue request to {self.endpoint}") from None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(max(1, math.ceil(remaining * 1000)), zmq.POLLIN):
                if time.monotonic() < deadline:
                    continue
                self._reset()
                self.timeouts += 1
                raise Timeout(f"{type}: no reply from {self.endpoint} within {wait_ms} ms")
            parts = sock.recv_multipart()
            try:
                msg = decode(parts, self.registry)
            except BadMessage as exc:
                if exc.msg_id is not None and exc.msg_id != rid:
                    self.stale_replies += 1
                    continue
                self._reset()
                raise
            if msg.id != rid:
                self.stale_replies += 1
                log.debug("discarding stale %s reply #%d (awaiting #%d)", msg.type, msg.id, rid)
                continue
            return self._result(type, msg)

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
            except _Invalid as exc:
                raise BadMessage(exc.errno, f"{type} reply: {exc.text}", msg_id=msg.id) from None
            msg = Message(msg.type, msg.id, body, msg.blobs)
        return msg

    def call(self, type: str, body: Mapping[str, Any] | None = None,
             blobs: Iterable[bytes | bytearray | memoryview] = (), *,
             timeout_ms: int | None = None) -> dict[str, Any]:
        """:meth:`request` returning just the reply body."""
        return self.request(type, body, blobs, timeout_ms=timeout_ms).body

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
