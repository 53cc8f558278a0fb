"""jobs/evaluate.py end to end on a tiny random model: every figure present, with its N, and files written;
against Fashion-MNIST's IDX splits (the preset) and against shards (any shard split as the reference).

The generated set is published with the generation writer in-process (no Ray needed here); the
classifier is trained on a 3k-image subset and handed over through its cache, so the test runs in
seconds rather than training on all 60k images.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from jobs import evaluate as evaluate_job
from pipeline.core.configuration import load_config
from pipeline.core.exports import load_tokenizer, load_var, save_tokenizer, save_var
from pipeline.core.images import encode_png
from pipeline.core.storage import join_uri, write_bytes_atomic
from pipeline.data.sharding import MakeShardsConfig, make_shards
from pipeline.data.sources.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from pipeline.evaluation.classifier import load_or_train_classifier
from pipeline.generation.config import GenerateConfig
from pipeline.generation.job import prepare
from pipeline.generation.worker import generate_images
from pipeline.generation.writer import publish_unit
from var_model import VAR, VQVAE, SamplingSettings, TokenizerConfig, VARConfig

TOKENIZER = TokenizerConfig(image_size=32, in_channels=1, scales=(1, 2, 4, 8), codebook_size=64, embed_dim=8,
                            base_channels=16, channel_multipliers=(1, 2, 2), num_res_blocks=1, use_attention=False,
                            norm_groups=8)
VAR_CONFIG = VARConfig(hidden_size=32, num_layers=1, num_heads=2, scales=(1, 2, 4, 8), codebook_size=64,
                       embed_dim=8, num_classes=10, drop_path=0.0)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, fashion_mnist_dir) -> str:
    """A run laid out as train_var leaves it (exports + metrics.jsonl) plus a generated set of 40 images."""
    run = str(tmp_path_factory.mktemp("eval") / "run")
    torch.manual_seed(0)
    tokenizer_uri, var_uri = join_uri(run, "tokenizer", "export"), join_uri(run, "gpt", "export")
    save_tokenizer(VQVAE(TOKENIZER), tokenizer_uri)
    save_var(VAR(VAR_CONFIG), var_uri)
    for uri in (tokenizer_uri, var_uri):
        history = [{"step": step, "loss": 4.0 - step * 0.1, "scale_loss_0": 1.0} for step in range(10)]
        write_bytes_atomic(join_uri(uri, "metrics.jsonl"), "\n".join(json.dumps(h) for h in history).encode())
    config = load_config(GenerateConfig, None, [f"model.run={run}", f"output.uri={join_uri(run, 'generated')}",
                                                "plan.per_class=4", "plan.unit_size=20", "sampling.batch_size=20",
                                                "output.class_names=" + json.dumps(list(CLASS_NAMES))])
    prepared = prepare(config)
    write_bytes_atomic(join_uri(run, "generated", "plan.json"), json.dumps(prepared.plan).encode())
    tokenizer, var = load_tokenizer(tokenizer_uri), load_var(var_uri)
    for unit in prepared.units:
        images = generate_images(var, tokenizer, unit.labels, unit.seeds, SamplingSettings(), batch_size=20)
        publish_unit(unit, images, [encode_png(image) for image in images], prepared.context, 1.0)
    images, labels = load_fashion_mnist("train", fashion_mnist_dir)
    load_or_train_classifier(join_uri(run, "classifier.safetensors"), images[:3000], labels[:3000])
    return run


def _finite_numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [value for item in tree.values() for value in _finite_numbers(item)]
    if isinstance(tree, list):
        return [value for item in tree for value in _finite_numbers(item)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def _check_inception_figures(figures: dict, n: int) -> None:
    """FID, KID, precision/recall at one N with their train-vs-reference floor, every number finite."""
    assert figures["n"] == n
    for name in ("fid", "kid", "precision_recall", "classifier_score", "class_consistency"):
        assert all(math.isfinite(v) for v in _finite_numbers(figures[name])), (name, figures[name])
    fid = figures["fid"]
    assert fid["n"] == n and fid["generated_vs_reference"] > fid["train_vs_reference"] > 0
    kid = figures["kid"]
    assert kid["n"] == n and kid["subset_size"] == n and kid["generated_vs_reference"] > kid["train_vs_reference"]
    pr = figures["precision_recall"]
    assert pr["n"] == n and pr["k"] == 3
    assert all(0.0 <= pr[side][name] <= 1.0 for side in ("generated", "train") for name in ("precision", "recall"))
    score = figures["classifier_score"]
    assert score["splits"] == 10 and 1.0 <= score["generated"] and 1.0 <= score["reference"]
    assert figures["inception_score"]["available"] is False and "logits" in figures["inception_score"]["reason"]


@pytest.mark.timeout(300)
def test_evaluate_writes_every_figure(run_folder, capsys):
    code = evaluate_job.main(["--run", run_folder, "--preset", "fashion-mnist", "--samples", "6",
                              "--set", "fid.batch_size=6", "--set", "features.samples=40",
                              "--set", "reconstruction.samples=20",
                              "--set", f"classifier.cache={join_uri(run_folder, 'classifier.safetensors')}",
                              "--set", "grid_per_class=3"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    figures = json.loads(captured.out.strip().splitlines()[-1])
    assert figures == json.loads(open(join_uri(run_folder, "eval", "metrics.json")).read())
    assert figures["images"] == 40 and figures["format"] == "varray.eval/2"
    reference = figures["reference"]
    assert reference["source"] == reference["kind"] == "fashion-mnist" and reference["split"] == "test"
    assert reference["images"] == 10000 and reference["image_size"] == 28 and reference["train"]["images"] == 60000

    _check_inception_figures(figures, 6)
    assert figures["fid"]["reconstruction_vs_reference"] > 0
    features = figures["feature_frechet"]
    assert features["n"] == 40 and features["generated_vs_reference"] > 5 * features["train_vs_reference"]

    consistency = figures["class_consistency"]
    assert 0.0 <= consistency["overall"] <= 1.0 and consistency["n"] == 40
    assert set(consistency["per_class"]) == set(CLASS_NAMES)
    assert consistency["reference_accuracy"] > 0.6  # the 3k-image classifier; chance is 0.1

    reconstruction = figures["reconstruction"]
    assert reconstruction["n"] == 20 and reconstruction["image_size"] == 32 and 0 < reconstruction["psnr_db"] < 100

    with Image.open(join_uri(run_folder, "eval", "samples.png")) as grid:
        assert grid.format == "PNG" and grid.height > 10 * 32  # ten class rows, enlarged
    with Image.open(join_uri(run_folder, "eval", "loss_curves.png")) as curves:
        assert curves.format == "PNG"


@pytest.mark.timeout(300)
def test_evaluate_against_any_shard_split(run_folder, fashion_mnist_dir, tmp_path, capsys):
    """The reference and train splits as shards (make_shards' Fashion-MNIST at 20 px): generated 32 px images
    are brought to 20 px, the classifier trains on the train shards and is cached under a digest."""
    shards = tmp_path / "shards"
    make_shards(MakeShardsConfig(source="fashion-mnist", input=fashion_mnist_dir, output=str(shards), image_size=20,
                                 limit=400, samples_per_shard=100))
    arguments = ["--run", run_folder, "--reference", str(shards / "test"), "--output", str(tmp_path / "eval"),
                 "--set", f"reference.train_shards_uri={shards / 'train'}", "--samples", "6",
                 "--set", "fid.batch_size=6", "--set", "features.samples=40", "--set", "reconstruction.samples=0",
                 "--set", "classifier.min_steps=20", "--set", f"cache={tmp_path / 'cache'}"]
    assert evaluate_job.main(arguments) == 0, capsys.readouterr().err
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    reference = figures["reference"]
    assert reference["source"] == "shards" and reference["uri"] == str(shards / "test")
    assert reference["image_size"] == 20 and reference["images"] == 400 and reference["train"]["images"] == 400
    assert reference["class_names"] == list(CLASS_NAMES)
    _check_inception_figures(figures, 6)
    assert "reconstruction_vs_reference" not in figures["fid"] and "reconstruction" not in figures
    cached = sorted(path.name for path in (tmp_path / "cache").iterdir())
    assert len(cached) == 3 and cached[0].startswith("classifier_") and cached[1].startswith("inception_")
    # Again: the classifier and both real feature sets come from the cache, the figures are the same.
    assert evaluate_job.main(arguments) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["fid"] == figures["fid"] and again["class_consistency"] == figures["class_consistency"]
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == cached


def test_evaluate_refuses_a_missing_set(tmp_path, capsys):
    code = evaluate_job.main(["--generated", str(tmp_path / "nothing"), "--output", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "holds no generated set" in err
    assert not (tmp_path / "eval").exists()


def test_evaluate_refuses_a_run_without_a_reference(run_folder, capsys):
    """No config.json recording a validation split, no --reference, no preset: one line saying what to give."""
    code = evaluate_job.main(["--run", run_folder, "--output", join_uri(run_folder, "eval_none")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "reference.source: run needs" in err and "--reference" in err
    code = evaluate_job.main(["--run", run_folder, "--reference", join_uri(run_folder, "no_shards")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "reference.shards_uri:" in err
