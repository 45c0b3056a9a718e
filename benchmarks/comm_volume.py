"""Communication volume per denoising step per rank of sequence-parallel attention.

Bytes one rank sends in one DiT forward (one sampler step; a CFG step is one forward of batch
2), for Ulysses (all-to-all over heads), ring attention (key/value blocks around the ring) and
Ulysses x ring, at the Wan 2.1 1.3B and 14B shapes (bf16). The formulas are first checked
against the bytes kinema's collectives actually send in small gloo runs (``CommLog``).

    python benchmarks/comm_volume.py          # writes benchmarks/results/comm_volume.md
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kinema.configs import DiTConfig
from kinema.distributed.parallel import CommLog, ParallelConfig, ParallelDiT, build_mesh
from kinema.models.dit import VideoDiT

OUT = Path(__file__).parent / "results" / "comm_volume.md"


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    dim: int
    heads: int
    tokens: int  # latent frames x patch rows x patch columns
    batch: int = 2  # CFG: conditional + unconditional in one forward
    bytes_per: int = 2  # bf16
    out_per_token: int = 64  # p_t * p_h * p_w * C_out of the gathered output


def attention_bytes(s: Shape, c: ParallelConfig) -> float:
    """Bytes one rank sends in the self-attention of all layers of one forward."""
    u, r = c.ulysses, c.ring
    local = s.batch * s.tokens / (u * r) * s.dim  # q (or k, v, out) elements on one rank
    ulysses = 4 * local * (u - 1) / u  # q, k, v and out: all but 1/u of each leaves
    ring = 2 * local * (r - 1)  # k, v blocks (N/r tokens x D/u channels = local), r-1 hops
    return s.layers * (ulysses + ring) * s.bytes_per


def gather_bytes(s: Shape, c: ParallelConfig, out_bytes: int = 4) -> float:
    """The final all-gather of the output patches (fp32), per rank."""
    sp = c.sequence
    return s.batch * s.tokens / sp * s.out_per_token * (sp - 1) * out_bytes


# ---------------------------------------------------------------------------------------------
# Measured on small gloo runs
# ---------------------------------------------------------------------------------------------


def _measure(rank: int, world: int, port: int, config: ParallelConfig, queue: object) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = VideoDiT(DiTConfig(num_heads=4, head_dim=8, text_dim=32, freq_dim=16, ffn_dim=32,
                               num_layers=2, in_channels=4, out_channels=4)).eval()  # fmt: skip
    log = CommLog()
    mesh = build_mesh(config, log)
    x, ctx = torch.randn(2, 4, 4, 4, 6), torch.randn(2, 7, 32)  # 4 x 2 x 3 = 24 tokens
    with torch.no_grad():
        ParallelDiT(model, mesh)(x, torch.tensor([500.0, 500.0]), ctx)
    if rank == 0:
        queue.put(dict(log.sent))
    dist.destroy_process_group()


def measured(config: ParallelConfig) -> dict[str, int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_measure, args=(config.world, port, config, queue), nprocs=config.world)
    return queue.get()


def check_formulas() -> list[str]:
    tiny = Shape("tiny", layers=2, dim=32, heads=4, tokens=24, bytes_per=4, out_per_token=16)
    rows = ["| config | measured attention bytes | formula | measured gather | formula |",
            "|---|---:|---:|---:|---:|"]  # fmt: skip
    for c in (ParallelConfig(ulysses=2), ParallelConfig(ring=2), ParallelConfig(ring=3),
              ParallelConfig(ulysses=2, ring=2)):  # fmt: skip
        got = measured(c)
        attn = got.get("all_to_all", 0) + got.get("ring", 0)
        want, gather = attention_bytes(tiny, c), gather_bytes(tiny, c)
        if attn != want or got.get("all_gather", 0) != gather:
            raise SystemExit(f"formula mismatch for {c}: measured {got}, formula {want}, {gather}")
        rows.append(f"| u={c.ulysses} r={c.ring} | {attn} | {want:.0f} | "
                    f"{got['all_gather']} | {gather:.0f} |")  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------
# Wan shapes
# ---------------------------------------------------------------------------------------------

WAN = [
    Shape("Wan2.1 1.3B, 480x832x81", layers=30, dim=1536, heads=12, tokens=21 * 30 * 52),
    Shape("Wan2.1 14B, 480x832x81", layers=40, dim=5120, heads=40, tokens=21 * 30 * 52),
    Shape("Wan2.1 14B, 720x1280x81", layers=40, dim=5120, heads=40, tokens=21 * 45 * 80),
]


def configs_for(heads: int) -> list[tuple[str, ParallelConfig]]:
    out = []
    for n in (2, 4, 8):
        if heads % n == 0:
            out.append((f"Ulysses {n}", ParallelConfig(ulysses=n)))
        out.append((f"ring {n}", ParallelConfig(ring=n)))
    if heads % 8:
        out.append(("Ulysses 4 x ring 2", ParallelConfig(ulysses=4, ring=2)))
    return out


def wan_table() -> list[str]:
    rows = ["| model, video | parallel | GB sent per step per rank | of which output gather |",
            "|---|---|---:|---:|"]  # fmt: skip
    for s in WAN:
        for name, c in configs_for(s.heads):
            total = attention_bytes(s, c) + gather_bytes(s, c)
            rows.append(f"| {s.name} ({s.tokens} tokens) | {name} | {total / 1e9:.2f} | "
                        f"{gather_bytes(s, c) / 1e9:.3f} |")  # fmt: skip
    return rows


def main() -> int:
    lines = [
        "# Sequence-parallel communication volume",
        "",
        "Bytes one rank sends per denoising step (one DiT forward of batch 2: conditional +",
        "unconditional), bf16 activations, self-attention of every layer plus the final",
        "all-gather of the output patches (fp32). Ulysses sends 4·B·N·D·(u−1)/u² per layer",
        "(q, k, v, out all-to-all), falling as the degree grows; ring sends 2·B·N·D·(r−1)/r per",
        "layer (k and v travel r−1 hops), nearly constant in r. CFG-parallel halves B on each",
        "rank and adds one all-gather of the velocity (B·C·F·H·W floats). Cross-attention sends",
        "nothing (text is on every rank). Produced by `python benchmarks/comm_volume.py`.",
        "",
        *wan_table(),
        "",
        "The formulas equal the bytes kinema's collectives send (counted by `CommLog` on gloo,",
        "tiny DiT: 2 layers, 4 heads x 8, 24 tokens, batch 2, fp32):",
        "",
        *check_formulas(),
        "",
        "Speed-up on GPUs: not measured yet (no multi-GPU machine was available).",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
