"""TrainVarConfig's cross-section rules, without Ray: the contract comes from the tokenizer, the data
is read at the tokenizer's size, and GPU counts say what they accept."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.chain.config import TrainVarConfig
from pipeline.core.configuration import ConfigError, load_config

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _tiny(*overrides: str) -> TrainVarConfig:
    return load_config(TrainVarConfig, TINY, list(overrides))


def test_the_transformer_and_the_data_follow_the_tokenizer():
    config = _tiny("tokenizer.model.codebook_size=128")
    assert config.var_model.codebook_size == 128 and config.var_model.scales == config.tokenizer_model.scales
    assert (config.data.train.image_size, config.data.train.channels) == (16, 1)  # the tokenizer's


@pytest.mark.parametrize("override, line", [
    ("gpt.model.scales=[1, 2, 3]", "gpt.model.scales: comes from the tokenizer, whose scales is [1, 2, 4]; remove it"),
    ("data.train.image_size=32", "data.train.image_size: must equal the tokenizer's image_size 16 (got 32)"),
    ("cache.num_gpus=-1", "cache.num_gpus: must be a number >= 0 or 'auto' (got -1)"),
])
def test_a_disagreeing_value_is_one_line_naming_the_field(override, line):
    with pytest.raises(ConfigError) as error:
        _tiny(override)
    assert line in str(error.value) and "\n" not in str(error.value)
