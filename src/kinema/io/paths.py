"""Output paths, checked before any work: a run that can only fail at its end, or whose
writing would destroy what a user keeps there, is refused up front."""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

FRAME_FILE = re.compile(r"frame_\d{5}\.png")  # what a PNG-frame output folder holds


def temp_name(path: Path, suffix: str) -> Path:
    """A fresh hidden name beside ``path`` (same suffix, so format sniffing still works)."""
    return path.parent / f".{path.stem}.{secrets.token_hex(6)}.tmp{suffix}"


def atomic_file(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place: a
    failure (a full disk) leaves the old file as it was and no temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path, path.suffix)
    try:
        tmp.touch(exist_ok=False)  # mode 0o666 minus umask, unlike mkstemp's 0o600
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`atomic_file` writing ``text``."""
    return atomic_file(Path(path), lambda tmp: tmp.write_text(text))


def names_folder(path: str | Path) -> bool:
    """A path names a PNG-frame folder when it ends in a separator, has no suffix, or is a
    folder."""
    text = os.fspath(path)
    return text.endswith(("/", os.sep)) or Path(text).suffix == "" or Path(text).is_dir()


def check_output_name(path: str | Path, name: str = "output") -> None:
    """Refuse output names that would make something else than asked: "-" (standard output,
    which would become a folder named "-") and an existing folder named like a file
    (``clip.mp4``), which would be filled with PNG frames."""
    if not isinstance(path, str | os.PathLike):
        raise ValueError(f"{name} must be a path (a str or Path), got {type(path).__name__}")
    text = os.fspath(path)
    if Path(text).name in ("", ".", ".."):  # "", ".", "/": no name to write under
        raise ValueError(f"{name} {text!r} names no file; give a file name (.mp4 .gif .webp) "
                         "or a new folder/ for PNG frames")  # fmt: skip
    try:
        Path(text).expanduser()
    except RuntimeError:  # "~nouser/x.mp4"
        raise ValueError(f"{name} {text}: no such user's home folder") from None
    if text == "-":
        raise ValueError(f"{name} '-' (standard output) is not supported; give a file name "
                         "(.mp4 .gif .webp) or a folder/ for PNG frames")  # fmt: skip
    media = Path(text).suffix.lower() in (".mp4", ".gif", ".webp")
    if media and Path(text).expanduser().is_dir() and not text.endswith(("/", os.sep)):
        raise ValueError(f"{name} {text} is an existing folder; give a file name, or "
                         f"'{text}/' for PNG frames in that folder")  # fmt: skip


def check_writable(path: str | Path, name: str = "output") -> Path:
    """``path`` (``~`` expanded) if a file could be made there: not a FIFO, socket or device
    (an output is written beside it and renamed over it, which would replace one), and its
    nearest existing ancestor is a writable folder. Raises ValueError naming ``name``
    otherwise."""
    path = Path(path).expanduser()
    kind = special_kind(path)
    if kind:
        raise ValueError(f"{name} {path} is {kind}, not a file: outputs are written whole and "
                         "renamed into place; give a file or folder path")  # fmt: skip
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK) or not can_create_in(parent):
        raise ValueError(f"{name} {path}: {parent} is not a writable folder")
    return path


def special_kind(path: Path) -> str | None:
    """ "a FIFO", "a socket" or "a device" when ``path`` is one, else None."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))  # fmt: skip
    return next((kind for test, kind in kinds if test(mode)), None)


def can_create_in(folder: Path) -> bool:
    """Whether a file can be made in ``folder``, tried (a hidden file, removed at once): write
    permission alone passes folders no file can be made in (/proc and the like). A full disk
    passes: that is said, as one line, when the output is written."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".kinema-check-"):
            return True
    except OSError as err:
        return err.errno in (errno.ENOSPC, errno.EDQUOT)  # full: said when it is written


def check_folder(path: str | Path, name: str) -> Path:
    """``path`` (``~`` expanded) if it is a folder or could be made one: not a file, and its
    nearest existing ancestor writable. Raises ValueError naming ``name`` otherwise."""
    path = check_writable(path, name)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {path} is a file; give a folder")
    return path


def check_frame_folder(path: str | Path, name: str = "output") -> None:
    """A PNG-frame output replaces its folder whole: refuse an existing folder that holds
    anything but frames (``frame_00000.png`` ...) of an earlier output."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():  # a file named without an extension, a FIFO
        raise ValueError(
            f"{name} {path} is a file; a name without .mp4, .gif or .webp means a folder of PNG "
            "frames: give a new folder, or a file name with one of those endings"
        )
    if not path.is_dir():
        return
    others = sorted(p.name for p in path.iterdir() if not FRAME_FILE.fullmatch(p.name))
    if others:
        raise ValueError(
            f"{name} {path} is a folder holding other files ({listed(others)}); PNG frames "
            "replace the folder whole: give a new folder, or a file name ending .mp4, .gif or "
            ".webp"
        )


# What kinema writes into a model folder (kinema.json, transformer/, vae/, a stored text
# encoder, a step-cache calibration) and into a component folder (a VAE export).
MODEL_ENTRIES = frozenset({"kinema.json", "transformer", "vae", "text_encoder", "tokenizer",
                           "image_encoder", "image_processor", "step_cache.json"})  # fmt: skip
COMPONENT_ENTRIES = frozenset({"config.json", "model.safetensors"})


def check_export_folder(
    path: str | Path, kept: frozenset[str] = MODEL_ENTRIES, name: str = "export folder"
) -> Path:
    """An export replaces its folder whole: refuse a file, or a folder holding anything but
    what an earlier export wrote there (``kept``), e.g. the user's other models, or a training
    run's checkpoints. Returns the path (``~`` expanded)."""
    path = check_folder(path, name)
    others = sorted(p.name for p in path.iterdir() if p.name not in kept) if path.is_dir() else []
    if others:
        raise ValueError(
            f"{name} {path} holds other files ({listed(others)}); an export replaces the folder "
            "whole: give a new folder, or an earlier export's"
        )
    return path


def listed(names: list[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it process-wide, a
    race with other threads' writes)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def usual_modes(path: str | Path) -> None:
    """Give a written file, or a folder and all it holds, the modes plain ``open`` and
    ``mkdir`` would (0o666 / 0o777 less the umask): ``tempfile.mkdtemp`` makes 0o700 folders
    and safetensors writes 0o600 files, which other users of a shared model could not read."""
    path, mask = Path(path), _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
