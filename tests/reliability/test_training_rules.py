"""Training never finishes silently wrong: non-finite numbers are refused up front, a run whose loss
stops being finite stops at once with one line and exports nothing, and bad samples skipped on the
way are reported everywhere and bounded by data.max_skipped_fraction."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from cli_helpers import REPO, one_line_error

from pipeline.data.sharding import MakeShardsConfig, make_shards

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TINY = str(REPO / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def damaged_split(tmp_path_factory, fashion_mnist_dir) -> str:
    """32 real images at 16 px in 2 shards, one PNG overwritten with garbage of the same length (the
    shard keeps its byte size, so only decoding can notice): 1 of 32 samples, 3.1%, is bad."""
    root = tmp_path_factory.mktemp("damaged")
    make_shards(MakeShardsConfig(source="fashion-mnist", input=fashion_mnist_dir, output=str(root),
                                 splits=["train"], image_size=16, limit=32, samples_per_shard=16))
    shard = sorted(Path(root, "train").glob("*.tar"))[0]
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    with open(shard, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\x00" * member.size)
    return str(Path(root, "train"))


def _train_args(split: str, storage: Path, *extra: str) -> list[str]:
    return ["--config", TINY, "--storage", str(storage), "--set", f"data.train.shards_uri={split}",
            "--set", "data.create=null", *extra]


@pytest.mark.parametrize("override, field", [
    ("tokenizer.base_learning_rate=.inf", "tokenizer.base_learning_rate"),
    ("sample.cfg=.nan", "sample.cfg"),
    ("gpt.model.init_adaln_gamma=.inf", "gpt.model.init_adaln_gamma"),
])
def test_non_finite_config_numbers_are_refused_up_front(cli, tmp_path, override, field):
    result = cli("train_var", "--config", TINY, "--storage", str(tmp_path), "--set", override)
    line = one_line_error(result, "train_var")
    assert line.startswith(f"train_var: config error: {field}: ") and "finite" in line
    assert not any(tmp_path.iterdir()), "nothing may be written before the config is valid"


def test_a_diverging_run_stops_at_once_with_one_line_and_exports_nothing(cli, tmp_path, fashion_mnist_dir):
    # A finite but absurd learning rate: the weights overflow after the first step.
    result = cli("train_tokenizer", "--config", TINY, "--storage", str(tmp_path / "runs"),
                 "--set", "tokenizer.base_learning_rate=1e30", "--set", "tokenizer.steps=6",
                 "--set", "tokenizer.checkpoint_every=6", cwd=tmp_path)
    line = one_line_error(result, "train_tokenizer")
    assert "tokenizer stage: " in line and "is not finite at step " in line
    assert "likely field: tokenizer.base_learning_rate" in line
    step = int(line.split("is not finite at step ")[1].split(";")[0])
    assert step < 6, "it must stop at once, not at the end of the budget"
    run = tmp_path / "runs" / "tiny" / "tokenizer"
    assert not (run / "export" / "config.json").exists()


def test_skipped_samples_are_reported_and_bounded(cli, tmp_path, damaged_split):
    storage = tmp_path / "runs"
    # 1 of 32 lost (3.1%): allowed at 5%, reported in the JSON line, chain.json and the export.
    result = cli("train_var", *_train_args(damaged_split, storage, "--set", "data.max_skipped_fraction=0.05"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    skipped = summary["steps"]["tokenizer"]["data"]
    assert skipped["skipped_samples"] == 1 and skipped["samples"] == 32 and skipped["lost_fraction"] == 0.03125
    assert summary["steps"]["token_cache"]["data"]["skipped_samples"] == 1
    run = storage / "tiny"
    assert json.loads((run / "chain.json").read_text())["steps"]["tokenizer"]["data"] == skipped
    assert json.loads((run / "tokenizer" / "export" / "config.json").read_text())["data"] == skipped

    # The default budget (1%) fails the stage with one line, and nothing is exported.
    result = cli("train_tokenizer", *_train_args(damaged_split, storage, "--run-name", "strict"))
    line = one_line_error(result, "train_tokenizer")
    assert "bad samples: " in line and "3.12% > data.max_skipped_fraction 0.01" in line
    assert not (storage / "strict" / "tokenizer" / "export" / "config.json").exists()
