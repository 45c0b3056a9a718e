"""Scale-out on the CPU with gloo: sequence-parallel (Ulysses, ring, both), CFG-parallel and
split-decode generation equal the one-process result; DDP / FSDP2 steps equal a one-process
step on the same global batch; a checkpoint written by 2 processes loads in 1.

Each world size is spawned once (a module fixture); every rank records one number per case
(the largest difference from its own one-process reference), and the tests read them.
"""

from __future__ import annotations

import json
import os
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kinema.configs import DiTConfig, SamplingDefaults, VAEConfig
from kinema.distributed.parallel import (
    ParallelConfig,
    ParallelDiT,
    Shard,
    SplitDecodeVAE,
    attention_lse,
    build_mesh,
    make_shard,
    merge_lse,
    mesh_ranks,
    plan_parallel,
    split_tiled_decode,
)
from kinema.io.video import read_video
from kinema.models.dit import VideoDiT
from kinema.models.ops import sdpa_attention

TOL = 1e-4

# ---------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------


def test_plan_parallel_wan_shapes() -> None:
    assert plan_parallel(8, 12, cfg_parallel=False) == ParallelConfig(1, ulysses=4, ring=2)
    assert plan_parallel(8, 12) == ParallelConfig(cfg=2, ulysses=4, ring=1)
    assert plan_parallel(8, 40, cfg_parallel=False) == ParallelConfig(1, ulysses=8, ring=1)
    assert plan_parallel(3, 4) == ParallelConfig(1, ulysses=1, ring=3)
    with pytest.raises(ValueError, match="divisible"):
        plan_parallel(8, 12, cfg_parallel=False, mode="ulysses")
    with pytest.raises(ValueError, match="valid: auto"):
        plan_parallel(2, 4, mode="tensor")


def test_mesh_ranks_cover_the_world_once_per_axis() -> None:
    groups = mesh_ranks(ParallelConfig(cfg=2, ulysses=2, ring=2))
    assert groups["ulysses"][:2] == [[0, 1], [2, 3]]
    assert groups["ring"][:2] == [[0, 2], [1, 3]]
    assert groups["cfg"][0] == [0, 4]
    for kind in ("cfg", "sp", "ulysses", "ring"):
        assert sorted(r for g in groups[kind] for r in g) == list(range(8))


def test_lse_merge_of_key_blocks_equals_full_attention() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, 3, 8, generator=g) for _ in range(3))
    acc = None
    for lo, hi in ((0, 3), (3, 5), (5, 7)):
        acc = merge_lse(acc, attention_lse(q, k[:, lo:hi], v[:, lo:hi]))
    torch.testing.assert_close(acc[0], sdpa_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_shard_padding_and_groups() -> None:
    shard = make_shard(10, 3, 2, avoid=[4])  # length 4 is a context length: bumped to 5
    assert (shard.start, shard.length) == (10, 5)
    x = torch.arange(10.0)[None, :, None]
    assert make_shard(10, 3, 2).take(x).flatten().tolist() == [8.0, 9.0, 0.0, 0.0]
    mod = torch.arange(5.0)[None, :, None]  # 5 groups of 2 tokens
    assert Shard(10, 2, 1, 5).groups(mod, 2).flatten().tolist() == [2, 3, 3, 4, 4]
    assert Shard(10, 5, 1, 2).groups(mod, 2).flatten().tolist() == [1.0]
    assert make_shard(18, 4, 3, align=6).length == 6  # whole frames; rank 3 is all padding
    assert make_shard(18, 2, 0, avoid=[12], align=6).length == 18


# ---------------------------------------------------------------------------------------------
# Spawned worlds
# ---------------------------------------------------------------------------------------------


def tiny_dit(heads: int) -> VideoDiT:
    torch.manual_seed(0)
    config = DiTConfig(num_heads=heads, head_dim=8, text_dim=32, freq_dim=16, ffn_dim=32,
                       num_layers=2, in_channels=4, out_channels=4)  # fmt: skip
    return VideoDiT(config).eval()


def dit_case(
    heads: int, mode: str, cfg: bool, per_frame: bool, timed: bool = False
) -> Callable[[dict], float]:
    """Max |parallel - single| of the DiT's velocity on a CFG-sized batch of 2 (``timed``: a
    text context per latent frame; 3 frames of 6 tokens)."""

    def run(env: dict) -> float:
        model = tiny_dit(heads)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, 3, 4, 6, generator=g)
        ctx = torch.randn(2, *((3,) if timed else ()), 7, 32, generator=g)
        t = torch.rand(2, 3, generator=g) * 1000 if per_frame else torch.tensor([500.0, 300.0])
        mesh = build_mesh(plan_parallel(dist.get_world_size(), heads, cfg, mode))
        with torch.no_grad():
            return float((ParallelDiT(model, mesh)(x, t, ctx) - model(x, t, ctx)).abs().max())

    return run


def float_video(pipe, request) -> torch.Tensor:  # noqa: ANN001
    """The pipeline's decoded video (1, 3, T, H, W) in float, before uint8 rounding."""
    from kinema.pipeline import Steps, initial_noise
    from kinema.sampling import flow_schedule

    req, _, _ = pipe.prepare(request)
    contexts = pipe.encode_text(req)
    noise = initial_noise(req.seed, pipe.latent_shape(req))
    schedule = flow_schedule(req.steps, req.shift, req.sampler)
    latents, _ = pipe.denoise(req, noise, schedule, contexts, None, Steps(None, 0))
    with torch.no_grad():  # the exact decode: the pipeline's fp16 cache would round 1e-6 apart
        return pipe.vae.decode(pipe.vae.denormalize(latents))  # inputs to ~1e-4 apart outputs


def pipeline_case(mode: str, cfg: bool) -> Callable[[dict], float]:
    """Whole-pipeline generation: float video difference; rank 0 writes the file."""

    def run(env: dict) -> float:
        from kinema.distributed.generate import generate, parallel_pipeline
        from kinema.loading import load
        from kinema.pipeline import Request

        pipe = load(env["model"], device="cpu", dtype="fp32")
        heads = pipe.dit.config.num_heads
        mesh = build_mesh(plan_parallel(dist.get_world_size(), heads, cfg, mode))
        request = Request("a red ball rolls", negative_prompt="blur", seed=3)
        ref = float_video(pipe, request)
        ppipe = parallel_pipeline(pipe, mesh)
        out = Path(env["dir"]) / f"pipe-{mode}-{cfg}"  # a folder of PNGs: lossless
        video = generate(ppipe, mesh, request)  # in memory on every rank
        assert video.frames.shape == (5, 32, 32, 3)
        assert video.info["parallel"]["world"] == dist.get_world_size()
        saved = generate(ppipe, mesh, request, out)  # rank 0 writes it as the windows come
        assert saved.frames == 5 and saved.info["parallel"] == video.info["parallel"]
        if mesh.rank == 0:
            written = json.loads(saved.path.with_suffix(".json").read_text())
            assert written["parallel"] == video.info["parallel"]
            assert np.array_equal(read_video(saved.path)[0], video.frames)
        return float((float_video(ppipe, request) - ref).abs().max())

    return run


def split_decode_case(env: dict) -> float:
    from kinema.models.vae import CausalVAE, TileSpec

    torch.manual_seed(0)
    vae = CausalVAE(VAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1, z_dim=16))
    z = torch.randn(1, 16, 2, 5, 6, generator=torch.Generator().manual_seed(2))
    tile = TileSpec(size=24, overlap=8)
    lean = torch.float16  # what the pipeline decodes with (through SplitDecodeVAE.decode)
    with torch.no_grad():
        exact = (split_tiled_decode(vae, z, tile) - vae.decode(z, tile)).abs().max()
        split = SplitDecodeVAE(vae, tile).decode(z, cache_dtype=lean)
        return float(max(exact, (split - vae.decode(z, tile, cache_dtype=lean)).abs().max()))


def train_case(strategy: str) -> Callable[[dict], float]:
    """Max difference of loss and updated weights between a 2-rank step (2 micro-batches per
    rank) and a 1-process step on the whole global batch of 4; fsdp also saves a checkpoint."""

    def run(env: dict) -> float:
        from kinema.distributed import train as dt

        batch = train_batch()
        ref_model = tiny_train_dit()
        ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
        ref_loss = float(dt.train_step(ref_model, ref_opt, [batch], flow_loss))  # no collectives
        model = dt.wrap_model(tiny_train_dit(), strategy)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        mine = [t[dt.rank_slice(4)] for t in batch]
        micro = [[t[i : i + 1] for t in mine] for i in range(2)]
        loss = dt.train_step(model, opt, micro, flow_loss)
        full = dt.full_state_dict(model)
        err = max(float((full[k] - v).abs().max()) for k, v in ref_model.state_dict().items())
        if strategy == "fsdp":
            dt.save_sharded(Path(env["dir"]) / "ckpt", model, opt, step=1)
            if dist.get_rank() == 0:
                torch.save(full, Path(env["dir"]) / "full.pt")
        return max(err, abs(loss - ref_loss))

    return run


def tiny_train_dit() -> VideoDiT:
    torch.manual_seed(0)
    return VideoDiT(DiTConfig(num_heads=2, head_dim=8, text_dim=16, freq_dim=16, ffn_dim=32,
                              num_layers=2, in_channels=4, out_channels=4))  # fmt: skip


def train_batch() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (4, 4, 2, 4, 4)
    return [torch.randn(shape, generator=g), torch.randn(shape, generator=g),
            torch.rand(4, generator=g), torch.randn(4, 5, 16, generator=g)]  # fmt: skip


def flow_loss(model: torch.nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    from kinema.train.loss import flow_matching_loss

    x0, noise, sigmas, context = batch
    return flow_matching_loss(model, x0, noise, sigmas, context)


CASES: dict[int, dict[str, Callable[[dict], float]]] = {
    2: {
        "ulysses": dit_case(6, "ulysses", cfg=False, per_frame=True),
        "ring": dit_case(4, "ring", cfg=False, per_frame=False),
        "ring_timed": dit_case(4, "ring", cfg=False, per_frame=False, timed=True),
        "cfg": dit_case(6, "auto", cfg=True, per_frame=True),
        "pipeline_cfg": pipeline_case("auto", cfg=True),
        "split_decode": split_decode_case,
        "ddp": train_case("ddp"),
        "fsdp": train_case("fsdp"),
    },
    3: {
        "ulysses": dit_case(6, "ulysses", cfg=False, per_frame=True),
        "ring": dit_case(4, "auto", cfg=False, per_frame=True),
        "pipeline_ring": pipeline_case("ring", cfg=False),
    },
    4: {
        "ulysses_x_ring": dit_case(2, "auto", cfg=False, per_frame=True),
        "timed_padding_rank": dit_case(2, "auto", cfg=False, per_frame=True, timed=True),
    },
}


def worker(rank: int, world: int, port: int, env: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results: dict[str, float | str] = {}
    for name, case in CASES[world].items():
        try:
            results[name] = case(env)
        except Exception:  # recorded, so each test names its own failure
            results[name] = traceback.format_exc()
    Path(env["dir"], f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kinema.io.checkpoint import save_model_folder
    from kinema.models.vae import CausalVAE

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    dit = VideoDiT(DiTConfig(num_heads=6, head_dim=8, text_dim=384, freq_dim=16, ffn_dim=32,
                             num_layers=2))  # fmt: skip
    vae = CausalVAE(VAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1, z_dim=16))
    sampling = SamplingDefaults(width=32, height=32, frames=5, fps=8, steps=2, guidance=3.0)
    return save_model_folder(folder, dit=dit, vae=vae, sampling=sampling, name="tiny",
                             text_encoder={"kind": "minilm", "max_length": 16})  # fmt: skip


def spawn_world(world: int, base: Path, model: Path) -> tuple[Path, list[dict]]:
    folder = base / f"world{world}"
    folder.mkdir()
    env = {"dir": str(folder), "model": str(model)}
    mp.spawn(worker, args=(world, free_port(), env), nprocs=world)
    return folder, [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict:
    base = tmp_path_factory.mktemp("worlds")
    return {w: spawn_world(w, base, tiny_model) for w in CASES}


@pytest.mark.parametrize(
    ("world", "case"), [(w, c) for w, cases in CASES.items() for c in cases]
)  # fmt: skip
def test_parallel_equals_single_process(worlds: dict, world: int, case: str) -> None:
    for rank, results in enumerate(worlds[world][1]):
        value = results[case]
        assert not isinstance(value, str), f"rank {rank} failed:\n{value}"
        assert value < TOL, f"rank {rank}: max difference {value}"


def test_rank0_alone_writes_the_video(worlds: dict) -> None:
    folder = worlds[2][0]
    assert (folder / "pipe-auto-True" / "frame_00000.png").exists()
    assert (folder / "pipe-auto-True.json").exists()
    assert (worlds[3][0] / "pipe-ring-False" / "frame_00000.png").exists()
    assert sorted(p.name for p in worlds[3][0].glob("pipe-*")) == [
        "pipe-ring-False", "pipe-ring-False.json"
    ]  # no other rank's file  # fmt: skip


def test_checkpoint_from_two_processes_loads_in_one(worlds: dict) -> None:
    from kinema.distributed.train import load_sharded

    folder = worlds[2][0]
    model = tiny_train_dit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    assert load_sharded(folder / "ckpt", model, opt) == 1
    full = torch.load(folder / "full.pt")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, full[name], atol=0, rtol=0)
    assert len(opt.state) == len(list(model.parameters()))  # Adam moments came back too
    with pytest.raises(ValueError, match="not a sharded checkpoint"):
        load_sharded(folder, model)
