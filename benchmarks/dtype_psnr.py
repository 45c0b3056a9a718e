"""A model's clips in another dtype against its fp32 clips: PSNR and generate time, per prompt.

    python benchmarks/dtype_psnr.py [DTYPE] [PROMPT...]     # default: bf16, the demo prompt

Loads the model twice (fp32 and DTYPE, on the CPU), generates each PROMPT with seed 0 and the
model's defaults in both, twice, alternating, and prints one JSON line per prompt: the PSNR
(dB) of the DTYPE clip against the fp32 one and each dtype's faster generate time (s, in
process, after a warm-up clip). ``KINEMA_MODEL`` names another model folder.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from kinema.bench import psnr
from kinema.loading import load

DEMO = "a red circle moving right on a navy background"


def main(dtype: str, prompts: list[str]) -> None:
    model = os.environ.get("KINEMA_MODEL")
    pipes = {"fp32": load(model, device="cpu"), dtype: load(model, device="cpu", dtype=dtype)}
    with torch.inference_mode():
        for pipe in pipes.values():
            pipe.generate(DEMO, seed=1)  # warm-up
        for prompt in prompts:
            frames, seconds = {}, {name: [] for name in pipes}
            for _ in range(2):
                for name, pipe in pipes.items():
                    start = time.perf_counter()
                    frames[name] = pipe.generate(prompt, seed=0).frames
                    seconds[name].append(time.perf_counter() - start)
            db = round(psnr(frames[dtype], frames["fp32"], 255.0), 1)
            row = {"prompt": prompt, "psnr_db": db,
                   "seconds": {n: round(min(s), 2) for n, s in seconds.items()}}  # fmt: skip
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bf16", sys.argv[2:] or [DEMO])
