"""Wan 2.1 image-to-video checkpoints: channel conditioning plus CLIP image tokens.

Wan 2.1 I2V (and first-last-frame, FLF2V) DiTs take 36 input channels: the 16 noisy latent
channels followed by a 20-channel condition -- a 4-channel-per-latent-frame mask of the given
pixel frames and the VAE latents of a video that holds the given frames and zeros elsewhere.
Cross-attention also reads CLIP ViT tokens of the image(s), ``hidden_states[-2]`` of the vision
tower. The sampler never sees any of this: :func:`image_conditioned` wraps the model function.

Reference: diffusers ``WanImageToVideoPipeline`` (``encode_image``, ``prepare_latents``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kinema.io.checkpoint import CheckpointError

ImageModelFn = Callable[..., Tensor]  # (x, t, context, image) -> velocity
ContextModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, t, context) -> velocity


@dataclass(frozen=True)
class ImageCondition:
    """What a Wan I2V DiT is conditioned on besides the text.

    ``channels`` (1, 4 + C, F, h, w): the frame mask (4 channels per latent frame) followed by
    the normalised latents of the condition video; ``tokens`` (N, L, image_dim): CLIP tokens of
    the N images (N = 2 for first-last-frame models, read as one sequence of 2L tokens), or
    ``None`` for a DiT without image cross-attention.
    """

    channels: Tensor
    tokens: Tensor | None


def needs_image_encoder(path: Path) -> bool:
    """True when a diffusers Wan folder's DiT reads CLIP image tokens (``image_dim`` set)."""
    import json

    config = path / "transformer" / "config.json"
    return config.exists() and json.loads(config.read_text()).get("image_dim") is not None


class CLIPImageEncoder:
    """The CLIP vision tower of a Wan I2V folder (``image_encoder/``, ``image_processor/``),
    through ``transformers``; :meth:`encode` gives the penultimate layer's tokens."""

    def __init__(self, model: torch.nn.Module, processor: Any) -> None:
        self.model, self.processor = model, processor

    @classmethod
    def from_pretrained(cls, path: Path, device: torch.device) -> CLIPImageEncoder:
        """Load from a diffusers folder; float32, as diffusers' Wan I2V examples load it."""
        from transformers import AutoImageProcessor, CLIPVisionModel

        for part in ("image_encoder", "image_processor"):
            if not (path / part).is_dir():
                raise CheckpointError(f"missing {path / part} (the DiT reads CLIP image tokens)")
        from transformers.utils import logging as hf_logging

        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # its "Loading weights" bar ignored kinema's -q
        try:
            model = CLIPVisionModel.from_pretrained(path / "image_encoder", dtype=torch.float32)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        processor = AutoImageProcessor.from_pretrained(path / "image_processor")
        return cls(model.to(device).eval(), processor)

    def save_pretrained(self, folder: Path) -> None:
        """Write ``folder/image_encoder`` and ``folder/image_processor`` (diffusers layout)."""
        self.model.save_pretrained(str(folder / "image_encoder"))
        self.processor.save_pretrained(str(folder / "image_processor"))

    def encode(self, images: list[np.ndarray]) -> Tensor:
        """uint8 images (H, W, 3) -> tokens (N, L, image_dim), ``hidden_states[-2]``."""
        from PIL import Image

        device = next(self.model.parameters()).device
        pixels = self.processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")
        with torch.inference_mode():
            out = self.model(pixels["pixel_values"].to(device), output_hidden_states=True)
        return out.hidden_states[-2].float()


def frame_mask(known: Tensor, temporal: int, size: tuple[int, int]) -> Tensor:
    """Pixel-frame mask (T,) bool, T = 1 + temporal (F - 1) -> mask channels
    (1, temporal, F, h, w): latent frame f, channel c is pixel frame ``temporal f + c`` of the
    mask with its first frame repeated ``temporal`` times (the first latent frame holds one)."""
    m = known.float()
    m = torch.cat([m[:1].expand(temporal), m[1:]])  # (temporal F,)
    m = m.reshape(-1, temporal).T  # (temporal, F)
    return m[None, :, :, None, None].expand(1, -1, -1, *size).contiguous()


def condition_video(frames: dict[int, np.ndarray], count: int) -> tuple[Tensor, Tensor]:
    """Given frames {index: uint8 (H, W, 3)} -> video (1, 3, count, H, W) in [-1, 1] with zeros
    at the other frames, and the pixel-frame mask (count,) bool."""
    h, w = next(iter(frames.values())).shape[:2]
    video = torch.zeros(1, 3, count, h, w)
    known = torch.zeros(count, dtype=torch.bool)
    for i, frame in frames.items():
        pixels = torch.tensor(frame).permute(2, 0, 1)  # (3, H, W), a copy: read-only is fine
        video[0, :, i] = pixels.float() / 127.5 - 1
        known[i] = True
    return video, known


def build_condition(
    vae: Any, frames: dict[int, np.ndarray], count: int, tokens: Tensor | None,
    device: torch.device,
) -> ImageCondition:  # fmt: skip
    """The channel condition for a clip of ``count`` pixel frames whose ``frames`` are given."""
    video, known = condition_video(frames, count)
    vae_dtype = next(vae.parameters()).dtype
    with torch.inference_mode():
        latents = vae.normalize(vae.encode(video.to(device, vae_dtype))).float()  # (1, C, F, h, w)
    mask = frame_mask(known, vae.config.temporal_factor, tuple(latents.shape[-2:]))
    tokens = tokens.to(device) if tokens is not None else None
    return ImageCondition(torch.cat([mask.to(device), latents], dim=1), tokens)


def image_conditioned(velocity: ImageModelFn, cond: ImageCondition) -> ContextModelFn:
    """Wrap ``velocity(x, t, context, image)`` into ``fn(x, t, context)`` for an I2V DiT:
    x (B, C, F, h, w) -> cat([x, channels]) (B, C + 4 + C, F, h, w), with the image tokens
    repeated per sample ((B N, L, image_dim); first-last-frame pairs stay adjacent)."""

    def fn(x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        b = x.shape[0]
        y = cond.channels.to(x.device, x.dtype).expand(b, -1, -1, -1, -1)
        tokens = cond.tokens.repeat(b, 1, 1) if cond.tokens is not None else None
        return velocity(torch.cat([x, y], dim=1), t, context, tokens)

    return fn
