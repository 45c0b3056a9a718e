"""Images and videos a request is conditioned on: read, check and fit to the request.

Policy (documented in the README): an image or source video is scaled to cover the requested
size and centre-cropped; one smaller than half the request in either side is upscaled with a
warning. Video-to-video takes the source's frame count and fps unless the request gives them;
an extension keeps the source frames exactly as they are, so its size is the source's.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kinema import notes
from kinema.io.video import (
    has_audio,
    iter_video,
    probe,
    read_image,
    read_video,
    resize_center_crop,
    rgb_image,
    scan_video,
)

URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def check_source(value: Any, name: str) -> None:
    """Refuse, as typed, what is not a file to read: a URL ("https://..."; nothing is
    downloaded) or "-" (standard input)."""
    if not isinstance(value, str):
        return
    if URL.match(value):
        raise ValueError(f"{name} {value}: URLs are not read (kinema downloads nothing); "
                         "download the file and give its path")  # fmt: skip
    if value == "-":
        raise ValueError(f"{name} '-': standard input is not read; give a file path")


def read_image_any(image: Any) -> np.ndarray:
    """A path, a PIL image (any mode; EXIF orientation applied, as for a file) or a uint8
    array (H, W, 3) -> uint8 array (H, W, 3)."""
    from PIL import Image, ImageOps

    if isinstance(image, str | Path):
        return read_image(image)
    if isinstance(image, Image.Image):
        try:
            return np.asarray(rgb_image(ImageOps.exif_transpose(image)))
        except ValueError as err:  # "Operation on closed image": whose?
            raise ValueError(f"cannot read the PIL image given: {err}") from err
    if isinstance(image, bytes | bytearray | memoryview):
        raise ValueError("image must be a path, a PIL image or a uint8 (H, W, 3) array; got "
                         "bytes (open them with PIL.Image.open(io.BytesIO(data)))")  # fmt: skip
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image array must be uint8 (H, W, 3), got {arr.dtype} {arr.shape}")
    if not arr.size:
        raise ValueError(f"image array is empty: {arr.shape[1]}x{arr.shape[0]} pixels")
    return arr


def read_video_any(video: Any, fps: float | None = None) -> tuple[np.ndarray, float | None]:
    """A path or uint8 array (T, H, W, 3) -> (frames, fps); arrays carry no fps."""
    if isinstance(video, str | Path):
        return read_video(video, fps=fps)
    arr = np.asarray(video)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[3] != 3:
        raise ValueError(f"video array must be uint8 (T, H, W, 3), got {arr.dtype} {arr.shape}")
    if not arr.shape[0]:
        raise ValueError("video array has no frames")
    if not arr.shape[1] or not arr.shape[2]:
        raise ValueError(f"video array has empty frames: {arr.shape[2]}x{arr.shape[1]} pixels")
    return arr, fps


def plural(count: int, noun: str) -> str:
    """ "1 frame", "3 frames"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def warn_audio(path: Path, task: str) -> None:
    """Say that a source's sound is not carried into the output (kinema makes video only)."""
    if has_audio(path):
        notes.warn(f"{path.name} has sound; the {task} is video only (add the sound back with "
                   "a video editor or ffmpeg)", stacklevel=3)  # fmt: skip


def check_upscale(size: tuple[int, int], width: int, height: int, stacklevel: int = 3) -> None:
    """Warn when an input of ``size`` (w, h) is far smaller (under half a side) than the
    request: it will be upscaled."""
    w, h = size
    if w * 2 < width or h * 2 < height:
        short = [f"{n} {got} < {want} / 2" for n, got, want in (("width", w, width),
                 ("height", h, height)) if got * 2 < want]  # fmt: skip
        notes.warn(
            f"input {w}x{h} is far smaller than the request {width}x{height} "
            f"({', '.join(short)}); upscaling it",
            stacklevel=stacklevel + 1,
        )


def fit_image(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale to cover (width, height) and centre-crop; warn when upscaling more than 2x."""
    h, w = image.shape[-3:-1]
    check_upscale((w, h), width, height)
    return resize_center_crop(image, width, height)


def source_fps(video: Any, default: float) -> float:
    """The frame rate of a source clip (:func:`source_rate`; ``default`` for arrays)."""
    if isinstance(video, str | Path):
        return source_rate(probe(os.path.expanduser(video)).fps)  # (~nosuchuser: as it is)
    return default


@dataclass(frozen=True)
class RestyleSource:
    """Video-to-video's source: ``count`` frames read at ``fps`` (native when None) and fitted
    to ``size`` (w, h) one at a time as they are taken (:meth:`frames`), so a long source is
    never whole in memory: a file is decoded as the restyle goes, after one counting pass."""

    video: Path | np.ndarray
    fps: float | None
    count: int
    size: tuple[int, int]

    def __len__(self) -> int:
        return self.count

    def frames(self) -> Iterator[np.ndarray]:
        """The fitted frames (H, W, 3) uint8 in order, ``count`` of them."""
        raw = iter_video(self.video, self.fps) if isinstance(self.video, Path) else self.video
        for frame in itertools.islice(raw, self.count):
            yield resize_center_crop(frame, *self.size)


def source_video(req: Any, temporal: int, size: tuple[int, int]) -> tuple[Any, RestyleSource]:
    """Video-to-video: the source resampled, trimmed to tk+1 frames and fitted to the size.

    Frame count and fps follow the source unless the request gives them; the size is the
    request's (or ``size``, the model default). A file is counted here, then streamed."""
    if isinstance(req.video, str | Path):
        video: Path | np.ndarray = Path(req.video)
        fps = req.fps or source_fps(video, 16.0)  # read at it: a variable rate's timing
        length, last, _ = scan_video(video, fps=fps, last=1, limit=req.frames)
        warn_audio(video, "restyle")
        shown = (last.shape[2], last.shape[1])  # as shown (a rotated phone video upright)
    else:
        video, native = read_video_any(req.video)
        fps = req.fps or source_rate(native)
        length, shown = len(video), (video.shape[2], video.shape[1])
    count = req.frames or (length - 1) // temporal * temporal + 1
    if length == 1 and req.frames is None:
        notes.warn("the video to restyle is a single frame (a still image), so the restyle is "
                   "one frame; to start a clip from a picture, give it as the image",
                   stacklevel=2)  # fmt: skip
    if length < count:
        raise ValueError(f"source video has {plural(length, 'frame')}; the request needs {count}")
    if req.frames is None and count < length:
        notes.warn(f"video-to-video makes {temporal}k+1 frames: the source's {length} are cut "
                   f"to {count}", stacklevel=2)  # fmt: skip
    width, height = req.width or size[0], req.height or size[1]
    check_upscale(shown, width, height, stacklevel=2)  # as fit_image's, one call less deep
    source = RestyleSource(video, fps if isinstance(video, Path) else None, count,
                           (width, height))  # fmt: skip
    return dataclasses.replace(req, frames=count, fps=fps, width=width, height=height), source


@dataclass(frozen=True)
class SourceClip:
    """A clip to extend, read from its file twice instead of held: once when the request is
    prepared (its length, size and last ``context`` frames, ``tail``), and again, a few frames
    at a time, when the output is written (:meth:`pieces`). ``len`` is its frame count."""

    path: Path
    count: int
    tail: np.ndarray  # (context, H, W, 3) uint8: the frames the continuation starts from

    def __len__(self) -> int:
        return self.count

    def pieces(self, size: int = 16) -> Iterator[np.ndarray]:
        """The clip's frames, as decoded, in arrays of up to ``size`` frames."""
        frames = iter_video(self.path)
        while piece := list(itertools.islice(frames, size)):
            yield np.stack(piece)


def extension_source(req: Any, context: int, spatial: int) -> tuple[Any, Any]:
    """Extension: the source clip as it is, its frames never resampled (a 16.67 fps GIF read
    at 17 fps would repeat a frame), at its size; the request's fps (else the source's,
    rounded) times the new frames and the file. A file is streamed (:class:`SourceClip`): a
    long video is not held in memory; an array is used as it is."""
    if isinstance(req.extend, str | Path):
        count, last, fps = scan_video(req.extend, last=context, one_size=True)  # one pass
        source: Any = SourceClip(Path(req.extend), count, last)
        warn_audio(source.path, "extension")
    else:
        source, fps = read_video_any(req.extend)
    if len(source) < context:
        raise ValueError(
            f"video to extend has {plural(len(source), 'frame')}; at least {context} are "
            "needed as context"
        )
    h, w = source.shape[1:3] if isinstance(source, np.ndarray) else source.tail.shape[1:3]
    if w % spatial or h % spatial:
        raise ValueError(
            f"video to extend is {w}x{h} (as shown: non-square pixels are widened); its sides "
            f"must be multiples of {spatial} (resize it first, or use video-to-video)"
        )
    if (req.width or w, req.height or h) != (w, h):
        raise ValueError(f"an extension keeps the source size {w}x{h}; do not pass another size")
    if req.fps and fps and abs(req.fps - source_rate(fps)) > 0.01:
        warn_relabelled(source_rate(fps), req.fps)
    fps = req.fps or source_rate(fps)
    return dataclasses.replace(req, width=w, height=h, fps=fps), source


def warn_relabelled(source: float, fps: float) -> None:
    """Say that an extension written at ``fps`` plays its source (made at ``source`` fps)
    faster or slower: its frames are kept as they are, one rate for the whole file."""
    notes.warn(f"the extension is written at {fps:g} fps: its source part, made at {source:g} "
               f"fps, plays at {fps / source:.3g}x its speed (leave fps out to keep its timing)",
               stacklevel=3)  # fmt: skip


def source_rate(fps: float | None) -> float:
    """The rate a restyle or an extension is written at: the source's own (12.5 fps had been
    rounded to 12, so the source part played 4 % slow), whole where it is within 0.01 of
    whole (a header's 25.0001), at least 1, and 16 when the source has none."""
    if not fps:
        return 16.0
    return max(1.0, float(round(fps)) if abs(fps - round(fps)) < 0.01 else fps)
