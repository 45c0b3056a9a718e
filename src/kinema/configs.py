"""Frozen dataclass configs, written as ``config.json`` next to ``*.safetensors``.

Every field is documented once, here. ``from_dict`` refuses unknown keys and wrong types with a
message that names them, so a config from another architecture fails at the boundary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Wan 2.1 VAE latent statistics (diffusers `AutoencoderKLWan` config); latents are normalised
# as (z - mean) / std before the DiT sees them.
WAN_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclass(frozen=True)
class DiTConfig:
    """The video diffusion transformer (Wan 2.1 layout)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w) size of one 3D patch in latents
    num_heads: int = 12  # attention heads
    head_dim: int = 128  # channels per head; model width = num_heads * head_dim
    in_channels: int = 16  # latent channels in (36 for Wan I2V: noise + mask + image latents)
    out_channels: int = 16  # velocity channels out
    text_dim: int = 4096  # width of the text encoder's token states
    freq_dim: int = 256  # sinusoidal timestep embedding width
    ffn_dim: int = 8960  # hidden width of the GELU(tanh) feed-forward
    num_layers: int = 30  # transformer blocks
    cross_attn_norm: bool = True  # LayerNorm (affine) before cross-attention
    qk_norm: bool = True  # RMS norm of q and k across all heads
    eps: float = 1e-6  # epsilon of every norm
    rope_max_seq_len: int = 1024  # longest axis (in patches) the rotary table covers
    rope_theta: float = 10000.0  # rotary base frequency
    image_dim: int | None = None  # CLIP image-token width for Wan I2V (None: text only)
    added_kv_proj_dim: int | None = None  # input width of the image key/value projections
    pos_embed_seq_len: int | None = None  # image-token positions (first-last-frame models)
    num_train_timesteps: int = 1000  # timestep = sigma * num_train_timesteps

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    def __post_init__(self) -> None:
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must be (t, h, w), got {self.patch_size}")


@dataclass(frozen=True)
class VAEConfig:
    """The causal 3D VAE (Wan 2.1 layout): 8x spatial, 4x temporal compression."""

    base_dim: int = 96  # channels of the first stage
    z_dim: int = 16  # latent channels
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)  # channel multiplier per stage
    num_res_blocks: int = 2  # residual blocks per stage (decoder uses one more)
    attn_scales: tuple[float, ...] = ()  # scales with extra attention (none in Wan 2.1)
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # per downsampling stage
    dropout: float = 0.0  # dropout in residual blocks
    latents_mean: tuple[float, ...] = WAN_LATENTS_MEAN  # per-channel latent mean
    latents_std: tuple[float, ...] = WAN_LATENTS_STD  # per-channel latent std
    # The first latent frame encodes one image alone, and its statistics differ from the rest;
    # when given, it is normalised with its own per-channel mean and std (None: the above).
    first_frame_mean: tuple[float, ...] | None = None
    first_frame_std: tuple[float, ...] | None = None

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    def __post_init__(self) -> None:
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs {len(self.dim_mult) - 1} entries "
                f"(one per downsampling stage), got {len(self.temporal_downsample)}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean and latents_std need z_dim={self.z_dim} values each")
        first = (self.first_frame_mean, self.first_frame_std)
        if any(v is not None for v in first) and any(
            v is None or len(v) != self.z_dim for v in first
        ):
            raise ValueError(
                f"first_frame_mean and first_frame_std need z_dim={self.z_dim} values each"
            )


@dataclass(frozen=True)
class SamplingDefaults:
    """What a model folder recommends when a request leaves a setting out."""

    width: int = 832
    height: int = 480
    frames: int = 81
    fps: int = 16
    steps: int = 50
    guidance: float = 5.0
    shift: float = 3.0
    sampler: str = "unipc"
    negative_prompt: str = ""
    cache: float = 0.0  # step-cache threshold (kinema.sampling.cache); 0: every step evaluated
    contrast: float = 1.0  # timed prompts, blend: weight of guidance away from the next prompt


# ---------------------------------------------------------------------------------------------
# Named presets
# ---------------------------------------------------------------------------------------------

WAN21_T2V_1_3B = DiTConfig()
WAN21_T2V_14B = DiTConfig(num_heads=40, head_dim=128, ffn_dim=13824, num_layers=40)
WAN21_VAE = VAEConfig()

PRESETS: dict[str, Any] = {
    "wan2.1-t2v-1.3b": WAN21_T2V_1_3B,
    "wan2.1-t2v-14b": WAN21_T2V_14B,
    "wan2.1-vae": WAN21_VAE,
}


# ---------------------------------------------------------------------------------------------
# (De)serialisation
# ---------------------------------------------------------------------------------------------


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(config)


YAML_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")  # 1e-4, 5E+2, 1.5e3


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field annotation; turn JSON lists into tuples."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, where)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise TypeError(f"{where}: {value!r} matches none of {annotation}")
    if annotation is type(None):
        if value is not None:
            raise TypeError(f"{where}: expected null, got {value!r}")
        return None
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise TypeError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(annotation)
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(item_types) != len(value):
            raise TypeError(f"{where}: expected {len(item_types)} values, got {len(value)}")
        pairs = enumerate(zip(value, item_types, strict=True))
        return tuple(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in pairs)
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        key_type, value_type = typing.get_args(annotation)
        return {_coerce(k, key_type, where): _coerce(v, value_type, f"{where}[{k}]")
                for k, v in value.items()}  # fmt: skip
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and YAML_FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-4 (no '.') as text; every user writes it so
    if annotation is int and isinstance(value, str) and YAML_FLOAT.fullmatch(value.strip()):
        value = float(value)  # max_steps: 1e5, text to YAML 1.1 as 1e-4 is
    if annotation is int and isinstance(value, float):  # 1.0e+3 (YAML's float) or 1e5
        if math.isfinite(value) and value.is_integer():
            return int(value)
        raise TypeError(f"{where}: expected int, got {value!r}, not a finite whole number")
    if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
        return from_dict(annotation, value)
    if isinstance(annotation, type) and not isinstance(value, annotation):
        raise TypeError(
            f"{where}: expected {annotation.__name__}, got {type(value).__name__} {value!r}"
        )
    if annotation is int and isinstance(value, bool):
        raise TypeError(f"{where}: expected int, got bool {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a config dataclass from a dict, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{cls.__name__}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def save_json(config: Any, path: str | Path, **extra: Any) -> None:
    """Write a config as JSON (atomically), with ``extra`` top-level keys such as ``_class``."""
    from kinema.io.paths import write_text_atomic

    write_text_atomic(path, json.dumps({**extra, **to_dict(config)}, indent=2) + "\n")


def load_json(cls: type[T], path: str | Path) -> T:
    """Read a config written by :func:`save_json` (keys starting with ``_`` are metadata)."""
    data = json.loads(Path(path).read_text())
    return from_dict(cls, {k: v for k, v in data.items() if not k.startswith("_")})


__all__ = [
    "DiTConfig",
    "VAEConfig",
    "SamplingDefaults",
    "PRESETS",
    "from_dict",
    "to_dict",
    "save_json",
    "load_json",
]
