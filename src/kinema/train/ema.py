"""Exponential moving average of a model's parameters.

After each optimiser step, ``shadow = d * shadow + (1 - d) * param`` with ``d`` the decay, or
with warm-up ``d_n = min(decay, (1 + n) / (10 + n))`` for the n-th update (n from 0), so the
average is not dominated by the random initialisation early on. The shadow is kept in float32
whatever the parameter dtype. The update count lives in the object and its state dict.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def ema_decay_at(updates: int, decay: float, warmup: bool) -> float:
    """The decay used for update number ``updates`` (0-based)."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


class EMA:
    """Float32 shadow copies of a model's trainable parameters, by name."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay {decay} must be in [0, 1)")
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.shadow: dict[str, Tensor] = {
            n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Move the shadow towards the model's parameters; returns the decay used."""
        d = ema_decay_at(self.updates, self.decay, self.warmup)
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1 - d)
        self.updates += 1
        return d

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the shadow (cast to their dtype)."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name])

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily put the shadow weights into ``model`` (restored on exit)."""
        backup = {n: p.detach().clone() for n, p in model.named_parameters() if n in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in backup:
                        p.copy_(backup[name])

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates,
                "shadow": dict(self.shadow)}  # fmt: skip

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        assert isinstance(shadow, dict)
        missing = sorted(set(self.shadow) - set(shadow))
        if missing:
            raise ValueError(f"EMA state lacks parameters {missing[:5]}")
        self.shadow = {n: shadow[n].float().clone() for n in self.shadow}
        self.decay = float(state["decay"])  # type: ignore[arg-type]
        self.warmup = bool(state["warmup"])
        self.updates = int(state["updates"])  # type: ignore[call-overload]
