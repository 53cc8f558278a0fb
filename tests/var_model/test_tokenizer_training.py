"""A tiny tokenizer trained for about a minute on real Fashion-MNIST reconstructs recognisably."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.data.sources.fashion_mnist import load_fashion_mnist
from var_model import TOKENIZER_PRESETS, VQVAE

STEPS = 150
BATCH = 32


def fashion_images(split: str, count: int) -> torch.Tensor:
    """[count, 1, 32, 32] in [-1, 1]: 28x28 padded with background (-1) to 32x32."""
    images, _ = load_fashion_mnist(split)
    images = torch.tensor(images[:count], dtype=torch.float32).div(127.5).sub(1.0).unsqueeze(1)
    return F.pad(images, (2, 2, 2, 2), value=-1.0)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    return 10 * math.log10(4.0 / F.mse_loss(reconstruction, target).item())  # peak-to-peak 2 in [-1, 1]


@pytest.fixture()
def single_thread():
    # The shared 2-core machine is oversubscribed; one intra-op thread is faster and deterministic.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_trained_tokenizer_reconstructs_fashion_mnist(fashion_mnist_dir, single_thread):
    torch.manual_seed(0)
    train = fashion_images("train", 3000)
    test = fashion_images("test", 256)
    model = VQVAE(TOKENIZER_PRESETS["tiny"])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(1, STEPS + 1):
        batch = train[torch.randint(0, len(train), (BATCH,), generator=generator)]
        out = model(batch)
        loss = F.mse_loss(out.reconstruction, batch) + out.vq_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 20 == 0 and step <= STEPS - 40:
            with torch.no_grad():  # revive codes the encoder never picks
                model.quantize.reset_dead_codes(model.encode_latent(batch), threshold=0.03, generator=generator)
    assert 0.2 < out.code_usage.item() <= 1.0 and out.perplexity.item() > 20

    model.eval()
    with torch.no_grad():
        token_maps = model.encode_tokens(test)
        reconstruction = model.decode_tokens(token_maps)
        latent = model.encode_latent(test)
        partials = model.quantize.latent_to_partial_reconstructions(latent)

    mean_image = train.mean(dim=0, keepdim=True).expand_as(test)
    trained, baseline = psnr(reconstruction, test), psnr(mean_image, test)
    # Measured: 18.5 dB after 150 steps (mean-image baseline 11.7 dB).
    assert trained > 17.0, (trained, baseline)
    assert trained > baseline + 5.0, (trained, baseline)

    # Recognisable: each reconstruction is nearer its own original than any other test image.
    distances = torch.cdist(reconstruction.flatten(1), test.flatten(1))
    retrieval = (distances.argmin(dim=1) == torch.arange(len(test))).float().mean().item()
    print(f"psnr {trained:.2f} dB, mean-image {baseline:.2f} dB, retrieval {retrieval:.3f}, "
          f"usage {out.code_usage.item():.2f}, perplexity {out.perplexity.item():.1f}")
    assert retrieval > 0.5  # chance is 1/256; measured 0.73

    # The trained residual quantizer explains the latent better with every added scale.
    errors = [latent.square().mean().item()] + [F.mse_loss(p, latent).item() for p in partials]
    assert all(after < before for before, after in zip(errors, errors[1:])), errors
