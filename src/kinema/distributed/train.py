"""Training on N processes: DDP or FSDP2 wrapping, gradient accumulation that synchronises once
per optimiser step, and sharded checkpoints that load with another number of processes.

Run under ``torchrun --nproc-per-node N``: each rank takes its slice of the global batch
(:func:`rank_slice`); DDP averages gradients, FSDP2 (``fully_shard``) also shards parameters,
gradients and optimiser state (Zhao et al. 2023, PyTorch FSDP). Checkpoints are
``torch.distributed.checkpoint`` folders keyed by the plain model's parameter names, so a
folder written by 8 ranks loads on 1 or 2 (DCP reshards on load).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

STRATEGIES = ("none", "ddp", "fsdp")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def rank_slice(batch_size: int) -> slice:
    """This rank's rows of a global batch of ``batch_size`` (must divide by the world size)."""
    rank, size = world()
    if batch_size % size:
        raise ValueError(f"global batch {batch_size} is not divisible by {size} processes")
    per = batch_size // size
    return slice(rank * per, (rank + 1) * per)


def wrap_model(model: nn.Module, strategy: str, device: torch.device | None = None) -> nn.Module:
    """``model`` for data-parallel training: "none", "ddp" or "fsdp" (FSDP2, per block)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if strategy == "none" or world()[1] == 1 and strategy == "ddp":
        return model
    if strategy == "ddp":
        ids = [device.index] if device is not None and device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return shard_model(model, device)


def shard_model(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """FSDP2: every transformer block is its own shard unit, the rest is the root unit.

    Parameters become DTensors sharded on dim 0 over all ranks; the module is changed in place.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    kind = device.type if device is not None else "cpu"
    mesh = init_device_mesh(kind, (world()[1],))
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter inside (for all but the last
    micro-batch of an accumulated step); a no-op for a plain model or ``enabled=True``."""
    if enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def mean_over_ranks(value: Tensor) -> Tensor:
    """The mean of a scalar over all ranks (a copy; ``value`` itself is untouched)."""
    out = value.detach().clone().double()
    if world()[1] > 1:
        dist.all_reduce(out)  # sum (gloo has no AVG)
        out /= world()[1]
    return out


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Any],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    grad_clip: float | None = None,
) -> float:
    """One optimiser step over ``micro_batches`` (this rank's share of the global batch).

    ``loss_fn(model, batch)`` returns the mean loss of a micro-batch; gradients are accumulated
    as the mean over micro-batches and synchronised once, on the last. Returns the loss
    averaged over micro-batches and ranks.
    """
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for i, batch in enumerate(micro_batches):
        with gradient_sync(model, enabled=i == len(micro_batches) - 1):
            loss = loss_fn(model, batch) / len(micro_batches)
            loss.backward()
        total += loss.detach().float().cpu()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(mean_over_ranks(total))


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints
# ---------------------------------------------------------------------------------------------


def save_sharded(
    folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int
) -> Path:
    """Every rank writes its shards of model (and optimiser) state to ``folder``; rank 0 adds
    ``progress.json``. Keys are the unwrapped model's names (no ``module.`` prefix)."""
    folder = Path(folder)
    model_sd, optim_sd = get_state_dict(model, [optimizer] if optimizer is not None else [])
    state = {"model": model_sd, **({"optimizer": optim_sd} if optimizer is not None else {})}
    dcp.save(state, checkpoint_id=str(folder))
    if world()[0] == 0:
        (folder / "progress.json").write_text(json.dumps({"step": step}) + "\n")
    if dist.is_initialized():
        dist.barrier()
    return folder


def load_sharded(
    folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> int:
    """Load a :func:`save_sharded` folder into ``model`` (and ``optimizer``), whatever the
    number of ranks that wrote it and however ``model`` is wrapped now; returns the step."""
    folder = Path(folder)
    if not (folder / "progress.json").exists():
        raise ValueError(f"{folder} is not a sharded checkpoint (no progress.json)")
    optims = [optimizer] if optimizer is not None else []
    model_sd, optim_sd = get_state_dict(model, optims)
    state = {"model": model_sd, **({"optimizer": optim_sd} if optimizer is not None else {})}
    dcp.load(state, checkpoint_id=str(folder))
    opts = StateDictOptions(strict=True)
    set_state_dict(model, optims, model_state_dict=state["model"],
                   optim_state_dict=state.get("optimizer", {}), options=opts)  # fmt: skip
    return int(json.loads((folder / "progress.json").read_text())["step"])


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole (unsharded) model state on the CPU, on every rank, for export."""
    model_sd, _ = get_state_dict(model, [], options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().cpu() for k, v in model_sd.items()}


# ---------------------------------------------------------------------------------------------
# Pieces for the training loop (kinema.train.loop) on N processes
# ---------------------------------------------------------------------------------------------


def is_sharded(model: nn.Module) -> bool:
    """True when ``model``'s parameters are DTensors (an FSDP2 module)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` laid out like ``like``: the same DTensor sharding, or as is for a plain tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full.to(like.device)
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements)


def clip_grad_norm(params: Sequence[Tensor], max_norm: float) -> float:
    """Clip the global gradient norm to ``max_norm`` (sharded gradients included); returns the
    norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(full_tensor(norm))


def any_rank(flag: int | None) -> int | None:
    """The largest ``flag`` over all ranks (None where no rank has one): a stop signal seen by
    one rank stops every rank after the same step."""
    if world()[1] == 1:
        return flag
    value = torch.tensor([-1 if flag is None else flag], dtype=torch.int64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return None if int(value) < 0 else int(value)


def barrier() -> None:
    """Wait for every rank (a no-op outside a process group)."""
    if world()[1] > 1:
        dist.barrier()


def save_optimizer_sharded(
    folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Every rank writes its shard of the optimiser state (keyed by parameter names) to the DCP
    folder ``folder``; it loads with any number of ranks (:func:`load_optimizer_sharded`)."""
    _, optim_sd = get_state_dict(model, [optimizer])
    dcp.save({"optimizer": optim_sd}, checkpoint_id=str(folder))


def load_optimizer_sharded(
    folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Load :func:`save_optimizer_sharded`'s folder into ``optimizer`` (plain, DDP or FSDP)."""
    _, optim_sd = get_state_dict(model, [optimizer])
    state = {"optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, [optimizer], model_state_dict={}, optim_state_dict=state["optimizer"])


def load_full_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, full: dict[str, Any]
) -> None:
    """Load a plain ``optimizer.state_dict()`` (of a one-process run, parameters by index)
    into ``optimizer`` of a sharded ``model`` (same parameter order, now DTensors)."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in full["param_groups"]]
    state = {order[i]: s for i, s in full["state"].items()}
    full_sd = {"state": state, "param_groups": groups}
    opts = StateDictOptions(full_state_dict=True)
    set_state_dict(model, [optimizer], model_state_dict={}, optim_state_dict=full_sd, options=opts)
