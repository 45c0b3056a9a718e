"""A compact synthetic video world: coloured shapes that move, deterministic from a seed.

Each clip has one to three objects (colour, shape, motion), a flat or gradient background,
and a caption from a small grammar that always names colour, shape and motion of each object.
Some (colour, shape, motion) combinations are held out of training (``HELDOUT``) so that
composition can be measured; paraphrase words (``PARAPHRASE``) never appear in training
captions. Clips whose motion changes part-way are captioned "... then moves up".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 235),
    "yellow": (245, 225, 40), "orange": (250, 140, 20), "purple": (150, 60, 200),
    "white": (245, 245, 245), "cyan": (40, 220, 230),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle", "star")
MOTIONS = (
    "left", "right", "up", "down", "up-left", "up-right", "down-left", "down-right",
    "growing", "shrinking", "still", "bouncing", "rotating",
)  # fmt: skip
BACKGROUNDS = {
    "black": ((12, 12, 16), (12, 12, 16)), "gray": ((90, 90, 96), (90, 90, 96)),
    "navy": ((16, 24, 70), (16, 24, 70)), "dark green": ((14, 50, 24), (14, 50, 24)),
    "dusk": ((20, 20, 60), (80, 30, 70)), "sea": ((10, 40, 60), (20, 90, 110)),
}  # fmt: skip
DIRECTIONS = {
    "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1),
    "up-left": (-1, -1), "up-right": (1, -1), "down-left": (-1, 1), "down-right": (1, 1),
}  # fmt: skip

# Held out of training on purpose (composition is measured on these).
HELDOUT = frozenset(
    {("red", "triangle", "up"), ("blue", "star", "left"), ("yellow", "square", "down"),
     ("green", "circle", "right"), ("purple", "square", "growing"), ("cyan", "triangle", "right"),
     ("orange", "circle", "up"), ("white", "star", "down")}
)  # fmt: skip

# Training phrasing and, separately, paraphrases never used in training.
MOTION_WORDS = {
    "left": ["moving left", "going left", "sliding to the left"],
    "right": ["moving right", "going right", "sliding to the right"],
    "up": ["moving up", "rising", "going up"],
    "down": ["moving down", "falling", "going down"],
    "up-left": ["moving up and to the left"], "up-right": ["moving up and to the right"],
    "down-left": ["moving down and to the left"], "down-right": ["moving down and to the right"],
    "growing": ["growing", "getting bigger"], "shrinking": ["shrinking", "getting smaller"],
    "still": ["standing still", "not moving"], "bouncing": ["bouncing", "bouncing up and down"],
    "rotating": ["rotating", "spinning"],
}  # fmt: skip
PARAPHRASE = {
    "motion": {"left": "drifting leftward", "right": "drifting rightward", "up": "ascending",
               "down": "descending", "growing": "expanding", "shrinking": "contracting",
               "still": "motionless", "bouncing": "hopping", "rotating": "twirling"},
    "shape": {"circle": "disc", "square": "box", "triangle": "pyramid", "star": "starburst"},
    "colour": {"red": "scarlet", "green": "emerald", "blue": "azure", "yellow": "golden",
               "purple": "violet", "cyan": "turquoise", "white": "snowy", "orange": "tangerine"},
}  # fmt: skip
TEMPLATES = ["a {obj}", "one {obj}", "a {obj} on a {bg} background", "{obj}, {bg} background"]


@dataclass(frozen=True)
class ObjectSpec:
    colour: str
    shape: str
    motion: str
    x: float  # start centre, fraction of width
    y: float  # start centre, fraction of height
    size: float  # radius, fraction of the shorter side
    speed: float  # fraction of the width travelled per second
    then: str | None = None  # motion after ``switch`` seconds
    switch: float | None = None


@dataclass(frozen=True)
class ClipSpec:
    objects: tuple[ObjectSpec, ...]
    background: str
    width: int = 128
    height: int = 128
    frames: int = 33
    fps: int = 16


def _start(motion: str, rng: np.random.Generator) -> tuple[float, float]:
    """A start position that keeps the object in frame for its motion."""
    dx, dy = DIRECTIONS.get(motion, (0, 0))
    x = 0.25 if dx > 0 else 0.75 if dx < 0 else rng.uniform(0.3, 0.7)
    y = 0.25 if dy > 0 else 0.75 if dy < 0 else rng.uniform(0.3, 0.7)
    if motion == "bouncing":
        y = 0.35
    return x + rng.uniform(-0.05, 0.05), y + rng.uniform(-0.05, 0.05)


def sample_object(rng: np.random.Generator, split: str, change: bool) -> ObjectSpec:
    """One object; ``split`` "train" never yields a HELDOUT combination, "heldout" only those."""
    if split == "heldout":
        colour, shape, motion = sorted(HELDOUT)[rng.integers(len(HELDOUT))]
    else:
        while True:
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            shape = SHAPES[rng.integers(len(SHAPES))]
            motion = MOTIONS[rng.integers(len(MOTIONS))]
            if (colour, shape, motion) not in HELDOUT and not (
                motion == "rotating" and shape == "circle"
            ):
                break
    then = switch = None
    if change and motion in ("left", "right", "up", "down"):
        then = ("up", "down") if motion in ("left", "right") else ("left", "right")
        then, switch = then[rng.integers(2)], 1.0
    x, y = _start(motion, rng)
    if then is not None:
        x, y = 0.5 + (x - 0.5) * 0.6, 0.5 + (y - 0.5) * 0.6
    return ObjectSpec(colour, shape, motion, x, y, rng.uniform(0.09, 0.14), 0.25, then, switch)


def sample_clip(
    rng: np.random.Generator, split: str = "train", width: int = 128, height: int = 128,
    frames: int = 33, fps: int = 16, max_objects: int = 2,
) -> ClipSpec:  # fmt: skip
    n = 1 + int(rng.integers(max_objects)) if rng.random() < 0.35 else 1
    change = rng.random() < 0.2 and n == 1
    objects: tuple[ObjectSpec, ...] = ()
    while len(objects) < n:  # distinct colours, so every object can be named unambiguously
        o = sample_object(rng, split, change)
        if o.colour not in {p.colour for p in objects}:
            objects += (o,)
    if n == 2:  # side by side
        a, b = objects
        objects = (_place(a, 0.3), _place(b, 0.7))
    colours = {o.colour for o in objects}
    bgs = [b for b in BACKGROUNDS if not (b == "gray" and "white" in colours)]
    return ClipSpec(objects, bgs[rng.integers(len(bgs))], width, height, frames, fps)


def _place(o: ObjectSpec, y: float) -> ObjectSpec:
    from dataclasses import replace

    return replace(o, y=y if DIRECTIONS.get(o.motion, (0, 0))[1] == 0 else o.y, size=o.size * 0.8)


def position(o: ObjectSpec, t: float) -> tuple[float, float, float, float]:
    """Centre (x, y), radius and rotation angle of an object at time t seconds."""
    motion, t0 = o.motion, t
    x, y, r, angle = o.x, o.y, o.size, 0.0
    if o.then is not None and t > o.switch:
        dx, dy = DIRECTIONS[motion]
        x, y = x + dx * o.speed * o.switch, y + dy * o.speed * o.switch
        motion, t0 = o.then, t - o.switch
    if motion in DIRECTIONS:
        dx, dy = DIRECTIONS[motion]
        x, y = x + dx * o.speed * t0, y + dy * o.speed * t0
    elif motion == "growing":
        r = o.size * (0.6 + 0.5 * t0)
    elif motion == "shrinking":
        r = o.size * max(0.3, 1.4 - 0.5 * t0)
    elif motion == "bouncing":
        phase = (t0 * 1.6) % 1.0
        y = 0.75 - 1.6 * 0.45 * phase * (1 - phase) * 2.2
    elif motion == "rotating":
        angle = t0 * math.pi
    return x, y, r, angle


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    if shape == "square":
        pts = [(math.pi / 4 + k * math.pi / 2) for k in range(4)]
        return [(cx + r * math.cos(a + angle), cy + r * math.sin(a + angle)) for a in pts]
    if shape == "triangle":
        pts = [(-math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
        return [(cx + r * math.cos(a + angle), cy + r * math.sin(a + angle)) for a in pts]
    pts = []  # star: 5 points
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = -math.pi / 2 + k * math.pi / 5 + angle
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _background(spec: ClipSpec, scale: int) -> Image.Image:
    top, bottom = BACKGROUNDS[spec.background]
    h, w = spec.height * scale, spec.width * scale
    ramp = np.linspace(0, 1, h)[:, None, None]
    grad = (np.array(top) * (1 - ramp) + np.array(bottom) * ramp).astype(np.uint8)
    return Image.fromarray(np.broadcast_to(grad, (h, w, 3)).copy())


def render(spec: ClipSpec, scale: int = 2) -> np.ndarray:
    """The clip as uint8 frames (T, H, W, 3), drawn at ``scale``x and downsampled (antialias)."""
    base = _background(spec, scale)
    side = min(spec.width, spec.height) * scale
    out = np.empty((spec.frames, spec.height, spec.width, 3), dtype=np.uint8)
    for f in range(spec.frames):
        img = base.copy()
        draw = ImageDraw.Draw(img)
        for o in spec.objects:
            x, y, r, angle = position(o, f / spec.fps)
            cx, cy, rad = x * spec.width * scale, y * spec.height * scale, r * side
            if o.shape == "circle":
                draw.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=COLOURS[o.colour])
            else:
                draw.polygon(_polygon(o.shape, cx, cy, rad, angle), fill=COLOURS[o.colour])
        out[f] = np.asarray(img.resize((spec.width, spec.height), Image.BOX))
    return out


def describe(o: ObjectSpec, rng: np.random.Generator, paraphrase: bool) -> str:
    words = MOTION_WORDS[o.motion]
    motion = words[rng.integers(len(words))]
    colour, shape = o.colour, o.shape
    if paraphrase:
        motion = PARAPHRASE["motion"].get(o.motion, motion)
        colour = PARAPHRASE["colour"][colour]
        shape = PARAPHRASE["shape"][shape]
    text = f"{colour} {shape} {motion}"
    if o.then is not None:
        then = MOTION_WORDS[o.then][0].removeprefix("moving ")
        text += f", then moving {then}"
    return text


def caption(spec: ClipSpec, rng: np.random.Generator, paraphrase: bool = False) -> str:
    """A caption that names colour, shape and motion of every object."""
    parts = [describe(o, rng, paraphrase) for o in spec.objects]
    obj = " and a ".join(parts)
    template = TEMPLATES[rng.integers(len(TEMPLATES))]
    return template.format(obj=obj, bg=spec.background)


class SyntheticClips:
    """Clip i of the world, deterministic from (seed, i): ``(frames uint8 (T,H,W,3), caption,
    spec)``. ``split`` "train" avoids HELDOUT combinations; "heldout" uses only them."""

    def __init__(
        self, seed: int = 0, size: tuple[int, int] = (128, 128), frames: int = 33,
        fps: int = 16, split: str = "train", length: int | None = None,
    ) -> None:  # fmt: skip
        if split not in ("train", "heldout"):
            raise ValueError(f"unknown split {split!r}; valid: 'train', 'heldout'")
        if frames < 2:
            raise ValueError(f"frames {frames} must be >= 2")
        self.seed, self.size, self.frames, self.fps = seed, size, frames, fps
        self.split, self.length = split, length

    def __len__(self) -> int:
        return self.length if self.length is not None else 2**31 - 1

    def spec(self, i: int) -> tuple[ClipSpec, np.random.Generator]:
        rng = np.random.default_rng([self.seed, i, 0 if self.split == "train" else 1])
        w, h = self.size
        return sample_clip(rng, self.split, w, h, self.frames, self.fps), rng

    def __getitem__(self, i: int) -> tuple[np.ndarray, str, ClipSpec]:
        spec, rng = self.spec(i)
        return render(spec), caption(spec, rng), spec


def _vocabulary() -> dict[str, tuple[str, str]]:
    """Surface phrase -> (attribute, value), for colours, shapes and motions incl. paraphrases."""
    vocab: dict[str, tuple[str, str]] = {f"{b} background": ("background", b) for b in BACKGROUNDS}
    vocab.update({c: ("colour", c) for c in COLOURS})
    vocab.update({s: ("shape", s) for s in SHAPES})
    for motion, words in MOTION_WORDS.items():
        vocab.update({w: ("motion", motion) for w in words})
    for attr, table in PARAPHRASE.items():
        vocab.update({w: (attr, v) for v, w in table.items()})
    return vocab


def parse_prompt(prompt: str) -> list[dict[str, str]]:
    """The objects a prompt of this world asks for: [{colour, shape, motion, then?}], in order.

    Longest phrases match first ("moving up and to the left" before "moving up"); an object
    starts at each colour word; a "then ..." motion becomes ``then``."""
    text = " " + prompt.lower().replace(",", " ") + " "
    vocab = _vocabulary()
    found: list[tuple[int, str, str]] = []
    for phrase in sorted(vocab, key=len, reverse=True):
        start = text.find(f" {phrase} ")
        while start >= 0:
            found.append((start, *vocab[phrase]))
            text = text[:start] + " " + "#" * len(phrase) + text[start + len(phrase) + 1 :]
            start = text.find(f" {phrase} ")
    objects: list[dict[str, str]] = []
    for _, attr, value in sorted(found):
        if attr == "background":
            continue
        if attr == "colour" or not objects:
            objects.append({})
        obj = objects[-1]
        key = "then" if attr == "motion" and "motion" in obj else attr
        obj.setdefault(key, value)
    return objects
