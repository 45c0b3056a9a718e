"""PSNR of kinema-tiny's tiled VAE decode against its untiled one, on synthetic clips.

    python benchmarks/tile_psnr.py [SIZE] [TILE] [CLIPS]

Renders CLIPS (default 3) clips of the synthetic world at SIZE x SIZE (default 256), 17
frames, encodes each with the shipped VAE and decodes it untiled and in TILE-pixel tiles
(default 128, overlap a quarter), both as the pipeline decodes (fp16 causal cache). Prints
JSON: the PSNR of each tiled decode against the untiled one (range [-1, 1]).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

import kinema
from kinema import bench
from kinema.data import synthetic
from kinema.models.vae import TileSpec


def main(size: int, tile: int, clips: int) -> dict:
    vae = kinema.load().vae
    psnr = []
    for seed in range(clips):
        rng = np.random.default_rng(seed)
        spec = synthetic.sample_clip_spec(rng, width=size, height=size, frames=17)
        video = torch.from_numpy(synthetic.render(spec)).permute(3, 0, 1, 2)[None]
        x = video.float() / 127.5 - 1  # (1, 3, T, H, W)
        with torch.inference_mode():
            z = vae.encode(x)
            untiled = vae.decode(z, cache_dtype=torch.float16)
            tiled = vae.decode(z, tile=TileSpec(tile, tile // 4), cache_dtype=torch.float16)
        psnr.append(round(bench.psnr(tiled, untiled, 2.0), 2))  # range [-1, 1]
    return {"size": size, "tile": tile, "overlap": tile // 4, "psnr_db": psnr,
            "machine": bench.machine(torch.device("cpu"))}  # fmt: skip


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    print(json.dumps(main(*(args + [256, 128, 3][len(args) :])), indent=2))
