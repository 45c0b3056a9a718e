"""CausalVAE parity with diffusers' AutoencoderKLWan (same weights, fp32, <= 1e-4), causality,
explicit chunk cache, tiling, latent normalisation, input checks and original-key maps."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import load_file

from kinema.configs import VAEConfig
from kinema.io.wan_vae_keys import diffusers_to_original, is_original_layout, original_to_diffusers
from kinema.models.vae import CausalCache, CausalVAE, TileSpec, config_from_diffusers

TOL = 1e-4
MEAN, STD = [0.1, -0.2, 0.3, 0.0], [1.0, 2.0, 0.5, 1.5]


def tiny_reference(**overrides) -> AutoencoderKLWan:
    """A tiny random diffusers Wan VAE with non-trivial norm gains and biases."""
    kw = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    kw.update(latents_mean=MEAN, latents_std=STD, **overrides)
    torch.manual_seed(0)
    model = AutoencoderKLWan(**kw).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[AutoencoderKLWan, CausalVAE]:
    """(diffusers reference reloaded from disk, kinema VAE loaded strictly from the same file)."""
    folder = tmp_path_factory.mktemp("wan_vae")
    tiny_reference().save_pretrained(folder)
    ref = AutoencoderKLWan.from_pretrained(folder).eval()
    ours = CausalVAE(config_from_diffusers(json.loads((folder / "config.json").read_text())))
    ours.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"), strict=True)
    return ref, ours.eval()


def smooth_video(b: int, t: int, h: int, w: int) -> torch.Tensor:
    """A smooth moving pattern in [-0.8, 0.8]: (B, 3, T, H, W)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    frames = torch.stack([torch.sin(3 * xx + 0.5 * i) * torch.cos(2 * yy) for i in range(t)])
    video = torch.stack([frames, 0.5 * frames, -frames]) * 0.8  # (3, T, H, W)
    return torch.stack([video * (1 - 0.3 * i) for i in range(b)])


def noise_video(b: int, t: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn(b, 3, t, h, w, generator=g)).clamp(-1, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB for signals in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4.0 / ((a - b) ** 2).mean().item())


# --- config ----------------------------------------------------------------------------------


def test_config_from_diffusers_maps_and_refuses() -> None:
    d = dict(tiny_reference().config)
    d.update(_class_name="AutoencoderKLWan", _diffusers_version="0.42.1")
    cfg = config_from_diffusers(d)
    assert cfg == VAEConfig(
        base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
        latents_mean=tuple(MEAN), latents_std=tuple(STD),
    )  # fmt: skip
    for bad in ({"is_residual": True}, {"patch_size": 2}, {"decoder_base_dim": 256}, {"foo": 1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            config_from_diffusers({**d, **bad})


# --- parity with diffusers -------------------------------------------------------------------


@pytest.mark.parametrize("b,t", [(1, 9), (2, 1)])
def test_encode_matches_diffusers(pair, b: int, t: int) -> None:
    ref, ours = pair
    video = noise_video(b, t, 32, 48)
    with torch.no_grad():
        want = ref.encode(video).latent_dist
        mean, logvar = ours.encode_posterior(video)
        assert torch.equal(ours.encode(video), mean)
    assert mean.shape == (b, 4, 1 + (t - 1) // 4, 4, 6)
    assert (mean - want.mean).abs().max() <= TOL
    assert (logvar - want.logvar).abs().max() <= TOL


@pytest.mark.parametrize("b,f", [(1, 3), (2, 1)])
def test_decode_matches_diffusers(pair, b: int, f: int) -> None:
    ref, ours = pair
    z = torch.randn(b, 4, f, 4, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.decode(z).sample
        got = ours.decode(z)
    assert got.shape == (b, 3, 1 + 4 * (f - 1), 32, 48)
    assert (want.abs() < 1).float().mean() > 0.9  # outputs mostly unclamped: the test bites
    assert (got - want).abs().max() <= TOL


# --- causality and the explicit cache ----------------------------------------------------------


def test_encode_is_causal(pair) -> None:
    _, vae = pair
    video = noise_video(1, 9, 16, 16)
    later = video.clone()
    later[:, :, 5:] = -later[:, :, 5:]  # change the last 4 frames (latent frame 2 only)
    middle = video.clone()
    middle[:, :, 3] += 0.5  # change frame 3 (latent frame 1 and after)
    with torch.no_grad():
        base, a, b = vae.encode(video), vae.encode(later), vae.encode(middle)
    assert torch.equal(base[:, :, :2], a[:, :, :2]) and not torch.allclose(
        base[:, :, 2], a[:, :, 2]
    )
    assert torch.equal(base[:, :, :1], b[:, :, :1]) and not torch.allclose(
        base[:, :, 1], b[:, :, 1]
    )


def test_decode_is_causal(pair) -> None:
    _, vae = pair
    z = torch.randn(1, 4, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    changed = z.clone()
    changed[:, :, 2] += 1.0
    with torch.no_grad():
        a, b = vae.decode(z), vae.decode(changed)
    assert torch.equal(a[:, :, :5], b[:, :, :5]) and not torch.allclose(a[:, :, 5:], b[:, :, 5:])


def test_chunk_sizes_do_not_change_the_result(pair) -> None:
    """The cache makes chunking invisible: 1+4+4 frames == 1+8; latent 1+1+1 == 1+2."""
    _, vae = pair
    video = noise_video(1, 9, 16, 16)
    z = torch.randn(1, 4, 3, 2, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        first, cache = vae.encode_chunk(video[:, :, :1])
        rest, cache = vae.encode_chunk(video[:, :, 1:], cache)
        head, dcache = vae.decode_chunk(z[:, :, :1])
        tail, dcache = vae.decode_chunk(z[:, :, 1:], dcache)
        mean = vae.encode(video)
        frames = vae.decode(z)
    assert isinstance(cache, CausalCache) and all(torch.is_tensor(t) for t in cache.frames)
    assert torch.allclose(torch.cat([first, rest], 2).chunk(2, 1)[0], mean, atol=1e-5)
    assert torch.allclose(torch.cat([head, tail], 2), frames, atol=1e-5)


def test_whole_clip_pass_equals_chunk_by_chunk(pair) -> None:
    """``whole=True`` (one pass over all frames, the training path) gives the chunked result,
    and so do its gradients; the first chunk may hold more than one frame."""
    _, vae = pair
    video = noise_video(2, 13, 16, 16).requires_grad_()
    z = torch.randn(2, 4, 4, 2, 2, generator=torch.Generator().manual_seed(5)).requires_grad_()
    chunked = vae.encode_posterior(video)[0], vae.decode(z, clamp=False)
    whole = vae.encode_posterior(video, whole=True)[0], vae.decode(z, clamp=False, whole=True)
    for a, b in zip(chunked, whole, strict=True):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5
    g = torch.Generator().manual_seed(6)
    weights = [torch.randn(t.shape, generator=g) for t in chunked]
    grads = [
        torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, out, strict=True)),
                            (video, z))
        for out in (chunked, whole)
    ]  # fmt: skip
    for a, b in zip(*grads, strict=True):
        assert a.abs().max() > 0 and (a - b).abs().max() <= 1e-5 * a.abs().max()
    with torch.no_grad():
        first, cache = vae.encode_chunk(video[:, :, :5])
        rest, _ = vae.encode_chunk(video[:, :, 5:], cache)
        head, dcache = vae.decode_chunk(z[:, :, :2], clamp=False)
        tail, _ = vae.decode_chunk(z[:, :, 2:], dcache, clamp=False)
    assert (torch.cat([first, rest], 2).chunk(2, 1)[0] - chunked[0]).abs().max() <= 1e-5
    assert (torch.cat([head, tail], 2) - chunked[1]).abs().max() <= 1e-5


def test_chunk_api_refuses_misuse(pair) -> None:
    _, vae = pair
    video = noise_video(1, 9, 16, 16)
    with torch.no_grad():
        _, cache = vae.encode_chunk(video[:, :, :1])
        with pytest.raises(ValueError, match=r"1 \+ 4 k frames, got 4"):
            vae.encode_chunk(video[:, :, :4])
        with pytest.raises(ValueError, match="multiple of 4 frames, got 3"):
            vae.encode_chunk(video[:, :, 1:4], cache)
        with pytest.raises(ValueError, match="decoder cache"):
            vae.decode_chunk(torch.zeros(1, 4, 1, 2, 2), cache)


# --- tiling ----------------------------------------------------------------------------------


def test_tiled_matches_diffusers_tiling(pair) -> None:
    """Same tiles, same linear seam blending as diffusers' tiled_encode / tiled_decode."""
    ref, ours = pair
    tile = TileSpec(size=32, overlap=16)
    video = noise_video(1, 5, 32, 48)
    ref.enable_tiling(tile.size, tile.size, tile.stride, tile.stride)
    try:
        with torch.no_grad():
            want_z = ref.encode(video).latent_dist.mean
            got_z = ours.encode(video, tile=tile)
            want_x = ref.decode(want_z).sample
            got_x = ours.decode(want_z, tile=tile)
    finally:
        ref.disable_tiling()
    assert got_z.shape == (1, 4, 2, 4, 6) and got_x.shape == (1, 3, 5, 32, 48)
    assert (got_z - want_z).abs().max() <= TOL
    assert (got_x - want_x).abs().max() <= TOL


def test_tiled_is_close_to_untiled(pair) -> None:
    """A frame that fits one tile is not split; real seams stay within 40 dB PSNR of untiled
    (measured: 46 dB decoding, 75 dB for decode(tiled encode) vs decode(encode), on a smooth
    48x64 frame with 48-px tiles overlapping by 24 px)."""
    _, vae = pair
    video, tile = smooth_video(1, 1, 48, 64), TileSpec(size=48, overlap=24)
    with torch.no_grad():
        z = vae.encode(video)
        assert torch.equal(vae.encode(video, tile=TileSpec(64, 32)), z)
        whole = vae.decode(z)
        tiled = vae.decode(z, tile=tile)
        via_tiled_latents = vae.decode(vae.encode(video, tile=tile))
    assert psnr(tiled, whole) > 40.0
    assert psnr(via_tiled_latents, whole) > 40.0


def test_lean_cache_is_close_to_exact_and_keeps_what_would_overflow(pair) -> None:
    """The pipeline's decode keeps the causal cache in fp16 (``LEAN_CACHE``): measured
    85 dB against the exact decode here; an entry too large for fp16 stays fp32."""
    from kinema.models.vae import LEAN_CACHE, compact, newest_frames

    _, vae = pair
    z = torch.randn(1, 4, 4, 4, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        exact, lean = vae.decode(z), vae.decode(z, cache_dtype=LEAN_CACHE[torch.float32])
    assert 70.0 < psnr(lean, exact) < math.inf  # rounded (85 dB here), and only just
    big = torch.full((1, 2, 3, 2, 2), 1e5)
    assert compact(big, torch.float16).dtype == torch.float32
    assert compact(big / 1e3, torch.float16).dtype == torch.float16
    past = torch.zeros(1, 2, 2, 2, 2, dtype=torch.float16)
    assert newest_frames(big, past).dtype == torch.float32  # overflow: stays exact
    assert newest_frames(big / 1e3, past).dtype == torch.float16


# --- normalisation, sampling, bad input --------------------------------------------------------


def test_inference_path_equals_the_autograd_path(pair) -> None:
    """Without autograd the residual blocks and output stages write each conv's time-padded
    input into one buffer (see norm_silu_padded); with it they take the plain lines. Same values."""
    _, vae = pair
    video, z = smooth_video(1, 9, 32, 48), torch.randn(1, 4, 3, 4, 6)
    with torch.no_grad():
        lean = vae.encode(video), vae.decode(z)
    plain = vae.encode(video), vae.decode(z)  # grad enabled: the parameters require it
    assert plain[1].requires_grad
    for a, b in zip(lean, plain, strict=True):
        assert (a - b.detach()).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def wan_proportioned() -> tuple[AutoencoderKLWan, CausalVAE]:
    """A tiny diffusers VAE with Wan 2.1's channel proportions and block counts, and its twin."""
    ref = tiny_reference(dim_mult=[1, 2, 4, 4], num_res_blocks=2)
    ours = CausalVAE(config_from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_default_decode_holds_about_half_of_diffusers_live_memory(wan_proportioned) -> None:
    """Peak live tensor storage (bench.TensorPeak: deterministic, what a GPU's allocator
    counts) of the pipeline's decode (one full-resolution frame a pass, half-precision cache)
    against diffusers' untiled decode. 0.52 here (0.58 before the lean inference path); the
    3-channel output both hold weighs more at 8 channels than at Wan's 96 (0.42 at the 1.3B
    VAE, 104x64x17)."""
    from kinema.bench import tensor_peak

    ref, ours = wan_proportioned
    z = torch.randn(1, 4, 5, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, peak = tensor_peak(lambda: ours.decode(z, cache_dtype=torch.float16))
        want, ref_peak = tensor_peak(lambda: ref.decode(z).sample)
    assert psnr(got, want) > 60
    assert peak <= 0.55 * ref_peak


def test_encode_runs_its_full_resolution_stages_frame_by_frame(wan_proportioned) -> None:
    """The same moments as the whole chunk at once (and as diffusers), for about two thirds of
    diffusers' live memory (0.69 here; 0.68 at Wan's VAE, 208x120x33, where it was 1.22 before)."""
    from kinema.bench import tensor_peak

    ref, ours = wan_proportioned
    video = smooth_video(1, 17, 64, 64)
    with torch.no_grad():
        got, peak = tensor_peak(lambda: ours.encode(video))
        want, ref_peak = tensor_peak(lambda: ref.encode(video).latent_dist.mean)
        whole_chunks = ours.encode_chunk(video[:, :, :1])[1]
        first, _ = ours.encode_chunk(video[:, :, 1:5], whole_chunks, piece=None)
        by_frame, _ = ours.encode_chunk(video[:, :, 1:5], whole_chunks, piece=1)
    assert (got - want).abs().max() <= TOL
    assert (first - by_frame).abs().max() <= 1e-5 and first.shape[2] == 1
    assert peak <= 0.8 * ref_peak
    # the pipeline's encode keeps its causal cache in fp16, as its decode does: 0.45x here
    with torch.no_grad():
        lean, lean_peak = tensor_peak(lambda: ours.encode(video, cache_dtype=torch.float16))
    assert 0 < (lean - got).abs().max() <= 1e-3  # rounded (2.6e-4 here), and only just
    assert lean_peak <= 0.5 * ref_peak


def test_normalize_round_trip(pair) -> None:
    _, vae = pair
    z = torch.randn(2, 4, 3, 2, 2)
    mean = torch.tensor(MEAN).view(1, 4, 1, 1, 1)
    std = torch.tensor(STD).view(1, 4, 1, 1, 1)
    assert torch.allclose(vae.normalize(z), (z - mean) / std)
    assert torch.allclose(vae.denormalize(vae.normalize(z)), z, atol=1e-6)


def test_first_frame_statistics_normalise_frame_zero_alone(tmp_path) -> None:
    """first_frame_mean/std: frame 0 (one image encoded alone) gets its own statistics, the
    other frames keep the per-channel ones; they survive a save and load."""
    from kinema.io.checkpoint import load_vae, save_component

    first = dict(first_frame_mean=(1.0, 2.0, 3.0, 4.0), first_frame_std=(0.5, 0.25, 2.0, 1.0))
    config = VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2), temporal_downsample=(True,),
                       latents_mean=tuple(MEAN), latents_std=tuple(STD), **first)  # fmt: skip
    save_component(CausalVAE(config), tmp_path)
    vae = load_vae(tmp_path)
    assert vae.config == config
    z = torch.randn(2, 4, 3, 2, 2)
    n = vae.normalize(z)
    m0, s0 = (torch.tensor(first[k]).view(1, 4, 1, 1) for k in first)
    assert torch.allclose(n[:, :, 0], (z[:, :, 0] - m0) / s0)
    m, s = torch.tensor(MEAN).view(1, 4, 1, 1, 1), torch.tensor(STD).view(1, 4, 1, 1, 1)
    assert torch.allclose(n[:, :, 1:], (z[:, :, 1:] - m) / s)
    assert torch.allclose(vae.denormalize(n), z, atol=1e-6)
    with pytest.raises(ValueError, match="first_frame_mean and first_frame_std need z_dim=4"):
        VAEConfig(z_dim=4, latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4,
                  first_frame_mean=(0.0,) * 4)  # fmt: skip


def test_sample_draws_around_the_mean() -> None:
    mean, logvar = torch.zeros(1, 4, 1, 8, 8), torch.full((1, 4, 1, 8, 8), math.log(4.0))
    a = CausalVAE.sample(mean, logvar, torch.Generator().manual_seed(0))
    b = CausalVAE.sample(mean, logvar, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and 1.5 < a.std().item() < 2.5  # std = exp(log 4 / 2) = 2
    assert torch.allclose(CausalVAE.sample(mean + 1, torch.full_like(logvar, -30.0)), mean + 1)


@pytest.mark.parametrize(
    "shape,message",
    [
        ((1, 3, 8, 16, 16), r"1 \+ 4k, got T=8 \(nearest valid: 5 or 9\)"),
        ((1, 3, 5, 36, 16), "multiples of 8, got H=36, W=16"),
        ((1, 4, 5, 16, 16), r"\(B, 3, T, H, W\)"),
        ((3, 5, 16, 16), r"\(B, 3, T, H, W\)"),
    ],
)
def test_bad_video_raises(pair, shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pair[1].encode(torch.zeros(shape))


def test_bad_latent_and_tile_raise(pair) -> None:
    _, vae = pair
    with pytest.raises(ValueError, match=r"\(B, 4, F >= 1, h, w\)"):
        vae.decode(torch.zeros(1, 16, 2, 4, 4))
    with pytest.raises(ValueError, match="overlap < size"):
        TileSpec(size=32, overlap=32)
    with pytest.raises(ValueError, match="multiples of 8 pixels"):
        vae.decode(torch.zeros(1, 4, 1, 4, 4), tile=TileSpec(size=30, overlap=6))
    with pytest.raises(ValueError, match="attn_scales"):
        CausalVAE(VAEConfig(attn_scales=(1.0,)))


# --- original Wan key names ------------------------------------------------------------------


def test_original_keys_round_trip_and_agree_with_diffusers() -> None:
    """Wan 2.1 layout (dim_mult 1,2,4,4, num_res_blocks 2): our inverse map feeds diffusers' own
    converter back to the same dict, and our forward map undoes it; the result loads strictly."""
    ref = tiny_reference(base_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2)
    state = ref.state_dict()
    original = diffusers_to_original(state)
    for key in (
        "conv1.weight",
        "conv2.bias",
        "encoder.conv1.weight",
        "encoder.downsamples.0.residual.0.gamma",
        "encoder.downsamples.3.shortcut.weight",
        "encoder.middle.1.to_qkv.weight",
        "decoder.upsamples.3.time_conv.weight",
        "decoder.upsamples.4.shortcut.weight",
        "decoder.upsamples.11.resample.1.weight",
        "decoder.upsamples.14.residual.6.bias",
        "decoder.head.2.weight",
    ):
        assert key in original, key
    assert is_original_layout(original) and not is_original_layout(state)
    theirs = convert_wan_vae_to_diffusers(original)
    assert theirs.keys() == state.keys() and all(theirs[k] is state[k] for k in state)
    back = original_to_diffusers(original)
    assert back.keys() == state.keys() and all(back[k] is state[k] for k in state)
    assert original_to_diffusers(original, num_res_blocks=2).keys() == state.keys()
    vae = CausalVAE(config_from_diffusers(dict(ref.config)))
    vae.load_state_dict(back, strict=True)
