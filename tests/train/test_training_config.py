"""Training configs, the DeepSpeed config dict, AdamW groups and the reference lr schedule (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import TINY_TOKENIZER, TINY_VAR

from pipeline.core.configuration import ConfigError, StrictModel, load_config
from pipeline.train.config import GPTStageConfig, TokenizerStageConfig, TrainingConfig
from pipeline.train.deepspeed_config import build_deepspeed_config, resolve_precision
from pipeline.train.optimizer import build_optimizer, build_schedule, parameter_groups
from pipeline.train.tokenizer_stage import TokenizerStage
from var_model import TOKENIZER_PRESETS, VAR, VAR_PRESETS, VQVAE, TokenizerConfig, VARConfig

REPO = Path(__file__).resolve().parents[2]


class Job(StrictModel):
    gpt: GPTStageConfig


def test_gradient_accumulation_is_derived_from_global_batch_and_world_size():
    config = TrainingConfig(num_workers=2, global_batch_size=64, micro_batch_size=8)
    assert config.gradient_accumulation_steps(2) == 4
    assert config.gradient_accumulation_steps(4) == 2
    with pytest.raises(ValueError, match="global_batch_size: must be a multiple of micro_batch_size \\* num_workers = 48"):
        config.gradient_accumulation_steps(6)
    with pytest.raises(ValueError, match="global_batch_size"):
        TrainingConfig(num_workers=3, global_batch_size=64, micro_batch_size=8)


def test_bad_values_stop_with_one_line_naming_the_field():
    with pytest.raises(ConfigError) as error:
        load_config(Job, overrides=["gpt.zero_stage=5"])
    assert str(error.value).startswith("config error: gpt.zero_stage:") and "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="steps: set exactly one of steps / epochs"):
        load_config(Job, overrides=["gpt.epochs=2"])
    with pytest.raises(ConfigError, match="offload_parameters: needs zero_stage 3"):
        load_config(Job, overrides=["gpt.offload_parameters=true", "gpt.zero_stage=2"])
    with pytest.raises(ConfigError, match="model.hidden_sizes: unknown VARConfig field"):
        load_config(Job, overrides=["gpt.model={hidden_sizes: 3}"])
    with pytest.raises(ConfigError, match="model.cond_drop_rate: set label_dropout instead"):
        load_config(Job, overrides=["gpt.model={cond_drop_rate: 0.2}"])
    with pytest.raises(ValueError, match="dino_weights: discriminator dino needs"):
        TokenizerStageConfig(adversarial_weight=0.4, discriminator="dino")
    with pytest.raises(ValueError, match="preset: unknown preset"):
        TokenizerStageConfig(preset="nope")


def test_stage_configs_build_their_models():
    gpt = GPTStageConfig(preset="tiny", model={"num_layers": 3}, label_dropout=0.2)
    var_config = gpt.var_config(TOKENIZER_PRESETS["tiny"])
    assert var_config.num_layers == 3 and var_config.cond_drop_rate == 0.2
    assert var_config.hidden_size == VAR_PRESETS["tiny"].hidden_size
    assert TokenizerStageConfig(preset="tiny", model={"codebook_size": 32}).tokenizer_config().codebook_size == 32
    # The reference recipe is the default.
    assert (gpt.betas, gpt.weight_decay, gpt.base_learning_rate, gpt.grad_clip) == ((0.9, 0.95), 0.05, 1e-4, 2.0)
    assert GPTStageConfig(global_batch_size=768, micro_batch_size=96, num_workers=8).learning_rate == pytest.approx(3e-4)
    assert TrainingConfig(steps=None, epochs=2, global_batch_size=64, micro_batch_size=32).total_steps(1000) == 31


def test_deepspeed_config_dict():
    config = TrainingConfig(num_workers=2, zero_stage=3, global_batch_size=64, micro_batch_size=8, grad_clip=2.0,
                            offload_optimizer=True)
    ds = build_deepspeed_config(config, world_size=2, precision="bf16")
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 2.0
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "optimizer" not in ds  # client AdamW: DeepSpeed's own needs an op build
    assert build_deepspeed_config(TrainingConfig(zero_stage=0), 2, "fp32")["zero_optimization"] == {"stage": 0}
    assert resolve_precision(TrainingConfig(), torch.device("cpu")) == "fp32"
    assert resolve_precision(TrainingConfig(precision="bf16"), torch.device("cpu")) == "bf16"


def _group_names(model, no_decay_keys=None):
    groups = parameter_groups(model, no_decay_keys) if no_decay_keys else parameter_groups(model)
    ids = {id(p): name for name, p in model.named_parameters()}
    return {group["name"]: {ids[id(p)] for p in group["params"]} for group in groups}


def test_weight_decay_groups_follow_the_reference():
    names = _group_names(VAR(VARConfig.from_dict(TINY_VAR)))
    no_decay, decay = names["no_decay"], names["decay"]
    for name in ("pos_start", "pos_1LC", "lvl_embed.weight", "blocks.0.attn.scale_mul_1H11", "blocks.0.attn.q_bias",
                 "word_embed.bias", "head.bias"):
        assert name in no_decay, name
    for name in ("blocks.0.attn.mat_qkv.weight", "blocks.0.ffn.fc1.weight", "class_emb.weight", "head.weight",
                 "word_embed.weight", "blocks.0.ada_lin.1.weight"):
        assert name in decay, name
    tokenizer = _group_names(VQVAE(TokenizerConfig.from_dict(TINY_TOKENIZER)), TokenizerStage.no_decay_keys)
    assert "quantize.embedding.weight" in tokenizer["no_decay"]
    assert "encoder.conv_in.weight" in tokenizer["decay"]


def _lrs(config, total, steps):
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer(model, config)
    schedule = build_schedule(optimizer, config, total)
    values, decays = [], []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        decays.append(optimizer.param_groups[0]["weight_decay"])
        optimizer.step()
        schedule.step()
    return values, decays, schedule


def test_reference_schedule_warmup_flat_then_linear_to_final_fraction():
    config = TrainingConfig(steps=200, global_batch_size=256, micro_batch_size=128, base_learning_rate=1e-4,
                            warmup_steps=10, final_lr_fraction=0.1, weight_decay=0.05, final_weight_decay=0.08)
    lrs, decays, _ = _lrs(config, 200, 200)
    peak = 1e-4
    assert lrs[0] == pytest.approx(0.005 * peak)
    assert lrs[5] == pytest.approx((0.005 + 0.995 * 5 / 10) * peak)
    assert lrs[10] == pytest.approx(peak) and lrs[18] == pytest.approx(peak)  # flat for 5% of 189 steps
    assert lrs[-1] == pytest.approx(0.1 * peak)
    after_flat = lrs[20:]
    assert all(a > b for a, b in zip(after_flat, after_flat[1:]))
    assert decays[0] == pytest.approx(0.05) and decays[-1] == pytest.approx(0.08)


def test_schedule_position_resumes_into_a_longer_run():
    config = TrainingConfig(steps=100, global_batch_size=256, micro_batch_size=128, warmup_steps=5)
    _, _, schedule = _lrs(config, 100, 40)
    longer = TrainingConfig(steps=200, global_batch_size=256, micro_batch_size=128, warmup_steps=5)
    optimizer = build_optimizer(torch.nn.Linear(4, 4), longer)
    resumed = build_schedule(optimizer, longer, 200)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.last_epoch == 40
    assert optimizer.param_groups[0]["lr"] == pytest.approx(longer.learning_rate * resumed.lr_lambdas[0](40))


def test_the_transformer_takes_the_tokenizers_contract():
    tokenizer = TOKENIZER_PRESETS["tiny"]
    var_config = GPTStageConfig(model={"hidden_size": 32, "num_heads": 2}).var_config(tokenizer)
    assert (var_config.scales, var_config.codebook_size, var_config.embed_dim) == (
        tokenizer.scales, tokenizer.codebook_size, tokenizer.embed_dim)
    # An older config that still names a contract field is accepted when it agrees ...
    agreeing = GPTStageConfig(model={"scales": list(tokenizer.scales), "codebook_size": tokenizer.codebook_size})
    assert agreeing.var_config(tokenizer).scales == tokenizer.scales
    # ... and refused, naming the field, when it does not.
    with pytest.raises(ValueError, match=r"^model.embed_dim: comes from the tokenizer, whose embed_dim is "):
        GPTStageConfig(model={"embed_dim": tokenizer.embed_dim + 1}).var_config(tokenizer)


def test_no_chain_config_names_the_contract_twice():
    import yaml

    for path in (REPO / "configs").glob("*.yaml"):
        gpt_model = (yaml.safe_load(path.read_text()).get("gpt") or {}).get("model") or {}
        assert not set(gpt_model) & {"scales", "codebook_size", "embed_dim"}, path.name
