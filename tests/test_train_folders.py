"""Training's folders: an export or a conversion never destroys what a user keeps, and a
run's out_dir is checked before any work."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from kinema.train import VAETrainConfig, export, train_dit, train_vae
from kinema.train.state import latest_checkpoint
from tests.test_train import TINY_VAE, dit_config, make_video_folder


def keepsake(folder: Path) -> Path:
    """A user's file in ``folder`` (an export there would have deleted it)."""
    (folder / "other-model").mkdir(parents=True)
    note = folder / "other-model" / "notes.txt"
    note.write_text("important")
    return note


def test_an_export_that_would_destroy_files_is_refused_before_training(
    tmp_path: Path, vae_folder: Path, text_encoder
) -> None:
    note = keepsake(tmp_path / "mymodels")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "log.csv").write_text("date,value\n2026-12-07,3\n")
    cases = [
        (dict(export_dir=str(tmp_path / "mymodels")), r"holds other files \(other-model\)"),
        (dict(export_dir=str(tmp_path / "run")), "holds the run's out_dir"),
        (dict(export_dir=str(tmp_path)), "holds the run's out_dir"),
        (dict(out_dir=str(tmp_path / "afile")), "is a file; give a folder"),
        (dict(out_dir=str(tmp_path / "afile" / "run")), "is not a writable folder"),
        (dict(out_dir=str(tmp_path / "theirs")), "not a kinema training log"),
    ]
    for settings, message in cases:
        config = dit_config(tmp_path / "run", vae_folder, **settings)
        with pytest.raises(ValueError, match=message):
            train_dit(config, text_encoder=text_encoder)
        assert latest_checkpoint(config.out_dir) is None  # refused before any step
    assert note.read_text() == "important"
    assert (tmp_path / "theirs" / "log.csv").read_text().startswith("date,value")


def test_an_earlier_export_is_replaced_and_anything_else_refused(
    tmp_path: Path, vae_folder: Path, text_encoder
) -> None:
    config = dit_config(tmp_path / "run", vae_folder, max_steps=2, precompute=False)
    first = train_dit(config, text_encoder=text_encoder)
    again = export(config.out_dir, first)  # an earlier export's folder: replaced
    assert sorted(p.name for p in again.iterdir()) == ["kinema.json", "transformer", "vae"]
    note = keepsake(tmp_path / "mymodels")
    with pytest.raises(ValueError, match="an export replaces the folder whole"):
        export(config.out_dir, tmp_path / "mymodels")
    with pytest.raises(ValueError, match="holds the run's out_dir"):
        export(config.out_dir, config.out_dir)
    assert note.read_text() == "important" and latest_checkpoint(config.out_dir) is not None


def test_a_vae_export_keeps_what_is_not_a_vae(tmp_path: Path) -> None:
    from kinema.train import DataConfig

    note = keepsake(tmp_path / "vaes")
    data = DataConfig(num_clips=2, width=32, height=32, frames=9, fps=8)
    config = VAETrainConfig(out_dir=str(tmp_path / "run"), model=TINY_VAE, max_steps=1,
                            crop_size=16, data=data, export_dir=str(tmp_path / "vaes"),
                            progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"holds other files \(other-model\)"):
        train_vae(config)
    assert note.read_text() == "important" and latest_checkpoint(config.out_dir) is None


def test_a_vae_run_refused_its_data_records_no_config(tmp_path: Path, capsys) -> None:
    """A resume pointed at a folder of broken videos was refused, but its config was recorded
    first, so the next resume "changed" a data.root the run never trained on."""
    from kinema.train import DataConfig

    good = make_video_folder(tmp_path / "videos")
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "a.mp4").write_bytes(b"not a video")
    data = DataConfig(kind="folder", root=str(good), width=32, height=32, frames=9, fps=8)
    config = VAETrainConfig(out_dir=str(tmp_path / "run"), model=TINY_VAE, max_steps=1,
                            crop_size=16, crop_frames=5, batch_size=2, data=data,
                            export_dir=str(tmp_path / "vae"), progress=False)  # fmt: skip
    train_vae(config)
    broken = dataclasses.replace(config, max_steps=2, data=dataclasses.replace(data, root=str(bad)))
    with pytest.raises(ValueError), pytest.warns(UserWarning):
        train_vae(broken)
    capsys.readouterr()
    train_vae(dataclasses.replace(config, max_steps=2))
    assert "data.root" not in capsys.readouterr().out


def test_convert_refuses_a_destination_with_other_files(tmp_path: Path, capsys) -> None:
    from kinema.cli import main

    note = keepsake(tmp_path / "dest")
    with pytest.raises(SystemExit) as exit_:
        main(["convert", "kinema-tiny", str(tmp_path / "dest")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "destination" in err and "holds other files" in err
    assert note.read_text() == "important"


def test_a_run_of_another_kind_in_out_dir_is_one_line(
    tmp_path: Path, vae_folder: Path, text_encoder
) -> None:
    """A LoRA config on a whole-DiT run's out_dir (and back, and another rank) crashed with a
    missing file or a state_dict size mismatch."""
    from kinema.lora import LoRAConfig

    whole = dit_config(tmp_path / "base", vae_folder, max_steps=2, precompute=False)
    base = train_dit(whole, text_encoder=text_encoder)
    lora = lambda rank: dit_config(tmp_path / "base", vae_folder, model=None, init_from=str(base),
                                   lora=LoRAConfig(rank=rank), max_steps=4,
                                   precompute=False)  # fmt: skip
    with pytest.raises(ValueError, match="holds a whole-DiT run's checkpoints; this config "
                       "trains a LoRA: give another out_dir"):  # fmt: skip
        train_dit(lora(2), text_encoder=text_encoder)
    run = dataclasses.replace(lora(2), out_dir=str(tmp_path / "lora"))
    train_dit(run, text_encoder=text_encoder, stop_after=2)
    with pytest.raises(
        ValueError,
        match=r"holds another LoRA \(other layers or rank: rank 2 "
        r"on \d+ layers\) than lora: \(rank 4 on",
    ):  # (it printed a repr)
        train_dit(dataclasses.replace(lora(4), out_dir=run.out_dir), text_encoder=text_encoder)
    with pytest.raises(ValueError, match="holds a LoRA run's checkpoints; this config trains "
                       "the whole DiT"):  # fmt: skip
        train_dit(dataclasses.replace(whole, out_dir=run.out_dir), text_encoder=text_encoder)
    train_dit(run, text_encoder=text_encoder)  # finished: its export folder holds the LoRA,
    with pytest.raises(ValueError, match="holds a LoRA run's checkpoints"):  # which was named
        train_dit(dataclasses.replace(whole, out_dir=run.out_dir), text_encoder=text_encoder)


def test_resuming_under_changed_settings_says_so_and_a_refused_run_keeps_the_record(
    tmp_path: Path, vae_folder: Path, text_encoder, capsys
) -> None:
    config = dit_config(tmp_path / "run", vae_folder, max_steps=4, lr=1e-3)
    train_dit(config, text_encoder=text_encoder, stop_after=2)
    record = (tmp_path / "run" / "train_config.json").read_text()
    wider = dataclasses.replace(config, data=dataclasses.replace(config.data, width=64))
    with pytest.raises(ValueError, match="built for other data settings"):
        train_dit(wider, text_encoder=text_encoder)
    assert (tmp_path / "run" / "train_config.json").read_text() == record  # export reads it
    capsys.readouterr()
    train_dit(dataclasses.replace(config, lr=2e-3), text_encoder=text_encoder)
    out = capsys.readouterr().out
    assert "resuming at step 2 with a changed config: lr 0.001 -> 0.002" in out


def test_exports_and_checkpoints_are_readable_as_the_umask_says(
    tmp_path: Path, vae_folder: Path, text_encoder
) -> None:
    """mkdtemp's 0o700 folders and safetensors' 0o600 files made a shared model folder
    unreadable to others (umask 022 here: folders 0o755, files 0o644)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        config = dit_config(tmp_path / "run", vae_folder, max_steps=2, precompute=True)
        model = train_dit(config, text_encoder=text_encoder)
    finally:
        os.umask(old)
    written = [model, *model.rglob("*"), *latest_checkpoint(config.out_dir).rglob("*"),
               *(tmp_path / "run" / "cache").glob("*.safetensors")]  # fmt: skip
    modes = {stat.S_IMODE(p.stat().st_mode) for p in written if p.is_file()}
    assert modes == {0o644}
    modes = {stat.S_IMODE(p.stat().st_mode) for p in written if p.is_dir()}
    assert modes == {0o755}


def test_ctrl_c_with_worker_processes_is_said_once(tmp_path: Path, vae_folder: Path) -> None:
    """Ctrl-C reaches the whole process group: each DataLoader worker, forked with the stop
    handler, printed 'saving a checkpoint' too."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.test_train import make_video_folder

    root = make_video_folder(tmp_path / "videos")
    config = {"out_dir": str(tmp_path / "run"), "vae": str(vae_folder), "text_max_length": 8,
              "model": dataclasses.asdict(dit_config(tmp_path, vae_folder).model),
              "data": {"kind": "folder", "root": str(root), "width": 32, "height": 32,
                       "frames": 9, "fps": 8},
              "precompute": False, "num_workers": 2, "batch_size": 1, "max_steps": 100000,
              "checkpoint_every": 100000, "progress": False}  # fmt: skip
    (tmp_path / "run.json").write_text(json.dumps(config))
    argv = [sys.executable, "-m", "kinema", "train", str(tmp_path / "run.json")]
    train = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # fmt: skip
    log = tmp_path / "run" / "log.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (log.exists() and log.read_text().count("\n") > 2):
        time.sleep(0.2)
    os.killpg(train.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    out, _ = train.communicate(timeout=120)
    assert train.returncode == 130, out
    assert out.count("saving a checkpoint") == 1, out
    assert latest_checkpoint(tmp_path / "run") is not None


def test_a_missing_video_folder_or_a_dit_alone_is_named_before_out_dir_is_made(
    tmp_path: Path, vae_folder: Path, text_encoder, monkeypatch
) -> None:
    from kinema.train import DataConfig

    monkeypatch.chdir(tmp_path)
    data = DataConfig(kind="folder", root="my-videos", width=32, height=32, frames=9, fps=8)
    config = dit_config(tmp_path / "run", vae_folder, data=data)
    with pytest.raises(ValueError, match=f"my-videos does not exist .*from {tmp_path}"):
        train_dit(config, text_encoder=text_encoder)
    assert not (tmp_path / "run").exists()  # no stray train_config.json or cache/meta.json
    base = train_dit(dit_config(tmp_path / "base", vae_folder, max_steps=1, precompute=False),
                     text_encoder=text_encoder)  # fmt: skip
    checkpoint = latest_checkpoint(tmp_path / "base")  # these two said "missing config.json"
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"")
    for init_from, message in ((base / "transformer", "is a DiT alone .*give vae: too"),
                               (tmp_path / "base", "is a training run's out_dir: give its "
                                "exported model"),
                               (checkpoint, "is a training checkpoint: give the run's exported"),
                               (lora, "is a LoRA, not a model")):  # fmt: skip
        ft = dit_config(tmp_path / "ft", vae_folder, model=None, vae=None, init_from=str(init_from))
        with pytest.raises(ValueError, match=message):
            train_dit(ft, text_encoder=text_encoder)
        assert not (tmp_path / "ft").exists()  # an empty out_dir was left behind


def test_convert_to_bf16_warns_of_no_slow_sampling(tmp_path: Path, capsys) -> None:
    """Loading in bf16 on a CPU without native bf16 warns that sampling is slow, which a
    conversion (no sampling) does not need to hear."""
    from kinema.cli import main

    assert main(["convert", "kinema-tiny", str(tmp_path / "tiny-bf16"), "--dtype", "bf16"]) == 0
    assert capsys.readouterr().err == f"wrote {tmp_path / 'tiny-bf16'}\n"
    assert (tmp_path / "tiny-bf16" / "transformer" / "model.safetensors").stat().st_size > 0
    import torch
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "tiny-bf16" / "transformer" / "model.safetensors"))
    kept = {k for k, v in stored.items() if v.dtype == torch.float32}  # as a bf16 load keeps
    assert "scale_shift_table" in kept and "blocks.0.norm2.weight" in kept  # were rounded
    assert stored["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    vae = load_file(str(tmp_path / "tiny-bf16" / "vae" / "model.safetensors"))
    assert {v.dtype for v in vae.values()} == {torch.float32}  # as loaded (a CPU decodes in it)


def test_out_dir_or_export_inside_the_video_folder_is_refused_first(
    tmp_path: Path, vae_folder: Path, text_encoder
) -> None:
    """Its sample videos (and an export's) would become training data on the next run, and
    an export there changed the folder the cache was built for."""
    from kinema.train import DataConfig

    root = make_video_folder(tmp_path / "videos")
    videos = DataConfig(kind="folder", root=str(root), width=32, height=32, frames=9, fps=8)
    for kw, name in ((dict(out_dir=str(root / "run")), "out_dir"),
                     (dict(export_dir=str(root / "mine")), "export folder")):  # fmt: skip
        config = dit_config(tmp_path / "run", vae_folder, data=videos, **kw)
        with pytest.raises(ValueError, match=f"{name} .* is inside data.root {root}"):
            train_dit(config, text_encoder=text_encoder)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == []


def test_kinema_train_export_inside_the_video_folder_is_refused_first(
    tmp_path: Path, vae_folder: Path, capsys
) -> None:
    """--export into data.root passed (export_dir there was refused) and wrote the model
    among the videos."""
    import json

    from kinema.cli import main
    from kinema.train import DataConfig
    from kinema.train.config import config_to_dict

    root = make_video_folder(tmp_path / "videos")
    videos = DataConfig(kind="folder", root=str(root), width=32, height=32, frames=9, fps=8)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config_to_dict(dit_config(tmp_path / "run", vae_folder,
                                                         data=videos))))  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(path), "--export", str(root / "exported")])
    assert exit_.value.code == 2 and "is inside data.root" in capsys.readouterr().err
    assert not (root / "exported").exists() and not (tmp_path / "run").exists()


def test_a_log_resaved_with_a_byte_order_mark_still_resumes(
    tmp_path: Path, vae_folder: Path, text_encoder
) -> None:
    """A log.csv re-saved by a spreadsheet (UTF-8 with a BOM) was "not a kinema training
    log", and the advice (another out_dir) threw the checkpoints away."""
    config = dit_config(tmp_path / "run", vae_folder, max_steps=1, precompute=False)
    train_dit(config, text_encoder=text_encoder)
    log = tmp_path / "run" / "log.csv"
    log.write_bytes(b"\xef\xbb\xbf" + log.read_bytes())
    train_dit(dataclasses.replace(config, max_steps=2), text_encoder=text_encoder)
    assert [line.split(",")[0] for line in log.read_text().splitlines()] == ["step", "1", "2"]


def test_a_run_that_failed_before_encoding_anything_starts_again_once_fixed(
    tmp_path: Path, vae_folder: Path, text_encoder
) -> None:
    from kinema.io.video import write_video
    from kinema.train import DataConfig

    root = tmp_path / "videos"
    root.mkdir()
    data = DataConfig(kind="folder", root=str(root), width=32, height=32, frames=9, fps=8)
    config = dit_config(tmp_path / "run", vae_folder, data=data, max_steps=1)
    with pytest.raises(ValueError, match="has no videos"):
        train_dit(config, text_encoder=text_encoder)
    frames = np.random.default_rng(0).integers(0, 255, (12, 32, 32, 3), dtype=np.uint8)
    write_video(root / "a.mp4", frames, fps=8)  # the user adds the video
    (root / "a.txt").write_text("a red circle")
    train_dit(config, text_encoder=text_encoder)  # was: "cache was built for other files"
    assert (tmp_path / "run" / "cache" / "text.safetensors").is_file()
