"""Window planning for long videos, extension and timed prompts (pure functions)."""

from __future__ import annotations

import pytest

from kinema.timeline import plan, segments, switch_frames


def test_short_clip_is_one_plain_window():
    windows = plan(segments("a", [], 33, first_has_start=True), 33, 5, seed=9, has_tail=False)
    assert [(w.frames, w.context, w.seed) for w in windows] == [(33, 0, 9)]


def test_long_clip_windows_overlap_by_context_and_sum_to_total():
    total = 16 * 60 + 1  # 60 s at 16 fps
    windows = plan(segments("a", [], total, True), 33, 5, seed=0, has_tail=False)
    assert windows[0].context == 0 and all(w.context == 5 for w in windows[1:])
    assert all(w.frames <= 33 and (w.frames - 1) % 4 == 0 for w in windows)
    assert sum(w.new for w in windows) == total
    assert [w.seed for w in windows] == list(range(len(windows)))


def test_timed_prompts_switch_at_latent_boundaries():
    switches = switch_frames([(1.0, "b"), (1.6, "c")], fps=16, duration=2.0, temporal=4)
    assert switches == [(16, "b"), (24, "c")]
    windows = plan(segments("a", switches, 33, True), 33, 5, seed=0, has_tail=False)
    made, start = [], 0
    for w in windows:
        made.append((start, w.prompt))
        start += w.new
    assert made == [(0, "a"), (17, "b"), (25, "c")]  # frames 0..16 "a", 17.. "b", 25.. "c"
    assert sum(w.new for w in windows) == 33


def test_extension_windows_all_have_context():
    windows = plan(segments("a", [], 64, first_has_start=False), 33, 5, seed=0, has_tail=True)
    assert all(w.context == 5 for w in windows) and sum(w.new for w in windows) == 64


@pytest.mark.parametrize(
    "timed, message",
    [
        ([(0.0, "b")], "outside the clip"),
        ([(3.0, "b")], "outside the clip"),
        ([(1.0, "b"), (0.5, "c")], "must increase"),
    ],
)
def test_bad_times_are_refused(timed, message):
    with pytest.raises(ValueError, match=message):
        switch_frames(timed, fps=16, duration=2.0, temporal=4)
