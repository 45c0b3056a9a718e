"""scripts/gpu_train_tiny.py: the reduced MiniLM it carries to a GPU machine encodes the
training captions as the full encoder does, and knows no other words."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kinema.models.text import MiniLMTextEncoder
from kinema.train import load_train_config
from tests.repo_scripts import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("scripts/gpu_train_tiny.py")


def test_reduced_minilm_encodes_the_worlds_captions_like_the_full_one(
    script, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(script, "PACKED", tmp_path / "packed")
    config_file = tmp_path / "config.json"
    config_file.write_text('{"init_from": "unused", "data": {"seed": 7, "num_clips": 6}}')
    config = load_train_config(config_file)
    script.pack(str(config_file))
    known = script.unpack_minilm(tmp_path / "minilm")
    captions = script.config_captions(config)[:6]
    full, reduced = MiniLMTextEncoder(), MiniLMTextEncoder(tmp_path / "minilm")
    want, mask = full.encode(captions)
    got, got_mask = reduced.encode(captions)
    assert torch.equal(mask, got_mask)
    assert (got - want).abs().max() < 1e-2  # float16 weights
    cosine = torch.nn.functional.cosine_similarity(got[mask], want[mask], dim=-1)
    assert cosine.min() > 0.9999
    outside = ["a crimson disc drifting leftward"]  # paraphrase words: not in the kept rows
    assert not script.token_ids(tmp_path / "minilm" / "tokenizer.json", outside) <= known
    far = torch.nn.functional.cosine_similarity(
        reduced.encode(outside)[0][0, 1:3], full.encode(outside)[0][0, 1:3], dim=-1
    )
    assert far.min() < 0.99  # their rows are zero: the reduced encoder cannot stand in there


def test_config_captions_follow_the_worlds_options(script, tmp_path: Path) -> None:
    """The captions packed for a GPU stage are those its training draws: motion weights and
    balance change the clips, so they must change the captions too."""
    from kinema.data.synthetic import SyntheticClips

    config_file = tmp_path / "config.json"
    options = {"balance": "colour-motion", "motion_weights": {"up-left": 4.0}}
    data = {"seed": 3, "num_clips": 8, **options}
    config_file.write_text(json.dumps({"init_from": "unused", "data": data}))
    captions = script.config_captions(load_train_config(config_file))
    drawn = [SyntheticClips(3, **options)[i][1] for i in range(8)]
    plain = [SyntheticClips(3)[i][1] for i in range(8)]
    assert set(drawn) <= set(captions) and not set(plain) <= set(captions)
