"""The whole pipeline against diffusers' WanPipeline: same seed and weights, same video."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import kinema
from tests.wan_tiny import build_wan_folder

SETTINGS = dict(width=32, height=32, frames=9, steps=4, guidance=5.0, seed=7)


def reference_frames(folder, prompt: str, negative: str) -> np.ndarray:
    """diffusers' output for the same request, as float frames in [0, 1] (T, H, W, 3)."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    out = pipe(
        prompt=prompt, negative_prompt=negative, height=SETTINGS["height"],
        width=SETTINGS["width"], num_frames=SETTINGS["frames"],
        num_inference_steps=SETTINGS["steps"], guidance_scale=SETTINGS["guidance"],
        generator=torch.Generator("cpu").manual_seed(SETTINGS["seed"]), output_type="np",
    )  # fmt: skip
    return out.frames[0]


@pytest.mark.parametrize("sampler", ["unipc", "euler"])
def test_same_seed_same_video_as_diffusers(tmp_path, sampler):
    folder = build_wan_folder(tmp_path / "wan", scheduler=sampler)
    prompt, negative = "a red circle moving right", "blurry"
    want = reference_frames(folder, prompt, negative)
    pipe = kinema.load(folder, device="cpu", dtype="fp32")
    assert pipe.defaults.sampler == sampler
    video = pipe.generate(prompt, negative_prompt=negative, **SETTINGS)
    got = video.frames.astype(np.float64) / 255
    assert got.shape == want.shape == (9, 32, 32, 3)
    assert np.abs(got - want).max() <= 2 / 255
    assert video.info["transformer_evaluations"] == SETTINGS["steps"]  # CFG batched: 1 per step
    # the output really depends on the prompt and the seed
    other = pipe.generate("a blue square", negative_prompt=negative, **SETTINGS)
    assert not np.array_equal(other.frames, video.frames)
    reseeded = pipe.generate(prompt, negative_prompt=negative, **{**SETTINGS, "seed": 8})
    assert np.abs(reseeded.frames.astype(int) - video.frames.astype(int)).max() > 2


def test_determinism_and_sidecar(tmp_path):
    folder = build_wan_folder(tmp_path / "wan")
    pipe = kinema.load(folder, device="cpu")
    a = pipe.generate("a cat", **SETTINGS)
    b = pipe.generate("a cat", **SETTINGS)
    assert a.frames.tobytes() == b.frames.tobytes()
    out = a.save(tmp_path / "out" / "cat.mp4")
    import json

    info = json.loads(out.with_suffix(".json").read_text())
    assert info["prompt"] == "a cat" and info["seed"] == 7 and info["sampler"] == "unipc"
    assert set(info["timings"]) == {"load", "text", "denoise", "decode", "total"}
    assert info["transformer_evaluations"] == 4
    from kinema.io.video import read_metadata

    assert read_metadata(out)["title"] == "a cat"


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(width=40), "width 40 is not a multiple of 16; nearest valid: 48"),
        (dict(frames=8), "frames 8 is not 4k\\+1"),
        (dict(steps=0), "steps 0 must be >= 1"),
        (dict(guidance=-1.0), "guidance -1.0 must be >= 0"),
        (dict(seed=-3), "seed -3 must be in"),
        (dict(sampler="ddim"), "unknown sampler 'ddim'"),
        (dict(seed=1.5), "seed must be an integer, got 1.5"),  # was torch's RuntimeError
        (dict(width="128"), "width must be an integer, got '128'"),  # was a TypeError
        (dict(frames=9.0), "frames must be an integer, got 9.0"),
        (dict(guidance="3"), "guidance must be a number, got '3'"),
        (dict(steps=True), "steps must be an integer, got True"),
        (dict(sampler=3), "sampler must be a string, got int"),
        (dict(prompts=[(1.0,)]), r"prompts must be \(seconds, prompt\) pairs.*got \(1.0,\)"),
        (dict(prompts=[("1", "b")]), r"prompts must be \(seconds, prompt\) pairs"),
        (dict(prompts="a dog"), "prompts must be a list of .* got str"),  # was "got 'a'"
        (dict(prompts=b"ab"), "prompts must be a list of .* got bytes"),  # "got 97"
        (dict(prompts=[(0.25, "  ")]), "the prompt at 0.25 s is empty"),  # ran silently
        (dict(frames=4 * 10**9 + 1), "frames 4000000001 is over 1048577, the most"),  # no memory
    ],
)
def test_bad_requests_name_the_value(tmp_path, bad, message):
    pipe = kinema.load(build_wan_folder(tmp_path / "wan"), device="cpu")
    with pytest.raises(ValueError, match=message):
        pipe.generate("x", **{**SETTINGS, **bad})


def test_numpy_scalars_are_taken_as_python_numbers():
    from kinema.pipeline import Request

    req = Request("x", seed=np.int64(3), frames=np.int32(9), guidance=np.float32(2.5),
                  prompts=[[np.float64(0.5), "y"]])  # fmt: skip
    assert (req.seed, req.frames, req.guidance, req.prompts) == (3, 9, 2.5, ((0.5, "y"),))
    assert type(req.seed) is int and type(req.guidance) is float


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("native", [True, False])
def test_half_precision_on_a_cpu_that_emulates_it_warns_and_keeps_the_vae_fp32(
    tmp_path, monkeypatch, dtype, native
):
    """Emulated half-precision 3D convolutions take ~200x the fp32 time on a CPU, so the VAE
    runs in fp32 there and the load says what the DiT's half precision costs. (Whether this
    CPU computes bf16 natively is a fact of the machine: both answers are set here.)"""
    from kinema.models import ops

    monkeypatch.setattr(ops, "cpu_native", lambda dt: native or dt == torch.float32)
    folder = build_wan_folder(tmp_path / "wan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = kinema.load(folder, device="cpu", dtype=dtype)
    said = [str(w.message) for w in caught if "emulated" in str(w.message)]
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert pipe.dtype == pipe.dit.blocks[0].attn1.to_q.weight.dtype == half  # as asked
    assert {p.dtype for p in pipe.vae.parameters()} == {half if native else torch.float32}
    assert said == ([] if native else [said[0]]) and (native or f"{dtype} is emulated" in said[0])
    assert pipe.generate("x", **SETTINGS).frames.shape == (9, 32, 32, 3)


def test_a_zero_is_refused_not_taken_for_the_default(tmp_path):
    """width, height, frames and fps of 0 are errors, also where media would supply them."""
    pipe = kinema.load(build_wan_folder(tmp_path / "wan"), device="cpu")
    video = np.zeros((9, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="fps 0 must be >= 1"):
        pipe.generate("x", **{**SETTINGS, "fps": 0})
    with pytest.raises(ValueError, match="frames 0 must be >= 1"):
        pipe.generate("x", video=video, frames=0)
    with pytest.raises(ValueError, match="width 0 is not a multiple of 16; nearest valid: 16"):
        pipe.generate("x", video=video, width=0)
    with pytest.raises(ValueError, match="fps 0 must be >= 1"):
        pipe.extend(video, 1.0, "x", fps=0)


def test_words_a_closed_world_model_never_read_are_warned_about(tmp_path):
    """A model that records its training words (kinema-tiny) names the prompt's other words,
    timed prompts included, once per request; one without a vocabulary (Wan) never warns."""
    import json
    import warnings

    from kinema.data.synthetic import vocabulary
    from kinema.pipeline import UnknownWordsWarning
    from tests.serve_helpers import TINY_SETTINGS, build_tiny_model

    folder = build_tiny_model(tmp_path / "tiny")
    meta = json.loads((folder / "kinema.json").read_text())
    (folder / "kinema.json").write_text(json.dumps({**meta, "vocabulary": list(vocabulary())}))
    pipe = kinema.load(folder, device="cpu")
    settings = {**TINY_SETTINGS, "frames": 9}
    with pytest.warns(UnknownWordsWarning) as caught:
        pipe.generate("A crimson ball, rising", prompts=[(0.5, "a red cat")], **settings)
    assert len(caught) == 1 and "never read 'cat', 'crimson' in training" in str(caught[0].message)
    with pytest.warns(UnknownWordsWarning, match="never read 'blurry' in"):  # the negative too
        pipe.generate("a red ball", negative_prompt="blurry", **{**settings, "guidance": 3.0})
    # words of other scripts and emoji: were no warning at all, or ('déplace') 'd' and 'place'
    for prompt, word in (("un cercle rouge se déplace", "'déplace'"), ("红色的圆", "'红色的圆'"),
                         ("a red 🔴 ball", "'🔴'")):  # fmt: skip
        with pytest.warns(UnknownWordsWarning, match=word):
            pipe.generate(prompt, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownWordsWarning)
        pipe.generate("A red ball, rising on a navy background.", **settings)
        kinema.load(build_wan_folder(tmp_path / "wan"), device="cpu").generate(
            "a crimson cat", **{**SETTINGS, "steps": 1}
        )


def test_text_to_video_needs_no_pyav(tmp_path):
    """PyAV is imported only for requests with images or videos (and for writing mp4), so a
    machine without it (e.g. a GPU box running the benchmarks) still makes videos."""
    import subprocess
    import sys

    from tests.serve_helpers import build_tiny_model

    folder = build_tiny_model(tmp_path / "tiny")
    code = (
        "import sys; sys.modules['av'] = None\n"  # import av now fails, as where it is missing
        "import kinema\n"
        f"video = kinema.load({str(folder)!r}, device='cpu').generate('a red ball')\n"
        "assert video.frames.shape == (5, 32, 32, 3), video.frames.shape\n"
        "assert 'kinema.io.video' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_decode_that_would_not_fit_in_the_budget_is_tiled(tmp_path):
    """``decode_budget`` (on a GPU: its free memory) below the untiled decode's estimate
    decodes in spatial tiles, with a warning; with room, the decode is the untiled one."""
    from kinema.models.vae import TileSpec

    pipe = kinema.load(build_wan_folder(tmp_path / "wan"), device="cpu")
    z = torch.randn(1, pipe.vae.config.z_dim, 3, 8, 24, generator=torch.Generator().manual_seed(0))
    untiled = pipe.decode(z)  # 64 x 192 pixels
    pipe.decode_budget = 2**40
    assert torch.equal(pipe.decode(z), untiled)
    pipe.decode_budget = 1  # nothing fits: the smallest tiles there are
    with pytest.warns(UserWarning, match="VAE decode in 128 px tiles") as caught:
        tiled = pipe.decode(z)
    assert "the decode budget is 0.00 GiB" in str(caught[0].message)  # the limit it kept to
    with torch.no_grad():
        latent = pipe.vae.denormalize(z)
        want = pipe.vae.decode(latent, tile=TileSpec(128, 32), cache_dtype=torch.float16)
    assert torch.equal(tiled, want) and not torch.equal(tiled, untiled)


def test_the_library_names_what_it_is_given_wrong_before_any_work(tmp_path):
    """Each of these was a traceback from deep inside (or, for compile="no" and a LoRA path
    as a string, a wrong action) before a QA pass over the Python API."""
    from kinema.pipeline import Request

    folder = build_wan_folder(tmp_path / "wan")
    for options, message in (
        (dict(compile="no"), "compile must be True or False, got 'no'"),  # compiled
        (dict(lora="style.safetensors"), "style.safetensors"),  # 'LoRA file s does not exist'
        (dict(lora=[("a", "0.8")]), r"lora takes paths or \(path, strength\) pairs"),
        (dict(lora={"a.safetensors": 0.5}), "not a dict"),  # its strength was dropped
        (dict(dtype=torch.int8), "unknown dtype torch.int8; valid: fp32, bf16, fp16"),
        (dict(dtype=torch.float64), "unknown dtype torch.float64"),  # failed in generate
    ):
        with pytest.raises(ValueError, match=message):
            kinema.load(folder, device="cpu", **options)
    pipe = kinema.load(folder, device="cpu", dtype="FP32")  # any case
    video = np.zeros((9, 32, 32, 3), np.uint8)
    with pytest.raises(TypeError, match="request must be a Request, got str"):
        pipe.stream("a cat")  # was AttributeError: 'str' object has no attribute 'image'
    with pytest.raises(TypeError, match="run a Request with run"):
        pipe.generate(Request("a cat"))
    with pytest.raises(TypeError, match="progress must be a function"):
        pipe.generate("a cat", progress=5, **SETTINGS)  # failed after the first step
    with pytest.raises(ValueError, match="fps must be a number, got '16'"):
        pipe.extend(video, 0.5, "a cat", fps="16")
    with pytest.raises(ValueError, match="video to extend must be a path or"):
        pipe.extend(None, 0.5, "a cat")  # became text-to-video with frames=8
    with pytest.raises(ValueError, match="video array has no frames"):
        pipe.generate("a cat", video=video[:0], **SETTINGS)  # "frames -3 is not 4k+1"


def test_a_video_reads_as_one_is_extended_and_saved_home_relative(tmp_path, monkeypatch):
    """repr(video) printed every frame value; extend() refused what generate() returned;
    save("~/x.mp4") made a folder named "~"."""
    pipe = kinema.load(build_wan_folder(tmp_path / "wan"), device="cpu")
    video = pipe.generate("a cat", **SETTINGS)
    assert repr(video) == "Video(9 frames, 32x32, 16 fps, 0.56 s)"
    timed = {k: v for k, v in SETTINGS.items() if k != "frames"}
    assert len(pipe.generate("a cat", seconds=0.5, **timed)) == 9  # as the CLI's --seconds
    with pytest.raises(ValueError, match="give frames or seconds, not both"):
        pipe.generate("a cat", seconds=0.5, **SETTINGS)
    assert len(video) == 9 and all(f.shape == (32, 32, 3) for f in video)
    longer = pipe.extend(video, 0.5, "a cat", **{k: SETTINGS[k] for k in ("steps", "seed")})
    assert len(longer) == 17 and longer.fps == video.fps
    assert np.array_equal(longer.frames[:9], video.frames)
    restyled = pipe.generate("a dog", video=video, strength=0.5, steps=2, width=32, height=32)
    assert len(restyled) == 9 and restyled.fps == 16
    assert repr(kinema.Video(video.frames[:0], 0.0)) == "Video(0 frames, 32x32, 0 fps)"
    with pytest.raises(ValueError, match="seconds 1e\\+300 is over the most kinema makes"):
        pipe.generate("a cat", seconds=1e300, **timed)  # named frames, 300 digits long
    quick = {**timed, "steps": 1}  # None: the model's defaults (81 frames for Wan)
    made = pipe.generate("a cat", seconds=None, frames=None, prompts=None, **quick)
    assert len(made) == pipe.defaults.frames
    for bad, said in (("", "names no file"), (".", "names no file"), (None, "must be a path"),
                      ("~nouser-kinema/x.mp4", "no such user's home folder")):  # fmt: skip
        with pytest.raises(ValueError, match=said):  # pathlib's "has an empty name" before
            video.save(bad)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert video.save("~/clip.gif") == tmp_path / "clip.gif" and (tmp_path / "clip.json").is_file()


def test_request_warnings_name_the_callers_line(tmp_path):
    """They named kinema's own pipeline.py (a fixed stacklevel one call short)."""
    from kinema.pipeline import Request

    pipe = kinema.load(build_wan_folder(tmp_path / "wan"), device="cpu")
    with pytest.warns(UserWarning, match="guidance") as caught:
        pipe.generate("a cat", negative_prompt="dog", **{**SETTINGS, "guidance": 1.0})
        pipe.stream(Request("a cat", negative_prompt="dog", **{**SETTINGS, "guidance": 1.0}))
    assert [w.filename for w in caught] == [__file__, __file__]


def test_kinema_names_its_public_types():
    assert kinema.Request is kinema.pipeline.Request and kinema.Video is kinema.pipeline.Video
    assert "Pipeline" in kinema.__all__ and "Any" not in dir(kinema) and "Video" in dir(kinema)
