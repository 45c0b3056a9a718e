"""GPU checks that the test suite (CPU only) cannot make: offload policies with CUDA streams,
bf16 autocast with gradient checkpointing, and the built-in model on a GPU in its default dtype.

    python benchmarks/gpu_checks.py record            # here, on the CPU: .gpucheck/builtin.pt
    python benchmarks/gpu_checks.py run --out DIR     # there, on the GPU (benchmarks/gpu.sh)
    python benchmarks/gpu_checks.py run --device cpu --smoke --out /tmp/x   # that it runs, here

``record`` keeps what the GPU machine cannot make itself (it has no MiniLM package): the built-in
text encoder's tokens for two prompts and the CPU fp32 clips from fixed seeds. ``run`` writes
``gpu-checks.json`` and ``gpu-checks.md``:

* offload: the Wan 2.1 1.3B DiT shape (random weights, bf16) at 480x832x17, 4 steps, under the
  policies none / model / block: peak ``max_memory_allocated``, wall time, and the videos
  compared (offload moves weights, it must not change a pixel);
* training: a small-Wan-shaped DiT's flow-matching loss under bf16 autocast, with and without
  gradient checkpointing: gradients compared, peak memory, and 30 AdamW steps that must lower
  the loss;
* built-in: kinema-tiny on the GPU in bf16 (what ``kinema generate --device cuda`` uses) and
  fp32, against the CPU fp32 clips: PSNR, and what the eval's judge sees in each;
* encoders: a random umT5 encoder in pinned host memory visits the GPU to encode (memory
  allocated while it encodes and after, and its tokens against the encoder resident there);
* memory: automatic decode tiling with a GPU's free memory (``kinema.memory.free_bytes``
  counts the allocator's unused memory) and with a budget that forces tiles: the chosen tile,
  the measured peak against the budget, and tiled-vs-untiled PSNR.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kinema import bench
from kinema.configs import WAN21_T2V_1_3B, WAN21_VAE

RECORD = Path(".gpucheck/builtin.pt")
PROMPTS = ("a red circle moving right on a navy background", "a yellow square moving up", "")
SEEDS = (0, 1)


def half(device: torch.device) -> torch.dtype:
    """bf16, the dtype these checks are about; fp32 on a CPU that only emulates bf16, where a
    smoke run's bf16 VAE decode would take minutes (:func:`kinema.models.ops.cpu_native`)."""
    from kinema.models.ops import cpu_native

    emulated = device.type == "cpu" and not cpu_native(torch.bfloat16)
    return torch.float32 if emulated else torch.bfloat16


def reset_peak(device: torch.device) -> int:
    """Start a peak-memory window on ``device``; returns the memory allocated now (0 on a CPU,
    where these checks only make sure the code runs)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak(device: torch.device) -> int:
    """The most memory allocated on ``device`` since :func:`reset_peak` (0 on a CPU)."""
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


class RecordedText:
    """A text encoder that hands out recorded (tokens, mask) rows per prompt."""

    def __init__(self, rows: dict[str, tuple[Tensor, Tensor]], device: torch.device,
                 dtype: torch.dtype) -> None:  # fmt: skip
        self.rows = {p: (t.to(device, dtype), m.to(device)) for p, (t, m) in rows.items()}
        first = next(iter(self.rows.values()))[0]
        self.dim, self.max_length = first.shape[-1], first.shape[-2]

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        tokens, masks = zip(*(self.rows[p] for p in prompts), strict=True)
        return torch.stack(tokens), torch.stack(masks)  # (B, L, D), (B, L)


def record() -> None:
    """The built-in model on this CPU (fp32): text tokens and clips for :func:`builtin_check`."""
    import kinema
    from kinema.pipeline import Request

    pipe = kinema.load(device="cpu", dtype="fp32")
    tokens, masks = pipe.text_encoder.encode(list(PROMPTS))
    rows = {p: (tokens[i], masks[i]) for i, p in enumerate(PROMPTS)}
    clips = {f"{p}|{s}": pipe.run(Request(prompt=p, seed=s)).frames for p in PROMPTS[:2]
             for s in SEEDS}  # fmt: skip
    RECORD.parent.mkdir(exist_ok=True)
    torch.save({"rows": rows, "clips": {k: torch.from_numpy(v) for k, v in clips.items()}}, RECORD)
    print(f"wrote {RECORD} ({RECORD.stat().st_size / 2**20:.1f} MiB)")


def judged(frames: np.ndarray) -> list[str]:
    from kinema.eval.judge import judge_clip

    return [f"{o.colour} {o.shape} {o.motion}" for o in judge_clip(frames).objects]


def builtin_check(device: torch.device, smoke: bool = False) -> dict[str, Any]:
    """kinema-tiny on ``device`` in bf16 and fp32 against the recorded CPU fp32 clips."""
    from kinema.configs import SamplingDefaults, from_dict
    from kinema.io.checkpoint import load_dit, load_vae
    from kinema.loading import ASSETS, BUILTIN, _vae_dtype
    from kinema.pipeline import Pipeline, Request

    rec = torch.load(RECORD, weights_only=False)
    folder = ASSETS / BUILTIN
    meta = json.loads((folder / "kinema.json").read_text())
    out: dict[str, Any] = {}
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    clips = list(rec["clips"].items())
    if smoke:  # bf16 is very slow on a CPU
        dtypes, clips = {"fp32": torch.float32}, clips[:1]
    for name, dt in dtypes.items():
        pipe = Pipeline(load_dit(folder / "transformer", device, dt),
                        load_vae(folder / "vae", device, _vae_dtype(dt, device)),
                        RecordedText(rec["rows"], device, dt), name=BUILTIN,
                        defaults=from_dict(SamplingDefaults, meta["sampling"]))  # fmt: skip
        rows = []
        for key, cpu in clips:
            prompt, seed = key.rsplit("|", 1)
            start = time.perf_counter()
            frames = pipe.run(Request(prompt=prompt, seed=int(seed))).frames
            seconds = time.perf_counter() - start
            cpu = cpu.numpy()
            rows.append({"prompt": prompt, "seed": int(seed), "seconds": seconds,
                         "psnr_vs_cpu_fp32_db": bench.psnr(frames, cpu, 255.0),
                         "judge_gpu": judged(frames), "judge_cpu": judged(cpu)})  # fmt: skip
        out[name] = rows
    return out


def offload_check(device: torch.device, smoke: bool = False) -> dict[str, Any]:
    """One clip of the Wan 2.1 1.3B DiT shape (random bf16 weights) at 832x480x17, 4 steps,
    under each policy (``smoke``: small-Wan shapes at 64x64x5, 2 steps)."""
    from kinema.configs import SamplingDefaults
    from kinema.models.dit import VideoDiT
    from kinema.models.vae import CausalVAE
    from kinema.offload import Placement
    from kinema.pipeline import Pipeline, Request

    small = bench.SHAPES["small-wan"]
    dit_cfg, vae_cfg = (small.dit, small.vae) if smoke else (WAN21_T2V_1_3B, WAN21_VAE)
    width, height, frames, steps = (64, 64, 5, 2) if smoke else (832, 480, 17, 4)
    torch.manual_seed(0)
    dit = VideoDiT(dit_cfg).eval().to(half(device)).fuse_projections()
    vae = CausalVAE(vae_cfg).eval()
    gen = torch.Generator().manual_seed(1)
    ones = torch.ones(512, dtype=torch.bool)
    rows = {p: (torch.randn(512, dit_cfg.text_dim, generator=gen), ones) for p in ("bench", "")}
    defaults = SamplingDefaults(width=width, height=height, frames=frames, steps=steps,
                                guidance=5.0, shift=3.0, sampler="unipc")  # fmt: skip
    results, videos = {}, {}
    for policy in ("none", "model", "block"):
        home = device if policy == "none" else torch.device("cpu")
        dit.to(home), vae.to(home)
        text = RecordedText(rows, device, half(device))
        pipe = Pipeline(dit, vae, text, name="wan-1.3b-shape", defaults=defaults,
                        placement=Placement(policy, device))  # fmt: skip
        reset_peak(device)
        start = time.perf_counter()
        with torch.inference_mode():
            videos[policy] = pipe.run(Request(prompt="bench", seed=0)).frames
        results[policy] = {"peak_bytes": peak(device), "seconds": time.perf_counter() - start}
        dit.to("cpu"), vae.to("cpu")
    for policy in ("model", "block"):
        diff = np.abs(videos[policy].astype(int) - videos["none"].astype(int)).max()
        results[policy]["max_uint8_diff_vs_none"] = int(diff)
    return {"shape": f"{width}x{height}x{frames}, {steps} steps", **results}


def encoders_check(device: torch.device, smoke: bool = False) -> dict[str, Any]:
    """A text encoder visits the GPU only to encode (:class:`kinema.offload.Placement`, policy
    "none"): a random umT5 encoder (transformers; 4 of umT5-XXL's 24 layers at its width,
    bf16; ``smoke``: tiny) loaded in host memory and pinned, as ``kinema.load`` does beside a
    GPU. Memory allocated while it encodes and after, the visit's time, and its tokens against
    the same encoder resident on the GPU."""
    import copy

    from transformers import UMT5Config, UMT5EncoderModel

    from kinema.memory import weight_bytes
    from kinema.offload import Placement

    width = dict(d_model=64, d_ff=128, num_heads=4) if smoke else dict(d_model=4096, d_ff=10240,
                                                                       num_heads=64)  # fmt: skip
    config = UMT5Config(vocab_size=32128, d_kv=64, num_layers=4, **width)
    torch.manual_seed(0)
    model = UMT5EncoderModel(config).eval().to(half(device))
    placement = Placement("none", device)
    placement.settle(model)  # pinned on CUDA
    ids = torch.randint(0, config.vocab_size, (2, 512))
    base = reset_peak(device)
    start = time.perf_counter()
    with torch.inference_mode(), placement.encoder(model):
        inside = torch.cuda.memory_allocated(device) - base if device.type == "cuda" else 0
        tokens = model(ids.to(device)).last_hidden_state
    synced = tokens.sum().item()  # the visit's work done
    seconds = time.perf_counter() - start
    after = torch.cuda.memory_allocated(device) - base if device.type == "cuda" else 0
    resident = copy.deepcopy(model).to(device)
    with torch.inference_mode():
        want = resident(ids.to(device)).last_hidden_state
    return {
        "weights_bytes": weight_bytes(model),
        "allocated_while_encoding": inside,
        "allocated_after": after - tokens.numel() * tokens.element_size(),
        "peak_bytes": peak(device) - base,
        "pinned": all(t.is_pinned() for t in model.parameters()) if device.type == "cuda" else None,
        "weights_home": str(next(model.parameters()).device),
        "visit_seconds": seconds,
        "tokens_equal_resident": bool(torch.equal(tokens, want)),
        "tokens_sum": synced,
    }


def training_check(device: torch.device, smoke: bool = False) -> dict[str, Any]:
    """bf16 autocast, with and without gradient checkpointing, as ``kinema train`` runs them:
    gradients compared, peak memory, then 30 AdamW steps on one batch (``smoke``: 3)."""
    from kinema.models.dit import VideoDiT
    from kinema.train.config import OptimFields
    from kinema.train.loop import autocast
    from kinema.train.loss import flow_matching_loss

    cfg = bench.SHAPES["small-wan"].dit
    optim = OptimFields(precision="bf16")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, cfg.in_channels, 5, 32, 32, generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    sigmas = torch.tensor([0.3, 0.8], device=device)
    context = torch.randn(2, 64, cfg.text_dim, generator=g).to(device)

    def grads(checkpointing: bool) -> tuple[list[Tensor], float, int]:
        torch.manual_seed(0)
        model = VideoDiT(cfg).to(device)
        model.gradient_checkpointing = checkpointing
        base = reset_peak(device)
        with autocast(optim, device):
            loss = flow_matching_loss(model, x0, noise, sigmas, context)
        loss.backward()
        got = [p.grad.float() for p in model.parameters()]
        return got, float(loss.detach()), peak(device) - base

    plain, loss_a, peak_a = grads(False)
    ckpt, loss_b, peak_b = grads(True)
    flat_a, flat_b = torch.cat([g.flatten() for g in plain]), torch.cat([g.flatten() for g in ckpt])
    rel = float((flat_a - flat_b).norm() / flat_a.norm())
    torch.manual_seed(0)
    model = VideoDiT(cfg).to(device)
    model.gradient_checkpointing = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3 if smoke else 30):
        with autocast(optim, device):
            loss = flow_matching_loss(model, x0, noise, sigmas, context)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {"loss_plain": loss_a, "loss_checkpointed": loss_b, "grad_rel_diff": rel,
            "peak_bytes_plain": peak_a, "peak_bytes_checkpointed": peak_b,
            "losses_first_last": [losses[0], statistics.mean(losses[-5:])]}  # fmt: skip


def memory_check(device: torch.device, smoke: bool = False) -> dict[str, Any]:
    """Automatic VAE decode tiling where the free memory is the GPU's: ``free_bytes`` must
    count what torch's allocator holds unused; the Wan 2.1 VAE (random bf16 weights) decodes
    480x832x81 untiled with the GPU's own free memory as the budget, and tiled within a budget
    just above the 384 px tiled estimate (``smoke``: small-Wan VAE, 192x128x9, 128 px tiles)."""
    from kinema.configs import SamplingDefaults
    from kinema.memory import free_bytes, tiled_decode_bytes, vae_decode_bytes
    from kinema.models.dit import VideoDiT
    from kinema.models.vae import CausalVAE
    from kinema.pipeline import Pipeline

    small = bench.SHAPES["small-wan"]
    vae_cfg = small.vae if smoke else WAN21_VAE
    width, height, frames, tile = (192, 128, 9, 128) if smoke else (832, 480, 81, 384)
    out: dict[str, Any] = {"vae": "small-Wan VAE" if smoke else "Wan 2.1 VAE",
                           "shape": f"{width}x{height}x{frames}"}  # fmt: skip
    if device.type == "cuda":
        held = torch.empty(2**28, device=device)  # 1 GiB, then back to torch's allocator
        del held
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        out["allocator"] = {"free_bytes": free_bytes(device), "reserved_unused": unused,
                       "driver_free": torch.cuda.mem_get_info(device)[0]}  # fmt: skip
    torch.manual_seed(0)
    vae = CausalVAE(vae_cfg).eval().to(device, half(device))
    rows = {"": (torch.zeros(8, small.dit.text_dim), torch.ones(8, dtype=torch.bool))}
    pipe = Pipeline(VideoDiT(small.dit), vae, RecordedText(rows, device, half(device)),
                    name="wan-vae", defaults=SamplingDefaults())  # fmt: skip
    s = vae_cfg.spatial_factor
    z = torch.randn(1, vae_cfg.z_dim, 1 + (frames - 1) // vae_cfg.temporal_factor, height // s,
                    width // s, generator=torch.Generator().manual_seed(0)).to(device)  # fmt: skip
    videos = {}
    budgets = {"untiled": None, "tiled": int(1.02 * tiled_decode_bytes(vae_cfg, width, height,
                                                                    frames, tile, 2))}  # fmt: skip
    for key, budget in budgets.items():
        pipe.decode_budget = budget
        with warnings.catch_warnings():  # the decode below warns of its tiles itself
            warnings.simplefilter("ignore")
            chosen = pipe.decode_tile(vae.denormalize(z.to(half(device))), 2)
        base = reset_peak(device)
        start = time.perf_counter()
        videos[key] = pipe.decode(z).float().cpu()
        out[key] = {"budget": budget, "tile": chosen and chosen.size, "seconds":
                     time.perf_counter() - start, "peak_bytes": peak(device) - base}  # fmt: skip
    # the pipeline's estimate counts activations at 4 bytes even in a bf16 VAE: on the live
    # tensors of a bf16 decode (tests/test_memory.py) 2 bytes falls short; here against CUDA's
    out["untiled_estimate"] = vae_decode_bytes(vae_cfg, width, height, frames, cache_nbytes=2)
    out["untiled_estimate_2_bytes"] = vae_decode_bytes(vae_cfg, width, height, frames, 2, 2)
    out["tiled_psnr_db"] = bench.psnr(videos["tiled"], videos["untiled"], 2.0)
    return out


def markdown(r: dict[str, Any]) -> str:
    gib = lambda n: f"{n / 2**30:.2f} GiB"
    lines = [f"GPU checks on {r['machine'].get('gpu', r['machine']['cpu'])}, torch "
             f"{r['machine']['torch']}.", ""]  # fmt: skip
    if "offload" in r:
        o = r["offload"]
        lines += [f"### Offload policies (Wan 2.1 1.3B DiT, random bf16 weights, {o['shape']})",
                  "", "| policy | peak GPU memory | time | max pixel diff vs none |",
                  "|---|---|---|---|"]  # fmt: skip
        for p in ("none", "model", "block"):
            lines.append(f"| {p} | {gib(o[p]['peak_bytes'])} | {o[p]['seconds']:.1f} s | "
                         f"{o[p].get('max_uint8_diff_vs_none', '-')} |")  # fmt: skip
        lines.append("")
    if "encoders" in r:
        e = r["encoders"]
        lines += ["### The text encoder visits the GPU to encode (random umT5, 4 layers, bf16)",
                  "", f"- weights {gib(e['weights_bytes'])}, in host memory "
                  f"({e['weights_home']}, pinned: {e['pinned']}); allocated on the GPU while "
                  f"encoding {gib(e['allocated_while_encoding'])}, after "
                  f"{gib(e['allocated_after'])}; the visit took {e['visit_seconds']:.2f} s; "
                  f"tokens equal to the encoder resident on the GPU: "
                  f"{e['tokens_equal_resident']}", ""]  # fmt: skip
    if "training" in r:
        t = r["training"]
        lines += ["### bf16 autocast training step (small-Wan DiT shape)", "",
                  f"- gradient checkpointing: peak {gib(t['peak_bytes_checkpointed'])} vs "
                  f"{gib(t['peak_bytes_plain'])} without; gradients differ by "
                  f"{t['grad_rel_diff']:.1e} (relative L2)",
                  f"- 30 AdamW steps on one batch: loss {t['losses_first_last'][0]:.3f} -> "
                  f"{t['losses_first_last'][1]:.3f}", ""]  # fmt: skip
    if "memory" in r:
        m = r["memory"]
        lines += [f"### Automatic decode tiling ({m['vae']}, random bf16 weights, {m['shape']})",
                  "", f"untiled estimate {gib(m['untiled_estimate'])} (activations at 2 bytes: "
                  f"{gib(m['untiled_estimate_2_bytes'])}); tiled vs untiled "
                  f"{m['tiled_psnr_db']:.1f} dB PSNR", "",
                  "| budget | tile | peak | time |", "|---|---|---|---|"]  # fmt: skip
        for x in (m["untiled"], m["tiled"]):
            budget = gib(x["budget"]) if x["budget"] else "free_bytes"
            cells = (budget, x["tile"] or "none", gib(x["peak_bytes"]), f"{x['seconds']:.1f} s")
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        if "allocator" in m:
            f = m["allocator"]
            free, driver, unused = (
                gib(f[k]) for k in ("free_bytes", "driver_free", "reserved_unused")
            )
            lines.append(
                f"\nfree_bytes {free} = driver free {driver} + allocator's unused {unused}"
            )
        lines.append("")
    if "builtin" in r:
        lines += ["### kinema-tiny on the GPU vs the CPU (fp32)", "",
                  "| dtype | prompt | seed | PSNR vs CPU | judge (GPU) | judge (CPU) | time |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for dt, rows in r["builtin"].items():
            for x in rows:
                lines.append(f"| {dt} | {x['prompt']} | {x['seed']} | "
                             f"{x['psnr_vs_cpu_fp32_db']:.1f} dB | {'; '.join(x['judge_gpu'])} | "
                             f"{'; '.join(x['judge_cpu'])} | {x['seconds']:.2f} s |")  # fmt: skip
        lines.append("")
    return "\n".join(lines) + "\n"


def run(out: Path, checks: list[str], device: torch.device, smoke: bool) -> int:
    results: dict[str, Any] = {"machine": bench.machine(device)}
    funcs = {"training": training_check, "builtin": builtin_check, "offload": offload_check,
             "memory": memory_check, "encoders": encoders_check}  # fmt: skip
    for name in checks:
        start = time.perf_counter()
        try:
            results[name] = funcs[name](device, smoke)
        except Exception as err:  # one broken check must not hide the others' numbers
            results[f"{name}_error"] = repr(err)
            print(f"{name}: {err!r}", file=sys.stderr)
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu-checks.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (out / "gpu-checks.md").write_text(markdown(results))
    print(markdown(results))
    return 1 if any(k.endswith("_error") for k in results) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("record", "run"))
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--checks", default="training,builtin,offload,memory,encoders")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="small shapes: that it runs, on a CPU")
    args = p.parse_args(argv)
    if args.what == "record":
        record()
        return 0
    return run(Path(args.out), args.checks.split(","), torch.device(args.device), args.smoke)


if __name__ == "__main__":
    sys.exit(main())
