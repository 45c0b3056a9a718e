"""The README's GIF (docs/kinema-tiny.gif): four prompts, seed 0, default settings, side by side.

.venv/bin/python scripts/readme_gif.py
"""

from __future__ import annotations

import numpy as np

import kinema
from kinema.io.video import write_video

PROMPTS = (
    "a red circle moving right on a navy background",
    "a yellow square bouncing on a black background",
    "a green triangle rotating on a charcoal background",
    "a pink star growing on a forest background",
)

if __name__ == "__main__":
    pipe = kinema.load()
    clips = [np.asarray(pipe.generate(p, seed=0).frames) for p in PROMPTS]
    write_video("docs/kinema-tiny.gif", np.concatenate(clips, axis=2), fps=16)
