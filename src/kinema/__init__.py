"""kinema: an open video generation engine.

``kinema.load(name_or_path=None, device=None, dtype=None, ...)`` returns a pipeline whose
``generate(prompt, ...)`` makes a :class:`~kinema.pipeline.Video`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(model: Any = None, **options: Any) -> Any:
    """Load a model (default: the built-in kinema-tiny); ``options`` are those of
    :func:`kinema.loading.load`: ``device``, ``dtype``, ``offload``, ``compile``, ``lora``."""
    from kinema.loading import load as _load

    return _load(model, **options)


__all__ = ["load", "__version__"]
