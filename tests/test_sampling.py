"""Schedules and samplers against diffusers' schedulers; known answers; guidance batching."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from torch import Tensor

from kinema.sampling import (
    SAMPLERS,
    cfg,
    contrast_cfg,
    count_calls,
    euler,
    flow_schedule,
    schedule_from_diffusers_config,
    shift_sigmas,
    unipc,
)

LATENT_SHAPE = (2, 4, 3, 5, 6)  # (B, C, F, H, W)


def diffusers_scheduler(sampler: str, shift: float, order: int = 2):
    if sampler == "unipc":
        return UniPCMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            num_train_timesteps=1000,
            solver_order=order,
        )
    return FlowMatchEulerDiscreteScheduler(shift=shift, num_train_timesteps=1000)


def diffusers_sample(sampler: str, model, x: Tensor, steps: int, shift: float, order: int = 2):
    """The WanPipeline loop: fresh scheduler, set_timesteps, step through its timesteps."""
    sched = diffusers_scheduler(sampler, shift, order)
    sched.set_timesteps(steps)
    sched.set_begin_index(0)
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x, return_dict=False)[0]
    return x


def nonlinear_model(x: Tensor, t: Tensor) -> Tensor:
    tt = t.float() / 1000
    return torch.tanh(x) * torch.cos(3 * tt) + 0.3 * x * tt - 0.2 * torch.sin(x) ** 2


def linear_model(x: Tensor, t: Tensor) -> Tensor:
    return 0.7 * x - 0.5 + t.float() / 2000


def bf16_model(x: Tensor, t: Tensor) -> Tensor:
    """A model that answers in bfloat16 (as the DiT does on a GPU) for float32 latents."""
    return nonlinear_model(x, t).to(torch.bfloat16)


def kinema_sample(sampler: str, model, x: Tensor, steps: int, shift: float, order: int = 2):
    s = flow_schedule(steps, shift, sampler)
    kwargs = {"order": order} if sampler == "unipc" else {}
    return SAMPLERS[sampler](model, x, s.sigmas, s.timesteps, **kwargs)


# ---------------------------------------------------------------------------------------------
# schedules


@pytest.mark.parametrize("sampler", ["unipc", "euler"])
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_schedule_equals_diffusers(sampler, steps, shift):
    ref = diffusers_scheduler(sampler, shift)
    ref.set_timesteps(steps)
    got = flow_schedule(steps, shift, sampler)
    assert got.sigmas.dtype == ref.sigmas.dtype == torch.float32
    assert got.timesteps.dtype == ref.timesteps.dtype
    assert torch.equal(got.sigmas, ref.sigmas)
    assert torch.equal(got.timesteps, ref.timesteps)
    assert got.sigmas.shape == (steps + 1,) and got.sigmas[-1] == 0 and got.steps == steps


def test_unipc_and_euler_grids_differ():
    u, e = flow_schedule(4, 3.0, "unipc"), flow_schedule(4, 3.0, "euler")
    assert u.timesteps.dtype == torch.int64 and e.timesteps.dtype == torch.float32
    assert u.sigmas[0] < 1 and e.sigmas[0] == 1
    assert not torch.allclose(u.sigmas, e.sigmas)


def test_shift_sigmas_known_values():
    s = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert torch.equal(shift_sigmas(s, 1.0), s)
    expected = torch.tensor([0.0, 0.5, 0.75, 1.0], dtype=torch.float64)  # 3s / (1 + 2s)
    torch.testing.assert_close(shift_sigmas(s, 3.0), expected)
    assert shift_sigmas(0.5, 3.0) == pytest.approx(0.75)


@pytest.mark.parametrize(("sampler", "shift"), [("unipc", 3.0), ("euler", 5.0)])
def test_schedule_from_diffusers_config(sampler, shift):
    config = json.loads(diffusers_scheduler(sampler, shift).to_json_string())
    assert schedule_from_diffusers_config(config) == (sampler, shift)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"_class_name": "DDIMScheduler"}, "DDIMScheduler"),
        ({}, "_class_name None"),
        ({"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": False}, "use_flow_sigmas"),
        (
            {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True, "solver_order": 3},
            "solver_order=3",
        ),
        (
            {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True},
            "use_dynamic_shifting",
        ),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": -1.0}, "shift"),
    ],
)
def test_schedule_from_diffusers_config_rejects(config, match):
    with pytest.raises(ValueError, match=match):
        schedule_from_diffusers_config(config)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(steps=0, shift=3.0), "steps must be an integer >= 1, got 0"),
        (dict(steps=2.5, shift=3.0), "steps"),
        (dict(steps=4, shift=0.0), "shift must be a finite number > 0, got 0.0"),
        (dict(steps=4, shift=-1.0), "shift"),
        (dict(steps=4, shift=math.nan), "shift"),
        (dict(steps=4, shift=3.0, sampler="ddim"), "unknown sampler 'ddim'"),
        (dict(steps=4, shift=3.0, num_train_timesteps=1), "num_train_timesteps"),
    ],
)
def test_flow_schedule_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flow_schedule(**kwargs)


# ---------------------------------------------------------------------------------------------
# samplers against diffusers' scheduler.step loop


@pytest.mark.parametrize(
    ("sampler", "order"), [("euler", 1), ("unipc", 1), ("unipc", 2), ("unipc", 3)]
)
@pytest.mark.parametrize("model", [nonlinear_model, linear_model, bf16_model])
@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_sampler_equals_diffusers(sampler, order, model, steps):
    x = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(steps))
    ref = diffusers_sample(sampler, model, x.clone(), steps, 3.0, order)
    got = kinema_sample(sampler, model, x.clone(), steps, 3.0, order)
    assert got.dtype == ref.dtype and got.shape == x.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["euler", "unipc"])
@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_sampler_equals_diffusers_wan_defaults(sampler, shift):
    """50 steps, one latent, as Wan samples."""
    x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    ref = diffusers_sample(sampler, nonlinear_model, x.clone(), 50, shift)
    got = kinema_sample(sampler, nonlinear_model, x.clone(), 50, shift)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def delta_flow(x0: Tensor, sigmas: Tensor, timesteps: Tensor):
    """Exact velocity for data that is the single point x0: v(x, sigma) = (x - x0) / sigma."""
    sigma_at = {t.item(): s for t, s in zip(timesteps, sigmas[:-1], strict=True)}
    return lambda x, t: (x - x0) / sigma_at[t.item()]


@pytest.mark.parametrize("sampler", ["euler", "unipc"])
@pytest.mark.parametrize("steps", [1, 3, 5])
def test_delta_distribution_lands_on_the_point(sampler, steps):
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(LATENT_SHAPE, generator=g), torch.randn(LATENT_SHAPE, generator=g)
    s = flow_schedule(steps, 3.0, sampler)
    x = (1 - s.sigmas[0]) * x0 + s.sigmas[0] * noise
    out = SAMPLERS[sampler](delta_flow(x0, s.sigmas, s.timesteps), x, s.sigmas, s.timesteps)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)


@pytest.mark.parametrize("sampler", ["euler", "unipc"])
def test_callback_and_inputs_untouched(sampler):
    x = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(4))
    before, seen = x.clone(), []
    s = flow_schedule(4, 3.0, sampler)
    SAMPLERS[sampler](nonlinear_model, x, s.sigmas, s.timesteps, callback=lambda *a: seen.append(a))
    assert [(i, n) for i, n, _ in seen] == [(i, 4) for i in range(4)]
    assert all(v.shape == x.shape for _, _, v in seen)
    assert torch.equal(x, before)


@pytest.mark.parametrize("fn", [euler, unipc])
def test_sampler_rejects_bad_schedule(fn):
    s = flow_schedule(4, 3.0)
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="one more entry"):
        fn(linear_model, x, s.sigmas, s.timesteps[:-1])
    with pytest.raises(ValueError, match="1-D"):
        fn(linear_model, x, s.sigmas[None], s.timesteps)


def test_unipc_rejects_bad_order():
    s = flow_schedule(4, 3.0)
    with pytest.raises(ValueError, match=r"order must be one of \[1, 2, 3\], got 4"):
        unipc(linear_model, torch.zeros(1, 2), s.sigmas, s.timesteps, order=4)


# ---------------------------------------------------------------------------------------------
# guidance


def context_model(batches: list[int]):
    """A model of (x (B, C, F, H, W), t () / (B,) / (B, F), context) recording batch sizes."""

    def fn(x: Tensor, t: Tensor, ctx: Tensor) -> Tensor:
        batches.append(x.shape[0])
        t = t.float() / 1000
        t = t[:, None, :, None, None] if t.ndim == 2 else t.reshape(-1, 1, 1, 1, 1)  # per frame
        return torch.tanh(x) * ctx.mean(dim=(1, 2)).reshape(-1, 1, 1, 1, 1) + t * x

    return fn


def contexts() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 7, 8, generator=g), torch.randn(2, 7, 8, generator=g)


def test_cfg_scale_one_is_one_conditional_forward_per_step():
    batches: list[int] = []
    model, (cond, uncond) = context_model(batches), contexts()
    s = flow_schedule(5, 3.0)
    x = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(6))
    got = unipc(cfg(model, cond, uncond, 1.0), x, s.sigmas, s.timesteps)
    want = unipc(lambda x, t: model(x, t, cond), x, s.sigmas, s.timesteps)
    assert batches == [2] * 10  # 5 guided calls, then 5 reference calls
    assert torch.equal(got, want)


@pytest.mark.parametrize("t_shape", [(), (2,), (2, 3)])
def test_cfg_batches_cond_and_uncond_into_one_forward(t_shape):
    batches: list[int] = []
    model, (cond, uncond) = context_model(batches), contexts()
    x = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(7))
    t = torch.full(t_shape, 500.0)
    got = cfg(model, cond, uncond, 5.0)(x, t)
    assert batches == [4]
    v_c, v_u = model(x, t, cond), model(x, t, uncond)
    torch.testing.assert_close(got, v_u + 5.0 * (v_c - v_u), rtol=1e-6, atol=1e-6)


def test_cfg_in_a_sampler_equals_two_forwards_and_counts_calls():
    batches: list[int] = []
    model, (cond, uncond) = context_model(batches), contexts()
    counted, calls = count_calls(model)
    s = flow_schedule(6, 3.0)
    x = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(8))
    got = unipc(cfg(counted, cond, uncond, 4.0), x, s.sigmas, s.timesteps)
    assert calls() == 6 and batches == [4] * 6

    def two_forwards(x: Tensor, t: Tensor) -> Tensor:
        v_c, v_u = model(x, t, cond), model(x, t, uncond)
        return v_u + 4.0 * (v_c - v_u)

    torch.testing.assert_close(got, unipc(two_forwards, x, s.sigmas, s.timesteps))


def test_count_calls_counts_and_passes_through():
    wrapped, calls = count_calls(lambda a, b=1: a + b)
    assert calls() == 0
    assert wrapped(1) == 2 and wrapped(1, b=5) == 6
    assert calls() == 2


def test_cfg_rejects_bad_input():
    cond, uncond = contexts()
    model = context_model([])
    with pytest.raises(ValueError, match="finite"):
        cfg(model, cond, uncond, math.inf)
    with pytest.raises(ValueError, match=r"same shape.*\(2, 7, 8\) and \(2, 5, 8\)"):
        cfg(model, cond, uncond[:, :5], 3.0)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_contrast_cfg_adds_a_push_away_from_the_other_contexts_in_one_forward(scale):
    batches: list[int] = []
    model, (cond, uncond) = context_model(batches), contexts()
    other = torch.randn(cond.shape, generator=torch.Generator().manual_seed(9))
    x = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(10))
    t = torch.full((2, 3), 400.0)  # per frame, as frame conditioning gives it
    got = contrast_cfg(model, cond, None if scale == 1 else uncond, other, scale, 0.7)(x, t)
    assert batches == [4 if scale == 1 else 6]  # one forward: prompt, [negative,] neighbours
    v_c, v_u, v_o = model(x, t, cond), model(x, t, uncond), model(x, t, other)
    base = v_c if scale == 1 else v_u + scale * (v_c - v_u)
    torch.testing.assert_close(got, base + 0.7 * (v_c - v_o), rtol=1e-6, atol=1e-6)
    same = contrast_cfg(model, cond, uncond, other, scale, 0.0)(x, t)
    torch.testing.assert_close(same, cfg(model, cond, uncond, scale)(x, t), rtol=0, atol=0)
    for weight in (-0.1, math.nan, True):
        with pytest.raises(ValueError, match="contrast weight"):
            contrast_cfg(model, cond, uncond, other, scale, weight)
    with pytest.raises(ValueError, match="must match cond"):
        contrast_cfg(model, cond, uncond, other[:, :5], scale, 1.0)
