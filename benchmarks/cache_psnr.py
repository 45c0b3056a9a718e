"""The step cache at a model's own default settings: DiT evaluations and PSNR per prompt.

    python benchmarks/cache_psnr.py THRESHOLD...        # e.g. 0.5 0.1

For each of ``kinema eval``'s ten held-out prompts (seed 0, the model's defaults, guidance
included: the step-cache harness samples with guidance 4), generates the clip uncached and
with each THRESHOLD, and prints one JSON line per prompt: per threshold the transformer
evaluations and the PSNR (dB) of the cached clip against the uncached one.
``KINEMA_MODEL`` names another model folder.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

from kinema.eval.run import heldout_prompts
from kinema.loading import load


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return round(10 * np.log10(255**2 / max(mse, 1e-12)), 1)


def main(thresholds: list[float]) -> None:
    pipe = load(os.environ.get("KINEMA_MODEL"))
    for prompt in heldout_prompts(10):
        with torch.inference_mode():
            plain = pipe.generate(prompt, seed=0, cache=0).frames
            rows = {}
            for threshold in thresholds:
                video = pipe.generate(prompt, seed=0, cache=threshold)
                rows[threshold] = {"evaluations": video.info["transformer_evaluations"],
                                   "psnr_db": psnr(video.frames, plain)}  # fmt: skip
        print(json.dumps({"prompt": prompt, "cache": rows}), flush=True)


if __name__ == "__main__":
    main([float(v) for v in sys.argv[1:]] or [0.5])
