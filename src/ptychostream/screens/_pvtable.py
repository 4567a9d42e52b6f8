"""Documentation generated from db/: the PV tables in README.md."""

from __future__ import annotations

from ptychostream.core.pvdb import load_db

__all__ = ["pv_table"]


def pv_table(db_name: str = "reconstructor.db", prefix: str = "$(P)$(R)") -> str:
    """A Markdown table of every PV in ``db/<db_name>``: name, type, access, meaning."""
    rows = ["| PV | Type | Access | Units | Meaning |", "|---|---|---|---|---|"]
    for spec in load_db(db_name):
        access = "rw" if spec.writable else "ro"
        proto = "" if spec.protocols == {"pva", "ca"} else " (PVA only)"
        meaning = spec.desc
        if spec.kind == "enum":
            meaning += ": " + " / ".join(spec.enum_strs)
        if spec.drvl is not None and spec.drvh is not None and spec.drvl < spec.drvh:
            meaning += f" [{spec.drvl:g}..{spec.drvh:g}]"
        if spec.aliases:  # EPICS alias() names, e.g. the areaDetector ones (the same PV)
            meaning += " (also " + ", ".join(f"`{a}`" for a in spec.aliases) + ")"
        rows.append(f"| `{prefix}{spec.suffix}` | {spec.type_label}{proto} | {access} | {spec.egu} | {meaning} |")
    return "\n".join(rows)


#: README sections generated from db/: marker name -> database
SECTIONS = {"reconstructor": ("reconstructor.db", "$(P)$(R)"), "simdetector": ("simdetector.db", "$(P)")}


def update_readme(path: str) -> bool:
    """Regenerate the PV tables between ``<!-- pvtable:NAME -->`` markers. Returns True if changed."""
    import re
    from pathlib import Path

    file = Path(path)
    text = file.read_text()
    new = text
    for name, (db, prefix) in SECTIONS.items():
        pattern = re.compile(rf"(<!-- pvtable:{name} -->\n).*?(\n<!-- /pvtable -->)", re.S)
        new = pattern.sub(lambda m: m.group(1) + pv_table(db, prefix) + m.group(2), new)
    if new != text:
        file.write_text(new)
    return new != text
