"""Generate a labeled image set: plan -> skip finished units -> Ray Data actor pool -> published files.

`prepare` checks everything that can be checked without generating (config, exports, classes, the
output's existing plan) and lists the units still to do: a unit is done only when its stats file
records this plan's fingerprint and its Parquet file (and tar) has the recorded size and sha256, so
a deleted or damaged unit is made again (same bytes: each sample's seed is fixed by the plan). An
output without plan.json must be empty: the job never writes into a folder of other files.
`run_generation` then feeds those units to an actor pool of `UnitGenerator`s through
`ray.data.from_items(...).map_batches(...)`, one unit per batch, and follows the results on the console.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from pipeline.core.ray_runtime import connect_ray
from pipeline.core.storage import (
    exists,
    fsspec_filesystem,
    join_uri,
    list_files,
    list_tree,
    read_bytes,
    remove,
    write_bytes_atomic,
)
from pipeline.data.shards import ShardIndex, ShardInfo, write_index
from pipeline.generation.config import GenerateConfig
from pipeline.generation.models import ModelPair, resolve_models
from pipeline.generation.npz import export_npz
from pipeline.generation.plan import PlanError, WorkUnit, build_units, plan_fingerprint, resolve_counts
from pipeline.generation.schema import (
    GENERATED_FORMAT,
    PLAN_FILE,
    STATS_DIR,
    WEBDATASET_DIR,
    data_file,
    stats_file,
    webdataset_file,
)
from pipeline.generation.worker import UnitGenerator
from pipeline.generation.writer import SetContext

logger = logging.getLogger(__name__)


@dataclass
class PreparedRun:
    config: GenerateConfig
    models: ModelPair
    class_names: list[str]
    counts: dict[int, int]
    units: list[WorkUnit]
    plan: dict[str, Any]  # what plan.json holds
    context: SetContext
    done: set[str]
    stale: set[str] = field(default_factory=set)  # units with a stats file that does not hold up: made again

    @property
    def todo(self) -> list[WorkUnit]:
        return [unit for unit in self.units if unit.name not in self.done]

    def summary(self) -> dict[str, Any]:
        return {"output": self.config.output.uri, "tokenizer": self.models.tokenizer_uri, "var": self.models.var_uri,
                "images": sum(self.counts.values()), "units": len(self.units), "units_done": len(self.done),
                "units_todo": len(self.units) - len(self.done),
                "per_class": {self.class_names[label]: count for label, count in self.counts.items()},
                "sampling": self.config.sampling.settings.as_kwargs(), "preset": self.config.preset,
                "npz": self.config.output.npz, "plan_fingerprint": self.plan["fingerprint"]}


def _class_names(config: GenerateConfig, models: ModelPair) -> list[str]:
    names = config.output.class_names or models.class_names()
    if names is None:
        return [str(label) for label in range(models.num_classes)]
    if len(names) != models.num_classes:
        raise PlanError(f"output.class_names: {len(names)} names for a model with {models.num_classes} classes")
    return list(names)


def prepare(config: GenerateConfig) -> PreparedRun:
    """Validate the whole run and find the finished units; reads config.json files and listings only."""
    models = resolve_models(config.model.run, config.model.tokenizer, config.model.var)
    class_names = _class_names(config, models)
    counts = resolve_counts(config.plan.per_class, config.plan.classes, class_names)
    if sum(counts.values()) == 0:
        raise PlanError("plan: every count is 0, nothing to generate")
    units = build_units(counts, config.plan.seed, config.plan.unit_size)
    sampling = config.sampling.model_dump()
    description = {
        "format": GENERATED_FORMAT, "counts": {str(k): v for k, v in counts.items()}, "seed": config.plan.seed,
        "unit_size": config.plan.unit_size, "sampling": sampling,
        "tokenizer_checksum": models.tokenizer_checksum, "var_checksum": models.var_checksum,
        "webdataset": config.output.webdataset, "class_names": class_names,
    }
    plan = {**description, "fingerprint": plan_fingerprint(description), "units": len(units),
            "images": sum(counts.values()), "tokenizer": models.tokenizer_uri, "var": models.var_uri}
    if config.preset is not None:  # what the values came from; the fingerprint holds the values themselves
        plan["preset"] = config.preset
    output = config.output.uri
    plan_uri = join_uri(output, PLAN_FILE)
    if exists(plan_uri):
        previous = _read_json(plan_uri, "plan file")
        if not isinstance(previous, dict) or "fingerprint" not in previous or \
                previous.get("format", GENERATED_FORMAT) != GENERATED_FORMAT:
            raise PlanError(f"output.uri: {plan_uri} is not the plan of a varray generated set "
                            f"(format {GENERATED_FORMAT}); choose another output folder")
        if previous.get("fingerprint") != plan["fingerprint"]:
            raise PlanError(f"output.uri: {PLAN_FILE} at {output} holds a different plan: changed "
                            f"{_changed_fields(previous, description)}; choose a new output or remove the old set")
    else:
        _refuse_foreign_output(output)
    done, stale = _verified_units(output, units, plan["fingerprint"], config.output.webdataset)
    context = SetContext(
        output_uri=output, class_names=tuple(class_names), tokenizer_checksum=models.tokenizer_checksum,
        var_checksum=models.var_checksum, sampling=config.sampling.settings, plan_fingerprint=plan["fingerprint"], webdataset=config.output.webdataset,
        metadata={"scales": models.tokenizer_info["config"]["scales"],
                  "codebook_size": models.tokenizer_info["config"]["codebook_size"],
                  "image_size": models.image_size, "channels": models.channels, "sampling_batch_size":
                  config.sampling.batch_size, "plan_seed": config.plan.seed})
    return PreparedRun(config, models, class_names, counts, units, plan, context, done, stale)


def _read_json(uri: str, what: str) -> Any:
    try:
        return json.loads(read_bytes(uri))
    except (ValueError, UnicodeDecodeError) as exc:
        raise PlanError(f"{uri}: damaged {what}, not JSON ({str(exc).splitlines()[0][:120]}); "
                        "remove it (a stats file: its unit is then made again)") from None


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text[:12] if isinstance(value, str) and len(text) > 16 else text


def _changed_fields(previous: dict[str, Any], description: dict[str, Any]) -> str:
    """`sampling.cfg (1.5 -> 2.0), counts`: old -> new for single values, the name alone for collections."""
    changed = []
    for key in sorted(set(description) | (set(previous) - {"fingerprint", "units", "images", "tokenizer", "var", "preset"})):
        old, new = previous.get(key), description.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict) and all(str(k).isidentifier() for k in {*old, *new}):
            changed += [(f"{key}.{sub}", old.get(sub), new.get(sub)) for sub in sorted({*old, *new})
                        if old.get(sub) != new.get(sub)]
        else:
            changed.append((key, old, new))
    return ", ".join(name if isinstance(old, (dict, list)) or isinstance(new, (dict, list))
                     else f"{name} ({'missing' if old is None else _short(old)} -> "
                          f"{'missing' if new is None else _short(new)})"
                     for name, old, new in changed) or "its fingerprint"


# What a generated set holds (schema.py), temp files of an interrupted atomic write included.
_OWN_NAMES = re.compile(r"((data|stats|webdataset)/)?\.[^/]+\.tmp|plan\.json|data|stats|webdataset|"
                        r"data/part-\d{6}\.parquet|stats/part-\d{6}\.json|webdataset/(part-\d{6}\.tar|index\.json)")


def _refuse_foreign_output(output: str) -> None:
    """An output without plan.json must be empty (or hold only a set's own names): never write into,
    or later clean, a folder of somebody else's files."""
    names = list_tree(output)
    foreign = [name for name in names if not _OWN_NAMES.fullmatch(name)]
    if foreign:
        raise PlanError(f"output.uri: {output} is not empty and is not a generated set of varray (no {PLAN_FILE}; "
                        f"holds {foreign[0]!r}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); "
                        "choose an empty or new folder")


def _sha256(uri: str) -> tuple[int, str]:
    fs, path = fsspec_filesystem(uri)
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _unit_problem(output: str, unit: str, fingerprint: str, webdataset: bool) -> str | None:
    """Why the unit with a stats file is not done (None: it is): every file as the stats file records it."""
    stats = _read_json(join_uri(output, stats_file(unit)), "stats file")
    if not isinstance(stats, dict):
        raise PlanError(f"{join_uri(output, stats_file(unit))}: damaged stats file (not a JSON object)")
    if stats.get("plan_fingerprint") != fingerprint:
        return "made by another plan"
    files = [(data_file(unit), stats.get("bytes"), stats.get("sha256"))]
    if webdataset:
        recorded = stats.get("webdataset") or {}
        files.append((webdataset_file(unit), recorded.get("bytes"), recorded.get("sha256")))
    for name, size, digest in files:
        uri = join_uri(output, name)
        if not exists(uri):
            return f"{name} is missing"
        actual_size, actual_digest = _sha256(uri)
        if actual_size != size:
            return f"{name} has {actual_size} bytes, its stats file records {size}"
        if digest is not None and actual_digest != digest:
            return f"{name} has sha256 {actual_digest[:12]}, its stats file records {str(digest)[:12]}"
        if digest is None and name == data_file(unit):
            return f"its stats file records no sha256 of {name}"
    return None


def _verified_units(output: str, units: list[WorkUnit], fingerprint: str,
                    webdataset: bool) -> tuple[set[str], set[str]]:
    """(done, stale): the planned units whose files hold up, and those whose stats file does not."""
    marked = {os.path.splitext(uri.replace("\\", "/").rsplit("/", 1)[-1])[0]
              for uri in _list_or_empty(join_uri(output, STATS_DIR), ".json")}
    names = [unit.name for unit in units if unit.name in marked]
    with ThreadPoolExecutor(max_workers=8) as pool:  # reading every file back is I/O: S3 likes parallel reads
        problems = dict(zip(names, pool.map(lambda name: _unit_problem(output, name, fingerprint, webdataset),
                                            names)))
    stale = {name for name, problem in problems.items() if problem is not None}
    for name in sorted(stale):
        logger.warning("%s: unit %s is made again: %s", output, name, problems[name])
    return set(names) - stale, stale


def _list_or_empty(uri: str, suffix: str) -> list[str]:
    if not exists(uri):
        return []
    return list_files(uri, suffix)


def _ray_resources(config: GenerateConfig) -> dict[str, float]:
    import ray

    compute = config.compute
    gpus = compute.num_gpus
    if gpus == "auto":
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    # On GPU one GPU per actor is the constraint; a small CPU share keeps a 2-core node schedulable.
    return {"num_gpus": float(gpus), "num_cpus": compute.num_cpus if not gpus else min(compute.num_cpus, 1.0)}


def run_generation(config: GenerateConfig, prepared: PreparedRun | None = None,
                   show_progress: bool = True) -> dict[str, Any]:
    """Generate every unit not yet published; returns a summary (also the job's last log line)."""
    import ray

    prepared = prepared or prepare(config)
    output = config.output.uri
    plan_uri = join_uri(output, PLAN_FILE)
    if not exists(plan_uri):
        write_bytes_atomic(plan_uri, json.dumps(prepared.plan, indent=2).encode())
    todo = prepared.todo
    for name in sorted(prepared.stale):  # the worker skips a unit with a stats file: this one does not hold up
        remove(join_uri(output, stats_file(name)))
    started = time.perf_counter()
    generated_images = 0
    if todo:
        connect_ray(config.compute.concurrency * config.compute.num_cpus, config.relative_locations,
                    local_num_cpus=config.compute.local_num_cpus)
        resources = _ray_resources(config)
        actors = min(config.compute.concurrency, len(todo))  # an actor with no unit would only load the models
        logger.info("generating %d units (%d already done) with %d actor(s), %s", len(todo), len(prepared.done),
                    actors, resources)
        units = ray.data.from_items([unit.to_row() for unit in todo], override_num_blocks=len(todo))
        results = units.map_batches(
            UnitGenerator,
            fn_constructor_kwargs={
                "tokenizer_uri": prepared.models.tokenizer_uri, "var_uri": prepared.models.var_uri,
                "context": prepared.context, "threads": None if resources["num_gpus"] else config.compute.torch_threads,
                "batch_size": config.sampling.batch_size},
            batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
            **resources)
        with tqdm(total=sum(len(u) for u in todo), unit="img", desc="generate", disable=not show_progress) as bar:
            for row in results.iter_rows():
                bar.update(int(row["count"]))
                if not row["skipped"]:
                    generated_images += int(row["count"])
    seconds = time.perf_counter() - started
    finished = {os.path.splitext(uri.replace("\\", "/").rsplit("/", 1)[-1])[0]
                for uri in _list_or_empty(join_uri(output, STATS_DIR), ".json")}
    missing = [unit.name for unit in prepared.units if unit.name not in finished]
    if missing:
        raise RuntimeError(f"{output}: {len(missing)} units have no stats after the run (first: {missing[0]})")
    if config.output.webdataset:
        _write_webdataset_index(prepared)
    npz = export_npz(output, config.output.npz) if config.output.npz else None
    summary = {**prepared.summary(), "units_done": len(prepared.units), "units_todo": 0,
               "units_generated": len(todo), "images_generated": generated_images, "seconds": round(seconds, 2),
               "images_per_second": round(generated_images / seconds, 3) if generated_images else None}
    if npz is not None:
        summary["npz"] = npz
    return summary


def _write_webdataset_index(prepared: PreparedRun) -> None:
    """One index.json for all unit tars, in pipeline.data.shards' format: the set can feed image_dataset."""
    output = prepared.config.output.uri
    shards = []
    for unit in prepared.units:
        stats = json.loads(read_bytes(join_uri(output, stats_file(unit.name))))
        shards.append(ShardInfo(name=webdataset_file(unit.name).split("/", 1)[1], samples=stats["count"],
                                bytes=stats["webdataset"]["bytes"]))
    index = ShardIndex(split="generated", shards=shards, total=sum(s.samples for s in shards),
                       class_names=prepared.class_names, image_size=prepared.models.image_size,
                       channels=prepared.models.channels,
                       source={"generated": prepared.plan["fingerprint"], "var_checksum": prepared.models.var_checksum,
                               "tokenizer_checksum": prepared.models.tokenizer_checksum})
    write_index(index, join_uri(output, WEBDATASET_DIR))
