"""Key map between the original Wan umT5 encoder file and ``transformers.UMT5EncoderModel``.

The original Wan 2.1 release ships the umT5-XXL encoder as ``models_t5_umt5-xxl-enc-bf16.pth``,
a state dict of Wan's own ``T5Encoder`` (``wan/modules/t5.py``, ``shared_pos=False``: every
block has its own relative position table). Per block ``N`` it holds ::

    blocks.N.norm1.weight                    RMS norm before self-attention
    blocks.N.attn.{q,k,v,o}.weight           attention projections (no bias, no 1/sqrt(d) scale)
    blocks.N.pos_embedding.embedding.weight  relative position buckets -> per-head bias
    blocks.N.norm2.weight                    RMS norm before the feed-forward
    blocks.N.ffn.gate.0.weight               the GELU(tanh) branch: fc2(fc1(x) * gelu(gate(x)))
    blocks.N.ffn.fc1.weight                  the linear branch
    blocks.N.ffn.fc2.weight                  the output projection

plus ``token_embedding.weight`` and the final ``norm.weight``. transformers names the same
tensors ``encoder.block.N.layer.{0,1}...``; its gated feed-forward computes
``wo(gelu(wi_0(x)) * wi_1(x))``, so ``gate.0 -> wi_0``, ``fc1 -> wi_1``, ``fc2 -> wo``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

# Block-internal names: original -> transformers (after "blocks.N." / "encoder.block.N.").
_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_TOP = {"token_embedding.weight": "shared.weight", "norm.weight": "encoder.final_layer_norm.weight"}
_TIED = "encoder.embed_tokens.weight"  # transformers' second name for shared.weight
_ORIGINAL_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_TRANSFORMERS_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")


def _rename(
    key: str, pattern: re.Pattern[str], block: dict[str, str], top: dict[str, str], fmt: str
) -> tuple[str, int | None]:
    """New name of ``key`` and its block index (None at top level); ValueError if unknown."""
    m = pattern.match(key)
    if m and m.group(2) in block:
        return fmt.format(int(m.group(1)), block[m.group(2)]), int(m.group(1))
    if not m and key in top:
        return top[key], None
    raise ValueError(f"unknown umT5 encoder key {key!r}: not part of the Wan/transformers key map")


def _check_layer(key: str, index: int | None, num_layers: int) -> None:
    if index is not None and not 0 <= index < num_layers:
        raise ValueError(f"key {key!r} names block {index}, expected 0 <= block < {num_layers}")


def original_to_transformers(
    state: dict[str, torch.Tensor], num_layers: int
) -> dict[str, torch.Tensor]:
    """Rename an original Wan ``T5Encoder`` state dict to ``UMT5EncoderModel`` names.

    The token embedding appears twice in the result (``shared.weight`` and the tied
    ``encoder.embed_tokens.weight``), as the same tensor, so it loads strictly.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new, index = _rename(key, _ORIGINAL_BLOCK, _BLOCK, _TOP, "encoder.block.{}.{}")
        _check_layer(key, index, num_layers)
        out[new] = value
    if "shared.weight" in out:
        out[_TIED] = out["shared.weight"]
    return out


def transformers_to_original(
    state: dict[str, torch.Tensor], num_layers: int
) -> dict[str, torch.Tensor]:
    """Rename a ``UMT5EncoderModel`` state dict to original Wan ``T5Encoder`` names (inverse)."""
    inverse_block = {v: k for k, v in _BLOCK.items()}
    inverse_top = {v: k for k, v in _TOP.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == _TIED:
            if "shared.weight" not in state:
                out["token_embedding.weight"] = value
            continue
        new, index = _rename(key, _TRANSFORMERS_BLOCK, inverse_block, inverse_top, "blocks.{}.{}")
        _check_layer(key, index, num_layers)
        out[new] = value
    return out


def count_layers(state: dict[str, torch.Tensor]) -> int:
    """Number of encoder blocks in an original Wan state dict (1 + the largest block index)."""
    indices = [int(m.group(1)) for k in state if (m := _ORIGINAL_BLOCK.match(k))]
    if not indices:
        raise ValueError("no 'blocks.N.*' keys: not an original Wan umT5 encoder state dict")
    return max(indices) + 1


def config_from_original(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``UMT5Config`` keyword arguments read off the tensor shapes of an original state dict.

    umT5-XXL gives vocab 256384, d_model 4096, 64 heads x 64, d_ff 10240, 24 layers, 32 buckets.
    """
    vocab, d_model = state["token_embedding.weight"].shape
    buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
    return {
        "vocab_size": int(vocab),
        "d_model": int(d_model),
        "num_heads": int(heads),
        "d_kv": int(state["blocks.0.attn.q.weight"].shape[0]) // int(heads),
        "d_ff": int(state["blocks.0.ffn.fc1.weight"].shape[0]),
        "num_layers": count_layers(state),
        "relative_attention_num_buckets": int(buckets),
        "relative_attention_max_distance": 128,  # Wan's T5RelativeEmbedding max_dist
        "feed_forward_proj": "gated-gelu",  # GELU(tanh) gate, as Wan's GELU module
        "layer_norm_epsilon": 1e-6,
    }
