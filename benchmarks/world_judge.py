"""How the judge reads the synthetic world's own clips of one motion: a check that a motion a
model never draws is drawn right in its training data.

    python benchmarks/world_judge.py MOTION [CLIPS]

Renders CLIPS (default 300) training clips of the stage-10 world (``object_scale`` 1.5, the
motion drawn three times as often) and prints, for the single-object clips of MOTION without a
change, how often the judge (kinema.eval.judge) reads each set of motions.
"""

from __future__ import annotations

import collections
import sys

from kinema.data.synthetic import SyntheticClips
from kinema.eval.judge import judge_clip


def main(motion: str, clips: int) -> None:
    world = SyntheticClips(8, object_scale=1.5, motion_weights={motion: 3.0}, length=clips)
    read: collections.Counter[str] = collections.Counter()
    for i in range(len(world)):
        objects = world.spec(i)[0].objects
        if len(objects) != 1 or objects[0].motion != motion or objects[0].then_motion:
            continue
        read[", ".join(o.motion for o in judge_clip(world[i][0]).objects)] += 1
    print(f"{sum(read.values())} clips of {motion}; judged: {dict(read.most_common())}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 300)
