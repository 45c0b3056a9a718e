"""``kinema train`` on 2 processes (gloo, spawned like torchrun would set them up) equals one
process on the same global batch: DDP and FSDP2 give the same loss log and weights, and their
checkpoints resume with another number of processes; a LoRA trains under DDP as in one process.

One 1-process reference run (4 steps, micro-batch of 2 clips, 2 micro-batches per step, random
conditioning masks and caption dropout) and a 1-process LoRA run on its exported model, then one
spawn of 2 ranks runs four jobs: DDP from scratch, FSDP from scratch, FSDP resumed from the
reference's step-2 checkpoint, and the LoRA under DDP. Finally one process resumes the FSDP
run's step-2 checkpoint (sharded optimiser state).
"""

from __future__ import annotations

import os
import shutil
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from kinema.configs import DiTConfig, VAEConfig
from kinema.io.checkpoint import save_component
from kinema.lora import LoRAConfig
from kinema.models.vae import CausalVAE
from kinema.train import DataConfig, TrainConfig, train_dit
from kinema.train.loop import read_log

TINY_DIT = DiTConfig(num_heads=2, head_dim=16, in_channels=4, out_channels=4, text_dim=384,
                     freq_dim=32, ffn_dim=64, num_layers=2)  # fmt: skip
TINY_VAE = VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                     latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)  # fmt: skip
DATA = DataConfig(num_clips=6, width=32, height=32, frames=5, fps=8)  # the synthetic world
# float32 sums in another order (half batches, all-reduce) differ by ~1e-7 in the gradients.
# After 4 AdamW steps that stays below TOL for all weights but the rare element whose gradient
# is near Adam's eps (1e-8): there m / (sqrt(v) + eps) amplifies it, bounded by the lr (1e-3).
TOL = 1e-5  # every weight but at most 1 in 1000 of a tensor
ADAM_TOL = 1e-4  # those few
JOBS = ("ddp", "fsdp", "fsdp_resume", "lora_ddp")
LORA = LoRAConfig(rank=4, alpha=8.0, targets=("attn1.to_q", "attn2.to_v", "ffn.net.2"))


def train_config(out: Path, vae: Path, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), model=TINY_DIT, vae=str(vae), text_max_length=8, data=DATA,
                batch_size=2, grad_accum=2, max_steps=4, warmup_steps=2, lr=1e-3,
                checkpoint_every=2, cond_probs=(0.4, 0.3, 0.3), ema_decay=0.9,
                caption_dropout=0.3, device="cpu", progress=False)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def lora_config(out: Path, base: Path, **kw) -> TrainConfig:
    """A LoRA on the reference run's exported model (its DiT frozen, its VAE)."""
    model = base / "single" / "model"
    return train_config(out, model / "vae", model=None, init_from=str(model), lora=LORA, **kw)


def load_minilm():  # noqa: ANN201
    from kinema.models.text import load_text_encoder

    return load_text_encoder("minilm", max_length=8)


def worker(rank: int, port: int, base: str, vae: str) -> None:
    """One rank: join the group, then run every job (each in its own out_dir)."""
    from kinema.distributed.parallel import init_distributed

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    init_distributed("gloo")
    text = load_minilm()
    for job in JOBS:
        out = Path(base) / job
        if job == "lora_ddp":
            config = lora_config(out, Path(base), parallel="ddp")
        else:
            config = train_config(out, Path(vae), parallel="ddp" if job == "ddp" else "fsdp")
        try:
            train_dit(config, text_encoder=text)
        except Exception:  # recorded, so each test names its own failure
            (Path(base) / f"{job}-rank{rank}.err").write_text(traceback.format_exc())
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_run(src: Path, dst: Path, keep_step: int) -> Path:
    """``src`` without its checkpoints after ``keep_step`` (a run killed after that step)."""
    top = {"model", "tensorboard"}  # the exported model and logs of the finished run
    shutil.copytree(src, dst, ignore=lambda d, names: top & set(names) if Path(d) == src else [])
    for ckpt in (dst / "checkpoints").glob("step-*"):
        if int(ckpt.name[5:]) > keep_step:
            shutil.rmtree(ckpt)
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    vae = save_component(CausalVAE(TINY_VAE), base / "vae")
    text = load_minilm()
    single = base / "single"
    train_dit(train_config(single, vae), text_encoder=text)
    train_dit(lora_config(base / "lora_single", base), text_encoder=text)
    copy_run(single, base / "fsdp_resume", keep_step=2)  # the 2-rank FSDP run resumes it
    mp.spawn(worker, args=(free_port(), str(base), str(vae)), nprocs=2)
    errors = "\n".join(p.read_text() for p in sorted(base.glob("*.err")))
    resumed = copy_run(base / "fsdp", base / "fsdp_to_single", keep_step=2)
    if not errors:
        train_dit(train_config(resumed, vae), text_encoder=text)
    return {"base": base, "errors": errors}  # type: ignore[dict-item]


def weights(run: Path, step: int = 4) -> dict[str, torch.Tensor]:
    """What trains in the checkpoint of ``step`` (the DiT, or a LoRA's factors) and its EMA."""
    ckpt = run / "checkpoints" / f"step-{step:08d}"
    lora = ckpt / "lora.safetensors"
    model = load_file(str(lora if lora.exists() else ckpt / "model" / "model.safetensors"))
    ema = load_file(str(ckpt / "ema.safetensors"))
    return {**model, **{f"ema.{k}": v for k, v in ema.items()}}


def assert_same_run(run: Path, reference: Path) -> None:
    """Same loss / lr / gradient-norm log and the same weights and EMA at step 4."""
    rows, ref = read_log(run), read_log(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == ["1", "2", "3", "4"]
    for r, q in zip(rows, ref, strict=True):
        for key in ("loss", "lr", "grad_norm"):
            assert float(r[key]) == pytest.approx(float(q[key]), rel=2e-5), (r, q)  # 6 digits
    got, want = weights(run), weights(reference)
    assert got.keys() == want.keys()
    for name, value in want.items():
        err = (got[name] - value).abs()
        assert err.max() < ADAM_TOL, (name, float(err.max()))
        assert int((err > TOL).sum()) <= max(1, value.numel() // 1000), (name, err.topk(3))


@pytest.mark.parametrize("job", ["ddp", "fsdp"])
def test_two_processes_equal_one(runs: dict, job: str) -> None:
    assert not runs["errors"], runs["errors"]
    base = runs["base"]
    assert_same_run(base / job, base / "single")
    assert (base / job / "model" / "kinema.json").exists()  # rank 0 exported
    assert not list(base.glob(f"{job}/samples")) and (base / job / "log.csv").exists()
    if job == "fsdp":  # optimiser state sharded by both ranks, weights gathered for export
        assert (base / job / "checkpoints" / "step-00000004" / "optimizer" / ".metadata").exists()


def test_a_lora_trains_under_ddp_as_in_one_process(runs: dict) -> None:
    assert not runs["errors"], runs["errors"]
    base = runs["base"]
    assert_same_run(base / "lora_ddp", base / "lora_single")
    factors = weights(base / "lora_ddp")
    assert len(factors) == 2 * 2 * 2 * 3  # A and B of 3 targets in 2 blocks, and their EMA
    assert all(v.abs().max() > 0 for k, v in factors.items() if k.endswith("lora_B"))  # trained
    assert (base / "lora_ddp" / "model" / "lora.safetensors").exists()  # rank 0 exported


def test_two_process_fsdp_checkpoint_resumes_in_one(runs: dict) -> None:
    assert not runs["errors"], runs["errors"]
    base = runs["base"]
    assert not (base / "fsdp_to_single" / "checkpoints" / "step-00000002" / "optimizer.pt").exists()
    assert_same_run(base / "fsdp_to_single", base / "single")


def test_one_process_checkpoint_resumes_in_two_fsdp(runs: dict) -> None:
    assert not runs["errors"], runs["errors"]
    assert_same_run(runs["base"] / "fsdp_resume", runs["base"] / "single")
