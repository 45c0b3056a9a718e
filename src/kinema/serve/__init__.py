"""``kinema serve``: an OpenAI-compatible Videos API with a persistent job queue and a web page.

``create_app(ServeSettings(data_dir=...))`` builds the ASGI app; ``kinema serve`` runs it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:  # FastAPI is imported only when the server is used
    if name in __all__:
        from kinema.serve import app

        return getattr(app, name)
    raise AttributeError(name)
