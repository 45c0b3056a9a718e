"""Classifier-free guidance and call counting: each wraps one model function into another.

Classifier-free guidance (Ho & Salimans 2022) mixes the velocities predicted with the prompt
(``cond``) and without it (``uncond``, e.g. the negative prompt):
``v = v_uncond + scale * (v_cond - v_uncond)``, diffusers' formula for Wan.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor

from kinema.sampling.samplers import ModelFn

ContextModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, t, context) -> velocity
P = ParamSpec("P")
R = TypeVar("R")


def _check_cfg(cond: Tensor, uncond: Tensor, scale: float) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"guidance scale must be a finite number, got {scale!r}")
    if scale != 1 and cond.shape != uncond.shape:
        raise ValueError(
            f"cond and uncond contexts must have the same shape (B, L, D) to share one batch, "
            f"got {tuple(cond.shape)} and {tuple(uncond.shape)}"
        )


def _double_timestep(t: Tensor, batch: int) -> Tensor:
    """t as () (shared), (B,) or (B, F) -> the same for the doubled batch 2B."""
    if t.ndim > 0 and t.shape[0] == batch:
        return torch.cat([t, t])  # (2B, ...)
    return t


def cfg(model_fn_ctx: ContextModelFn, cond: Tensor, uncond: Tensor, scale: float) -> ModelFn:
    """Guided ``model_fn(x, t)`` from ``model_fn_ctx(x, t, context)``.

    cond / uncond: context tokens (B, L, D). With ``scale == 1`` each call is one conditional
    forward (``uncond`` is never used). Otherwise each call is ONE forward of batch 2B --
    ``x`` twice, contexts ``[cond; uncond]`` -- split into ``v_cond, v_uncond`` and mixed as
    ``v_uncond + scale * (v_cond - v_uncond)``.
    """
    _check_cfg(cond, uncond, scale)
    if scale == 1:
        return lambda x, t: model_fn_ctx(x, t, cond)
    both = torch.cat([cond, uncond])  # (2B, L, D)

    def guided(x: Tensor, t: Tensor) -> Tensor:
        b = x.shape[0]
        v = model_fn_ctx(torch.cat([x, x]), _double_timestep(t, b), both)  # (2B, ...)
        v_cond, v_uncond = v[:b], v[b:]
        return v_uncond + scale * (v_cond - v_uncond)

    return guided


def count_calls(model_fn: Callable[P, R]) -> tuple[Callable[P, R], Callable[[], int]]:
    """``model_fn`` wrapped to count its calls, and a function returning the count so far."""
    calls = [0]

    def counted(*args: P.args, **kwargs: P.kwargs) -> R:
        calls[0] += 1
        return model_fn(*args, **kwargs)

    return counted, lambda: calls[0]
