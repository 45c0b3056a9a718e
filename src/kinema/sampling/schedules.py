"""Shifted flow-matching noise schedules, exactly as diffusers builds them for Wan.

Flow matching interpolates ``x_sigma = (1 - sigma) * x0 + sigma * noise`` from data
(``sigma = 0``) to noise (``sigma = 1``). A shift ``s`` spends more steps at high noise:
``sigma' = s * sigma / (1 + (s - 1) * sigma)`` (Esser et al. 2024, "Scaling Rectified Flow
Transformers", eq. 23 with ``s = sqrt(m / n)``).

The two samplers come with slightly different grids, reproduced here to the last bit because
the whole-pipeline parity test (same seed -> same video as diffusers) depends on them:

* ``"unipc"`` -- diffusers ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=s)``:
  ``steps + 1`` points evenly spaced on ``[1, 1/N]`` (float64), the last dropped, shifted, the
  first nudged to ``1 - 1e-6`` (keeps ``log(1 - sigma)`` finite), timesteps ``sigma * N``
  truncated to int64.
* ``"euler"`` -- diffusers ``FlowMatchEulerDiscreteScheduler(shift=s)``: ``steps`` points evenly
  spaced between the *already shifted* training sigmas at ``1`` and ``1/N`` (computed in
  float32), shifted again in float64, timesteps ``sigma * N`` in float32.

Both append a final ``sigma = 0``; sigmas are float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

SCHEDULE_SAMPLERS = ("unipc", "euler")
_UNIPC_FIRST_SIGMA_EPS = 1e-6  # diffusers keeps the first UniPC sigma this far below 1

ArrayT = TypeVar("ArrayT", Tensor, np.ndarray, float)


@dataclass(frozen=True)
class Schedule:
    """The noise levels of one sampling run."""

    sigmas: Tensor  # (steps + 1,) float32, decreasing from ~1 to a final 0
    timesteps: Tensor  # (steps,) what the DiT is told: int64 for "unipc", float32 for "euler"

    @property
    def steps(self) -> int:
        """Number of model evaluations (before guidance doubles the batch)."""
        return int(self.timesteps.shape[0])


def _check_shift(shift: float) -> None:
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")


def shift_sigmas(sigmas: ArrayT, shift: float) -> ArrayT:
    """``shift * sigma / (1 + (shift - 1) * sigma)`` elementwise (tensor, array or float).

    Keeps 0 and 1 fixed; ``shift > 1`` moves every sigma in between towards 1.
    """
    _check_shift(shift)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _check_args(steps: int, shift: float, sampler: str, num_train_timesteps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    _check_shift(shift)
    if sampler not in SCHEDULE_SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {list(SCHEDULE_SAMPLERS)}")
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int):
        raise ValueError(
            f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}"
        )
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps}")


def _with_final_zero(sigmas: np.ndarray) -> Tensor:
    """float64 sigmas (steps,) -> float32 tensor (steps + 1,) ending in 0."""
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))


def _unipc_schedule(steps: int, shift: float, n: int) -> Schedule:
    sigmas = shift_sigmas(np.linspace(1, 1 / n, steps + 1)[:-1], shift)  # (steps,) float64
    if abs(sigmas[0] - 1) < _UNIPC_FIRST_SIGMA_EPS:
        sigmas[0] -= _UNIPC_FIRST_SIGMA_EPS
    timesteps = torch.from_numpy(sigmas * n).to(torch.int64)  # truncates, as diffusers
    return Schedule(sigmas=_with_final_zero(sigmas), timesteps=timesteps)


def _euler_schedule(steps: int, shift: float, n: int) -> Schedule:
    ends = shift_sigmas(torch.tensor([n, 1], dtype=torch.float32) / n, shift)  # float32, as init
    sigma_max, sigma_min = float(ends[0]), float(ends[1])
    sigmas = np.linspace(sigma_max * n, sigma_min * n, steps) / n  # (steps,) float64
    sigmas = shift_sigmas(sigmas, shift)  # shifted a second time, as diffusers does
    full = _with_final_zero(sigmas)
    return Schedule(sigmas=full, timesteps=full[:-1] * n)


def flow_schedule(
    steps: int, shift: float, sampler: str = "unipc", num_train_timesteps: int = 1000
) -> Schedule:
    """Sigmas (steps + 1,) and timesteps (steps,) of diffusers' scheduler for ``sampler``.

    ``"unipc"`` matches ``UniPCMultistepScheduler(prediction_type="flow_prediction",
    use_flow_sigmas=True, flow_shift=shift)``; ``"euler"`` matches
    ``FlowMatchEulerDiscreteScheduler(shift=shift)`` (see the module docstring).
    """
    _check_args(steps, shift, sampler, num_train_timesteps)
    build = _unipc_schedule if sampler == "unipc" else _euler_schedule
    return build(steps, float(shift), num_train_timesteps)


# Scheduler options kinema reproduces only at these values (diffusers' defaults / Wan's).
_UNIPC_FIXED: dict[str, Any] = {
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "num_train_timesteps": 1000,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "disable_corrector": [],
    "final_sigmas_type": "zero",
    "thresholding": False,
    "solver_p": None,
    "use_dynamic_shifting": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "shift_terminal": None,
}
_EULER_FIXED: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "use_dynamic_shifting": False,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "stochastic_sampling": False,
}
_SCHEDULER_CLASSES = {
    "UniPCMultistepScheduler": ("unipc", "flow_shift", _UNIPC_FIXED),
    "FlowMatchEulerDiscreteScheduler": ("euler", "shift", _EULER_FIXED),
}


def _check_fixed(name: str, d: dict[str, Any], fixed: dict[str, Any]) -> None:
    for key, want in fixed.items():
        got = d.get(key, want)
        if got != want and not (want is None and not got):
            raise ValueError(f"{name} with {key}={got!r} is not supported; kinema needs {want!r}")


def schedule_from_diffusers_config(d: dict[str, Any]) -> tuple[str, float]:
    """(sampler, shift) from a diffusers ``scheduler/scheduler_config.json`` dict.

    ``UniPCMultistepScheduler`` -> ``"unipc"`` (shift from ``flow_shift``),
    ``FlowMatchEulerDiscreteScheduler`` -> ``"euler"`` (shift from ``shift``). Options that
    would make diffusers sample differently from kinema raise ``ValueError``.
    """
    name = d.get("_class_name")
    if name not in _SCHEDULER_CLASSES:
        raise ValueError(
            f"unsupported scheduler _class_name {name!r}; valid: {sorted(_SCHEDULER_CLASSES)}"
        )
    sampler, shift_key, fixed = _SCHEDULER_CLASSES[name]
    _check_fixed(name, d, fixed)
    shift = d.get(shift_key, 1.0)
    _check_shift(shift)
    return sampler, float(shift)
