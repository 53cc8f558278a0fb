"""Ray Train + DeepSpeed training of both VAR stages: one harness (harness.py), two stages.

Entry points, imported lazily so that `pipeline.train.config` stays light (no Ray / DeepSpeed):
  run_tokenizer_stage(config, data_config, storage_uri, run_name) -> export_uri
  run_gpt_stage(config, token_cache_uri, tokenizer_uri, storage_uri, run_name) -> export_uri
"""

from __future__ import annotations

from typing import Any


def run_tokenizer_stage(*args: Any, **kwargs: Any) -> str:
    from pipeline.train.tokenizer_stage import run_tokenizer_stage as run

    return run(*args, **kwargs)


def run_gpt_stage(*args: Any, **kwargs: Any) -> str:
    from pipeline.train.gpt_stage import run_gpt_stage as run

    return run(*args, **kwargs)


__all__ = ["run_tokenizer_stage", "run_gpt_stage"]
