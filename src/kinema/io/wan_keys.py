"""Key and config maps between kinema's DiT and the other Wan 2.1 layouts.

kinema's parameter names equal diffusers' ``WanTransformer3DModel`` names, so a diffusers
folder loads as it is. The original Wan release (``diffusion_pytorch_model*.safetensors`` of
Wan-AI/Wan2.1-T2V-*) uses other names; :func:`original_to_kinema` and :func:`kinema_to_original`
convert between the two, one regular expression per rule.
"""

from __future__ import annotations

import re
from typing import Any

from kinema.configs import DiTConfig, from_dict

# Top-level prefixes and block-internal prefixes: original name -> kinema (= diffusers) name.
_TOP = {
    "time_embedding.0.": "condition_embedder.time_embedder.linear_1.",
    "time_embedding.2.": "condition_embedder.time_embedder.linear_2.",
    "text_embedding.0.": "condition_embedder.text_embedder.linear_1.",
    "text_embedding.2.": "condition_embedder.text_embedder.linear_2.",
    "time_projection.1.": "condition_embedder.time_proj.",
    "img_emb.proj.0.": "condition_embedder.image_embedder.norm1.",
    "img_emb.proj.1.": "condition_embedder.image_embedder.ff.net.0.proj.",
    "img_emb.proj.3.": "condition_embedder.image_embedder.ff.net.2.",
    "img_emb.proj.4.": "condition_embedder.image_embedder.norm2.",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
    "head.head.": "proj_out.",
    "head.modulation": "scale_shift_table",
}
_BLOCK = {
    "self_attn.q.": "attn1.to_q.",
    "self_attn.k.": "attn1.to_k.",
    "self_attn.v.": "attn1.to_v.",
    "self_attn.o.": "attn1.to_out.0.",
    "self_attn.norm_q.": "attn1.norm_q.",
    "self_attn.norm_k.": "attn1.norm_k.",
    "cross_attn.q.": "attn2.to_q.",
    "cross_attn.k.": "attn2.to_k.",
    "cross_attn.v.": "attn2.to_v.",
    "cross_attn.o.": "attn2.to_out.0.",
    "cross_attn.norm_q.": "attn2.norm_q.",
    "cross_attn.norm_k.": "attn2.norm_k.",
    "cross_attn.k_img.": "attn2.add_k_proj.",
    "cross_attn.v_img.": "attn2.add_v_proj.",
    "cross_attn.norm_k_img.": "attn2.norm_added_k.",
    "norm3.": "norm2.",  # the original's norm3 is the cross-attention norm
    "ffn.0.": "ffn.net.0.proj.",
    "ffn.2.": "ffn.net.2.",
    "modulation": "scale_shift_table",
}
_BLOCK_KEY = re.compile(r"^(blocks\.\d+\.)(.*)$")


def _rename(key: str, top: dict[str, str], block: dict[str, str]) -> str:
    """Rename one key by the longest matching prefix (at top level or inside a block)."""
    m = _BLOCK_KEY.match(key)
    head, rest, table = (m.group(1), m.group(2), block) if m else ("", key, top)
    for old in sorted(table, key=len, reverse=True):
        if rest.startswith(old):
            return head + table[old] + rest[len(old) :]
    return key


def original_to_kinema(state: dict[str, Any]) -> dict[str, Any]:
    """Rename an original Wan 2.1 transformer state dict to kinema (= diffusers) names."""
    return {_rename(k, _TOP, _BLOCK): v for k, v in state.items()}


def kinema_to_original(state: dict[str, Any]) -> dict[str, Any]:
    """Rename a kinema transformer state dict to the original Wan 2.1 names."""
    top = {v: k for k, v in _TOP.items()}
    block = {v: k for k, v in _BLOCK.items()}
    return {_rename(k, top, block): v for k, v in state.items()}


def is_original_layout(keys: list[str] | set[str]) -> bool:
    """Whether transformer keys use the original Wan names (``blocks.0.self_attn.q.weight``)."""
    return any(".self_attn." in k or k.startswith("head.") for k in keys)


_DIFFUSERS_CONFIG = {
    "patch_size": "patch_size",
    "num_attention_heads": "num_heads",
    "attention_head_dim": "head_dim",
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "text_dim": "text_dim",
    "freq_dim": "freq_dim",
    "ffn_dim": "ffn_dim",
    "num_layers": "num_layers",
    "cross_attn_norm": "cross_attn_norm",
    "eps": "eps",
    "image_dim": "image_dim",
    "added_kv_proj_dim": "added_kv_proj_dim",
    "rope_max_seq_len": "rope_max_seq_len",
    "pos_embed_seq_len": "pos_embed_seq_len",
}
_IGNORED = {"window_size"}


def dit_config_from_diffusers(d: dict[str, Any]) -> DiTConfig:
    """A DiTConfig from a diffusers ``transformer/config.json`` dict."""
    unknown = sorted(set(d) - set(_DIFFUSERS_CONFIG) - _IGNORED - {"qk_norm"})
    unknown = [k for k in unknown if not k.startswith("_")]  # diffusers' own metadata
    if unknown:
        raise ValueError(f"unsupported WanTransformer3DModel config key(s): {unknown}")
    kw: dict[str, Any] = {_DIFFUSERS_CONFIG[k]: v for k, v in d.items() if k in _DIFFUSERS_CONFIG}
    kw.setdefault("patch_size", (1, 2, 2))
    if kw.get("out_channels") is None:
        kw["out_channels"] = kw.get("in_channels", 16)
    qk = d.get("qk_norm", "rms_norm_across_heads")
    if qk not in ("rms_norm_across_heads", None):
        raise ValueError(f"qk_norm={qk!r} is not supported; valid: 'rms_norm_across_heads' or null")
    return from_dict(DiTConfig, {**kw, "qk_norm": qk is not None})  # types checked by name


def dit_config_from_original(d: dict[str, Any]) -> DiTConfig:
    """A DiTConfig from an original Wan ``config.json`` (dim, num_heads, ffn_dim, ...)."""
    heads = int(d["num_heads"])
    return DiTConfig(
        patch_size=tuple(d.get("patch_size", (1, 2, 2))),
        num_heads=heads,
        head_dim=int(d["dim"]) // heads,
        in_channels=int(d.get("in_dim", 16)),
        out_channels=int(d.get("out_dim", 16)),
        text_dim=int(d.get("text_dim", 4096)),
        freq_dim=int(d.get("freq_dim", 256)),
        ffn_dim=int(d["ffn_dim"]),
        num_layers=int(d["num_layers"]),
        cross_attn_norm=bool(d.get("cross_attn_norm", True)),
        qk_norm=bool(d.get("qk_norm", True)),
        eps=float(d.get("eps", 1e-6)),
        image_dim=1280 if d.get("model_type") in ("i2v", "flf2v") else None,
        added_kv_proj_dim=int(d["dim"]) if d.get("model_type") in ("i2v", "flf2v") else None,
        pos_embed_seq_len=514 if d.get("model_type") == "flf2v" else None,
    )
