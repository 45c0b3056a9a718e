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


def _repeat_timestep(t: Tensor, batch: int, copies: int = 2) -> Tensor:
    """t as () (shared), (B,) or (B, F) -> the same for the batch of ``copies`` x B."""
    if t.ndim > 0 and t.shape[0] == batch:
        return torch.cat([t] * copies)  # (copies B, ...)
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
        v = model_fn_ctx(torch.cat([x, x]), _repeat_timestep(t, b), both)  # (2B, ...)
        v_cond, v_uncond = v[:b], v[b:]
        return v_uncond + scale * (v_cond - v_uncond)

    return guided


def contrast_cfg(
    model_fn_ctx: ContextModelFn, cond: Tensor, uncond: Tensor | None, other: Tensor,
    scale: float, weight: float,
) -> ModelFn:  # fmt: skip
    """Guidance that also steers away from ``other`` contexts (B, F, L, D) -- for timed
    prompts, each latent frame's neighbouring prompt:
    ``cfg + weight * (v_cond - v_other)``, the same contrast as negative-prompt guidance but
    per frame and added to the usual term rather than replacing it, so colour and shape (which
    both prompts name) keep their guidance. One forward of batch 3B (2B without ``uncond``,
    i.e. ``scale == 1``); ``weight == 0`` is :func:`cfg` itself (one conditional forward
    without ``uncond``)."""
    if isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"contrast weight must be a finite number >= 0, got {weight!r}")
    if weight == 0:
        return (
            cfg(model_fn_ctx, cond, cond, 1.0)
            if uncond is None
            else cfg(model_fn_ctx, cond, uncond, scale)
        )
    if other.shape != cond.shape:
        raise ValueError(f"other contexts {tuple(other.shape)} must match cond {tuple(cond.shape)}")
    guided = scale != 1 and uncond is not None
    if guided:
        _check_cfg(cond, uncond, scale)
    parts = [cond, uncond, other] if guided else [cond, other]
    stacked = torch.cat(parts)  # (nB, F, L, D)

    def contrasted(x: Tensor, t: Tensor) -> Tensor:
        b, n = x.shape[0], len(parts)
        v = model_fn_ctx(torch.cat([x] * n), _repeat_timestep(t, b, n), stacked).split(b)
        v_cond, v_other = v[0], v[-1]
        base = v[1] + scale * (v_cond - v[1]) if guided else v_cond
        return base + weight * (v_cond - v_other)

    return contrasted


def count_calls(model_fn: Callable[P, R]) -> tuple[Callable[P, R], Callable[[], int]]:
    """``model_fn`` wrapped to count its calls, and a function returning the count so far."""
    calls = [0]

    def counted(*args: P.args, **kwargs: P.kwargs) -> R:
        calls[0] += 1
        return model_fn(*args, **kwargs)

    return counted, lambda: calls[0]
