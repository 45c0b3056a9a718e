"""Prompt adherence of a model under other sampling settings, held-out and seen prompt sets.

    python benchmarks/sampling_sweep.py SEEDS SETTINGS...    # e.g. 2 '{}' '{"guidance": 6}'

Each SETTINGS is a JSON object of :class:`kinema.pipeline.Request` fields (``{}``: the model's
defaults). The prompts, seeds and judge are those of ``kinema eval``
(:mod:`kinema.eval.run`), so a ``{}`` line repeats its held-out and seen rows. Prints one JSON
line per setting: colour / shape / motion / count in % and the motion score per motion word.
``KINEMA_MODEL`` names another model folder (default: the built-in kinema-tiny).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from kinema.eval.run import heldout_prompts, score_set, seen_prompts
from kinema.loading import load

ATTRIBUTES = ("colour_ok", "shape_ok", "motion_ok", "count_ok")


def main(seeds: int, grid: list[dict]) -> None:
    pipe = load(os.environ.get("KINEMA_MODEL"))
    sets = {"heldout": heldout_prompts(10), "seen": seen_prompts(10)}
    for settings in grid:
        start = time.time()
        with torch.inference_mode():
            results = {n: score_set(pipe, p, seeds, settings, lambda s: None)
                       for n, p in sets.items()}  # fmt: skip
        line: dict = {"settings": settings, "seconds": round(time.time() - start)}
        for name, r in results.items():
            line[name] = [round(100 * r[k]) for k in ATTRIBUTES]
            line[f"{name}_by_word"] = {m: round(100 * v) for m, v in r["motion_by_word"].items()}
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), [json.loads(g) for g in sys.argv[2:]])
