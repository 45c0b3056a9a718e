"""What a request is conditioned on, beyond the text.

Text-to-video, image-to-video, video-to-video and extension differ only here: a
:class:`FrameCondition` holds clean latent frames and a per-frame mask. The DiT sees the clean
frames in place of the noisy ones with timestep 0 (Wan 2.2 TI2V style); the sampler itself is
untouched because :func:`condition_frames` wraps the model function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class FrameCondition:
    """Clean latent frames to keep fixed during sampling.

    ``latents`` (B, C, F, H, W) normalised latents (only masked frames are read);
    ``mask`` (F,) bool, True where the frame is given.
    """

    latents: Tensor
    mask: Tensor

    def impose(self, x: Tensor) -> Tensor:
        """x with the given frames replaced by the clean ones."""
        m = self.mask.to(x.device)[None, None, :, None, None]
        return torch.where(m, self.latents.to(x.device, x.dtype), x)

    def frame_timesteps(self, t: Tensor, batch: int) -> Tensor:
        """One timestep per latent frame (B, F): ``t`` on free frames, 0 on given ones."""
        free = (~self.mask).to(device=t.device, dtype=torch.float32)
        return (t.float().reshape(-1, 1) * free[None]).expand(batch, -1)


def condition_frames(model_fn: ModelFn, cond: FrameCondition | None) -> ModelFn:
    """Wrap ``model_fn(x, t)`` so the given frames are clean and at timestep 0."""
    if cond is None:
        return model_fn

    def fn(x: Tensor, t: Tensor) -> Tensor:
        return model_fn(cond.impose(x), cond.frame_timesteps(t, x.shape[0]))

    return fn
