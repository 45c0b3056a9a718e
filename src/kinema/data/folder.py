"""Users' own videos for training: a folder of clips and their captions.

Captions come from the first of these that exists in ``root``:

1. ``metadata.jsonl``: one JSON object per line with a file column (``file_name``, ``video``
   or ``path``, relative to ``root``) and a caption column (``caption``, ``text`` or
   ``prompt``), the Hugging Face video-dataset layout;
2. ``metadata.csv``: the same columns;
3. a ``.txt`` sidecar per video with the same stem (``clip.mp4`` + ``clip.txt``); a video
   without one gets the empty caption.

Every video is probed (headers only) when the dataset is built; unreadable ones are skipped
with a warning and listed in :attr:`VideoFolder.skipped`. A file that breaks later, during
training, is skipped the same way and the next good item is returned instead (in a
DataLoader worker that record lives in the worker's copy of the dataset).

A clip is ``frames`` frames at ``fps`` from a random start, drawn by a generator seeded with
``(seed, epoch, index)``, so an epoch replays exactly; call :meth:`VideoFolder.set_epoch` (or
:meth:`BucketBatchSampler.set_epoch`, which also sets it) before each epoch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kinema.io.video import VideoInfo, probe, read_clip, resize_center_crop
from kinema.pipeline import is_integer, is_number

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v", ".gif", ".webp")
FILE_KEYS = ("file_name", "video", "path")
CAPTION_KEYS = ("caption", "text", "prompt")
RESIZE_MODES = ("crop", "bucket")

Size = tuple[int, int]
"""(width, height) in pixels."""


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def _pick(row: dict[str, Any], keys: Sequence[str], where: str) -> str:
    """The first of ``keys`` present in ``row``: text (valid Unicode), else ValueError."""
    for key in keys:
        value = row.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"{where}: {key} is {json.dumps(value)}, not text")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: half an emoji cut by some tool
            raise ValueError(f"{where}: {key} is not valid Unicode text ({value!r})") from None
        return value
    if any(key in row for key in keys):  # json: null
        raise ValueError(f"{where} has no {keys[0]} (null)")
    found = sorted(str(k) for k in row if k is not None)
    raise ValueError(f"{where} has none of the columns {list(keys)}; found {found}")


def read_text(path: Path) -> str:
    """A caption or metadata file as text: UTF-8, with or without the byte-order mark that
    Excel's and Notepad's "UTF-8" add; ValueError naming the file otherwise."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
        ) from None


def _jsonl_rows(path: Path) -> list[tuple[str, str]]:
    """(file name, caption) per non-empty line of a ``metadata.jsonl``."""
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n} is not valid JSON: {e}") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {n} is {type(row).__name__}; expected a JSON object")
        where = f"{path} line {n}"
        rows.append((_pick(row, FILE_KEYS, where), _pick(row, CAPTION_KEYS, where)))
    return rows


def _csv_rows(path: Path) -> list[tuple[str, str]]:
    """(file name, caption) per row of a ``metadata.csv`` with a header line."""
    try:  # strict: a quote left open is an error, not a caption swallowing every later row
        rows = list(csv.DictReader(io.StringIO(read_text(path), newline=""), strict=True))
    except csv.Error as err:
        hint = " (a quote left open?)" if "end of data" in str(err) else ""
        raise ValueError(f"{path} is not valid CSV: {err}{hint}") from None
    for n, row in enumerate(rows, start=2):
        if None in row:  # cells past the header's: an unquoted comma in a caption
            raise ValueError(f"{path} row {n} has more cells than the header; quote a caption "
                             'that holds commas ("a cat, running")')  # fmt: skip
        if None in row.values():  # "a.mp4" alone (an empty caption is "a.mp4,")
            raise ValueError(f"{path} row {n} has fewer cells than the header "
                             f"({','.join(k for k in row if k is not None)})")  # fmt: skip
    return [
        (_pick(row, FILE_KEYS, f"{path} row {n}"), _pick(row, CAPTION_KEYS, f"{path} row {n}"))
        for n, row in enumerate(rows, start=2)
    ]


def _existing(root: Path, rows: list[tuple[str, str]], source: Path) -> list[tuple[Path, str]]:
    """Rows whose file exists under ``root``; warn about the rest, fail if none is left, or
    if a row names a file outside ``root`` (an absolute path elsewhere, or ``..`` out of it):
    what a run trains on, and what its latent cache is checked against, is what lies in the
    folder. Names are taken as written (``sub/../a.mp4`` is ``a.mp4``; a linked subfolder is
    inside)."""
    inside = os.path.normpath(os.path.abspath(root))
    written, rows = rows, []
    for name, caption in written:
        where = os.path.normpath(os.path.join(inside, name))
        if os.path.commonpath([inside, where]) != inside:
            raise ValueError(f"{source} names {name!r}, outside {root}: file names are "
                             "relative to the folder, within it")  # fmt: skip
        rows.append((os.path.relpath(where, inside), caption))
    found = [(root / name, caption) for name, caption in rows if (root / name).is_file()]
    missing = [name for name, _ in rows if not (root / name).is_file()]
    if missing:
        warnings.warn(
            f"{source} names {len(missing)} file(s) that do not exist, skipped: {missing[:5]}",
            stacklevel=3,
        )
    if not found:
        raise ValueError(f"{source} names {len(rows)} video(s) but none exists under {root}")
    return found


def files_under(root: Path) -> list[Path]:
    """Every file below ``root``, sorted, following linked folders (a folder of videos linked
    in from another disk), each real folder once (a link back up is not followed round)."""
    found, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        found += [Path(folder) / name for name in files]
    return sorted(found)


METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # captions of a whole folder, in this order


def is_video_name(path: Path) -> bool:
    """A visible file with a video extension (hidden files are skipped: temp writes)."""
    return path.suffix.lower() in VIDEO_SUFFIXES and not path.name.startswith(".")


def _sidecar_items(root: Path, files: list[Path]) -> list[tuple[Path, str]]:
    """Every video of ``files`` (those under ``root``) with its ``.txt`` caption or ``""``."""
    videos = [p for p in files if is_video_name(p)]
    texts = [p for p in files if p.suffix.lower() == ".txt"]  # A.TXT too (cameras, Windows)
    if not videos:
        what = f"{len(texts)} caption file(s) but no videos" if texts else "no videos"
        raise ValueError(f"video folder {root} has {what}; video extensions: {VIDEO_SUFFIXES}")
    sidecars = {p.with_suffix(""): p for p in sorted(texts, key=lambda p: p.suffix == ".txt")}
    items = [(p, _read_caption(sidecars.get(p.with_suffix("")))) for p in videos]
    uncaptioned = [p for p in videos if p.with_suffix("") not in sidecars]
    if uncaptioned:
        names = [str(p.relative_to(root)) for p in uncaptioned[:3]]
        more = f" and {len(uncaptioned) - 3} more" if len(uncaptioned) > 3 else ""
        warnings.warn(f"{len(uncaptioned)} video(s) in {root} have no .txt caption (their "
                      f"caption is empty): {', '.join(names)}{more}", stacklevel=3)  # fmt: skip
    return items


def _read_caption(path: Path | None) -> str:
    """A sidecar caption, stripped, or ``""`` when there is no sidecar."""
    return read_text(path).strip() if path is not None and path.is_file() else ""


def check_root(root: str | Path) -> Path:
    """``root`` if it is a folder; ValueError naming it (and where a relative path starts)."""
    root = Path(root)
    if not root.is_dir():
        hint = "" if root.is_absolute() else f" (a relative path is from {Path.cwd()})"
        raise ValueError(f"video folder {root} does not exist or is not a directory{hint}")
    return root


def find_videos(root: str | Path) -> list[tuple[Path, str]]:
    """(video path, caption) pairs of a folder, by the layouts in the module docstring.

    Raises:
        ValueError: the root does not exist, holds no videos, has caption files but no
            videos, or its metadata names no existing file or lacks the needed columns.
    """
    root = check_root(root)
    files = files_under(root)  # one walk of the folder for all that follows
    for name, reader in zip(METADATA_FILES, (_jsonl_rows, _csv_rows), strict=True):
        source = root / name
        if source.is_file():
            rows = reader(source)
            if not rows:
                raise ValueError(f"{source} has no rows; expected file_name and caption")
            found = _existing(root, rows, source)
            listed = {p.resolve() for p, _ in found}
            unlisted = [p for p in files if is_video_name(p) and p.resolve() not in listed]
            if unlisted:
                names = [p.name for p in unlisted[:5]]
                warnings.warn(f"{len(unlisted)} video(s) in {root} are not in {name} and are "
                              f"not used: {names}", stacklevel=2)  # fmt: skip
            return found
    nested = [p for p in files if p.name in METADATA_FILES]
    if nested:  # a Hugging Face dataset's split folder (root/train/metadata.jsonl)
        raise ValueError(f"{root} has no {' or '.join(METADATA_FILES)} of its own but "
                         f"{nested[0]}: give data.root {nested[0].parent} (captions are read "
                         "from the root's metadata file or .txt sidecars)")  # fmt: skip
    return _sidecar_items(root, files)


# ---------------------------------------------------------------------------------------------
# Sizes and buckets
# ---------------------------------------------------------------------------------------------


def _check_size(size: Any, name: str) -> Size:
    """A (width, height) pair of positive ints, or ValueError naming it."""
    ok = isinstance(size, (tuple, list)) and len(size) == 2
    if not ok or not all(is_integer(v) and v > 0 for v in size):
        raise ValueError(f"{name} {size!r} must be (width, height) with positive ints")
    return int(size[0]), int(size[1])


def nearest_bucket(width: int, height: int, buckets: Sequence[Size]) -> Size:
    """The bucket (w, h) closest in aspect ratio to ``width / height`` (in log ratio)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


def _resolve_sizes(
    resize: str, size: Size | None, buckets: Sequence[Size] | None
) -> tuple[Size, ...]:
    """The output sizes a dataset may produce: ``(size,)`` or the buckets."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize {resize!r} is not one of {RESIZE_MODES}")
    if resize == "crop":
        if buckets is not None:
            raise ValueError("buckets are used only with resize='bucket'")
        if size is None:
            raise ValueError("resize='crop' needs size=(width, height)")
        return (_check_size(size, "size"),)
    if not buckets:
        raise ValueError(f"resize='bucket' needs a non-empty list of buckets; got {buckets!r}")
    sizes = tuple(_check_size(b, "bucket") for b in buckets)
    if size is not None and _check_size(size, "size") not in sizes:
        raise ValueError(f"size {size!r} is not one of the buckets {list(sizes)}")
    return sizes


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> float32 (3, T, H, W) in [-1, 1]."""
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)  # (3, T, H, W)
    return x.float() / 127.5 - 1.0


def pad_frames(frames: np.ndarray, count: int) -> np.ndarray:
    """Frames (T, H, W, 3) padded to ``count`` by repeating the last frame."""
    if len(frames) >= count:
        return frames
    tail = np.repeat(frames[-1:], count - len(frames), axis=0)  # (count - T, H, W, 3)
    return np.concatenate([frames, tail])


class VideoFolder(Dataset):
    """Captioned clips from a folder of videos, as float tensors ready for the VAE.

    Args:
        root: the folder (see the module docstring for the caption layouts).
        frames: frames per clip, >= 1 (Wan models want 4k + 1).
        fps: the rate the clip is sampled at (nearest source frame), > 0.
        size: (width, height) of every clip for ``resize="crop"``.
        resize: ``"crop"`` (cover ``size``, centre-crop) or ``"bucket"`` (cover the bucket
            nearest in aspect ratio to the video, centre-crop to it).
        buckets: the (width, height) sizes for ``resize="bucket"``.
        seed: with the epoch and the index, seeds each clip's random start; >= 0.

    Items are dicts: ``video`` float (3, frames, H, W) in [-1, 1], ``caption`` str, ``path``
    str. ``skipped`` lists ``(path, reason)`` for every unreadable file met so far.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        frames: int,
        fps: float,
        size: Size | None = None,
        resize: str = "crop",
        buckets: Sequence[Size] | None = None,
        seed: int = 0,
    ) -> None:
        if not is_integer(frames) or frames < 1:
            raise ValueError(f"frames {frames!r} must be an int >= 1")
        if not (is_number(fps) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps {fps!r} must be a finite number > 0")
        if not is_integer(seed) or seed < 0:
            raise ValueError(f"seed {seed!r} must be an int >= 0")
        self.root, self.frames, self.fps = Path(root).expanduser(), int(frames), float(fps)
        self.seed = int(seed)
        self.resize, self.sizes = resize, _resolve_sizes(resize, size, buckets)
        self.epoch = 0
        self.skipped: list[tuple[str, str]] = []
        self._broken: set[int] = set()
        self._readable: dict[int, float] = {}  # seconds a video decodes for, where its header
        #   claims more (a truncated file): clip starts are drawn within them
        self._warned_short = False
        self.said_in: Path | None = None  # a folder DataLoader workers say warnings once in
        self.items, self.infos = self._probe_all(find_videos(self.root))
        self._buckets = [nearest_bucket(i.width, i.height, self.sizes) for i in self.infos]

    def _probe_all(
        self, found: list[tuple[Path, str]]
    ) -> tuple[list[tuple[Path, str]], list[VideoInfo]]:
        """Keep the readable videos and their header facts; record the others as skipped."""
        items, infos = [], []
        for path, caption in found:
            try:
                infos.append(probe(path))
                items.append((path, caption))
            except ValueError as e:
                self._record_skip(path, e)
        if not items:
            first, why = self.skipped[0]
            raise ValueError(f"all {len(found)} video(s) in {self.root} are unreadable; the "
                             f"first, {first}: {why}")  # fmt: skip
        if self.skipped:  # the count, after a line per file
            self._say_once("skipped", f"{len(self.skipped)} of {len(found)} video(s) in "
                           f"{self.root} are unreadable and skipped; training on the "
                           f"other {len(items)}")  # fmt: skip
        return items, infos

    def _record_skip(self, path: Path, error: Exception) -> None:
        """Warn about an unreadable file and add it to :attr:`skipped`."""
        self._say_once(f"skip {path}", f"skipping unreadable video: {error}")
        self.skipped.append((str(path), str(error)))

    def _say_once(self, key: str, message: str) -> None:
        """Warn ``message``, which DataLoader workers sharing :attr:`said_in` (each with its
        own copy of this dataset) say once between them: the first to claim ``key`` there."""
        if self.said_in is not None:
            mark = self.said_in / hashlib.sha1(key.encode()).hexdigest()
            try:
                os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        warnings.warn(message, stacklevel=4)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose clip starts :meth:`__getitem__` draws."""
        self.epoch = int(epoch)

    def bucket_of(self, index: int) -> Size:
        """The (width, height) item ``index`` is resized to."""
        return self._buckets[index]

    def clip_start(self, index: int) -> float:
        """The clip's start in seconds, drawn from ``(seed, epoch, index)``."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        length = min(self.infos[index].duration, self._readable.get(index, math.inf))
        room = length - self.frames / self.fps
        return float(rng.uniform(0.0, room)) if room > 0 else 0.0

    def _load(self, index: int, size: Size, start: float | None = None) -> dict[str, Any]:
        """Decode, pad, resize and normalise item ``index`` to ``size`` (from ``start``
        seconds; None: :meth:`clip_start`'s)."""
        path, caption = self.items[index]
        start = self.clip_start(index) if start is None else start
        clip = read_clip(path, start=start, frames=self.frames, fps=self.fps)
        if len(clip) < self.frames:
            self._warn_short(path, len(clip))
            clip = pad_frames(clip, self.frames)
        clip = resize_center_crop(clip, *size)  # (T, H, W, 3)
        return {"video": to_tensor(clip), "caption": caption, "path": str(path)}

    def _load_or_salvage(self, index: int, size: Size) -> dict[str, Any]:
        """:meth:`_load`; when a clip starting past 0 s fails (a file cut short, whose header
        still claims the whole length), the video is read from its start instead, and later
        starts are drawn before the failing one (each failure lowers that bound, down to the
        readable part). Warned once per video."""
        try:
            return self._load(index, size)
        except ValueError:
            start = self.clip_start(index)
            if start <= 0:
                raise
            first = index not in self._readable
            self._readable[index] = start
            item = self._load(index, size, start=0.0)  # a file broken from 0 s on is skipped
            if first:
                path = self.items[index][0]
                self._say_once(f"cut {path}", f"{path} does not decode from {start:.2f} s on; "
                               "its clips now start before that (warned once)")  # fmt: skip
            return item

    def _warn_short(self, path: Path, got: int) -> None:
        """Warn (once per dataset) that clips are padded with their last frame."""
        if not self._warned_short:
            self._warned_short = True
            self._say_once("short", f"{path} gives {got} of {self.frames} frames at {self.fps} "
                           "fps; short clips are padded by repeating their last frame (warned "
                           "once)")  # fmt: skip

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Item ``index``, or the next readable one (resized to ``index``'s bucket)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} videos")
        size = self.bucket_of(index)
        for step in range(len(self)):
            j = (index + step) % len(self)
            if j in self._broken:
                continue
            try:
                return self._load_or_salvage(j, size)
            except ValueError as e:
                self._broken.add(j)
                self._record_skip(self.items[j][0], e)
        first, reason = self.skipped[0] if self.skipped else (self.root, "?")
        raise ValueError(f"every video in {self.root} failed to decode ({len(self.skipped)} "
                         f"skipped; the first, {first}: {reason})")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


def group_indices(keys: Sequence[Any]) -> list[list[int]]:
    """Indices of ``keys`` grouped by equal key (a bucket, a shape), in sorted key order."""
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return [groups[key] for key in sorted(groups)]


def group_batches(
    groups: Sequence[Sequence[int]], batch: int, generator: torch.Generator | None,
    last: str = "keep",
) -> list[list[int]]:  # fmt: skip
    """One epoch's batches of ``batch`` indices, each from one group (one bucket): every group
    shuffled by ``generator`` and cut in order, then the batches of all groups shuffled
    together (in the given order when ``generator`` is None). A group's last, short batch is
    kept (``last="keep"``), dropped ("drop") or topped up from the group's start ("top_up",
    so every batch is full)."""
    batches = []
    for group in groups:
        order = list(group)
        if generator is not None:
            order = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
        if last == "top_up" and order:
            full = -(-len(order) // batch) * batch
            order = (order * -(-full // len(order)))[:full]
        cuts = [order[s : s + batch] for s in range(0, len(order), batch)]
        batches += [c for c in cuts if last != "drop" or len(c) == batch]
    if generator is None:
        return batches
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices that share one bucket (so one output size), shuffled per epoch by a
    generator seeded with ``(seed, epoch)`` (:func:`group_batches`)."""

    def __init__(
        self,
        dataset: VideoFolder,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size {batch_size!r} must be an int >= 1")
        self.dataset, self.batch_size = dataset, batch_size
        self.shuffle, self.drop_last, self.seed, self.epoch = shuffle, drop_last, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch here and on the dataset (clip starts change with it)."""
        self.epoch = int(epoch)
        self.dataset.set_epoch(epoch)

    def _batches(self) -> list[list[int]]:
        """This epoch's batches."""
        groups = group_indices([self.dataset.bucket_of(i) for i in range(len(self.dataset))])
        generator = epoch_generator(self.seed, self.epoch) if self.shuffle else None
        last = "drop" if self.drop_last else "keep"
        batches = group_batches(groups, self.batch_size, generator, last)
        if not batches and groups:  # a loop over the loader would silently do nothing
            most = max(map(len, groups))
            raise ValueError(
                f"batch_size {self.batch_size} with drop_last=True leaves no batch: the largest "
                f"bucket holds {most} video{'s' * (most != 1)}; use a smaller batch_size or "
                "drop_last=False"
            )
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator that orders one epoch of a sampler seeded with ``seed``."""
    return torch.Generator().manual_seed(seed * 7919 + epoch)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Items -> ``video`` (B, 3, T, H, W), ``caption`` list[str], ``path`` list[str]."""
    shapes = {tuple(item["video"].shape) for item in items}
    if len(shapes) != 1:
        raise ValueError(f"items of one batch have shapes {sorted(shapes)}; batch by bucket")
    return {
        "video": torch.stack([item["video"] for item in items]),  # (B, 3, T, H, W)
        "caption": [item["caption"] for item in items],
        "path": [item["path"] for item in items],
    }


def make_loader(
    dataset: VideoFolder,
    batch_size: int,
    num_workers: int = 2,
    seed: int = 0,
    *,
    shuffle: bool = True,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader with bucketed batches, decoding in ``num_workers`` worker processes.

    Call ``loader.batch_sampler.set_epoch(epoch)`` before each epoch for fresh order and
    clip starts.
    """
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers {num_workers!r} must be an int >= 0")
    sampler = BucketBatchSampler(
        dataset, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed
    )
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate)
