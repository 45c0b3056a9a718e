"""The synthetic world: deterministic, held-out combinations kept out, captions complete."""

from __future__ import annotations

import numpy as np
import pytest

from kinema.data.world import (
    COLOURS,
    HELDOUT,
    MOTION_WORDS,
    PARAPHRASE,
    SHAPES,
    TEMPLATES,
    SyntheticClips,
    caption,
    position,
)


def test_same_seed_same_bytes_and_different_seeds_differ():
    a, b, c = SyntheticClips(3)[5], SyntheticClips(3)[5], SyntheticClips(4)[5]
    assert a[0].tobytes() == b[0].tobytes() and a[1] == b[1]
    assert a[0].tobytes() != c[0].tobytes()
    assert a[0].shape == (33, 128, 128, 3) and a[0].dtype == np.uint8


def test_heldout_combinations_never_in_training():
    train = SyntheticClips(0)
    seen = {(o.colour, o.shape, o.motion) for i in range(3000) for o in train.spec(i)[0].objects}
    assert not seen & HELDOUT
    assert len(seen) > 300  # the world is varied
    held = SyntheticClips(0, split="heldout")
    assert all((o.colour, o.shape, o.motion) in HELDOUT for o in held.spec(1)[0].objects)


def test_captions_name_colour_shape_and_motion_of_every_object():
    ds = SyntheticClips(1)
    for i in range(300):
        spec, rng = ds.spec(i)
        text = caption(spec, rng)
        for o in spec.objects:
            assert o.colour in text and o.shape in text
            assert any(w in text for w in MOTION_WORDS[o.motion])
            if o.then is not None:
                assert "then" in text


def test_paraphrase_words_never_appear_in_training_captions():
    ds = SyntheticClips(2)
    words = " ".join(caption(*ds.spec(i)) for i in range(500)).split()
    paraphrases = {w for table in PARAPHRASE.values() for v in table.values() for w in v.split()}
    assert not paraphrases & set(words)
    assert len(TEMPLATES) >= 4 and len(COLOURS) >= 8 and len(SHAPES) >= 3


def test_motion_is_visible_and_objects_stay_in_frame():
    ds = SyntheticClips(0)
    for i in range(200):
        spec = ds.spec(i)[0]
        for o in spec.objects:
            x0, y0, _, _ = position(o, 0.0)
            x1, y1, _, _ = position(o, (spec.frames - 1) / spec.fps)
            if o.motion in ("left", "right") and o.then is None:
                assert abs(x1 - x0) > 0.4 and np.sign(x1 - x0) == (1 if o.motion == "right" else -1)
            assert 0 < x1 < 1 and 0 < y1 < 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown split"):
        SyntheticClips(split="test")
    with pytest.raises(ValueError, match="frames 1"):
        SyntheticClips(frames=1)
