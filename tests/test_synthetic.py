"""The synthetic world: deterministic, held-out combinations kept out of training, objects in
frame and clearly moving, captions that parse back, paraphrases unseen in training."""

from __future__ import annotations

import re

import numpy as np
import pytest

from kinema.data.synthetic import (
    BACKGROUNDS,
    CHANGES,
    COLOURS,
    DIRECTIONS,
    HELDOUT,
    JOINERS,
    MIN_CONTRAST,
    MOTIONS,
    PARAPHRASE_WORDS,
    SHAPES,
    TEMPLATES,
    THEN_WORDS,
    ClipSpec,
    ObjectSpec,
    SyntheticClips,
    annotations,
    caption,
    contrast,
    parse_prompt,
    render,
    sample_clip_spec,
    vocabulary,
)


def _specs(n: int, seed: int = 0, **kw) -> list[ClipSpec]:
    rng = np.random.default_rng(seed)
    return [sample_clip_spec(rng, **kw) for _ in range(n)]


def test_same_seed_same_bytes_and_different_seeds_differ():
    a, b, c = SyntheticClips(3)[5], SyntheticClips(3)[5], SyntheticClips(4)[5]
    assert a[0].shape == (33, 128, 128, 3) and a[0].dtype == np.uint8
    assert a[0].tobytes() == b[0].tobytes() and a[1] == b[1] and a[2] == b[2]
    assert a[0].tobytes() != c[0].tobytes()
    assert render(a[2]).tobytes() == a[0].tobytes()
    small = SyntheticClips(3, size=(64, 48), frames=9, fps=8)[0][0]
    assert small.shape == (9, 48, 64, 3)


def test_heldout_combinations_are_a_tenth_and_never_in_training():
    valid = [(c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS]
    valid = [t for t in valid if t[1:] != ("circle", "rotating")]
    assert 0.08 <= len(HELDOUT) / len(valid) <= 0.12 and set(valid) >= HELDOUT
    for i, vocab in enumerate((COLOURS, SHAPES, MOTIONS)):  # every value is still trained
        assert {t[i] for t in HELDOUT} == set(vocab)
    train = _specs(3000, seed=1, change_prob=0.5)
    seen = {
        (o.colour, o.shape, m) for s in train for o in s.objects for m in (o.motion, o.then_motion)
    }
    assert not seen & HELDOUT
    assert len({t for t in seen if t[2]}) > 0.8 * (len(valid) - len(HELDOUT))  # broad coverage
    heldout = _specs(300, seed=2, split="heldout")
    assert all((o.colour, o.shape, o.motion) in HELDOUT for s in heldout for o in s.objects)


def test_objects_stay_in_frame_apart_contrasted_and_move_visibly():
    for spec in _specs(150, seed=3, change_prob=0.0):
        ann = annotations(spec)
        boxes = np.array([[o["box"] for o in frame] for frame in ann])  # (T, N, 4)
        assert boxes[..., :2].min() >= 0 and boxes[..., 2].max() <= spec.width
        assert boxes[..., 3].max() <= spec.height
        for i in range(len(spec.objects)):
            for j in range(i):
                a, b = boxes[:, i], boxes[:, j]
                apart = (a[:, 2] < b[:, 0]) | (b[:, 2] < a[:, 0])
                assert (apart | (a[:, 3] < b[:, 1]) | (b[:, 3] < a[:, 1])).all()
        assert len({o.colour for o in spec.objects}) == len(spec.objects)
        for o, first, last in zip(spec.objects, ann[0], ann[-1], strict=True):
            assert contrast(o.colour, spec.background) >= MIN_CONTRAST
            _assert_visible(o.motion, first, last, spec)


def test_object_scale_makes_objects_larger_and_keeps_the_world_rules():
    plain = _specs(120, seed=6, change_prob=0.0)
    big = _specs(120, seed=6, change_prob=0.0, object_scale=1.5)
    mean = [np.mean([o.size for s in specs for o in s.objects]) for specs in (plain, big)]
    assert 1.4 <= mean[1] / mean[0] <= 1.6
    for spec in big:  # still in frame, apart and visibly moving
        ann = annotations(spec)
        boxes = np.array([[o["box"] for o in frame] for frame in ann])  # (T, N, 4)
        assert boxes[..., :2].min() >= 0 and boxes[..., 2:].max() <= spec.width
        for o, first, last in zip(spec.objects, ann[0], ann[-1], strict=True):
            _assert_visible(o.motion, first, last, spec)
    with pytest.raises(ValueError, match="object_scale 2.0; valid: 0.5 to 1.6"):
        _specs(1, object_scale=2.0)


def test_timed_captions_name_the_motion_before_and_after_the_change():
    ds = SyntheticClips(4, change_prob=0.5)
    seen = 0
    for i in range(40):
        spec, timed = ds[i][2], ds.timed(i)
        first = spec.objects[0]
        if first.then_motion is None:
            assert timed is None
            continue
        (start, before), (switch, after) = timed
        assert start == 0 and switch == first.switch_frame
        assert parse_prompt(before)[0]["motion"] == first.motion
        assert parse_prompt(after)[0]["motion"] == first.then_motion
        assert "then_motion" not in parse_prompt(before)[0] | parse_prompt(after)[0]
        seen += 1
    assert seen >= 10


def _assert_visible(motion: str, first: dict, last: dict, spec: ClipSpec) -> None:
    dx = (last["centre"][0] - first["centre"][0]) / spec.width
    dy = (last["centre"][1] - first["centre"][1]) / spec.height
    if motion in DIRECTIONS:
        ux, uy = DIRECTIONS[motion]
        assert ux * dx >= 0.3 * abs(ux) and uy * dy >= 0.3 * abs(uy)  # 30 %+ per axis in 2 s
        assert (ux == 0 or abs(dx) >= 0.3) and (uy == 0 or abs(dy) >= 0.3)
    elif motion == "growing":
        assert last["radius"] >= 1.8 * first["radius"]
    elif motion == "shrinking":
        assert last["radius"] <= 0.6 * first["radius"]
    else:
        assert abs(dx) < 1e-9 and (motion == "bouncing" or abs(dy) < 1e-9)


def test_render_draws_each_object_where_its_annotation_says():
    for spec in _specs(20, seed=4):
        video, ann = render(spec), annotations(spec)
        for f in (0, spec.frames // 2, spec.frames - 1):
            for o in ann[f]:
                x, y = (int(v) for v in o["centre"])
                got = video[f, y, x].astype(int)
                assert np.abs(got - COLOURS[o["colour"]]).max() <= 40, (spec, f, o)


def test_motion_changes_are_perpendicular_mid_clip_and_a_fifth_by_default():
    for spec in _specs(200, seed=5, change_prob=1.0):
        o, *others = spec.objects
        assert o.then_motion in CHANGES[o.motion] and not any(p.then_motion for p in others)
        assert 0.4 * (spec.frames - 1) - 1 <= o.switch_frame <= 0.6 * (spec.frames - 1) + 1
        motions = [frame[0]["motion"] for frame in annotations(spec)]
        after = spec.frames - o.switch_frame
        assert motions == [o.motion] * o.switch_frame + [o.then_motion] * after
    assert not any(o.then_motion for s in _specs(200, change_prob=0.0) for o in s.objects)
    changing = np.mean([s.objects[0].then_motion is not None for s in _specs(1000, seed=6)])
    assert 0.16 <= changing <= 0.24, changing


@pytest.mark.parametrize("phrasing", ["train", "paraphrase", "rephrase"])
def test_captions_parse_back_to_their_objects(phrasing):
    ds = SyntheticClips(1, change_prob=0.3)
    right = 0
    for i in range(1000):
        spec, rng = ds.spec(i)
        text = caption(spec, rng, phrasing)
        want = [(o.colour, o.shape, o.motion, o.then_motion) for o in spec.objects]
        got = [(p.get("colour"), p.get("shape"), p.get("motion"), p.get("then_motion"))
               for p in parse_prompt(text)]  # fmt: skip
        right += got == want
    assert right / 1000 >= 0.99, right


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_vocabulary_is_the_words_of_the_training_captions():
    ds = SyntheticClips(3, change_prob=0.3)
    seen = set()
    for i in range(2000):
        spec, rng = ds.spec(i)
        seen |= _tokens(caption(spec, rng, "train"))
        timed = ds.timed(i)
        seen |= set().union(*(_tokens(c) for _, c in timed)) if timed else set()
    assert set(vocabulary()) == seen and list(vocabulary()) == sorted(seen)
    assert not {"crimson", "disc", "leftward", "footage", "cat"} & set(vocabulary())


def test_paraphrase_captions_use_words_never_seen_in_training():
    ds = SyntheticClips(2, change_prob=0.3)
    train_tokens = set()
    for i in range(3000):
        spec, rng = ds.spec(i)
        train_tokens |= _tokens(caption(spec, rng, "train"))
    for attr, table in PARAPHRASE_WORDS.items():
        for phrases in table.values():
            for p in phrases:  # colour and shape words wholly new, motions have a new word
                new = _tokens(p) - train_tokens
                assert new == _tokens(p) if attr != "motion" else new, (attr, p)
    for i in range(300):
        spec, rng = ds.spec(i)
        unseen = _tokens(caption(spec, rng, "paraphrase")) - train_tokens
        assert len(unseen) >= 2 + min(len(spec.objects), 2)
    forms = set().union(*map(_tokens, (*TEMPLATES["paraphrase"], *JOINERS["paraphrase"],
                                       THEN_WORDS["paraphrase"])))  # fmt: skip
    for i in range(300):  # rephrase: the training words in the paraphrases' sentence forms
        spec, rng = ds.spec(i)
        unseen = _tokens(caption(spec, rng, "rephrase")) - train_tokens
        assert unseen and unseen <= forms, unseen


@pytest.mark.parametrize(
    ("prompt", "want"),
    [
        ("a yellow circle moving right", [("yellow", "circle", "right", None)]),
        ("A red square moves to the left, then goes up", [("red", "square", "left", "up")]),
        ("a blue star spinning and a green triangle that grows",
         [("blue", "star", "rotating", None), ("green", "triangle", "growing", None)]),
        ("a white cross bouncing on a blue background", [("white", "cross", "bouncing", None)]),
        ("an orange ball falls", [("orange", "circle", "down", None)]),
        ("a cyan disc moving diagonally down and to the right",
         [("cyan", "circle", "down-right", None)]),
        ("a pink box that is not moving", [("pink", "square", "still", None)]),
        ("purple triangle shrinking, unknown words here",
         [("purple", "triangle", "shrinking", None)]),
        ("a turquoise pyramid drifting toward the upper left",
         [("cyan", "triangle", "up-left", None)]),
        ("something entirely different", []),
    ],
)  # fmt: skip
def test_parse_user_phrasings(prompt, want):
    got = [(p.get("colour"), p.get("shape"), p.get("motion"), p.get("then_motion"))
           for p in parse_prompt(prompt)]  # fmt: skip
    assert got == want


def test_bad_arguments_raise_value_error():
    obj = ObjectSpec("red", "circle", "right", 0.3, 0.5, 0.1, 0.25)
    bad = [
        lambda: SyntheticClips(0, frames=1),
        lambda: SyntheticClips(0, split="test"),
        lambda: SyntheticClips(0, size=(8, 8)),
        lambda: sample_clip_spec(np.random.default_rng(0), frames=1),
        lambda: sample_clip_spec(np.random.default_rng(0), max_objects=4),
        lambda: ObjectSpec("magenta", "circle", "right", 0.5, 0.5, 0.1, 0.2),
        lambda: ObjectSpec("red", "hexagon", "right", 0.5, 0.5, 0.1, 0.2),
        lambda: ObjectSpec("red", "circle", "sideways", 0.5, 0.5, 0.1, 0.2),
        lambda: ObjectSpec("red", "circle", "rotating", 0.5, 0.5, 0.1, 0.2),
        lambda: ObjectSpec("red", "circle", "right", 0.5, 0.5, 0.1, 0.2, then_motion="up"),
        lambda: ClipSpec((obj,), "black", frames=1),
        lambda: ClipSpec((obj,), "plaid"),
        lambda: ClipSpec((), "black"),
        lambda: caption(ClipSpec((obj,), "black"), np.random.default_rng(0), "poetic"),
        lambda: SyntheticClips(0, motion_weights={"sideways": 1.0}),
        lambda: SyntheticClips(0, motion_weights={"up": -1.0}),
        lambda: SyntheticClips(0, balance="pairs"),
        lambda: sample_clip_spec(np.random.default_rng(0), balance="colours"),
        lambda: sample_clip_spec(
            np.random.default_rng(0), motion_weights=dict.fromkeys(MOTIONS, 0)
        ),
    ]
    for make in bad:
        with pytest.raises(ValueError):
            make()
    assert set(BACKGROUNDS) and ClipSpec((obj,), "black").duration == 2.0


def _motion_counts(n: int, **kw) -> dict[str, int]:
    motions = [o.motion for spec in _specs(n, **kw) for o in spec.objects]
    return {m: motions.count(m) for m in MOTIONS}


def test_motion_weights_set_how_often_each_motion_is_drawn():
    plain = _motion_counts(300, change_prob=0.0)
    drilled = _motion_counts(300, change_prob=0.0, motion_weights={"up-left": 3.0})
    assert drilled["up-left"] > 2 * plain["up-left"] > 0
    assert drilled["left"] < plain["left"]
    only = _motion_counts(
        60, change_prob=0.0, motion_weights={**dict.fromkeys(MOTIONS, 0), "down": 1}
    )
    assert only["down"] == sum(only.values()) > 60
    # held-out combinations stay out of training whatever the weights
    specs = _specs(200, motion_weights={"up-left": 5.0})
    assert not {(o.colour, o.shape, o.motion) for s in specs for o in s.objects} & HELDOUT


def _pair_shares(balance: str, n: int = 3000) -> tuple[dict[tuple[str, str], float], set]:
    """Share of each (colour, motion) pair among ``n`` one-object, one-motion clips."""
    triples = [(o.colour, o.shape, o.motion)
               for spec in _specs(n, max_objects=1, change_prob=0.0, balance=balance)
               for o in spec.objects]  # fmt: skip
    pairs = [(c, m) for c, _, m in triples]
    return {p: pairs.count(p) / n for p in set(pairs)}, set(triples)


def test_colour_motion_balance_draws_every_pair_equally_often():
    """Held-out shapes make their (colour, motion) pairs rarer when every allowed triple is
    drawn equally often; ``balance="colour-motion"`` evens the pairs out and still never
    draws a held-out triple."""
    allowed = {(c, m): sum((c, s, m) not in HELDOUT and (s, m) != ("circle", "rotating")
                           for s in SHAPES) for c in COLOURS for m in MOTIONS}  # fmt: skip
    short = [p for p, k in allowed.items() if k == min(allowed.values())]  # e.g. red, up-left
    full = [p for p, k in allowed.items() if k == len(SHAPES)]
    plain, _ = _pair_shares("triples")
    even, triples = _pair_shares("colour-motion")
    mean = lambda shares, ps: sum(shares.get(p, 0.0) for p in ps) / len(ps)
    assert mean(plain, short) < 0.8 * mean(plain, full)  # 3/5 of the others' share
    assert mean(even, short) == pytest.approx(mean(even, full), rel=0.2)
    assert mean(even, short) == pytest.approx(1 / len(allowed), rel=0.2)
    assert not triples & HELDOUT and len({s for _, s, _ in triples}) == len(SHAPES)
