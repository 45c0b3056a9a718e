"""The VAE training loop: reconstruction of random crops, a small KL, then latent statistics.

Each micro-batch takes clips at the run's data position and a random crop of each
(``crop_frames`` x ``crop_size`` x ``crop_size``, offsets from the step's generator). The loss is

    l1_weight * |x - D(z)| + mse_weight * (x - D(z))^2 + kl_weight * KL(q(z|x) || N(0, 1))

with z the posterior mean (or a sample, ``sample_posterior``), all averaged per element. The
decoder runs without the inference-time clamp to [-1, 1] so saturated pixels keep a gradient.
At the end the EMA weights encode ``stats_clips`` full clips and the per-channel latent mean and
std are written into the exported ``VAEConfig`` (``latents_mean`` / ``latents_std``), which is
how the DiT's latents get normalised; the first latent frame, which encodes one image alone and
has statistics of its own, gets its own (``first_frame_mean`` / ``first_frame_std``). Entry
point: :func:`train_vae`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from kinema.io.paths import COMPONENT_ENTRIES
from kinema.train.config import VAETrainConfig
from kinema.train.ema import EMA
from kinema.train.loop import (
    Batch,
    ClipDataset,
    LossFn,
    autocast,
    check_run_folders,
    clip_stream,
    component_folder,
    exit_on_signal,
    freeze,
    record_config,
    start_run,
    train_loop,
)
from kinema.train.state import latest_checkpoint, load_ema


def foreground_pixel(frame: Tensor, g: torch.Generator) -> tuple[int, int] | None:
    """A random (y, x) of ``frame`` (3, H, W) whose colour differs from its row's median (the
    background of flat and vertical-gradient scenes); None when the frame has none."""
    background = frame.median(dim=2, keepdim=True).values  # (3, H, 1)
    ys, xs = torch.nonzero((frame - background).abs().amax(dim=0) > 0.2, as_tuple=True)
    if len(ys) == 0:
        return None
    i = int(torch.randint(0, len(ys), (), generator=g))
    return int(ys[i]), int(xs[i])


def random_crop(
    video: Tensor, size: int, frames: int, g: torch.Generator, object_prob: float = 0.0
) -> Tensor:
    """(B, 3, T, H, W) -> (B, 3, frames, size, size), each clip at its own random offset; with
    probability ``object_prob`` the crop is centred on a foreground pixel instead (small objects
    on large backgrounds otherwise get little of the loss)."""
    b, _, t, h, w = video.shape
    crops = []
    for i in range(b):
        t0 = int(torch.randint(0, t - frames + 1, (), generator=g))
        y0 = int(torch.randint(0, h - size + 1, (), generator=g))
        x0 = int(torch.randint(0, w - size + 1, (), generator=g))
        if object_prob > 0 and float(torch.rand((), generator=g)) < object_prob:
            centre = foreground_pixel(video[i, :, t0], g)
            if centre is not None:
                y0 = min(max(centre[0] - size // 2, 0), h - size)
                x0 = min(max(centre[1] - size // 2, 0), w - size)
        crops.append(video[i, :, t0 : t0 + frames, y0 : y0 + size, x0 : x0 + size])
    return torch.stack(crops)


def kl_to_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """Mean per element of KL(N(mean, exp(logvar)) || N(0, 1))."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()


def vae_loss(config: VAETrainConfig, vae: nn.Module, video: Tensor, g: torch.Generator) -> Tensor:
    """Weighted L1 + MSE reconstruction and KL of one crop batch (B, 3, T, H, W)."""
    # Whole clips in one pass, not Wan's chunk-by-chunk / frame-by-frame inference path (the
    # same values): autograd keeps every activation anyway, and fewer, larger kernels make a
    # step ~20 % faster on a CPU.
    mean, logvar = vae.encode_posterior(video, whole=True)
    z = mean
    if config.sample_posterior:
        eps = torch.randn(mean.shape, generator=g).to(mean.device)
        z = mean + torch.exp(0.5 * logvar) * eps
    recon = vae.decode(z, clamp=False, split_time=False, whole=True)
    err = recon.float() - video.float()
    loss = config.l1_weight * err.abs().mean() + config.mse_weight * err.pow(2).mean()
    return loss + config.kl_weight * kl_to_standard_normal(mean.float(), logvar.float())


def vae_loss_fn(config: VAETrainConfig, vae: nn.Module, device: torch.device) -> LossFn:
    """The loss of one micro-batch of clips: random crops, then :func:`vae_loss`."""

    def loss_fn(batch: Batch, g: torch.Generator) -> Tensor:
        crops = random_crop(
            batch["video"], config.crop_size, config.crop_frames, g, config.object_crop_prob
        )
        with autocast(config, device):
            return vae_loss(config, vae, crops.to(device), g)

    return loss_fn


class _Moments:
    """Running per-channel sum, sum of squares and count of latents (B, C, F, h, w)."""

    def __init__(self) -> None:
        self.total = self.sq = torch.zeros((), dtype=torch.float64)  # grow to (C,) on add
        self.count = 0

    def add(self, z: Tensor) -> None:
        self.total = self.total + z.sum(dim=(0, 2, 3, 4))
        self.sq = self.sq + z.pow(2).sum(dim=(0, 2, 3, 4))
        self.count += z.numel() // z.shape[1]

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std), rounded to 6 decimals."""
        mean = self.total / self.count
        std = (self.sq / self.count - mean.pow(2)).clamp(min=1e-12).sqrt()
        return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


@torch.no_grad()
def latent_stats(vae: nn.Module, clips: Iterable[Tensor]) -> dict[str, tuple[float, ...]]:
    """Per-channel mean and std of the posterior means of ``clips`` (each (B, 3, T, H, W)):
    ``latents_mean`` / ``latents_std`` over all latent frames and ``first_frame_mean`` /
    ``first_frame_std`` over the first (which encodes one image alone), as VAEConfig fields."""
    every, first = _Moments(), _Moments()
    device = next(vae.parameters()).device
    for video in clips:
        z = vae.encode(video.to(device, torch.float32)).double()  # (B, z, F, h, w)
        every.add(z)
        first.add(z[:, :, :1])
    if not every.count:
        raise ValueError("latent_stats needs at least one clip")
    (mean, std), (mean0, std0) = every.mean_std(), first.mean_std()
    return {"latents_mean": mean, "latents_std": std,
            "first_frame_mean": mean0, "first_frame_std": std0}  # fmt: skip


def stats_clips(config: VAETrainConfig, batch: int = 4) -> Iterable[Tensor]:
    """The first ``stats_clips`` full clips of the data, in batches (B, 3, T, H, W) of one
    size (aspect-ratio buckets: a batch ends where the size changes)."""
    ds = ClipDataset(config.data)
    clips: list[Tensor] = []
    for i in range(min(config.stats_clips, len(ds))):
        clip = ds[i][0]  # (3, T, H, W)
        if clips and (len(clips) == batch or clip.shape != clips[0].shape):
            yield torch.stack(clips)
            clips = []
        clips.append(clip)
    if clips:
        yield torch.stack(clips)


def frozen(config: VAETrainConfig) -> tuple[str, ...]:
    """Name prefixes of the parameters a run keeps fixed."""
    return ("encoder.", "quant_conv.") if config.freeze_encoder else ()


def build_vae(config: VAETrainConfig, ckpt: Path | None) -> nn.Module:
    """The VAE to train: from a checkpoint, from ``init_from``, or fresh from ``model``."""
    from kinema.io.checkpoint import load_vae
    from kinema.models.vae import CausalVAE

    if ckpt is not None:
        return load_vae(ckpt / "model", dtype=torch.float32)
    if config.init_from is not None:
        return load_vae(component_folder(config.init_from, "vae"), dtype=torch.float32)
    return CausalVAE(config.model)  # type: ignore[arg-type]


def vae_export_folder(config: VAETrainConfig) -> Path:
    """Where a VAE run exports: ``export_dir``, else ``out_dir/vae``."""
    return Path(config.export_dir or Path(config.out_dir) / "vae")


def export_vae(config: VAETrainConfig, dest: str | Path | None = None) -> Path:
    """EMA weights of the newest checkpoint + measured latent stats -> a VAE component folder."""
    from kinema.io.checkpoint import load_vae, save_component

    ckpt = latest_checkpoint(config.out_dir)
    if ckpt is None:
        raise ValueError(f"{config.out_dir} holds no checkpoint to export")
    vae = freeze(load_vae(ckpt / "model", dtype=torch.float32), frozen(config))
    ema = EMA(vae, 0.0)
    load_ema(ckpt, ema)
    ema.copy_to(vae)
    if not config.freeze_encoder:  # a frozen encoder keeps the statistics the DiT learnt
        vae.config = dataclasses.replace(vae.config, **latent_stats(vae, stats_clips(config)))
    dest = Path(dest or vae_export_folder(config))
    check_run_folders(config.out_dir, dest, COMPONENT_ENTRIES)
    save_component(vae, dest)
    c = vae.config
    print(f"exported {dest}; latent mean {c.latents_mean}, std {c.latents_std}")
    return dest


def train_vae(config: VAETrainConfig, *, stop_after: int | None = None) -> Path:
    """Train (or resume) the VAE; returns the exported VAE folder with latent statistics
    (or ``out_dir`` when ``stop_after`` ended it early). Ctrl-C / SIGTERM save and exit."""
    out = Path(config.out_dir)
    check_run_folders(out, vae_export_folder(config), COMPONENT_ENTRIES, config.data)
    out.mkdir(parents=True, exist_ok=True)
    run = start_run(config, lambda ckpt: build_vae(config, ckpt), frozen=frozen(config))
    ds = ClipDataset(config.data)  # a folder of only broken videos stops it here, unrecorded
    record_config(out, config, run.progress.step)
    seed = config.data.seed + config.seed
    stream = clip_stream(ds, run.progress.samples_seen, config.batch_size, seed, config.num_workers)
    stopped = train_loop(run, stream, vae_loss_fn(config, run.model, run.device), None, stop_after)
    exit_on_signal(stopped, out)
    if run.progress.step < config.max_steps:
        return out
    return export_vae(config)
