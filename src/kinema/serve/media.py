"""Media for the server: upload checks by decoding, thumbnails and spritesheets.

Uploads are trusted by what they decode to, never by their name or content type: an image must
decode fully with Pillow (and is re-encoded as PNG), a video must decode with PyAV frame by
frame. Previews are drawn from the generated frames, uint8 (T, H, W, 3), already in memory.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from kinema.io.video import decoded, rgb_image, video_stream, video_streams

THUMBNAIL = "thumbnail.webp"
SPRITESHEET = "spritesheet.jpg"
SPRITE_FRAMES = 16
SPRITE_COLUMNS = 4
MEDIA_TYPES = {"video": "video/mp4", "thumbnail": "image/webp", "spritesheet": "image/jpeg"}
# ffmpeg container names (as PyAV reports them) -> the extension a checked upload is stored with
CONTAINERS = {"mov,mp4,m4a,3gp,3g2,mj2": ".mp4", "matroska,webm": ".mkv", "gif": ".gif",
              "avi": ".avi", "webp": ".webp"}  # fmt: skip


class Rejected(ValueError):
    """An upload decoded, but is not usable (too large, no video stream, ...)."""


@dataclass(frozen=True)
class VideoProbe:
    """What decoding an uploaded video found."""

    width: int
    height: int
    frames: int
    fps: float
    extension: str  # e.g. ".mp4", from the decoded container format

    @property
    def seconds(self) -> float:
        return self.frames / self.fps


# ---------------------------------------------------------------------------------------------
# Uploads
# ---------------------------------------------------------------------------------------------


def decode_data_url(url: str) -> bytes:
    """The bytes of a ``data:<type>;base64,...`` URL. Other URLs are refused, never fetched."""
    m = re.fullmatch(r"data:[\w.+/-]*(;[\w=.+-]+)*;base64,([A-Za-z0-9+/=\s]*)", url.strip())
    if not m:
        raise ValueError(
            "only base64 data URLs (data:image/png;base64,...) are accepted; this server never "
            "fetches a URL: upload the file instead"
        )
    try:
        data = base64.b64decode(m.group(2), validate=False)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"data URL is not valid base64: {err}") from err
    if not data:
        raise ValueError("the data URL holds no data (an empty image)")
    return data


def check_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode ``data`` fully as an image (RGB, EXIF orientation applied, as the CLI reads
    images: a phone photo stands as it was taken); ValueError if it is not one or is too
    large."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise Rejected(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
        img.load()
        return rgb_image(ImageOps.exif_transpose(img))
    except Rejected:
        raise
    except Image.DecompressionBombError:  # so large Pillow will not open it
        raise Rejected(
            f"image is over {2 * Image.MAX_IMAGE_PIXELS} pixels; the limit is {max_pixels}"
        ) from None
    except Exception as err:  # Pillow raises many kinds (UnidentifiedImageError, OSError, ...)
        raise ValueError(
            f"not a decodable image ({type(err).__name__}); PNG, JPEG, WebP, GIF, BMP and TIFF are"
        ) from err


def check_video(path: Path, max_frames: int, max_pixels: int) -> VideoProbe:
    """Decode every frame of the file at ``path``; ValueError if it is not a usable video."""
    import av

    try:
        with av.open(str(path)) as container:
            fmt = container.format.name
            if not video_streams(container):  # cover art is not a video
                raise Rejected("the file has no video stream")
            stream = video_stream(container)
            frames, size = 0, None
            for frame in decoded(container, stream):
                size = size or (frame.width, frame.height)
                frames += 1
                if frames > max_frames:
                    raise Rejected(f"video has more than {max_frames} frames")
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            declared = stream.frames  # 0 where the container does not say (WebM, Matroska)
            if frames and declared > 1 and frames * 2 < declared:  # an upload cut short
                raise Rejected(f"only {frames} of the {declared} frames the file declares "
                               "decode: is it cut short? upload it whole")  # fmt: skip
    except Rejected:
        raise
    except Exception as err:  # av.error.* (some are ValueErrors naming the path), OSError
        raise ValueError(f"not a decodable video ({type(err).__name__})") from err
    return _probe(fmt, frames, size, rate, max_pixels)


def _probe(fmt: str, frames: int, size: tuple[int, int] | None, rate: float, max_pixels: int):
    if not frames or size is None:
        raise ValueError("the video has no decodable frames")
    if size[0] * size[1] > max_pixels:
        raise ValueError(f"video is {size[0]}x{size[1]}; the limit is {max_pixels} pixels")
    if fmt not in CONTAINERS:
        raise ValueError(f"unsupported container {fmt!r}; valid: mp4, webm, mkv, gif, avi")
    fps = rate if 0 < rate <= 240 else 16.0
    return VideoProbe(size[0], size[1], frames, fps, CONTAINERS[fmt])


# ---------------------------------------------------------------------------------------------
# Previews
# ---------------------------------------------------------------------------------------------


def sprite_picks(total: int, count: int = SPRITE_FRAMES) -> list[int]:
    """Up to ``count`` evenly spaced frame indices of a ``total``-frame clip."""
    return np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(int)).tolist()


def spritesheet(frames: list[np.ndarray], columns: int = SPRITE_COLUMNS) -> Image.Image:
    """``frames`` (H, W, 3) uint8 in a grid, ``columns`` wide."""
    h, w, _ = frames[0].shape
    cols = min(columns, len(frames))
    rows = -(-len(frames) // cols)
    sheet = np.zeros((rows * h, cols * w, 3), np.uint8)  # (rows*H, cols*W, 3)
    for k, frame in enumerate(frames):
        r, c = divmod(k, cols)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = frame
    return Image.fromarray(sheet)


class Previews:
    """The frames a clip's previews need, kept as its ``total`` frames stream past
    (:meth:`keep` is a :meth:`~kinema.pipeline.VideoStream.save` tap): the middle one (the
    thumbnail) and up to ``SPRITE_FRAMES`` evenly spaced ones (the spritesheet)."""

    def __init__(self, total: int) -> None:
        self.middle, self.picks = total // 2, sprite_picks(total)
        self.kept: dict[int, np.ndarray] = {}

    def keep(self, index: int, frame: np.ndarray) -> None:
        if index == self.middle or index in self.picks:
            self.kept[index] = frame.copy()  # not a view that would keep its window alive

    def save(self, folder: Path) -> None:
        """Write the thumbnail (WebP) and spritesheet (JPEG) into ``folder``."""
        Image.fromarray(self.kept[self.middle]).save(folder / THUMBNAIL, format="WEBP", quality=90)
        sheet = spritesheet([self.kept[i] for i in self.picks])
        sheet.save(folder / SPRITESHEET, format="JPEG", quality=90)
