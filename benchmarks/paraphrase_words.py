"""How close MiniLM puts kinema-tiny's paraphrase words to the training words they stand for.

    python benchmarks/paraphrase_words.py

Embeds every training word and every paraphrase word (kinema.data.synthetic's TRAIN_WORDS /
PARAPHRASE_WORDS) alone with the built-in text encoder (token states mean-pooled over the
mask), takes each paraphrase's nearest training word by cosine, and prints how many land on
the right colour / shape / motion, with every miss.

Then the same for whole prompts, in the context MiniLM was trained on (sentence pairs): each
of 40 paraphrased single-object prompts of ``kinema eval`` against the 585 single-object
captions "a {colour} {shape} {motion}" in training words; a hit is the nearest caption
naming the same colour (shape, motion).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kinema.data.synthetic import (
    COLOURS,
    MOTIONS,
    PARAPHRASE_WORDS,
    SHAPES,
    TRAIN_WORDS,
    parse_prompt,
)
from kinema.eval.run import seen_prompts
from kinema.models.text import load_text_encoder


def embed(encoder, words: list[str]) -> Tensor:  # noqa: ANN001
    tokens, mask = encoder.encode(words)  # (N, L, D), (N, L)
    m = mask[..., None].float()
    return torch.nn.functional.normalize((tokens.float() * m).sum(1) / m.sum(1), dim=-1)


def sentences(encoder, count: int = 40) -> dict[str, float]:  # noqa: ANN001
    """Share of paraphrased prompts whose nearest training-word caption names the same
    colour, shape and motion (and all three)."""
    triples = [(c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS]
    captions = [f"a {c} {s} {TRAIN_WORDS['motion'][m][0]}" for c, s, m in triples]
    known = torch.cat([embed(encoder, captions[i : i + 128]) for i in range(0, len(captions), 128)])
    prompts = seen_prompts(count, "paraphrase", seed=3)
    nearest = (embed(encoder, prompts) @ known.T).argmax(1)
    hits = dict.fromkeys(("colour", "shape", "motion", "all"), 0)
    for prompt, j in zip(prompts, nearest.tolist(), strict=True):
        want = parse_prompt(prompt)[0]
        names = zip(("colour", "shape", "motion"), triples[j], strict=True)
        ok = {k: want[k] == v for k, v in names}
        hits = {k: n + (all(ok.values()) if k == "all" else ok[k]) for k, n in hits.items()}
    shares = {k: n / count for k, n in hits.items()}
    print("whole prompts, nearest training caption: " +
          ", ".join(f"{k} {100 * v:.0f} %" for k, v in shares.items()))  # fmt: skip
    return shares


def main() -> dict[str, tuple[int, int]]:
    encoder = load_text_encoder("minilm", max_length=32)
    scores = {}
    for kind in ("colour", "shape", "motion"):
        train = [(k, w) for k, ws in TRAIN_WORDS[kind].items() for w in ws]
        para = [(k, w) for k, ws in PARAPHRASE_WORDS[kind].items() for w in ws]
        sim = embed(encoder, [w for _, w in para]) @ embed(encoder, [w for _, w in train]).T
        hits = 0
        for i, (meaning, word) in enumerate(para):
            j = int(sim[i].argmax())
            hits += train[j][0] == meaning
            if train[j][0] != meaning:
                print(f"  {kind}: {word!r} ({meaning}) is nearest {train[j][1]!r} "
                      f"({train[j][0]}), cosine {float(sim[i, j]):.2f}")  # fmt: skip
        scores[kind] = (hits, len(para))
        print(f"{kind}: {hits} of {len(para)} paraphrases nearest a training word of their meaning")
    sentences(encoder)
    return scores


if __name__ == "__main__":
    main()
