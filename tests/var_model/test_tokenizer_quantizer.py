"""The residual multi-scale quantizer and the VQVAE around it, on tiny random models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from var_model import TOKENIZER_PRESETS, VQVAE, MultiScaleQuantizer, TokenizerConfig, build_tokenizer
from var_model.quantizer import phi_index_for_scale

SCHEDULES = [(1, 2, 4), (1, 2, 3, 4), (2, 4), (4,), (1, 2, 3, 5, 8)]


def small_config(scales, codebook_per_scale=False, **changes) -> TokenizerConfig:
    # 2 levels (factor 2): the latent grid is scales[-1], the image twice that.
    return TokenizerConfig(
        image_size=2 * scales[-1], in_channels=1, scales=scales, codebook_size=32, embed_dim=4, base_channels=8,
        channel_multipliers=(1, 2), num_res_blocks=1, norm_groups=4, codebook_per_scale=codebook_per_scale,
        **changes,
    )


def smooth_latent(batch, channels, scales, generator):
    """A latent with structure at every scale (white noise has none to find at coarse scales)."""
    grid = scales[-1]
    maps = [F.interpolate(torch.randn(batch, channels, s, s, generator=generator), size=(grid, grid), mode="bilinear")
            for s in scales]
    return sum(maps) / len(maps) ** 0.5


def spread_codebook(quantizer, generator):
    """Codes of many magnitudes, so every residual size has a useful nearest code."""
    with torch.no_grad():
        for index in range(quantizer.num_scales if quantizer.codebook_per_scale else 1):
            weight = quantizer.codebook(index).weight
            weight.copy_(torch.randn(weight.shape, generator=generator)
                         * torch.rand(weight.shape[0], 1, generator=generator) * 1.5)


@pytest.mark.parametrize("codebook_per_scale", [False, True])
@pytest.mark.parametrize("scales", SCHEDULES)
def test_shapes_and_token_counts(scales, codebook_per_scale):
    torch.manual_seed(0)
    config = small_config(scales, codebook_per_scale)
    model = VQVAE(config)
    images = torch.rand(3, 1, config.image_size, config.image_size) * 2 - 1

    token_maps = model.encode_tokens(images)
    assert [tuple(t.shape) for t in token_maps] == [(3, s, s) for s in scales]
    assert all(t.dtype == torch.int64 and 0 <= t.min() and t.max() < config.codebook_size for t in token_maps)
    assert sum(t[0].numel() for t in token_maps) == config.total_tokens

    decoded = model.decode_tokens(token_maps)
    assert decoded.shape == images.shape and decoded.abs().max() <= 1.0
    # Flattened (official [B, s*s]) token maps decode identically.
    assert torch.equal(model.decode_tokens([t.flatten(1) for t in token_maps]), decoded)

    teacher = model.teacher_forcing_input(token_maps)
    assert teacher.shape == (3, config.total_tokens - scales[0] ** 2, config.embed_dim)

    out = model(images)
    assert out.reconstruction.shape == images.shape and out.vq_loss.ndim == 0
    assert [tuple(t.shape) for t in out.token_maps] == [(3, s, s) for s in scales]
    assert 0 < out.code_usage <= 1 and 1 <= out.perplexity <= config.codebook_size


def test_codebook_modes_have_their_own_state_dict_layout():
    shared = VQVAE(small_config((1, 2, 4))).state_dict()
    per_scale = VQVAE(small_config((1, 2, 4), codebook_per_scale=True)).state_dict()
    assert "quantize.embedding.weight" in shared and "quantize.codebooks.0.weight" not in shared
    assert [k for k in per_scale if k.startswith("quantize.codebooks")] == [
        f"quantize.codebooks.{i}.weight" for i in range(3)]
    assert "quantize.embedding.weight" not in per_scale


def test_per_scale_codebooks_are_independent():
    torch.manual_seed(0)
    model = VQVAE(small_config((1, 2, 4), codebook_per_scale=True))
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    token_maps = model.encode_tokens(images)
    before = model.decode_tokens(token_maps)
    with torch.no_grad():  # an unused code of scale 0's book: changing it changes nothing
        unused = [i for i in range(32) if i not in token_maps[0].flatten().tolist()][0]
        model.quantize.codebooks[0].weight[unused] += 5.0
    assert torch.equal(model.decode_tokens(token_maps), before)
    with torch.no_grad():  # the same index in scale 2's book is another vector
        model.quantize.codebooks[2].weight[token_maps[2][0, 0, 0]] += 5.0
    assert not torch.equal(model.decode_tokens(token_maps), before)


def test_phi_tick_mapping_matches_the_official_one():
    assert [phi_index_for_scale(k, 10, 4) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi_index_for_scale(k, 6, 4) for k in range(6)] == [0, 0, 1, 2, 3, 3]
    assert [phi_index_for_scale(k, 3, 3) for k in range(3)] == [0, 1, 2]  # non-shared: one per scale
    assert phi_index_for_scale(0, 1, 4) == 0  # a single scale does not divide by zero
    quantizer = MultiScaleQuantizer(codebook_size=8, embed_dim=4, scales=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    convs = list(quantizer.quant_resi.qresi_ls)
    assert [convs.index(quantizer.quant_resi.for_scale(k, 10)) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_phi_is_half_identity_half_conv():
    quantizer = MultiScaleQuantizer(codebook_size=8, embed_dim=4, scales=(1, 2))
    phi = quantizer.quant_resi.for_scale(0, 2)
    h = torch.randn(2, 4, 2, 2)
    expected = 0.5 * h + 0.5 * F.conv2d(h, phi.weight, phi.bias, padding=1)
    torch.testing.assert_close(quantizer.refine(h, 0), expected)


@pytest.mark.parametrize("codebook_per_scale", [False, True])
@pytest.mark.parametrize("scales", [(1, 2, 3, 4, 6, 8), (1, 2, 4, 8), (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)])
def test_each_added_scale_reconstructs_a_random_latent_better(scales, codebook_per_scale):
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    quantizer = MultiScaleQuantizer(codebook_size=512, embed_dim=8, scales=scales,
                                    codebook_per_scale=codebook_per_scale)
    spread_codebook(quantizer, generator)
    latent = smooth_latent(4, 8, scales, generator)
    errors = [latent.square().mean().item()]
    errors += [F.mse_loss(partial, latent).item() for partial in quantizer.latent_to_partial_reconstructions(latent)]
    assert all(after < before for before, after in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0]
    # The last partial reconstruction is exactly what decoding the tokens gives.
    token_maps = quantizer.latent_to_tokens(latent)
    torch.testing.assert_close(quantizer.tokens_to_latent(token_maps),
                               quantizer.latent_to_partial_reconstructions(latent)[-1])


@pytest.mark.parametrize("codebook_per_scale", [False, True])
def test_teacher_forcing_input_equals_the_step_by_step_generation_inputs(codebook_per_scale):
    scales = (1, 2, 3, 5)
    torch.manual_seed(0)
    quantizer = MultiScaleQuantizer(codebook_size=16, embed_dim=4, scales=scales,
                                    codebook_per_scale=codebook_per_scale)
    token_maps = [torch.randint(0, 16, (2, s, s)) for s in scales]
    teacher = quantizer.teacher_forcing_input(token_maps)

    accumulated = torch.zeros(2, 4, 5, 5)
    step_inputs = []
    for k in range(len(scales)):
        accumulated, next_input = quantizer.next_autoregressive_input(k, accumulated,
                                                                      quantizer.embed_tokens(token_maps[k], k))
        if next_input is not None:
            assert next_input.shape == (2, scales[k + 1] ** 2, 4)
            step_inputs.append(next_input)
        else:
            assert k == len(scales) - 1
    torch.testing.assert_close(torch.cat(step_inputs, dim=1), teacher)
    torch.testing.assert_close(accumulated, quantizer.tokens_to_latent(token_maps))


def test_training_forward_is_straight_through_with_the_official_vq_loss():
    torch.manual_seed(0)
    quantizer = MultiScaleQuantizer(codebook_size=64, embed_dim=4, scales=(1, 2, 4), beta=0.25)
    spread_codebook(quantizer, torch.Generator().manual_seed(0))
    latent = torch.randn(2, 4, 4, 4, requires_grad=True)
    out = quantizer(latent)
    partials = quantizer.latent_to_partial_reconstructions(latent.detach())
    torch.testing.assert_close(out.quantized, partials[-1])  # forward value: the quantized latent
    expected_loss = sum(1.25 * F.mse_loss(p, latent.detach()) for p in partials) / 3
    torch.testing.assert_close(out.vq_loss, expected_loss)
    # Straight-through: d quantized / d latent is the identity; the loss also reaches the codebook.
    (out.quantized * torch.arange(out.quantized.numel()).view_as(out.quantized)).sum().backward()
    torch.testing.assert_close(latent.grad, torch.arange(latent.numel(), dtype=torch.float32).view_as(latent))
    latent.grad = None
    quantizer.zero_grad()
    out = quantizer(latent)
    out.vq_loss.backward()
    assert latent.grad.abs().sum() > 0 and quantizer.embedding.weight.grad.abs().sum() > 0
    assert quantizer.quant_resi.qresi_ls[0].weight.grad.abs().sum() > 0


def test_code_usage_statistics_and_ema():
    quantizer = MultiScaleQuantizer(codebook_size=8, embed_dim=2, scales=(1, 2))
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.tensor([[10.0 * i, 0.0] for i in range(8)]))
    latent = torch.zeros(1, 2, 2, 2)  # every position picks code 0 at both scales
    quantizer.train()
    out = quantizer(latent)
    assert out.code_usage.item() == pytest.approx(1 / 8) and out.perplexity.item() == pytest.approx(1.0)
    assert quantizer.ema_vocab_hit_SV[:, 0].tolist() == [1.0, 4.0]  # first record is copied
    quantizer(latent)
    assert quantizer.ema_vocab_hit_SV[:, 0].tolist() == pytest.approx([1.0, 4.0])
    quantizer.eval()
    quantizer(latent + 5.0)  # no statistics recorded outside training
    assert quantizer.ema_vocab_hit_SV[:, 1].sum() == 0
    assert quantizer.ema_code_usage(tokens_per_batch=4).tolist() == [1 / 8, 1 / 8]


@pytest.mark.parametrize("codebook_per_scale", [False, True])
def test_reset_dead_codes_replaces_only_unused_codes_with_encoder_vectors(codebook_per_scale):
    torch.manual_seed(0)
    quantizer = MultiScaleQuantizer(codebook_size=16, embed_dim=3, scales=(1, 2),
                                    codebook_per_scale=codebook_per_scale)
    with torch.no_grad():
        quantizer.ema_vocab_hit_SV.zero_()
        quantizer.ema_vocab_hit_SV[:, :4] = 5.0  # codes 0-3 alive at every scale
    before = [quantizer.codebook(k).weight.detach().clone() for k in range(2)]
    latents = torch.randn(3, 3, 2, 2) * 7.0
    replaced = quantizer.reset_dead_codes(latents, threshold=1.0)
    assert replaced == (24 if codebook_per_scale else 12)
    candidates = latents.permute(0, 2, 3, 1).reshape(-1, 3)
    for k in range(2 if codebook_per_scale else 1):
        weight = quantizer.codebook(k).weight.detach()
        assert torch.equal(weight[:4], before[k][:4])
        for row in weight[4:]:
            assert (candidates - row).abs().sum(dim=1).min() == 0  # each new code is an encoder vector
    assert (quantizer.ema_vocab_hit_SV >= 1.0).all()  # reset codes get a grace period
    with pytest.raises(ValueError, match="latents_sample: expected"):
        quantizer.reset_dead_codes(torch.randn(3, 5, 2, 2), threshold=1.0)


def test_wrong_input_shapes_fail_clearly():
    model = VQVAE(small_config((1, 2, 4)))
    with pytest.raises(ValueError, match=r"images: expected \[B, 1, 8, 8\], got \[2, 3, 8, 8\]"):
        model.encode_tokens(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="token_maps: expected 3 scales"):
        model.decode_tokens([torch.zeros(1, 1, 1, dtype=torch.long)])


def test_build_tokenizer_returns_an_encoder_and_decoder_sharing_one_model():
    encoder, decoder = build_tokenizer(image_size=16, scales=[1, 2, 4], codebook_size=32, embed_dim=8,
                                       in_channels=1, base_channels=8, norm_groups=4, num_res_blocks=1)
    assert encoder.tokenizer is decoder.tokenizer
    assert encoder.tokenizer.config.channel_multipliers == (1, 1, 2)  # 16 / 4 -> 3 levels, official pattern
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    token_maps = encoder(images)
    assert [tuple(t.shape) for t in token_maps] == [(2, 1, 1), (2, 2, 2), (2, 4, 4)]
    assert decoder(token_maps).shape == (2, 1, 16, 16)
    with torch.device("meta"):  # the seed's defaults: 256 px, 16x16 latent, official 16x trunk
        encoder, _ = build_tokenizer()
    config = encoder.tokenizer.config
    assert (config.scales, config.codebook_size, config.embed_dim, config.channel_multipliers) == (
        (1, 2, 4, 8, 16), 1024, 256, (1, 1, 2, 2, 4))
    with pytest.raises(ValueError, match="^scales: must end at the latent grid size"):
        build_tokenizer(image_size=32, scales=[1, 2, 4], channel_multipliers=(1, 2))


def test_tiny_preset_forward_backward_runs():
    torch.manual_seed(0)
    config = TOKENIZER_PRESETS["tiny"]
    model = VQVAE(config)
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    out = model(images)
    (F.mse_loss(out.reconstruction, images) + out.vq_loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # gradient crosses the quantizer
