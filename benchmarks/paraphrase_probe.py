"""Could kinema-tiny learn its paraphrases from a wider training vocabulary? A probe says no.

    python benchmarks/paraphrase_probe.py

kinema-tiny reads prompts through frozen MiniLM token states; the DiT's text embedding and
cross-attention are all it can learn on that side. This script asks whether *any* such
learned reader, trained on captions from a much wider vocabulary than the world's (about ten
synonyms per colour, shape and motion, none of them a paraphrase word), would recognise the
paraphrase words (``PARAPHRASE_WORDS``: crimson, disc, drifting leftward, ...).

The reader is a probe on the token states of whole captions, one per attribute (colour, shape,
motion): four learned attention queries pool the tokens (what a cross-attention does), a linear
layer names the class. It is trained on 3000 captions of the training words or of the wider
vocabulary (the world's training templates) and tested on 400 paraphrased captions (the
paraphrase templates). Its accuracy bounds what a DiT trained on those captions could follow
in paraphrased prompts, far more cheaply than training one. Also prints a linear probe on the
mean-pooled caption (MiniLM's sentence embedding). Deterministic; ~3 minutes on 2 cores.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor, nn

from kinema.data.synthetic import PARAPHRASE_WORDS, TEMPLATES, TRAIN_WORDS, words_of
from kinema.models.text import load_text_encoder

Words = dict[str, dict[str, tuple[str, ...]]]
ATTRIBUTES = ("colour", "shape", "motion")

# About ten synonyms a meaning (the training words first); no word of PARAPHRASE_WORDS.
WIDE: Words = {
    "colour": {
        "red": ("red", "cherry", "ruby", "vermilion", "cherry red", "bright red", "blood red",
                "brick red", "tomato red", "cardinal red", "fire red"),
        "green": ("green", "lime", "jade", "leaf green", "grass green", "bright green",
                  "mint green", "kelly green", "apple green", "pea green"),
        "blue": ("blue", "sapphire", "royal blue", "bright blue", "cerulean", "ultramarine",
                 "blueberry", "deep blue", "denim blue", "electric blue"),
        "yellow": ("yellow", "lemon", "canary", "sunflower yellow", "mustard", "bright yellow",
                   "banana yellow", "butter yellow", "lemon yellow", "saffron"),
        "orange": ("orange", "apricot", "pumpkin", "carrot orange", "copper", "bright orange",
                   "mandarin", "peach", "burnt orange", "papaya"),
        "purple": ("purple", "plum", "lavender", "mauve", "amethyst", "grape", "orchid",
                   "eggplant", "indigo", "royal purple"),
        "white": ("white", "milky", "pearl", "chalk white", "bright white", "pure white",
                  "cream", "alabaster", "bone white", "porcelain"),
        "cyan": ("cyan", "aqua", "aquamarine", "seafoam", "light blue", "sky blue",
                 "robin egg blue", "ice blue", "glacier blue", "cyan blue"),
        "pink": ("pink", "magenta", "salmon", "bubblegum", "hot pink", "blush", "flamingo",
                 "raspberry", "cerise", "baby pink"),
    },
    "shape": {
        "circle": ("circle", "ball", "dot", "sphere", "bubble", "coin", "round shape",
                   "circular shape", "ring", "round blob"),
        "square": ("square", "block", "cube", "crate", "square shape", "quadrilateral", "brick",
                   "checker", "four-sided shape", "rectangle"),
        "triangle": ("triangle", "arrowhead", "three-sided shape", "delta", "triangular shape",
                     "cone", "spike", "trigon"),
        "star": ("star", "sparkle", "starfish", "star shape", "twinkle", "five-pointed star",
                 "asterisk", "shooting star"),
        "cross": ("cross", "cross shape", "crossed bars", "x shape", "crucifix", "criss-cross",
                  "cross mark"),
    },
    "motion": {
        **{d: (f"moving {d}", f"going {d}", f"sliding to the {d}", f"travelling {d}",
               f"heading {d}", f"floating {d}", f"flying {d}", f"moving to the {d}",
               f"rolling {d}", f"shifting {d}", f"heading {compass}")
           for d, compass in (("left", "west"), ("right", "east"))},
        "up": ("moving up", "going up", "rising", "floating up", "flying up", "heading up",
               "soaring", "rising up", "lifting up", "heading north", "going higher"),
        "down": ("moving down", "going down", "falling", "sinking", "floating down",
                 "heading down", "plunging", "plummeting", "sliding down", "tumbling down",
                 "heading south"),
        **{f"{v}-{h}": (f"moving {v} and to the {h}", f"going diagonally {v} and {h}",
                        f"heading {v} and {h}", f"flying {v} and to the {h}",
                        f"floating {v} and {h}", f"heading {compass}",
                        f"moving to the {'top' if v == 'up' else 'bottom'} {h}")
           for v, h, compass in (("up", "left", "northwest"), ("up", "right", "northeast"),
                                 ("down", "left", "southwest"), ("down", "right", "southeast"))},
        "growing": ("growing", "getting bigger", "growing larger", "enlarging", "inflating",
                    "getting larger", "scaling up", "increasing in size", "ballooning",
                    "blowing up"),
        "shrinking": ("shrinking", "getting smaller", "diminishing", "deflating",
                      "getting tinier", "scaling down", "decreasing in size", "getting little",
                      "becoming smaller", "shrivelling"),
        "still": ("standing still", "not moving", "staying still", "static", "unmoving",
                  "staying put", "frozen in place", "immobile", "sitting still", "holding still"),
        "bouncing": ("bouncing", "bouncing up and down", "jumping", "leaping",
                     "springing up and down", "jumping up and down", "bouncing like a ball",
                     "leaping up and down"),
        "rotating": ("rotating", "spinning", "spinning around", "turning", "turning around",
                     "spinning in place", "pivoting", "wheeling around", "turning in place",
                     "rotating in place"),
    },
}  # fmt: skip


def tokens_of(words: Words) -> set[str]:
    return {w for kind in words.values() for ps in kind.values() for p in ps for w in words_of(p)}


def captions(words: Words, phrasing: str, count: int, seed: int) -> list[tuple[str, ...]]:
    """(caption, colour, shape, motion): one object, a template of ``phrasing``."""
    rng, out = random.Random(seed), []
    for _ in range(count):
        meaning = [rng.choice(sorted(words[a])) for a in ATTRIBUTES]
        pairs = zip(ATTRIBUTES, meaning, strict=True)
        colour, shape, motion = (rng.choice(words[a][m]) for a, m in pairs)
        obj = f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} {motion}"
        text = rng.choice(TEMPLATES[phrasing]).format(objs=obj, bg="a navy")
        out.append((text, *meaning))
    return out


def encode(encoder, caps: list[tuple[str, ...]]) -> tuple[Tensor, Tensor]:  # noqa: ANN001
    parts = [encoder.encode([c[0] for c in caps[i : i + 256]]) for i in range(0, len(caps), 256)]
    return torch.cat([t.float() for t, _ in parts]), torch.cat([m for _, m in parts])


class AttentionProbe(nn.Module):
    """Four learned queries pool the tokens (B, L, D) under the mask; a linear layer classifies."""

    def __init__(self, dim: int, classes: int, queries: int = 4) -> None:
        super().__init__()
        self.scores, self.head = nn.Linear(dim, queries), nn.Linear(dim * queries, classes)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        w = self.scores(tokens).masked_fill(~mask[..., None], -1e4).softmax(1)  # (B, L, Q)
        return self.head(torch.einsum("blq,bld->bqd", w, tokens).flatten(1))


class MeanProbe(nn.Module):
    """A linear layer on the mean-pooled, normalised caption (MiniLM's sentence embedding)."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        m = mask[..., None].float()
        return self.head(nn.functional.normalize((tokens * m).sum(1) / m.sum(1), dim=-1) * 10)


def accuracy(
    kind: type[nn.Module], train: tuple, test: tuple, labels: tuple
) -> tuple[float, float]:
    """The probe's accuracy on its own training captions and on the paraphrased ones."""
    (x, mask), (x_test, mask_test), (y, y_test) = train, test, labels
    torch.manual_seed(0)
    probe = kind(x.shape[-1], int(y.max()) + 1)
    opt = torch.optim.Adam(probe.parameters(), lr=3e-3)
    for _ in range(400):
        loss = nn.functional.cross_entropy(probe(x, mask), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        fit = float((probe(x, mask).argmax(1) == y).float().mean())
        return fit, float((probe(x_test, mask_test).argmax(1) == y_test).float().mean())


def main() -> dict[str, dict[str, float]]:
    leaked = tokens_of(WIDE) & (tokens_of(PARAPHRASE_WORDS) - tokens_of(TRAIN_WORDS))
    assert not leaked, f"paraphrase words in the wide vocabulary: {sorted(leaked)}"
    encoder = load_text_encoder("minilm", max_length=32)
    test = captions(PARAPHRASE_WORDS, "paraphrase", 400, seed=1)
    test_x = encode(encoder, test)
    results = {}
    for name, words in (("training words", TRAIN_WORDS), ("wide vocabulary", WIDE)):
        train = captions(words, "train", 3000, seed=0)
        train_x = encode(encoder, train)
        for kind in (AttentionProbe, MeanProbe):
            row, fits = {}, []
            for i, attr in enumerate(ATTRIBUTES, start=1):
                index = {v: k for k, v in enumerate(sorted(words[attr]))}
                y = torch.tensor([index[c[i]] for c in train])
                y_test = torch.tensor([index[c[i]] for c in test])
                fit, row[attr] = accuracy(kind, train_x, test_x, (y, y_test))
                fits.append(fit)
            results[f"{name}, {kind.__name__}"] = row
            scores = "  ".join(f"{a} {100 * v:3.0f} %" for a, v in row.items())
            own = f"{100 * min(fits):.0f}-{100 * max(fits):.0f} %"
            print(f"{name:16s} {kind.__name__:15s} {scores}  (own captions: {own})", flush=True)
    return results


if __name__ == "__main__":
    main()
