"""Step cache: threshold 0 is the plain model function; a high threshold skips and counts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kinema.configs import DiTConfig
from kinema.models.dit import VideoDiT
from kinema.sampling import cfg, flow_schedule, unipc
from kinema.sampling.cache import (
    CacheCalibration,
    calibrate,
    dit_probe,
    load_calibration,
    step_cache,
)

CONFIG = DiTConfig(num_heads=2, head_dim=8, text_dim=12, freq_dim=16, ffn_dim=24, num_layers=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    dit = VideoDiT(CONFIG).eval()
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(1, 5, 12, generator=g), torch.randn(1, 5, 12, generator=g)
    velocity = lambda x, t, c: dit(x, t.reshape(-1).expand(x.shape[0]), c)
    noise = torch.randn(1, 16, 3, 4, 4, generator=g)
    return dit, cfg(velocity, cond, uncond, 3.0), noise


def sample(fn, noise, steps=12):
    s = flow_schedule(steps, 2.0, "unipc")
    with torch.inference_mode():
        return unipc(fn, noise, s.sigmas, s.timesteps)


def test_threshold_zero_is_the_uncached_run(model):
    dit, fn, noise = model
    cache = step_cache(fn, 0.0, probe=dit_probe(dit))
    assert torch.equal(sample(cache, noise), sample(fn, noise))
    assert cache.evaluations == 12 and cache.skipped == 0


def test_high_threshold_skips_and_counts(model):
    dit, fn, noise = model
    calls = []
    counted = lambda x, t: calls.append(1) or fn(x, t)
    cache = step_cache(counted, 1e9, probe=dit_probe(dit), max_skips=2)
    out = sample(cache, noise)
    # never more than 2 skips in a row: evaluate, skip, skip, evaluate, ... over 12 steps
    assert cache.evaluations == len(calls) == 4 and cache.skipped == 8
    assert out.shape == noise.shape and torch.isfinite(out).all()
    assert not torch.equal(out, sample(fn, noise))


def test_thresholds_trade_evaluations_for_error(model):
    dit, fn, noise = model
    plain = sample(fn, noise)
    calib = calibrate(fn, lambda f: sample(f, noise), dit_probe(dit), degree=1)
    runs = []
    for threshold in (0.05, 0.3, 3.0):
        cache = step_cache(fn, threshold, calib, dit_probe(dit))
        err = (sample(cache, noise) - plain).abs().mean().item()
        runs.append((cache.evaluations, err))
    evals = [e for e, _ in runs]
    assert evals == sorted(evals, reverse=True) and evals[0] > evals[-1]
    assert runs[-1][1] >= runs[0][1]


def test_a_fresh_cache_per_run_gives_the_same_result(model):
    dit, fn, noise = model
    a = sample(step_cache(fn, 0.5, probe=dit_probe(dit)), noise)
    b = sample(step_cache(fn, 0.5, probe=dit_probe(dit)), noise)
    assert torch.equal(a, b)


def test_calibration_round_trip_and_default(tmp_path):
    assert load_calibration(tmp_path) == CacheCalibration()
    c = CacheCalibration((0.5, 2.0, 0.01))
    c.save(tmp_path / "step_cache.json")
    assert load_calibration(tmp_path) == c
    assert c.estimate(0.0) == pytest.approx(0.01) and CacheCalibration((-1.0, 0.0)).estimate(1) == 0
    table = CacheCalibration((1.0, 0.0), timesteps=(900.0, 500.0, 100.0), ratios=(10.0, 2.0, 0.5))
    table.save(tmp_path / "step_cache.json")
    assert load_calibration(tmp_path) == table
    assert table.timesteps == (100.0, 500.0, 900.0) and table.ratios == (0.5, 2.0, 10.0)
    assert table.summary().startswith("output / probe change per timestep: 900: 10, 500: 2, 100")
    assert table.estimate(0.1, 500.0) == pytest.approx(0.2)  # the ratio at that timestep
    assert table.estimate(0.1, 700.0) == pytest.approx(0.6)  # interpolated between 900 and 500
    assert table.estimate(0.1) == pytest.approx(0.1)  # no timestep: the polynomial
    with pytest.raises(ValueError, match="pair up"):
        CacheCalibration(timesteps=(1.0,), ratios=())


def test_calibration_keeps_the_ratio_per_timestep(model):
    """calibrate keeps output change / probe change for each timestep after the first; with
    it a cache skips by the ratio at the current timestep (and skips less at a low one)."""
    dit, fn, noise = model
    calibration = calibrate(fn, lambda f: sample(f, noise), dit_probe(dit))
    assert len(calibration.timesteps) == len(calibration.ratios) == 11  # 12 steps
    assert all(r > 0 for r in calibration.ratios)
    assert list(calibration.timesteps) == sorted(calibration.timesteps)  # kept ascending
    cached = step_cache(fn, 0.5, calibration, dit_probe(dit))
    sample(cached, noise)
    assert cached.skipped > 0 and cached.evaluations + cached.skipped == 12


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(threshold=-0.1), "threshold"), (dict(threshold=float("nan")), "threshold"),
     (dict(threshold=0.1, max_skips=-1), "max_skips")],
)  # fmt: skip
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        step_cache(lambda x, t: x, **kwargs)
    with pytest.raises(ValueError, match="finite"):
        CacheCalibration((float("inf"),))


def test_calibrate_cache_command_writes_what_load_reads(tmp_path, capsys):
    """`kinema calibrate-cache MODEL` fits on one uncached run, saves step_cache.json in the
    folder, and load() hands it to the pipeline; bad settings exit 2 and keep the old file."""
    from kinema.cli import CALIBRATION_PROMPT, main
    from kinema.loading import load
    from tests.serve_helpers import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    assert load(model).cache_calibration == CacheCalibration()  # uncalibrated: the identity
    assert main(["calibrate-cache", str(model), "--steps", "6"]) == 0
    saved = load_calibration(model)
    assert saved.summary() in capsys.readouterr().err  # the table it fitted, not only a path
    assert saved != CacheCalibration()
    pipe = load(model)
    assert pipe.cache_calibration == saved
    again = pipe.calibrate_cache(CALIBRATION_PROMPT, steps=6)
    assert again.coefficients == pytest.approx(saved.coefficients, rel=1e-6, abs=1e-9)
    before = (model / "step_cache.json").read_bytes()
    capsys.readouterr()
    for steps in ("2", "0"):  # one line, before loading: no warning about fewer steps first
        with pytest.raises(SystemExit) as exit_:
            main(["calibrate-cache", str(model), "--steps", steps])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1
        assert f"--steps {steps}: calibration needs at least 4 steps" in err
    with pytest.raises(SystemExit) as exit_:  # the model's own 2 steps are too few
        main(["calibrate-cache", str(model)])
    assert "samples in 2 steps by default; calibration needs at least 4: give --steps 4" in (
        capsys.readouterr().err)  # fmt: skip
    assert (model / "step_cache.json").read_bytes() == before
    assert [p.name for p in model.iterdir() if p.name.startswith(".")] == []
    from kinema.loading import BUILTIN, resolve_model_path

    (tmp_path / "link").symlink_to(resolve_model_path(BUILTIN))
    for spelling in (BUILTIN, str(tmp_path / "link")):  # it overwrote the package's own
        with pytest.raises(SystemExit) as exit_:
            main(["calibrate-cache", spelling])
        assert exit_.value.code == 2
        assert "kinema-tiny ships its calibration inside the installed package" in (
            capsys.readouterr().err)  # fmt: skip


def test_a_model_folder_can_recommend_a_cache(tmp_path):
    """A model whose kinema.json sets ``cache`` (as kinema-tiny's does) samples with it when a
    request leaves it out; ``cache=0`` evaluates every step; a negative, non-finite or
    non-number threshold is refused before any work."""
    from kinema.loading import load
    from tests.serve_helpers import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    meta = json.loads((model / "kinema.json").read_text())
    meta["sampling"].update(cache=1e9, steps=8)  # guidance 1: one DiT call a step uncached
    (model / "kinema.json").write_text(json.dumps(meta))
    pipe = load(model)
    assert pipe.defaults.cache == 1e9
    cached, plain = pipe.generate("a red circle"), pipe.generate("a red circle", cache=0)
    assert (cached.info["cache"], plain.info["cache"]) == (1e9, 0)
    assert plain.info["transformer_evaluations"] == 8
    assert 1 <= cached.info["transformer_evaluations"] < 8
    assert not np.array_equal(cached.frames, plain.frames)
    for bad in (-0.5, float("nan"), True, "fast"):
        with pytest.raises(ValueError, match="must be a number >= 0"):
            pipe.generate("a red circle", cache=bad)
