"""``kinema.load``: a model name or folder -> a :class:`~kinema.pipeline.Pipeline` on a device.

Three layouts are recognised by what the folder holds:

* kinema's own (``kinema.json`` + ``transformer/`` + ``vae/``), e.g. the built-in kinema-tiny;
* a diffusers Wan 2.1 folder (``model_index.json``, ``transformer/``, ``vae/``,
  ``text_encoder/``, ``tokenizer/``, ``scheduler/``; image-to-video ones also
  ``image_encoder/`` + ``image_processor/``, the CLIP vision tower);
* the original Wan 2.1 release (``config.json`` + ``diffusion_pytorch_model*.safetensors``,
  ``Wan2.1_VAE.pth``, ``models_t5_umt5-xxl-enc-bf16.pth``, tokenizer in ``google/umt5-xxl``).

Device and dtype policy lives here and nowhere else: weights go straight to their device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kinema import notes
from kinema.configs import SamplingDefaults
from kinema.io.checkpoint import CheckpointError, config_in, load_dit, load_vae, read_json_object
from kinema.pipeline import Pipeline, is_number

BUILTIN = "kinema-tiny"
ASSETS = Path(__file__).parent / "assets"
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The requested device, or the best one available (cuda, then mps, then cpu)."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps and mps.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N, mps") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} is not available here (no CUDA GPU); valid: cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} is not available here; valid: cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {device!r}; valid: cpu, cuda, cuda:N, mps")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The requested dtype, or the device's default: bf16 on CUDA, fp16 on MPS, fp32 on CPU."""
    if dtype is None:
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if not isinstance(dtype, str) or dtype.lower() not in DTYPES:  # torch.int8 and float64 too
        raise ValueError(f"unknown dtype {dtype!r}; valid: fp32, bf16, fp16")
    return DTYPES[dtype.lower()]


def folder_defaults(model: str | Path | None) -> SamplingDefaults | None:
    """A model's sampling defaults (``None``: the built-in model's), read without its weights
    (None: not a whole model, e.g. a transformer folder)."""
    from kinema.sampling import schedule_from_diffusers_config

    path = resolve_model_path(model)
    if (path / "kinema.json").is_file():
        return model_defaults(path / "kinema.json", read_json_object(path / "kinema.json"))
    scheduler = path / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        sampler, shift = schedule_from_diffusers_config(read_json_object(scheduler))
        return SamplingDefaults(sampler=sampler, shift=shift)
    return SamplingDefaults() if (path / "Wan2.1_VAE.pth").exists() else None


def model_defaults(path: Path, meta: dict[str, Any]) -> SamplingDefaults:
    """The ``sampling`` block of a ``kinema.json`` (read from ``path``), errors naming it."""
    sampling = meta.get("sampling", {})
    if not isinstance(sampling, dict):
        raise CheckpointError(f"{path}: sampling is {type(sampling).__name__}, not an object")
    return config_in(SamplingDefaults, sampling, path)


def resolve_model_path(model: str | Path | None) -> Path:
    """A model name or folder -> the folder; errors name what was looked for."""
    if model is None or str(model) == BUILTIN:
        path = ASSETS / BUILTIN
        if not (path / "kinema.json").exists():
            raise ValueError(
                f"the built-in model {BUILTIN} is not in this install ({path}); "
                "train it with scripts/train_tiny.sh or pass --model PATH"
            )
        return path
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model {str(model)!r} not found: not a folder, and not {BUILTIN!r}")
    return path


def load(
    model: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    offload: str = "none",
    compile: bool = False,
    lora: Sequence[str | Path | tuple[str | Path, float]] = (),
) -> Pipeline:
    """Load a model (``None`` = the built-in kinema-tiny) onto ``device`` in ``dtype``.

    ``offload`` (:class:`kinema.offload.Placement`): ``"none"`` keeps every part on ``device``;
    ``"model"`` keeps the weights on the CPU and moves each part to ``device`` while it works;
    ``"block"`` also streams the DiT's blocks one at a time. Outputs are the same.

    ``compile``: fuse each attention's q/k/v projections into one matmul and ``torch.compile``
    every DiT block (:meth:`VideoDiT.compile_blocks`). The same outputs (within 1e-4) and
    faster steps, after a warm-up the first clip pays (seconds on CPU): for many clips or a
    server, not for one.

    ``lora``: LoRA files (:mod:`kinema.lora`; or folders holding ``lora.safetensors``), each a
    path or (path, strength), merged into the DiT's weights once (no cost per step).
    """
    with notes.collecting() as said:  # shown, and kept for every clip's sidecar
        pipe = _load(model, device, dtype, offload, compile, lora)
    pipe.load_warnings = said
    return pipe


def _load(
    model: str | Path | None, device: Any, dtype: Any, offload: str, compile: bool, lora: Any
) -> Pipeline:
    """:func:`load`'s work; its warnings go to the :func:`kinema.notes.collecting` around it."""
    from kinema.offload import Placement

    start = time.perf_counter()
    if not isinstance(compile, bool):  # compile="no" turned it on
        raise ValueError(f"compile must be True or False, got {compile!r}")
    pairs = lora_pairs(lora)  # checked before the weights load
    path = resolve_model_path(model)
    compute = resolve_device(device)
    dt = resolve_dtype(dtype, compute)
    placement = Placement(offload, compute)
    if placement.policy != "none" and compute.type == "cpu":
        notes.warn(f"offload {offload!r} moves weights between host memory and a GPU; on a "
                   "CPU they are in host memory already, so it changes nothing")  # fmt: skip
    homes = placement.home, placement.encoder_home  # where the weights live
    vae_dt = _vae_dtype(dt, compute)  # warns where a CPU emulates dt
    if (path / "kinema.json").exists():
        parts = _kinema_parts(path, homes, dt, vae_dt)
    elif (path / "model_index.json").exists():
        parts = _diffusers_parts(path, homes, dt, vae_dt)
    elif (path / "Wan2.1_VAE.pth").exists():
        parts = _original_parts(path, homes, dt, vae_dt)
    elif path.suffix == ".safetensors" or (path / "lora.safetensors").is_file():
        raise ValueError(
            f"{path} is a weights file, not a model folder: a LoRA goes in --lora (lora=) with "
            "its base model as --model; a model is its whole folder (diffusers' or the "
            "original release's, with its VAE and text encoder)"
        )
    else:
        raise ValueError(
            f"{path} is not a model folder: expected kinema.json (kinema), model_index.json "
            "(diffusers) or Wan2.1_VAE.pth (original Wan 2.1 release)"
        )
    from kinema.offload import text_model
    from kinema.sampling.cache import load_calibration

    image = parts.get("image_encoder")
    for encoder in (text_model(parts["text_encoder"])[1], image.model if image else None):
        if encoder is not None:
            placement.settle(encoder)  # pinned, to visit a GPU fast
    parts["cache_calibration"] = load_calibration(path)  # step_cache.json, if calibrated
    if pairs:
        from kinema.lora import merge_lora, read_lora

        for file, strength in pairs:
            try:
                merge_lora(parts["dit"], read_lora(file), strength)
            except ValueError as err:  # a shape that does not fit: which of the files
                said = str(err) if str(file) in str(err) else f"{file}: {err}"
                raise ValueError(said) from None
        parts["loras"] = [(str(file), float(strength)) for file, strength in pairs]
    if compile:
        parts["dit"].fuse_projections().compile_blocks()
    return Pipeline(**parts, placement=placement, load_seconds=time.perf_counter() - start)


def lora_pairs(lora: Any) -> list[tuple[str | Path, float]]:
    """``lora`` as (file, strength) pairs: one path (a string is one file, not its letters), or
    a list of paths and (path, strength) pairs; ValueError naming what is not one."""
    if isinstance(lora, str | Path):
        lora = [lora]
    if isinstance(lora, dict):  # {path: strength} would drop the strengths
        raise ValueError("lora takes a path or a list of paths and (path, strength) pairs, "
                         "not a dict")  # fmt: skip
    pairs = []
    for item in lora or ():
        file, strength = item if isinstance(item, tuple | list) and len(item) == 2 else (item, 1.0)
        if not isinstance(file, str | Path) or not is_number(strength):
            raise ValueError(f"lora takes paths or (path, strength) pairs, got {item!r}")
        if not math.isfinite(strength):
            raise ValueError(f"LoRA {file}: the strength {strength} must be a finite number")
        pairs.append((file, float(strength)))
    return pairs


def model_name(path: Path) -> str:
    """How sidecars name a model folder: its name ("." resolved: the folder's own), or for a
    Hugging Face cache snapshot (.../models--ORG--NAME/snapshots/HASH) the repository."""
    path = path.resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.removeprefix("models--").replace("--", "/")
    return path.name


def _vae_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The VAE runs in float32 unless half precision was asked for where it runs natively: on
    an accelerator, or on a CPU that computes in it (:func:`kinema.models.ops.cpu_native`).
    Emulated, a CPU's half-precision 3D convolutions take ~200x the fp32 time (kinema-tiny's
    decode: 224-236 s in bf16 or fp16 against 1.1 s in fp32 on a 2-core AVX2 CPU), so there
    the VAE stays fp32 and a warning says what the DiT's half precision costs."""
    from kinema import notes
    from kinema.models.ops import cpu_native

    if device.type != "cpu" or cpu_native(dtype):
        return dtype
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    notes.warn(f"{name} is emulated on this CPU (no AVX512 or AMX {name}): the DiT runs "
               "several times slower than in fp32 (5-15x for kinema-tiny on a 2-core AVX2 "
               "CPU) and the VAE stays fp32; --dtype fp32 is the fast choice here")  # fmt: skip
    return torch.float32


# Where a model's parts are loaded: (the DiT's and VAE's device, the encoders'), see
# :attr:`kinema.offload.Placement.encoder_home`.
Homes = tuple[torch.device, torch.device]


def _kinema_parts(path: Path, homes: Homes, dt: torch.dtype, vae_dt: torch.dtype) -> dict[str, Any]:
    from kinema.models.text import CachedTextEncoder, load_text_encoder

    (dev, enc), meta = homes, read_json_object(path / "kinema.json")
    text = dict(meta.get("text_encoder", {"kind": "minilm"}))
    kind = text.pop("kind")
    sub = text.pop("path", None)
    encoder = load_text_encoder(kind, str(path / sub) if sub else None, enc, dt, **text)
    encoder = CachedTextEncoder(encoder)
    parts = {
        "dit": load_dit(path / "transformer", dev, dt),
        "vae": load_vae(path / "vae", dev, vae_dt),
        "text_encoder": encoder,
        "name": meta.get("name", model_name(path)),
        "defaults": model_defaults(path / "kinema.json", meta),
        "vocabulary": meta.get("vocabulary"),
    }
    if parts["dit"].config.image_dim is not None:  # converted Wan 2.1 image-to-video
        from kinema.i2v import CLIPImageEncoder

        parts["image_encoder"] = CLIPImageEncoder.from_pretrained(path, enc)
    return parts


def _diffusers_parts(
    path: Path, homes: Homes, dt: torch.dtype, vae_dt: torch.dtype
) -> dict[str, Any]:
    from kinema.i2v import CLIPImageEncoder, needs_image_encoder
    from kinema.models.text import CachedTextEncoder, UMT5TextEncoder
    from kinema.sampling import schedule_from_diffusers_config

    dev, enc = homes
    check_pipeline(read_json_object(path / "model_index.json"), path / "model_index.json")
    scheduler = path / "scheduler" / "scheduler_config.json"
    if not scheduler.exists():
        raise CheckpointError(f"missing {scheduler}")
    sampler, shift = schedule_from_diffusers_config(read_json_object(scheduler))
    parts = {
        "dit": load_dit(path / "transformer", dev, dt),
        "vae": load_vae(path / "vae", dev, vae_dt),
        "text_encoder": CachedTextEncoder(
            UMT5TextEncoder.from_pretrained(path, device=enc, dtype=dt)
        ),
        "name": model_name(path),
        "defaults": SamplingDefaults(sampler=sampler, shift=shift),
    }
    if needs_image_encoder(path):  # Wan 2.1 image-to-video: CLIP image tokens
        parts["image_encoder"] = CLIPImageEncoder.from_pretrained(path, enc)
    return parts


# The diffusers pipelines whose folders kinema reads (Wan 2.1: text-, image-, video-to-video).
WAN_PIPELINES = ("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline")


def check_pipeline(index: dict[str, Any], where: Path) -> None:
    """Refuse a diffusers folder of another pipeline, or a Wan 2.2 two-expert one (a second
    transformer for the low-noise steps, which a load of ``transformer`` alone would skip)."""
    kind = index.get("_class_name")
    if kind not in WAN_PIPELINES:
        raise CheckpointError(f"{where} is a {kind!r} folder; kinema reads Wan 2.1 diffusers "
                              f"folders ({', '.join(WAN_PIPELINES)})")  # fmt: skip
    second = index.get("transformer_2")
    if isinstance(second, list) and any(part is not None for part in second):
        raise CheckpointError(
            f"{where} is a Wan 2.2 two-expert model (transformer_2, boundary_ratio "
            f"{index.get('boundary_ratio')}): kinema runs Wan 2.1 layouts, one transformer"
        )


def _original_parts(
    path: Path, homes: Homes, dt: torch.dtype, vae_dt: torch.dtype
) -> dict[str, Any]:
    from kinema.models.text import CachedTextEncoder, UMT5TextEncoder

    dev, enc = homes
    t5 = path / "models_t5_umt5-xxl-enc-bf16.pth"
    tokenizer = path / "google" / "umt5-xxl"
    config = read_json_object(path / "config.json") if (path / "config.json").is_file() else {}
    if config.get("model_type") in ("i2v", "flf2v"):  # CLIP is open-clip's: not read here
        raise CheckpointError(
            f"{path} is an original-release Wan 2.1 image-to-video model: kinema reads its "
            "CLIP image encoder from the diffusers layout only; use the -Diffusers release "
            "(e.g. Wan2.1-I2V-14B-480P-Diffusers)"
        )
    return {
        "dit": load_dit(path, dev, dt),
        "vae": load_vae(path / "Wan2.1_VAE.pth", dev, vae_dt),
        "text_encoder": CachedTextEncoder(
            UMT5TextEncoder.from_original(t5, tokenizer, device=enc, dtype=dt)
        ),
        "name": model_name(path),
        "defaults": SamplingDefaults(),
    }
