"""Fixtures of the training tests: real Fashion-MNIST shards at 16 px, a tiny tokenizer export,
and the tokens of those images as a Ray Dataset (what the token cache yields)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import TINY_TOKENIZER

from pipeline.core.exports import save_tokenizer
from pipeline.data.sharding import MakeShardsConfig, make_shards
from var_model import VQVAE, TokenizerConfig

IMAGE_SIZE = TINY_TOKENIZER["image_size"]


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory, fashion_mnist_dir) -> str:
    """32 real Fashion-MNIST train images at 16 px in 2 shards (one global batch); returns the split URI."""
    root = tmp_path_factory.mktemp("train_shards")
    make_shards(MakeShardsConfig(source="fashion-mnist", input=fashion_mnist_dir, output=str(root),
                                 splits=["train"], image_size=IMAGE_SIZE, limit=32, samples_per_shard=16))
    return str(Path(root, "train"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> str:
    """A randomly initialised tiny tokenizer export (its tokens are still a fixed function of the image)."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(VQVAE(TokenizerConfig.from_dict(TINY_TOKENIZER)).eval(), str(folder))
    return str(folder)


@pytest.fixture(scope="session")
def token_rows(tiny_tokenizer) -> list[dict]:
    """label + tokens (int64 [L], scales concatenated coarse to fine, as the token cache yields them)
    of 64 real Fashion-MNIST images, encoded here with the tiny tokenizer."""
    from pipeline.core.exports import load_tokenizer
    from pipeline.data.sources.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist("train")
    count = 64
    pixels = torch.from_numpy(images[:count].copy()).float().div(127.5).sub(1).unsqueeze(1)
    pixels = torch.nn.functional.interpolate(pixels, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    token_maps = load_tokenizer(tiny_tokenizer).encode_tokens(pixels)
    tokens = torch.cat([m.reshape(count, -1) for m in token_maps], dim=1).numpy().astype(np.int64)
    return [{"label": int(labels[i]), "tokens": tokens[i]} for i in range(count)]


@pytest.fixture(scope="session")
def token_cache(ray_cluster, train_shards, tiny_tokenizer, tmp_path_factory) -> str:
    """The real token cache of the shards (D2's Ray Data encode job), in a local folder."""
    from pipeline.data.reader import ImageDataConfig
    from pipeline.token_cache.cache import precompute_token_cache

    output = str(tmp_path_factory.mktemp("token_cache"))
    precompute_token_cache(tiny_tokenizer, ImageDataConfig(shards_uri=train_shards, shuffle=False), output,
                           batch_size=32, concurrency=1, num_cpus=0.5)
    return output
