"""Planning long videos and timed prompts as a sequence of windows (pure functions).

A video longer than the model's window is made window by window. Every window after the first
starts with ``context`` pixel frames taken from the end of what came before (given to the model
as clean latent frames), so memory stays that of one window however long the video is. Prompt
switches are snapped to latent-frame boundaries (``temporal`` pixel frames, 0.25 s at 16 fps).
Two ways to switch (``SWITCH_MODES``):

- ``blend`` (the default): a window over a switch holds both prompts, and each latent frame's
  tokens cross-attend to the prompt in force at that frame (:func:`latent_prompts`); for models
  trained with per-frame captions, as kinema-tiny is. Through self-attention the next prompt
  leaks into the frames before a switch (and the last into those after), so guidance also
  pushes each frame away from its neighbouring prompt (:func:`neighbour_prompts`; the
  request's ``contrast`` weight).
- ``cut``: a window that reaches a switch is still made at the full window length under the
  prompt in force at its first new frame (so the motion is that of a whole clip), but only its
  frames before the switch are kept; the next window starts there, under the new prompt, with
  the usual context frames. Costs one window more per switch; needs no per-frame training.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from kinema import notes


@dataclass(frozen=True)
class Window:
    """One generation window: ``frames`` pixel frames (tk+1), of which the first ``context``
    are given (copied from the previous output) and the first ``keep`` are kept (``keep`` <
    ``frames`` where a ``cut`` switch ends the window early); ``new`` = keep - context are
    produced. ``prompts``: (first frame of the window, prompt) for each prompt in force over
    it, the first from frame 0."""

    prompts: tuple[tuple[int, str], ...]
    frames: int
    context: int
    seed: int
    keep: int

    @property
    def new(self) -> int:
        return self.keep - self.context

    @property
    def prompt(self) -> str:
        """The prompt in force at the window's first frame."""
        return self.prompts[0][1]


def parse_timed(text: str, name: str = "at") -> tuple[float, str]:
    """'1.5:a yellow circle moving down' -> (1.5, 'a yellow circle moving down') (the CLI's
    ``--at``, the HTTP API's and batch files' ``at``); ValueError naming ``name`` otherwise."""
    head, sep, prompt = text.partition(":")
    try:
        seconds = float(head)
    except ValueError:
        seconds = None
    if not sep or seconds is None or not prompt.strip():
        raise ValueError(f"{name} {text!r} must be SECONDS:PROMPT, e.g. 1.5:a cat".lstrip())
    if m := re.match(r"\s*(\d{1,2})\s*:", prompt):  # 1:30:a cat is 1 s, "30:a cat"
        from kinema import notes

        notes.warn(f"{name} {text!r} is read as {seconds:g} s and the prompt "
                   f"{prompt.strip()!r}; for minutes:seconds give the seconds "
                   f"({seconds * 60 + int(m.group(1)):g})".lstrip())  # fmt: skip
    return seconds, prompt.strip()


def switch_frames(
    timed: Sequence[tuple[float, str]], fps: float, duration: float, temporal: int,
    latest: int | None = None,
) -> list[tuple[int, str]]:  # fmt: skip
    """Timed prompts (start second, prompt) -> (start frame, prompt), frames multiples of
    ``temporal``; raises ValueError for times outside (0, duration) or out of order, or that
    snap past ``latest``, the last frame a switch reaches (the last latent step's; a later
    one would change nothing)."""
    out: list[tuple[int, str]] = []
    last = 0.0
    for t, prompt in timed:
        if not 0 < t < duration:
            raise ValueError(f"prompt time {t:g} s is outside the clip (0, {duration:g}) s")
        if t <= last:
            raise ValueError(f"prompt times must increase: {t:g} s comes after {last:g} s")
        frame = max(temporal, round(t * fps / temporal) * temporal)
        if latest is not None and latest < temporal:
            raise ValueError(
                f"prompt time {t:g} s: the clip is too short for a prompt change "
                f"(it needs {2 * temporal + 1} frames, a latent step after one)"
            )
        if latest is not None and frame > latest:
            raise ValueError(
                f"prompt time {t:g} s switches at frame {frame}, after the clip's last step "
                f"starts: the latest time that changes the clip is {latest / fps:g} s"
            )
        if out and frame == out[-1][0]:
            raise ValueError(
                f"prompt times {last:g} s and {t:g} s both switch at frame {frame}: switches "
                f"snap to every {temporal} frames ({temporal / fps:g} s at {fps:g} fps); give "
                "times that far apart"
            )
        out.append((frame, prompt))
        last = t
    return out


def in_force(
    prompt: str, switches: Sequence[tuple[int, str]], start: int, frames: int
) -> tuple[tuple[int, str], ...]:
    """The prompts in force over video frames ``start .. start + frames``, as (frame of the
    window, prompt): ``prompt`` from the video's start, each switch (video frame, prompt) on."""
    out = [(0, prompt)]
    for frame, p in switches:
        local = frame - start
        if local <= 0:
            out = [(0, p)]
        elif local < frames:
            out.append((local, p))
    return tuple(out)


# A number as text the way people write one ("4", "2.5", "1e3"; "inf" / "nan" for the range
# checks to name): float() also takes "1_0" (10) and digits of other scripts.
DECIMAL = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*|[+-]?(inf|nan)", re.ASCII)
INTEGER = re.compile(r"\s*[+-]?\d+\s*", re.ASCII)

SWITCH_MODES = ("blend", "cut")


# The longest clip kinema plans (2**20 + 1 frames: 18 h at 16 fps), made window by window.
MAX_FRAMES = 2**20 + 1


def new_frames(seconds: float, fps: float, temporal: int) -> int:
    """Frames that continue a clip by ``seconds`` at ``fps`` (an extension's): the nearest
    multiple of ``temporal``, at least one."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ValueError(f"seconds {seconds!r} must be a number > 0")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"seconds {seconds} must be > 0 (and finite)")
    if not fps >= 1:
        raise ValueError(f"fps {fps} must be >= 1")
    if seconds * fps > MAX_FRAMES:  # checked here: the frame count would be 300 digits
        raise ValueError(f"seconds {seconds:g} is over the most kinema makes: {MAX_FRAMES} "
                         f"frames, {MAX_FRAMES / fps / 3600:.1f} h at {fps:g} fps")  # fmt: skip
    steps = round(seconds * fps / temporal)
    if steps < 1:
        notes.warn(f"{seconds:g} s at {fps:g} fps is less than the shortest step of {temporal} "
                   f"frames; making {temporal / fps:g} s", stacklevel=3)  # fmt: skip
    return max(1, steps) * temporal


def clip_frames(seconds: float, fps: float, temporal: int) -> int:
    """Frames of a clip of ``seconds`` at ``fps``: its first frame, then :func:`new_frames`
    (``temporal``·k + 1, e.g. 33 for 2 s at 16 fps)."""
    return 1 + new_frames(seconds, fps, temporal)


def check_switch(switch: str) -> None:
    """Raise ValueError unless ``switch`` is one of ``SWITCH_MODES``."""
    if switch not in SWITCH_MODES:
        raise ValueError(f"unknown switch mode {switch!r}; valid: {', '.join(SWITCH_MODES)}")


def plan(
    prompt: str, switches: Sequence[tuple[int, str]], total: int, window: int, context: int,
    seed: int, has_tail: bool, temporal: int = 4, switch: str = "blend",
) -> list[Window]:  # fmt: skip
    """Cut ``total`` new frames into windows of at most ``window`` frames, each after the first
    starting with ``context`` given frames, and give each the prompts in force over it;
    ``switch`` (``SWITCH_MODES``) says what a prompt switch inside a window does.
    ``has_tail``: a previous clip exists (extension), so the first window has context too;
    frame numbers count the new frames from 0 either way."""
    check_switch(switch)
    windows: list[Window] = []
    made = 0
    while made < total:
        ctx = context if (windows or has_tail) else 0
        new = min(window - ctx, total - made)
        prompts = in_force(prompt, switches, made - ctx, ctx + new)
        frames = keep = ctx + new
        if switch == "cut":
            first, keep = cut(prompts, ctx, frames, temporal)
            prompts = ((0, first),)
            frames = window if keep < frames else frames  # look ahead: a whole window's motion
        windows.append(Window(prompts, frames, ctx, seed + len(windows), keep))
        made += keep - ctx
    return windows


def cut(
    prompts: Sequence[tuple[int, str]], context: int, frames: int, temporal: int
) -> tuple[str, int]:
    """The prompt in force at a window's first new latent frame, and how many of its pixel
    frames to keep: all ``frames``, or those before the first new latent frame that another
    prompt is in force at (the same latent boundaries as :func:`latent_prompts`)."""
    latents = (frames - 1) // temporal + 1
    which = latent_prompts([s for s, _ in prompts], latents, temporal)
    first_new = 0 if context == 0 else (context - 1) // temporal + 1
    for j in range(first_new + 1, latents):
        if which[j] != which[first_new]:
            return prompts[which[first_new]][1], temporal * (j - 1) + 1
    return prompts[which[first_new]][1], frames


def latent_prompts(starts: Sequence[int], latent_frames: int, temporal: int) -> list[int]:
    """For each latent frame, the index of the prompt in force at its first pixel frame (0 for
    latent frame 0, ``temporal * (j - 1) + 1`` for frame j), given each prompt's first pixel
    frame ``starts`` (increasing, the first 0)."""
    first = [0] + [temporal * (j - 1) + 1 for j in range(1, latent_frames)]
    return [max(i for i, s in enumerate(starts) if s <= f) for f in first]


def neighbour_prompts(which: Sequence[int]) -> list[int] | None:
    """For each latent frame, the prompt of the nearest latent frame under another prompt (the
    later one on a tie), given each frame's prompt ``which`` (:func:`latent_prompts`); None
    when one prompt holds the whole window. ``blend``'s contrast pushes each frame away from
    it (:func:`kinema.sampling.guidance.contrast_cfg`)."""
    if len(set(which)) < 2:
        return None
    out = []
    for j, here in enumerate(which):
        others = [k for k, w in enumerate(which) if w != here]
        nearest = min(others, key=lambda k: (abs(k - j), -k))
        out.append(which[nearest])
    return out
