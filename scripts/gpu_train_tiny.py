"""A kinema-tiny training stage on a lent GPU (the device tool's machine), in one call.

The GPU machine has torch but not the MiniLM package, and what travels there is capped at
64 MiB, so the text encoder goes in a reduced form made here:

    python scripts/gpu_train_tiny.py pack configs/kinema-tiny-dit-7.yaml   # -> .gputrain/

keeps MiniLM's weights in float16 and, of its 30522-row word-embedding table, only the rows of
the tokens that the config's captions (and timed captions) use: every clip's caption is a pure
function of (world seed, index), so the set is exact. There:

    python scripts/gpu_train_tiny.py run configs/kinema-tiny-dit-7.yaml --out $OUT

rebuilds a MiniLM folder (the other rows zero; a caption with any other token is refused before
training), encodes the clips into a latent cache on the GPU, trains (``train_dit``, the config's
``device: cuda`` and ``precision: bf16``), exports, and packs the model (without the VAE, which
is the shipped one) and the training log into ``$OUT/stage.tar``, split into 15 MB parts (the
device tool brings back files of 16 MiB at most). ``--max-steps`` overrides the config's, and
``--init`` / ``--vae`` its ``runs/`` paths (the GPU machine starts bare: the shipped model).

Here again: ``python scripts/gpu_train_tiny.py unpack PARTS_FOLDER DEST`` joins the parts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import tarfile
import threading
import time
from pathlib import Path

import torch
import yaml

PACKED = Path(".gputrain/minilm")
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WORDS = "embeddings.word_embeddings.weight"
PART = 15 * 2**20


def config_captions(config) -> list[str]:  # noqa: ANN001 (a TrainConfig)
    """Every caption (and timed caption) of the config's clips, without rendering them."""
    from kinema.data.synthetic import caption
    from kinema.train.loop import ClipDataset

    world = ClipDataset(config.data).source  # the world training draws from, every option kept
    out = []
    for i in range(config.data.num_clips):
        spec, rng = world.spec(i)
        out.append(caption(spec, rng, world.phrasing))
        out += [c for _, c in world.timed(i) or ()]
    return out


def token_ids(tokenizer_json: Path, captions: list[str]) -> set[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    ids = {i for e in tok.encode_batch(captions) for i in e.ids}
    return ids | {tok.token_to_id(s) for s in SPECIAL}


def pack(config_path: str) -> None:
    from safetensors.torch import load_file, save_file

    from kinema.models.text import minilm_path
    from kinema.train import load_train_config

    config = load_train_config(config_path)
    src = minilm_path()
    started = time.time()
    ids = sorted(token_ids(src / "tokenizer.json", [*config_captions(config), ""]))
    state = load_file(str(src / "model.safetensors"))
    words = next(k for k in state if k.endswith(WORDS))
    rows = state.pop(words)[ids]
    state = {k: v.half() for k, v in state.items() if not k.endswith("position_ids")}
    state |= {"kept_rows": rows.half(), "kept_ids": torch.tensor(ids)}
    PACKED.mkdir(parents=True, exist_ok=True)
    save_file(state, str(PACKED / "reduced.safetensors"),
              metadata={"words_key": words, "vocab_size": str(30522)})  # fmt: skip
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(src / name, PACKED / name)
    size = sum(p.stat().st_size for p in PACKED.iterdir()) / 2**20
    print(f"packed {len(ids)} token rows of {config.data.num_clips} clips' captions "
          f"({time.time() - started:.0f} s) -> {PACKED} ({size:.1f} MiB)")  # fmt: skip


def unpack_minilm(dest: Path) -> set[int]:
    """A MiniLM folder at ``dest`` from the packed one; returns the token ids it knows."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    state = load_file(str(PACKED / "reduced.safetensors"))
    with safe_open(str(PACKED / "reduced.safetensors"), "pt") as f:
        meta = f.metadata()
    ids, rows = state.pop("kept_ids"), state.pop("kept_rows")
    table = torch.zeros(int(meta["vocab_size"]), rows.shape[1], dtype=rows.dtype)
    table[ids] = rows
    dest.mkdir(parents=True, exist_ok=True)
    save_file(state | {meta["words_key"]: table}, str(dest / "model.safetensors"))
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(PACKED / name, dest / name)
    return set(ids.tolist())


def train_within(config, seconds: float, probe: int = 150) -> Path:  # noqa: ANN001
    """Train with ``max_steps`` fitted to ``seconds``: ``probe`` steps first (inside the
    warm-up, whose learning rates do not depend on ``max_steps``), then the rest of the run
    resumed with as many steps as the probe's median step time leaves room for. A SIGTERM
    at ``seconds`` + 60 s stops a run that still overruns (its checkpoint is exported)."""
    import statistics

    from kinema.train import train_dit
    from kinema.train.loop import export, read_log

    if probe >= config.warmup_steps:
        raise ValueError(f"probe {probe} must end inside the {config.warmup_steps}-step warm-up")
    started = time.time()
    guard = threading.Timer(seconds + 60, os.kill, (os.getpid(), signal.SIGTERM))
    guard.daemon = True
    guard.start()
    train_dit(dataclasses.replace(config, log_every=1), stop_after=probe)
    times = [float(r["seconds"]) for r in read_log(config.out_dir)]
    step_s = statistics.median(times[len(times) // 3 :])  # past the first steps' warm-up
    left = seconds - (time.time() - started)
    steps = probe + max(0, int(0.93 * left / step_s))
    print(f"probe: {step_s * 1000:.0f} ms a step; {steps} steps in all")
    try:
        return train_dit(dataclasses.replace(config, max_steps=steps))
    except SystemExit:
        print("stopped at the time limit: exporting the last checkpoint")
        return export(config.out_dir, config.export_dir)
    finally:
        guard.cancel()


def run(args: argparse.Namespace) -> None:
    from kinema.train import load_train_config, train_dit
    from kinema.train.loop import precompute, read_log, read_metadata

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    minilm = Path("/tmp/kinema-minilm")
    known = unpack_minilm(minilm)
    config = load_train_config(args.config)
    changes = {"text_encoder_path": str(minilm), "init_from": args.init, "vae": args.vae,
               "export_vae": None, "out_dir": args.run_dir,
               "export_dir": str(Path(args.run_dir) / "model")}  # fmt: skip
    for pair in args.set:
        key, _, value = pair.partition("=")
        changes[key] = yaml.safe_load(value)
    if args.max_steps:
        changes["max_steps"] = args.max_steps
    if args.num_clips:
        changes["data"] = dataclasses.replace(config.data, num_clips=args.num_clips)
    config = dataclasses.replace(config, **changes)
    timings: dict[str, float] = {}
    started = time.time()
    cache = precompute(config)
    timings["precompute_s"] = time.time() - started
    captions = json.loads(read_metadata(cache / "text.safetensors")["captions"])
    unknown = token_ids(minilm / "tokenizer.json", captions) - known
    if unknown:
        raise SystemExit(f"captions use {len(unknown)} tokens the packed MiniLM lacks: re-pack")
    started = time.time()
    model = train_within(config, args.seconds, args.probe) if args.seconds else train_dit(config)
    timings["train_s"] = time.time() - started
    config = load_train_config(Path(config.out_dir) / "train_config.json")  # its max_steps
    log = read_log(config.out_dir)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    summary = {"max_steps": config.max_steps, "batch_size": config.batch_size,
               "num_clips": config.data.num_clips, "gpu": gpu, "torch": torch.__version__,
               **timings, "first_loss": log[0]["loss"] if log else None,
               "last_losses": [r["loss"] for r in log[-20:]]}  # fmt: skip
    (model / "gpu_stage.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
    shutil.rmtree(model / "vae", ignore_errors=True)  # the shipped VAE: it does not travel back
    tar = out / "stage.tar"
    with tarfile.open(tar, "w") as t:
        t.add(model, arcname="model")
        for name in ("log.csv", "train_config.json"):
            if (Path(config.out_dir) / name).exists():
                t.add(Path(config.out_dir) / name, arcname=name)
    data = tar.read_bytes()
    tar.unlink()
    for n, start in enumerate(range(0, len(data), PART)):
        (out / f"stage.tar.{n}").write_bytes(data[start : start + PART])


def unpack(parts: str, dest: str) -> None:
    data = b"".join(p.read_bytes() for p in sorted(Path(parts).glob("stage.tar.*"),
                                                  key=lambda p: int(p.suffix[1:])))  # fmt: skip
    tmp = Path(dest).with_suffix(".tar")
    tmp.write_bytes(data)
    with tarfile.open(tmp) as t:
        t.extractall(dest, filter="data")
    tmp.unlink()
    print(f"unpacked into {dest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("pack")
    p.add_argument("config")
    p = sub.add_parser("run")
    p.add_argument("config")
    p.add_argument("--out", required=True)
    p.add_argument("--run-dir", default="/tmp/kinema-stage")
    p.add_argument("--init", default="src/kinema/assets/kinema-tiny")
    p.add_argument("--vae", default="src/kinema/assets/kinema-tiny")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a top-level config field, e.g. device=cpu for a dry run",
    )
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--num-clips", type=int, default=0)
    p.add_argument("--probe", type=int, default=150, help="steps timed before fitting")
    p.add_argument("--seconds", type=float, default=0, help="fit max_steps to this training time")
    p = sub.add_parser("unpack")
    p.add_argument("parts")
    p.add_argument("dest")
    args = parser.parse_args()
    if args.verb == "pack":
        pack(args.config)
    elif args.verb == "run":
        run(args)
    else:
        unpack(args.parts, args.dest)


if __name__ == "__main__":
    main()
