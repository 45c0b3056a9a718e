"""A peak-memory estimate for a request, from configs alone (no forward pass).

peak ~= weights + max(DiT activations, VAE decode), plus on a CPU what the runtime holds. The
DiT term counts the live tensors of one block at inference (residual, q/k/v, attention output,
FFN hidden) for the guidance batch. The VAE term follows how
:class:`~kinema.models.vae.CausalVAE` decodes: one latent frame at a time, the full-resolution
stages one output frame at a time, so its peak is the causal cache (two input frames for every
causal convolution, at that convolution's resolution), the chunk entering the full-resolution
stages, a few live full-resolution feature maps, and the decoded video.
Checked against measured peaks by ``benchmarks/harness.py`` (end-to-end table) and against the
live tensors of a decode (``tests/test_memory.py``).
"""

from __future__ import annotations

import ctypes
import math
import os
from pathlib import Path
from typing import Any

# Full-resolution feature maps of one frame (at the stage's channels) alive at once in the
# decoder's inference path: a residual block's input, its conv's time-padded input (3 frames)
# and output, and the upsampler's doubled channels just before (bench.TensorPeak: 7.0 at
# Wan 2.1's VAE, 208x120x81 and 104x64x17).
LIVE_MAPS = 7


# What a request's peak RSS on a CPU holds beyond its tensors (allocator arenas, oneDNN's
# scratch and reordered weights): 25-27 MiB at both CPU harness shapes, whose tensor peaks
# differ 5x (benchmarks/results/cpu-fp32-e2e-lean.json). A GPU's max_memory_allocated
# counts tensors only.
CPU_RUNTIME_BYTES = 24 * 2**20


def weight_bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def dit_activation_bytes(config: Any, tokens: int, context: int, batch: int, nbytes: int) -> int:
    """Live activations of one DiT block: (B, N, D) tensors and the FFN hidden state."""
    d = config.num_heads * config.head_dim
    per_token = 6 * d + config.ffn_dim  # x, norm, q, k, v, attention out + FFN hidden
    return batch * (tokens * per_token + 3 * context * d) * nbytes


def _decoder_stages(config: Any) -> list[tuple[int, int, int, int]]:
    """Per decoder stage: (input channels, output channels, causal convs, scale vs latent)."""
    mult = config.dim_mult
    dims = [config.base_dim * m for m in (mult[-1], *mult[::-1])]
    stages = [(dims[0], dims[0], 1 + 4, 1)]  # conv_in + mid block (2 residual blocks)
    for i in range(len(mult)):
        c_in = dims[i] // 2 if i > 0 else dims[i]
        convs = 2 * (config.num_res_blocks + 1) + (1 if i < len(mult) - 1 else 0)
        stages.append((c_in, dims[i + 1], convs, 2**i))
    return stages


def vae_cache_bytes(config: Any, width: int, height: int, nbytes: int = 4) -> int:
    """The decoder's causal cache: two input frames per causal conv at its resolution."""
    s = config.spatial_factor
    h, w = height // s, width // s
    total = 2 * config.z_dim * h * w  # conv_in sees the latents
    for c_in, c_out, convs, scale in _decoder_stages(config):
        total += 2 * convs * max(c_in, c_out) * h * w * scale * scale
    return total * nbytes


def vae_decode_bytes(
    config: Any, width: int, height: int, frames: int, nbytes: int = 4, cache_nbytes: int = 4
) -> int:
    """Peak of a decode: cache (``cache_nbytes`` per value: 2 for the pipeline's fp16 cache of
    an fp32 VAE) + the chunk entering the full-resolution stages (temporal factor frames at
    half resolution) + live full-resolution maps of one frame + the output video (written
    into one preallocated tensor)."""
    full = config.base_dim * config.dim_mult[0]
    pixels = width * height
    chunk = config.temporal_factor * 2 * full * pixels // 4  # (B, 2C, 4, H/2, W/2)
    live = LIVE_MAPS * full * pixels
    video = 3 * frames * pixels
    return vae_cache_bytes(config, width, height, cache_nbytes) + (chunk + live + video) * nbytes


def free_bytes(device: Any) -> int | None:
    """Memory a computation on ``device`` may still take: on a GPU its free memory plus what
    torch's allocator holds unused; on a CPU under Linux the kernel's ``MemAvailable``; None
    where neither is known."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    meminfo = Path("/proc/meminfo")
    if device.type == "cpu" and meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    return None


# glibc's mallopt parameters, its largest mmap threshold on 64 bits (HEAP_MAX_SIZE / 2) and the
# environment variables through which a user sets them (then kinema leaves them alone), besides
# a glibc.malloc tunable in GLIBC_TUNABLES.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 2**20
MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Let this process reuse the host memory its tensors free (glibc's malloc).

    By default glibc maps every block over its mmap threshold fresh from the kernel and hands
    the heap's free top back at every free, so the next layer's activation of the same size
    page-faults its way in again: on a CPU that first touch was a tenth of a kinema-tiny
    forward. With blocks up to 32 MiB from the heap and no trimming, freed tensors are reused;
    the peak RSS stays what the computation needs (``benchmarks/results``), but memory freed
    after a peak stays with the process until it exits. The CLI calls this for the commands
    that run models (not ``bench``, which measures RSS). Returns whether it took effect: not
    off glibc, nor where the user set malloc's own variables (``MALLOC_ENV``, a glibc.malloc
    tunable).
    """
    user_set = any(name in os.environ for name in MALLOC_ENV)
    if user_set or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    trim = mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))
    mmap = mallopt(M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD_MAX))
    return bool(trim and mmap)


# Tile sizes (output pixels, overlap a quarter of the size) an automatic tiled decode tries,
# largest first: the fewer tiles, the fewer seams.
TILE_SIZES = (512, 384, 256, 192, 128)


def tiled_decode_bytes(
    config: Any, width: int, height: int, frames: int, size: int, cache_nbytes: int = 4
) -> int:
    """Peak of a decode in square tiles of ``size`` output pixels (``vae.tiled_apply``): while
    a tile decodes, the finished rows (up to a video) and the previous and current rows of
    decoded tiles (which the blend reads); at the end, the finished rows, the video they are
    joined into and the last row."""
    tile_w, tile_h = min(size, width), min(size, height)
    one = vae_decode_bytes(config, tile_w, tile_h, frames, cache_nbytes=cache_nbytes)
    row, video = 3 * frames * tile_h * width * 4, 3 * frames * width * height * 4
    return max(one + video + 2 * row, 2 * video + row)


def decode_tile(
    config: Any, width: int, height: int, frames: int, budget: int, cache_nbytes: int = 4
) -> int | None:
    """The tile size (output pixels) for a decode that must fit in ``budget`` bytes: None when
    the untiled decode fits (tiles cost seams and time), else the largest of ``TILE_SIZES``
    whose tiled decode fits, or the smallest when none does."""
    if vae_decode_bytes(config, width, height, frames, cache_nbytes=cache_nbytes) <= budget:
        return None
    sizes = [s for s in TILE_SIZES if s < max(width, height)] or [TILE_SIZES[-1]]
    for size in sizes:
        if tiled_decode_bytes(config, width, height, frames, size, cache_nbytes) <= budget:
            return size
    return sizes[-1]


def estimate_peak_bytes(
    pipe: Any, width: int, height: int, frames: int, dtype_bytes: int, device: str | None = None
) -> int:
    """Estimated peak bytes for one request of ``pipe`` with weights of ``dtype_bytes`` on a
    ``device`` of this type ("cpu", "cuda"; default: where ``pipe`` computes). A clip longer
    than the model's window is made window by window, so it peaks as one window does.

    On a GPU the text and image encoders visit it only to encode, before the sampling and the
    decode (:func:`kinema.offload.encoders_visit`), so the peak is the DiT's and VAE's weights
    plus the larger of the encoders' weights and the request's work; on a CPU, one memory, it
    is the sum of all."""
    from kinema.offload import encoders_visit

    params = sum(p.numel() for p in pipe.dit.parameters())
    weights = params * dtype_bytes + weight_bytes(pipe.vae)
    encoders = encoder_bytes(pipe, dtype_bytes)
    work = work_bytes(pipe, width, height, frames, dtype_bytes, device)
    if encoders_visit(device or pipe.device.type):
        return int(weights + max(encoders, work))
    return int(weights + encoders + work)


def encoder_bytes(pipe: Any, dtype_bytes: int) -> int:
    """Weights of the text encoder (in the DiT's dtype) and of an image encoder (float32)
    (umT5-XXL: 11 GB in bf16, several times Wan 1.3B's DiT)."""
    from kinema.offload import text_model

    _, model = text_model(pipe.text_encoder)  # behind its cache
    total = sum(p.numel() for p in model.parameters()) * dtype_bytes if model is not None else 0
    image = getattr(pipe.image_encoder, "model", None)
    return total + (weight_bytes(image) if image is not None else 0)


def process_bytes() -> int | None:
    """This process's resident memory now (Linux; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def check_fits(pipe: Any, width: int, height: int, frames: int, budget: int | None,
               where: str) -> None:  # fmt: skip
    """Raise ValueError when a request's estimated peak (:func:`work_bytes`, what ``kinema
    info`` prints, less the loaded weights) is over ``budget`` bytes (None: unknown, no
    check): a size far past the model's would take the machine down mid-step. ``where``
    names whose budget it is ("this server", "this machine")."""
    if budget is None:
        return
    need = work_bytes(pipe, width, height, frames, pipe.dtype.itemsize)
    if need > budget:
        d = pipe.defaults
        raise ValueError(f"size {width}x{height} needs about {need / 2**30:.1f} GiB at its "
                         f"peak; {where} has {budget / 2**30:.1f} GiB for a job: ask for a "
                         f"smaller size (the model's is {d.width}x{d.height})")  # fmt: skip


def work_bytes(
    pipe: Any, width: int, height: int, frames: int, dtype_bytes: int, device: str | None = None
) -> int:
    """:func:`estimate_peak_bytes` beyond the weights: what a request adds to a loaded model
    (the DiT's activations or the VAE decode, whichever is larger, and a CPU's runtime)."""
    from kinema.models.vae import LEAN_CACHE

    frames = min(frames, pipe.window_frames)
    c, v = pipe.dit.config, pipe.vae.config
    vae_dtype = next(pipe.vae.parameters()).dtype
    cache_nbytes = LEAN_CACHE.get(vae_dtype, vae_dtype).itemsize
    lat_f = (frames - 1) // v.temporal_factor + 1
    s = v.spatial_factor
    tokens = lat_f * (height // s) * (width // s) // math.prod(c.patch_size)
    dit = dit_activation_bytes(c, tokens, 512, 2, dtype_bytes)
    vae = vae_decode_bytes(v, width, height, frames, cache_nbytes=cache_nbytes)
    runtime = CPU_RUNTIME_BYTES if (device or pipe.device.type) == "cpu" else 0
    return int(max(dit, vae) + runtime)
