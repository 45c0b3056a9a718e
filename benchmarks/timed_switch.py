"""Timed prompts: the two switch modes side by side, same model, prompts, judge and seeds.

    python benchmarks/timed_switch.py [MODEL] [SEEDS] [CONTRAST]

Prints JSON: kinema.eval.beyond.timed_prompts (8 switches x SEEDS seeds, default 4) with
each of kinema.timeline.SWITCH_MODES (``blend``, then ``cut``), with each mode's wall time.
CONTRAST sets ``blend``'s contrast weight (default: the model's; 0: plain guidance).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import kinema
from kinema.eval.beyond import timed_prompts
from kinema.timeline import SWITCH_MODES


def main(model: str | None = None, seeds: int = 4, contrast: float | None = None) -> dict:
    pipe = kinema.load(model)
    if contrast is not None:
        pipe.defaults = dataclasses.replace(pipe.defaults, contrast=contrast)
    out: dict = {"contrast": pipe.defaults.contrast}
    for mode in SWITCH_MODES:
        start = time.perf_counter()
        out[mode] = timed_prompts(pipe, seeds, switch=mode)
        out[mode]["seconds"] = round(time.perf_counter() - start, 1)
    return out


if __name__ == "__main__":
    model = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None
    seeds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    contrast = float(sys.argv[3]) if len(sys.argv) > 3 else None
    print(json.dumps(main(model, seeds, contrast), indent=2))
