"""Fixtures of the chain tests: a few hundred real Fashion-MNIST images as shards, a tiny tokenizer export, a
Ray cluster of one test's own to submit jobs to."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ray_head import ray_head_address

from pipeline.core.exports import save_tokenizer
from pipeline.data.sharding import MakeShardsConfig, make_shards
from var_model import VQVAE, TokenizerConfig

IMAGE_SIZE = 16
# The model of configs/tiny.yaml, spelled out (presets may be retuned).
TINY_TOKENIZER = TokenizerConfig(image_size=IMAGE_SIZE, in_channels=1, scales=(1, 2, 4), codebook_size=64, embed_dim=8,
                                 base_channels=16, channel_multipliers=(1, 2, 2), num_res_blocks=1, norm_groups=8)


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory, fashion_mnist_dir) -> str:
    """Fashion-MNIST train split, 96 images at 16 px, 3 shards; returns the split URI."""
    root = tmp_path_factory.mktemp("shards")
    make_shards(MakeShardsConfig(source="fashion-mnist", input=fashion_mnist_dir, output=str(root), splits=["train"],
                                 image_size=IMAGE_SIZE, limit=96, samples_per_shard=32))
    return str(Path(root, "train"))


def make_tokenizer_export(folder: Path, seed: int) -> str:
    """A randomly initialised tiny tokenizer, exported: enough to test that tokens survive the cache."""
    torch.manual_seed(seed)
    model = VQVAE(TINY_TOKENIZER).eval()
    save_tokenizer(model, str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> str:
    return make_tokenizer_export(tmp_path_factory.mktemp("tokenizer"), seed=0)


@pytest.fixture
def ray_head():
    """`ray start --head` on loopback for this test alone; yields its job submission address."""
    yield from ray_head_address()
