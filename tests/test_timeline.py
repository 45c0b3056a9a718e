"""Window planning for long videos, extension and timed prompts (pure functions)."""

from __future__ import annotations

import pytest

from kinema.timeline import latent_prompts, plan, switch_frames


def test_short_clip_is_one_plain_window():
    windows = plan("a", [], 33, 33, 5, seed=9, has_tail=False)
    assert [(w.prompts, w.frames, w.context, w.seed) for w in windows] == [(((0, "a"),), 33, 0, 9)]


def test_long_clip_windows_overlap_by_context_and_sum_to_total():
    total = 16 * 60 + 1  # 60 s at 16 fps
    windows = plan("a", [], total, 33, 5, seed=0, has_tail=False)
    assert windows[0].context == 0 and all(w.context == 5 for w in windows[1:])
    assert all(w.frames <= 33 and (w.frames - 1) % 4 == 0 for w in windows)
    assert sum(w.new for w in windows) == total
    assert [w.seed for w in windows] == list(range(len(windows)))


def test_timed_prompts_switch_at_latent_boundaries_inside_one_window():
    switches = switch_frames([(1.0, "b"), (1.6, "c")], fps=16, duration=2.0, temporal=4)
    assert switches == [(16, "b"), (24, "c")]
    (window,) = plan("a", switches, 33, 33, 5, seed=0, has_tail=False)  # no cut at a switch
    assert window.prompts == ((0, "a"), (16, "b"), (24, "c")) and window.frames == 33
    # latent frame j covers pixel frames 4j-3..4j: 13-16 still "a", 17-20 "b", 25-28 "c"
    assert latent_prompts([0, 16, 24], 9, 4) == [0, 0, 0, 0, 0, 1, 1, 2, 2]


def test_long_timed_video_gives_each_window_the_prompts_in_force_over_it():
    switches = switch_frames([(2.5, "b")], fps=16, duration=4.0, temporal=4)  # frame 40
    windows = plan("a", switches, 65, 33, 5, seed=0, has_tail=False)
    starts = [sum(w.new for w in windows[:i]) - w.context for i, w in enumerate(windows)]
    assert [(s, w.frames) for s, w in zip(starts, windows, strict=True)] == [
        (0, 33),
        (28, 33),
        (56, 9),
    ]
    assert [w.prompts for w in windows] == [((0, "a"),), ((0, "a"), (12, "b")), ((0, "b"),)]


def test_extension_windows_all_have_context():
    windows = plan("a", [(8, "b")], 64, 33, 5, seed=0, has_tail=True)
    assert all(w.context == 5 for w in windows) and sum(w.new for w in windows) == 64
    assert windows[0].prompts == ((0, "a"), (13, "b"))  # new frame 8 is the window's 13th


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
