"""``kinema convert SRC DST``: any loadable model -> kinema's folder format."""

from __future__ import annotations

import warnings
from pathlib import Path

from kinema.io.checkpoint import save_model_folder
from kinema.io.paths import check_export_folder
from kinema.loading import DTYPES, load
from kinema.sampling.cache import CALIBRATION_FILE, CacheCalibration


def convert(source: str | Path, dest: str | Path, dtype: str | None = None) -> Path:
    """Load ``source`` on the CPU and write it to ``dest`` as a kinema model folder.

    The text encoder is stored beside the weights when it is a checkpoint of its own (umT5),
    and so is an image-to-video model's CLIP image encoder;
    the built-in MiniLM encoder is referenced by name, since its package ships it. A step-cache
    calibration (``step_cache.json``) comes along: ``--cache`` on the copy works as on the
    source.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: fp32, bf16, fp16")
    check_export_folder(dest, name="destination")  # before the minutes a large model loads
    with warnings.catch_warnings():  # converting runs nothing: the speed of bf16 is moot
        warnings.filterwarnings("ignore", message=".* is emulated on this CPU")
        pipe = load(source, device="cpu", dtype=dtype or "fp32")
    store = DTYPES[dtype] if dtype else None
    dest = Path(dest)
    spec = pipe.text_encoder.spec()

    def extra(tmp: Path) -> None:
        """What else the model is: a text encoder of its own, its step-cache calibration."""
        if "path" in spec:
            pipe.text_encoder.save_pretrained(tmp / spec["path"])
        if pipe.image_encoder is not None:  # Wan 2.1 image-to-video: its CLIP vision tower
            pipe.image_encoder.save_pretrained(tmp)
        calibration = pipe.cache_calibration
        if calibration is not None and calibration != CacheCalibration():
            calibration.save(tmp / CALIBRATION_FILE)

    return save_model_folder(
        dest,
        dit=pipe.dit,
        vae=pipe.vae,
        text_encoder=spec,
        sampling=pipe.defaults,
        name=pipe.name,
        dtype=store,
        extra=extra,
        vocabulary=pipe.vocabulary,
        vae_dtype=None,  # as it was: a half-precision load on a CPU runs it from these in fp32
    )


__all__ = ["convert"]
