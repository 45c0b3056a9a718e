"""The causal 3D VAE of Wan 2.1 (diffusers ``AutoencoderKLWan``): 8x spatial, 4x temporal.

Every convolution is causal in time: frame ``t`` of the output sees input frames ``<= t`` only.
Video is encoded chunk by chunk (first chunk 1 frame, then ``temporal_factor`` frames each) and
decoded one latent frame at a time. Between chunks each causal layer needs a few of its most
recent input frames; that context is a :class:`CausalCache`, passed in and returned explicitly,
so memory stays flat in the video length and no module holds state.

Module and parameter names equal diffusers' ``AutoencoderKLWan`` state-dict keys, so a diffusers
``vae/diffusion_pytorch_model.safetensors`` loads with ``load_state_dict(strict=True)``.

Convention inside this file: a *cached block* has an int ``cache_slots`` (how many cache entries
it owns, a structural constant) and ``forward(x, cache) -> (x, new_cache)``, where ``cache`` is
the block's own slice of entries (``None`` before the first chunk).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kinema.configs import VAEConfig, from_dict

CACHE_FRAMES = 2  # input frames a 3-tap causal conv keeps from the previous chunk
Slots = list[Tensor | None]  # one cache entry per causal layer, in execution order
# The causal cache's dtype when kinema's pipeline decodes, per VAE dtype: half the cache's
# memory for fp32 VAEs; >= 80 dB PSNR against the exact decode (tests/test_vae.py).
LEAN_CACHE = {torch.float32: torch.float16}


# ---------------------------------------------------------------------------------------------
# Leaf modules
# ---------------------------------------------------------------------------------------------


ONEDNN = torch.backends.mkldnn.is_available()  # CPU builds without oneDNN keep F.conv3d


class CausalConv3d(nn.Conv3d):
    """Conv3d padded on the past side only in time: with zeros, or with cached past frames.

    ``padding=(pt, ph, pw)`` pads ``2 * pt`` frames before the input and ``ph``/``pw`` on both
    spatial sides, so a kernel of ``2 * pt + 1`` frames never looks at the future.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.past_frames = 2 * pt
        self.spatial_padding = (0, ph, pw)

    def forward(self, x: Tensor, past: Tensor | None = None, padded: bool = False) -> Tensor:
        """(B, C, T, H, W), past (B, C, P <= past_frames, H, W) -> (B, C', T', H', W').
        ``padded``: ``x`` already starts with its ``past_frames`` frames of context (as
        :func:`norm_silu_padded` writes it), so no ``past`` is added."""
        return self.run_padded(x if padded else self.pad_time(x, past))

    def pad_time(self, x: Tensor, past: Tensor | None) -> Tensor:
        """[zeros, past, x] in time, ``past_frames`` frames before ``x``: the conv's input.
        (B, C, T, H, W) -> (B, C, past_frames + T, H, W)."""
        if self.past_frames == 0:
            return x
        missing = self.past_frames
        if past is not None:
            x = torch.cat([past.to(x.device, x.dtype), x], dim=2)
            missing -= past.shape[2]
        return F.pad(x, (0, 0, 0, 0, missing, 0)) if missing else x

    def run_padded(self, x: Tensor) -> Tensor:
        """The conv on an input already padded in time (:meth:`pad_time`); the spatial zeros
        are the conv's own padding (no padded copy). (B, C, T, H, W) -> (B, C', T', H', W')."""
        if x.shape[2] == self.kernel_size[0] and self.stride[0] == 1:
            return self._one_frame(x)
        if (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and ONEDNN
            and not torch.is_grad_enabled()
        ):
            return self._onednn(x)
        return F.conv3d(
            x, self.weight, self.bias, self.stride, self.spatial_padding, self.dilation,
            self.groups,
        )  # fmt: skip

    def _onednn(self, x: Tensor) -> Tensor:
        """oneDNN's 3D conv, called directly: for these shapes this CPU build's ``F.conv3d``
        takes its im2col kernel, 2-5x slower (same values up to float rounding; inference only,
        as the call has no autograd here). (B, C, T, H, W) -> (B, C', T', H', W')."""
        return torch.ops.aten.mkldnn_convolution(
            x.contiguous(), self.weight, self.bias, list(self.spatial_padding), list(self.stride),
            list(self.dilation), self.groups,
        )  # fmt: skip

    def _one_frame(self, x: Tensor) -> Tensor:
        """The conv when it makes one output frame: a 2D conv over the kernel's frames stacked
        into channels (the weight's (C, kt) axes are already adjacent), which CPUs run several
        times faster than a 3D conv. (B, C, kt, H, W) -> (B, C', 1, H', W')."""
        b, c, kt, h, w = x.shape
        weight = self.weight.flatten(1, 2)  # (C', C * kt, kh, kw)
        stacked = x.reshape(b, c * kt, h, w)  # (B, C * kt, H, W)
        pad = self.spatial_padding[1:]
        y = F.conv2d(stacked, weight, self.bias, self.stride[1:], pad, self.dilation[1:])
        return y.unsqueeze(2)  # (B, C', 1, H', W')


def newest_frames(x: Tensor, past: Tensor | None, n: int = CACHE_FRAMES) -> Tensor:
    """The last ``n`` frames of ``x``; when ``x`` is shorter, topped up with the newest of ``past``.

    x (B, C, T, H, W) -> (B, C, min(n, T + 1), H, W); a copy (the cache keeps no big views) in
    the dtype of ``past`` (see :func:`compact`), or ``x``'s own where that would overflow.
    """
    tail = x[:, :, -n:]
    tail = compact(tail, past.dtype) if past is not None and past.dtype != x.dtype else tail.clone()
    if tail.shape[2] < n and past is not None:
        tail = torch.cat([past[:, :, -1:].to(tail.device, tail.dtype), tail], dim=2)
    return tail


def compact(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in the narrower float ``dtype`` (a copy), unless its values would overflow it."""
    low, high = torch.aminmax(t)  # no full-size temporary, unlike t.abs().amax()
    if torch.maximum(-low, high) >= torch.finfo(dtype).max:
        return t.clone()
    return t.to(dtype)


def compact_cache(cache: Sequence[Tensor | None], dtype: torch.dtype) -> Slots:
    """Every entry of ``cache`` in ``dtype`` where its values fit (see :func:`compact`)."""
    return [c if c is None else compact(c, dtype) for c in cache]


def cached_conv(conv: CausalConv3d, x: Tensor, past: Tensor | None) -> tuple[Tensor, Tensor]:
    """Run a causal conv on one chunk; return its output and the context for the next chunk."""
    return conv(x, past), newest_frames(x, past)


def norm_silu_padded(
    norm: RMSNorm, x: Tensor, past: Tensor | None, frames: int
) -> tuple[Tensor, Tensor]:
    """``silu(norm(x))`` written after ``frames`` frames of causal context (zeros, then
    ``past``) in one new tensor: a causal conv's time-padded input (see
    :meth:`CausalConv3d.pad_time`) with no separate activation for a ``cat`` to copy.
    (B, C, T, H, W) -> (B, C, frames + T, H, W), and the context for the next chunk."""
    b, c, t, h, w = x.shape
    buf = x.new_empty(b, c, frames + t, h, w)
    given = 0 if past is None else past.shape[2]
    buf[:, :, : frames - given].zero_()
    if given:
        buf[:, :, frames - given : frames].copy_(past)
    act = F.silu(norm(x, out=buf[:, :, frames:]), inplace=True)  # (B, C, T, H, W), a view
    return buf, newest_frames(act, past)


def norm_silu_conv(
    norm: RMSNorm, conv: CausalConv3d, x: Tensor, past: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``conv(silu(norm(x)))`` of one chunk, and the context for the next chunk."""
    if torch.is_grad_enabled():
        return cached_conv(conv, F.silu(norm(x)), past)
    buf, newest = norm_silu_padded(norm, x, past, conv.past_frames)
    return conv(buf, padded=True), newest


def per_frame(module: nn.Module, x: Tensor) -> Tensor:
    """Apply a 2D module to every frame: (B, C, T, H, W) -> (B, C', T, H', W')."""
    b, c, t, h, w = x.shape
    y = module(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))  # (B*T, C', H', W')
    return y.view(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)  # (B, C', T, H', W')


def take(cache: Sequence[Tensor | None], start: int, n: int) -> Slots:
    """Entries ``start .. start + n`` of ``cache``. When ``cache`` is a list they are also
    cleared there, so a caller that owns the list frees old context as the new one is made
    (the way diffusers overwrites its feature cache in place)."""
    own = list(cache[start : start + n])
    if isinstance(cache, list):
        cache[start : start + n] = [None] * n
    return own


def run_chain(
    blocks: Iterable[nn.Module], x: Tensor, cache: Sequence[Tensor | None], start: int = 0
) -> tuple[Tensor, Slots]:
    """Run cached blocks in order, each on its own ``cache_slots`` entries of ``cache`` (from
    ``start`` on; see :func:`take`).

    Returns ``(x, new_cache)`` with ``new_cache`` laid out like the entries used.
    """
    new: Slots = []
    for block in blocks:
        x, entries = block(x, take(cache, start + len(new), block.cache_slots))
        new.extend(entries)
    return x, new


def square_sum(x: Tensor, group: int = 32) -> Tensor:
    """Sum of squares over channels, ``group`` channels at a time so that the temporary is
    ``group / C`` of ``x`` (as fast as squaring all at once). (B, C, ...) -> (B, 1, ...)."""
    total = None
    for part in x.split(group, dim=1):
        sq = part.square().sum(1, keepdim=True)
        total = sq if total is None else total.add_(sq)
    return total  # type: ignore[return-value]


class RMSNorm(nn.Module):
    """RMS norm over channels (dim 1) with a learned per-channel gain, no bias.

    ``x / ||x||_2 * sqrt(C) * gamma``; half-precision inputs are normalised in float32.
    gamma has shape (C, 1, 1) for images (``spatial_dims=2``) or (C, 1, 1, 1) for video.
    """

    def __init__(self, dim: int, spatial_dims: int = 3) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * spatial_dims)))

    def forward(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """(B, C, ...) -> same shape; written into ``out`` (x's shape and dtype) when given."""
        y = x.float() if x.element_size() < 4 else x
        # x / max(||x||, 1e-12) as F.normalize, but one fused pass over a channel-strided
        # tensor is several times faster on CPU than F.normalize's vector norm over dim 1
        inv = square_sum(y).clamp_min_(1e-24).rsqrt_()  # (B, 1, ...)
        if out is None:
            out = (y * inv).to(x.dtype)  # the one full-size temporary
        else:
            torch.mul(y, inv, out=out)
        return out.mul_(self.scale * self.gamma)


class Upsample2x(nn.Module):
    """Nearest-exact 2x spatial upsampling, computed in float32: (N, C, H, W) -> (N, C, 2H, 2W)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    """Spatial 2x down/up sampling, optionally with 2x causal temporal down/up sampling.

    Modes: ``downsample2d``, ``downsample3d``, ``upsample2d``, ``upsample3d``. Upsampling halves
    the channels (``dim -> dim // 2``), as in Wan 2.1's decoder.
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.cache_slots = 1 if mode.endswith("3d") else 0
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        elif mode.startswith("downsample"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, 2))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: Sequence[Tensor | None]) -> tuple[Tensor, Slots]:
        """(B, C, T, H, W) -> (B, C', T', H*s, W*s) with s = 2 (up) or 1/2 (down)."""
        new: Slots = []
        if self.mode == "upsample3d":
            x, past = self._double_time(x, cache[0])
            new = [past]
        x = per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x, past = self._halve_time(x, cache[0])
            new = [past]
        return x, new

    def _double_time(self, x: Tensor, past: Tensor | None) -> tuple[Tensor, Tensor]:
        """(B, C, T, H, W) -> (B, C, 2T, H, W), but the video's very first frame stays one
        (B, C, 1 + 2(T - 1), H, W for a first chunk, ``past`` None).

        Each frame becomes two by a causal conv to 2C channels, split and interleaved in time.
        After the first frame the context starts as a zero frame (diffusers' ``"Rep"``): the
        first frame never feeds the doubling.
        """
        if past is None:
            first, x, past = x[:, :, :1], x[:, :, 1:], torch.zeros_like(x[:, :, :1])
            if x.shape[2] == 0:
                return first, past
            doubled, past = self._double_time(x, past)
            return torch.cat([first, doubled], dim=2), past
        y = self.time_conv(x, past)  # (B, 2C, T, H, W)
        b, c2, t, h, w = y.shape
        y = y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5)  # (B, C, T, 2, H, W)
        return y.reshape(b, c2 // 2, 2 * t, h, w), newest_frames(x, past)

    def _halve_time(self, x: Tensor, past: Tensor | None) -> tuple[Tensor, Tensor]:
        """(B, C, T, H, W) -> (B, C, T // 2, H, W) by a stride-2 conv over [last past frame, x].

        The video's very first frame passes through unchanged and is the context of the next
        two (a first chunk, ``past`` None: (B, C, 1 + (T - 1) // 2, H, W)).
        """
        newest = x[:, :, -1:].clone()
        if past is None:
            if x.shape[2] == 1:
                return x, newest
            return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2), newest
        return self.time_conv(torch.cat([past.to(x.device), x], dim=2)), newest


class ResidualBlock(nn.Module):
    """x + conv2(drop(silu(norm2(conv1(silu(norm1(x))))))), with a 1x1x1 conv shortcut when the
    channel count changes. Two causal 3x3x3 convs, so two cache slots."""

    cache_slots = 2

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()
        self.conv_shortcut = shortcut

    def forward(self, x: Tensor, cache: Sequence[Tensor | None]) -> tuple[Tensor, Slots]:
        """(B, C_in, T, H, W) -> (B, C_out, T, H, W)."""
        if torch.is_grad_enabled() or (self.training and self.dropout.p > 0):
            h, past1 = cached_conv(self.conv1, F.silu(self.norm1(x)), cache[0])
            h = self.dropout(F.silu(self.norm2(h)))
            h, past2 = cached_conv(self.conv2, h, cache[1])
            return h + self.conv_shortcut(x), [past1, past2]
        # Inference: the same values, each conv reading a buffer its input was written into
        # (see norm_silu_padded) and each activation freed once the next is made: at most
        # x + one padded input + one output alive, a third less than the lines above.
        old1, old2 = take(cache, 0, 2)  # the old context, freed once copied
        h, past1 = norm_silu_conv(self.norm1, self.conv1, x, old1)
        del old1
        buf, past2 = norm_silu_padded(self.norm2, h, old2, self.conv2.past_frames)
        del h, old2
        h = self.conv2(buf, padded=True)
        del buf
        return h.add_(self.conv_shortcut(x)), [past1, past2]


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no attention across time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, T, H, W) -> same shape."""
        b, c, t, h, w = x.shape
        y = self.norm(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))  # (B*T, C, H, W)
        qkv = self.to_qkv(y).flatten(2).transpose(1, 2).unsqueeze(1)  # (B*T, 1, H*W, 3C)
        q, k, v = qkv.chunk(3, dim=-1)  # each (B*T, 1, H*W, C)
        y = F.scaled_dot_product_attention(q, k, v)  # (B*T, 1, H*W, C)
        y = y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, H, W)
        y = self.proj(y).view(b, t, c, h, w).permute(0, 2, 1, 3, 4)  # (B, C, T, H, W)
        return x + y


class MidBlock(nn.Module):
    """Residual block, frame-wise attention, residual block (at the lowest resolution)."""

    cache_slots = 2 * ResidualBlock.cache_slots

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout) for _ in range(2)])

    def forward(self, x: Tensor, cache: Sequence[Tensor | None]) -> tuple[Tensor, Slots]:
        """(B, C, T, H, W) -> same shape."""
        x, first = self.resnets[0](x, cache[:2])
        x, second = self.resnets[1](self.attentions[0](x), cache[2:])
        return x, first + second


class UpBlock(nn.Module):
    """``num_res_blocks + 1`` residual blocks, then an optional :class:`Resample` upsampler."""

    def __init__(
        self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float, mode: str | None
    ) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList(
            ResidualBlock(i, o, dropout) for i, o in zip(dims[:-1], dims[1:], strict=True)
        )
        self.upsamplers = nn.ModuleList([Resample(out_dim, mode)]) if mode else None
        self.cache_slots = sum(m.cache_slots for m in self.blocks())

    def blocks(self) -> list[nn.Module]:
        """The cached blocks, in order: residual blocks, then the upsampler if any."""
        return [*self.resnets, *(self.upsamplers or [])]

    def forward(self, x: Tensor, cache: Sequence[Tensor | None]) -> tuple[Tensor, Slots]:
        """(B, C_in, T, H, W) -> (B, C_out or C_out // 2, T or 2T, H or 2H, W or 2W)."""
        return run_chain(self.blocks(), x, cache)


# ---------------------------------------------------------------------------------------------
# Encoder and decoder
# ---------------------------------------------------------------------------------------------


class Encoder3d(nn.Module):
    """Video (B, 3, T, H, W) -> posterior moments (B, 2 * z_dim, T', H / 8, W / 8).

    conv_in; per stage ``num_res_blocks`` residual blocks then a downsampler (all but the last
    stage; temporal too where ``temporal_downsample`` says so); mid block; RMS norm, SiLU,
    conv_out. ``down_blocks`` is one flat list, as in diffusers.
    """

    def __init__(self, config: VAEConfig, in_channels: int = 3) -> None:
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        self.conv_in = CausalConv3d(in_channels, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        last = len(config.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for j in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim if j == 0 else out_dim, out_dim, config.dropout))
            if i != last:
                temporal = config.temporal_downsample[i]
                blocks.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1], config.dropout)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * config.z_dim, 3, padding=1)
        self.cache_slots = 2 + sum(b.cache_slots for b in (*self.down_blocks, self.mid_block))
        halves_time = [i for i, b in enumerate(blocks) if getattr(b, "mode", "") == "downsample3d"]
        self.early_end = halves_time[0] if halves_time else len(blocks)

    def forward(
        self, x: Tensor, cache: Sequence[Tensor | None], piece: int | None = None
    ) -> tuple[Tensor, Slots]:
        """One chunk (B, 3, T, H, W) -> (B, 2 * z_dim, T', H / 8, W / 8) and its new cache.

        The stages before the first temporal downsampler (the widest, at full resolution) run
        ``piece`` input frames at a time (None: the whole chunk at once): every layer there is
        causal in time or per frame, so the result is the same while their activations shrink
        by T / piece (as in :meth:`Decoder3d.forward`)."""
        past_in = take(cache, 0, 1)[0]
        n_early = sum(b.cache_slots for b in self.down_blocks[: self.early_end])
        early = take(cache, 1, n_early)
        rest = take(cache, 1 + n_early, len(cache) - 2 - n_early)
        past_out = take(cache, len(cache) - 1, 1)[0]
        outs = []
        for part in [x] if piece is None else x.split(piece, dim=2):
            y, past_in = cached_conv(self.conv_in, part, past_in)
            y, early = run_chain(self.down_blocks[: self.early_end], y, early)
            outs.append(y)
        x = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        del outs
        x, rest = run_chain([*self.down_blocks[self.early_end :], self.mid_block], x, rest)
        x, past_out = norm_silu_conv(self.norm_out, self.conv_out, x, past_out)
        return x, [past_in, *early, *rest, past_out]


class Decoder3d(nn.Module):
    """Latents (B, z_dim, F, h, w) -> video (B, 3, T, 8h, 8w), unclamped.

    conv_in; mid block; per stage an :class:`UpBlock` (the reverse of the encoder's stages, one
    more residual block each, upsampling all but the last); RMS norm, SiLU, conv_out.
    """

    def __init__(self, config: VAEConfig, out_channels: int = 3) -> None:
        super().__init__()
        mult = config.dim_mult
        dims = [config.base_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_upsample = config.temporal_downsample[::-1]
        self.conv_in = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], config.dropout)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            in_dim = in_dim // 2 if i > 0 else in_dim  # the previous upsampler halved channels
            mode = None
            if i != len(mult) - 1:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(in_dim, out_dim, config.num_res_blocks, config.dropout, mode))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], out_channels, 3, padding=1)
        self.cache_slots = 2 + sum(b.cache_slots for b in (self.mid_block, *self.up_blocks))
        upsamples_time = [i for i, m in enumerate(temporal_upsample) if m and i < len(blocks) - 1]
        self.late_start = upsamples_time[-1] + 1 if upsamples_time else 0

    def forward(
        self, x: Tensor, cache: Sequence[Tensor | None], piece: int | None = 1
    ) -> tuple[Tensor, Slots]:
        """One chunk (B, z_dim, F, h, w) -> (B, 3, T, 8h, 8w) and its new cache.

        The stages after the last temporal upsampler (the widest, at full resolution) run
        ``piece`` output frames at a time (None: the whole chunk at once). Every layer there is
        causal in time or per frame, so the result is the same while their activations shrink
        by T / piece (4x for Wan's 4-frame chunks).
        """
        x, past_in = cached_conv(self.conv_in, x, take(cache, 0, 1)[0])
        early = [self.mid_block, *self.up_blocks[: self.late_start]]
        n_early = sum(b.cache_slots for b in early)
        x, middle = run_chain(early, x, cache, start=1)
        late = take(cache, 1 + n_early, len(cache) - 2 - n_early)
        past_out = take(cache, len(cache) - 1, 1)[0]
        # the late blocks' own blocks in one chain: no up block holds its input meanwhile
        late_chain = [b for up in self.up_blocks[self.late_start :] for b in up.blocks()]
        outs = []
        for part in [x] if piece is None else x.split(piece, dim=2):
            y, late = run_chain(late_chain, part, late)
            y, past_out = norm_silu_conv(self.norm_out, self.conv_out, y, past_out)
            outs.append(y)
        return torch.cat(outs, dim=2), [past_in, *middle, *late, past_out]


# ---------------------------------------------------------------------------------------------
# Explicit state, tiling, and the VAE
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CausalCache:
    """Temporal context carried from one chunk to the next.

    ``frames[i]`` holds the newest input frames (B, C_i, <= 2, H_i, W_i) of the i-th causal layer,
    in execution order; an encoder cache and a decoder cache have different lengths.
    """

    frames: tuple[Tensor | None, ...]


@dataclass(frozen=True)
class TileSpec:
    """Spatial tiling for large frames: square tiles of ``size`` pixels overlapping by
    ``overlap`` pixels, blended linearly across the overlap. Both must be multiples of the
    VAE's spatial factor (8), with ``0 <= overlap < size``."""

    size: int = 256
    overlap: int = 64

    @property
    def stride(self) -> int:
        return self.size - self.overlap

    def __post_init__(self) -> None:
        if self.size <= 0 or not 0 <= self.overlap < self.size:
            raise ValueError(
                f"TileSpec needs size > 0 and 0 <= overlap < size, got size={self.size}, "
                f"overlap={self.overlap}"
            )


def _blend(prev: Tensor, cur: Tensor, extent: int, dim: int) -> Tensor:
    """Cross-fade the first ``extent`` rows of ``cur`` along ``dim`` with the last rows of
    ``prev``: weight of ``cur`` rises linearly 0, 1/e, ..., (e-1)/e (as diffusers' blend_v/h)."""
    e = min(prev.shape[dim], cur.shape[dim], extent)
    if e <= 0:
        return cur
    shape = [1] * cur.ndim
    shape[dim] = e
    w = (torch.arange(e, device=cur.device, dtype=torch.float64) / e).to(cur.dtype).view(shape)
    head = prev.narrow(dim, prev.shape[dim] - e, e) * (1 - w) + cur.narrow(dim, 0, e) * w
    return torch.cat([head, cur.narrow(dim, e, cur.shape[dim] - e)], dim=dim)


def tiled_apply(
    fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, stride: int, scale: float
) -> Tensor:
    """Apply ``fn`` to overlapping spatial tiles of ``x`` and blend the results.

    x (B, C, T, H, W); tiles of ``tile`` x ``tile`` start every ``stride`` rows/columns; ``fn``
    maps a tile to (B, C', T', h * scale, w * scale). Each output tile is blended with the
    (already blended) tile above and to its left, then cropped to ``stride * scale``.
    Returns (B, C', T', H * scale, W * scale). A frame that fits one tile is not split
    (as in diffusers).
    """
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        return fn(x)
    out_tile, keep = round(tile * scale), round(stride * scale)
    rows, prev_row = [], []
    for i in range(0, height, stride):
        row: list[Tensor] = []
        for j in range(0, width, stride):
            out = fn(x[..., i : i + tile, j : j + tile])
            if prev_row:
                out = _blend(prev_row[len(row)], out, out_tile - keep, dim=-2)
            if row:
                out = _blend(row[-1], out, out_tile - keep, dim=-1)
            row.append(out)
        rows.append(torch.cat([t[..., :keep, :keep] for t in row], dim=-1))
        prev_row = row
    out = torch.cat(rows, dim=-2)
    return out[..., : round(height * scale), : round(width * scale)]


def _check_video(video: Tensor, t_factor: int, s_factor: int) -> None:
    """Raise ValueError unless video is (B, 3, 1 + t_factor*k, H, W), H and W multiples of s."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be (B, 3, T, H, W), got shape {tuple(video.shape)}")
    t, h, w = video.shape[2:]
    if (t - 1) % t_factor:
        lower = 1 + (t - 1) // t_factor * t_factor
        raise ValueError(
            f"video frame count must be 1 + {t_factor}k, got T={t} "
            f"(nearest valid: {lower} or {lower + t_factor})"
        )
    if h % s_factor or w % s_factor or h == 0 or w == 0:
        raise ValueError(
            f"video height and width must be positive multiples of {s_factor}, got H={h}, W={w}"
        )


def _check_tile(tile: TileSpec, s_factor: int) -> None:
    if tile.size % s_factor or tile.overlap % s_factor:
        raise ValueError(
            f"tile size and overlap must be multiples of {s_factor} pixels, got "
            f"size={tile.size}, overlap={tile.overlap}"
        )


class CausalVAE(nn.Module):
    """The Wan 2.1 causal video VAE (same weights and outputs as diffusers ``AutoencoderKLWan``).

    ``encode``: video (B, 3, 1 + 4k, H, W) in [-1, 1] -> posterior mean (B, z, 1 + k, H/8, W/8).
    ``decode``: latents (B, z, F, h, w) -> video (B, 3, 1 + 4(F - 1), 8h, 8w) in [-1, 1].
    Latents are unnormalised; :meth:`normalize` maps them to what the DiT sees.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        if config.attn_scales:
            raise ValueError(
                f"attn_scales must be empty (Wan 2.1 uses none, diffusers' decoder ignores "
                f"them), got {config.attn_scales}"
            )
        self.config = config
        z = config.z_dim
        self.encoder = Encoder3d(config)
        self.quant_conv = CausalConv3d(2 * z, 2 * z, 1)
        self.post_quant_conv = CausalConv3d(z, z, 1)
        self.decoder = Decoder3d(config)

    # --- explicit-state chunk steps ------------------------------------------------------

    def _start(self, cache: CausalCache | None, slots: int, what: str) -> Slots:
        """The cache entries to feed a chunk: all None for a first chunk."""
        if cache is None:
            return [None] * slots
        if len(cache.frames) != slots:
            raise ValueError(
                f"{what} cache must have {slots} entries, got {len(cache.frames)} "
                "(an encoder cache passed to the decoder, or the reverse?)"
            )
        return list(cache.frames)

    def encode_chunk(
        self, x: Tensor, cache: CausalCache | None = None, piece: int | None = 1
    ) -> tuple[Tensor, CausalCache]:
        """Encode one chunk: the first (``cache=None``) must be 1 + ``temporal_factor`` k
        frames (Wan's is 1), later ones a multiple of ``temporal_factor`` frames.
        (B, 3, t, H, W) -> moments (B, 2z, t', H/8, W/8) (mean then log-variance, unclamped),
        t' = 1 + k for the first chunk else t / temporal_factor. ``piece``: input frames per
        pass through the full-resolution stages (see :meth:`Encoder3d.forward`)."""
        tf, t = self.config.temporal_factor, x.shape[2]
        if (cache is None and (t - 1) % tf) or (cache is not None and (t == 0 or t % tf)):
            need = f"1 + {tf} k frames" if cache is None else f"a positive multiple of {tf} frames"
            raise ValueError(f"this encode chunk must have {need}, got {t}")
        slots = self._start(cache, self.encoder.cache_slots, "encoder")
        h, frames = self.encoder(x, slots, piece)
        return self.quant_conv(h), CausalCache(tuple(frames))

    def decode_chunk(
        self, z: Tensor, cache: CausalCache | None = None, clamp: bool = True, piece: int | None = 1
    ) -> tuple[Tensor, CausalCache]:
        """Decode latent frames: (B, z, f, h, w) -> (B, 3, t, 8h, 8w) clamped to [-1, 1]
        (unless ``clamp`` is False, as training wants), t = 1 + ``temporal_factor`` (f - 1) for
        the first chunk (``cache=None``; Wan's is 1 frame) else ``temporal_factor * f``.
        ``piece``: output frames per pass through the full-resolution stages (see
        :meth:`Decoder3d.forward`)."""
        slots = self._start(cache, self.decoder.cache_slots, "decoder")
        x, frames = self._decode_owned(z, slots, clamp, piece)
        return x, CausalCache(tuple(frames))

    def _decode_owned(
        self, z: Tensor, slots: Slots, clamp: bool, piece: int | None
    ) -> tuple[Tensor, Slots]:
        """:meth:`decode_chunk` on a cache list the caller hands over (emptied as it is used)."""
        x, frames = self.decoder(self.post_quant_conv(z), slots, piece)
        return (x.clamp(-1.0, 1.0) if clamp else x), frames

    # --- whole videos ----------------------------------------------------------------------

    def _moments(
        self, video: Tensor, whole: bool = False, cache_dtype: torch.dtype | None = None
    ) -> Tensor:
        """(B, 3, 1 + 4k, H, W) -> (B, 2z, 1 + k, H/8, W/8), chunk by chunk (``whole``: in one;
        ``cache_dtype``: as in :meth:`_frames`)."""
        if whole:
            return self.encode_chunk(video, piece=None)[0]
        tf, out = self.config.temporal_factor, []
        cache: Slots = [None] * self.encoder.cache_slots  # owned: emptied as it is used
        for start in [0, *range(1, video.shape[2], tf)]:
            end = 1 if start == 0 else start + tf
            h, cache = self.encoder(video[:, :, start:end], cache, 1)
            if start == 0 and cache_dtype is not None:
                cache = compact_cache(cache, cache_dtype)
            out.append(self.quant_conv(h))
        return torch.cat(out, dim=2)

    def _frames(
        self, latent: Tensor, clamp: bool = True, piece: int | None = 1,
        cache_dtype: torch.dtype | None = None, whole: bool = False,
    ) -> Tensor:  # fmt: skip
        """(B, z, F, h, w) -> (B, 3, 1 + 4(F - 1), 8h, 8w), one latent frame at a time, written
        into one preallocated output (``whole``: all in one pass). ``cache_dtype``: the causal
        cache is kept in it from the first chunk on (each entry where its values fit, see
        :func:`compact`)."""
        cache: Slots = [None] * self.decoder.cache_slots
        if whole:
            return self._decode_owned(latent, cache, clamp, piece)[0]
        out, start = None, 0
        for f in range(latent.shape[2]):
            x, cache = self._decode_owned(latent[:, :, f : f + 1], cache, clamp, piece)
            if f == 0 and cache_dtype is not None:
                cache = compact_cache(cache, cache_dtype)
            if out is None:
                frames = 1 + self.config.temporal_factor * (latent.shape[2] - 1)
                out = x.new_empty(*x.shape[:2], frames, *x.shape[3:])  # (B, 3, T, H, W)
            out[:, :, start : start + x.shape[2]] = x
            start += x.shape[2]
        return out  # type: ignore[return-value]

    def encode_posterior(
        self, video: Tensor, tile: TileSpec | None = None, whole: bool = False,
        cache_dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Video (B, 3, 1 + 4k, H, W) in [-1, 1] -> (mean, logvar), each (B, z, 1 + k, H/8, W/8);
        logvar clamped to [-30, 20] as in diffusers' DiagonalGaussianDistribution.
        ``whole``: the clip in one pass instead of chunk by chunk (the same result; fewer,
        larger kernels for more activation memory, what training wants). ``cache_dtype``: the
        causal cache between chunks in that dtype, as :meth:`decode` keeps it."""
        s = self.config.spatial_factor
        _check_video(video, self.config.temporal_factor, s)
        run = lambda v: self._moments(v, whole, cache_dtype)
        if tile is None:
            moments = run(video)
        else:
            _check_tile(tile, s)
            moments = tiled_apply(run, video, tile.size, tile.stride, 1 / s)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(
        self, video: Tensor, tile: TileSpec | None = None, cache_dtype: torch.dtype | None = None
    ) -> Tensor:
        """Video (B, 3, 1 + 4k, H, W) in [-1, 1] -> posterior mean (B, z, 1 + k, H/8, W/8)."""
        return self.encode_posterior(video, tile, cache_dtype=cache_dtype)[0]

    @staticmethod
    def sample(mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A draw from the diagonal Gaussian posterior: mean + exp(logvar / 2) * eps."""
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * eps

    def decode(
        self,
        latent: Tensor,
        tile: TileSpec | None = None,
        clamp: bool = True,
        split_time: bool = True,
        cache_dtype: torch.dtype | None = None,
        piece: int | None = None,
        whole: bool = False,
    ) -> Tensor:
        """Latents (B, z, F, h, w), unnormalised -> video (B, 3, 1 + 4(F - 1), 8h, 8w) in
        [-1, 1]. With ``tile`` (in output pixels), decodes overlapping tiles and blends them.
        ``clamp=False`` keeps values outside [-1, 1] (training needs their gradient).
        ``split_time`` (default): the full-resolution stages run one output frame at a time --
        same result, about a quarter of their activation memory. ``cache_dtype`` (e.g.
        ``torch.float16`` for an fp32 VAE): the causal cache between chunks is kept in it, half
        the cache's memory for a rounding of the cached activations (entries whose values
        would overflow it stay as they are). ``piece`` (overrides ``split_time``): output
        frames per pass through the full-resolution stages (1 = ``split_time``; the temporal
        factor = the whole chunk): fewer, larger kernels for more activation memory. ``whole``:
        all latent frames in one pass instead of one at a time (the same result; training,
        whose autograd keeps every activation anyway, wants it with ``split_time=False``)."""
        if latent.ndim != 5 or latent.shape[1] != self.config.z_dim or latent.shape[2] < 1:
            raise ValueError(
                f"latent must be (B, {self.config.z_dim}, F >= 1, h, w), "
                f"got shape {tuple(latent.shape)}"
            )
        if piece is not None and piece < 1:
            raise ValueError(f"piece must be >= 1 output frames, got {piece}")
        piece = piece or (1 if split_time else None)
        frames = lambda z: self._frames(z, clamp, piece, cache_dtype, whole)
        if tile is None:
            return frames(latent)
        s = self.config.spatial_factor
        _check_tile(tile, s)
        return tiled_apply(frames, latent, tile.size // s, tile.stride // s, s)

    # --- loading and saving -----------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, source: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> CausalVAE:
        """Load a kinema or diffusers (``AutoencoderKLWan``) folder, or ``Wan2.1_VAE.pth``."""
        from kinema.io.checkpoint import load_vae

        return load_vae(source, device, dtype)

    def save_pretrained(self, folder: str, dtype: torch.dtype | None = None) -> None:
        """Write kinema's component folder: ``config.json`` + ``model.safetensors``."""
        from kinema.io.checkpoint import save_component

        save_component(self, folder, dtype)

    # --- latent normalisation ---------------------------------------------------------------

    def _stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel mean and std on z's device and dtype: (1, C, 1, 1, 1), or (1, C, F, 1, 1)
        when the first latent frame has statistics of its own."""
        kw: dict[str, Any] = {"device": z.device, "dtype": z.dtype}
        c = self.config
        mean = torch.tensor(c.latents_mean, **kw).view(1, -1, 1, 1, 1)
        std = torch.tensor(c.latents_std, **kw).view(1, -1, 1, 1, 1)
        if c.first_frame_mean is None or c.first_frame_std is None:
            return mean, std
        f = z.shape[2]
        mean, std = mean.repeat(1, 1, f, 1, 1), std.repeat(1, 1, f, 1, 1)  # (1, C, F, 1, 1)
        mean[:, :, 0] = torch.tensor(c.first_frame_mean, **kw).view(1, -1, 1, 1)
        std[:, :, 0] = torch.tensor(c.first_frame_std, **kw).view(1, -1, 1, 1)
        return mean, std

    def normalize(self, z: Tensor) -> Tensor:
        """(B, z, F, h, w) unnormalised, frame 0 the first of a clip -> (z - mean) / std per
        channel (and for frame 0 with its own statistics when the config has them)."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, z: Tensor) -> Tensor:
        """(B, z, F, h, w) normalised -> z * std + mean: the inverse of :meth:`normalize`."""
        mean, std = self._stats(z)
        return z * std + mean


# ---------------------------------------------------------------------------------------------
# diffusers config
# ---------------------------------------------------------------------------------------------

_DIFFUSERS_KEYS = {  # diffusers AutoencoderKLWan config key -> VAEConfig field
    "base_dim": "base_dim",
    "z_dim": "z_dim",
    "dim_mult": "dim_mult",
    "num_res_blocks": "num_res_blocks",
    "attn_scales": "attn_scales",
    "temperal_downsample": "temporal_downsample",
    "dropout": "dropout",
    "latents_mean": "latents_mean",
    "latents_std": "latents_std",
}


def _wan22_key_is_default(key: str, value: Any, d: dict[str, Any]) -> bool:
    """Whether a Wan 2.2-variant key holds its Wan 2.1 meaning (so it can be ignored)."""
    if key == "decoder_base_dim":
        return value is None or value == d.get("base_dim", 96)
    if key == "patch_size":
        return value in (None, 1)
    defaults = {"is_residual": False, "in_channels": 3, "out_channels": 3,
                "scale_factor_temporal": 4, "scale_factor_spatial": 8}  # fmt: skip
    return key in defaults and value == defaults[key] and type(value) is type(defaults[key])


def config_from_diffusers(d: dict[str, Any]) -> VAEConfig:
    """A :class:`VAEConfig` from a diffusers ``AutoencoderKLWan`` ``config.json`` dict.

    Metadata keys (``_class_name``, ``_diffusers_version``, any ``_*``) are ignored, and so are
    Wan 2.2 keys that hold their Wan 2.1 defaults; anything else unknown raises ValueError.
    """
    fields, refused = {}, []
    for key, value in d.items():
        if key in _DIFFUSERS_KEYS:
            fields[_DIFFUSERS_KEYS[key]] = value
        elif not key.startswith("_") and not _wan22_key_is_default(key, value, d):
            refused.append(f"{key}={value!r}")
    if refused:
        raise ValueError(
            f"unsupported AutoencoderKLWan config (kinema runs the Wan 2.1 layout only): "
            f"{', '.join(refused)}"
        )
    return from_dict(VAEConfig, fields)


__all__ = [
    "CausalVAE",
    "CausalCache",
    "TileSpec",
    "config_from_diffusers",
    "CausalConv3d",
    "RMSNorm",
    "Resample",
    "ResidualBlock",
    "AttentionBlock",
    "MidBlock",
    "UpBlock",
    "Encoder3d",
    "Decoder3d",
]
