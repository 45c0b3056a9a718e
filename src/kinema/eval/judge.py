"""An independent judge of generated clips: plain image analysis of the decoded frames only.

No learned weights and nothing from the generator: the background is estimated per row (flat
colours and vertical gradients), objects are the connected components that differ from it,
named colours come from a fixed palette, shapes from rotation-invariant geometry, motion from
the centroid and area over time.

Shape features (per component): solidity = area / convex-hull area (a five-point star is far
from convex), and reach = max centroid distance / sqrt(area), which is 0.56 for a disc, 0.71
for a square and 0.88 for an equilateral triangle, whatever their rotation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

PALETTE = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235),
    "yellow": (245, 225, 40), "orange": (250, 140, 20), "purple": (150, 60, 200),
    "white": (245, 245, 245), "cyan": (40, 220, 230),
}  # fmt: skip
MIN_AREA = 12  # pixels


@dataclass(frozen=True)
class Blob:
    """One object in one frame: centre (fractions of width/height), area, colour, shape."""

    x: float
    y: float
    area: float
    colour: str
    shape: str
    mask: np.ndarray = field(compare=False, repr=False)  # (2R+1, 2R+1) bool, centred


@dataclass(frozen=True)
class Track:
    """One object followed over the clip (matched by colour)."""

    colour: str
    shape: str
    motion: str
    consistency: float  # fraction of frames whose colour and shape agree with the majority
    blobs: tuple[Blob | None, ...]


def background(frame: np.ndarray) -> np.ndarray:
    """Per-row background colour (H, 1, 3): the row's median (objects are a minority)."""
    return np.median(frame.astype(np.float32), axis=1, keepdims=True)


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(PALETTE)
    dist = [np.linalg.norm(rgb - np.array(PALETTE[n], np.float32)) for n in names]
    return names[int(np.argmin(dist))]


def classify_shape(ys: np.ndarray, xs: np.ndarray) -> str:
    """circle, square, triangle or star from the pixel coordinates of one component."""
    area = len(xs)
    pts = np.stack([xs, ys], 1).astype(np.float64)
    centre = pts.mean(0)
    reach = (np.sqrt(((pts - centre) ** 2).sum(1)).max() + 0.5) / np.sqrt(area)
    corners = np.concatenate([pts + d for d in ((0, 0), (1, 0), (0, 1), (1, 1))])
    try:
        solidity = area / ConvexHull(corners).volume
    except QhullError:
        return "unknown"
    if solidity < 0.72:
        return "star"
    return "circle" if reach < 0.635 else "square" if reach < 0.8 else "triangle"


def blobs(frame: np.ndarray, threshold: float = 60.0) -> list[Blob]:
    """Objects of one frame (uint8 (H, W, 3)), largest first."""
    h, w = frame.shape[:2]
    diff = np.linalg.norm(frame.astype(np.float32) - background(frame), axis=2)
    labels, n = ndimage.label(diff > threshold)
    out = []
    for i in range(1, n + 1):
        ys, xs = np.nonzero(labels == i)
        if len(xs) < MIN_AREA:
            continue
        colour = nearest_colour(np.median(frame[ys, xs].astype(np.float32), axis=0))
        shape = classify_shape(ys, xs)
        mask = centred_mask(ys, xs)
        out.append(Blob(xs.mean() / w, ys.mean() / h, len(xs) / (h * w), colour, shape, mask))
    return sorted(out, key=lambda b: -b.area)


def centred_mask(ys: np.ndarray, xs: np.ndarray, radius: int = 24) -> np.ndarray:
    """The component's pixels on a (2R+1)^2 grid centred on its centroid."""
    grid = np.zeros((2 * radius + 1, 2 * radius + 1), dtype=bool)
    gy = np.clip(np.round(ys - ys.mean()).astype(int) + radius, 0, 2 * radius)
    gx = np.clip(np.round(xs - xs.mean()).astype(int) + radius, 0, 2 * radius)
    grid[gy, gx] = True
    return grid


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def majority(values: list[str]) -> tuple[str, float]:
    names, counts = np.unique(values, return_counts=True)
    return str(names[counts.argmax()]), float(counts.max() / max(1, len(values)))


def motion_of(track: list[Blob | None], first: int = 0, last: int | None = None) -> str:
    """The motion word for frames [first, last] of a track."""
    seen = [b for b in track[first : last if last is None else last + 1] if b is not None]
    if len(seen) < 2:
        return "unknown"
    a, b = seen[0], seen[-1]
    dx, dy = b.x - a.x, b.y - a.y
    ratio = b.area / max(a.area, 1e-9)
    ys = np.array([s.y for s in seen])
    vy = np.diff(ys)
    turns = int((np.diff(np.sign(vy[np.abs(vy) > 0.004])) != 0).sum())
    if ratio > 1.3 and np.hypot(dx, dy) < 0.1:
        return "growing"
    if ratio < 0.77 and np.hypot(dx, dy) < 0.1:
        return "shrinking"
    if turns >= 1 and np.ptp(ys) > 0.12 and abs(dx) < 0.1:
        return "bouncing"
    if np.hypot(dx, dy) > 0.1:
        return direction(dx, dy)
    return "still"


def direction(dx: float, dy: float) -> str:
    """left/right/up/down or a diagonal from a displacement (image y grows downwards)."""
    horizontal = "right" if dx > 0 else "left"
    vertical = "down" if dy > 0 else "up"
    if abs(dx) > 2 * abs(dy):
        return horizontal
    if abs(dy) > 2 * abs(dx):
        return vertical
    return f"{vertical}-{horizontal}"


def track_objects(frames: np.ndarray) -> list[Track]:
    """Objects over the clip, one track per named colour present in most frames."""
    per_frame = [blobs(f) for f in frames]
    colours = [b.colour for fb in per_frame for b in fb]
    out = []
    for colour in dict.fromkeys(colours):
        track = [next((b for b in fb if b.colour == colour), None) for fb in per_frame]
        present = [b for b in track if b is not None]
        if len(present) < len(frames) / 2:
            continue
        shape, agree = majority([b.shape for b in present])
        consistency = agree * len(present) / len(frames)
        motion = motion_of(track)
        motion = "rotating" if motion == "still" and turns(track) else motion
        out.append(Track(colour, shape, motion, consistency, tuple(track)))
    return out


def turns(track: list[Blob | None], lag: int = 4) -> bool:
    """Whether a still object's outline changes (rotation): centred masks ``lag`` frames
    apart overlap less than a still object's do."""
    seen = [b for b in track if b is not None]
    pairs = [iou(a.mask, b.mask) for a, b in zip(seen[:-lag], seen[lag:], strict=False)]
    return bool(pairs) and float(np.median(pairs)) < 0.8


@dataclass(frozen=True)
class Verdict:
    colour_ok: bool
    shape_ok: bool
    motion_ok: bool
    count_ok: bool
    consistency: float


def judge(frames: np.ndarray, expected: list[dict[str, str]], first: int = 0) -> Verdict:
    """Compare a clip (T, H, W, 3) with the objects a prompt asks for (colour, shape, motion;
    motion judged from frame ``first`` on). Each expected object is matched by colour."""
    tracks = track_objects(frames)
    by_colour = {t.colour: t for t in tracks}
    colour_ok = shape_ok = motion_ok = True
    for obj in expected:
        t = by_colour.get(obj["colour"])
        if t is None:
            colour_ok = shape_ok = motion_ok = False
            continue
        shape_ok &= t.shape == obj["shape"]
        seen = t.motion if first == 0 else motion_of(list(t.blobs), first)
        motion_ok &= seen == obj["motion"]
    consistency = float(np.mean([t.consistency for t in tracks])) if tracks else 0.0
    return Verdict(colour_ok, shape_ok, motion_ok, len(tracks) == len(expected), consistency)
