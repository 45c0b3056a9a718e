"""Fixtures the training tests share: a tiny random VAE and MiniLM reading 8 tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kinema.io.checkpoint import save_component
from kinema.models.vae import CausalVAE


@pytest.fixture(scope="module")
def text_encoder():
    from kinema.models.text import load_text_encoder

    return load_text_encoder("minilm", max_length=8)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_train import TINY_VAE

    torch.manual_seed(0)
    return save_component(CausalVAE(TINY_VAE), tmp_path_factory.mktemp("vae") / "vae")
