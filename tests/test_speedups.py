"""The lossless speed-ups give the plain paths' outputs: fused q/k/v projections, regional
torch.compile, and the VAE decode that runs its full-resolution stages frame by frame."""

from __future__ import annotations

import pytest
import torch

from kinema.configs import DiTConfig, VAEConfig
from kinema.models import ops
from kinema.models.dit import VideoDiT
from kinema.models.vae import CausalVAE

# kinema takes oneDNN's linear path where it is faster (ops.onednn_linears: AVX-512); these
# tests take it wherever it can run
needs_onednn = pytest.mark.skipif(not ops.onednn_runs(), reason="oneDNN runs on x86 CPUs only")


@pytest.fixture
def onednn(monkeypatch):
    """ops.linear takes oneDNN's path on this CPU, whatever ops.onednn_linears chose."""
    monkeypatch.setattr(ops, "ONEDNN", True)


DIT = DiTConfig(num_heads=3, head_dim=8, text_dim=12, freq_dim=16, ffn_dim=24, num_layers=2)
VAE = VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)  # fmt: skip


def dit_and_inputs():
    torch.manual_seed(0)
    dit = VideoDiT(DIT).eval()
    with torch.no_grad():  # non-trivial norms and biases so every fused weight matters
        for p in dit.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 4, 6, generator=g)
    return dit, (x, torch.tensor([3.0, 800.0]), torch.randn(2, 7, 12, generator=g))


def test_fused_projections_equal_the_separate_ones():
    dit, args = dit_and_inputs()
    keys = set(dit.state_dict())
    with torch.no_grad():
        plain = dit(*args)
        fused = dit.fuse_projections()(*args)
    assert (fused - plain).abs().max().item() <= 1e-5
    assert set(dit.state_dict()) == keys  # diffusers' to_q/to_k/to_v keys, nothing added
    assert "qkv_weight" in dict(dit.blocks[0].attn1.named_buffers())
    with torch.no_grad():
        again = dit.unfuse_projections()(*args)
    assert torch.equal(again, plain)
    assert not dict(dit.blocks[0].attn1.named_buffers())


def test_fused_weights_are_the_loaded_ones():
    """Fusing after load_state_dict picks up the new weights (state dict -> fuse order)."""
    dit, args = dit_and_inputs()
    other = VideoDiT(DIT).eval()
    other.load_state_dict(dit.state_dict())
    other.fuse_projections()
    with torch.no_grad():
        assert (other(*args) - dit(*args)).abs().max().item() <= 1e-5


def test_compiled_blocks_equal_eager():
    dit, args = dit_and_inputs()
    with torch.no_grad():
        eager = dit(*args)
        compiled = dit.fuse_projections().compile_blocks()(*args)
    assert (compiled - eager).abs().max().item() <= 1e-4


@pytest.mark.parametrize("onednn_linears", [False, pytest.param(True, marks=needs_onednn)])
def test_a_block_compiles_to_one_graph(onednn_linears, monkeypatch):
    """No graph break inside a block (one used to sit at every attention call): the whole
    block is one Inductor graph, so its elementwise work fuses around the GEMMs."""
    monkeypatch.setattr(ops, "ONEDNN", onednn_linears)
    dit, (x, t, ctx) = dit_and_inputs()
    e = dit.fuse_projections().embed(x, t, ctx)
    with torch.no_grad():
        explained = torch._dynamo.explain(dit.blocks[0])(e.tokens, e.context, e.mod, e.rope)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    # with oneDNN's linears every projection is its matmul, an opaque op in the graph
    assert explained.graphs[0].code.count("kinema.onednn_linear") == (7 if onednn_linears else 0)


def test_frame_by_frame_decode_equals_whole_chunks():
    torch.manual_seed(0)
    vae = CausalVAE(VAE).eval()
    z = torch.randn(1, 4, 3, 4, 5)
    with torch.no_grad():
        split = vae.decode(z)
        whole = vae.decode(z, split_time=False)
        head, cache = vae.decode_chunk(z[:, :, :1], piece=None)  # the public chunk API
        tail, _ = vae.decode_chunk(z[:, :, 1:2], cache, piece=None)
        tail2, _ = vae.decode_chunk(z[:, :, 1:2], cache, piece=1)  # cache not consumed
        passes = []
        hook = vae.decoder.conv_out.register_forward_hook(lambda m, a, o: passes.append(o.shape[2]))
        halves = vae.decode(z, piece=2)  # first chunk 1 frame, then 2 passes of 2
        hook.remove()
        with pytest.raises(ValueError, match="piece must be >= 1"):
            vae.decode(z, piece=0)
    assert split.shape == whole.shape == (1, 3, 9, 32, 40)
    assert (halves - whole).abs().max().item() <= 1e-5 and passes == [1, 2, 2, 2, 2]
    assert (split - whole).abs().max().item() <= 1e-5  # conv2d vs oneDNN conv3d rounding
    assert torch.equal(torch.cat([head, tail], 2), whole[:, :, :5])
    assert (tail2 - tail).abs().max().item() <= 1e-5


def test_load_compile_gives_the_same_video(tmp_path):
    """``load(..., compile=True)`` (``kinema generate --compile``): fused projections and
    compiled blocks, the same frames as the plain pipeline."""
    import numpy as np

    from kinema.loading import load
    from tests.serve_helpers import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny")
    plain = load(model, device="cpu").generate("a red circle moving right", seed=3)
    fast = load(model, device="cpu", compile=True)
    assert all(b._compiled_call_impl is not None for b in fast.dit.blocks)
    assert fast.dit.blocks[0].attn1._buffers.get("qkv_weight") is not None  # fused
    video = fast.generate("a red circle moving right", seed=3)
    diff = np.abs(video.frames.astype(int) - plain.frames.astype(int)).max()
    assert video.frames.shape == plain.frames.shape and diff <= 1


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "frames"),
    [(3, 1, 1, 4), (3, 1, 1, 9), ((3, 1, 1), (2, 1, 1), 0, 7), ((3, 3, 3), (1, 2, 2), 0, 6)],
)
def test_causal_conv_by_onednn_equals_conv3d(kernel, stride, padding, frames):
    """The inference path of CausalConv3d (oneDNN called directly on CPU) against F.conv3d."""
    from kinema.models.vae import CausalConv3d

    torch.manual_seed(0)
    conv = CausalConv3d(8, 16, kernel, stride=stride, padding=padding)
    x, past = torch.randn(2, 8, frames, 18, 18), torch.randn(2, 8, 2, 18, 18)
    taken, onednn = [], conv._onednn
    conv._onednn = lambda x: taken.append(x.shape) or onednn(x)  # the path under test
    with torch.no_grad():
        fast = conv(x, past if padding else None)
        full = torch.cat([past, x], 2) if padding else x
        pad = (1, 1, 1, 1, 0, 0) if padding else (0,) * 6  # the past frames are given
        exact = torch.nn.functional.conv3d(torch.nn.functional.pad(full, pad), conv.weight,
                                           conv.bias, conv.stride)  # fmt: skip
    assert taken and fast.shape == exact.shape and fast.shape[2] > 1
    torch.testing.assert_close(fast, exact, atol=1e-5, rtol=1e-5)
    grad = conv(x, past if padding else None)  # with autograd: the plain conv3d
    assert len(taken) == 1 and grad.requires_grad
    torch.testing.assert_close(grad.detach(), exact, atol=1e-6, rtol=1e-6)


def test_matmul_attention_equals_sdpa_and_hands_long_sequences_to_it(monkeypatch):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 20, 3, 8, generator=g)  # (B, S, H, D)
    kv = [torch.randn(2, length, 3, 8, generator=g) for length in (20, 20, 7, 7)]
    for k, v in (kv[:2], kv[2:]):  # self- and cross-attention shapes
        want = ops.sdpa_attention(q, k, v)
        got = ops.matmul_attention(q, k, v)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-5
    calls = []
    monkeypatch.setattr(ops, "sdpa_attention", lambda *a: calls.append(1) or want)
    monkeypatch.setattr(ops, "MATMUL_ATTENTION_MAX", 2 * 3 * 20 * 7 - 1)  # one weight too many
    assert ops.matmul_attention(q, *kv[2:]) is want and calls == [1]


def test_default_attention_is_matmul_attention_in_bf16_on_a_cpu_and_sdpa_elsewhere():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 20, 3, 8, generator=g) for _ in range(3))
    assert ops._ATTENTION is ops.default_attention
    assert torch.equal(ops.attention(q, k, v), ops.sdpa_attention(q, k, v))  # fp32: SDPA
    half = [t.bfloat16() for t in (q, k, v)]
    assert torch.equal(ops.attention(*half), ops.matmul_attention(*half))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 tensors under bf16 autocast
        got, want = ops.attention(q, k, v), ops.matmul_attention(q, k, v)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert (got.float() - ops.sdpa_attention(q, k, v)).abs().max().item() < 0.05


def test_qk_norm_is_torchs_rms_norm_with_the_inputs_dtype_under_bf16_autocast():
    """Under bf16 autocast the q/k norm gets bf16 input: its weight is cast to bf16 so torch
    takes the fused kernel (an fp32 weight takes a slower path and warns, once a process)."""
    import torch.nn.functional as F

    from kinema.models.dit import RMSNorm

    norm, plain = RMSNorm(64, eps=1e-6), torch.nn.RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        plain.weight.copy_(norm.weight)
    x = torch.randn(3, 50, 64)
    assert torch.equal(norm(x), plain(x))  # fp32: nn.RMSNorm exactly
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xb = F.linear(x, torch.eye(64))  # bf16, as a projection's output is
        got = norm(xb)
    want = F.rms_norm(xb, (64,), norm.weight.bfloat16(), 1e-6)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


@needs_onednn
@pytest.mark.parametrize("gelu", [None, "tanh", "none"])
def test_linear_by_onednn_equals_f_linear(gelu, monkeypatch, onednn):
    """ops.linear's inference path (oneDNN's matmul with the bias and GELU fused, on CPU fp32)
    against F.linear then F.gelu; with autograd on it is that plain path, gradients included."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    x = torch.randn(16, 2, 9, generator=g).permute(1, 2, 0)  # (2, 9, 16), not contiguous
    plain = F.linear(x, weight, bias)
    if gelu is not None:
        plain = F.gelu(plain, approximate=gelu)
    calls, onednn = [], torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise",
                        lambda *a: calls.append(a[3:]) or onednn(*a), raising=False)  # fmt: skip
    with torch.no_grad():
        fast = ops.linear(x, weight, bias, gelu)
        no_bias = ops.linear(x, weight)
    assert calls == [("none" if gelu is None else "gelu", [], gelu or ""), ("none", [], "")]
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(no_bias, F.linear(x, weight), atol=1e-5, rtol=1e-5)
    w = weight.clone().requires_grad_()
    out = ops.linear(x, w, bias, gelu)  # autograd on: OneDNNLinear, then the GELU
    out.sum().backward()
    assert len(calls) == 3 and calls[-1] == ("none", [], "") and w.grad is not None
    torch.testing.assert_close(out.detach(), plain, atol=1e-5, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("with_bias", [True, False])
def test_onednn_linear_gradients_equal_f_linears(with_bias, onednn):
    """Training through ops.linear (oneDNN forward and input gradient) gives F.linear's
    gradients for the input, the weight and the bias; a frozen weight gets none."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(7)
    x0, w0 = torch.randn(2, 9, 16, generator=g), torch.randn(24, 16, generator=g)
    b0 = torch.randn(24, generator=g) if with_bias else None
    upstream = torch.randn(2, 9, 24, generator=g)
    grads = []
    for fn in (ops.linear, F.linear):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        b = b0.clone().requires_grad_() if with_bias else None
        (fn(x, w, b) * upstream).sum().backward()
        grads.append([x.grad, w.grad] + ([b.grad] if with_bias else []))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    x = x0.clone().requires_grad_()
    (ops.linear(x, w0, b0) * upstream).sum().backward()  # frozen weight (a LoRA's base)
    torch.testing.assert_close(x.grad, grads[1][0], atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: F.linear, in bf16
        assert ops.linear(x0, w0, b0).dtype == torch.bfloat16


def test_inference_rms_norm_equals_torchs():
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(5)
    x, w = 3 * torch.randn(2, 40, 32, generator=g), torch.randn(32, generator=g)
    with torch.no_grad():
        for weight, eps in ((w, 1e-6), (None, None)):
            got, want = ops.rms_norm(x, weight, eps), F.rms_norm(x, (32,), weight, eps)
            assert got.shape == want.shape and (got - want).abs().max().item() < 2e-6
    assert torch.equal(ops.rms_norm(x, w, 1e-6), F.rms_norm(x, (32,), w, 1e-6))  # autograd on


def test_modulate_and_gated_add_are_the_per_group_formulas():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(2, 12, 8, generator=g), torch.randn(2, 12, 8, generator=g)
    shift, scale, gate = (torch.randn(2, 3, 8, generator=g) for _ in range(3))  # G = 3 groups
    per_token = lambda t: t.repeat_interleave(4, dim=1)  # (B, G, D) -> (B, 12, D)
    want = x * (1 + per_token(scale)) + per_token(shift)
    torch.testing.assert_close(ops.modulate(x, shift, scale), want, atol=1e-6, rtol=1e-6)
    want = x + y * per_token(gate)
    torch.testing.assert_close(ops.gated_add(x, y, gate), want, atol=1e-6, rtol=1e-6)


def test_inference_gelu_on_a_linears_output_is_torchs_in_place(monkeypatch):
    import torch.nn.functional as F

    monkeypatch.setattr(ops, "GELU_CHUNK_BYTES", 4 * 64 * 7)  # 7 rows a chunk: 150 = 21 x 7 + 3
    x = 4 * torch.randn(3, 50, 64, generator=torch.Generator().manual_seed(7))
    want = F.gelu(x, approximate="tanh")
    with torch.no_grad():  # fp32 inference on a CPU: x sigmoid(2u), in place, by chunks of rows
        y = x.clone()
        got = ops.apply_gelu(y, "tanh")
    assert got.data_ptr() == y.data_ptr() and (got - want).abs().max().item() < 1e-6
    y = x.clone()
    assert torch.equal(ops.apply_gelu(y, "tanh"), want) and torch.equal(y, x)  # autograd on
    with torch.no_grad():  # not contiguous: torch's kernel, the input left as it was
        y = x.transpose(0, 1)
        assert torch.equal(ops.apply_gelu(y, "tanh"), want.transpose(0, 1)) and torch.equal(
            y, x.transpose(0, 1)
        )


def test_bf16_is_native_only_where_the_cpu_says_so(monkeypatch):
    """oneDNN's own check says yes on any AVX-512 CPU, where it emulates bf16 at a third of
    fp32's speed (and the VAE then ran in bf16, slower, without a warning)."""
    from kinema.models import ops

    native = ops.cpu_has_bf16.__wrapped__  # the check itself, not this machine's cached answer
    if ops.cpu_flags() is None:
        pytest.skip("not an x86 Linux CPU: oneDNN's check decides there")
    monkeypatch.setattr(ops, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512bw"}))
    assert not native()
    monkeypatch.setattr(ops, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert native()
    monkeypatch.setattr(ops, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16", "amx_fp16"}))
    assert native() and ops.cpu_native(torch.float16)
