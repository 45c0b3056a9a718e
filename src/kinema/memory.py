"""A peak-memory estimate for a request, from configs alone (no forward pass).

peak ~= weights + max(DiT activations, VAE decode activations). The DiT term counts the live
tensors of one block at inference (residual, q/k/v, attention output, FFN hidden) for the
guidance batch; the VAE term the widest full-resolution feature maps of one decoded chunk.
"""

from __future__ import annotations

import math
from typing import Any


def weight_bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def dit_activation_bytes(config: Any, tokens: int, context: int, batch: int, nbytes: int) -> int:
    """Live activations of one DiT block: (B, N, D) tensors and the FFN hidden state."""
    d = config.num_heads * config.head_dim
    per_token = 6 * d + config.ffn_dim  # x, norm, q, k, v, attention out + FFN hidden
    return batch * (tokens * per_token + 3 * context * d) * nbytes


def vae_decode_bytes(config: Any, width: int, height: int, nbytes: int = 4) -> int:
    """Widest feature maps of one decoded chunk (4 frames at full size, with cache frames)."""
    widths = [config.base_dim * m for m in config.dim_mult]
    stage = [widths[i] * (width * height) / 4 ** (len(widths) - 1 - i) for i in range(len(widths))]
    return int(max(stage) * (4 + 2) * 3 * nbytes)


def estimate_peak_bytes(pipe: Any, width: int, height: int, frames: int, dtype_bytes: int) -> int:
    """Estimated peak bytes for one request of ``pipe`` with weights of ``dtype_bytes``."""
    c, v = pipe.dit.config, pipe.vae.config
    lat_f = (frames - 1) // v.temporal_factor + 1
    s = v.spatial_factor
    tokens = lat_f * (height // s) * (width // s) // math.prod(c.patch_size)
    params = sum(p.numel() for p in pipe.dit.parameters())
    weights = params * dtype_bytes + weight_bytes(pipe.vae)
    dit = dit_activation_bytes(c, tokens, 512, 2, dtype_bytes)
    return int(weights + max(dit, vae_decode_bytes(v, width, height)))
