"""A sample grid PNG: one row per class, `per_class` images each, from a tokenizer + VAR export.

Every grid (the chain's samples.png and the GPT stage's grids during training) is drawn by
`labelled_grid`: each image nearest-upscaled to at least `MIN_TILE` pixels, the class names in a
column at the left (Pillow's default font), RGB.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipeline.core.images import tile
from var_model import VAR, VQVAE, SamplingSettings, generate_in_batches

GRID_PADDING = 2  # pixels of white between tiles
MIN_TILE = 64  # each image is enlarged (nearest, by a whole factor) to at least this many pixels a side
LABEL_MARGIN = 6  # pixels around the label column's text


@torch.inference_mode()
def sample_grid(var: VAR, tokenizer: VQVAE, classes: list[int], per_class: int, *, sampling: SamplingSettings,
                seed: int, batch_size: int = 64, class_names: list[str] | None = None) -> np.ndarray:
    """uint8 [H, W, 3] labelled grid (`labelled_grid`), one row per class; sample i of the grid uses seed
    `seed + i`, so the same settings give the same picture in any batch split. Rows are labelled with
    `class_names[label]` when given, else with the class index."""
    labels = [label for label in classes for _ in range(per_class)]
    seeds = [seed + index for index in range(len(labels))]
    images = generate_in_batches(var, tokenizer, labels, seeds, sampling, batch_size)
    pixels = images.clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    return labelled_grid(pixels, [class_label(label, class_names) for label in classes])


def class_label(label: int, class_names: list[str] | None = None) -> str:
    """A row's label: the class name when known (and in range), else `class <index>`."""
    if class_names is not None and 0 <= label < len(class_names):
        return class_names[label]
    return f"class {label}"


def labelled_grid(images: np.ndarray, row_labels: list[str], min_tile: int = MIN_TILE,
                  padding: int = GRID_PADDING) -> np.ndarray:
    """uint8 [N, C, H, W] (C 1 or 3), row-major, one row per label -> uint8 [H', W', 3]: every image
    nearest-upscaled by a whole factor to >= `min_tile` px, a white label column at the left."""
    _, channels, height, width = images.shape
    factor = max(1, -(-min_tile // max(height, width)))
    images = images.repeat(factor, axis=2).repeat(factor, axis=3)
    if channels == 1:
        images = images.repeat(3, axis=1)
    grid = tile(images, rows=len(row_labels), padding=padding)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.textbbox((0, 0), text, font=font) for text in row_labels]
    column = max((box[2] - box[0] for box in boxes), default=0) + 2 * LABEL_MARGIN
    picture = Image.new("RGB", (column + grid.shape[1], grid.shape[0]), "white")
    picture.paste(Image.fromarray(grid), (column, 0))
    draw = ImageDraw.Draw(picture)
    row_height = height * factor + padding
    for row, (text, box) in enumerate(zip(row_labels, boxes)):
        top = row * row_height + (height * factor - (box[3] - box[1])) // 2 - box[1]
        draw.text((LABEL_MARGIN, top), text, fill="black", font=font)
    return np.asarray(picture)


__all__ = ["sample_grid", "labelled_grid", "class_label", "MIN_TILE"]
