"""Side-by-side benchmarks against diffusers (``kinema bench``, ``benchmarks/harness.py``).

The same random weights go into kinema and into diffusers (``WanTransformer3DModel``,
``AutoencoderKLWan``, ``WanPipeline``; diffusers is a benchmark-only dependency). Every
measurement alternates the two in one process, so background load hits both alike, and reports
medians and their ratio (kinema / diffusers; below 1 is faster). Outputs are compared in the same
run. Peak memory is ``max_memory_allocated`` on CUDA and the resident set size (RSS, sampled by a
thread, above the RSS before the call) on the CPU. Achieved FLOP/s use an analytic FLOP count of
the forward (:func:`dit_flops`); MFU is that against a matmul peak measured on the same machine
and dtype (:func:`matmul_peak`).
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import statistics
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kinema.configs import WAN21_T2V_1_3B, WAN21_VAE, DiTConfig, VAEConfig
from kinema.models.ops import cpu_has_bf16, linear

# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchShape:
    """One benchmark configuration: model shapes (random weights) and the request size."""

    name: str
    dit: DiTConfig
    vae: VAEConfig
    width: int
    height: int
    frames: int
    context_len: int  # text tokens per prompt
    steps: int = 20
    guidance: float = 4.0
    shift: float = 2.0
    gpu_only: bool = False  # too big to benchmark on a CPU


TINY_DIT = DiTConfig(num_heads=4, head_dim=64, text_dim=384, freq_dim=128, ffn_dim=1024,
                     num_layers=8)  # fmt: skip
TINY_VAE = VAEConfig(base_dim=16, num_res_blocks=1)
SHAPES = {
    "kinema-tiny": BenchShape("kinema-tiny", TINY_DIT, TINY_VAE, 128, 128, 33, 32),
    "small-wan": BenchShape(
        "small-wan",
        DiTConfig(num_heads=6, head_dim=64, ffn_dim=1536, num_layers=6, text_dim=512),
        VAEConfig(base_dim=24, num_res_blocks=1),
        256,
        256,
        17,
        64,
        steps=10,
    ),  # fmt: skip
    "wan2.1-1.3b": BenchShape(
        "wan2.1-1.3b",
        WAN21_T2V_1_3B,
        WAN21_VAE,
        832,
        480,
        81,
        512,
        steps=50,
        guidance=5.0,
        shift=3.0,
        gpu_only=True,
    ),  # fmt: skip
}


def latent_shape(s: BenchShape, batch: int = 1) -> tuple[int, int, int, int, int]:
    """(B, z, F, h, w) of a request of shape ``s``."""
    f = (s.frames - 1) // s.vae.temporal_factor + 1
    sf = s.vae.spatial_factor
    return (batch, s.dit.in_channels, f, s.height // sf, s.width // sf)


def tokens_of(s: BenchShape) -> int:
    _, _, f, h, w = latent_shape(s)
    pt, ph, pw = s.dit.patch_size
    return (f // pt) * (h // ph) * (w // pw)


# ---------------------------------------------------------------------------------------------
# The machine, FLOPs and the matmul peak
# ---------------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores, threads, GPU, versions."""
    cpu = platform.processor() or "unknown"
    if Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                 .splitlines() if ln.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_bf16": cpu_has_bf16(), "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device)}  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return info


def dit_flops(c: DiTConfig, tokens: int, context_len: int, batch: int) -> int:
    """FLOPs of one DiT forward (matmuls and attention; 2 per multiply-add).

    Per block: q/k/v/out of self-attention and q/out of cross-attention (8 N D^2 + 4 N D^2),
    cross k/v on the text (4 L D^2), the FFN (4 N D F), self-attention (4 N^2 D) and
    cross-attention (4 N L D); plus the text embedder and the output projection. One Wan 2.1
    1.3B forward at 480x832x81 (N = 32,760, L = 512) is ~283 TFLOP, 70 % in attention.
    """
    n, d, f, ell = tokens, c.dim, c.ffn_dim, context_len
    block = 12 * n * d * d + 4 * ell * d * d + 4 * n * d * f + 4 * n * n * d + 4 * n * ell * d
    text = 2 * ell * (c.text_dim * d + d * d)
    head = 2 * n * d * c.out_channels * int(np.prod(c.patch_size))
    patch = 2 * n * d * c.in_channels * int(np.prod(c.patch_size))
    return batch * (c.num_layers * block + text + head + patch)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5
) -> float:
    """Measured FLOP/s of an n x n x n matmul (median of ``repeats``) on this device/dtype,
    the faster of torch's matmul and :func:`kinema.models.ops.linear` (which takes oneDNN's
    kernel on a CPU, faster than the MKL one ``@`` takes on AMD CPUs); ``n`` defaults to 8192
    on a GPU (long enough to hide the launch) and 2048 on a CPU."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    kernels = [lambda: a @ b]
    if device.type == "cpu":  # elsewhere ops.linear is F.linear: the same kernel as @
        kernels.append(lambda: linear(a, b))
    with torch.no_grad():
        best = min(statistics.median(timed(fn, repeats, device)) for fn in kernels)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------


def timed(
    fn: Callable[[], Any], repeats: int, device: torch.device, warmup: int = 1
) -> list[float]:
    """Seconds per call of ``fn`` (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - start)
    return out


def alternate(
    fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device, warmup: int = 1
) -> dict[str, list[float]]:
    """Time several functions in turn (a, b, a, b, ...): seconds per call for each name."""
    for fn in fns.values():
        timed(fn, 0, device, warmup)
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            out[name] += timed(fn, 1, device, warmup=0)
    return out


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def return_freed_memory() -> None:
    """Make freed host memory leave the RSS (glibc: big blocks by mmap, trim the heap)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD = 64 KiB: big tensors are unmapped on free
        libc.malloc_trim(0)


def rss_bytes() -> int:
    """Resident set size of this process."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


class RSSPeak:
    """Peak RSS above the starting RSS while the ``with`` body runs (sampled every ~0.5 ms)."""

    def __enter__(self) -> RSSPeak:
        return_freed_memory()
        self.start = self.peak = rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def bytes(self) -> int:
        return self.peak - self.start


class TensorPeak(TorchDispatchMode):
    """Peak bytes of tensor storage allocated and alive inside the ``with`` body, counted at
    every aten op: what a GPU's ``max_memory_allocated`` sees, here on any device and the same
    on every run (no allocator or page effects, unlike an RSS peak). Storage that existed
    before the body (weights, inputs) is not counted, nor are kernels' internal workspaces.
    """

    def __enter__(self) -> TensorPeak:
        self.live = self.peak = 0
        # storage pointer -> [live tensors seen, bytes counted (0 for storage made before)]
        self.storages: dict[int, list[int]] = {}
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, Tensor) and _storage_ptr(t) not in self.storages:
                self._track(t, nbytes=0)  # first seen as an input: allocated before the body
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self._track(t, nbytes=t.untyped_storage().nbytes())
        return out

    def _track(self, t: Tensor, nbytes: int) -> None:
        ptr = _storage_ptr(t)
        if ptr == 0:  # no storage (empty or meta)
            return
        entry = self.storages.get(ptr)
        if entry is None:
            entry = self.storages[ptr] = [0, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        entry = self.storages[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.storages[ptr]


def _storage_ptr(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def tensor_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn``; return its result and its :class:`TensorPeak` (bytes)."""
    with TensorPeak() as tp:
        out = fn()
    return out, tp.peak


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int]:
    """Run ``fn``; return its result and the peak memory it added (bytes; see module notes)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - base
    with RSSPeak() as meter:
        out = fn()
    return out, meter.bytes


def summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "n": len(times)}


def ratio(ours: list[float], theirs: list[float]) -> float:
    """Median kinema time over median diffusers time."""
    return statistics.median(ours) / statistics.median(theirs)


def psnr(a: Tensor | np.ndarray, b: Tensor | np.ndarray, peak: float) -> float:
    """Peak signal-to-noise ratio in dB of ``a`` against ``b`` (inf when equal)."""
    a, b = (torch.as_tensor(x).detach().cpu().double() for x in (a, b))
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


# ---------------------------------------------------------------------------------------------
# Twins: the same weights in kinema and diffusers
# ---------------------------------------------------------------------------------------------


def diffusers_dit_kwargs(c: DiTConfig) -> dict[str, Any]:
    """``WanTransformer3DModel`` arguments for a kinema :class:`DiTConfig`."""
    return dict(
        patch_size=c.patch_size, num_attention_heads=c.num_heads, attention_head_dim=c.head_dim,
        in_channels=c.in_channels, out_channels=c.out_channels, text_dim=c.text_dim,
        freq_dim=c.freq_dim, ffn_dim=c.ffn_dim, num_layers=c.num_layers,
        cross_attn_norm=c.cross_attn_norm, qk_norm="rms_norm_across_heads" if c.qk_norm else None,
        eps=c.eps, rope_max_seq_len=c.rope_max_seq_len,
    )  # fmt: skip


def diffusers_vae_kwargs(c: VAEConfig) -> dict[str, Any]:
    """``AutoencoderKLWan`` arguments for a kinema :class:`VAEConfig`."""
    return dict(
        base_dim=c.base_dim, z_dim=c.z_dim, dim_mult=list(c.dim_mult),
        num_res_blocks=c.num_res_blocks, attn_scales=list(c.attn_scales),
        temperal_downsample=list(c.temporal_downsample), dropout=c.dropout,
        latents_mean=list(c.latents_mean), latents_std=list(c.latents_std),
    )  # fmt: skip


def _twins(ours: type, theirs: type, config: Any, kwargs: dict[str, Any], device: torch.device,
           dtype: torch.dtype, seed: int) -> tuple:  # fmt: skip
    """diffusers' ``theirs(**kwargs)`` with random weights from ``seed``, and kinema's
    ``ours(config)`` loaded strictly from its state dict: (ours, theirs) on device, dtype."""
    from diffusers.utils import logging as diffusers_logging

    torch.manual_seed(seed)
    reference = theirs(**kwargs).eval()
    model = ours(config).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    verbosity = diffusers_logging.get_verbosity()
    if dtype == torch.float32:  # its "modules that should be kept in float32" warning: they are
        diffusers_logging.set_verbosity_error()
    try:
        return model.to(device, dtype), reference.to(device, dtype)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def twin_dits(c: DiTConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple:
    """(kinema VideoDiT, diffusers WanTransformer3DModel) with the same random weights."""
    from diffusers import WanTransformer3DModel

    from kinema.models.dit import VideoDiT

    return _twins(VideoDiT, WanTransformer3DModel, c, diffusers_dit_kwargs(c), device, dtype, seed)


def twin_vaes(c: VAEConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> tuple:
    """(kinema CausalVAE, diffusers AutoencoderKLWan) with the same random weights."""
    from diffusers import AutoencoderKLWan

    from kinema.models.vae import CausalVAE

    return _twins(CausalVAE, AutoencoderKLWan, c, diffusers_vae_kwargs(c), device, dtype, seed)


def inputs(s: BenchShape, device: torch.device, dtype: torch.dtype, batch: int = 2) -> tuple:
    """Latents (B, C, F, h, w), timesteps (B,) and text (B, L, text_dim) for one forward."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(latent_shape(s, batch), generator=g)
    ctx = torch.randn(batch, s.context_len, s.dit.text_dim, generator=g)
    t = torch.full((batch,), 700.0)
    return x.to(device, dtype), t.to(device), ctx.to(device, dtype)


# ---------------------------------------------------------------------------------------------
# The benchmarks
# ---------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """What to run and how often."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    repeats: int = 5
    compile: bool = False  # also time kinema with compile_blocks()
    seed: int = 0  # noise seed of the step-cache sweep (kinema calibrates on seed + 1)
    steps: int | None = None  # denoising steps of end_to_end / step_cache (None: the shape's)
    sdpa: tuple[str, ...] = ()  # forward: also time both libraries with these SDPA backends
    decode_pieces: tuple[int, ...] = ()  # vae_decode: also frames per full-resolution pass


def bench_forward(s: BenchShape, st: Settings) -> dict[str, Any]:
    """DiT forward with the CFG batch of 2: time, ratio, FLOP/s, MFU, peak memory, equality."""
    ours, theirs = twin_dits(s.dit, st.device, st.dtype)
    ours.fuse_projections()
    x, t, ctx = inputs(s, st.device, st.dtype)
    with torch.inference_mode():
        fns = {"kinema": lambda: ours(x, t, ctx),
               "diffusers": lambda: theirs(x, t, ctx, return_dict=False)[0]}  # fmt: skip
        if st.compile:
            compiled = _compiled_twin(s, st)
            fns["kinema_compiled"] = lambda: compiled(x, t, ctx)
        for name in st.sdpa:
            for lib in ("kinema", "diffusers"):
                fns[f"{lib}_sdpa_{name}"] = _with_sdpa(fns[lib], name)
        times = alternate(fns, st.repeats, st.device)
        (a, mem_a), (b, mem_b) = (peak_memory(fns[k], st.device) for k in ("kinema", "diffusers"))
        variants = {k: _diff(fn(), b)["max_abs_diff"] for k, fn in fns.items() if "_sdpa_" in k}
    flops = dit_flops(s.dit, tokens_of(s), s.context_len, batch=2)
    report = _forward_report(s, st, times, flops, (mem_a, mem_b), _diff(a, b))
    return report | ({"max_abs_diff_vs_diffusers": variants} if variants else {})


SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math")


def _with_sdpa(fn: Callable[[], Any], name: str) -> Callable[[], Any]:
    """``fn`` run with torch's SDPA restricted to one backend (cudnn, flash, efficient, math)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip
    backend = backends[name]

    def run() -> Any:
        with sdpa_kernel(backend):
            return fn()

    return run


def _compiled_twin(s: BenchShape, st: Settings) -> Any:
    ours, _ = twin_dits(s.dit, st.device, st.dtype)
    return ours.fuse_projections().compile_blocks()


def _diff(a: Tensor, b: Tensor) -> dict[str, float]:
    err = (a.float() - b.float()).abs()
    return {"max_abs_diff": float(err.max()), "ref_max_abs": float(b.float().abs().max())}


def _forward_report(
    s: BenchShape, st: Settings, times: dict[str, list[float]], flops: int,
    mem: tuple[int, int], diff: dict[str, float],
) -> dict[str, Any]:  # fmt: skip
    peak = matmul_peak(st.device, st.dtype)
    achieved = {k: flops / statistics.median(v) for k, v in times.items()}
    return {
        "shape": s.name, "tokens": tokens_of(s), "batch": 2, "flops": flops,
        "times": {k: summary(v) for k, v in times.items()},
        "ratio": {k: ratio(v, times["diffusers"]) for k, v in times.items() if k != "diffusers"},
        "flops_per_s": achieved, "matmul_peak_flops_per_s": peak,
        "mfu": {k: v / peak for k, v in achieved.items()},
        "peak_memory_bytes": {"kinema": mem[0], "diffusers": mem[1]}, **diff,
    }  # fmt: skip


class FixedTextEncoder:
    """Hands out given prompt embeddings (both libraries get the same ones): ``prompt`` -> the
    conditional tokens, anything else -> the unconditional ones."""

    def __init__(self, prompt: str, cond: Tensor, uncond: Tensor) -> None:
        self.prompt, self.cond, self.uncond = prompt, cond, uncond
        self.dim, self.max_length = cond.shape[-1], cond.shape[-2]

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        rows = [self.cond[0] if p == self.prompt else self.uncond[0] for p in prompts]
        tokens = torch.stack(rows)  # (B, L, D)
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool)


def twin_pipelines(s: BenchShape, st: Settings) -> tuple:
    """(kinema Pipeline, diffusers WanPipeline, (cond, uncond) embeddings), same weights."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from kinema.configs import SamplingDefaults
    from kinema.pipeline import Pipeline

    dit, dit_ref = twin_dits(s.dit, st.device, st.dtype)
    vae, vae_ref = twin_vaes(s.vae, st.device, torch.float32)
    _, _, ctx = inputs(s, st.device, st.dtype)
    cond, uncond = ctx[:1], ctx[1:]
    defaults = SamplingDefaults(width=s.width, height=s.height, frames=s.frames, steps=s.steps,
                                guidance=s.guidance, shift=s.shift, sampler="unipc")  # fmt: skip
    ours = Pipeline(dit.fuse_projections(), vae, FixedTextEncoder("bench", cond, uncond),
                    name=s.name, defaults=defaults)  # fmt: skip
    sched = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=s.shift
    )
    theirs = WanPipeline(tokenizer=None, text_encoder=None, vae=vae_ref, transformer=dit_ref,
                         scheduler=sched)  # fmt: skip
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs, (cond, uncond)


class StepClock:
    """Timestamps of sampler steps (kinema progress / diffusers step-end callbacks), from the
    clock's creation on (so the first step's interval also holds the run's set-up, which the
    median over many steps leaves out)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, [time.perf_counter()]

    def tick(self, *args: Any) -> Any:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return args[-1] if len(args) == 4 else None  # diffusers wants callback_kwargs back

    def per_step(self) -> list[float]:
        return list(np.diff(self.stamps))


def bench_end_to_end(s: BenchShape, st: Settings, seed: int = 0) -> dict[str, Any]:
    """Whole request (denoise + decode; same prompt embeddings): time per step, total time,
    peak memory, and the two videos compared (max uint8 difference, PSNR)."""
    from kinema.pipeline import Request

    ours, theirs, (cond, uncond) = twin_pipelines(s, st)
    req = Request(prompt="bench", negative_prompt="", seed=seed)
    runs: dict[str, list[dict[str, Any]]] = {"kinema": [], "diffusers": []}

    def kinema_run() -> np.ndarray:
        clock = StepClock(st.device)
        (video, mem), t = _timed_peak(lambda: ours.run(req, progress=clock.tick), st.device)
        runs["kinema"].append({"total_s": t, "steps_s": clock.per_step(), "peak": mem})
        return video.frames

    def diffusers_run() -> np.ndarray:
        clock = StepClock(st.device)
        gen = torch.Generator("cpu").manual_seed(seed)
        call = lambda: theirs(
            prompt_embeds=cond, negative_prompt_embeds=uncond, height=s.height, width=s.width,
            num_frames=s.frames, num_inference_steps=s.steps, guidance_scale=s.guidance,
            generator=gen, output_type="np", callback_on_step_end=clock.tick,
        )  # fmt: skip
        (out, mem), t = _timed_peak(call, st.device)
        runs["diffusers"].append({"total_s": t, "steps_s": clock.per_step(), "peak": mem})
        return (out.frames[0] * 255).round().astype(np.uint8)

    frames = _alternate_runs(kinema_run, diffusers_run, max(1, st.repeats // 2))
    return _e2e_report(s, ours, runs, frames)


def _timed_peak(fn: Callable[[], Any], device: torch.device) -> tuple[tuple[Any, int], float]:
    start = time.perf_counter()
    with torch.inference_mode():
        out = peak_memory(fn, device)
    return out, time.perf_counter() - start


def _alternate_runs(a: Callable[[], Any], b: Callable[[], Any], repeats: int) -> tuple[Any, Any]:
    for _ in range(repeats):
        out_a, out_b = a(), b()
    return out_a, out_b


def _e2e_report(s: BenchShape, pipe: Any, runs: dict[str, list], frames: tuple) -> dict[str, Any]:
    from kinema.memory import estimate_peak_bytes, weight_bytes

    med = lambda name, key: statistics.median(r[key] for r in runs[name])
    step = lambda name: statistics.median(x for r in runs[name] for x in r["steps_s"])
    weights = weight_bytes(pipe.dit) + weight_bytes(pipe.vae)
    nbytes = torch.finfo(pipe.dtype).bits // 8
    estimate = estimate_peak_bytes(pipe, s.width, s.height, s.frames, nbytes)
    measured = weights + max(r["peak"] for r in runs["kinema"])
    a, b = (f.astype(np.int16) for f in frames)
    return {
        "shape": s.name, "steps": s.steps, "size": [s.width, s.height, s.frames],
        "total": {k: med(k, "total_s") for k in runs}, "step": {k: step(k) for k in runs},
        "ratio_total": med("kinema", "total_s") / med("diffusers", "total_s"),
        "ratio_step": step("kinema") / step("diffusers"),
        "peak_memory_bytes": {k: max(r["peak"] for r in runs[k]) for k in runs},
        "kinema_weights_bytes": weights, "kinema_measured_peak_bytes": measured,
        "info_estimate_bytes": estimate, "estimate_over_measured": estimate / measured,
        "video_max_uint8_diff": int(np.abs(a - b).max()), "video_psnr_db": psnr(a, b, 255.0),
    }  # fmt: skip


def vae_decoders(
    s: BenchShape, device: torch.device, tile: Any = "auto", pieces: tuple[int, ...] = ()
) -> dict[str, Any]:
    """The decodes :func:`bench_vae_decode` compares, as calls on one random latent of ``s``:
    ``kinema`` (the pipeline's default), ``kinema_plain`` (exact), ``diffusers`` (untiled), and
    ``kinema_piece<n>``: the default with ``n`` frames per full-resolution pass."""
    from kinema.models.vae import LEAN_CACHE

    ours, theirs = twin_vaes(s.vae, device, torch.float32)
    z = torch.randn(latent_shape(s), generator=torch.Generator().manual_seed(2)).to(device)
    lean = LEAN_CACHE.get(torch.float32)  # the pipeline's decode
    tiles = None if tile == "auto" else tile
    fns = {
        "kinema": lambda: ours.decode(z, tiles, cache_dtype=lean),
        "kinema_plain": lambda: ours.decode(z, split_time=False),
        "diffusers": lambda: theirs.decode(z, return_dict=False)[0].clamp(-1, 1),
    }
    for n in pieces:
        fns[piece_name(n)] = lambda n=n: ours.decode(z, tiles, cache_dtype=lean, piece=n)
    return fns


def _ratios(peaks: dict[str, int], names: tuple[str, ...]) -> dict[str, float]:
    """Each of ``names``' peak over diffusers'."""
    return {k: peaks[k] / max(1, peaks["diffusers"]) for k in names}


def piece_name(frames: int) -> str:
    """The :func:`vae_decoders` name of the decode with ``frames`` frames a full-res pass."""
    return f"kinema_piece{frames}"


def _own_process_peak(
    s: BenchShape, name: str, tile: Any, pieces: tuple[int, ...], threads: int
) -> int:
    """In a fresh process: the RSS peak of decode ``name`` (after one warm-up call)."""
    torch.set_num_threads(threads)
    fn = vae_decoders(s, torch.device("cpu"), tile, pieces)[name]
    with torch.inference_mode():
        fn()
        return peak_memory(fn, torch.device("cpu"))[1]


def own_process_peaks(
    s: BenchShape, names: tuple[str, ...], tile: Any = "auto", pieces: tuple[int, ...] = ()
) -> dict[str, int]:
    """CPU peaks of the :func:`vae_decoders` ``names``, each decode in a process of its own
    (spawned, one after another), so no library's RSS reading depends on what the allocator
    kept from another's run."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = {}
    for name in names:
        with ctx.Pool(1) as pool:
            args = (s, name, tile, pieces, torch.get_num_threads())
            out[name] = pool.apply(_own_process_peak, args)
    return out


def bench_vae_decode(s: BenchShape, st: Settings, tile: Any = "auto") -> dict[str, Any]:
    """VAE decode: kinema's pipeline default (chunked, one full-resolution frame at a time, the
    causal cache in half precision; tiled if ``tile``) vs diffusers' untiled decode: time,
    peak memory, PSNR of kinema's default against its exact decode, exact-decode equality.

    On a CPU the memory ratio comes from each decode run in a process of its own
    (:func:`own_process_peaks`), and the peak of live tensor storage (:class:`TensorPeak`,
    the same on every run) is kept as ``peak_tensor_bytes`` with its ratio."""
    fns = vae_decoders(s, st.device, tile, st.decode_pieces)
    with torch.inference_mode():
        times = alternate(fns, max(1, st.repeats // 2), st.device)
        if st.device.type == "cpu":
            outs = {k: tensor_peak(fn) for k, fn in fns.items()}
        else:
            outs = {k: peak_memory(fn, st.device) for k, fn in fns.items()}
    default, plain, ref = (outs[k][0] for k in ("kinema", "kinema_plain", "diffusers"))
    peaks = {k: v[1] for k, v in outs.items()}
    tensors: dict[str, Any] = {}
    if st.device.type == "cpu":
        ours = ("kinema", *map(piece_name, st.decode_pieces))
        tensors = {"peak_tensor_bytes": peaks, "ratio_memory_tensors": _ratios(peaks, ours)}
        names = tuple(k for k in fns if k != "kinema_plain")
        peaks = own_process_peaks(s, names, tile, st.decode_pieces)
    pieces = {}
    for n in st.decode_pieces:
        k = piece_name(n)
        pieces[k] = {"frames": n, "ratio_time": ratio(times[k], times["diffusers"]),
                     "ratio_memory": peaks[k] / max(1, peaks["diffusers"]),
                     "psnr_vs_untiled_db": psnr(outs[k][0], plain, 2.0)}  # fmt: skip
    return {
        "shape": s.name, "latent": list(latent_shape(s)),
        "times": {k: summary(v) for k, v in times.items()},
        "ratio_time": ratio(times["kinema"], times["diffusers"]),
        "peak_memory_bytes": peaks, **tensors,
        "ratio_memory": peaks["kinema"] / max(1, peaks["diffusers"]),
        "psnr_default_vs_untiled_db": psnr(default, plain, 2.0),
        **_diff(plain, ref), **({"pieces": pieces} if pieces else {}),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Step cache against diffusers' FirstBlockCache
# ---------------------------------------------------------------------------------------------

KINEMA_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5)
FBC_THRESHOLDS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)


def cache_models(s: BenchShape, st: Settings) -> dict[str, Any]:
    """DiT twins, kinema VAE and prompt embeddings: the trained built-in model when it is
    installed (and ``s`` is its shape), else random weights of the shape."""
    from kinema.loading import ASSETS, BUILTIN

    folder = ASSETS / BUILTIN
    if s.name == BUILTIN and (folder / "kinema.json").exists():
        from diffusers import WanTransformer3DModel

        from kinema.loading import load

        pipe = load(folder, device=st.device, dtype=st.dtype)
        ref = WanTransformer3DModel(**diffusers_dit_kwargs(pipe.dit.config)).eval()
        ref.load_state_dict(pipe.dit.state_dict())
        prompts = ["a red circle moving right on a navy background", ""]
        with pipe.placement.text(pipe.text_encoder, prompts):  # on a GPU it visits it
            tokens, _ = pipe.text_encoder.encode(prompts)
        cond, uncond = (t.to(st.device, st.dtype) for t in (tokens[:1], tokens[1:]))
        return dict(dit=pipe.dit, ref=ref.to(st.device, st.dtype), vae=pipe.vae, cond=cond,
                    uncond=uncond, trained=True)  # fmt: skip
    dit, ref = twin_dits(s.dit, st.device, st.dtype)
    vae, _ = twin_vaes(s.vae, st.device, torch.float32)
    _, _, ctx = inputs(s, st.device, st.dtype)
    return dict(dit=dit, ref=ref, vae=vae, cond=ctx[:1], uncond=ctx[1:], trained=False)


def _kinema_guided(m: dict[str, Any], scale: float) -> Callable[[Tensor, Tensor], Tensor]:
    from kinema.sampling import cfg

    dit = m["dit"]
    velocity = lambda x, t, c: dit(x, t.reshape(-1).expand(x.shape[0]).to(x.device), c)
    return cfg(velocity, m["cond"], m["uncond"], scale)


def _diffusers_guided(m: dict[str, Any], scale: float) -> Callable[[Tensor, Tensor], Tensor]:
    """WanPipeline's loop body: separate cond and uncond forwards in their cache contexts."""
    tr = m["ref"]

    def guided(x: Tensor, t: Tensor) -> Tensor:
        tt = t.reshape(-1).expand(x.shape[0]).to(x.device)
        with tr.cache_context("cond"):
            v_cond = tr(x, tt, m["cond"], return_dict=False)[0]
        with tr.cache_context("uncond"):
            v_uncond = tr(x, tt, m["uncond"], return_dict=False)[0]
        return v_uncond + scale * (v_cond - v_uncond)

    return guided


def _sample_video(
    fn: Any, m: dict[str, Any], s: BenchShape, seed: int, st: Settings, decode: bool = True
) -> tuple:
    """Denoise from ``seed`` with ``fn`` (UniPC) and decode: (uint8 frames, denoise seconds)."""
    from kinema.pipeline import initial_noise, to_uint8
    from kinema.sampling import flow_schedule, unipc

    sched = flow_schedule(s.steps, s.shift, "unipc")
    noise = initial_noise(seed, latent_shape(s)).to(st.device, st.dtype)
    with torch.inference_mode():
        start = time.perf_counter()
        x = unipc(fn, noise, sched.sigmas, sched.timesteps)
        synchronize(st.device)
        seconds = time.perf_counter() - start
        if not decode:
            return None, seconds
        video = m["vae"].decode(m["vae"].denormalize(x.float()))
    return to_uint8(video), seconds


def bench_step_cache(s: BenchShape, st: Settings) -> dict[str, Any]:
    """kinema's step cache vs diffusers' FirstBlockCache over threshold sweeps: denoising time
    against each library's own uncached run (alternated), evaluations, PSNR of the decoded video
    against the uncached one from the same seed. kinema is calibrated on another seed."""
    from diffusers.hooks import FirstBlockCacheConfig

    from kinema.sampling.cache import dit_probe, step_cache

    seed = st.seed
    m = cache_models(s, st)
    guided, ref_guided = _kinema_guided(m, s.guidance), _diffusers_guided(m, s.guidance)
    probe = dit_probe(m["dit"])
    calib = _calibration(guided, probe, m, s, st, seed + 1)
    full_blocks = _count_calls(m["ref"].blocks[-1].ffn)
    rows: list[dict[str, Any]] = []
    plain = {"kinema": [], "diffusers": []}
    reference = None
    for k_th, f_th in zip(KINEMA_THRESHOLDS, FBC_THRESHOLDS, strict=True):
        video, t = _sample_video(guided, m, s, seed, st, decode=reference is None)
        reference = video if reference is None else reference
        plain["kinema"].append(t)
        cache = step_cache(guided, k_th, calib, probe)
        video, t = _sample_video(cache, m, s, seed, st)
        rows.append(_cache_row("kinema", k_th, t, cache.evaluations, s.steps, video, reference))
        plain["diffusers"].append(_sample_video(ref_guided, m, s, seed, st, decode=False)[1])
        m["ref"].enable_cache(FirstBlockCacheConfig(threshold=f_th))
        before = full_blocks()
        video, t = _sample_video(ref_guided, m, s, seed, st)
        full = (full_blocks() - before) / 2  # cond + uncond forwards per step
        m["ref"].disable_cache()
        rows.append(_cache_row("diffusers_fbc", f_th, t, full, s.steps, video, reference))
    return _cache_report(s, m, rows, plain, calib) | {"seed": seed}


def _calibration(guided: Any, probe: Any, m: dict, s: BenchShape, st: Settings, seed: int) -> Any:
    from kinema.pipeline import initial_noise
    from kinema.sampling import flow_schedule, unipc
    from kinema.sampling.cache import calibrate

    sched = flow_schedule(s.steps, s.shift, "unipc")
    noise = initial_noise(seed, latent_shape(s)).to(st.device, st.dtype)
    return calibrate(guided, lambda fn: unipc(fn, noise, sched.sigmas, sched.timesteps), probe)


def _count_calls(module: torch.nn.Module) -> Callable[[], int]:
    """A forward hook counting ``module``'s calls; returns the counter."""
    count = [0]
    module.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return lambda: count[0]


def _cache_row(
    lib: str, threshold: float, seconds: float, full: float, steps: int, video: np.ndarray,
    reference: np.ndarray,
) -> dict[str, Any]:  # fmt: skip
    return {"lib": lib, "threshold": threshold, "denoise_s": seconds,
            "full_evaluations": full, "steps": steps,
            "psnr_db": psnr(video, reference, 255.0)}  # fmt: skip


def _cache_report(
    s: BenchShape, m: dict, rows: list[dict], plain: dict[str, list[float]], calib: Any
) -> dict[str, Any]:
    base = {k: statistics.median(v) for k, v in plain.items()}
    for r in rows:
        own = base["kinema" if r["lib"] == "kinema" else "diffusers"]
        r["speedup"] = own / r["denoise_s"]
    return {"shape": s.name, "trained_weights": m["trained"], "steps": s.steps,
            "uncached_denoise_s": base, "calibration": list(calib.coefficients),
            "rows": rows}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def markdown(results: dict[str, Any]) -> str:
    """Tables of a results dict (as :func:`run` returns it), with the machine named."""
    m = results["machine"]
    isa = f", {m['cpu_capability']}" if "gpu" not in m and "cpu_capability" in m else ""
    lines = [f"Machine: {m.get('gpu', m['cpu'])} ({m['cores']} cores{isa}, {m['torch_threads']} "
             f"torch threads), torch {m['torch']}, diffusers {m.get('diffusers', '-')}, "
             f"{results['dtype']}. Ratios are kinema / diffusers medians, alternated in one "
             "process (< 1: kinema faster).", ""]  # fmt: skip
    lines += _forward_table(results.get("forward", []))
    lines += _e2e_table(results.get("end_to_end", []))
    lines += _vae_table(results.get("vae_decode", []))
    lines += _cache_table(results.get("step_cache", []))
    return "\n".join(lines) + "\n"


def _forward_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    out = ["### DiT forward (CFG batch of 2)", "",
           "| config | tokens | kinema | diffusers | ratio | compiled ratio | kinema TFLOP/s | "
           "MFU | peak mem kinema / diffusers | max abs diff |",
           "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        t, rt = r["times"], r["ratio"]
        comp = f"{rt['kinema_compiled']:.2f}" if "kinema_compiled" in rt else "-"
        mem = r["peak_memory_bytes"]
        out.append(
            f"| {r['shape']} | {r['tokens']} | {t['kinema']['median_s'] * 1e3:.1f} ms | "
            f"{t['diffusers']['median_s'] * 1e3:.1f} ms | {rt['kinema']:.2f} | {comp} | "
            f"{r['flops_per_s']['kinema'] / 1e12:.3f} | {r['mfu']['kinema']:.0%} | "
            f"{_gib(mem['kinema'])} / {_gib(mem['diffusers'])} | {r['max_abs_diff']:.1e} |"
        )
    return [*out, ""]


def _e2e_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    out = ["### End to end (denoise + decode, same prompt embeddings)", "",
           "| config | steps | step kinema / diffusers | step ratio | total ratio | "
           "peak mem kinema / diffusers | `kinema info` estimate / measured | video max diff |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        st, mem = r["step"], r["peak_memory_bytes"]
        out.append(
            f"| {r['shape']} | {r['steps']} | {st['kinema'] * 1e3:.0f} / "
            f"{st['diffusers'] * 1e3:.0f} ms | {r['ratio_step']:.2f} | {r['ratio_total']:.2f} | "
            f"{_gib(mem['kinema'])} / {_gib(mem['diffusers'])} | "
            f"{r['estimate_over_measured']:.2f} | {r['video_max_uint8_diff']} / 255 |"
        )
    return [*out, ""]


def _vae_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    out = ["### VAE decode (kinema default vs diffusers untiled)", "",
           "| config | latent | time ratio | peak mem kinema / diffusers | memory ratio | "
           "live-tensor ratio | PSNR vs untiled | untiled max diff |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        mem, live = r["peak_memory_bytes"], r.get("ratio_memory_tensors", {})
        tensors = lambda name, live=live: f"{live[name]:.2f}" if name in live else "—"
        out.append(
            f"| {r['shape']} | {'x'.join(map(str, r['latent'][2:]))} | {r['ratio_time']:.2f} | "
            f"{_gib(mem['kinema'])} / {_gib(mem['diffusers'])} | {r['ratio_memory']:.2f} | "
            f"{tensors('kinema')} | {r['psnr_default_vs_untiled_db']:.1f} dB | "
            f"{r['max_abs_diff']:.1e} |"
        )
        for name, v in r.get("pieces", {}).items():
            out.append(f"| {r['shape']}, {v['frames']} frames a pass | | {v['ratio_time']:.2f} | "
                       f"{_gib(mem[name])} / {_gib(mem['diffusers'])} | {v['ratio_memory']:.2f} | "
                       f"{tensors(name)} | {v['psnr_vs_untiled_db']:.1f} dB | |")  # fmt: skip
    return [*out, ""]


def _cache_table(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in rows:
        weights = "trained" if r["trained_weights"] else "RANDOM (PSNR says little)"
        seed = f", seed {r['seed']}" if "seed" in r else ""
        out += [f"### Step cache, {r['shape']} ({weights} weights, {r['steps']} UniPC steps{seed})",
                "",
                "| method | threshold | full evaluations | denoise speed-up | PSNR vs uncached |",
                "|---|---|---|---|---|"]  # fmt: skip
        for c in sorted(r["rows"], key=lambda c: (c["lib"], c["threshold"])):
            out.append(f"| {c['lib']} | {c['threshold']} | {c['full_evaluations']:.0f} / "
                       f"{c['steps']} | {c['speedup']:.2f}x | {c['psnr_db']:.1f} dB |")  # fmt: skip
        out.append("")
    return out


def run(shapes: list[str], st: Settings, parts: tuple[str, ...]) -> dict[str, Any]:
    """Run ``parts`` (forward, end_to_end, vae_decode, step_cache) for each named shape.

    Raises ValueError for an unknown shape or part, or a GPU-only shape on a CPU.
    """
    bad = [n for n in shapes if n not in SHAPES]
    if bad:
        raise ValueError(f"unknown benchmark config(s) {bad}; valid: {sorted(SHAPES)}")
    benches = {"forward": bench_forward, "end_to_end": bench_end_to_end,
               "vae_decode": bench_vae_decode, "step_cache": bench_step_cache}  # fmt: skip
    if any(p not in benches for p in parts):
        raise ValueError(f"unknown part in {parts}; valid: {sorted(benches)}")
    if not shapes or not parts:
        raise ValueError(f"nothing to measure: give --configs (valid: {sorted(SHAPES)}) and "
                         f"--parts (valid: {sorted(benches)})")  # fmt: skip
    if "step_cache" in parts and st.steps is not None and st.steps < 4:
        raise ValueError(f"--steps {st.steps}: the step_cache part calibrates the cache, which "
                         "needs at least 4 steps")  # fmt: skip
    for n in shapes:
        if SHAPES[n].gpu_only and st.device.type != "cuda":
            raise ValueError(f"config {n!r} needs a CUDA device (got {st.device})")
    chosen = [replace(SHAPES[n], steps=st.steps or SHAPES[n].steps) for n in shapes]
    out: dict[str, Any] = {"machine": machine(st.device), "dtype": str(st.dtype)[6:]}
    for part in parts:
        out[part] = [benches[part](s, st) for s in chosen]
    return out


def write(results: dict[str, Any], folder: str | Path, stem: str) -> tuple[Path, Path]:
    """Write ``stem.json`` and ``stem.md`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    js, md = folder / f"{stem}.json", folder / f"{stem}.md"
    js.write_text(json.dumps(results, indent=2, default=str) + "\n")
    md.write_text(markdown(results))
    return js, md


PARTS = ("forward", "end_to_end", "vae_decode", "step_cache")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(p: Any) -> None:
    """``kinema bench`` / ``benchmarks/harness.py`` options."""
    p.add_argument("--configs", default="kinema-tiny,small-wan",
                   help=f"comma-separated, from {', '.join(SHAPES)}")  # fmt: skip
    p.add_argument("--parts", default="forward,end_to_end,vae_decode",
                   help=f"comma-separated, from {', '.join(PARTS)}")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default: bf16 on cuda, fp32 on cpu")  # fmt: skip
    p.add_argument("--repeats", type=int, default=5, help="timed calls per library")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true", help="also time compile_blocks()")
    p.add_argument("--seed", type=int, default=0,
                   help="noise seed of the step_cache sweep (calibration: seed + 1)")  # fmt: skip
    p.add_argument("--steps", type=int, default=None,
                   help="steps of end_to_end and step_cache (default: the config's)")  # fmt: skip
    p.add_argument("--sdpa", default="",
                   help=f"forward: also time both libraries with these SDPA backends, "
                        f"comma-separated from {', '.join(SDPA_BACKENDS)}")  # fmt: skip
    p.add_argument("--decode-pieces", default="",
                   help="vae_decode: also time kinema's decode with these output frames per "
                        "full-resolution pass, comma-separated (default pass: 1)")  # fmt: skip
    p.add_argument("--out", default="benchmarks/results", help="folder for JSON + markdown")
    p.add_argument("--name", default=None, help="file stem (default: <device>-<dtype>)")


def _whole_numbers(text: str, flag: str) -> tuple[int, ...]:
    """Comma-separated whole numbers >= 1 (ValueError naming ``flag`` otherwise)."""
    parts = [p for p in text.split(",") if p]
    if not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"{flag} {text!r}: whole numbers >= 1, comma-separated, e.g. 2,4")
    return tuple(int(p) for p in parts)


def settings_from_args(args: Any) -> Settings:
    """Validated :class:`Settings` from parsed ``kinema bench`` arguments."""
    from kinema.io.paths import check_writable
    from kinema.loading import resolve_device

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder (JSON and markdown go there)")
    check_writable(Path(args.out) / "results.json", "--out")  # a folder: JSON and markdown
    name = getattr(args, "name", None)
    if name is not None and (not name.strip() or Path(name).name != name or name in (".", "..")):
        raise ValueError(f"--name {name!r} must be a file stem, not a path (the files go in "
                         "--out)")  # fmt: skip

    device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device}: the benchmark runs on cpu or cuda")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats} must be >= 1")
    if args.seed < 0:
        raise ValueError(f"--seed {args.seed} must be >= 0")
    sdpa = tuple(n for n in getattr(args, "sdpa", "").split(",") if n)
    if any(n not in SDPA_BACKENDS for n in sdpa):
        raise ValueError(f"--sdpa {args.sdpa!r}; valid: {', '.join(SDPA_BACKENDS)}")
    pieces = _whole_numbers(getattr(args, "decode_pieces", ""), "--decode-pieces")
    steps = getattr(args, "steps", None)
    if steps is not None and steps < 1:
        raise ValueError(f"--steps {steps} must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    return Settings(device=device, dtype=dtype, repeats=args.repeats, compile=args.compile,
                    seed=args.seed, steps=steps, sdpa=sdpa,
                    decode_pieces=pieces)  # fmt: skip


def run_cli(args: Any) -> int:
    """``kinema bench``: run, write ``<out>/<name>.json`` and ``.md``, print the tables."""
    st = settings_from_args(args)
    parts = tuple(p for p in args.parts.split(",") if p)
    results = run([c for c in args.configs.split(",") if c], st, parts)
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    stem = args.name or f"{st.device.type}-{short.get(str(st.dtype)[6:], str(st.dtype)[6:])}"
    js, md = write(results, args.out, stem)
    print(markdown(results))
    print(f"wrote {js} and {md}")
    return 0


def shape_with(name: str, **changes: Any) -> BenchShape:
    """A named shape with some fields replaced (e.g. fewer steps for a quick run)."""
    return replace(SHAPES[name], **changes)


__all__ = [
    "PARTS",
    "SHAPES",
    "add_arguments",
    "run_cli",
    "BenchShape",
    "Settings",
    "TensorPeak",
    "alternate",
    "bench_end_to_end",
    "bench_forward",
    "bench_vae_decode",
    "dit_flops",
    "machine",
    "markdown",
    "matmul_peak",
    "peak_memory",
    "psnr",
    "run",
    "twin_dits",
    "twin_vaes",
    "write",
]
