"""scripts/gpu_train_tiny.py: the reduced MiniLM it carries to a GPU machine encodes the
training captions as the full encoder does, and knows no other words."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kinema.models.text import MiniLMTextEncoder
from kinema.train import load_train_config

SCRIPT = Path(__file__).parents[1] / "scripts" / "gpu_train_tiny.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("gpu_train_tiny", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
