"""End to end: a real `kinema serve` process on a loopback port, driven by the openai SDK."""

from __future__ import annotations

import base64
import gzip
import io
import json
import time
import warnings

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from kinema.io.video import read_video, write_video
from kinema.timeline import clip_frames
from tests.serve_helpers import Server, build_tiny_model, mp4_bytes, png_bytes

KEY = "test-key"
warnings.filterwarnings("ignore", category=DeprecationWarning)  # the SDK marks videos deprecated


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = build_tiny_model(root / "tiny-model")
    with Server(model, root / "data", "--api-key", KEY, "--max-upload-mb", "0.05",
                "--max-memory-gb", "1") as s:  # fmt: skip
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as c:  # fmt: skip
        yield c


@pytest.fixture(scope="module")
def done(client):
    """One completed video (4 steps, so that a remix has steps left to run)."""
    return client.videos.create_and_poll(
        prompt="a red ball", model="tiny-model", seconds="1", size="32x32",
        extra_body={"seed": 3, "steps": 4}, poll_interval_ms=100,
    )  # fmt: skip


def wait(client, video_id, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        video = client.videos.retrieve(video_id)
        if video.status in ("completed", "failed"):
            return video
        time.sleep(0.1)
    raise AssertionError(f"{video_id} did not finish")


def decode(data: bytes, tmp_path, name="out.mp4") -> np.ndarray:
    path = tmp_path / name
    path.write_bytes(data)
    return read_video(path)[0]


def test_create_poll_retrieve_list_download(client, done, tmp_path):
    assert done.status == "completed" and done.progress == 100 and done.error is None
    assert (done.object, done.model, done.size, done.seconds) == (
        "video",
        "tiny-model",
        "32x32",
        "1",
    )
    assert done.created_at <= done.completed_at < done.expires_at
    assert client.videos.retrieve(done.id).model_dump() == done.model_dump()
    assert done.id in [v.id for v in client.videos.list(limit=100)]
    frames = decode(client.videos.download_content(done.id).read(), tmp_path)
    assert frames.shape == (clip_frames(1, 8, 4), 32, 32, 3)  # 9 frames at 8 fps
    thumb = Image.open(
        io.BytesIO(client.videos.download_content(done.id, variant="thumbnail").read())
    )
    assert (thumb.format, thumb.size) == ("WEBP", (32, 32))
    sheet = client.videos.download_content(done.id, variant="spritesheet").read()
    assert Image.open(io.BytesIO(sheet)).size == (4 * 32, 3 * 32)  # 9 frames, 4 per row


def test_a_download_reads_the_file_it_opened_even_if_deleted_meanwhile(http, client):
    """A DELETE between the existence check and the file's opening gave a 500 or a body cut
    short after its headers; the file is now opened first and read through its handle."""
    done = client.videos.create_and_poll(
        prompt="a ball", seconds="1", size="32x32", extra_body={"steps": 1}, poll_interval_ms=100
    )
    whole = http.get(f"/v1/videos/{done.id}/content").content
    with http.stream("GET", f"/v1/videos/{done.id}/content") as streamed:
        assert streamed.status_code == 200
        assert http.delete(f"/v1/videos/{done.id}").status_code == 200  # while it is sent
        assert streamed.read() == whole
    assert http.get(f"/v1/videos/{done.id}/content").status_code == 404


def test_the_sdk_can_ask_for_the_step_cache(client):
    """The SDK sends multipart, every value text: cache "0.1" was refused as not a number."""
    video = client.videos.create_and_poll(prompt="a ball", seconds="1", size="32x32",
                                          extra_body={"steps": 4, "cache": 0.1},
                                          poll_interval_ms=100)  # fmt: skip
    assert video.status == "completed", video.error


def test_odd_bodies_are_400s_not_500s(http):
    """A size of 5000 digits (int() refuses past 4300), JSON with an integer of 5000 digits
    (json refuses it: a plain-text 500) and JSON nested 100,000 deep (RecursionError) were
    500s; the favicon a browser asks for was a 404 in its console."""
    error = error_of(http.post("/v1/videos", json={"prompt": "x", "size": "1" * 5000 + "x16"}),
                     400, "size")  # fmt: skip
    assert "WIDTHxHEIGHT" in error["message"]
    digits = b'{"prompt": "x", "steps": ' + b"9" * 5000 + b"}"
    long_int = http.post("/v1/videos", content=digits,
                         headers={"content-type": "application/json"})  # fmt: skip
    assert error_of(long_int, 400, None)["code"] == "invalid_json"
    nested = "[" * 100_000 + "]" * 100_000
    response = http.post("/v1/videos", content=nested,
                         headers={"content-type": "application/json"})  # fmt: skip
    assert error_of(response, 400, None)["code"] == "invalid_json"
    assert http.get("/favicon.ico").status_code == 204
    body = gzip.compress(b'{"prompt": "x"}')  # was "not valid JSON: can't decode byte 0x8b"
    zipped = http.post("/v1/videos", content=body, headers={
        "content-type": "application/json", "content-encoding": "gzip"})  # fmt: skip
    assert error_of(zipped, 415, None)["code"] == "unsupported_content_encoding"
    text = http.post("/v1/videos", content=b"x", headers={"content-type": "text/plain"})
    assert "send application/json or multipart" in error_of(text, 415, None)["message"]


def test_head_of_content_tells_its_size_and_type(http, done):
    """curl -I and players ask with HEAD (it was 405): the headers of GET, no body."""
    head = http.head(f"/v1/videos/{done.id}/content")
    get = http.get(f"/v1/videos/{done.id}/content")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"] == "video/mp4"
    assert int(head.headers["content-length"]) == len(get.content)
    assert http.head("/v1/videos/video_nope/content").status_code == 404


def test_a_method_a_path_does_not_take_is_a_405_naming_those_it_does(http):
    """No Allow header, and Starlette's named only the first route's methods (POST)."""
    r = http.put("/v1/videos")
    valid = "GET, HEAD, POST"
    assert error_of(r, 405, None)["message"] == f"PUT is not allowed here; valid: {valid}"
    assert r.headers["allow"] == valid
    assert http.delete("/v1/models").headers["allow"] == "GET, HEAD"
    # /v1/videos/edits is an action, not a video's id: GET was "no video with id 'edits'",
    # and PUT's Allow listed the GET and DELETE of /v1/videos/{video_id}
    for method in ("GET", "PUT", "DELETE"):
        r = http.request(method, "/v1/videos/edits")
        assert (r.status_code, r.headers["allow"]) == (405, "POST"), method


def test_head_answers_as_get_without_the_body_on_every_get_route(http, done):
    """HEAD on a GET route was a 405 (FastAPI routes take only the methods they name)."""
    for path in ("/v1/models", f"/v1/videos/{done.id}", "/v1/videos", "/", "/favicon.ico"):
        head, get = http.head(path), http.get(path)
        assert (head.status_code, head.content) == (get.status_code, b""), path
        assert head.status_code in (200, 204), path  # the favicon is an empty 204
        for name in ("content-type", "content-length"):
            assert head.headers.get(name) == get.headers.get(name), (path, name)
    assert http.head("/v1/videos/video_nope").status_code == 404


def test_a_download_answers_byte_ranges(http, done):
    """Players seek and downloads resume with Range (the whole file came back, 200)."""
    whole = http.get(f"/v1/videos/{done.id}/content").content
    size, url = len(whole), f"/v1/videos/{done.id}/content"
    for asked, (start, end) in (("bytes=0-99", (0, 100)), ("bytes=100-", (100, size)),
                                ("bytes=-50", (size - 50, size)),
                                (f"bytes=10-{size + 99}", (10, size))):  # fmt: skip
        part = http.get(url, headers={"Range": asked})
        assert part.status_code == 206 and part.content == whole[start:end], asked
        assert part.headers["content-range"] == f"bytes {start}-{end - 1}/{size}"
        assert part.headers["accept-ranges"] == "bytes"
    head = http.head(url, headers={"Range": "bytes=0-9"})
    assert head.status_code == 206 and head.headers["content-length"] == "10"
    past = http.get(url, headers={"Range": f"bytes={size}-"})
    assert error_of(past, 416, "range")["code"] == "range_not_satisfiable"
    assert past.headers["content-range"] == f"bytes */{size}"
    assert http.get(url, headers={"Range": "items=0-1"}).content == whole  # not bytes: whole
    backwards = http.get(url, headers={"Range": "bytes=5-2"})  # no range at all: ignored
    assert (backwards.status_code, backwards.content) == (200, whole)  # (it was a 416)


def test_warnings_reach_the_video_and_its_sidecar(client, server, done):
    assert done.model_dump()["warnings"] == []
    prompt = "a red ball and " * 8  # over the 16 tokens the test model's MiniLM reads
    video = client.videos.create(prompt=prompt, seconds="1", size="32x32")
    (said,) = video.model_dump()["warnings"]
    assert said.startswith("a prompt is longer than the 16 tokens this model reads")
    assert wait(client, video.id).model_dump()["warnings"] == [said]
    (sidecar,) = [json.loads(p.read_text()) for p in server.data_dir.glob("jobs/*/video.json")
                  if json.loads(p.read_text())["prompt"] == prompt]  # fmt: skip
    assert sidecar["warnings"] == [said]


def test_seconds_is_the_span_of_the_frames_made(http):
    """At 8 fps a clip is 4k+1 frames: "1.1" asked makes 9 frames, 1 s from first to last,
    and says so (it said "1.1"); "0.1" makes the shortest clip, 5 frames, "0.5", and the
    video's warnings say so (the line went to the server's log only)."""
    for asked, made in (("1.1", "1"), ("0.1", "0.5")):
        r = http.post("/v1/videos", json={"prompt": "x", "seconds": asked, "size": "32x32"})
        assert r.status_code == 200 and r.json()["seconds"] == made, r.text
    (said,) = r.json()["warnings"]
    assert said.startswith("0.1 s at 8 fps is less than the shortest step of 4 frames")


def test_a_remix_says_the_seconds_it_makes(client, done, tmp_path):
    """A remix of an extension of 11 + 8 frames restyles 17 (4k+1) of the 19: 2 s at 8 fps,
    where it said its source's 2.25."""
    clip = mp4_bytes(tmp_path / "eleven.mp4", frames=11)
    ext = wait(client, client.videos.extend(prompt="on", seconds="1", video=("c.mp4", clip)).id)
    assert ext.status == "completed" and ext.seconds == "2.25", ext.error
    remix = wait(client, client.videos.remix(ext.id, prompt="a blue ball").id)
    frames = decode(client.videos.download_content(remix.id).read(), tmp_path)
    assert frames.shape[0] == 17 and remix.seconds == "2"


def test_a_request_without_a_seed_gets_a_random_one_and_is_told(client, done):
    """A new take each time (every request without a seed was seed 0: the same video again);
    the seed is on the video object, so it can be given back; a remix keeps its source's."""
    a, b = (client.videos.create(prompt="a ball", seconds="0.5") for _ in range(2))
    seeds = [v.model_dump()["seed"] for v in (a, b)]
    assert all(isinstance(seed, int) for seed in seeds) and seeds[0] != seeds[1]
    assert done.model_dump()["seed"] == 3  # given
    remix = client.videos.remix(done.id, prompt="a blue ball")
    assert remix.model_dump()["seed"] == 3
    for v in (a, b, remix):
        wait(client, v.id)


def test_list_pagination(client, done):
    ids = [client.videos.create(prompt=f"p{i}", seconds="0.5").id for i in range(3)]
    page = client.videos.list(limit=2, order="asc", after=ids[0])
    assert [v.id for v in page.data] == ids[1:]
    first = client.videos.list(limit=2)  # newest first
    assert [v.id for v in first.data] == ids[::-1][:2] and first.has_more
    assert [v.id for v in first.get_next_page().data][0] == ids[0]
    for i in ids:
        wait(client, i)
    client.videos.delete(ids[1])  # the SDK's next page starts after a cursor now deleted
    assert [v.id for v in client.videos.list(limit=2, order="asc", after=ids[1]).data] == [ids[2]]


def test_remix_edit_extend(client, http, done, tmp_path):
    remix = wait(client, client.videos.remix(done.id, prompt="a blue ball").id)
    assert remix.status == "completed", remix.error
    assert (remix.remixed_from_video_id, remix.size, remix.seconds) == (done.id, "32x32", "1")
    # extension of an uploaded clip (the SDK sends files only): source + 1 s of new frames
    source = client.videos.download_content(done.id).read()
    ext = client.videos.extend(prompt="it rolls on", seconds="1", video=("clip.mp4", source))
    ext = wait(client, ext.id)
    assert ext.status == "completed", ext.error
    frames = decode(client.videos.download_content(ext.id).read(), tmp_path)
    assert frames.shape[0] == 9 + 8 and ext.seconds == "2"  # 1 s + 1 s (was "2.125": 17 / 8)
    # extension and edit by id, as JSON
    by_id = http.post("/v1/videos/extensions", json={"prompt": "on", "seconds": "1",
                                                     "video": {"id": done.id}})  # fmt: skip
    assert by_id.status_code == 200, by_id.text
    edit = http.post("/v1/videos/edits", json={"prompt": "green", "video": {"id": done.id},
                                              "strength": 0.9, "steps": 4})  # fmt: skip
    assert edit.status_code == 200, edit.text
    # the SDK's way to an edit by id (its video= takes files only), as the README shows it
    sdk = client.videos.edit(prompt="green", video=openai.omit,
                             extra_body={"video": {"id": done.id}, "steps": 4})  # fmt: skip
    for video_id in (by_id.json()["id"], edit.json()["id"], sdk.id):
        finished = wait(client, video_id)
        assert finished.status == "completed", finished.error


def test_image_to_video_upload(client, tmp_path):
    video = client.videos.create(prompt="from a picture", size="32x32",
                                 input_reference=("start.png", png_bytes()))  # fmt: skip
    video = wait(client, video.id)
    assert video.status == "completed", video.error
    assert decode(client.videos.download_content(video.id).read(), tmp_path).shape[1:] == (
        32,
        32,
        3,
    )


def sidecar_of(server, prompt: str) -> dict:
    """The request the pipeline ran for a job, from the sidecar the server wrote beside it."""
    found = [json.loads(p.read_text()) for p in (server.data_dir / "jobs").glob("*/video.json")]
    (info,) = [i for i in found if i["prompt"] == prompt]
    return info


def test_timed_prompts(client, server):
    """`at` and `switch` (kinema's fields, as the CLI's --at / --switch) reach the pipeline,
    as JSON from extra_body and as the SDK's multipart arrays (at[]) beside an upload."""
    as_json = client.videos.create_and_poll(
        prompt="a red ball, timed", seconds="1", size="32x32", poll_interval_ms=100,
        extra_body={"at": ["0.5:a blue ball"], "switch": "cut"},
    )  # fmt: skip
    as_form = client.videos.create(
        prompt="a red ball, timed upload", seconds="2", size="32x32",
        input_reference=("start.png", png_bytes()),
        extra_body={"at": ["0.25:a blue ball", "0.75:a green ball"]},
    )  # fmt: skip
    as_form = wait(client, as_form.id)
    for video in (as_json, as_form):
        assert video.status == "completed", video.error
    json_info = sidecar_of(server, "a red ball, timed")
    assert (json_info["prompts"], json_info["switch"]) == ([[0.5, "a blue ball"]], "cut")
    form_info = sidecar_of(server, "a red ball, timed upload")
    assert form_info["prompts"] == [[0.25, "a blue ball"], [0.75, "a green ball"]]
    assert form_info["switch"] == "blend"
    # a remix takes its own timed prompts (a restyle always blends: cut is refused)
    remix = client.videos.remix(as_json.id, prompt="a red ball, remixed",
                                extra_body={"at": "0.5:a green ball", "contrast": 0.5})  # fmt: skip
    assert wait(client, remix.id).status == "completed"
    remix_info = sidecar_of(server, "a red ball, remixed")
    assert (remix_info["prompts"], remix_info["switch"]) == ([[0.5, "a green ball"]], "blend")
    assert remix_info["contrast"] == 0.5  # was "unknown parameter 'contrast'"
    with pytest.raises(openai.BadRequestError) as refused:
        client.videos.remix(as_json.id, prompt="x", extra_body={"at": ["0.5:y"], "switch": "cut"})
    assert refused.value.body["param"] == "switch"


def test_delete_cancels_and_removes(client, server):
    slow = [client.videos.create(prompt="slow", extra_body={"steps": 30}) for _ in range(2)]
    gone = client.videos.delete(slow[1].id)  # queued behind the first
    assert (gone.id, gone.deleted, gone.object) == (slow[1].id, True, "video.deleted")
    while client.videos.retrieve(slow[0].id).status == "queued":
        time.sleep(0.05)
    assert client.videos.delete(slow[0].id).deleted  # running: cancelled
    for v in slow:
        with pytest.raises(openai.NotFoundError):
            client.videos.retrieve(v.id)
    listed = {v.id for v in client.videos.list(limit=100)}
    assert not listed & {v.id for v in slow}
    with pytest.raises(openai.NotFoundError):
        client.videos.delete(slow[0].id)


def test_models(client, http):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-model"]
    assert client.models.retrieve("tiny-model").id == "tiny-model"
    error = error_of(http.get("/v1/models/sora-2"), 404, "model")
    assert error["message"] == "no model 'sora-2'; this server serves 'tiny-model'"


@pytest.mark.parametrize(
    "fields, param, message",
    [
        (
            {"input_reference": {"image_url": "data:image/png;base64,AA==", "detail": "auto"}},
            "input_reference",
            "unknown parameter 'input_reference.detail'",
        ),
        ({"input_reference": {}}, "input_reference", "input_reference has no image_url; give"),
        ({"seconds": [1]}, "seconds", "seconds: Input should be a valid"),
        (
            {"input_reference": "data:image/png;base64,AA=="},
            "input_reference",
            "should be a valid dictionary (got 'data:image/png;base64,AA=='); give {\"image_url\"",
        ),
    ],
)
def test_json_shape_errors_name_the_field_and_its_shape(http, fields, param, message):
    """They named the parent field, file_id nobody sent, pydantic's 'seconds.str' branch and
    a Python class (ImageReference)."""
    error = error_of(http.post("/v1/videos", json={"prompt": "x", **fields}), 400, param)
    assert message in error["message"], error["message"]
    assert ".str" not in error["message"] and "instance of" not in error["message"]


def test_a_field_given_twice_over_is_refused_not_dropped(http, server):
    """An image as a file and as image_url used the file and dropped the URL; prompt given as
    a value and as an object dropped the object."""
    ref = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    both = http.post("/v1/videos", data={"prompt": "x", "input_reference[image_url]": ref},
                     files={"input_reference": ("a.png", png_bytes(), "image/png")})  # fmt: skip
    assert "as a file or as {image_url" in error_of(both, 400, "input_reference")["message"]
    twice = http.post("/v1/videos", data={"prompt": "x", "prompt[y]": "z"},
                      files={"input_reference": ("a.png", png_bytes(), "image/png")})  # fmt: skip
    assert "given both as a value and as an object" in error_of(twice, 400, "prompt")["message"]


def test_an_empty_image_is_refused_not_dropped(http):
    """It made a text-to-video job, the image quietly left out."""
    ref = {"image_url": "data:image/png;base64,"}
    error = error_of(http.post("/v1/videos", json={"prompt": "x", "input_reference": ref}), 400,
                     "input_reference")  # fmt: skip
    assert "holds no data (an empty image)" in error["message"]


def test_auth(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(f"{server.url}/v1/videos", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    for scheme in ("bearer", "BEARER"):  # the scheme is case-insensitive in HTTP
        headers = {"Authorization": f"{scheme} {KEY}"}
        assert httpx.get(f"{server.url}/v1/videos", headers=headers).status_code == 200
    assert httpx.get(f"{server.url}/").status_code == 200  # the page itself is public
    assert httpx.get(f"{server.url}/static/app.js").status_code == 200


def error_of(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    return error


@pytest.mark.parametrize(
    "fields, param, message",
    [
        ({"size": "33x32"}, "size", "width 33 is not a multiple of 16; nearest valid: 32"),
        ({"size": "big"}, "size", "size"),
        ({"size": "128X128"}, "size", "must be WIDTHxHEIGHT in pixels, e.g. '128x128'"),
        ({"size": "１２８x１２８"}, "size", "must be WIDTHxHEIGHT"),  # full-width digits
        ({"size": "8192x8192"}, "size", "GiB at its peak; this server has 1.0 GiB for a job"),
        ({"seconds": "0"}, "seconds", "must be > 0"),
        ({"seconds": "ten"}, "seconds", "not a number"),
        ({"seconds": "1_0"}, "seconds", "seconds '1_0' is not a number"),  # float() took it: 10
        ({"at": "0.5:" + "a cat " * 700}, "at", "at.0: String should have at most 4100"),
        ({"seconds": "x" * 5000}, "seconds", "seconds 'xxxxxxxxxxxxxxxxx"),
        ({"seconds": "1000"}, "seconds", "<= 60"),
        ({"steps": "-1"}, "steps", "greater than or equal to 1"),
        ({"seed": "1.5"}, "seed", "integer"),
        ({"sampler": "ddim"}, "sampler", "unknown sampler 'ddim'"),
        ({"model": "sora-2"}, "model", "unknown model 'sora-2'"),
        ({"colour": "red"}, "colour", "unknown parameter"),
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"prompt": "   "}, "prompt", "prompt is empty"),
        ({"at": "0.5 a cat"}, "at", "at '0.5 a cat' must be SECONDS:PROMPT"),
        ({"seconds": "1", "at": "2:a cat"}, "at", "prompt time 2 s is outside the clip"),
        ({"at": "0.25:a cat", "switch": "fade"}, "switch", "unknown switch mode 'fade'"),
        ({"guidance": "nan"}, "guidance", "finite number"),
        ({"cache": "-1"}, "cache", "must be a number >= 0 (0 turns the step cache off)"),
        ({"cache": "fast"}, "cache", "valid number"),
    ],
)
def test_bad_create_requests(http, fields, param, message):
    body = {"prompt": "x", **fields}
    for send in ({"data": body, "files": {"unused": ("", b"")}}, {"json": body}):
        send = {k: v for k, v in send.items() if k != "files"}
        error = error_of(http.post("/v1/videos", **send), 400, param)
        assert message in error["message"] and len(error["message"]) < 400  # quoted short


@pytest.mark.parametrize("field", ["steps", "seconds", "guidance", "seed", "fps"])
def test_json_true_or_false_is_no_number(http, field):
    """Lax parsing read ``"steps": true`` as 1 step and ``"seconds": true`` as 1 s."""
    for value in (True, False):
        error = error_of(http.post("/v1/videos", json={"prompt": "x", field: value}), 400, field)
        assert "must be a number or text, not true / false" in error["message"]


def test_the_longest_clip_allowed_is_accepted(http, tmp_path):
    """``seconds`` at the server's limit (60) is a clip of 481 frames at 8 fps: its first
    frame, then 60 s, which is not over it (it was refused as 60.125 s); an upload is held to
    the same span."""
    video = http.post("/v1/videos", json={"prompt": "x", "seconds": "60", "size": "32x32"})
    assert video.status_code == 200, video.text
    assert http.delete(f"/v1/videos/{video.json()['id']}").status_code == 200
    for frames, ok in ((61, True), (65, False)):  # uploads at 1 fps: 60 s, then 64 s
        path = tmp_path / f"{frames}.mp4"  # flat grey: small under the 0.05 MB upload limit
        data = write_video(path, np.full((frames, 32, 32, 3), 128, np.uint8), 1).read_bytes()
        edit = http.post("/v1/videos/edits", data={"prompt": "x"},
                         files={"video": ("a.mp4", data, "video/mp4")})  # fmt: skip
        if ok:
            assert edit.status_code == 200, edit.text
            assert http.delete(f"/v1/videos/{edit.json()['id']}").status_code == 200
        else:
            assert "64 s is over the limit of 60 s" in error_of(edit, 400, "video")["message"]
    extend = http.post("/v1/videos/extensions", data={"prompt": "x", "seconds": "1"},
                       files={"video": ("a.mp4", data, "video/mp4")})  # fmt: skip
    assert "64 s is over the limit of 60 s" in error_of(extend, 400, "video")["message"]
    both = http.post("/v1/videos/extensions", data={"prompt": "x", "seconds": "1",
                                                   "video[id]": "video_x"},
                     files={"video": ("a.mp4", data, "video/mp4")})  # fmt: skip
    assert "as a file or as" in error_of(both, 400, "video")["message"]  # the id was ignored
    two = http.post("/v1/videos", data={"prompt": "x"},
                    files=[("input_reference", ("a.png", b"a", "image/png")),
                           ("input_reference", ("b.png", b"b", "image/png"))])  # fmt: skip
    assert "one file, not several" in error_of(two, 400, "input_reference")["message"]


def test_characters_are_refused_by_name(client, http, tmp_path):
    """The SDK's character calls get a 400 that says what kinema takes instead (POST was a
    405 "Method Not Allowed", GET a 404)."""
    with pytest.raises(openai.BadRequestError) as refused:
        client.videos.create_character(name="bob", video=("a.mp4", b"not read", "video/mp4"))
    assert refused.value.code == "unsupported" and "characters are not supported" in str(
        refused.value
    )
    got = error_of(http.get("/v1/videos/characters/char_1"), 400, None)
    assert got["code"] == "unsupported" and "input_reference" in got["message"]


def test_an_upload_cut_short_is_refused(http, tmp_path):
    """The first 5000 bytes of a 33-frame mp4 were accepted and restyled into 1 frame."""
    whole = mp4_bytes(tmp_path / "whole.mp4", frames=33)
    files = {"video": ("cut.mp4", whole[:5000], "video/mp4")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the damaged last packet, said by the server
        cut = http.post("/v1/videos/edits", data={"prompt": "x"}, files=files)
    message = error_of(cut, 400, "video")["message"]
    assert "3 of the 33 frames the file declares decode: is it cut short?" in message


def test_bad_uploads(http):
    not_image = http.post(
        "/v1/videos",
        data={"prompt": "x"},
        files={"input_reference": ("cat.png", b"GIF89a not really", "image/png")},
    )
    assert "not a decodable image" in error_of(not_image, 400, "input_reference")["message"]
    assert "PNG, JPEG, WebP, GIF, BMP and TIFF are" in not_image.json()["error"]["message"]
    bomb = io.BytesIO()
    Image.new("1", (13_500, 13_500)).save(bomb, format="PNG")  # 182 Mpixel in ~25 kB
    files = {"input_reference": ("a.png", bomb.getvalue(), "image/png")}
    bombed = http.post("/v1/videos", data={"prompt": "x"}, files=files)
    message = error_of(bombed, 400, "input_reference")["message"]
    assert message.startswith("input_reference: image is over") and "the limit is" in message
    big = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")  # ~120 kB, over the 0.05 MB limit
    oversize = http.post(
        "/v1/videos",
        data={"prompt": "x"},
        files={"input_reference": ("a.png", buf.getvalue(), "image/png")},
    )
    error = error_of(oversize, 413, "input_reference")  # was a 400, the body's limit a 413
    assert error["code"] == "file_too_large" and "--max-upload-mb" in error["message"]
    huge = http.post(
        "/v1/videos",
        data={"prompt": "x"},
        files={"input_reference": ("a.png", b"0" * (2**20 + 2**17), "image/png")},
    )
    assert error_of(huge, 413, None)["code"] == "request_too_large"  # refused by its length
    limit = int(0.05 * 2**20) + 2**20
    assert f"over {limit} bytes" in huge.json()["error"]["message"]

    def streamed(head: bytes, tail: bytes):  # no Content-Length: counted while it is read
        yield head
        for _ in range(24):
            yield b"a" * 2**16
        yield tail

    boundary = "kinema-test-boundary"
    for body, kind in (
        (streamed(b'{"prompt": "', b'"}'), "application/json"),
        (
            streamed(
                f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n'.encode(),
                f"\r\n--{boundary}--\r\n".encode(),
            ),
            f"multipart/form-data; boundary={boundary}",
        ),
    ):  # behind the API key these were a 500 and a garbled 400
        r = http.post("/v1/videos", content=body, headers={"content-type": kind})
        assert f"over {limit} bytes" in error_of(r, 413, None)["message"]
    url = http.post(
        "/v1/videos",
        json={"prompt": "x", "input_reference": {"image_url": "http://127.0.0.1:1/a.png"}},
    )
    assert "never fetches a URL" in error_of(url, 400, "input_reference")["message"]
    not_video = http.post(
        "/v1/videos/edits",
        data={"prompt": "x"},
        files={"video": ("a.mp4", b"\x00\x00\x00\x18ftypmp42" + b"junk" * 100, "video/mp4")},
    )
    assert "not a decodable video" in error_of(not_video, 400, "video")["message"]


def test_unknown_ids(http, client):
    for method, path in [("GET", "/v1/videos/video_nope"), ("DELETE", "/v1/videos/video_nope"),
                         ("GET", "/v1/videos/../../etc/passwd/content"),
                         ("GET", "/v1/videos/video_nope/content")]:  # fmt: skip
        r = http.request(method, path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    error_of(http.post("/v1/videos/video_nope/remix", json={"prompt": "x"}), 404, "video_id")
    error_of(
        http.post("/v1/videos/edits", json={"prompt": "x", "video": {"id": "nope"}}), 404, "video"
    )
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve("video_0000")
    long = http.get("/v1/videos/video_" + "x" * 10_000).json()["error"]["message"]
    assert len(long) < 120 and long.endswith("...'")  # the id quoted short, not echoed whole


def test_openapi_is_true(http, done):
    doc = http.get("/openapi.json").json()
    served = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert served == {
        ("/v1/models", "get"), ("/v1/models/{model_id}", "get"),
        ("/v1/videos", "post"), ("/v1/videos", "get"),
        ("/v1/videos/{video_id}", "get"), ("/v1/videos/{video_id}", "delete"),
        ("/v1/videos/{video_id}/content", "get"), ("/v1/videos/{video_id}/remix", "post"),
        ("/v1/videos/edits", "post"), ("/v1/videos/extensions", "post"),
    }  # fmt: skip
    schemas = doc["components"]["schemas"]
    real = http.get(f"/v1/videos/{done.id}").json()
    assert set(schemas["VideoObject"]["properties"]) == set(real)
    assert set(schemas["VideoObject"]["required"]) <= set(real)
    create = doc["paths"]["/v1/videos"]["post"]["requestBody"]["content"]
    assert set(create) == {"application/json", "multipart/form-data"}
    documented = set(schemas["CreateVideoBody"]["properties"])
    assert {"prompt", "model", "seconds", "size", "input_reference", "seed", "steps"} <= documented
    assert (
        create["multipart/form-data"]["schema"]["properties"]["input_reference"]["format"]
        == "binary"
    )
    assert doc["paths"]["/v1/videos"]["post"]["security"] == [{"bearer": []}]
    for status in ("400", "401", "404"):
        assert status in doc["paths"]["/v1/videos/{video_id}"]["get"]["responses"]


def test_extension_upload_of_other_sizes_is_checked(http, tmp_path):
    data = mp4_bytes(tmp_path / "odd.mp4", size=24)
    r = http.post("/v1/videos/extensions", data={"prompt": "x", "seconds": "1"},
                  files={"video": ("odd.mp4", data, "video/mp4")})  # fmt: skip
    assert "multiples of 16" in error_of(r, 400, "video")["message"]


def test_cli_binds_loopback_by_default(tmp_path):
    from kinema.cli import Parser
    from kinema.serve.cli import add_serve, settings_from_args

    parser = Parser(prog="kinema")
    add_serve(parser.add_subparsers(dest="command", parser_class=Parser))
    args = parser.parse_args(["serve", "--data-dir", str(tmp_path)])
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    settings = settings_from_args(args)
    assert settings.model_id == "kinema-tiny" and settings.data_dir == tmp_path
    with pytest.raises(ValueError, match="--max-queue 0 must be > 0"):
        settings_from_args(parser.parse_args(["serve", "--max-queue", "0"]))
    with pytest.raises(ValueError, match="--max-seconds nan must be > 0"):  # it served
        settings_from_args(parser.parse_args(["serve", "--max-seconds", "nan"]))
    with pytest.raises(ValueError, match="--retention-hours 0.0001 is under a second"):
        settings_from_args(parser.parse_args(["serve", "--retention-hours", "0.0001"]))
    assert settings.offload == "none" and not settings.compile
    assert settings_from_args(parser.parse_args(["serve", "--compile"])).compile
    assert settings_from_args(parser.parse_args(["serve", "--offload", "block"])).offload == "block"
    lora = ["serve", "--lora", "a.safetensors", "--lora", "b/lora.safetensors:0.5"]
    assert settings_from_args(parser.parse_args(lora)).lora == (
        ("a.safetensors", 1.0),
        ("b/lora.safetensors", 0.5),
    )
    with pytest.raises(ValueError, match="--offload 'all'; valid: none, model, block"):
        settings_from_args(parser.parse_args(["serve", "--offload", "all"]))


def test_port_0_is_a_free_port_and_the_one_printed():
    """It printed "on http://127.0.0.1:0" while uvicorn listened on another."""
    from kinema.serve.cli import check_address

    port = check_address("127.0.0.1", 0)
    assert 0 < port <= 65535 and check_address("127.0.0.1", port) == port


def test_serve_refuses_an_address_it_cannot_listen_on_before_loading(tmp_path):
    """An unknown host or a port another server holds: one line and exit code 2 before the
    model loads (uvicorn said it after loading, with exit code 1 or 3)."""
    import socket
    import subprocess
    import sys

    from tests.serve_helpers import ROOT

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        for args, message in (
            (["--port", str(port)], "Address already in use (another server holds it"),
            (["--host", "999.1.1.1"], "--host '999.1.1.1' is not an address here"),
        ):
            done = subprocess.run(
                [sys.executable, "-m", "kinema", "serve", "--data-dir", str(tmp_path), *args],
                capture_output=True, text=True, cwd=ROOT, timeout=60,
            )  # fmt: skip
            assert done.returncode == 2 and message in done.stderr, done.stderr
            assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_serve_refuses_a_data_dir_it_cannot_keep_jobs_in(tmp_path):
    """Each was a traceback (some after the model had loaded): one line and exit code 2."""
    import subprocess
    import sys

    from tests.serve_helpers import ROOT, free_port

    (tmp_path / "file").write_text("x")
    (tmp_path / "jobs-file").mkdir()
    (tmp_path / "jobs-file" / "jobs").write_text("x")
    (tmp_path / "bad-db").mkdir()
    (tmp_path / "bad-db" / "jobs.sqlite3").write_text("garbage")
    for data_dir, message in (
        (tmp_path / "file", "--data-dir " + str(tmp_path / "file") + " is a file"),
        (tmp_path / "file" / "sub", "is not a writable folder"),
        (tmp_path / "jobs-file", "holds a file named jobs, where the server keeps a folder"),
        (tmp_path / "bad-db", "jobs.sqlite3 is not a kinema job database (not SQLite)"),
        ("/proc/kinema", "/proc is not a writable folder"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "kinema", "serve", "--data-dir", str(data_dir),
             "--port", str(free_port())],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_a_second_server_on_the_same_data_dir_is_refused_before_loading(server):
    """It would requeue the running server's job and clear its staging (a job in flight
    failed with 'No such file'): one line naming the other server, exit code 2."""
    import subprocess
    import sys

    from tests.serve_helpers import ROOT, free_port

    done = subprocess.run(
        [sys.executable, "-m", "kinema", "serve", "--data-dir", str(server.data_dir),
         "--port", str(free_port())],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    pid = server.proc.pid
    message = f"data dir {server.data_dir} is in use by another kinema serve (pid {pid})"
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1
