"""Check ``shared/abi.py`` against the uapi facts kept in ``tests/data/uapi_layouts.toml``.

The data file holds every offset, size, type and constant value of the team reference
``uapi-layouts.md`` that these tests check, each with the reference section it comes from and
the release it holds for.  ``tests/tools/extract_uapi.py`` extracts it from the reference (and
``--check`` says whether it is stale); it is reviewed and committed, so these tests run on any
clone and never skip.

Facts for releases up to :data:`abi.LINUX_VERSION` are required.  Facts ``since`` a newer
release may be absent from ``abi``, but if ``abi`` defines them they must agree; bumping
``LINUX_VERSION`` when newer uapi support lands makes them required.  Facts with ``until`` an
older release, and per-release layouts (io_rings, the zcrx RQ header) not covering
``LINUX_VERSION``, are not compared.  ``NOT_MODELLED`` lists documented constants we
deliberately do not define (they must stay absent whatever the release).

Where our dtype deliberately spells a field differently from the uapi text, or does not model
it as a separate field, the per-struct ``aliases`` say so explicitly.
"""

from __future__ import annotations

import re
import struct
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import abi

DATA = Path(__file__).resolve().parent / "data" / "uapi_layouts.toml"
UAPI: dict[str, Any] = tomllib.loads(DATA.read_text(encoding="utf-8"))


# ============================================================================================
# Releases
# ============================================================================================


def _release(text: str) -> tuple[int, ...]:
    """``"7.2"`` -> ``(7, 2)``."""
    return tuple(int(x) for x in text.split("."))


def _is_future(fact: dict[str, Any]) -> bool:
    """Whether ``fact`` first appears in a release newer than the one abi models."""
    since = fact.get("since")
    return since is not None and _release(since) > abi.LINUX_VERSION


def _holds_now(fact: dict[str, Any]) -> bool:
    """Whether ``fact`` (with optional ``since``/``until``) holds for abi.LINUX_VERSION."""
    until = fact.get("until")
    return not _is_future(fact) and (until is None or _release(until) >= abi.LINUX_VERSION)


def _for_this_release(facts: list[dict[str, Any]]) -> dict[str, Any]:
    """The one per-release layout that holds for abi.LINUX_VERSION."""
    now = [f for f in facts if _holds_now(f)]
    assert len(now) == 1, f"{len(now)} layouts hold for Linux {abi.LINUX_VERSION}: {facts}"
    return now[0]


def test_uapi_data_is_well_formed() -> None:
    """Every fact names its reference section and a known source; releases parse."""
    assert isinstance(abi.LINUX_VERSION, tuple) and len(abi.LINUX_VERSION) == 2
    sources = UAPI["sources"]
    assert UAPI["meta"]["source"] in sources
    groups = [*UAPI["struct"].values(), *UAPI["io_rings"], *UAPI["zcrx_rq"],
              UAPI["rings_example"], UAPI["zcrx_region_mmap"], *UAPI["constants"].values()]
    for g in groups:
        assert str(g["section"]).startswith("§") or g["section"] == "anywhere", g
        assert g.get("source", UAPI["meta"]["source"]) in sources, g
    facts = [*groups, *(f for s in UAPI["struct"].values() for f in s["fields"]),
             *(c for g in UAPI["constants"].values() for c in g["entries"])]
    for f in facts:
        for k in ("since", "until"):
            if k in f:
                assert re.fullmatch(r"\d+\.\d+", f[k]), f
    for c in UAPI["constants"]["inline"]["entries"]:
        assert c["section"].startswith("§"), c


# ============================================================================================
# Struct facts as the tests use them
# ============================================================================================


def _np(ctype: str | None) -> np.dtype | None:
    """A C scalar type of the data file (``u32``, ``s32``) as a little-endian numpy dtype."""
    if ctype is None:
        return None
    m = re.fullmatch(r"([us])(8|16|32|64)", ctype)
    assert m is not None, f"unknown C type {ctype!r} in the data file"
    return np.dtype(f"<{'u' if m.group(1) == 'u' else 'i'}{int(m.group(2)) // 8}")


@dataclass
class Entry:
    """One documented field: where the reference says it lives."""

    name: str
    off: int
    sizes: set[int]  # every size the reference allows; empty = an n-element array
    ctype: np.dtype | None  # element type if the reference states one
    source: str  # for messages
    future: bool = False  # since a release newer than abi.LINUX_VERSION: may be absent


def _struct_facts(key: str) -> dict[str, Any]:
    assert key in UAPI["struct"], f"[struct.{key}] missing from {DATA.name}"
    return UAPI["struct"][key]


def _entries(key: str) -> list[Entry]:
    s = _struct_facts(key)
    return [
        Entry(f["name"], f["off"], set(f["sizes"]), _np(f.get("type")),
              f"{s['section']} {s['title']}: {f}", _is_future(f))
        for f in s["fields"]
    ]


# ============================================================================================
# Struct specifications: which documented struct describes which dtype
# ============================================================================================

# An alias value is either our field name in the same dtype, (dtype name, field name) for a
# field checked in another dtype, or None for a documented name we deliberately do not model
# as a separate field (with the reason next to it).
Alias = str | tuple[str, str] | None


@dataclass
class TableSpec:
    dtype: str
    key: str  # [struct.KEY] in the data file (a table in the reference)
    min_entries: int = 1  # guards against a truncated data file
    aliases: dict[str, Alias] = field(default_factory=dict)
    partial: bool = False  # the table documents only some fields (a per-release column)


@dataclass
class InlineSpec:
    dtype: str
    key: str  # [struct.KEY] in the data file (prose in the reference)
    min_entries: int = 1
    aliases: dict[str, Alias] = field(default_factory=dict)
    base: int = 0  # the described struct sits at this offset inside our dtype


TABLES = [
    TableSpec(
        "io_uring_sqe", "io_uring_sqe", 45,
        aliases={
            "__pad2[1]": "__pad2",  # C declaration `__u64 __pad2[1]`, not an index
            "cmd[0]": None,  # start of cmd[]: checked as the 80-byte `cmd` row (SQE128)
            "cmd": ("io_uring_sqe128", "cmd"),
        },
    ),
    TableSpec(
        "io_uring_cqe", "io_uring_cqe", 4,
        aliases={"big_cqe": ("io_uring_cqe32", "big_cqe")},  # present only in 32-byte CQEs
    ),
    TableSpec(
        "io_uring_cqe32", "io_uring_cqe32", 5,
        aliases={"zcrx_cqe.off": "zcrx_off", "zcrx_cqe.__pad": "zcrx_pad"},
    ),
    TableSpec("io_sqring_offsets", "io_sqring_offsets", 9),
    TableSpec("io_cqring_offsets", "io_cqring_offsets", 9),
    TableSpec("io_uring_params", "io_uring_params", 10),
    TableSpec("io_uring_zcrx_rqe", "io_uring_zcrx_rqe", 3),
    TableSpec("io_uring_zcrx_offsets", "io_uring_zcrx_offsets", 5),
    TableSpec("io_uring_zcrx_area_reg", "io_uring_zcrx_area_reg", 6),
    TableSpec(
        "io_uring_zcrx_ifq_reg", "io_uring_zcrx_ifq_reg", 11,
        # the <= 7.1 column's reserved words, as 7.2 named them (same offsets and sizes)
        aliases={"__resv[0]": "event_desc", "__resv[1..2]": "__resv"},
    ),
    TableSpec(
        "io_uring_zcrx_ifq_reg", "io_uring_zcrx_ifq_reg_7_2", 2,
        aliases={"__resv[2]": "__resv"},  # the C declaration `__u64 __resv[2]`, not an index
        partial=True,
    ),
    TableSpec("io_uring_region_desc", "io_uring_region_desc", 6),
    TableSpec(
        "zcrx_ctrl", "zcrx_ctrl", 6,
        aliases={
            # The anonymous 48-byte union: exposed through its members (InlineSpecs below).
            "zc_export": None, "zc_flush": None,
            "zc_arm_event": None,
        },
    ),
    TableSpec("io_uring_query_zcrx", "io_uring_query_zcrx", 7),
    TableSpec("io_uring_buf", "io_uring_buf", 4),
    TableSpec(
        "io_uring_buf_ring", "io_uring_buf_ring", 5,
        aliases={"bufs": None},  # the ring is simply an array of io_uring_buf
    ),
    TableSpec("io_uring_buf_reg", "io_uring_buf_reg", 6),
]

INLINES = [
    InlineSpec("io_uring_zcrx_cqe", "io_uring_zcrx_cqe", 2),
    InlineSpec("io_uring_mem_region_reg", "io_uring_mem_region_reg", 3),
    InlineSpec("io_uring_query_hdr", "io_uring_query_hdr", 6),
    InlineSpec(
        "zcrx_ctrl", "zcrx_ctrl_flush_rq", 1,
        aliases={"__resv": "flush_rq_resv"}, base=24,
    ),
    InlineSpec(
        "zcrx_ctrl", "zcrx_ctrl_export", 2,
        aliases={"zcrx_fd": "export_zcrx_fd", "__resv1": "export_resv1"}, base=24,
    ),
    InlineSpec(
        "zcrx_ctrl", "zcrx_ctrl_arm_event", 2,
        aliases={"event_type": "arm_event_type", "__resv": "arm_event_resv"}, base=24,
    ),
    InlineSpec(
        "zcrx_ctrl", "zcrx_ctrl_add_area", 2,
        aliases={"area_ptr": "add_area_ptr", "__resv": "add_area_resv"}, base=24,
    ),
    InlineSpec("zcrx_event_desc", "zcrx_event_desc", 5),
    InlineSpec("io_uring_query_scq", "io_uring_query_scq", 2),
    InlineSpec("zcrx_stats", "zcrx_stats", 2),
    InlineSpec("io_uring_buf_status", "io_uring_buf_status", 3),
    InlineSpec("io_uring_getevents_arg", "io_uring_getevents_arg", 4),
]


def _dtype(name: str) -> np.dtype:
    dt = getattr(abi, name)
    assert isinstance(dt, np.dtype), f"abi.{name} is not a dtype"
    return dt


def _struct_may_be_absent(key: str, dtype_name: str) -> bool:
    """True if the documented struct is newer than abi.LINUX_VERSION and abi lacks it."""
    return _is_future(_struct_facts(key)) and not hasattr(abi, dtype_name)


def _resolve(dtype_name: str, entry: Entry, aliases: dict[str, Alias]) -> Iterator[
    tuple[str, str, int, int]
]:
    """Yield (dtype, field, element offset, size or -1) for one documented name.

    The element offset is 0 unless the name indexes an array field (`__resv[1..2]`), in which
    case it is the byte offset of the first named element inside the field.
    """
    name = entry.name
    target: Alias = aliases.get(name, name)
    if target is None:
        return
    dt_name, fname = (dtype_name, target) if isinstance(target, str) else target
    # Indexed names such as `__resv[0]` or `__resv[1..2]` address elements of an array field.
    m = re.fullmatch(r"(\w+)\[(\d+)(?:\.\.(\d+))?\]", fname)
    if m:
        base_name, lo = m.group(1), int(m.group(2))
        hi = int(m.group(3)) if m.group(3) else lo
        fields = _dtype(dt_name).fields
        assert fields is not None and base_name in fields, f"{dt_name} has no {base_name!r}"
        elem = fields[base_name][0].base.itemsize
        yield dt_name, base_name, lo * elem, (hi - lo + 1) * elem
        return
    yield dt_name, fname, 0, -1


def _check_entry(dtype_name: str, entry: Entry, aliases: dict[str, Alias], base: int) -> None:
    for dt_name, fname, elem_off, index_size in _resolve(dtype_name, entry, aliases):
        dt = _dtype(dt_name)
        assert dt.fields is not None
        if entry.future and fname not in dt.fields:
            continue  # newer than the release abi models: may be absent
        assert fname in dt.fields, f"{dt_name} has no field {fname!r} (reference {entry.source})"
        sub, foff = dt.fields[fname][:2]
        where = f"{dt_name}.{fname} (reference {entry.name!r}, {entry.source})"
        assert foff + elem_off == entry.off + base, (
            f"{where}: offset {foff + elem_off} != {entry.off + base}"
        )
        size = index_size if index_size >= 0 else sub.itemsize
        if entry.sizes:
            assert size in entry.sizes, f"{where}: size {size} not in {sorted(entry.sizes)}"
        if entry.ctype is not None and sub.names is None:
            assert sub.base == entry.ctype, f"{where}: type {sub.base} != {entry.ctype}"


@pytest.mark.parametrize("spec", TABLES, ids=[f"{s.key}" for s in TABLES])
def test_struct_table(spec: TableSpec) -> None:
    """Every field of a reference struct table sits at the documented offset/size/type."""
    entries = _entries(spec.key)
    assert len(entries) >= spec.min_entries, (
        f"only {len(entries)} fields for {spec.dtype} in {DATA.name}; the data file is truncated"
    )
    if _struct_may_be_absent(spec.key, spec.dtype):
        return
    size = _struct_facts(spec.key).get("size")
    if size is not None:
        assert _dtype(spec.dtype).itemsize == size
    for e in entries:
        _check_entry(spec.dtype, e, spec.aliases, 0)
    if spec.partial:
        return
    # Reverse direction: every field of our dtype is documented by this table.
    documented = set()
    for e in entries:
        for dt_name, fname, _, _ in _resolve(spec.dtype, e, spec.aliases):
            if dt_name == spec.dtype:
                documented.add(fname)
    undocumented = set(_dtype(spec.dtype).names or ()) - documented
    allowed = {
        # the zcrx_ctrl union members are documented inline (test_inline_struct)
        "zcrx_ctrl": {"flush_rq_resv", "export_zcrx_fd", "export_resv1", "arm_event_type",
                      "arm_event_resv", "add_area_ptr", "add_area_resv"},
        # big_cqe is in the io_uring_cqe table (size 0/16)
        "io_uring_cqe32": {"big_cqe"},
    }.get(spec.dtype, set())
    assert undocumented <= allowed, f"{spec.dtype} fields not in the reference: {undocumented}"


@pytest.mark.parametrize("spec", INLINES, ids=[f"{s.dtype}:{s.key}" for s in INLINES])
def test_inline_struct(spec: InlineSpec) -> None:
    """Structs the reference describes in prose have the documented layout."""
    entries = _entries(spec.key)
    assert len(entries) >= spec.min_entries, (
        f"only {len(entries)} fields for {spec.key} in {DATA.name}; the data file is truncated"
    )
    if _struct_may_be_absent(spec.key, spec.dtype):
        return
    size = _struct_facts(spec.key).get("size")
    if size is not None:
        assert _dtype(spec.dtype).itemsize == size
    for e in entries:
        _check_entry(spec.dtype, e, spec.aliases, spec.base)
    if spec.base == 0:
        names = {spec.aliases.get(e.name, e.name) for e in entries}
        assert set(_dtype(spec.dtype).names or ()) == names


def test_struct_sizes_in_headings() -> None:
    """Sizes stated in the reference's prose match the dtypes (incl. SQE128 and CQE32)."""
    sizes = UAPI["sizes"]
    assert abi.io_uring_sqe.itemsize == sizes["io_uring_sqe"] == 64
    assert abi.io_uring_sqe128.itemsize == sizes["io_uring_sqe128"] == 128
    assert (abi.io_uring_cqe.itemsize, abi.io_uring_cqe32.itemsize) == (
        sizes["io_uring_cqe"], sizes["io_uring_cqe32"]
    )
    assert abi.zcrx_ctrl.itemsize == sizes["zcrx_ctrl"]
    assert abi.zcrx_ctrl.fields is not None
    assert abi.zcrx_ctrl.fields["flush_rq_resv"][0].itemsize == sizes["zcrx_ctrl_union"]
    assert abi.zcrx_ctrl.itemsize - 24 == sizes["zcrx_ctrl_union"]
    assert abi.io_uring_params.fields is not None
    assert abi.io_uring_params.fields["sq_off"][0] == abi.io_sqring_offsets
    assert abi.io_uring_params.fields["cq_off"][0] == abi.io_cqring_offsets
    assert abi.io_uring_zcrx_ifq_reg.fields is not None
    assert abi.io_uring_zcrx_ifq_reg.fields["offsets"][0] == abi.io_uring_zcrx_offsets


def test_all_dtypes_little_endian_and_sized() -> None:
    """Every scalar in every dtype is explicitly little-endian (or a single byte)."""

    def scalars(dt: np.dtype) -> Iterator[np.dtype]:
        if dt.names is None:
            yield dt.base
            return
        assert dt.fields is not None
        for name in dt.names:
            yield from scalars(dt.fields[name][0])

    dtypes = [v for k, v in vars(abi).items() if isinstance(v, np.dtype) and not k.startswith("_")]
    assert len(dtypes) >= 25
    for dt in dtypes:
        for s in scalars(dt):
            assert s.str[0] in ("<", "|"), (dt, s)


# ============================================================================================
# Ring layout (§4) and RQ layout (§5a)
# ============================================================================================


def test_io_rings_offsets_table() -> None:
    """The io_rings layout of the release abi models (>= 6.6) matches rings_layout()."""
    layout = _for_this_release(UAPI["io_rings"])
    assert layout["since"] == "6.6"
    sq_off, cq_off, _ = abi.rings_layout(8, 16, 0)
    checked = 0
    for name, ours in (("sq_off", sq_off), ("cq_off", cq_off)):
        for fname, value in layout[name].items():
            got = ours[fname]
            assert got == value, f"{name}.{fname} = {got}, reference {value}"
            checked += 1
    assert layout["sizeof"] == abi.IO_RINGS_HDR_SIZE
    checked += 1
    assert checked >= 14, f"only {checked} io_rings facts"


def test_rings_layout_worked_example() -> None:
    """§4 worked example: 8 entries -> array at 320, size 352; CQE32 -> array at 640."""
    ex = UAPI["rings_example"]
    sq_off, cq_off, size = abi.rings_layout(ex["sq_entries"], ex["cq_entries"], 0)
    assert (sq_off["array"], size) == (ex["sq_array"], ex["ring_size"]) == (320, 352)
    assert cq_off["cqes"] == 64
    sq_off, _, size = abi.rings_layout(ex["sq_entries"], ex["cq_entries"], abi.IORING_SETUP_CQE32)
    assert sq_off["array"] == ex["cqe32_sq_array"] == 640
    assert size == 640 + 4 * 8


def test_rings_layout_variants() -> None:
    sq_off, _, size = abi.rings_layout(8, 16, abi.IORING_SETUP_NO_SQARRAY)
    assert sq_off["array"] == 0 and size == 320
    # Alignment kicks in when the CQE array does not end on a cache line.
    sq_off, _, size = abi.rings_layout(1, 2, 0)
    assert sq_off["array"] == 128 and size == 132
    _, _, size = abi.rings_layout(1, 2, abi.IORING_SETUP_NO_SQARRAY)
    assert size == 128
    # CQE_MIXED keeps 16-byte slots.
    assert abi.rings_layout(8, 16, abi.IORING_SETUP_CQE_MIXED) == abi.rings_layout(8, 16, 0)
    sq_off, cq_off, _ = abi.rings_layout(4096, 8192, 0)
    assert set(sq_off) == set(abi.io_sqring_offsets.names or ())
    assert set(cq_off) == set(abi.io_cqring_offsets.names or ())
    assert sq_off["user_addr"] == cq_off["user_addr"] == 0
    with pytest.raises(ValueError):
        abi.rings_layout(3, 8, 0)
    with pytest.raises(ValueError):
        abi.rings_layout(8, 0, 0)


def test_sqes_size() -> None:
    assert abi.sqes_size(8, 0) == 512
    assert abi.sqes_size(8, abi.IORING_SETUP_SQE128) == 1024
    with pytest.raises(ValueError):
        abi.sqes_size(0, 0)


def _rq_row(version: tuple[int, int]) -> dict[str, Any]:
    """The §5a row that holds for ``version``."""
    rows = [r for r in UAPI["zcrx_rq"]
            if _release(r.get("since", "0.0")) <= version <= _release(r.get("until", "99.0"))]
    assert len(rows) == 1, (version, rows)
    return rows[0]


def test_zcrx_rq_layout() -> None:
    """§5a: the row of the release abi models (7.3: head 0, tail 64, rqes 128, size 128), and
    the row of every release the emulated kernel can act as (7.1, 7.2: 0 / 4 / 64, size 8)."""
    row = _for_this_release(UAPI["zcrx_rq"])
    head, tail, rqes, hdr = (row[h] for h in ("head", "tail", "rqes", "rq_hdr_size"))
    assert abi.zcrx_rq_layout(16)[:3] == (head, tail, rqes) == (0, 64, 128)
    assert abi.ZCRX_RQ_HDR_SIZE == abi.zcrx_rq_hdr_size() == hdr == 128
    for v in abi.KERNEL_VERSIONS:
        r = _rq_row(v)
        assert abi.zcrx_rq_layout(16, v)[:3] == (r["head"], r["tail"], r["rqes"])
        assert abi.zcrx_rq_hdr_size(v) == r["rq_hdr_size"]
        hsz = abi.zcrx_rq_hdr_size(v)
        for n in (1, 16, 4096, abi.IO_RQ_MAX_ENTRIES):
            aligned = -(-hsz // abi.ZCRX_RQ_HDR_ALIGNMENT) * abi.ZCRX_RQ_HDR_ALIGNMENT
            assert abi.zcrx_rq_layout(n, v)[3] == aligned + 16 * n
    assert abi.zcrx_rq_layout(16, (7, 1))[:3] == abi.zcrx_rq_layout(16, (7, 2))[:3] == (0, 4, 64)
    with pytest.raises(ValueError):
        abi.zcrx_rq_layout(0)


def test_kernel_versions() -> None:
    """The releases the emulated kernel can act as, and what the query reports on each."""
    assert abi.KERNEL_VERSIONS == ((7, 1), (7, 2), (7, 3)) and abi.LINUX_VERSION == (7, 3)
    assert [abi.zcrx_nr_ctrl_opcodes(v) for v in abi.KERNEL_VERSIONS] == [2, 3, 4]
    assert [abi.zcrx_features(v) for v in abi.KERNEL_VERSIONS] == [1, 3, 3]
    assert abi.parse_kernel_version(" 7.2") == (7, 2)
    for bad in ("7.0", "7", "x.y", "7.4"):
        with pytest.raises(ValueError):
            abi.parse_kernel_version(bad)


def test_zcrx_region_mmap_offset() -> None:
    mm = UAPI["zcrx_region_mmap"]
    assert (mm["base"], mm["id_shift"]) == (0x30000000, 16)
    assert abi.zcrx_region_mmap_offset(0) == 0x30000000
    assert abi.zcrx_region_mmap_offset(5) == 0x30000000 + (5 << 16)
    for zid in (0, 1, 7, 2047):
        off = abi.zcrx_region_mmap_offset(zid)
        assert off == mm["base"] + (zid << mm["id_shift"])
        assert off & abi.IORING_OFF_MMAP_MASK == abi.IORING_MAP_OFF_ZCRX_REGION
        assert abi.zcrx_id_from_mmap_offset(off) == zid
    for bad in (-1, 2048):
        with pytest.raises(ValueError):
            abi.zcrx_region_mmap_offset(bad)
    for bad_off in (abi.IORING_MAP_OFF_PARAM_REGION, abi.IORING_OFF_SQES, 0x30000001):
        with pytest.raises(ValueError):
            abi.zcrx_id_from_mmap_offset(bad_off)


@given(area=st.integers(0, 0xFFFF), off=st.integers(0, (1 << 48) - 1))
def test_area_token_and_zcrx_off(area: int, off: int) -> None:
    assert abi.area_token(area) == area << 48
    v = abi.zcrx_off(area, off)
    assert v == abi.area_token(area) | off
    assert abi.zcrx_off_area_id(v) == area and abi.zcrx_off_offset(v) == off


def test_area_token_range() -> None:
    assert abi.area_token(0) == 0
    for bad in (-1, 1 << 16):
        with pytest.raises(ValueError):
            abi.area_token(bad)
    with pytest.raises(ValueError):
        abi.zcrx_off(0, 1 << 48)


# ============================================================================================
# Constants (§7 and inline "NAME = value" statements anywhere)
# ============================================================================================

# The §7 subsections, as [constants.KEY] of the data file.
_SECTION7 = {
    "opcodes", "register_opcodes", "setup_flags", "enter_flags", "ring_flags", "cqe_flags",
    "ioprio_flags", "sqe_flags", "features", "mmap_offsets", "zcrx",
}
_FULL_PREFIXES = ("IORING_", "IOSQE_", "IO_URING_", "ZCRX_", "IOU_")

# Constants the reference lists that we deliberately do not define (post-7.1 mainline only:
# our ifq_reg is the kernel <= 7.1 shape without event_desc).
NOT_MODELLED: set[str] = set()  # the 7.2 event constants are modelled since LINUX_VERSION 7.3


def _check_constant(c: dict[str, Any], where: str) -> bool:
    """Compare one documented constant; return True if it was compared."""
    name, value = c["name"], c["value"]
    if name in NOT_MODELLED:
        assert not hasattr(abi, name), f"{name} is listed as not modelled but abi defines it"
        return False
    if _is_future(c) and not hasattr(abi, name):
        return False  # since a release newer than abi models: may be absent
    assert hasattr(abi, name), f"abi lacks {name} = {value:#x} ({where})"
    got = getattr(abi, name)
    assert got == value, f"abi.{name} = {got:#x}, reference says {value:#x} ({where})"
    return True


def test_section7_constants() -> None:
    """Every constant in §7 (tables and inline lists) equals the abi constant."""
    groups = {k: g for k, g in UAPI["constants"].items() if k != "inline"}
    assert set(groups) == _SECTION7, f"constant groups: {sorted(groups)}"
    total = 0
    for g in groups.values():
        assert g["entries"], f"{g['section']}: no constants"
        for c in g["entries"]:
            total += _check_constant(c, g["section"])
    assert total >= 170


def test_inline_assignments() -> None:
    """``NAME = value`` statements anywhere in the reference agree with the abi."""
    entries = UAPI["constants"]["inline"]["entries"]
    checked = 0
    for c in entries:
        name = c["name"]
        if name.startswith(_FULL_PREFIXES) or hasattr(abi, name):
            checked += _check_constant(c, f"inline assignment in {c['section']}")
    names = {c["name"] for c in entries}
    for needed in ("IORING_MAX_ENTRIES", "IORING_MAX_CQ_ENTRIES", "IORING_FILE_INDEX_ALLOC",
                   "IORING_MEM_REGION_TYPE_USER", "IORING_OFF_ZCRX_SHIFT", "L1_CACHE_BYTES"):
        assert needed in names, f"{needed} = ... not in the data file"
    assert checked >= 10


def test_opcode_enum_is_dense() -> None:
    """Opcode and register-opcode enums have no gaps or duplicates below *_LAST."""
    ops = {
        k: v for k, v in vars(abi).items() if k.startswith("IORING_OP_") and k != "IORING_OP_LAST"
    }
    assert sorted(ops.values()) == list(range(abi.IORING_OP_LAST))
    regs = {
        k: v for k, v in vars(abi).items()
        if re.match(r"IORING_(UN)?REGISTER_", k)
        and k not in ("IORING_REGISTER_LAST", "IORING_REGISTER_USE_REGISTERED_RING")
    }
    assert sorted(regs.values()) == list(range(abi.IORING_REGISTER_LAST))


def test_misc_constants() -> None:
    assert abi.IORING_ZCRX_AREA_MASK == 0xFFFF_0000_0000_0000
    assert abi.IORING_ZCRX_AREA_MASK == ~((1 << abi.IORING_ZCRX_AREA_SHIFT) - 1) & (2**64 - 1)
    assert abi.IO_RQ_MAX_ENTRIES == 32768 and abi.IO_SKBS_PER_CALL_LIMIT == 20
    assert abi.PAGE_SIZE == 4096 and abi.SMP_CACHE_BYTES == abi.L1_CACHE_BYTES == 64
    assert abi.ZCRX_RQ_HDR_ALIGNMENT == abi.L1_CACHE_BYTES
    assert abi.ZCRX_CTRL_LAST == abi.ZCRX_CTRL_ADD_AREA + 1 == 4
    assert abi.ZCRX_EVENT_TYPE_LAST == abi.ZCRX_EVENT_COPY + 1
    # Buffer ids live above the flag bits that carry meaning on buffer CQEs.
    low = [
        v for k, v in vars(abi).items()
        if k.startswith("IORING_CQE_F_") and k != "IORING_CQE_F_TSTAMP_HW"
    ]
    assert max(low) < 1 << abi.IORING_CQE_BUFFER_SHIFT


# ============================================================================================
# NIC dtypes (emulator-only)
# ============================================================================================


def test_nic_dtypes() -> None:
    assert abi.nic_rx_desc.itemsize == 16
    assert abi.nic_rx_cqe.itemsize == 40
    want_desc = {"iova": (0, 8), "len": (8, 4), "buf_id": (12, 4)}
    want_cqe = {
        "hdr_slot": (0, 4), "hdr_len": (4, 2), "flags": (6, 2), "data_len": (8, 4),
        "nr_frags": (12, 2), "queue": (14, 2), "rss_hash": (16, 4), "payload_off": (20, 2),
        "status": (22, 2), "tstamp_ns": (24, 8), "gso_segs": (32, 2), "gso_size": (34, 2),
        "_resv": (36, 4),
    }
    for dt, want in ((abi.nic_rx_desc, want_desc), (abi.nic_rx_cqe, want_cqe)):
        assert dt.fields is not None
        got = {n: (dt.fields[n][1], dt.fields[n][0].itemsize) for n in dt.names or ()}
        assert got == want
    flags = [abi.NIC_CQE_F_SPLIT, abi.NIC_CQE_F_LINEAR, abi.NIC_CQE_F_L4_OK, abi.NIC_CQE_F_GRO]
    assert len(set(flags)) == 4 and all(f & (f - 1) == 0 for f in flags)
    statuses = [abi.NIC_STATUS_OK, abi.NIC_STATUS_TRUNCATED, abi.NIC_STATUS_BAD_HDR,
                abi.NIC_STATUS_OVERSIZE]
    assert abi.NIC_STATUS_OK == 0 and len(set(statuses)) == 4


@given(map_id=st.integers(0, (1 << 24) - 1), off=st.integers(0, (1 << 40) - 1))
def test_iova_round_trip(map_id: int, off: int) -> None:
    iova = abi.make_iova(map_id, off)
    assert iova == (map_id << abi.NIC_IOVA_SHIFT) | off
    assert 0 <= iova < 1 << 64
    assert (abi.iova_map_id(iova), abi.iova_offset(iova)) == (map_id, off)
    rec = np.zeros(1, abi.nic_rx_desc)
    rec["iova"] = iova
    assert int(rec["iova"][0]) == iova


def test_iova_range() -> None:
    with pytest.raises(ValueError):
        abi.make_iova(1 << 24, 0)
    with pytest.raises(ValueError):
        abi.make_iova(0, 1 << 40)
    with pytest.raises(ValueError):
        abi.make_iova(-1, 0)


# ============================================================================================
# Round trip through raw bytes at the documented offsets
# ============================================================================================

_STRUCT_FMT = {np.dtype("<u1"): "B", np.dtype("<u2"): "H", np.dtype("<u4"): "I",
               np.dtype("<u8"): "Q", np.dtype("<i4"): "i"}


_Slot = tuple[tuple[str, ...], int, int, str, int]  # (field path, first elem, off, fmt, count)


def _documented_ifq_layout() -> list[_Slot]:
    """Every scalar slot of ``io_uring_zcrx_ifq_reg`` as the reference documents it.

    Each slot is (dtype field path, first array element, byte offset, struct format, count);
    ``__resv[1..2]`` becomes (("__resv",), 1, 80, "Q", 2).
    """
    sub_rows = _entries("io_uring_zcrx_offsets")
    # the <= 7.1 column's reserved words, as 7.2 named them
    renamed = {"__resv[0]": "event_desc", "__resv[1..2]": "__resv[0..1]"}
    out: list[_Slot] = []
    for e in _entries("io_uring_zcrx_ifq_reg"):
        e = Entry(renamed.get(e.name, e.name), e.off, e.sizes, e.ctype, e.source, e.future)
        if e.name == "offsets":
            for sub in sub_rows:
                assert sub.ctype is not None
                n = min(sub.sizes) // sub.ctype.itemsize
                out.append((("offsets", sub.name), 0, e.off + sub.off, _STRUCT_FMT[sub.ctype], n))
            continue
        assert e.ctype is not None, e
        m = re.fullmatch(r"(\w+)(?:\[(\d+)(?:\.\.\d+)?\])?", e.name)
        assert m is not None, e
        first = int(m.group(2)) if m.group(2) else 0
        n = min(e.sizes) // e.ctype.itemsize
        out.append(((m.group(1),), first, e.off, _STRUCT_FMT[e.ctype], n))
    return out


@pytest.fixture(scope="module")
def ifq_layout() -> list[_Slot]:
    layout = _documented_ifq_layout()
    assert len(layout) >= 15, "ifq_reg table has too few rows"
    assert sum(struct.calcsize("<" + f) * n for *_, f, n in layout) == 96
    return layout


_u32 = st.integers(0, 2**32 - 1)
_u64 = st.integers(0, 2**64 - 1)


@given(data=st.data())
def test_ifq_reg_bytes_match_documented_offsets(
    ifq_layout: list[_Slot], data: st.DataObject
) -> None:
    """Encode random values into an ifq_reg record by field name; ``struct.unpack_from`` at the
    documented offsets reads back the same values, and the bytes decode back to the record."""
    rec = np.zeros(1, abi.io_uring_zcrx_ifq_reg)
    expected: dict[int, list[int]] = {}
    for path, first, off, fmt, n in ifq_layout:
        values = [data.draw(_u32 if fmt == "I" else _u64) for _ in range(n)]
        expected[off] = values
        target = rec
        for p in path:
            target = target[p]
        for k, value in enumerate(values):
            if target.ndim == 1:
                target[0] = value
            else:
                target[0, first + k] = value
    raw = rec.tobytes()
    assert len(raw) == 96
    for path, _, off, fmt, n in ifq_layout:
        got = struct.unpack_from(f"<{n}{fmt}", raw, off)
        assert list(got) == expected[off], path
    back = np.frombuffer(bytearray(raw), dtype=abi.io_uring_zcrx_ifq_reg)
    assert back.tobytes() == raw
    assert int(back["zcrx_id"][0]) == expected[64][0]
    assert int(back["offsets"]["rqes"][0]) == expected[40][0]
    assert int(back["event_desc"][0]) == expected[72][0]
    assert int(back["__resv"][0, 1]) == expected[80][1]


@given(
    user_data=_u64, res=st.integers(-(2**31), 2**31 - 1), flags=_u32, off=_u64,
)
def test_cqe32_and_sqe_raw_bytes(user_data: int, res: int, flags: int, off: int) -> None:
    cqe = np.zeros(1, abi.io_uring_cqe32)
    cqe["user_data"], cqe["res"], cqe["flags"], cqe["zcrx_off"] = user_data, res, flags, off
    assert struct.unpack("<QiIQQ", cqe.tobytes()) == (user_data, res, flags, off, 0)
    assert int(cqe["big_cqe"][0][0]) == off
    sqe = np.zeros(1, abi.io_uring_sqe)
    sqe["opcode"] = abi.IORING_OP_RECV_ZC
    sqe["ioprio"] = abi.IORING_RECV_MULTISHOT
    sqe["zcrx_ifq_idx"] = flags
    sqe["user_data"] = user_data
    raw = sqe.tobytes()
    assert raw[0] == 58
    assert struct.unpack_from("<H", raw, 2)[0] == abi.IORING_RECV_MULTISHOT
    assert struct.unpack_from("<I", raw, 44)[0] == flags
    assert struct.unpack_from("<Q", raw, 32)[0] == user_data
    assert int(sqe["file_index"][0]) == flags  # same union word
