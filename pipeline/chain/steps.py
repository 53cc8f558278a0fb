"""The whole chain: tokenizer stage -> token cache -> GPT stage -> sample grid, resumable step by step.

Everything a run makes lives under `<storage>/<run>/`:

  config.json            the resolved TrainVarConfig of the first run (a rerun warns if it differs)
  tokenizer/             Ray Train run of stage 1 (checkpoints) and tokenizer/export/ (safetensors + config.json)
  token_cache/           Parquet token cache (data/*.parquet + _SUCCESS.json)
  token_cache_validation/  the validation split's token cache (with data.validation and gpt.validate_every)
  gpt/                   Ray Train run of stage 2 and gpt/export/ (and gpt/samples/ with gpt.sample_every)
  samples.png            one row per class, labelled with the class names
  chain.json             what each step did and how long it took (written last)

A step whose output exists is skipped (an export's config.json, the cache's _SUCCESS.json, the
PNG), so running the same command again resumes where a killed run stopped; inside a stage, Ray
Train resumes from the newest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Callable

from pipeline.chain.config import TrainVarConfig
from pipeline.chain.resume import StepPlan, changed_fields, plan_steps
from pipeline.core.errors import VarrayError
from pipeline.core.exports import CONFIG_FILE
from pipeline.core.ray_runtime import connect_ray
from pipeline.core.storage import (
    StorageOptions,
    exists,
    is_s3,
    join_uri,
    move_aside,
    read_bytes,
    remove,
    write_bytes_atomic,
)
from pipeline.data.shards import INDEX_FILE, read_index
from pipeline.token_cache.schema import MANIFEST_FILE

logger = logging.getLogger(__name__)

TOKENIZER_RUN = "tokenizer"
GPT_RUN = "gpt"
EXPORT_DIR = "export"  # where pipeline.train.harness puts a stage's export inside its run folder


class ChainError(VarrayError, ValueError):
    """The chain cannot start or continue; one line saying why."""


@dataclass(frozen=True)
class ChainLayout:
    run: str
    config: str
    tokenizer_export: str
    token_cache: str
    gpt_export: str
    samples: str
    summary: str
    validation_token_cache: str


def chain_layout(config: TrainVarConfig) -> ChainLayout:
    run = join_uri(config.storage.root, config.storage.run_name)
    return ChainLayout(
        run=run, config=join_uri(run, "config.json"),
        tokenizer_export=join_uri(run, TOKENIZER_RUN, EXPORT_DIR), token_cache=join_uri(run, "token_cache"),
        gpt_export=join_uri(run, GPT_RUN, EXPORT_DIR), samples=join_uri(run, "samples.png"),
        summary=join_uri(run, "chain.json"), validation_token_cache=join_uri(run, "token_cache_validation"))


def step_status(layout: ChainLayout, storage: StorageOptions | None = None) -> dict[str, bool]:
    """Which steps are already done (their output exists)."""
    return {
        "tokenizer": exists(join_uri(layout.tokenizer_export, CONFIG_FILE), storage),
        "token_cache": exists(join_uri(layout.token_cache, MANIFEST_FILE), storage),
        "token_cache_validation": exists(join_uri(layout.validation_token_cache, MANIFEST_FILE), storage),
        "gpt": exists(join_uri(layout.gpt_export, CONFIG_FILE), storage),
        "samples": exists(layout.samples, storage),
    }


# ---------------------------------------------------------------- checks (dry run and real run)

def probe_storage(root: str, storage: StorageOptions | None = None) -> None:
    """Write and delete one object under `root`: proves the location is reachable and writable."""
    created_root = not is_s3(root) and not os.path.exists(root)
    probe = join_uri(root, f".varray-probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes_atomic(probe, b"probe", storage)
        remove(probe, storage)
    except OSError as exc:
        raise ChainError(f"storage.root: cannot write to {root}: {str(exc).splitlines()[0]}") from None
    finally:
        if created_root and os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)


def check_data(config: TrainVarConfig, storage: StorageOptions | None = None) -> dict[str, Any]:
    """The train split's index (or the plan to create it) checked against the models; a summary."""
    var = config.var_model
    train_uri = config.data.train.shards_uri
    if not exists(join_uri(train_uri, INDEX_FILE), storage):
        if config.data.create is None:
            raise ChainError(f"data.train.shards_uri: no {INDEX_FILE} at {train_uri} (write shards with "
                             "jobs/make_shards.py, or set data.create to make Fashion-MNIST shards)")
        from pipeline.data.sharding import plan
        try:
            planned = plan(_make_shards_config(config))
        except (OSError, ValueError) as exc:
            raise ChainError(f"data.create: {str(exc).splitlines()[0]}") from None
        return {"train": train_uri, "create": planned}
    index = read_index(train_uri, storage)  # its images are read at the tokenizer's size (TrainVarConfig)
    if index.num_classes > var.num_classes:
        raise ChainError(f"gpt.model.num_classes: the shards have {index.num_classes} classes, the model "
                         f"{var.num_classes}")
    if config.data.validation is not None and not exists(join_uri(config.data.validation.shards_uri, INDEX_FILE),
                                                         storage) and config.data.create is None:
        raise ChainError(f"data.validation.shards_uri: no {INDEX_FILE} at {config.data.validation.shards_uri}")
    return {"train": train_uri, "samples": index.total, "classes": index.num_classes,
            "image_size": index.image_size, "channels": index.channels}


def plan_chain(config: TrainVarConfig, storage: StorageOptions | None = None, probe: bool = True,
               force: Sequence[str] = ()) -> dict[str, Any]:
    """Everything --dry-run checks, without starting Ray or training: storage, data, what each step
    would do (run, skip, extend, rerun; a changed config that a finished step cannot take is refused)."""
    if probe:
        probe_storage(config.storage.root, storage)
    data = check_data(config, storage)
    layout = chain_layout(config)
    plans = plan_steps(chain_steps(config), _config_changes(config, layout, storage), step_status(layout, storage),
                       force)
    return {"run": layout.run, "data": data, "outputs": asdict(layout),
            "steps": {name: _LABEL.get(plan.action, plan.action) + (f" ({', '.join(plan.changed)})" if plan.changed
                                                                       else "") for name, plan in plans.items()}}


_LABEL = {"skip": "skip (output exists)"}


# ---------------------------------------------------------------- the run

def chain_cpus(config: TrainVarConfig) -> float:
    """Logical CPUs the largest step of the chain reserves at once."""
    return max(config.tokenizer.num_workers * config.tokenizer.cpus_per_worker,
               config.gpt.num_workers * config.gpt.cpus_per_worker,
               config.cache.concurrency * config.cache.num_cpus)


def _make_shards_config(config: TrainVarConfig):
    from pipeline.data.sharding import MakeShardsConfig

    create = config.data.create
    return MakeShardsConfig(
        source=create.source, input=create.input, output=config.data.shards_root,
        splits=["train", "test"] if config.data.validation is not None else ["train"],
        image_size=config.data.train.image_size, channels=config.data.train.channels, limit=create.limit,
        samples_per_shard=create.samples_per_shard, seed=create.seed)


def ensure_shards(config: TrainVarConfig, storage: StorageOptions | None = None) -> bool:
    """Write Fashion-MNIST shards when data.create says so and the train split has none; True if written."""
    if exists(join_uri(config.data.train.shards_uri, INDEX_FILE), storage):
        return False
    if config.data.create is None:
        raise ChainError(f"data.train.shards_uri: no {INDEX_FILE} at {config.data.train.shards_uri}")
    from pipeline.data.sharding import make_shards

    logger.info("writing %s shards under %s", config.data.create.source, config.data.shards_root)
    make_shards(_make_shards_config(config), storage)
    return True


def _config_changes(config: TrainVarConfig, layout: ChainLayout,
                    storage: StorageOptions | None) -> dict[str, tuple[Any, Any]]:
    """How this config differs from the one the run's finished steps were made with."""
    if not exists(layout.config, storage):
        return {}
    try:
        recorded = json.loads(read_bytes(layout.config, storage))
    except ValueError:
        raise ChainError(f"{layout.config}: not JSON; move it aside to start the run's record anew") from None
    return changed_fields(recorded, config.model_dump(mode="json"))


def _record_config(config: TrainVarConfig, layout: ChainLayout, storage: StorageOptions | None) -> None:
    write_bytes_atomic(layout.config, json.dumps(config.model_dump(mode="json"), indent=2).encode(), storage)


def step_output(layout: ChainLayout, name: str) -> str:
    """Everything a step made (a stage's whole Ray Train run, checkpoints included), as one URI."""
    return {"tokenizer": join_uri(layout.run, TOKENIZER_RUN), "token_cache": layout.token_cache,
            "token_cache_validation": layout.validation_token_cache, "gpt": join_uri(layout.run, GPT_RUN),
            "samples": layout.samples}[name]


_STATUS = {"run": "ran", "rerun": "reran", "extend": "extended"}


def _timed(steps: dict[str, Any], name: str, plan: StepPlan, action: Callable[[], Any], layout: ChainLayout,
           storage: StorageOptions | None) -> None:
    if plan.action == "skip":
        logger.info("step %s: output exists, skipped", name)
        steps[name] = {"status": "skipped"}
        return
    record: dict[str, Any] = {"status": _STATUS[plan.action]}
    if plan.changed:
        record["changed"] = list(plan.changed)
    if plan.action == "rerun":  # made afresh: the old output is kept aside, not deleted
        record["replaced"] = move_aside(step_output(layout, name), storage)
    logger.info("step %s: %s", name, {"run": "running", "rerun": "running afresh",
                                      "extend": f"extending ({', '.join(plan.changed)})"}[plan.action])
    started = time.time()
    details = action() or {}
    steps[name] = {**record, "seconds": round(time.time() - started, 1), **details}
    logger.info("step %s: done in %.1f s", name, steps[name]["seconds"])


def cache_gpus(num_gpus: str | float) -> float:
    """GPUs per encoder actor: "auto" is 1 when the connected cluster has GPUs."""
    import ray

    if num_gpus != "auto":
        return float(num_gpus)
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def write_samples(config: TrainVarConfig, layout: ChainLayout, storage: StorageOptions | None = None) -> None:
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


def run_chain(config: TrainVarConfig, storage: StorageOptions | None = None,
              force: Sequence[str] = ()) -> dict[str, Any]:
    """Run (or resume) every step; returns the summary also written to `<run>/chain.json`.

    A rerun keeps each finished step unless its config changed (pipeline.chain.resume): more
    training steps extend a stage, other changes are refused unless the step is in `force`."""
    started = time.time()
    layout = chain_layout(config)
    plan_chain(config, storage, probe=True, force=force)  # fail early, before Ray starts
    names = chain_steps(config)
    plans = plan_steps(names, _config_changes(config, layout, storage), step_status(layout, storage), force)
    if not exists(layout.config, storage):
        _record_config(config, layout, storage)
    connect_ray(chain_cpus(config), config.relative_locations)
    steps: dict[str, Any] = {"shards": {"status": "ran" if ensure_shards(config, storage) else "skipped"}}
    for name in names:
        _timed(steps, name, plans[name], lambda name=name: _run_step(config, name, layout, storage), layout, storage)
    _record_config(config, layout, storage)  # every step is now made with this config
    summary = {"run": layout.run, "outputs": asdict(layout), "steps": steps,
               "seconds": round(time.time() - started, 1)}
    write_bytes_atomic(layout.summary, json.dumps(summary, indent=2).encode(), storage)
    return summary


STEPS = ("tokenizer", "token_cache", "token_cache_validation", "gpt", "samples")
# What each step reads: a step run alone (jobs/train_gpt.py ...) checks these exist first.
STEP_INPUTS = {"tokenizer": (), "token_cache": ("tokenizer_export",), "token_cache_validation": ("tokenizer_export",),
               "gpt": ("tokenizer_export", "token_cache"), "samples": ("tokenizer_export", "gpt_export")}


def validates(config: TrainVarConfig) -> bool:
    """The GPT stage validates during training: a validation split and gpt.validate_every > 0."""
    return config.data.validation is not None and config.gpt.validate_every > 0


def chain_steps(config: TrainVarConfig) -> tuple[str, ...]:
    """The steps this config runs, in order (the validation cache only when the GPT stage validates)."""
    return tuple(name for name in STEPS if name != "token_cache_validation" or validates(config))


def _encode(config: TrainVarConfig, split: Any, tokenizer_export: str, output: str,
            storage: StorageOptions | None, flip: bool) -> dict[str, Any]:
    from pipeline.token_cache.cache import precompute_token_cache

    manifest = precompute_token_cache(
        tokenizer_export, split, output, batch_size=config.cache.batch_size, concurrency=config.cache.concurrency,
        flip_augmentation=flip, storage=storage, num_cpus=config.cache.num_cpus,
        num_gpus=cache_gpus(config.cache.num_gpus), max_skipped_fraction=config.data.max_skipped_fraction)
    return {"data": {key: manifest.get(key) for key in (
        "num_rows", "skipped_samples", "skipped_shards", "samples_in_skipped_shards", "lost_fraction")}}


def _run_step(config: TrainVarConfig, name: str, layout: ChainLayout,
              storage: StorageOptions | None) -> dict[str, Any] | None:
    """Run one step; returns what the step's summary adds (e.g. the bad samples it skipped)."""
    if name == "tokenizer":
        from pipeline.core.exports import read_export_info
        from pipeline.train import run_tokenizer_stage

        run_tokenizer_stage(config.tokenizer, config.data.train, layout.run, TOKENIZER_RUN,
                            max_skipped_fraction=config.data.max_skipped_fraction)
        return {"data": read_export_info(layout.tokenizer_export).get("data")}
    elif name == "token_cache":
        return _encode(config, config.data.train, layout.tokenizer_export, layout.token_cache, storage,
                       config.cache.flip)
    elif name == "token_cache_validation":
        if config.data.validation is None:
            raise ChainError("data.validation: the token_cache_validation step needs a validation split")
        # Never flipped: validation measures the images as they are.
        return _encode(config, config.data.validation, layout.tokenizer_export, layout.validation_token_cache,
                       storage, flip=False)
    elif name == "gpt":
        from pipeline.train import run_gpt_stage

        validation_cache = None
        if validates(config):  # run alone (jobs/train_gpt.py), the gpt step makes the cache it needs
            if not exists(join_uri(layout.validation_token_cache, MANIFEST_FILE), storage):
                _run_step(config, "token_cache_validation", layout, storage)
            validation_cache = layout.validation_token_cache
        run_gpt_stage(config.gpt, layout.token_cache, layout.tokenizer_export, layout.run, GPT_RUN,
                      validation_cache_uri=validation_cache)
    else:
        write_samples(config, layout, storage)
    return None


def import_official_tokenizer(config: TrainVarConfig, checkpoint: str, layout: ChainLayout | None = None,
                              storage: StorageOptions | None = None) -> dict[str, Any]:
    """Publish the released VAR tokenizer (e.g. vae_ch160v4096z32.pth) as the run's tokenizer export, so
    the chain skips stage 1 and encodes with the official weights. Its inferred config must equal the
    config's tokenizer model."""
    from pipeline.core.exports import save_tokenizer
    from var_model import load_official_tokenizer

    layout = layout or chain_layout(config)
    wanted = config.tokenizer_model
    try:
        model = load_official_tokenizer(checkpoint, image_size=wanted.image_size, scales=wanted.scales)
    except (OSError, ValueError) as exc:  # missing file, not a state dict, keys or shapes that do not match
        raise ChainError(f"--checkpoint {checkpoint}: {str(exc).splitlines()[0]}") from None
    expected = wanted.to_dict()
    for name, value in model.config.to_dict().items():
        if value != expected[name]:
            raise ChainError(f"tokenizer.model.{name}: the checkpoint has {value!r}, the config {expected[name]!r}")
    checksum = save_tokenizer(model, layout.tokenizer_export, extra={"source": "official", "checkpoint": checkpoint})
    return {"tokenizer_export": layout.tokenizer_export, "checksum": checksum}


def _input_done(field: str, uri: str, storage: StorageOptions | None) -> bool:
    marker = MANIFEST_FILE if field == "token_cache" else CONFIG_FILE
    return exists(join_uri(uri, marker), storage)


def plan_step(config: TrainVarConfig, name: str, storage: StorageOptions | None = None,
              layout: ChainLayout | None = None) -> dict[str, Any]:
    """--dry-run of one step: storage reachable, its inputs present (or the data for the first step)."""
    layout = layout or chain_layout(config)
    probe_storage(config.storage.root, storage)
    plan: dict[str, Any] = {"step": name, "outputs": asdict(layout)}
    if name in ("tokenizer", "token_cache"):
        plan["data"] = check_data(config, storage)
    for field in STEP_INPUTS[name]:
        uri = getattr(layout, field)
        if not _input_done(field, uri, storage):
            raise ChainError(f"{field}: {uri} is missing or incomplete; run the step that makes it first")
    plan["status"] = "skip (output exists)" if step_status(layout, storage)[name] else "run"
    return plan


def run_step(config: TrainVarConfig, name: str, storage: StorageOptions | None = None,
             layout: ChainLayout | None = None, force: bool = False) -> dict[str, Any]:
    """Run one step alone (the stage jobs), with the chain's layout unless `layout` moves its inputs/output.
    A finished step is skipped, or made afresh with `force` (its old output moved aside)."""
    layout = layout or chain_layout(config)
    plan_step(config, name, storage, layout)
    # The step alone, judged like the chain judges it (more steps extend it, other changes are refused).
    done = step_status(layout, storage)[name]
    plan = plan_steps([name], _config_changes(config, layout, storage), {name: done}, [name] if force else [])[name]
    if not exists(layout.config, storage):
        _record_config(config, layout, storage)
    if name == "tokenizer":
        connect_ray(config.tokenizer.num_workers * config.tokenizer.cpus_per_worker, config.relative_locations)
        ensure_shards(config, storage)
    elif name == "gpt":
        connect_ray(config.gpt.num_workers * config.gpt.cpus_per_worker, config.relative_locations)
    else:
        connect_ray(config.cache.concurrency * config.cache.num_cpus, config.relative_locations)
    steps: dict[str, Any] = {}
    _timed(steps, name, plan, lambda: _run_step(config, name, layout, storage), layout, storage)
    return {"step": name, "outputs": asdict(layout), **steps[name]}


__all__ = ["ChainError", "ChainLayout", "chain_layout", "plan_chain", "run_chain", "plan_step", "run_step", "STEPS",
           "chain_steps", "validates",
           "step_status", "connect_ray",
           "ensure_shards", "probe_storage", "check_data", "import_official_tokenizer", "TOKENIZER_RUN", "GPT_RUN"]
