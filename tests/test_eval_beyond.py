"""The conditioning-task checks of `kinema eval --beyond` (issue "beyond text")."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kinema.eval.beyond import (
    background_colour,
    frame_differences,
    mean_colour,
    object_colour,
    seam_ratio,
)


def ramp(frames: int, step: float) -> np.ndarray:
    """A clip whose brightness rises by ``step`` per frame: (T, 8, 8, 3) uint8."""
    levels = 40 + step * np.arange(frames, dtype=np.float64)
    return np.broadcast_to(levels[:, None, None, None], (frames, 8, 8, 3)).round().astype(np.uint8)


def test_seam_ratio_is_one_on_a_smooth_clip_and_large_at_a_jump():
    smooth = ramp(12, 3.0)
    assert np.allclose(frame_differences(smooth), 3.0)
    assert abs(seam_ratio(smooth, 6) - 1.0) < 1e-6
    jumped = smooth.copy()
    jumped[6:] = np.clip(jumped[6:].astype(int) + 30, 0, 255).astype(np.uint8)  # +30 at frame 6
    assert seam_ratio(jumped, 6) > 10
    assert seam_ratio(jumped, 3) < 2  # elsewhere the clip is still smooth


def test_mean_colour_is_per_channel():
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    frames[..., 0] = 255
    assert mean_colour(frames).tolist() == [255.0, 0.0, 0.0]


def test_background_colour_ignores_an_object_that_leaves():
    frames = np.zeros((2, 10, 10, 3), np.uint8)
    frames[..., 2] = 80  # navy background
    frames[0, 2:5, 2:5] = (255, 0, 0)  # a red square in the first frame only
    assert background_colour(frames[:1]).tolist() == background_colour(frames[1:]).tolist()
    assert mean_colour(frames[:1]).tolist() != mean_colour(frames[1:]).tolist()
    frames[1, ..., 2] = 90  # the background itself changes
    assert background_colour(frames[1:]).tolist() == [0.0, 0.0, 90.0]


def moving_square(colour: tuple[int, int, int], background: int = 80) -> np.ndarray:
    """A 10-pixel square of ``colour`` crossing a blue background left to right: (8, 48, 48, 3)."""
    frames = np.zeros((8, 48, 48, 3), np.uint8)
    frames[..., 2] = background
    for t in range(8):
        frames[t, 19:29, 2 + 4 * t : 12 + 4 * t] = colour
    return frames


def test_object_colour_follows_the_object_not_its_place_or_the_background():
    red = moving_square((220, 30, 30))
    assert np.abs(object_colour(red) - (220, 30, 30)).max() < 1
    later = moving_square((220, 30, 30), background=120)[::-1]  # moving back, lighter background
    assert np.abs(object_colour(later) - object_colour(red)).max() < 1
    drifted = moving_square((190, 60, 30))
    assert np.abs(object_colour(drifted) - object_colour(red)).max() == pytest.approx(30, abs=1)
    empty = np.zeros_like(red)
    empty[..., 2] = 80
    assert object_colour(empty) is None


def test_eval_beyond_runs_every_check(tmp_path, capsys):
    """Mechanics on a random tiny model (its numbers mean nothing; the built-in model's are in
    the README)."""
    from safetensors.torch import save_file

    from kinema.cli import main
    from kinema.io.checkpoint import load_dit
    from tests.serve_helpers import build_tiny_model
    from tests.test_lora import random_lora

    model = build_tiny_model(tmp_path / "tiny")
    lora = tmp_path / "lora.safetensors"
    save_file(random_lora(load_dit(model / "transformer")), str(lora))
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(model), "--quick", "--seeds", "1", "--beyond", "--out", str(out)]
    given = ["--steps", "1", "--guidance", "2.5", "--dtype", "bf16", "--lora", f"{lora}:0.5"]
    assert main([*args, *given]) == 0
    captured = capsys.readouterr()
    told = [ln for ln in captured.err.splitlines() if ln.startswith("beyond ")]
    assert told[0] == "beyond 1/5: image-to-video first frames" and len(told) == 5  # progress
    results = json.loads(out.read_text())
    assert results["settings"]["dtype"] == "bfloat16"  # --dtype reached the pipeline
    assert results["settings"]["device"] == "cpu"
    loras = [{"path": str(lora), "strength": 0.5}]
    assert results["settings"]["loras"] == loras
    beyond = results["beyond"]
    # --steps and --guidance reach these clips too (the model's own are 2 and 3.0)
    assert beyond["settings"] == {
        "steps": 1,
        "guidance": 2.5,
        "cache": 0.0,
        "dtype": "bfloat16",
        "device": "cpu",
    }
    assert beyond["first_frame_psnr_db"] > 0
    assert beyond["extension"]["seam_ratio_max"] >= beyond["extension"]["seam_ratio_median"] > 0
    assert 0 <= beyond["extension"]["background_drift_max"] <= 255
    assert 0 <= beyond["extension"]["object_colour_kept"] <= 1
    drift = beyond["extension"]["object_drift_max"]
    assert drift is None or 0 <= drift <= 255
    assert [len(steps) for steps in beyond["extension"]["object_drift"]] == [2, 2]  # --quick: 2
    memory = beyond["long_video_memory"]
    assert (memory["short_s"], memory["long_s"]) == (4.0, 8.0)
    assert memory["long_peak_mib"] > 100 and memory["ratio"] > 0.5
    # the memory check's own processes load the model as the eval did
    assert memory["loaded"] == {"dtype": "bfloat16", "loras": loras}
    assert beyond["timed_prompts"]["clips"] == beyond["timed_prompts_cut"]["clips"] == 4
    assert (beyond["timed_prompts"]["switch"], beyond["timed_prompts_cut"]["switch"]) == (
        "blend",
        "cut",
    )
    printed = captured.out
    assert "| image-to-video first frame |" in printed
    assert "| peak RSS 8 s / 4 s clip |" in printed
    assert "| object colour drift over extensions (0-255) |" in printed
    assert "| timed prompt (blend): motion before / after / both |" in printed
