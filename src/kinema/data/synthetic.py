"""The synthetic video world of kinema's built-in model: coloured shapes that move.

A clip holds one to three objects (distinct colours) on a flat or vertical-gradient
background. Everything is a pure function of a :class:`ClipSpec`, so a clip renders to the
same bytes every time; specs are sampled from a ``numpy.random.Generator``.

Public API
----------
``COLOURS`` (name -> RGB), ``SHAPES``, ``MOTIONS``, ``BACKGROUNDS`` (name -> (top RGB,
bottom RGB); equal ends = flat), ``HELDOUT`` (held-out (colour, shape, motion) triples).

``ObjectSpec`` / ``ClipSpec``
    Frozen dataclasses; every field needed to render is in them (see their field comments).
``sample_clip_spec(rng, *, width=128, height=128, frames=33, fps=16, split="train",
max_objects=3, change_prob=0.2, object_scale=1.0, motion_weights=None, balance="triples")
-> ClipSpec``
    ``split="train"`` never yields a ``HELDOUT`` triple (neither as the first motion nor as
    the motion after a change); ``split="heldout"`` yields objects whose first motion is one.
    ``change_prob`` is the chance that a clip's first object changes motion part-way (0
    gives first-motion-only clips). ``object_scale`` (0.5 to 1.6) multiplies every radius:
    larger objects span more latent patches of a small model (kinema-tiny trains at 1.5).
    ``motion_weights`` (motion -> weight >= 0; unnamed motions weigh 1; None: all equal)
    makes some motions more or less frequent, e.g. ``{"up-left": 3}`` to drill one the model
    gets wrong (``check_motion_weights`` validates one). ``balance`` (``BALANCES``):
    ``"triples"`` draws every allowed (colour, shape, motion) equally often, so a (colour,
    motion) pair with held-out shapes is rarer than the others (red moving up-left: 3 of 5
    shapes allowed); ``"colour-motion"`` draws (colour, motion) pairs equally often, then a
    shape among the allowed ones.
``render(spec) -> np.ndarray``
    uint8 (T, H, W, 3); drawn with Pillow at 2x and box-downsampled (anti-aliased).
``trajectory(obj, frames, fps) -> (x, y, r, angle)``
    Per-frame centre (fractions of width/height), radius (fraction of the shorter side)
    and angle (radians), each (T,).
``annotations(spec) -> list[list[dict]]``
    Per frame, per object: ``box`` (x0, y0, x1, y1) and ``centre`` (x, y) in pixels,
    ``radius`` in pixels, ``colour``, ``shape``, ``motion`` (the motion in force).
``caption(spec, rng, phrasing="train"|"paraphrase"|"rephrase") -> str``
    A caption from a template grammar; it always names colour, shape and motion of every
    object (and a motion change as "..., then ..."). ``"paraphrase"`` uses only words and
    templates that ``"train"`` never uses (``PARAPHRASE_WORDS``), to measure generalisation;
    ``"rephrase"`` the training words in those templates (new wording, known words).
``timed_captions(spec, rng, phrasing="train") -> ((0, caption), (switch_frame, caption)) | None``
    A clip whose first object changes motion as two captions, before and after the change,
    each naming one motion per object (training data for timed prompts).
``vocabulary() -> tuple[str, ...]``
    Every word a training caption can use (sorted, lower case): what a model trained on this
    world has read. Its export records them, and the pipeline warns about other words.
``parse_prompt(prompt) -> list[dict]``
    Back from text to objects: ``[{"colour", "shape", "motion", "then_motion"}]`` (only the
    keys found), for any phrasing the grammar produces and simple user phrasings such as
    "a yellow circle moving right". Unknown words are ignored.
``SyntheticClips(seed, size=(w, h), frames=33, fps=16, split="train", length=None,
max_objects=3, change_prob=0.2, phrasing="train", object_scale=1.0, motion_weights=None,
balance="triples")``
    ``ds[i] -> (video uint8 (T, H, W, 3), caption, spec)``, a pure function of (seed, i);
    ``ds.timed(i)``: clip i's ``timed_captions`` (None without a motion change).

World rules
-----------
* Translations travel 40-55 % of the frame over the clip whatever its length (diagonals
  80 % of that along each axis); growing doubles the radius, shrinking halves it; bouncing
  falls from rest under constant gravity onto a floor ``BOUNCE_HEIGHT`` below the start and
  rebounds elastically (1.3-1.8 bounces per clip); rotating turns 0.3-0.45 of a turn and is
  never given to circles. Objects stay fully inside the frame and never overlap.
* A motion change (``then_motion`` from ``switch_frame`` on) turns a left/right motion into
  up/down or the other way round, between 40 % and 60 % of the clip; only a clip's first
  object changes, in a fraction ``change_prob`` of the clips.
* ``HELDOUT``: the triple (colour i, shape j, motion k), indices into ``COLOURS``,
  ``SHAPES``, ``MOTIONS``, is held out when ``(3 i + 5 j + 7 k) % 10 == 3`` -- 59 of the
  576 valid triples (about 10 %), spread over every colour, shape and motion.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235),
    "yellow": (245, 225, 40), "orange": (250, 140, 20), "purple": (150, 60, 200),
    "white": (245, 245, 245), "cyan": (40, 220, 230), "pink": (255, 120, 190),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle", "star", "cross")
MOTIONS = (
    "left", "right", "up", "down", "up-left", "up-right", "down-left", "down-right",
    "growing", "shrinking", "still", "bouncing", "rotating",
)  # fmt: skip
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
    "up-left": (-1, -1), "up-right": (1, -1), "down-left": (-1, 1), "down-right": (1, 1),
}  # fmt: skip
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "black": ((12, 12, 16), (12, 12, 16)), "charcoal": ((58, 58, 64), (58, 58, 64)),
    "navy": ((18, 26, 72), (18, 26, 72)), "maroon": ((64, 16, 24), (64, 16, 24)),
    "forest": ((16, 52, 28), (16, 52, 28)), "dusk": ((22, 22, 64), (86, 34, 78)),
    "ocean": ((8, 36, 56), (20, 84, 104)), "ember": ((40, 16, 10), (96, 44, 20)),
}  # fmt: skip
CHANGES = {"left": ("up", "down"), "right": ("up", "down"), "up": ("left", "right"),
           "down": ("left", "right")}  # fmt: skip
MIN_CONTRAST = 120.0  # least RGB distance between an object colour and its background
BOUNCE_HEIGHT = 0.42  # apex-to-floor drop of a bouncing object, fraction of the height
DIAGONAL = 0.8  # per-axis share of the speed for diagonal motions
MARGIN = 0.03  # objects stay this far (fraction) inside the frame


def _heldout() -> frozenset[tuple[str, str, str]]:
    """The held-out triples: ``(3 i + 5 j + 7 k) % 10 == 3`` over the vocab indices."""
    return frozenset(
        (c, s, m)
        for i, c in enumerate(COLOURS)
        for j, s in enumerate(SHAPES)
        for k, m in enumerate(MOTIONS)
        if (3 * i + 5 * j + 7 * k) % 10 == 3 and not (s == "circle" and m == "rotating")
    )


HELDOUT = _heldout()
# the shapes a training clip may give each (colour, motion) pair: not held out, and a circle
# never rotates (it would not show)
ALLOWED: dict[tuple[str, str], tuple[str, ...]] = {
    (c, m): tuple(
        s for s in SHAPES if (c, s, m) not in HELDOUT and (s, m) != ("circle", "rotating")
    )
    for c in COLOURS
    for m in MOTIONS
}
# how training clips draw (colour, shape, motion): see sample_clip_spec
BALANCES = ("triples", "colour-motion")

# --- vocabulary: training words and, disjoint from them, paraphrase-only words ---------------

TRAIN_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "colour": {c: (c,) for c in COLOURS},
    "shape": {"circle": ("circle", "ball", "dot"), "square": ("square", "block"),
              "triangle": ("triangle",), "star": ("star",), "cross": ("cross",)},
    "motion": {
        "left": ("moving left", "going left", "sliding to the left", "travelling left"),
        "right": ("moving right", "going right", "sliding to the right", "travelling right"),
        "up": ("moving up", "going up", "rising"),
        "down": ("moving down", "going down", "falling", "sinking"),
        "up-left": ("moving up and to the left", "going diagonally up and left"),
        "up-right": ("moving up and to the right", "going diagonally up and right"),
        "down-left": ("moving down and to the left", "going diagonally down and left"),
        "down-right": ("moving down and to the right", "going diagonally down and right"),
        "growing": ("growing", "getting bigger", "growing larger"),
        "shrinking": ("shrinking", "getting smaller"),
        "still": ("standing still", "not moving", "staying still"),
        "bouncing": ("bouncing", "bouncing up and down"),
        "rotating": ("rotating", "spinning", "spinning around"),
    },
}  # fmt: skip
PARAPHRASE_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "colour": {"red": ("crimson", "scarlet"), "green": ("emerald",), "blue": ("azure", "cobalt"),
               "yellow": ("golden",), "orange": ("tangerine", "amber"),
               "purple": ("violet", "lilac"), "white": ("ivory", "snowy"),
               "cyan": ("turquoise", "teal"), "pink": ("rose", "fuchsia")},
    "shape": {"circle": ("disc", "orb"), "square": ("box", "tile"),
              "triangle": ("pyramid", "wedge"), "star": ("starburst", "pentagram"),
              "cross": ("plus sign",)},
    "motion": {
        "left": ("drifting leftward", "gliding leftward"),
        "right": ("drifting rightward", "gliding rightward"),
        "up": ("ascending", "climbing upward"), "down": ("descending", "dropping downward"),
        "up-left": ("drifting toward the upper left",),
        "up-right": ("drifting toward the upper right",),
        "down-left": ("drifting toward the lower left",),
        "down-right": ("drifting toward the lower right",),
        "growing": ("expanding", "swelling"), "shrinking": ("contracting", "dwindling"),
        "still": ("remaining motionless", "resting stationary"),
        "bouncing": ("hopping", "bounding"), "rotating": ("twirling", "revolving", "whirling"),
    },
}  # fmt: skip
TEMPLATES = {
    "train": ("{objs}", "{objs} on {bg} background", "a video of {objs}",
              "{objs}, with {bg} background", "{objs} in front of {bg} background"),
    "paraphrase": ("footage of {objs} against {bg} backdrop", "we see {objs}",
                   "{objs} over {bg} backdrop", "a clip showing {objs}"),
}  # fmt: skip
JOINERS = {"train": (" and ",), "paraphrase": (" alongside ",)}
THEN_WORDS = {"train": ", then ", "paraphrase": " and afterwards "}
# phrasing -> (colour/shape/motion words, sentence forms: templates, joiners, "then"):
# "rephrase" says the training words in the paraphrase sentence forms, which tells a new
# wording of known words apart from new words.
PHRASINGS = {"train": ("train", "train"), "paraphrase": ("paraphrase", "paraphrase"),
             "rephrase": ("train", "paraphrase")}  # fmt: skip


# --- specs -------------------------------------------------------------------------------------


def _check(name: str, value: object, valid: tuple | dict) -> None:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(str, valid))}")


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a clip; with its clip's size and frame rate it renders deterministically."""

    colour: str  # a key of COLOURS
    shape: str  # one of SHAPES
    motion: str  # one of MOTIONS (the first motion, until ``switch_frame``)
    x: float  # start centre, fraction of the width
    y: float  # start centre, fraction of the height (0 = top)
    size: float  # start radius (circumradius), fraction of the shorter side
    speed: float  # translations/bouncing' drop: frame fractions/s; growing/shrinking: 1/s;
    # rotating: turns/s; bouncing: bounces/s; still: unused
    then_motion: str | None = None  # motion from ``switch_frame`` on (None: no change)
    switch_frame: int | None = None  # first frame of ``then_motion``
    angle: float = 0.0  # start rotation, radians

    def __post_init__(self) -> None:
        _check("colour", self.colour, COLOURS)
        _check("shape", self.shape, SHAPES)
        _check("motion", self.motion, MOTIONS)
        if self.shape == "circle" and self.motion == "rotating":
            raise ValueError("motion 'rotating' needs a shape other than 'circle'")
        if (self.then_motion is None) != (self.switch_frame is None):
            raise ValueError("then_motion and switch_frame must be given together")
        if self.then_motion is not None:
            _check("then_motion", self.then_motion, DIRECTIONS)
        if not 0 < self.size <= 0.5:
            raise ValueError(f"size {self.size} must be in (0, 0.5]")


@dataclass(frozen=True)
class ClipSpec:
    """A whole clip: objects drawn in order over a background."""

    objects: tuple[ObjectSpec, ...]  # 1 to 3 objects
    background: str  # a key of BACKGROUNDS
    width: int = 128  # pixels, >= 16
    height: int = 128  # pixels, >= 16
    frames: int = 33  # >= 2
    fps: int = 16  # frames per second, >= 1
    seed: int = 0  # the seed the spec was sampled from (provenance only)

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"{len(self.objects)} objects; valid: 1 to 3")
        _check("background", self.background, BACKGROUNDS)
        _check_size(self.width, self.height, self.frames, self.fps)
        for o in self.objects:
            if contrast(o.colour, self.background) < MIN_CONTRAST:
                raise ValueError(f"colour {o.colour!r} too close to background {self.background}")

    @property
    def duration(self) -> float:
        """Seconds from the first to the last frame."""
        return (self.frames - 1) / self.fps


def _check_size(width: int, height: int, frames: int, fps: int) -> None:
    if width < 16 or height < 16:
        raise ValueError(f"size {width}x{height} too small; valid: width and height >= 16")
    if frames < 2:
        raise ValueError(f"frames {frames} must be >= 2")
    if fps < 1:
        raise ValueError(f"fps {fps} must be >= 1")


def contrast(colour: str, background: str) -> float:
    """Least RGB distance between an object colour and either end of a background."""
    rgb = np.array(COLOURS[colour], np.float64)
    return min(float(np.linalg.norm(rgb - np.array(end))) for end in BACKGROUNDS[background])


# --- motion ------------------------------------------------------------------------------------


def _offsets(motion: str, speed: float, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre offset (dx, dy), frame fractions, after ``t`` seconds (T,) of ``motion``."""
    if motion in DIRECTIONS:
        ux, uy = DIRECTIONS[motion]
        v = speed * (DIAGONAL if ux and uy else 1.0)
        return ux * v * t, uy * v * t
    if motion == "bouncing":  # parabola = constant gravity; apex at t = 0, floor at phase 0
        phase = (t * speed + 0.5) % 1.0
        return np.zeros_like(t), BOUNCE_HEIGHT * (2 * phase - 1) ** 2
    return np.zeros_like(t), np.zeros_like(t)


def _scale(motion: str, speed: float, t: np.ndarray) -> np.ndarray:
    """Radius factor (T,) after ``t`` seconds of ``motion``."""
    if motion == "growing":
        return 1 + speed * t
    if motion == "shrinking":
        return 1 / (1 + speed * t)
    return np.ones_like(t)


def trajectory(
    o: ObjectSpec, frames: int, fps: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame centre x, y (fractions), radius (fraction of the shorter side), angle (rad)."""
    t = np.arange(frames, dtype=np.float64) / fps  # (T,)
    ts = math.inf if o.switch_frame is None else o.switch_frame / fps
    t1, t2 = np.minimum(t, ts), np.maximum(t - ts, 0.0)
    dx, dy = _offsets(o.motion, o.speed, t1)
    if o.then_motion is not None:
        dx2, dy2 = _offsets(o.then_motion, o.speed, t2)
        dx, dy = dx + dx2, dy + dy2
    r = o.size * _scale(o.motion, o.speed, t1)
    turns = o.speed * t1 if o.motion == "rotating" else 0.0 * t1
    return o.x + dx, o.y + dy, r, o.angle + 2 * math.pi * turns


def motion_at(o: ObjectSpec, frame: int) -> str:
    """The motion in force at ``frame``."""
    if o.then_motion is not None and frame >= o.switch_frame:
        return o.then_motion
    return o.motion


# --- geometry and drawing ----------------------------------------------------------------------


def outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices (pixels) of a shape with circumradius ``r``; a circle gives 64."""
    if shape == "circle":
        return _ring(cx, cy, [r] * 64, 0.0)
    if shape == "square":
        return _ring(cx, cy, [r] * 4, angle + math.pi / 4)
    if shape == "triangle":
        return _ring(cx, cy, [r] * 3, angle - math.pi / 2)
    if shape == "star":
        return _ring(cx, cy, [r, 0.45 * r] * 5, angle - math.pi / 2)
    w = 0.3 * r  # cross: arms of half-width w reaching r along both axes
    pts = [(r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
           (-r, -w), (-w, -w), (-w, -r), (w, -r), (w, -w), (r, -w)]  # fmt: skip
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + px * c - py * s, cy + px * s + py * c) for px, py in pts]


def _ring(cx: float, cy: float, radii: list[float], start: float) -> list[tuple[float, float]]:
    step = 2 * math.pi / len(radii)
    return [
        (cx + rad * math.cos(start + k * step), cy + rad * math.sin(start + k * step))
        for k, rad in enumerate(radii)
    ]


def _pixel_poses(spec: ClipSpec) -> list[list[tuple[float, float, float, float]]]:
    """Per object, per frame: centre x, y, radius in pixels and angle."""
    side = min(spec.width, spec.height)
    out = []
    for o in spec.objects:
        x, y, r, a = trajectory(o, spec.frames, spec.fps)
        out.append(list(zip(x * spec.width, y * spec.height, r * side, a, strict=True)))
    return out


def background_image(spec: ClipSpec, scale: int = 1) -> np.ndarray:
    """The background, uint8 (H*scale, W*scale, 3): a vertical linear ramp top -> bottom."""
    top, bottom = (np.array(c, np.float64) for c in BACKGROUNDS[spec.background])
    h, w = spec.height * scale, spec.width * scale
    ramp = ((np.arange(h) + 0.5) / h)[:, None]  # (H, 1)
    rows = np.round(top * (1 - ramp) + bottom * ramp).astype(np.uint8)  # (H, 3)
    return np.ascontiguousarray(np.broadcast_to(rows[:, None, :], (h, w, 3)))


def render(spec: ClipSpec, scale: int = 2) -> np.ndarray:
    """The clip, uint8 (T, H, W, 3): drawn at ``scale``x with Pillow, box-downsampled."""
    base = Image.fromarray(background_image(spec, scale))
    poses = _pixel_poses(spec)
    out = np.empty((spec.frames, spec.height, spec.width, 3), dtype=np.uint8)
    for f in range(spec.frames):
        img = base.copy()
        draw = ImageDraw.Draw(img)
        for o, pose in zip(spec.objects, poses, strict=True):
            cx, cy, r, a = pose[f]
            pts = outline(o.shape, cx * scale, cy * scale, r * scale, a)
            draw.polygon(pts, fill=COLOURS[o.colour])
        out[f] = np.asarray(img.resize((spec.width, spec.height), Image.BOX))
    return out


def annotations(spec: ClipSpec) -> list[list[dict]]:
    """Per frame, per object: box (x0, y0, x1, y1) and centre in pixels, radius, colour,
    shape and the motion in force."""
    poses = _pixel_poses(spec)
    frames = []
    for f in range(spec.frames):
        row = []
        for o, pose in zip(spec.objects, poses, strict=True):
            cx, cy, r, a = pose[f]
            pts = np.array(outline(o.shape, cx, cy, r, a))  # (V, 2)
            box = (*pts.min(0).tolist(), *pts.max(0).tolist())
            row.append(dict(box=tuple(box), centre=(cx, cy), radius=r, colour=o.colour,
                            shape=o.shape, motion=motion_at(o, f)))  # fmt: skip
        frames.append(row)
    return frames


# --- sampling ----------------------------------------------------------------------------------


def check_motion_weights(weights: dict[str, float] | None) -> None:
    """Raise ValueError naming the first motion or weight that ``motion_weights`` refuses."""
    for name, w in (weights or {}).items():
        _check("motion", name, MOTIONS)
        if not (isinstance(w, int | float) and w >= 0):
            raise ValueError(f"motion weight {name}: {w!r}; valid: a number >= 0")
    if weights is not None and all(weights.get(m, 1.0) == 0 for m in MOTIONS):
        raise ValueError("motion_weights give every motion weight 0; valid: at least one > 0")


def _draw(rng: np.random.Generator, n: int, weights: list[float] | None) -> int:
    """An index below ``n``, uniform or (when ``weights`` sum above 0) in their proportion."""
    if weights is None or sum(weights) == 0:
        return int(rng.integers(n))
    return int(rng.choice(n, p=np.asarray(weights) / sum(weights)))


def _triple(
    rng: np.random.Generator, split: str, taken: set[str], motions: tuple[str, ...] = MOTIONS,
    motion_weights: dict[str, float] | None = None, balance: str = "triples",
) -> tuple[str, str, str]:  # fmt: skip
    """(colour, shape, motion) for one object, motion from ``motions`` (drawn by
    ``motion_weights`` when given, ``balance`` as in :func:`sample_clip_spec`); colours in
    ``taken`` are avoided."""
    weigh = None if motion_weights is None else (lambda m: motion_weights.get(m, 1.0))
    if split == "heldout":
        pool = [t for t in sorted(HELDOUT) if t[0] not in taken and t[2] in motions]
        return pool[_draw(rng, len(pool), weigh and [weigh(t[2]) for t in pool])]
    if balance == "colour-motion":
        pairs = [(c, m) for c in COLOURS if c not in taken for m in motions if ALLOWED[c, m]]
        c, m = pairs[_draw(rng, len(pairs), weigh and [weigh(m) for _, m in pairs])]
        shapes = ALLOWED[c, m]
        return c, shapes[int(rng.integers(len(shapes)))], m
    while True:
        c = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        s = SHAPES[int(rng.integers(len(SHAPES)))]
        m = motions[_draw(rng, len(motions), weigh and [weigh(m) for m in motions])]
        if c not in taken and s in ALLOWED[c, m]:
            return c, s, m


def _speed_and_size(rng: np.random.Generator, motion: str, duration: float) -> tuple[float, float]:
    """Speed (units of ``ObjectSpec.speed``) and start radius for a motion over a clip."""
    u = rng.uniform
    if motion == "growing":
        return u(0.9, 1.2) / duration, u(0.07, 0.085)
    if motion == "shrinking":
        return u(0.9, 1.2) / duration, u(0.15, 0.18)
    if motion == "bouncing":
        return u(1.3, 1.8) / duration, u(0.08, 0.11)
    if motion == "rotating":
        return u(0.3, 0.45) / duration, u(0.11, 0.14)
    if motion == "still":
        return 0.0, u(0.09, 0.13)
    return u(0.40, 0.55) / duration, u(0.08, 0.12)


def _then(rng: np.random.Generator, motion: str, colour: str, shape: str, split: str) -> str:
    options = [m for m in CHANGES[motion] if split != "train" or (colour, shape, m) not in HELDOUT]
    return options[int(rng.integers(len(options)))] if options else ""


def _draft(
    rng: np.random.Generator, split: str, taken: set[str], change: bool, frames: int, fps: int,
    motion_weights: dict[str, float] | None = None, balance: str = "triples",
) -> ObjectSpec:  # fmt: skip
    """An object placed at the centre (``_place`` moves it to a valid start). When ``change``
    its motion is one that can change (``CHANGES``) and gets a ``then_motion``."""
    motions = tuple(CHANGES) if change else MOTIONS
    colour, shape, motion = _triple(rng, split, taken, motions, motion_weights, balance)
    speed, size = _speed_and_size(rng, motion, (frames - 1) / fps)
    then = _then(rng, motion, colour, shape, split) if change else ""
    switch = int(round(rng.uniform(0.4, 0.6) * (frames - 1))) if then else None
    if then:
        speed *= 1.15  # two legs share the travel; keep each clearly visible
    return ObjectSpec(colour, shape, motion, 0.5, 0.5, size, speed, then or None, switch)


def _extent(o: ObjectSpec, spec_wh: tuple[int, int], frames: int, fps: int) -> np.ndarray:
    """Per-frame boxes (T, 4) x0, y0, x1, y1 in frame fractions (circumscribed squares)."""
    w, h = spec_wh
    x, y, r, _ = trajectory(o, frames, fps)
    rx, ry = r * min(w, h) / w, r * min(w, h) / h
    return np.stack([x - rx, y - ry, x + rx, y + ry], 1)


def _place(
    rng: np.random.Generator, o: ObjectSpec, others: list[np.ndarray], wh: tuple[int, int],
    frames: int, fps: int,
) -> tuple[ObjectSpec, np.ndarray] | None:  # fmt: skip
    """Move ``o`` to a random start that keeps it in frame and clear of ``others`` (boxes)."""
    box = _extent(o, wh, frames, fps) - [0.5, 0.5, 0.5, 0.5]  # (T, 4) relative to the start
    lo = MARGIN - box[:, :2].min(0)  # least start (x, y)
    hi = 1 - MARGIN - box[:, 2:].max(0)  # greatest start (x, y)
    if (hi < lo).any():
        return None
    for _ in range(30):
        sx, sy = rng.uniform(lo, hi)
        moved = box + [sx, sy, sx, sy]
        if not any(_overlap(moved, other) for other in others):
            return replace(o, x=float(sx), y=float(sy)), moved
    return None


def _overlap(a: np.ndarray, b: np.ndarray, pad: float = 0.04) -> bool:
    """Whether two per-frame box tracks (T, 4) come within ``pad`` in any frame."""
    apart_x = (a[:, 2] + pad < b[:, 0]) | (b[:, 2] + pad < a[:, 0])
    apart_y = (a[:, 3] + pad < b[:, 1]) | (b[:, 3] + pad < a[:, 1])
    return bool((~(apart_x | apart_y)).any())


def sample_clip_spec(
    rng: np.random.Generator, *, width: int = 128, height: int = 128, frames: int = 33,
    fps: int = 16, split: str = "train", max_objects: int = 3, change_prob: float = 0.2,
    object_scale: float = 1.0, motion_weights: dict[str, float] | None = None,
    balance: str = "triples",
) -> ClipSpec:  # fmt: skip
    """A random clip of the world (see the module docstring for the rules)."""
    _check("split", split, ("train", "heldout"))
    _check("balance", balance, BALANCES)
    check_motion_weights(motion_weights)
    _check_size(width, height, frames, fps)
    if not 1 <= max_objects <= 3:
        raise ValueError(f"max_objects {max_objects}; valid: 1 to 3")
    if not 0 <= change_prob <= 1:
        raise ValueError(f"change_prob {change_prob}; valid: 0 to 1")
    if not 0.5 <= object_scale <= 1.6:
        raise ValueError(f"object_scale {object_scale}; valid: 0.5 to 1.6")
    seed = int(rng.integers(2**31))
    n = min(max_objects, 1 + int(rng.choice(3, p=[0.5, 0.3, 0.2])))
    change = bool(rng.random() < change_prob)
    objects, boxes = [], []
    for _ in range(12 * n):
        if len(objects) == n:
            break
        taken = {p.colour for p in objects}
        o = _draft(rng, split, taken, change and not objects, frames, fps, motion_weights,
                   balance)  # fmt: skip
        o = replace(o, size=o.size * object_scale * (1 - 0.12 * (n - 1)))
        placed = _place(rng, o, boxes, (width, height), frames, fps)
        if placed is not None:
            objects.append(placed[0])
            boxes.append(placed[1])
    bgs = [b for b in BACKGROUNDS if all(contrast(o.colour, b) >= MIN_CONTRAST for o in objects)]
    bg = bgs[int(rng.integers(len(bgs)))]
    return ClipSpec(tuple(objects), bg, width, height, frames, fps, seed)


# --- captions ----------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(o: ObjectSpec, rng: np.random.Generator, phrasing: str = "train") -> str:
    """One object in words: "a red circle moving right[, then moving up]"."""
    vocab, form = PHRASINGS[phrasing]
    words = TRAIN_WORDS if vocab == "train" else PARAPHRASE_WORDS
    colour = _pick(rng, words["colour"][o.colour])
    shape = _pick(rng, words["shape"][o.shape])
    text = f"{_article(colour)} {colour} {shape} {_pick(rng, words['motion'][o.motion])}"
    if o.then_motion is not None:
        text += THEN_WORDS[form] + _pick(rng, words["motion"][o.then_motion])
    return text


def caption(spec: ClipSpec, rng: np.random.Generator, phrasing: str = "train") -> str:
    """A caption naming colour, shape and motion of every object (may name the background)."""
    _check("phrasing", phrasing, PHRASINGS)
    form = PHRASINGS[phrasing][1]
    objs = _pick(rng, JOINERS[form]).join(describe(o, rng, phrasing) for o in spec.objects)
    bg = f"{_article(spec.background)} {spec.background}"
    return _pick(rng, TEMPLATES[form]).format(objs=objs, bg=bg)


def timed_captions(
    spec: ClipSpec, rng: np.random.Generator, phrasing: str = "train"
) -> tuple[tuple[int, str], tuple[int, str]] | None:
    """A clip whose first object changes motion, captioned the way a timed prompt is written:
    ``((0, caption before the change), (switch frame, caption after it))``, each caption with
    one motion per object. None for a clip without a change."""
    first = spec.objects[0]
    if first.then_motion is None or first.switch_frame is None:
        return None
    plain = replace(first, then_motion=None, switch_frame=None)
    before = replace(spec, objects=(plain, *spec.objects[1:]))
    after = replace(spec, objects=(replace(plain, motion=first.then_motion), *spec.objects[1:]))
    return (0, caption(before, rng, phrasing)), (first.switch_frame, caption(after, rng, phrasing))


def words_of(text: str) -> list[str]:
    """The lower-case words of a text ("A red, round ball!" -> ["a", "red", "round", "ball"]):
    runs of anything but spaces, digits and ASCII punctuation, so a word in any script
    ("déplace", "红色") or an emoji stays whole and is checked against the vocabulary too."""
    return re.findall(r"[^\s0-9!-/:-@\[-`{-~]+", text.lower())


def vocabulary() -> tuple[str, ...]:
    """Every word the ``"train"`` captions can use, sorted (templates, joiners, articles,
    background names and the colour, shape and motion phrases of ``TRAIN_WORDS``)."""
    phrases = [*TEMPLATES["train"], *JOINERS["train"], THEN_WORDS["train"], "a an", *BACKGROUNDS]
    phrases += [p for kind in TRAIN_WORDS.values() for ps in kind.values() for p in ps]
    return tuple(sorted({w for p in phrases for w in words_of(p.replace("{bg}", ""))} - {"objs"}))


# --- parsing -----------------------------------------------------------------------------------

_HORIZONTAL = {"left": -1, "leftward": -1, "leftwards": -1,
               "right": 1, "rightward": 1, "rightwards": 1}  # fmt: skip
_VERTICAL = dict.fromkeys(
    ("up", "upward", "upwards", "upper", "top", "rise", "rises", "rising", "ascend", "ascends",
     "ascending", "climb", "climbs", "climbing"), -1,
) | dict.fromkeys(
    ("down", "downward", "downwards", "lower", "bottom", "fall", "falls", "falling", "descend",
     "descends", "descending", "sink", "sinks", "sinking", "drop", "drops", "dropping"), 1,
)  # fmt: skip
_KINDS = {
    "growing": ("grow", "grows", "growing", "bigger", "larger", "expand", "expands", "expanding",
                "swell", "swells", "swelling", "enlarging"),
    "shrinking": ("shrink", "shrinks", "shrinking", "smaller", "contract", "contracts",
                  "contracting", "dwindle", "dwindles", "dwindling", "diminishing"),
    "still": ("still", "motionless", "stationary", "static", "unmoving", "rest", "resting"),
    "bouncing": ("bounce", "bounces", "bouncing", "hop", "hops", "hopping", "bounding"),
    "rotating": ("rotate", "rotates", "rotating", "spin", "spins", "spinning", "twirl",
                 "twirls", "twirling", "revolve", "revolves", "revolving", "whirl", "whirls",
                 "whirling", "turning"),
}  # fmt: skip
_EXTRA_COLOURS = {"grey": None, "magenta": "pink", "gold": "yellow", "aqua": "cyan"}
_EXTRA_SHAPES = {"circles": "circle", "disk": "circle", "sphere": "circle", "plus": "cross",
                 "squares": "square", "stars": "star", "triangles": "triangle"}  # fmt: skip
_THEN = ("then", "afterwards", "afterward", "later")
_BACKDROP = ("background", "backdrop")


def _lexicon() -> dict[str, tuple[str, str]]:
    """Single word -> (attribute, value) for colours, shapes and non-directional motions."""
    lex: dict[str, tuple[str, str]] = {}
    for words in (TRAIN_WORDS, PARAPHRASE_WORDS):
        for attr in ("colour", "shape"):
            for value, phrases in words[attr].items():
                lex.update({p.split()[0]: (attr, value) for p in phrases})
    lex.update({w: ("colour", c) for w, c in _EXTRA_COLOURS.items() if c})
    lex.update({w: ("shape", s) for w, s in _EXTRA_SHAPES.items()})
    for motion, words in _KINDS.items():
        lex.update({w: ("motion", motion) for w in words})
    return lex


_LEXICON = _lexicon()


def _tags(prompt: str) -> list[tuple[str, str]]:
    """The prompt as (attribute, value) tags in order: colour, shape, motion, h, v, then."""
    words = re.findall(r"[a-z]+", prompt.lower())
    tags: list[tuple[str, str]] = []
    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if w == "not" and nxt == "moving":
            tags.append(("motion", "still"))
        elif w in _THEN:
            tags.append(("then", w))
        elif w in _HORIZONTAL:
            tags.append(("h", "left" if _HORIZONTAL[w] < 0 else "right"))
        elif w in _VERTICAL:
            tags.append(("v", "up" if _VERTICAL[w] < 0 else "down"))
        elif w in _LEXICON and not (_LEXICON[w][0] == "colour" and nxt in _BACKDROP):
            tags.append(_LEXICON[w])
    return tags


def _resolve(slot: list[tuple[str, str]]) -> str | None:
    """One motion from a slot's tags: a named motion wins, else directions combine."""
    named = [v for a, v in slot if a == "motion"]
    if named:
        return named[0]
    h = next((v for a, v in slot if a == "h"), None)
    v = next((v for a, v in slot if a == "v"), None)
    return f"{v}-{h}" if h and v else h or v


def parse_prompt(prompt: str) -> list[dict[str, str]]:
    """Objects a prompt asks for, in order: ``[{"colour", "shape", "motion", "then_motion"}]``
    with only the keys found. A new object starts at a colour (or shape) word when the
    current one already has one; "then"/"afterwards" opens the object's second motion."""
    objects: list[dict[str, str]] = []
    slots: list[list[list[tuple[str, str]]]] = []  # per object: [first motion, then motion]
    for attr, value in _tags(prompt):
        if attr in ("colour", "shape") and (not objects or attr in objects[-1]):
            objects.append({})
            slots.append([[]])
        if attr in ("colour", "shape"):
            objects[-1][attr] = value
        elif attr == "then" and slots and slots[-1][-1]:
            slots[-1].append([])
        elif attr != "then" and slots:
            slots[-1][-1].append((attr, value))
    for obj, motion_slots in zip(objects, slots, strict=True):
        for key, slot in zip(("motion", "then_motion"), motion_slots, strict=False):
            if (m := _resolve(slot)) is not None:
                obj[key] = m
    return objects


# --- dataset -----------------------------------------------------------------------------------


class SyntheticClips:
    """Clip ``i`` of the world: ``ds[i] -> (video uint8 (T, H, W, 3), caption, spec)``, a pure
    function of (seed, i, split and the other arguments). ``length`` only sets ``len()``
    (default: effectively unbounded, for random-index training)."""

    def __init__(
        self, seed: int = 0, size: tuple[int, int] = (128, 128), frames: int = 33,
        fps: int = 16, split: str = "train", length: int | None = None, max_objects: int = 3,
        change_prob: float = 0.2, phrasing: str = "train", object_scale: float = 1.0,
        motion_weights: dict[str, float] | None = None, balance: str = "triples",
    ) -> None:  # fmt: skip
        _check("split", split, ("train", "heldout"))
        _check("balance", balance, BALANCES)
        check_motion_weights(motion_weights)
        _check("phrasing", phrasing, TEMPLATES)
        _check_size(size[0], size[1], frames, fps)
        if length is not None and length < 1:
            raise ValueError(f"length {length} must be >= 1 or None")
        self.seed, self.size, self.frames, self.fps = seed, size, frames, fps
        self.split, self.length, self.phrasing = split, length, phrasing
        self.max_objects, self.change_prob = max_objects, change_prob
        self.object_scale, self.motion_weights = object_scale, motion_weights
        self.balance = balance

    def __len__(self) -> int:
        return self.length if self.length is not None else 2**31 - 1

    def spec(self, i: int) -> tuple[ClipSpec, np.random.Generator]:
        """Clip ``i``'s spec and the generator (already advanced) its caption draws from."""
        if not 0 <= i < len(self):
            raise IndexError(f"clip index {i} out of range 0..{len(self) - 1}")
        rng = np.random.default_rng([self.seed, i, 0 if self.split == "train" else 1])
        w, h = self.size
        spec = sample_clip_spec(
            rng, width=w, height=h, frames=self.frames, fps=self.fps, split=self.split,
            max_objects=self.max_objects, change_prob=self.change_prob,
            object_scale=self.object_scale, motion_weights=self.motion_weights,
            balance=self.balance,
        )  # fmt: skip
        return spec, rng

    def __getitem__(self, i: int) -> tuple[np.ndarray, str, ClipSpec]:
        spec, rng = self.spec(i)
        return render(spec), caption(spec, rng, self.phrasing), spec

    def timed(
        self, i: int, spec: ClipSpec | None = None
    ) -> tuple[tuple[int, str], tuple[int, str]] | None:
        """Clip ``i``'s :func:`timed_captions` (None when its motion does not change);
        ``spec``: clip ``i``'s spec when the caller has it (``ds[i][2]``), saving its draw."""
        spec = spec if spec is not None else self.spec(i)[0]
        rng = np.random.default_rng([self.seed, i, 2])
        return timed_captions(spec, rng, self.phrasing)
