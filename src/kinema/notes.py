"""Warnings about a request, kept for its outputs as well as shown.

``warn(message, category)`` is ``warnings.warn``, except while :func:`collecting` is active in
the current thread (or task): then the message is kept, so that the pipeline can write it in
the sidecar and the HTTP API can return it, and shown when the block ends without an error (a
request found bad later is its error alone, not warnings and then the error). Unlike
``warnings.catch_warnings`` this touches no process-wide state: the server prepares requests
on several threads at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_kept: ContextVar[list[tuple[str, type[Warning]]] | None] = ContextVar("kinema_notes",
                                                                      default=None)  # fmt: skip


def warn(message: str, category: type[Warning] = UserWarning, stacklevel: int = 2) -> None:
    """``warnings.warn(message, category)``, or kept by the innermost :func:`collecting`."""
    kept = _kept.get()
    if kept is not None:
        kept.append((message, category))
        return
    warnings.warn(message, category, stacklevel=stacklevel + 1)


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
        warnings.warn(message, category, stacklevel=4)  # the caller of the pipeline's method
