"""Step caching: skip transformer evaluations while the model's input has barely changed.

The TeaCache family (Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for Video
Diffusion Model"): a cheap *probe* of the model input -- for the DiT, the first block's
timestep-modulated input tokens, which change with both ``x`` and ``t`` -- is compared with the
probe of the previous step by relative L1 distance. A per-model polynomial, fitted once on an
uncached run (:func:`calibrate`), maps that input change to the expected relative change of the
model output. How much the output moves for a given input change depends strongly on the noise
level (on kinema-tiny the first steps change the output an order of magnitude more than their
probe change, the last ones less than it; the README gives the shipped weights' figures), so
the calibration also keeps, per timestep of the calibration run, the ratio
of output change to probe change, and where it has them estimates ``ratio(t) * input change``
(the ratio interpolated in ``t``); the polynomial is the fallback. The estimates are summed
over skipped steps; while the sum stays below the
``threshold`` the last evaluated velocity is returned again instead of calling the model
(for flow matching the velocity ``noise - x0`` changes slowly along the path, so reusing it is an
Euler step with a stale slope).

:func:`step_cache` wraps one ``model_fn(x, t) -> v`` into another, like guidance. Its state (the
last probe, the last velocity, the running sum) lives in the returned :class:`StepCache` object
and nowhere else: make a new one per sampling run. ``threshold = 0`` never skips and returns
exactly what the model returns.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kinema.io.paths import write_text_atomic
from kinema.sampling.samplers import ModelFn

Probe = Callable[[Tensor, Tensor], Tensor]  # (x, t) -> features whose change predicts v's
CALIBRATION_FILE = "step_cache.json"


@dataclass(frozen=True)
class CacheCalibration:
    """How a model's output change follows its input change, fitted per model.

    ``coefficients``: polynomial in the probe's relative L1 change between consecutive steps
    giving the output's relative L1 change (``numpy.polyval`` order, highest degree first;
    the default (1, 0) is the identity, for an uncalibrated model).
    """

    coefficients: tuple[float, ...] = (1.0, 0.0)
    timesteps: tuple[float, ...] = ()  # timesteps of the calibration run (from step 2 on)
    ratios: tuple[float, ...] = ()  # output change / probe change at each of them

    # (timesteps, ratios) are kept sorted by timestep, ascending, as ``numpy.interp`` reads them

    def __post_init__(self) -> None:
        if not self.coefficients or not all(np.isfinite(self.coefficients)):
            raise ValueError(f"calibration coefficients must be finite, got {self.coefficients}")
        if len(self.timesteps) != len(self.ratios) or not all(
            np.isfinite(self.timesteps + self.ratios)
        ):
            raise ValueError("calibration timesteps and ratios must be finite and pair up")
        pairs = sorted(zip(self.timesteps, self.ratios, strict=True))
        object.__setattr__(self, "timesteps", tuple(t for t, _ in pairs))
        object.__setattr__(self, "ratios", tuple(r for _, r in pairs))

    def estimate(self, input_change: float, timestep: float | None = None) -> float:
        """Expected relative output change (>= 0) for a relative input change at ``timestep``
        (the per-timestep ratio where the calibration has one, else the polynomial)."""
        if self.ratios and timestep is not None:
            ratio = float(np.interp(timestep, self.timesteps, self.ratios))
            return max(0.0, ratio * input_change)
        return max(0.0, float(np.polyval(self.coefficients, input_change)))

    def summary(self) -> str:
        """What ``estimate`` uses, in words: the per-timestep ratios (from the highest
        timestep down, as sampling meets them) and the polynomial fallback."""
        poly = ", ".join(f"{c:.4g}" for c in self.coefficients)
        if not self.ratios:
            return f"polynomial in the probe change: [{poly}]"
        pairs = zip(self.timesteps[::-1], self.ratios[::-1], strict=True)
        table = ", ".join(f"{t:.0f}: {r:.3g}" for t, r in pairs)
        return f"output / probe change per timestep: {table}; polynomial fallback: [{poly}]"

    def save(self, path: str | Path) -> None:
        """Write JSON to ``path`` (through a temporary file: never half-written)."""
        path = Path(path)
        fields = {"coefficients": list(self.coefficients), "timesteps": list(self.timesteps),
                  "ratios": list(self.ratios)}  # fmt: skip
        write_text_atomic(path, json.dumps(fields) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CacheCalibration:
        """A saved calibration; CheckpointError naming ``path`` when it is not one."""
        from kinema.io.checkpoint import CheckpointError, read_json_object

        data = read_json_object(path)
        try:
            floats = lambda key: tuple(float(c) for c in data.get(key, ()))
            return cls(floats("coefficients"), floats("timesteps"), floats("ratios"))
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{path} is not a step-cache calibration: {err}") from None


def load_calibration(folder: str | Path) -> CacheCalibration:
    """The calibration saved in a model folder (``step_cache.json``), else the identity."""
    path = Path(folder) / CALIBRATION_FILE
    return CacheCalibration.load(path) if path.exists() else CacheCalibration()


def relative_l1(a: Tensor, b: Tensor) -> float:
    """mean |a - b| / mean |b| (TeaCache's distance), as a Python float."""
    return float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))


def first_timestep(t: Tensor) -> float:
    """A step's timestep as a float (t is () or (B,), the same for every sample)."""
    return float(t.reshape(-1)[0])


def input_probe(x: Tensor, t: Tensor) -> Tensor:
    """The default probe: the latents themselves (for models without a better one)."""
    return x


def dit_probe(dit: Any) -> Probe:
    """The first block's modulated input of a :class:`~kinema.models.dit.VideoDiT` (TeaCache's
    probe): patch embedding, LayerNorm, AdaLN shift/scale from ``t``. About one percent of a
    forward. (x (B, C, F, H, W), t () or (B,)) -> (B, N, D)."""
    from kinema.models.ops import modulate

    block = dit.blocks[0]

    def probe(x: Tensor, t: Tensor) -> Tensor:
        dtype = dit.proj_out.weight.dtype
        tokens = dit.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2)  # (B, N, D)
        t = t.reshape(-1).expand(x.shape[0]).to(x.device)  # (B,)
        _, mod = dit.condition_embedder.time(t[:, None], dtype)  # (B, 1, 6, D)
        table = block.scale_shift_table.to(mod.device)  # (block offload keeps it on the CPU)
        shift, scale = (table[:, None].float() + mod.float()).unbind(2)[:2]
        return modulate(block.norm1(tokens.float()), shift, scale)

    return probe


@dataclass
class StepCache:
    """A cached ``model_fn(x, t)`` for ONE sampling run; counts what it evaluated and skipped.

    ``threshold``: the largest summed estimated relative output change that may be skipped
    (0 = never skip). ``max_skips``: at most this many skipped steps in a row.
    """

    model_fn: ModelFn
    threshold: float
    calibration: CacheCalibration = field(default_factory=CacheCalibration)
    probe: Probe = input_probe
    max_skips: int = 3
    evaluations: int = 0
    skipped: int = 0
    _last_probe: Tensor | None = None
    _last_v: Tensor | None = None
    _drift: float = 0.0
    _run: int = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """Velocity shaped like x: the model's, or the last one while little has changed."""
        features = self.probe(x, t) if self.threshold > 0 else None
        if features is not None and self._can_skip(features, first_timestep(t)):
            self.skipped, self._run = self.skipped + 1, self._run + 1
        else:
            self._last_v, self._drift, self._run = self.model_fn(x, t), 0.0, 0
            self.evaluations += 1
        self._last_probe = features
        return self._last_v

    def _can_skip(self, features: Tensor, timestep: float) -> bool:
        """Add this step's estimated output change to the drift; skip while it stays small."""
        if self._last_probe is None or self._last_v is None or self._run >= self.max_skips:
            return False
        change = self.calibration.estimate(relative_l1(features, self._last_probe), timestep)
        self._drift += change
        return self._drift < self.threshold


def step_cache(
    model_fn: ModelFn,
    threshold: float,
    calibration: CacheCalibration | None = None,
    probe: Probe = input_probe,
    max_skips: int = 3,
) -> StepCache:
    """Wrap ``model_fn`` in a fresh :class:`StepCache` (see the module notes).

    Raises ValueError for a negative or non-finite threshold or ``max_skips < 0``.
    """
    if isinstance(threshold, bool) or not np.isfinite(threshold) or threshold < 0:
        raise ValueError(f"cache threshold must be a finite number >= 0, got {threshold!r}")
    if max_skips < 0:
        raise ValueError(f"max_skips must be >= 0, got {max_skips}")
    calibration = calibration or CacheCalibration()
    return StepCache(model_fn, float(threshold), calibration, probe, max_skips)


MIN_CALIBRATION_STEPS = 4  # :func:`calibrate`'s degree-2 fit needs degree + 2 timesteps


def calibrate(
    model_fn: ModelFn,
    sample: Callable[[ModelFn], Tensor],
    probe: Probe = input_probe,
    degree: int = 2,
) -> CacheCalibration:
    """Fit a model's :class:`CacheCalibration` from one uncached run.

    ``sample(fn)`` runs a sampler with ``fn`` as its model function (e.g.
    ``lambda fn: unipc(fn, noise, sigmas, timesteps)``); every step's probe change and output
    change (both relative L1 to the previous step) are recorded, kept as their ratio per
    timestep, and fitted by a polynomial of ``degree`` (least squares, ``numpy.polyfit``).
    """
    seen: list[tuple[Tensor, Tensor]] = []
    times: list[float] = []

    def recording(x: Tensor, t: Tensor) -> Tensor:
        v = model_fn(x, t)
        seen.append((probe(x, t).detach().clone(), v.detach().clone()))
        times.append(first_timestep(t))
        return v

    with torch.inference_mode():
        sample(recording)
    if len(seen) < degree + 2:
        raise ValueError(f"calibration needs at least {degree + 2} steps for degree {degree}")
    d_in = [relative_l1(b[0], a[0]) for a, b in zip(seen, seen[1:], strict=False)]
    d_out = [relative_l1(b[1], a[1]) for a, b in zip(seen, seen[1:], strict=False)]
    coefficients = np.polyfit(np.array(d_in), np.array(d_out), degree)
    ratios = tuple(o / max(i, 1e-12) for i, o in zip(d_in, d_out, strict=True))
    return CacheCalibration(tuple(float(c) for c in coefficients), tuple(times[1:]), ratios)


__all__ = [
    "CALIBRATION_FILE",
    "CacheCalibration",
    "Probe",
    "StepCache",
    "calibrate",
    "dit_probe",
    "input_probe",
    "load_calibration",
    "relative_l1",
    "step_cache",
]
