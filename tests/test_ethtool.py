"""The ethtool front end: grammar -> request dicts, reply dicts -> ethtool's output."""

from __future__ import annotations

import errno
import ipaddress
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launch.ethtool import (
    EthtoolUsageError,
    format_channels,
    format_error,
    format_ntuple_list,
    format_ntuple_rule,
    format_reply,
    format_rings,
    format_rss,
    format_stats,
    parse,
)
from nic_proc.ntuple import Steering
from nic_proc.rss import DEFAULT_RSS_KEY, SteeringError

KEY_COLONS = ":".join(f"{b:02x}" for b in DEFAULT_RSS_KEY)


def p(cmdline: str) -> dict[str, Any]:
    req = parse(cmdline.split())
    assert json.loads(json.dumps(req)) == req  # goes over the control plane as JSON
    return req


# --------------------------------------------------------------------------------------------
# Grammar


@pytest.mark.parametrize("opt", ["-l", "--show-channels"])
def test_show_channels(opt: str) -> None:
    assert p(f"{opt} eth0") == {"cmd": "channels-get", "dev": "eth0"}


@pytest.mark.parametrize("opt", ["-L", "--set-channels"])
def test_set_channels(opt: str) -> None:
    assert p(f"{opt} eth0 combined 4 rx 0x2 other 1 tx 010") == {
        "cmd": "channels-set", "dev": "eth0", "combined": 4, "rx": 2, "other": 1, "tx": 8}
    assert p(f"{opt} eth0") == {"cmd": "channels-set", "dev": "eth0"}


@pytest.mark.parametrize("opt", ["-g", "--show-ring"])
def test_show_ring(opt: str) -> None:
    assert p(f"{opt} eth0") == {"cmd": "rings-get", "dev": "eth0"}


@pytest.mark.parametrize("opt", ["-G", "--set-ring"])
def test_set_ring(opt: str) -> None:
    assert p(f"{opt} eth0 rx 64 tcp-data-split on hds-thresh 0") == {
        "cmd": "rings-set", "dev": "eth0", "rx": 64, "tcp_data_split": "on", "hds_thresh": 0}
    assert p(f"{opt} eth0 tx 512 rx-buf-len 4096 rx-mini 0 rx-jumbo 0 cqe-size 64 tx-push off "
             "rx-push on tx-push-buf-len 0 tcp-data-split auto") == {
        "cmd": "rings-set", "dev": "eth0", "tx": 512, "rx_buf_len": 4096, "rx_mini": 0,
        "rx_jumbo": 0, "cqe_size": 64, "tx_push": False, "rx_push": True,
        "tx_push_buf_len": 0, "tcp_data_split": "auto"}


@pytest.mark.parametrize("opt", ["-x", "--show-rxfh-indir", "--show-rxfh"])
def test_show_rxfh(opt: str) -> None:
    assert p(f"{opt} eth0") == {"cmd": "rss-get", "dev": "eth0", "context": 0}
    assert p(f"{opt} eth0 context 3") == {"cmd": "rss-get", "dev": "eth0", "context": 3}


@pytest.mark.parametrize("opt", ["-X", "--set-rxfh-indir", "--rxfh"])
def test_set_rxfh(opt: str) -> None:
    assert p(f"{opt} eth0 equal 3") == {"cmd": "rss-set", "dev": "eth0", "context": 0,
                                        "equal": 3}
    assert p(f"{opt} eth0 weight 1 1 2 hfunc toeplitz") == {
        "cmd": "rss-set", "dev": "eth0", "context": 0, "weight": [1, 1, 2],
        "hfunc": "toeplitz"}
    assert p(f"{opt} eth0 default") == {"cmd": "rss-set", "dev": "eth0", "context": 0,
                                        "default": True}
    assert p(f"{opt} eth0 context new start 3 equal 1") == {
        "cmd": "rss-set", "dev": "eth0", "context": "new", "start": 3, "equal": 1}
    assert p(f"{opt} eth0 context new") == {"cmd": "rss-set", "dev": "eth0",
                                            "context": "new"}
    assert p(f"{opt} eth0 delete context 2") == {"cmd": "rss-set", "dev": "eth0",
                                                 "context": 2, "delete": True}
    assert p(f"{opt} eth0 hkey {KEY_COLONS.upper()}") == {
        "cmd": "rss-set", "dev": "eth0", "context": 0, "hkey": DEFAULT_RSS_KEY.hex()}
    assert p(f"{opt} eth0 context 1 weight 0 2 start 1") == {
        "cmd": "rss-set", "dev": "eth0", "context": 1, "weight": [0, 2], "start": 1}


@pytest.mark.parametrize("opt", ["-n", "-u", "--show-ntuple", "--show-nfc"])
def test_show_ntuple(opt: str) -> None:
    assert p(f"{opt} eth0") == {"cmd": "ntuple-get", "dev": "eth0"}
    assert p(f"{opt} eth0 rule 1023") == {"cmd": "ntuple-get", "dev": "eth0", "rule": 1023}


@pytest.mark.parametrize("opt", ["-N", "-U", "--config-ntuple", "--config-nfc"])
def test_config_ntuple(opt: str) -> None:
    assert p(f"{opt} eth0 flow-type tcp6 dst-port 9999 action 3") == {
        "cmd": "ntuple-add", "dev": "eth0", "flow_type": "tcp6", "dst_port": 9999,
        "action": 3}
    assert p(f"{opt} eth0 flow-type tcp6 dst-port 9999 context 1") == {
        "cmd": "ntuple-add", "dev": "eth0", "flow_type": "tcp6", "dst_port": 9999,
        "context": 1}
    assert p(f"{opt} eth0 flow-type tcp4 src-ip 10.0.0.1 m 0.0.0.255 dst-ip 10.0.0.2 "
             "src-port 1000 m 0xff dst-port 80 action -1 loc 7") == {
        "cmd": "ntuple-add", "dev": "eth0", "flow_type": "tcp4", "src_ip": "10.0.0.1",
        "src_ip_mask": "0.0.0.255", "dst_ip": "10.0.0.2", "src_port": 1000,
        "src_port_mask": 255, "dst_port": 80, "action": -1, "loc": 7}
    assert p(f"{opt} eth0 flow-type tcp6 src-ip 2001:DB8:0:0::1 src-ip-mask ::ffff "
             "dst-port-mask 0xf context 2 action 1") == {
        "cmd": "ntuple-add", "dev": "eth0", "flow_type": "tcp6", "src_ip": "2001:db8::1",
        "src_ip_mask": "::ffff", "dst_port_mask": 15, "context": 2, "action": 1}
    assert p(f"{opt} eth0 delete 1023") == {"cmd": "ntuple-delete", "dev": "eth0",
                                            "loc": 1023}


@pytest.mark.parametrize("opt", ["-S", "--statistics"])
def test_statistics(opt: str) -> None:
    assert p(f"{opt} eth0") == {"cmd": "stats-get", "dev": "eth0"}


def test_program_name_is_skipped() -> None:
    assert parse(["ethtool", "-l", "eth0"]) == parse(["-l", "eth0"])
    assert parse(["/usr/sbin/ethtool", "-l", "eth0"]) == parse(["-l", "eth0"])


# Every error path: (command line, the message, as a regex fragment)
ERRORS = [
    ("", r"^ethtool: bad command line argument\(s\): no option given$"),
    ("-Z eth0", r"^ethtool: unsupported option '-Z'"),
    ("-l", r"-l needs a device"),
    ("-l -x", r"-l needs a device"),
    ("-l abcdefghijklmnop", r"^Device name longer than 15 characters$"),
    ("-l eth0 extra", r"^ethtool \(-l\): unexpected parameter 'extra'$"),
    ("-g eth0 extra", r"^ethtool \(-g\): unexpected parameter 'extra'$"),
    ("-S eth0 --all-groups", r"^ethtool \(-S\): unexpected parameter '--all-groups'$"),
    ("-L eth0 rx", r"^ethtool \(-L\): no value for parameter 'rx'$"),
    ("-L eth0 rx x", r"^ethtool \(-L\): invalid value 'x' for parameter 'rx'$"),
    ("-L eth0 rx -1", r"^ethtool \(-L\): invalid value '-1' for parameter 'rx'$"),
    ("-L eth0 rx 4294967296", r"invalid value '4294967296' for parameter 'rx'"),
    ("-L eth0 foo 1", r"^ethtool \(-L\): unknown parameter 'foo'$"),
    ("-L eth0 rx 1 rx 2", r"^ethtool \(-L\): duplicate parameter 'rx'$"),
    ("-G eth0 tcp-data-split maybe",
     r"^ethtool \(-G\): invalid value 'maybe' for parameter 'tcp-data-split'$"),
    ("-G eth0 tx-push yes", r"invalid value 'yes' for parameter 'tx-push'"),
    ("-G eth0 hds-thresh", r"no value for parameter 'hds-thresh'"),
    ("-G eth0 combined 2", r"unknown parameter 'combined'"),
    ("-x eth0 context", r"^ethtool \(-x\): no value for parameter 'context'$"),
    ("-x eth0 context x", r"invalid value 'x' for parameter 'context'"),
    ("-x eth0 foo", r"^ethtool \(-x\): unknown parameter 'foo'$"),
    ("-x eth0 context 1 more", r"unexpected parameter 'more'"),
    ("-X eth0", r"nothing to change"),
    ("-X eth0 context 1", r"nothing to change"),
    ("-X eth0 equal 0", r"invalid value '0' for parameter 'equal'"),
    ("-X eth0 equal x", r"invalid value 'x' for parameter 'equal'"),
    ("-X eth0 equal", r"no value for parameter 'equal'"),
    ("-X eth0 weight", r"no value for parameter 'weight'"),
    ("-X eth0 weight hfunc toeplitz", r"no value for parameter 'weight'"),
    ("-X eth0 weight 1 2x", r"invalid value '2x' for parameter 'weight'"),
    ("-X eth0 weight 0 0", r"^At least one weight must be non-zero$"),
    ("-X eth0 start x equal 2", r"invalid value 'x' for parameter 'start'"),
    ("-X eth0 equal 2 weight 1 1", r"^Equal and weight options are mutually exclusive$"),
    ("-X eth0 equal 2 default", r"^Equal and default options are mutually exclusive$"),
    ("-X eth0 weight 1 default", r"^Weight and default options are mutually exclusive$"),
    ("-X eth0 default start 1", r"^Start and default options are mutually exclusive$"),
    ("-X eth0 start 1", r"^Start must be used with equal or weight options$"),
    ("-X eth0 hkey 00:11 start 1", r"^Start must be used with equal or weight options$"),
    ("-X eth0 default context 1", r"^Default and context options are mutually exclusive$"),
    ("-X eth0 default context new", r"^Default and context options are mutually exclusive$"),
    ("-X eth0 delete", r"^Delete option requires context option$"),
    ("-X eth0 delete context 0", r"^Delete option requires context option$"),
    ("-X eth0 delete context new", r"^Delete option requires context option$"),
    ("-X eth0 delete context 1 weight 1", r"^Delete and weight options are mutually exclusive$"),
    ("-X eth0 delete context 1 equal 1", r"^Delete and equal options are mutually exclusive$"),
    ("-X eth0 delete context 1 hkey 00", r"^Delete and hkey options are mutually exclusive$"),
    ("-X eth0 delete context 1 hfunc xor", r"^Delete and hfunc options are mutually exclusive$"),
    ("-X eth0 hkey 6d:5a:5", r"^Invalid RSS hash key format$"),
    ("-X eth0 hkey 6d5a", r"^Invalid RSS hash key format$"),
    ("-X eth0 hkey zz:00", r"^Invalid RSS hash key format$"),
    ("-X eth0 hkey", r"no value for parameter 'hkey'"),
    ("-X eth0 hfunc md5", r"^Unknown hash function: md5$"),
    ("-X eth0 context x", r"invalid value 'x' for parameter 'context'"),
    ("-X eth0 equal 2 equal 3", r"duplicate parameter 'equal'"),
    ("-X eth0 foo", r"^ethtool \(-X\): unknown parameter 'foo'$"),
    ("-n eth0 rule", r"no value for parameter 'rule'"),
    ("-n eth0 rule x", r"invalid value 'x' for parameter 'rule'"),
    ("-n eth0 rule 1 2", r"unexpected parameter '2'"),
    ("-n eth0 foo", r"unknown parameter 'foo'"),
    ("-n eth0 rx-flow-hash tcp4", r"rx-flow-hash is not supported"),
    ("-N eth0", r"needs flow-type \.\.\. or delete N"),
    ("-N eth0 delete", r"^'delete' missing value$"),
    ("-N eth0 delete x", r"^Invalid delete value\[x\]$"),
    ("-N eth0 delete 1 2", r"unexpected parameter '2'"),
    ("-N eth0 rx-flow-hash tcp4 sdfn", r"rx-flow-hash is not supported"),
    ("-N eth0 foo", r"^Add rule, invalid syntax: unknown parameter 'foo'$"),
    ("-N eth0 flow-type", r"^'flow-type' missing value$"),
    ("-N eth0 flow-type foo", r"^rxclass: Unknown flow type 'foo'$"),
    ("-N eth0 flow-type udp4 dst-port 1", r"flow-type udp4 is not supported"),
    ("-N eth0 flow-type tcp4 src-ip 1.2.3", r"^Invalid src-ip value\[1\.2\.3\]$"),
    ("-N eth0 flow-type tcp4 dst-ip ::1", r"^Invalid dst-ip value\[::1\]$"),
    ("-N eth0 flow-type tcp6 src-ip 1.2.3.4", r"^Invalid src-ip value\[1\.2\.3\.4\]$"),
    ("-N eth0 flow-type tcp4 src-ip 1.2.3.4 m 1.2", r"^Invalid src-ip mask\[1\.2\]$"),
    ("-N eth0 flow-type tcp4 src-port 70000", r"^Invalid src-port value\[70000\]$"),
    ("-N eth0 flow-type tcp4 dst-port 1 m 0x10000", r"^Invalid dst-port mask\[0x10000\]$"),
    ("-N eth0 flow-type tcp4 dst-port-mask z", r"^Invalid dst-port mask\[z\]$"),
    ("-N eth0 flow-type tcp4 dst-port", r"^'dst-port' missing value$"),
    ("-N eth0 flow-type tcp4 dst-port 1 m", r"^'m' missing value$"),
    ("-N eth0 flow-type tcp4 m 1", r"'m' must follow a field value"),
    ("-N eth0 flow-type tcp4 action", r"^'action' missing value$"),
    ("-N eth0 flow-type tcp4 action x", r"^Invalid action value\[x\]$"),
    ("-N eth0 flow-type tcp4 action -3", r"^Invalid action value\[-3\]$"),
    ("-N eth0 flow-type tcp4 action -2", r"Wake-on-LAN\) is not supported"),
    ("-N eth0 flow-type tcp4 context", r"^'context' missing value$"),
    ("-N eth0 flow-type tcp4 context x", r"^Invalid context value\[x\]$"),
    ("-N eth0 flow-type tcp4 loc -1", r"^Invalid loc value\[-1\]$"),
    ("-N eth0 flow-type tcp4 action -1 context 1", r"cannot be combined with context"),
    ("-N eth0 flow-type tcp4 dst-port 1 dst-port 2", r"duplicate parameter 'dst-port'"),
    ("-N eth0 flow-type tcp4 src-ip 1.2.3.4 m 0.0.0.1 src-ip-mask 0.0.0.2",
     r"duplicate parameter 'src-ip-mask'"),
    ("-N eth0 flow-type tcp4 tos 4", r"'tos' is not supported by the emulated NIC"),
    ("-N eth0 flow-type tcp4 vf 1 queue 2", r"'vf' is not supported by the emulated NIC"),
    ("-N eth0 flow-type tcp4 bogus 1", r"^Add rule, invalid syntax: unknown parameter 'bogus'$"),
]


@pytest.mark.parametrize(("cmdline", "message"), ERRORS)
def test_usage_errors(cmdline: str, message: str) -> None:
    with pytest.raises(EthtoolUsageError, match=message) as ei:
        parse(cmdline.split())
    assert isinstance(ei.value, ValueError)
    assert "\n" not in str(ei.value)


_port = st.integers(0, 65535)


@st.composite
def _ntuple_cmdline(draw: st.DrawFn) -> tuple[list[str], dict[str, Any]]:
    v6 = draw(st.booleans())
    addr = (st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address) if v6
            else st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address))
    argv = ["-N", "eth0", "flow-type", "tcp6" if v6 else "tcp4"]
    want: dict[str, Any] = {"cmd": "ntuple-add", "dev": "eth0",
                            "flow_type": "tcp6" if v6 else "tcp4"}
    for field in ("src-ip", "dst-ip", "src-port", "dst-port"):
        if not draw(st.booleans()):
            continue
        key = field.replace("-", "_")
        is_ip = field.endswith("ip")
        if is_ip:
            val, mask = str(draw(addr)), str(draw(addr))
            argv += [field, val]
            want[key] = val
        else:
            port, pmask = draw(_port), draw(_port)
            argv += [field, str(port)]
            want[key] = port
            mask = hex(pmask)
        if draw(st.booleans()):
            argv += ["m", mask]
            want[key + "_mask"] = mask if is_ip else pmask
    if draw(st.booleans()):
        ctx = draw(st.integers(0, 10))
        argv += ["context", str(ctx)]
        want["context"] = ctx
        if draw(st.booleans()):
            off = draw(st.integers(0, 10))
            argv += ["action", str(off)]
            want["action"] = off
    else:
        act = draw(st.integers(-1, 64))
        argv += ["action", str(act)]
        want["action"] = act
    if draw(st.booleans()):
        loc = draw(st.integers(0, 1023))
        argv += ["loc", str(loc)]
        want["loc"] = loc
    return argv, want


@settings(max_examples=150, deadline=None)
@given(case=_ntuple_cmdline())
def test_ntuple_grammar_round_trip(case: tuple[list[str], dict[str, Any]]) -> None:
    argv, want = case
    req = parse(argv)
    assert req == want
    assert json.loads(json.dumps(req)) == req


@settings(max_examples=100, deadline=None)
@given(params=st.dictionaries(st.sampled_from(["rx", "tx", "rx-buf-len", "hds-thresh",
                                               "rx-mini", "cqe-size"]),
                              st.integers(0, 2**32 - 1), max_size=6),
       tds=st.none() | st.sampled_from(["auto", "on", "off"]))
def test_rings_grammar_round_trip(params: dict[str, int], tds: str | None) -> None:
    argv = ["-G", "eth0"]
    for k, v in params.items():
        argv += [k, str(v)]
    want: dict[str, Any] = {"cmd": "rings-set", "dev": "eth0",
                            **{k.replace("-", "_"): v for k, v in params.items()}}
    if tds is not None:
        argv += ["tcp-data-split", tds]
        want["tcp_data_split"] = tds
    assert parse(argv) == want


# --------------------------------------------------------------------------------------------
# Output shapes


def test_format_rss_rows_of_eight_and_key() -> None:
    reply = {"context": 0, "n_rx_rings": 4, "indir": [i % 4 for i in range(128)],
             "hkey": DEFAULT_RSS_KEY.hex(), "hfunc": "toeplitz"}
    out = format_rss("eth0", reply)
    lines = out.splitlines()
    assert lines[0] == "RX flow hash indirection table for eth0 with 4 RX ring(s):"
    assert lines[1] == "    0:      0     1     2     3     0     1     2     3"
    assert lines[2] == "    8:      0     1     2     3     0     1     2     3"
    assert lines[16] == "  120:      0     1     2     3     0     1     2     3"
    assert lines[17] == "RSS hash key:"
    assert lines[18] == KEY_COLONS
    assert lines[19:] == ["RSS hash function:", "    toeplitz: on", "    xor: off",
                          "    crc32: off"]
    assert out.endswith("\n")


def test_format_rss_short_last_row_and_input_xfrm() -> None:
    reply = {"context": 1, "n_rx_rings": 16, "indir": list(range(10)), "hkey": "",
             "hfunc": "toeplitz", "input_xfrm": []}
    lines = format_rss("eth1", reply).splitlines()
    assert lines[2] == "    8:      8     9"
    assert lines[3:5] == ["RSS hash key:", "Operation not supported"]
    assert lines[-2:] == ["RSS input transformation:", "    symmetric-xor: off"]


def test_format_ntuple_list_inverted_masks() -> None:
    rules = [
        {"loc": 5, "flow_type": "tcp4", "src_ip": "10.0.0.1", "src_ip_mask": "0.0.0.255",
         "dst_ip": "0.0.0.0", "dst_ip_mask": "255.255.255.255", "src_port": 0,
         "src_port_mask": 0xFFFF, "dst_port": 80, "dst_port_mask": 0, "action": 2,
         "context": None},
        {"loc": 1023, "flow_type": "tcp6", "src_ip": "::", "src_ip_mask":
         "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "dst_ip": "::ffff:10.0.0.1",
         "dst_ip_mask": "::", "src_port": 0, "src_port_mask": 0xFFFF, "dst_port": 9999,
         "dst_port_mask": 0, "action": 0, "context": 1},
        {"loc": 1022, "flow_type": "tcp4", "src_ip": "0.0.0.0",
         "src_ip_mask": "255.255.255.255", "dst_ip": "0.0.0.0",
         "dst_ip_mask": "255.255.255.255", "src_port": 0, "src_port_mask": 0xFFFF,
         "dst_port": 22, "dst_port_mask": 0, "action": -1, "context": None},
    ]
    out = format_ntuple_list({"n_rx_rings": 4, "rules": rules})
    assert out == (
        "4 RX rings available\n"
        "Total 3 rules\n"
        "\n"
        "Filter: 5\n"
        "\tRule Type: TCP over IPv4\n"
        "\tSrc IP addr: 10.0.0.1 mask: 0.0.0.255\n"
        "\tDest IP addr: 0.0.0.0 mask: 255.255.255.255\n"
        "\tTOS: 0x0 mask: 0xff\n"
        "\tSrc port: 0 mask: 0xffff\n"
        "\tDest port: 80 mask: 0x0\n"
        "\tAction: Direct to queue 2\n"
        "\n"
        "Filter: 1023\n"
        "\tRule Type: TCP over IPv6\n"
        "\tSrc IP addr: :: mask: ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff\n"
        "\tDest IP addr: ::ffff:10.0.0.1 mask: ::\n"
        "\tTraffic Class: 0x0 mask: 0xff\n"
        "\tSrc port: 0 mask: 0xffff\n"
        "\tDest port: 9999 mask: 0x0\n"
        "\tRSS Context ID: 1\n"
        "\tAction: Direct to queue 0\n"
        "\n"
        "Filter: 1022\n"
        "\tRule Type: TCP over IPv4\n"
        "\tSrc IP addr: 0.0.0.0 mask: 255.255.255.255\n"
        "\tDest IP addr: 0.0.0.0 mask: 255.255.255.255\n"
        "\tTOS: 0x0 mask: 0xff\n"
        "\tSrc port: 0 mask: 0xffff\n"
        "\tDest port: 22 mask: 0x0\n"
        "\tAction: Drop\n"
        "\n")
    assert format_ntuple_list({"n_rx_rings": 2, "rules": []}) == (
        "2 RX rings available\nTotal 0 rules\n\n")
    assert format_ntuple_rule(rules[0]).startswith("Filter: 5\n")


def test_format_stats() -> None:
    out = format_stats({"stats": {"rx_packets": 10, "rx_bytes": 1500, "rx-0.packets": 10}})
    assert out == ("NIC statistics:\n"
                   "     rx_packets: 10\n"
                   "     rx_bytes: 1500\n"
                   "     rx-0.packets: 10\n")
    assert format_stats({"stats": [["b", 2], ["a", 1]]}) == (
        "NIC statistics:\n     b: 2\n     a: 1\n")


def test_format_channels() -> None:
    reply = {"rx_max": 0, "tx_max": 0, "other_max": 1, "combined_max": 8,
             "rx_count": 0, "tx_count": 0, "other_count": 1, "combined_count": 4}
    assert format_channels("eth0", reply) == (
        "Channel parameters for eth0:\n"
        "Pre-set maximums:\n"
        "RX:\t\tn/a\n"
        "TX:\t\tn/a\n"
        "Other:\t\t1\n"
        "Combined:\t8\n"
        "Current hardware settings:\n"
        "RX:\t\tn/a\n"
        "TX:\t\tn/a\n"
        "Other:\t\t1\n"
        "Combined:\t4\n")


def test_format_rings() -> None:
    reply = {"rx_max": 4096, "rx_mini_max": 0, "rx_jumbo_max": 0, "tx_max": 4096,
             "tx_push_buf_len_max": 0, "hds_thresh_max": 1023, "rx": 64, "rx_mini": 0,
             "rx_jumbo": 0, "tx": 1024, "rx_buf_len": 4096, "cqe_size": 0,
             "tx_push": False, "rx_push": False, "tx_push_buf_len": 0,
             "tcp_data_split": "on", "hds_thresh": 0}
    out = format_rings("eth0", reply)
    assert out == (
        "Ring parameters for eth0:\n"
        "Pre-set maximums:\n"
        "RX:\t\t\t4096\n"
        "RX Mini:\t\tn/a\n"
        "RX Jumbo:\t\tn/a\n"
        "TX:\t\t\t4096\n"
        "TX push buff len:\tn/a\n"
        "HDS thresh:\t\t1023\n"
        "Current hardware settings:\n"
        "RX:\t\t\t64\n"
        "RX Mini:\t\tn/a\n"
        "RX Jumbo:\t\tn/a\n"
        "TX:\t\t\t1024\n"
        "RX Buf Len:\t\t4096\n"
        "CQE Size:\t\tn/a\n"
        "TX Push:\t\toff\n"
        "RX Push:\t\toff\n"
        "TX push buff len:\tn/a\n"
        "TCP data split:\t\ton\n"
        "HDS thresh:\t\t0\n")
    # Every value lines up at column 24 once tabs are expanded.
    for line in out.splitlines():
        if "\t" in line:
            label, _, value = line.partition("\t")
            wide = line.expandtabs()
            assert wide[:24].rstrip() == label
            assert wide[24:] == value.lstrip("\t")
    sparse = format_rings("eth0", {"rx_max": 256, "rx": 256, "tcp_data_split": "unknown"})
    assert "TCP data split:\t\tn/a\n" in sparse
    assert "HDS thresh:\t\tn/a\n" in sparse
    assert "TX Push:\t\tn/a\n" in sparse


def test_format_reply_for_set_commands() -> None:
    new = p("-X eth0 context new start 3 equal 1")
    assert format_reply(new, {"context": 1}) == "New RSS context is 1\n"
    assert format_reply(p("-X eth0 equal 3"), {}) == ""
    auto = p("-N eth0 flow-type tcp6 dst-port 9999 action 3")
    assert format_reply(auto, {"loc": 1023}) == "Added rule with ID 1023\n"
    placed = p("-N eth0 flow-type tcp6 dst-port 9999 action 3 loc 4")
    assert format_reply(placed, {"loc": 4}) == ""
    for cmdline in ("-N eth0 delete 4", "-L eth0 combined 2", "-G eth0 rx 64"):
        assert format_reply(parse(cmdline.split()), {}) == ""
    with pytest.raises(ValueError):
        format_reply({"cmd": "nope", "dev": "eth0"}, {})


def test_format_error() -> None:
    add = p("-N eth0 flow-type tcp4 action 9")
    assert format_error(add, errno.EINVAL) == (
        "rmgr: Cannot insert RX class rule: Invalid argument\n"
        "Cannot insert classification rule\n")
    dele = p("-N eth0 delete 3")
    assert format_error(dele, errno.ENOENT) == (
        "rmgr: Cannot delete RX class rule: No such file or directory\n"
        "Cannot delete classification rule\n")
    chan = p("-L eth0 combined 1")
    assert format_error(chan, errno.EINVAL, "requested channel counts are too low") == (
        "netlink error: requested channel counts are too low\n"
        "netlink error: Invalid argument\n")
    rss = p("-X eth0 weight 1 2")
    assert format_error(rss, errno.EINVAL) == (
        "Cannot set RX flow hash configuration: Invalid argument\n")
    one = p("-n eth0 rule 3")
    assert format_error(one, errno.ENOENT).endswith("Cannot get RX classification rule\n")


# --------------------------------------------------------------------------------------------
# The selftest's sequence, end to end through the NIC-side Steering (no processes)


def _run(s: Steering, cmdline: str) -> str:
    req = parse(cmdline.split())
    req = json.loads(json.dumps(req))
    try:
        reply = s.handle(req)
    except SteeringError as exc:
        assert exc.errno is not None
        return format_error(req, exc.errno, str(exc))
    return format_reply(req, json.loads(json.dumps(reply)))


def test_iou_zcrx_selftest_rss_variant_end_to_end() -> None:
    s = Steering(4)
    assert _run(s, "-X eth0 equal 3") == ""
    out = _run(s, "-X eth0 context new start 3 equal 1")
    assert out == "New RSS context is 1\n"
    out = _run(s, "-N eth0 flow-type tcp6 dst-port 9999 context 1")
    assert out == "Added rule with ID 1023\n"
    listing = _run(s, "-n eth0")
    assert "RSS Context ID: 1" in listing and "Dest port: 9999 mask: 0x0" in listing
    assert "Total 1 rules" in listing
    rss1 = _run(s, "-x eth0 context 1")
    assert "    0:      3     3     3     3     3     3     3     3" in rss1
    busy = _run(s, "-X eth0 delete context 1")
    assert "Cannot set RX flow hash configuration: Device or resource busy" in busy
    assert _run(s, "-N eth0 delete 1023") == ""
    assert _run(s, "-X eth0 delete context 1") == ""
    missing = _run(s, "-N eth0 delete 1023")
    assert "No such file or directory" in missing
    too_big = _run(s, "-N eth0 flow-type tcp6 dst-port 9999 action 4")
    assert "rmgr: Cannot insert RX class rule: Invalid argument" in too_big
