"""kinema.train: flow-matching DiT training and causal-VAE training that resume exactly.

Entry points for the CLI: ``train_dit(load_train_config(path))`` (``kinema train``) and
``train_vae(load_vae_train_config(path))`` (``kinema train-vae``); ``export(out_dir, dest)``
writes a run's EMA weights as a kinema model folder.
"""

from kinema.train.config import (
    DataConfig,
    TrainConfig,
    VAETrainConfig,
    load_train_config,
    load_vae_train_config,
)
from kinema.train.ema import EMA
from kinema.train.loop import LatentCache, export, precompute, train_dit
from kinema.train.loss import (
    drop_captions,
    flow_matching_loss,
    sample_cond_mask,
    sample_timesteps,
)
from kinema.train.vae_loop import export_vae, latent_stats, train_vae

__all__ = [
    "EMA",
    "DataConfig",
    "LatentCache",
    "TrainConfig",
    "VAETrainConfig",
    "drop_captions",
    "export",
    "export_vae",
    "flow_matching_loss",
    "latent_stats",
    "load_train_config",
    "load_vae_train_config",
    "precompute",
    "sample_cond_mask",
    "sample_timesteps",
    "train_dit",
    "train_vae",
]
