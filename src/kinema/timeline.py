"""Planning long videos and timed prompts as a sequence of windows (pure functions).

A video longer than the model's window, or whose prompt changes over time, is made window by
window. Every window after the first starts with ``context`` pixel frames taken from the end of
what came before (given to the model as clean latent frames), so memory stays that of one
window however long the video is. Prompt switches are snapped to latent-frame boundaries
(``temporal`` pixel frames, 0.25 s at 16 fps) and start a new window there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """One generation window: ``frames`` pixel frames (tk+1), of which the first ``context``
    are given (copied from the previous output); ``new`` = frames - context are produced."""

    prompt: str
    frames: int
    context: int
    seed: int

    @property
    def new(self) -> int:
        return self.frames - self.context


def switch_frames(
    timed: Sequence[tuple[float, str]], fps: float, duration: float, temporal: int
) -> list[tuple[int, str]]:
    """Timed prompts (start second, prompt) -> (start frame, prompt), frames multiples of
    ``temporal``; raises ValueError for times outside (0, duration) or out of order."""
    out: list[tuple[int, str]] = []
    last = 0.0
    for t, prompt in timed:
        if not 0 < t < duration:
            raise ValueError(f"prompt time {t:g} s is outside the clip (0, {duration:g}) s")
        if t <= last:
            raise ValueError(f"prompt times must increase: {t:g} s comes after {last:g} s")
        frame = max(temporal, round(t * fps / temporal) * temporal)
        out.append((frame, prompt))
        last = t
    return out


def segments(
    prompt: str, switches: Sequence[tuple[int, str]], total: int, first_has_start: bool
) -> list[tuple[str, int]]:
    """(prompt, new frames) per segment. With ``first_has_start`` the first segment also makes
    frame 0 (a video from scratch: total = tk+1); otherwise every count is a multiple of t."""
    bounds = [0] + [f for f, _ in switches] + [total - (1 if first_has_start else 0)]
    prompts = [prompt] + [p for _, p in switches]
    counts = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if first_has_start:
        counts[0] += 1
    return [(p, n) for p, n in zip(prompts, counts, strict=True) if n > 0]


def plan(
    segs: Sequence[tuple[str, int]], window: int, context: int, seed: int, has_tail: bool
) -> list[Window]:
    """Cut segments into windows of at most ``window`` frames, each after the first starting
    with ``context`` given frames. ``has_tail``: a previous clip exists (extension)."""
    windows: list[Window] = []
    for prompt, count in segs:
        left = count
        while left > 0:
            ctx = context if (windows or has_tail) else 0
            new = min(window - ctx, left)
            windows.append(Window(prompt, ctx + new, ctx, seed + len(windows)))
            left -= new
    return windows
