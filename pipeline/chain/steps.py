"""The chain as a table of steps: tokenizer stage -> token cache (-> validation cache) -> GPT stage ->
sample grid. Each `Step` says, in one place, what it reads, what it makes, how the chain knows it is
done, which config sections its output depends on, what it needs of the cluster, and how it runs.
pipeline.chain.run walks the table (resumable step by step); pipeline.core.layout says where each
location of a run is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.chain.checks import ChainError
from pipeline.chain.config import TrainVarConfig
from pipeline.core.exports import CONFIG_FILE
from pipeline.core.layout import GPT_RUN, TOKENIZER_RUN, RunLayout
from pipeline.core.ray_runtime import resolve_gpus
from pipeline.core.storage import StorageOptions, exists, join_uri, write_bytes_atomic
from pipeline.data.shards import read_index
from pipeline.token_cache.schema import MANIFEST_FILE


@dataclass(frozen=True)
class Needs:
    """What a step reserves of the cluster at once."""

    cpus: float
    gpus: str | float  # "auto": GPUs when the cluster has them


@dataclass(frozen=True)
class Step:
    name: str
    inputs: tuple[str, ...]  # RunLayout fields it reads; run alone, a step checks they are finished first
    output: str  # RunLayout field of what it publishes last
    marker: str | None  # the file inside `output` whose existence says the step is done (None: `output` itself)
    made: Callable[[RunLayout], str]  # everything it writes, moved aside as one when it is made afresh
    sections: tuple[str, ...]  # the config sections its output depends on (pipeline.chain.resume)
    extendable: bool  # a training stage: more steps continue from its last checkpoint
    needs: Callable[[TrainVarConfig], Needs]
    run: Callable[[TrainVarConfig, RunLayout, StorageOptions | None], dict[str, Any] | None]
    wanted: Callable[[TrainVarConfig], bool] = lambda config: True  # whether this config runs it

    def done_uri(self, layout: RunLayout) -> str:
        output = getattr(layout, self.output)
        return join_uri(output, self.marker) if self.marker else output

    def is_done(self, layout: RunLayout, storage: StorageOptions | None = None) -> bool:
        return exists(self.done_uri(layout), storage)


# ---------------------------------------------------------------- what each step does

def validates(config: TrainVarConfig) -> bool:
    """The GPT stage validates during training: a validation split and gpt.validate_every > 0."""
    return config.data.validation is not None and config.gpt.validate_every > 0


def train_tokenizer(config: TrainVarConfig, layout: RunLayout, storage: StorageOptions | None) -> dict[str, Any]:
    from pipeline.core.exports import read_export_info
    from pipeline.train import run_tokenizer_stage

    # The validation split, when there is one, is what the stage's validation passes read (validate_every).
    run_tokenizer_stage(config.tokenizer, config.data.train, layout.run, TOKENIZER_RUN,
                        max_skipped_fraction=config.data.max_skipped_fraction, validation=config.data.validation)
    return {"data": read_export_info(layout.tokenizer_export).get("data")}


def _encode(config: TrainVarConfig, split: Any, tokenizer_export: str, output: str,
            storage: StorageOptions | None, flip: bool) -> dict[str, Any]:
    from pipeline.token_cache.cache import precompute_token_cache

    manifest = precompute_token_cache(
        tokenizer_export, split, output, batch_size=config.cache.batch_size, concurrency=config.cache.concurrency,
        flip_augmentation=flip, storage=storage, num_cpus=config.cache.num_cpus,
        num_gpus=resolve_gpus(config.cache.num_gpus), max_skipped_fraction=config.data.max_skipped_fraction)
    return {"data": {key: manifest.get(key) for key in (
        "num_rows", "skipped_samples", "skipped_shards", "samples_in_skipped_shards", "lost_fraction")}}


def encode_train_split(config: TrainVarConfig, layout: RunLayout, storage: StorageOptions | None) -> dict[str, Any]:
    return _encode(config, config.data.train, layout.tokenizer_export, layout.token_cache, storage, config.cache.flip)


def encode_validation_split(config: TrainVarConfig, layout: RunLayout,
                            storage: StorageOptions | None) -> dict[str, Any]:
    if config.data.validation is None:
        raise ChainError("data.validation: the token_cache_validation step needs a validation split")
    # Never flipped: validation measures the images as they are.
    return _encode(config, config.data.validation, layout.tokenizer_export, layout.validation_token_cache,
                   storage, flip=False)


def train_gpt(config: TrainVarConfig, layout: RunLayout, storage: StorageOptions | None) -> None:
    from pipeline.train import run_gpt_stage

    validation_cache = None
    if validates(config):  # run alone (jobs/train_gpt.py), the gpt step makes the cache it needs
        if not VALIDATION_CACHE.is_done(layout, storage):
            encode_validation_split(config, layout, storage)
        validation_cache = layout.validation_token_cache
    run_gpt_stage(config.gpt, layout.token_cache, layout.tokenizer_export, layout.run, GPT_RUN,
                  validation_cache_uri=validation_cache)


def write_samples(config: TrainVarConfig, layout: RunLayout, storage: StorageOptions | None = None) -> None:
    from pipeline.core.exports import load_tokenizer, load_var
    from pipeline.core.images import encode_png
    from pipeline.generation.grid import sample_grid

    tokenizer, var = load_tokenizer(layout.tokenizer_export), load_var(layout.gpt_export)
    try:
        class_names = read_index(config.data.train.shards_uri, storage).class_names
    except (OSError, ValueError):  # shards gone since training: rows labelled with the class index
        class_names = None
    grid = sample_grid(var, tokenizer, config.sample_classes, config.sample.per_class,
                       sampling=config.sample.settings, seed=config.sample.seed, class_names=class_names)
    write_bytes_atomic(layout.samples, encode_png(grid), storage)


# ---------------------------------------------------------------- the table

def _stage_needs(section: str) -> Callable[[TrainVarConfig], Needs]:
    def needs(config: TrainVarConfig) -> Needs:
        stage = getattr(config, section)
        gpus = stage.use_gpu if stage.use_gpu == "auto" else float(stage.num_workers if stage.use_gpu else 0)
        return Needs(stage.num_workers * stage.cpus_per_worker, gpus)
    return needs


def _cache_needs(config: TrainVarConfig) -> Needs:
    cache = config.cache
    gpus = cache.num_gpus if cache.num_gpus == "auto" else cache.concurrency * cache.num_gpus
    return Needs(cache.concurrency * cache.num_cpus, gpus)


TOKENIZER = Step("tokenizer", inputs=(), output="tokenizer_export", marker=CONFIG_FILE,
                 made=lambda layout: layout.tokenizer_run, sections=("data.train", "tokenizer"), extendable=True,
                 needs=_stage_needs("tokenizer"), run=train_tokenizer)
TOKEN_CACHE = Step("token_cache", inputs=("tokenizer_export",), output="token_cache", marker=MANIFEST_FILE,
                   made=lambda layout: layout.token_cache, sections=("data.train", "cache"), extendable=False,
                   needs=_cache_needs, run=encode_train_split)
VALIDATION_CACHE = Step("token_cache_validation", inputs=("tokenizer_export",), output="validation_token_cache",
                        marker=MANIFEST_FILE, made=lambda layout: layout.validation_token_cache,
                        sections=("data.validation", "cache"), extendable=False, needs=_cache_needs,
                        run=encode_validation_split, wanted=validates)
GPT = Step("gpt", inputs=("tokenizer_export", "token_cache"), output="gpt_export", marker=CONFIG_FILE,
           made=lambda layout: layout.gpt_run, sections=("gpt",), extendable=True, needs=_stage_needs("gpt"),
           run=train_gpt)
SAMPLES = Step("samples", inputs=("tokenizer_export", "gpt_export"), output="samples", marker=None,
               made=lambda layout: layout.samples, sections=("sample",), extendable=False,
               needs=lambda config: Needs(1.0, 0.0), run=write_samples)

STEPS: tuple[Step, ...] = (TOKENIZER, TOKEN_CACHE, VALIDATION_CACHE, GPT, SAMPLES)
STEP_BY_NAME = {step.name: step for step in STEPS}


def chain_steps(config: TrainVarConfig) -> tuple[Step, ...]:
    """The steps this config runs, in order (the validation cache only when the GPT stage validates)."""
    return tuple(step for step in STEPS if step.wanted(config))


def step_named(name: str) -> Step:
    return STEP_BY_NAME[name]


__all__ = ["Step", "Needs", "STEPS", "chain_steps", "step_named", "validates", "write_samples"]
