"""kinema.bench: FLOP count against the known Wan 2.1 1.3B figure, the measuring helpers on known
answers, a tiny side-by-side forward run (equality with diffusers checked in it) and the tables."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from kinema import bench
from kinema.configs import WAN21_T2V_1_3B, DiTConfig, VAEConfig

TINY = bench.BenchShape(
    "tiny", DiTConfig(num_heads=2, head_dim=8, text_dim=12, freq_dim=16, ffn_dim=24, num_layers=2),
    VAEConfig(base_dim=8, num_res_blocks=1), 32, 32, 5, 6, steps=2,
)  # fmt: skip


def test_flop_count_of_wan_1_3b_matches_the_known_figure():
    flops = bench.dit_flops(WAN21_T2V_1_3B, tokens=21 * 30 * 52, context_len=512, batch=1)
    assert 280e12 < flops < 287e12  # ~283 TFLOP per 480x832x81 forward
    assert bench.tokens_of(bench.SHAPES["wan2.1-1.3b"]) == 32760
    one = bench.dit_flops(WAN21_T2V_1_3B, 100, 8, 1)
    assert bench.dit_flops(WAN21_T2V_1_3B, 100, 8, 2) == 2 * one


def test_alternate_interleaves_and_psnr_knows_its_answers():
    order = []
    times = bench.alternate(
        {"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3, torch.device("cpu")
    )
    assert order == ["a", "b"] + ["a", "b"] * 3  # one warm-up each, then strictly alternating
    assert [len(v) for v in times.values()] == [3, 3]
    a = np.zeros((4, 4))
    assert bench.psnr(a, a, 255.0) == float("inf")
    assert bench.psnr(a + 1, a, 255.0) == pytest.approx(20 * np.log10(255), abs=1e-9)


def test_rss_peak_sees_a_big_allocation():
    _, added = bench.peak_memory(lambda: torch.ones(64 * 2**20 // 4).sum(), torch.device("cpu"))
    assert 48 * 2**20 < added < 256 * 2**20


def test_tensor_peak_counts_live_storage_once_and_not_what_came_before():
    x = torch.ones(1000)  # made before: not counted, nor are its views
    with bench.TensorPeak() as tp:
        a = torch.empty(1000)  # 4000 B
        b = x + 1  # 4000 B
        view = b[:10].view(2, 5)  # same storage as b
        del a
        c = torch.empty(2000)  # 8000 B; a is gone: peak 4000 + 8000
        x.add_(1)  # in place on storage from before: nothing new
    assert tp.peak == 12000
    assert tp.live == 12000 and view.shape == (2, 5) and c.numel() == 2000
    del b, view, c
    assert tp.live == 0


def test_tiny_forward_run_checks_equality_and_writes_tables(tmp_path):
    st = bench.Settings(repeats=2)
    row = bench.bench_forward(TINY, st)
    assert row["max_abs_diff"] <= 1e-4 and row["ratio"]["kinema"] > 0
    assert 0 < row["mfu"]["kinema"] < 1 and row["flops"] > 0
    results = {"machine": bench.machine(st.device), "dtype": "float32", "forward": [row]}
    js, md = bench.write(results, tmp_path, "t")
    assert json.loads(js.read_text())["forward"][0]["shape"] == "tiny"
    text = md.read_text()
    assert "| tiny |" in text and results["machine"]["cpu"] in text


def test_bad_configs_and_parts_are_refused():
    st = bench.Settings()
    with pytest.raises(ValueError, match="unknown benchmark config"):
        bench.run(["nope"], st, ("forward",))
    with pytest.raises(ValueError, match="unknown part"):
        bench.run(["kinema-tiny"], st, ("speed",))
    with pytest.raises(ValueError, match="nothing to measure: give --configs"):
        bench.run([], st, ("forward",))  # measured nothing, wrote empty results, exit 0
    with pytest.raises(ValueError, match="the step_cache part calibrates the cache, which needs"):
        bench.run(["kinema-tiny"], bench.Settings(steps=2), ("forward", "step_cache"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            bench.run(["wan2.1-1.3b"], st, ("forward",))
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    with pytest.raises(ValueError, match="repeats"):
        bench.settings_from_args(parser.parse_args(["--repeats", "0"]))
    with pytest.raises(ValueError, match="seed"):
        bench.settings_from_args(parser.parse_args(["--seed", "-1"]))
    for name in ("a/b", "../../escape", ".."):  # failed after measuring, or wrote outside --out
        with pytest.raises(ValueError, match="must be a file stem, not a path"):
            bench.settings_from_args(parser.parse_args(["--name", name]))
    with pytest.raises(ValueError, match="--threads 0 must be >= 1"):  # was torch's RuntimeError
        bench.settings_from_args(parser.parse_args(["--threads", "0"]))
    assert bench.settings_from_args(parser.parse_args(["--seed", "3"])).seed == 3
    with pytest.raises(ValueError, match="steps"):
        bench.settings_from_args(parser.parse_args(["--steps", "0"]))
    assert bench.settings_from_args(parser.parse_args(["--steps", "4"])).steps == 4
    for bad in ("0", "two"):
        with pytest.raises(ValueError, match="decode-pieces"):
            bench.settings_from_args(parser.parse_args(["--decode-pieces", bad]))
    args = parser.parse_args(["--decode-pieces", "2,4"])
    assert bench.settings_from_args(args).decode_pieces == (2, 4)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):  # was torch's RuntimeError
        bench.settings_from_args(parser.parse_args(["--device", "tpu"]))


def test_steps_override_reaches_end_to_end_and_vae_decode_runs_once(monkeypatch):
    """--steps reaches the sampler; on a CPU the decode peaks come from processes of their own."""
    monkeypatch.setitem(bench.SHAPES, "tiny", TINY)
    st = bench.Settings(repeats=1, steps=1, decode_pieces=(2,))
    out = bench.run(["tiny"], st, ("end_to_end", "vae_decode"))
    e2e, vae = out["end_to_end"][0], out["vae_decode"][0]
    assert e2e["steps"] == 1 and TINY.steps == 2  # the shape itself is left as it was
    assert e2e["video_max_uint8_diff"] <= 1  # same weights, same seed: same video
    assert [v["n"] for v in vae["times"].values()] == [1, 1, 1, 1]
    piece = vae["pieces"]["kinema_piece2"]  # two frames a pass: the same decode, other kernels
    assert piece["psnr_vs_untiled_db"] > 60 and piece["ratio_memory"] > 0
    table = bench.markdown({"machine": out["machine"], "dtype": "float32", "vae_decode": [vae]})
    assert "2 frames a pass" in table
    isa = torch.backends.cpu.get_cpu_capability()  # the machine line names the CPU's vector ISA
    assert table.startswith("Machine: ") and f"cores, {isa}, " in table.splitlines()[0]
    assert vae["max_abs_diff"] < 1e-4
    own, live = vae["peak_memory_bytes"], vae["peak_tensor_bytes"]
    assert own.keys() == {"kinema", "diffusers", "kinema_piece2"} and min(own.values()) > 0
    assert live.keys() == {"kinema", "kinema_plain", "diffusers", "kinema_piece2"}
    assert vae["ratio_memory"] == own["kinema"] / own["diffusers"]
    # live tensors are deterministic: one frame a pass holds less than two, and both less
    # than diffusers' untiled decode
    ratios = vae["ratio_memory_tensors"]
    assert ratios["kinema"] < ratios["kinema_piece2"] < 1
    assert ratios["kinema"] == live["kinema"] / live["diffusers"]
