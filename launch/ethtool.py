"""The user-space ``ethtool`` front end: argument lists -> request dicts, reply dicts -> text.

Pure functions, no I/O.  :func:`parse` reads an argument list in ethtool's grammar and
returns a JSON-serialisable request dict that the CLI sends over the control plane to
the kernel process, which forwards it to the NIC.  The NIC answers with a reply dict,
and :func:`format_reply` renders it the way ethtool prints it (:func:`format_error` for
a refusal).  Bad input raises :class:`EthtoolUsageError` with a one-line message worded
the way ethtool words it.

Supported commands (short and long spellings)::

    -l|--show-channels DEV
    -L|--set-channels DEV [rx N] [tx N] [other N] [combined N]
    -g|--show-ring DEV
    -G|--set-ring DEV [rx N] [rx-mini N] [rx-jumbo N] [tx N] [rx-buf-len N] [cqe-size N]
                      [tx-push on|off] [rx-push on|off] [tx-push-buf-len N]
                      [tcp-data-split auto|on|off] [hds-thresh N]
    -x|--show-rxfh-indir|--show-rxfh DEV [context N]
    -X|--set-rxfh-indir|--rxfh DEV [hkey XX:XX:..] [start Q] [equal N | weight W0 W1 .. |
                      default] [hfunc NAME] [context new|N] [delete]
    -n|-u|--show-ntuple|--show-nfc DEV [rule N]
    -N|-U|--config-ntuple|--config-nfc DEV flow-type tcp4|tcp6 [src-ip A [m A]]
                      [dst-ip A [m A]] [src-port P [m P]] [dst-port P [m P]]
                      [action Q | context C [action OFFSET]] [loc N]
    -N ... DEV delete N
    -S|--statistics DEV
    -c|--show-coalesce DEV
    -C|--coalesce DEV [adaptive-rx on|off] [rx-usecs N] [rx-frames N] [adaptive-tx on|off]
                      [tx-usecs N] [tx-frames N] [rx-usecs-irq N] [rx-frames-irq N]
                      (the emulated NIC supports the rx-usecs, rx-frames and adaptive-rx)
    -k|--show-features|--show-offload DEV
    -K|--features|--offload DEV FEATURE on|off [FEATURE on|off ...]
                      (features by name or ethtool's short name: rx, sg, tso, gro, lro,
                      ntuple, rxhash; the emulated NIC can change rx-gro-hw only)

Masks may also be given as ``src-ip-mask A`` etc. (the ``FIELD-mask`` spelling of
ethtool(8)).  A mask has ethtool's meaning: a set bit means "ignore this bit".  Numbers
are C-style (``0x`` hex, leading ``0`` octal, else decimal).

Request dicts
-------------
Every request has ``"cmd"`` and ``"dev"``; optional keys are present only when given.

=================  ==================================================================
cmd                other keys
=================  ==================================================================
channels-get       -
channels-set       ``rx``, ``tx``, ``other``, ``combined``: int
rings-get          -
rings-set          ``rx``, ``rx_mini``, ``rx_jumbo``, ``tx``, ``rx_buf_len``,
                   ``cqe_size``, ``tx_push_buf_len``, ``hds_thresh``: int;
                   ``tx_push``, ``rx_push``: bool; ``tcp_data_split``: "auto"|"on"|"off"
rss-get            ``context``: int (always present, 0 by default)
rss-set            ``context``: int or "new" (always present, 0 by default);
                   ``hkey``: lowercase hex without colons; ``hfunc``: str;
                   ``start``: int; ``equal``: int; ``weight``: list[int];
                   ``default``: True; ``delete``: True
ntuple-get         ``rule``: int (absent = list all)
ntuple-add         ``flow_type``: "tcp4"|"tcp6"; ``src_ip``, ``dst_ip``, ``src_ip_mask``,
                   ``dst_ip_mask``: address text; ``src_port``, ``dst_port``,
                   ``src_port_mask``, ``dst_port_mask``: int; ``action``: int (queue,
                   -1 = drop, or queue offset with ``context``); ``context``: int;
                   ``loc``: int
ntuple-delete      ``loc``: int
stats-get          -
coalesce-get       -
coalesce-set       ``rx_usecs``, ``rx_frames``, ``tx_usecs``, ``tx_frames``,
                   ``rx_usecs_irq``, ``rx_frames_irq``: int; ``adaptive_rx``,
                   ``adaptive_tx``: bool
features-get       -
features-set       ``features``: ``{name: bool}`` (long names, short ones resolved)
=================  ==================================================================

Reply dicts (what the NIC side produces; set commands reply ``{}`` unless noted)
----------------------------------------------------------------------------------
channels-get
    ``rx_max``, ``tx_max``, ``other_max``, ``combined_max``, ``rx_count``, ``tx_count``,
    ``other_count``, ``combined_count``: int.  A kind whose max is 0 prints ``n/a``.
rings-get
    ``rx_max``, ``rx_mini_max``, ``rx_jumbo_max``, ``tx_max``, ``tx_push_buf_len_max``,
    ``hds_thresh_max``, ``rx``, ``rx_mini``, ``rx_jumbo``, ``tx``, ``rx_buf_len``,
    ``cqe_size``, ``tx_push_buf_len``, ``hds_thresh``: int or None; ``tx_push``,
    ``rx_push``: bool or None; ``tcp_data_split``: "on"|"off"|"unknown" or None.  A missing
    key or None prints ``n/a``; so does a ring whose max is 0, and a zero
    ``rx_buf_len``/``cqe_size``/``tx_push_buf_len``.
rss-get
    ``context``: int; ``n_rx_rings``: int; ``indir``: list[int]; ``hkey``: hex str
    (empty = no key); ``hfunc``: name of the active function; optional ``input_xfrm``:
    list of enabled transformations (prints the "RSS input transformation" block).
rss-set
    ``{"context": N}`` when a context was created (prints ``New RSS context is N``).
ntuple-get (list)
    ``n_rx_rings``: int; ``rules``: list of rule dicts, in location order; optional
    ``table_size``: int (not printed).
ntuple-get (``rule N``)
    ``rule``: rule dict.
rule dict
    ``loc``, ``flow_type``, ``src_ip``, ``src_ip_mask``, ``dst_ip``, ``dst_ip_mask`` (text),
    ``src_port``, ``src_port_mask``, ``dst_port``, ``dst_port_mask`` (int), ``action``
    (int), ``context`` (int or None).  Masks are "ignore" masks (a field that was not
    given has an all-ones mask), exactly what ``ethtool -n`` prints.
ntuple-add
    ``{"loc": N}`` (prints ``Added rule with ID N`` unless the request chose ``loc``).
stats-get
    ``stats``: ``{name: int}`` in display order (or a list of ``[name, int]`` pairs).
coalesce-get
    ``rx_usecs``, ``rx_frames``: int; ``adaptive_rx``: bool.  Every other parameter
    ethtool shows prints ``n/a`` (the device does not support it).
features-get
    ``features``: list of ``[name, on, fixed]`` in display order.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "COMMANDS",
    "EthtoolUsageError",
    "format_channels",
    "format_coalesce",
    "format_error",
    "format_features",
    "format_ntuple_list",
    "format_ntuple_rule",
    "format_reply",
    "format_rings",
    "format_rss",
    "format_stats",
    "parse",
]

IFNAMSIZ = 16
U32_MAX = 0xFFFFFFFF
#: The kernel's RSS hash function names, in the order ethtool lists them.
HASH_FUNCTIONS = ("toeplitz", "xor", "crc32")
FLOW_TYPES = ("tcp4", "tcp6")
#: Flow types ethtool knows that the emulated NIC does not classify.
OTHER_FLOW_TYPES = ("udp4", "sctp4", "ah4", "esp4", "ip4", "udp6", "sctp6", "ah6", "esp6",
                    "ip6", "ether")
#: -N keywords ethtool knows that the emulated NIC does not support.
UNSUPPORTED_NTUPLE_KEYS = ("src", "dst", "proto", "tos", "tclass", "l4proto", "spi", "l4data",
                           "vlan-etype", "vlan", "user-def", "dst-mac", "vf", "queue")


class EthtoolUsageError(ValueError):
    """The command line is wrong; the message is the one line ethtool would print."""


# --------------------------------------------------------------------------------------------
# Small parsers


def _c_uint(text: str) -> int:
    """An unsigned number the way strtoul(…, 0) reads one; ValueError if it is not one."""
    t = text.strip()
    if not t or t[0] in "+-":
        raise ValueError(text)
    if t[:2].lower() == "0x":
        return int(t[2:], 16)
    if len(t) > 1 and t[0] == "0":
        return int(t[1:], 8)
    if not t.isdigit():
        raise ValueError(text)
    return int(t)


def _c_int(text: str) -> int:
    """A signed C-style number."""
    t = text.strip()
    if t.startswith("-"):
        return -_c_uint(t[1:])
    return _c_uint(t)


def _u32(text: str, lo: int = 0, hi: int = U32_MAX) -> int:
    v = _c_uint(text)
    if not lo <= v <= hi:
        raise ValueError(text)
    return v


def _parse_hkey(text: str) -> str:
    """``xx:yy:..`` (both nibbles of every byte) -> plain lowercase hex."""
    parts = text.split(":")
    if not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts):
        raise EthtoolUsageError("Invalid RSS hash key format")
    return "".join(parts).lower()


def _need_dev(opt: str, args: Sequence[str]) -> tuple[str, list[str]]:
    if not args:
        raise EthtoolUsageError(f"ethtool: bad command line argument(s): {opt} needs a device")
    dev = args[0]
    if not dev or dev.startswith("-"):
        raise EthtoolUsageError(f"ethtool: bad command line argument(s): {opt} needs a device")
    if len(dev) >= IFNAMSIZ:
        raise EthtoolUsageError(f"Device name longer than {IFNAMSIZ - 1} characters")
    return dev, list(args[1:])


# --------------------------------------------------------------------------------------------
# Netlink-style "keyword value" commands: -L, -G


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise ValueError(text)
    return text == "on"


def _tds(text: str) -> str:
    if text not in ("auto", "on", "off"):
        raise ValueError(text)
    return text


_CHANNEL_PARAMS: dict[str, Callable[[str], Any]] = {
    "rx": _u32, "tx": _u32, "other": _u32, "combined": _u32,
}
_RING_PARAMS: dict[str, Callable[[str], Any]] = {
    "rx": _u32, "rx-mini": _u32, "rx-jumbo": _u32, "tx": _u32, "rx-buf-len": _u32,
    "cqe-size": _u32, "tx-push": _on_off, "rx-push": _on_off, "tx-push-buf-len": _u32,
    "tcp-data-split": _tds, "hds-thresh": _u32,
}


_COALESCE_PARAMS: dict[str, Callable[[str], Any]] = {
    "adaptive-rx": _on_off, "adaptive-tx": _on_off, "rx-usecs": _u32, "rx-frames": _u32,
    "tx-usecs": _u32, "tx-frames": _u32, "rx-usecs-irq": _u32, "rx-frames-irq": _u32,
}


def _keyword_values(opt: str, args: Sequence[str],
                    params: Mapping[str, Callable[[str], Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        name = args[i]
        if name not in params:
            raise EthtoolUsageError(f"ethtool ({opt}): unknown parameter '{name}'")
        if i + 1 >= len(args):
            raise EthtoolUsageError(f"ethtool ({opt}): no value for parameter '{name}'")
        key = name.replace("-", "_")
        if key in out:
            raise EthtoolUsageError(f"ethtool ({opt}): duplicate parameter '{name}'")
        try:
            out[key] = params[name](args[i + 1])
        except ValueError:
            raise EthtoolUsageError(
                f"ethtool ({opt}): invalid value '{args[i + 1]}' for parameter '{name}'"
            ) from None
        i += 2
    return out


def _parse_channels_set(opt: str, dev: str, args: list[str]) -> dict[str, Any]:
    return {"cmd": "channels-set", "dev": dev, **_keyword_values(opt, args, _CHANNEL_PARAMS)}


def _parse_rings_set(opt: str, dev: str, args: list[str]) -> dict[str, Any]:
    return {"cmd": "rings-set", "dev": dev, **_keyword_values(opt, args, _RING_PARAMS)}


def _parse_coalesce_set(opt: str, dev: str, args: list[str]) -> dict[str, Any]:
    return {"cmd": "coalesce-set", "dev": dev, **_keyword_values(opt, args, _COALESCE_PARAMS)}


#: ethtool's short names of features (``-K DEV gro off``) -> the kernel's feature strings
FEATURE_ALIASES: dict[str, str] = {
    "rx": "rx-checksumming", "sg": "scatter-gather", "tso": "tcp-segmentation-offload",
    "gro": "generic-receive-offload", "lro": "large-receive-offload",
    "ntuple": "ntuple-filters", "rxhash": "receive-hashing",
}


def _parse_features_set(opt: str, dev: str, args: list[str]) -> dict[str, Any]:
    if not args:
        raise EthtoolUsageError(f"ethtool ({opt}): no feature given")
    want: dict[str, bool] = {}
    for i in range(0, len(args), 2):
        name = args[i]
        if i + 1 >= len(args):
            raise EthtoolUsageError(f"ethtool ({opt}): no value for feature '{name}'")
        try:
            on = _on_off(args[i + 1])
        except ValueError:
            raise EthtoolUsageError(
                f"ethtool ({opt}): invalid value '{args[i + 1]}' for feature '{name}' "
                "(on or off)") from None
        full = FEATURE_ALIASES.get(name, name)
        if full in want:
            raise EthtoolUsageError(f"ethtool ({opt}): duplicate feature '{name}'")
        want[full] = on
    return {"cmd": "features-set", "dev": dev, "features": want}


def _no_args(cmd: str) -> Callable[[str, str, list[str]], dict[str, Any]]:
    def parse_it(opt: str, dev: str, args: list[str]) -> dict[str, Any]:
        if args:
            raise EthtoolUsageError(f"ethtool ({opt}): unexpected parameter '{args[0]}'")
        return {"cmd": cmd, "dev": dev}
    return parse_it


# --------------------------------------------------------------------------------------------
# -x / -X


def _parse_rss_get(opt: str, dev: str, args: list[str]) -> dict[str, Any]:
    req: dict[str, Any] = {"cmd": "rss-get", "dev": dev, "context": 0}
    if not args:
        return req
    if args[0] != "context":
        raise EthtoolUsageError(f"ethtool ({opt}): unknown parameter '{args[0]}'")
    if len(args) < 2:
        raise EthtoolUsageError(f"ethtool ({opt}): no value for parameter 'context'")
    try:
        req["context"] = _u32(args[1])
    except ValueError:
        raise EthtoolUsageError(
            f"ethtool ({opt}): invalid value '{args[1]}' for parameter 'context'") from None
    if len(args) > 2:
        raise EthtoolUsageError(f"ethtool ({opt}): unexpected parameter '{args[2]}'")
    return req


def _parse_rss_set(opt: str, dev: str, args: list[str]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    i = 0

    def value(name: str) -> str:
        if i + 1 >= len(args):
            raise EthtoolUsageError(f"ethtool ({opt}): no value for parameter '{name}'")
        return args[i + 1]

    def bad(name: str, text: str) -> EthtoolUsageError:
        return EthtoolUsageError(f"ethtool ({opt}): invalid value '{text}' for parameter "
                                 f"'{name}'")

    while i < len(args):
        name = args[i]
        if name in seen:
            raise EthtoolUsageError(f"ethtool ({opt}): duplicate parameter '{name}'")
        if name in ("equal", "start"):
            text = value(name)
            try:
                seen[name] = _u32(text, lo=1 if name == "equal" else 0)
            except ValueError:
                raise bad(name, text) from None
            i += 2
        elif name == "weight":
            weights: list[int] = []
            j = i + 1
            while j < len(args) and args[j][:1].isdigit():
                try:
                    weights.append(_u32(args[j]))
                except ValueError:
                    raise bad(name, args[j]) from None
                j += 1
            if not weights:
                raise EthtoolUsageError(f"ethtool ({opt}): no value for parameter 'weight'")
            seen[name] = weights
            i = j
        elif name in ("default", "delete"):
            seen[name] = True
            i += 1
        elif name == "hkey":
            seen[name] = _parse_hkey(value(name))
            i += 2
        elif name == "hfunc":
            text = value(name)
            if text not in HASH_FUNCTIONS:
                raise EthtoolUsageError(f"Unknown hash function: {text}")
            seen[name] = text
            i += 2
        elif name == "context":
            text = value(name)
            if text == "new":
                seen[name] = "new"
            else:
                try:
                    seen[name] = _u32(text)
                except ValueError:
                    raise bad(name, text) from None
            i += 2
        else:
            raise EthtoolUsageError(f"ethtool ({opt}): unknown parameter '{name}'")

    context = seen.get("context", 0)
    if "equal" in seen and "weight" in seen:
        raise EthtoolUsageError("Equal and weight options are mutually exclusive")
    if "equal" in seen and "default" in seen:
        raise EthtoolUsageError("Equal and default options are mutually exclusive")
    if "weight" in seen and "default" in seen:
        raise EthtoolUsageError("Weight and default options are mutually exclusive")
    if "start" in seen and "default" in seen:
        raise EthtoolUsageError("Start and default options are mutually exclusive")
    if "start" in seen and "equal" not in seen and "weight" not in seen:
        raise EthtoolUsageError("Start must be used with equal or weight options")
    if "default" in seen and context != 0:
        raise EthtoolUsageError("Default and context options are mutually exclusive")
    if "weight" in seen and sum(seen["weight"]) == 0:
        raise EthtoolUsageError("At least one weight must be non-zero")
    if "delete" in seen:
        if context in (0, "new"):
            raise EthtoolUsageError("Delete option requires context option")
        for other in ("weight", "equal", "default", "hkey", "hfunc"):
            if other in seen:
                raise EthtoolUsageError(
                    f"Delete and {other} options are mutually exclusive")
    if context != "new" and not (set(seen) - {"context"}):
        raise EthtoolUsageError(f"ethtool ({opt}): nothing to change (give equal, weight, "
                                "default, hkey, hfunc, context new or delete)")
    req: dict[str, Any] = {"cmd": "rss-set", "dev": dev, **seen}
    req["context"] = context
    return req


# --------------------------------------------------------------------------------------------
# -n / -N


def _parse_ntuple_get(opt: str, dev: str, args: list[str]) -> dict[str, Any]:
    req: dict[str, Any] = {"cmd": "ntuple-get", "dev": dev}
    if not args:
        return req
    if args[0] == "rx-flow-hash":
        raise EthtoolUsageError(
            f"ethtool ({opt}): rx-flow-hash is not supported by the emulated NIC "
            "(it always hashes the TCP 4-tuple)")
    if args[0] != "rule":
        raise EthtoolUsageError(f"ethtool ({opt}): unknown parameter '{args[0]}'")
    if len(args) < 2:
        raise EthtoolUsageError(f"ethtool ({opt}): no value for parameter 'rule'")
    try:
        req["rule"] = _u32(args[1])
    except ValueError:
        raise EthtoolUsageError(
            f"ethtool ({opt}): invalid value '{args[1]}' for parameter 'rule'") from None
    if len(args) > 2:
        raise EthtoolUsageError(f"ethtool ({opt}): unexpected parameter '{args[2]}'")
    return req


def _ip_text(text: str, v6: bool) -> str:
    addr = ipaddress.ip_address(text)  # ValueError if not an address
    if addr.version != (6 if v6 else 4):
        raise ValueError(text)
    return str(addr)


_NTUPLE_VALUE_KEYS = ("src-ip", "dst-ip", "src-port", "dst-port", "src-ip-mask", "dst-ip-mask",
                      "src-port-mask", "dst-port-mask", "action", "context", "loc")


def _parse_ntuple_set(opt: str, dev: str, args: list[str]) -> dict[str, Any]:
    if not args:
        raise EthtoolUsageError(
            f"ethtool: bad command line argument(s): {opt} needs flow-type ... or delete N")
    if args[0] == "delete":
        if len(args) < 2:
            raise EthtoolUsageError("'delete' missing value")
        try:
            loc = _u32(args[1])
        except ValueError:
            raise EthtoolUsageError(f"Invalid delete value[{args[1]}]") from None
        if len(args) > 2:
            raise EthtoolUsageError(f"ethtool ({opt}): unexpected parameter '{args[2]}'")
        return {"cmd": "ntuple-delete", "dev": dev, "loc": loc}
    if args[0] == "rx-flow-hash":
        raise EthtoolUsageError(
            f"ethtool ({opt}): rx-flow-hash is not supported by the emulated NIC "
            "(it always hashes the TCP 4-tuple)")
    if args[0] != "flow-type":
        raise EthtoolUsageError(f"Add rule, invalid syntax: unknown parameter '{args[0]}'")
    if len(args) < 2:
        raise EthtoolUsageError("'flow-type' missing value")
    flow_type = args[1]
    if flow_type in OTHER_FLOW_TYPES:
        raise EthtoolUsageError(
            f"flow-type {flow_type} is not supported by the emulated NIC (tcp4 and tcp6 only)")
    if flow_type not in FLOW_TYPES:
        raise EthtoolUsageError(f"rxclass: Unknown flow type {flow_type!r}")
    v6 = flow_type == "tcp6"
    req: dict[str, Any] = {"cmd": "ntuple-add", "dev": dev, "flow_type": flow_type}

    def parse_field(field: str, text: str, what: str) -> Any:
        """Parse a value ('value') or mask ('mask') of ``field``."""
        try:
            if field.endswith("-ip"):
                return _ip_text(text, v6)
            return _u32(text, hi=0xFFFF)
        except ValueError:
            raise EthtoolUsageError(f"Invalid {field} {what}[{text}]") from None

    def put(key: str, value: Any, shown: str) -> None:
        if key in req:
            raise EthtoolUsageError(f"Add rule, invalid syntax: duplicate parameter '{shown}'")
        req[key] = value

    i = 2
    while i < len(args):
        name = args[i]
        if name in _NTUPLE_VALUE_KEYS and i + 1 >= len(args):
            raise EthtoolUsageError(f"'{name}' missing value")
        if name in ("src-ip", "dst-ip", "src-port", "dst-port"):
            key = name.replace("-", "_")
            put(key, parse_field(name, args[i + 1], "value"), name)
            i += 2
            if i < len(args) and args[i] == "m":
                if i + 1 >= len(args):
                    raise EthtoolUsageError("'m' missing value")
                put(key + "_mask", parse_field(name, args[i + 1], "mask"), name + "-mask")
                i += 2
        elif name in ("src-ip-mask", "dst-ip-mask", "src-port-mask", "dst-port-mask"):
            field = name[: -len("-mask")]
            put(name.replace("-", "_"), parse_field(field, args[i + 1], "mask"), name)
            i += 2
        elif name == "action":
            text = args[i + 1]
            try:
                action = _c_int(text)
            except ValueError:
                raise EthtoolUsageError(f"Invalid action value[{text}]") from None
            if action == -2:
                raise EthtoolUsageError(
                    "action -2 (Wake-on-LAN) is not supported by the emulated NIC")
            if action < -1 or action > U32_MAX:
                raise EthtoolUsageError(f"Invalid action value[{text}]")
            put("action", action, name)
            i += 2
        elif name in ("context", "loc"):
            text = args[i + 1]
            try:
                put(name, _u32(text), name)
            except ValueError:
                raise EthtoolUsageError(f"Invalid {name} value[{text}]") from None
            i += 2
        elif name == "m":
            raise EthtoolUsageError("Add rule, invalid syntax: 'm' must follow a field value")
        elif name in UNSUPPORTED_NTUPLE_KEYS:
            raise EthtoolUsageError(
                f"Add rule, invalid syntax: '{name}' is not supported by the emulated NIC")
        else:
            raise EthtoolUsageError(f"Add rule, invalid syntax: unknown parameter '{name}'")
    if req.get("action") == -1 and "context" in req:
        raise EthtoolUsageError(
            "Add rule, invalid syntax: action -1 (drop) cannot be combined with context")
    return req


# --------------------------------------------------------------------------------------------
# Dispatch

_Parser = Callable[[str, str, list[str]], dict[str, Any]]

#: option spelling -> (canonical short option, parser)
COMMANDS: dict[str, tuple[str, _Parser]] = {}


def _register(spellings: Sequence[str], parser: _Parser) -> None:
    for s in spellings:
        COMMANDS[s] = (spellings[0], parser)


_register(("-l", "--show-channels"), _no_args("channels-get"))
_register(("-L", "--set-channels"), _parse_channels_set)
_register(("-g", "--show-ring"), _no_args("rings-get"))
_register(("-G", "--set-ring"), _parse_rings_set)
_register(("-x", "--show-rxfh-indir", "--show-rxfh"), _parse_rss_get)
_register(("-X", "--set-rxfh-indir", "--rxfh"), _parse_rss_set)
_register(("-n", "-u", "--show-ntuple", "--show-nfc"), _parse_ntuple_get)
_register(("-N", "-U", "--config-ntuple", "--config-nfc"), _parse_ntuple_set)
_register(("-S", "--statistics"), _no_args("stats-get"))
_register(("-c", "--show-coalesce"), _no_args("coalesce-get"))
_register(("-C", "--coalesce"), _parse_coalesce_set)
_register(("-k", "--show-features", "--show-offload"), _no_args("features-get"))
_register(("-K", "--features", "--offload"), _parse_features_set)


def parse(argv: Sequence[str]) -> dict[str, Any]:
    """Parse ``[ethtool] OPTION DEV ARGS...`` into a request dict (see module docstring).

    Raises :class:`EthtoolUsageError` for any command line ethtool would reject.
    """
    args = list(argv)
    if args and os.path.basename(args[0]) == "ethtool":
        args = args[1:]
    if not args:
        raise EthtoolUsageError("ethtool: bad command line argument(s): no option given")
    opt = args[0]
    if opt not in COMMANDS:
        known = " ".join(sorted({v[0] for v in COMMANDS.values()}))
        raise EthtoolUsageError(f"ethtool: unsupported option '{opt}' (supported: {known})")
    short, parser = COMMANDS[opt]
    dev, rest = _need_dev(short, args[1:])
    return parser(short, dev, rest)


# --------------------------------------------------------------------------------------------
# Output


def _ntop6(text: str) -> str:
    """IPv6 text as glibc's inet_ntop writes it (embedded IPv4 for ::ffff:a.b.c.d, ::a.b.c.d)."""
    addr = ipaddress.IPv6Address(text)
    words = [int.from_bytes(addr.packed[i:i + 2], "big") for i in range(0, 16, 2)]
    if words[:5] == [0] * 5 and (words[5] == 0xFFFF or (words[5] == 0 and words[6] != 0)):
        v4 = ipaddress.IPv4Address(addr.packed[12:])
        return ("::ffff:" if words[5] == 0xFFFF else "::") + str(v4)
    return addr.compressed


def _addr(text: str, v6: bool) -> str:
    return _ntop6(text) if v6 else str(ipaddress.IPv4Address(text))


def _tabbed(label: str, value: str, column: int) -> str:
    """``label`` padded with tabs to ``column`` (8-column tab stops), then ``value``."""
    tabs = max(1, column // 8 - len(label) // 8)
    return f"{label}{chr(9) * tabs}{value}\n"


def _na(value: Any) -> str:
    return "n/a" if value is None else str(value)


def format_channels(dev: str, reply: Mapping[str, Any]) -> str:
    """``ethtool -l`` output; a kind whose max is 0 (or missing) shows ``n/a``."""
    kinds = (("RX:", "rx"), ("TX:", "tx"), ("Other:", "other"), ("Combined:", "combined"))
    out = [f"Channel parameters for {dev}:\n", "Pre-set maximums:\n"]
    for label, key in kinds:
        mx = reply.get(f"{key}_max")
        out.append(_tabbed(label, _na(mx or None), 16))
    out.append("Current hardware settings:\n")
    for label, key in kinds:
        mx = reply.get(f"{key}_max")
        out.append(_tabbed(label, _na(reply.get(f"{key}_count") if mx else None), 16))
    return "".join(out)


def format_rings(dev: str, reply: Mapping[str, Any]) -> str:
    """``ethtool -g`` output (the 6.13+ layout with ``TCP data split:`` and ``HDS thresh:``)."""
    def ring(key: str) -> str:
        return _na(reply.get(key) if reply.get(f"{key}_max") else None)

    def nonzero(key: str) -> str:
        return _na(reply.get(key) or None)

    def onoff(key: str) -> str:
        v = reply.get(key)
        return "n/a" if v is None else ("on" if v else "off")

    tds = reply.get("tcp_data_split")
    tds_text = tds if tds in ("on", "off") else "n/a"
    col = 24
    out = [f"Ring parameters for {dev}:\n", "Pre-set maximums:\n"]
    out += [_tabbed("RX:", nonzero("rx_max"), col),
            _tabbed("RX Mini:", nonzero("rx_mini_max"), col),
            _tabbed("RX Jumbo:", nonzero("rx_jumbo_max"), col),
            _tabbed("TX:", nonzero("tx_max"), col),
            _tabbed("TX push buff len:", nonzero("tx_push_buf_len_max"), col),
            _tabbed("HDS thresh:", _na(reply.get("hds_thresh_max")), col),
            "Current hardware settings:\n",
            _tabbed("RX:", ring("rx"), col),
            _tabbed("RX Mini:", ring("rx_mini"), col),
            _tabbed("RX Jumbo:", ring("rx_jumbo"), col),
            _tabbed("TX:", ring("tx"), col),
            _tabbed("RX Buf Len:", nonzero("rx_buf_len"), col),
            _tabbed("CQE Size:", nonzero("cqe_size"), col),
            _tabbed("TX Push:", onoff("tx_push"), col),
            _tabbed("RX Push:", onoff("rx_push"), col),
            _tabbed("TX push buff len:",
                    _na(reply.get("tx_push_buf_len") if reply.get("tx_push_buf_len_max")
                        else None), col),
            _tabbed("TCP data split:", tds_text, col),
            _tabbed("HDS thresh:", _na(reply.get("hds_thresh")), col)]
    return "".join(out)


#: ``ethtool -c`` blocks after the ``Adaptive`` line: (label, reply key or None = n/a)
_COALESCE_BLOCKS: tuple[tuple[tuple[str, str | None], ...], ...] = (
    (("stats-block-usecs:", None), ("sample-interval:", None), ("pkt-rate-low:", None),
     ("pkt-rate-high:", None)),
    (("rx-usecs:", "rx_usecs"), ("rx-frames:", "rx_frames"), ("rx-usecs-irq:", None),
     ("rx-frames-irq:", None)),
    (("tx-usecs:", None), ("tx-frames:", None), ("tx-usecs-irq:", None),
     ("tx-frames-irq:", None)),
    (("rx-usecs-low:", None), ("rx-frame-low:", None), ("tx-usecs-low:", None),
     ("tx-frame-low:", None)),
    (("rx-usecs-high:", None), ("rx-frame-high:", None), ("tx-usecs-high:", None),
     ("tx-frame-high:", None)),
)


def format_coalesce(dev: str, reply: Mapping[str, Any]) -> str:
    """``ethtool -c`` output: the adaptive line, then blocks of ``name: value`` (``n/a``
    for what the device does not support), separated by blank lines."""
    def onoff(key: str) -> str:
        v = reply.get(key)
        return "n/a" if v is None else ("on" if v else "off")

    out = [f"Coalesce parameters for {dev}:\n",
           f"Adaptive RX: {onoff('adaptive_rx')}  TX: {onoff('adaptive_tx')}\n"]
    for i, block in enumerate(_COALESCE_BLOCKS):
        if i:
            out.append("\n")
        for label, key in block:
            out.append(_tabbed(label, _na(reply.get(key) if key else None), 16))
    return "".join(out)


def format_features(dev: str, reply: Mapping[str, Any]) -> str:
    """``ethtool -k``: one ``name: on|off`` line per feature, ``[fixed]`` when it cannot
    change."""
    out = [f"Features for {dev}:\n"]
    for name, on, fixed in reply.get("features", []):
        out.append(f"{name}: {'on' if on else 'off'}{' [fixed]' if fixed else ''}\n")
    return "".join(out)


def format_rss(dev: str, reply: Mapping[str, Any]) -> str:
    """``ethtool -x`` output: the table in rows of 8, the key, the hash function block."""
    indir = list(reply.get("indir", []))
    out = [f"RX flow hash indirection table for {dev} with {reply['n_rx_rings']} RX ring(s):\n"]
    for row in range(0, len(indir), 8):
        out.append(f"{row:5d}: " + "".join(f" {q:5d}" for q in indir[row:row + 8]) + "\n")
    out.append("RSS hash key:\n")
    key = bytes.fromhex(reply.get("hkey") or "")
    out.append((":".join(f"{b:02x}" for b in key) if key else "Operation not supported") + "\n")
    out.append("RSS hash function:\n")
    active = reply.get("hfunc")
    for name in HASH_FUNCTIONS:
        out.append(f"    {name}: {'on' if name == active else 'off'}\n")
    if "input_xfrm" in reply:
        enabled = set(reply.get("input_xfrm") or ())
        out.append("RSS input transformation:\n")
        out.append(f"    symmetric-xor: {'on' if 'symmetric-xor' in enabled else 'off'}\n")
    return "".join(out)


def format_ntuple_rule(rule: Mapping[str, Any]) -> str:
    """One ``Filter:`` block of ``ethtool -n`` (followed by a blank line)."""
    v6 = rule["flow_type"] == "tcp6"
    out = [f"Filter: {rule['loc']}\n",
           f"\tRule Type: TCP over IPv{6 if v6 else 4}\n",
           f"\tSrc IP addr: {_addr(rule['src_ip'], v6)} mask: {_addr(rule['src_ip_mask'], v6)}\n",
           f"\tDest IP addr: {_addr(rule['dst_ip'], v6)} mask: "
           f"{_addr(rule['dst_ip_mask'], v6)}\n",
           ("\tTraffic Class: 0x0 mask: 0xff\n" if v6 else "\tTOS: 0x0 mask: 0xff\n"),
           f"\tSrc port: {rule['src_port']} mask: 0x{rule['src_port_mask']:x}\n",
           f"\tDest port: {rule['dst_port']} mask: 0x{rule['dst_port_mask']:x}\n"]
    context = rule.get("context")
    if context is not None:
        out.append(f"\tRSS Context ID: {context}\n")
    if context is None and rule["action"] == -1:
        out.append("\tAction: Drop\n")
    else:
        out.append(f"\tAction: Direct to queue {rule['action']}\n")
    out.append("\n")
    return "".join(out)


def format_ntuple_list(reply: Mapping[str, Any]) -> str:
    """``ethtool -n DEV``: ring count, rule count, a blank line, then every rule."""
    rules = list(reply.get("rules", []))
    out = [f"{reply['n_rx_rings']} RX rings available\n", f"Total {len(rules)} rules\n\n"]
    out += [format_ntuple_rule(r) for r in rules]
    return "".join(out)


def format_stats(reply: Mapping[str, Any]) -> str:
    """``ethtool -S``: ``NIC statistics:`` then ``     name: value`` per counter."""
    stats = reply.get("stats", {})
    items = stats.items() if isinstance(stats, Mapping) else stats
    return "NIC statistics:\n" + "".join(f"     {name}: {value}\n" for name, value in items)


def format_reply(request: Mapping[str, Any], reply: Mapping[str, Any]) -> str:
    """What ethtool prints on stdout for a successful ``request`` (``""`` when silent)."""
    cmd = request["cmd"]
    dev = request["dev"]
    if cmd == "channels-get":
        return format_channels(dev, reply)
    if cmd == "rings-get":
        return format_rings(dev, reply)
    if cmd == "rss-get":
        return format_rss(dev, reply)
    if cmd == "rss-set":
        if request.get("context") == "new":
            return f"New RSS context is {reply['context']}\n"
        return ""
    if cmd == "ntuple-get":
        if "rule" in reply:
            return format_ntuple_rule(reply["rule"])
        return format_ntuple_list(reply)
    if cmd == "ntuple-add":
        if "loc" in request:
            return ""
        return f"Added rule with ID {reply['loc']}\n"
    if cmd == "stats-get":
        return format_stats(reply)
    if cmd == "coalesce-get":
        return format_coalesce(dev, reply)
    if cmd == "features-get":
        return format_features(dev, reply)
    if cmd in ("channels-set", "rings-set", "ntuple-delete", "coalesce-set", "features-set"):
        return ""
    raise ValueError(f"unknown command {cmd!r}")


_ERROR_LINES: dict[str, tuple[str, str]] = {
    # cmd: (perror prefix, follow-up line)
    "rss-get": ("Cannot get RX flow hash configuration", ""),
    "rss-set": ("Cannot set RX flow hash configuration", ""),
    "ntuple-add": ("rmgr: Cannot insert RX class rule", "Cannot insert classification rule"),
    "ntuple-delete": ("rmgr: Cannot delete RX class rule", "Cannot delete classification rule"),
    "stats-get": ("Cannot get stats information", ""),
}


def format_error(request: Mapping[str, Any], errno_: int, message: str = "") -> str:
    """What ethtool prints on stderr when the device refuses ``request`` with ``errno_``.

    ``message`` (the NIC's explanation, like a netlink extack) is printed first when given.
    """
    cmd = request["cmd"]
    reason = os.strerror(errno_)
    out = []
    if cmd in ("channels-get", "channels-set", "rings-get", "rings-set", "coalesce-get",
               "coalesce-set", "features-get", "features-set"):
        if message:
            out.append(f"netlink error: {message}\n")
        out.append(f"netlink error: {reason}\n")
        return "".join(out)
    if message:
        out.append(message + "\n")
    if cmd == "ntuple-get":
        if "rule" in request:
            out.append(f"rxclass: Cannot get RX class rule: {reason}\n")
            out.append("Cannot get RX classification rule\n")
        else:
            out.append(f"rxclass: Cannot get RX class rules: {reason}\n")
            out.append("RX classification rule retrieval failed\n")
        return "".join(out)
    prefix, follow = _ERROR_LINES.get(cmd, (f"Cannot run {cmd}", ""))
    out.append(f"{prefix}: {reason}\n")
    if follow:
        out.append(follow + "\n")
    return "".join(out)
