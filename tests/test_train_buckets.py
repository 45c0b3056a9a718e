"""Training on videos of several aspect ratios: data.buckets, batches of one size, exact resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kinema.train import DataConfig, VAETrainConfig, train_dit, train_vae
from kinema.train.loop import ClipDataset, LatentCache, clip_stream, precompute
from kinema.train.state import BucketBatches, latest_checkpoint
from kinema.train.vae_loop import stats_clips
from tests.test_train import TINY_VAE, dit_config

BUCKETS = ((32, 32), (48, 32), (32, 48))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> DataConfig:
    """Five clips: two wide (64x32, to the 48x32 bucket), two tall (24x48), one square."""
    from kinema.io.video import write_video

    root = tmp_path_factory.mktemp("mixed") / "videos"
    root.mkdir()
    sizes = [(64, 32), (64, 32), (24, 48), (24, 48), (40, 40)]
    for i, (w, h) in enumerate(sizes):
        frames = np.full((12, h, w, 3), 40 * i, np.uint8)
        for t in range(12):
            frames[t, 4:12, t : t + 8] = 255
        write_video(root / f"clip{i}.mp4", frames, 8)
        (root / f"clip{i}.txt").write_text(f"clip {i}, a white square moving right")
    return DataConfig(kind="folder", root=str(root), width=32, height=32, frames=9, fps=8,
                      buckets=BUCKETS)  # fmt: skip


def test_bucket_batches_are_full_one_group_each_cover_every_clip_and_resume_exactly():
    groups = [[0, 1, 2, 3, 4], [5, 6], [7]]
    sampler = BucketBatches(groups, batch=2, seed=3)
    it = iter(sampler)
    epoch = [next(it) for _ in range(3 + 1 + 1)]  # ceil(5/2) + ceil(2/2) + ceil(1/2) batches
    assert all(len(b) == 2 and any(set(b) <= set(g) for g in groups) for b in epoch)
    assert sorted({i for b in epoch for i in b}) == list(range(8))  # every clip, topped up
    assert epoch == sampler.epoch_batches(0) != sampler.epoch_batches(1)  # reshuffled
    later = [next(it) for _ in range(7)]
    for k in (1, 4, 5, 9):  # resuming at clip position 2k gives what follows batch k
        again = iter(BucketBatches(groups, batch=2, seed=3, start=2 * k))
        assert [next(again) for _ in range(3)] == (epoch + later)[k : k + 3]
    with_epoch = next(iter(BucketBatches(groups, batch=2, seed=3, start=20, with_epoch=True)))
    assert with_epoch == [(i, 2) for i in sampler.epoch_batches(2)[0]]


def test_buckets_are_checked_when_the_config_is_read(mixed: DataConfig, tmp_path: Path):
    cases = [
        (lambda: DataConfig(buckets=BUCKETS), "for a folder of videos"),
        (lambda: dataclasses.replace(mixed, width=48, height=48), r"48x48 must be one of"),
        (lambda: dataclasses.replace(mixed, buckets=((32, 32), (0, 32))), "each is"),
        (lambda: dit_config(tmp_path, tmp_path, data=dataclasses.replace(
            mixed, buckets=((32, 32), (40, 32)))), r"\[40, 32\] must be multiples of 16"),
        (lambda: dit_config(tmp_path, tmp_path, data=mixed, extra_caches=("x",)),
         "not with data.buckets"),
        (lambda: VAETrainConfig(model=TINY_VAE, data=mixed, crop_size=40, crop_frames=5),
         r"crop_size 40 must be .* in \[8, 32\]"),
        (lambda: VAETrainConfig(model=TINY_VAE, data=dataclasses.replace(
            mixed, buckets=((32, 32), (60, 100))), crop_size=16, crop_frames=5),
         "data size 60x100 .* must be multiples of 8"),  # refused before training, not at export
        (lambda: dataclasses.replace(mixed, buckets=((32, 32), (64, 64))), "share an aspect"),
    ]  # fmt: skip
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()


def test_each_video_goes_to_its_nearest_bucket_and_a_batch_holds_one_size(mixed: DataConfig):
    ds = ClipDataset(mixed)
    assert ds.groups() == [[4], [2, 3], [0, 1]]  # by (width, height): 32x32, 32x48, 48x32
    shapes = {(48, 32): {2, 3}, (32, 32): {4}, (32, 48): {0, 1}}  # (H, W) of the batch
    stream = clip_stream(ds, start=0, batch=2, seed=0, workers=0)
    for _ in range(6):
        batch = next(stream)
        video = batch["video"]  # (B, 3, T, H, W)
        numbers = {int(c.split(",")[0].split()[1]) for c in batch["captions"]}
        assert video.shape[:3] == (2, 3, 9) and numbers <= shapes[tuple(video.shape[3:])]
    unbucketed = ClipDataset(dataclasses.replace(mixed, buckets=()))
    assert unbucketed.groups() is None and unbucketed[0][0].shape == (3, 9, 32, 32)


def test_a_bucketed_run_caches_each_size_and_resumes_exactly(
    tmp_path: Path, vae_folder: Path, text_encoder, mixed: DataConfig
) -> None:
    config = dit_config(tmp_path / "a", vae_folder, data=mixed, max_steps=4)
    straight = train_dit(config, text_encoder=text_encoder)
    cache = LatentCache.load(tmp_path / "a" / "cache")
    assert sorted({tuple(z.shape[-2:]) for z in cache.latents}) == [(4, 4), (4, 6), (6, 4)]
    assert cache.groups() == [[4], [0, 1], [2, 3]]  # by latent shape (z, F, h, w)
    resumed = dit_config(tmp_path / "b", vae_folder, data=mixed, max_steps=4)
    train_dit(resumed, text_encoder=text_encoder, stop_after=1)
    train_dit(resumed, text_encoder=text_encoder)
    a, b = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
    wa, wb = (load_file(str(c / "model/model.safetensors")) for c in (a, b))
    assert a.name == b.name and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (straight / "transformer").is_dir()
    # without the cache, from the videos: batches of one size as well
    uncached = dit_config(tmp_path / "c", vae_folder, data=mixed, max_steps=3, precompute=False)
    assert (train_dit(uncached, text_encoder=text_encoder) / "kinema.json").is_file()


def test_precompute_of_one_size_keeps_the_single_tensor_layout(
    tmp_path: Path, vae_folder: Path, text_encoder, mixed: DataConfig
) -> None:
    square = dataclasses.replace(mixed, buckets=((32, 32),))  # every video to 32x32
    config = dit_config(tmp_path, vae_folder, data=square)
    folder = precompute(config, text_encoder=text_encoder)
    assert list(load_file(str(next(folder.glob("latents-*"))))) == ["latents"]
    assert isinstance(LatentCache.load(folder).latents, torch.Tensor)


def test_vae_training_and_its_latent_statistics_take_several_sizes(
    tmp_path: Path, mixed: DataConfig
) -> None:
    config = VAETrainConfig(out_dir=str(tmp_path), model=TINY_VAE, data=mixed, crop_size=16,
                            crop_frames=5, batch_size=2, max_steps=2, warmup_steps=1,
                            stats_clips=5, progress=False)  # fmt: skip
    sizes = [tuple(v.shape) for v in stats_clips(config)]
    assert sizes == [(2, 3, 9, 32, 48), (2, 3, 9, 48, 32), (1, 3, 9, 32, 32)]
    assert (train_vae(config) / "config.json").is_file()
