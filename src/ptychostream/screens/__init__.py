"""Operator screens (Phoebus .bob, PyDM .ui) and README PV tables, generated from ``db/``."""

from ptychostream.screens._generate import (
    SCREENS,
    Row,
    grab,
    is_file_pv,
    label_text,
    main,
    render,
    render_all,
    rows,
    stale,
    write_all,
)
from ptychostream.screens._pvtable import pv_table, update_readme

__all__ = ['Row', 'SCREENS', 'grab', 'is_file_pv', 'label_text', 'main', 'render', 'render_all', 'rows', 'stale', 'write_all', 'pv_table', 'update_readme']
