"""Training checkpoints that resume exactly.

A checkpoint is a folder ``out_dir/checkpoints/step-00001200/``:

    model/            kinema component folder (config.json + model.safetensors), float32
    ema.safetensors   the EMA shadow weights
    optimizer.pt      optimiser state + torch / numpy / python RNG states (weights_only-safe)
    state.json        step, samples seen, EMA update count, learning rate

It is written into a hidden temporary folder and renamed into place, so a kill at any moment
leaves either the previous checkpoint or the new one, never half of one. The learning rate is a
pure function of the step and each step's randomness is a function of (seed, step), so model +
optimiser + EMA + step + data position is the whole state of a run.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from kinema.data.folder import epoch_generator, group_batches
from kinema.io.checkpoint import save_component, save_tensors
from kinema.io.paths import usual_modes
from kinema.train.ema import EMA

STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass(frozen=True)
class Progress:
    """Where a run stands: optimiser steps done and clips consumed (the data position)."""

    step: int = 0
    samples_seen: int = 0


def rng_state() -> dict[str, Any]:
    """torch, numpy and python global RNG states, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(out_dir) / "checkpoints"
    found = [p for p in root.glob("step-*") if STEP_DIR.match(p.name) and p.is_dir()]
    return sorted(f for f in found if (f / "state.json").exists())


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = checkpoints(out_dir)
    return found[-1] if found else None


def save_checkpoint(
    out_dir: str | Path,
    progress: Progress,
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    keep: int = 2,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/checkpoints/step-XXXXXXXX`` atomically; keep the newest ``keep``."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{progress.step:08d}"
    if final.exists():  # this exact state is already on disk
        return final
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        if getattr(model, "lora_config", None) is not None:  # the frozen base is init_from's
            from kinema.lora import lora_state

            lora = {k: v.detach().contiguous().cpu() for k, v in lora_state(model).items()}
            save_tensors(lora, tmp / "lora.safetensors")
        else:
            save_component(model, tmp / "model")
        save_tensors({k: v.contiguous() for k, v in ema.shadow.items()}, tmp / "ema.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / "optimizer.pt")
        write_state(tmp, progress, ema, extra)
        usual_modes(tmp)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(out_dir, keep)
    return final


def save_checkpoint_parallel(
    out_dir: str | Path,
    progress: Progress,
    model: nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    keep: int = 2,
) -> Path:
    """:func:`save_checkpoint` from every rank of a data-parallel run; it loads with any number
    of processes. DDP (replicated state): rank 0 writes the one-process checkpoint. FSDP: the
    model and EMA are gathered into the usual ``model/`` and ``ema.safetensors`` (for export),
    the optimiser state is written sharded by every rank into the DCP folder ``optimizer/``,
    the RNG states go to ``rng.pt``. Collective: every rank calls it."""
    from kinema.distributed import train as dt

    rank = dt.world()[0]
    root = Path(out_dir) / "checkpoints"
    final, tmp = root / f"step-{progress.step:08d}", root / f".tmp-step-{progress.step:08d}"
    if not dt.is_sharded(model):
        if rank == 0:
            save_checkpoint(out_dir, progress, model, ema, optimizer, keep)
        dt.barrier()
        return final
    if final.exists():
        return final
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dt.barrier()
    dt.save_optimizer_sharded(tmp / "optimizer", model, optimizer)
    weights = dt.full_state_dict(model)
    shadow = {k: dt.full_tensor(v).detach().cpu().contiguous() for k, v in ema.shadow.items()}
    if rank == 0:
        _write_full(tmp, progress, model, weights, shadow, ema)
        usual_modes(tmp)
        tmp.rename(final)
        prune(out_dir, keep)
    dt.barrier()
    return final


def _write_full(tmp: Path, progress: Progress, model: nn.Module, weights: dict[str, torch.Tensor],
                shadow: dict[str, torch.Tensor], ema: EMA) -> None:  # fmt: skip
    """Rank 0's part of an FSDP checkpoint: model folder, EMA, RNG and state.json."""
    from kinema.configs import save_json

    (tmp / "model").mkdir()
    state = {k: v.contiguous() for k, v in weights.items()}
    save_tensors(state, tmp / "model" / "model.safetensors")
    save_json(model.config, tmp / "model" / "config.json", _class=_plain_class(model).__name__)
    save_tensors(shadow, tmp / "ema.safetensors")
    torch.save({"rng": rng_state()}, tmp / "rng.pt")
    write_state(tmp, progress, ema)


def write_state(folder: Path, progress: Progress, ema: EMA, extra: dict[str, Any] | None = None
                ) -> None:  # fmt: skip
    """``folder/state.json``: the data position and the EMA's counters (and ``extra``)."""
    meta = {"step": progress.step, "samples_seen": progress.samples_seen,
            "ema": {"decay": ema.decay, "warmup": ema.warmup, "updates": ema.updates},
            **(extra or {})}  # fmt: skip
    (folder / "state.json").write_text(json.dumps(meta, indent=2) + "\n")


def _plain_class(model: nn.Module) -> type:
    """The model's own class under FSDP2's wrapper class (``FSDPVideoDiT`` -> ``VideoDiT``)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return type(model)
    return next(c for c in type(model).__mro__[1:] if not issubclass(c, FSDPModule))


def prune(out_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints and any leftover temporary folders."""
    root = Path(out_dir) / "checkpoints"
    for old in checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "state.json").read_text())


def load_ema(folder: Path, ema: EMA) -> None:
    """Put a checkpoint's EMA weights and update count into ``ema``."""
    meta = read_state(folder)["ema"]
    ema.load_state_dict({**meta, "shadow": load_file(str(folder / "ema.safetensors"))})


def load_training_state(
    folder: Path,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    model: nn.Module | None = None,
) -> Progress:
    """Restore EMA, optimiser and RNG states from a checkpoint; returns its progress.

    The model weights are loaded by the caller (from ``folder / "model"``) before the optimiser
    is built, so the optimiser's parameters are the loaded ones. ``model`` (needed for a
    sharded optimiser folder or an FSDP model) is the module the optimiser updates: the EMA
    and optimiser state are then laid out like its parameters, whatever wrote the checkpoint.
    """
    from kinema.distributed import train as dt

    load_ema(folder, ema)
    params = dict(model.named_parameters()) if model is not None else {}
    for name, value in ema.shadow.items():
        value = value.to(device)
        ema.shadow[name] = dt.shard_like(value, params[name].detach()) if name in params else value
    rng_file = folder / ("optimizer.pt" if (folder / "optimizer.pt").exists() else "rng.pt")
    blob = torch.load(rng_file, map_location=device, weights_only=True)
    if (folder / "optimizer").is_dir():
        dt.load_optimizer_sharded(folder / "optimizer", _need(model), optimizer)
    elif model is not None and dt.is_sharded(model):
        dt.load_full_optimizer(model, optimizer, blob["optimizer"])
    else:
        optimizer.load_state_dict(blob["optimizer"])
    set_rng_state({k: _cpu(v) for k, v in blob["rng"].items()})  # CUDA's states too
    meta = read_state(folder)
    return Progress(step=int(meta["step"]), samples_seen=int(meta["samples_seen"]))


def _need(model: nn.Module | None) -> nn.Module:
    if model is None:
        raise ValueError("a sharded optimiser checkpoint needs the model to load into")
    return model


def _cpu(value: Any) -> Any:
    """RNG states must be CPU byte tensors even when loaded with a CUDA map_location."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, tuple | list):
        return type(value)(_cpu(v) for v in value)
    return value


def folder_size_mb(folder: Path) -> float:
    """Total size of the files under ``folder`` in MB."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


# ---------------------------------------------------------------------------------------------
# Everything else is a function of the step
# ---------------------------------------------------------------------------------------------


def lr_at(step: int, lr: float, warmup: int, max_steps: int, schedule: str, floor: float) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up from lr/warmup to lr,
    then constant, or cosine from lr down to ``floor * lr`` at ``max_steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    frac = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one optimiser step: noise, sigmas, masks, dropout and crops."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)


def index_at(position: int, n: int, seed: int) -> int:
    """Clip index at data position ``position``: epoch e = position // n walks a permutation
    of range(n) drawn from (seed, e), so the data order is a pure function of the position."""
    epoch, offset = divmod(position, n)
    order = torch.randperm(n, generator=epoch_generator(seed, epoch))
    return int(order[offset])


class PositionSampler(torch.utils.data.Sampler):
    """Endless clip indices from data position ``start`` on (see :func:`index_at`); with
    ``with_epoch`` it yields ``(index, epoch)`` pairs for datasets whose clips vary by epoch."""

    def __init__(self, n: int, seed: int, start: int = 0, with_epoch: bool = False) -> None:
        self.n, self.seed, self.start, self.with_epoch = n, seed, start, with_epoch

    def __iter__(self) -> Iterator[Any]:
        position = self.start
        while True:
            epoch, offset = divmod(position, self.n)
            order = torch.randperm(self.n, generator=epoch_generator(self.seed, epoch))
            order = order[offset:].tolist()
            yield from ((i, epoch) for i in order) if self.with_epoch else order
            position = (epoch + 1) * self.n


class BucketBatches(torch.utils.data.Sampler):
    """Endless micro-batches of ``batch`` clip indices that share a group (clips of one size:
    an aspect-ratio bucket), from data position ``start`` (counted in clips, as
    :class:`PositionSampler`'s). Each epoch shuffles every group by (seed, epoch), cuts it into
    batches (a group's last batch topped up from the group's start, so every batch is full)
    and shuffles the batches of all groups together: the order is a pure function of the
    position, so a run resumes exactly. With ``with_epoch`` it yields (index, epoch) pairs."""

    def __init__(
        self, groups: list[list[int]], batch: int, seed: int, start: int = 0,
        with_epoch: bool = False,
    ) -> None:  # fmt: skip
        self.groups, self.batch, self.seed = [list(g) for g in groups if g], batch, seed
        self.start, self.with_epoch = start, with_epoch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches of one epoch, in order."""
        return group_batches(self.groups, self.batch, epoch_generator(self.seed, epoch), "top_up")

    def __iter__(self) -> Iterator[list[Any]]:
        per_epoch = sum(-(-len(group) // self.batch) for group in self.groups)
        epoch, offset = divmod(self.start // self.batch, per_epoch)
        while True:
            for indices in self.epoch_batches(epoch)[offset:]:
                yield [(i, epoch) for i in indices] if self.with_epoch else indices
            epoch, offset = epoch + 1, 0
