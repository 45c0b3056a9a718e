"""Key maps between the original Wan 2.1 VAE (``Wan2.1_VAE.pth``) and diffusers' names.

kinema's :class:`~kinema.models.vae.CausalVAE` uses diffusers' ``AutoencoderKLWan`` names. The
original release names the same tensors differently (``encoder.conv1`` for ``encoder.conv_in``,
``residual.2`` for ``conv1``, ``middle.1`` for ``mid_block.attentions.0``, ...), and flattens the
decoder's stages into one ``decoder.upsamples.{k}`` list of ``num_res_blocks + 2`` entries per
stage (residual blocks, then the upsampler). The rules follow diffusers'
``convert_wan_vae_to_diffusers``, generalised to any ``num_res_blocks``.
"""

from __future__ import annotations

import re
from typing import Any

# Whole-prefix renames, original -> diffusers (matched longest first).
_PREFIX = {
    "conv1.": "quant_conv.",
    "conv2.": "post_quant_conv.",
}
for _part in ("encoder", "decoder"):
    _PREFIX.update(
        {
            f"{_part}.conv1.": f"{_part}.conv_in.",
            f"{_part}.head.0.": f"{_part}.norm_out.",
            f"{_part}.head.2.": f"{_part}.conv_out.",
            f"{_part}.middle.0.": f"{_part}.mid_block.resnets.0.",
            f"{_part}.middle.1.": f"{_part}.mid_block.attentions.0.",
            f"{_part}.middle.2.": f"{_part}.mid_block.resnets.1.",
        }
    )

# Inside a residual block, original -> diffusers.
_RESIDUAL = {
    "residual.0.": "norm1.",
    "residual.2.": "conv1.",
    "residual.3.": "norm2.",
    "residual.6.": "conv2.",
    "shortcut.": "conv_shortcut.",
}

_ORIG_DOWN = re.compile(r"^encoder\.downsamples\.(\d+)\.(.*)$")
_DIFF_DOWN = re.compile(r"^encoder\.down_blocks\.(\d+)\.(.*)$")
_ORIG_UP = re.compile(r"^decoder\.upsamples\.(\d+)\.(.*)$")
_DIFF_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsamplers\.0)\.(.*)$")
_DIFF_RESNET = re.compile(r"^decoder\.up_blocks\.\d+\.resnets\.(\d+)\.")
_ORIG_RESAMPLE = re.compile(r"^decoder\.upsamples\.(\d+)\.(?:resample|time_conv)\.")
_ORIG_ANY_UP = re.compile(r"^decoder\.upsamples\.(\d+)\.")


def _swap_prefix(key: str, table: dict[str, str]) -> tuple[str, str] | None:
    """Split ``key`` at the longest matching prefix of ``table``: (renamed prefix, rest)."""
    for old in sorted(table, key=len, reverse=True):
        if key.startswith(old):
            return table[old], key[len(old) :]
    return None


def _inner(rest: str, table: dict[str, str]) -> str:
    """Rename the residual-block part of a key's remainder (other remainders pass through)."""
    swapped = _swap_prefix(rest, table)
    return swapped[0] + swapped[1] if swapped else rest


def _stage_len_from_original(keys: list[str]) -> int:
    """Entries per decoder stage: the first upsampler's index + 1 (num_res_blocks + 2)."""
    resamplers = [int(m.group(1)) for k in keys if (m := _ORIG_RESAMPLE.match(k))]
    if resamplers:
        return min(resamplers) + 1
    blocks = [int(m.group(1)) for k in keys if (m := _ORIG_ANY_UP.match(k))]
    return max(blocks, default=0) + 2  # a single stage: all entries are residual blocks


def _stage_len_from_diffusers(keys: list[str]) -> int:
    """Entries per decoder stage: residual blocks per up block (num_res_blocks + 1) + 1."""
    resnets = [int(m.group(1)) for k in keys if (m := _DIFF_RESNET.match(k))]
    return max(resnets, default=0) + 2


def _original_key(key: str, stage_len: int) -> str:
    """One original key -> its diffusers name."""
    if m := _ORIG_DOWN.match(key):
        return f"encoder.down_blocks.{m.group(1)}.{_inner(m.group(2), _RESIDUAL)}"
    if m := _ORIG_UP.match(key):
        stage, pos = divmod(int(m.group(1)), stage_len)
        block = "upsamplers.0" if pos == stage_len - 1 else f"resnets.{pos}"
        return f"decoder.up_blocks.{stage}.{block}.{_inner(m.group(2), _RESIDUAL)}"
    swapped = _swap_prefix(key, _PREFIX)
    return swapped[0] + _inner(swapped[1], _RESIDUAL) if swapped else key


def _diffusers_key(key: str, stage_len: int) -> str:
    """One diffusers key -> its original name."""
    residual = {v: k for k, v in _RESIDUAL.items()}
    if m := _DIFF_DOWN.match(key):
        return f"encoder.downsamples.{m.group(1)}.{_inner(m.group(2), residual)}"
    if m := _DIFF_UP.match(key):
        pos = stage_len - 1 if m.group(2) is None else int(m.group(2))
        index = int(m.group(1)) * stage_len + pos
        return f"decoder.upsamples.{index}.{_inner(m.group(3), residual)}"
    swapped = _swap_prefix(key, {v: k for k, v in _PREFIX.items()})
    return swapped[0] + _inner(swapped[1], residual) if swapped else key


def original_to_diffusers(
    state: dict[str, Any], num_res_blocks: int | None = None
) -> dict[str, Any]:
    """Rename an original Wan 2.1 VAE state dict to diffusers (= kinema) names.

    ``num_res_blocks`` (2 for Wan 2.1) is read off the keys when not given.
    """
    keys = list(state)
    stage_len = num_res_blocks + 2 if num_res_blocks is not None else _stage_len_from_original(keys)
    return {_original_key(k, stage_len): v for k, v in state.items()}


def diffusers_to_original(
    state: dict[str, Any], num_res_blocks: int | None = None
) -> dict[str, Any]:
    """Rename a diffusers (= kinema) VAE state dict to the original Wan 2.1 names."""
    keys = list(state)
    stage_len = (
        num_res_blocks + 2 if num_res_blocks is not None else _stage_len_from_diffusers(keys)
    )
    return {_diffusers_key(k, stage_len): v for k, v in state.items()}


def is_original_layout(keys: list[str] | set[str]) -> bool:
    """Whether VAE keys use the original Wan names (``decoder.middle.0.residual.0.gamma``)."""
    return any(k.startswith(("encoder.middle.", "decoder.middle.", "conv1.")) for k in keys)


__all__ = ["original_to_diffusers", "diffusers_to_original", "is_original_layout"]
