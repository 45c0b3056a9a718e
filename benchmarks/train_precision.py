"""Training step time in fp32 and in bf16 (``precision: bf16``) on this machine, side by side.

    python benchmarks/train_precision.py [STEPS] [ROUNDS] [--out FILE]

Runs the real training loops (``kinema.train``) of kinema-tiny's recipe, fine-tuning the
shipped weights: the DiT as ``configs/kinema-tiny-dit-8.yaml`` (batch 8 of 128x128x33 clips'
latents, timed captions) on 32 clips of the world, and the VAE as
``configs/kinema-tiny-vae-3.yaml`` (batch 6 of 32x32x33 crops). Each round runs STEPS
optimiser steps of each loop in fp32, then in bf16, from the same weights and seeds; a step's
time is the loop's own log (every step). Prints JSON (and writes it to FILE): the median step
time of each loop and precision over steps 3..STEPS of every round, their ratio bf16 / fp32,
and the first step's loss in each (the same batch: only the precision differs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

from kinema.bench import machine
from kinema.models.ops import cpu_has_bf16
from kinema.train import load_train_config, load_vae_train_config, train_dit, train_vae
from kinema.train.loop import read_log

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "kinema" / "assets" / "kinema-tiny"


def configs(steps: int) -> dict[str, object]:
    """The two recipe configs, shrunk to a benchmark: small data, a log row every step."""
    common = dict(max_steps=10 * steps, log_every=1, checkpoint_every=10 * steps, progress=False)
    dit = load_train_config(ROOT / "configs" / "kinema-tiny-dit-8.yaml")
    dit = dataclasses.replace(dit, init_from=str(ASSETS), export_dir=None, sample_every=0, **common,
                              data=dataclasses.replace(dit.data, num_clips=32))  # fmt: skip
    vae = load_vae_train_config(ROOT / "configs" / "kinema-tiny-vae-3.yaml")
    vae = dataclasses.replace(vae, init_from=str(ASSETS / "vae"), export_dir=None, **common)
    return {"dit": dit, "vae": vae}


def run_once(config, kind: str, steps: int, out: Path) -> tuple[list[float], float]:
    """``steps`` optimiser steps from scratch in ``out`` (its latent cache kept between runs):
    the logged step times and the first step's loss."""
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    (out / "log.csv").unlink(missing_ok=True)
    config = dataclasses.replace(config, out_dir=str(out))
    (train_dit if kind == "dit" else train_vae)(config, stop_after=steps)
    rows = read_log(out)
    return [float(r["seconds"]) for r in rows], float(rows[0]["loss"])


def main(steps: int, rounds: int) -> dict:
    results: dict = {"machine": machine(torch.device("cpu")), "cpu_has_bf16": cpu_has_bf16(),
                     "steps": steps, "rounds": rounds}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for kind, config in configs(steps).items():
            times: dict[str, list[float]] = {"fp32": [], "bf16": []}
            losses: dict[str, float] = {}
            for _ in range(rounds):
                for precision in times:
                    c = dataclasses.replace(config, precision=precision)
                    seconds, loss = run_once(c, kind, steps, Path(tmp) / f"{kind}-{precision}")
                    times[precision] += seconds[2:]
                    losses[precision] = loss
            med = {p: round(statistics.median(t), 3) for p, t in times.items()}
            ratio = round(med["bf16"] / med["fp32"], 3)
            results[kind] = {"median_step_s": med, "ratio_bf16_fp32": ratio, "first_loss": losses}
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("steps", type=int, nargs="?", default=12)
    p.add_argument("rounds", type=int, nargs="?", default=2)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    out = json.dumps(main(args.steps, args.rounds), indent=2)
    print(out)
    if args.out:
        args.out.write_text(out + "\n")
