"""Video and image I/O: PyAV for containers and codecs, Pillow for GIF, WebP and PNG.

Frames are always ``uint8`` arrays ``(T, H, W, 3)`` in RGB order; images are ``(H, W, 3)``.

Writing (:func:`write_video`) picks the format by the path:

- ``.mp4``: H.264 (libx264, ``yuv420p``, ``+faststart``) that plays in browsers; width and
  height must be even. The ``metadata`` dict goes into the container's metadata.
- ``.gif``: looping, Pillow palette per frame; the metadata is stored as JSON in the comment.
  GIF delays are whole centiseconds, so the frame rate is rounded to 100 / n fps.
- ``.webp``: animated, looping, Pillow; the metadata is stored as JSON in the EXIF
  ``ImageDescription`` tag.
- a directory (no suffix, or a trailing ``/``): ``frame_00000.png`` ... with ``fps`` and the
  metadata in each PNG's text chunks.

Every write goes to a temporary name in the target directory and is renamed into place, so
an exception never leaves a partial file behind.

Reading (:func:`read_video`, :func:`read_clip`) turns any source into a timeline of
``(seconds, frame)`` and picks, for each target time ``start + k / fps``, the frame whose
timestamp is nearest (ties go to the earlier frame).
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple

import av
import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from kinema import notes
from kinema.io.paths import (
    atomic_file,
    check_frame_folder,
    check_output_name,
    check_writable,
    names_folder,
    temp_name,
)

WRITE_FORMATS = (".mp4", ".gif", ".webp", "<directory>/")
PILLOW_SUFFIXES = (".gif", ".webp")
DEFAULT_FOLDER_FPS = 16.0
"""Frame rate assumed for a PNG folder whose frames carry no ``fps`` text chunk."""

# Keys the MP4 muxer writes as classic iTunes-style tags; others need ``use_metadata_tags``.
MP4_STANDARD_KEYS = frozenset(
    {"title", "artist", "album", "comment", "description", "copyright", "genre", "date"}
)
EXIF_IMAGE_DESCRIPTION = 0x010E
_EPS = 1e-9

Timeline = Iterator[tuple[float, Any]]
"""Decoded frames in display order as ``(seconds from start, frame object)``."""


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` learns from a file's headers without decoding it all.

    Attributes:
        width, height: frame size in pixels, as shown (a rotated phone video's turned).
        frames: frame count (from the header, or ``duration * fps`` when the header has none).
        fps: the native frame rate.
        duration: length in seconds.
        codec: decoder name, e.g. ``"h264"``, ``"vp9"``, ``"gif"``, ``"webp"``, ``"png"``.
    """

    width: int
    height: int
    frames: int
    fps: float
    duration: float
    codec: str


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def _atomic_dir(path: Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary directory beside ``path`` with ``write(tmp)``, then swap it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path, "")
    try:
        tmp.mkdir()  # mode 0o777 minus umask, unlike mkdtemp's 0o700
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = temp_name(path, ".old") if path.exists() else None
    if old is not None:
        os.replace(path, old)  # a directory cannot be replaced in one step: move it aside
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _checked_frames(frames: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Yield frames (H, W, 3) uint8, raising ValueError at the first one that is not."""
    shape = None
    for i, frame in enumerate(frames):
        if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
            kind = getattr(frame, "dtype", type(frame).__name__)
            raise ValueError(f"frame {i} has dtype {kind}; expected uint8 (H, W, 3)")
        if frame.ndim != 3 or frame.shape[2] != 3 or (shape and frame.shape != shape):
            want = shape or "(H, W, 3)"
            raise ValueError(f"frame {i} has shape {frame.shape}; expected {want}")
        shape = frame.shape
        yield np.ascontiguousarray(frame)
    if shape is None:
        raise ValueError("no frames to write; expected at least one (H, W, 3) uint8 frame")


def _check_write_args(frames: Any, fps: float, crf: int, metadata: dict | None) -> None:
    """Reject bad arguments of :func:`write_video` before any file is touched."""
    if isinstance(frames, np.ndarray) and (frames.ndim != 4 or frames.shape[-1] != 3):
        raise ValueError(f"frames shape {frames.shape} must be (T, H, W, 3)")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps {fps} must be a finite number > 0")
    if not 0 <= crf <= 51:
        raise ValueError(f"crf {crf} must be in [0, 51]")
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata {key!r}: {value!r} must map str to str")


def _mp4_options(metadata: dict[str, str]) -> dict[str, str]:
    """Muxer options: fast start always; free-form metadata keys when any are non-standard."""
    flags = "+faststart"
    if set(metadata) - MP4_STANDARD_KEYS:
        flags += "+use_metadata_tags"
    return {"movflags": flags}


def _write_mp4(
    tmp: Path, frames: Iterator[np.ndarray], fps: float, metadata: dict[str, str], crf: int
) -> None:
    """Encode frames (H, W, 3) uint8 as H.264 yuv420p into an MP4 at ``tmp``."""
    first = next(frames)
    height, width = first.shape[:2]
    if width % 2 or height % 2:
        raise ValueError(f"mp4 (H.264 yuv420p) needs even width and height; got {width}x{height}")
    with av.open(str(tmp), "w", format="mp4", options=_mp4_options(metadata)) as container:
        container.metadata.update(metadata)
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf)}
        tag_colours(stream.codec_context)
        for frame in _prepend(first, frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode(None))


# What the mp4's pixels are, told to players (untagged, many assume BT.709 for HD sizes and
# shift the colours): RGB frames become BT.601 ("smpte170m") limited-range YUV in FFmpeg's
# conversion, of sRGB content (BT.709 primaries and transfer, as every SDR video says).
SMPTE170M, BT709, TV_RANGE = 6, 1, 1  # FFmpeg's AVColorSpace / AVColorPrimaries / ... values


def tag_colours(codec: Any) -> None:
    """Tag an encoder's output with the colours :func:`_write_mp4` gives it."""
    codec.colorspace, codec.color_range = SMPTE170M, TV_RANGE
    codec.color_primaries, codec.color_trc = BT709, BT709


def _prepend(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """Yield ``first`` and then the rest."""
    yield first
    yield from rest


def _pillow_frames(frames: Iterator[np.ndarray]) -> tuple[Image.Image, Iterator[Image.Image]]:
    """The first frame as an image, and a lazy iterator over the remaining ones."""
    first = Image.fromarray(next(frames))
    return first, (Image.fromarray(f) for f in frames)


def _write_gif(tmp: Path, frames: Iterator[np.ndarray], fps: float, metadata: dict) -> None:
    """Looping GIF. The format stores delays in whole centiseconds, so 16 fps (6.25 cs) is
    written as 6 and 7 in turn, each frame shown at its time to the nearest centisecond: the
    clip plays at ``fps`` on average (one 6 cs delay throughout had played 16.67 fps); over
    50 fps every delay is 2 cs, the shortest players keep. Pillow
    holds a GIF's frames until it writes them anyway, so they are gathered first."""
    first, rest = _pillow_frames(frames)
    images = [first, *rest]
    ends = [0]  # centiseconds; 2 apart at least (a 1 cs delay plays as 10, as in browsers)
    for k in range(1, len(images) + 1):
        ends.append(max(ends[-1] + 2, round(100 * k / fps)))
    delays = [10 * (b - a) for a, b in itertools.pairwise(ends)]
    options: dict[str, Any] = {"comment": json.dumps(metadata)} if metadata else {}
    first.save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=delays,
               loop=0, **options)  # fmt: skip


def _write_webp(tmp: Path, frames: Iterator[np.ndarray], fps: float, metadata: dict) -> None:
    """Looping animated WebP (lossy, quality 90); metadata as JSON in EXIF."""
    first, rest = _pillow_frames(frames)
    exif = Image.Exif()
    if metadata:
        exif[EXIF_IMAGE_DESCRIPTION] = json.dumps(metadata)
    first.save(
        tmp,
        format="WEBP",
        save_all=True,
        append_images=rest,
        duration=round(1000 / fps),
        loop=0,
        quality=90,
        exif=exif,
    )


def _write_png_folder(tmp: Path, frames: Iterator[np.ndarray], fps: float, metadata: dict) -> None:
    """``frame_00000.png`` ... with ``fps`` and the metadata in each file's text chunks."""
    text = PngImagePlugin.PngInfo()
    for key, value in {**metadata, "fps": repr(float(fps))}.items():
        text.add_text(key, value)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp / f"frame_{i:05d}.png", pnginfo=text)


def write_video(
    path: str | Path,
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float,
    *,
    metadata: dict[str, str] | None = None,
    crf: int = 18,
) -> Path:
    """Write frames to ``path``, the format chosen by its extension (see the module docstring).

    Args:
        path: ``*.mp4``, ``*.gif``, ``*.webp``, or a directory for PNG frames.
        frames: uint8 (T, H, W, 3) RGB, or an iterable of (H, W, 3) uint8 frames (streamed,
            so a long video need not be in memory at once for mp4 and PNG output).
        fps: frames per second, > 0.
        metadata: str -> str written into the file (e.g. ``title``: prompt, ``comment``: seed).
        crf: x264 constant rate factor for mp4, 0 (lossless) .. 51; 18 is visually lossless.

    Returns:
        The path written. Nothing is left behind if an exception is raised.
    """
    _check_write_args(frames, fps, crf, metadata)
    check_output_name(path)
    check_writable(path)
    meta = dict(metadata or {})
    checked = _checked_frames(frames)
    if names_folder(path):
        check_frame_folder(path)
        return _atomic_dir(Path(path), lambda t: _write_png_folder(t, checked, fps, meta))
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        return atomic_file(path, lambda t: _write_mp4(t, checked, fps, meta, crf))
    if suffix == ".gif":
        return atomic_file(path, lambda t: _write_gif(t, checked, fps, meta))
    if suffix == ".webp":
        return atomic_file(path, lambda t: _write_webp(t, checked, fps, meta))
    raise ValueError(f"unknown video extension {path.suffix!r} in {path}; valid: {WRITE_FORMATS}")


def sidecar_path(path: str | Path) -> Path:
    """The ``.json`` file that sits beside a video or frame folder: ``clip.mp4 -> clip.json``,
    ``frames/ -> frames.json``, ``v1.5/ -> v1.5.json`` (a folder's name is all name)."""
    folder = names_folder(path)
    path = Path(os.fspath(path).rstrip("/" + os.sep))
    return path.with_name(path.name + ".json") if folder else path.with_suffix(".json")


def check_sidecar(path: str | Path) -> None:
    """Refuse, before any work, an output whose sidecar name (:func:`sidecar_path`) holds
    something kinema did not write: the sidecar would replace the user's file."""
    side = sidecar_path(Path(path).expanduser())
    if not side.exists() and not side.is_symlink():
        return
    try:
        versions = json.loads(side.read_text()).get("versions", {})
        ours = isinstance(versions, dict) and "kinema" in versions
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(f"{side} exists and is not a kinema sidecar; the output's .json would "
                         "replace it: move it away or give another output name")  # fmt: skip


def write_file(path: str | Path, data: bytes) -> Path:
    """Write ``data`` (e.g. a video encoded in another process) to ``path`` atomically."""
    return atomic_file(Path(path), lambda t: t.write_bytes(data))


def write_sidecar(path: str | Path, info: dict) -> Path:
    """Write ``info`` as indented JSON to :func:`sidecar_path` (atomically); return that path."""
    text = json.dumps(info, indent=2, sort_keys=True, default=str) + "\n"
    return atomic_file(sidecar_path(path), lambda t: t.write_text(text))


# ---------------------------------------------------------------------------------------------
# Timelines: every source as (seconds, frame) pairs
# ---------------------------------------------------------------------------------------------


def _decode_error(path: str | Path, reason: object) -> ValueError:
    """The one error type for a video that cannot be read."""
    return ValueError(f"cannot decode video {path}: {reason}")


def _open_av(path: Path) -> av.container.InputContainer:
    """Open a container with a video stream, or raise the decode ValueError."""
    if not path.is_file():
        raise _decode_error(path, "no such file")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise _decode_error(path, e) from e
    if not video_streams(container):
        container.close()
        raise _decode_error(path, "no video stream")
    return container


def video_streams(container: av.container.InputContainer) -> list[av.video.stream.VideoStream]:
    """The container's video streams, less cover art (an mp3's or m4a's attached picture)."""
    cover = av.stream.Disposition.attached_pic
    return [s for s in container.streams.video if not s.disposition & cover]


def video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    """The stream FFmpeg's tools pick: the video stream of most pixels (not cover art)."""
    return max(video_streams(container), key=lambda s: (s.width or 0) * (s.height or 0))


_said: set[str] = set()


def say_once(message: str) -> None:
    """A warning about a file, said the first time only (a restyle reads its source twice: to
    count it, then as it goes), kept for the request's sidecar (:func:`kinema.notes.warn`)."""
    if message not in _said:
        _said.add(message)
        notes.warn(message)


# FFmpeg's own VP8/VP9 decoders drop a WebM's alpha channel (kept beside the picture, as the
# "alpha_mode" stream tag says); libvpx's decoders keep it: transparent video, over white.
ALPHA_DECODERS = {"vp8": "libvpx", "vp9": "libvpx-vp9"}


def _decoder(stream: Any) -> Callable[[Any], list]:
    """What turns a stream's packets into frames: the stream's own decoder, or libvpx's for
    VP8/VP9 with alpha."""
    name = ALPHA_DECODERS.get(stream.codec_context.name)
    if name and stream.metadata.get("alpha_mode") == "1" and name in av.codecs_available:
        return av.CodecContext.create(name, "r").decode
    return lambda packet: packet.decode()


def decoded(container: av.container.InputContainer, stream: Any) -> Iterator[av.VideoFrame]:
    """Every frame of ``stream`` as FFmpeg's tools decode it: a packet the decoder refuses (a
    damaged part of the file) is skipped with a warning, not the whole video refused."""
    skipped, decode = 0, _decoder(stream)
    for packet in container.demux(stream):
        try:
            frames = decode(packet)
        except av.InvalidDataError:
            skipped += 1
            continue
        yield from frames
    if skipped:
        plural = "s" * (skipped != 1)
        say_once(f"{container.name}: skipped {skipped} damaged packet{plural} it could not decode")


HDR_TRANSFERS = {16: "PQ", 18: "HLG"}  # FFmpeg's AVColorTransferCharacteristic values


def _stream_fps(stream: av.video.stream.VideoStream) -> float:
    """The native frame rate of a stream (average, else guessed, else 16)."""
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else DEFAULT_FOLDER_FPS


def display_size(stream: av.video.stream.VideoStream) -> tuple[int, int]:
    """(width, height) a player shows a stream's frames at (before rotation): its stored size,
    widened (or heightened) by a sample aspect ratio other than 1 (anamorphic video, e.g.
    HDV's 1440x1080 shown 1920x1080), so no detail is lost making the pixels square."""
    w, h, sar = stream.width, stream.height, stream.sample_aspect_ratio
    if not sar or sar == 1 or not w or not h:
        return (w, h)
    return (round(w * sar), h) if sar > 1 else (w, round(h / sar))


def _stream_offset(stream: av.video.stream.VideoStream) -> float:
    """Seconds of the stream's first timestamp, so timelines start at zero."""
    if stream.start_time is None:
        return 0.0
    return float(stream.start_time * stream.time_base)


def _av_timeline(container: av.container.InputContainer, start: float) -> Timeline:
    """Decode the first video stream from about ``start`` seconds: (seconds, av.VideoFrame)."""
    stream = video_stream(container)
    stream.thread_type = "AUTO"
    offset, fps, shown = _stream_offset(stream), _stream_fps(stream), display_size(stream)
    stored = (stream.width, stream.height)
    if start > 0:
        target = int((start + offset) / stream.time_base)
        container.seek(target, stream=stream, backward=True)
    for i, frame in enumerate(decoded(container, stream)):
        if i == 0 and frame.color_trc in HDR_TRANSFERS:
            say_once(f"{container.name} is HDR ({HDR_TRANSFERS[frame.color_trc]}): it is read "
                     "without tone mapping, so its colours come out dull; convert it to SDR "
                     "first")  # fmt: skip
        t = frame.time - offset if frame.time is not None else i / fps
        if shown != stored and (frame.width, frame.height) == stored:  # anamorphic: widened
            frame = frame.reformat(width=shown[0], height=shown[1], interpolation="LANCZOS",
                                   threads=SWS_THREADS)  # fmt: skip
        yield t, frame


def _pillow_durations(image: Image.Image) -> list[float]:
    """Per-frame display time in seconds of an animated image; a delay of 10 ms or less (or
    none) is 0.1 s, as browsers show it."""
    durations = []
    for k in range(getattr(image, "n_frames", 1)):
        image.seek(k)
        image.load()
        delay = image.info.get("duration") or 0
        durations.append((delay if delay > 10 else 100) / 1000)
    return durations


def _pillow_step(durations: list[float]) -> tuple[float, bool]:
    """(seconds between native frames, whether the frames are evenly spaced). A GIF says its
    delays in whole 1/100 s, so an even rate such as 16 fps comes out as 6 and 7: delays within
    10 ms of each other are even (each frame taken once, at their mean spacing); otherwise the
    shortest delay is the step and held frames (encoders merge repeats) come out repeated."""
    if max(durations) - min(durations) <= 0.0105:
        return sum(durations) / len(durations), True
    return min(durations), False


def _snap_fps(duration: float) -> float:
    """The rate of a frame delay, snapped to whole fps when that fps's delay is within half a
    millisecond of it (30 fps written as 3 and 4 cs has a mean of 33.5 ms over 17 frames:
    rounded to 34 ms first, it had snapped to 29)."""
    whole = round(1 / duration) if duration > 0 else 0
    return float(whole) if whole and abs(1 / whole - duration) <= 0.0005 else 1 / duration


def _pillow_timeline(image: Image.Image, durations: list[float]) -> Timeline:
    """(seconds, RGB PIL image) for each frame of an animated GIF or WebP."""
    t = 0.0
    for k, duration in enumerate(durations):
        image.seek(k)
        yield t, rgb_image(image)
        t += duration


def _png_files(folder: Path) -> list[Path]:
    """The PNG frames of a folder in name order (at least one, else the decode error)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise _decode_error(folder, "folder has no .png frames")
    return files


def _png_fps(first: Path) -> float:
    """The ``fps`` text chunk of a PNG frame, else :data:`DEFAULT_FOLDER_FPS`."""
    with Image.open(first) as image:
        value = image.info.get("fps")
    try:
        return float(value) if value is not None else DEFAULT_FOLDER_FPS
    except ValueError:
        return DEFAULT_FOLDER_FPS


def _png_timeline(files: list[Path], fps: float, start: float) -> Timeline:
    """(seconds, PNG path) for a frame folder, skipping files well before ``start``."""
    first = max(0, int(start * fps) - 1)
    for i in range(first, len(files)):
        yield i / fps, files[i]


# ---------------------------------------------------------------------------------------------
# Nearest-frame resampling
# ---------------------------------------------------------------------------------------------


def _nearer_is_prev(prev_t: float, t: float, tau: float) -> bool:
    """Whether the previous frame is at least as near to ``tau`` as the current one."""
    return tau - prev_t <= t - tau + _EPS


TAIL = 0.25  # of a frame: how far short of the video's end the last target time must be


def _resample(
    timeline: Timeline, start: float, fps: float, count: int | None, frame_duration: float
) -> Iterator[Any]:
    """Pick the frame nearest to each time ``start + k / fps`` (k = 0 .. count-1).

    With ``count`` None it stops at the end of the video: the last frame serves target times
    up to ``frame_duration`` after its own. It may give fewer than ``count`` frames.
    """
    n = 0
    prev: tuple[float, Any] | None = None
    for t, frame in timeline:
        while count is None or n < count:
            tau = start + n / fps
            if t < tau - _EPS:
                break
            near_prev = prev is not None and _nearer_is_prev(prev[0], t, tau)
            yield prev[1] if near_prev else frame  # type: ignore[index]
            n += 1
        if count is not None and n >= count:
            return
        prev = (t, frame)
    while prev is not None and (count is None or n < count):
        if start + n / fps >= prev[0] + frame_duration - TAIL * min(frame_duration, 1 / fps):
            break  # past the end (TAIL: timestamps rounded to ms, e.g. Matroska's, at 30 fps)
        yield prev[1]
        n += 1


def resample_frames(frames: np.ndarray, fps: float, to: float) -> np.ndarray:
    """Frames (T, ...) at ``fps`` as a clip at ``to`` fps over the same time, each the nearest
    (as a file is read at another rate: the last frame held for its own duration, so 9
    frames at 8 fps, 1.125 s, are 18 at 16)."""
    timeline = ((i / fps, i) for i in range(len(frames)))
    picks = list(_resample(timeline, 0.0, to, None, 1 / fps))
    return frames[picks]


def upright(pixels: np.ndarray, rotation: float) -> np.ndarray:
    """A decoded (H, W, 3) frame turned as its display matrix says (``rotation``: degrees
    counter-clockwise, PyAV's ``VideoFrame.rotation``), as players and ffmpeg's autorotate
    show it: a phone's portrait video stands upright."""
    k = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(pixels, k)) if k else pixels


# swscale's own slice threads, one per conversion: none. Frames are converted in DataLoader
# workers forked from a process with threads of its own (torch's, Ray's), where a new thread
# can block for good on a lock held at the fork: a worker hung in swscale's thread pool.
SWS_THREADS = 1


def _to_rgb(frame: Any) -> np.ndarray:
    """An av.VideoFrame (turned upright), PIL image or image path as (H, W, 3) uint8."""
    if isinstance(frame, av.VideoFrame):
        if any(c.is_alpha for c in frame.format.components):  # over white, as images are
            rgba = Image.fromarray(frame.to_ndarray(format="rgba", threads=SWS_THREADS), "RGBA")
            return upright(np.asarray(rgb_image(rgba)), frame.rotation)
        return upright(frame.to_ndarray(format="rgb24", threads=SWS_THREADS), frame.rotation)
    if isinstance(frame, Path):
        with Image.open(frame) as image:
            return np.asarray(rgb_image(image))
    return np.asarray(rgb_image(frame))


def _stack(frames: list[Any], path: str | Path) -> np.ndarray:
    """Frames as (T, H, W, 3) uint8; an empty list is a decode error."""
    if not frames:
        raise _decode_error(path, "no frames decoded")
    rgb = [_to_rgb(f) for f in frames]
    for i, frame in enumerate(rgb):
        _check_size(path, i, frame.shape[1::-1], rgb[0].shape[1::-1])
    return np.stack(rgb)


def _frame_size(frame: Any) -> tuple[int, int]:
    """(width, height) of a decoded frame (an av.VideoFrame, PIL image or PNG path) as stored."""
    if isinstance(frame, Path):
        with Image.open(frame) as image:
            return image.size
    return (frame.width, frame.height)


def _check_size(path: str | Path, index: int, size: tuple, first: tuple) -> None:
    """The decode error for a frame whose size is not the first frame's."""
    if tuple(size) != tuple(first):
        raise _decode_error(
            path, f"frame {index} is {size[0]}x{size[1]}, the first {first[0]}x{first[1]}: "
            "its size changes mid-stream; re-encode it at one size"
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


class _Source(NamedTuple):
    """An opened video: its timeline from about ``start`` and its timing facts."""

    timeline: Timeline
    fps: float  # native frame rate (as reported: a GIF/WebP delay's rate snapped to whole fps)
    step: float  # seconds between native frames (1 / fps but where fps was snapped)
    last_duration: float  # seconds the last frame is shown
    constant_rate: bool  # False: keep decoded frames as they are when no fps is asked


def pillow_reads(path: Path) -> bool:
    """Whether ``path`` is a GIF or WebP file, read with Pillow (FFmpeg decodes no animated
    WebP), told by its first bytes, not its name: an MP4 named .gif is read as the MP4 it is
    (a file that cannot be opened goes by its name, for the reader's error)."""
    try:
        with path.open("rb") as f:
            head = f.read(12)
    except OSError:
        return path.suffix.lower() in PILLOW_SUFFIXES
    return head[:6] in (b"GIF87a", b"GIF89a") or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


@contextmanager
def _open_source(path: Path, start: float) -> Iterator[_Source]:
    """Open a PNG folder, a GIF/WebP (Pillow) or any PyAV container as a :class:`_Source`."""
    if path.is_dir():
        files = _png_files(path)
        fps = _png_fps(files[0])
        yield _Source(_png_timeline(files, fps, start), fps, 1 / fps, 1 / fps, True)
    elif pillow_reads(path):
        with _open_pillow(path) as image:
            durations = _pillow_durations(image)
            step, even = _pillow_step(durations)
            timeline = _pillow_timeline(image, durations)
            yield _Source(timeline, _snap_fps(step), step, durations[-1], not even)
    else:
        with _open_av(path) as container:
            fps = _stream_fps(video_stream(container))
            yield _Source(_av_timeline(container, start), fps, 1 / fps, 1 / fps, False)


def _frames(source: _Source, start: float, fps: float | None, count: int | None) -> Iterator[Any]:
    """A source's frames from ``start`` at ``fps`` (native frames when None), lazily."""
    if fps is None and start == 0 and not source.constant_rate:
        return (frame for _, frame in _take(source.timeline, count))
    rate = fps or 1 / source.step  # native: at the frames' own spacing
    return _resample(source.timeline, start, rate, count, source.last_duration)


def _read_timed(
    path: Path, start: float, fps: float | None, count: int | None
) -> tuple[np.ndarray, float]:
    """Decode ``path`` and resample from ``start`` at ``fps`` (native frames when None)."""
    try:
        with _open_source(path, start) as source:
            return _stack(list(_frames(source, start, fps, count)), path), fps or source.fps
    except (OSError, EOFError, av.FFmpegError) as e:
        raise _decode_error(path, e) from e


def iter_video(path: str | Path, fps: float | None = None) -> Iterator[np.ndarray]:
    """The frames :func:`read_video` gives (at ``fps``; native when None), one (H, W, 3) uint8
    at a time, decoded as they are taken: a long video is never whole in memory. Raises its
    ValueError."""
    _check_read_args(None, fps)
    path = Path(path)
    try:
        with _open_source(path, 0.0) as source:
            for frame in _frames(source, 0.0, fps, None):
                yield _to_rgb(frame)
    except (OSError, EOFError, av.FFmpegError) as e:
        raise _decode_error(path, e) from e


class Scan(NamedTuple):
    """What :func:`scan_video` learns in one pass."""

    count: int  # frames read_video would give
    last: np.ndarray  # (k, H, W, 3) uint8: the last of them, as asked
    fps: float  # the native frame rate


def scan_video(
    path: str | Path,
    *,
    fps: float | None = None,
    last: int = 0,
    limit: int | None = None,
    one_size: bool = False,
) -> Scan:
    """One decoding pass that keeps almost nothing: how many frames :func:`read_video` would
    give (at ``fps``; native when None; counting stops at ``limit``), the ``last`` of them
    (fewer in a shorter video) and the native rate. Only the kept frames are converted to
    RGB. Raises :func:`read_video`'s ValueError, also for a video without frames, and with
    ``one_size`` for one whose frame size changes mid-stream."""
    _check_read_args(limit, fps)
    path = Path(path)
    kept: collections.deque[Any] = collections.deque(maxlen=last)
    count, first = 0, None
    try:
        with _open_source(path, 0.0) as source:
            for frame in _frames(source, 0.0, fps, limit):
                if one_size:  # a PNG frame's size is read off its file: once
                    size = _frame_size(frame)
                    first = first or size
                    _check_size(path, count, size, first)
                count += 1
                if last:
                    kept.append(frame)
            if not count:
                raise _decode_error(path, "no frames decoded")
            tail = [_to_rgb(f) for f in kept]  # inside: Pillow frames need their file open
    except (OSError, EOFError, av.FFmpegError) as e:
        raise _decode_error(path, e) from e
    frames = np.stack(tail) if tail else np.zeros((0, 0, 0, 3), np.uint8)
    return Scan(count, frames, source.fps)


def _take(timeline: Timeline, count: int | None) -> Iterator[tuple[float, Any]]:
    """The first ``count`` items of a timeline (all when None)."""
    for i, item in enumerate(timeline):
        if count is not None and i >= count:
            return
        yield item


def _open_pillow(path: Path) -> Image.Image:
    """Open an image with Pillow, or raise the decode ValueError."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError:
        raise ValueError(too_many_pixels(f"video {path}")) from None
    except (OSError, ValueError) as e:
        raise _decode_error(path, e) from e


def _check_read_args(max_frames: int | None, fps: float | None, start: float = 0.0) -> None:
    """Reject bad read arguments."""
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames {max_frames} must be >= 1 (or None for all)")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps {fps} must be a finite number > 0 (or None for native)")
    if not (math.isfinite(start) and start >= 0):
        raise ValueError(f"start {start} must be a finite number of seconds >= 0")


def read_video(
    path: str | Path, *, max_frames: int | None = None, fps: float | None = None
) -> tuple[np.ndarray, float]:
    """Decode a video file (any PyAV container, GIF, WebP) or a PNG-frame folder.

    Args:
        path: the video file or folder.
        max_frames: stop after this many output frames (None: all).
        fps: resample in time to this rate by nearest frame (None: native frames and rate).

    Returns:
        frames uint8 (T, H, W, 3) RGB, and their frame rate.

    Raises:
        ValueError: ``cannot decode video {path}: ...`` for a missing or unreadable file.
    """
    _check_read_args(max_frames, fps)
    return _read_timed(Path(path), 0.0, fps, max_frames)


def read_clip(path: str | Path, *, start: float, frames: int, fps: float) -> np.ndarray:
    """Decode ``frames`` frames at ``fps`` from ``start`` seconds (seeking, not decoding all).

    Returns uint8 (T, H, W, 3) with ``T <= frames``: fewer when the video ends first.
    Raises the same ValueError as :func:`read_video`.
    """
    _check_read_args(frames, fps, start)
    return _read_timed(Path(path), start, fps, frames)[0]


def _pillow_metadata(image: Image.Image) -> dict[str, str]:
    """The JSON metadata kinema stores in a GIF comment or WebP EXIF description."""
    raw = image.info.get("comment") or image.getexif().get(EXIF_IMAGE_DESCRIPTION)
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    try:
        data = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {"comment": raw}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def read_metadata(path: str | Path) -> dict[str, str]:
    """Container metadata (MP4 tags, GIF/WebP JSON, PNG text chunks) as str -> str."""
    path = Path(path)
    if path.is_dir():
        with Image.open(_png_files(path)[0]) as image:
            return {k: str(v) for k, v in image.info.items() if isinstance(v, str) and k != "fps"}
    if pillow_reads(path):
        with _open_pillow(path) as image:
            return _pillow_metadata(image)
    with _open_av(path) as container:
        return dict(container.metadata)


def has_audio(path: str | Path) -> bool:
    """Whether a video file also holds sound (which kinema's outputs do not keep)."""
    path = Path(path)
    if path.is_dir() or pillow_reads(path):
        return False
    with _open_av(path) as container:
        return bool(container.streams.audio)


def _probe_av(path: Path) -> VideoInfo:
    """Header facts of a PyAV-readable file."""
    with _open_av(path) as container:
        stream = video_stream(container)
        fps = _stream_fps(stream)
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = (container.duration or 0) / av.time_base
        frames = stream.frames or max(1, round(duration * fps))
        name = stream.codec_context.name
        first = next(decoded(container, stream), None)  # the display matrix rides on frames
        turned = first is not None and round(first.rotation / 90) % 2 == 1
        w, h = display_size(stream)
        w, h = (h, w) if turned else (w, h)
        return VideoInfo(w, h, frames, fps, duration, name)


def _probe_pillow(path: Path) -> VideoInfo:
    """Header facts of an animated GIF or WebP (frame count at the native rate)."""
    with _open_pillow(path) as image:
        durations = _pillow_durations(image)
        fps, duration = _snap_fps(_pillow_step(durations)[0]), sum(durations)
        frames = max(1, round(duration * fps))
        codec = (image.format or path.suffix[1:]).lower()
        return VideoInfo(image.width, image.height, frames, fps, duration, codec)


def _probe_png(path: Path) -> VideoInfo:
    """Header facts of a PNG-frame folder."""
    files = _png_files(path)
    fps = _png_fps(files[0])
    with Image.open(files[0]) as image:
        width, height = image.size
    return VideoInfo(width, height, len(files), fps, len(files) / fps, "png")


def probe(path: str | Path) -> VideoInfo:
    """Size, frame count, rate, duration and codec from the headers (no full decode)."""
    path = Path(path)
    try:
        if path.is_dir():
            return _probe_png(path)
        if pillow_reads(path):
            return _probe_pillow(path)
        return _probe_av(path)
    except (OSError, EOFError, av.FFmpegError) as e:
        raise _decode_error(path, e) from e


# ---------------------------------------------------------------------------------------------
# Images and resizing
# ---------------------------------------------------------------------------------------------


# What a transparent image is laid over: white, as a page shows it (not the colours its
# transparent pixels happen to hold, which RGB conversion alone would keep).
MATTE = (255, 255, 255)


def grey8(image: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit integer grey image ("I;16", or "I": 16-bit values as Pillow opens a
    16-bit PGM, else 32-bit ones, 0 to 2^31 - 1) or a float one ("F", 0-1) as 8-bit "L",
    scaled (Pillow's conversion clips: all white); a transparent grey value becomes an alpha
    channel ("LA")."""
    values = np.asarray(image)
    if image.mode == "F":
        grey = values * 255.0 if values.max(initial=0) <= 1 else values
    else:
        wide = np.clip(values.astype(np.int64), 0, None)
        top = int(wide.max(initial=0))  # 16-bit values; wider ones by their own bit length
        grey = wide >> (8 if top <= 65535 else top.bit_length() - 8)
    out = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    key = image.info.get("transparency")
    if isinstance(key, int) and image.mode != "F":
        alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L")
        return Image.merge("LA", (out, alpha))
    return out


def rgb_image(image: Image.Image) -> Image.Image:
    """``image`` as RGB; one with transparency (RGBA, LA, a palette or grey image with a
    transparent colour) is composited over :data:`MATTE`; 16-bit, 32-bit and float grey
    scaled to 8 bits (:func:`grey8`)."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        image = grey8(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*MATTE, 255)), rgba).convert(
            "RGB"
        )
    return image.convert("RGB")


def read_image(path: str | Path) -> np.ndarray:
    """Any Pillow-readable image as uint8 (H, W, 3) RGB, EXIF orientation applied,
    transparency over white (:func:`rgb_image`)."""
    try:
        with warnings.catch_warnings():  # the user's own file: no "DOS attack" over 89 MP
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return np.asarray(rgb_image(ImageOps.exif_transpose(image)))
    except Image.DecompressionBombError:
        raise ValueError(too_many_pixels(f"image {path}")) from None
    except (OSError, ValueError) as e:
        why = re.sub(r"^\[Errno -?\d+\] ", "", str(e))  # FFmpeg's and the OS's numbers
        if Path(path).suffix.lower() in (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v"):
            why += " (a video: give it as the video to restyle or to extend)"
        raise ValueError(f"cannot decode image {path}: {why}") from e


def too_many_pixels(what: str) -> str:
    """Why Pillow would not open ``what``: its decompression-bomb limit."""
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return f"cannot decode {what}: it is over {limit} pixels, more than Pillow opens; scale it down"


def _cover_box(width: int, height: int, src_w: int, src_h: int) -> tuple[float, ...]:
    """The centred source box with the target's aspect ratio that just fits the source: the
    whole of one side (exactly: a box computed through a float scale could start at -6e-14,
    which Pillow refuses), centred along the other."""
    if width * src_h >= height * src_w:  # the target is wider: all of the source's width
        box_h = min(src_h, height * src_w / width)
        top = (src_h - box_h) / 2
        return (0.0, top, float(src_w), top + box_h)
    box_w = min(src_w, width * src_h / height)
    left = (src_w - box_w) / 2
    return (left, 0.0, left + box_w, float(src_h))


def _resize_one(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """One (H, W, 3) uint8 frame resized to cover (width, height) and centre-cropped."""
    src_h, src_w = image.shape[:2]
    if (src_w, src_h) == (width, height):
        return image.copy()
    box = _cover_box(width, height, src_w, src_h)
    pil = Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS, box=box)
    return np.asarray(pil)


def resize_center_crop(frames: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale so (width, height) is covered, then centre-crop (Lanczos, one frame at a time).

    Args:
        frames: uint8 image (H, W, 3) or video (T, H, W, 3).
        width, height: the output size, >= 1.

    Returns:
        uint8 (height, width, 3) or (T, height, width, 3).
    """
    if width < 1 or height < 1:
        raise ValueError(f"size {width}x{height} must be at least 1x1")
    if frames.dtype != np.uint8 or frames.ndim not in (3, 4) or frames.shape[-1] != 3:
        raise ValueError(
            f"frames {frames.dtype} {frames.shape} must be uint8 (H, W, 3) or (T, H, W, 3)"
        )
    if frames.ndim == 3:
        return _resize_one(frames, width, height)
    return np.stack([_resize_one(f, width, height) for f in frames])
