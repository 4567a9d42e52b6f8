"""Operator screens generated from ``db/``: Phoebus ``.bob`` files and a PyDM ``.ui`` file.

Every widget's PV comes from a :class:`~ptychostream.core.pvdb.PVSpec`, so screen PV names match the
IOC by construction; the sections follow each record's ``info(ptychostream:group, ...)`` tag.
Regenerate after editing ``db/``::

    python -m ptychostream.screens --out opi/          # write every screen
    python -m ptychostream.screens --check --out opi/  # exit 1 if opi/ is stale

and grab a PyDM screen offscreen (a PNG plus a JSON report of what each widget shows)::

    python -m ptychostream.screens grab opi/reconstructor.ui --macro P=PTY: --macro R=NN: \
        --png docs/pydm-reconstructor.png --seconds 5

Phoebus ``.bob`` files are built with phoebusgen; the Qt Designer ``.ui`` file is written with
the standard library's ElementTree (PyDM reads plain Designer XML). Neither needs Qt to generate.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ptychostream.core.pvdb import PVDatabase, PVSpec, load_db

__all__ = [
    "SCREENS", "Row", "rows", "label_text", "is_file_pv", "render", "render_all", "write_all",
    "stale", "grab", "main",
]

#: writable two-state enums shown as an on/off toggle rather than a combo box
TOGGLES = frozenset({"Enable", "cam1:Acquire", "Capture"})
#: images shown first (and largest) on the screens, when present in db/
MAIN_IMAGES = ("Phase", "Mosaic", "Flashlight", "Pva1:Image")
#: groups placed in the middle column of a Phoebus screen (live status), when present
STATUS_GROUPS = ("Status", "Consistency", "Acquisition")

# Phoebus geometry (pixels)
_ROW_H, _PITCH = 22, 26
_COL_LABEL, _COL_SET, _COL_RBV = 150, 190, 190
_GROUP_W = 10 + _COL_LABEL + 6 + _COL_SET + 6 + _COL_RBV + 10
_IMG = 380


# -- what goes on a screen: rows of (setpoint, readback) pairs, from db/ ---------------------
@dataclass(frozen=True)
class Row:
    """One line of a section: an optional setpoint and an optional readback."""

    setpoint: PVSpec | None
    readback: PVSpec | None

    @property
    def name(self) -> str:
        spec = self.setpoint or self.readback
        assert spec is not None
        return spec.suffix

    @property
    def desc(self) -> str:
        spec = self.setpoint or self.readback
        assert spec is not None
        return spec.desc


def label_text(suffix: str) -> str:
    """``cam1:AcquirePeriod`` -> ``Acquire period``; ``LatencyP50_RBV`` -> ``Latency P50``."""
    base = suffix.rsplit(":", 1)[-1]
    base = base[:-4] if base.endswith("_RBV") else base
    words = re.findall(r"[A-Z]+[0-9]*(?![a-z])|[A-Z]?[a-z]+[0-9]*|[0-9]+", base) or [base]
    out = [words[0]] + [w if (w.isupper() or w[:1].isdigit()) else w.lower() for w in words[1:]]
    return " ".join(out)


def is_file_pv(spec: PVSpec) -> bool:
    """A string setpoint naming a file on the IOC host (ModelPath, PreDarkPath, ...File)."""
    return spec.kind == "string" and spec.writable and spec.suffix.endswith(("Path", "File"))


def rows(specs: Iterable[PVSpec], db: PVDatabase) -> list[Row]:
    """Pair each setpoint with its readback (once); the rest become readback-only rows."""
    specs = [s for s in specs if s.kind not in ("image", "table")]
    used: set[str] = set()
    out: list[Row] = []
    for spec in specs:
        if spec.suffix in used:
            continue
        if spec.writable:
            rbv = spec.readback
            readback = db[rbv] if rbv and rbv in db and rbv not in used else None
            if readback is not None:
                used.add(readback.suffix)
            out.append(Row(spec, readback))
        else:
            out.append(Row(None, spec))
        used.add(spec.suffix)
    return out


def _images(db: PVDatabase) -> list[PVSpec]:
    """Image PVs to display (not the ones clients put frames to), main images first."""
    imgs = [s for s in db if s.kind == "image" and not s.writable]
    order = {name: i for i, name in enumerate(MAIN_IMAGES)}
    return sorted(imgs, key=lambda s: order.get(s.suffix, len(order)))


def _tables(db: PVDatabase) -> list[PVSpec]:
    return [s for s in db if s.kind == "table"]


def _sections(db: PVDatabase) -> dict[str, list[Row]]:
    return {group: rows(specs, db) for group, specs in db.groups().items()
            if rows(specs, db)}


def _widget_id(suffix: str, tag: str = "") -> str:
    return re.sub(r"\W", "_", suffix) + (f"_{tag}" if tag else "")


# -- Phoebus (.bob) ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _BobScreen:
    db_name: str
    macro_prefix: str  # "$(P)$(R)" or "$(P)"
    title: str
    default_macros: dict[str, str]


def _bob_pv(screen: _BobScreen, spec: PVSpec) -> str:
    """PV name with macros; PVs that only PVA carries get pva://, the rest use the site default."""
    scheme = "" if "ca" in spec.protocols else "pva://"
    return f"{scheme}{screen.macro_prefix}{spec.suffix}"


def _bob_control(screen: _BobScreen, spec: PVSpec, x: int, y: int, w: int) -> list[Any]:
    from phoebusgen import widget as W

    pv = _bob_pv(screen, spec)
    name = _widget_id(spec.suffix)
    out: list[Any] = []
    if spec.kind == "enum" and spec.suffix in TOGGLES:
        b = W.BooleanButton(name, pv, x, y, w, _ROW_H)
        b.labels_from_pv(True)
        b.show_led(True)
        b.mode_toggle()
        out.append(b)
    elif spec.kind == "enum" and spec.readback is None:  # an action: write the "on" state
        b = W.ActionButton(name, spec.enum_strs[-1], pv, x, y, w, _ROW_H)
        b.action_write_pv(pv, 1, f"{label_text(spec.suffix)}: {spec.enum_strs[-1]}")
        out.append(b)
    elif spec.kind == "enum":
        c = W.ComboBox(name, pv, x, y, w, _ROW_H)
        c.items_from_pv(True)
        c.alarm_border(True)
        out.append(c)
    else:
        file_pv = is_file_pv(spec)
        t = W.TextEntry(name, pv, x, y, w - (30 if file_pv else 0), _ROW_H)
        t.alarm_border(True)
        if spec.kind == "string":
            t.format("string")
        else:
            t.show_units(True)
        out.append(t)
        if file_pv:
            f = W.FileSelector(_widget_id(spec.suffix, "browse"), pv, x + w - 26, y, 26, _ROW_H)
            f.file_component_full_path()
            f.tool_tip(f"Choose {label_text(spec.suffix).lower()} (a path valid on the IOC host)")
            out.append(f)
    out[0].tool_tip(f"{spec.desc}\n{screen.macro_prefix}{spec.suffix}")
    return out


def _bob_readback(screen: _BobScreen, spec: PVSpec, x: int, y: int, w: int) -> Any:
    from phoebusgen import widget as W

    pv = _bob_pv(screen, spec)
    name = _widget_id(spec.suffix)
    if spec.kind == "enum" and len(spec.enum_strs) == 2:
        led = W.LED(name, pv, x, y, w, _ROW_H)
        led.off_label(spec.enum_strs[0])
        led.on_label(spec.enum_strs[1])
        led.alarm_border(True)
        widget = led
    else:
        t = W.TextUpdate(name, pv, x, y, w, _ROW_H)
        t.alarm_border(True)
        if spec.kind == "string":
            t.format("string")
            t.wrap_words(False)
        else:
            t.show_units(True)
        widget = t
    widget.tool_tip(f"{spec.desc}\n{screen.macro_prefix}{spec.suffix}")
    return widget


def _bob_group(screen: _BobScreen, title: str, section: list[Row], x: int, y: int) -> tuple[Any, int]:
    import phoebusgen
    from phoebusgen import widget as W

    inner: list[Any] = []
    yy = 4
    if any(r.setpoint for r in section):
        for text, col in (("Setpoint", 10 + _COL_LABEL + 6), ("Readback", 10 + _COL_LABEL + 6 + _COL_SET + 6)):
            h = W.Label(_widget_id(title, f"hdr_{text}"), text, col, yy, _COL_SET, 18)
            h.predefined_font(phoebusgen.fonts.Comment)
            inner.append(h)
        yy += 20
    x_set = 10 + _COL_LABEL + 6
    x_rbv = x_set + _COL_SET + 6
    for row in section:
        lab = W.Label(_widget_id(row.name, "label"), label_text(row.name), 10, yy, _COL_LABEL, _ROW_H)
        lab.tool_tip(row.desc)
        inner.append(lab)
        wide = row.setpoint is None and row.readback is not None and row.readback.kind == "string"
        if row.setpoint is not None:
            inner += _bob_control(screen, row.setpoint, x_set, yy, _COL_SET)
        if row.readback is not None:
            rx, rw = (x_set, _COL_SET + 6 + _COL_RBV) if wide or row.setpoint is None else (x_rbv, _COL_RBV)
            inner.append(_bob_readback(screen, row.readback, rx, yy, rw))
        yy += _PITCH
        if row.setpoint is not None and is_file_pv(row.setpoint):
            hint = W.Label(_widget_id(row.name, "hint"),
                           f"{row.desc}: a path on the IOC host", x_set, yy - 4, _COL_SET + 6 + _COL_RBV, 16)
            hint.font_size(10)
            inner.append(hint)
            yy += 14
    height = yy + 34
    g = W.Group(title, x, y, _GROUP_W, height)  # a group box shows its name as the title
    g.style_group_box()
    g.add_widget(inner)
    return g, height


def _bob_image(screen: _BobScreen, spec: PVSpec, x: int, y: int, size: int) -> list[Any]:
    from phoebusgen import widget as W

    lab = W.Label(_widget_id(spec.suffix, "label"), f"{label_text(spec.suffix)}: {spec.desc}", x, y, size, 20)
    img = W.Image(_widget_id(spec.suffix), _bob_pv(screen, spec), x, y + 22, size, size)
    img.predefined_color_map("VIRIDIS")
    img.auto_scale(True)
    img.show_toolbar(False)
    img.tool_tip(f"{spec.desc}\n{_bob_pv(screen, spec)}")
    return [lab, img]


def _bob_table(screen: _BobScreen, spec: PVSpec, x: int, y: int, w: int, h: int) -> list[Any]:
    from phoebusgen import widget as W

    lab = W.Label(_widget_id(spec.suffix, "label"), f"{label_text(spec.suffix)}: {spec.desc}", x, y, w, 20)
    t = W.Table(_widget_id(spec.suffix), _bob_pv(screen, spec), x, y + 22, w, h)
    t.show_toolbar(False)
    return [lab, t]


def _bob(screen: _BobScreen) -> str:
    """Build one .bob; phoebusgen prints (rather than raises) on bad input, so printing is an error."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        text = _bob_build(screen)
    if buf.getvalue().strip():
        raise ValueError(f"phoebusgen complained while building {screen.title}: {buf.getvalue().strip()}")
    return text


def _bob_build(screen: _BobScreen) -> str:
    from phoebusgen import screen as S
    from phoebusgen import widget as W

    db = load_db(screen.db_name)
    sections = _sections(db)
    scr = S.Screen(screen.title)
    for k, v in screen.default_macros.items():
        scr.macro(k, v)
    title = W.Label("title", f"{screen.title}  {screen.macro_prefix}", 10, 6, 900, 30)
    title.font_size(18)
    scr.add_widget(title)

    # three columns: configuration | live status | images
    status = [g for g in STATUS_GROUPS if g in sections]
    config = [g for g in sections if g not in status]
    col_x = [10, 10 + _GROUP_W + 10]
    heights = [44, 44]
    for name in config:  # configuration groups: fill the shorter of two columns
        c = 0 if heights[0] <= heights[1] else 1
        g, h = _bob_group(screen, name, sections[name], col_x[c], heights[c])
        scr.add_widget(g)
        heights[c] += h + 8
    x3 = 10 + 2 * (_GROUP_W + 10)
    y3 = 44
    for name in status:
        g, h = _bob_group(screen, name, sections[name], x3, y3)
        scr.add_widget(g)
        y3 += h + 8
    x4 = x3 + _GROUP_W + 10
    images = _images(db)
    for i, spec in enumerate(images):
        xi = x4 + (i % 2) * (_IMG + 10)
        yi = 44 + (i // 2) * (_IMG + 32)
        scr.add_widget(_bob_image(screen, spec, xi, yi, _IMG))
    y_tables = 44 + ((len(images) + 1) // 2) * (_IMG + 32)
    for spec in _tables(db):
        scr.add_widget(_bob_table(screen, spec, x4, y_tables, 2 * _IMG + 10, 240))
        y_tables += 272
    width = x4 + (2 * (_IMG + 10) if images else 0) + 10
    scr.width(width)
    scr.height(max(heights + [y3, y_tables]) + 10)
    return _pretty(scr.root)


def _pretty(root: ET.Element) -> str:
    ET.indent(root, space="  ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# -- PyDM (.ui, Qt Designer XML) ---------------------------------------------------------------
class _Enum(str):
    """A Designer enum property value such as ``PyDMLabel::String``."""


_CUSTOM = {  # class: (extends, header)
    "PyDMLabel": ("QLabel", "pydm.widgets.label"),
    "PyDMLineEdit": ("QLineEdit", "pydm.widgets.line_edit"),
    "PyDMEnumComboBox": ("QComboBox", "pydm.widgets.enum_combo_box"),
    "PyDMPushButton": ("QPushButton", "pydm.widgets.pushbutton"),
    "PyDMImageView": ("QWidget", "pydm.widgets.image"),
}


class _Designer:
    """Just enough Qt Designer XML: widgets in nested layouts, properties, custom widgets."""

    def __init__(self, title: str, width: int, height: int) -> None:
        self.root = ET.Element("ui", version="4.0")
        ET.SubElement(self.root, "class").text = "Form"
        self.form = ET.SubElement(self.root, "widget", {"class": "QWidget", "name": "Form"})
        self.prop(self.form, "geometry", ("rect", 0, 0, width, height))
        self.prop(self.form, "windowTitle", title)
        self.used: set[str] = set()
        self._names: set[str] = set()

    def prop(self, widget: ET.Element, name: str, value: Any) -> None:
        p = ET.SubElement(widget, "property", name=name)
        if isinstance(value, bool):
            ET.SubElement(p, "bool").text = "true" if value else "false"
        elif isinstance(value, _Enum):
            ET.SubElement(p, "enum").text = str(value)
        elif isinstance(value, int):
            ET.SubElement(p, "number").text = str(value)
        elif isinstance(value, tuple) and value[0] == "rect":
            r = ET.SubElement(p, "rect")
            for tag, v in zip(("x", "y", "width", "height"), value[1:]):
                ET.SubElement(r, tag).text = str(v)
        elif isinstance(value, tuple) and value[0] == "size":
            s = ET.SubElement(p, "size")
            for tag, v in zip(("width", "height"), value[1:]):
                ET.SubElement(s, tag).text = str(v)
        else:
            ET.SubElement(p, "string").text = str(value)

    def layout(self, parent: ET.Element, cls: str, name: str) -> ET.Element:
        return ET.SubElement(parent, "layout", {"class": cls, "name": self._unique(name)})

    def widget(self, layout: ET.Element, cls: str, name: str, row: int | None = None,
               col: int | None = None, colspan: int = 1, **props: Any) -> ET.Element:
        attrs = {} if row is None else {"row": str(row), "column": str(col)}
        if colspan > 1:
            attrs["colspan"] = str(colspan)
        item = ET.SubElement(layout, "item", attrs)
        w = ET.SubElement(item, "widget", {"class": cls, "name": self._unique(name)})
        if cls in _CUSTOM:
            self.used.add(cls)
        for key, value in props.items():
            self.prop(w, key, value)
        return w

    def _unique(self, name: str) -> str:
        base, n = name, 1
        while name in self._names:
            n += 1
            name = f"{base}_{n}"
        self._names.add(name)
        return name

    def finish(self) -> str:
        cws = ET.SubElement(self.root, "customwidgets")
        for cls in sorted(self.used):
            cw = ET.SubElement(cws, "customwidget")
            ET.SubElement(cw, "class").text = cls
            ET.SubElement(cw, "extends").text = _CUSTOM[cls][0]
            ET.SubElement(cw, "header").text = _CUSTOM[cls][1]
        ET.SubElement(self.root, "resources")
        ET.SubElement(self.root, "connections")
        return _pretty(self.root)


def _ui_channel(spec: PVSpec, prefix: str) -> str:
    """ca:// for scalars (the brief asks CA for PyDM's scalars), pva:// for what only PVA carries."""
    scheme = "ca" if "ca" in spec.protocols else "pva"
    return f"{scheme}://{prefix}{spec.suffix}"


def _ui_tooltip(spec: PVSpec, prefix: str) -> str:
    return f"{spec.desc} ({prefix}{spec.suffix})"


def _ui_control(d: _Designer, grid: ET.Element, spec: PVSpec, prefix: str, row: int) -> None:
    ch = _ui_channel(spec, prefix)
    name = _widget_id(spec.suffix)
    tip = _ui_tooltip(spec, prefix)
    if spec.kind == "enum" and spec.readback is None:
        d.widget(grid, "PyDMPushButton", name, row, 1, channel=ch, text=spec.enum_strs[-1],
                 pressValue="1", toolTip=tip)
    elif spec.kind == "enum":
        d.widget(grid, "PyDMEnumComboBox", name, row, 1, channel=ch, toolTip=tip)
    else:
        props: dict[str, Any] = {"channel": ch, "toolTip": tip, "alarmSensitiveBorder": True}
        if spec.kind == "string":
            props["displayFormat"] = _Enum("PyDMLineEdit::String")
            props["minimumSize"] = ("size", 220, 0)
            if is_file_pv(spec):
                props["placeholderText"] = "path on the IOC host"
        else:
            props["showUnits"] = True
        d.widget(grid, "PyDMLineEdit", name, row, 1, **props)


def _ui_readback(d: _Designer, grid: ET.Element, spec: PVSpec, prefix: str, row: int, col: int,
                 colspan: int = 1) -> None:
    props: dict[str, Any] = {"channel": _ui_channel(spec, prefix), "toolTip": _ui_tooltip(spec, prefix),
                             "alarmSensitiveBorder": True, "alarmSensitiveContent": spec.kind == "enum"}
    if spec.kind == "string":
        props["displayFormat"] = _Enum("PyDMLabel::String")
        props["wordWrap"] = True
    else:
        props["showUnits"] = True
    d.widget(grid, "PyDMLabel", _widget_id(spec.suffix), row, col, colspan, **props)


def _ui_section(d: _Designer, layout: ET.Element, title: str, section: list[Row], prefix: str) -> None:
    box = d.widget(layout, "QGroupBox", _widget_id(title, "box"), title=title)
    grid = d.layout(box, "QGridLayout", _widget_id(title, "grid"))
    r = 0
    for row in section:
        d.widget(grid, "QLabel", _widget_id(row.name, "label"), r, 0, text=label_text(row.name),
                 toolTip=row.desc)
        if row.setpoint is not None:
            _ui_control(d, grid, row.setpoint, prefix, r)
            if row.readback is not None:
                _ui_readback(d, grid, row.readback, prefix, r, 2)
        elif row.readback is not None:
            _ui_readback(d, grid, row.readback, prefix, r, 1, colspan=2)
        r += 1


def _ui_image(d: _Designer, grid: ET.Element, spec: PVSpec, prefix: str, row: int, col: int) -> None:
    box = d.widget(grid, "QGroupBox", _widget_id(spec.suffix, "box"), row, col,
                   title=f"{label_text(spec.suffix)}: {spec.desc}")
    lay = d.layout(box, "QVBoxLayout", _widget_id(spec.suffix, "layout"))
    d.widget(lay, "PyDMImageView", _widget_id(spec.suffix), imageChannel=_ui_channel(spec, prefix),
             dimensionOrder=_Enum("PyDMImageView::WidthFirst"), normalizeData=True,
             readingOrder=_Enum("PyDMImageView::Clike"),
             minimumSize=("size", 260, 260), toolTip=_ui_tooltip(spec, prefix))


def _pydm_reconstructor() -> str:
    """Reconstructor screen: tabs of settings | live status | images; macros ${P}${R}."""
    db = load_db("reconstructor.db")
    prefix = "${P}${R}"
    sections = _sections(db)
    d = _Designer("ptychostream reconstructor ${P}${R}", 1700, 1000)
    main = d.layout(d.form, "QHBoxLayout", "mainLayout")

    left_item = ET.SubElement(main, "item")
    left = d.layout(left_item, "QVBoxLayout", "leftColumn")
    left.set("stretch", "0,0,1")
    status: list[str] = [g for g in ("Model", "Control") if g in sections]
    for g in status:
        _ui_section(d, left, g, sections[g], prefix)
    rest = [g for g in sections if g not in status and g != "Status"]
    if rest:
        tabs = d.widget(left, "QTabWidget", "settingsTabs")
        for g in rest:
            page = ET.SubElement(tabs, "widget", {"class": "QWidget", "name": d._unique(_widget_id(g, "tab"))})
            attr = ET.SubElement(page, "attribute", name="title")
            ET.SubElement(attr, "string").text = g
            lay = d.layout(page, "QVBoxLayout", _widget_id(g, "tabLayout"))
            _ui_section(d, lay, g, sections[g], prefix)
            spacer_item = ET.SubElement(lay, "item")
            sp = ET.SubElement(spacer_item, "spacer", name=d._unique(_widget_id(g, "spacer")))
            d.prop(sp, "orientation", _Enum("Qt::Vertical"))

    if "Status" in sections:
        mid_item = ET.SubElement(main, "item")
        mid = d.layout(mid_item, "QVBoxLayout", "statusColumn")
        mid.set("stretch", "0,1")
        _ui_section(d, mid, "Status", sections["Status"], prefix)
        spacer_item = ET.SubElement(mid, "item")
        sp = ET.SubElement(spacer_item, "spacer", name=d._unique("statusSpacer"))
        d.prop(sp, "orientation", _Enum("Qt::Vertical"))

    images = _images(db)
    if images:
        img_item = ET.SubElement(main, "item")
        grid = d.layout(img_item, "QGridLayout", "imageGrid")
        for i, spec in enumerate(images):
            _ui_image(d, grid, spec, prefix, i // 2, i % 2)
    return d.finish()


# -- the screens and the CLI ---------------------------------------------------------------
def _bob_reconstructor() -> str:
    return _bob(_BobScreen("reconstructor.db", "$(P)$(R)", "ptychostream reconstructor",
                           {"P": "PTY:", "R": "NN:"}))


def _bob_simdet() -> str:
    return _bob(_BobScreen("simdetector.db", "$(P)", "ptychostream simulated detector", {"P": "PTY:SIM:"}))


#: file name -> (generator, db file, macro style): everything ``--out`` writes
SCREENS: dict[str, tuple[Callable[[], str], str, str]] = {
    "reconstructor.bob": (_bob_reconstructor, "reconstructor.db", "$(P)$(R)"),
    "simdet.bob": (_bob_simdet, "simdetector.db", "$(P)"),
    "reconstructor.ui": (_pydm_reconstructor, "reconstructor.db", "${P}${R}"),
}


def render(name: str) -> str:
    """The text of one generated screen file."""
    return SCREENS[name][0]()


def render_all() -> dict[str, str]:
    return {name: render(name) for name in SCREENS}


def write_all(out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_all().items():
        path = out / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        written.append(path)
    return written


def stale(out: str | Path) -> list[str]:
    """Screen files in ``out`` that differ from what db/ generates now (or are missing)."""
    out = Path(out)
    return [name for name, text in render_all().items()
            if not (out / name).is_file() or (out / name).read_text() != text]


# -- offscreen PyDM: load a .ui, let it connect, report and screenshot ---------------------------
def _widget_state(w: Any) -> dict[str, Any]:
    import numpy as np
    from pydm.widgets.base import PyDMWidget

    state: dict[str, Any] = {"class": type(w).__name__, "connected": bool(getattr(w, "_connected", False))}
    chans = [c.address for c in (w.channels() or []) if c is not None and c.address] \
        if isinstance(w, PyDMWidget) else []
    state["channels"] = chans
    if hasattr(w, "image_waveform"):
        # an image view routes its channel's connection to its redraw timer, not to _connected
        state["connected"] = bool(w.redraw_timer.isActive())
        img = w.image_waveform
        state["image_shape"] = list(getattr(img, "shape", ()))
        shown = w.getImageItem().image
        state["shown_shape"] = list(shown.shape) if shown is not None else []
        state["image_finite"] = bool(img is not None and getattr(img, "size", 0) and np.isfinite(img).all())
    elif hasattr(w, "text"):
        state["text"] = w.text() if callable(w.text) else str(w.text)
    return state


def resend_missed_connections(seen: set[str] | None = None) -> list[str]:
    """Re-send the connection of every PyDM pyepics channel whose PV is connected but whose widgets
    were told it is not; the addresses re-sent. With ``seen``, only those found so at the call before
    too (``seen`` is updated): a PV that connected a moment ago may still have its event on the way.

    PyDM 1.29's pyepics plugin sets its listeners up on a thread pool: that thread reads "not
    connected", the CA thread then connects and signals True, and the pool thread's False arrives
    after it. The widget then shows a disconnected PV for good, with no later event to mend it (seen
    once in CI: one of ~150 widgets, 90 s). The IOC served the PV; this corrects the display.
    """
    from pydm import data_plugins

    try:
        import epics  # type: ignore[import-untyped]
    except ImportError:  # no pyepics plugin in use
        return []
    sent, missed = [], set()
    for plugin in list(data_plugins.plugin_modules.values()):
        for address, conn in list(getattr(plugin, "connections", {}).items()):
            pv = getattr(conn, "pv", None)
            chid = getattr(pv, "chid", None)
            if chid is None or getattr(conn, "connected", None) or not hasattr(conn, "send_connection_state"):
                continue
            if epics.ca.isConnected(chid):
                missed.add(str(address))
                if seen is None or str(address) in seen:
                    conn.send_connection_state(conn=True)
                    sent.append(str(address))
    if seen is not None:
        seen.clear()
        seen.update(missed.difference(sent))
    return sent


def grab(ui: str | Path, macros: dict[str, str], png: str | Path | None = None, seconds: float = 5.0,
         interval: float = 0.25, size: tuple[int, int] = (1700, 1000),
         until: Callable[[dict[str, Any]], bool] | None = None, min_seconds: float = 0.0) -> dict[str, Any]:
    """Open ``ui`` with PyDM offscreen, sample every PyDM widget for ``seconds``, save ``png``.

    With ``until``, stop early once ``until(states)`` holds and ``min_seconds`` have passed.

    Returns ``{"widgets": {name: last state}, "samples": {name: [texts over time]},
    "connections_resent": [...], ...}``; a widget's state has ``connected``, its ``channels`` and
    ``text`` or ``image_shape``; see :func:`resend_missed_connections` for the last. EPICS
    clients take their addresses from the environment (EPICS_PVA_*, EPICS_CA_*), as PyDM does.
    """
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ.setdefault("PYDM_DEFAULT_PROTOCOL", "ca")
    from pydm.display import load_file
    from pydm.widgets.base import PyDMWidget
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(["ptychostream-grab"])
    display = load_file(str(ui), macros=dict(macros), target=None)
    display.resize(*size)
    display.show()
    widgets = {w.objectName(): w for w in display.findChildren(PyDMWidget)}
    samples: dict[str, list[Any]] = {name: [] for name in widgets}
    t0 = time.monotonic()
    states: dict[str, dict[str, Any]] = {}
    resent: list[str] = []
    missed: set[str] = set()
    while True:
        end = time.monotonic() + interval
        while time.monotonic() < end:
            app.processEvents()
            time.sleep(0.01)
        resent += resend_missed_connections(missed)
        states = {name: _widget_state(w) for name, w in widgets.items()}
        for name, st in states.items():
            samples[name].append(st.get("text", st.get("image_shape")))
        elapsed = time.monotonic() - t0
        if elapsed >= seconds or (until is not None and elapsed >= min_seconds and until(states)):
            break
    if png is not None:
        for _ in range(10):  # let the image views draw their last frames
            app.processEvents()
            time.sleep(0.05)
        Path(png).parent.mkdir(parents=True, exist_ok=True)
        if not display.grab().save(str(png)):
            raise OSError(f"could not write {png}")
    report = {"widgets": states, "samples": samples, "elapsed": time.monotonic() - t0,
              "macros": dict(macros), "ui": str(ui), "connections_resent": sorted(set(resent))}
    display.close()
    display.deleteLater()
    app.processEvents()
    return report


def _grab_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m ptychostream.screens grab",
                                description="Open a PyDM .ui offscreen, report its widgets as JSON, save a PNG.")
    p.add_argument("ui")
    p.add_argument("--macro", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--png", help="write a screenshot here")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--interval", type=float, default=0.25)
    p.add_argument("--until-connected", action="store_true",
                   help="stop early once every widget is connected and every image has data")
    p.add_argument("--min-seconds", type=float, default=0.0,
                   help="with --until-connected: sample for at least this long")
    p.add_argument("--json", help="write the report here (default: stdout)")
    args = p.parse_args(argv)
    macros = dict(m.split("=", 1) for m in args.macro)

    def ready(states: dict[str, dict[str, Any]]) -> bool:
        return all(s["connected"] for s in states.values()) and all(
            s.get("image_shape") for s in states.values() if "image_shape" in s)

    report = grab(args.ui, macros, args.png, args.seconds, args.interval,
                  until=ready if args.until_connected else None, min_seconds=args.min_seconds)
    text = json.dumps(report, indent=1, default=str)
    if args.json:
        Path(args.json).write_text(text)
    else:
        print(text)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["grab"]:
        return _grab_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m ptychostream.screens",
                                description="Generate the Phoebus (.bob) and PyDM (.ui) screens from db/.")
    p.add_argument("--out", default="opi", help="output folder (default: opi/)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if any file is stale")
    args = p.parse_args(argv)
    if args.check:
        bad = stale(args.out)
        for name in bad:
            print(f"stale: {Path(args.out) / name} (regenerate: python -m ptychostream.screens --out {args.out})")
        return 1 if bad else 0
    for path in write_all(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
