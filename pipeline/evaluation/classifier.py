"""A small Fashion-MNIST CNN, trained on the real training split, that judges generated images.

Its predictions give class-consistency (the share of images generated for class c that it labels
c); its 128-d penultimate features give a fast Frechet distance, a stand-in for FID where the
Inception network is too slow (tests, quick checks). Training is seeded and the weights are cached
(safetensors, at a URI: local folder or s3://), so figures compare between runs.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from pipeline.core.storage import exists, read_bytes, write_bytes_atomic

logger = logging.getLogger(__name__)

IMAGE_SIZE = 28
NUM_CLASSES = 10
FEATURE_DIM = 128
# Fashion-MNIST train pixel statistics on [0, 1] (shared/reference/datasets.md).
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530
# Bump when the architecture or the recipe changes, so stale cached weights are not reused.
CLASSIFIER_VERSION = "fashion-cnn/1"


class FashionClassifier(nn.Module):
    """Two conv blocks and a 128-d hidden layer: ~87% test accuracy after one epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.convolutions = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 14x14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
        )
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.convolutions(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def classifier_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,28,28] -> normalised float [N,1,28,28]."""
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"classifier expects uint8 [N,{IMAGE_SIZE},{IMAGE_SIZE}] grayscale images, got {images.shape}")
    batch = torch.as_tensor(np.array(images, dtype=np.float32)).unsqueeze(1) / 255.0
    return (batch - PIXEL_MEAN) / PIXEL_STD


def train_classifier(images: np.ndarray, labels: np.ndarray, *, epochs: int = 1, batch_size: int = 128,
                     learning_rate: float = 1e-3, seed: int = 0) -> FashionClassifier:
    """Adam on cross-entropy, seeded: the same data and seed give the same weights on one machine."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = FashionClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    inputs, targets = classifier_input(images), torch.as_tensor(labels, dtype=torch.long)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(model(inputs[batch]), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        logger.info("classifier epoch %d/%d: last batch loss %.3f", epoch + 1, epochs, loss.item())
    return model.eval()


@torch.inference_mode()
def predict(model: FashionClassifier, images: np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels int64 [N], penultimate features float64 [N,128])."""
    predictions, features = [], []
    for start in range(0, len(images), batch_size):
        hidden = model.features(classifier_input(images[start:start + batch_size]))
        features.append(hidden.double().numpy())
        predictions.append(model.head(hidden).argmax(dim=1).numpy())
    if not predictions:
        return np.zeros(0, dtype=np.int64), np.zeros((0, FEATURE_DIM))
    return np.concatenate(predictions).astype(np.int64), np.concatenate(features)


def accuracy(model: FashionClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    predicted, _ = predict(model, images)
    return float((predicted == np.asarray(labels)).mean())


def load_or_train_classifier(cache_uri: str | None, images: np.ndarray, labels: np.ndarray,
                             *, epochs: int = 1, seed: int = 0) -> FashionClassifier:
    """Load cached weights from `cache_uri` (a .safetensors URI) or train and cache them there."""
    if cache_uri is not None and exists(cache_uri):
        model = FashionClassifier()
        model.load_state_dict(load_safetensors_bytes(read_bytes(cache_uri)))
        logger.info("classifier loaded from %s", cache_uri)
        return model.eval()
    model = train_classifier(images, labels, epochs=epochs, seed=seed)
    if cache_uri is not None:
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        write_bytes_atomic(cache_uri, save_safetensors_bytes(state, metadata={"version": CLASSIFIER_VERSION,
                                                                              "epochs": str(epochs),
                                                                              "seed": str(seed)}))
        logger.info("classifier cached at %s", cache_uri)
    return model
