"""Pure tensor functions shared by the models: linear layers, attention, 3D rotary embeddings,
timestep embeddings, patchify.

Attention goes through one function, :func:`attention`, whose backend can be swapped with
:func:`use_attention` (:func:`default_attention`: SDPA, or plain matmuls in bf16 on a CPU;
sequence-parallel backends plug in here). All tensors in the attention path use the
(B, S, H, D) layout: batch, sequence, heads, head channels.
"""

from __future__ import annotations

import contextlib
import functools
import math
import platform
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """An x86 Linux CPU's feature flags (/proc/cpuinfo); None where they cannot be read."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return frozenset(flags.split(":", 1)[1].split()) if flags else None


@functools.cache
def cpu_has_bf16() -> bool:
    """True when this CPU computes in bf16 natively (AVX512-BF16 or AMX, through oneDNN)."""
    return cpu_native(torch.bfloat16)


# The x86 flags of native half precision. oneDNN's own checks also say yes on a plain AVX-512
# CPU, where it emulates bf16 at a third of fp32's speed, so an x86 CPU's flags decide.
HALF_FLAGS = {
    torch.bfloat16: {"avx512_bf16", "amx_bf16"},
    torch.float16: {"avx512_fp16", "amx_fp16"},
}


def cpu_native(dtype: torch.dtype) -> bool:
    """Whether this CPU computes in ``dtype`` natively: fp32 always, bf16 with AVX512-BF16 or
    AMX, fp16 with AVX512-FP16 or AMX-FP16; elsewhere half precision is emulated, several times
    slower than fp32."""
    if dtype not in HALF_FLAGS:
        return True
    if (flags := cpu_flags()) is not None:
        return bool(HALF_FLAGS[dtype] & flags)
    onednn = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
              torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}[dtype]  # fmt: skip
    return bool(torch.backends.mkldnn.is_available() and onednn())


def onednn_runs() -> bool:
    """Whether oneDNN's matmul can run here: an x86 CPU and a torch build with oneDNN."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return torch.backends.mkldnn.is_available() and x86


def onednn_linears() -> bool:
    """Whether fp32 linears take oneDNN's matmul: on x86 CPUs with AVX-512, where torch's
    ``F.linear`` takes MKL's GEMM and oneDNN's was faster (0.94x a kinema-tiny forward); on an
    AVX2-only CPU oneDNN's was 1.21x slower (``benchmarks/onednn_linear.py``, both on "AMD
    EPYC" 2-core machines), so ``F.linear`` stays there, as on other CPUs (other BLAS
    libraries) and builds without oneDNN."""
    return onednn_runs() and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


ONEDNN = onednn_linears()


def linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, gelu: str | None = None
) -> Tensor:
    """x Wᵀ + b, then GELU when ``gelu`` names its form ("tanh" or "none", as ``F.gelu``'s
    ``approximate``). x (..., in), weight (out, in) -> (..., out).

    fp32 on an x86 CPU with AVX-512 (:func:`onednn_linears`) calls oneDNN's matmul directly,
    where this torch build's ``F.linear`` takes MKL's GEMM: 0.81-0.96x the time at
    kinema-tiny's shapes there (``benchmarks/onednn_linear.py``), the same values up to float
    rounding (~3e-6 at the DiT's FFN). At inference the bias and the GELU are fused into it
    (0.79-0.81x the FFN's linear + GELU); under torch.compile that kernel is an opaque custom
    op (Inductor would lower its own GEMM around MKL's). With autograd (training) it is
    :class:`OneDNNLinear`. In other dtypes, under autocast, on other devices and on CPUs
    without AVX-512 it is ``F.linear``.
    """
    onednn = (
        ONEDNN
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    )
    if onednn and not torch.is_grad_enabled():
        if torch.compiler.is_compiling():
            return onednn_linear(x, weight, bias, gelu or "")
        return _pointwise(x, weight, bias, gelu)
    if onednn and not torch.compiler.is_compiling():
        y = OneDNNLinear.apply(x, weight, bias)
    else:
        y = F.linear(x, weight, bias)
    return y if gelu is None else apply_gelu(y, gelu)


def _pointwise(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: str | None) -> Tensor:
    """oneDNN's fp32 matmul x Wᵀ (+ bias) (+ GELU of form ``gelu``), no autograd."""
    attr, form = ("none", "") if gelu is None else ("gelu", gelu)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], form)


class OneDNNLinear(torch.autograd.Function):
    """x Wᵀ + b by oneDNN's fp32 matmul, with autograd: the input's gradient g W by oneDNN too
    (0.84-1.00x MKL's time at kinema-tiny's training shapes), the weight's gᵀx by torch's
    matmul (oneDNN took 0.83-1.49x MKL's time there). x (..., in), weight (out, in) ->
    (..., out)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _pointwise(x, weight, bias, None)

    @staticmethod
    def setup_context(ctx: object, inputs: tuple, output: Tensor) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)  # type: ignore[attr-defined]
        ctx.has_bias = bias is not None  # type: ignore[attr-defined]

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        want_x, want_w, want_b = ctx.needs_input_grad  # type: ignore[attr-defined]
        rows = grad.reshape(-1, grad.shape[-1])  # (N, out)
        gx = gw = gb = None
        if want_x:  # (..., out) (out, in) -> (..., in)
            gx = _pointwise(grad.contiguous(), weight.t().contiguous(), None, None)
        if want_w:
            gw = rows.t() @ x.reshape(-1, x.shape[-1])  # (out, in)
        if want_b and ctx.has_bias:  # type: ignore[attr-defined]
            gb = rows.sum(0)
        return gx, gw, gb


@torch.library.custom_op("kinema::onednn_linear", mutates_args=())
def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: str) -> Tensor:
    """oneDNN's fp32 matmul (+ bias, + GELU of form ``gelu`` unless ""), as one custom op a
    compiled graph calls as it is. x (..., in), weight (out, in) -> (..., out)."""
    return _pointwise(x, weight, bias, gelu or None)


@onednn_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: str) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def apply_gelu(y: Tensor, form: str) -> Tensor:
    """GELU in the form ``F.gelu`` names ``approximate``: "tanh" (:func:`gelu_tanh`) or "none",
    of ``y``, a linear's fresh output, which fp32 CPU inference overwrites (:func:`gelu_tanh_`)."""
    if form != "tanh":
        return F.gelu(y, approximate=form)
    in_place = (
        y.device.type == "cpu"
        and y.dtype == torch.float32
        and y.is_contiguous()
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )
    return gelu_tanh_(y) if in_place else gelu_tanh(y)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and names) computed by :func:`linear`; ``gelu`` fuses
    the GELU that follows it."""

    def forward(self, x: Tensor, gelu: str | None = None) -> Tensor:
        return linear(x, self.weight, self.bias, gelu)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Torch's fused softmax attention: q (B, S, H, D), k/v (B, L, H, D) -> (B, S, H, D)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # (B, S, H, D)


# Attention weights (B·H·S·L) above which matmul_attention hands over to SDPA: 128 MiB in bf16.
MATMUL_ATTENTION_MAX = 2**26


def matmul_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / √D) v as two plain matmuls: q (B, S, H, D), k/v (B, L, H, D) -> (B, S, H, D).

    In bf16 on a CPU both matmuls run on oneDNN's bf16 kernels, which beat torch's CPU flash
    kernel at kinema-tiny's lengths (its bf16 training step and clip are the README's numbers);
    the softmax output is bf16, as flash attention casts it before its second matmul.
    It holds the (B, H, S, L) weights (for backward too), so past ``MATMUL_ATTENTION_MAX`` of
    them it is SDPA.
    """
    b, s, h, _ = q.shape
    if b * h * s * k.shape[1] > MATMUL_ATTENTION_MAX:
        return sdpa_attention(q, k, v)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S or L, D)
    weights = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, H, S, L)
    return (weights.softmax(dim=-1) @ v).transpose(1, 2)  # (B, S, H, D)


def default_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA, except on a CPU in bf16 (bf16 tensors, or under bf16 autocast), where
    :func:`matmul_attention` is faster. q (B, S, H, D), k/v (B, L, H, D) -> (B, S, H, D)."""
    autocast_bf16 = torch.is_autocast_enabled("cpu") and (
        torch.get_autocast_dtype("cpu") == torch.bfloat16
    )
    if q.device.type == "cpu" and (q.dtype == torch.bfloat16 or autocast_bf16):
        return matmul_attention(q, k, v)
    return sdpa_attention(q, k, v)


# The backend is a plain module global, not a ContextVar: torch.compile traces a global (and
# recompiles if it changes) but breaks the graph at every ContextVar.get(). It is process-wide;
# every distributed rank is its own process.
_ATTENTION: AttentionFn = default_attention


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The one attention call of every model. q (B, S, H, D), k/v (B, L, H, D) -> (B, S, H, D)."""
    return _ATTENTION(q, k, v)


@contextlib.contextmanager
def use_attention(fn: AttentionFn) -> Iterator[None]:
    """Run the enclosed code with ``fn`` as the attention backend (e.g. a sequence-parallel one)."""
    global _ATTENTION
    previous, _ATTENTION = _ATTENTION, fn
    try:
        yield
    finally:
        _ATTENTION = previous


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of one head given to the t, h and w axes, as Wan splits them (44/42/42 of 128)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_freqs_1d(dim: int, length: int, theta: float = 10000.0) -> Tensor:
    """Rotation angles (length, dim // 2) for positions 0..length-1 (computed in float64)."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim))
    return torch.outer(torch.arange(length, dtype=torch.float64), inv)


def rope_3d(
    grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0
) -> tuple[Tensor, Tensor]:
    """Cos and sin tables (F*H*W, 1, head_dim // 2) for a (F, H, W) grid of patches.

    The head's channel pairs are split across time, height and width (:func:`rope_split`);
    the token order is frames-major, then rows, then columns, as patchify flattens.
    """
    f, h, w = grid
    dt, dh, dw = rope_split(head_dim)
    ang_t = rope_freqs_1d(dt, f, theta)[:, None, None, :].expand(f, h, w, -1)
    ang_h = rope_freqs_1d(dh, h, theta)[None, :, None, :].expand(f, h, w, -1)
    ang_w = rope_freqs_1d(dw, w, theta)[None, None, :, :].expand(f, h, w, -1)
    angles = torch.cat([ang_t, ang_h, ang_w], dim=-1).reshape(f * h * w, 1, head_dim // 2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of x (B, S, H, D) by the angles in cos/sin (S, 1, D/2).

    Eager, each pair is one complex number times e^(i angle): one kernel, where the same
    product written on the pairs' strided halves takes six and ~15x the time on a CPU. Under
    torch.compile (whose Inductor does not fuse complex arithmetic) it is written out in reals.
    """
    dtype = torch.promote_types(x.dtype, cos.dtype)  # bf16 x rotates in float32, as cos is
    pairs = x.to(dtype).unflatten(-1, (-1, 2)).contiguous()  # (B, S, H, D/2, 2)
    if not torch.compiler.is_compiling():
        rotated = torch.view_as_complex(pairs) * torch.complex(cos.to(dtype), sin.to(dtype))
        return torch.view_as_real(rotated).flatten(-2).type_as(x)  # (B, S, H, D)
    x1, x2 = pairs.unbind(-1)  # (B, S, H, D/2) each
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.flatten(-2).type_as(x)  # (B, S, H, D)


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU, tanh approximation: 0.5 x (1 + tanh u), u = sqrt(2/pi) (x + 0.044715 x^3).

    Under torch.compile it is written x / (1 + exp(-2u)), the same function (0.5 (1 + tanh u)
    = sigmoid(2u)): Inductor's CPU exp costs a quarter of its tanh. Eager keeps the one-kernel
    ``F.gelu``.
    """
    if not torch.compiler.is_compiling():
        return F.gelu(x, approximate="tanh")
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)
    return x / (1 + torch.exp(-2 * u))


# Bytes of the scratch rows gelu_tanh_ works through at a time: about a core's L2 (256 KiB to 2
# MiB took the same time within a few per cent at kinema-tiny's and the small Wan shape's FFN).
GELU_CHUNK_BYTES = 2**19


def gelu_tanh_(y: Tensor) -> Tensor:
    """:func:`gelu_tanh` of a contiguous fp32 ``y`` in place (no autograd), as x sigmoid(2u):
    rows at a time through one small scratch tensor, five cheap passes over each chunk while
    it is in cache. On an AVX2 CPU, whose vectorised tanh is slow, the FFN's GELU took 0.4x the
    time of torch's tanh kernel and no new activation-sized tensor (whose first touch costs as
    much as a pass); within 1e-6 of ``F.gelu``. y (..., D) -> y."""
    rows = y.view(-1, y.shape[-1])  # (N, D)
    step = max(1, GELU_CHUNK_BYTES // (4 * rows.shape[1]))
    scratch = torch.empty(min(step, rows.shape[0]), rows.shape[1], device=y.device)
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step]
        two_u = torch.mul(chunk, chunk, out=scratch[: chunk.shape[0]])
        two_u.mul_(0.044715).add_(1).mul_(chunk).mul_(2 * math.sqrt(2 / math.pi))
        chunk.mul_(two_u.sigmoid_())
    return y


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (N, dim) of timesteps t (N,), as [cos | sin] (DDPM / Wan convention)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def unpatchify(x: Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> Tensor:
    """Tokens (B, F*H*W, pt*ph*pw*C) back to a latent video (B, C, F*pt, H*ph, W*pw)."""
    (f, h, w), (pt, ph, pw) = grid, patch
    x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, -1)  # (B, F, H, W, pt, ph, pw, C)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, F, pt, H, ph, W, pw)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C, F*pt, H*ph, W*pw)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """AdaLN modulation x * (1 + scale) + shift, per frame group, in one kernel (addcmul).

    x (B, S, D) with S = G * n tokens in G equal groups (G = 1: one timestep per sample;
    G = frames: one per latent frame); shift/scale (B, G, D).
    """
    g = shift.shape[1]
    x = x.unflatten(1, (g, -1))  # (B, G, S/G, D)
    return torch.addcmul(shift[:, :, None], x, 1 + scale[:, :, None]).flatten(1, 2)


def gated_add(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """The gated residual x + y * gate in one kernel (addcmul, which promotes a bf16 ``y``
    without a copy): x, y (B, S, D), a per-group gate (B, G, D), groups as in
    :func:`modulate` -> (B, S, D)."""
    g = gate.shape[1]
    grouped = x.unflatten(1, (g, -1)), y.unflatten(1, (g, -1))  # 2 x (B, G, S/G, D)
    return torch.addcmul(*grouped, gate[:, :, None]).flatten(1, 2)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float | None) -> Tensor:
    """x / sqrt(mean(x², last dim) + eps) * weight: ``F.rms_norm``, except fp32 inference,
    where it is three passes over x instead of six (one norm, two in-place products; torch's
    CPU kernel makes a new tensor at each of its steps), the same values within 2e-6.
    ``eps`` None: the dtype's machine epsilon, as ``F.rms_norm``. x (..., D) -> (..., D)."""
    d = x.shape[-1]
    if x.dtype != torch.float32 or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return F.rms_norm(x, (d,), weight, eps)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    inv = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(d).add_(eps).rsqrt_()
    out = torch.mul(x, inv)  # (..., D)
    return out if weight is None else out.mul_(weight)
