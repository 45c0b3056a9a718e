"""``kinema eval``'s prompt sets: held out, balanced, and readable by the judge's parser."""

from __future__ import annotations

from collections import Counter

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
