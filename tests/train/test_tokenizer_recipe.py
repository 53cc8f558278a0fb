"""The tokenizer recipe on the pipeline side without Ray: the config preset and its rules, a missing
weights file through the real CLI, the adaptive weight at a ZeRO-3-safe layer, the discriminator's
schedule in the stage, and a save -> load of both engines and the EMA at ZeRO 0-3 (one gloo rank)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_helpers import TINY_TOKENIZER

from pipeline.core.configuration import ConfigError, StrictModel, load_config
from pipeline.train.config import RECIPE_LEARNING_RATE, TOKENIZER_RECIPES, TokenizerStageConfig
from pipeline.train.tokenizer_recipe import adaptive_weight_at_conv, per_scale_code_statistics
from pipeline.train.tokenizer_stage import TokenizerStage
from var_model import VQVAE, TokenizerConfig
from var_model.tokenizer_losses import adaptive_adversarial_weight

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


class Job(StrictModel):
    tokenizer: TokenizerStageConfig


def test_the_vqgan_preset_carries_the_official_values_and_explicit_fields_win():
    config = TokenizerStageConfig(recipe="vqgan", global_batch_size=64, micro_batch_size=32)
    assert (config.reconstruction_l1_weight, config.reconstruction_l2_weight, config.perceptual_weight,
            config.adversarial_weight, config.discriminator_loss, config.adaptive_weight) == (
        0.2, 1.0, 0.5, 0.4, "hinge", True)
    assert config.tokenizer_config().beta == 0.25 and config.discriminator_start == 0.22
    assert config.betas == config.discriminator_betas == (0.5, 0.9) and config.ema_decay == 0.9999
    assert config.learning_rate == pytest.approx(RECIPE_LEARNING_RATE) == config.discriminator_lr
    explicit = TokenizerStageConfig(recipe="vqgan", perceptual_weight=0, adversarial_weight=0.1, base_learning_rate=1e-3,
                                    model={"beta": 0.5})
    assert (explicit.perceptual_weight, explicit.adversarial_weight, explicit.base_learning_rate) == (0.0, 0.1, 1e-3)
    assert explicit.tokenizer_config().beta == 0.5 and explicit.reconstruction_l1_weight == 0.2
    assert set(TOKENIZER_RECIPES["vqgan"]) <= set(TokenizerStageConfig.model_fields)
    # Without a recipe the terms are off: no network is built for them.
    plain = TokenizerStageConfig()
    assert not plain.uses_discriminator and not plain.uses_lpips and plain.ema_decay == 0
    assert plain.weights_files() == {}


@pytest.mark.parametrize("override,field", [
    ("tokenizer.recipe=vqgan2", "tokenizer.recipe"),
    ("tokenizer.discriminator=stylegan", "tokenizer.discriminator"),
    ("tokenizer.discriminator_start=1.5", "tokenizer.discriminator_start"),
    ("tokenizer.discriminator_betas=[0.5,1.0]", "tokenizer.discriminator_betas"),
    ("tokenizer.ema_decay=1.0", "tokenizer.ema_decay"),
    ("tokenizer.adversarial_weight=-1", "tokenizer.adversarial_weight"),
    ("tokenizer.fid_samples=5000", "tokenizer.fid_samples"),
    ("tokenizer.consistency_weight=4", "tokenizer.consistency_weight"),
])
def test_each_new_field_is_validated_in_one_line(override, field):
    with pytest.raises(ConfigError) as error:
        load_config(Job, overrides=[override])
    message = str(error.value)
    assert message.startswith(f"config error: {field}:") and "\n" not in message, message


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "train_tokenizer.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.timeout(300)
def test_a_missing_weights_file_is_one_line_through_the_cli(tmp_path):
    common = ["--config", str(REPO / "configs" / "fashion_mnist.yaml"), "--storage", str(tmp_path / "runs"),
              "--dry-run"]
    missing = tmp_path / "nowhere" / "vgg16.pth"
    result = _cli(*common, "--set", "tokenizer.perceptual_weight=0.5", "--set", f"tokenizer.vgg_weights={missing}")
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("train_tokenizer: config error: tokenizer.vgg_weights: weights file not found: "), line
    assert str(missing) in line and "vgg16" in line and "torchvision" in line
    dino = tmp_path / "dino_vits16.pth"
    result = _cli(*common, "--set", "tokenizer.discriminator=dino", "--set", f"tokenizer.dino_weights={dino}")
    line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and line.startswith("train_tokenizer: config error: tokenizer.dino_weights: "), line
    assert str(dino) in line and "DINO ViT-S/16" in line


def test_adaptive_weight_at_the_conv_equals_the_weight_gradient_ratio():
    torch.manual_seed(0)
    model = VQVAE(TokenizerConfig.from_dict(TINY_TOKENIZER))
    inputs: list[torch.Tensor] = []
    model.decoder.conv_out.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    reconstruction = model(images).reconstruction
    nll = (reconstruction - images).abs().mean() + (reconstruction - images).square().mean()
    generator = -(reconstruction * torch.linspace(-1, 1, 16)).mean()  # any other loss of the same output
    expected = adaptive_adversarial_weight(nll, generator, model.decoder.conv_out.weight)
    got = adaptive_weight_at_conv(model.decoder.conv_out, inputs[-1], reconstruction, nll, generator)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_per_scale_code_statistics():
    maps = [torch.tensor([[0, 0], [0, 0]]), torch.tensor([[0, 1], [2, 3]])]
    usage, perplexity = per_scale_code_statistics(maps, codebook_size=8)
    torch.testing.assert_close(usage, torch.tensor([1 / 8, 4 / 8]))
    torch.testing.assert_close(perplexity, torch.tensor([1.0, 4.0]))


def test_the_discriminator_acts_from_its_start_step_and_not_before():
    config = TokenizerStageConfig(model=TINY_TOKENIZER, num_workers=1, global_batch_size=4, micro_batch_size=4,
                                  steps=10, adversarial_weight=0.4, discriminator_start=0.3, discriminator_warmup=0.2)
    stage = TokenizerStage(config)
    stage.start_step, stage.warmup_steps = config.discriminator_steps(10)
    assert (stage.start_step, stage.warmup_steps) == (3, 2)
    assert [stage.discriminator_factor(step) for step in range(6)] == [0, 0, 0, 0.5, 1, 1]
    calls: list[int] = []

    class Spy(torch.nn.Module):  # a discriminator that records when it is asked
        def forward(self, images):
            calls.append(stage.step)
            return images.mean(dim=(1, 2, 3), keepdim=True)

    class Engine:
        module = Spy()

    stage.setup_worker(torch.device("cpu"))
    model = stage.build_model().train()
    stage.setup_engine(type("E", (), {"module": model})())
    stage.discriminator_engine = Engine()
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    for step in range(5):
        stage.before_micro_batch(step)
        _, metrics = stage.compute_loss(model, {"image": images}, torch.float32)
        assert ("generator_loss" in metrics) == (step >= 3), (step, sorted(metrics))
        stage.pending = None
    assert calls == [3, 4]
    assert TokenizerStage(TokenizerStageConfig(model=TINY_TOKENIZER)).discriminator_factor(10**6) == 0


@pytest.mark.timeout(600)
def test_resume_restores_discriminator_both_optimizers_and_ema_exactly(tmp_path):
    """ZeRO 0-3 in one subprocess: train 2 steps, save, load into fresh engines, compare every tensor."""
    result = subprocess.run([sys.executable, str(HERE / "recipe_engines.py"), str(tmp_path), "0", "1", "2", "3"],
                            capture_output=True, text=True, timeout=560, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [report["zero_stage"] for report in reports] == [0, 1, 2, 3]
    for report in reports:
        assert report["differences_before_load"] > 0  # the fresh engines really differed
        assert report["differences_after_load"] == [], report
        assert report["step"] == 2 and report["ema_updates"] == 2
        assert any(name.startswith("discriminator/") for name in report["files"])
        assert any(name.startswith("ema/rank_0") for name in report["files"])
        for name in ("adaptive_weight", "generator_loss", "discriminator_loss", "logits_real", "logits_fake",
                     "codebook_usage_scale", "codebook_perplexity_scale"):
            assert name in report["metrics"]


class _RunsCode:
    # eval, not print: in a session that imported Ray, builtins.print is Ray's tqdm-safe print.
    def __reduce__(self):
        return (eval, ("'a planted pickle ran'",))


def test_a_planted_pickle_in_the_ema_file_is_refused_before_loading(tmp_path):
    from pipeline.train.checkpointing import CheckpointError, check_checkpoint_folder, safe_torch_load

    (tmp_path / "ema").mkdir()
    torch.save({"parameters": {"w": torch.zeros(2)}, "buffers": {}, "decay": 0.9, "warmup": True, "num_updates": 1},
               tmp_path / "ema" / "rank_0.pt")
    check_checkpoint_folder(str(tmp_path))  # plain tensors and numbers pass
    assert safe_torch_load(str(tmp_path / "ema" / "rank_0.pt"))["num_updates"] == 1
    torch.save({"parameters": {"w": _RunsCode()}}, tmp_path / "ema" / "rank_1.pt")
    with pytest.raises(CheckpointError, match=r"ema/rank_1.pt: refused to load: it names builtins.eval"):
        check_checkpoint_folder(str(tmp_path))
