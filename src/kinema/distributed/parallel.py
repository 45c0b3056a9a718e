"""One video on N processes: the device mesh, sequence-parallel attention, CFG-parallel, a
split VAE decode and a broadcast text encoder.

The world is a mesh ``cfg x ring x ulysses`` (rank = cfg_i * sp + ring_i * ulysses + uly_i,
sp = ring * ulysses). The token sequence (B, N, D) is cut into sp equal slices (padded at the
end); rank ``sp_rank`` holds slice ``sp_rank``. Inside self-attention:

* Ulysses (Jacobs et al. 2023, DeepSpeed-Ulysses): an all-to-all turns the slice
  (B, N/sp, H, D) of q, k, v into a head group over a longer sequence (B, N/ring, H/u, D);
  a second all-to-all brings the output back.
* Ring (Liu et al. 2023, Ring Attention): key/value blocks travel around the ring while each rank
  attends its queries to every block, merging partial results by their log-sum-exp.

With ``ring == 1`` this is pure Ulysses, with ``ulysses == 1`` pure ring. The backend is a
function installed with :func:`kinema.models.ops.use_attention`: the model is never copied.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kinema.models.ops import AttentionFn, modulate, sdpa_attention, unpatchify, use_attention

Group = Any  # a torch.distributed ProcessGroup, or None for a group of one

# ---------------------------------------------------------------------------------------------
# The mesh
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParallelConfig:
    """How the world is split for one video."""

    cfg: int = 1  # 2: conditional and unconditional branches on two halves of the world
    ulysses: int = 1  # all-to-all degree over heads (must divide the head count)
    ring: int = 1  # ring-attention degree over key/value blocks

    @property
    def sequence(self) -> int:
        return self.ulysses * self.ring

    @property
    def world(self) -> int:
        return self.cfg * self.sequence

    def __post_init__(self) -> None:
        if self.cfg not in (1, 2):
            raise ValueError(f"cfg degree {self.cfg} must be 1 or 2")
        if self.ulysses < 1 or self.ring < 1:
            raise ValueError(f"ulysses {self.ulysses} and ring {self.ring} must be >= 1")


def plan_parallel(
    world: int, heads: int, cfg_parallel: bool = True, mode: str = "auto"
) -> ParallelConfig:
    """A :class:`ParallelConfig` for ``world`` processes and a model with ``heads`` heads.

    ``mode``: "auto" (Ulysses over gcd(sp, heads), ring over the rest), "ulysses" (needs
    heads % sp == 0) or "ring". CFG-parallel takes a factor 2 when asked and ``world`` is even.
    """
    if world < 1:
        raise ValueError(f"world size {world} must be >= 1")
    if mode not in ("auto", "ulysses", "ring"):
        raise ValueError(f"parallel mode {mode!r}; valid: auto, ulysses, ring")
    cfg = 2 if cfg_parallel and world % 2 == 0 else 1
    sp = world // cfg
    if mode == "ulysses" and heads % sp:
        raise ValueError(f"ulysses needs the {heads} heads divisible by sequence degree {sp}")
    uly = {"auto": math.gcd(sp, heads), "ulysses": sp, "ring": 1}[mode]
    return ParallelConfig(cfg=cfg, ulysses=uly, ring=sp // uly)


@dataclass
class CommLog:
    """Bytes this rank sent, per kind of collective (filled only when a log is given)."""

    sent: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + nbytes


@dataclass(frozen=True)
class Mesh:
    """This rank's place in a :class:`ParallelConfig` and the process groups it talks over."""

    config: ParallelConfig
    rank: int
    cfg_group: Group
    sp_group: Group
    ulysses_group: Group
    ring_group: Group
    ring_ranks: tuple[int, ...]  # global ranks of this rank's ring, in ring order
    log: CommLog | None = None

    @property
    def sp_rank(self) -> int:
        return self.rank % self.config.sequence

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.config.sequence

    @property
    def ulysses_rank(self) -> int:
        return self.sp_rank % self.config.ulysses

    @property
    def ring_rank(self) -> int:
        return self.sp_rank // self.config.ulysses


def mesh_ranks(c: ParallelConfig) -> dict[str, list[list[int]]]:
    """Global ranks of every cfg, sequence, Ulysses and ring group, in a fixed order."""
    sp, u = c.sequence, c.ulysses
    cells = [(ci, ri, ui) for ci in range(c.cfg) for ri in range(c.ring) for ui in range(u)]
    rank = lambda cell: cell[0] * sp + cell[1] * u + cell[2]

    def groups(axis: int) -> list[list[int]]:
        """Cells equal on every axis but ``axis`` form one group."""
        keyed: dict[tuple[int, ...], list[int]] = {}
        for cell in cells:
            keyed.setdefault(cell[:axis] + cell[axis + 1 :], []).append(rank(cell))
        return list(keyed.values())

    sp_groups = [[ci * sp + s for s in range(sp)] for ci in range(c.cfg)]
    return {"cfg": groups(0), "sp": sp_groups, "ulysses": groups(2), "ring": groups(1)}


def build_mesh(config: ParallelConfig, log: CommLog | None = None) -> Mesh:
    """Create the process groups (every rank must call this, in the same order)."""
    if not dist.is_initialized():
        raise ValueError("torch.distributed is not initialised; call init_distributed() first")
    rank, world = dist.get_rank(), dist.get_world_size()
    if config.world != world:
        raise ValueError(f"parallel config needs {config.world} processes, world is {world}")
    mine: dict[str, Group] = {}
    ring_ranks: tuple[int, ...] = (rank,)
    for kind, groups in mesh_ranks(config).items():
        for ranks in groups:
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                mine[kind] = group
                ring_ranks = tuple(ranks) if kind == "ring" else ring_ranks
    return Mesh(config, rank, mine["cfg"], mine["sp"], mine["ulysses"], mine["ring"],
                ring_ranks, log)  # fmt: skip


def init_distributed(backend: str | None = None) -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Returns this rank's device: ``cuda:LOCAL_RANK`` with NCCL when CUDA is present, else the
    CPU with gloo.
    """
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    return device


def group_size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


# ---------------------------------------------------------------------------------------------
# Collectives (each logs what this rank sends)
# ---------------------------------------------------------------------------------------------


def all_to_all(chunks: Sequence[Tensor], group: Group, log: CommLog | None = None) -> list[Tensor]:
    """Send ``chunks[j]`` to group rank j; return what each rank sent us (same shapes)."""
    if group is None:
        return list(chunks)
    ins = [c.contiguous() for c in chunks]
    outs = [torch.empty_like(c) for c in ins]
    dist.all_to_all(outs, ins, group=group)
    if log is not None:
        me = dist.get_rank(group)
        log.add(
            "all_to_all", sum(c.numel() * c.element_size() for j, c in enumerate(ins) if j != me)
        )
    return outs


def all_gather(x: Tensor, group: Group, log: CommLog | None = None) -> list[Tensor]:
    """Every group rank's ``x`` (equal shapes), in group-rank order."""
    if group is None:
        return [x]
    x = x.contiguous()
    outs = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(outs, x, group=group)
    if log is not None:
        log.add("all_gather", x.numel() * x.element_size() * (len(outs) - 1))
    return outs


def ring_shift(
    tensors: Sequence[Tensor], ranks: Sequence[int], me: int, log: CommLog | None = None
) -> tuple[list[Tensor], list[Any]]:
    """Start sending ``tensors`` to the next rank of the ring and receiving the previous one's.

    Returns the receive buffers and the requests to wait on before reading them.
    """
    i = ranks.index(me)
    nxt, prv = ranks[(i + 1) % len(ranks)], ranks[(i - 1) % len(ranks)]
    recv = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), nxt) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, prv) for r in recv]
    if log is not None:
        log.add("ring", sum(t.numel() * t.element_size() for t in tensors))
    return recv, dist.batch_isend_irecv(ops)


# ---------------------------------------------------------------------------------------------
# Attention backends: (B, S, H, D) layout, as kinema.models.ops.attention
# ---------------------------------------------------------------------------------------------


def attention_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention and its log-sum-exp: q (B, S, H, D), k/v (B, L, H, D) ->
    out (B, S, H, D) float32, lse (B, S, H, 1) float32 (natural log, scale 1/sqrt(D))."""
    qt, kt, vt = (t.transpose(1, 2).float() for t in (q, k, v))  # (B, H, S|L, D)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)[:2]
    else:  # the reference math; a fused kernel returning the lse can replace it on GPUs
        scores = qt @ kt.transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, H, S, L)
        lse = scores.logsumexp(-1)  # (B, H, S)
        out = torch.softmax(scores, dim=-1) @ vt
    return out.transpose(1, 2), lse.transpose(1, 2)[..., None]  # (B,S,H,D), (B,S,H,1)


def merge_lse(
    acc: tuple[Tensor, Tensor] | None, part: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """Combine two partial softmax attentions over disjoint key sets (online softmax)."""
    if acc is None:
        return part
    (o1, l1), (o2, l2) = acc, part
    lse = torch.logaddexp(l1, l2)
    return o1 * torch.exp(l1 - lse) + o2 * torch.exp(l2 - lse), lse


def ring_attention(
    q: Tensor, k: Tensor, v: Tensor, mesh: Mesh, block_valid: Callable[[int], int]
) -> Tensor:
    """Attention of local queries to the keys of every rank of the ring.

    q/k/v (B, S_blk, H, D) hold ring block ``mesh.ring_rank``; ``block_valid(j)`` is how many
    leading keys of block j are real (the rest is padding). Returns (B, S_blk, H, D).
    """
    ranks, n = mesh.ring_ranks, mesh.config.ring
    acc: tuple[Tensor, Tensor] | None = None
    kv = [k, v]
    for step in range(n):
        pending = ring_shift(kv, ranks, mesh.rank, mesh.log) if step < n - 1 else None
        j = (mesh.ring_rank - step) % n  # block j travelled `step` hops to reach us
        valid = block_valid(j)
        if valid > 0:
            acc = merge_lse(acc, attention_lse(q, kv[0][:, :valid], kv[1][:, :valid]))
        if pending is not None:
            for req in pending[1]:
                req.wait()
            kv = pending[0]
    return acc[0].to(q.dtype)


def heads_to_sequence(x: Tensor, group: Group, log: CommLog | None) -> Tensor:
    """Ulysses forward all-to-all: (B, S, H, D) slice -> (B, u*S, H/u, D) head group."""
    u = group_size(group)
    return torch.cat(all_to_all(x.chunk(u, dim=2), group, log), dim=1)


def sequence_to_heads(x: Tensor, group: Group, log: CommLog | None) -> Tensor:
    """Ulysses backward all-to-all: (B, u*S, H/u, D) -> (B, S, H, D)."""
    u = group_size(group)
    return torch.cat(all_to_all(x.chunk(u, dim=1), group, log), dim=2)


def sequence_parallel_attention(mesh: Mesh, shard: Shard) -> AttentionFn:
    """The self-attention backend for one forward over ``shard`` (Ulysses, then ring).

    Calls whose keys are not this rank's token slice (cross-attention to text or image tokens,
    which every rank holds whole) run locally with SDPA.
    """
    c = mesh.config
    block = shard.length * c.ulysses  # tokens per ring block after the Ulysses all-to-all
    block_valid = lambda j: max(0, min(block, shard.total - j * block))

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if k.shape[1] != shard.length or q.shape[1] != shard.length:
            return sdpa_attention(q, k, v)
        q, k, v = (heads_to_sequence(t, mesh.ulysses_group, mesh.log) for t in (q, k, v))
        if c.ring == 1:
            valid = block_valid(0)
            out = sdpa_attention(q, k[:, :valid], v[:, :valid])
        else:
            out = ring_attention(q, k, v, mesh, block_valid)
        return sequence_to_heads(out, mesh.ulysses_group, mesh.log)

    return attend


# ---------------------------------------------------------------------------------------------
# Token sharding and the sequence-parallel DiT forward
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """Rank ``index`` of ``parts`` holds tokens [start, start + length) of ``total`` (the last
    ranks' slices run past ``total`` into padding)."""

    total: int
    parts: int
    index: int
    length: int

    @property
    def start(self) -> int:
        return self.index * self.length

    def take(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's slice of x along ``dim``, zero-padded to ``length``."""
        end = min(self.total, self.start + self.length)
        piece = x.narrow(dim, min(self.start, self.total), max(0, end - self.start))
        pad = self.length - piece.shape[dim]
        if pad == 0:
            return piece
        shape = list(piece.shape)
        shape[dim] = pad
        return torch.cat([piece, piece.new_zeros(shape)], dim=dim)

    def groups(self, mod: Tensor, per_group: int) -> Tensor:
        """Per-group modulation (B, G, ...) for this slice, as :func:`ops.modulate` expects.

        G = 1 passes through; slices aligned to whole groups take their groups; otherwise every
        token gets its own group (B, length, ...).
        """
        if mod.shape[1] == 1:
            return mod
        if self.start % per_group == 0 and self.length % per_group == 0:
            return self._aligned(mod, per_group)
        idx = torch.arange(self.start, self.start + self.length, device=mod.device)
        return mod[:, (idx // per_group).clamp(max=mod.shape[1] - 1)]  # (B, length, ...)

    def _aligned(self, mod: Tensor, per_group: int) -> Tensor:
        g0, g = self.start // per_group, self.length // per_group
        idx = torch.arange(g0, g0 + g, device=mod.device).clamp(max=mod.shape[1] - 1)
        return mod[:, idx]  # (B, length / per_group, ...)


def make_shard(
    total: int, parts: int, index: int, avoid: Sequence[int] = (), align: int = 1
) -> Shard:
    """Equal slices of ``total`` tokens over ``parts`` ranks, a multiple of ``align`` long (a
    frame's tokens, when each frame has its own text context); the slice length never equals
    a length in ``avoid`` (the text / image token counts), so self- and cross-attention calls
    are told apart by their key length."""
    length = -(-total // parts)
    length = -(-length // align) * align
    while length in avoid:
        length += align
    return Shard(total, parts, index, length)


def head_tokens(model: nn.Module, tokens: Tensor, temb: Tensor) -> Tensor:
    """The DiT head without unpatchify: tokens (B, S, D), temb (B, G, D) -> (B, S, p*C)."""
    shift, scale = (model.scale_shift_table[:, None] + temb[:, :, None]).unbind(2)  # (B,G,D)
    h = modulate(model.norm_out(tokens.float()), shift, scale).type_as(tokens)
    return model.proj_out(h)


def sequence_parallel_forward(
    model: nn.Module,
    mesh: Mesh,
    x: Tensor,
    timestep: Tensor,
    context: Tensor,
    image: Tensor | None = None,
) -> Tensor:
    """``VideoDiT.forward`` with the tokens split over the sequence group (same signature and
    result), built from the model's own modules. x (B, C, F, H, W) -> (B, C_out, F, H, W)."""
    e = model.embed(x, timestep, context, image)
    n = math.prod(e.grid)
    avoid = [e.context.shape[-2]] + ([e.image.shape[1]] if e.image is not None else [])
    per_frame = n // e.grid[0]
    timed = e.context.ndim == 4  # (B, G, L, D): slices hold whole frames, each its context
    shard = make_shard(n, mesh.config.sequence, mesh.sp_rank, avoid, per_frame if timed else 1)
    context = shard.groups(e.context, per_frame) if timed else e.context  # (B, S/per_frame, L, D)
    per_group = n // e.mod.shape[1]
    local = shard.take(e.tokens).contiguous()  # (B, S, D)
    rope = (shard.take(e.rope[0], 0), shard.take(e.rope[1], 0))  # (S, 1, Dh/2)
    local_mod = shard.groups(e.mod, per_group)
    with use_attention(sequence_parallel_attention(mesh, shard)):
        for block in model.blocks:
            local = model.run_block(block, local, context, local_mod, rope, e.image)
    out = head_tokens(model, local, shard.groups(e.temb, per_group))  # (B, S, p*C)
    full = torch.cat(all_gather(out, mesh.sp_group, mesh.log), dim=1)[:, :n]  # (B, N, p*C)
    return unpatchify(full, e.grid, model.config.patch_size)


# ---------------------------------------------------------------------------------------------
# CFG-parallel and the parallel DiT
# ---------------------------------------------------------------------------------------------


def batch_half(x: Tensor | None, batch: int, index: int) -> Tensor | None:
    """Half ``index`` of a tensor whose leading dim is the CFG batch; others pass through."""
    if x is None or x.ndim == 0 or x.shape[0] != batch:
        return x
    half = batch // 2
    return x[index * half : (index + 1) * half]


class ParallelDiT(nn.Module):
    """A VideoDiT run over a :class:`Mesh`: drop-in for the pipeline (same forward, config and
    parameters). A CFG batch [cond; uncond] (2B) is split over the two CFG halves of the world
    and gathered; each half runs :func:`sequence_parallel_forward` over its sequence group."""

    def __init__(self, model: nn.Module, mesh: Mesh) -> None:
        super().__init__()
        self.inner = model
        self.mesh = mesh

    @property
    def config(self) -> Any:
        return self.inner.config

    @property
    def proj_out(self) -> nn.Module:
        return self.inner.proj_out

    def forward(
        self, x: Tensor, timestep: Tensor, context: Tensor, image: Tensor | None = None
    ) -> Tensor:
        """x (B, C, F, H, W), timestep (B,) or (B, F), context (B, L, D_text) -> velocity."""
        m, b = self.mesh, x.shape[0]
        if m.config.cfg == 1 or b % 2:
            return sequence_parallel_forward(self.inner, m, x, timestep, context, image)
        part = lambda y: batch_half(y, b, m.cfg_rank)
        args = (part(x), part(timestep), part(context), part(image))
        out = sequence_parallel_forward(self.inner, m, *args)
        return torch.cat(all_gather(out, m.cfg_group, m.log), dim=0)  # (B, C, F, H, W)


# ---------------------------------------------------------------------------------------------
# Text on one rank, VAE decode over all ranks
# ---------------------------------------------------------------------------------------------


class BroadcastTextEncoder:
    """Encodes on rank 0 (the only rank holding ``encoder``) and broadcasts the result.

    ``encode(prompts)`` -> (tokens (B, L, D), mask (B, L)) on every rank, on ``device``.
    """

    def __init__(self, encoder: Any | None, device: torch.device) -> None:
        self.encoder, self.device = encoder, device

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        box: list[Any] = [None]
        if dist.get_rank() == 0:
            tokens, mask = self.encoder.encode(prompts)
            box[0] = (tokens.cpu(), mask.cpu())
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        tokens, mask = box[0]
        return tokens.to(self.device), mask.to(self.device)

    @property
    def max_length(self) -> int | None:
        return getattr(self.encoder, "max_length", None)

    def cut_prompts(self, prompts: list[str]) -> list[str | None]:
        """Rank 0's encoder's answer (see kinema.models.text); the other ranks stay quiet."""
        cut = getattr(self.encoder, "cut_prompts", None)
        return cut(prompts) if cut is not None else [None] * len(prompts)

    def _comm_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None


def tile_origins(height: int, width: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of the tiles, in the order ``vae.tiled_apply`` visits them."""
    return [(i, j) for i in range(0, height, stride) for j in range(0, width, stride)]


def split_tiled_decode(
    vae: nn.Module, latent: Tensor, tile: Any, group: Group = None,
    cache_dtype: torch.dtype | None = None,
) -> Tensor:  # fmt: skip
    """``vae.decode(latent, tile, cache_dtype=...)`` with the tiles shared round-robin by the
    ranks of ``group`` (all ranks by default) and broadcast; equals the one-process result.

    latent (B, z, F, h, w) unnormalised -> video (B, 3, 1 + 4(F - 1), 8h, 8w).
    """
    from kinema.models.vae import tiled_apply

    s = vae.config.spatial_factor
    size, stride = tile.size // s, tile.stride // s
    origins = tile_origins(latent.shape[-2], latent.shape[-1], stride)
    world = dist.get_world_size(group)
    me = dist.get_rank(group)
    t_out = 1 + vae.config.temporal_factor * (latent.shape[2] - 1)
    done: list[Tensor] = []
    for n, (i, j) in enumerate(origins):
        piece = latent[..., i : i + size, j : j + size]
        if n % world == me:
            out = vae.decode(piece, cache_dtype=cache_dtype)
        else:
            shape = (latent.shape[0], 3, t_out, piece.shape[-2] * s, piece.shape[-1] * s)
            out = torch.empty(shape, device=latent.device, dtype=latent.dtype)
        src = dist.get_global_rank(group, n % world) if group is not None else n % world
        dist.broadcast(out, src=src, group=group)
        done.append(out)
    tiles = iter(done)
    return tiled_apply(lambda _: next(tiles), latent, size, stride, s)


class SplitDecodeVAE(nn.Module):
    """A CausalVAE whose ``decode`` is split over the ranks by spatial tiles (``tile``: a
    ``TileSpec``); everything else is the wrapped VAE's."""

    def __init__(self, vae: nn.Module, tile: Any) -> None:
        super().__init__()
        self.inner, self.tile = vae, tile

    @property
    def config(self) -> Any:
        return self.inner.config

    def encode(
        self, video: Tensor, tile: Any = None, cache_dtype: torch.dtype | None = None
    ) -> Tensor:
        return self.inner.encode(video, tile, cache_dtype=cache_dtype)

    def normalize(self, z: Tensor) -> Tensor:
        return self.inner.normalize(z)

    def denormalize(self, z: Tensor) -> Tensor:
        return self.inner.denormalize(z)

    def decode(
        self, latent: Tensor, tile: Any = None, cache_dtype: torch.dtype | None = None
    ) -> Tensor:
        """Latents (B, z, F, h, w) -> video (B, 3, T, H, W), tiles decoded across ranks."""
        return split_tiled_decode(self.inner, latent, tile or self.tile, cache_dtype=cache_dtype)
