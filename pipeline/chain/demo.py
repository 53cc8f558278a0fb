"""The laptop demo, end to end in one process: shards -> tokenizer + VAR -> generated set -> evaluation.

Each step skips what already exists (the chain's exports and cache, finished generation units, an
evaluation of the same set), so the command resumes after an interruption. Wall time per step and
the headline figures go to `<run>/demo.json`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

from pydantic import Field

from pipeline.chain.config import TrainVarConfig
from pipeline.chain.run import run_chain
from pipeline.core.configuration import StrictModel
from pipeline.core.layout import RunLayout
from pipeline.core.storage import exists, join_uri, read_bytes, write_bytes_atomic
from pipeline.evaluation.config import EvaluateConfig
from pipeline.evaluation.run import METRICS_FILE, evaluate
from pipeline.generation.config import GenerateConfig
from pipeline.generation.job import prepare, run_generation

logger = logging.getLogger(__name__)

DEMO_FILE = "demo.json"


class DemoSettings(StrictModel):
    """What the demo adds to the training config: how much to generate and how to measure it."""

    per_class: int = Field(100, ge=1, description="generated images per class")
    unit_size: int = Field(100, ge=1, description="images per generated Parquet file")
    concurrency: int = Field(2, ge=1, description="generator actors (1 CPU, 1 thread each)")
    batch_size: int = Field(100, ge=1, description="images per generate() call")
    fid_samples: int = Field(1000, ge=0, description="N per side for Inception FID, KID and precision/recall, "
                                                     "each next to its train-vs-test floor (0 skips; ~5-10 img/s "
                                                     "on 2 cores)")
    feature_samples: int = Field(10000, ge=0, description="N for the classifier-feature Frechet distance")
    reconstruction_samples: int = Field(1000, ge=0, description="test images for reconstruction PSNR")


def generate_config(train: TrainVarConfig, settings: DemoSettings) -> GenerateConfig:
    layout = train.layout
    return GenerateConfig.model_validate({
        "model": {"run": layout.run},
        "plan": {"per_class": settings.per_class, "unit_size": settings.unit_size, "seed": train.sample.seed},
        # The chain's sample-grid settings: the set and the training grid show the same sampler.
        "sampling": {**train.sample.settings.as_kwargs(), "batch_size": settings.batch_size},
        "compute": {"concurrency": settings.concurrency, "num_cpus": 1.0, "threads": 1},
        "output": {"uri": layout.generated, "class_names": _class_names(train)},
    })


def _class_names(train: TrainVarConfig) -> list[str] | None:
    from pipeline.data.shards import read_index

    try:
        return read_index(train.data.train.shards_uri).class_names
    except Exception:  # shards not written yet (dry run): names come from the exports or indices
        return None


def evaluate_config(train: TrainVarConfig, settings: DemoSettings) -> EvaluateConfig:
    # The reference is the run's validation split (the demo's: Fashion-MNIST's test split as shards); a
    # config without one that shards Fashion-MNIST is judged against its IDX test split (the preset).
    create = train.data.create
    preset = "fashion-mnist" if train.data.validation is None and create and create.source == "fashion-mnist" \
        else None
    return EvaluateConfig.model_validate({
        "preset": preset,
        "model": {"run": train.layout.run},
        "fid": {"samples": settings.fid_samples},
        "features": {"samples": settings.feature_samples},
        "reconstruction": {"samples": settings.reconstruction_samples},
    })


def _evaluation_current(layout: RunLayout, generated: dict[str, Any]) -> dict[str, Any] | None:
    """The existing metrics.json if it judged this very set (same plan, same model)."""
    uri = join_uri(layout.evaluation, METRICS_FILE)
    if not exists(uri):
        return None
    figures = json.loads(read_bytes(uri))
    return figures if figures.get("plan_fingerprint") == generated["plan_fingerprint"] else None


def headline(figures: dict[str, Any]) -> dict[str, Any]:
    fid, kid, features = figures.get("fid", {}), figures.get("kid", {}), figures.get("feature_frechet", {})
    precision_recall = figures.get("precision_recall", {})
    consistency = figures.get("class_consistency", {})
    return {
        "fid_n": fid.get("n"), "fid_generated_vs_test": fid.get("generated_vs_reference"),
        "fid_train_vs_test": fid.get("train_vs_reference"),
        "fid_reconstruction_vs_test": fid.get("reconstruction_vs_reference"),
        "kid_generated_vs_test": kid.get("generated_vs_reference"), "kid_train_vs_test": kid.get("train_vs_reference"),
        "precision": precision_recall.get("generated", {}).get("precision"),
        "recall": precision_recall.get("generated", {}).get("recall"),
        "class_consistency": consistency.get("overall"),
        "classifier_test_accuracy": consistency.get("reference_accuracy"),
        "feature_frechet_n": features.get("n"), "feature_frechet_generated_vs_test": features.get("generated_vs_reference"),
        "feature_frechet_train_vs_test": features.get("train_vs_reference"),
        "reconstruction_psnr_db": figures.get("reconstruction", {}).get("psnr_db"),
    }


def run_demo(train: TrainVarConfig, settings: DemoSettings, force: Sequence[str] = ()) -> dict[str, Any]:
    started = time.time()
    layout = train.layout
    steps: dict[str, Any] = {}

    logger.info("demo 1/3: train (shards -> tokenizer -> token cache -> VAR -> samples.png) under %s", layout.run)
    chain = run_chain(train, force=force)
    steps["train"] = {"seconds": chain["seconds"], "steps": chain["steps"]}

    logger.info("demo 2/3: generate %d images per class", settings.per_class)
    step_started = time.time()
    generation = generate_config(train, settings)
    prepared = prepare(generation)
    generated = run_generation(generation, prepared)
    steps["generate"] = {"seconds": round(time.time() - step_started, 1),
                         "units_generated": generated["units_generated"],
                         "images": generated["images"], "images_per_second": generated["images_per_second"]}

    logger.info("demo 3/3: evaluate")
    step_started = time.time()
    figures = _evaluation_current(layout, generated)
    if figures is None:
        figures = evaluate(evaluate_config(train, settings))
        steps["evaluate"] = {"seconds": round(time.time() - step_started, 1)}
    else:
        steps["evaluate"] = {"status": "skipped"}
    summary = {"run": layout.run, "wall_seconds": round(time.time() - started, 1), "steps": steps,
               "figures": headline(figures), "samples": figures["files"]["samples"],
               "loss_curves": figures["files"].get("loss_curves"),
               "metrics": join_uri(layout.evaluation, METRICS_FILE)}
    write_bytes_atomic(join_uri(layout.run, DEMO_FILE), json.dumps(summary, indent=2).encode())
    return summary

