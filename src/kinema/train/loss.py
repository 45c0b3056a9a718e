"""Rectified-flow (flow-matching) training objective, as pure functions.

With clean latents x0, noise n and sigma s in (0, 1) the network sees

    x_s = (1 - s) x0 + s n          and is trained to predict   v = n - x0,

the velocity that the Euler sampler integrates from s = 1 (noise) to s = 0 (Liu et al. 2022,
"Flow Straight and Fast"; Esser et al. 2024, SD3). Sigmas are drawn logit-normal and shifted
towards noise as in SD3 / Wan: s = shift * u / (1 + (shift - 1) * u).

Frame conditioning (image-to-video, extension) is trained by giving some latent frames clean:
they replace the noisy frames, carry timestep 0, and are left out of the loss (Wan 2.2 TI2V).
Every random draw takes an explicit ``torch.Generator``; nothing here holds state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """s -> shift*s / (1 + (shift-1)*s): the flow shift of SD3 / Wan (1 = unchanged)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_timesteps(
    batch: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0, shift: float = 1.0
) -> Tensor:
    """Sigmas (B,) in (0, 1): sigmoid of N(mean, std^2), then shifted (SD3 logit-normal)."""
    u = torch.randn(batch, generator=generator) * std + mean
    return shift_sigmas(torch.sigmoid(u), shift)


def sample_cond_mask(
    batch: int,
    frames: int,
    probs: Sequence[float],
    generator: torch.Generator,
    max_frames: int = 3,
) -> Tensor:
    """Which latent frames are given clean, (B, F) bool.

    Per sample, with ``probs`` = (P(none), P(first frame), P(first k frames)): nothing; the first
    latent frame (image-to-video); or the first k frames, k uniform in [2, max_frames] and at
    most F - 1 -- the last k latent frames of a previous clip, as a continuation sees them.
    """
    if len(probs) != 3:
        raise ValueError(f"probs must be (none, first frame, first k), got {tuple(probs)}")
    mode = torch.multinomial(
        torch.tensor(probs, dtype=torch.float64), batch, True, generator=generator
    )
    k_hi = max(1, min(max_frames, frames - 1))
    k = torch.randint(min(2, k_hi), k_hi + 1, (batch,), generator=generator)
    given = torch.stack([torch.zeros_like(k), torch.ones_like(k), k])  # (3, B)
    n_clean = given.gather(0, mode[None]).squeeze(0)  # (B,)
    return torch.arange(frames)[None] < n_clean[:, None]  # (B, F)


def drop_captions(captions: Sequence[str], p: float, generator: torch.Generator) -> list[str]:
    """Each caption replaced by "" (the empty / negative prompt) with probability ``p``."""
    drop = torch.rand(len(captions), generator=generator) < p
    return ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]


def noisy_input(x0: Tensor, noise: Tensor, sigmas: Tensor, cond_mask: Tensor) -> Tensor:
    """x_s = (1-s) x0 + s n on free frames, clean x0 on conditioned ones; (B, C, F, H, W)."""
    s = sigmas.to(x0.dtype)[:, None, None, None, None]  # (B, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    keep = cond_mask.to(x0.device)[:, None, :, None, None]  # (B, 1, F, 1, 1)
    return torch.where(keep, x0, x_t)


def frame_timesteps(sigmas: Tensor, cond_mask: Tensor, scale: float = 1000.0) -> Tensor:
    """Per-frame timesteps (B, F): sigma * scale on free frames, 0 on conditioned ones."""
    t = sigmas.float()[:, None] * scale  # (B, 1)
    return torch.where(cond_mask, torch.zeros_like(t), t)  # (B, F)


def flow_matching_loss(
    model_fn: ModelFn,
    x0: Tensor,
    noise: Tensor,
    sigmas: Tensor,
    context: Tensor,
    cond_mask: Tensor | None = None,
    num_train_timesteps: int = 1000,
) -> Tensor:
    """Mean squared velocity error over the free (non-conditioned) frames.

    x0, noise (B, C, F, H, W); sigmas (B,); context (B, L, D); cond_mask (B, F) bool (None: all
    free). ``model_fn(x_t, timesteps (B, F), context)`` returns the velocity (B, C, F, H, W).
    """
    b, _, f = x0.shape[:3]
    if cond_mask is None:
        cond_mask = torch.zeros(b, f, dtype=torch.bool, device=x0.device)
    cond_mask = cond_mask.to(x0.device)
    x_t = noisy_input(x0, noise, sigmas, cond_mask)
    t = frame_timesteps(sigmas.to(x0.device), cond_mask, num_train_timesteps)
    pred = model_fn(x_t, t, context).float()
    err = (pred - (noise - x0).float()).pow(2).mean(dim=(1, 3, 4))  # (B, F)
    free = (~cond_mask).float()
    return (err * free).sum() / free.sum().clamp(min=1)
