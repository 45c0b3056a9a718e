"""Output paths, checked before any work: a run that can only fail at its end, or whose
writing would destroy what a user keeps there, is refused up front."""

from __future__ import annotations

import os
import re
from pathlib import Path

FRAME_FILE = re.compile(r"frame_\d{5}\.png")  # what a PNG-frame output folder holds


def names_folder(path: str | Path) -> bool:
    """A path names a PNG-frame folder when it ends in a separator, has no suffix, or is a
    folder."""
    text = os.fspath(path)
    return text.endswith(("/", os.sep)) or Path(text).suffix == "" or Path(text).is_dir()


def check_writable(path: str | Path, name: str = "output") -> Path:
    """``path`` (``~`` expanded) if a file could be made there: its nearest existing
    ancestor is a writable folder. Raises ValueError naming ``name`` otherwise."""
    path = Path(path).expanduser()
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"{name} {path}: {parent} is not a writable folder")
    return path


def check_frame_folder(path: str | Path, name: str = "output") -> None:
    """A PNG-frame output replaces its folder whole: refuse an existing folder that holds
    anything but frames (``frame_00000.png`` ...) of an earlier output."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return
    others = sorted(p.name for p in path.iterdir() if not FRAME_FILE.fullmatch(p.name))
    if others:
        raise ValueError(
            f"{name} {path} is a folder holding other files ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); PNG frames replace the folder whole: "
            "give a new folder, or a file name ending .mp4, .gif or .webp"
        )
