"""kinema.train: the flow-matching loss, samplers, EMA, configs, and exact resume of real loops."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kinema.configs import DiTConfig, VAEConfig
from kinema.data.synthetic import vocabulary
from kinema.errors import RunFolderRemoved, TrainingDiverged
from kinema.io.checkpoint import load_dit, load_vae, save_component
from kinema.models.dit import VideoDiT
from kinema.models.ops import cpu_has_bf16
from kinema.models.vae import CausalVAE
from kinema.train import (
    EMA,
    DataConfig,
    TrainConfig,
    VAETrainConfig,
    flow_matching_loss,
    load_train_config,
    sample_cond_mask,
    sample_timesteps,
    train_dit,
    train_vae,
)
from kinema.train.config import OptimFields
from kinema.train.loop import (
    ClipDataset,
    LatentCache,
    autocast,
    caption_context,
    check_extra_caches,
    load_caches,
    precompute,
    read_log,
    read_metadata,
    start_run,
    timed_lookup,
    train_loop,
)
from kinema.train.state import PositionSampler, index_at, latest_checkpoint, lr_at
from kinema.train.vae_loop import stats_clips

TINY_DIT = DiTConfig(num_heads=2, head_dim=16, in_channels=4, out_channels=4, text_dim=384,
                     freq_dim=32, ffn_dim=64, num_layers=2)  # fmt: skip
TINY_VAE = VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                     latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)  # fmt: skip
TINY_DATA = DataConfig(num_clips=6, width=32, height=32, frames=9, fps=8)  # a config only


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Loss, samplers
# ---------------------------------------------------------------------------------------------


def test_logit_normal_statistics() -> None:
    s = sample_timesteps(40000, gen(), mean=0.5, std=0.8, shift=1.0)
    logit = torch.log(s / (1 - s))
    assert s.min() > 0 and s.max() < 1
    assert abs(logit.mean().item() - 0.5) < 0.02 and abs(logit.std().item() - 0.8) < 0.02
    shifted = sample_timesteps(40000, gen(), mean=0.0, std=1.0, shift=3.0)
    assert abs(shifted.median().item() - 0.75) < 0.01  # median 0.5 -> 3*0.5/(1+2*0.5)


def test_cond_mask_modes() -> None:
    none = sample_cond_mask(64, 5, (1.0, 0.0, 0.0), gen())
    first = sample_cond_mask(64, 5, (0.0, 1.0, 0.0), gen())
    firstk = sample_cond_mask(2000, 5, (0.0, 0.0, 1.0), gen(), max_frames=3)
    assert not none.any()
    assert first[:, 0].all() and not first[:, 1:].any()
    counts = firstk.sum(1)
    assert set(counts.tolist()) == {2, 3}
    assert torch.equal(firstk, torch.arange(5)[None] < counts[:, None])  # a prefix of frames
    mix = sample_cond_mask(20000, 5, (0.6, 0.25, 0.15), gen()).sum(1)
    freq = [(mix == 0).float().mean(), (mix == 1).float().mean(), (mix >= 2).float().mean()]
    assert np.allclose(freq, (0.6, 0.25, 0.15), atol=0.015)


def test_flow_matching_loss_conditioning() -> None:
    x0, noise = torch.randn(2, 4, 3, 2, 2, generator=gen(1)), torch.randn(2, 4, 3, 2, 2)
    sigmas = torch.tensor([0.3, 0.8])
    mask = torch.tensor([[True, False, False], [True, True, False]])
    seen = {}

    def model_fn(x, t, context):  # exact velocity on free frames, garbage on given ones
        seen["x"], seen["t"] = x, t
        v = (noise - x0).clone()
        v[mask[:, None].expand_as(v[:, :, :, 0, 0])] = 1e3
        return v

    loss = flow_matching_loss(model_fn, x0, noise, sigmas, torch.zeros(2, 1, 8), mask)
    assert loss.item() == 0.0  # conditioned frames are not in the loss
    assert torch.equal(seen["t"], torch.tensor([[0.0, 300.0, 300.0], [0.0, 0.0, 800.0]]))
    assert torch.equal(seen["x"][0, :, 0], x0[0, :, 0]) and torch.equal(
        seen["x"][1, :, :2], x0[1, :, :2]
    )
    assert torch.allclose(seen["x"][0, :, 1], 0.7 * x0[0, :, 1] + 0.3 * noise[0, :, 1])
    zero = lambda x, t, c: torch.zeros_like(x)
    want = ((noise - x0)[0, :, 1:].pow(2).sum() + (noise - x0)[1, :, 2:].pow(2).sum()) / (3 * 16)
    got = flow_matching_loss(zero, x0, noise, sigmas, torch.zeros(2, 1, 8), mask)
    assert torch.allclose(got, want)


def test_real_model_loss_decreases() -> None:
    torch.manual_seed(0)
    model = VideoDiT(TINY_DIT)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x0, noise = (
        torch.randn(2, 4, 3, 4, 4, generator=gen(1)),
        torch.randn(2, 4, 3, 4, 4, generator=gen(2)),
    )
    sigmas, context = torch.tensor([0.4, 0.7]), torch.randn(2, 5, 384, generator=gen(3))
    losses = []
    for _ in range(30):
        loss = flow_matching_loss(model, x0, noise, sigmas, context)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


# ---------------------------------------------------------------------------------------------
# EMA, schedules, data positions
# ---------------------------------------------------------------------------------------------


def test_ema_math() -> None:
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9, warmup=True)
    with torch.no_grad():
        model.weight.fill_(3.0)
    assert ema.update(model) == pytest.approx(0.1)  # warm-up: min(0.9, 1/10)
    assert ema.shadow["weight"].item() == pytest.approx(0.1 * 1 + 0.9 * 3)
    plain = EMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.weight.fill_(5.0)
    plain.update(model)
    assert plain.shadow["weight"].item() == pytest.approx(0.9 * 3 + 0.1 * 5)
    restored = EMA(model, decay=0.5)
    restored.load_state_dict(plain.state_dict())
    assert restored.decay == 0.9 and restored.updates == 1
    with restored.applied(model):
        assert model.weight.item() == pytest.approx(3.2)
    assert model.weight.item() == 5.0


def test_lr_schedule_and_positions() -> None:
    assert lr_at(0, 1.0, 4, 10, "constant", 0.1) == 0.25
    assert lr_at(7, 1.0, 4, 10, "constant", 0.1) == 1.0
    assert lr_at(4, 1.0, 4, 10, "cosine", 0.1) == 1.0
    assert lr_at(10, 1.0, 4, 10, "cosine", 0.1) == pytest.approx(0.1)
    stream = iter(PositionSampler(5, seed=3, start=7))
    assert [next(stream) for _ in range(8)] == [index_at(p, 5, 3) for p in range(7, 15)]
    assert sorted(index_at(p, 5, 3) for p in range(5, 10)) == list(range(5))


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        "vae: v\nmodel: {num_layers: 2}\nbetas: [0.9, 0.95]\n"
        "data: {frames: 9, motion_weights: {up-left: 3}, balance: colour-motion}\n"
    )
    config = load_train_config(good)
    assert config.model.num_layers == 2 and config.data.frames == 9 and config.betas == (0.9, 0.95)
    assert config.data.motion_weights == {"up-left": 3.0}
    assert config.data.balance == "colour-motion"
    good.write_text("vae: v\nmodel: {}\nlr: 1e-4\nmin_lr_ratio: 5E-2\nmax_steps: 1e3\n")
    config = load_train_config(good)  # YAML 1.1 reads 1e-4 and 1e3 as text (not 1.0e-4)
    assert config.lr == 1e-4 and config.min_lr_ratio == 0.05 and config.max_steps == 1000
    good.write_text("vae: v\nmodel: {}\nmax_steps: 1.0e+3\n")  # YAML's float, whole
    assert load_train_config(good).max_steps == 1000
    cases = {
        "vae: v\nmodel: {}\nlearning_rate: 1\n": "learning_rate",
        "vae: v\nmodel: {}\ndata: {fpss: 3}\n": "fpss",
        "vae: v\nmodel: {num_layrs: 3}\n": "num_layrs",
        "vae: v\nmodel: {}\nlr: fast\n": "TrainConfig.lr",
        "vae: v\nmodel: {}\ndata: {frames: 8}\n": "data.frames",
        "vae: v\nmodel: {}\ncond_probs: [0.5, 0.5, 0.5]\n": "cond_probs",
        "vae: v\nmodel: {}\ndata: {object_scale: 3}\n": "data.object_scale",
        "vae: v\nmodel: {}\ndata: {motion_weights: {upleft: 2}}\n": "data.motion_weights",
        "vae: v\nmodel: {}\ndata: {motion_weights: [1, 2]}\n": "motion_weights",
        "vae: v\nmodel: {}\ndata: {balance: pairs}\n": "data.balance 'pairs'; valid: triples",
        "vae: v\nmodel: {}\ndata: {width: 40}\n": "data.width 40 must be a multiple of 16",
        "vae: v\nmodel: {}\nsampling: {width: 30}\n": "sampling.width / height 30x128",
        "vae: v\nmodel: {}\nsampling: {frames: 10}\n": "sampling.frames 10 must be 4k",
        # these were exported, and the model refused its own defaults at generate
        "vae: v\nmodel: {}\nsampling: {sampler: dpm}\n": "sampling.sampler 'dpm'; valid: euler",
        "vae: v\nmodel: {}\nsampling: {guidance: .inf}\n": "sampling.guidance inf must be",
        "vae: v\nmodel: {}\nsampling: {shift: .nan}\n": "sampling.shift nan must be > 0",
        "vae: v\nmodel: {}\nsampling: {contrast: -1}\n": "sampling.contrast -1.0 must be >= 0",
        "vae: v\nmodel: {}\nlr: 1e-4x\n": "TrainConfig.lr",
        "vae: v\nmodel: {}\nmax_steps: 1e-3\n": "max_steps: expected int, got 0.001, not a",
        "vae: v\nmodel: {}\nmax_steps: 1e400\n": "got inf, not a finite whole number",
        "vae: v\nmodel: {}\nlr: .inf\n": "lr inf must be a finite number > 0",
        "vae: v\nmodel: {}\ngrad_clip: -1\n": r"grad_clip -1.0 must be >= 0 \(0 disables",
        "vae: v\nmodel: {}\nweight_decay: -1\n": "weight_decay -1.0 must be >= 0",
        "vae: v\nmodel: {}\nwarmup_steps: -5\n": "warmup_steps -5 must be >= 0",
        "vae: v\nmodel: {}\nnum_workers: -1\n": "num_workers -1 must be >= 0",
        "vae: v\nmodel: {}\nmin_lr_ratio: -1\n": r"min_lr_ratio -1.0 must be in \[0, 1\]",
        "vae: v\nmodel: {}\nbetas: [1.5, 0.999]\n": r"betas \[1.5, 0.999\] must be two numbers",
        "vae: v\nmodel: {}\ntext_max_length: 0\n": "text_max_length 0 must be >= 1",
        "vae: v\nmodel: {}\nsample_every: 1\nsample_steps: 0\n": "sample_steps 0 must be",
        "vae: v\nmodel: {}\ndata: {fps: 0}\n": "data.fps 0 must be >= 1",
        "vae: v\nmodel: {}\ndata: {kind: folder, root: v, motion_weights: {left: 2}}\n": (
            "data.motion_weights and object_scale shape the synthetic world"
        ),
        "vae: v\nmodel: {}\ndata: {width: -32}\n": "data.width / height -32x128 must be >= 1",
        "vae: v\nmodel: {}\nbatch_size: 1\nbatch_size: 2\n": "key 'batch_size' is given twice",
    }
    for i, (text, key) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(text)
        with pytest.raises(ValueError, match=key):
            load_train_config(path)


def test_a_sampling_block_sets_what_it_names_and_a_finetune_keeps_its_bases(tmp_path):
    """A partial block was filled with Wan's defaults (832x480x81, 50 steps), and a fine-tune
    of kinema-tiny without one exported guidance 4, shift 3 and Euler instead of its own."""
    from kinema.loading import folder_defaults
    from kinema.train.loop import sampling_defaults

    tiny = folder_defaults("kinema-tiny")
    path = tmp_path / "ft.yaml"
    data = "data: {kind: folder, root: v, width: 64, height: 96, frames: 17, fps: 8}\n"
    for block, want in (("", {}), ("sampling: {steps: 8}\n", {"steps": 8})):
        path.write_text("init_from: kinema-tiny\n" + data + block)
        got = sampling_defaults(load_train_config(path))
        sized = dict(width=64, height=96, frames=17, fps=8)
        assert got == dataclasses.replace(tiny, **sized, **want)
    path.write_text("vae: v\nmodel: {}\nsampling: {guidance: 2.5}\n" + data)
    got = sampling_defaults(load_train_config(path))  # from scratch: 20 Euler steps
    assert (got.width, got.frames, got.steps, got.sampler, got.guidance) == (
        64,
        17,
        20,
        "euler",
        2.5,
    )


def test_vae_crop_size_must_fit_the_vae():
    with pytest.raises(ValueError, match=r"crop_size 20 must be a multiple of 8 \(the VAE's"):
        VAETrainConfig(model=TINY_VAE, data=TINY_DATA, crop_size=20)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("a.yaml", "vae: [v\nmodel: {}\n", r"a.yaml is not valid YAML: .* at line 2, column 6$"),
        ("a.json", '{"vae": ', r"a.json is not valid JSON: Expecting value: line 1"),
        ("a.yaml", b"\xf6\x00\x01", r"a.yaml is not valid YAML: 'utf-8' codec can't decode"),
        ("folder", None, r"folder is not a file \(give a .yaml or .json file\)"),
        ("list.yaml", "- vae\n", r"expected a mapping at the top level"),
    ],
)
def test_unreadable_config_files_are_one_line(tmp_path: Path, name, content, message) -> None:
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        load_train_config(path)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# The engine: exact resume and signals
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    """Three generated 12-frame clips with .txt captions, as a folder DataConfig."""
    root = make_video_folder(tmp_path_factory.mktemp("data") / "videos")
    return DataConfig(kind="folder", root=str(root), width=32, height=32, frames=9, fps=8)


def dit_config(out: Path, vae_path: Path, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), model=TINY_DIT, vae=str(vae_path), text_max_length=8,
                data=TINY_DATA, batch_size=2, max_steps=6, warmup_steps=2, lr=1e-3,
                checkpoint_every=2, cond_probs=(0.4, 0.3, 0.3), ema_decay=0.9,
                progress=False)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def test_dit_resume_is_exact(tmp_path: Path, vae_folder: Path, text_encoder, videos) -> None:
    config = dit_config(tmp_path / "a", vae_folder, data=videos)  # precomputed latent cache
    straight = train_dit(config, text_encoder=text_encoder)
    assert "vocabulary" not in json.loads((straight / "kinema.json").read_text())  # own videos
    resumed = dit_config(tmp_path / "b", vae_folder, data=videos)
    assert train_dit(resumed, text_encoder=text_encoder, stop_after=3) == tmp_path / "b"
    assert latest_checkpoint(tmp_path / "b").name == "step-00000003"
    train_dit(resumed, text_encoder=text_encoder)  # a fresh loop resumes from step 3
    a, b = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
    assert a.name == b.name == "step-00000006"
    for name in ("model/model.safetensors", "ema.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    drop = lambda rows: [{k: r[k] for k in ("step", "loss", "lr", "grad_norm")} for r in rows]
    assert drop(read_log(tmp_path / "a")) == drop(read_log(tmp_path / "b"))
    assert len(read_log(tmp_path / "a")) == 6
    assert len(list((tmp_path / "a" / "checkpoints").glob("step-*"))) == 2  # keeps the last 2
    dit = load_dit(straight / "transformer")
    assert dit.proj_out.weight.dtype == torch.float16  # lossless enough for fp16


def test_lora_trains_only_its_factors_resumes_exactly_and_exports_what_merges(
    tmp_path: Path, vae_folder: Path, text_encoder, videos
) -> None:
    from kinema.lora import LoRAConfig, merge_lora, read_lora

    base = train_dit(dit_config(tmp_path / "base", vae_folder, data=videos, max_steps=2),
                     text_encoder=text_encoder)  # fmt: skip
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("attn1.to_q", "attn2.to_v", "ffn.net.2"))
    config = lambda out: dit_config(out, vae_folder, data=videos, model=None, max_steps=4,
                                    init_from=str(base), lora=lora, sample_every=2,
                                    sample_prompts=("a red square",), sample_steps=2)  # fmt: skip
    straight = train_dit(config(tmp_path / "a"), text_encoder=text_encoder)
    assert (tmp_path / "a" / "samples" / "step-00000004-0.mp4").stat().st_size > 0  # LoRA + EMA
    assert train_dit(config(tmp_path / "b"), text_encoder=text_encoder, stop_after=2)
    resumed = train_dit(config(tmp_path / "b"), text_encoder=text_encoder)
    a, b = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
    assert not (a / "model").exists()  # a checkpoint holds the LoRA, not the frozen base
    for name in ("lora.safetensors", "ema.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert sorted(wa) == sorted(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
        assert len(wa) == 2 * 2 * 3  # A and B of 3 targets in 2 blocks: nothing else trains
    assert all(v.abs().max() > 0 for k, v in wa.items() if k.endswith("lora_B"))  # B moved
    exported = read_lora(straight / "lora.safetensors")
    assert sorted(exported) == sorted(read_lora(resumed / "lora.safetensors"))
    frozen, merged = (load_dit(base / "transformer", dtype=torch.float32) for _ in range(2))
    assert merge_lora(merged, exported) == 6
    for name, w in merged.state_dict().items():
        layer = name.removesuffix(".weight")
        if f"{layer}.lora_A" not in wa:
            assert torch.equal(w, frozen.state_dict()[name]), name
            continue
        delta = 2.0 * wa[f"{layer}.lora_B"] @ wa[f"{layer}.lora_A"]  # EMA factors, alpha / r
        assert torch.allclose(w, frozen.state_dict()[name] + delta, atol=1e-5), name
    with pytest.raises(ValueError, match="lora needs init_from"):
        dit_config(tmp_path / "c", vae_folder, lora=lora)


def test_bf16_precision_trains_in_bf16_on_a_cpu_that_has_it(
    tmp_path: Path, vae_folder: Path, text_encoder, videos, capsys
) -> None:
    native = cpu_has_bf16()  # AVX512-BF16 / AMX: bf16 autocast, else fp32 with a notice
    bf16 = dit_config(tmp_path / "bf16", vae_folder, data=videos, precision="bf16", max_steps=2)
    with autocast(bf16, torch.device("cpu")):
        dtype = torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype
    assert dtype == (torch.bfloat16 if native else torch.float32)
    train_dit(bf16, text_encoder=text_encoder)
    assert ("training in fp32" in capsys.readouterr().out) != native
    fp32 = dit_config(tmp_path / "fp32", vae_folder, data=videos, max_steps=2)
    train_dit(fp32, text_encoder=text_encoder)
    a, b = (float(read_log(c.out_dir)[0]["loss"]) for c in (bf16, fp32))
    assert (a != b) == native  # the same batch and weights: only the precision differs
    assert abs(a - b) <= 0.02 * b


def test_timed_captions_give_each_latent_frame_the_caption_in_force(
    tmp_path: Path, vae_folder: Path, text_encoder
) -> None:
    data = DataConfig(seed=2, num_clips=12, width=32, height=32, frames=17, fps=8)
    ds = ClipDataset(data)
    changes = [i for i in range(12) if ds.timed(i)]
    i, j = changes[0], next(k for k in range(12) if k not in changes)
    (_, before), (switch, after) = ds.timed(i)
    config = dit_config(tmp_path, vae_folder, data=data, timed_captions=1.0, caption_dropout=0)
    batch = {"captions": [ds[i][1], ds[j][1]], "timed": [ds.timed(i), None]}
    text = lambda captions: text_encoder.encode(captions)[0].float()
    context = caption_context(config, batch, batch["captions"], 5, text, gen())
    assert context.shape[:2] == (2, 5)  # per latent frame; their first pixel frames 0 1 5 9 13
    for f, first in enumerate((0, 1, 5, 9, 13)):
        torch.testing.assert_close(context[0, f], text([before if first < switch else after])[0])
        torch.testing.assert_close(context[1, f], text([ds[j][1]])[0])
    assert len({before, after} & {ds[i][1]}) == 0  # not the clip's "..., then ..." caption
    model = train_dit(dit_config(tmp_path / "run", vae_folder, data=data, timed_captions=1.0,
                                 max_steps=2), text_encoder=text_encoder)  # fmt: skip
    assert all(float(r["loss"]) > 0 for r in read_log(tmp_path / "run")) and model.exists()
    with pytest.raises(ValueError, match="timed_captions needs synthetic data and precompute"):
        dit_config(tmp_path, vae_folder, data=data, timed_captions=0.5, precompute=False)


def test_latent_cache_refuses_other_vae_statistics(
    tmp_path: Path, vae_folder: Path, text_encoder, videos
) -> None:
    """Cached latents are normalised: new statistics in the VAE folder make the cache stale;
    the VAE is known by its weights, not by its path."""
    vae = Path(shutil.copytree(vae_folder, tmp_path / "vae"))
    config = dit_config(tmp_path / "run", vae, data=videos)
    precompute(config, text_encoder=text_encoder)
    precompute(config, text_encoder=text_encoder)  # unchanged: the cache is reused
    moved = Path(shutil.copytree(vae, tmp_path / "moved-vae"))  # the same VAE elsewhere
    precompute(dataclasses.replace(config, vae=str(moved)), text_encoder=text_encoder)
    weights = moved / "model.safetensors"
    tensors = load_file(weights)
    tensors = {k: v + 0.01 if k == next(iter(tensors)) else v for k, v in tensors.items()}
    save_file(tensors, weights)  # other weights, same path
    with pytest.raises(ValueError, match="built for other VAE weights; delete it to rebuild"):
        precompute(dataclasses.replace(config, vae=str(moved)), text_encoder=text_encoder)
    settings = json.loads((vae / "config.json").read_text())
    settings["first_frame_mean"] = [0.5] * TINY_VAE.z_dim
    settings["first_frame_std"] = [2.0] * TINY_VAE.z_dim
    (vae / "config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="built for other latent statistics; delete"):
        precompute(config, text_encoder=text_encoder)


def test_latent_cache_refuses_a_changed_video_folder(
    tmp_path: Path, vae_folder: Path, text_encoder, videos
) -> None:
    """A video or caption added, removed or edited since the cache was encoded (the cache had
    gone on training on the deleted clip and the old caption)."""
    root = Path(shutil.copytree(videos.root, tmp_path / "videos"))
    data = dataclasses.replace(videos, root=str(root))
    config = dit_config(root / "runs" / "a", vae_folder, data=data)  # out_dir inside the data
    precompute(config, text_encoder=text_encoder)
    (root / ".DS_Store").write_text("a file manager's")
    (root / "notes.md").write_text("shot list")  # neither a video nor a caption
    precompute(config, text_encoder=text_encoder)  # the videos unchanged: reused
    caption = next(root.glob("*.txt"))
    for change in (lambda: caption.write_text("a purple star exploding"), caption.unlink):
        change()
        with pytest.raises(ValueError, match=r"other files in data.root \(added, removed"):
            precompute(config, text_encoder=text_encoder)


def test_extra_caches_mix_earlier_runs_clips_in(
    tmp_path: Path, vae_folder: Path, text_encoder
) -> None:
    """A run trains on its own clips and those of earlier runs' caches, each clip with its
    own caption tokens and its own world's timed captions."""
    world = lambda seed, n: DataConfig(seed=seed, num_clips=n, width=32, height=32, frames=9,
                                       fps=8)  # fmt: skip
    old = precompute(dit_config(tmp_path / "old", vae_folder, data=world(3, 12)),
                     text_encoder=text_encoder)  # fmt: skip
    config = dit_config(tmp_path / "new", vae_folder, data=world(2, 4), extra_caches=(str(old),),
                        timed_captions=1.0, caption_dropout=0, max_steps=2)  # fmt: skip
    precompute(config, text_encoder=text_encoder)
    cache, sources = load_caches(config, check_extra_caches(config))
    mine, theirs = LatentCache.load(tmp_path / "new" / "cache"), LatentCache.load(old)
    assert [start for start, _ in sources] == [0, 4] and sources[1][1] == world(3, 12)
    assert torch.equal(cache.latents, torch.cat([mine.latents, theirs.latents]))
    assert cache.captions == mine.captions + theirs.captions
    for c in (*mine.captions[:2], *theirs.captions[:2]):
        part = mine if c in mine.rows else theirs
        assert torch.equal(cache.text([c]), part.text([c]))
    timed, earlier = timed_lookup(sources), ClipDataset(world(3, 12))
    changing = next(i for i in range(12) if earlier.timed(i))
    assert timed(4 + changing) == earlier.timed(changing)  # the clip's own world, not seed 2's
    assert timed(4 + changing) != ClipDataset(world(2, 16)).timed(4 + changing)
    # the precompute workers stored every clip's timed captions: the same as the world's
    assert cache.timed == [timed(i) for i in range(16)] and cache.timed[4 + changing]
    shard = next(old.glob("latents-*.safetensors"))  # a cache from before they were stored
    latents = load_file(str(shard))
    meta = {k: v for k, v in read_metadata(shard).items() if k != "timed"}
    save_file(latents, str(shard), metadata=meta)
    assert LatentCache.load(old).timed is None
    assert load_caches(config, check_extra_caches(config))[0].timed is None  # world lookup
    exported = train_dit(config, text_encoder=text_encoder)  # 16 clips in the stream
    meta = json.loads((exported / "kinema.json").read_text())
    assert meta["vocabulary"] == list(vocabulary())  # a synthetic world's model knows its words
    with pytest.raises(ValueError, match="is not a finished latent cache"):
        check_extra_caches(dataclasses.replace(config, extra_caches=(str(tmp_path / "nowhere"),)))
    meta = json.loads((old / "meta.json").read_text())
    bucketed = {**meta, "data": {**meta["data"], "buckets": [[32, 32], [48, 32]]}}
    (old / "meta.json").write_text(json.dumps(bucketed))  # an AttributeError after encoding
    with pytest.raises(ValueError, match="holds bucketed clips"):
        check_extra_caches(config)
    meta["text_max_length"] = 16
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="built with another text_max_length"):
        check_extra_caches(config)
    five = DataConfig(seed=3, num_clips=2, width=32, height=32, frames=5, fps=8)
    short = precompute(dit_config(tmp_path / "short", vae_folder, data=five),
                       text_encoder=text_encoder)  # fmt: skip
    with pytest.raises(ValueError, match="only caches of the same clip size and length mix"):
        shorts = dataclasses.replace(config, extra_caches=(str(short),))
        load_caches(shorts, check_extra_caches(shorts))
    with pytest.raises(ValueError, match="extra_caches needs precompute"):
        dataclasses.replace(config, timed_captions=0.0, precompute=False)


def toy_run(out: Path, **kw):
    base = dict(out_dir=str(out), batch_size=1, max_steps=6, warmup_steps=0,
                checkpoint_every=100, progress=False)  # fmt: skip
    config = OptimFields(**{**base, **kw})
    run = start_run(config, lambda ckpt: _toy_model(ckpt))
    data = torch.randn(64, 3, generator=gen(5))

    def stream():
        position = run.progress.samples_seen
        while True:
            yield {"x": data[position % 64 : position % 64 + 1]}
            position += 1

    def loss_fn(batch, g):
        noise = torch.randn(batch["x"].shape, generator=g)
        return (run.model(batch["x"] + noise) - batch["x"]).pow(2).mean()

    return run, stream(), loss_fn


def _toy_model(ckpt: Path | None) -> torch.nn.Module:
    model = torch.nn.Linear(3, 3)
    if ckpt is not None:
        model.load_state_dict(load_file(str(ckpt / "model" / "model.safetensors")))
    model.config = TINY_DATA  # save_component writes the module's config dataclass
    return model


def test_sigterm_saves_and_resumes(tmp_path: Path) -> None:
    run, stream, loss_fn = toy_run(tmp_path)

    def on_step(step: int) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    assert train_loop(run, stream, loss_fn, on_step) == signal.SIGTERM
    assert latest_checkpoint(tmp_path).name == "step-00000002"  # saved despite checkpoint_every
    run, stream, loss_fn = toy_run(tmp_path)
    assert run.progress.step == 2 and run.progress.samples_seen == 2
    assert train_loop(run, stream, loss_fn) is None
    straight, s2, l2 = toy_run(tmp_path / "straight")
    train_loop(straight, s2, l2)
    assert torch.equal(run.model.weight, straight.model.weight)


def test_a_run_whose_folder_is_removed_stops_at_its_next_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run, stream, loss_fn = toy_run(out, checkpoint_every=2)
    out.mkdir()
    (out / "train_config.json").write_text("{}")  # as train_dit and train_vae write it

    def on_step(step: int) -> None:
        if step == 3:
            (out / "train_config.json").unlink()  # the folder emptied, or made anew

    with pytest.raises(RunFolderRemoved, match=rf"out_dir {out} was removed .* at step 4 "):
        train_loop(run, stream, loss_fn, on_step)
    assert latest_checkpoint(out).name == "step-00000002"  # nothing written after it


def test_kinema_train_says_in_one_line_that_its_folder_was_removed(
    tmp_path: Path, vae_folder: Path, capsys
) -> None:
    """The folder removed while ``kinema train`` runs: exit 1 and one line at the next
    checkpoint, and the folder is not made again (it was a traceback at the export)."""
    from kinema.cli import main
    from kinema.train.config import config_to_dict

    out = tmp_path / "run"
    config = dit_config(out, vae_folder, max_steps=10_000, checkpoint_every=2)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config_to_dict(config)))

    def remove_after_first_checkpoint() -> None:
        while not (out / "checkpoints" / "step-00000002").is_dir():
            time.sleep(0.01)
        shutil.rmtree(out)

    remover = threading.Thread(target=remove_after_first_checkpoint, daemon=True)
    remover.start()
    assert main(["train", str(path)]) == 1
    remover.join(timeout=10)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"kinema: error: the run's out_dir {out} was removed during")
    assert not out.exists()


def test_a_full_disk_while_training_is_one_line(tmp_path: Path, vae_folder: Path) -> None:
    """safetensors' own error for a write that fails (a full disk; here a file-size limit,
    EFBIG) ends ``kinema train`` as every other write does: one line, exit 1."""
    import resource
    import subprocess
    import sys

    from kinema.train.config import config_to_dict

    path = tmp_path / "run.json"
    path.write_text(json.dumps(config_to_dict(dit_config(tmp_path / "run", vae_folder))))
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))  # noqa: E731
    done = subprocess.run([sys.executable, "-m", "kinema", "train", str(path)],
                          preexec_fn=limit, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"kinema: error: cannot write in {tmp_path / 'run'}")
    assert last.endswith(": File too large") and "Traceback" not in done.stderr


def test_a_diverged_run_stops_before_saving_nan_weights(tmp_path: Path) -> None:
    run, stream, loss_fn = toy_run(tmp_path / "run", checkpoint_every=2)

    def on_step(step: int) -> None:
        if step == 3:
            with torch.no_grad():
                run.model.weight.fill_(math.nan)  # as an lr far too high leaves them

    with pytest.raises(TrainingDiverged, match="diverged by step 4 .* nothing was saved"):
        train_loop(run, stream, loss_fn, on_step)
    assert latest_checkpoint(tmp_path / "run").name == "step-00000002"


# ---------------------------------------------------------------------------------------------
# Fine-tuning on a folder of videos; the VAE loop
# ---------------------------------------------------------------------------------------------


def make_video_folder(root: Path) -> Path:
    from kinema.io.video import write_video

    root.mkdir()
    for i, colour in enumerate(([255, 0, 0], [0, 0, 255], [0, 200, 0])):
        frames = np.zeros((12, 32, 32, 3), np.uint8)
        for t in range(12):
            frames[t, 8:16, 2 * t : 2 * t + 8] = colour
        write_video(root / f"clip{i}.mp4", frames, 8)
        (root / f"clip{i}.txt").write_text(f"a square number {i} moving right")
    return root


def test_folder_finetune_from_checkpoint(
    tmp_path: Path, vae_folder: Path, text_encoder, videos: DataConfig
) -> None:
    from kinema.configs import SamplingDefaults
    from kinema.io.checkpoint import save_model_folder

    torch.manual_seed(1)
    model = save_model_folder(tmp_path / "model", dit=VideoDiT(TINY_DIT), vae=load_vae(vae_folder),
                              text_encoder={"kind": "minilm", "max_length": 8},
                              sampling=SamplingDefaults(), name="tiny")  # fmt: skip
    torch.manual_seed(2)  # another VAE of the same shape, shipped instead of the trained-on one
    shipped = save_component(CausalVAE(load_vae(vae_folder).config), tmp_path / "vae2")
    config = dit_config(tmp_path / "ft", vae_folder, model=None, vae=None, init_from=str(model),
                        data=videos, precompute=False, max_steps=2, sample_every=2,
                        sample_prompts=("a red square",), sample_steps=2,
                        export_vae=str(shipped))  # fmt: skip
    out = train_dit(config, text_encoder=text_encoder)
    exported, want = load_vae(out / "vae").state_dict(), load_vae(shipped).state_dict()
    assert all(torch.allclose(exported[k].float(), want[k].float(), atol=1e-3) for k in want)
    assert [r["step"] for r in read_log(tmp_path / "ft")] == ["1", "2"]
    assert (tmp_path / "ft" / "samples" / "step-00000002-0.mp4").stat().st_size > 0
    tuned = load_dit(out / "transformer", dtype=torch.float32)
    start = load_dit(model / "transformer", dtype=torch.float32)
    assert not torch.equal(tuned.proj_out.weight, start.proj_out.weight)


def test_vae_loop_exports_latent_stats(tmp_path: Path, videos: DataConfig) -> None:
    config = VAETrainConfig(out_dir=str(tmp_path), model=TINY_VAE, data=videos, crop_size=16,
                            crop_frames=5, batch_size=2, max_steps=2, warmup_steps=1,
                            stats_clips=2, progress=False)  # fmt: skip
    folder = train_vae(config)
    vae = load_vae(folder)
    assert vae.config.latents_mean != TINY_VAE.latents_mean
    assert all(s > 0 and math.isfinite(s) for s in vae.config.latents_std)
    # the first latent frame's own statistics, measured on the same clips
    assert vae.config.first_frame_mean != vae.config.latents_mean
    assert all(s > 0 and math.isfinite(s) for s in vae.config.first_frame_std)
    with torch.no_grad():  # frame 0 with its own, all frames with the others: ~N(0, 1)
        raw = torch.cat([vae.encode(v) for v in stats_clips(config)]).double()
    mean, std = (torch.tensor(v).double().view(1, -1, 1, 1, 1)
                 for v in (vae.config.latents_mean, vae.config.latents_std))  # fmt: skip
    for frames in (vae.normalize(raw)[:, :, :1], (raw - mean) / std):
        per_channel = frames.transpose(0, 1).flatten(1)  # (C, N)
        assert per_channel.mean(1).abs().max() < 1e-3
        assert (per_channel.std(1, unbiased=False) - 1).abs().max() < 1e-3
    assert [r["step"] for r in read_log(tmp_path)] == ["1", "2"]


def test_vae_decoder_only_keeps_encoder_and_latent_stats(tmp_path: Path, videos: DataConfig):
    """freeze_encoder: the decoder learns, the encoder and the latent statistics stay as they
    were (so a DiT trained on the first VAE's latents stays valid)."""
    base = dict(data=videos, crop_size=16, crop_frames=5, batch_size=2, max_steps=2,
                warmup_steps=1, stats_clips=2, progress=False)  # fmt: skip
    first = train_vae(VAETrainConfig(out_dir=str(tmp_path / "a"), model=TINY_VAE, **base))
    tuned = train_vae(VAETrainConfig(out_dir=str(tmp_path / "b"), init_from=str(first),
                                     freeze_encoder=True, lr=1e-2, **base))  # fmt: skip
    a, b = load_vae(first), load_vae(tuned)
    assert b.config.latents_mean == a.config.latents_mean
    assert b.config.latents_std == a.config.latents_std
    sa, sb = a.state_dict(), b.state_dict()
    enc = [k for k in sa if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in sa if k.startswith("decoder.") and k.endswith("weight")]
    assert enc and all(torch.equal(sa[k], sb[k]) for k in enc)
    assert any(not torch.equal(sa[k], sb[k]) for k in dec)
    with pytest.raises(ValueError, match="freeze_encoder needs init_from"):
        VAETrainConfig(out_dir=str(tmp_path), model=TINY_VAE, freeze_encoder=True)


def test_object_centred_crops_see_the_objects_more_often():
    """With object_crop_prob 1 a crop almost always holds object pixels; plain random crops of
    small objects on a big background often hold none."""
    from kinema.data.synthetic import SyntheticClips
    from kinema.train.vae_loop import foreground_pixel, random_crop

    ds = SyntheticClips(0, frames=9)
    video = torch.stack([torch.from_numpy(ds[i][0]).permute(3, 0, 1, 2) for i in range(16)])
    video = video.float() / 127.5 - 1  # (B, 3, T, H, W)

    def with_objects(prob: float) -> float:
        crops = random_crop(video, 32, 5, torch.Generator().manual_seed(0), prob)
        return sum(foreground_pixel(c[:, 0], torch.Generator()) is not None for c in crops) / 16

    assert with_objects(1.0) >= 0.9 > with_objects(0.0)
    same = torch.Generator().manual_seed(3)
    plain = random_crop(video, 32, 5, torch.Generator().manual_seed(3))
    assert torch.equal(plain, random_crop(video, 32, 5, same, 0.0))  # prob 0: unchanged stream


def test_the_shipped_finetune_config_tunes_kinema_tiny_on_a_folder(tmp_path, monkeypatch):
    """configs/finetune-my-videos.yaml as a user runs it (``kinema train ... --export``), made
    small: its keys are valid, ``init_from: kinema-tiny`` names the built-in model, ``~`` in
    a path is the home folder, and the export loads with open words (a folder's captions)."""
    import yaml

    from kinema.cli import main
    from kinema.loading import load

    monkeypatch.setenv("HOME", str(tmp_path))
    make_video_folder(tmp_path / "my-videos")
    shipped = Path(__file__).parents[1] / "configs" / "finetune-my-videos.yaml"
    config = yaml.safe_load(shipped.read_text())
    assert config["init_from"] == "kinema-tiny" and config["data"]["kind"] == "folder"
    config["data"].update(root="~/my-videos", width=32, height=32, frames=9, fps=8)
    config.update(out_dir="~/run", batch_size=1, max_steps=2, warmup_steps=1,
                  checkpoint_every=1, sample_every=0, progress=False)  # fmt: skip
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--export", str(tmp_path / "mine")]) == 0
    assert [r["step"] for r in read_log(tmp_path / "run")] == ["1", "2"]
    tuned, tiny = load(str(tmp_path / "mine"), device="cpu"), load(device="cpu")
    assert tuned.vocabulary is None and tiny.vocabulary  # a folder's captions: any words
    assert not torch.equal(tuned.dit.proj_out.weight.float(), tiny.dit.proj_out.weight.float())
    assert tuned.dit.config == tiny.dit.config
