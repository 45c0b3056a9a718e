"""One ``generate`` for every task.

A :class:`Request` says what to make (prompt, size, frames, sampler settings, seed; later the
image, video or context frames it is conditioned on). :meth:`Pipeline.run` turns it into a
:class:`Video`:

    text encoder -> context (1, L, D)      seed -> noise (1, C, F, H/8, W/8) on a CPU generator
    schedule(steps, shift) -> sigmas  ->  sampler(cfg(DiT), noise, sigmas)  ->  VAE.decode

``run`` writes no files and moves no weights: saving is :meth:`Video.save`, device placement
happens once in :func:`kinema.loading.load`.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import kinema
from kinema.conditioning import FrameCondition, condition_frames
from kinema.configs import SamplingDefaults
from kinema.sampling import SAMPLERS, cfg, count_calls, flow_schedule

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Request:
    """Everything that decides the output. ``None`` fields take the model's defaults."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    fps: int | None = None
    steps: int | None = None
    guidance: float | None = None
    shift: float | None = None
    sampler: str | None = None
    seed: int = 0

    def resolved(self, defaults: SamplingDefaults) -> Request:
        """This request with every ``None`` replaced by the model's default."""
        fill = {
            f.name: getattr(defaults, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is None and hasattr(defaults, f.name)
        }
        return dataclasses.replace(self, **fill)


def validate(req: Request, spatial: int, temporal: int) -> None:
    """Raise ValueError naming the first bad value of a resolved request and its valid range."""
    if not isinstance(req.prompt, str):
        raise ValueError(f"prompt must be a string, got {type(req.prompt).__name__}")
    for name in ("width", "height"):
        v = getattr(req, name)
        if v < spatial or v % spatial:
            near = max(spatial, round(v / spatial) * spatial)
            raise ValueError(f"{name} {v} is not a multiple of {spatial}; nearest valid: {near}")
    if req.frames < 1 or (req.frames - 1) % temporal:
        near = max(1, round((req.frames - 1) / temporal)) * temporal + 1
        raise ValueError(
            f"frames {req.frames} is not {temporal}k+1 (1, {temporal + 1}, {2 * temporal + 1}, "
            f"...); nearest valid: {near}"
        )
    if req.steps < 1:
        raise ValueError(f"steps {req.steps} must be >= 1")
    if req.guidance < 0:
        raise ValueError(f"guidance {req.guidance} must be >= 0 (1 disables guidance)")
    if req.seed < 0 or req.seed >= 2**63:
        raise ValueError(f"seed {req.seed} must be in [0, 2**63)")
    if req.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {req.sampler!r}; valid: {sorted(SAMPLERS)}")
    if req.shift <= 0:
        raise ValueError(f"shift {req.shift} must be > 0")
    if req.fps < 1:
        raise ValueError(f"fps {req.fps} must be >= 1")


@dataclass
class Video:
    """A generated clip: ``frames`` uint8 (T, H, W, 3), ``fps``, and what made it (``info``)."""

    frames: np.ndarray
    fps: float
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write the video (format by extension) and a ``.json`` sidecar with ``info``."""
        from kinema.io.video import write_sidecar, write_video

        meta = {
            "title": str(self.info.get("prompt", "")),
            "comment": f"seed={self.info.get('seed')}",
        }
        out = write_video(path, self.frames, self.fps, metadata=meta)
        write_sidecar(out, self.info)
        return out


def initial_noise(seed: int, shape: tuple[int, ...]) -> Tensor:
    """Gaussian noise drawn exactly as diffusers does: CPU generator, float32."""
    return torch.randn(
        shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32
    )


def to_uint8(video: Tensor) -> np.ndarray:
    """Decoded video (1, 3, T, H, W) in [-1, 1] -> frames (T, H, W, 3) uint8."""
    x = ((video[0].float() + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0)  # (T, H, W, 3)
    return (x * 255).round().to(torch.uint8).cpu().numpy()


class Pipeline:
    """A loaded model: DiT, VAE and text encoder on their devices, plus sampling defaults."""

    def __init__(
        self,
        dit: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: Any,
        *,
        name: str,
        defaults: SamplingDefaults,
        load_seconds: float = 0.0,
    ) -> None:
        self.dit, self.vae, self.text_encoder = dit, vae, text_encoder
        self.name, self.defaults, self.load_seconds = name, defaults, load_seconds

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.proj_out.weight.dtype

    @property
    def spatial_factor(self) -> int:
        """Pixel sizes must be multiples of this (VAE factor x patch size)."""
        return self.vae.config.spatial_factor * self.dit.config.patch_size[1]

    @property
    def temporal_factor(self) -> int:
        return self.vae.config.temporal_factor * self.dit.config.patch_size[0]

    def generate(self, prompt: str, *, progress: Progress | None = None, **settings: Any) -> Video:
        """Make a video. ``settings`` are the :class:`Request` fields (width, frames, seed, ...)."""
        return self.run(Request(prompt=prompt, **settings), progress=progress)

    def run(self, request: Request, progress: Progress | None = None) -> Video:
        req = request.resolved(self.defaults)
        validate(req, self.spatial_factor, self.temporal_factor)
        clock = {"start": time.perf_counter()}
        context, uncond = self.encode_text(req)
        clock["text"] = time.perf_counter()
        latents, evaluations = self.denoise(req, context, uncond, None, progress)
        clock["denoise"] = time.perf_counter()
        frames = to_uint8(self.decode(latents))
        clock["decode"] = time.perf_counter()
        return Video(frames, float(req.fps), self.describe(req, evaluations, clock))

    def encode_text(self, req: Request) -> tuple[Tensor, Tensor | None]:
        """Context tokens (1, L, D) for the prompt, and for the negative prompt under guidance."""
        prompts = [req.prompt] + ([req.negative_prompt] if req.guidance > 1 else [])
        tokens, _ = self.text_encoder.encode(prompts)
        tokens = tokens.to(self.device, self.dtype)
        return tokens[:1], (tokens[1:] if req.guidance > 1 else None)

    def latent_shape(self, req: Request) -> tuple[int, int, int, int, int]:
        s, t = self.vae.config.spatial_factor, self.vae.config.temporal_factor
        f = (req.frames - 1) // t + 1
        return (1, self.vae.config.z_dim, f, req.height // s, req.width // s)

    def velocity(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        """The DiT as a function of (x (B, C, F, H, W), t (), (B,) or (B, F), context)."""
        b = x.shape[0]
        t = t.reshape(-1).expand(b) if t.ndim <= 1 else t.repeat(b // t.shape[0], 1)
        return self.dit(x.to(self.dtype), t.to(x.device), context)

    def denoise(
        self,
        req: Request,
        context: Tensor,
        uncond: Tensor | None,
        condition: FrameCondition | None,
        progress: Progress | None,
    ) -> tuple[Tensor, int]:
        """Run the sampler from the seed's noise; returns normalised latents and DiT calls."""
        noise = initial_noise(req.seed, self.latent_shape(req)).to(self.device)
        schedule = flow_schedule(req.steps, req.shift, req.sampler)
        counted, calls = count_calls(self.velocity)
        if uncond is None:  # guidance <= 1: one conditional forward per step, as diffusers
            model_fn = cfg(counted, context, context, 1.0)
        else:
            model_fn = cfg(counted, context, uncond, req.guidance)
        model_fn = condition_frames(model_fn, condition)
        callback = (lambda i, n, x: progress(i + 1, n)) if progress else None
        with torch.inference_mode():
            x = SAMPLERS[req.sampler](
                model_fn, noise, schedule.sigmas, schedule.timesteps, callback=callback
            )
        x = condition.impose(x) if condition is not None else x
        return x, calls()

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents (1, C, F, h, w) -> video (1, 3, T, H, W) in [-1, 1]."""
        vae_dtype = next(self.vae.parameters()).dtype
        with torch.inference_mode():
            return self.vae.decode(self.vae.denormalize(latents.to(vae_dtype)))

    def describe(self, req: Request, evaluations: int, clock: dict[str, float]) -> dict[str, Any]:
        """The sidecar: request, model, versions, DiT evaluations and timings in seconds."""
        start = clock["start"]
        timings = {
            "load": round(self.load_seconds, 4),
            "text": round(clock["text"] - start, 4),
            "denoise": round(clock["denoise"] - clock["text"], 4),
            "decode": round(clock["decode"] - clock["denoise"], 4),
        }
        timings["total"] = round(sum(timings.values()), 4)
        return {
            **dataclasses.asdict(req),
            "model": self.name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "transformer_evaluations": evaluations,
            "timings": timings,
            "versions": {
                "kinema": kinema.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }
