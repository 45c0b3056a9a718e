"""Training recipes as frozen dataclasses, read from YAML or JSON.

:class:`TrainConfig` trains the DiT (from scratch or ``init_from`` any checkpoint kinema can
load), :class:`VAETrainConfig` the causal VAE. Both share the optimiser/checkpoint fields of
:class:`OptimFields`. Every field is documented once, here. :func:`load_train_config` refuses
unknown keys and wrong types with a ``ValueError`` that names the key path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kinema.configs import DiTConfig, SamplingDefaults, VAEConfig, from_dict
from kinema.lora import LoRAConfig

T = TypeVar("T")

PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine")
DATA_KINDS = ("synthetic", "folder")
PARALLEL = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class DataConfig:
    """Where training clips come from: the built-in synthetic world or a folder of videos."""

    kind: str = "synthetic"  # "synthetic" (kinema.data.synthetic) or "folder" (VideoFolder)
    root: str | None = None  # folder of videos + captions (kind "folder")
    seed: int = 0  # seed of the synthetic world (clip i is a function of (seed, i)), or of
    #   which cut of each video a folder gives
    num_clips: int = 4096  # clips used (synthetic); a folder uses min(this, its size)
    width: int = 128  # clip width in pixels
    height: int = 128  # clip height in pixels
    frames: int = 33  # clip length in frames (4k + 1)
    fps: int = 16  # frames per second the clips are sampled at
    object_scale: float = 1.0  # synthetic: multiplies every object's radius (0.5 to 1.6)
    motion_weights: dict[str, float] | None = None  # synthetic: relative frequency of motions
    #   (e.g. {up-left: 3}; unnamed ones weigh 1), to drill motions a model gets wrong
    balance: str = "triples"  # synthetic: "triples" (every allowed triple equally often) or
    #   "colour-motion" (every (colour, motion) pair equally often; see sample_clip_spec)
    buckets: tuple[tuple[int, int], ...] = ()  # folder: (width, height) sizes; each video is
    #   cropped to the one nearest its aspect ratio and a batch holds one size; () crops every
    #   video to width x height, which must be one of them (samples and the export use it)

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ValueError(f"data.kind {self.kind!r} is not one of {DATA_KINDS}")
        if self.kind == "folder" and not self.root:
            raise ValueError("data.root is required when data.kind is 'folder'")
        if self.frames < 1 or (self.frames - 1) % 4:
            raise ValueError(f"data.frames {self.frames} must be 4k+1 (1, 5, 9, ..., 33, ...)")
        if self.num_clips < 1:
            raise ValueError(f"data.num_clips {self.num_clips} must be >= 1")
        if self.fps < 1:
            raise ValueError(f"data.fps {self.fps} must be >= 1")
        if self.width < 1 or self.height < 1:
            raise ValueError(f"data.width / height {self.width}x{self.height} must be >= 1")
        if not 0.5 <= self.object_scale <= 1.6:
            raise ValueError(f"data.object_scale {self.object_scale}; valid: 0.5 to 1.6")
        from kinema.data.synthetic import BALANCES, check_motion_weights

        if self.balance not in BALANCES:
            raise ValueError(f"data.balance {self.balance!r}; valid: {', '.join(BALANCES)}")
        if self.kind == "folder" and (self.motion_weights is not None or self.object_scale != 1):
            raise ValueError("data.motion_weights and object_scale shape the synthetic world; "
                             "a folder's clips are what its videos show")  # fmt: skip
        if self.motion_weights is not None:
            try:
                check_motion_weights(self.motion_weights)
            except ValueError as err:
                raise ValueError(f"data.motion_weights: {err}") from None
        self.check_buckets()

    def check_buckets(self) -> None:
        if not self.buckets:
            return
        if self.kind != "folder":
            raise ValueError("data.buckets is for a folder of videos (data.kind 'folder'); "
                             "synthetic clips are all width x height")  # fmt: skip
        sizes = self.sizes
        if any(len(b) != 2 or min(b) < 1 for b in sizes):
            raise ValueError(f"data.buckets {self.buckets}: each is [width, height] > 0")
        aspects = [Fraction(w, h) for w, h in sizes]
        if len(set(aspects)) < len(aspects):
            raise ValueError(
                f"data.buckets {[list(b) for b in sizes]}: two share an aspect ratio, and a "
                "video goes to the first; give one size per ratio"
            )
        if (self.width, self.height) not in sizes:
            raise ValueError(
                f"data.width x data.height {self.width}x{self.height} must be one of data.buckets "
                f"{[list(b) for b in sizes]} (the size of samples and of the export's default)"
            )

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """Every clip size the data produces: the buckets, or (width, height)."""
        return [tuple(b) for b in self.buckets] or [(self.width, self.height)]  # type: ignore[misc]


@dataclass(frozen=True)
class OptimFields:
    """Optimiser, schedule, precision and bookkeeping shared by both training loops."""

    out_dir: str = "runs/train"  # checkpoints, logs and samples go here; resumed if present
    batch_size: int = 8  # clips per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 1e-4  # peak learning rate (AdamW)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    weight_decay: float = 0.01  # AdamW decoupled weight decay (matrices only)
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    lr_schedule: str = "constant"  # after warm-up: "constant" or "cosine" (to min_lr_ratio*lr)
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    max_steps: int = 1000  # optimiser steps in total
    grad_clip: float = 1.0  # global gradient-norm clip (0 disables)
    ema_decay: float = 0.999  # EMA of the weights (0 disables: EMA = weights)
    ema_warmup: bool = True  # decay ramps as min(decay, (1+n)/(10+n)) over the first updates
    precision: str = "fp32"  # "fp32", or "bf16" autocast (CUDA, or a CPU with native bf16)
    gradient_checkpointing: bool = False  # recompute activations in backward (CUDA only)
    checkpoint_every: int = 200  # steps between checkpoints (also saved on Ctrl-C / SIGTERM)
    keep_checkpoints: int = 2  # most recent checkpoints kept
    log_every: int = 1  # steps between CSV log rows
    seed: int = 0  # seeds weight init and every step's randomness
    num_workers: int = 0  # DataLoader workers for on-the-fly clip decoding
    device: str | None = None  # "cpu", "cuda", ...; None picks the best available
    progress: bool = True  # show a tqdm progress bar

    def check_optim(self) -> None:
        """Raise ValueError naming the first bad optimiser field."""
        positive = ("batch_size", "grad_accum", "max_steps", "checkpoint_every", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} {getattr(self, name)} must be >= 1")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr {self.lr} must be a finite number > 0")
        at_least_zero = {"grad_clip": "0 disables clipping", "weight_decay": "0: none",
                         "warmup_steps": "0: none",
                         "num_workers": "0: decode in this process"}  # fmt: skip
        for name, zero in at_least_zero.items():
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} {value} must be >= 0 ({zero})")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio {self.min_lr_ratio} must be in [0, 1]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas {list(self.betas)} must be two numbers in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay {self.ema_decay} must be in [0, 1)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} is not one of {LR_SCHEDULES}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints {self.keep_checkpoints} must be >= 1")


@dataclass(frozen=True)
class TrainConfig(OptimFields):
    """Flow-matching training of the video DiT on VAE latents of clips."""

    name: str = "kinema-custom"  # model name written into the exported kinema.json
    model: DiTConfig | None = None  # architecture to train from scratch
    init_from: str | None = None  # or: a model/transformer folder to fine-tune (kinema, diffusers)
    vae: str | None = None  # VAE component or model folder (None: the init_from model's VAE)
    export_vae: str | None = None  # VAE shipped in the export (None: vae), e.g. a decoder-only
    #                                fine-tune of it (VAETrainConfig.freeze_encoder: same latents)
    text_encoder: str = "minilm"  # text encoder kind (kinema.models.text.load_text_encoder)
    text_encoder_path: str | None = None  # its weights, for kinds that need a path
    text_max_length: int = 32  # tokens per caption
    data: DataConfig = field(default_factory=DataConfig)
    precompute: bool = True  # encode clips once into out_dir/cache, then train from the cache
    extra_caches: tuple[str, ...] = ()  # latent caches of earlier runs (their out_dir/cache),
    # mixed in with this run's clips: more distinct clips without encoding them again; each
    # must come from the same VAE, latent statistics and text encoder (needs precompute)
    caption_dropout: float = 0.1  # probability a caption is replaced by "" (for CFG)
    timed_captions: float = 0.0  # chance a synthetic clip whose motion changes is captioned per
    # frame instead (before / after the change), which teaches timed prompts; needs precompute
    logit_mean: float = 0.0  # logit-normal timestep sampling: mean of the normal
    logit_std: float = 1.0  # ... and its standard deviation
    shift: float = 3.0  # sigma shift: s -> shift*s / (1 + (shift-1)*s)
    cond_probs: tuple[float, float, float] = (1.0, 0.0, 0.0)  # P(none, first frame, first k)
    cond_max_frames: int = 3  # k of "first k latent frames" is uniform in [2, this]
    sample_every: int = 0  # steps between sample videos in out_dir/samples (0: never)
    sample_prompts: tuple[str, ...] = ()  # prompts of the sample videos
    sample_steps: int = 12  # Euler steps of a sample video
    sample_guidance: float = 4.0  # classifier-free guidance of a sample video
    sampling: SamplingDefaults | None = None  # defaults written on export (None: from data)
    export_dir: str | None = None  # where the final model folder goes (None: out_dir/model)
    parallel: str = "none"  # under torchrun: "ddp" or "fsdp" (FSDP2); "none" means ddp there
    lora: LoRAConfig | None = None  # train only a LoRA on init_from's frozen DiT (kinema.lora);
    # the export is then export_dir (or OUT/model) / lora.safetensors, for ``--lora``

    def __post_init__(self) -> None:
        self.check_optim()
        if (self.model is None) == (self.init_from is None):
            raise ValueError("give exactly one of model (train from scratch) or init_from")
        if self.lora is not None and self.init_from is None:
            raise ValueError("lora needs init_from (the model whose DiT the LoRA adapts)")
        if self.lora is not None and self.parallel == "fsdp":
            raise ValueError("lora trains with parallel: ddp (or none), not fsdp")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel {self.parallel!r} is not one of {PARALLEL}")
        if self.vae is None and self.init_from is None:
            raise ValueError("vae is required when training from scratch (model given)")
        if len(self.cond_probs) != 3 or abs(sum(self.cond_probs) - 1) > 1e-6:
            raise ValueError(f"cond_probs {self.cond_probs} must be 3 values summing to 1")
        if min(self.cond_probs) < 0:
            raise ValueError(f"cond_probs {self.cond_probs} must be >= 0")
        if not 0 <= self.caption_dropout <= 1:
            raise ValueError(f"caption_dropout {self.caption_dropout} must be in [0, 1]")
        if not 0 <= self.timed_captions <= 1:
            raise ValueError(f"timed_captions {self.timed_captions} must be in [0, 1]")
        if self.timed_captions and not (self.precompute and self.data.kind == "synthetic"):
            raise ValueError(
                "timed_captions needs synthetic data and precompute: true "
                "(the captions before / after a change come from the world)"
            )
        if self.extra_caches and not self.precompute:
            raise ValueError("extra_caches needs precompute: true (they are latent caches)")
        if self.shift <= 0 or self.logit_std <= 0:
            raise ValueError(f"shift {self.shift} and logit_std {self.logit_std} must be > 0")
        if self.cond_max_frames < 2:
            raise ValueError(f"cond_max_frames {self.cond_max_frames} must be >= 2")
        if self.text_max_length < 1:
            raise ValueError(f"text_max_length {self.text_max_length} must be >= 1")
        if self.sample_every and (self.sample_steps < 1 or self.sample_guidance < 0):
            raise ValueError(f"sample_steps {self.sample_steps} must be >= 1 and sample_guidance "
                             f"{self.sample_guidance} >= 0")  # fmt: skip
        if self.extra_caches and self.data.buckets:
            raise ValueError("extra_caches mix caches of one clip size; not with data.buckets")
        side = 8 * (self.model.patch_size[1] if self.model is not None else 2)  # VAE x patch
        for name in ("width", "height"):
            if getattr(self.data, name) % side:
                raise ValueError(
                    f"data.{name} {getattr(self.data, name)} must be a multiple of {side} (the "
                    "VAE's 8x and the DiT's patches)"
                )
        for w, h in self.data.buckets:  # width x height, checked above, is one of them
            if w % side or h % side:
                raise ValueError(f"data.buckets [{w}, {h}] must be multiples of {side} (the "
                                 "VAE's 8x and the DiT's patches)")  # fmt: skip
        if self.sampling is not None:
            check_sampling(self.sampling, side)


def check_sampling(s: SamplingDefaults, side: int) -> None:
    """The defaults a run exports must make a request its model can run."""
    if s.width % side or s.height % side or min(s.width, s.height) < side:
        raise ValueError(f"sampling.width / height {s.width}x{s.height} must be multiples of "
                         f"{side}")  # fmt: skip
    if s.frames < 1 or (s.frames - 1) % 4:
        raise ValueError(f"sampling.frames {s.frames} must be 4k+1 (1, 5, 9, ...)")
    from kinema.sampling import SAMPLERS

    if s.steps < 1 or s.fps < 1:
        raise ValueError(f"sampling.steps {s.steps} and fps {s.fps} must be >= 1")
    for name, value, low, valid in (("guidance", s.guidance, 0.0, ">= 0"),
                                    ("shift", s.shift, None, "> 0"),
                                    ("cache", s.cache, 0.0, ">= 0"),
                                    ("contrast", s.contrast, 0.0, ">= 0")):  # fmt: skip
        finite = math.isfinite(value)  # inf and nan were taken, and refused by generate
        if not finite or (value < low if low is not None else value <= 0):
            raise ValueError(f"sampling.{name} {value} must be {valid} (and finite)")
    if s.sampler not in SAMPLERS:
        raise ValueError(f"sampling.sampler {s.sampler!r}; valid: {', '.join(sorted(SAMPLERS))}")


def base_sampling(config: TrainConfig) -> SamplingDefaults:
    """What a run's export recommends where its ``sampling`` block is silent: the data's size,
    length and fps, and the rest from ``init_from`` (a fine-tune samples as its base does), or
    for a model trained from scratch 20 Euler steps at the run's sample guidance and shift."""
    from kinema.loading import folder_defaults

    d = config.data
    size = dict(width=d.width, height=d.height, frames=d.frames, fps=d.fps)
    base = folder_defaults(config.init_from) if config.init_from else None
    if base is not None:
        return dataclasses.replace(base, **size)
    return SamplingDefaults(**size, steps=20, guidance=config.sample_guidance,
                            shift=config.shift, sampler="euler")  # fmt: skip


@dataclass(frozen=True)
class VAETrainConfig(OptimFields):
    """Reconstruction training of the causal VAE on random crops of clips."""

    model: VAEConfig | None = None  # architecture to train from scratch
    init_from: str | None = None  # or: a VAE component/model folder to fine-tune
    data: DataConfig = field(default_factory=DataConfig)
    crop_size: int = 64  # square crop side in pixels (multiple of the spatial factor)
    crop_frames: int = 9  # crop length in frames (4k + 1)
    object_crop_prob: float = 0.0  # chance a crop is centred on a foreground (non-row-median) pixel
    l1_weight: float = 1.0  # weight of the L1 reconstruction loss
    mse_weight: float = 1.0  # weight of the MSE reconstruction loss
    kl_weight: float = 1e-6  # weight of the KL to N(0, 1), per latent element
    sample_posterior: bool = False  # decode a posterior sample (True) or its mean (False)
    freeze_encoder: bool = False  # decoder only: latents (and a DiT trained on them) stay valid
    stats_clips: int = 64  # full clips encoded for the per-channel latent mean/std
    export_dir: str | None = None  # where the final VAE folder goes (None: out_dir/vae)

    def __post_init__(self) -> None:
        self.check_optim()
        if (self.model is None) == (self.init_from is None):
            raise ValueError("give exactly one of model (train from scratch) or init_from")
        if self.crop_frames < 1 or (self.crop_frames - 1) % 4:
            raise ValueError(f"crop_frames {self.crop_frames} must be 4k+1 (1, 5, 9, ...)")
        if self.crop_frames > self.data.frames:
            raise ValueError(f"crop_frames {self.crop_frames} > data.frames {self.data.frames}")
        for w, h in self.data.sizes:
            if w % 8 or h % 8:
                raise ValueError(f"data size {w}x{h} (width, height or a bucket) must be "
                                 "multiples of 8, the VAE's spatial factor")  # fmt: skip
        side = min(min(size) for size in self.data.sizes)
        if not 8 <= self.crop_size <= side or self.crop_size % 8:
            raise ValueError(f"crop_size {self.crop_size} must be a multiple of 8 (the VAE's "
                             f"spatial factor) in [8, {side}]")  # fmt: skip
        if self.stats_clips < 1:
            raise ValueError(f"stats_clips {self.stats_clips} must be >= 1")
        if self.freeze_encoder and self.init_from is None:
            raise ValueError("freeze_encoder needs init_from (a trained VAE whose encoder to keep)")
        if not 0 <= self.object_crop_prob <= 1:
            raise ValueError(f"object_crop_prob {self.object_crop_prob} must be in [0, 1]")


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _nested_dataclass(annotation: Any) -> type | None:
    """The dataclass inside a field annotation (``X`` or ``X | None``), else None."""
    options = typing.get_args(annotation) or (annotation,)
    found = [o for o in options if dataclasses.is_dataclass(o)]
    return found[0] if found else None


# Keys whose values are paths: "~" in them is the user's home, as in a shell.
PATH_KEYS = frozenset(
    {"out_dir", "init_from", "vae", "export_vae", "export_dir", "text_encoder_path", "root",
     "extra_caches"}
)  # fmt: skip


def expand_home(value: Any) -> Any:
    """``~/x`` -> the home folder's ``x`` (in a string, or each string of a list)."""
    if isinstance(value, str):
        return os.path.expanduser(value)
    if isinstance(value, list | tuple):
        return [expand_home(v) for v in value]
    return value


def parse_config(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build ``cls`` from a dict, nested dataclasses included; errors name the key path. Path
    values (``PATH_KEYS``) may start with ``~``."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    built = {k: expand_home(v) if k in PATH_KEYS else v for k, v in data.items()}
    for key, value in data.items():
        sub = _nested_dataclass(hints[key]) if key in hints else None
        if sub is not None and isinstance(value, dict):
            built[key] = parse_config(sub, value, f"{where}.{key}")
    try:
        return from_dict(cls, built)
    except (TypeError, ValueError) as err:
        message = str(err) if str(err).startswith(where) else f"{where}: {err}"
        raise ValueError(message) from err


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last
    silently: a second ``batch_size:`` lower down overrode the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``) or JSON file as a dict."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"config file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"config file {path} is not a file (give a .yaml or .json file)")
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        text = path.read_text()
        data = json.loads(text) if kind == "JSON" else yaml.load(text, UniqueKeyLoader)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"config file {path} is not valid {kind}: {parse_error(err)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return data


def parse_error(err: Exception) -> str:
    """One line for a JSON, YAML or decoding error (YAML's own message spans lines)."""
    mark = getattr(err, "problem_mark", None)
    if isinstance(err, yaml.MarkedYAMLError) and mark is not None:
        return f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split())


def load_train_config(path: str | Path) -> TrainConfig:
    """A :class:`TrainConfig` from YAML or JSON. A ``sampling`` block sets only the defaults
    it names; the others are :func:`base_sampling`'s."""
    data = read_mapping(path)
    given = data.get("sampling")
    if isinstance(given, dict):  # filled in before it is checked
        base = base_sampling(parse_config(TrainConfig, {**data, "sampling": None}))
        data = {**data, "sampling": {**dataclasses.asdict(base), **given}}
    return parse_config(TrainConfig, data)


def load_vae_train_config(path: str | Path) -> VAETrainConfig:
    """A :class:`VAETrainConfig` from YAML or JSON."""
    return parse_config(VAETrainConfig, read_mapping(path))


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a training config (for out_dir/train_config.json)."""
    return dataclasses.asdict(config)
