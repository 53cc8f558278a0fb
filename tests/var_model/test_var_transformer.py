"""The VAR transformer: shapes, the official layout and sizes, teacher forcing vs. KV cache, causality."""

from __future__ import annotations

import math

import pytest
import torch
from var_helpers import random_token_maps, tiny_pair

from var_model import VAR, VAR_PRESETS, VARConfig
from var_model.edifice_api import prefix_teacher_input

SCHEDULES = [(1, 2, 4), (1, 2, 3, 4), (2, 4, 8), (1, 2, 3, 4, 5, 6, 8)]


@pytest.mark.parametrize("scales", SCHEDULES)
def test_forward_shapes_and_token_counts(scales):
    var, tokenizer = tiny_pair(scales)
    token_maps = random_token_maps(var.config, batch=3)
    teacher_input = tokenizer.teacher_forcing_input(token_maps)
    total = sum(s * s for s in scales)
    assert var.num_tokens == total == var.config.total_tokens
    assert teacher_input.shape == (3, total - scales[0] ** 2, var.config.embed_dim)
    logits = var(torch.tensor([0, 3, 9]), teacher_input)
    assert logits.shape == (3, total, var.config.codebook_size)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert var.attn_bias_for_masking.shape == (1, 1, total, total)
    assert var.lvl_1L.shape == (1, total)


def test_teacher_input_must_end_on_a_scale():
    var, _ = tiny_pair((1, 2, 4))
    with pytest.raises(ValueError, match="teacher_input"):
        var(torch.tensor([0]), torch.zeros(1, 5, var.config.embed_dim))


OFFICIAL_PARAMETERS = {16: 310_283_520, 20: 600_917_136, 24: 1_033_399_360, 30: 2_010_020_356}


@pytest.mark.parametrize("depth", sorted(OFFICIAL_PARAMETERS))
def test_parameter_counts_match_official(depth):
    with torch.device("meta"):
        model = VAR(VARConfig.from_depth(depth))
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMETERS[depth]


def test_d36_shared_adaln_parameter_count_and_keys():
    with torch.device("meta"):
        model = VAR(VAR_PRESETS["d36-s"])
    assert sum(p.numel() for p in model.parameters()) == 2_353_893_904
    keys = model.state_dict().keys()
    assert len(keys) == 446
    assert "shared_ada_lin.1.weight" in keys and "blocks.35.ada_gss" in keys
    assert not any(".ada_lin." in key for key in keys if key.startswith("blocks."))


def official_d16_keys() -> set[str]:
    """var_d16.pth's 220 keys as the reference (section 6) lists them."""
    keys = {"pos_start", "pos_1LC", "lvl_1L", "attn_bias_for_masking", "word_embed.weight", "word_embed.bias",
            "class_emb.weight", "lvl_embed.weight", "head_nm.ada_lin.1.weight", "head_nm.ada_lin.1.bias",
            "head.weight", "head.bias"}
    for i in range(16):
        keys |= {f"blocks.{i}.attn.{name}" for name in
                 ("scale_mul_1H11", "q_bias", "v_bias", "zero_k_bias", "mat_qkv.weight", "proj.weight", "proj.bias")}
        keys |= {f"blocks.{i}.ffn.{name}" for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}
        keys |= {f"blocks.{i}.ada_lin.1.weight", f"blocks.{i}.ada_lin.1.bias"}
    return keys


def test_d16_state_dict_layout_is_official():
    with torch.device("meta"):
        state = VAR(VAR_PRESETS["d16"]).state_dict()
    assert set(state) == official_d16_keys() and len(state) == 220
    assert state["class_emb.weight"].shape == (1001, 1024)
    assert state["pos_1LC"].shape == (1, 680, 1024)
    assert state["attn_bias_for_masking"].shape == (1, 1, 680, 680)
    assert state["blocks.0.attn.mat_qkv.weight"].shape == (3072, 1024)
    assert state["blocks.0.ada_lin.1.weight"].shape == (6144, 1024)
    assert state["head_nm.ada_lin.1.weight"].shape == (2048, 1024)
    assert state["head.weight"].shape == (4096, 1024)
    assert state["lvl_1L"].dtype == torch.int64


def test_official_init():
    torch.manual_seed(0)
    config = VARConfig.from_depth(2, scales=(1, 2, 4), codebook_size=64, num_classes=10)
    model = VAR(config)
    width = config.hidden_size
    std = (1 / (3 * width)) ** 0.5
    assert model.class_emb.weight.std().item() == pytest.approx(std, rel=0.15)
    assert model.pos_1LC.std().item() == pytest.approx(std, rel=0.15)
    assert model.head.weight.std().item() == pytest.approx(std * 0.02, rel=0.15)
    block = model.blocks[1]
    gates, modulation = block.ada_lin[1].weight[: 2 * width], block.ada_lin[1].weight[2 * width :]
    assert gates.std().item() == pytest.approx(std * 1e-3, rel=0.15)  # alng 1e-3 for depth <= 20
    assert modulation.std().item() == pytest.approx(std * 0.5, rel=0.15)
    assert block.attn.proj.weight.std().item() == pytest.approx(std / 2, rel=0.15)  # / sqrt(2 * depth)
    assert torch.allclose(block.attn.scale_mul_1H11, torch.full_like(block.attn.scale_mul_1H11, 4.0).log())
    assert model.head.bias.abs().max() == 0 and block.ada_lin[1].bias.abs().max() == 0
    assert model.blocks[0].drop_path.__class__.__name__ == "Identity"  # linspace(0, max): block 0 has none
    assert model.blocks[1].drop_path.drop_prob == pytest.approx(0.1 * 2 / 24)


@pytest.mark.parametrize("scales,shared_adaln", [((1, 2, 3, 4), False), ((1, 2, 4, 8), False), ((1, 2, 4), True)])
def test_teacher_forced_logits_equal_kv_cached_scale_by_scale(scales, shared_adaln):
    var, tokenizer = tiny_pair(scales, shared_adaln=shared_adaln)
    token_maps = random_token_maps(var.config, batch=2, seed=1)
    labels = torch.tensor([1, 7])
    with torch.no_grad():
        teacher = var(labels, tokenizer.teacher_forcing_input(token_maps))
        condition = var.class_condition(labels)
        cache = var.new_cache()
        cached = [var.forward_cached(var.first_scale_input(condition), condition, cache)]
        quantizer = tokenizer.quantize
        accumulated = torch.zeros(2, var.config.embed_dim, scales[-1], scales[-1])
        for k in range(len(scales) - 1):
            codes = quantizer.embed_tokens(token_maps[k], k)
            accumulated, next_input = quantizer.next_autoregressive_input(k, accumulated, codes)
            cached.append(var.forward_cached(var.scale_input(next_input, k + 1), condition, cache))
        assert cache.length == var.num_tokens
    cached = torch.cat(cached, dim=1)
    assert cached.shape == teacher.shape
    assert (teacher - cached).abs().max().item() <= 1e-5
    assert teacher.std().item() > 0.1  # the comparison is not between near-constant logits


def test_prefix_teacher_input_equals_teacher_forcing_input():
    var, tokenizer = tiny_pair((1, 2, 3, 4))
    token_maps = random_token_maps(var.config, batch=2)
    full = tokenizer.teacher_forcing_input(token_maps)
    assert torch.allclose(prefix_teacher_input(tokenizer, token_maps[:-1]), full, atol=1e-6)
    assert torch.allclose(prefix_teacher_input(tokenizer, token_maps[:2]), full[:, : 4 + 9], atol=1e-6)


@pytest.mark.parametrize("changed_scale", [0, 1, 2])
def test_block_causality(changed_scale):
    """Changing the tokens of scale k changes no logits of scales <= k, and does change finer ones."""
    scales = (1, 2, 3, 4)
    var, tokenizer = tiny_pair(scales)
    token_maps = random_token_maps(var.config, batch=2, seed=2)
    changed = [t.clone() for t in token_maps]
    changed[changed_scale] = (changed[changed_scale] + 1) % var.config.codebook_size
    labels = torch.tensor([2, 5])
    with torch.no_grad():
        before = var(labels, tokenizer.teacher_forcing_input(token_maps))
        after = var(labels, tokenizer.teacher_forcing_input(changed))
    end = var.scale_bounds[changed_scale][1]
    assert torch.equal(before[:, :end], after[:, :end])
    assert (before[:, end:] - after[:, end:]).abs().max() > 1e-3


def test_mask_is_block_causal():
    var, _ = tiny_pair((1, 2, 3))
    mask = var.attn_bias_for_masking[0, 0]
    levels = var.lvl_1L[0]
    for q in range(var.num_tokens):
        for k in range(var.num_tokens):
            assert (mask[q, k] == 0) == bool(levels[q] >= levels[k])


def test_label_dropout_only_in_training():
    var, tokenizer = tiny_pair((1, 2, 4), cond_drop_rate=0.5)
    batch = 64
    labels = torch.full((batch,), 3)
    teacher_input = tokenizer.teacher_forcing_input(random_token_maps(var.config, batch=1)).expand(batch, -1, -1)
    with torch.no_grad():
        eval_logits = var(labels, teacher_input)
        assert torch.allclose(eval_logits, eval_logits[:1].expand_as(eval_logits))  # no sample dropped in eval
        null_logits = var(torch.full((1,), var.config.num_classes), teacher_input[:1])
        var.train()
        torch.manual_seed(0)
        train_logits = var(labels, teacher_input)
    dropped = torch.isclose(train_logits, null_logits, atol=1e-5).flatten(1).all(dim=1)
    kept = torch.isclose(train_logits, eval_logits, atol=1e-5).flatten(1).all(dim=1)
    assert torch.all(dropped ^ kept)  # every sample is either the null class or its own label
    assert 10 < int(dropped.sum()) < 54  # about half of 64 at rate 0.5


def test_backward_reaches_every_parameter():
    var, tokenizer = tiny_pair((1, 2, 4))
    var.train()
    token_maps = random_token_maps(var.config, batch=2)
    logits = var(torch.tensor([0, 1]), tokenizer.teacher_forcing_input(token_maps))
    logits.square().mean().backward()
    missing = [name for name, p in var.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_module_conversions_keep_working():
    """nn.Module.to / .double go through Module._apply, which no block may shadow."""
    var, tokenizer = tiny_pair((1, 2, 4))
    token_maps = random_token_maps(var.config, batch=2)
    teacher_input = tokenizer.teacher_forcing_input(token_maps)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        reference = var(labels, teacher_input)
        as_double = var.to(torch.float64)(labels, teacher_input.double())
    assert as_double.dtype == torch.float32  # logits are returned in float32, as the official get_logits
    assert torch.allclose(as_double, reference, atol=1e-4)
    assert var.attn_bias_for_masking.dtype == torch.float64 and var.lvl_1L.dtype == torch.int64


def test_attention_matches_the_written_out_formula():
    """softmax((normalize(q) * exp(min(s, ln 100))) @ normalize(k)^T + mask) @ v, softmax scale 1,
    with q/v biases and no key bias; then the output projection."""
    from var_model.transformer_blocks import SelfAttention

    torch.manual_seed(0)
    attention = SelfAttention(16, 2, l2_norm=True, attn_dropout=0.0, proj_dropout=0.0, layer=0).eval()
    with torch.no_grad():
        attention.q_bias.normal_()
        attention.v_bias.normal_()
        attention.scale_mul_1H11.copy_(torch.tensor([1.0, 6.0]).view(1, 2, 1, 1))  # 6 > ln 100: clamped
    x = torch.randn(3, 5, 16)
    mask = torch.where(torch.rand(5, 5) < 0.3, -torch.inf, 0.0).fill_diagonal_(0.0).view(1, 1, 5, 5)
    with torch.no_grad():
        out = attention(x, mask)
        q, k, v = (x @ attention.mat_qkv.weight.T).split(16, dim=-1)
        q, v = q + attention.q_bias, v + attention.v_bias
        heads = lambda t: t.view(3, 5, 2, 8).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        gain = torch.tensor([1.0, math.log(100.0)]).exp().view(1, 2, 1, 1)
        scores = (q / q.norm(dim=-1, keepdim=True) * gain) @ (k / k.norm(dim=-1, keepdim=True)).transpose(-1, -2)
        expected = (scores + mask).softmax(-1) @ v
        expected = attention.proj(expected.transpose(1, 2).reshape(3, 5, 16))
    assert torch.allclose(out, expected, atol=1e-5)
