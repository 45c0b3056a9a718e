"""kinema.notes: warnings kept per thread for the request being prepared."""

from __future__ import annotations

import threading

import pytest

from kinema import notes


def test_collecting_keeps_what_is_warned_inside_only():
    with pytest.warns(UserWarning, match="outside"):
        notes.warn("outside")
    with pytest.warns(DeprecationWarning), notes.collecting() as kept:
        notes.warn("inside", DeprecationWarning)
        with notes.collecting() as inner, pytest.warns(UserWarning):
            notes.warn("nested")
    assert kept == ["inside"] and inner == ["nested"]


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
