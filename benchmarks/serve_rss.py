"""Peak RSS of a `kinema serve` process that makes one long and one short clip, side by side
for two source trees: a fresh server a clip, the trees alternated.

    python benchmarks/serve_rss.py OLD_SRC [NEW_SRC] [--long 60] [--short 4] [--steps 4]

OLD_SRC / NEW_SRC: folders holding the ``kinema`` package (e.g. a ``git worktree`` of an
earlier commit's ``src``); NEW_SRC defaults to this checkout's. Each server runs the built-in
model on the CPU and gets one request through the HTTP API; its peak RSS (``VmHWM``) is read
once the video is completed. Prints JSON: each tree's peak RSS (MiB) for the long and the
short clip and their ratio (the issue's "same peak memory as a 4 s one, within 25 %").
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from kinema.bench import machine

PROMPT = "a red circle moving right on a navy background"
HERE = Path(__file__).resolve().parents[1] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def one_clip(src: Path, seconds: float, steps: int) -> float:
    """Start a server from ``src``, make one clip of ``seconds`` and return its peak RSS."""
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        env = {**os.environ, "PYTHONPATH": str(src)}
        cmd = [sys.executable, "-m", "kinema", "serve", "--port", str(port), "--data-dir", data,
               "--device", "cpu", "--log-level", "warning"]  # fmt: skip
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            url = f"http://127.0.0.1:{port}/v1/videos"
            for _ in range(600):
                try:
                    httpx.get(url, timeout=1.0)
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            body = {"prompt": PROMPT, "seconds": str(seconds), "steps": steps, "seed": 0}
            video = httpx.post(url, json=body, timeout=30.0).raise_for_status().json()
            while video["status"] in ("queued", "in_progress"):
                time.sleep(0.5)
                video = httpx.get(f"{url}/{video['id']}", timeout=30.0).json()
            if video["status"] != "completed":
                raise RuntimeError(f"{src}: {video}")
            return peak_rss_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path, nargs="?", default=HERE)
    p.add_argument("--long", type=float, default=60.0)
    p.add_argument("--short", type=float, default=4.0)
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args()
    trees = {"old": a.old.resolve(), "new": a.new.resolve()}
    rss: dict[str, dict[str, float]] = {name: {} for name in trees}
    for seconds in (a.short, a.long):
        for name, src in trees.items():
            rss[name][f"{seconds:g}s"] = round(one_clip(src, seconds, a.steps), 1)
    for name in trees:
        rss[name]["long_over_short"] = round(
            rss[name][f"{a.long:g}s"] / rss[name][f"{a.short:g}s"], 3
        )
    paths = {k: str(v) for k, v in trees.items()}
    result = {
        "machine": machine(torch.device("cpu")),
        "steps": a.steps,
        "trees": paths,
        "peak_rss_mib": rss,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
