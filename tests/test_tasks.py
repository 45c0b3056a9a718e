"""Image-to-video, video-to-video, extension, long videos and timed prompts: one pipeline.

These run the real pipeline on a tiny random Wan folder; what is checked is the mechanics
(given frames kept, windows and memory bounded, prompts switched at the right frames). Quality
on a trained model is judged by ``kinema eval`` and the benchmarks.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch

import kinema
from kinema.io.video import write_video
from kinema.pipeline import Request, to_uint8
from tests.wan_tiny import build_wan_folder

BASE = dict(width=32, height=32, steps=2, guidance=1.0, seed=3)


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    return build_wan_folder(tmp_path_factory.mktemp("wan") / "wan")


@pytest.fixture(scope="module")
def pipe(wan_folder):
    p = kinema.load(wan_folder, device="cpu")
    p.defaults = dataclasses.replace(p.defaults, frames=9, fps=8)  # a 9-frame model window
    return p


def clip(frames: int = 9, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8)


def smooth(frames: int, size: int = 32) -> np.ndarray:
    """A square sliding right over a gradient: a clip a VAE can carry (random pixels it
    cannot)."""
    y, x = np.mgrid[:size, :size]
    video = np.zeros((frames, size, size, 3), np.uint8)
    video[..., 2] = (4 * x + 2 * y)[None] % 256
    for t in range(frames):
        video[t, 10:20, t : t + 10, 0] = 230
    return video


class Recorder:
    """Wraps a real component and records what it was called with."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, *args, **kwargs):
        self.calls.append(args)
        return self.fn(*args, **kwargs)


def test_extension_keeps_source_frames_and_adds_seconds(pipe, tmp_path):
    source = clip(9)
    path = write_video(tmp_path / "src.mp4", source, fps=8)
    from kinema.io.video import read_video

    decoded, _ = read_video(path)
    video = pipe.extend(path, seconds=2.0, prompt="a cat", **BASE)
    assert len(video.frames) == 9 + 16
    assert np.array_equal(video.frames[:9], decoded)  # the source stays as it was
    assert video.fps == 8


def test_an_extension_at_another_rate_says_its_source_plays_faster(pipe, tmp_path):
    """--fps 16 on an 8 fps source wrote the whole file at 16 fps without a word."""
    path = write_video(tmp_path / "src.mp4", clip(9), fps=8)
    with pytest.warns(UserWarning, match="made at 8 fps, plays at 2x its speed"):
        video = pipe.extend(path, seconds=1.0, prompt="a cat", fps=16, **BASE)
    assert video.fps == 16 and any("at 2x its speed" in w for w in video.info["warnings"])
    with pytest.warns(UserWarning, match="made at 8 fps, plays at 0.5x its speed"):
        pipe.extend(kinema.Video(clip(9), 8.0), seconds=1.0, prompt="a cat", fps=4, **BASE)
    with pytest.raises(ValueError, match="an extension needs frames: the new frames"):
        pipe.run(Request("a cat", extend=path, **BASE))  # it said "frames 9 must be ..."


def test_continuations_carry_the_decoder_error_across_the_seam(pipe, monkeypatch):
    """A window's first new frames take on the difference between the frame already in the
    video and the window's own decoding of it, fading to nothing over SEAM_FADE frames."""
    from kinema import pipeline as kp

    last = np.full((4, 4, 3), 100, np.uint8)
    decoded_last = np.full((4, 4, 3), 90, np.uint8)  # the VAE's version: 10 darker
    new = np.full((12, 4, 4, 3), 90, np.uint8)  # the model's continuation: a still scene
    out = kp.carry_seam(new, last, decoded_last, fade=8)
    steps = np.diff(np.concatenate([last[None], out]).astype(int), axis=0)[:, 0, 0, 0]
    assert np.abs(steps).max() <= 2  # without it: one jump of 10 at the seam
    assert out[0, 0, 0, 0] == round(90 + 10 * 8 / 9) and np.array_equal(out[8:], new[8:])
    saturated = kp.carry_seam(np.full((2, 4, 4, 3), 250, np.uint8), last + 100, decoded_last)
    assert saturated.max() == 255  # clipped, not wrapped around
    # in the pipeline: every window after the first is corrected against what precedes it
    carry = Recorder(kp.carry_seam)
    monkeypatch.setattr(kp, "carry_seam", carry)
    video = pipe.generate("a dog", frames=17, **BASE)
    assert len(carry.calls) == 2  # windows of 9, then 4 + 4 new frames
    new_frames, previous_last, _ = carry.calls[0]
    assert np.array_equal(previous_last, video.frames[8])
    assert np.array_equal(carry.fn(*carry.calls[0]), video.frames[9:13])


def test_a_clip_file_to_extend_is_streamed_not_held(pipe, tmp_path):
    """An extension's source file is read for its length, size and last frames only, and
    read again in pieces as the output is written: the output is the same as from the array."""
    from kinema.io.video import write_video
    from kinema.media import SourceClip

    source = smooth(23)
    path = write_video(tmp_path / "src", source, fps=8)  # PNG frames: lossless
    request = Request("a dog", extend=str(path), frames=4, **BASE)
    _, media, _ = pipe.prepare(request)
    clip_ = media["extend"]
    assert isinstance(clip_, SourceClip) and len(clip_) == 23
    assert np.array_equal(clip_.tail, source[-pipe.context_frames :])  # all it holds
    assert [len(piece) for piece in clip_.pieces()] == [16, 7]
    from_file = pipe.run(request).frames
    from_array = pipe.run(dataclasses.replace(request, extend=source)).frames
    assert np.array_equal(from_file, from_array) and np.array_equal(from_file[:23], source)


def test_long_video_runs_window_by_window_with_bounded_decode(pipe, monkeypatch):
    decode = Recorder(pipe.vae.decode)
    monkeypatch.setattr(pipe.vae, "decode", decode)
    video = pipe.generate("a dog", frames=41, **BASE)
    assert len(video.frames) == 41
    windows = len(decode.calls)
    assert windows == 1 + (41 - 9 + 3) // 4  # 9 frames, then 4 new frames (+5 context) each
    assert max(args[0].shape[2] for args in decode.calls) == 3  # never more than one window
    assert video.info["transformer_evaluations"] == 2 * windows


@pytest.mark.parametrize(
    "task",
    [
        dict(frames=25),
        dict(extend="source", frames=8),
        dict(video="source", strength=0.5),
        dict(frames=17, prompts=((0.5, "a cow"),), switch="cut"),
        dict(frames=13, image="first"),
    ],
)
def test_save_writes_each_window_as_it_comes_and_the_frames_run_makes(
    pipe, tmp_path, monkeypatch, task
):
    """Pipeline.save (what the CLI calls) streams the windows into the file: the frames of
    earlier windows are written before later ones are made, and they are run()'s frames."""
    from kinema.io import video as io_video
    from kinema.io.video import read_video

    media = {"source": clip(9), "first": clip(1)[0]}
    task = {k: media.get(v, v) if isinstance(v, str) else v for k, v in task.items()}
    request = Request(prompt="a dog", **BASE, **task)
    pulled, seen_by_window = [0], []

    def counting(frames):
        for frame in frames:
            pulled[0] += 1
            yield frame

    write = io_video.write_video
    monkeypatch.setattr(
        io_video, "write_video", lambda p, f, *a, **k: write(p, counting(f), *a, **k)
    )
    one_window = pipe.one_window
    monkeypatch.setattr(
        pipe, "one_window", lambda *a: seen_by_window.append(pulled[0]) or one_window(*a)
    )
    saved = pipe.save(request, tmp_path / "frames", info={"batch_id": "b1"})  # PNGs: lossless
    windows = list(seen_by_window) if "video" not in task else []
    want = pipe.run(request)
    written, fps = read_video(saved.path)
    assert np.array_equal(written, want.frames) and saved.frames == len(want.frames)
    stream = pipe.stream(request)
    assert stream.total == len(want.frames)  # known before the first frame
    assert np.array_equal(np.stack(list(stream)), want.frames) and stream.made == stream.total
    with pytest.raises(RuntimeError, match="runs once"):
        next(iter(stream))
    assert fps == saved.fps == want.fps
    assert windows == sorted(windows) and (len(windows) < 2 or windows[-1] > windows[0])
    if task == {"frames": 25}:  # 5 windows, written one by one
        assert windows == [0, 9, 13, 17, 21]
    info = json.loads(saved.path.with_suffix(".json").read_text())
    assert info["transformer_evaluations"] == want.info["transformer_evaluations"]
    assert info["timings"]["write"] >= 0 and info["prompt"] == "a dog"
    assert info["batch_id"] == saved.info["batch_id"] == "b1"


def test_timed_prompts_blend_switches_at_the_given_second(pipe, monkeypatch):
    denoise = Recorder(pipe.denoise)
    monkeypatch.setattr(pipe, "denoise", denoise)
    pipe.generate("first", frames=17, prompts=((1.0, "second"),), switch="blend", **BASE)
    tokens = pipe.text_encoder.encode(["first", "second"])[0]  # (2, L, D)
    first, switching, second = (call[3][0] for call in denoise.calls)  # three windows
    # window 1: frames 0-8, latent frames start at 0, 1, 5 -> "first" throughout: one context
    torch.testing.assert_close(first, tokens[:1].to(first.dtype))
    # window 2: frames 4-12 (4-8 given), latent frames start at 4, 5, 9 -> "second" from 9 on
    assert switching.shape[:2] == (1, 3)  # one context per latent frame
    torch.testing.assert_close(switching[0], tokens[[0, 0, 1]].to(first.dtype))
    torch.testing.assert_close(second, tokens[1:].to(first.dtype))  # window 3: frames 8-16
    # each latent frame's neighbouring prompt, for the contrast: only where a window switches
    neighbours = [call[3][2] for call in denoise.calls]
    assert neighbours[0] is None and neighbours[2] is None
    torch.testing.assert_close(neighbours[1][0], tokens[[1, 1, 0]].to(first.dtype))


def test_blend_contrast_acts_only_on_windows_that_switch(pipe):
    """``contrast`` (default 1) steers each frame of a switching window away from its
    neighbouring prompt; 0 is plain guidance, and a clip without a switch ignores it. The
    DiT is still called once a step (one batch holding the prompt and the neighbours)."""
    timed = dict(frames=9, prompts=((0.5, "second"),), **BASE)
    default, off = pipe.generate("first", **timed), pipe.generate("first", contrast=0, **timed)
    assert default.info["contrast"] == 1.0 and off.info["contrast"] == 0
    assert not np.array_equal(default.frames, off.frames)
    assert default.info["transformer_evaluations"] == off.info["transformer_evaluations"] == 2
    plain = pipe.generate("first", frames=9, **BASE)
    with pytest.warns(UserWarning, match="act on timed prompts"):  # and says so
        ignored = pipe.generate("first", frames=9, contrast=5, **BASE)
    assert np.array_equal(plain.frames, ignored.frames)
    for bad in (-1, float("inf"), "strong"):
        with pytest.raises(ValueError, match="contrast .* must be a number >= 0"):
            pipe.prepare(Request("first", contrast=bad, **timed))


def test_a_switch_too_late_to_change_the_clip_is_refused_naming_the_latest(pipe):
    """A time that snapped past the last latent step's first frame changed nothing, silently
    (the frames equal those without it), while the sidecar listed it."""
    plain = pipe.generate("a cat", frames=17, **BASE)
    latest = pipe.generate("a cat", frames=17, prompts=[(1.5, "a dog")], **BASE)
    assert not np.array_equal(latest.frames, plain.frames)  # 1.5 s: frame 12, the last step
    with pytest.raises(ValueError, match="the latest time that changes the clip is 1.5 s"):
        pipe.generate("a cat", frames=17, prompts=[(1.9, "a dog")], **BASE)
    with pytest.raises(ValueError, match="the latest time that changes the clip is 0.5 s"):
        pipe.extend(plain, seconds=1, prompt="a cat", prompts=[(0.9, "a dog")], **BASE)


def test_timed_prompts_cut_ends_a_whole_window_at_the_switch(pipe, monkeypatch):
    from kinema import pipeline as kp

    denoise = Recorder(pipe.denoise)
    monkeypatch.setattr(pipe, "denoise", denoise)
    decoded = []
    monkeypatch.setattr(kp, "to_uint8", lambda v: decoded.append(to_uint8(v)) or decoded[-1])
    video = pipe.generate("first", frames=17, prompts=((0.5, "second"),), switch="cut", **BASE)
    tokens = pipe.text_encoder.encode(["first", "second"])[0]  # (2, L, D)
    contexts = [call[3][0] for call in denoise.calls]
    # a whole 9-frame window under "first", kept up to frame 4 (latent frame 2 would be
    # "second"); then windows of 5 given + 4 new frames, each under "second" alone
    assert [c.shape[:2] for c in contexts] == [(1, tokens.shape[1])] * 4
    torch.testing.assert_close(contexts[0], tokens[:1].to(contexts[0].dtype))
    for c in contexts[1:]:
        torch.testing.assert_close(c, tokens[1:].to(c.dtype))
    assert [len(d) for d in decoded] == [9, 9, 9, 9] and len(video.frames) == 17
    assert np.array_equal(video.frames[:5], decoded[0][:5])
    assert not np.array_equal(video.frames[5:9], decoded[0][5:])  # the look-ahead is dropped


def test_image_condition_is_kept_in_the_first_latent_frame(pipe, monkeypatch):
    image = clip(1)[0]
    denoise = Recorder(pipe.denoise)
    monkeypatch.setattr(pipe, "denoise", denoise)
    a = pipe.generate("a cat", frames=9, image=image, **BASE)
    b = pipe.generate("a cat", frames=9, **BASE)
    assert not np.array_equal(a.frames, b.frames)
    cond = denoise.calls[0][4]
    assert cond.mask.tolist() == [True, False, False]
    given = pipe.encode(image[None])
    assert torch.allclose(cond.latents[:, :, :1], given)


def test_sources_under_the_home_folder_are_found_by_tilde(pipe, tmp_path, monkeypatch):
    """~/clip.mp4 was "No such file" for sources, while outputs expanded it."""
    from PIL import Image

    monkeypatch.setenv("HOME", str(tmp_path))
    write_video(tmp_path / "clip.mp4", smooth(9), fps=8)
    Image.fromarray(smooth(1)[0]).save(tmp_path / "start.png")
    assert len(pipe.generate("a cat", video="~/clip.mp4", seconds=1, **BASE)) == 9
    assert len(pipe.extend("~/clip.mp4", seconds=0.5, prompt="a cat", **BASE)) == 13
    assert len(pipe.generate("a cat", image="~/start.png", frames=5, **BASE)) == 5


def test_a_pil_image_in_any_mode_is_the_same_condition_as_its_pixels(pipe):
    from PIL import Image

    image = clip(1)[0]
    want = pipe.generate("a cat", frames=5, image=image, **BASE).frames
    rgba = Image.fromarray(image).convert("RGBA")  # e.g. a PNG with alpha, opened by the user
    assert np.array_equal(pipe.generate("a cat", frames=5, image=rgba, **BASE).frames, want)


def test_video_to_video_follows_source_length_and_strength(pipe):
    source = clip(9)  # one window of this model
    weak = pipe.generate("a cat", video=source, strength=0.01, **BASE)
    strong = pipe.generate("a cat", video=source, strength=1.0, **BASE)
    assert len(weak.frames) == 9 and weak.info["strength"] == 0.01
    plain = pipe.run(Request("a cat", frames=9, **BASE))
    roundtrip = pipe.decode(pipe.encode(source))
    rt = ((roundtrip[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    weak_err = np.abs(weak.frames.astype(int) - rt.astype(int)).mean()
    strong_err = np.abs(strong.frames.astype(int) - rt.astype(int)).mean()
    assert weak_err < strong_err / 4  # a light touch keeps the source, a full one does not
    assert not np.array_equal(strong.frames, plain.frames)  # noised from the source, not text


def test_a_restyles_seconds_are_counted_at_its_sources_rate(pipe, wan_folder, tmp_path):
    """--seconds 1 of a 24 fps source made 9 frames (1 s at the model's 8 fps) played at 24
    fps: 0.33 s."""
    from kinema.cli import main

    source = write_video(tmp_path / "24fps.mp4", smooth(40), fps=24)
    video = pipe.generate("a cat", video=str(source), seconds=1, **BASE)
    assert (len(video), video.fps) == (25, 24)  # 1 s at 24 fps, 4k+1 frames
    again = pipe.generate("a cat", video=video, seconds=0.5, **BASE)  # a Video: its own rate
    assert (len(again), again.fps) == (13, 24)
    out = tmp_path / "cli.mp4"
    argv = ["generate", "a cat", "--model", str(wan_folder), "--video", str(source), "--seconds",
            "1", "--size", "32x32", "--steps", "1", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    info = json.loads(out.with_suffix(".json").read_text())
    assert (info["frames"], info["fps"]) == (25, 24)


def test_a_video_given_another_fps_is_resampled_not_relabelled(pipe):
    """A Video at 8 fps restyled at fps=16 was its frames played twice as fast."""
    source = kinema.Video(smooth(9), 8.0, {})  # 1 s
    video = pipe.generate("a cat", video=source, fps=16, **BASE)
    assert (len(video), video.fps) == (17, 16)  # 1 s at 16 fps: each frame twice


def test_video_to_video_switches_prompts_per_latent_frame(pipe, monkeypatch):
    """A restyle's timed prompts blend per latent frame, checked before anything runs
    (``prepare``), as every request's are."""
    denoise = Recorder(pipe.denoise)
    monkeypatch.setattr(pipe, "denoise", denoise)
    timed = ((0.5, "second"),)
    video = pipe.generate("first", video=clip(9), fps=8, prompts=timed, **BASE)
    tokens = pipe.text_encoder.encode(["first", "second"])[0]  # (2, L, D)
    (context,) = (call[3][0] for call in denoise.calls)  # one window
    # 9 frames at 8 fps: latent frames start at 0, 1, 5; the switch at 0.5 s is frame 4
    torch.testing.assert_close(context[0], tokens[[0, 0, 1]].to(context.dtype))
    neighbours = denoise.calls[0][3][2]
    torch.testing.assert_close(neighbours[0], tokens[[1, 1, 0]].to(context.dtype))
    assert video.info["prompts"] == [[0.5, "second"]] and len(video.frames) == 9
    with pytest.raises(ValueError, match="prompt time 2 s is outside the clip"):
        pipe.prepare(Request("x", video=clip(13), fps=8, prompts=((2.0, "late"),), **BASE))
    with pytest.raises(ValueError, match="video-to-video restyles the source frame for frame"):
        pipe.prepare(Request("x", video=clip(13), prompts=timed, switch="cut", **BASE))


def test_a_long_source_is_restyled_window_by_window(pipe, monkeypatch):
    """A source longer than the model's window (9 frames here) is restyled as a long video is
    made: the first window is the restyle of its first 9 frames alone; each later one is
    given the last 5 restyled frames clean and goes on with the source's next frames, and no
    decode is longer than a window (it was one pass over the whole source)."""
    source = smooth(21)
    decode, one_window = Recorder(pipe.vae.decode), Recorder(pipe.one_window)
    monkeypatch.setattr(pipe.vae, "decode", decode)
    monkeypatch.setattr(pipe, "one_window", one_window)
    long = pipe.generate("a cat", video=source, strength=0.5, **BASE)
    assert len(long.frames) == 21 and len(one_window.calls) == 4  # 9, then 4 new each
    assert max(args[0].shape[2] for args in decode.calls) == 3  # latent frames: one window
    head = pipe.generate("a cat", video=source[:9], strength=0.5, **BASE)
    assert np.array_equal(long.frames[:9], head.frames)
    _, window, cond, _, _, chunk = one_window.calls[1]
    assert (window.context, window.frames) == (5, 9)
    assert np.array_equal(chunk[:5], long.frames[4:9])  # the restyled frames, not the source's
    assert np.array_equal(chunk[5:], source[9:13])
    assert cond.mask.tolist() == [True, True, False]  # 5 frames: 2 latent frames given
    torch.testing.assert_close(cond.latents[:, :, :2], pipe.encode(long.frames[4:9]))
    err = np.abs(long.frames.astype(int) - source.astype(int)).mean(axis=(1, 2, 3))
    assert err[9:].mean() < 2 * err[:9].mean() + 5  # later windows follow the source too


def test_a_source_file_to_restyle_is_streamed_not_held(pipe, monkeypatch, tmp_path):
    """A video-to-video source file is counted once when the request is prepared, then read,
    resampled and fitted a window at a time as the restyle goes: the output is the one the
    whole source read first gives."""
    import kinema.media
    from kinema.io.video import iter_video, read_video, resize_center_crop

    big = np.stack([np.kron(f, np.ones((2, 2, 1), np.uint8)) for f in smooth(41)])  # 64x64
    path = write_video(tmp_path / "src", big, fps=16)  # PNG frames: lossless
    request = Request("a cat", video=str(path), fps=8, strength=0.5, **BASE)
    req, media, _ = pipe.prepare(request)
    assert isinstance(media["video"], kinema.media.RestyleSource)
    assert (req.frames, req.fps, len(media["video"])) == (21, 8, 21)  # 41 frames at 16 -> 8 fps
    pulled: list[int] = []

    def counted(*args):
        for frame in iter_video(*args):
            pulled.append(len(pulled))
            yield frame

    read_by_window: list[int] = []
    one_window = pipe.one_window

    def window(*args):
        read_by_window.append(len(pulled))
        return one_window(*args)

    monkeypatch.setattr(kinema.media, "iter_video", counted)
    monkeypatch.setattr(pipe, "one_window", window)
    from_file = pipe.run(request).frames
    monkeypatch.undo()
    assert read_by_window == [9, 13, 17, 21]  # windows of 9, then 4 new source frames each
    whole = resize_center_crop(read_video(path, fps=8)[0], 32, 32)
    from_array = pipe.run(dataclasses.replace(request, video=whole, fps=None)).frames
    assert np.array_equal(from_file, from_array)


def test_request_takes_timed_prompts_as_json_gives_them():
    """[[seconds, prompt], ...] (JSON, the HTTP API's job store) becomes tuples."""
    assert Request("a", prompts=[[1, "b"], [2.5, "c"]]).prompts == ((1.0, "b"), (2.5, "c"))


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(video=clip(9), strength=0.0), "strength 0.0 must be in"),
        (dict(video=clip(9), strength=1.5), "strength 1.5 must be in"),
        (dict(extend=clip(3)), "at least 5 are needed"),
        (dict(extend=clip(9, 24)), "multiples of 16"),
        (dict(prompts=((0.5, "b"), (0.25, "c"))), "must increase"),
        (dict(prompts=((9.0, "b"),)), "outside the clip"),
        (dict(prompts=((0.5, "b"),), switch="fade"), "valid: blend, cut"),
        (dict(image="/nonexistent.png"), "nonexistent.png"),
        (dict(strength=0.5), "strength 0.5 is video-to-video's noise level: give a video"),
        (dict(image=clip(1)[0], video=clip(9)), "image \\(image-to-video\\) or video"),
        (dict(image=clip(1)[0], extend=clip(9)), "image \\(image-to-video\\) or extend"),
        (dict(image=np.zeros((0, 0, 3), np.uint8)), "image array is empty: 0x0 pixels"),
        (dict(image=b"\x89PNG"), "image must be a path, a PIL image or a uint8"),
        (dict(video="https://example.com/a.mp4"), "video https://example.com/a.mp4: URLs are"),
        (dict(image="-"), "image '-': standard input is not read"),
        (dict(seed=None), "seed must be an integer \\(0 when not given\\), got None"),
        (dict(prompts=((0.5, "b"), (0.55, "c"))), "0.5 s and 0.55 s both switch at frame 4"),
    ],
)
def test_bad_conditioning_input(pipe, settings, message):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bad input is the error alone, no warning before it
        with pytest.raises(ValueError, match=message):
            pipe.generate("x", **{"frames": 9, **BASE, **settings})


def test_messages_name_what_to_do_instead(pipe, tmp_path):
    """A strength on an extension said "give a video to restyle too" (then refused one beside
    it); a closed PIL image said "Operation on closed image"; an mp4 as the image said only
    that Pillow cannot identify it, with FFmpeg's error number."""
    from PIL import Image

    with pytest.raises(ValueError, match="an extension keeps its source and takes none"):
        pipe.extend(clip(9), seconds=0.5, prompt="a cat", strength=0.5, **BASE)
    closed = Image.new("RGB", (32, 32))
    closed.close()
    with pytest.raises(ValueError, match="cannot read the PIL image given"):
        pipe.generate("a cat", image=closed, frames=5, **BASE)
    video = write_video(tmp_path / "clip.mp4", clip(5), fps=8)
    with pytest.raises(ValueError, match=r"\(a video: give it as the video to restyle or"):
        pipe.generate("a cat", image=str(video), frames=5, **BASE)


def test_extend_refuses_frames_and_urls_by_name(pipe):
    with pytest.raises(ValueError, match="extend\\(\\) takes no frames=: the video comes first"):
        pipe.extend(clip(9), seconds=0.5, prompt="x", frames=9, **BASE)
    with pytest.raises(ValueError, match="video to extend http://x/a.mp4: URLs are not read"):
        pipe.extend("http://x/a.mp4", seconds=0.5, prompt="x", **BASE)


def test_an_extensions_sidecar_counts_source_and_output_frames(pipe, tmp_path):
    saved = pipe.save(Request("x", extend=clip(9), frames=4, fps=8, **BASE), tmp_path / "e.mp4")
    assert saved.frames == 13
    sidecar = json.loads((tmp_path / "e.json").read_text())
    assert (sidecar["frames"], sidecar["source_frames"], sidecar["output_frames"]) == (4, 9, 13)
    assert "source_frames" not in pipe.generate("x", frames=5, **BASE).info  # not extensions


def test_a_streams_info_is_ready_after_its_last_frame(pipe):
    stream = pipe.stream(Request("x", frames=9, **BASE))
    with pytest.raises(RuntimeError, match="after the last frame; 0 of 9 made so far"):
        stream.info()
    assert len(list(stream)) == 9 and stream.info()["transformer_evaluations"] == 2


def test_a_negative_prompt_that_acts_on_nothing_is_warned_about(pipe):
    with pytest.warns(UserWarning, match="acts only with guidance > 1; at guidance 1 it changes"):
        video = pipe.generate("x", frames=5, negative_prompt="blurry", **BASE)
    assert len(video.info["warnings"]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.generate("x", frames=5, negative_prompt="", **BASE)  # none given: nothing said
        pipe.generate("x", frames=5, negative_prompt="blurry", **{**BASE, "guidance": 2.0})


def test_a_short_source_cut_to_4k_plus_1_frames_is_said(pipe):
    with pytest.warns(UserWarning, match="the source's 7 are cut to 5"):
        video = pipe.generate("x", video=clip(7), **BASE)
    assert len(video.frames) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.generate("x", video=clip(9), **BASE)  # 4k+1 already: nothing to say


def test_switch_or_contrast_without_timed_prompts_is_warned_about(pipe):
    for settings in ({"switch": "cut"}, {"contrast": 2.0}):
        with pytest.warns(UserWarning, match="switch and contrast act on timed prompts"):
            video = pipe.generate("x", frames=5, **BASE, **settings)
        assert video.info["warnings"] == [
            "switch and contrast act on timed prompts (--at, prompts=); this request has none, "
            "so they change nothing"
        ]


def test_undecodable_image(pipe, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        pipe.generate("x", frames=9, image=str(bad), **BASE)


def test_step_cache_through_the_pipeline(pipe):
    """cache=None and a tiny threshold give the plain video; a large one skips DiT calls."""
    settings = {**BASE, "steps": 8, "frames": 9}
    plain = pipe.generate("a cat", **settings)
    tight = pipe.generate("a cat", cache=1e-9, **settings)
    loose = pipe.generate("a cat", cache=10.0, **settings)
    assert np.array_equal(plain.frames, tight.frames)
    assert plain.info["transformer_evaluations"] == 8
    assert loose.info["transformer_evaluations"] < 8 and loose.info["cache"] == 10.0


def test_a_far_smaller_image_is_warned_about_and_noted(pipe):
    small = np.full((8, 12, 3), 200, np.uint8)  # under half of 32x32 in both sides
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        video = pipe.generate("a cat", frames=5, image=small, **BASE)
    (said,) = video.info["warnings"]
    assert said == (
        "input 12x8 is far smaller than the request 32x32 (width 12 < 32 / 2, "
        "height 8 < 32 / 2); upscaling it"
    )  # which side, for a 2000x10 one
    assert [str(w.message) for w in shown] == [said]  # and nothing else (e.g. from torch)
    fits = pipe.generate("a cat", frames=5, image=np.full((20, 20, 3), 200, np.uint8), **BASE)
    assert fits.info["warnings"] == []


def test_a_sources_sound_is_said_to_be_left_out(pipe, tmp_path):
    from tests.test_video_io import write_with_sound

    write_with_sound(tmp_path / "phone.mp4", smooth(9))
    with pytest.warns(UserWarning, match="phone.mp4 has sound; the extension is video only"):
        video = pipe.extend(str(tmp_path / "phone.mp4"), seconds=0.5, prompt="x", **BASE)
    assert len(video.frames) == 13 and video.info["output_frames"] == 13
    with pytest.warns(UserWarning, match="phone.mp4 has sound; the restyle is video only"):
        pipe.generate("x", video=str(tmp_path / "phone.mp4"), **BASE)


def test_contrast_with_cut_switches_is_said_to_change_nothing(pipe):
    with pytest.warns(UserWarning, match="with switch 'cut' it changes nothing"):
        pipe.generate("x", frames=9, prompts=[(0.5, "y")], switch="cut", contrast=2.0, **BASE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.generate("x", frames=9, prompts=[(0.5, "y")], contrast=2.0, **BASE)  # blend: acts


def test_a_variable_rate_source_keeps_its_timing(pipe, tmp_path):
    """A variable-frame-rate file (a screen or phone recording: here 16 fps for 0.5 s, then
    a frame every 3/16 s) was restyled frame for frame at its reported 16 fps, so it played
    in half its time; a 12.5 fps clip was written at 12. Now read at the rate it plays."""
    from fractions import Fraction

    import av

    path = tmp_path / "vfr.mkv"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=16)
        stream.width = stream.height = 32
        stream.pix_fmt, stream.codec_context.time_base = "yuv420p", Fraction(1, 16)
        for k in range(17):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), k * 12, np.uint8), "rgb24")
            frame.pts, frame.time_base = (k if k < 8 else 3 * k - 16), Fraction(1, 16)
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    req, media, _ = pipe.prepare(Request("a cat", video=str(path), strength=0.5, **BASE))
    assert (req.fps, req.frames) == (16, 33)  # 2.06 s at 16 fps, as it plays
    shown = [int(round(f.mean() / 12)) for f in media["video"].frames()]
    assert shown[:9] == list(range(9)) and shown[9:12] == [8, 9, 9]  # the slow part held
    slow = write_video(tmp_path / "slow.gif", clip(9), fps=12.5)
    assert pipe.prepare(Request("a cat", extend=str(slow), frames=4, **BASE))[0].fps == 12.5


def test_a_still_image_given_as_the_video_is_said_to_be_one_frame(pipe, tmp_path):
    """A JPEG given as --video made a 1-frame "video" without a word."""
    from PIL import Image

    Image.fromarray(clip(1)[0]).save(tmp_path / "still.png")
    with pytest.warns(UserWarning, match="a single frame .* give it as the image"):
        video = pipe.generate("a cat", video=str(tmp_path / "still.png"), strength=0.5, **BASE)
    assert len(video.frames) == 1


def test_a_sources_warnings_reach_the_sidecar_once_and_slow_sources_restyle(pipe, tmp_path):
    """An HDR source's warning was printed twice (the counting pass and the restyle pass),
    named kinema's own file and was not in the sidecar; a source under 1 fps was refused
    ("fps 0.67 must be >= 1") though the user gave no fps."""
    import av

    with av.open(str(tmp_path / "hlg.mp4"), "w") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.color_trc = 18  # HLG
        for frame in clip(9):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    with pytest.warns(UserWarning, match="is HDR") as caught:
        video = pipe.generate("a cat", video=str(tmp_path / "hlg.mp4"), strength=0.5, **BASE)
    hdr = [w for w in caught if "is HDR" in str(w.message)]
    assert len(hdr) == 1 and hdr[0].filename == __file__
    assert sum("is HDR" in w for w in video.info["warnings"]) == 1
    slow = write_video(tmp_path / "slow", clip(5), fps=0.5)  # PNG frames, 2 s apart
    with pytest.warns(UserWarning, match="the source's 10 are cut to 9"):  # 10 s at 1 fps
        req, _, _ = pipe.prepare(Request("a cat", video=str(slow), strength=0.5, **BASE))
    assert req.fps == 1 and req.frames == 9  # each frame held twice
