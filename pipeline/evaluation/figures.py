"""The pictures an evaluation leaves: a sample grid (one row per class) and training loss curves."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def mosaic(rows: Sequence[np.ndarray], padding: int = 2, fill: int = 255) -> np.ndarray:
    """Tile rows of uint8 images ([n,H,W] or [n,H,W,C] each, n may differ) into one uint8 image."""
    first = next((r for r in rows if len(r)), None)
    if first is None:
        raise ValueError("mosaic needs at least one image")
    height, width = first.shape[1:3]
    channels = first.shape[3:] if first.ndim == 4 else ()
    columns = max(len(r) for r in rows)
    canvas = np.full((padding + len(rows) * (height + padding), padding + columns * (width + padding), *channels),
                     fill, dtype=np.uint8)
    for row_index, row in enumerate(rows):
        top = padding + row_index * (height + padding)
        for column_index, image in enumerate(row):
            left = padding + column_index * (width + padding)
            canvas[top:top + height, left:left + width] = image
    return canvas


def sample_grid_png(rows: Sequence[np.ndarray], row_names: Sequence[str], title: str | None = None,
                    pixels_per_image: int = 56) -> bytes:
    """One row per class, the class name on the left; images drawn pixel-exact (nearest) and enlarged."""
    canvas = mosaic(rows)
    height, width = rows[0].shape[1:3]
    scale = pixels_per_image / max(height, width)
    figure = plt.figure(figsize=(canvas.shape[1] * scale / 100 + 1.6, canvas.shape[0] * scale / 100 + 0.4))
    axes = figure.add_axes((0, 0, 1, 1))
    axes.imshow(canvas, cmap="gray" if canvas.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
    axes.set_yticks([2 + i * (height + 2) + height / 2 for i in range(len(rows))], list(row_names))
    axes.set_xticks([])
    axes.tick_params(length=0, labelsize=10)
    for spine in axes.spines.values():
        spine.set_visible(False)
    if title:
        axes.set_title(title, fontsize=10)
    return _figure_png(figure)


def numeric_series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one scalar metric across records; records without it are skipped."""
    steps, values = [], []
    for index, record in enumerate(records):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(float(record.get("step", index)))
            values.append(float(value))
    return steps, values


def loss_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Scalar loss-like metrics (`*loss*`, `*_l1`, `*_l2`) in first-seen order, per-scale ones left out."""
    keys: list[str] = []
    for record in records:
        for key, value in record.items():
            loss_like = "loss" in key or key.endswith(("_l1", "_l2"))
            per_scale = key.rsplit("_", 1)[-1].isdigit()
            scalar = isinstance(value, (int, float)) and not isinstance(value, bool)
            if loss_like and not per_scale and scalar and key not in keys:
                keys.append(key)
    return keys


def loss_curves_png(stages: Mapping[str, Sequence[Mapping[str, Any]]]) -> bytes:
    """One panel per training stage (e.g. tokenizer, gpt): every scalar '*loss*' metric against step."""
    stages = {name: records for name, records in stages.items() if records}
    if not stages:
        raise ValueError("no training metrics to plot")
    figure, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 3.8), squeeze=False)
    for panel, (name, records) in zip(axes[0], stages.items()):
        for key in loss_keys(records):
            steps, values = numeric_series(records, key)
            if steps:
                panel.plot(steps, values, label=key, linewidth=1.2)
        panel.set_title(name)
        panel.set_xlabel("step")
        panel.set_ylabel("loss")
        panel.grid(alpha=0.3)
        panel.legend(fontsize=8)
    figure.tight_layout()
    return _figure_png(figure)
