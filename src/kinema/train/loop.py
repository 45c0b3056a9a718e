"""The training engine and the DiT training loop.

The engine (:func:`start_run`, :func:`train_loop`) is shared with the VAE loop: AdamW with
warm-up and gradient clipping, an EMA, a CSV log (TensorBoard too when installed), a tqdm bar,
and checkpoints every ``checkpoint_every`` steps and on Ctrl-C / SIGTERM that resume exactly
(:mod:`kinema.train.state`).

The DiT loop trains flow matching (:mod:`kinema.train.loss`) on normalised latents of clips
encoded by a frozen VAE, captions encoded by a frozen text encoder. With ``precompute`` (the
default) every clip is encoded once into ``out_dir/cache`` (safetensors shards of fp16 latents
plus the text tokens of each unique caption) and training samples from that cache -- what makes
training on a CPU feasible. Entry points: :func:`train_dit`, :func:`precompute`, :func:`export`.

Under ``torchrun --nproc-per-node N -m kinema train CONFIG`` the same loop runs data-parallel
(DDP or FSDP2, ``TrainConfig.parallel``): each rank trains on 1/N of every micro-batch with the
randomness of the whole micro-batch, so N processes follow the one-process run.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from kinema.configs import SamplingDefaults
from kinema.distributed import train as dt
from kinema.errors import RunFolderRemoved, TrainingDiverged
from kinema.io.checkpoint import save_tensors
from kinema.io.paths import (
    MODEL_ENTRIES,
    atomic_file,
    check_export_folder,
    check_folder,
    usual_modes,
)
from kinema.models.ops import cpu_has_bf16
from kinema.timeline import latent_prompts
from kinema.train.config import (
    DataConfig,
    OptimFields,
    TrainConfig,
    base_sampling,
    config_to_dict,
    parse_config,
)
from kinema.train.ema import EMA
from kinema.train.loss import (
    drop_captions,
    flow_matching_loss,
    sample_cond_mask,
    sample_timesteps,
)
from kinema.train.state import (
    BucketBatches,
    PositionSampler,
    Progress,
    folder_size_mb,
    latest_checkpoint,
    load_ema,
    load_training_state,
    lr_at,
    save_checkpoint,
    save_checkpoint_parallel,
    step_generator,
)

Batch = dict[str, Any]
LossFn = Callable[[Batch, torch.Generator], Tensor]

# ---------------------------------------------------------------------------------------------
# Clips
# ---------------------------------------------------------------------------------------------


def uint8_to_video(frames: Any) -> Tensor:
    """uint8 frames (T, H, W, 3) -> float video (3, T, H, W) in [-1, 1]."""
    x = torch.as_tensor(frames).permute(3, 0, 1, 2).float()  # (3, T, H, W)
    return x / 127.5 - 1.0


class ClipDataset(torch.utils.data.Dataset):
    """``ds[i] -> (video (3, T, H, W) float in [-1, 1], caption)`` from a :class:`DataConfig`."""

    def __init__(self, data: DataConfig, split: str = "train") -> None:
        self.data = data
        size = (data.width, data.height)
        if data.kind == "synthetic":
            from kinema.data.synthetic import SyntheticClips

            self.source: Any = SyntheticClips(
                data.seed, size=size, frames=data.frames, fps=data.fps, split=split,
                object_scale=data.object_scale, motion_weights=data.motion_weights,
                balance=data.balance,
            )  # fmt: skip
            self.length = data.num_clips
        else:
            from kinema.data.folder import VideoFolder

            bucketed = {"resize": "bucket", "buckets": data.sizes} if data.buckets else {}
            self.source = VideoFolder(  # data.seed: which cut of each video (it was 0)
                data.root, frames=data.frames, fps=data.fps, size=size, seed=data.seed,
                **bucketed,
            )  # fmt: skip
            self.length = min(data.num_clips, len(self.source))
            if self.length == 0:
                raise ValueError(f"data.root {data.root} holds no videos")

    def groups(self) -> list[list[int]] | None:
        """Clip indices by size (data.buckets, each bucket its videos), in size order; None
        when every clip has one size."""
        if not self.data.buckets:
            return None
        from kinema.data.folder import group_indices

        groups = group_indices([self.source.bucket_of(i) for i in range(self.length)])
        return groups if len(groups) > 1 else None

    def __len__(self) -> int:
        return self.length

    def timed(self, i: int) -> tuple[tuple[int, str], ...] | None:
        """Clip ``i``'s captions before and after its motion change (synthetic data; None for
        a clip without one, and for folders)."""
        return self.source.timed(i) if self.data.kind == "synthetic" else None

    def with_timed(self, i: int) -> tuple[Tensor, str, str]:
        """``ds[i]`` and its :meth:`timed` captions as JSON (``"null"`` for none), from one
        draw of the clip's spec (a precompute worker's output, collated as strings)."""
        if self.data.kind != "synthetic":
            video, caption = self[i]
            return video, caption, "null"
        frames, caption, spec = self.source[i]
        return uint8_to_video(frames), caption, json.dumps(self.source.timed(i, spec))

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, str]:
        """``key``: a clip index, or (index, epoch) -- a folder clip's start depends on both."""
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        if self.data.kind == "synthetic":
            frames, caption, _ = self.source[i]
            return uint8_to_video(frames), caption
        self.source.set_epoch(epoch)
        item = self.source[i]
        return item["video"].float(), item["caption"]


def clip_stream(
    ds: ClipDataset, start: int, batch: int, seed: int, workers: int
) -> Iterator[Batch]:
    """Endless micro-batches {"video": (B, 3, T, H, W), "captions": [B]} from position ``start``."""
    groups = ds.groups()
    if groups is None:
        sampler = PositionSampler(len(ds), seed, start, with_epoch=True)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True
        )
    else:  # aspect-ratio buckets: each batch one size
        batches = BucketBatches(groups, batch, seed, start, with_epoch=True)
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers)
    with said_once(ds.source, workers):
        for video, captions in loader:
            yield {"video": video, "captions": list(captions)}


@contextlib.contextmanager
def said_once(source: Any, workers: int) -> Iterator[None]:
    """With worker processes, a video folder's warnings (a file skipped, clips padded) are
    said once between them, not once by each (see ``VideoFolder.said_in``)."""
    if workers < 1 or not hasattr(source, "said_in"):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="kinema-said-") as folder:
        source.said_in = Path(folder)
        try:
            yield
        finally:
            source.said_in = None


# ---------------------------------------------------------------------------------------------
# The engine: a run, one optimiser step, the loop
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What a training loop mutates: model, EMA, optimiser and progress."""

    config: OptimFields
    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    device: torch.device
    progress: Progress
    net: nn.Module | None = None  # what the forward runs through (DDP wrapper); None: model

    @property
    def parallel(self) -> bool:
        """True on a data-parallel run of more than one process."""
        return dt.world()[1] > 1


def pick_device(name: str | None) -> torch.device:
    from kinema.loading import resolve_device

    return resolve_device(name)


def autocast_device(config: OptimFields, device: torch.device) -> str | None:
    """Where ``precision: bf16`` autocasts: ``"cuda"``, ``"cpu"`` (only on a CPU with native
    bf16; elsewhere bf16 would be emulated, slower than fp32), or None (fp32)."""
    if config.precision != "bf16":
        return None
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()):
        return device.type
    return None


def autocast(config: OptimFields, device: torch.device) -> Any:
    """bf16 autocast when asked for and the device runs it natively; a no-op elsewhere."""
    kind = autocast_device(config, device)
    return torch.autocast(kind, dtype=torch.bfloat16) if kind else nullcontext()


def build_optimizer(model: nn.Module, config: OptimFields) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, norms and modulation tables)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "scale_shift_table" not in n]
    rest = [p for n, p in params if not (p.ndim >= 2 and "scale_shift_table" not in n)]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": rest, "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def freeze(model: nn.Module, prefixes: tuple[str, ...]) -> nn.Module:
    """Turn off the gradients of the parameters whose names start with one of ``prefixes``."""
    for name, p in model.named_parameters():
        if prefixes and name.startswith(prefixes):
            p.requires_grad_(False)
    return model


def check_run_folders(
    out_dir: str | Path, dest: str | Path, kept: frozenset[str] | None = MODEL_ENTRIES,
    data: DataConfig | None = None,
) -> None:  # fmt: skip
    """Before any work: ``out_dir`` is a folder (or will be) and holds no other program's
    ``log.csv``; the export folder ``dest`` is not the run itself and holds nothing the export
    would destroy (``kept``: what an earlier export left there; None for a LoRA, whose export
    adds one file); ``data``'s video folder, if any, holds videos."""
    from kinema.data.folder import check_root

    out = check_folder(out_dir, "out_dir")
    target = check_folder(dest, "export folder")
    if data is not None and data.kind == "folder":  # before out_dir holds anything
        root = check_root(Path(data.root).expanduser()).resolve()  # type: ignore[arg-type]
        for name, path in (("out_dir", out), ("export folder", target)):
            if root == path.resolve() or root in path.resolve().parents:
                raise ValueError(f"{name} {path} is inside data.root {root}: the videos it "
                                 "gets (samples, exports) would be read as training data; "
                                 "give a folder outside it")  # fmt: skip
    log = out / "log.csv"
    text = log.read_text(encoding="utf-8-sig", errors="replace") if log.is_file() else "step,"
    if not text.startswith("step,"):  # (a spreadsheet's byte order mark is no reason to refuse)
        raise ValueError(f"out_dir {out} holds a log.csv that is not a kinema training log; "
                         "give another out_dir")  # fmt: skip
    if kept is None:
        return
    if target.resolve() == out.resolve() or target.resolve() in out.resolve().parents:
        raise ValueError(f"export folder {target} holds the run's out_dir {out}: the export "
                         "would replace its checkpoints; give another folder")  # fmt: skip
    check_export_folder(target, kept)


def record_config(out: Path, config: Any, step: int) -> None:
    """Write ``out/train_config.json``; when resuming (``step`` > 0) under settings other than
    the run's so far, say which."""
    path = out / "train_config.json"
    now = json.loads(json.dumps(config_to_dict(config)))
    if step and path.is_file():
        before = flat(json.loads(path.read_text()))
        after = flat(now)
        changed = [f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in sorted({*before, *after})
                   if before.get(k) != after.get(k)]  # fmt: skip
        if changed:
            print(f"resuming at step {step} with a changed config: {'; '.join(changed)}")
    path.write_text(json.dumps(now, indent=2) + "\n")


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys: {"data": {"width": 32}} -> {"data.width": 32}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def start_run(
    config: OptimFields,
    build_model: Callable[[Path | None], nn.Module],
    strategy: str = "none",
    device: torch.device | None = None,
    frozen: tuple[str, ...] = (),
) -> Run:
    """Build (or resume) a run: ``build_model(checkpoint or None)`` gives the weights, then the
    EMA, optimiser, RNG states and progress are restored from the newest checkpoint if any.
    Parameters whose names start with one of ``frozen`` are not trained.

    ``strategy`` ("none", "ddp", "fsdp") wraps the model for data-parallel training
    (:func:`kinema.distributed.train.wrap_model`) before the EMA and optimiser are built.
    """
    device = device or pick_device(config.device)
    fallback = config.precision == "bf16" and autocast_device(config, device) is None
    if fallback and dt.world()[0] == 0:
        print(f"precision bf16: {device.type} has no native bf16 here, training in fp32")
    ckpt = latest_checkpoint(config.out_dir)
    torch.manual_seed(config.seed)
    model = build_model(ckpt).to(device).train()
    if getattr(model, "lora_config", None) is None:  # a LoRA run trains its factors only
        model = freeze(model.requires_grad_(True), frozen)
    net = dt.wrap_model(model, strategy, device)  # FSDP shards ``model`` in place
    ema = EMA(model, config.ema_decay, config.ema_warmup)
    optimizer = build_optimizer(model, config)
    progress = Progress()
    if ckpt is not None:
        progress = load_training_state(ckpt, ema, optimizer, device, model)
        if dt.world()[0] == 0:
            print(f"resuming from {ckpt} (step {progress.step})")
    return Run(config, model, ema, optimizer, device, progress, net)


def optimizer_step(run: Run, stream: Iterator[Batch], loss_fn: LossFn) -> tuple[float, float]:
    """One AdamW step over ``grad_accum`` micro-batches; returns (mean loss, gradient norm)."""
    c, step = run.config, run.progress.step
    lr = lr_at(step, c.lr, c.warmup_steps, c.max_steps, c.lr_schedule, c.min_lr_ratio)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    generator = step_generator(c.seed, step)
    run.optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i in range(c.grad_accum):  # gradients synchronise across ranks on the last only
        with dt.gradient_sync(run.net or run.model, enabled=i == c.grad_accum - 1):
            loss = loss_fn(next(stream), generator)
            (loss / c.grad_accum).backward()
        total += loss.item() / c.grad_accum
    if run.parallel:
        total = float(dt.mean_over_ranks(torch.tensor(total, dtype=torch.float64)))
    params = [p for p in run.model.parameters() if p.requires_grad]
    norm = dt.clip_grad_norm(params, c.grad_clip or math.inf)
    if math.isfinite(norm):  # a non-finite gradient skips the update (logged as nan/inf)
        run.optimizer.step()
    run.ema.update(run.model)
    return total, norm


class StopSignals:
    """Turns Ctrl-C and SIGTERM into a flag read between steps (a second Ctrl-C aborts)."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._old: dict[int, Any] = {}
        self._pid = os.getpid()

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a DataLoader worker forked with this handler: the
            return  # training process stops it (Ctrl-C reaches the whole process group)
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        print(f"\nsignal {signum}: saving a checkpoint after this step (Ctrl-C again to abort)")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class TrainLog:
    """``out_dir/log.csv`` (step, loss, lr, grad_norm, seconds), plus TensorBoard if installed.

    On resume, rows after the resumed step (written before a kill) are dropped first.
    """

    FIELDS = ("step", "loss", "lr", "grad_norm", "seconds")

    def __init__(self, out_dir: Path, resume_step: int) -> None:
        self.path = out_dir / "log.csv"
        rows = []
        if self.path.exists():
            with self.path.open(encoding="utf-8-sig") as f:  # re-saved by a spreadsheet too
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        tmp = self.path.with_name(".log.csv.tmp")  # rewrite atomically, then append
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path)
        self.file = self.path.open("a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.FIELDS)
        self.tb = _tensorboard(out_dir / "tensorboard")

    def write(self, step: int, loss: float, lr: float, grad_norm: float, seconds: float) -> None:
        row = {"step": step, "loss": f"{loss:.6g}", "lr": f"{lr:.6g}",
               "grad_norm": f"{grad_norm:.6g}", "seconds": f"{seconds:.3f}"}  # fmt: skip
        self.writer.writerow(row)
        self.file.flush()
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm"):
                self.tb.add_scalar(f"train/{key}", float(row[key]), step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _tensorboard(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def read_log(out_dir: str | Path) -> list[dict[str, str]]:
    """The rows of ``out_dir/log.csv``."""
    with (Path(out_dir) / "log.csv").open() as f:
        return list(csv.DictReader(f))


def train_loop(
    run: Run,
    stream: Iterator[Batch],
    loss_fn: LossFn,
    on_step: Callable[[int], None] | None = None,
    stop_after: int | None = None,
) -> int | None:
    """Train until ``max_steps`` (or ``stop_after`` steps in all, or a signal), checkpointing
    as configured. Returns the signal number that stopped it, else None."""
    c, out = run.config, Path(run.config.out_dir)
    last = min(c.max_steps, stop_after) if stop_after is not None else c.max_steps
    out.mkdir(parents=True, exist_ok=True)
    present = RunFolder(out)
    main = dt.world()[0] == 0  # rank 0 alone logs
    log = TrainLog(out, run.progress.step) if main else None
    bar = tqdm(total=c.max_steps, initial=run.progress.step, disable=not (c.progress and main))
    try:
        with StopSignals() as stop:
            while run.progress.step < last and dt.any_rank(stop.requested) is None:
                start = time.perf_counter()
                loss, norm = optimizer_step(run, stream, loss_fn)
                lr = run.optimizer.param_groups[0]["lr"]
                step = run.progress.step + 1
                run.progress = Progress(
                    step, run.progress.samples_seen + c.batch_size * c.grad_accum
                )
                if log is not None and (step % c.log_every == 0 or step == last):
                    log.write(step, loss, lr, norm, time.perf_counter() - start)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                if step % c.checkpoint_every == 0 or step == last:
                    present.check(step)
                    check_finite(run.model, step, loss)
                    save_run(run)
                if on_step is not None:
                    on_step(step)
            stopped = dt.any_rank(stop.requested)
            if stopped is not None:
                present.check(run.progress.step)
                check_finite(run.model, run.progress.step, math.nan)
                save_run(run)
            return stopped
    finally:
        bar.close()
        if log is not None:
            log.close()


class RunFolder:
    """What ``out_dir`` held as training started, checked before each checkpoint: a run whose
    folder was removed meanwhile stops there (:class:`RunFolderRemoved`) rather than write
    checkpoints into a folder made anew without the run's config, which its export needs."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.config = (out / "train_config.json").is_file()

    def check(self, step: int) -> None:
        gone = not self.out.is_dir() or (
            self.config and not (self.out / "train_config.json").is_file()
        )
        if gone:
            raise RunFolderRemoved(f"the run's out_dir {self.out} was removed during training; "
                                   f"stopped at step {step} with nothing saved there")  # fmt: skip


def check_finite(model: nn.Module, step: int, loss: float) -> None:
    """Before a checkpoint: stop (:class:`TrainingDiverged`) rather than save weights that are
    no longer finite numbers, which every later step and the export would inherit."""
    trained = (p for p in model.parameters() if p.requires_grad)
    if all(bool(torch.isfinite(p).all()) for p in trained):
        return
    raise TrainingDiverged(f"training diverged by step {step} (loss {loss:.4g}): the weights are "
                           "no longer finite, so nothing was saved; lower lr and run again (it "
                           "resumes from the last checkpoint)")  # fmt: skip


def save_run(run: Run) -> Path:
    """Checkpoint the run now (a no-op when this step is already saved)."""
    c = run.config
    save = save_checkpoint_parallel if run.parallel else save_checkpoint
    return save(c.out_dir, run.progress, run.model, run.ema, run.optimizer, keep=c.keep_checkpoints)


def exit_on_signal(signum: int | None, out_dir: str | Path) -> None:
    """After a Ctrl-C / SIGTERM stop: say how to resume and exit with 128 + signal."""
    if signum is None:
        return
    print(f"stopped; checkpoint saved in {Path(out_dir) / 'checkpoints'}; run again to resume")
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------------------------------------
# Frozen parts: VAE and text encoder
# ---------------------------------------------------------------------------------------------


def component_folder(path: str | Path, component: str) -> Path:
    """``path/component`` when ``path`` is a whole model folder (or the built-in model's
    name, ``kinema-tiny``), else ``path`` itself."""
    from kinema.loading import BUILTIN, resolve_model_path

    path = resolve_model_path(path) if str(path) == BUILTIN else Path(path)  # "~": parse_config
    if not path.exists():
        raise ValueError(f"{path} does not exist (expected a model or {component} folder; a "
                         f"relative path is from the current folder, {Path.cwd()})")  # fmt: skip
    if not (path / component).is_dir() and (path / "train_config.json").is_file():
        raise ValueError(f"{path} is a training run's out_dir: give its exported model, "
                         f"{path / 'model'}")  # fmt: skip
    if (path / "state.json").is_file() and (path / "ema.safetensors").is_file():
        run = path.parent.parent
        raise ValueError(f"{path} is a training checkpoint: give the run's exported model "
                         f"(kinema train --export DIR, or {run / 'model'})")  # fmt: skip
    lora = path if path.name == "lora.safetensors" else path / "lora.safetensors"
    if lora.is_file() and not (path / component).is_dir():
        raise ValueError(f"{path} is a LoRA, not a model: train it further as lora: (with "
                         "init_from its base), or merge it with --lora at generate")  # fmt: skip
    if (path / component).is_dir():
        return path / component
    if component == "vae" and (path / "Wan2.1_VAE.pth").exists():
        return path / "Wan2.1_VAE.pth"
    return path


def vae_source(config: TrainConfig) -> Path:
    """The VAE the DiT is trained against: ``vae``, or the ``init_from`` model's."""
    path = component_folder(config.vae or config.init_from, "vae")  # type: ignore[arg-type]
    if config.vae is None and (path / "config.json").is_file():
        raw = json.loads((path / "config.json").read_text())
        if (raw.get("_class") or raw.get("_class_name")) in ("VideoDiT", "WanTransformer3DModel"):
            raise ValueError(f"init_from {config.init_from} is a DiT alone (no vae/ beside it): "
                             "give vae: too, the VAE it was trained with")  # fmt: skip
    return path


def load_frozen_vae(path: str | Path, device: torch.device) -> nn.Module:
    from kinema.io.checkpoint import load_vae

    return load_vae(path, device, torch.float32).eval().requires_grad_(False)


def load_text(config: TrainConfig, device: torch.device) -> Any:
    """The frozen text encoder named by the config."""
    from kinema.models.text import load_text_encoder

    return load_text_encoder(
        config.text_encoder, config.text_encoder_path, device, max_length=config.text_max_length
    )


# ---------------------------------------------------------------------------------------------
# Latent cache (precompute once, train many epochs)
# ---------------------------------------------------------------------------------------------

SHARD = "latents-{:05d}.safetensors"


NORMALISATION = ("latents_mean", "latents_std", "first_frame_mean", "first_frame_std")


def latent_normalisation(vae: Path) -> dict[str, Any]:
    """The statistics a VAE folder normalises its latents with ({} for a Wan .pth file)."""
    path = vae / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return {k: config[k] for k in NORMALISATION if config.get(k) is not None}


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def vae_fingerprint(vae: Path) -> str:
    """The VAE's identity: a hash of its weight files' bytes, so that a moved or copied VAE
    still matches a cache it built and other weights at the same path do not."""
    files = [vae] if vae.is_file() else sorted(vae.rglob("*"))
    digest = hashlib.sha256()
    for path in (p for p in files if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        with path.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return "sha256:" + digest.hexdigest()


def data_file(path: Path) -> bool:
    """Whether a file in a video folder is one the clips are made of: a video or captions."""
    from kinema.data.folder import METADATA_FILES, is_video_name

    return is_video_name(path) or path.suffix.lower() == ".txt" or path.name in METADATA_FILES


def folder_fingerprint(root: str | Path, out_dir: str | Path) -> str:
    """A video folder's state: a hash of the path, size and modification time of every video
    and caption file (videos, ``.txt``, ``metadata.jsonl`` / ``.csv``; not notes, thumbnails
    or hidden files), so a video or caption added, removed or edited since is seen."""
    from kinema.data.folder import files_under

    root, digest = Path(root).expanduser(), hashlib.sha256()
    out = Path(out_dir).expanduser().resolve()
    for path in (p for p in files_under(root) if data_file(p) and p.is_file()):
        hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
        if hidden or out in path.resolve().parents:
            continue
        st = path.stat()
        digest.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "sha256:" + digest.hexdigest()


def cache_key(config: TrainConfig, files: bool = True) -> dict[str, Any]:
    """What the cached latents depend on; a mismatch with an existing cache is an error.
    ``files``: with the video folder's fingerprint (a walk over every file)."""
    data = dataclasses.asdict(config.data)
    if data["buckets"]:
        data["buckets"] = [list(b) for b in data["buckets"]]  # as JSON reads them back
    else:
        del data["buckets"]  # caches written before buckets existed stay valid
    key = {
        "data": data,
        "vae": vae_fingerprint(vae_source(config)),
        "normalisation": latent_normalisation(vae_source(config)),
        "text_encoder": config.text_encoder,
        "text_max_length": config.text_max_length,
    }
    if files and config.data.kind == "folder":
        key["files"] = folder_fingerprint(config.data.root, config.out_dir)  # type: ignore[arg-type]
    return key


# What each part of a cache key is, as an error names it.
CACHE_KEY_NAMES = {"data": "data settings", "vae": "VAE weights",
                   "normalisation": "latent statistics", "text_encoder": "text encoder",
                   "text_max_length": "caption length",
                   "files": "files in data.root (added, removed or changed since)"}  # fmt: skip


def check_cache_key(folder: Path, key: dict[str, Any]) -> None:
    """Refuse a cache built for other settings or files; record ``key`` in ``meta.json``.
    A cache with nothing encoded yet (a run that stopped before its first shard, e.g. on bad
    input the user has since fixed) is taken over, whatever it was started for."""
    meta = folder / "meta.json"
    encoded = any(folder.glob("latents-*.safetensors")) or (folder / "text.safetensors").exists()
    if meta.exists() and encoded:
        built = json.loads(meta.read_text())
        built.setdefault("files", key.get("files"))  # a cache from before folders were hashed
        if differs := [CACHE_KEY_NAMES[k] for k in key if built.get(k) != key[k]]:
            raise ValueError(
                f"{folder} was built for other {'; other '.join(differs)}; delete it to rebuild"
            )
    folder.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(key, indent=2) + "\n")


@torch.no_grad()
def encode_clips(vae: nn.Module, video: Tensor, device: torch.device) -> Tensor:
    """video (B, 3, T, H, W) in [-1, 1] -> normalised latents (B, z, 1+(T-1)/4, H/8, W/8)."""
    return vae.normalize(vae.encode(video.to(device, torch.float32)))


def write_atomic(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file written whole or not at all (:func:`atomic_file`)."""
    state = {k: v.contiguous().cpu() for k, v in tensors.items()}

    def write(tmp: Path) -> None:
        save_tensors(state, tmp, metadata)
        usual_modes(tmp)  # safetensors makes its file 0o600

    atomic_file(path, write)


class _WithTimed(torch.utils.data.Dataset):
    """Clips ``indices`` of ``ds`` as (video, caption, timed captions as JSON)."""

    def __init__(self, ds: ClipDataset, indices: range) -> None:
        self.ds, self.indices = ds, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, n: int) -> tuple[Tensor, str, str]:
        return self.ds.with_timed(self.indices[n])


def encode_batch(device: torch.device) -> int:
    """Clips a VAE encode call takes: 4 on the CPU; more where small kernels cost launches."""
    return 4 if device.type == "cpu" else 32


def encode_shard(
    ds: ClipDataset, indices: range, vae: nn.Module, device: torch.device, workers: int,
    bucketed: bool,
) -> tuple[dict[str, Tensor], list[str], list[str]]:  # fmt: skip
    """The shard's tensors: "latents" (n, z, F, h, w) float16, or with clips of several sizes
    (``bucketed``: aspect-ratio buckets) "latents.j" (z, F, h, w) per clip j; captions and
    timed captions (JSON) of clips ``indices``."""
    batch = 1 if bucketed else encode_batch(device)  # a batch holds one size
    loader = torch.utils.data.DataLoader(_WithTimed(ds, indices), batch, num_workers=workers)
    latents, captions, timed = [], [], []
    for video, caps, times in loader:
        latents.append(encode_clips(vae, video, device).half().cpu())
        captions.extend(caps)
        timed.extend(times)
    if bucketed:
        return {f"latents.{j}": z[0] for j, z in enumerate(latents)}, captions, timed
    return {"latents": torch.cat(latents)}, captions, timed


def encode_captions(text: Any, captions: list[str], folder: Path) -> None:
    """Text tokens (U, L, D) float16 of each unique caption ("" included) -> text.safetensors."""
    unique = sorted({"", *captions})
    tokens = torch.cat([text.encode(unique[i : i + 64])[0].float().cpu()
                        for i in range(0, len(unique), 64)])  # fmt: skip
    write_atomic({"tokens": tokens.half()}, folder / "text.safetensors",
                 {"captions": json.dumps(unique)})  # fmt: skip


def precompute(
    config: TrainConfig,
    *,
    vae: nn.Module | None = None,
    text_encoder: Any = None,
    shard_size: int = 256,
) -> Path:
    """Encode the config's clips once into ``out_dir/cache`` (resumable shard by shard)."""
    folder = Path(config.out_dir) / "cache"
    check_cache_key(folder, cache_key(config))
    device = pick_device(config.device)
    vae = vae or load_frozen_vae(vae_source(config), device)
    ds = ClipDataset(config.data)
    shards = range(0, len(ds), shard_size)
    bucketed = ds.groups() is not None  # clips of several sizes
    captions: list[str] = []
    for n, start in enumerate(tqdm(shards, desc="precompute", disable=not config.progress)):
        path = folder / SHARD.format(n)
        if path.exists():
            captions += json.loads(read_metadata(path)["captions"])
            continue
        latents, caps, timed = encode_shard(ds, range(start, min(start + shard_size, len(ds))),
                                            vae, device, config.num_workers, bucketed)  # fmt: skip
        meta = {"captions": json.dumps(caps), "timed": "[" + ", ".join(timed) + "]"}
        write_atomic(latents, path, meta)
        captions += caps
    if not (folder / "text.safetensors").exists():
        encode_captions(text_encoder or load_text(config, device), captions, folder)
    return folder


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def shard_latents(path: Path) -> list[Tensor] | Tensor:
    """A shard's latents: (n, z, F, h, w), or a list of n (z, F, h, w) of several sizes."""
    tensors = load_file(str(path))
    if "latents" in tensors:
        return tensors["latents"]
    return [tensors[f"latents.{j}"] for j in range(len(tensors))]


@dataclass
class LatentCache:
    """Precomputed latents (N, z, F, h, w) float16 (a list of N (z, F, h, w) when the clips
    come in several sizes: aspect-ratio buckets), captions [N], and tokens (U, L, D) of each
    unique caption (row ``rows[caption]``); ``timed`` [N]: each clip's timed captions as the
    world gives them (None for a clip without), or None for a cache written before they were
    stored (look them up in the world then: :func:`timed_lookup`)."""

    latents: Tensor | list[Tensor]
    captions: list[str]
    tokens: Tensor
    rows: dict[str, int]
    timed: list[Any] | None = None

    @classmethod
    def load(cls, folder: Path) -> LatentCache:
        shards = sorted(folder.glob("latents-*.safetensors"))
        parts = [shard_latents(p) for p in shards]
        latents: Tensor | list[Tensor]
        if all(isinstance(part, Tensor) for part in parts):
            latents = torch.cat(parts)  # type: ignore[arg-type]
        else:  # clips of several sizes, one tensor each
            latents = [z for part in parts for z in part]
        metas = [read_metadata(p) for p in shards]
        captions = [c for m in metas for c in json.loads(m["captions"])]
        timed = None
        if all("timed" in m for m in metas):
            timed = [_timed_tuples(t) for m in metas for t in json.loads(m["timed"])]
        unique = json.loads(read_metadata(folder / "text.safetensors")["captions"])
        tokens = load_file(str(folder / "text.safetensors"))["tokens"]
        return cls(latents, captions, tokens, {c: i for i, c in enumerate(unique)}, timed)

    def text(self, captions: list[str]) -> Tensor:
        """Captions [B] -> tokens (B, L, D) float32."""
        return self.tokens[[self.rows[c] for c in captions]].float()

    def batch(self, indices: list[int]) -> Tensor:
        """Latents (B, z, F, h, w) float32 of clips ``indices`` (of one size)."""
        if isinstance(self.latents, Tensor):
            return self.latents[indices].float()
        return torch.stack([self.latents[i] for i in indices]).float()

    def groups(self) -> list[list[int]] | None:
        """Clip indices by latent shape, in shape order; None when all have one shape."""
        if isinstance(self.latents, Tensor):
            return None
        from kinema.data.folder import group_indices

        return group_indices([tuple(z.shape) for z in self.latents])

    @classmethod
    def concat(cls, caches: Sequence[LatentCache]) -> LatentCache:
        """One cache holding the clips of ``caches`` in order (clip ``i`` of the second comes
        after all of the first's); captions they share keep one token row."""
        if len(caches) == 1:
            return caches[0]
        rows: dict[str, int] = {}
        tokens = []
        for cache in caches:
            for caption, row in cache.rows.items():
                if caption not in rows:
                    rows[caption] = len(rows)
                    tokens.append(cache.tokens[row])
        timed = None
        if all(c.timed is not None for c in caches):
            timed = [t for c in caches for t in c.timed]  # type: ignore[union-attr]
        return cls(torch.cat([c.latents for c in caches]),
                   [caption for c in caches for caption in c.captions],
                   torch.stack(tokens), rows, timed)  # fmt: skip


def _timed_tuples(timed: Any) -> Any:
    """JSON's lists of [frame, caption] back to the world's tuples (None stays None)."""
    return None if timed is None else tuple((int(f), str(c)) for f, c in timed)


def check_extra_caches(config: TrainConfig) -> list[tuple[Path, DataConfig]]:
    """``config.extra_caches`` with the data each was encoded from. Raises ValueError for an
    unfinished one or one built with another VAE, latent statistics or text encoder than this
    run's (read from their meta.json alone: cheap, so a run checks them before encoding)."""
    key = {k: v for k, v in cache_key(config, files=False).items() if k != "data"}
    out = []
    for extra in map(Path, config.extra_caches):
        meta = extra / "meta.json"
        if not meta.is_file() or not (extra / "text.safetensors").is_file():
            raise ValueError(
                f"extra cache {extra} is not a finished latent cache "
                "(no meta.json / text.safetensors: run its training first)"
            )
        theirs = json.loads(meta.read_text())
        if differs := [k for k in key if theirs.get(k) != key[k]]:
            raise ValueError(
                f"extra cache {extra} was built with another {', '.join(differs)} than this "
                "run's; only caches of the same VAE and text encoder mix"
            )
        if theirs["data"].get("buckets"):  # its latents are lists of sizes, not one tensor
            raise ValueError(f"extra cache {extra} holds bucketed clips (data.buckets); "
                             "extra_caches mix caches of one clip size")  # fmt: skip
        out.append((extra, DataConfig(**theirs["data"])))
    return out


def load_caches(
    config: TrainConfig, extras: list[tuple[Path, DataConfig]]
) -> tuple[LatentCache, list[tuple[int, DataConfig]]]:
    """This run's cache followed by the ``extras`` (:func:`check_extra_caches`), merged; and
    where each part starts with the data it was encoded from. Raises ValueError for an extra
    cache whose latents have another shape than this run's."""
    parts = [LatentCache.load(Path(config.out_dir) / "cache")]
    for extra, _ in extras:
        parts.append(LatentCache.load(extra))
        if (got := parts[-1].latents.shape[1:]) != (want := parts[0].latents.shape[1:]):
            raise ValueError(
                f"extra cache {extra} holds latents of shape {tuple(got)}, this run's "
                f"{tuple(want)}: only caches of the same clip size and length mix"
            )
    starts = itertools.accumulate((len(p.captions) for p in parts[:-1]), initial=0)
    data = [config.data, *(d for _, d in extras)]
    return LatentCache.concat(parts), list(zip(starts, data, strict=True))


def timed_lookup(sources: list[tuple[int, DataConfig]]) -> Callable[[int], Any]:
    """Merged clip index -> the timed captions of that clip in its own world (None for
    clips of a folder, and clips without a motion change)."""
    starts = [start for start, _ in sources]
    worlds = [ClipDataset(d) if d.kind == "synthetic" else None for _, d in sources]

    def timed(i: int) -> Any:
        part = bisect.bisect_right(starts, i) - 1
        world = worlds[part]
        return world.timed(i - starts[part]) if world is not None else None

    return timed


def position_batches(n: int, batch: int, seed: int, start: int) -> Iterator[list[int]]:
    """Endless batches of ``batch`` indices of range(n) in :class:`PositionSampler`'s order."""
    indices = iter(PositionSampler(n, seed, start))
    while True:
        yield [next(indices) for _ in range(batch)]


def cache_stream(
    cache: LatentCache, start: int, batch: int, seed: int,
    timed: Callable[[int], Any] | None = None,
) -> Iterator[Batch]:  # fmt: skip
    """Endless micro-batches {"latents": (B, z, F, h, w), "captions": [B]} from ``start``; with
    ``timed`` (clip index -> timed captions or None) also {"timed": [B]}."""
    groups = cache.groups()
    if groups is None:
        batches = position_batches(len(cache.captions), batch, seed, start)
    else:  # aspect-ratio buckets: each batch one size
        batches = iter(BucketBatches(groups, batch, seed, start))
    for idx in batches:
        out = {"latents": cache.batch(idx), "captions": [cache.captions[i] for i in idx]}
        yield out | ({"timed": [timed(i) for i in idx]} if timed is not None else {})


def cached_or_encoded(cache: LatentCache, encoder: Any) -> Callable[[list[str]], Tensor]:
    """Captions -> tokens (B, L, D): from the cache, or encoded for captions it lacks (timed
    captions)."""
    from kinema.models.text import CachedTextEncoder

    cached = CachedTextEncoder(encoder, maxsize=4096)

    def text(captions: list[str]) -> Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in cache.rows]
        if not missing:
            return cache.text(captions)
        new = dict(zip(missing, cached.encode(missing)[0].float().cpu(), strict=True))
        return torch.stack([new[c] if c in new else cache.text([c])[0] for c in captions])

    return text


def caption_context(
    config: TrainConfig, batch: Batch, captions: list[str], frames: int,
    text: Callable[[list[str]], Tensor], g: torch.Generator,
) -> Tensor:  # fmt: skip
    """The micro-batch's context tokens (B, L, D); or, when ``timed_captions`` picks a clip
    with a motion change, (B, F, L, D): each latent frame's tokens from the caption in force
    at its first pixel frame (other clips' repeated over their frames)."""
    if not config.timed_captions or "timed" not in batch:
        return text(captions)
    pick = (torch.rand(len(captions), generator=g) < config.timed_captions).tolist()
    chosen = [
        t if p and c else None for t, p, c in zip(batch["timed"], pick, captions, strict=True)
    ]
    if not any(chosen):
        return text(captions)
    temporal = (config.data.frames - 1) // max(1, frames - 1)
    flat: list[str] = []  # every caption the batch needs, encoded in one call
    rows: list[list[int]] = []  # per clip, per latent frame: its caption's row in ``flat``
    for caption, timed in zip(captions, chosen, strict=True):
        if timed is None:
            rows.append([len(flat)] * frames)
            flat.append(caption)
        else:
            which = latent_prompts([f for f, _ in timed], frames, temporal)
            rows.append([len(flat) + i for i in which])
            flat.extend(c for _, c in timed)
    return text(flat)[torch.tensor(rows)]  # (B, F, L, D)


# ---------------------------------------------------------------------------------------------
# The DiT step, samples, export
# ---------------------------------------------------------------------------------------------


def dit_loss_fn(
    config: TrainConfig,
    model: nn.Module,
    device: torch.device,
    text: Callable[[list[str]], Tensor],
    vae: nn.Module | None,
) -> LossFn:
    """The loss of one micro-batch of B clips; all randomness from the step's generator.

    Every process draws the randomness of the whole micro-batch, then trains on its rows
    (:func:`kinema.distributed.train.rank_slice`; all of them on one process), so N processes
    compute the gradient of one process on the same batch. A rank's loss is its share of the
    global mean times N (the gradient all-reduce averages): its squared errors summed over its
    free frames / the global count of free frames * N.
    """

    def loss_fn(batch: Batch, g: torch.Generator) -> Tensor:
        b, rows = len(batch["captions"]), dt.rank_slice(len(batch["captions"]))
        if "latents" in batch:
            x0 = batch["latents"][rows].to(device)  # (B/N, z, F, h, w)
        else:
            x0 = encode_clips(vae, batch["video"][rows], device)  # type: ignore[arg-type]
        captions = drop_captions(batch["captions"], config.caption_dropout, g)
        context = caption_context(config, batch, captions, x0.shape[2], text, g)[rows]
        noise = torch.randn((b, *x0.shape[1:]), generator=g)[rows].to(device)
        sigmas = sample_timesteps(b, g, config.logit_mean, config.logit_std, config.shift)
        mask = sample_cond_mask(b, x0.shape[2], config.cond_probs, g, config.cond_max_frames)
        free, mine = (~mask).sum().clamp(min=1), (~mask[rows]).sum().clamp(min=1)
        with autocast(config, device):
            loss = flow_matching_loss(model, x0, noise, sigmas[rows].to(device),
                                      context.to(device), mask[rows])  # fmt: skip
        return loss * (mine * dt.world()[1] / free).to(loss.device)

    return loss_fn


def sampling_defaults(config: TrainConfig) -> SamplingDefaults:
    """What the exported model recommends: ``config.sampling``, or :func:`base_sampling`."""
    return config.sampling if config.sampling is not None else base_sampling(config)


def write_samples(config: TrainConfig, run: Run, vae: nn.Module, text_encoder: Any) -> None:
    """Sample videos of the EMA weights into ``out_dir/samples/step-XXXXXXXX-i.mp4``."""
    from kinema.pipeline import Pipeline

    folder = Path(config.out_dir) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    defaults = dataclasses.replace(sampling_defaults(config), steps=config.sample_steps,
                                   guidance=config.sample_guidance, sampler="euler")  # fmt: skip
    run.model.eval()
    with run.ema.applied(run.model):
        pipe = Pipeline(run.model, vae, text_encoder, name=config.name, defaults=defaults)
        for i, prompt in enumerate(config.sample_prompts):
            pipe.generate(prompt, seed=i).save(folder / f"step-{run.progress.step:08d}-{i}.mp4")
    run.model.train()


def check_kind(config: TrainConfig, ckpt: Path | None) -> None:
    """Refuse resuming a LoRA run's checkpoint ``ckpt`` as a whole-DiT run, or the reverse."""
    holds_lora = ckpt is not None and (ckpt / "lora.safetensors").is_file()
    if ckpt is not None and holds_lora != (config.lora is not None):
        kinds = ("a LoRA run's", "the whole DiT") if holds_lora else ("a whole-DiT run's", "a LoRA")
        raise ValueError(f"out_dir {config.out_dir} holds {kinds[0]} checkpoints; this config "
                         f"trains {kinds[1]}: give another out_dir")  # fmt: skip


def build_dit(config: TrainConfig, ckpt: Path | None) -> nn.Module:
    """The DiT to train: from a checkpoint, from ``init_from``, or fresh from ``model``."""
    from kinema.io.checkpoint import load_dit
    from kinema.models.dit import VideoDiT

    check_kind(config, ckpt)
    if config.lora is not None:  # init_from's DiT, frozen, with the LoRA's factors to train
        from kinema.lora import add_lora, lora_state

        base = component_folder(str(config.init_from), "transformer")
        dit = add_lora(load_dit(base, dtype=torch.float32), config.lora)
        if ckpt is not None:
            state, want = load_file(str(ckpt / "lora.safetensors")), lora_state(dit)
            if set(state) != set(want) or any(state[k].shape != want[k].shape for k in want):
                ranks = sorted({min(v.shape) for k, v in state.items() if "lora_A" in k})
                raise ValueError(f"{ckpt} holds another LoRA (other layers or rank: rank "
                                 f"{'/'.join(map(str, ranks))} on {len(state) // 2} layers) than "
                                 f"lora: (rank {config.lora.rank} on {len(want) // 2}); give "
                                 "another out_dir")  # fmt: skip
            dit.load_state_dict(state, strict=False)
        return dit
    if ckpt is not None:
        return load_dit(ckpt / "model", dtype=torch.float32)
    if config.init_from is not None:
        return load_dit(component_folder(config.init_from, "transformer"), dtype=torch.float32)
    return VideoDiT(config.model)  # type: ignore[arg-type]


def dit_data(config: TrainConfig, run: Run, text_encoder: Any, vae: nn.Module) -> tuple[
    Iterator[Batch], Callable[[list[str]], Tensor]]:  # fmt: skip
    """The micro-batch stream from the run's data position, and captions -> tokens."""
    start, b = run.progress.samples_seen, run.config.batch_size
    seed = config.data.seed + config.seed
    if config.precompute:
        extras = check_extra_caches(config)  # before this run's clips take minutes to encode
        if dt.world()[0] == 0:  # one rank encodes; the others wait, then read the same cache
            precompute(config, vae=vae, text_encoder=text_encoder)
        dt.barrier()
        cache, sources = load_caches(config, extras)
        if not config.timed_captions:
            return cache_stream(cache, start, b, seed), cache.text
        timed = cache.timed.__getitem__ if cache.timed is not None else timed_lookup(sources)
        return cache_stream(cache, start, b, seed, timed), cached_or_encoded(cache, text_encoder)
    from kinema.models.text import CachedTextEncoder

    cached = CachedTextEncoder(text_encoder, maxsize=4096)
    stream = clip_stream(ClipDataset(config.data), start, b, seed, config.num_workers)
    return stream, lambda captions: cached.encode(captions)[0].float()


def parallel_strategy(config: TrainConfig) -> str:
    """ "none" for one process; under torchrun (WORLD_SIZE > 1) ``config.parallel``, "ddp" when
    that is "none"."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return "none"
    return "ddp" if config.parallel == "none" else config.parallel


def train_dit(
    config: TrainConfig, *, text_encoder: Any = None, stop_after: int | None = None
) -> Path:
    """Train (or resume) the DiT; returns the exported model folder (or ``out_dir`` when
    ``stop_after`` ended it early). Ctrl-C / SIGTERM save a checkpoint and exit 128 + signal.

    ``text_encoder``: an already loaded encoder to use instead of loading ``config``'s.
    Under ``torchrun --nproc-per-node N`` (WORLD_SIZE > 1) it joins the process group (NCCL on
    CUDA, gloo on the CPU), wraps the DiT per ``config.parallel`` and gives each rank 1/N of
    every micro-batch of ``batch_size`` clips; rank 0 alone logs, samples and exports.
    """
    strategy = parallel_strategy(config)
    if strategy == "none":
        return _train_dit(config, text_encoder, stop_after, strategy, None)
    from kinema.distributed.parallel import init_distributed

    joined = not torch.distributed.is_initialized()
    device = init_distributed("gloo" if config.device == "cpu" else None)
    try:
        return _train_dit(config, text_encoder, stop_after, strategy, device)
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def _train_dit(config: TrainConfig, text_encoder: Any, stop_after: int | None, strategy: str,
               device: torch.device | None) -> Path:  # fmt: skip
    if config.batch_size % dt.world()[1]:
        raise ValueError(f"batch_size {config.batch_size} must divide by the {dt.world()[1]} "
                         "processes (each takes an equal share of every micro-batch)")  # fmt: skip
    out, main = Path(config.out_dir), dt.world()[0] == 0
    check_kind(config, latest_checkpoint(out))  # by name, before its export folder's files
    check_run_folders(out, export_folder(config), None if config.lora else MODEL_ENTRIES,
                      config.data)  # fmt: skip
    fresh = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        run = start_run(config, lambda ckpt: build_dit(config, ckpt), strategy, device)
        run.model.gradient_checkpointing = config.gradient_checkpointing
        vae = load_frozen_vae(vae_source(config), run.device)
        text_encoder = text_encoder or load_text(config, run.device)
        stream, text = dit_data(config, run, text_encoder, vae)
    except BaseException:
        if fresh and main and not any(out.iterdir()):  # a bad init_from or lora: no empty
            out.rmdir()  # out_dir left behind
        raise
    if main:  # once the run and its data are known to work with this config
        record_config(out, config, run.progress.step)
    loss_fn = dit_loss_fn(config, run.net or run.model, run.device, text, vae)

    def on_step(step: int) -> None:
        if config.sample_every and config.sample_prompts and step % config.sample_every == 0:
            sampler = sample_run(run)
            if sampler is not None:
                write_samples(config, sampler, vae, text_encoder)

    stopped = train_loop(run, stream, loss_fn, on_step, stop_after)
    exit_on_signal(stopped, out)
    if run.progress.step < config.max_steps:
        return out
    dest = export(out, config.export_dir) if main else None
    dt.barrier()
    return dest or export_folder(config)


def export_folder(config: TrainConfig) -> Path:
    """Where a run exports its model: ``export_dir``, else ``out_dir/model``."""
    return Path(config.export_dir or Path(config.out_dir) / "model")


def sample_run(run: Run) -> Run | None:
    """The run rank 0 samples from (None on other ranks): the run itself, or for a sharded
    (FSDP) model a plain copy with the gathered weights and EMA (every rank must call it)."""
    if not dt.is_sharded(run.model):
        return run if dt.world()[0] == 0 else None
    weights = dt.full_state_dict(run.model)
    shadow = {k: dt.full_tensor(v).detach() for k, v in run.ema.shadow.items()}
    if dt.world()[0] != 0:
        return None
    from kinema.models.dit import VideoDiT

    plain = VideoDiT(run.model.config)
    plain.load_state_dict(weights)
    ema = EMA(plain.to(run.device), 0.0)
    ema.shadow = shadow
    return dataclasses.replace(run, model=plain, ema=ema, net=None)


def fp16_is_lossless(module: nn.Module, tolerance: float = 1e-3) -> bool:
    """True when every float tensor survives a float16 round trip within ``tolerance``
    relative (L2) error and without overflow."""
    for t in module.state_dict().values():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        back = t.float().half().float()
        if not torch.isfinite(back).all():
            return False
        if (back - t.float()).norm() > tolerance * t.float().norm().clamp(min=1e-12):
            return False
    return True


def export(out_dir: str | Path, dest: str | Path | None = None) -> Path:
    """Write the newest checkpoint's EMA weights as a kinema model folder (kinema.json +
    transformer/ + vae/); float16 when lossless enough, else float32. A LoRA run writes its
    factors as ``lora.safetensors`` there instead. Returns the folder."""
    from kinema.io.checkpoint import save_model_folder

    out = Path(out_dir)
    config = parse_config(TrainConfig, json.loads((out / "train_config.json").read_text()))
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise ValueError(f"{out} holds no checkpoint to export")
    dit = build_dit(config, ckpt)  # the checkpoint's weights (a LoRA: init_from's + factors)
    ema = EMA(dit, 0.0)
    load_ema(ckpt, ema)
    ema.copy_to(dit)
    dest = Path(dest) if dest is not None else out / "model"
    check_run_folders(out, dest, None if config.lora else MODEL_ENTRIES)
    if config.lora is not None:
        from kinema.lora import save_lora

        path = save_lora(dit, dest / "lora.safetensors", base=str(config.init_from))
        print(f"exported {path} ({path.stat().st_size / 2**20:.1f} MB)")
        return dest
    shipped = component_folder(config.export_vae, "vae") if config.export_vae else None
    vae = load_frozen_vae(shipped or vae_source(config), torch.device("cpu"))
    dtype = torch.float16 if fp16_is_lossless(dit) and fp16_is_lossless(vae) else None
    text = {"kind": config.text_encoder, "max_length": config.text_max_length}
    sampling = sampling_defaults(config)
    from kinema.data.synthetic import vocabulary

    words = vocabulary() if config.data.kind == "synthetic" else None  # a closed world's words
    save_model_folder(
        dest, dit=dit, vae=vae, text_encoder=text, sampling=sampling, name=config.name,
        dtype=dtype, vocabulary=words,
    )  # fmt: skip
    kind = "float16" if dtype else "float32"
    print(f"exported {dest} ({kind}, {folder_size_mb(dest):.1f} MB)")
    return dest
