"""Both stages train under Ray Train + DeepSpeed ZeRO on 2 CPU workers: the tokenizer's recipe at ZeRO 0, 2 and
3, the transformer at ZeRO 1 and 3. ZeRO 1 and 2 take one path through the stages' code (a whole EMA and
export on rank 0; they differ inside DeepSpeed only), and the other stage of each pair runs in the suite
elsewhere: the tiny chain trains the tokenizer at ZeRO 1, the fault-tolerance test the transformer at ZeRO 2.

One fit per (stage, ZeRO stage), on a fixed set of global_batch_size samples (so every step sees
the same batch), checkpointing to a local folder. Each fit checks: the loss goes down, the metrics
the stage promises are there, only the newest `keep_checkpoints` checkpoints remain, and the
export equals DeepSpeed's own consolidation of the last checkpoint (the tokenizer's: the EMA that
checkpoint holds; its fit trains the adversarial recipe, ZeRO 0-3).
"""

from __future__ import annotations

import json
import os

import pytest
import ray
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from train_helpers import TINY_TOKENIZER, TINY_VAR, checkpoint_names, read_metrics

from pipeline.core.exports import load_tokenizer, load_var, read_export_info
from pipeline.data.reader import ImageDataConfig
from pipeline.train.checkpointing import DEEPSPEED_DIR, DEEPSPEED_TAG
from pipeline.train.config import GPTStageConfig, TokenizerStageConfig
from pipeline.train.gpt_stage import train_gpt
from pipeline.train.tokenizer_stage import EMA_DIR, run_tokenizer_stage

pytestmark = [pytest.mark.ray]

STEPS = 6
COMMON = dict(num_workers=2, global_batch_size=32, micro_batch_size=16, steps=STEPS, warmup_steps=1,
              checkpoint_every=3, keep_checkpoints=1, log_every=1, max_failures=0)


def _check_export_matches_checkpoint(run_dir: str, model: torch.nn.Module) -> None:
    (last,) = checkpoint_names(run_dir)
    assert last == f"step_{STEPS:08d}"
    consolidated = get_fp32_state_dict_from_zero_checkpoint(os.path.join(run_dir, last, DEEPSPEED_DIR),
                                                            tag=DEEPSPEED_TAG)
    parameters = dict(model.named_parameters())
    assert set(parameters) <= set(consolidated), set(parameters) - set(consolidated)
    for name, tensor in parameters.items():
        torch.testing.assert_close(tensor.detach(), consolidated[name].float(), rtol=0, atol=0, msg=name)


def _check_common(metrics: list[dict], info: dict, zero_stage: int, precision: str = "fp32",
                  loss: str = "loss") -> None:
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert metrics[-1][loss] < metrics[0][loss], [m[loss] for m in metrics]
    for key in ("samples_per_second", "data_wait_seconds", "learning_rate", "epoch"):
        assert key in metrics[-1]
    assert info["zero_stage"] == zero_stage and info["step"] == STEPS and info["resumed_from"] == []
    assert info["num_workers"] == 2 and info["precision"] == precision


def _ema_of_checkpoint(checkpoint: str, model: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """The EMA a checkpoint holds, whole: rank 0's file, or the ranks' ZeRO-3 partitions put together."""
    files = sorted(os.listdir(os.path.join(checkpoint, EMA_DIR)))
    states = [torch.load(os.path.join(checkpoint, EMA_DIR, name), weights_only=True)["parameters"] for name in files]
    if zero_stage < 3:
        assert files == ["rank_0.pt"]
        return states[0]
    assert files == ["rank_0.pt", "rank_1.pt"]
    shapes = {name: p.shape for name, p in model.named_parameters()}
    return {name: torch.cat([state[name] for state in states])[:shapes[name].numel()].view(shapes[name])
            for name in states[0]}


@pytest.mark.timeout(480)
@pytest.mark.parametrize("zero_stage,precision", [(0, "fp32"), (2, "fp32"), (3, "bf16")])
def test_tokenizer_stage_trains_the_recipe_with_zero(ray_cluster, train_shards, tmp_path, zero_stage, precision):
    """The adversarial recipe (PatchGAN from step 4 of 6, adaptive weight, bCR, EMA, validation rFID):
    one fit per ZeRO stage, every assertion on it."""
    config = TokenizerStageConfig(model=TINY_TOKENIZER, zero_stage=zero_stage, precision=precision,
                                  base_learning_rate=2e-2, dead_code_reset_every=2, reconstruction_l1_weight=0.2,
                                  adversarial_weight=0.4, discriminator_start=0.5, discriminator_warmup=0.34,
                                  discriminator_channels=8, discriminator_layers=2, consistency_weight=1.0,
                                  ema_decay=0.999, validate_every=3, validation_samples=32, fid_samples=16, **COMMON)
    data = ImageDataConfig(shards_uri=train_shards, shuffle=False, shuffle_buffer_size=0)
    export = run_tokenizer_stage(config, data, str(tmp_path), "tokenizer", validation=data)
    metrics, info = read_metrics(export), read_export_info(export)
    _check_common(metrics, info, zero_stage, precision, loss="reconstruction_l2")
    for key in ("vq_loss", "codebook_usage", "codebook_perplexity", "codebook_ema_usage", "reconstruction_l1",
                "ema_decay", *(f"codebook_{kind}_scale_{index}" for kind in ("usage", "perplexity") for index in range(3))):
        assert key in metrics[-1], key
    assert any(m.get("dead_codes_reset", 0) > 0 for m in metrics)  # a random tiny codebook has dead codes
    # The discriminator acts from step 4 (start 0.5 of 6 steps: after 3) and not before.
    adversarial = ("generator_loss", "adaptive_weight", "discriminator_loss", "discriminator_consistency",
                   "logits_real", "logits_fake", "discriminator_factor")
    for record in metrics:
        for key in adversarial:
            assert (key in record) == (record["step"] >= 4), (record["step"], key)
    assert [m["discriminator_factor"] for m in metrics[3:]] == [0.5, 1.0, 1.0]
    assert all(0.015 <= m["adaptive_weight"] <= 1e4 for m in metrics[3:])
    # Validation passes at steps 3 and 6: losses, PSNR and rFID of the EMA weights.
    validated = [m["step"] for m in metrics if "val_rfid" in m]
    assert validated == [3, 6], validated
    assert all(m["val_rfid"] >= 0 and m["val_psnr_db"] > 0 and m["val_rfid_samples"] == 16 for m in metrics
               if "val_rfid" in m)
    # The export holds the EMA (what the last checkpoint saved), and says so.
    assert info["weights"] == "ema" and info["ema_decay"] == 0.999 and info["ema_updates"] == STEPS
    assert info["recipe"]["adversarial_weight"] == 0.4
    checkpoint = os.path.join(tmp_path, "tokenizer", checkpoint_names(os.path.join(tmp_path, "tokenizer"))[-1])
    model = load_tokenizer(export)
    ema = _ema_of_checkpoint(checkpoint, model, zero_stage)
    for name, tensor in model.named_parameters():
        torch.testing.assert_close(tensor.detach(), ema[name], rtol=0, atol=0, msg=name)
    assert os.path.exists(os.path.join(checkpoint, "discriminator", "latest"))


@pytest.mark.timeout(480)
@pytest.mark.parametrize("zero_stage,precision", [(1, "fp32"), (3, "bf16")])
def test_gpt_stage_trains_with_zero(ray_cluster, token_rows, tiny_tokenizer, tmp_path, zero_stage, precision):
    # ZeRO-3 in bf16: the GPU configuration (DeepSpeed's bf16 runs on CPU too; fp16 does not).
    config = GPTStageConfig(model=TINY_VAR, zero_stage=zero_stage, precision=precision, base_learning_rate=3e-2,
                            shuffle_buffer_size=0, **COMMON)
    dataset = ray.data.from_items(token_rows[:32])  # one fixed batch
    export = train_gpt(config, dataset, tiny_tokenizer, str(tmp_path), "gpt")
    metrics, info = read_metrics(export), read_export_info(export)
    _check_common(metrics, info, zero_stage, precision)
    assert metrics[0]["learning_rate"] == pytest.approx(config.learning_rate * config.warmup_start_factor)
    for index in range(3):  # tiny preset: scales (1, 2, 4)
        assert f"scale_loss_{index}" in metrics[-1] and f"scale_accuracy_{index}" in metrics[-1]
    assert 0 <= metrics[-1]["accuracy"] <= 1
    assert info["tokenizer_checksum"] == read_export_info(tiny_tokenizer)["checksum"]
    _check_export_matches_checkpoint(os.path.join(tmp_path, "gpt"), load_var(export))
    with open(os.path.join(tmp_path, "gpt", f"step_{STEPS:08d}", "train_state.json")) as f:
        assert json.load(f)["step"] == STEPS
