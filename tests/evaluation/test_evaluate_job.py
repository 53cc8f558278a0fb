"""jobs/evaluate.py end to end on a tiny random model: every figure present, with its N, and files written.

The generated set is published with the generation writer in-process (no Ray needed here); the
classifier is trained on a 3k-image subset and handed over through its cache, so the test runs in
seconds rather than training on all 60k images.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from jobs import evaluate as evaluate_job
from pipeline.core.configuration import load_config
from pipeline.core.exports import load_tokenizer, load_var, save_tokenizer, save_var
from pipeline.core.images import encode_png
from pipeline.core.storage import join_uri, write_bytes_atomic
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


@pytest.mark.timeout(300)
def test_evaluate_writes_every_figure(run_folder, capsys):
    code = evaluate_job.main(["--run", run_folder, "--set", "fid.samples=6", "--set", "fid.batch_size=6",
                              "--set", "features.samples=40", "--set", "reconstruction.samples=20",
                              "--set", f"classifier.cache={join_uri(run_folder, 'classifier.safetensors')}",
                              "--set", "grid_per_class=3"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    figures = json.loads(captured.out.strip().splitlines()[-1])
    assert figures == json.loads(open(join_uri(run_folder, "eval", "metrics.json")).read())
    assert figures["images"] == 40 and figures["format"] == "varray.eval/1"

    fid = figures["fid"]
    assert fid["n"] == 6 and fid["generated_vs_test"] > 0 and fid["train_vs_test"] > 0
    assert fid["reconstruction_vs_test"] > 0
    # Random weights make noise; real training images are far closer to the test images than it is.
    assert fid["generated_vs_test"] > fid["train_vs_test"]
    features = figures["feature_frechet"]
    assert features["n"] == 40 and features["generated_vs_test"] > 5 * features["train_vs_test"]

    consistency = figures["class_consistency"]
    assert 0.0 <= consistency["overall"] <= 1.0 and consistency["n"] == 40
    assert set(consistency["per_class"]) == set(CLASS_NAMES)
    assert consistency["real_test_accuracy"] > 0.6  # the 3k-image classifier; chance is 0.1

    reconstruction = figures["reconstruction"]
    assert reconstruction["n"] == 20 and reconstruction["image_size"] == 32 and 0 < reconstruction["psnr_db"] < 100

    with Image.open(join_uri(run_folder, "eval", "samples.png")) as grid:
        assert grid.format == "PNG" and grid.height > 10 * 32  # ten class rows, enlarged
    with Image.open(join_uri(run_folder, "eval", "loss_curves.png")) as curves:
        assert curves.format == "PNG"


def test_evaluate_refuses_a_missing_set(tmp_path, capsys):
    code = evaluate_job.main(["--generated", str(tmp_path / "nothing"), "--output", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "holds no generated set" in err
    assert not (tmp_path / "eval").exists()
