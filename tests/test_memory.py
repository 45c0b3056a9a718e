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


def test_a_bf16_decode_is_estimated_with_4_byte_activations_on_the_safe_side() -> None:
    """A bf16 VAE (``kinema.load`` on a GPU with bf16) decodes with a live peak well above
    half the fp32 one, so the estimate keeps 4 bytes an activation: above the peak, by at most
    25 %, where 2 bytes would fall short."""
    config = replace(WAN21_VAE, base_dim=16)
    width, height, frames = 64, 64, 9
    peaks = {}
    for dtype, cache in ((torch.float32, torch.float16), (torch.bfloat16, None)):  # 2-byte caches
        torch.manual_seed(0)
        vae = CausalVAE(config).eval().to(dtype)
        z = torch.randn(1, config.z_dim, 3, height // 8, width // 8).to(dtype)
        with torch.no_grad():
            _, peaks[dtype] = tensor_peak(lambda: vae.decode(z, cache_dtype=cache))  # noqa: B023
    peak = peaks[torch.bfloat16]
    assert peak > 0.75 * peaks[torch.float32]  # 0.87 measured: far from half
    estimate = vae_decode_bytes(config, width, height, frames, nbytes=4, cache_nbytes=2)
    assert peak <= estimate <= 1.25 * peak, (estimate, peak)
    assert vae_decode_bytes(config, width, height, frames, nbytes=2, cache_nbytes=2) < peak


def test_tiled_decode_estimate_is_never_below_the_live_tensor_peak() -> None:
    """The tiled decode's estimate (what an automatic tile size is chosen by) errs high, by
    at most 40 %, and the tiles hold a fraction of the untiled decode's peak."""
    from kinema.memory import tiled_decode_bytes
    from kinema.models.vae import TileSpec

    config = replace(WAN21_VAE, base_dim=16)
    torch.manual_seed(0)
    vae = CausalVAE(config).eval()
    z = torch.randn(1, config.z_dim, 3, 24, 32)  # 256 x 192 pixels, 9 frames
    with torch.no_grad():
        _, untiled = tensor_peak(lambda: vae.decode(z, cache_dtype=torch.float16))
        _, tiled = tensor_peak(
            lambda: vae.decode(z, tile=TileSpec(128, 32), cache_dtype=torch.float16)
        )
    estimate = tiled_decode_bytes(config, 256, 192, 9, 128, cache_nbytes=2)
    assert tiled <= estimate <= 1.4 * tiled, (estimate, tiled)
    assert tiled < 0.5 * untiled


def test_decode_tile_is_none_when_the_decode_fits_else_the_largest_tile_that_does() -> None:
    from kinema.memory import TILE_SIZES, decode_tile, tiled_decode_bytes

    config, (w, h, f) = WAN21_VAE, (1280, 720, 81)
    untiled = vae_decode_bytes(config, w, h, f, cache_nbytes=2)
    assert decode_tile(config, w, h, f, untiled, cache_nbytes=2) is None
    need = {s: tiled_decode_bytes(config, w, h, f, s, cache_nbytes=2) for s in TILE_SIZES}
    assert list(need.values()) == sorted(need.values(), reverse=True)  # smaller tiles, less
    assert all(n < untiled for n in need.values())
    for size in TILE_SIZES[1:]:  # a budget just short of the next larger tile's need
        budget = need[TILE_SIZES[TILE_SIZES.index(size) - 1]] - 1
        assert decode_tile(config, w, h, f, budget, cache_nbytes=2) == size
    assert decode_tile(config, w, h, f, 1, cache_nbytes=2) == TILE_SIZES[-1]  # the leanest


RSS_AFTER_FREE = """
import os, sys, torch
from pathlib import Path
from kinema.memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def rss():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
x = torch.ones(4 * 2**20)  # 16 MiB, touched
held = rss()
del x
print(kept, (held - rss()) / 2**20)
"""


def test_keep_freed_memory_keeps_a_freed_tensor_in_the_process_for_reuse():
    import os
    import subprocess
    import sys

    from kinema.memory import MALLOC_ENV

    env = {k: v for k, v in os.environ.items() if k not in (*MALLOC_ENV, "GLIBC_TUNABLES")}
    run = lambda *args, **extra: subprocess.run(
        [sys.executable, "-c", RSS_AFTER_FREE, *args], env=env | extra, capture_output=True,
        text=True, check=True).stdout.split()  # fmt: skip
    kept, given_back = run("keep")
    assert kept == "True" and float(given_back) < 1  # the 16 MiB stay, to be reused
    kept, given_back = run("default")
    assert kept == "None" and float(given_back) > 15  # glibc's default: unmapped at once
    kept, _ = run("keep", MALLOC_TRIM_THRESHOLD_="131072")  # the user's own setting wins
    assert kept == "False"
    kept, _ = run("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")
    assert kept == "False"
    kept, _ = run("keep", GLIBC_TUNABLES="glibc.pthread.rseq=0")  # not malloc's: kept
    assert kept == "True"
