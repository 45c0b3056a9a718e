"""Warnings about a request, kept for its outputs as well as shown.

``warn(message, category)`` is ``warnings.warn``, and while :func:`collecting` is active in
the current thread (or task) the message is also kept, so that the pipeline can write it in
the sidecar and the HTTP API can return it. Unlike ``warnings.catch_warnings`` this touches
no process-wide state: the server prepares requests on several threads at once.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_kept: ContextVar[list[str] | None] = ContextVar("kinema_notes", default=None)


def warn(message: str, category: type[Warning] = UserWarning, stacklevel: int = 2) -> None:
    """``warnings.warn(message, category)``, kept by the innermost :func:`collecting`."""
    kept = _kept.get()
    if kept is not None:
        kept.append(message)
    warnings.warn(message, category, stacklevel=stacklevel + 1)


@contextmanager
def collecting() -> Iterator[list[str]]:
    """Keep the messages given to :func:`warn` in this thread until the block ends."""
    kept: list[str] = []
    token = _kept.set(kept)
    try:
        yield kept
    finally:
        _kept.reset(token)
