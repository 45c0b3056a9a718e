"""The persistent queue: SQLite semantics, recovery, expiry, and kill -9 of a real server."""

from __future__ import annotations

import dataclasses
import hashlib
import sqlite3
import time
import warnings

import httpx
import numpy as np
import openai
import pytest

from kinema.io.video import read_video
from kinema.serve.jobs import Job, JobSpec, QueueFull, Store, Worker, new_folder, new_id
from tests.serve_helpers import Server, build_tiny_model, png_bytes

warnings.filterwarnings("ignore", category=DeprecationWarning)  # the SDK marks videos deprecated


def make_job(prompt: str = "p") -> Job:
    return Job(
        seq=0, id=new_id(), folder=new_folder(), status="queued", progress=0,
        created_at=int(time.time()), completed_at=None, expires_at=None, model="m",
        prompt=prompt, seconds="1", size="32x32", remixed_from=None, error_code=None,
        error_message=None, spec=JobSpec("generate", prompt, {"seed": 1}),
    )  # fmt: skip


def test_a_deleted_or_expired_video_still_pages_as_a_cursor(tmp_path):
    """A client that deletes what it has listed (the SDK's auto-pagination over "delete all
    my videos") pages on from a cursor that is gone, in both orders; across a restart too."""
    store = Store(tmp_path)
    jobs = [store.add(make_job(f"p{i}"), max_pending=10) for i in range(4)]
    store.delete(jobs[1].id)
    store.purge(jobs[2])  # as the sweeper removes an expired video
    assert store.get(jobs[1].id) is None and store.position(jobs[1].id) == jobs[1].seq
    assert [j.id for j in store.page(store.position(jobs[1].id), 10, "asc")[0]] == [jobs[3].id]
    store.close()
    store = Store(tmp_path)
    store.recover()
    assert [j.id for j in store.page(store.position(jobs[2].id), 10, "desc")[0]] == [jobs[0].id]
    assert store.position("video_never") is None


def test_store_lifecycle_and_order(tmp_path):
    store = Store(tmp_path)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    jobs = [store.add(make_job(f"p{i}"), max_pending=10) for i in range(3)]
    assert [j.id for j in store.page(None, 10, "asc")[0]] == [j.id for j in jobs]
    assert store.page(store.position(jobs[0].id), 1, "asc") == ([store.get(jobs[1].id)], True)
    running = store.claim()
    assert running.id == jobs[0].id and store.get(running.id).status == "in_progress"
    assert store.set_progress(running, 40) and store.get(running.id).progress == 40
    assert store.finish(running, "completed", int(time.time()) + 60, None)
    done = store.get(running.id)
    assert (done.status, done.progress, done.attempts) == ("completed", 100, 1)
    assert store.get(jobs[1].id).spec == JobSpec("generate", "p1", {"seed": 1})


def test_queue_bound(tmp_path):
    store = Store(tmp_path)
    store.add(make_job(), max_pending=2)
    store.claim()  # running jobs count too
    store.add(make_job(), max_pending=2)
    with pytest.raises(QueueFull):
        store.add(make_job(), max_pending=2)


def test_delete_queued_at_once_running_by_worker(tmp_path):
    store = Store(tmp_path)
    a, b = store.add(make_job(), 10), store.add(make_job(), 10)
    running = store.claim()
    assert store.delete(b.id).status == "queued" and store.get(b.id) is None
    assert store.delete(a.id).status == "in_progress"
    assert store.get(a.id) is None  # hidden at once
    assert not store.set_progress(running, 50)  # the worker learns it was deleted
    assert store.delete("video_unknown") is None


def test_a_job_deleted_while_it_runs_and_then_fails_leaves_nothing(tmp_path):
    """It kept its row (deleted, in_progress) and its uploads until the next restart."""
    from kinema.loading import load

    pipe = load(build_tiny_model(tmp_path / "tiny"), device="cpu")
    store = Store(tmp_path / "data")
    spec = JobSpec("edit", "a red ball", {"seed": 1}, {"video": "source.mp4"})
    job = store.add(dataclasses.replace(make_job(), spec=spec), 10)
    store.folder(job).mkdir(parents=True)
    (store.folder(job) / "source.mp4").write_bytes(b"not a video")  # the run fails on it
    running = store.claim()
    assert store.delete(job.id).status == "in_progress"
    Worker(store, pipe, retention_s=60).run(running)
    assert not store.folder(job).exists()
    rows = sqlite3.connect(tmp_path / "data" / "jobs.sqlite3").execute("SELECT id FROM videos")
    assert job.id not in {r[0] for r in rows}


def test_recover_after_crash(tmp_path):
    store = Store(tmp_path)
    queued, crashed, deleted, poison = (store.add(make_job(), 10) for _ in range(4))
    for job in (queued, crashed, deleted, poison):
        store.folder(job).mkdir(parents=True)
    store.db.execute("UPDATE videos SET status = 'in_progress', attempts = 1 WHERE id IN (?, ?)",
                     (crashed.id, deleted.id))  # fmt: skip
    store.db.execute("UPDATE videos SET status = 'in_progress', attempts = 3 WHERE id = ?",
                     (poison.id,))  # fmt: skip
    store.delete(deleted.id)
    (tmp_path / "staging" / "half-written").mkdir()
    (tmp_path / "jobs" / "orphan").mkdir()
    store.close()

    again = Store(tmp_path)  # the restarted server
    again.recover(retention_s=3600)
    assert again.get(queued.id).status == "queued"
    assert again.get(crashed.id).status == "queued"  # re-run
    assert again.get(poison.id).status == "failed"  # crashed the server three times
    assert again.get(poison.id).error_code == "server_crashed"
    expires = again.get(poison.id).expires_at  # it never expired: its row and folder stayed
    assert expires is not None and 3590 < expires - time.time() <= 3600
    assert again.get(deleted.id) is None and not again.folder(deleted).exists()
    assert not any((tmp_path / "staging").iterdir())
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == sorted(
        j.folder for j in (queued, crashed, poison)
    )


def test_expired_jobs_are_removed_with_their_files(tmp_path):
    store = Store(tmp_path)
    old, fresh = store.add(make_job(), 10), store.add(make_job(), 10)
    for job, expires in ((old, int(time.time()) - 1), (fresh, int(time.time()) + 3600)):
        store.folder(job).mkdir(parents=True)
        (store.folder(job) / "video.mp4").write_bytes(b"x")
        store.finish(store.claim(), "completed", expires, None)
    assert store.get(old.id) is None  # expired: gone to clients before the sweep removes it
    assert [j.id for j in store.page(None, 10, "asc")[0]] == [fresh.id]
    Worker(store, pipe=None, retention_s=0).sweep()
    assert store.get(old.id) is None and not store.folder(old).exists()
    assert store.get(fresh.id).status == "completed" and store.folder(fresh).exists()


# ---------------------------------------------------------------------------------------------
# kill -9 of a real server with jobs queued and running
# ---------------------------------------------------------------------------------------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_all(client, ids, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        videos = [client.videos.retrieve(i) for i in ids]
        if all(v.status in ("completed", "failed") for v in videos):
            return videos
        time.sleep(0.2)
    raise AssertionError(f"not finished: {[(v.id, v.status) for v in videos]}")


def test_kill_and_restart_completes_every_job(tmp_path):
    model = build_tiny_model(tmp_path / "tiny")
    data = tmp_path / "data"
    with Server(model, data, "--max-queue", "4") as first:
        client = openai.OpenAI(base_url=f"{first.url}/v1", api_key="x", max_retries=0)
        done = client.videos.create_and_poll(prompt="first", poll_interval_ms=50)
        before = {v: client.videos.download_content(done.id, variant=v).read()
                  for v in ("video", "thumbnail", "spritesheet")}  # fmt: skip
        slow = [client.videos.create(prompt=f"slow {i}", extra_body={"steps": 60, "seed": i})
                for i in range(2)]  # fmt: skip
        broken = client.videos.create(prompt="img", input_reference=("a.png", png_bytes()))
        last = client.videos.create(prompt="last")
        with pytest.raises(openai.RateLimitError) as full:  # 4 queued or running: the limit
            client.videos.create(prompt="one too many")
        assert int(full.value.response.headers["retry-after"]) >= 1
        assert full.value.response.json()["error"]["code"] == "queue_full"
        while (v := client.videos.retrieve(slow[0].id)).status != "in_progress" or not v.progress:
            time.sleep(0.02)
        first.kill()  # mid-generation, with three jobs still queued
    assert v.status == "in_progress" and 0 < v.progress < 100
    with sqlite3.connect(data / "jobs.sqlite3") as db:  # make one job fail when it runs
        (folder,) = db.execute("SELECT folder FROM videos WHERE id = ?", (broken.id,)).fetchone()
    (data / "jobs" / folder / "input.png").unlink()

    with Server(model, data) as second:
        client = openai.OpenAI(base_url=f"{second.url}/v1", api_key="x", max_retries=0)
        ids = [done.id, slow[0].id, slow[1].id, broken.id, last.id]
        videos = {v.id: v for v in wait_all(client, ids)}
        assert videos[broken.id].status == "failed"
        assert "input.png" in videos[broken.id].error.message  # by name, not by server path
        assert str(data) not in videos[broken.id].error.message
        for i in (done.id, slow[0].id, slow[1].id, last.id):  # the worker carried on
            assert videos[i].status == "completed", videos[i].error
            clip = tmp_path / f"{i}.mp4"
            clip.write_bytes(client.videos.download_content(i).read())
            assert read_video(clip)[0].shape == (5, 32, 32, 3)
        after = {v: client.videos.download_content(done.id, variant=v).read() for v in before}
        assert {k: sha(b) for k, b in after.items()} == {k: sha(b) for k, b in before.items()}
        assert videos[done.id].completed_at == done.completed_at
        listed = httpx.get(f"{second.url}/v1/videos?limit=100").json()["data"]
        assert {v["id"] for v in listed} == set(ids)


def test_previews_keep_only_their_frames_as_the_clip_streams_past():
    from kinema.serve.media import Previews, sprite_picks, spritesheet

    frames = np.random.default_rng(0).integers(0, 256, (41, 4, 6, 3), dtype=np.uint8)
    previews = Previews(len(frames))
    for i, frame in enumerate(frames):
        previews.keep(i, frame)
    assert sorted(previews.kept) == sorted({20, *sprite_picks(41)}) and len(previews.kept) <= 17
    assert np.array_equal(previews.kept[20], frames[20])  # the thumbnail: the middle frame
    assert not any(np.shares_memory(f, frames) for f in previews.kept.values())
    sheet = np.asarray(spritesheet([previews.kept[i] for i in sprite_picks(41)]))
    assert sheet.shape == (4 * 4, 4 * 6, 3)  # 16 picks, 4 a row
    assert np.array_equal(sheet[4:8, 6:12], frames[sprite_picks(41)[5]])  # row 1, column 1
    assert sprite_picks(41)[0] == 0 and sprite_picks(41)[-1] == 40 and sprite_picks(3) == [0, 1, 2]


def test_a_job_that_fails_mid_stream_leaves_no_file_behind(tmp_path, monkeypatch):
    """The worker writes a job's video as it is made: a failure in a later window leaves
    neither a staging folder nor a half video, and the job says why."""
    from kinema.io import video as io_video
    from kinema.loading import load
    from kinema.serve.jobs import VIDEO_FILE

    pipe = load(build_tiny_model(tmp_path / "tiny"), device="cpu")
    store = Store(tmp_path / "data")
    job = store.add(make_job("a red ball"), 10)
    long = JobSpec("generate", "a red ball", {"seed": 1, "frames": 17})  # 3 windows
    job = store.add(dataclasses.replace(job, id=new_id(), folder=new_folder(), spec=long), 10)
    windows, one_window, write, pulled = [], pipe.one_window, io_video.write_video, [0]

    def counting(frames):  # noqa: ANN001, ANN202
        for frame in frames:
            pulled[0] += 1
            yield frame

    def second_window_fails(*args):  # noqa: ANN002, ANN202
        windows.append(pulled[0])
        if len(windows) == 2:
            raise RuntimeError("out of memory in window 2")
        return one_window(*args)

    monkeypatch.setattr(pipe, "one_window", second_window_fails)
    monkeypatch.setattr(
        io_video, "write_video", lambda p, f, *a, **k: write(p, counting(f), *a, **k)
    )
    worker = Worker(store, pipe, retention_s=60)
    first = store.claim()
    worker.run(first)  # the plain job: written whole
    assert (store.folder(first) / VIDEO_FILE).exists() and store.get(first.id).status == "completed"
    windows.clear()
    pulled[0] = 0
    second = store.claim()
    assert second.id == job.id
    worker.run(second)
    failed = store.get(job.id)
    assert failed.status == "failed" and "out of memory in window 2" in failed.error_message
    assert windows == [0, 9]  # window 1's frames went to the file before window 2 was made
    assert not list((tmp_path / "data" / "staging").iterdir())
    assert not (store.folder(second) / VIDEO_FILE).exists()


def test_an_uploaded_photo_stands_as_its_exif_orientation_says(tmp_path):
    """A phone photo is stored sideways with an EXIF orientation; the API reads it upright,
    as the CLI does (it was kept sideways)."""
    import io

    from PIL import Image

    from kinema.io.video import read_image
    from kinema.serve.media import check_image

    stored = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high, left half red
    stored[:, :20, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, format="PNG", exif=exif)
    upright = np.asarray(check_image(buf.getvalue(), max_pixels=10_000))
    assert upright.shape == (40, 20, 3) and upright[:20, :, 0].min() > 200  # red on top
    (tmp_path / "photo.png").write_bytes(buf.getvalue())
    assert np.array_equal(read_image(tmp_path / "photo.png"), upright)  # the CLI's reading
