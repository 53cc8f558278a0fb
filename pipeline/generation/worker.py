"""The generator actor of the Ray Data pipeline: (label, seed) work units in, published files out."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.core.exports import load_tokenizer, load_var
from pipeline.core.images import encode_png, float_to_uint8
from pipeline.core.storage import exists, join_uri
from pipeline.generation.plan import WorkUnit
from pipeline.generation.schema import stats_file
from pipeline.generation.writer import SetContext, publish_unit
from var_model import VAR, VQVAE, SamplingSettings, generate_in_batches

logger = logging.getLogger(__name__)


def generate_images(var: VAR, tokenizer: VQVAE, labels: Sequence[int], seeds: Sequence[int],
                    sampling: SamplingSettings, batch_size: int) -> np.ndarray:
    """uint8 images [N,H,W] (1 channel) or [N,H,W,3] from var_model's `generate_in_batches`."""
    return float_to_uint8(generate_in_batches(var, tokenizer, labels, seeds, sampling, batch_size))


class UnitGenerator:
    """Callable class for `map_batches`: loads both exports once, then generates and publishes units."""

    def __init__(self, tokenizer_uri: str, var_uri: str, context: SetContext, batch_size: int,
                 threads: int | None) -> None:
        use_gpu = torch.cuda.is_available()
        if not use_gpu and threads:
            torch.set_num_threads(threads)  # one pool per actor: actors must not fight over the cores
        device = torch.device("cuda" if use_gpu else "cpu")
        self.tokenizer = load_tokenizer(tokenizer_uri).to(device)
        self.var = load_var(var_uri).to(device)
        for name, loaded, planned in (("tokenizer", self.tokenizer.checksum, context.tokenizer_checksum),
                                      ("var", self.var.checksum, context.var_checksum)):
            if loaded != planned:  # the export was replaced after the plan was made
                raise RuntimeError(f"model.{name}: export checksum {loaded[:12]} is not the planned {planned[:12]}")
        self.context = context
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names, counts, seconds, skipped = [], [], [], []
        for row in range(len(batch["name"])):
            unit = WorkUnit.from_row({column: batch[column][row] for column in ("name", "keys", "labels", "seeds")})
            names.append(unit.name)
            counts.append(len(unit))
            # Another driver may have finished it meanwhile (two runs of one plan): the marker decides.
            if exists(join_uri(self.context.output_uri, stats_file(unit.name))):
                seconds.append(0.0)
                skipped.append(True)
                continue
            started = time.perf_counter()
            images = generate_images(self.var, self.tokenizer, unit.labels, unit.seeds, self.context.sampling,
                                     self.batch_size)
            pngs = [encode_png(image) for image in images]
            elapsed = time.perf_counter() - started
            publish_unit(unit, images, pngs, self.context, elapsed)
            seconds.append(elapsed)
            skipped.append(False)
        return {"unit": np.array(names), "count": np.array(counts), "seconds": np.array(seconds),
                "skipped": np.array(skipped)}
