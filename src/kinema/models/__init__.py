"""kinema's networks: the video DiT, the causal VAE and the text encoders."""

from __future__ import annotations

from typing import Any

from kinema.models.dit import VideoDiT


def __getattr__(name: str) -> Any:
    if name == "CausalVAE":
        from kinema.models.vae import CausalVAE

        return CausalVAE
    raise AttributeError(name)


__all__ = ["VideoDiT", "CausalVAE"]
