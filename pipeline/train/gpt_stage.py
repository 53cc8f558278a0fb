"""Stage 2: the VAR transformer on the token cache, with the official recipe.

Each worker holds the frozen tokenizer (from its export) to turn cached token maps into the
teacher-forcing input, exactly as the official trainer does with `idxBl_to_var_input`; the cache
saves the encoder pass, not this cheap accumulation. Loss: cross-entropy over all L tokens
(`next_scale_loss`), label dropout to the null class (VARConfig.cond_drop_rate = label_dropout).
Every `validate_every` steps the same loss and accuracies on the validation token cache are reported
as val_*; every `sample_every` steps rank 0 draws a labelled grid (pipeline.generation.grid) to
`<run>/gpt/samples/step_<n>.png` and TensorBoard.
"""

from __future__ import annotations

from typing import Any

import ray
import torch

from pipeline.core.exports import load_tokenizer, read_export_info, save_var
from pipeline.core.storage import absolute_uri
from pipeline.data.shards import read_index
from pipeline.token_cache.cache import read_manifest, read_token_cache, split_tokens
from pipeline.train.config import GPTStageConfig
from pipeline.train.harness import run_training
from pipeline.train.stage import TrainingStage
from var_model import OFFICIAL_FID_SAMPLING, VAR, TokenizerConfig, next_scale_loss
from var_model.transformer_blocks import SelfAttention


class GPTStage(TrainingStage):
    name = "gpt"
    columns = ("label", "tokens")

    def __init__(self, config: GPTStageConfig, tokenizer_uri: str, tokenizer_info: dict[str, Any],
                 class_names: list[str] | None = None, data_uri: str | None = None):
        super().__init__(config)
        self.tokenizer_uri = tokenizer_uri
        self.class_names = class_names  # the grids' row labels (None: class indices)
        self.data_uri = data_uri  # the token cache it trains on, recorded in the export
        self.tokenizer_checksum = tokenizer_info["checksum"]
        # The transformer takes the tokenizer's scales, codebook size and latent width.
        self.var_config = config.var_config(TokenizerConfig.from_dict(tokenizer_info["config"]))

    def build_model(self) -> VAR:
        return VAR(self.var_config)

    def zero3_leaf_modules(self) -> list[type[torch.nn.Module]]:
        # Attention reads mat_qkv.weight through F.linear (to add its split q/v bias), outside the
        # child's forward: ZeRO-3 must gather the attention module as a whole.
        return [SelfAttention]

    def batch_options(self) -> dict[str, Any]:
        size = self.config.shuffle_buffer_size
        return {"local_shuffle_buffer_size": size} if size else {}

    def setup_worker(self, device: torch.device) -> None:
        self.tokenizer = load_tokenizer(self.tokenizer_uri).to(device).requires_grad_(False)
        sizes = torch.tensor([side * side for side in self.var_config.scales], dtype=torch.float32)
        self.scale_weights = sizes / sizes.sum()

    def compute_loss(self, model, batch, dtype):
        token_maps = split_tokens(batch["tokens"], self.var_config.scales)
        with torch.no_grad():
            teacher_input = self.tokenizer.teacher_forcing_input(token_maps)
        logits = model(batch["label"], teacher_input.to(dtype))
        loss, scale_loss, scale_accuracy = next_scale_loss(logits, token_maps)
        accuracy = (scale_accuracy.float().cpu() * self.scale_weights).sum()
        return loss, {"scale_loss": scale_loss, "scale_accuracy": scale_accuracy, "accuracy": accuracy}

    def sample_picture(self, model: VAR):
        """A labelled grid (uint8 [H, W, 3]) of `model`'s samples: the official FID settings, fixed seeds."""
        from pipeline.generation.grid import sample_grid

        return sample_grid(model, self.tokenizer, self.config.grid_classes(), self.config.sample_per_class,
                           sampling=OFFICIAL_FID_SAMPLING, seed=self.config.seed, class_names=self.class_names)

    def export(self, model, uri, extra):
        return save_var(model, uri, extra={**extra, "tokenizer_checksum": self.tokenizer_checksum,
                                           "tokenizer_uri": self.tokenizer_uri, "class_names": self.class_names,
                                           "data_uri": self.data_uri})


def train_gpt(config: GPTStageConfig, dataset: ray.data.Dataset, tokenizer_uri: str, storage_uri: str,
              run_name: str, *, num_samples: int | None = None, worker_pid_dir: str | None = None,
              validation: ray.data.Dataset | None = None, class_names: list[str] | None = None,
              data_uri: str | None = None, tokenizer_info: dict[str, Any] | None = None) -> str:
    """Train on any Dataset with columns label (int64) and tokens (int64 [L]) of `tokenizer_uri`'s
    tokenizer; returns the export URI. `validation` (same columns) is passed over every `validate_every`
    steps; `class_names` label the grids and, with `data_uri` (where the dataset came from), are recorded
    in the export. `tokenizer_info`: the export's config.json when the caller has read it already."""
    tokenizer_info = tokenizer_info or read_export_info(tokenizer_uri)
    stage = GPTStage(config, tokenizer_uri, tokenizer_info, class_names, data_uri)
    return run_training(stage, dataset, storage_uri, run_name, num_samples=num_samples,
                        worker_pid_dir=worker_pid_dir, validation=validation).export_uri


def cache_class_names(token_cache_uri: str) -> list[str] | None:
    """The class names of the shards a token cache was made from (their index.json), if still readable."""
    manifest = read_manifest(token_cache_uri)
    try:
        return list(read_index(manifest["source"]).class_names) if manifest and manifest.get("source") else None
    except (OSError, ValueError):  # the shards moved or are gone: the grids show class indices
        return None


def run_gpt_stage(config: GPTStageConfig, token_cache_uri: str, tokenizer_uri: str, storage_uri: str,
                  run_name: str, *, worker_pid_dir: str | None = None,
                  validation_cache_uri: str | None = None) -> str:
    """Train the transformer on a token cache made by `tokenizer_uri`'s tokenizer (a cache made by
    another tokenizer, scales or codebook is refused); returns the export URI
    (`<storage_uri>/<run_name>/export`: model.safetensors, config.json, metrics.jsonl).
    `validation_cache_uri`: the validation split's token cache (same tokenizer), for `validate_every`."""
    tokenizer_uri = absolute_uri(tokenizer_uri)  # read again by the workers, in Ray's folder
    info = read_export_info(tokenizer_uri)
    tokenizer_config = TokenizerConfig.from_dict(info["config"])
    dataset = read_token_cache(token_cache_uri, info["checksum"], tokenizer_config.scales,
                               tokenizer_config.codebook_size, flip_probability=config.flip_probability)
    validation = None
    if validation_cache_uri is not None and config.validate_every:
        validation = read_token_cache(validation_cache_uri, info["checksum"], tokenizer_config.scales,
                                      tokenizer_config.codebook_size)
    return train_gpt(config, dataset, tokenizer_uri, storage_uri, run_name, worker_pid_dir=worker_pid_dir,
                     validation=validation, class_names=cache_class_names(token_cache_uri),
                     data_uri=absolute_uri(token_cache_uri), tokenizer_info=info)
