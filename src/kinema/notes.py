"""Warnings about a request, kept for its outputs as well as shown.

``warn(message, category)`` is ``warnings.warn``, except while :func:`collecting` is active in
the current thread (or task): then the message is kept, so that the pipeline can write it in
the sidecar and the HTTP API can return it, and shown when the block ends without an error (a
request found bad later is its error alone, not warnings and then the error). Unlike
``warnings.catch_warnings`` this touches no process-wide state: the server prepares requests
on several threads at once.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_kept: ContextVar[list[tuple[str, type[Warning]]] | None] = ContextVar("kinema_notes",
                                                                      default=None)  # fmt: skip


PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
INSIDE = (PACKAGE, contextlib.__file__)


def outside_stacklevel() -> int:
    """The ``stacklevel`` at which a ``warnings.warn`` in the calling function names the
    first caller outside kinema (the user's line, not kinema's own: requests reach their
    warnings through a call depth that varies)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(INSIDE):
        frame, level = frame.f_back, level + 1
    return level


def warn(message: str, category: type[Warning] = UserWarning, stacklevel: int = 2) -> None:
    """``warnings.warn(message, category)`` naming the caller outside kinema (``stacklevel`` is
    kept for callers that give it), or kept by the innermost :func:`collecting`."""
    kept = _kept.get()
    if kept is not None:
        kept.append((message, category))
        return
    warnings.warn(message, category, stacklevel=outside_stacklevel())


@contextmanager
def collecting() -> Iterator[list[str]]:
    """Keep the messages given to :func:`warn` in this thread (the list it yields), and show
    them once the block ends without an error."""
    kept: list[tuple[str, type[Warning]]] = []
    said: list[str] = []
    token = _kept.set(kept)
    try:
        yield said
    finally:
        _kept.reset(token)
    said += [message for message, _ in kept]
    for message, category in kept:
        warnings.warn(message, category, stacklevel=outside_stacklevel())  # the user's line
