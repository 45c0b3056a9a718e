"""The judge, reading frames only, agrees with the ground truth of rendered synthetic clips,
survives blur and noise, and notices wrong answers, motion changes and inconsistency."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from kinema.data.synthetic import MOTIONS, ClipSpec, ObjectSpec, SyntheticClips, render
from kinema.eval.judge import (
    colour_name,
    judge,
    judge_clip,
    motion_between,
    score,
)

ATTRIBUTES = ("colour_ok", "shape_ok", "motion_ok", "count_ok")


def _accuracy(ds: SyntheticClips, n: int, degrade=lambda v: v) -> dict[str, float]:
    """Mean agreement of the judge with the specs of the first ``n`` clips of ``ds``."""
    totals = dict.fromkeys(ATTRIBUTES, 0.0)
    for i in range(n):
        frames, _, spec = ds[i]
        result = score(spec, judge_clip(degrade(frames)))
        for key in ATTRIBUTES:
            totals[key] += result[key]
    accuracy = {k: v / n for k, v in totals.items()}
    print(f"judge accuracy over {n} clips {ds.size} x {ds.frames}: {accuracy}")
    return accuracy


def _assert_thresholds(acc: dict[str, float]) -> None:
    assert acc["colour_ok"] >= 0.98 and acc["motion_ok"] >= 0.95, acc
    assert acc["shape_ok"] >= 0.90 and acc["count_ok"] >= 0.95, acc


def test_judge_agrees_with_ground_truth_64px():
    """200 clips, 1-3 objects, ~20 % with a motion change (judged before and after it)."""
    _assert_thresholds(_accuracy(SyntheticClips(7, size=(64, 64), frames=13), 200))


def test_judge_agrees_with_ground_truth_128px_full_length():
    _assert_thresholds(_accuracy(SyntheticClips(8), 30))


def test_judge_survives_blur_and_noise():
    """Generated clips are softer than renders: Gaussian blur (sigma 1 px) plus noise."""
    rng = np.random.default_rng(0)

    def degrade(v: np.ndarray) -> np.ndarray:
        soft = ndimage.gaussian_filter(v.astype(np.float32), (0, 1.0, 1.0, 0))
        return np.clip(soft + rng.normal(0, 6, v.shape), 0, 255).astype(np.uint8)

    _assert_thresholds(_accuracy(SyntheticClips(9, size=(128, 128), frames=17), 30, degrade))


def _clip(*objects: ObjectSpec, background: str = "navy", frames: int = 17) -> ClipSpec:
    return ClipSpec(tuple(objects), background, 96, 96, frames, 8)


def test_judge_notices_wrong_answers():
    o = ObjectSpec("red", "triangle", "right", 0.25, 0.5, 0.14, 0.3)
    frames = render(_clip(o))
    assert score("a red triangle moving right", judge_clip(frames)) == dict(
        colour_ok=True, shape_ok=True, motion_ok=True, count_ok=True, consistency=1.0
    )
    wrong = {
        "colour_ok": "a blue triangle moving right",
        "shape_ok": "a red star moving right",
        "motion_ok": "a red triangle moving up",
        "count_ok": "a red triangle moving right and a green circle moving left",
    }
    j = judge_clip(frames)
    for key, prompt in wrong.items():
        assert not score(prompt, j)[key], prompt
    assert judge_clip(frames[::-1]).objects[0].motion == "left"  # time reversed
    blank = np.full_like(frames, 30)
    assert judge_clip(blank).count == 0 and not judge(blank, [o]).count_ok


@pytest.mark.parametrize(
    ("shape", "motion"),
    [("square", "rotating"), ("star", "still"), ("cross", "growing"), ("circle", "bouncing"),
     ("triangle", "shrinking"), ("square", "up-left")],
)  # fmt: skip
def test_each_kind_of_motion_is_named(shape, motion):
    speed = {"rotating": 0.2, "growing": 0.5, "shrinking": 0.5, "bouncing": 0.8}.get(motion, 0.2)
    y = 0.25 if motion == "bouncing" else 0.7 if motion == "up-left" else 0.5
    o = ObjectSpec("yellow", shape, motion, 0.7 if motion == "up-left" else 0.5, y, 0.15, speed)
    found = judge_clip(render(_clip(o))).objects
    assert [(f.colour, f.shape, f.motion) for f in found] == [("yellow", shape, motion)]


def test_motion_between_sees_a_change_at_its_time():
    ds = SyntheticClips(10, size=(96, 96), frames=25, max_objects=1, change_prob=1.0)
    checked = 0
    for i in range(15):
        frames, text, spec = ds[i]
        o = spec.objects[0]
        if o.then_motion is None:
            continue
        j = judge_clip(frames)
        s, t = o.switch_frame, spec.frames
        assert motion_between(j, 0, s) == [o.motion] and motion_between(frames, s, t) == [
            o.then_motion
        ]
        assert score(spec, j)["motion_ok"] and score(text, j)["motion_ok"]  # timed, untimed
        assert not score([replace(o, then_motion=o.motion)], j)["motion_ok"]
        checked += 1
    assert checked >= 12


def test_consistency_drops_when_an_object_changes_shape():
    a = ObjectSpec("green", "square", "still", 0.5, 0.5, 0.15, 0.0)
    b = replace(a, shape="circle")
    steady, square_then_circle = render(_clip(a)), render(_clip(a))
    square_then_circle[9:] = render(_clip(b))[9:]
    assert judge_clip(steady).consistency == 1.0
    j = judge_clip(square_then_circle)
    assert j.count == 1 and 0.4 <= j.consistency <= 0.6


def test_colour_names_follow_human_rules_not_the_renderer():
    named = {(255, 0, 0): "red", (0, 160, 0): "green", (0, 0, 255): "blue",
             (255, 255, 0): "yellow", (255, 165, 0): "orange", (128, 0, 128): "purple",
             (250, 250, 250): "white", (0, 255, 255): "cyan", (255, 105, 180): "pink",
             (10, 10, 10): "black", (128, 128, 128): "gray"}  # fmt: skip
    assert {rgb: colour_name(rgb) for rgb in named} == named


def test_bad_input_raises_value_error():
    frames = render(_clip(ObjectSpec("red", "circle", "still", 0.5, 0.5, 0.1, 0.0)))
    for bad in (frames.astype(np.float32), frames[0], frames[:1], frames[..., :2]):
        with pytest.raises(ValueError):
            judge_clip(bad)
    with pytest.raises(ValueError):
        motion_between(frames, 5, 5)
    with pytest.raises(ValueError):
        score("nothing of this world", judge_clip(frames))


def test_eval_command_writes_table_and_json(tmp_path, capsys):
    """`kinema eval` runs end to end (a random tiny model scores near zero: mechanics only)."""
    import json

    from safetensors.torch import save_file

    from kinema.cli import main
    from kinema.eval.run import heldout_prompts
    from kinema.loading import load
    from tests.serve_helpers import build_tiny_model
    from tests.test_lora import random_lora

    model = build_tiny_model(tmp_path / "tiny")
    lora = tmp_path / "lora.safetensors"
    save_file(random_lora(load(model).dit), str(lora))
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(model), "--quick", "--seeds", "1", "--guidance", "2.5"]
    assert main([*args, "--cache", "0.3", "--lora", f"{lora}:0.5", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    # the model's steps and contrast, the given CFG, step cache and LoRA
    assert results["settings"] == {"steps": 2, "guidance": 2.5, "cache": 0.3, "contrast": 1.0,
                                   "dtype": "float32", "device": "cpu",
                                   "loras": [{"path": str(lora), "strength": 0.5}]}  # fmt: skip
    assert all(results[name]["clips"] == 5 for name in ("heldout", "paraphrase", "rephrase"))
    assert 0 <= results["heldout"]["colour_ok"] <= 1 and results["vae_psnr_db"] > 0
    clips = results["heldout"]["per_clip"]  # each clip's verdict and what the judge found
    assert [c["prompt"] for c in clips] == heldout_prompts(5) and all("found" in c for c in clips)
    words = results["heldout"]["motion_by_word"]
    assert set(words) == {c["motion"] for c in clips} <= set(MOTIONS)
    weighted = sum(v * sum(c["motion"] == m for c in clips) for m, v in words.items()) / 5
    assert weighted == pytest.approx(results["heldout"]["motion_ok"], abs=1e-3)
    captured = capsys.readouterr()
    assert "| heldout | 5 |" in captured.out
    assert "eval: 100%" in captured.err and "20/20" in captured.err  # a bar over all clips
