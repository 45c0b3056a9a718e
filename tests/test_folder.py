"""kinema.data.folder: caption layouts, clip sampling, buckets, broken files, DataLoader."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from kinema.data.folder import (
    BucketBatchSampler,
    VideoFolder,
    collate,
    group_batches,
    make_loader,
)
from kinema.io.video import write_video

STEP = 8  # frame i of a test video has brightness STEP * i


def brightness(frames: int, width: int, height: int) -> np.ndarray:
    """uint8 (T, H, W, 3) where frame i is a flat grey of value STEP * i."""
    values = (np.arange(frames) * STEP).astype(np.uint8)
    return np.broadcast_to(values[:, None, None, None], (frames, height, width, 3)).copy()


def write_webm(path: Path, frames: np.ndarray, fps: int) -> Path:
    """A VP8 WebM written with PyAV directly (write_video has no WebM writer)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt, stream.options = "yuv420p", {"crf": "4", "b:v": "1M"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def make_folder(root: Path) -> dict[str, str]:
    """Three good videos of different shapes and one corrupted file; returns name -> caption."""
    root.mkdir(parents=True, exist_ok=True)
    write_video(root / "wide.mp4", brightness(30, 64, 32), 30)
    write_video(root / "tall.mp4", brightness(30, 32, 64), 30)
    write_webm(root / "square.webm", brightness(30, 48, 48), 30)
    (root / "broken.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    return {
        "wide.mp4": "a wide shot",
        "tall.mp4": "a tall shot",
        "square.webm": "a square shot",
        "broken.mp4": "never seen",
    }


def frame_indices(video: torch.Tensor) -> list[int]:
    """Recover the source frame indices from a (3, T, H, W) item in [-1, 1]."""
    grey = ((video + 1) * 127.5).mean(dim=(0, 2, 3))  # (T,)
    return [int(round(v)) for v in (grey / STEP).tolist()]


def load(root: Path, **kwargs) -> VideoFolder:
    """A VideoFolder with the warnings about the corrupted file silenced."""
    settings = {"frames": 5, "fps": 10.0, "size": (32, 32), **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return VideoFolder(root, **settings)


@pytest.fixture(scope="module")
def sidecar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sidecar")
    for name, caption in make_folder(root).items():
        (root / name).with_suffix(".txt").write_text(caption + "\n")
    return root


def test_sidecar_captions_shapes_and_skips(sidecar_root):
    with pytest.warns(UserWarning) as said:
        ds = VideoFolder(sidecar_root, frames=5, fps=10, size=(32, 24))
    lines = [str(w.message) for w in said]
    assert any(line.startswith("skipping unreadable video: cannot decode video") for line in lines)
    assert f"1 of 4 video(s) in {sidecar_root} are unreadable and skipped" in lines[-1]  # counted
    assert len(ds) == 3 and len(ds.skipped) == 1
    assert ds.skipped[0][0].endswith("broken.mp4")
    captions = {Path(p).name: c for p, c in ds.items}
    assert captions == {
        "square.webm": "a square shot",
        "tall.mp4": "a tall shot",
        "wide.mp4": "a wide shot",
    }
    for i in range(len(ds)):
        item = ds[i]
        assert item["video"].shape == (3, 5, 24, 32) and item["video"].dtype == torch.float32
        assert item["video"].min() >= -1 and item["video"].max() <= 1
        assert item["caption"] == captions[Path(item["path"]).name]


def test_an_upper_case_txt_sidecar_is_the_videos_caption(tmp_path):
    """A.MP4 + A.TXT (as cameras and Windows tools name them) trained with an empty caption,
    and a warning that said it had none."""
    from kinema.data.folder import find_videos

    write_video(tmp_path / "A.MP4", brightness(5, 32, 32), 10)
    (tmp_path / "A.TXT").write_text("from a camera\n")
    write_video(tmp_path / "b.mp4", brightness(5, 32, 32), 10)
    (tmp_path / "b.txt").write_text("a plain one")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "have no .txt caption"
        found = {p.name: c for p, c in find_videos(tmp_path)}
    assert found == {"A.MP4": "from a camera", "b.mp4": "a plain one"}


def test_data_seed_picks_which_cut_of_each_video_a_run_trains_on(sidecar_root):
    """ClipDataset built its VideoFolder with seed 0, whatever data.seed said."""
    from kinema.train import DataConfig
    from kinema.train.loop import ClipDataset

    def cuts(seed: int) -> list[list[int]]:
        data = DataConfig(kind="folder", root=str(sidecar_root), width=32, height=32, frames=5,
                          fps=10, seed=seed)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the broken file
            ds = ClipDataset(data)
            return [frame_indices(ds[i][0]) for i in range(3)]

    assert cuts(0) == cuts(0) and cuts(0) != cuts(1)


def test_clips_are_sampled_at_the_target_fps(sidecar_root):
    ds = load(sidecar_root, frames=5, fps=10)
    for i in range(len(ds)):
        start = ds.clip_start(i)
        assert 0 <= start <= 1.0 - 5 / 10  # the clip fits in the 1 s video
        nearest = [int(np.floor((start + k / 10) * 30 + 0.5)) for k in range(5)]
        assert frame_indices(ds[i]["video"]) == nearest  # 30 fps source -> every 3rd frame


def test_sampling_is_reproducible_per_seed_and_epoch(sidecar_root):
    a, b = load(sidecar_root, seed=3), load(sidecar_root, seed=3)
    starts = [a.clip_start(i) for i in range(len(a))]
    assert starts == [b.clip_start(i) for i in range(len(b))]
    assert torch.equal(a[1]["video"], b[1]["video"])
    assert starts != [load(sidecar_root, seed=4).clip_start(i) for i in range(len(a))]
    a.set_epoch(1)
    assert starts != [a.clip_start(i) for i in range(len(a))]


def test_short_videos_are_padded_with_their_last_frame(sidecar_root):
    ds = load(sidecar_root, frames=13, fps=10)  # 1.3 s wanted from 1 s videos
    with pytest.warns(UserWarning, match="padded by repeating their last frame"):
        item = ds[0]
    # 1 s at 10 fps is 10 frames, then the last of them repeated (WebM's millisecond
    # timestamps had let a 1.0 s target time take frame 29, a frame past the clip's end)
    assert frame_indices(item["video"]) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 27, 27, 27]


def test_metadata_paths_that_stay_inside_the_folder_are_taken(tmp_path):
    """The check for files outside the folder refused sub/../a.mp4 and an absolute path in it."""
    make_folder(tmp_path)
    rows = [{"file_name": "sub/../wide.mp4", "caption": "a"},
            {"file_name": str(tmp_path / "tall.mp4"), "caption": "b"}]  # fmt: skip
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load(tmp_path)
    assert sorted(c for _, c in ds.items) == ["a", "b"]


def test_jsonl_takes_precedence_and_missing_files_are_skipped(tmp_path):
    make_folder(tmp_path)
    rows = [
        {"file_name": "wide.mp4", "caption": "from jsonl"},
        {"video": "square.webm", "text": "square from jsonl"},
        {"path": "gone.mp4", "prompt": "missing"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "metadata.csv").write_text("file_name,caption\ntall.mp4,from csv\n")
    (tmp_path / "wide.txt").write_text("from txt")
    with pytest.warns(UserWarning) as said:
        ds = VideoFolder(tmp_path, frames=3, fps=10, size=(16, 16))
    said = [str(w.message) for w in said]
    assert any(re.search(r"names 1 file\(s\) that do not exist.*gone\.mp4", m) for m in said)
    assert f"2 video(s) in {tmp_path} are not in metadata.jsonl and are not used" in "".join(said)
    assert sorted((Path(p).name, c) for p, c in ds.items) == [
        ("square.webm", "square from jsonl"),
        ("wide.mp4", "from jsonl"),
    ]


def test_csv_layout(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "metadata.csv").write_text(
        'video,text\ntall.mp4,"tall, from csv"\nbroken.mp4,bad\n'
    )
    ds = load(tmp_path, frames=3)
    assert [(Path(p).name, c) for p, c in ds.items] == [("tall.mp4", "tall, from csv")]
    assert len(ds.skipped) == 1 and ds[0]["caption"] == "tall, from csv"


def test_metadata_and_captions_with_a_byte_order_mark(tmp_path):
    """Excel's "CSV UTF-8" and Notepad write a BOM: its column was read as '\\ufefffile_name'."""
    make_folder(tmp_path / "csv")
    (tmp_path / "csv" / "metadata.csv").write_bytes(
        "file_name,caption\r\ntall.mp4,déjà vu\r\n".encode("utf-8-sig")
    )
    make_folder(tmp_path / "jsonl")
    (tmp_path / "jsonl" / "metadata.jsonl").write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"file_name": "wide.mp4", "caption": "wide"}).encode()
    )
    make_folder(tmp_path / "txt")
    (tmp_path / "txt" / "wide.txt").write_bytes("a wide shot".encode("utf-8-sig"))
    assert [c for _, c in load(tmp_path / "csv").items] == ["déjà vu"]
    assert [c for _, c in load(tmp_path / "jsonl").items] == ["wide"]
    captions = {Path(p).name: c for p, c in load(tmp_path / "txt").items}
    assert captions["wide.mp4"] == "a wide shot"


def test_caption_files_that_are_not_utf8_or_short_rows_are_named(tmp_path):
    make_folder(tmp_path / "latin")
    (tmp_path / "latin" / "wide.txt").write_bytes("déplace".encode("latin-1"))
    with pytest.raises(ValueError, match=r"wide.txt is not UTF-8 text \(invalid continuation"):
        load(tmp_path / "latin")
    make_folder(tmp_path / "short")
    (tmp_path / "short" / "metadata.csv").write_text("file_name,caption\ntall.mp4\n")
    with pytest.raises(ValueError, match=r"row 2 has fewer cells than the header \(file_name,"):
        load(tmp_path / "short")


@pytest.mark.parametrize(
    "name, text, message",
    [
        (
            "metadata.csv",
            "file_name,caption\ntall.mp4,a cat, running\n",
            "row 2 has more cells than the header; quote a caption that holds commas",
        ),
        (
            "metadata.csv",
            'file_name,caption\ntall.mp4,"oops\nwide.mp4,fine\n',
            "is not valid CSV: unexpected end of data \\(a quote left open\\?\\)",
        ),
        (
            "metadata.csv",
            'file_name,caption\ntall.mp4,"' + "w " * 70_000 + '"\n',
            "is not valid CSV: field larger than field limit",
        ),
        ("metadata.csv", "name,desc\ntall.mp4,x,y\n", "row 2 has more cells than the header"),
        (
            "metadata.jsonl",
            '{"file_name": "tall.mp4", "caption": null}',
            "line 1 has no caption \\(null\\)",
        ),
        (
            "metadata.jsonl",
            '{"file_name": "tall.mp4", "caption": ["a", "b"]}',
            'line 1: caption is \\["a", "b"\\], not text',
        ),
        ("metadata.jsonl", '{"file_name": "tall.mp4", "caption": true}', "caption is true, not"),
        # outside the folder: trained on, but not in the cache's fingerprint (stale latents)
        ("metadata.jsonl", '{"file_name": "../o.mp4", "caption": "x"}', "'../o.mp4', outside"),
        ("metadata.csv", "file_name,caption\n/tmp/o.mp4,x\n", "'/tmp/o.mp4', outside"),
        ("metadata.jsonl", '{"file_name": "x/../../o.mp4", "caption": "x"}', "outside"),
        (
            "metadata.jsonl",
            '{"file_name": "tall.mp4", "caption": "party \\ud83c"}',
            "line 1: caption is not valid Unicode text",
        ),
    ],
)
def test_metadata_rows_that_would_be_misread_are_named(tmp_path, name, text, message):
    """Each was a traceback (extra cells, a huge cell, half an emoji) or a silent misreading
    (a quote left open swallowed every later row; a list or true became its Python text)."""
    make_folder(tmp_path)
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        load(tmp_path)


def test_a_split_folders_metadata_is_named_not_ignored(tmp_path):
    """root/train/metadata.jsonl (a Hugging Face dataset's split): the videos were trained on
    with empty captions."""
    make_folder(tmp_path / "train")
    (tmp_path / "train" / "metadata.jsonl").write_text('{"file_name": "tall.mp4", "caption": "x"}')
    with pytest.raises(ValueError, match=f"give data.root {tmp_path / 'train'} "):
        load(tmp_path)
    assert [c for _, c in load(tmp_path / "train").items] == ["x"]


def test_every_video_failing_to_decode_is_one_clear_error(tmp_path):
    """Videos whose headers read but whose frames do not (a download cut short): a
    RuntimeError pointing at a Python attribute, through a DataLoader worker too."""
    from kinema.cli import first_line

    folders = [tmp_path / "a", tmp_path / "b"]
    datasets = []
    for folder in folders:
        make_folder(folder)
        datasets.append(load(folder, frames=3))
        for path, _ in datasets[-1].items:
            Path(path).write_bytes(b"\x00" * 2000)  # broken after the probe
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"every video in .* failed to decode \(4 skipped; "
                           r"the first, .*broken.mp4: cannot decode"):  # fmt: skip
            datasets[0][0]
        loader = make_loader(datasets[1], batch_size=1, num_workers=1, seed=0)
        with pytest.raises(ValueError) as err:
            next(iter(loader))
    assert first_line(err.value).startswith(f"every video in {folders[1]} failed to decode")


def test_file_broken_during_training_is_skipped(tmp_path):
    make_folder(tmp_path)
    ds = load(tmp_path)
    assert len(ds.skipped) == 1
    names = [Path(p).name for p, _ in ds.items]
    victim = names.index("tall.mp4")
    (tmp_path / "tall.mp4").write_bytes(b"\x00" * 2000)
    with pytest.warns(UserWarning, match="skipping unreadable video"):
        item = ds[victim]
    assert Path(item["path"]).name == names[(victim + 1) % len(ds)]
    assert len(ds.skipped) == 2 and ds.skipped[1][0].endswith("tall.mp4")
    assert Path(ds[victim]["path"]).name != "tall.mp4"


def test_buckets_choose_nearest_aspect(sidecar_root):
    buckets = [(32, 16), (16, 32), (24, 24)]
    ds = load(sidecar_root, resize="bucket", buckets=buckets, size=None)
    by_name = {Path(p).name: ds.bucket_of(i) for i, (p, _) in enumerate(ds.items)}
    assert by_name == {"wide.mp4": (32, 16), "tall.mp4": (16, 32), "square.webm": (24, 24)}
    for i in range(len(ds)):
        w, h = ds.bucket_of(i)
        assert ds[i]["video"].shape == (3, 5, h, w)
    sampler = BucketBatchSampler(ds, batch_size=2, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == [0, 1, 2]
    assert all(len({ds.bucket_of(i) for i in b}) == 1 for b in batches)
    empty = BucketBatchSampler(ds, batch_size=2, drop_last=True)  # one video a bucket: none
    with pytest.raises(ValueError, match="leaves no batch: the largest bucket holds 1 video;"):
        list(empty)  # a training loop over it did nothing, silently


def test_group_batches_keep_drop_or_top_up_a_groups_last_batch():
    groups = [[0, 1, 2], [3, 4], [5]]
    assert group_batches(groups, 2, None) == [[0, 1], [2], [3, 4], [5]]  # in order
    assert group_batches(groups, 2, None, "drop") == [[0, 1], [3, 4]]
    assert group_batches(groups, 2, None, "top_up") == [[0, 1], [2, 0], [3, 4], [5, 5]]
    shuffled = group_batches(groups, 2, torch.Generator().manual_seed(0), "top_up")
    assert len(shuffled) == 4 and all(len(b) == 2 for b in shuffled)
    assert all(any(set(b) <= set(g) for g in groups) for b in shuffled)  # one group a batch
    again = group_batches(groups, 2, torch.Generator().manual_seed(0), "top_up")
    assert again == shuffled != group_batches(groups, 2, torch.Generator().manual_seed(1), "top_up")


def test_dataloader_with_worker_processes(sidecar_root):
    ds = load(sidecar_root, frames=3, size=(16, 16))
    loader = make_loader(ds, batch_size=2, num_workers=2, seed=0)
    loader.batch_sampler.set_epoch(2)
    assert ds.epoch == 2
    batches = list(loader)
    assert sorted(b["video"].shape[0] for b in batches) == [1, 2]  # one bucket: 3 clips
    assert {b["video"].shape[1:] for b in batches} == {(3, 3, 16, 16)}
    seen = sorted(Path(p).name for b in batches for p in b["path"])
    assert seen == ["square.webm", "tall.mp4", "wide.mp4"]
    loader = make_loader(ds, batch_size=2, num_workers=0, seed=0)
    loader.batch_sampler.set_epoch(2)
    again = list(loader)
    assert torch.equal(again[0]["video"], batches[0]["video"])  # same seed and epoch


def test_collate_refuses_mixed_sizes():
    a = {"video": torch.zeros(3, 2, 4, 4), "caption": "a", "path": "a"}
    b = {"video": torch.zeros(3, 2, 4, 8), "caption": "b", "path": "b"}
    assert collate([a, a])["video"].shape == (2, 3, 2, 4, 4)
    with pytest.raises(ValueError, match="batch by bucket"):
        collate([a, b])


def test_bad_folders_and_arguments(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        VideoFolder(tmp_path / "nope", frames=3, fps=10, size=(16, 16))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no videos"):
        VideoFolder(tmp_path / "empty", frames=3, fps=10, size=(16, 16))
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("a caption")
    with pytest.raises(ValueError, match=r"has 1 caption file\(s\) but no videos"):
        VideoFolder(tmp_path / "texts", frames=3, fps=10, size=(16, 16))
    (tmp_path / "texts" / "metadata.jsonl").write_text('{"file_name": "a.mp4", "caption": "x"}\n')
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="none exists under"):
        VideoFolder(tmp_path / "texts", frames=3, fps=10, size=(16, 16))
    (tmp_path / "texts" / "metadata.jsonl").write_text('{"name": "a.mp4", "caption": "x"}\n')
    with pytest.raises(ValueError, match=r"line 1 has none of the columns \['file_name'"):
        VideoFolder(tmp_path / "texts", frames=3, fps=10, size=(16, 16))
    make_folder(tmp_path / "ok")
    with pytest.raises(ValueError, match=r"resize 'stretch' is not one of \('crop', 'bucket'\)"):
        load(tmp_path / "ok", resize="stretch")
    with pytest.raises(ValueError, match="needs a non-empty list of buckets"):
        load(tmp_path / "ok", resize="bucket", size=None)
    with pytest.raises(ValueError, match="frames 0 must be an int >= 1"):
        load(tmp_path / "ok", frames=0)
    with pytest.raises(ValueError, match=r"size \(16, -2\) must be"):
        load(tmp_path / "ok", size=(16, -2))
    for bad, message in (({"frames": True}, "frames True must be an int"),
                         ({"fps": "8"}, "fps '8' must be a finite number"),
                         ({"size": (True, True)}, "size \\(True, True\\) must be")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            load(tmp_path / "ok", **bad)
    numpy_sized = load(tmp_path / "ok", frames=np.int64(3), size=(np.int64(16), 16))
    assert numpy_sized.frames == 3 and numpy_sized.sizes == ((16, 16),)


def test_videos_without_captions_are_named(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "sub").mkdir()
    write_video(tmp_path / "sub" / "more.mp4", brightness(10, 32, 32), 10)
    with pytest.warns(
        UserWarning,
        match=r"5 video\(s\) in .* have no .txt caption \(their "
        r"caption is empty\): broken.mp4, square.webm, sub/more.mp4 and 2 more",
    ):
        VideoFolder(tmp_path, frames=5, fps=10.0, size=(32, 32))


def test_a_home_relative_root_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    make_folder(tmp_path / "vids")
    assert load("~/vids").root == tmp_path / "vids"


def test_a_video_cut_short_keeps_its_readable_part(tmp_path):
    """A Matroska file cut in half still claims its whole 8 s; a clip drawn past the cut
    fails to decode. The video is not dropped: that clip is read from 0 s, and later clips
    start before the failing start."""
    import av

    root = tmp_path / "videos"
    root.mkdir()
    whole = tmp_path / "whole.mkv"
    with av.open(str(whole), "w", format="matroska") as out:
        stream = out.add_stream("libx264", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for t in range(64):
            frame = np.zeros((32, 32, 3), np.uint8)
            frame[:, t % 32] = 255
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))
    data = whole.read_bytes()
    (root / "cut.mkv").write_bytes(data[: len(data) // 2])
    (root / "cut.txt").write_text("a white line moving right")
    ds = VideoFolder(root, frames=9, fps=8, size=(32, 32))
    assert ds.infos[0].duration == 8.0  # what the header says
    late = next(e for e in range(100) if (ds.set_epoch(e), ds.clip_start(0))[1] > 5.0)
    ds.set_epoch(late)
    with pytest.warns(UserWarning, match="does not decode from"):
        item = ds[0]
    assert item["video"].shape == (3, 9, 32, 32) and ds.skipped == []
    cut = ds._readable[0]
    for epoch in range(30):  # later clips start before the failing start, and decode
        ds.set_epoch(epoch)
        assert ds.clip_start(0) <= cut - 9 / 8 or ds.clip_start(0) == 0.0
    assert ds[0]["path"].endswith("cut.mkv")


def test_a_linked_folder_of_videos_is_followed_once(tmp_path):
    """A folder linked in (videos on another disk) was not searched; a link back up is not
    followed round."""
    make_folder(tmp_path / "elsewhere")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "linked").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "loop").symlink_to(tmp_path / "root")
    names = sorted(Path(p).name for p, _ in load(tmp_path / "root").items)
    assert names == ["square.webm", "tall.mp4", "wide.mp4"]


def test_worker_processes_say_a_skipped_file_once_between_them(tmp_path, capfd):
    """Each DataLoader worker has its own copy of the dataset: each said the same skip."""
    from torch.utils.data import DataLoader

    from kinema.train.loop import said_once

    make_folder(tmp_path)
    ds = load(tmp_path)
    victim = [Path(p).name for p, _ in ds.items].index("tall.mp4")
    (tmp_path / "tall.mp4").write_bytes(b"\x00" * 2000)  # broken after the probe
    loader = DataLoader(ds, batch_size=1, sampler=[victim] * 4, num_workers=2, collate_fn=collate)
    capfd.readouterr()
    with warnings.catch_warnings(), said_once(ds, workers=2):
        warnings.simplefilter("always")  # as the CLI shows them (pytest's would record them)
        warnings.showwarning = lambda message, *_: print(f"warning: {message}", file=sys.stderr)
        assert len(list(loader)) == 4  # each worker met the broken file
    err = capfd.readouterr().err
    assert err.count("skipping unreadable video") == 1, err
    assert ds.said_in is None
