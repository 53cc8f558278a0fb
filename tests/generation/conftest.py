"""Tiny random-weight exports for generation tests: a 16 px grayscale tokenizer and a 2-layer VAR."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.core.exports import save_tokenizer, save_var
from var_model import VAR, VQVAE, TokenizerConfig, VARConfig

CLASS_NAMES = [f"class{i}" for i in range(10)]
# Spelled out rather than taken from the presets, so the tests do not move when a preset is retuned.
TINY_TOKENIZER = TokenizerConfig(
    image_size=16, in_channels=1, scales=(1, 2, 4), codebook_size=64, embed_dim=8, base_channels=16,
    channel_multipliers=(1, 2, 2), num_res_blocks=1, use_attention=False, norm_groups=8)
TINY_VAR = VARConfig(hidden_size=32, num_layers=2, num_heads=2, mlp_ratio=4.0, scales=(1, 2, 4), codebook_size=64,
                     embed_dim=8, num_classes=10, drop_path=0.0, init_adaln_gamma=1e-3)


def write_tiny_exports(root: str, var_overrides: dict | None = None) -> tuple[str, str]:
    """Save the tiny tokenizer and a tiny VAR (optionally altered) under `root`; returns both URIs."""
    torch.manual_seed(0)
    tokenizer_uri, var_uri = f"{root.rstrip('/')}/tokenizer", f"{root.rstrip('/')}/var"
    save_tokenizer(VQVAE(TINY_TOKENIZER), tokenizer_uri)
    var_config = dataclasses.replace(TINY_VAR, **(var_overrides or {}))
    save_var(VAR(var_config), var_uri, extra={"class_names": CLASS_NAMES})
    return tokenizer_uri, var_uri


@pytest.fixture(scope="session")
def export_writer():
    """write_tiny_exports, for tests that need an altered model."""
    return write_tiny_exports


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory) -> tuple[str, str]:
    return write_tiny_exports(str(tmp_path_factory.mktemp("tiny_exports")))
