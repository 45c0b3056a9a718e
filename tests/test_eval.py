"""``kinema eval``'s prompt sets: held out, balanced, and readable by the judge's parser."""

from __future__ import annotations

from collections import Counter

import pytest

from kinema.data.synthetic import HELDOUT, SHAPES, parse_prompt
from kinema.eval.run import heldout_prompts


def test_heldout_prompts_are_held_out_and_balanced_over_shapes_and_motions():
    prompts = heldout_prompts(10)
    parsed = [parse_prompt(p)[0] for p in prompts]
    triples = [(o["colour"], o["shape"], o["motion"]) for o in parsed]
    assert set(triples) <= HELDOUT and len(set(triples)) == 10
    assert Counter(t[1] for t in triples) == dict.fromkeys(SHAPES, 2)
    assert len({t[2] for t in triples}) == 10  # ten different motions
    assert heldout_prompts(10) == prompts and heldout_prompts(5) == prompts[:5]


def test_heldout_prompts_cover_every_triple_from_len_heldout_on():
    """``kinema eval --prompts 59`` judges every held-out triple once, in a fixed order."""
    prompts = heldout_prompts(len(HELDOUT))
    triples = [tuple(parse_prompt(p)[0][k] for k in ("colour", "shape", "motion")) for p in prompts]
    assert len(triples) == len(HELDOUT) and set(triples) == HELDOUT
    assert heldout_prompts(len(HELDOUT) + 5) == prompts  # no triple twice
    assert len(set(heldout_prompts(len(HELDOUT) - 1))) == len(HELDOUT) - 1


def test_eval_rejects_a_prompt_count_below_one(capsys):
    from kinema.cli import main
    from kinema.eval.run import prompts_per_set

    assert (prompts_per_set(None), prompts_per_set(None, quick=True), prompts_per_set(59)) == (
        10, 5, 59)  # fmt: skip
    with pytest.raises(ValueError, match="prompts 0 per set"):
        prompts_per_set(0)  # as evaluate(prompts=0) would: not the default 10

    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--prompts", "0"])
    assert exit_.value.code == 2
    assert "prompts 0 per set; valid: 1 or more" in capsys.readouterr().err


def test_eval_refuses_a_results_path_it_could_not_write_before_it_runs(capsys, tmp_path):
    """A folder, or a path under a file, as --out failed only after the whole eval ran."""
    from kinema.cli import main

    (tmp_path / "file").write_text("x")
    for out, message in ((tmp_path, "is a folder; give a file path"),
                         (tmp_path / "file" / "e.json", "is not a writable folder")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            main(["eval", "--out", str(out)])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
