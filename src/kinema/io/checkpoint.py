"""Checkpoints: kinema folders, diffusers folders and original Wan files.

A **component folder** holds one model: kinema's (``config.json`` with ``"_class"`` plus
``model.safetensors``) or diffusers' (``config.json`` with ``"_class_name"`` plus
``diffusion_pytorch_model.safetensors``, possibly sharded with an ``.index.json``).

Weights are read tensor by tensor straight onto the target device and dtype and assigned to a
model built on the ``meta`` device, so no second full copy exists in memory. Every failure
(missing, truncated or mismatched file) is a :class:`CheckpointError` naming the file or key.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from kinema.configs import save_json
from kinema.io.paths import COMPONENT_ENTRIES, check_export_folder, usual_modes

M = TypeVar("M", bound=nn.Module)
T = TypeVar("T")

WEIGHT_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


class CheckpointError(ValueError):
    """A checkpoint file or key is missing, unreadable or does not fit the model."""


# ---------------------------------------------------------------------------------------------
# Reading tensors
# ---------------------------------------------------------------------------------------------


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file``, whose I/O failures (a full disk) are raised as the
    OSError they are, so that they end a command as one line like every other write."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(path)) from None


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a component folder (resolving a shard index if present)."""
    folder = Path(folder)
    for name in WEIGHT_NAMES:
        index = folder / f"{name}.index.json"
        if index.exists():
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map (tensor name -> shard file)")
            shards = sorted(set(map(str, weight_map.values())))
            files = [folder / s for s in shards]
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"shard {f} listed in {index} is missing")
            return files
        if (folder / name).exists():
            return [folder / name]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise CheckpointError(f"no *.safetensors weights in {folder}")
    return found


def read_safetensors(
    files: Iterable[Path],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    keep_fp32: Callable[[str], bool] = lambda key: False,
) -> dict[str, torch.Tensor]:
    """Read tensors one by one onto ``device``, cast floating ones to ``dtype``."""
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    state[key] = _cast(f.get_tensor(key), dtype, keep_fp32(key))
        except (OSError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"cannot read {path}: {err}") from err
        except Exception as err:  # safetensors raises its own SafetensorError
            raise CheckpointError(
                f"cannot read {path} (truncated or not safetensors): {err}"
            ) from err
    return state


def read_torch_file(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Read a ``.pth`` state dict (original Wan VAE / umT5 files) memory-mapped, weights only."""
    if not path.exists():
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    for wrapper in ("state_dict", "model", "module"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}  # not "epoch": 3


def _cast(t: torch.Tensor, dtype: torch.dtype | None, keep_fp32: bool) -> torch.Tensor:
    if dtype is None or not t.is_floating_point():
        return t
    return t.float() if keep_fp32 else t.to(dtype)


# ---------------------------------------------------------------------------------------------
# Building models without a second copy
# ---------------------------------------------------------------------------------------------


class _SkipFills(TorchFunctionMode):
    """Random and constant fills become no-ops (this thread only): weights on the meta device
    hold no values to fill, and a meta ``normal_`` alone (an embedding's init) costs a lazy
    import of torch's compiler stack, 1.5-2 s of every model load."""

    FILLS = frozenset(
        [getattr(torch.nn.init, name) for name in ("normal_", "uniform_", "trunc_normal_",
         "constant_", "ones_", "zeros_", "kaiming_uniform_", "kaiming_normal_",
         "xavier_uniform_", "xavier_normal_")]
        + [torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.fill_, torch.Tensor.zero_]
    )  # fmt: skip

    # Random factories become torch.empty: a meta randn (a modulation table's init) imports
    # torch's symbolic shapes and sympy, half a second of every model load.
    FACTORIES = {torch.randn: torch.empty, torch.rand: torch.empty}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in self.FILLS:  # nn.init passes its tensor by name, Tensor methods as self
            return args[0] if args else kwargs["tensor"]
        if func in self.FACTORIES:
            kwargs.pop("generator", None)
            return self.FACTORIES[func](*args, **kwargs)
        return func(*args, **kwargs)


def build_empty(factory: Callable[[], M]) -> M:
    """Construct a module on the meta device (no memory for weights, no init)."""
    with torch.device("meta"), _SkipFills():
        return factory()


def assign_state(model: M, state: dict[str, torch.Tensor], source: str | Path) -> M:
    """Assign ``state`` to a (meta) model strictly; errors name the keys and ``source``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit {type(model).__name__}: "
            f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for key, want in expected.items():
        if tuple(state[key].shape) != tuple(want.shape):
            raise CheckpointError(
                f"{source}: key {key} has shape {tuple(state[key].shape)}, "
                f"the model expects {tuple(want.shape)}"
            )
        if want.is_floating_point() and not state[key].is_floating_point():
            raise CheckpointError(
                f"{source}: key {key} is {str(state[key].dtype).removeprefix('torch.')}; kinema "
                "reads float weights (fp32, bf16, fp16 or fp8), not quantised integer ones"
            )
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{source}: no weights for {leftover[:5]}")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def save_component(module: nn.Module, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``folder/config.json`` (the module's config dataclass) and ``model.safetensors``.

    Written into a temporary folder and renamed into place, so a crash leaves no half folder.
    """
    folder = check_export_folder(folder, COMPONENT_ENTRIES, "component folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    dit = type(module).__name__ == "VideoDiT"  # its norms and modulation stay float32
    try:
        state = {k: _cast(v.detach(), dtype, dit and dit_keeps_fp32(k)).contiguous().cpu()
                 for k, v in module.state_dict().items()}  # fmt: skip
        save_tensors(state, tmp / "model.safetensors")
        save_json(module.config, tmp / "config.json", _class=type(module).__name__)
        usual_modes(tmp)
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing an existing ``dst`` as atomically as possible."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(dst)


def read_config_json(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a component folder, with a clear error when absent or broken."""
    path = Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"missing {path}")
    return read_json_object(path)


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file of a model folder that holds an object; CheckpointError naming the file
    when it is not valid JSON (or UTF-8) or holds something else."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def config_in(cls: type[T], data: dict[str, Any], path: str | Path) -> T:
    """``from_dict(cls, data)`` with its errors (a wrong type) naming the file ``path``."""
    from kinema.configs import from_dict

    return read_config(lambda d: from_dict(cls, d), data, path)


def read_config(parse: Callable[[dict[str, Any]], T], raw: dict[str, Any], path: Any) -> T:
    """``parse(raw)`` (a config file's dict -> kinema's config), its errors (a missing key, a
    value of the wrong type) naming the file ``path``."""
    try:
        return parse(raw)
    except KeyError as err:
        raise CheckpointError(f"{path}: missing {err}") from None
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from None


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------

# Parameters kept in float32 when a DiT is loaded in half precision (as diffusers and Wan do).
_DIT_FP32 = ("time_embedder", "scale_shift_table", ".norm1.", ".norm2.", ".norm3.")


def dit_keeps_fp32(key: str) -> bool:
    """Whether a DiT parameter stays float32 in half precision (loaded or saved)."""
    return any(p in key for p in _DIT_FP32)


def load_dit(
    folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
):
    """A :class:`~kinema.models.dit.VideoDiT` from a kinema, diffusers or original Wan folder."""
    from kinema.configs import DiTConfig
    from kinema.io.wan_keys import (
        dit_config_from_diffusers,
        dit_config_from_original,
        is_original_layout,
        original_to_kinema,
    )
    from kinema.models.dit import VideoDiT

    raw = read_config_json(folder)
    kind = raw.get("_class") or raw.get("_class_name")
    plain = {k: v for k, v in raw.items() if not k.startswith("_")}
    if kind == "VideoDiT":
        config = config_in(DiTConfig, plain, Path(folder) / "config.json")
    elif kind == "WanTransformer3DModel":
        config = read_config(dit_config_from_diffusers, raw, Path(folder) / "config.json")
    elif "dim" in raw and "num_heads" in raw:
        config = read_config(dit_config_from_original, raw, Path(folder) / "config.json")
    else:
        raise CheckpointError(f"{folder}/config.json is not a VideoDiT, diffusers or Wan config")
    state = read_safetensors(weight_files(folder), device, dtype, keep_fp32=dit_keeps_fp32)
    if is_original_layout(set(state)):
        state = original_to_kinema(state)
    return assign_state(build_empty(lambda: VideoDiT(config)), state, folder)


def load_vae(
    source: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
):
    """A :class:`~kinema.models.vae.CausalVAE` from a kinema or diffusers folder, or the
    original ``Wan2.1_VAE.pth`` file."""
    from kinema.configs import WAN21_VAE, VAEConfig
    from kinema.io.wan_vae_keys import original_to_diffusers
    from kinema.models.vae import CausalVAE, config_from_diffusers

    source = Path(source)
    if source.suffix == ".pth":
        raw_state = read_torch_file(source)
        state = {k: _cast(v, dtype, False).to(device) for k, v in raw_state.items()}
        state = original_to_diffusers(state)
        config = vae_config_from_state(state, WAN21_VAE)
    else:
        raw = read_config_json(source)
        kind = raw.get("_class") or raw.get("_class_name")
        if kind == "CausalVAE":
            plain = {k: v for k, v in raw.items() if not k.startswith("_")}
            config = config_in(VAEConfig, plain, source / "config.json")
        elif kind == "AutoencoderKLWan":
            config = read_config(config_from_diffusers, raw, source / "config.json")
        else:
            raise CheckpointError(f"{source}/config.json is not a CausalVAE or AutoencoderKLWan")
        state = read_safetensors(weight_files(source), device, dtype)
    return assign_state(build_empty(lambda: CausalVAE(config)), state, source)


def vae_config_from_state(state: dict[str, torch.Tensor], base: Any) -> Any:
    """The VAEConfig of a (diffusers-named) VAE state dict, read off its shapes; latent
    statistics come from ``base`` (the Wan 2.1 values for an original ``.pth``)."""
    import dataclasses
    import re

    try:
        base_dim = state["encoder.conv_in.weight"].shape[0]
        z_dim = state["post_quant_conv.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"not a Wan VAE state dict: no {err}") from err
    blocks = sorted(
        {int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))}
    )
    widths, temporal = [], []
    for b in blocks:
        prefix = f"encoder.down_blocks.{b}."
        if prefix + "conv2.weight" in state:
            widths.append(state[prefix + "conv2.weight"].shape[0] // base_dim)
        else:
            temporal.append(prefix + "time_conv.weight" in state)
    stages = len(temporal) + 1
    per_stage = len(widths) // stages
    mults = tuple(widths[per_stage * i + per_stage - 1] for i in range(stages))
    keep = base.z_dim == z_dim
    return dataclasses.replace(
        base, base_dim=base_dim, z_dim=z_dim, dim_mult=mults, num_res_blocks=per_stage,
        temporal_downsample=tuple(temporal),
        latents_mean=base.latents_mean if keep else (0.0,) * z_dim,
        latents_std=base.latents_std if keep else (1.0,) * z_dim,
    )  # fmt: skip


def save_model_folder(
    folder: str | Path,
    *,
    dit: nn.Module,
    vae: nn.Module,
    text_encoder: dict[str, Any],
    sampling: Any,
    name: str,
    dtype: torch.dtype | None = None,
    extra: Callable[[Path], None] | None = None,
    vocabulary: Sequence[str] | None = None,
    vae_dtype: torch.dtype | None | str = "same",
) -> Path:
    """Write a whole kinema model: ``kinema.json`` + ``transformer/`` + ``vae/``, atomically;
    the weights in ``dtype`` (None: as they are), the VAE's in ``vae_dtype`` ("same": ``dtype``).

    ``extra(tmp_folder)`` may write more files (e.g. a text encoder) before the rename;
    ``vocabulary``: the words of the training captions, for models trained on a closed world
    (the pipeline warns about prompt words outside it)."""
    import dataclasses

    folder = check_export_folder(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_component(dit, tmp / "transformer", dtype)
        save_component(vae, tmp / "vae", dtype if vae_dtype == "same" else vae_dtype)
        meta = {"format": "kinema", "name": name, "text_encoder": text_encoder,
                "sampling": dataclasses.asdict(sampling)}  # fmt: skip
        if vocabulary:
            meta["vocabulary"] = sorted(vocabulary)
        (tmp / "kinema.json").write_text(json.dumps(meta, indent=2) + "\n")
        if extra is not None:
            extra(tmp)
        usual_modes(tmp)
        replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
