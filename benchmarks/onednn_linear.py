"""oneDNN's matmul (what ``kinema.models.ops.linear`` calls on a CPU in fp32) against torch's
``F.linear`` / ``@`` (MKL's GEMM in this torch build), interleaved in one process.

    python benchmarks/onednn_linear.py [ROUNDS]

Times, at kinema-tiny's shapes (CFG batch 2 at inference, batch 8 in training): each linear
of a block alone, the FFN's linear + GELU (fused in oneDNN), the input's and the weight's
gradient GEMMs of training, and whole DiT calls with ``ops.ONEDNN`` on and off: an inference
forward and a training step (forward + backward). Prints JSON: medians over ROUNDS
(default 7) alternated rounds and their ratios oneDNN / MKL.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kinema import bench
from kinema.models import ops
from kinema.models.dit import VideoDiT

LINEAR = torch.ops.mkldnn._linear_pointwise


def seconds(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def versus(
    mkl: Callable[[], object], onednn: Callable[[], object], rounds: int, calls: int
) -> dict:
    """Median seconds of each, alternated round by round, and the ratio oneDNN / MKL."""
    seconds(mkl, 2), seconds(onednn, 2)
    times: dict[str, list[float]] = {"mkl": [], "onednn": []}
    for _ in range(rounds):
        times["mkl"].append(seconds(mkl, calls))
        times["onednn"].append(seconds(onednn, calls))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"mkl_s": med["mkl"], "onednn_s": med["onednn"], "ratio": med["onednn"] / med["mkl"]}


def one_shape(rows: int, k: int, n: int, training: bool, rounds: int) -> dict:
    """A linear of x (rows, k) to n features; in training also its two gradient GEMMs."""
    x, w, b = torch.randn(rows, k), torch.randn(n, k) / k**0.5, torch.randn(n)
    g = torch.randn(rows, n)
    tag = "training" if training else "inference"
    out = {f"{tag} {rows}x{k} -> {n}": versus(
        lambda: F.linear(x, w, b), lambda: LINEAR(x, w, b, "none", [], ""), rounds, 10
    )}  # fmt: skip
    if training:
        out[f"grad_x {rows}x{n} -> {k}"] = versus(
            lambda: g @ w, lambda: LINEAR(g, w.t().contiguous(), None, "none", [], ""), rounds, 5
        )
        out[f"grad_w {n}x{rows} @ {rows}x{k} (torch keeps MKL)"] = versus(
            lambda: g.t() @ x, lambda: LINEAR(g.t(), x.t(), None, "none", [], ""), rounds, 5
        )
    return out


def gemms(rounds: int) -> dict:
    out: dict = {}
    d, ffn = 256, 1024
    for rows, training in ((2 * 576, False), (8 * 576, True)):
        for k, n in ((d, d), (d, ffn), (ffn, d)):
            out |= one_shape(rows, k, n, training, rounds)
    x, w, b = torch.randn(2 * 576, d), torch.randn(ffn, d) / d**0.5, torch.randn(ffn)
    out["FFN linear + GELU (fused)"] = versus(
        lambda: F.gelu(F.linear(x, w, b), approximate="tanh"),
        lambda: LINEAR(x, w, b, "gelu", [], "tanh"), rounds, 10,
    )  # fmt: skip
    return out


def dit(rounds: int) -> dict:
    shape = bench.SHAPES["kinema-tiny"]
    torch.manual_seed(0)
    model = VideoDiT(shape.dit)
    cpu = torch.device("cpu")
    infer = bench.inputs(shape, cpu, torch.float32)
    train = bench.inputs(shape, cpu, torch.float32, batch=8)[:3]

    def forward() -> None:
        with torch.no_grad():
            model(*infer)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(*train).square().mean().backward()

    def flagged(fn: Callable[[], None], on: bool) -> Callable[[], None]:
        def run() -> None:
            ops.ONEDNN = on
            fn()

        return run

    result = {}
    for name, fn, calls in (
        ("DiT forward (inference)", forward, 3),
        ("DiT training step", step, 1),
    ):
        result[name] = versus(flagged(fn, False), flagged(fn, True), rounds, calls)
    ops.ONEDNN = ops.onednn_linears()
    return result


if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    torch.set_num_threads(2)
    report = {"gemms": gemms(rounds), "dit": dit(rounds),
              "machine": bench.machine(torch.device("cpu"))}  # fmt: skip
    print(json.dumps(report, indent=2))
