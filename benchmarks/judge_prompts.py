"""What the judge finds in a model's clips of any prompts, seed by seed.

    python benchmarks/judge_prompts.py SEEDS PROMPT...

For each PROMPT, generates seeds 0 .. SEEDS-1 at the model's defaults and prints one JSON line:
the (colour, shape, motion) of every object the judge (kinema.eval.judge) found in each clip.
E.g. whether a motion word fails only for unseen combinations:
``python benchmarks/judge_prompts.py 3 "a red circle moving up and to the left" ...``.
``KINEMA_MODEL`` names another model folder.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from kinema.eval.judge import judge_clip
from kinema.loading import load


def main(seeds: int, prompts: list[str]) -> None:
    pipe = load(os.environ.get("KINEMA_MODEL"))
    for prompt in prompts:
        found = []
        for seed in range(seeds):
            with torch.inference_mode():
                j = judge_clip(pipe.generate(prompt, seed=seed).frames)
            found.append([[o.colour, o.shape, o.motion] for o in j.objects])
        print(json.dumps({"prompt": prompt, "found": found}), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
