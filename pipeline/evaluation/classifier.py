"""A small CNN, trained on a run's real training split, that judges generated images.

Its predictions give class-consistency (the share of images generated for class c that it labels
c) and, through the Inception Score's formula on its class probabilities, a classifier score; its
128-d penultimate features give a fast Frechet distance, a stand-in for FID where the Inception
network is too slow (tests, quick checks). Any image size, 1 or 3 channels, any number of classes:
images are brought to the classifier's `image_size` (28 for Fashion-MNIST: its native size) and
normalised by the training images' own mean and std (kept with the weights). Training is seeded and
the weights are cached (safetensors, at a URI: local folder or s3://), so figures compare between runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from pipeline.core.exports import read_safetensors_header
from pipeline.core.images import resize_uint8
from pipeline.core.storage import exists, read_bytes, write_bytes_atomic

logger = logging.getLogger(__name__)

IMAGE_SIZE = 28  # Fashion-MNIST's native size: the default where the data is that small
FEATURE_DIM = 128
MIN_IMAGE_SIZE = 8  # two 2x2 poolings leave at least 2x2
# Bump when the architecture or the recipe changes, so stale cached weights are not reused.
CLASSIFIER_VERSION = "small-cnn/2"


class SmallClassifier(nn.Module):
    """Two conv blocks and a 128-d hidden layer (~87% Fashion-MNIST test accuracy after one epoch at 28 px)."""

    def __init__(self, channels: int = 1, image_size: int = IMAGE_SIZE, num_classes: int = 10) -> None:
        super().__init__()
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"classifier image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}")
        self.channels, self.image_size, self.num_classes = channels, image_size, num_classes
        self.convolutions = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # size / 2
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),         # size / 4
        )
        side = image_size // 4
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, num_classes)
        # The training images' pixel statistics on [0, 1], saved with the weights.
        self.register_buffer("pixel_mean", torch.zeros(()))
        self.register_buffer("pixel_std", torch.ones(()))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.hidden(self.convolutions((images - self.pixel_mean) / self.pixel_std))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


FashionClassifier = SmallClassifier  # the name it had when it judged Fashion-MNIST only


def classifier_input(images: np.ndarray, channels: int, image_size: int) -> torch.Tensor:
    """uint8 [N,H,W] or [N,H,W,C] -> float [N,C,S,S] in [0, 1] (resized with LANCZOS, grey/RGB as the model)."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 4 and channels == 1:
        images = (images[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])).round().astype(np.uint8)
    if images.ndim not in (3, 4) or images.dtype != np.uint8:
        raise ValueError(f"classifier expects uint8 [N,H,W] or [N,H,W,3] images, got {images.dtype} {images.shape}")
    images = resize_uint8(images, image_size)
    batch = torch.as_tensor(np.array(images, dtype=np.float32)) / 255.0
    batch = batch.unsqueeze(1) if batch.ndim == 3 else batch.permute(0, 3, 1, 2)
    if batch.shape[1] != channels:  # grey images for an RGB classifier
        batch = batch.expand(-1, channels, -1, -1)
    return batch.contiguous()


def train_classifier(images: np.ndarray, labels: np.ndarray, *, num_classes: int | None = None,
                     image_size: int = IMAGE_SIZE, epochs: int = 1, min_steps: int = 0, batch_size: int = 128,
                     learning_rate: float = 1e-3, seed: int = 0) -> SmallClassifier:
    """Adam on cross-entropy for max(epochs, enough epochs for `min_steps` steps), seeded: the same data and
    seed give the same weights on one machine."""
    labels = np.asarray(labels, dtype=np.int64)
    num_classes = num_classes or int(labels.max()) + 1
    channels = 3 if np.asarray(images).ndim == 4 and np.asarray(images).shape[-1] == 3 else 1
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallClassifier(channels, image_size, num_classes)
    inputs, targets = classifier_input(images, channels, image_size), torch.as_tensor(labels)
    model.pixel_mean.fill_(float(inputs.mean()))
    model.pixel_std.fill_(max(float(inputs.std()), 1e-3))
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    steps_per_epoch = -(-len(inputs) // batch_size)
    epochs = max(epochs, -(-min_steps // steps_per_epoch))
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(model(inputs[batch]), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epochs <= 10 or (epoch + 1) % (epochs // 10) == 0 or epoch + 1 == epochs:
            logger.info("classifier epoch %d/%d: last batch loss %.3f", epoch + 1, epochs, loss.item())
    return model.eval()


@dataclass
class Classified:
    labels: np.ndarray  # int64 [N], the predicted class
    features: np.ndarray  # float64 [N, 128], penultimate layer
    probabilities: np.ndarray  # float64 [N, classes], softmax


@torch.inference_mode()
def classify(model: SmallClassifier, images: np.ndarray, batch_size: int = 1000) -> Classified:
    labels, features, probabilities = [], [], []
    for start in range(0, len(images), batch_size):
        hidden = model.features(classifier_input(images[start:start + batch_size], model.channels, model.image_size))
        logits = model.head(hidden)
        features.append(hidden.double().numpy())
        labels.append(logits.argmax(dim=1).numpy())
        probabilities.append(torch.softmax(logits.double(), dim=1).numpy())
    if not labels:
        return Classified(np.zeros(0, dtype=np.int64), np.zeros((0, FEATURE_DIM)), np.zeros((0, model.num_classes)))
    return Classified(np.concatenate(labels).astype(np.int64), np.concatenate(features), np.concatenate(probabilities))


def predict(model: SmallClassifier, images: np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels int64 [N], penultimate features float64 [N,128])."""
    result = classify(model, images, batch_size)
    return result.labels, result.features


def accuracy(model: SmallClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    predicted, _ = predict(model, images)
    return float((predicted == np.asarray(labels)).mean())


def load_or_train_classifier(cache_uri: str | None, images: np.ndarray, labels: np.ndarray, *, epochs: int = 1,
                             seed: int = 0, num_classes: int | None = None, image_size: int = IMAGE_SIZE,
                             min_steps: int = 0) -> SmallClassifier:
    """Load cached weights from `cache_uri` (a .safetensors URI) or train and cache them there."""
    if cache_uri is not None and exists(cache_uri):
        weights = read_bytes(cache_uri)
        state = load_safetensors_bytes(weights)
        size = int(read_safetensors_header(weights).get("image_size", image_size))
        model = SmallClassifier(int(state["convolutions.0.weight"].shape[1]), size, int(state["head.weight"].shape[0]))
        model.load_state_dict(state)
        logger.info("classifier loaded from %s", cache_uri)
        return model.eval()
    model = train_classifier(images, labels, num_classes=num_classes, image_size=image_size, epochs=epochs,
                             min_steps=min_steps, seed=seed)
    if cache_uri is not None:
        state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
        write_bytes_atomic(cache_uri, save_safetensors_bytes(state, metadata={
            "version": CLASSIFIER_VERSION, "epochs": str(epochs), "min_steps": str(min_steps), "seed": str(seed),
            "image_size": str(image_size), "channels": str(model.channels), "classes": str(model.num_classes)}))
        logger.info("classifier cached at %s", cache_uri)
    return model
