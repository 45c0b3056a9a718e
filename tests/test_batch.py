"""``kinema batch``: request parsing, a resumable local run through the CLI function, and a run
on a 2-CPU local Ray cluster where a worker is killed mid-request."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import torch

from kinema.batch import BatchOptions, Worker, read_requests, run
from kinema.configs import DiTConfig, SamplingDefaults, VAEConfig
from kinema.distributed.cli import add_batch
from kinema.io.video import read_video


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kinema.io.checkpoint import save_model_folder
    from kinema.models.dit import VideoDiT
    from kinema.models.vae import CausalVAE

    torch.manual_seed(0)
    dit = VideoDiT(DiTConfig(num_heads=2, head_dim=8, text_dim=384, freq_dim=16, ffn_dim=32,
                             num_layers=1))  # fmt: skip
    vae = CausalVAE(VAEConfig(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1, z_dim=16))
    sampling = SamplingDefaults(width=32, height=32, frames=5, fps=8, steps=2, guidance=1.0)
    folder = tmp_path_factory.mktemp("model") / "tiny"
    return save_model_folder(folder, dit=dit, vae=vae, sampling=sampling, name="tiny",
                             text_encoder={"kind": "minilm", "max_length": 16})  # fmt: skip


def write_lines(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def log_entries(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "batch.log.jsonl").read_text().splitlines()]


def test_read_requests_records_bad_lines(tmp_path: Path) -> None:
    rows = [{"id": "a", "prompt": "x"}, "not json", {"prompt": "y", "colour": 1},
            {"id": "a", "prompt": "again"}, {"id": "../up", "prompt": "z"},
            {"seed": 1}]  # fmt: skip
    items = read_requests(write_lines(tmp_path / "r.jsonl", rows))
    assert [i.error is None for i in items] == [True, False, False, False, False, False]
    assert "not JSON" in items[1].error and "colour" in items[2].error
    assert "duplicate id 'a'" in items[3].error and "must match" in items[4].error
    assert "prompt" in items[5].error
    with pytest.raises(ValueError, match="not found"):
        read_requests(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="is a folder: give a JSON-lines file"):
        read_requests(tmp_path)
    (tmp_path / "notes.md").write_text("# Notes\n\nnot a requests file\n")  # 3 error files
    with pytest.raises(ValueError, match=r"holds no JSON request \(none of its 2 lines"):
        read_requests(tmp_path / "notes.md")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        read_requests(tmp_path / "binary.jsonl")


def test_a_bom_a_bad_line_and_reserved_ids(tmp_path: Path) -> None:
    """A BOM broke line 1; a bad line 3 took the id 00003 from a valid request that named it;
    an id ending .error named another request's error record."""
    path = tmp_path / "r.jsonl"
    rows = ['{"prompt": "bom"}', '{"prompt": "x"}', "not json", '{"id": "00003", "prompt": "y"}',
            '{"id": "foo.error", "prompt": "z"}']  # fmt: skip
    path.write_bytes("\r\n".join(rows).encode("utf-8-sig"))
    items = read_requests(path)
    assert [(i.id, i.error is None) for i in items] == [
        ("00001", True), ("00002", True), ("line00003", False), ("00003", True),
        ("line00005", False)]  # fmt: skip
    assert "ends with .error" in items[4].error


def test_a_users_file_in_out_is_kept_and_an_edited_line_made_again(
    tmp_path: Path, tiny_model: Path
) -> None:
    """A file of the user's named like an output was overwritten; resuming only checked that
    files existed, so an edited (or moved, line-numbered) request kept the old video."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.gif").write_text("the user's own file")
    rows = [{"id": "mine", "prompt": "a red ball"}, {"prompt": "a red ball", "steps": 1}]
    requests = write_lines(tmp_path / "r.jsonl", rows)
    options = BatchOptions(model=str(tiny_model), format="gif")
    summary = run(requests, out, options, show_progress=False)
    assert (summary.done, summary.failed) == (1, 1)
    assert (out / "mine.gif").read_text() == "the user's own file"
    error = json.loads((out / "mine.error.json").read_text())["error"]
    assert "exists and was not made by a batch here" in error
    assert run(requests, out, options, show_progress=False).failed == 1  # and again
    first = (out / "00002.gif").read_bytes()
    write_lines(requests, [rows[0], {"prompt": "a blue ball", "steps": 1}])  # line 2 edited
    summary = run(requests, out, options, show_progress=False)
    assert (summary.skipped, summary.done) == (0, 1) and (out / "00002.gif").read_bytes() != first
    assert json.loads((out / "00002.json").read_text())["prompt"] == "a blue ball"
    assert run(requests, out, options, show_progress=False).skipped == 1
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="--out .*afile is a file; give a folder"):
        run(requests, tmp_path / "afile", options, show_progress=False)


def test_field_errors_name_the_field_and_api_names_work(tmp_path: Path, tiny_model) -> None:
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 0, 0)).save(tmp_path / "start.png")
    rows = [
        {"id": "size", "prompt": "x", "size": "big"},
        {"id": "text", "prompt": "x", "seconds": "abc"},
        {"id": "bool", "prompt": "x", "seconds": True},
        {
            "id": "ref",
            "prompt": "x",
            "input_reference": str(tmp_path / "start.png"),
            "steps": 1,
            "size": "32x32",
            "frames": 5,
        },
        {"id": "dot", "prompt": "x", "model": f"{tiny_model}/.", "steps": 1, "frames": 5},
        {"id": "huge", "prompt": "x", "size": "8192x8192", "seconds": 60},  # was killed (OOM)
        {"id": "typo", "prompt": "x", "seconds": "1_0"},  # float() read it as 10
        {"id": "texts", "prompt": "x", "steps": "1", "frames": "5", "guidance": "1"},  # as a form
    ]
    requests = write_lines(tmp_path / "r.jsonl", rows)  # fmt: skip
    out = tmp_path / "out"
    summary = run(requests, out, BatchOptions(model=str(tiny_model), format="gif"),
                  show_progress=False)  # fmt: skip
    assert (summary.done, summary.failed) == (3, 5)
    typo = json.loads((out / "typo.error.json").read_text())["error"]
    assert typo == "seconds '1_0' is not a number"
    made = json.loads((out / "texts.json").read_text())
    assert (made["steps"], made["frames"], made["guidance"]) == (1, 5, 1)
    errors = {r: json.loads((out / f"{r}.error.json").read_text())["error"]
              for r in ("size", "text", "bool")}  # fmt: skip
    huge = json.loads((out / "huge.error.json").read_text())["error"]
    assert re.fullmatch(r"size 8192x8192 needs about [\d.]+ GiB at its peak; this machine has "
                        r"[\d.]+ GiB for a job: ask for a smaller size .*", huge), huge  # fmt: skip
    assert errors == {
        "size": "size 'big' must be WIDTHxHEIGHT, e.g. 832x480",
        "text": "seconds 'abc' is not a number",
        "bool": "seconds must be a number or a numeric string, got True",
    }
    assert json.loads((out / "ref.json").read_text())["image"] is not None
    assert json.loads((out / "ref.json").read_text())["timings"]["load"] == 0  # the batch's


def test_ray_before_the_requests_file_does_not_take_it(tmp_path: Path, capsys) -> None:
    """`kinema batch --ray r.jsonl --out x` said 'the following arguments are required'."""
    from kinema.cli import main

    requests = write_lines(tmp_path / "r.jsonl", ["not json"])
    for argv, said in ((["--ray", str(requests)], "holds no JSON request"),  # read as the file
                       ([], "give the requests file")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            main(["batch", *argv, "--out", str(tmp_path / "o"), "-q"])
        assert exit_.value.code == 2 and said in capsys.readouterr().err


def test_options_that_would_be_ignored_are_refused() -> None:
    """Workers are Ray actors and a device is a local run's: each without the other was
    silently dropped (a batch asked for 2 workers ran in one process)."""
    with pytest.raises(ValueError, match="workers are Ray actors; give ray too"):
        BatchOptions(workers=2)
    with pytest.raises(ValueError, match="'cuda' is for a local run"):
        BatchOptions(device="cuda", ray="local")
    assert BatchOptions(workers=2, ray="local").workers == 2


def test_local_batch_is_resumable(tmp_path: Path, tiny_model: Path) -> None:
    rows = [{"id": "a", "prompt": "a red ball", "seed": 1},
            {"id": "b", "prompt": "a blue ball", "size": "32x32", "seconds": 0.5},
            {"id": "bad", "prompt": "x", "frames": 6}]  # fmt: skip
    requests = write_lines(tmp_path / "r.jsonl", rows)
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    add_batch(parser.add_subparsers())
    args = parser.parse_args(["batch", str(requests), "--out", str(out), "--model",
                              str(tiny_model), "--format", "gif", "-q"])  # fmt: skip
    assert args.run(args) == 1  # one request failed, the others went on
    assert (out / "a.gif").exists() and (out / "b.json").exists()
    assert json.loads((out / "b.json").read_text())["frames"] == 5  # 0.5 s at 8 fps -> 4k+1
    assert "frames 6" in json.loads((out / "bad.error.json").read_text())["error"]
    write_lines(requests, rows[:2] + [{"id": "bad", "prompt": "x", "frames": 9}])
    summary = run(requests, out, BatchOptions(model=str(tiny_model), format="gif"),
                  show_progress=False)  # fmt: skip
    assert (summary.skipped, summary.done, summary.failed) == (2, 1, 0)
    assert not (out / "bad.error.json").exists()
    done = [e["id"] for e in log_entries(out) if e["status"] == "done"]
    assert sorted(done) == ["a", "b", "bad"]


def test_timed_prompts_and_compile(tmp_path: Path, tiny_model: Path) -> None:
    """``at`` lines (as the HTTP API's) become the request's timed prompts; ``--compile``
    reaches the worker's model; a malformed ``at`` fails its request alone."""
    rows = [{"id": "timed", "prompt": "a red ball", "seconds": 1, "at": ["0.5:a blue ball"]},
            {"id": "one", "prompt": "a red ball", "seconds": 1, "at": "0.5:a blue ball"},
            {"id": "bad", "prompt": "x", "at": ["soon:a blue ball"]},
            {"id": "both", "prompt": "x", "at": ["0.5:b"], "prompts": [[0.5, "b"]]}]  # fmt: skip
    requests = write_lines(tmp_path / "r.jsonl", rows)
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    add_batch(parser.add_subparsers())
    args = parser.parse_args(["batch", str(requests), "--out", str(out), "--model",
                              str(tiny_model), "--format", "gif", "-q", "--compile"])  # fmt: skip
    assert args.compile
    worker = Worker(str(tiny_model), "cpu", None, compile=True)
    assert all(b._compiled_call_impl is not None for b in worker.pipe.dit.blocks)
    assert worker.pipe.dit.compiled  # what the sidecar records
    summary = run(requests, out, BatchOptions(model=str(tiny_model), format="gif"),
                  show_progress=False)  # fmt: skip
    assert (summary.done, summary.failed) == (2, 2)
    for rid in ("timed", "one"):
        assert json.loads((out / f"{rid}.json").read_text())["prompts"] == [[0.5, "a blue ball"]]
    bad = json.loads((out / "bad.error.json").read_text())["error"]
    assert "at 'soon:a blue ball' must be SECONDS:PROMPT" in bad
    assert "give at or prompts" in json.loads((out / "both.error.json").read_text())["error"]


def test_a_worker_sends_the_encoded_file_the_pipeline_writes(tmp_path: Path, tiny_model) -> None:
    """What a Ray actor sends the driver: the bytes of the video file ``Pipeline.save`` writes
    (encoded window by window on the actor), not raw frames, and its sidecar info."""
    from kinema.batch import build_request

    worker = Worker(str(tiny_model), "cpu", None)
    fields = {"prompt": "a red ball", "seed": 1, "frames": 13}
    data, info = worker.encode(fields, "mp4")
    local = worker.pipe.save(build_request(fields, worker.pipe), tmp_path / "local.mp4")
    assert isinstance(data, bytes) and data == local.path.read_bytes()
    assert (
        info["frames"] == 13
        and info["transformer_evaluations"] == local.info["transformer_evaluations"]
    )
    (tmp_path / "sent.mp4").write_bytes(data)
    assert read_video(tmp_path / "sent.mp4")[0].shape == (13, 32, 32, 3)


def test_ray_batch_survives_a_killed_worker(tmp_path: Path, tiny_model: Path) -> None:
    import ray

    # both actors are loaded before work starts; the slow request (first, on actor 0) takes
    # ~50x a small one, so actor 0 is still busy with it when the first small result arrives
    slow = {"id": "slow", "prompt": "a big one", "size": "256x256", "frames": 33}
    rows = [slow] + [{"id": f"r{i}", "prompt": f"ball {i}", "seed": i} for i in range(5)]
    requests = write_lines(tmp_path / "r.jsonl", rows)
    out = tmp_path / "out"
    killed: list[str] = []

    def kill_first_worker(rid: str, status: str) -> None:
        """At the first result, kill the actor still busy with the slow request."""
        if not killed:
            killed.append(rid)
            ray.kill(ray.get_actor("kinema-batch-0"), no_restart=False)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        options = BatchOptions(model=str(tiny_model), ray="auto")
        summary = run(requests, out, options, show_progress=False, on_result=kill_first_worker)
        assert (summary.done, summary.failed) == (6, 0)
        entries = log_entries(out)
        done = sorted(e["id"] for e in entries if e["status"] == "done")
        assert done == sorted(r["id"] for r in rows)  # every request done exactly once
        requeued = [e["id"] for e in entries if e["status"] == "requeued"]
        # once: the restarting actor gets no work until it answers again
        assert requeued == ["slow"]
        assert killed and killed[0] != "slow"
        sidecar = json.loads((out / "r0.json").read_text())
        assert sidecar["batch_id"] == "r0" and sidecar["prompt"] == "ball 0"
        assert read_video(out / "r0.mp4")[0].shape == (5, 32, 32, 3)
        again = run(requests, out, options, show_progress=False)
        assert (again.skipped, again.done) == (6, 0)
    finally:
        ray.shutdown()


def test_ray_batch_fails_the_rest_when_no_worker_restarts(tmp_path: Path, tiny_model: Path) -> None:
    import ray

    rows = [{"id": f"r{i}", "prompt": f"ball {i}", "seed": i} for i in range(3)]
    requests = write_lines(tmp_path / "r.jsonl", rows)
    out = tmp_path / "out"

    def kill_for_good(rid: str, status: str) -> None:
        if status == "done":  # at the first result: the only actor, for good
            ray.kill(ray.get_actor("kinema-batch-0"), no_restart=True)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        options = BatchOptions(model=str(tiny_model), ray="auto", workers=1)
        summary = run(requests, out, options, show_progress=False, on_result=kill_for_good)
    finally:
        ray.shutdown()
    assert (summary.done, summary.failed) == (1, 2)
    for rid in ("r1", "r2"):
        error = json.loads((out / f"{rid}.error.json").read_text())["error"]
        assert error == "no Ray worker is left (they died and did not restart)"


def test_ray_set_up_errors_are_one_line_not_a_hang(tmp_path: Path, tiny_model: Path) -> None:
    """More workers than the cluster's CPUs waited forever; an unreachable address retried
    for minutes; a missing model was an actor's traceback."""
    import ray

    requests = write_lines(tmp_path / "r.jsonl", [{"id": "a", "prompt": "x"}])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="model '/nonexistent' not found"):
        run(requests, out, BatchOptions(model="/nonexistent", ray="local"), show_progress=False)
    with pytest.raises(ValueError, match="no Ray cluster answers at 127.0.0.1:1 "):
        run(requests, out, BatchOptions(model=str(tiny_model), ray="127.0.0.1:1"),
            show_progress=False)  # fmt: skip
    assert not ray.is_initialized()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        options = BatchOptions(model=str(tiny_model), ray="auto", workers=2)
        with pytest.raises(ValueError, match="--workers 2: each worker holds one CPU and the "
                           "Ray cluster has 1"):  # fmt: skip
            run(requests, out, options, show_progress=False)
    finally:
        ray.shutdown()


def test_an_extension_line_counts_seconds_of_new_frames_at_the_sources_rate(
    tmp_path: Path, tiny_model: Path
) -> None:
    """ "seconds": 0.3 on an extension failed ("extension frames 5 must be a positive multiple
    of 4": it was counted as a whole clip), and at the model's rate, not the source's."""
    import numpy as np

    from kinema.batch import build_request
    from kinema.io.video import write_video
    from kinema.loading import load

    pipe = load(str(tiny_model), device="cpu")
    assert pipe.defaults.fps == 8
    source = write_video(tmp_path / "src", np.zeros((9, 32, 32, 3), np.uint8), fps=16)
    req = build_request({"prompt": "a ball", "extend": str(source), "seconds": 0.5}, pipe)
    assert req.frames == 8  # 0.5 s at the source's 16 fps: new frames only, a multiple of 4
    assert build_request({"prompt": "a ball", "seconds": 1}, pipe).frames == 9  # 8 fps + 1
    restyle = build_request({"prompt": "a ball", "video": str(source), "seconds": 0.5}, pipe)
    assert restyle.frames == 9  # 0.5 s at the source's 16 fps (it was 5: at the model's 8)
