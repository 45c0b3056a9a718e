"""Peak live tensor memory of VAE decodes with Wan 2.1's VAE (random weights), on any device:
kinema's pipeline decode (1, 2 or 4 output frames a full-resolution pass, half-precision
cache), its exact whole-chunk decode, and diffusers' untiled decode; with ``--encode``, the
encode of a random video of that size instead (kinema's and diffusers').

    python benchmarks/vae_live_memory.py [--size 104x64x17] [--pieces 1,2,4] [--encode]
                                         [--out FILE]

(``PYTHONPATH=OTHER/src python benchmarks/vae_live_memory.py``: another checkout's kinema, e.g.
a ``git worktree`` of an earlier commit, from session 21's ``TensorPeak`` on.)

``bench.TensorPeak`` counts the tensor storage alive at every aten op, what a GPU's
``max_memory_allocated`` sees, and is the same on every run; so this CPU reproduces the decode
memory ratios of a GPU run at a size it can afford (a GPU adds only kernel workspaces).
Prints JSON: each decode's peak (MiB), its ratio to diffusers', and its largest difference
from kinema's exact decode.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kinema.bench import TensorPeak, machine, piece_name, shape_with, twin_vaes, vae_decoders


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="104x64x17", help="WIDTHxHEIGHTxFRAMES of the video")
    p.add_argument("--pieces", default="1,2,4", help="frames a full-resolution pass")
    p.add_argument("--encode", action="store_true", help="measure the encode instead")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args()
    width, height, frames = map(int, args.size.split("x"))
    pieces = tuple(int(n) for n in args.pieces.split(","))
    shape = shape_with("wan2.1-1.3b", width=width, height=height, frames=frames)
    if args.encode:
        fns = encoders(shape)
        names = ["diffusers", "kinema", "kinema_exact", "kinema_plain"]
    else:
        fns = vae_decoders(shape, torch.device("cpu"), pieces=tuple(n for n in pieces if n != 1))
        names = [
            "diffusers",
            "kinema_plain",
            *("kinema" if n == 1 else piece_name(n) for n in pieces),
        ]
    outs, peaks, seconds = {}, {}, {}
    with torch.inference_mode():
        for name in names:
            start = time.perf_counter()
            with TensorPeak() as tp:
                outs[name] = fns[name]()
            peaks[name] = tp.peak
            seconds[name] = round(time.perf_counter() - start, 1)
    exact = outs["kinema_plain"]
    result = {
        "machine": machine(torch.device("cpu")), "size": [width, height, frames],
        "part": "encode" if args.encode else "decode",
        "peak_mib": {k: round(v / 2**20, 1) for k, v in peaks.items()},
        "ratio_to_diffusers": {k: round(v / peaks["diffusers"], 3) for k, v in peaks.items()},
        "max_diff_vs_exact": {k: float((v - exact).abs().max()) for k, v in outs.items()},
        "seconds_with_counting": seconds,
    }  # fmt: skip
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def encoders(shape) -> dict:  # noqa: ANN001
    """Encodes of one random video of ``shape``: the pipeline's (chunk by chunk, fp16 cache),
    ``kinema_exact`` (chunk by chunk, exact), the whole clip in one pass (``kinema_plain``),
    diffusers'."""
    from kinema.models.vae import LEAN_CACHE

    ours, theirs = twin_vaes(shape.vae, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(2)
    video = torch.rand(1, 3, shape.frames, shape.height, shape.width, generator=g) * 2 - 1
    return {
        "kinema": lambda: ours.encode(video, cache_dtype=LEAN_CACHE[torch.float32]),
        "kinema_exact": lambda: ours.encode(video),
        "kinema_plain": lambda: ours.encode_posterior(video, whole=True)[0],
        "diffusers": lambda: theirs.encode(video).latent_dist.mean,
    }


if __name__ == "__main__":
    main()
