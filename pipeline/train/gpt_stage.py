"""Stage 2: the VAR transformer on the token cache, with the official recipe.

Each worker holds the frozen tokenizer (from its export) to turn cached token maps into the
teacher-forcing input, exactly as the official trainer does with `idxBl_to_var_input`; the cache
saves the encoder pass, not this cheap accumulation. Loss: cross-entropy over all L tokens
(`next_scale_loss`), label dropout to the null class (VARConfig.cond_drop_rate = label_dropout).
"""

from __future__ import annotations

from typing import Any

import ray
import torch

from pipeline.exports import load_tokenizer, read_export_info, save_var
from pipeline.storage import absolute_uri
from pipeline.token_cache import read_token_cache, split_tokens
from pipeline.train.config import GPTStageConfig
from pipeline.train.harness import run_training
from pipeline.train.stage import TrainingStage
from var_model import VAR, TokenizerConfig, VARConfig, next_scale_loss
from var_model.transformer_blocks import SelfAttention


def check_matches_tokenizer(var_config: VARConfig, tokenizer_config: TokenizerConfig) -> None:
    """The transformer predicts the tokenizer's tokens: same pyramid, vocabulary and latent width."""
    for name in ("scales", "codebook_size", "embed_dim"):
        mine, theirs = getattr(var_config, name), getattr(tokenizer_config, name)
        if mine != theirs:
            raise ValueError(f"model.{name}: must equal the tokenizer's {name} {theirs} (got {mine})")


class GPTStage(TrainingStage):
    name = "gpt"
    columns = ("label", "tokens")

    def __init__(self, config: GPTStageConfig, tokenizer_uri: str):
        super().__init__(config)
        self.tokenizer_uri = tokenizer_uri
        self.tokenizer_checksum = read_export_info(tokenizer_uri)["checksum"]
        self.var_config = config.var_config()

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

    def export(self, model, uri, extra):
        return save_var(model, uri, extra={**extra, "tokenizer_checksum": self.tokenizer_checksum,
                                           "tokenizer_uri": self.tokenizer_uri})


def train_gpt(config: GPTStageConfig, dataset: ray.data.Dataset, tokenizer_uri: str, storage_uri: str,
              run_name: str, *, num_samples: int | None = None, worker_pid_dir: str | None = None) -> str:
    """Train on any Dataset with columns label (int64) and tokens (int64 [L]); returns the export URI."""
    tokenizer_config = TokenizerConfig.from_dict(read_export_info(tokenizer_uri)["config"])
    check_matches_tokenizer(config.var_config(), tokenizer_config)
    stage = GPTStage(config, tokenizer_uri)
    return run_training(stage, dataset, storage_uri, run_name, num_samples=num_samples,
                        worker_pid_dir=worker_pid_dir).export_uri


def run_gpt_stage(config: GPTStageConfig, token_cache_uri: str, tokenizer_uri: str, storage_uri: str,
                  run_name: str, *, worker_pid_dir: str | None = None) -> str:
    """Train the transformer on a token cache made by `tokenizer_uri`'s tokenizer (a cache made by
    another tokenizer, scales or codebook is refused); returns the export URI
    (`<storage_uri>/<run_name>/export`: model.safetensors, config.json, metrics.jsonl)."""
    tokenizer_uri = absolute_uri(tokenizer_uri)  # read again by the workers, in Ray's folder
    info = read_export_info(tokenizer_uri)
    tokenizer_config = TokenizerConfig.from_dict(info["config"])
    check_matches_tokenizer(config.var_config(), tokenizer_config)
    dataset = read_token_cache(token_cache_uri, info["checksum"], tokenizer_config.scales,
                               tokenizer_config.codebook_size, flip_probability=config.flip_probability)
    return train_gpt(config, dataset, tokenizer_uri, storage_uri, run_name, worker_pid_dir=worker_pid_dir)
