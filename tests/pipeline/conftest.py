"""Data-plane fixtures: small real Fashion-MNIST shards and an S3 server that checks credentials
(the session moto server accepts any key)."""

from __future__ import annotations

import os

import pytest

from pipeline.data.sharding import MakeShardsConfig, make_shards


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory, fashion_mnist_dir) -> str:
    """300 real Fashion-MNIST train images in shards of 64 (a short last shard) in a local folder."""
    output = str(tmp_path_factory.mktemp("fmnist_shards"))
    make_shards(MakeShardsConfig(source="fashion-mnist", input=fashion_mnist_dir, output=output,
                                 splits=["train"], limit=300, samples_per_shard=64))
    return os.path.join(output, "train")
