"""``kinema info``'s VAE decode estimate against the live tensors of a real decode."""

from __future__ import annotations

from dataclasses import replace

import torch

from kinema.bench import tensor_peak
from kinema.configs import WAN21_VAE
from kinema.memory import vae_cache_bytes, vae_decode_bytes
from kinema.models.vae import CausalVAE


def test_decode_estimate_is_within_15_percent_of_the_live_tensor_peak() -> None:
    """Wan 2.1's VAE at a sixth of its width (16 base channels), decoded as the pipeline does
    (one latent frame and one full-resolution frame a pass, fp16 cache for the fp32 VAE)."""
    config = replace(WAN21_VAE, base_dim=16)
    torch.manual_seed(0)
    vae = CausalVAE(config).eval()
    width, height, frames = 64, 64, 9
    z = torch.randn(1, config.z_dim, 3, height // 8, width // 8)
    with torch.no_grad():
        video, peak = tensor_peak(lambda: vae.decode(z, cache_dtype=torch.float16))
    assert video.shape == (1, 3, frames, height, width)
    estimate = vae_decode_bytes(config, width, height, frames, nbytes=4, cache_nbytes=2)
    assert 0.85 * peak <= estimate <= 1.15 * peak, (estimate, peak)
    # the cache alone is a third or more of the peak: an estimate without it would fail
    assert vae_cache_bytes(config, width, height, 2) > 0.3 * peak
