"""``kinema eval``: prompt adherence on held-out prompts of the synthetic world, and VAE PSNR.

Three prompt sets, each generated with several seeds and judged by :mod:`kinema.eval.judge`
from the decoded frames alone:

* ``heldout``: (colour, shape, motion) combinations never seen in training;
* ``paraphrase``: seen combinations in words never used in training captions;
* ``rephrase``: seen combinations in the training words, in sentence forms never used in
  training captions (the paraphrases' templates): a new wording of known words;
* ``seen``: training combinations and phrasing (a sanity line).

Also the VAE's reconstruction PSNR on held-out clips.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kinema.data.synthetic import (
    HELDOUT,
    MOTIONS,
    SHAPES,
    TRAIN_WORDS,
    SyntheticClips,
    caption,
    parse_prompt,
)
from kinema.eval.judge import judge_clip, score
from kinema.io.paths import write_text_atomic
from kinema.pipeline import UnknownWordsWarning

ATTRIBUTES = ("colour_ok", "shape_ok", "motion_ok", "count_ok")
PROMPT_SETS = ("heldout", "paraphrase", "rephrase", "seen")


def heldout_prompts(count: int) -> list[str]:
    """``count`` held-out (colour, shape, motion) triples, all of ``HELDOUT`` (sorted) from
    ``len(HELDOUT)`` on; fewer are picked with the shapes in turn and the motions spread
    over the list (each pick the first of its shape's triples in a rotated motion order), so
    no shape or motion dominates the set."""
    picks: list[tuple[str, str, str]] = [] if count < len(HELDOUT) else sorted(HELDOUT)
    for k in range(len(picks), min(count, len(HELDOUT))):
        shape = SHAPES[k % len(SHAPES)]
        start = 4 * k % len(MOTIONS)
        order = MOTIONS[start:] + MOTIONS[:start]
        left = [t for t in sorted(HELDOUT) if t not in picks]  # sorted: ties break the same
        options = [t for t in left if t[1] == shape] or left  # a shape may run out near the end
        picks.append(min(options, key=lambda t: (order.index(t[2]), t[0])))
    return [triple_prompt(*t) for t in picks]


def triple_prompt(colour: str, shape: str, motion: str) -> str:
    """A (colour, shape, motion) triple in the training words: "a red circle moving right"."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape} {TRAIN_WORDS['motion'][motion][0]}"


def seen_prompts(count: int, phrasing: str = "train", seed: int = 11) -> list[str]:
    """Single-object, single-motion captions of training clips in ``phrasing`` ("train",
    "paraphrase" or "rephrase", :func:`kinema.data.synthetic.caption`)."""
    ds, out, i = SyntheticClips(seed), [], 0
    while len(out) < count:
        spec, rng = ds.spec(i)
        i += 1
        if len(spec.objects) == 1 and spec.objects[0].then_motion is None:
            out.append(caption(spec, rng, phrasing))
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-10)))


def vae_psnr(pipe: Any, clips: int = 6) -> float:
    """Mean PSNR of encode -> decode on held-out synthetic clips at the model's default size."""
    d = pipe.defaults
    ds = SyntheticClips(5, size=(d.width, d.height), frames=d.frames, fps=d.fps, split="heldout")
    scores = []
    for i in range(clips):
        frames = ds[i][0]
        decoded = pipe.decode(pipe.encode(frames))
        out = ((decoded[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255)
        scores.append(psnr(out.byte().cpu().numpy(), frames))
    return float(np.mean(scores))


def score_set(
    pipe: Any,
    prompts: list[str],
    seeds: int,
    settings: dict[str, Any],
    log: Callable,
    judged: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Generate every prompt with ``seeds`` seeds and average the judge's verdicts; also each
    clip's verdict and what the judge found (``per_clip``), and the motion score per expected
    motion (``motion_by_word``: where the misses are). ``judged()`` is called after each clip."""
    per_clip = []
    for prompt in prompts:
        expected = [o for o in parse_prompt(prompt) if {"colour", "shape", "motion"} <= set(o)]
        for seed in range(seeds):
            with warnings.catch_warnings():  # paraphrases use unseen words on purpose
                warnings.simplefilter("ignore", UnknownWordsWarning)
                found = judge_clip(pipe.generate(prompt, seed=seed, **settings).frames)
            verdict = score(expected, found)
            log(f"{prompt!r} seed {seed}: {verdict}")
            judged()
            per_clip.append({
                "prompt": prompt, "seed": seed, "motion": expected[0]["motion"], **verdict,
                "found": [[o.colour, o.shape, o.motion] for o in found.objects],
            })  # fmt: skip
    mean = lambda key, clips: round(sum(float(c[key]) for c in clips) / max(len(clips), 1), 4)
    by_word = {m: [c for c in per_clip if c["motion"] == m] for m in MOTIONS}
    return {k: mean(k, per_clip) for k in (*ATTRIBUTES, "consistency")} | {
        "clips": len(per_clip),
        "motion_by_word": {m: mean("motion_ok", cs) for m, cs in by_word.items() if cs},
        "per_clip": per_clip,
    }


def prompts_per_set(prompts: int | None, quick: bool = False) -> int:
    """``prompts`` when given (ValueError below 1), else 10, or 5 when ``quick``."""
    if prompts is None:
        return 5 if quick else 10
    if prompts < 1:
        raise ValueError(f"prompts {prompts} per set; valid: 1 or more")
    return prompts


def evaluate(
    pipe: Any,
    seeds: int = 2,
    quick: bool = False,
    log: Callable[[str], None] = lambda s: None,
    prompts: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """All prompt sets plus VAE PSNR, as a JSON-ready dict; every clip samples with
    ``pipe.defaults`` (``kinema eval --steps`` and the like replace those).

    ``prompts`` per set (default 10, 5 when ``quick``); the held-out set has at most
    ``len(HELDOUT)`` (59), so ``prompts=59`` judges every held-out triple. ``progress(done,
    total)`` hears of every judged clip.
    """
    per_set = prompts_per_set(prompts, quick)
    sets = {
        "heldout": heldout_prompts(min(per_set, len(HELDOUT))),
        "paraphrase": seen_prompts(per_set, "paraphrase"),
        "rephrase": seen_prompts(per_set, "rephrase"),
        "seen": seen_prompts(per_set),
    }
    total, done = seeds * sum(map(len, sets.values())), 0

    def judged() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    with torch.inference_mode():
        results = {name: score_set(pipe, p, seeds, {}, log, judged) for name, p in sets.items()}
        results["vae_psnr_db"] = round(vae_psnr(pipe, 3 if quick else 6), 2)
    results["model"], results["seeds"], results["prompts"] = pipe.name, seeds, per_set
    d = pipe.defaults
    dtype = str(pipe.dtype).removeprefix("torch.")
    results["settings"] = {"steps": d.steps, "guidance": d.guidance, "cache": d.cache,
                           "contrast": d.contrast, "dtype": dtype,
                           "device": str(pipe.device)}  # fmt: skip
    if pipe.loras:
        results["settings"]["loras"] = pipe.lora_records()
    return results


def table(results: dict[str, Any]) -> str:
    """A markdown table of the results."""
    lines = ["| prompt set | clips | colour | shape | motion | count | consistency |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name in [n for n in PROMPT_SETS if n in results]:  # older JSON may lack rephrase
        r = results[name]
        cells = [f"{100 * r[k]:.0f} %" for k in ATTRIBUTES] + [f"{r['consistency']:.2f}"]
        lines.append(f"| {name} | {r['clips']} | " + " | ".join(cells) + " |")
    for name in ("heldout", "seen"):
        words = results[name].get("motion_by_word", {})
        cells = ", ".join(f"{m} {100 * v:.0f} %" for m, v in words.items())
        lines += [f"\n{name} motion by word: {cells}"] if cells else []
    lines.append(f"\nVAE reconstruction on held-out clips: {results['vae_psnr_db']:.2f} dB PSNR")
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: str | Path) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(results, indent=2) + "\n")
