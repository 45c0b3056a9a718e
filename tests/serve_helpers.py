"""Helpers for the server tests: a tiny random model folder and a real server process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY_SETTINGS = dict(width=32, height=32, frames=5, fps=8, steps=2, guidance=1.0)


def build_tiny_model(folder: Path) -> Path:
    """A kinema model folder with random weights: 32x32, 5 frames, 2 steps (well under 1 s)."""
    from kinema.configs import DiTConfig, SamplingDefaults, VAEConfig
    from kinema.io.checkpoint import save_model_folder
    from kinema.models.dit import VideoDiT
    from kinema.models.vae import CausalVAE

    torch.manual_seed(0)
    dit = VideoDiT(DiTConfig(num_heads=2, head_dim=16, ffn_dim=64, num_layers=1, text_dim=384,
                             freq_dim=32))  # fmt: skip
    vae = CausalVAE(VAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1, z_dim=16))
    return save_model_folder(
        folder, dit=dit, vae=vae, text_encoder={"kind": "minilm", "max_length": 16},
        sampling=SamplingDefaults(**TINY_SETTINGS), name="tiny",
    )  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    """``-m kinema serve`` once the main CLI has the command, else ``-m kinema.serve.cli``."""
    import argparse

    from kinema.cli import build_parser

    subs = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    wired = any("serve" in a.choices for a in subs)
    return ["-m", "kinema", "serve"] if wired else ["-m", "kinema.serve.cli"]


class Server:
    """``python -m kinema serve`` on a free loopback port, as a real child process."""

    def __init__(self, model: Path, data_dir: Path, *extra: str, port: int | None = None):
        self.port, self.data_dir = port or free_port(), data_dir
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"server-{self.port}-{time.monotonic_ns()}.log"
        cmd = [sys.executable, *serve_command(), "--model", str(model),
               "--data-dir", str(data_dir), "--port", str(self.port), "--device", "cpu",
               "--log-level", "warning", *extra]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT)  # fmt: skip
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                httpx.get(f"{self.url}/openapi.json", timeout=1.0)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server did not start: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """kill -9: no cleanup of any kind."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def png_bytes(width: int = 40, height: int = 24) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    x = np.linspace(0, 255, width * height * 3).reshape(height, width, 3).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return buf.getvalue()


def mp4_bytes(path: Path, frames: int = 9, size: int = 32, fps: int = 8) -> bytes:
    """A small real H.264 clip written with kinema's own writer."""
    import numpy as np

    from kinema.io.video import write_video

    rng = np.random.default_rng(0)
    clip = rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8)
    write_video(path, clip, fps)
    return path.read_bytes()
