"""One video on N processes: the same :class:`~kinema.pipeline.Pipeline`, with its DiT run
sequence- and CFG-parallel, its text encoded on rank 0 and broadcast, and (with a tile size)
its VAE decode split by tiles over the ranks.

Every rank runs the sampler on the full latent (it is small); only the DiT forward is split,
so every rank makes the same video and rank 0 writes it, window by window as it comes. Launch with
``torchrun --nproc-per-node N -m kinema generate ...`` or ``kinema generate --devices N``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

from kinema.distributed.parallel import (
    BroadcastTextEncoder,
    Mesh,
    ParallelDiT,
    SplitDecodeVAE,
    build_mesh,
    init_distributed,
    plan_parallel,
)
from kinema.pipeline import Pipeline, Progress, Request, SavedVideo, Video


def parallel_pipeline(pipe: Pipeline, mesh: Mesh, decode_tile: Any = None) -> Pipeline:
    """``pipe`` with a :class:`ParallelDiT`, a rank-0 text encoder and (given a ``TileSpec``)
    a split VAE decode. Rank 0 keeps the text encoder; the other ranks drop theirs."""
    text = BroadcastTextEncoder(pipe.text_encoder if mesh.rank == 0 else None, pipe.device)
    vae = SplitDecodeVAE(pipe.vae, decode_tile) if decode_tile is not None else pipe.vae
    return Pipeline(
        ParallelDiT(pipe.dit, mesh), vae, text,
        name=pipe.name, defaults=pipe.defaults, load_seconds=pipe.load_seconds,
        image_encoder=pipe.image_encoder,
    )  # fmt: skip


def load_parallel(
    model: str | Path | None = None,
    *,
    mode: str = "auto",
    cfg_parallel: bool = True,
    dtype: str | None = None,
    decode_tile: Any = None,
    backend: str | None = None,
) -> tuple[Pipeline, Mesh]:
    """Join the torchrun process group, load the model on this rank's device and wrap it.

    ``mode``: "auto", "ulysses" or "ring" (see :func:`plan_parallel`); ``cfg_parallel`` puts
    the conditional and unconditional branches on two halves of the world (even worlds).
    """
    from kinema.loading import load

    device = init_distributed(backend)
    pipe = load(model, device=device, dtype=dtype)
    world, heads = dist.get_world_size(), pipe.dit.config.num_heads
    mesh = build_mesh(plan_parallel(world, heads, cfg_parallel, mode))
    return parallel_pipeline(pipe, mesh, decode_tile), mesh


def generate(
    pipe: Pipeline, mesh: Mesh, request: Request, output: str | Path | None = None,
    progress: Progress | None = None,
) -> Video | SavedVideo:  # fmt: skip
    """Run ``request`` on every rank. With ``output``, rank 0 writes each window's frames to
    it as they come (:meth:`Pipeline.save`) and the other ranks let theirs go, so no rank holds
    the whole clip; every rank returns a :class:`SavedVideo`. Without, every rank returns the
    :class:`Video`."""
    parallel = {"parallel": {"world": mesh.config.world, **mesh.config.__dict__}}
    if output is None:
        shown = progress if mesh.rank == 0 else None
        result: Video | SavedVideo = pipe.run(request, progress=shown)
        result.info.update(parallel)
    elif mesh.rank == 0:
        result = pipe.save(request, output, progress=progress, info=parallel)
    else:
        stream = pipe.stream(request)
        for _ in stream:  # the same collectives as rank 0; the frames are rank 0's to write
            pass
        result = SavedVideo(Path(output), stream.made, stream.fps, {**stream.info(), **parallel})
    dist.barrier()
    return result
