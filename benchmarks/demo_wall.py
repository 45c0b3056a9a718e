"""Wall time and peak RSS of the demo command (`make demo`), from process start, side by side
for two source trees: the same command alternated, one fresh process a run.

    python benchmarks/demo_wall.py OLD_SRC [NEW_SRC] [--runs N] [--args ARGS] [--new-args ARGS]

OLD_SRC / NEW_SRC: folders holding the ``kinema`` package (e.g. a ``git worktree`` of an
earlier commit's ``src``); NEW_SRC defaults to this checkout's. ``--new-args`` adds options to
the new side's command (e.g. ``src --new-args "--cache 0.5"``: one tree, with and without),
``--args`` to both sides' (e.g. ``--args "--seconds 60 --steps 4"``: a long video's peak RSS).
Prints JSON: each tree's median wall seconds and peak RSS (MiB) and the ratio new / old of
the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from kinema.bench import machine

PROMPT = "a red circle moving right on a navy background"
HERE = Path(__file__).resolve().parents[1] / "src"


def one_run(src: Path, out: Path, extra: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one `kinema generate` of the demo prompt."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    code = "import sys; from kinema.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", code, "generate", PROMPT, "-o", str(out), *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{src}: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path, nargs="?", default=HERE)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--args", default="", help="extra `kinema generate` options, both sides")
    p.add_argument("--new-args", default="", help="extra `kinema generate` options, new side")
    a = p.parse_args()
    both = shlex.split(a.args)
    extra = {"old": both, "new": [*both, *shlex.split(a.new_args)]}
    trees = {"old": a.old.resolve(), "new": a.new.resolve()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
    out = Path("outputs/demo_wall.mp4")
    out.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(a.runs):
        for name, src in trees.items():
            times[name].append(one_run(src, out, extra[name]))
    result = {
        name: {"src": str(trees[name]), "args": extra[name],
               "wall_s": round(statistics.median(w for w, _ in runs), 2),
               "peak_rss_mib": round(max(m for _, m in runs)),
               "runs": [round(w, 2) for w, _ in runs]}
        for name, runs in times.items()
    }  # fmt: skip
    result["ratio_new_over_old"] = round(result["new"]["wall_s"] / result["old"]["wall_s"], 3)
    result["machine"] = machine(torch.device("cpu"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
