"""The PV database: ``db/*.db`` parsed once (whatrecord) into typed PV specs.

Every front end (PVA, CA), the screens, the docs and the tests read PV names,
types, limits and descriptions from here and nowhere else.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = ["MBB_STATES", "SEVERITY_NAMES", "PVDatabase", "PVSpec", "PutError", "db_dir", "load_db"]

#: record types whose VAL a client may write
_OUTPUT_TYPES = {"ao", "longout", "bo", "mbbo", "stringout", "lso", "int64out"}
_FLOAT_TYPES = {"ao", "ai"}
_INT_TYPES = {"longout", "longin", "int64out", "int64in"}
_BOOL_TYPES = {"bo", "bi"}
_MBB_TYPES = {"mbbo", "mbbi"}
_STRING_TYPES = {"lso", "lsi", "stringout", "stringin"}
#: the 16 state prefixes of an mbbo/mbbi record (``ZRST``/``ZRSV`` ... ``FFST``/``FFSV``)
MBB_STATES = ("ZR", "ON", "TW", "TH", "FR", "FV", "SX", "SV", "EI", "NI", "TE", "EL", "TV", "TT", "FT", "FF")
#: EPICS menuAlarmSevr, in severity order
SEVERITY_NAMES = ("NO_ALARM", "MINOR", "MAJOR", "INVALID")
_SEVERITIES = {name: i for i, name in enumerate(SEVERITY_NAMES)}
_INT32 = (-(2**31), 2**31 - 1)


class PutError(ValueError):
    """A put that the device refuses; the value stays unchanged."""


@dataclass(frozen=True)
class PVSpec:
    """One record of the database, reduced to what a front end needs."""

    suffix: str
    rtyp: str
    kind: str  # "float" | "int" | "enum" | "string" | "image" | "table"
    desc: str = ""
    egu: str = ""
    prec: int = 0
    drvl: float | None = None
    drvh: float | None = None
    lopr: float = 0.0
    hopr: float = 0.0
    enum_strs: tuple[str, ...] = ()
    enum_sevr: tuple[int, ...] = ()
    max_length: int = 0
    writable: bool = False
    protocols: frozenset[str] = frozenset({"pva", "ca"})
    group: str = ""
    initial: Any = None
    ftvl: str = ""
    info: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    #: other names of this record (``alias()`` in db/), served as the same PV: one value, one handler
    aliases: tuple[str, ...] = ()

    @property
    def readback(self) -> str | None:
        """Name of this setpoint's readback (``Name_RBV`` unless info(ptychostream:readback) says)."""
        if "ptychostream:readback" in self.info:
            return self.info["ptychostream:readback"] or None
        return None if self.suffix.endswith("_RBV") else f"{self.suffix}_RBV"

    @property
    def type_label(self) -> str:
        """Short human type used in the docs table."""
        if self.kind == "image":
            return "NTNDArray"
        if self.kind == "table":
            return "NTTable(" + self.info["ptychostream:nttable"] + ")"
        if self.kind == "enum":
            return "enum"
        if self.kind == "string":
            return f"string[{self.max_length}]"
        return {"float": "float64", "int": "int32"}[self.kind]

    def severity_of(self, value: Any) -> int:
        """Alarm severity implied by an enum state (ZRSV...FFSV, ZSV/OSV)."""
        if self.kind == "enum" and self.enum_sevr and 0 <= int(value) < len(self.enum_sevr):
            return self.enum_sevr[int(value)]
        return 0

    def coerce(self, raw: Any) -> Any:
        """Validate a client value and return it in canonical form, or raise PutError."""
        if not self.writable:
            raise PutError(f"{self.suffix} is read-only")
        if self.kind in ("image", "table"):
            raise PutError(f"{self.suffix} is not a scalar PV")
        if isinstance(raw, np.ndarray) and raw.ndim == 0:
            raw = raw.item()
        if self.kind == "string":
            return self._coerce_string(raw)
        if self.kind == "enum":
            return self._coerce_enum(raw)
        return self._coerce_number(raw)

    def _coerce_string(self, raw: Any) -> str:
        if isinstance(raw, np.ndarray):
            raw = raw.astype(np.uint8).tobytes()
        if isinstance(raw, (bytes, bytearray)):
            raw = bytes(raw).split(b"\0", 1)[0]
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PutError(f"{self.suffix}: not valid UTF-8") from exc
        if not isinstance(raw, str):
            raise PutError(f"{self.suffix} takes a string, not {type(raw).__name__}")
        if len(raw.encode("utf-8")) > self.max_length - 1:
            raise PutError(f"{self.suffix}: string longer than {self.max_length - 1} bytes")
        return raw

    def _coerce_enum(self, raw: Any) -> int:
        if isinstance(raw, str):
            if raw in self.enum_strs:
                return self.enum_strs.index(raw)
            try:
                raw = int(raw, 0)
            except ValueError:
                raise PutError(
                    f"{self.suffix}: {raw!r} is not one of {', '.join(self.enum_strs)}"
                ) from None
        if isinstance(raw, bool):
            raw = int(raw)
        if isinstance(raw, float) and raw.is_integer():
            raw = int(raw)
        if not isinstance(raw, (int, np.integer)):
            raise PutError(f"{self.suffix} takes a choice index or name, not {type(raw).__name__}")
        if not 0 <= raw < len(self.enum_strs):
            raise PutError(f"{self.suffix}: index {raw} outside 0..{len(self.enum_strs) - 1}")
        return int(raw)

    def _coerce_number(self, raw: Any) -> float | int:
        if isinstance(raw, (str, bytes)) or not isinstance(raw, (int, float, np.number)):
            raise PutError(f"{self.suffix} takes a number, not {type(raw).__name__}")
        value = float(raw)
        if not math.isfinite(value):
            raise PutError(f"{self.suffix}: {raw} is not a finite number")
        if self.kind == "int":
            if not value.is_integer():
                raise PutError(f"{self.suffix} takes an integer, not {raw}")
            value = int(value)
        lo, hi = self.drvl, self.drvh
        if lo is not None and hi is not None and lo < hi and not lo <= value <= hi:
            raise PutError(f"{self.suffix}: {raw} outside the limits {lo:g}..{hi:g} {self.egu}".rstrip())
        if self.kind == "int" and not _INT32[0] <= value <= _INT32[1]:
            raise PutError(f"{self.suffix}: {raw} does not fit in 32 bits")
        return value


class PVDatabase:
    """Ordered PV specs of one ``.db`` file, keyed by suffix (the name after ``$(P)$(R)``)."""

    def __init__(self, specs: list[PVSpec], source: Path) -> None:
        self.source = source
        self._specs = {s.suffix: s for s in specs}
        self._aliases = {alias: s.suffix for s in specs for alias in s.aliases}
        clash = sorted(self._aliases.keys() & self._specs.keys())
        if clash:
            raise ValueError(f"{source}: alias(es) {', '.join(clash)} are also record names")

    def aliases(self) -> dict[str, str]:
        """Every alias suffix and the suffix of the record it names (``alias()`` in db/); the specs,
        :meth:`names` and ``in`` know records only."""
        return dict(self._aliases)

    def resolve(self, name: str) -> PVSpec:
        """The spec of a record suffix or of an alias of one (KeyError for neither)."""
        return self._specs[self._aliases.get(name, name)]

    def __getitem__(self, suffix: str) -> PVSpec:
        return self._specs[suffix]

    def __contains__(self, suffix: object) -> bool:
        return suffix in self._specs

    def __iter__(self) -> Iterator[PVSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def names(self, prefix: str = "") -> list[str]:
        return [prefix + s for s in self._specs]

    def for_protocol(self, protocol: str) -> list[PVSpec]:
        return [s for s in self if protocol in s.protocols]

    def groups(self) -> dict[str, list[PVSpec]]:
        out: dict[str, list[PVSpec]] = {}
        for spec in self:
            out.setdefault(spec.group, []).append(spec)
        return out


def db_dir() -> Path:
    """Folder of the ``.db`` files: $PTYCHOSTREAM_DB_DIR, the source tree, or the installed copy.

    An installed wheel carries ``db/`` as data files in ``<scheme data>/share/ptychostream/db``
    (pyproject.toml ``[tool.setuptools.data-files]``): ``sys.prefix`` for a venv or system
    install; the distribution's RECORD says where for a ``--user`` or ``--prefix`` install.
    """

    def places() -> Iterator[Path]:
        env = os.environ.get("PTYCHOSTREAM_DB_DIR")
        if env:
            yield Path(env)
        yield Path(__file__).resolve().parents[3] / "db"
        try:  # read only when neither of the above has it
            files = importlib.metadata.distribution("ptychostream").files or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        for f in files:
            if f.name == "reconstructor.db" and f.parent.name == "db":
                yield Path(str(f.locate())).resolve().parent
        yield Path(sys.prefix) / "share" / "ptychostream" / "db"

    tried = []
    for path in places():
        if (path / "reconstructor.db").is_file():
            return path
        tried.append(str(path))
    raise FileNotFoundError(f"no ptychostream db/ folder found in {', '.join(tried)}")


def _num(fields: dict[str, str], key: str) -> float | None:
    text = fields.get(key)
    return None if text in (None, "") else float(text)


def _constant_link(raw: Any, where: str) -> str | None:
    """The text of a constant link as whatrecord parses it (``"3.5"``, ``{const:"text"}``, ``["text"]``),
    or None for an empty link.

    Any other link names another PV, which ptychostream does not follow: ValueError naming ``where``.
    """
    if isinstance(raw, dict):
        if set(raw) != {"const"}:
            raise ValueError(f"{where}: a {'/'.join(raw)} link; expected a constant link, {{const:...}}")
        value = raw["const"]
    elif isinstance(raw, (list, tuple)):
        value = raw
    else:  # bare text: empty, or a number, is a constant; anything else is the name of a PV
        text = str(raw).strip()
        if not text:
            return None
        try:
            float(text)
        except ValueError:
            raise ValueError(f"{where}: {text!r} is a link to another PV; expected a constant, "
                             'a number or {const:"text"}') from None
        return text
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"{where}: a constant link of {len(value)} values; expected one")
        value = value[0]
    return str(int(value)) if isinstance(value, bool) else str(value)


def _suffix(name: str, what: str = "record") -> str:
    for prefix in ("$(P)$(R)", "$(P)"):
        if name.startswith(prefix):
            return name[len(prefix):]
    raise ValueError(f"{what} {name!r} must be named $(P)$(R)Name or $(P)Name")


def _spec_from_record(name: str, rtyp: str, fields: dict[str, str], info: dict[str, str],
                      aliases: tuple[str, ...] = ()) -> PVSpec:
    suffix = _suffix(name)
    image = info.get("ptychostream:ntndarray") == "1"
    table = info.get("ptychostream:nttable")
    enum_strs: tuple[str, ...] = ()
    enum_sevr: tuple[int, ...] = ()
    if image:
        kind = "image"
    elif table:
        kind = "table"
    elif rtyp in _FLOAT_TYPES:
        kind = "float"
    elif rtyp in _INT_TYPES:
        kind = "int"
    elif rtyp in _BOOL_TYPES:
        kind = "enum"
        enum_strs = (fields.get("ZNAM", ""), fields.get("ONAM", ""))
        enum_sevr = tuple(_SEVERITIES[fields.get(k, "NO_ALARM")] for k in ("ZSV", "OSV"))
    elif rtyp in _MBB_TYPES:
        kind = "enum"
        strs = [fields.get(f"{p}ST") for p in MBB_STATES]
        n = max((i + 1 for i, s in enumerate(strs) if s), default=0)
        enum_strs = tuple(s or "" for s in strs[:n])
        enum_sevr = tuple(_SEVERITIES[fields.get(f"{p}SV", "NO_ALARM")] for p in MBB_STATES[:n])
    elif rtyp in _STRING_TYPES:
        kind = "string"
    else:
        raise ValueError(f"{suffix}: record type {rtyp} is not supported")

    max_length = 0
    if kind == "string":
        max_length = int(fields.get("SIZV", "40" if rtyp.startswith("string") else "41"))
    writable = rtyp in _OUTPUT_TYPES or (bool(image or table) and info.get("ptychostream:writable") == "1")
    protocols = frozenset(info.get("ptychostream:protocols", "pva ca").split())

    # a constant DOL link is how an output record gets its start-up value in a real IOC (an lso's VAL
    # cannot be set before iocInit), a constant INP link an input record's; it wins over VAL, as record
    # support's init_record does
    val = fields.get("DOL", fields.get("INP", fields.get("VAL")))
    initial: Any
    if kind == "float":
        initial = float(val) if val else 0.0
    elif kind == "int":
        initial = int(float(val)) if val else 0
    elif kind == "enum":
        initial = int(val) if val else 0
    elif kind == "string":
        initial = val or ""
    else:
        initial = None
    return PVSpec(
        suffix=suffix,
        rtyp=rtyp,
        kind=kind,
        desc=fields.get("DESC", ""),
        egu=fields.get("EGU", ""),
        prec=int(fields.get("PREC", "0")),
        drvl=_num(fields, "DRVL"),
        drvh=_num(fields, "DRVH"),
        lopr=_num(fields, "LOPR") or 0.0,
        hopr=_num(fields, "HOPR") or 0.0,
        enum_strs=enum_strs,
        enum_sevr=enum_sevr,
        max_length=max_length,
        writable=writable,
        protocols=protocols,
        group=info.get("ptychostream:group", ""),
        initial=initial,
        ftvl=fields.get("FTVL", ""),
        info=dict(info),
        aliases=aliases,
    )


@lru_cache(maxsize=None)
def load_db(name: str = "reconstructor.db", folder: str | None = None) -> PVDatabase:
    """Parse ``db/<name>`` with whatrecord and return its PV specs (cached)."""
    from whatrecord.db import Database  # imported late: it is slow to import

    path = Path(folder) if folder else db_dir()
    path = path / name
    db = Database.from_file(str(path))
    specs = []
    for rec_name, rec in db.records.items():
        if rec_name != rec.name:  # whatrecord lists a record under each of its aliases too
            continue
        fields = {k: str(v.value) for k, v in rec.fields.items() if k not in ("DOL", "INP")}
        for key in ("DOL", "INP"):
            link = _constant_link(rec.fields[key].value, f"{path}: record {rec_name}, field {key}") \
                if key in rec.fields else None
            if link is not None:
                fields[key] = link
        aliases = tuple(_suffix(a, f"{path}: alias of {rec_name}") for a in rec.aliases)
        specs.append(_spec_from_record(rec_name, rec.record_type, fields, dict(rec.info), aliases))
    return PVDatabase(specs, path)
