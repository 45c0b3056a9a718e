"""Flow-matching samplers: pure functions of ``(model_fn, x, sigmas, timesteps)``.

The network predicts the velocity ``v = noise - x0`` of the path
``x_sigma = (1 - sigma) * x0 + sigma * noise``, so ``x0 = x - sigma * v``. A sampler calls
``model_fn(x, t)`` once per step with the current latents ``x`` (any shape, e.g.
(B, C, F, H, W)) and the 0-d timestep ``timesteps[i]``; it keeps no state between calls.

Everything that changes what the model sees -- classifier-free guidance, a step cache, frame
conditioning that pins given frames to their clean values at timestep 0 -- wraps ``model_fn``
into another ``ModelFn`` (see :mod:`kinema.sampling.guidance`, :mod:`kinema.conditioning`);
the samplers hold no conditioning logic.

Numerics follow diffusers step for step (``FlowMatchEulerDiscreteScheduler.step`` and
``UniPCMultistepScheduler.step`` with flow sigmas), including dtypes: sigmas are float32
0-d tensors, so they never change the dtype of ``x``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor], Tensor]  # (x, t) -> velocity shaped like x
Callback = Callable[[int, int, Tensor], None]  # (step index, total steps, x after the step)
UNIPC_ORDERS = (1, 2, 3)


def _check_schedule(sigmas: Tensor, timesteps: Tensor) -> None:
    if sigmas.ndim != 1 or timesteps.ndim != 1 or timesteps.shape[0] < 1:
        raise ValueError(
            f"sigmas must be 1-D (steps + 1,) and timesteps 1-D (steps,) with steps >= 1, "
            f"got {tuple(sigmas.shape)} and {tuple(timesteps.shape)}"
        )
    if sigmas.shape[0] != timesteps.shape[0] + 1:
        raise ValueError(
            f"sigmas must have one more entry than timesteps, got {sigmas.shape[0]} sigmas "
            f"for {timesteps.shape[0]} timesteps"
        )


# ---------------------------------------------------------------------------------------------
# Euler


def euler_step(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """One Euler step of dx/dsigma = v: ``x + (sigma_next - sigma) * v``.

    Like diffusers, computed with x upcast to float32 and returned in v's dtype.
    """
    return (x.float() + (sigma_next - sigma) * v).to(v.dtype)


def euler(
    model_fn: ModelFn,
    x: Tensor,
    sigmas: Tensor,
    timesteps: Tensor,
    *,
    callback: Callback | None = None,
) -> Tensor:
    """Integrate the flow ODE from ``sigmas[0]`` to ``sigmas[-1]`` with Euler steps.

    x: initial latents (any shape); sigmas (steps + 1,); timesteps (steps,) -> x at
    ``sigmas[-1]``, shaped like x. ``callback(i, steps, x)`` runs after each step.
    """
    _check_schedule(sigmas, timesteps)
    sigmas = sigmas.to(device=x.device, dtype=torch.float32)
    n = timesteps.shape[0]
    for i in range(n):
        x = euler_step(x, model_fn(x, timesteps[i]), sigmas[i], sigmas[i + 1])
        if callback is not None:
            callback(i, n, x)
    return x


# ---------------------------------------------------------------------------------------------
# UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling
# of Diffusion Models"), data-prediction form, B(h) = e^h - 1 ("bh2"), in the flow's log-SNR
# lambda = log((1 - sigma) / sigma).


def _log_snr(sigma: Tensor) -> Tensor:
    """lambda = log(alpha) - log(sigma) with alpha = 1 - sigma (+inf at sigma = 0)."""
    return torch.log(1 - sigma) - torch.log(sigma)


def _bh2_coefficients(h: Tensor, order: int) -> tuple[Tensor, Tensor, Tensor]:
    """hh*phi_1(hh) = e^hh - 1 with hh = -h, B(h) (bh2: the same value) and b (order,).

    b_k = k! * hh*phi_{k+1}(hh) / B(h) for k = 1..order (the right-hand side of the paper's
    order conditions, Algorithm 2), using hh*phi_{k+1} = hh*phi_k / hh - 1 / k!.
    """
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh)
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, torch.stack(b)


def _weighted_sum(rhos: Tensor, d1s: list[Tensor]) -> Tensor:
    """sum_k rhos[k] * d1s[k] -> shaped like d1s[0]."""
    return torch.tensordot(rhos, torch.stack(d1s), dims=1)


def _uni_update(x: Tensor, x0s: list[Tensor], sigmas: Tensor, x0_t: Tensor | None = None) -> Tensor:
    """One UniP predictor step (``x0_t`` None) or UniC corrector step of order ``len(x0s)``.

    x: sample at ``s0 = sigmas[-2]``; x0s: data predictions at ``sigmas[-len(x0s)-1:-1]``
    (oldest first, the last one at s0); sigmas (order + 1,) ending in the target ``t``.
    The corrector also uses ``x0_t``, the data prediction at the predicted sample at ``t``.
    Returns the sample at ``t`` in x's dtype.
    """
    order, m0 = len(x0s), x0s[-1]
    s0, t = sigmas[-2], sigmas[-1]
    lambdas = [_log_snr(s) for s in sigmas]  # order + 1 scalars, each computed as diffusers
    h = lambdas[-1] - lambdas[-2]
    rks = [(lambdas[-2 - k] - lambdas[-2]) / h for k in range(1, order)]
    d1s = [(x0s[-1 - k] - m0) / rk for k, rk in enumerate(rks, start=1)]
    rks.append(torch.ones((), dtype=sigmas.dtype, device=sigmas.device))
    big_r = torch.stack([torch.pow(torch.stack(rks), i) for i in range(order)])  # (order, order)
    h_phi_1, b_h, b = _bh2_coefficients(h, order)
    alpha_t = 1 - t
    x_t = t / s0 * x - alpha_t * h_phi_1 * m0
    if x0_t is None:
        res = _predictor_residual(big_r, b, d1s, x.dtype)
    else:
        res = _corrector_residual(big_r, b, d1s, x0_t - m0, x.dtype)
    if res is not None:
        x_t = x_t - alpha_t * b_h * res
    return x_t.to(x.dtype)


def _predictor_residual(
    big_r: Tensor, b: Tensor, d1s: list[Tensor], dtype: torch.dtype
) -> Tensor | None:
    """UniP's higher-order term sum_k rho_k D1_k (None at order 1); rho = 1/2 at order 2."""
    if not d1s:
        return None
    if len(d1s) == 1:
        rhos = torch.ones(1, dtype=dtype, device=b.device) * 0.5
    else:
        rhos = torch.linalg.solve(big_r[:-1, :-1], b[:-1]).to(dtype)
    return _weighted_sum(rhos, d1s)


def _corrector_residual(
    big_r: Tensor, b: Tensor, d1s: list[Tensor], d1_t: Tensor, dtype: torch.dtype
) -> Tensor:
    """UniC's term sum_k rho_k D1_k + rho_t D1_t; rho_t = 1/2 at order 1."""
    if not d1s:
        rho_t = torch.ones((), dtype=dtype, device=b.device) * 0.5
        return rho_t * d1_t
    rhos = torch.linalg.solve(big_r, b).to(dtype)
    return _weighted_sum(rhos[:-1], d1s) + rhos[-1] * d1_t


def unipc(
    model_fn: ModelFn,
    x: Tensor,
    sigmas: Tensor,
    timesteps: Tensor,
    *,
    order: int = 2,
    callback: Callback | None = None,
) -> Tensor:
    """UniPC multistep sampling (bh2, data prediction, UniC corrector after every step).

    x: initial latents (any shape); sigmas (steps + 1,) in [0, 1) as from
    ``flow_schedule(..., sampler="unipc")``; timesteps (steps,) -> x at ``sigmas[-1]``.
    The predictor warms up from order 1 and lowers its order again over the last steps
    (diffusers' ``lower_order_final``); the corrector at step i reuses the model output of
    step i, so there is exactly one model call per step. ``callback(i, steps, x)`` runs after
    each step.
    """
    _check_schedule(sigmas, timesteps)
    if order not in UNIPC_ORDERS:
        raise ValueError(f"unipc order must be one of {list(UNIPC_ORDERS)}, got {order!r}")
    sigmas = sigmas.to(device=x.device, dtype=torch.float32)
    n = timesteps.shape[0]
    x0s: list[Tensor] = []  # data predictions of the last `order` steps, oldest first
    last: tuple[Tensor, int] | None = None  # (sample before the last predictor, its order)
    for i in range(n):
        x0 = x - sigmas[i] * model_fn(x, timesteps[i])
        if last is not None:
            prev, p = last
            x = _uni_update(prev, x0s[-p:], sigmas[i - p : i + 1], x0_t=x0)
        x0s = [*x0s, x0][-order:]
        p = min(order, n - i, len(x0s))
        last = (x, p)
        x = _uni_update(x, x0s[-p:], sigmas[i - p + 1 : i + 2])
        if callback is not None:
            callback(i, n, x)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"euler": euler, "unipc": unipc}
