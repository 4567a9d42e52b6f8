"""File arguments of the form ``file.h5::/dataset``, shared by every loader."""

from __future__ import annotations

from pathlib import Path

__all__ = ["split_dataset_path"]


def split_dataset_path(path: str | Path, dataset: str | None, what: str) -> tuple[Path, str | None]:
    """``("f.h5::/d", None)`` -> ``(Path("f.h5"), "/d")``; raises FileNotFoundError naming ``what``."""
    spath = str(path)
    if dataset is None and "::" in spath:
        spath, dataset = spath.split("::", 1)
    file = Path(spath)
    if not file.is_file():
        raise FileNotFoundError(f"{what} file not found: {file}")
    return file, dataset
