"""kinema.io.video: round trips through every format, timing, metadata, atomicity, errors."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
from PIL import Image

from kinema.io.video import (
    has_audio,
    probe,
    read_clip,
    read_image,
    read_metadata,
    read_video,
    resize_center_crop,
    rgb_image,
    write_sidecar,
    write_video,
)


def smooth_clip(frames: int = 12, height: int = 48, width: int = 64) -> np.ndarray:
    """A smooth moving colour pattern, uint8 (T, H, W, 3)."""
    t, y, x = np.meshgrid(
        np.arange(frames), np.arange(height), np.arange(width), indexing="ij"
    )  # each (T, H, W)
    r = 128 + 80 * np.sin(2 * np.pi * (x / width + t / frames))
    g = 128 + 80 * np.cos(2 * np.pi * (y / height - t / frames))
    b = 128 + 60 * np.sin(2 * np.pi * (x + y) / (width + height))
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


def brightness_clip(frames: int, step: int = 8, size: int = 16) -> np.ndarray:
    """Frame i is a flat grey of value ``step * i``: uint8 (T, size, size, 3)."""
    values = (np.arange(frames) * step).astype(np.uint8)
    return np.broadcast_to(values[:, None, None, None], (frames, size, size, 3)).copy()


def frame_indices(video: np.ndarray, step: int = 8) -> list[int]:
    """Recover i from frames made by :func:`brightness_clip`."""
    return [int(round(v)) for v in video.reshape(len(video), -1).mean(axis=1) / step]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse)) if mse > 0 else float("inf")


def test_mp4_round_trip_is_h264_yuv420p_faststart(tmp_path):
    clip = smooth_clip()
    out = write_video(tmp_path / "sub" / "clip.mp4", clip, 16)
    frames, fps = read_video(out)
    assert frames.shape == clip.shape and fps == 16
    assert psnr(frames, clip) > 35
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
    data = out.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # +faststart
    info = probe(out)
    assert (info.width, info.height, info.frames, info.fps, info.codec) == (64, 48, 12, 16, "h264")
    assert info.duration == pytest.approx(12 / 16)


def test_mp4_metadata_round_trip(tmp_path):
    meta = {"title": "a cat on a skateboard", "comment": "seed=7", "kinema_sampler": "unipc"}
    out = write_video(tmp_path / "m.mp4", smooth_clip(4), 8, metadata=meta)
    assert meta.items() <= read_metadata(out).items()


@pytest.mark.parametrize("suffix, min_psnr", [(".gif", 25), (".webp", 30)])
def test_animated_image_round_trip(tmp_path, suffix, min_psnr):
    clip = smooth_clip()
    clip[5] = clip[4]  # identical neighbours get merged by the encoders: count must survive
    meta = {"title": "a dog", "comment": "seed=3"}
    out = write_video(tmp_path / f"a{suffix}", clip, 20, metadata=meta)
    frames, fps = read_video(out)
    assert frames.shape == clip.shape and fps == 20
    assert psnr(frames, clip) > min_psnr
    assert read_metadata(out) == meta
    info = probe(out)
    assert (info.frames, info.fps, info.codec) == (12, 20, suffix[1:])
    with Image.open(out) as image:
        assert image.info["loop"] == 0


@pytest.mark.parametrize("fps", [16, 30])
def test_a_gif_plays_at_its_rate_on_average(tmp_path, fps):
    """GIF delays are whole centiseconds: one delay of 6 cs (16 fps) or 3 cs (30 fps) played
    16.67 or 33.3 fps while the sidecar said 16 or 30; now each frame is shown at its time to
    the nearest centisecond, and kinema reads the rate back."""
    out = write_video(tmp_path / "a.gif", smooth_clip(17), fps)
    with Image.open(out) as image:
        delays = []
        for k in range(image.n_frames):
            image.seek(k)
            delays.append(image.info["duration"])
    assert abs(sum(delays[:16]) / 1000 - 16 / fps) <= 0.005  # 16 / fps s, to the nearest cs
    assert read_video(out)[1] == fps


def test_a_gif_over_50_fps_keeps_2_cs_delays(tmp_path):
    """60 fps wrote delays of 1 and 2 cs; a 1 cs delay plays (and was read back) as 10."""
    out = write_video(tmp_path / "a.gif", smooth_clip(17), 60)
    with Image.open(out) as image:
        delays = []
        for k in range(image.n_frames):
            image.seek(k)
            delays.append(image.info["duration"])
    assert set(delays) == {20} and len(read_video(out)[0]) == 17


def test_png_folder_round_trip_is_exact(tmp_path):
    clip = smooth_clip(5)
    out = write_video(str(tmp_path / "frames") + "/", clip, 12.5, metadata={"title": "x"})
    assert sorted(p.name for p in out.iterdir()) == [f"frame_{i:05d}.png" for i in range(5)]
    frames, fps = read_video(out)
    assert np.array_equal(frames, clip) and fps == 12.5
    assert read_metadata(out) == {"title": "x"}
    assert probe(out).frames == 5
    write_video(out, clip[:2], 12.5)  # rewriting replaces the whole folder
    assert len(list(out.iterdir())) == 2


def test_resample_to_fps_picks_nearest_frames(tmp_path):
    out = write_video(tmp_path / "b.mp4", brightness_clip(30), 30)
    down, fps = read_video(out, fps=10)
    assert fps == 10 and frame_indices(down) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
    up, _ = read_video(out, fps=60, max_frames=7)
    assert frame_indices(up) == [0, 0, 1, 1, 2, 2, 3]
    assert frame_indices(read_video(out, max_frames=4)[0]) == [0, 1, 2, 3]


def test_read_clip_seeks_and_stops_at_the_end(tmp_path):
    path = tmp_path / "gop.mp4"  # short GOPs so that seeking lands on a real keyframe
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width = stream.height = 16
        stream.pix_fmt, stream.codec_context.gop_size = "yuv420p", 4
        for frame in brightness_clip(30):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    clip = read_clip(path, start=0.5, frames=4, fps=10)
    assert frame_indices(clip) == [15, 18, 21, 24]
    assert frame_indices(read_clip(path, start=0.7, frames=5, fps=10)) == [21, 24, 27]


def test_failed_write_leaves_nothing_behind(tmp_path):
    def frames():
        yield np.zeros((16, 16, 3), np.uint8)
        yield np.zeros((16, 18, 3), np.uint8)  # wrong size, met after the file was opened

    for name in ("x.mp4", "x.gif", "x.webp", "x"):
        with pytest.raises(ValueError, match=r"frame 1 has shape \(16, 18, 3\)"):
            write_video(tmp_path / name, frames(), 8)
    assert list(tmp_path.iterdir()) == []
    keep = write_video(tmp_path / "keep.mp4", smooth_clip(2), 8)
    before = keep.read_bytes()
    with pytest.raises(ValueError):
        write_video(keep, frames(), 8)
    assert keep.read_bytes() == before and list(tmp_path.iterdir()) == [keep]


def test_a_frame_folder_never_replaces_a_folder_of_other_files(tmp_path):
    """PNG frames replace their folder whole: a folder of the user's files (``-o ~/Videos``)
    was deleted; now refused with the files kept. An earlier frame output is replaced."""
    mine = tmp_path / "videos"
    mine.mkdir()
    (mine / "holiday.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"holding other files \(holiday.txt\)"):
        write_video(mine, smooth_clip(2), 8)
    assert [p.name for p in mine.iterdir()] == ["holiday.txt"]
    frames = write_video(tmp_path / "frames", smooth_clip(3), 8)
    write_video(frames, smooth_clip(2), 8)
    assert sorted(p.name for p in frames.iterdir()) == ["frame_00000.png", "frame_00001.png"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a writable folder"):  # was FileExistsError
        write_video(tmp_path / "file" / "x.mp4", smooth_clip(2), 8)


def test_bad_writes_name_the_problem(tmp_path):
    clip = smooth_clip(2)
    with pytest.raises(ValueError, match=r"'\.avi'.*valid: \('\.mp4', '\.gif', '\.webp'"):
        write_video(tmp_path / "x.avi", clip, 8)
    with pytest.raises(ValueError, match="even width and height; got 33x32"):
        write_video(tmp_path / "odd.mp4", smooth_clip(2, 32, 33), 8)
    with pytest.raises(ValueError, match=r"frames shape \(48, 64, 3\) must be \(T, H, W, 3\)"):
        write_video(tmp_path / "y.mp4", clip[0], 8)
    with pytest.raises(ValueError, match="fps 0 must be"):
        write_video(tmp_path / "y.mp4", clip, 0)
    with pytest.raises(ValueError, match="dtype float32"):
        write_video(tmp_path / "y.mp4", clip.astype(np.float32), 8)
    assert list(tmp_path.iterdir()) == []


def test_corrupted_or_missing_video_raises_value_error(tmp_path):
    bad = tmp_path / "x.mp4"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    for read in (read_video, probe, read_metadata):
        with pytest.raises(ValueError, match=f"cannot decode video {bad}"):
            read(bad)
    with pytest.raises(ValueError, match="cannot decode video .*nope.webm: no such file"):
        read_video(tmp_path / "nope.webm")
    (tmp_path / "x.gif").write_bytes(b"GIF89a" + bytes(20))
    with pytest.raises(ValueError, match="cannot decode video"):
        read_video(tmp_path / "x.gif")


def test_sidecar_sits_beside_the_output(tmp_path):
    out = write_video(tmp_path / "cat.webp", smooth_clip(2), 8)
    side = write_sidecar(out, {"prompt": "a cat", "seed": 7})
    assert side == tmp_path / "cat.json"
    assert json.loads(side.read_text()) == {"prompt": "a cat", "seed": 7}
    assert write_sidecar(str(tmp_path / "frames") + "/", {}) == tmp_path / "frames.json"


def test_read_image_converts_to_rgb(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    rgb = read_image(tmp_path / "g.png")
    assert rgb.shape == (3, 4, 3) and np.array_equal(rgb[..., 1], gray)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode image .*bad.jpg"):
        read_image(tmp_path / "bad.jpg")


def test_resize_center_crop_equals_resize_then_crop():
    image = smooth_clip(1, 50, 100)[0]
    ours = resize_center_crop(image, 24, 24)  # scale 0.48: 48 x 24, then columns 12..36
    full = np.asarray(Image.fromarray(image).resize((48, 24), Image.Resampling.LANCZOS))
    assert ours.shape == (24, 24, 3)
    assert np.abs(ours.astype(int) - full[:, 12:36]).max() <= 1
    tall = resize_center_crop(image, 10, 40)  # scale 0.8: 80 x 40, then columns 35..45
    full = np.asarray(Image.fromarray(image).resize((80, 40), Image.Resampling.LANCZOS))
    assert tall.shape == (40, 10, 3)
    assert np.abs(tall.astype(int) - full[:, 35:45]).max() <= 1


@pytest.mark.parametrize(
    "source, target", [((720, 1280), (832, 480)), ((1280, 720), (480, 832)), ((98, 98), (128, 128))]
)
def test_resize_center_crop_takes_sizes_whose_float_box_started_below_zero(source, target):
    """A portrait phone photo for Wan's 832x480 (the box's float scale gave a left edge of
    -6e-14, which Pillow refused: "box offset can't be negative")."""
    (src_w, src_h), (width, height) = source, target
    image = np.zeros((src_h, src_w, 3), np.uint8)
    assert resize_center_crop(image, width, height).shape == (height, width, 3)


def test_resize_center_crop_shapes_and_errors():
    video = resize_center_crop(smooth_clip(3), 32, 32)
    assert video.shape == (3, 32, 32, 3) and video.dtype == np.uint8
    same = smooth_clip(1)[0]
    assert np.array_equal(resize_center_crop(same, 64, 48), same)
    with pytest.raises(ValueError, match="size 0x4"):
        resize_center_crop(same, 0, 4)
    with pytest.raises(ValueError, match="must be uint8"):
        resize_center_crop(same.astype(np.float32), 4, 4)


@pytest.mark.parametrize("degrees, turns", [(90, 1), (-90, 3), (180, 2)])
def test_a_rotated_phone_video_is_read_upright(tmp_path, degrees, turns):
    """Phones store portrait video landscape with a display matrix; kinema reads it as players
    show it. ``turns`` (np.rot90's k) is what ffmpeg's autorotate gave for each rotation,
    checked side by side with the ffmpeg 5.1 command line when this was written."""
    from kinema.io.video import probe, read_clip

    stored = np.zeros((32, 64, 3), np.uint8)  # 64 wide, 32 high: left half red, top rows blue
    stored[:, :32, 0], stored[:8, :, 2] = 255, 255
    path = tmp_path / "phone.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(degrees)  # counter-clockwise, as VideoFrame.rotation reads
        for _ in range(5):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")))
        container.mux(stream.encode())
    frames, _ = read_video(path)
    want = np.rot90(stored, turns)
    assert frames.shape == (5, *want.shape)
    assert np.abs(frames.astype(int) - want).mean() < 4  # H.264's error only
    info = probe(path)
    assert (info.height, info.width) == want.shape[:2]
    assert read_clip(path, start=0.0, frames=2, fps=16).shape == (2, *want.shape)


@pytest.mark.parametrize("name", ["clip.mp4", "clip.gif", "clip.webp", "frames"])
def test_iter_video_gives_read_videos_frames_one_at_a_time(tmp_path, name):
    from kinema.io.video import iter_video

    path = write_video(tmp_path / name, smooth_clip(frames=11), fps=17)
    frames = iter_video(path)
    first = next(frames)  # decoded as taken, not all at once
    assert np.array_equal(np.stack([first, *frames]), read_video(path)[0])
    with pytest.raises(ValueError, match="cannot decode video"):
        next(iter_video(tmp_path / "missing.mp4"))
    resampled = read_video(path, fps=8)[0]
    assert np.array_equal(np.stack(list(iter_video(path, fps=8))), resampled)


@pytest.mark.parametrize("name", ["clip.mp4", "clip.gif", "clip.webp", "frames"])
def test_scan_video_counts_read_videos_frames_and_keeps_the_last(tmp_path, name):
    from kinema.io.video import scan_video

    path = write_video(tmp_path / name, smooth_clip(frames=11), fps=17)
    for fps in (None, 8):
        frames = read_video(path, fps=fps)[0]
        count, last, native = scan_video(path, fps=fps, last=3)
        assert count == len(frames) and np.array_equal(last, frames[-3:])
        assert native == read_video(path)[1]  # the rate it is read at when none is asked
    assert scan_video(path, limit=4)[0] == 4
    assert scan_video(path, last=40)[1].shape[0] == len(read_video(path)[0])
    with pytest.raises(ValueError, match="cannot decode video"):
        scan_video(tmp_path / "missing.mp4")


def test_transparent_images_are_laid_over_white_everywhere_images_are_read(tmp_path):
    """A cut-out PNG (transparent pixels holding black), a half-transparent one and a GIF with
    a transparent palette colour: the transparent parts come out white, not their stored RGB."""
    from PIL import Image

    from kinema.media import read_image_any
    from kinema.serve.media import check_image

    rgba = np.zeros((8, 8, 4), np.uint8)  # transparent black on the left
    rgba[:, 4:] = (200, 0, 0, 255)  # opaque red on the right
    rgba[:2, 4:, 3] = 128  # half-transparent red at the top right
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.paste(0, (0, 0, 4, 8))  # colour 0 (black) on the left, transparent
    pal.save(tmp_path / "cut.gif", transparency=0)
    want = np.full((8, 8, 3), 255, np.uint8)
    want[:, 4:] = (200, 0, 0)
    for got in (read_image(tmp_path / "cut.png"), read_image_any(Image.open(tmp_path / "cut.png")),
                np.asarray(check_image((tmp_path / "cut.png").read_bytes(), 10**6))):  # fmt: skip
        assert np.abs(got[2:].astype(int) - want[2:]).max() == 0  # opaque red, white matte
        assert np.abs(got[:2, 4:].astype(int) - (228, 127, 127)).max() <= 1  # 50 % red on white
    gif = read_image(tmp_path / "cut.gif")
    assert (gif[:, :4] == 255).all() and (gif[:, 4:] == (0, 200, 0)).all()
    # an animated PNG, read as a video through FFmpeg (rgba frames): the same white matte
    frames = [Image.fromarray(rgba, "RGBA"), Image.fromarray(rgba[:, ::-1].copy(), "RGBA")]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:], duration=100)
    video, _ = read_video(tmp_path / "anim.png")
    assert (video[0, 2:, :4] == 255).all() and (video[0, 2:, 4:] == (200, 0, 0)).all()
    grey16 = Image.fromarray(np.full((4, 4), 32768, np.uint16))  # 16-bit grey: mid-grey
    assert grey16.mode.startswith("I;16") and (np.asarray(rgb_image(grey16)) == 128).all()


def write_with_sound(path, frames: np.ndarray, fps: int = 8) -> None:
    """An mp4 with an AAC track of silence beside the video (as a phone records)."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        sound = out.add_stream("aac", rate=44100)
        for frame in frames:
            out.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(video.encode())
        silence = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                             layout="mono")  # fmt: skip
        silence.sample_rate = 44100
        out.mux(sound.encode(silence))
        out.mux(sound.encode())


def test_videos_are_told_by_their_bytes_not_their_name(tmp_path):
    """An mp4 named .gif reads as the mp4 it is (Pillow could not open it); sound is seen."""
    frames = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    mp4 = write_video(tmp_path / "clip.mp4", frames, fps=8)
    named_gif = tmp_path / "clip.gif"
    named_gif.write_bytes(mp4.read_bytes())
    assert np.array_equal(read_video(named_gif)[0], read_video(mp4)[0])
    assert probe(named_gif).codec == "h264"
    gif = write_video(tmp_path / "real.gif", frames, fps=8)
    assert probe(gif).codec == "gif" and not has_audio(gif) and not has_audio(mp4)
    write_with_sound(tmp_path / "sound.mp4", frames)
    assert has_audio(tmp_path / "sound.mp4")


def write_streams(path, streams: list[tuple[np.ndarray, bool]], fps: int = 16) -> None:
    """An mp4 with one video stream per (frames, is cover art) pair, in that order (a cover is
    a still JPEG marked attached_pic, as a song's or a podcast's)."""
    with av.open(str(path), "w") as out:
        made = []
        for frames, cover in streams:  # every stream before the first packet (the header)
            stream = out.add_stream("mjpeg" if cover else "libx264", rate=1 if cover else fps)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuvj420p" if cover else "yuv420p"
            if cover:
                stream.disposition = av.stream.Disposition.attached_pic
            made.append(stream)
        for (frames, _), stream in zip(streams, made, strict=True):
            for frame in frames:
                picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
                out.mux(stream.encode(picture.reformat(format=stream.pix_fmt)))
            out.mux(stream.encode())


def test_the_video_stream_is_the_one_ffmpeg_picks_and_never_cover_art(tmp_path):
    """Cover art (an mp3's picture) was read as a 1-frame video at 90000 fps, and of two
    video streams the first was taken, not the largest as FFmpeg's tools take."""
    small, big = brightness_clip(5, size=16), brightness_clip(9, size=32)
    cover = np.zeros((1, 64, 64, 3), np.uint8)
    write_streams(tmp_path / "two.mp4", [(small, False), (big, False)])
    assert read_video(tmp_path / "two.mp4")[0].shape == (9, 32, 32, 3)
    info = probe(tmp_path / "two.mp4")
    assert (info.width, info.height, info.frames) == (32, 32, 9)
    write_streams(tmp_path / "song.mp4", [(big, False), (cover, True)])  # cover the largest
    assert read_video(tmp_path / "song.mp4")[0].shape == (9, 32, 32, 3)
    write_streams(tmp_path / "cover.mp4", [(cover, True)])
    with pytest.raises(ValueError, match="cover.mp4: no video stream"):
        read_video(tmp_path / "cover.mp4")


def test_a_damaged_part_of_a_video_is_skipped_not_the_whole_video(tmp_path):
    """A few bytes overwritten mid-file made the whole video a decode error (FFmpeg's tools
    and players skip what they cannot decode): now those packets are skipped, with a warning."""
    clip = smooth_clip(frames=48, height=64, width=64)
    path = write_video(tmp_path / "clip.mp4", clip, 16)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 300] = np.random.default_rng(0).bytes(300)
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"clip.mp4: skipped \d+ damaged packets? it could not"):
        frames, fps = read_video(path)
    assert 0 < len(frames) < 48 and fps == 16
    assert psnr(frames[0], clip[0]) > 30  # the part before the damage is as it was


def test_wide_and_float_grey_images_are_scaled_not_clipped(tmp_path):
    """A 16-bit PGM (Pillow's mode "I") and a float TIFF ("F") came out all white; a 16-bit
    grey PNG's transparent value was dropped."""
    wide = np.zeros((4, 8), np.int32)
    wide[:, 4:] = 32768  # black | mid-grey
    assert Image.fromarray(wide).mode == "I"
    assert (np.asarray(rgb_image(Image.fromarray(wide)))[:, :, 0] == wide >> 8).all()
    dark = Image.fromarray(wide // 256)  # 16-bit values all under 256: near black, as a PNG
    assert (np.asarray(rgb_image(dark)) == 0).all()
    floats = Image.fromarray(np.full((4, 4), 0.5, np.float32))
    assert floats.mode == "F" and (np.asarray(rgb_image(floats)) == 128).all()
    grey16 = Image.fromarray(np.where(np.arange(8) < 4, 30000, 65535).astype(np.uint16)[None])
    grey16.save(tmp_path / "key.png", transparency=30000)
    got = read_image(tmp_path / "key.png")
    assert (got == 255).all()  # the left half transparent (over white), the right white
    grey16.save(tmp_path / "plain.png")
    assert (read_image(tmp_path / "plain.png")[0, :4] == 30000 >> 8).all()
    ramp = (np.arange(256 * 4).reshape(4, 256) % 256 * 2**23).astype(np.int32)  # 32-bit TIFF
    Image.fromarray(ramp, "I").save(tmp_path / "i32.tif")  # was 99.99 % white
    assert (read_image(tmp_path / "i32.tif")[..., 0] == np.arange(256)[None]).all()


def test_an_image_over_pillows_pixel_limit_is_one_line(tmp_path, monkeypatch):
    """A 200 MP phone photo was a DecompressionBombError traceback, and a 108 MP one printed
    Pillow's "decompression bomb DOS attack" warning (the limit is lowered here to test it)."""
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (40, 40), "red").save(tmp_path / "big.png")  # over the limit: warned
    Image.new("RGB", (64, 64), "red").save(tmp_path / "huge.png")  # over twice it: refused
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_image(tmp_path / "big.png").shape == (40, 40, 3)
    with pytest.raises(ValueError, match="huge.png: it is over 2000 pixels, more than Pillow"):
        read_image(tmp_path / "huge.png")


def save_gif(path, count: int, delays_ms: list[int]) -> None:
    """A GIF of :func:`brightness_clip` frames with the given delays (Pillow keeps equal
    frames apart only when told not to optimise)."""
    images = [Image.fromarray(f) for f in brightness_clip(count, step=12)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=delays_ms,
                   loop=0, optimize=False, disposal=1)  # fmt: skip


def test_gif_timing_is_read_as_browsers_show_it(tmp_path):
    """16 fps written as GIF delays of 6 and 7 hundredths (FFmpeg's) read as 18 frames, one
    repeated; a 1/100 s delay read as 100 fps, browsers show it at 10; held frames (a longer
    delay where an encoder merged repeats) still come out repeated."""
    delays = [60, 70, 60, 60] * 4 + [60]
    save_gif(tmp_path / "even.gif", 17, delays)
    frames, fps = read_video(tmp_path / "even.gif")
    assert fps == 16 and frame_indices(frames, 12) == list(range(17))
    assert probe(tmp_path / "even.gif").frames == 17
    save_gif(tmp_path / "fast.gif", 4, [10] * 4)
    assert read_video(tmp_path / "fast.gif")[1] == probe(tmp_path / "fast.gif").fps == 10
    save_gif(tmp_path / "held.gif", 3, [100, 300, 100])
    frames, fps = read_video(tmp_path / "held.gif")
    assert fps == 10 and frame_indices(frames, 12) == [0, 1, 1, 2, 2]  # nearest in time


def test_a_video_whose_size_changes_mid_stream_is_named(tmp_path):
    """Was numpy's "all input arrays must have the same shape" (after a whole extension)."""
    from kinema.io.video import scan_video

    folder = tmp_path / "frames"
    folder.mkdir()
    for i, width in enumerate([16, 16, 32, 32]):
        Image.new("RGB", (width, 16), "red").save(folder / f"{i:03d}.png")
    message = "frame 2 is 32x16, the first 16x16: its size changes mid-stream"
    with pytest.raises(ValueError, match=message):
        read_video(folder)
    with pytest.raises(ValueError, match=message):
        scan_video(folder, last=2, one_size=True)  # what an extension scans
    assert scan_video(folder, last=1).count == 4  # a restyle fits each frame: fine


def test_mp4_outputs_say_their_colours_and_hdr_sources_are_named(tmp_path):
    """Untagged BT.601 mp4s shift colours in players that assume BT.709 for HD; an HDR (HLG)
    phone video was read dull without a word."""
    out = write_video(tmp_path / "clip.mp4", smooth_clip(4), 16)
    with av.open(str(out)) as container:
        frame = next(container.decode(video=0))
    assert (frame.colorspace, frame.color_range, frame.color_primaries, frame.color_trc) == (
        6, 1, 1, 1)  # smpte170m, tv, bt709, bt709  # fmt: skip
    with av.open(str(tmp_path / "hlg.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.color_trc = 18  # ARIB STD-B67 (HLG), as an iPhone records
        for frame in smooth_clip(4):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    with pytest.warns(UserWarning, match=r"hlg.mp4 is HDR \(HLG\): it is read without tone"):
        assert len(read_video(tmp_path / "hlg.mp4")[0]) == 4


def test_an_anamorphic_video_is_read_as_players_show_it(tmp_path):
    """Pixels twice as wide as tall (a sample aspect ratio of 2, as HDV and DV store video)
    were read at their stored shape: a restyle's crop cut what players show, and an extension
    kept the squeezed frames."""
    from fractions import Fraction

    frame = np.zeros((32, 32, 3), np.uint8)
    frame[:, :16] = (255, 0, 0)  # red on the left half, black on the right
    with av.open(str(tmp_path / "wide.mp4"), "w") as out:
        stream = out.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.sample_aspect_ratio = Fraction(2, 1)
        for _ in range(5):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    video, _ = read_video(tmp_path / "wide.mp4")
    assert video.shape == (5, 32, 64, 3)  # shown 64 wide
    info = probe(tmp_path / "wide.mp4")
    assert (info.width, info.height) == (64, 32)
    assert video[:, :, :28, 0].min() > 200 and video[:, :, 36:].max() < 40  # halves, widened


def test_a_transparent_webm_is_laid_over_white(tmp_path):
    """VP9 with alpha (the usual transparent web video): FFmpeg's own decoder dropped the
    alpha, so the transparent half came out black."""
    frame = np.zeros((32, 32, 4), np.uint8)
    frame[:, :16] = (200, 0, 0, 255)  # opaque red left, transparent right
    with av.open(str(tmp_path / "cut.webm"), "w") as out:
        stream = out.add_stream("libvpx-vp9", rate=16)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuva420p"
        for _ in range(3):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgba")))
        out.mux(stream.encode())
    video, _ = read_video(tmp_path / "cut.webm")
    assert video.shape == (3, 32, 32, 3)
    assert (video[:, :, 20:] >= 250).all() and (video[:, :, :12, 0] > 180).all()


def write_ts(path, frames: np.ndarray, fps: int = 16) -> bytes:
    """An MPEG-TS H.264 clip's bytes (TS segments join by concatenation, as streams are cut)."""
    with av.open(str(path), "w", format="mpegts") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return path.read_bytes()


def test_a_size_change_in_a_stream_is_named_not_stretched(tmp_path):
    """After the anamorphic change, frames of another size were widened to the first size."""
    from kinema.io.video import scan_video

    joined = write_ts(tmp_path / "a.ts", smooth_clip(5, 32, 32))
    joined += write_ts(tmp_path / "b.ts", smooth_clip(5, 16, 32))
    (tmp_path / "joined.ts").write_bytes(joined)
    with pytest.raises(ValueError, match="is 32x16, the first 32x32: its size changes"):
        read_video(tmp_path / "joined.ts")
    with pytest.raises(ValueError, match="its size changes mid-stream"):
        scan_video(tmp_path / "joined.ts", last=2, one_size=True)


def test_a_matroska_clip_read_at_its_own_rate_keeps_its_frames(tmp_path):
    """Matroska rounds timestamps to milliseconds: read at its 29.97 fps, a 33-frame clip came
    out 34 frames, the last repeated (the end was taken a rounding error too late)."""
    from fractions import Fraction

    with av.open(str(tmp_path / "clip.mkv"), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(30000, 1001))
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        for frame in brightness_clip(33, step=7):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    native, fps = read_video(tmp_path / "clip.mkv")
    assert len(native) == 33 and fps == pytest.approx(29.97, abs=0.01)
    at_rate, _ = read_video(tmp_path / "clip.mkv", fps=fps)
    assert frame_indices(at_rate, 7) == frame_indices(native, 7) == list(range(33))
