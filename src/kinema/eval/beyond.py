"""Quality checks of the conditioning tasks (image-to-video, extension, long videos, timed
prompts) on a pipeline, judged from decoded frames only:

- first-frame fidelity: PSNR of the output's first frame against the image it started from;
- seam continuity: the frame difference across an extension's seam over the clip's median
  frame-to-frame difference (<= 2 is invisible), and the colour drift (whole frame,
  background and the prompt's object) over repeated extensions;
- long-video memory: peak RSS of a long clip over that of a short one, each in a fresh process;
- timed prompts: the judged motion before and after a prompt switch, 0.25 s either side of it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kinema.data.synthetic import SyntheticClips
from kinema.eval.judge import colour_name, estimate_background, motion_between, observe
from kinema.eval.run import psnr

SEAM_PROMPTS = (
    "a red circle moving right on a navy background",
    "a white square moving up on a black background",
)
# (colour shape, motion before, motion after): the switch is at the middle of the clip. Each
# direction starts and ends two switches, turning both ways, all seen combinations.
SWITCHES = (
    ("yellow circle", "right", "down"),
    ("green square", "down", "left"),
    ("cyan triangle", "left", "up"),
    ("orange square", "up", "right"),
    ("white triangle", "right", "up"),
    ("blue circle", "left", "down"),
    ("purple cross", "down", "right"),
    ("red star", "up", "left"),
)


def first_frame_fidelity(pipe: Any, clips: int = 4) -> float:
    """Mean PSNR (dB) of frame 0 of image-to-video clips against their held-out start images."""
    d = pipe.defaults
    ds = SyntheticClips(6, size=(d.width, d.height), frames=d.frames, fps=d.fps, split="heldout")
    scores = []
    for i in range(clips):
        frames, text = ds[i][0], ds[i][1]
        out = pipe.generate(text, image=frames[0], seed=i).frames
        scores.append(psnr(out[0], frames[0]))
    return round(float(np.mean(scores)), 2)


def frame_differences(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference (0-255) between consecutive frames: (T - 1,)."""
    x = frames.astype(np.float32)
    return np.abs(x[1:] - x[:-1]).mean(axis=(1, 2, 3))


def seam_ratio(frames: np.ndarray, seam: int) -> float:
    """Difference across the seam (frame ``seam - 1`` -> ``seam``) over the median of the
    other frame-to-frame differences."""
    diffs = frame_differences(frames)
    others = np.delete(diffs, seam - 1)
    return float(diffs[seam - 1] / max(float(np.median(others)), 1e-6))


def mean_colour(frames: np.ndarray) -> np.ndarray:
    return frames.reshape(-1, 3).astype(np.float64).mean(axis=0)


def background_colour(frames: np.ndarray) -> np.ndarray:
    """Per-channel median pixel: the background of a scene whose objects cover under half of
    it, unmoved by objects that enter or leave the frame."""
    return np.median(frames.reshape(-1, 3), axis=0).astype(np.float64)


def object_colour(frames: np.ndarray) -> np.ndarray | None:
    """Median RGB (3,) of the largest object in each frame, over the frames that show one (None
    when none does): the colour of a one-object prompt's object, whatever colour name the judge
    would give it and unmoved by the background or by where the object is."""
    bgs = estimate_background(frames)  # (T, H, 1, 3)
    found = [obs[0].rgb for i, frame in enumerate(frames) if (obs := observe(frame, i, bgs[i]))]
    return np.median(np.array(found), axis=0) if found else None


def colour_change(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    """Largest per-channel difference (0-255) of two colours (None if either is missing)."""
    return None if a is None or b is None else float(np.abs(b - a).max())


def seam_continuity(
    pipe: Any, extensions: int = 3, seconds: float = 1.0, seeds: int = 4
) -> dict[str, Any]:
    """Extends a clip ``extensions`` times by ``seconds``: the worst seam ratio, and the colour
    drift (largest per-channel change, 0-255) from the source clip to the newest second of the
    mean RGB, of the background alone (:func:`background_colour`; the mean also moves when an
    object leaves the frame or a new one enters) and of the prompt's object
    (:func:`object_colour`, after each extension), with whether the newest second still shows
    an object of the source's colour name. The yardstick for the object's drift: how far its
    colour spreads over clips of the same prompt from ``seeds`` seeds."""
    n = round(seconds * pipe.defaults.fps)
    ratios, drifts, background, objects, kept, spread = [], [], [], [], [], []
    for prompt in SEAM_PROMPTS:
        video = source = pipe.generate(prompt, seed=0).frames
        was = now = object_colour(source)
        steps = []
        for k in range(extensions):
            out = pipe.extend(video, seconds, prompt, seed=k + 1).frames
            ratios.append(seam_ratio(out, len(video)))
            video, now = out, object_colour(out[-n:])
            steps.append(colour_change(was, now))
        newest = video[-n:]
        drifts.append(float(np.abs(mean_colour(newest) - mean_colour(source)).max()))
        background.append(
            float(np.abs(background_colour(newest) - background_colour(source)).max())
        )
        objects.append([None if d is None else round(d, 2) for d in steps])
        kept.append(was is not None and now is not None and colour_name(now) == colour_name(was))
        others = [object_colour(pipe.generate(prompt, seed=s).frames) for s in range(1, seeds)]
        seen = [c for c in (was, *others) if c is not None]
        spread += [colour_change(a, b) for a in seen for b in seen]
    found = [d for steps in objects for d in steps if d is not None]
    return {"seam_ratio_max": round(max(ratios), 3), "seam_ratio_median": round(
        float(np.median(ratios)), 3), "colour_drift_max": round(max(drifts), 2),
        "background_drift_max": round(max(background), 2),
        "object_drift": objects, "object_drift_max": max(found) if found else None,
        "object_seed_spread_max": round(max(spread), 2) if spread else None,
        "object_colour_kept": round(sum(kept) / len(kept), 4)}  # fmt: skip


_PEAK = """
import json, resource, sys, tempfile
import kinema
from kinema.pipeline import Request
how = json.loads(sys.argv[3])
pipe = kinema.load(sys.argv[1] or None, dtype=how["dtype"], lora=[tuple(x) for x in how["lora"]])
frames = round(float(sys.argv[2]) * pipe.defaults.fps) + 1
with tempfile.TemporaryDirectory() as out:  # written as made, as `kinema generate` does
    pipe.save(Request("a red circle moving right", frames=frames, steps=4), out + "/clip.mp4")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_kib": peak, "dtype": str(pipe.dtype), "loras": pipe.lora_records()}))
"""


def peak_rss_mib(pipe: Any, model: str | None, seconds: float) -> tuple[float, dict]:
    """Peak RSS (MiB) of a fresh process that loads ``model`` as ``pipe`` was loaded (its dtype
    and LoRAs) and writes a clip of ``seconds`` to an mp4 as the CLI does (window by window,
    :meth:`~kinema.pipeline.Pipeline.save`); and what that process loaded."""
    how = {"dtype": str(pipe.dtype).removeprefix("torch."),
           "lora": [[path, strength] for path, strength in pipe.loras]}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", _PEAK, model or "", str(seconds), json.dumps(how)],
                         capture_output=True, text=True)  # fmt: skip
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the long-video memory check's process failed: {last}")
    run = json.loads(out.stdout.strip().splitlines()[-1])
    loaded = {"dtype": run["dtype"].removeprefix("torch."), "loras": run["loras"]}
    return run["peak_kib"] / 1024, loaded  # ru_maxrss is KiB on Linux


def long_video_memory(pipe: Any, model: str | None, short: float = 4.0, long: float = 16.0) -> dict:
    """Peak RSS of a ``long`` and a ``short`` clip, and their ratio (<= 1.25 is the target),
    each from a fresh process that loads the model as ``pipe`` was loaded."""
    (a, loaded), (b, _) = peak_rss_mib(pipe, model, short), peak_rss_mib(pipe, model, long)
    return {"short_s": short, "long_s": long, "short_peak_mib": round(a),
            "long_peak_mib": round(b), "ratio": round(b / a, 3), "loaded": loaded}  # fmt: skip


def timed_prompts(
    pipe: Any, seeds: int = 2, margin_s: float = 0.25, seconds: float = 2.0, switch: str = "blend",
    switches: Sequence[tuple[str, str, str]] = SWITCHES,
) -> dict[str, Any]:  # fmt: skip
    """``seconds``-long clips whose prompt switches motion at mid-clip (as ``switch`` says, see
    :mod:`kinema.timeline`), one per switch and seed: the share whose judged motion matches
    the first prompt up to ``margin_s`` before the switch and the second from ``margin_s``
    after it."""
    fps = pipe.defaults.fps
    switch_s = seconds / 2
    at, margin = round(switch_s * fps), round(margin_s * fps)  # the switch's frame
    before = after = both = n = 0
    for thing, first, second in switches:
        a, b = f"a {thing} moving {first}", f"a {thing} moving {second}"
        for seed in range(seeds):
            frames = pipe.generate(
                a, prompts=((switch_s, b),), frames=round(seconds * fps) + 1, seed=seed,
                switch=switch,
            ).frames  # fmt: skip
            ok_a = motion_between(frames, 0, at - margin) == [first]
            ok_b = motion_between(frames, at + margin, len(frames)) == [second]
            before, after, both, n = before + ok_a, after + ok_b, both + (ok_a and ok_b), n + 1
    return {"before": round(before / n, 4), "after": round(after / n, 4),
            "both": round(both / n, 4), "clips": n, "switch_s": switch_s,
            "switch": switch}  # fmt: skip


def evaluate_beyond(
    pipe: Any, model: str | None, quick: bool = False, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """All four checks as a JSON-ready dict (``quick``: fewer clips, 8 s instead of 16 s);
    ``log`` is told each check as it starts (they take from seconds to minutes)."""
    timed = SWITCHES[:4] if quick else SWITCHES
    seeds = 1 if quick else 2
    d = pipe.defaults  # what every clip but the memory check's (4 steps) samples with
    results: dict[str, Any] = {"settings": {
        "steps": d.steps, "guidance": d.guidance, "cache": d.cache,
        "dtype": str(pipe.dtype).removeprefix("torch."), "device": str(pipe.device),
    }}  # fmt: skip
    checks = {
        "first_frame_psnr_db": ("image-to-video first frames",
                                lambda: first_frame_fidelity(pipe, 2 if quick else 4)),
        "extension": ("extension seams and colour drift",
                      lambda: seam_continuity(pipe, 2 if quick else 3, seeds=2 if quick else 4)),
        "long_video_memory": ("long-video memory (two fresh processes)",
                              lambda: long_video_memory(pipe, model, 4.0, 8.0 if quick else 16.0)),
        "timed_prompts": ("timed prompts, blend",
                          lambda: timed_prompts(pipe, seeds, switches=timed)),
        "timed_prompts_cut": ("timed prompts, cut",
                              lambda: timed_prompts(pipe, seeds, switch="cut", switches=timed)),
    }  # fmt: skip
    for n, (key, (what, check)) in enumerate(checks.items(), 1):
        if log is not None:
            log(f"beyond {n}/{len(checks)}: {what}")
        results[key] = check()
    return results


def _number(value: float | None) -> str:
    return "no object" if value is None else f"{value:.1f}"  # None: no object to compare


def table(results: dict[str, Any]) -> str:
    """Markdown lines for the report."""
    ext, mem, tp = results["extension"], results["long_video_memory"], results["timed_prompts"]
    return "\n".join([
        "| check | measured | target |",
        "|---|---:|---:|",
        f"| image-to-video first frame | {results['first_frame_psnr_db']:.1f} dB | >= 25 dB |",
        f"| extension seam / median frame diff (worst) | {ext['seam_ratio_max']:.2f} | <= 2 |",
        f"| colour drift over extensions (0-255) | {ext['colour_drift_max']:.1f} | small |",
        f"| background drift over extensions (0-255) | {ext['background_drift_max']:.1f} "
        "| small |",
        f"| object colour drift over extensions (0-255) | {_number(ext['object_drift_max'])} "
        f"| within the seed spread ({_number(ext['object_seed_spread_max'])}) |",
        f"| object keeps its colour name over extensions | "
        f"{100 * ext['object_colour_kept']:.0f} % | 100 % |",
        f"| peak RSS {mem['long_s']:g} s / {mem['short_s']:g} s clip | {mem['ratio']:.2f} "
        "| <= 1.25 |",
        *(f"| timed prompt ({t['switch']}): motion before / after / both | "
          f"{100 * t['before']:.0f} % / {100 * t['after']:.0f} % / {100 * t['both']:.0f} % "
          "| within 0.25 s |" for t in (tp, results.get("timed_prompts_cut")) if t),
    ])  # fmt: skip
