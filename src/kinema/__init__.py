"""kinema: an open video generation engine.

``kinema.load(model=None, device=None, dtype=None, ...)`` returns a :class:`Pipeline` whose
``generate(prompt, ...)`` makes a :class:`Video`; ``Request`` holds every setting of a clip.
Importing kinema is light: torch loads with the first model.
"""

import typing as _typing

if _typing.TYPE_CHECKING:
    from pathlib import Path

    import torch

    from kinema.pipeline import Pipeline, Request, Video

__version__ = "0.1.0"


def load(
    model: "str | Path | None" = None,
    *,
    device: "str | torch.device | None" = None,
    dtype: "str | torch.dtype | None" = None,
    offload: str = "none",
    compile: bool = False,
    lora: "str | Path | _typing.Sequence[str | Path | tuple[str | Path, float]]" = (),
) -> "Pipeline":
    """Load a model and return its :class:`Pipeline`.

    Args:
        model: a model folder (kinema, diffusers or the original Wan 2.1 release) or a name;
            ``None`` is the built-in kinema-tiny.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``; ``None`` picks CUDA when
            there is one.
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (or the torch dtype); ``None`` is bf16 on
            CUDA, fp16 on MPS and fp32 on a CPU.
        offload: ``"none"``, ``"model"`` or ``"block"``: keep weights in host memory and move
            each part (or each DiT block) to the GPU while it works; the same outputs.
        compile: fuse q/k/v and ``torch.compile`` every DiT block (faster steps after a
            warm-up; for many clips or a server).
        lora: LoRA files merged into the DiT: a path, or a list of paths and
            ``(path, strength)`` pairs.

    Then ``pipe.generate(prompt, width=, height=, frames=, fps=, steps=, guidance=, seed=,
    image=, video=, strength=, prompts=[(seconds, prompt)], ...)`` makes a :class:`Video`
    (``None`` settings take the model's defaults, ``kinema info`` lists them);
    ``pipe.extend(video, seconds, prompt)`` continues a clip; ``progress=f(done, total)``
    follows the sampler's steps.
    """
    from kinema.loading import load as _load

    return _load(model, device=device, dtype=dtype, offload=offload, compile=compile, lora=lora)


def __getattr__(name: str) -> object:
    """``kinema.Pipeline``, ``kinema.Request``, ``kinema.Video``, imported when first named."""
    if name in ("Pipeline", "Request", "Video"):
        from kinema import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'kinema' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])


__all__ = ["Pipeline", "Request", "Video", "load", "__version__"]
