"""VAE training step: whole clips in one pass against Wan's chunk-by-chunk path, side by side.

    python benchmarks/vae_train_whole.py [STEPS] [ROUNDS] [--config YAML] [--out FILE]

``kinema.train.vae_loop.vae_loss`` encodes and decodes each crop batch in one pass
(``whole=True``, ``split_time=False``); before, it ran the inference path: the encoder chunk by
chunk (1 + 4 + 4 ... frames) and the decoder one latent frame at a time with its
full-resolution stages one output frame at a time. The values are the same (tests); this
measures the time. The chunked path is forced by wrapping ``CausalVAE.encode_posterior`` and
``decode`` so that they ignore ``whole`` and ``split_time`` (here only). Each round runs
STEPS optimiser steps of a VAE recipe loop of kinema-tiny (``configs/kinema-tiny-vae-3.yaml``,
batch 6 of 32x32x33 crops, or ``--config``, e.g. stage 1's 64x64x9 crops; from the shipped
weights, as ``benchmarks/train_precision.py``) per path and precision (fp32, and bf16 where
the CPU has it), alternated; prints JSON (and writes it to FILE): median step time over steps
3..STEPS of every round, the ratios, the first loss.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from train_precision import ASSETS, ROOT, run_once

from kinema.bench import machine
from kinema.models.ops import cpu_has_bf16
from kinema.models.vae import CausalVAE
from kinema.train import load_vae_train_config


@contextlib.contextmanager
def chunked() -> Iterator[None]:
    """Within it, the VAE ignores ``whole`` and ``split_time``: the inference path."""
    encode, decode = CausalVAE.encode_posterior, CausalVAE.decode
    CausalVAE.encode_posterior = lambda self, video, tile=None, whole=False: encode(self, video)
    CausalVAE.decode = lambda self, z, **kw: decode(
        self, z, **{**kw, "whole": False, "split_time": True}
    )
    try:
        yield
    finally:
        CausalVAE.encode_posterior, CausalVAE.decode = encode, decode


def main(steps: int, rounds: int, config_file: Path) -> dict:
    precisions = ("fp32", "bf16") if cpu_has_bf16() else ("fp32",)
    config = load_vae_train_config(config_file)
    start = {"init_from": str(ASSETS / "vae")} if config.init_from else {}  # else from scratch
    config = dataclasses.replace(config, export_dir=None, max_steps=10 * steps, log_every=1,
                                 checkpoint_every=10 * steps, progress=False, **start)  # fmt: skip
    times: dict[str, list[float]] = {}
    losses: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for precision in precisions:
                for path in ("chunked", "whole"):
                    key = f"{path}-{precision}"
                    c = dataclasses.replace(config, precision=precision)
                    with chunked() if path == "chunked" else contextlib.nullcontext():
                        seconds, losses[key] = run_once(c, "vae", steps, Path(tmp) / key)
                    times.setdefault(key, []).extend(seconds[2:])
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    ratios = {f"whole/chunked {p}": round(med[f"whole-{p}"] / med[f"chunked-{p}"], 3)
              for p in precisions}  # fmt: skip
    if "bf16" in precisions:
        ratios["whole-bf16/chunked-fp32"] = round(med["whole-bf16"] / med["chunked-fp32"], 3)
    return {"machine": machine(torch.device("cpu")), "config": config_file.name,
            "crop": [config.crop_size, config.crop_frames], "steps": steps, "rounds": rounds,
            "median_step_s": med, "ratios": ratios, "first_loss": losses}  # fmt: skip


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("steps", type=int, nargs="?", default=8)
    p.add_argument("rounds", type=int, nargs="?", default=2)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "kinema-tiny-vae-3.yaml")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    out = json.dumps(main(args.steps, args.rounds, args.config), indent=2)
    print(out)
    if args.out:
        args.out.write_text(out + "\n")
