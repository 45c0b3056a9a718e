"""kinema.notes: warnings kept per thread for the request being prepared."""

from __future__ import annotations

import threading
import warnings

import pytest

from kinema import notes


def test_collecting_keeps_what_is_warned_inside_only():
    with pytest.warns(UserWarning, match="outside"):
        notes.warn("outside")
    with pytest.warns(DeprecationWarning), notes.collecting() as kept:
        notes.warn("inside", DeprecationWarning)
        with pytest.warns(UserWarning), notes.collecting() as inner:
            notes.warn("nested")
    assert kept == ["inside"] and inner == ["nested"]


def test_what_is_warned_inside_is_shown_only_if_the_block_ends_well():
    """A request found bad later is its error alone, not warnings and then the error."""
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with pytest.raises(ValueError), notes.collecting() as kept:
            notes.warn("upscaling it")
            raise ValueError("steps 0 must be >= 1")
        assert shown == [] and kept == []
        with notes.collecting() as kept:
            notes.warn("upscaling it")
            assert shown == []  # shown once the block ends
        assert [str(w.message) for w in shown] == ["upscaling it"] == kept


@pytest.mark.filterwarnings("ignore:[ab] [0-9]+:UserWarning")
def test_threads_keep_their_own_notes():
    """Two threads collecting at once (the server's request threads and its worker)."""
    start, kept = threading.Barrier(2), {}

    def prepare(name: str) -> None:
        with notes.collecting() as mine:
            start.wait()
            for i in range(50):
                notes.warn(f"{name} {i}")
            kept[name] = mine

    threads = [threading.Thread(target=prepare, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert kept == {n: [f"{n} {i}" for i in range(50)] for n in ("a", "b")}
