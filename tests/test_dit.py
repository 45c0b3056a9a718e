"""VideoDiT parity with diffusers' WanTransformer3DModel (same weights, fp32, <= 1e-4)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import WanTransformer3DModel

from kinema.io.wan_keys import (
    dit_config_from_diffusers,
    is_original_layout,
    kinema_to_original,
    original_to_kinema,
)
from kinema.models.dit import VideoDiT

CASES = {
    # name: (diffusers kwargs, latent (C, F, H, W), batch, per-sample timesteps)
    "square": (dict(num_attention_heads=2, attention_head_dim=12), (16, 3, 4, 4), 1, False),
    "odd_heads_nonsquare": (
        dict(num_attention_heads=3, attention_head_dim=16),
        (16, 2, 4, 6),
        2,
        True,
    ),
    "no_cross_norm": (
        dict(num_attention_heads=4, attention_head_dim=8, cross_attn_norm=False),
        (16, 5, 2, 8),
        3,
        True,
    ),
    "patch_t2": (
        dict(num_attention_heads=2, attention_head_dim=18, patch_size=(2, 2, 2), in_channels=4),
        (4, 4, 4, 4),
        2,
        False,
    ),
}


def tiny_reference(tmp_path, **overrides) -> WanTransformer3DModel:
    """A tiny random diffusers Wan transformer, saved and reloaded from disk."""
    kw = dict(
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=48,
        num_layers=2,
        cross_attn_norm=True,
        rope_max_seq_len=64,
    )
    kw.update(overrides)
    torch.manual_seed(0)
    model = WanTransformer3DModel(**kw)
    with torch.no_grad():  # non-trivial norm gains and tables, so every parameter matters
        for name, p in model.named_parameters():
            if "norm" in name or "scale_shift" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "transformer")
    return WanTransformer3DModel.from_pretrained(tmp_path / "transformer").eval()


def kinema_twin(tmp_path, ref: WanTransformer3DModel) -> VideoDiT:
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    model = VideoDiT(dit_config_from_diffusers(config)).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_diffusers(tmp_path, case):
    overrides, shape, batch, per_sample = CASES[case]
    ref = tiny_reference(tmp_path, **overrides)
    ours = kinema_twin(tmp_path, ref)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=g)
    t = torch.rand(batch, generator=g) * 1000 if per_sample else torch.full((batch,), 999)
    ctx = torch.randn(batch, 7, 32, generator=g)
    with torch.no_grad():
        want = ref(x, t, ctx, return_dict=False)[0]
        got = ours(x, t, ctx)
    assert got.shape == want.shape == (batch, ref.config.out_channels, *shape[1:])
    assert (got - want).abs().max().item() <= 1e-4


def test_per_frame_timesteps_match_diffusers_per_token(tmp_path):
    """(B, F) timesteps equal diffusers' per-token (B, N) timesteps expanded over each frame."""
    ref = tiny_reference(tmp_path)
    ours = kinema_twin(tmp_path, ref)
    x = torch.randn(2, 16, 3, 4, 6)
    t_frames = torch.tensor([[0.0, 500.0, 999.0], [10.0, 0.0, 250.0]])
    t_tokens = t_frames.repeat_interleave(2 * 3, dim=1)  # (B, F * H/2 * W/2)
    ctx = torch.randn(2, 5, 32)
    with torch.no_grad():
        want = ref(x, t_tokens, ctx, return_dict=False)[0]
        got = ours(x, t_frames, ctx)
    assert (got - want).abs().max().item() <= 1e-4
    # and a per-frame timestep really changes the output compared with one per sample
    with torch.no_grad():
        other = ours(x, torch.tensor([500.0, 500.0]), ctx)
    assert (other - got).abs().max().item() > 1e-3


def test_per_frame_contexts_reduce_to_diffusers_and_stay_in_their_frame(tmp_path):
    """Timed prompts: a context per latent frame (B, F, L, D). The same context on every frame
    is diffusers' forward; with different ones, each frame's tokens cross-attend to their own
    frame's context only (checked against the plain attention run on that frame alone)."""
    ref = tiny_reference(tmp_path)
    ours = kinema_twin(tmp_path, ref)
    x, t = torch.randn(2, 16, 3, 4, 6), torch.tensor([999.0, 400.0])
    ctx = torch.randn(2, 5, 32)
    with torch.no_grad():
        want = ref(x, t, ctx, return_dict=False)[0]
        got = ours(x, t, ctx[:, None].expand(-1, 3, -1, -1))
        assert (got - want).abs().max().item() <= 1e-4
        per_frame = torch.randn(2, 3, 5, 32)
        assert (ours(x, t, per_frame) - want).abs().max().item() > 1e-3
        attn, d = ours.blocks[0].attn2, ours.config.dim
        h, frame_ctx = torch.randn(2, 3 * 6, d), torch.randn(2, 3, 5, d)  # 6 tokens a frame
        mixed = attn(h, frame_ctx)
        for g in range(3):
            alone = attn(h[:, 6 * g : 6 * (g + 1)], frame_ctx[:, g])
            torch.testing.assert_close(mixed[:, 6 * g : 6 * (g + 1)], alone)
    with pytest.raises(ValueError, match=r"valid: \(B, 3, L, D\), one per latent frame"):
        ours(x, t, per_frame[:, :2])


def test_image_to_video_layout_matches_diffusers(tmp_path):
    ref = tiny_reference(tmp_path, in_channels=36, image_dim=20, added_kv_proj_dim=24)
    ours = kinema_twin(tmp_path, ref)
    x, t = torch.randn(1, 36, 2, 4, 4), torch.tensor([321])
    ctx, img = torch.randn(1, 512, 32), torch.randn(1, 257, 20)
    with torch.no_grad():
        want = ref(x, t, ctx, encoder_hidden_states_image=img, return_dict=False)[0]
        got = ours(x, t, ctx, image=img)
    assert (got - want).abs().max().item() <= 1e-4


def test_original_key_map_round_trip(tmp_path):
    ref = tiny_reference(tmp_path, image_dim=20, added_kv_proj_dim=24)
    state = ref.state_dict()
    original = kinema_to_original(state)
    assert is_original_layout(set(original)) and not is_original_layout(set(state))
    assert "blocks.0.self_attn.q.weight" in original
    assert "blocks.1.norm3.weight" in original and "head.modulation" in original
    assert "blocks.0.cross_attn.k_img.weight" in original
    back = original_to_kinema(original)
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_bad_latent_size_is_rejected(tmp_path):
    ref = tiny_reference(tmp_path)
    ours = kinema_twin(tmp_path, ref)
    with pytest.raises(ValueError, match="not divisible by patch"):
        ours(torch.randn(1, 16, 2, 3, 4), torch.tensor([1.0]), torch.randn(1, 4, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rope_as_complex_product_equals_the_pairwise_rotation(dtype):
    """Eager RoPE (one complex product) rotates each channel pair (x1, x2) by its angle:
    (x1 cos - x2 sin, x1 sin + x2 cos), for a strided input too (q sliced from a wider one)."""
    from kinema.models.ops import apply_rope, rope_3d

    cos, sin = rope_3d((3, 4, 5), head_dim=24)  # (60, 1, 12)
    wide = torch.randn(2, 60, 3, 48, generator=torch.Generator().manual_seed(0)).to(dtype)
    x = wide[..., 24:]  # (2, 60, 3, 24), not contiguous
    got = apply_rope(x, cos, sin)
    x1, x2 = x[..., 0::2].to(torch.float64), x[..., 1::2].to(torch.float64)
    c, s = cos.to(torch.float64), sin.to(torch.float64)
    want = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    assert got.dtype == dtype and got.shape == x.shape
    tolerance = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    assert (got.to(torch.float64) - want).abs().max().item() <= tolerance
