"""Where in a clip the built-in model's motion goes wrong: the first second against the second.

    python benchmarks/motion_windows.py [SEEDS]        # default 2

For the single-object, straight-line prompts of ``kinema eval``'s held-out and seen sets
(left, right, up, down and the diagonals), generates each with SEEDS seeds and prints, per set,
the share whose judged motion (kinema.eval.judge.motion_between) is the asked one over frames
4-16, 20-33 and the whole clip, and the object's mean displacement per 4 frames (fraction of
the frame) at frames 0, 4, ..., 28 beside the same for clips of the synthetic world itself
(world seed 3, the same motions). Timed prompts switch at 1 s, so their "before" is the first
window. ``KINEMA_MODEL`` names another model folder.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

from kinema.data.synthetic import SyntheticClips, parse_prompt
from kinema.eval.judge import ClipJudgement, judge_clip, motion_between
from kinema.eval.run import heldout_prompts, seen_prompts
from kinema.loading import load

LINES = ("left", "right", "up", "down", "up-left", "up-right", "down-left", "down-right")
WINDOWS = {"frames 4-16": (4, 16), "frames 20-33": (20, 33), "whole": (0, 33)}


def speeds(j: ClipJudgement) -> np.ndarray:
    """Displacement of the first object over each 4 frames (T - 4,), NaN where unseen."""
    xy = np.full((j.frames, 2), np.nan)
    for o in j.objects[0].observations if j.objects else ():
        xy[o.frame] = (o.x, o.y)
    return np.linalg.norm(xy[4:] - xy[:-4], axis=1)


def straight(prompts: list[str]) -> list[tuple[str, str]]:
    """(prompt, motion) of the single-object straight-line prompts."""
    wants = [(p, parse_prompt(p)) for p in prompts]
    return [(p, w[0]["motion"]) for p, w in wants if len(w) == 1 and w[0].get("motion") in LINES]


def generated(pipe, prompts: list[str], seeds: int) -> dict:  # noqa: ANN001
    hits, profiles, n = dict.fromkeys(WINDOWS, 0), [], 0
    for prompt, motion in straight(prompts):
        for seed in range(seeds):
            with torch.inference_mode():
                j = judge_clip(pipe.generate(prompt, seed=seed).frames)
            n += 1
            for name, (a, b) in WINDOWS.items():
                hits[name] += motion_between(j, a, b)[:1] == [motion]
            profiles.append(speeds(j))
    return {"clips": n, "motion_right_%": {k: round(100 * v / max(n, 1)) for k, v in hits.items()},
            "speed_every_4_frames": np.round(np.nanmean(profiles, 0)[::4], 3).tolist()}  # fmt: skip


def world(count: int = 8) -> dict:
    ds, profiles, i = SyntheticClips(3, size=(128, 128), frames=33, fps=16, object_scale=1.5), [], 0
    while len(profiles) < count:
        frames, _, spec = ds[i]
        (obj, *more) = spec.objects
        if not more and obj.motion in LINES and obj.then_motion is None:
            profiles.append(speeds(judge_clip(frames)))
        i += 1
    speed = np.round(np.nanmean(profiles, 0)[::4], 3).tolist()
    return {"clips": count, "speed_every_4_frames": speed}


def main(seeds: int = 2) -> dict:
    pipe = load(os.environ.get("KINEMA_MODEL"))
    sets = {"heldout": heldout_prompts(10), "seen": seen_prompts(10)}
    out = {name: generated(pipe, prompts, seeds) for name, prompts in sets.items()}
    return out | {"world": world()}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2), indent=2))
