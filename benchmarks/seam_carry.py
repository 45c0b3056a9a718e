"""Extension seams with and without the seam carry-over, same model and seeds.

    python benchmarks/seam_carry.py [MODEL]

Prints JSON: kinema.eval.beyond.seam_continuity (3 extensions of 1 s per prompt) with the
pipeline as it is, then with kinema.pipeline.carry_seam replaced by the identity.
"""

from __future__ import annotations

import json
import sys

import kinema
from kinema import pipeline as kp
from kinema.eval.beyond import seam_continuity


def main(model: str | None = None) -> dict[str, dict[str, float]]:
    pipe = kinema.load(model)
    with_carry = seam_continuity(pipe, 3)
    original = kp.carry_seam
    kp.carry_seam = lambda new, last, decoded_last, fade=kp.SEAM_FADE: new
    try:
        without = seam_continuity(pipe, 3)
    finally:
        kp.carry_seam = original
    return {"with_carry": with_carry, "without_carry": without}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else None), indent=2))
