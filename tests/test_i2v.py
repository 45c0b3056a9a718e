"""Wan 2.1 image-to-video checkpoints against diffusers' WanImageToVideoPipeline.

A tiny random I2V folder (36-channel transformer with CLIP image tokens, CLIP vision encoder
and image processor) is written with diffusers' own ``save_pretrained``; kinema loads it and
must make the same video from the same image, prompt and seed.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kinema
from kinema.i2v import frame_mask

SETTINGS = dict(width=32, height=32, frames=9, steps=4, guidance=5.0, seed=7)


def build_i2v_folder(folder: Path, *, first_last: bool = False) -> Path:
    """Write a tiny ``WanImageToVideoPipeline`` (first-last-frame layout with ``first_last``)."""
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanImageToVideoPipeline,
        WanTransformer3DModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from tests.wan_tiny import tiny_text_encoder

    torch.manual_seed(0)
    tokenizer, t5 = tiny_text_encoder()
    z = 16
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=z, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1 * i for i in range(z)], latents_std=[1.0 + 0.05 * i for i in range(z)],
    ).eval()  # fmt: skip
    clip = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=20, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
            image_size=32, patch_size=8, projection_dim=20,
        )
    ).eval()  # fmt: skip
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    tokens = (32 // 8) ** 2 + 1  # CLIP patches + the class token
    transformer = WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=2 * z + 4, out_channels=z,
        text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, rope_max_seq_len=64,
        image_dim=20, added_kv_proj_dim=24, pos_embed_seq_len=2 * tokens if first_last else None,
    ).eval()  # fmt: skip
    if first_last:  # random (the saved default is zeros, which would hide a wrong layout)
        torch.nn.init.normal_(transformer.condition_embedder.image_embedder.pos_embed, std=0.5)
    sched = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    pipe = WanImageToVideoPipeline(
        tokenizer=tokenizer, text_encoder=t5, vae=vae, scheduler=sched,
        image_processor=processor, image_encoder=clip, transformer=transformer,
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_i2v_folder(tmp_path_factory.mktemp("wan") / "i2v")


def picture(seed: int, size: int = 32) -> np.ndarray:
    """A smooth random picture (H, W, 3) uint8: blobs of colour, as a real image has."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    return np.kron(small, np.ones((size // 4, size // 4, 1), dtype=np.uint8))


def reference_frames(folder: Path, prompt: str, image, last_image=None) -> np.ndarray:
    """diffusers' video for the same request, float frames in [0, 1] (T, H, W, 3)."""
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    pipe = WanImageToVideoPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    last = None if last_image is None else Image.fromarray(last_image)
    out = pipe(
        image=Image.fromarray(image), last_image=last, prompt=prompt, height=SETTINGS["height"],
        width=SETTINGS["width"], num_frames=SETTINGS["frames"],
        num_inference_steps=SETTINGS["steps"], guidance_scale=SETTINGS["guidance"],
        generator=torch.Generator("cpu").manual_seed(SETTINGS["seed"]), output_type="np",
    )  # fmt: skip
    return out.frames[0]


def test_image_to_video_matches_diffusers(folder):
    image, prompt = picture(1), "a red circle moving right"
    want = reference_frames(folder, prompt, image)
    pipe = kinema.load(folder, device="cpu", dtype="fp32")
    assert pipe.image_encoder is not None and pipe.dit.config.in_channels == 36
    video = pipe.generate(prompt, image=image, **SETTINGS)
    got = video.frames.astype(np.float64) / 255
    assert got.shape == want.shape == (9, 32, 32, 3)
    assert np.abs(got - want).max() <= 2 / 255
    assert video.info["transformer_evaluations"] == SETTINGS["steps"]
    # the image really steers the video (through both the channels and the CLIP tokens)
    other = pipe.generate(prompt, image=picture(2), **SETTINGS)
    assert np.abs(other.frames.astype(int) - video.frames.astype(int)).max() > 2


def test_image_to_video_from_the_cli_says_nothing_it_was_not_asked(folder, tmp_path):
    """-q still showed transformers' "Loading weights" bars and torch's warning about a
    read-only NumPy array (an image read from a file)."""
    Image.fromarray(picture(1)).save(tmp_path / "start.png")
    out = tmp_path / "out.mp4"
    done = subprocess.run(
        [sys.executable, "-m", "kinema", "generate", "a cat", "--model", str(folder), "--image",
         str(tmp_path / "start.png"), "--size", "32x32", "--frames", "9", "--steps", "1", "-q",
         "-o", str(out)], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith("wrote ") and done.stderr.count("\n") == 1, done.stderr


def test_text_only_request_on_an_i2v_model_fails_clearly(folder):
    pipe = kinema.load(folder, device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match="this model needs --image"):
        pipe.generate("a cat", **SETTINGS)
    with pytest.raises(ValueError, match="last_image needs a first-last-frame"):
        pipe.generate("a cat", image=picture(1), last_image=picture(2), **SETTINGS)
    with pytest.raises(ValueError, match="is an image-to-video checkpoint; the step cache"):
        pipe.calibrate_cache("a cat")


def test_first_last_frame_matches_diffusers(tmp_path):
    flf = build_i2v_folder(tmp_path / "flf2v", first_last=True)
    first, last, prompt = picture(3), picture(4), "a blue square"
    want = reference_frames(flf, prompt, first, last)
    pipe = kinema.load(flf, device="cpu", dtype="fp32")
    got = pipe.generate(prompt, image=first, last_image=last, **SETTINGS).frames / 255
    assert np.abs(got - want).max() <= 2 / 255
    with pytest.raises(ValueError, match="needs --last-image"):
        pipe.generate(prompt, image=first, **SETTINGS)
    clip = np.stack([first] * 9)  # it asked for --last-image, then refused one beside a video
    for task in ({"video": clip}, {"extend": clip}):
        with pytest.raises(ValueError, match="makes a clip between two images"):
            pipe.run(kinema.Request(prompt, **task, frames=8 if "extend" in task else None))


def test_frame_mask_layout_is_diffusers():
    """First frame repeated over the first latent frame; 4 mask channels per latent frame."""
    known = torch.zeros(9, dtype=torch.bool)
    known[0] = known[8] = True
    m = frame_mask(known, 4, (2, 3))
    assert m.shape == (1, 4, 3, 2, 3)
    assert m[0, :, 0].eq(1).all() and m[0, :, 1].eq(0).all()
    assert m[0, :, 2, 0, 0].tolist() == [0, 0, 0, 1]  # pixel frame 8 is the 4th of latent 2


def test_extension_and_restyle_run_on_an_i2v_model(folder):
    """Without an image, an I2V model is conditioned on the clip it extends or restyles."""
    pipe = kinema.load(folder, device="cpu", dtype="fp32")
    pipe.defaults = dataclasses.replace(pipe.defaults, frames=9, width=32, height=32)
    rng = np.random.default_rng(0)
    source = rng.integers(0, 255, (9, 32, 32, 3), dtype=np.uint8)
    quick = dict(steps=1, guidance=1.0, seed=1, fps=8)
    extended = pipe.extend(source, seconds=0.5, prompt="a cat", **quick)
    assert len(extended.frames) == 9 + 4
    assert np.array_equal(extended.frames[:9], source)
    restyled = pipe.generate("a cat", video=source, strength=0.5, **quick)
    assert restyled.frames.shape == (9, 32, 32, 3)


def test_a_converted_i2v_model_keeps_its_image_encoder(folder, tmp_path):
    """kinema convert dropped the CLIP image encoder, and the copy ran without image tokens:
    exit 0 and a different video. Now the copy carries it and makes the same video."""
    from kinema.convert import convert

    copy = convert(folder, tmp_path / "copy")
    assert (copy / "image_encoder").is_dir() and (copy / "image_processor").is_dir()
    settings = {**SETTINGS, "steps": 2}
    want = kinema.load(folder, device="cpu").generate("a cat", image=picture(1), **settings)
    got = kinema.load(copy, device="cpu").generate("a cat", image=picture(1), **settings)
    assert np.array_equal(got.frames, want.frames)


def test_an_i2v_dit_without_its_image_encoder_is_refused(folder, tmp_path):
    """Without the encoder the DiT skipped its image cross-attention silently: the original
    release's (open-clip) CLIP is not read, and a model folder missing it is named."""
    import json
    import shutil

    from safetensors.torch import save_file

    from kinema.io.wan_keys import kinema_to_original
    from kinema.models import VideoDiT
    from kinema.pipeline import Pipeline

    dit = VideoDiT.from_pretrained(folder / "transformer")
    original = tmp_path / "original"
    original.mkdir()
    state = kinema_to_original(dit.state_dict())
    save_file(state, str(original / "diffusion_pytorch_model.safetensors"))
    c = dit.config
    (original / "config.json").write_text(json.dumps({
        "model_type": "i2v", "dim": c.dim, "num_heads": c.num_heads, "ffn_dim": c.ffn_dim,
        "num_layers": c.num_layers, "text_dim": c.text_dim, "freq_dim": c.freq_dim,
        "in_dim": c.in_channels, "out_dim": c.out_channels}))  # fmt: skip
    (original / "Wan2.1_VAE.pth").write_bytes(b"")  # never reached
    with pytest.raises(ValueError, match="original-release Wan 2.1 image-to-video model"):
        kinema.load(original, device="cpu")
    copy = shutil.copytree(folder, tmp_path / "no-processor")
    shutil.rmtree(copy / "image_processor")
    with pytest.raises(ValueError, match="missing .*image_processor"):  # transformers' OSError
        kinema.load(copy, device="cpu")
    pipe = kinema.load(folder, device="cpu")
    with pytest.raises(ValueError, match="reads CLIP image tokens .* has no image encoder"):
        Pipeline(pipe.dit, pipe.vae, pipe.text_encoder, name="x", defaults=pipe.defaults)
