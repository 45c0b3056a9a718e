"""How close MiniLM puts kinema-tiny's paraphrase words to the training words they stand for.

    python benchmarks/paraphrase_words.py

Embeds every training word and every paraphrase word (kinema.data.synthetic's TRAIN_WORDS /
PARAPHRASE_WORDS) alone with the built-in text encoder (token states mean-pooled over the
mask), takes each paraphrase's nearest training word by cosine, and prints how many land on
the right colour / shape / motion, with every miss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kinema.data.synthetic import PARAPHRASE_WORDS, TRAIN_WORDS
from kinema.models.text import load_text_encoder


def embed(encoder, words: list[str]) -> Tensor:  # noqa: ANN001
    tokens, mask = encoder.encode(words)  # (N, L, D), (N, L)
    m = mask[..., None].float()
    return torch.nn.functional.normalize((tokens.float() * m).sum(1) / m.sum(1), dim=-1)


def main() -> dict[str, tuple[int, int]]:
    encoder = load_text_encoder("minilm", max_length=16)
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
    return scores


if __name__ == "__main__":
    main()
