"""Window planning for long videos, extension and timed prompts (pure functions)."""

from __future__ import annotations

import pytest

from kinema.timeline import latent_prompts, neighbour_prompts, new_frames, plan, switch_frames


def test_short_clip_is_one_plain_window():
    windows = plan("a", [], 33, 33, 5, seed=9, has_tail=False)
    assert [(w.prompts, w.frames, w.context, w.seed, w.keep) for w in windows] == [
        (((0, "a"),), 33, 0, 9, 33)
    ]


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
    (window,) = plan("a", switches, 33, 33, 5, seed=0, has_tail=False, switch="blend")
    assert window.prompts == ((0, "a"), (16, "b"), (24, "c")) and window.frames == 33
    # latent frame j covers pixel frames 4j-3..4j: 13-16 still "a", 17-20 "b", 25-28 "c"
    assert latent_prompts([0, 16, 24], 9, 4) == [0, 0, 0, 0, 0, 1, 1, 2, 2]


def test_long_timed_video_gives_each_window_the_prompts_in_force_over_it():
    switches = switch_frames([(2.5, "b")], fps=16, duration=4.0, temporal=4)  # frame 40
    windows = plan("a", switches, 65, 33, 5, seed=0, has_tail=False, switch="blend")
    starts = [sum(w.new for w in windows[:i]) - w.context for i, w in enumerate(windows)]
    assert [(s, w.frames) for s, w in zip(starts, windows, strict=True)] == [
        (0, 33),
        (28, 33),
        (56, 9),
    ]
    assert [w.prompts for w in windows] == [((0, "a"),), ((0, "a"), (12, "b")), ((0, "b"),)]


def test_extension_windows_all_have_context():
    windows = plan("a", [(8, "b")], 64, 33, 5, seed=0, has_tail=True, switch="blend")
    assert all(w.context == 5 for w in windows) and sum(w.new for w in windows) == 64
    assert windows[0].prompts == ((0, "a"), (13, "b"))  # new frame 8 is the window's 13th


def test_cut_switch_keeps_a_full_window_up_to_the_switch_then_continues_under_the_next():
    switches = switch_frames([(1.0, "b")], fps=16, duration=2.0, temporal=4)  # frame 16
    windows = plan("a", switches, 33, 33, 5, seed=0, has_tail=False, switch="cut")
    # the first window is made whole under "a" and kept up to the last frame of latent frame 4
    # (pixel frames 13-16, as in blend); the second continues under "b" from frame 17
    assert [(w.prompts, w.frames, w.context, w.keep) for w in windows] == [
        (((0, "a"),), 33, 0, 17),
        (((0, "b"),), 21, 5, 21),
    ]
    assert sum(w.new for w in windows) == 33


def test_cut_switches_in_long_videos_and_extensions_land_where_blend_puts_them():
    for has_tail, total, timed in [(False, 97, [(1.0, "b"), (3.5, "c")]), (True, 64, [(0.5, "b")])]:
        duration = (total - (0 if has_tail else 1)) / 16
        switches = switch_frames(timed, fps=16, duration=duration, temporal=4)
        cut = plan("a", switches, total, 33, 5, seed=0, has_tail=has_tail, switch="cut")
        blend = plan("a", switches, total, 33, 5, seed=0, has_tail=has_tail, switch="blend")
        assert sum(w.new for w in cut) == total and all(w.prompts[1:] == () for w in cut)
        assert all(w.frames <= 33 and (w.frames - 1) % 4 == 0 for w in cut)
        assert len(blend) <= len(cut) <= len(blend) + len(switches)  # at most one more per switch
        # the prompt of each new frame, frame by frame, is the same in both modes
        assert new_frame_prompts(cut) == new_frame_prompts(blend)


def new_frame_prompts(windows) -> list[str]:
    out = []
    for w in windows:
        which = latent_prompts([s for s, _ in w.prompts], (w.frames - 1) // 4 + 1, 4)
        latent = [0] + [(f - 1) // 4 + 1 for f in range(1, w.frames)]  # latent frame of a pixel
        out += [w.prompts[which[latent[f]]][1] for f in range(w.context, w.keep)]
    return out


def test_unknown_switch_mode_is_refused():
    with pytest.raises(ValueError, match="valid: blend, cut"):
        plan("a", [], 33, 33, 5, seed=0, has_tail=False, switch="fade")


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


def test_a_clip_too_short_to_switch_says_so_and_minutes_are_warned_about():
    """A 5-frame clip named "0 s" the latest time, itself refused; "1:30:a dog" was refused,
    and "2:16:9 widescreen" with it."""
    from kinema.timeline import parse_timed

    with pytest.raises(ValueError, match="the clip is too short for a prompt change"):
        switch_frames([(0.1, "b")], fps=16, duration=0.25, temporal=4, latest=0)
    with pytest.warns(UserWarning, match=r"read as 1 s .*give the seconds \(90\)"):
        assert parse_timed("1:30:a dog") == (1.0, "30:a dog")


@pytest.mark.parametrize(
    "which, neighbours",
    [([0, 0, 0], None), ([0, 0, 1, 1], [1, 1, 0, 0]), ([0, 1, 2], [1, 2, 1]),
     ([0, 0, 0, 1, 1, 2], [1, 1, 1, 0, 2, 1])],
)  # fmt: skip
def test_neighbour_prompts_name_the_nearest_other_prompt(which, neighbours):
    assert neighbour_prompts(which) == neighbours


def test_a_length_under_one_step_is_made_one_step_long_and_said():
    with pytest.warns(UserWarning, match="1 s at 1 fps is less than the shortest step of 4"):
        assert new_frames(1.0, 1, 4) == 4
    assert new_frames(1.0, 16, 4) == 16  # a whole number of steps: nothing to say
