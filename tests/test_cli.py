"""The kinema command: bad input gives one line on stderr and exit code 2, nothing written."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kinema.cli import main
from kinema.io.video import probe
from tests.wan_tiny import build_wan_folder


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return build_wan_folder(tmp_path_factory.mktemp("wan") / "wan")


def run(capsys, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code, capsys.readouterr().err


BASE = ["--size", "32x32", "--steps", "2", "-q"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "40x32"], "width 40 is not a multiple of 16; nearest valid: 48"),
        (["--size", "32"], "size '32' must be WIDTHxHEIGHT"),
        (["--frames", "6"], "frames 6 is not 4k+1"),
        (["--steps", "0"], "steps 0 must be >= 1"),
        (["--guidance", "-2"], "guidance -2.0 must be >= 0"),
        (["--seed", "-1"], "seed -1 must be in"),
        (["--sampler", "ddim"], "unknown sampler 'ddim'; valid: ['euler', 'unipc']"),
        (["--device", "cuda"], "device 'cuda' is not available here"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--dtype", "int8"], "unknown dtype 'int8'"),
        (["--seconds", "0"], "seconds 0.0 must be > 0"),
        (["--seconds", "nan"], "seconds nan must be > 0 (and finite)"),
        (["--seconds", "inf"], "seconds inf must be > 0 (and finite)"),
        (["--guidance", "nan"], "guidance nan must be >= 0"),
        (["--shift", "inf"], "shift inf must be > 0"),
        (["--fps", "0"], "fps 0 must be >= 1"),  # not the model's fps
        (["--fps", "0.5"], "fps 0.5 must be >= 1"),
        (["--fps", "x"], "argument --fps: fps 'x' must be a number >= 1, e.g. 16 or 23.976"),
        (["--size", "0x0"], "width 0 is not a multiple of 16; nearest valid: 16"),
        (
            ["--frames", "17", "--at", "0.2:a dog", "--at", "0.22:a cow"],
            "0.2 s and 0.22 s both switch at frame",
        ),
        (
            ["--frames", "9", "--at", "0.45:a dog"],
            "the latest time that changes the clip is 0.25 s",
        ),
        (["--cache", "-0.5"], "cache -0.5 must be a number >= 0 (0 turns the step cache off)"),
        (["-o", "clip.avi"], "unknown extension '.avi'"),
        (["--at", "soon:a dog"], "argument --at: 'soon:a dog' must be SECONDS:PROMPT"),
        (["--at", "9:a dog"], "prompt time 9 s is outside the clip"),
        (["--frames", "17", "--at", "0.2:a dog", "--at", "0.1:a cow"], "must increase"),
        (["--strength", "0.5"], "strength 0.5 is video-to-video's noise level"),
        (["--decode-tile", "256"], "--decode-tile shares the VAE decode's tiles across"),
        (["--devices", "2", "--decode-tile", "7"], "--decode-tile 7 must be a multiple of 32"),
        (["--lora", "nowhere.safetensors"], "LoRA file nowhere.safetensors does not exist"),
        (["--lora", "x.safetensors:strong"], "the strength after ':' must be a number"),
        (["--lora", "x.safetensors", "--devices", "2"], "--lora runs in one process"),
        (["--devices", "2", "--offload", "model"], "--offload works in one process"),  # launched
        (
            ["--switch", "fade"],
            "argument --switch: invalid choice: 'fade' (choose from 'blend', 'cut')",
        ),
    ],
)
def test_bad_generate_input(capsys, tmp_path, wan, args, message):
    out = tmp_path / "out.mp4"
    length = [] if {"--frames", "--seconds"} & set(args) else ["--frames", "5"]
    argv = ["generate", "a cat", "--model", str(wan), "-o", str(out), *BASE, *length, *args]
    code, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("kinema: error: ")
    assert message in err
    assert not out.exists() and not list(tmp_path.glob("*.mp4")) and "Traceback" not in err


@pytest.mark.parametrize(
    "kind, count, fps, new, out_fps",  # new: 1 s of frames, a multiple of 4, at out_fps
    [("src", 9, 8, 8, 8), ("src.gif", 33, 16, 16, 16), ("src.webp", 9, 17, 16, 17)],
)
def test_extend_keeps_the_source_and_adds_the_seconds(
    capsys, tmp_path, wan, kind, count, fps, new, out_fps
):
    """The source frames come out as they went in. A GIF written at 16 fps (delays of 6 and
    7 cs) is extended at 16, every frame once (a 6 cs GIF had been read at 17 fps, repeating a
    frame); a 17 fps WebP (59 ms frames) read back one frame more than it held."""
    from kinema.io.video import read_video, write_video

    clip = np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    src = write_video(tmp_path / kind, clip, fps=fps)  # src: a folder of PNGs (lossless)
    source, _ = read_video(src)  # as decoded: GIF and WebP are lossy
    assert len(source) == count
    out = tmp_path / "longer"
    argv = ["extend", str(src), "--prompt", "a cat", "--seconds", "1", "--model", str(wan),
            "-o", str(out), "--steps", "2"]  # fmt: skip
    assert main(argv) == 0
    frames, written_fps = read_video(out)
    assert written_fps == pytest.approx(out_fps, abs=1e-3) and len(frames) == count + new
    assert np.array_equal(frames[:count], source)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seconds", "0"], "seconds 0.0 must be > 0"),
        (["--seconds", "nan"], "seconds nan must be > 0 (and finite)"),
        (["--seconds", "1", "--at", "3:a dog"], "prompt time 3 s is outside the clip"),
        (["--seconds", "1", "--guidance", "nan"], "guidance nan must be >= 0"),
        (["--seconds", "1", "--video-is-missing"], "nowhere.mp4"),
    ],
)
def test_bad_extend_input(capsys, tmp_path, wan, args, message):
    from kinema.io.video import write_video

    src = write_video(tmp_path / "src.mp4", np.zeros((9, 32, 32, 3), np.uint8), fps=8)
    if "--video-is-missing" in args:
        args, src = [a for a in args if a != "--video-is-missing"], tmp_path / "nowhere.mp4"
    out = tmp_path / "out.mp4"
    argv = ["extend", str(src), "--prompt", "a cat", "--model", str(wan), "-o", str(out), *args]
    code, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_refused(capsys, tmp_path, wan, prompt):
    out = tmp_path / "out.mp4"
    argv = ["generate", prompt, "--model", str(wan), "-o", str(out), *BASE, "--frames", "5"]
    code, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and "prompt is empty" in err
    assert not out.exists()


def test_a_prompt_longer_than_the_encoder_reads_is_warned_about(capsys, tmp_path, wan):
    out = tmp_path / "out.mp4"
    prompt = "a cat walking " * 200  # over the 512 umT5 tokens Wan reads
    argv = ["generate", prompt, "--model", str(wan), "-o", str(out), *BASE, "--frames", "5"]
    assert main(argv) == 0 and out.exists()
    warning = capsys.readouterr().err.splitlines()[0]
    assert warning.startswith("kinema: warning: a prompt is longer than the 512 tokens")
    assert "it reads only 'a cat walking a cat walking" in warning
    (said,) = json.loads(out.with_suffix(".json").read_text())["warnings"]  # the sidecar too
    assert warning == f"kinema: warning: {said}"
    main([*argv[:1], "a cat walking", *argv[2:]])
    assert "warning" not in capsys.readouterr().err


def test_missing_model(capsys, tmp_path):
    code, err = run(capsys, "generate", "x", "--model", str(tmp_path / "nope"))
    assert code == 2 and "not found" in err and err.count("\n") == 1


def test_generate_writes_video_and_sidecar(tmp_path, wan):
    out = tmp_path / "clip.mp4"
    assert (
        main(["generate", "a cat", "--model", str(wan), "-o", str(out), *BASE, "--frames", "5"])
        == 0
    )
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["frames"] == 5 and info["width"] == 32 and info["steps"] == 2
    assert (info["offload"], info["compile"]) == ("none", False)
    assert out.stat().st_size > 0
    again = ["generate", "a cat", "--model", str(wan), "-o", str(out), *BASE, "--frames", "5"]
    assert main([*again, "--fps", "23.976"]) == 0  # its own sidecar is replaced; any rate
    assert json.loads(out.with_suffix(".json").read_text())["fps"] == 23.976
    assert probe(out).fps == pytest.approx(23.976, abs=1e-3)


def test_an_output_that_would_destroy_files_or_fail_is_refused_first(capsys, tmp_path):
    """Refused before the model loads (a missing model would be the error otherwise)."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    os.mkfifo(tmp_path / "fifo.mp4")
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "notes.json").write_text('{"mine": 1}')  # the sidecar name of notes.mp4
    for out, message in ((tmp_path / "mine", "holding other files (notes.txt)"),
                         (tmp_path / "folder.mp4", "is an existing folder; give a file name"),
                         ("-", "'-' (standard output) is not supported"),
                         (tmp_path / "notes.mp4", "notes.json exists and is not a kinema"),
                         (tmp_path / "file" / "x.mp4", "is not a writable folder"),
                         (tmp_path / "file", "is a file; a name without .mp4"),  # not frames
                         (tmp_path / "fifo", "is a FIFO, not a file"),
                         (tmp_path / "fifo.mp4", "is a FIFO, not a file"),  # not replaced
                         ("/dev/null", "is a device, not a file"),
                         ("/proc/x.mp4", "/proc is not a writable folder")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            main(["generate", "a cat", "--model", str(tmp_path / "none"), "-o", str(out)])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert (tmp_path / "file").read_text() == "x"
    assert stat.S_ISFIFO((tmp_path / "fifo.mp4").stat().st_mode)
    assert (tmp_path / "notes.json").read_text() == '{"mine": 1}'
    assert list((tmp_path / "folder.mp4").iterdir()) == [] and not os.path.exists("-")


@pytest.mark.parametrize("name", ["clip.mp4", "clip.gif", "frames/"])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, wan, name):
    """A file-size limit (RLIMIT_FSIZE: writes past it fail with EFBIG, as a full disk's
    with ENOSPC) met while the output is written: no traceback, exit 1, no half file."""
    import resource

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    out = tmp_path / "out" / name
    out.parent.mkdir()
    argv = [sys.executable, "-m", "kinema", "generate", "a cat", "--model", str(wan),
            "-o", str(out), *BASE, "--frames", "9"]  # fmt: skip
    done = subprocess.run(argv, preexec_fn=small_files, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert done.stderr == f"kinema: error: cannot write {out}: File too large\n"
    assert list(out.parent.iterdir()) == []


def test_a_full_disk_while_converting_names_the_destination(tmp_path, wan):
    """convert's error named its hidden temporary folder (.DEST.xxxx/transformer/...)."""
    import resource

    small_files = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
    dest = tmp_path / "out" / "converted"
    dest.parent.mkdir()
    argv = [sys.executable, "-m", "kinema", "convert", str(wan), str(dest)]
    done = subprocess.run(argv, preexec_fn=small_files, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    assert done.stderr == f"kinema: error: cannot write {dest}: File too large\n"
    assert list(dest.parent.iterdir()) == []


@pytest.mark.parametrize("name", ["clip.mp4", "frames/"])
def test_an_output_folder_removed_mid_run_is_one_line(tmp_path, wan, name, capsys):
    """The folder deleted while the output is written (FFmpeg's error names no file; a
    frame's does): exit 1 and one line, not a traceback."""
    import shutil
    import threading

    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / name
    done = threading.Event()

    def written() -> bool:  # the output's files, not the writability check's (a moment's)
        names = [p.name for p in folder.iterdir()] if folder.exists() else []
        return any(not n.startswith(".kinema-check-") for n in names)

    def remove_when_written() -> None:
        while not done.is_set():
            if written():
                shutil.rmtree(folder, ignore_errors=True)
                return
            time.sleep(0.002)

    watcher = threading.Thread(target=remove_when_written)
    watcher.start()
    try:
        code = main(["generate", "a cat", "--model", str(wan), "-o", str(out), *BASE,
                     "--frames", "33"])  # fmt: skip
    finally:
        done.set()
        watcher.join()
    err = capsys.readouterr().err
    assert code == 1 and err.endswith(
        f"kinema: error: cannot write {out}: No such file or directory\n"
    )
    assert not folder.exists()


def test_a_batch_whose_out_folder_is_removed_mid_run_is_one_line(tmp_path, wan, capsys):
    """--out removed (rm -rf) once the first video is there: one line, exit 1."""
    import shutil
    import threading

    requests = tmp_path / "r.jsonl"
    lines = [{"prompt": f"a cat {i}", "frames": 9, "size": "32x32", "steps": 2} for i in range(4)]
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "gone" / "b"
    done = threading.Event()

    def remove_after_first() -> None:
        while not done.is_set():
            if out.is_dir() and any(out.glob("*.mp4")):
                shutil.rmtree(tmp_path / "gone", ignore_errors=True)
                return
            time.sleep(0.002)

    watcher = threading.Thread(target=remove_after_first)
    watcher.start()
    try:
        code = main(["batch", str(requests), "--model", str(wan), "--out", str(out), "-q"])
    finally:
        done.set()
        watcher.join()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and last.startswith(f"kinema: error: cannot write {out}"), last


def test_a_lora_given_as_the_model_says_to_give_it_as_lora(capsys, tmp_path):
    (tmp_path / "my-lora").mkdir()
    (tmp_path / "my-lora" / "lora.safetensors").write_bytes(b"x")
    for model in (tmp_path / "my-lora", tmp_path / "my-lora" / "lora.safetensors"):
        code, err = run(capsys, "generate", "a cat", "--model", str(model), "-o",
                        str(tmp_path / "out.mp4"))  # fmt: skip
        assert code == 2 and "is a weights file, not a model folder: a LoRA goes in --lora" in err
        assert "a model is its whole folder" in err  # a single-file DiT is not a LoRA


def test_a_frame_folder_with_a_dot_in_its_name_is_a_folder(tmp_path, wan):
    """-o v1.5/ was refused: "unknown extension '.5'"."""
    out = tmp_path / "v1.5"
    argv = ["generate", "a cat", "--model", str(wan), "-o", f"{out}/", *BASE, "--frames", "5"]
    assert main(argv) == 0 and len(list(out.glob("*.png"))) == 5
    assert (tmp_path / "v1.5.json").is_file() and not (tmp_path / "v1.json").exists()  # v1.mp4's


def test_a_models_name_is_its_folders_even_as_dot_or_a_hub_snapshot(tmp_path, monkeypatch):
    """--model . recorded "" as the model; a Hugging Face cache snapshot its hash."""
    from kinema.loading import model_name

    snapshot = tmp_path / "models--Wan-AI--Wan2.1-T2V-1.3B-Diffusers" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert model_name(snapshot) == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    monkeypatch.chdir(snapshot.parent)
    assert model_name(Path(".")) == "snapshots"


def test_cfg_parallel_only_where_guidance_makes_a_second_branch(wan):
    """--devices 2 --guidance 1 split the ranks for CFG and both computed the same batch."""
    from argparse import Namespace

    from kinema.distributed.cli import guided

    assert not guided(Namespace(guidance=1.0, model=str(wan)))
    assert guided(Namespace(guidance=None, model=None))  # kinema-tiny's default, 3
    assert guided(Namespace(guidance=4.0, model=str(wan)))


def test_sigterm_while_writing_leaves_no_half_file(tmp_path, wan):
    """SIGTERM (a service manager, `timeout`, a batch scheduler) killed the process where it
    was and left the hidden temporary video behind; now it unwinds as Ctrl-C does."""
    import signal
    import time

    out = tmp_path / "out" / "long.mp4"
    out.parent.mkdir()
    argv = [sys.executable, "-m", "kinema", "generate", "a cat", "--model", str(wan),
            "-o", str(out), *BASE, "--frames", "4001"]  # fmt: skip
    job = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(out.parent.glob(".long.*")):
        time.sleep(0.05)
    assert list(out.parent.glob(".long.*")), "the video was never being written"
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 143 and err.endswith("kinema: terminated\n"), err
    assert list(out.parent.iterdir()) == []


def test_generate_with_a_timed_prompt_records_it(tmp_path, wan):
    out = tmp_path / "timed.mp4"
    argv = ["generate", "a cat", "--model", str(wan), "-o", str(out), *BASE, "--frames", "9",
            "--at", "0.25:a dog"]  # fmt: skip
    assert main(argv) == 0
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["prompts"] == [[0.25, "a dog"]] and info["frames"] == 9


def test_info_into_a_pipe_closed_early_ends_quietly(wan):
    """`kinema info | head -1` ended in a BrokenPipeError traceback."""
    reader_gone = subprocess.run(  # `true` reads nothing and is gone before kinema writes
        f"{sys.executable} -m kinema info {wan} --json | true", shell=True,
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert reader_gone.stderr == "", reader_gone.stderr


def test_info_prints_parameters_and_memory(capsys, wan):
    assert main(["info", str(wan), "--size", "64x32", "--frames", "9", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"]["transformer"] > 0 and info["request"]["width"] == 64
    peaks = info["peak_memory_bytes"]
    assert peaks["cpu_fp32"] > peaks["fp32"] > peaks["bf16"] > 0  # a CPU runtime holds more
    from kinema.loading import load
    from kinema.memory import encoder_bytes, weight_bytes, work_bytes

    pipe = load(str(wan), device="cpu")
    umt5 = weight_bytes(pipe.text_encoder.encoder.model)
    assert encoder_bytes(pipe, 4) == umt5 > 0
    weights = weight_bytes(pipe.dit) + weight_bytes(pipe.vae)
    work = {d: work_bytes(pipe, 64, 32, 9, 4, d) for d in ("cuda", "cpu")}
    # on a GPU the text encoder visits only to encode, before the work; on a CPU it stays
    assert peaks["fp32"] == weights + max(umt5, work["cuda"])
    assert peaks["cpu_fp32"] == weights + umt5 + work["cpu"]
    assert info["cpu_process_bytes"] > peaks["cpu_fp32"]  # the interpreter and torch too
    assert info["vocabulary"] is None  # Wan reads any words
    decode = info["decode"]  # this machine's free memory (/proc/meminfo) holds a tiny decode
    assert 0 < decode["untiled_bytes"] < decode["cpu_free_bytes"] and decode["cpu_tile"] is None


def test_info_estimates_a_long_clip_as_the_one_window_it_makes_at_a_time(capsys, wan):
    """A long clip is made window by window (peak RSS 60 s / 4 s: 1.02), so info's estimate
    of it is one window's, not the whole length's (it was 4x the 4 s one for kinema-tiny)."""
    from kinema.loading import load

    window = load(str(wan), device="cpu").window_frames
    infos = []
    for length in (["--frames", str(window)], ["--seconds", "20", "--fps", "8"]):  # 161 frames
        assert main(["info", str(wan), *length, "--json"]) == 0
        infos.append(json.loads(capsys.readouterr().out))
    short, long = infos
    assert long["request"]["window_frames"] == window < long["request"]["frames"]
    assert long["peak_memory_bytes"] == short["peak_memory_bytes"]
    assert long["decode"]["untiled_bytes"] == short["decode"]["untiled_bytes"]
    assert main(["info", str(wan), "--frames", str(4 * 40 + 1)]) == 0
    assert f"161 frames, made {window} at a time" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "40x32"], "width 40 is not a multiple of 16; nearest valid: 48"),
        (["--frames", "0"], "frames 0 is not 4k+1"),
        (["--frames", "6"], "frames 6 is not 4k+1"),
        (["--seconds", "inf"], "seconds inf must be > 0 (and finite)"),
        (["--seconds", "2", "--fps", "0"], "fps 0 must be >= 1"),
        (["--fps", "0.5"], "fps 0.5 must be >= 1"),  # without --seconds: was ignored, exit 0
        (["--seconds", "2", "--frames", "9"], "not allowed with argument"),
    ],
)
def test_info_refuses_a_request_the_model_cannot_make(capsys, wan, args, message):
    code, err = run(capsys, "info", str(wan), *args)
    assert code == 2 and err.count("\n") == 1 and message in err


def test_free_cpu_memory_is_the_kernels_available_memory():
    from pathlib import Path

    from kinema.memory import free_bytes

    meminfo = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
    total = int(meminfo["MemTotal"].split()[0]) * 1024
    assert 0 < free_bytes("cpu") <= total


def test_info_lists_the_words_the_built_in_model_knows(capsys):
    from kinema.data.synthetic import vocabulary

    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].split() == ["vocabulary", *vocabulary()] and "circle" in vocabulary()


def test_convert_to_kinema_format_gives_the_same_video(tmp_path, wan):
    import kinema

    dest = tmp_path / "converted"
    assert main(["convert", str(wan), str(dest)]) == 0
    assert (dest / "kinema.json").exists() and (dest / "text_encoder" / "config.json").exists()
    settings = dict(width=32, height=32, frames=5, steps=2, seed=1)
    a = kinema.load(wan, device="cpu").generate("a dog", **settings)
    b = kinema.load(dest, device="cpu").generate("a dog", **settings)
    assert (a.frames == b.frames).all()


def test_convert_keeps_the_built_in_models_vocabulary_and_step_cache_calibration(tmp_path):
    from kinema.loading import load
    from kinema.sampling.cache import CacheCalibration

    assert main(["convert", "kinema-tiny", str(tmp_path / "tiny")]) == 0
    copy, built_in = load(tmp_path / "tiny", device="cpu"), load(device="cpu")
    assert copy.vocabulary and copy.vocabulary == built_in.vocabulary
    assert built_in.cache_calibration != CacheCalibration()  # the package ships one
    assert copy.cache_calibration == built_in.cache_calibration  # --cache works on the copy


def test_entry_point_exit_code(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kinema",
            "generate",
            "x",
            "--frames",
            "6",
            "--model",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("kinema: error: ")


def test_devices_two_relaunches_under_torchrun_and_matches(tmp_path, wan):
    """`kinema generate --devices 2` runs 2 gloo processes (CFG-parallel); rank 0 writes."""
    from kinema.io.video import read_video

    args = ["generate", "a cat", "--model", str(wan), *BASE, "--frames", "5", "--guidance", "3"]
    run = lambda *extra: subprocess.run(
        [sys.executable, "-m", "kinema", *args, *extra], capture_output=True, text=True, timeout=300
    )
    one = run("-o", f"{tmp_path}/one/")
    two = run("--devices", "2", "-o", f"{tmp_path}/two/")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert "2 processes: cfg 2 x ulysses 1 x ring 1" in two.stderr
    a, _ = read_video(tmp_path / "one")
    b, _ = read_video(tmp_path / "two")
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_bad_input_under_devices_is_one_line_and_exit_2(tmp_path, wan):
    """A request the ranks refuse (found after each loads the model) is rank 0's one line and
    exit 2, as in one process: not a line per rank, the launcher's log and a traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "kinema", "generate", "a cat", "--model", str(wan), *BASE,
         "--frames", "6", "--devices", "2", "-o", f"{tmp_path}/out.mp4"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("kinema: error: frames 6") and not list(tmp_path.iterdir())


def test_version(capsys):
    import kinema

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"kinema {kinema.__version__}\n"


def test_the_progress_bar_says_what_runs_after_the_last_step(capsys):
    """The bar stands at its total while the last window is decoded and written: it says so,
    and the line it leaves when done does not."""
    from kinema.cli import progress_bar

    with progress_bar(False) as progress:
        progress(1, 2)
        assert "decoding" not in capsys.readouterr().err
        progress(2, 2)
        assert "decoding" in capsys.readouterr().err.split("\r")[-1]
    assert "decoding" not in capsys.readouterr().err.split("\r")[-1]
    with progress_bar(True) as progress:
        assert progress is None
    with progress_bar(False) as progress:  # the first step took 0.2 s, not no time at all
        time.sleep(0.2)
        progress(1, 1)
        rate = float(re.findall(r"([0-9.]+)step/s", capsys.readouterr().err)[-1])
    assert rate < 10  # it said 75,000 steps/s


def test_a_text_file_written_whole_or_not_at_all(tmp_path):
    """step_cache.json, eval JSON and configs: a failed write left 'NAME.tmp' behind."""
    from kinema.io.paths import write_text_atomic

    assert write_text_atomic(tmp_path / "a.json", "{}\n").read_text() == "{}\n"
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")  # the rename onto it fails
    with pytest.raises(OSError):
        write_text_atomic(tmp_path / "taken", "{}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "taken"]
