"""The web page in a real Chromium (Debian's, driven by Playwright): submit, progress, play."""

from __future__ import annotations

import json
import shutil

import playwright.sync_api as playwright
import pytest

from tests.serve_helpers import Server, build_tiny_model

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    assert shutil.which("chromium"), "chromium is missing: `make test` installs it with apt-get"
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def test_submit_progress_play_gallery(tmp_path, browser):
    model = build_tiny_model(tmp_path / "tiny")
    with Server(model, tmp_path / "data", "--api-key", "k") as server:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('message').textContent !== ''")
        assert "missing or wrong API key" in page.text_content("#message")
        page.fill("#api-key", "k")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.getElementById('size').placeholder === '32x32'")
        assert page.text_content("#model") == "tiny"
        assert page.text_content("#message") == ""  # the keyless error went with the key
        page.fill("#prompt", "a red ball bouncing")
        page.fill("#size", "64x64")
        page.fill("#seconds", "2")  # 17 frames at 8 fps
        page.fill("#steps", "1000")  # a few seconds: long enough to watch the bar move
        page.fill("#seed", "7")
        page.fill("#at", "0.5:a red ball rolling\n\n1.5: a blue ball\n")
        page.click("#submit")
        page.wait_for_function("window.kinemaSeen.progress.some(p => p > 0 && p < 100)",
                               timeout=60_000)  # fmt: skip
        page.wait_for_function(
            "(() => { const v = document.getElementById('player');"
            " return v.readyState >= 2 && v.duration > 0; })()", timeout=60_000,
        )  # fmt: skip
        assert page.evaluate("document.getElementById('progress').value") == 100
        seen = page.evaluate("window.kinemaSeen.statuses")
        assert "in_progress" in seen and seen[-1] == "completed"
        video_id = page.get_attribute("#player", "data-id")
        page.wait_for_selector(f'#gallery li[data-id="{video_id}"][data-status="completed"]')
        assert "a red ball bouncing" in page.text_content(f'#gallery li[data-id="{video_id}"]')
        duration = page.evaluate("document.getElementById('player').duration")
        assert duration == pytest.approx(17 / 8, abs=0.15)
        info = sidecar(tmp_path, "a red ball bouncing")  # what the pipeline ran
        assert info["prompts"] == [[0.5, "a red ball rolling"], [1.5, "a blue ball"]]
        # Extend and Remix ask for their prompt and take the page's prompt changes too
        # and the form's settings: an extension its steps and seed, a remix its strength
        page.fill("#at", "0.25:a green ball")
        page.fill("#seconds", "1")
        page.fill("#steps", "2")
        page.fill("#strength", "0.5")
        for button, prompt in (("extend", "it rolls on"), ("remix", "a ball, remixed")):
            page.once("dialog", lambda dialog, text=prompt: dialog.accept(text))
            page.click(f'#gallery li[data-id="{video_id}"] .{button}')
            page.wait_for_selector(f'#gallery li[data-status="completed"] >> text="{prompt}"',
                                   timeout=120_000)  # fmt: skip
            made = sidecar(tmp_path, prompt)
            assert made["prompts"] == [[0.25, "a green ball"]] and made["seed"] == 7
        assert sidecar(tmp_path, "it rolls on")["steps"] == 2  # not the default, nor 1000
        assert sidecar(tmp_path, "a ball, remixed")["strength"] == 0.5
        blobs = "[...window.kinemaBlobs.keys()]"
        assert f"{video_id} video" in page.evaluate(blobs)  # played: downloaded once, kept
        page.click(f'#gallery li[data-id="{video_id}"] .delete')
        page.wait_for_selector(f'#gallery li[data-id="{video_id}"]', state="detached")
        assert page.locator("#gallery li").count() == 2  # the extension and the remix
        page.wait_for_function(f"!{blobs}.some(k => k.startsWith('{video_id}'))")  # let go
        assert len(page.evaluate(blobs)) <= 4  # at most a thumbnail and a video of each
        page.fill("#api-key", "wrong")  # a wrong key shows no list, not the last key's
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.querySelectorAll('#gallery li').length === 0")
        assert not errors


def test_warnings_are_shown(tmp_path, browser):
    model = build_tiny_model(tmp_path / "tiny")  # MiniLM reading 16 tokens
    with Server(model, tmp_path / "data", "--api-key", "k") as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.fill("#api-key", "k")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.getElementById('size').placeholder === '32x32'")
        for prompt, warned in (("a red ball", False), ("a red ball and " * 8, True)):
            page.fill("#prompt", prompt)
            page.click("#submit")
            page.wait_for_function(
                f"document.getElementById('current-title').textContent === {prompt!r}"
            )
            assert page.is_hidden("#warnings") is not warned
            text = page.text_content("#warnings")
            assert ("warning: a prompt is longer than the 16 tokens" in text) is warned
            page.wait_for_selector('#gallery li[data-status="completed"]', timeout=60_000)


def test_the_gallery_shows_more_on_request(tmp_path, browser):
    """Page by page through the API's cursor (it showed the newest 50 only); a refresh keeps
    the pages shown."""
    import httpx

    model = build_tiny_model(tmp_path / "tiny")
    with Server(model, tmp_path / "data") as server:
        ids = [httpx.post(f"{server.url}/v1/videos", json={"prompt": f"clip {i}", "steps": 1})
               .json()["id"] for i in range(3)]  # fmt: skip
        page = browser.new_page()
        page.goto(server.url + "/")
        page.wait_for_function("document.querySelectorAll('#gallery li').length === 3")
        assert page.is_hidden("#more")
        page.evaluate("galleryPageSize = 2; refreshGallery()")
        page.wait_for_function("document.querySelectorAll('#gallery li').length === 2")
        page.wait_for_selector("#more", state="visible")
        page.click("#more")
        page.wait_for_function("document.querySelectorAll('#gallery li').length === 3")
        assert page.is_hidden("#more")
        shown = page.eval_on_selector_all("#gallery li", "cards => cards.map(c => c.dataset.id)")
        assert shown == ids[::-1]  # newest first, none twice
        page.click(f'#gallery li[data-id="{ids[2]}"] .delete')
        page.wait_for_function("document.querySelectorAll('#gallery li').length === 2")
        assert page.is_hidden("#more")  # both pages' worth, the rest of them


def open_page(browser, server: Server):  # noqa: ANN201 (a Playwright page)
    """The page on ``server``, its form showing the model's defaults."""
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('size').placeholder === '32x32'")
    return page


def start_a_long_video(browser, server: Server):  # noqa: ANN201 (a Playwright page)
    """A page on ``server`` that has submitted a 1000-step video, now in progress."""
    page = open_page(browser, server)
    page.fill("#prompt", "a long one")
    page.fill("#steps", "1000")
    page.click("#submit")
    page.wait_for_function("document.getElementById('status').textContent"
                           ".startsWith('in_progress')", timeout=60_000)  # fmt: skip
    return page


def test_deleting_the_video_being_made_clears_the_live_view(tmp_path, browser):
    """The poll after the delete said "no video with id ..." and the bar froze mid-way."""
    model = build_tiny_model(tmp_path / "tiny")
    with Server(model, tmp_path / "data") as server:
        page = start_a_long_video(browser, server)
        page.click("#gallery li .delete")  # its card, drawn as it was queued
        page.wait_for_function("document.querySelectorAll('#gallery li').length === 0")
        page.wait_for_timeout(1500)  # several polls' time
        assert page.is_hidden("#current") and page.text_content("#message") == ""


def test_the_live_view_follows_its_video_through_a_server_restart(tmp_path, browser):
    """One failed poll (the server restarting) stopped the page following the job, which the
    restarted server requeued and made: it now says it is still trying, then plays it."""
    model = build_tiny_model(tmp_path / "tiny")
    server = Server(model, tmp_path / "data")
    try:
        page = start_a_long_video(browser, server)
        server.stop()
        page.wait_for_function("document.getElementById('message').textContent"
                               ".endsWith('still trying')", timeout=30_000)  # fmt: skip
        server = Server(model, tmp_path / "data", port=server.port)  # the job requeued
        page.wait_for_function(
            "(() => { const v = document.getElementById('player');"
            " return v.readyState >= 2 && v.duration > 0; })()", timeout=120_000,
        )  # fmt: skip
        assert page.text_content("#message") == ""  # the retry line went when it answered
    finally:
        server.stop()


def test_fields_the_chosen_request_does_not_take_are_named(tmp_path, browser):
    """A strength with no video of one's own made a text-to-video clip without a word."""
    model = build_tiny_model(tmp_path / "tiny")
    with Server(model, tmp_path / "data") as server:
        page = open_page(browser, server)
        page.fill("#prompt", "a red ball")
        page.fill("#strength", "0.5")
        page.click("#submit")
        page.wait_for_function("document.getElementById('message').textContent"
                               " === 'strength: not used by a new video'")  # fmt: skip
        page.wait_for_selector('#gallery li[data-status="completed"]', timeout=60_000)


def sidecar(tmp_path, prompt: str) -> dict:
    """The request the pipeline ran for the job of ``prompt`` (the sidecar beside its video)."""
    found = [json.loads(p.read_text()) for p in (tmp_path / "data" / "jobs").glob("*/video.json")]
    (info,) = [i for i in found if i["prompt"] == prompt]
    return info


def test_a_video_of_ones_own_is_restyled_or_continued(tmp_path, browser):
    """The form's video upload goes to /v1/videos/edits (restyle, with strength) or
    /v1/videos/extensions (continue by the Seconds field); a start image beside it is refused
    on the page, before anything is sent."""
    from tests.serve_helpers import mp4_bytes, png_bytes

    model = build_tiny_model(tmp_path / "tiny")
    clip = tmp_path / "mine.mp4"
    mp4_bytes(clip, frames=9, size=32, fps=8)  # 9 frames at 8 fps: 1 s
    image = tmp_path / "start.png"
    image.write_bytes(png_bytes())
    with Server(model, tmp_path / "data") as server:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('size').placeholder === '32x32'")
        page.set_input_files("#video", str(clip))
        page.set_input_files("#image", str(image))
        page.fill("#prompt", "both")
        page.click("#submit")
        page.wait_for_function(
            "document.getElementById('message').textContent.includes('not both')"
        )
        page.set_input_files("#image", [])
        for mode, prompt, strength, seconds in (("restyle", "a blue ball, restyled", "0.5", ""),
                                                ("extend", "it goes on", "", "")):  # fmt: skip
            page.select_option("#video-mode", mode)
            page.fill("#prompt", prompt)
            page.fill("#strength", strength)
            page.fill("#seconds", seconds)
            page.click("#submit")
            page.wait_for_selector(f'#gallery li[data-status="completed"] >> text="{prompt}"',
                                   timeout=120_000)  # fmt: skip
            # the model's defaults are placeholders: no "size: not used by an extension"
            assert page.text_content("#message") == "", mode
        restyled, extended = (
            sidecar(tmp_path, "a blue ball, restyled"),
            sidecar(tmp_path, "it goes on"),
        )
        assert restyled["strength"] == 0.5 and restyled["frames"] == 9 and restyled["video"]
        # the duration left empty: the model's, 0.5 s, the placeholder (was a 400: no seconds)
        assert extended["extend"] and extended["frames"] == 4
        assert "both" not in [
            json.loads(p.read_text())["prompt"]
            for p in (tmp_path / "data" / "jobs").glob("*/video.json")
        ]
        assert not errors
