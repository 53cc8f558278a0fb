"""Locations in configs: made absolute in the driver as the config loads, S3 URIs checked, and relative
ones refused where they cannot mean the same thing on every node."""

from __future__ import annotations

import sys

import pytest

from pipeline.chain.config import TrainVarConfig
from pipeline.core.configuration import ConfigError, load_config
from pipeline.core.ray_runtime import connect_ray
from pipeline.data.sharding import MakeShardsConfig
from pipeline.generation.config import GenerateConfig

TINY = "configs/tiny.yaml"


def test_chain_config_locations_are_absolute(tmp_path, monkeypatch, request):
    config_file = request.config.rootpath / TINY
    monkeypatch.chdir(tmp_path)
    config = load_config(TrainVarConfig, config_file, ["data.validation={shards_uri: s3://bucket/data/test}"])
    assert config.storage.root == str(tmp_path / "runs")
    assert config.data.train.shards_uri == str(tmp_path / "data" / "tiny_fashion_mnist" / "train")
    assert config.data.validation.shards_uri == "s3://bucket/data/test"  # an S3 URI stays as it is
    assert sorted(config.relative_locations) == ["root=./runs", "shards_uri=data/tiny_fashion_mnist/train"]


def test_absolute_and_s3_locations_are_not_recorded_as_relative(tmp_path):
    config = load_config(MakeShardsConfig, None, [f"output={tmp_path}/shards", "source=fashion-mnist"])
    assert config.output == f"{tmp_path}/shards" and config.relative_locations == ()
    config = load_config(GenerateConfig, None, ["model.run=s3://b/runs/x", "output.uri=~/sets/v1", "plan.per_class=1"])
    assert config.output.uri.startswith("/") and not config.output.uri.startswith("~")
    assert config.relative_locations == ()


@pytest.mark.parametrize("uri", ["s3://", "s3:///prefix"])
def test_an_s3_uri_without_a_bucket_is_refused_with_the_field(uri):
    with pytest.raises(ConfigError) as error:
        load_config(GenerateConfig, None, ["model.run=/tmp/run", f"output.uri={uri}", "plan.per_class=1"])
    assert str(error.value) == f"config error: output.uri: {uri!r} names no bucket: give s3://bucket/prefix"


class _FakeRay:
    def __init__(self, nodes: int) -> None:
        self._nodes = nodes

    def is_initialized(self) -> bool:
        return True

    def nodes(self) -> list[dict]:
        return [{"Alive": True}] * self._nodes + [{"Alive": False}]


def test_relative_locations_are_refused_on_a_multi_node_cluster(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", _FakeRay(nodes=3))
    with pytest.raises(ConfigError, match=r"^config error: root=./runs: a relative path .* 3-node cluster"):
        connect_ray(1.0, ("root=./runs",))
    connect_ray(1.0, ())  # absolute locations and S3 URIs: nothing to refuse


def test_relative_locations_are_fine_on_one_node(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", _FakeRay(nodes=1))
    connect_ray(1.0, ("root=./runs",))  # the driver's node is the only node: the path means the same
