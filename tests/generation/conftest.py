"""Tiny random-weight exports for generation tests: a 16 px grayscale tokenizer and a 2-layer VAR."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.exports import save_tokenizer, save_var
from var_model import TOKENIZER_PRESETS, VAR, VAR_PRESETS, VQVAE

CLASS_NAMES = [f"class{i}" for i in range(10)]


def write_tiny_exports(root: str, var_overrides: dict | None = None) -> tuple[str, str]:
    """Save the tiny tokenizer and a tiny VAR (optionally altered) under `root`; returns both URIs."""
    torch.manual_seed(0)
    tokenizer_uri, var_uri = f"{root.rstrip('/')}/tokenizer", f"{root.rstrip('/')}/var"
    save_tokenizer(VQVAE(TOKENIZER_PRESETS["tiny"]), tokenizer_uri)
    var_config = dataclasses.replace(VAR_PRESETS["tiny"], **(var_overrides or {}))
    save_var(VAR(var_config), var_uri, extra={"class_names": CLASS_NAMES})
    return tokenizer_uri, var_uri


@pytest.fixture(scope="session")
def export_writer():
    """write_tiny_exports, for tests that need an altered model."""
    return write_tiny_exports


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory) -> tuple[str, str]:
    return write_tiny_exports(str(tmp_path_factory.mktemp("tiny_exports")))
