"""The video diffusion transformer (Wan 2.1 architecture).

Read top to bottom: norms and embeddings, attention, the transformer block, then
:class:`VideoDiT`. A latent video (B, C, F, H, W) is cut into 3D patches (pt, ph, pw) by a
strided Conv3d, giving N = F/pt * H/ph * W/pw tokens of width D. Each block applies

    x = x + gate_msa * SelfAttn(AdaLN(x; shift_msa, scale_msa), 3D-RoPE)
    x = x + CrossAttn(LayerNorm(x), text)
    x = x + gate_ffn * FFN(AdaLN(x; shift_ffn, scale_ffn))

with the six modulation vectors from the timestep embedding plus a learned per-block table
(AdaLN-single as in PixArt-alpha, used by Wan). The head modulates, projects each token back to
a patch and unpatchifies to the velocity (B, C_out, F, H, W).

Parameter names follow diffusers' ``WanTransformer3DModel`` so diffusers folders load as they
are; :mod:`kinema.io.wan_keys` maps the original Wan release names.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kinema.configs import DiTConfig
from kinema.models.ops import (
    Linear,
    apply_rope,
    attention,
    gated_add,
    linear,
    modulate,
    rms_norm,
    rope_3d,
    timestep_embedding,
    unpatchify,
)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (Wan keeps norms in fp32)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm with its weight cast to the input's dtype. Under bf16 autocast the
    input is bf16 and an fp32 weight keeps torch off its fused kernel (with a warning); in one
    dtype throughout it is nn.RMSNorm (computed by :func:`~kinema.models.ops.rms_norm`)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        return rms_norm(x, w, self.eps)


class MLP(nn.Module):
    """linear_1 -> activation -> linear_2 (timestep and text embedders)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, act: nn.Module) -> None:
        super().__init__()
        self.linear_1 = Linear(d_in, d_hidden)
        self.act = act
        self.linear_2 = Linear(d_hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class GELUProj(nn.Module):
    """Linear followed by GELU (``approximate`` = "tanh" in the blocks, "none" for images)."""

    def __init__(self, d_in: int, d_out: int, approximate: str) -> None:
        super().__init__()
        self.proj = Linear(d_in, d_out)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x, gelu=self.approximate)


class FeedForward(nn.Module):
    """GELU feed-forward; ``net`` = [GELUProj, Dropout, Linear] (diffusers key layout)."""

    def __init__(self, dim: int, hidden: int, out: int, approximate: str = "tanh") -> None:
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, hidden, approximate), nn.Dropout(0.0)])
        self.net.append(Linear(hidden, out))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class ImageEmbedding(nn.Module):
    """CLIP image tokens (B, 257, image_dim) -> (B, 257, D) for Wan image-to-video."""

    def __init__(self, image_dim: int, dim: int, pos_embed_seq_len: int | None) -> None:
        super().__init__()
        self.norm1 = FP32LayerNorm(image_dim)
        self.ff = FeedForward(image_dim, image_dim, dim, approximate="none")
        self.norm2 = FP32LayerNorm(dim)
        self.pos_embed = None
        if pos_embed_seq_len is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, image_dim))

    def forward(self, image: Tensor) -> Tensor:
        if self.pos_embed is not None:  # first-last-frame: two images side by side in sequence
            b, n, d = image.shape
            image = image.view(-1, 2 * n, d) + self.pos_embed  # (B/2, 2n, image_dim)
        return self.norm2(self.ff(self.norm1(image)))


class ConditionEmbedder(nn.Module):
    """Timestep -> (temb (B, G, D), six modulation vectors (B, G, 6, D)); text -> (B, L, D).

    G is 1 for one timestep per sample, or the number of latent frames for per-frame timesteps.
    """

    def __init__(self, c: DiTConfig) -> None:
        super().__init__()
        self.freq_dim = c.freq_dim
        self.time_embedder = MLP(c.freq_dim, c.dim, c.dim, nn.SiLU())
        self.time_proj = Linear(c.dim, 6 * c.dim)
        self.text_embedder = MLP(c.text_dim, c.dim, c.dim, nn.GELU(approximate="tanh"))
        self.image_embedder = None
        if c.image_dim is not None:
            self.image_embedder = ImageEmbedding(c.image_dim, c.dim, c.pos_embed_seq_len)

    def time(self, timestep: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """timestep (B, G) -> temb (B, G, D) in ``dtype``, modulation (B, G, 6, D)."""
        b, g = timestep.shape
        freqs = timestep_embedding(timestep.flatten(), self.freq_dim)  # (B*G, freq_dim)
        freqs = freqs.to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(freqs).to(dtype).unflatten(0, (b, g))  # (B, G, D)
        mod = self.time_proj(F.silu(temb)).unflatten(-1, (6, -1))  # (B, G, 6, D)
        return temb, mod


class Attention(nn.Module):
    """Multi-head attention with RMS QK-norm across heads; self-attention takes RoPE.

    As cross-attention of an image-to-video model it also attends to image tokens through its
    own key/value projections (``add_k_proj``/``add_v_proj``) and adds the two results.
    """

    def __init__(self, c: DiTConfig, image_kv: bool = False) -> None:
        super().__init__()
        d = c.dim
        self.heads = c.num_heads
        self.to_q, self.to_k, self.to_v = Linear(d, d), Linear(d, d), Linear(d, d)
        self.to_out = nn.ModuleList([Linear(d, d)])
        norm = (lambda: RMSNorm(d, eps=c.eps)) if c.qk_norm else nn.Identity
        self.norm_q, self.norm_k = norm(), norm()
        self.add_k_proj = self.add_v_proj = None
        if image_kv:
            kv_in = c.added_kv_proj_dim or d
            self.add_k_proj, self.add_v_proj = Linear(kv_in, d), Linear(kv_in, d)
            self.norm_added_k = RMSNorm(d, eps=c.eps) if c.qk_norm else nn.Identity()

    def heads_of(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, -1))  # (B, S, H, Dh)

    def fuse_projections(self) -> None:
        """Concatenate [to_q; to_k; to_v] and [to_k; to_v] into single projections, so one GEMM
        serves q, k, v (self-attention) or k, v (cross-attention).

        The fused copies are non-persistent buffers: the state dict keeps diffusers' separate
        to_q/to_k/to_v keys, and loading new weights needs a new ``fuse_projections()``.
        """
        projections = (self.to_q, self.to_k, self.to_v)
        weight = torch.cat([m.weight.detach() for m in projections])  # (3D, D)
        bias = torch.cat([m.bias.detach() for m in projections])  # (3D,)
        self.register_buffer("qkv_weight", weight, persistent=False)
        self.register_buffer("qkv_bias", bias, persistent=False)

    def unfuse_projections(self) -> None:
        """Drop the fused copies: back to the separate projections."""
        for name in ("qkv_weight", "qkv_bias"):
            self._buffers.pop(name, None)

    def project(self, x: Tensor, kv_in: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """q from x (B, S, D); k, v from ``kv_in`` (B, L, D) or from x when None -> (B, *, D)."""
        fused = self._buffers.get("qkv_weight")
        if fused is None:
            kv_in = x if kv_in is None else kv_in
            return self.to_q(x), self.to_k(kv_in), self.to_v(kv_in)
        w, b, d = fused, self._buffers["qkv_bias"], fused.shape[1]
        if kv_in is None:
            return linear(x, w, b).chunk(3, dim=-1)  # 3 x (B, S, D)
        k, v = linear(kv_in, w[d:], b[d:]).chunk(2, dim=-1)  # 2 x (B, L, D)
        return linear(x, w[:d], b[:d]), k, v

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        image: Tensor | None = None,
    ) -> Tensor:
        """x (B, S, D); context (B, L, D), or (B, G, L, D) with one per patch frame (see
        :meth:`per_frame`), or None for self-attention -> (B, S, D)."""
        if context is not None and context.ndim == 4:
            return self.per_frame(x, context, image)
        q, k, v = self.project(x, context)
        q, k, v = self.heads_of(self.norm_q(q)), self.heads_of(self.norm_k(k)), self.heads_of(v)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v).flatten(2).type_as(q)  # (B, S, D)
        if image is not None and self.add_k_proj is not None:
            k_img = self.heads_of(self.norm_added_k(self.add_k_proj(image)))
            v_img = self.heads_of(self.add_v_proj(image))
            out = out + attention(q, k_img, v_img).flatten(2).type_as(q)
        return self.to_out[0](out)

    def per_frame(self, x: Tensor, context: Tensor, image: Tensor | None) -> Tensor:
        """Cross-attention in which the tokens of patch frame g attend to ``context[:, g]`` only
        (a prompt that changes over time). x (B, S, D), context (B, G, L, D) -> (B, S, D)."""
        b, g = context.shape[:2]
        frames = x.unflatten(1, (g, -1)).flatten(0, 1)  # (B G, S / G, D): tokens are frame-major
        image = image.repeat_interleave(g, dim=0) if image is not None else None
        out = self(frames, context.flatten(0, 1), image=image)  # (B G, S / G, D)
        return out.unflatten(0, (b, g)).flatten(1, 2)


class Block(nn.Module):
    """One Wan transformer block: modulated self-attention, cross-attention, modulated FFN."""

    def __init__(self, c: DiTConfig) -> None:
        super().__init__()
        d = c.dim
        self.norm1 = FP32LayerNorm(d, c.eps, elementwise_affine=False)
        self.attn1 = Attention(c)
        self.attn2 = Attention(c, image_kv=c.image_dim is not None)
        self.norm2 = FP32LayerNorm(d, c.eps) if c.cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(d, c.ffn_dim, d)
        self.norm3 = FP32LayerNorm(d, c.eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, d).mul_(d**-0.5))

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        mod: Tensor,
        rope: tuple[Tensor, Tensor],
        image: Tensor | None = None,
    ) -> Tensor:
        """x (B, S, D), context (B, L, D), mod (B, G, 6, D) -> (B, S, D)."""
        table = self.scale_shift_table[:, None].float()  # (1, 1, 6, D)
        shift, scale, g_msa, c_shift, c_scale, g_ffn = (table + mod.float()).unbind(2)
        h = modulate(self.norm1(x.float()), shift, scale).type_as(x)
        x = gated_add(x.float(), self.attn1(h, rope=rope), g_msa).type_as(x)
        h = self.norm2(x.float()).type_as(x)
        x = x + self.attn2(h, context, image=image)
        h = modulate(self.norm3(x.float()), c_shift, c_scale).type_as(x)
        return gated_add(x.float(), self.ffn(h).float(), g_ffn).type_as(x)


class Embedded(NamedTuple):
    """The DiT's inputs, embedded (:meth:`VideoDiT.embed`); G = 1 or one per patch frame."""

    grid: tuple[int, int, int]  # patch grid (F', H', W'), N = F' H' W' tokens
    tokens: Tensor  # (B, N, D)
    rope: tuple[Tensor, Tensor]  # cos, sin (N, 1, Dh/2)
    temb: Tensor  # (B, G, D)
    mod: Tensor  # (B, G, 6, D)
    context: Tensor  # (B, L, D) or (B, G, L, D)
    image: Tensor | None  # (B, 257, D) for image-to-video checkpoints


class VideoDiT(nn.Module):
    """Diffusion transformer over 3D patches predicting flow-matching velocity.

    ``forward(x (B, C, F, H, W), timestep (B,) or (B, F), context (B, L, text_dim))`` returns
    the velocity (B, C_out, F, H, W). A per-frame timestep (B, F) lets clean conditioning
    frames (timestep 0) sit next to noisy ones (Wan 2.2 TI2V style).
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        c = self.config = config
        self.patch_embedding = nn.Conv3d(c.in_channels, c.dim, c.patch_size, stride=c.patch_size)
        self.condition_embedder = ConditionEmbedder(c)
        self.blocks = nn.ModuleList([Block(c) for _ in range(c.num_layers)])
        self.norm_out = FP32LayerNorm(c.dim, c.eps, elementwise_affine=False)
        self.proj_out = Linear(c.dim, c.out_channels * math.prod(c.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, c.dim).mul_(c.dim**-0.5))
        self.gradient_checkpointing = False
        self.compiled = False  # compile_blocks() sets it (the sidecar records it)
        self._rope_cache: dict[tuple[int, int, int, str], tuple[Tensor, Tensor]] = {}

    def grid(self, x: Tensor) -> tuple[int, int, int]:
        """Patch grid (F/pt, H/ph, W/pw) of a latent video x (B, C, F, H, W)."""
        (pt, ph, pw), (f, h, w) = self.config.patch_size, x.shape[2:]
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent size {(f, h, w)} is not divisible by patch {(pt, ph, pw)}")
        return f // pt, h // ph, w // pw

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[Tensor, Tensor]:
        """Rotary tables for a grid, computed once per (grid, device)."""
        key = (*grid, str(device))
        if key not in self._rope_cache:
            cos, sin = rope_3d(grid, self.config.head_dim, self.config.rope_theta)
            self._rope_cache[key] = (cos.to(device), sin.to(device))
        return self._rope_cache[key]

    def frame_timesteps(self, timestep: Tensor, batch: int, frames: int) -> Tensor:
        """Timesteps (B,), (B, F) or 0-d -> (B, G): G = 1, or one per patch frame."""
        t = timestep.reshape(1, 1).expand(batch, 1) if timestep.ndim == 0 else timestep
        t = t[:, None] if t.ndim == 1 else t
        pt = self.config.patch_size[0]
        if t.shape[1] not in (1, frames * pt):
            raise ValueError(
                f"timestep has {t.shape[1]} per-frame values; the latent has {frames * pt}"
            )
        return t[:, ::pt]  # (B, G)

    def frame_context(self, context: Tensor, frames: int) -> Tensor:
        """Context (B, L, Dt) as is, or per latent frame (B, F, L, Dt) -> per patch frame."""
        if context.ndim == 3:
            return context
        pt = self.config.patch_size[0]
        if context.ndim != 4 or context.shape[1] != frames * pt:
            raise ValueError(f"per-frame context has shape {tuple(context.shape)}; valid: "
                             f"(B, {frames * pt}, L, D), one per latent frame")  # fmt: skip
        return context[:, ::pt]  # (B, G, L, Dt)

    def forward(
        self, x: Tensor, timestep: Tensor, context: Tensor, image: Tensor | None = None
    ) -> Tensor:
        """x (B, C, F, H, W), timestep (B,) or (B, F), context (B, L, text_dim) -> (B, C, F, H, W).

        ``context`` may also be (B, F, L, text_dim): one prompt per latent frame, each frame's
        tokens cross-attending to their own (timed prompts). ``image`` (B, 257, image_dim):
        CLIP image tokens, for image-to-video checkpoints only.
        """
        e = self.embed(x, timestep, context, image)
        tokens = e.tokens
        for block in self.blocks:
            tokens = self.run_block(block, tokens, e.context, e.mod, e.rope, e.image)
        return self.head(tokens, e.temb, e.grid)

    def embed(
        self, x: Tensor, timestep: Tensor, context: Tensor, image: Tensor | None = None
    ) -> Embedded:
        """Everything the blocks read: patch tokens, RoPE tables, time and text embeddings."""
        grid = self.grid(x)
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()  # (B, N, D)
        t = self.frame_timesteps(timestep, x.shape[0], grid[0])
        temb, mod = self.condition_embedder.time(t, context.dtype)  # (B,G,D), (B,G,6,D)
        context = self.condition_embedder.text_embedder(self.frame_context(context, grid[0]))
        if image is not None:
            image = self.condition_embedder.image_embedder(image)  # (B, 257, D)
        return Embedded(grid, tokens, self.rope(grid, x.device), temb, mod, context, image)

    def run_block(self, block: Block, *args: Tensor | tuple | None) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def head(self, tokens: Tensor, temb: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """Modulated output norm, projection to patches and unpatchify -> (B, C, F, H, W)."""
        shift, scale = (self.scale_shift_table[:, None] + temb[:, :, None]).unbind(2)  # (B,G,D)
        h = modulate(self.norm_out(tokens.float()), shift, scale).type_as(tokens)
        h = self.proj_out(h)  # (B, N, pt*ph*pw*C)
        return unpatchify(h, grid, self.config.patch_size)

    def fuse_projections(self) -> VideoDiT:
        """Fuse each attention's q/k/v projections into one GEMM (an inference speed-up with
        the same outputs; see :meth:`Attention.fuse_projections`). Returns self."""
        for block in self.blocks:
            block.attn1.fuse_projections()
            block.attn2.fuse_projections()
        return self

    def compile_blocks(self, **options: object) -> VideoDiT:
        """``torch.compile`` each transformer block (regional compilation: one graph reused by
        every block, so compiling takes seconds, not minutes). Same outputs. Returns self."""
        for block in self.blocks:
            block.compile(dynamic=False, **options)
        self.compiled = True
        return self

    def unfuse_projections(self) -> VideoDiT:
        """Undo :meth:`fuse_projections` (e.g. before training). Returns self."""
        for block in self.blocks:
            block.attn1.unfuse_projections()
            block.attn2.unfuse_projections()
        return self

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(
        cls, folder: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> VideoDiT:
        """Load a kinema, diffusers (``WanTransformer3DModel``) or original Wan folder."""
        from kinema.io.checkpoint import load_dit

        return load_dit(folder, device, dtype)

    def save_pretrained(self, folder: str, dtype: torch.dtype | None = None) -> None:
        """Write kinema's component folder: ``config.json`` + ``model.safetensors``."""
        from kinema.io.checkpoint import save_component

        save_component(self, folder, dtype)
