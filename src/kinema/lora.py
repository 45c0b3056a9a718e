"""LoRA: low-rank adapters on the DiT's linear layers (Hu et al. 2021) -- train, save, merge.

A LoRA of rank r adds ``scale * B A`` to a frozen weight W (out, in): A (r, in), B (out, r),
``scale = alpha / r``. Training (``lora:`` in a :class:`~kinema.train.config.TrainConfig`)
swaps the targeted ``nn.Linear`` layers of every block for :class:`LoRALinear` (same weight and
bias, plus ``lora_A``/``lora_B``; B starts at zero, so step 0 is the base model) and trains only
A and B. The export is one safetensors file in the PEFT / diffusers layout
(``transformer.blocks.0.attn1.to_q.lora_A.weight``) with ``scale`` folded into B, so readers
that take alpha = r when a file names none apply it as kinema does.

At inference :func:`merge_lora` adds ``strength * scale * B A`` into the weights once, so a
LoRA costs no time per step. :func:`read_lora` reads that layout, the ``lora_down`` /
``lora_up`` (+ ``alpha``) layout, and the module names community Wan LoRAs use: the original
Wan ones (``diffusion_model.blocks.0.self_attn.q``) and kohya / musubi-tuner's
(``lora_unet_blocks_0_self_attn_q``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.nn import functional as F

from kinema.io.checkpoint import save_tensors
from kinema.io.paths import usual_modes
from kinema.models.ops import Linear, apply_gelu, linear

# Linear layers inside each block that a LoRA adapts by default (diffusers' names).
DEFAULT_TARGETS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ffn.net.0.proj", "ffn.net.2",
)  # fmt: skip
_BLOCK_LINEAR = re.compile(r"blocks\.\d+\.(.+)")
_PREFIXES = ("transformer.", "diffusion_model.", "model.diffusion_model.", "base_model.model.")
# kohya / musubi-tuner names: lora_unet_blocks_0_self_attn_q -> blocks.0.self_attn.q
_KOHYA = re.compile(r"lora_unet_blocks_(\d+)_(self_attn|cross_attn|ffn)_(k_img|v_img|[qkvo02])")
_PAIRS = {"lora_A.weight": "lora_B.weight", "lora_down.weight": "lora_up.weight"}


@dataclass(frozen=True)
class LoRAConfig:
    """Which layers a LoRA adapts and how: ``rank`` r, ``alpha`` (scale alpha / r; None: r)."""

    rank: int = 16
    alpha: float | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS  # block-internal linear names (diffusers')

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not self.targets:
            raise ValueError(f"lora.targets is empty; e.g. {list(DEFAULT_TARGETS)}")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


class LoRALinear(Linear):
    """``nn.Linear`` with a low-rank update: y = x Wᵀ + b + scale (x Aᵀ) Bᵀ.

    Made from an existing layer by :func:`add_lora` (its weight and bias stay, under the same
    names); ``lora_A`` (r, in) starts Kaiming-uniform, ``lora_B`` (out, r) at zero.
    """

    lora_A: nn.Parameter
    lora_B: nn.Parameter
    lora_scale: float

    def start_lora(self, rank: int, scale: float) -> None:
        w = self.weight
        a = torch.empty(rank, w.shape[1], device=w.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device))
        self.lora_scale = scale

    def forward(self, x: Tensor, gelu: str | None = None) -> Tensor:
        low = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        y = linear(x, self.weight, self.bias) + self.lora_scale * low
        return y if gelu is None else apply_gelu(y, gelu)


def lora_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Names of the model's block linears whose block-internal name is in ``targets``."""
    return [
        name for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and (hit := _BLOCK_LINEAR.fullmatch(name)) is not None
        and hit.group(1) in targets
    ]  # fmt: skip


def add_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Freeze ``model`` and give its targeted linears trainable LoRA factors (in place)."""
    names = lora_targets(model, config.targets)
    if not names:
        raise ValueError(f"lora.targets {list(config.targets)} match no linear layer of the "
                         f"model's blocks; valid: {list(DEFAULT_TARGETS)}")  # fmt: skip
    model.requires_grad_(False)
    for m in model.modules():  # fused q/k/v copies would bypass the LoRA layers
        if hasattr(m, "unfuse_projections"):
            m.unfuse_projections()
    for name in names:
        layer = model.get_submodule(name)
        layer.__class__ = LoRALinear
        layer.start_lora(config.rank, config.scale)
    model.lora_config = config
    return model


def lora_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's LoRA factors by parameter name (``blocks.0.attn1.to_q.lora_A``)."""
    return {n: p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}


def save_lora(model: nn.Module, path: str | Path, base: str = "") -> Path:
    """Write the model's LoRA as a PEFT / diffusers file, ``scale`` folded into B, via a
    temporary file renamed into place. ``base``: the model it was trained on (metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scales = {n: m.lora_scale for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    state = {}
    for name, p in lora_state(model).items():
        layer, factor = name.rsplit(".", 1)
        value = p.detach().float() * (scales[layer] if factor == "lora_B" else 1.0)
        state[f"transformer.{layer}.{factor}.weight"] = value.contiguous().cpu()
    rank = model.lora_config.rank
    meta = {"format": "kinema-lora", "rank": str(rank), "alpha": str(rank), "base": base}
    tmp = path.with_name(f".{path.name}.tmp")
    save_tensors(state, tmp, meta)
    usual_modes(tmp)
    tmp.replace(path)
    return path


@dataclass(frozen=True)
class LoRAFactor:
    """One adapted layer of a LoRA file: delta W = scale B A."""

    down: Tensor  # A (r, in)
    up: Tensor  # B (out, r)
    scale: float


def _module_name(key: str) -> str:
    """A file's layer name -> kinema's (diffusers') module name."""
    from kinema.io.wan_keys import original_to_kinema

    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    if kohya := _KOHYA.fullmatch(key):
        key = "blocks.{}.{}.{}".format(*kohya.groups())
    # original Wan names (blocks.0.self_attn.q) -> diffusers'; those pass through unchanged
    return next(iter(original_to_kinema({key + ".weight": None}))).removesuffix(".weight")


def read_lora(path: str | Path) -> dict[str, LoRAFactor]:
    """A LoRA file -> {module name: factors}. Reads ``lora_A``/``lora_B`` (PEFT, diffusers,
    kinema) and ``lora_down``/``lora_up`` with optional ``alpha`` keys, diffusers' or the
    original Wan module names; anything else is an error naming the key."""
    path = Path(path)
    if path.is_dir():
        path = path / "lora.safetensors"
    if not path.is_file():
        raise ValueError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises several kinds for a file that is not one
        raise ValueError(f"{path} is not a safetensors LoRA file ({err})") from err
    layers: dict[str, LoRAFactor] = {}
    used: set[str] = set()
    for key in sorted(tensors):
        for down_suffix, up_suffix in _PAIRS.items():
            if not key.endswith("." + down_suffix):
                continue
            layer = key[: -len(down_suffix) - 1]
            up_key = f"{layer}.{up_suffix}"
            if up_key not in tensors:
                raise ValueError(f"{path}: {key} has no matching {up_key}")
            down, up = tensors[key].float(), tensors[up_key].float()
            if down.ndim != 2 or up.ndim != 2:
                raise ValueError(f"{path}: {key} and {up_key} are {tuple(down.shape)} and "
                                 f"{tuple(up.shape)}; LoRA factors are matrices")  # fmt: skip
            if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
                raise ValueError(f"{path}: {key} or {up_key} holds nan or inf values")
            alpha = tensors.get(f"{layer}.alpha")
            if alpha is not None and (alpha.numel() != 1 or not torch.isfinite(alpha).all()):
                raise ValueError(f"{path}: {layer}.alpha must be one finite number")
            scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
            layers[_module_name(layer)] = LoRAFactor(down, up, scale)
            used |= {key, up_key, f"{layer}.alpha"}
    unknown = sorted(set(tensors) - used)
    if unknown or not layers:
        raise ValueError(
            f"{path}: unrecognised LoRA key(s) {unknown[:3]}; kinema reads lora_A/lora_B "
            "(PEFT, diffusers) and lora_down/lora_up (+ alpha) pairs"
        )
    return layers


@torch.no_grad()
def merge_lora(model: nn.Module, lora: dict[str, LoRAFactor], strength: float = 1.0) -> int:
    """Add ``strength * scale * B A`` to each adapted weight of ``model`` (in place, computed
    in float32). Returns the number of layers changed. A layer the model lacks or a shape that
    does not fit is an error (a LoRA for another model)."""
    modules = dict(model.named_modules())
    for name, f in lora.items():
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"the LoRA adapts {name}, which this model does not have as a "
                             "linear layer (a LoRA for another architecture?)")  # fmt: skip
        want = tuple(layer.weight.shape)
        if f.up.shape[1] != f.down.shape[0] or (f.up.shape[0], f.down.shape[1]) != want:
            raise ValueError(f"the LoRA's {name} is {tuple(f.up.shape)} x {tuple(f.down.shape)}"
                             f"; this model's weight there is {want}")  # fmt: skip
    for name, f in lora.items():
        w = modules[name].weight
        delta = (strength * f.scale) * (f.up.to(w.device) @ f.down.to(w.device))
        w.copy_((w.float() + delta).to(w.dtype))
    for m in model.modules():  # fused q/k/v copies are stale now
        if "qkv_weight" in getattr(m, "_buffers", {}):
            m.fuse_projections()
    return len(lora)


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:STRENGTH`` (the CLI's ``--lora``) -> (path, strength)."""
    path, sep, strength = text.rpartition(":")
    if not sep or not path or "/" in strength or "\\" in strength:
        return text, 1.0
    try:
        value = float(strength)
    except ValueError:
        raise ValueError(f"--lora {text!r}: the strength after ':' must be a number (a file "
                         "whose name holds ':' is given as PATH:1)") from None  # fmt: skip
    if not math.isfinite(value):
        raise ValueError(f"--lora {text!r}: the strength must be a finite number")
    return path, value
