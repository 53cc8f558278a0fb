"""Stage 1: the multi-scale VQ-VAE tokenizer, trained on images from the Ray Data shard reader.

Loss: reconstruction L2 (+ optional L1) + the model's VQ loss (commitment beta and codebook terms,
straight-through). The paper adds LPIPS and a GAN term; their networks are not available offline,
so they stay off (TokenizerStageConfig explains). Code usage is tracked by the quantizer's EMA of
hits; codes that fall below `dead_code_threshold` are re-initialised from encoder outputs every
`dead_code_reset_every` steps (ZeRO-safe: the fp32 master copy is what gets replaced).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.core.exports import save_tokenizer
from pipeline.data.bad_samples import SkipBudget
from pipeline.data.reader import ImageDataConfig, bad_sample_summary, dataset_index, image_dataset, skip_budget
from pipeline.train.config import TokenizerStageConfig
from pipeline.train.harness import run_training
from pipeline.train.optimizer import NO_DECAY_KEYS
from pipeline.train.stage import TrainingStage
from pipeline.train.weights import full_parameter, set_full_parameter
from var_model import VQVAE, MultiScaleQuantizer

logger = logging.getLogger(__name__)


class TokenizerStage(TrainingStage):
    name = "tokenizer"
    columns = ("image",)
    # Codebook vectors are points the encoder must reach; decaying them towards 0 only shrinks them.
    no_decay_keys = NO_DECAY_KEYS + ("quantize.embedding", "quantize.codebooks")

    def __init__(self, config: TokenizerStageConfig, shuffle_buffer_size: int = 0,
                 skip_budget: SkipBudget | None = None, class_names: list[str] | None = None):
        super().__init__(config)
        self.class_names = class_names
        self.model_config = config.tokenizer_config()
        self.shuffle_buffer_size = shuffle_buffer_size
        self.skip_budget = skip_budget

    def build_model(self) -> VQVAE:
        return VQVAE(self.model_config)

    def zero3_leaf_modules(self) -> list[type[torch.nn.Module]]:
        # The quantizer reads its codebook's weight directly (nearest-code search), outside the
        # embedding's forward: ZeRO-3 must gather the quantizer as a whole.
        return [MultiScaleQuantizer]

    def batch_options(self) -> dict[str, Any]:
        return {"local_shuffle_buffer_size": self.shuffle_buffer_size} if self.shuffle_buffer_size else {}

    def setup_worker(self, device: torch.device) -> None:
        self.last_images: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(self.config.seed)

    def compute_loss(self, model, batch, dtype):
        config: TokenizerStageConfig = self.config
        images = batch["image"]
        self.last_images = images.detach()
        output = model(images.to(dtype))
        reconstruction = output.reconstruction.float()
        l2 = F.mse_loss(reconstruction, images.float())
        loss = config.reconstruction_l2_weight * l2 + config.vq_weight * output.vq_loss.float()
        metrics = {"reconstruction_l2": l2.detach(), "vq_loss": output.vq_loss.detach(),
                   "codebook_usage": output.code_usage.detach(), "codebook_perplexity": output.perplexity.detach()}
        if config.reconstruction_l1_weight > 0:
            l1 = F.l1_loss(reconstruction, images.float())
            loss = loss + config.reconstruction_l1_weight * l1
            metrics["reconstruction_l1"] = l1.detach()
        return loss, metrics

    def after_optimizer_step(self, engine, step: int) -> dict[str, float]:
        config: TokenizerStageConfig = self.config
        if not config.dead_code_reset_every or step % config.dead_code_reset_every or self.last_images is None:
            return {}
        return {"dead_codes_reset": float(self.reset_dead_codes(engine))}

    @torch.no_grad()
    def reset_dead_codes(self, engine) -> int:
        """Collective. Dead codes (identical on every rank: the hit EMA is all-reduced) get random
        encoder output vectors drawn on rank 0 and broadcast; returns how many were replaced."""
        model = engine.module
        quantizer = model.quantize
        latents = model.encode_latent(self.last_images.to(next(model.parameters()).dtype)).float()
        vectors = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        ema = quantizer.ema_vocab_hit_SV
        rows = range(quantizer.num_scales) if quantizer.codebook_per_scale else [None]
        replaced = 0
        for scale_index in rows:
            usage = ema.float().sum(dim=0) if scale_index is None else ema[scale_index].float()
            dead = (usage < self.config.dead_code_threshold).nonzero().flatten()
            if dead.numel() == 0:
                continue
            weight = quantizer.codebook(scale_index or 0).weight
            codebook = full_parameter(weight).clone()
            picks = torch.randint(0, vectors.shape[0], (dead.numel(),), generator=self.generator)
            codebook[dead] = vectors[picks.to(vectors.device)].to(codebook.device)
            if dist.is_initialized():
                dist.broadcast(codebook, src=0)  # rank 0's encoder outputs win
            set_full_parameter(weight, codebook)
            # Fresh codes get the mean count, so they are not reset again before they had a chance.
            if scale_index is None:
                ema[:, dead] = ema.mean(dim=1, keepdim=True).to(ema.dtype)
            else:
                ema[scale_index, dead] = ema[scale_index].mean().to(ema.dtype)
            replaced += dead.numel()
        return replaced

    def setup_engine(self, engine) -> None:
        self.quantizer = engine.module.quantize

    def interval_metrics(self) -> dict[str, float]:
        # Share of codes whose hit EMA reaches the official margin (8% of a uniform share).
        world = dist.get_world_size() if dist.is_initialized() else 1
        tokens_per_batch = self.config.micro_batch_size * world * self.model_config.latent_size ** 2
        usage = self.quantizer.ema_code_usage(tokens_per_batch)
        return {"codebook_ema_usage": float(usage.float().mean())}

    def stop_reason(self, step: int) -> str | None:
        return self.skip_budget.exceeded() if self.skip_budget is not None else None

    def export_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"class_names": self.class_names}
        if self.skip_budget is not None:
            extra.update(data_uri=self.skip_budget.shards_uri, data=self.skip_budget.report())
        return extra

    def export(self, model, uri, extra):
        return save_tokenizer(model, uri, extra=extra)


def run_tokenizer_stage(config: TokenizerStageConfig, data_config: ImageDataConfig, storage_uri: str,
                        run_name: str, *, worker_pid_dir: str | None = None,
                        max_skipped_fraction: float = 0.01) -> str:
    """Train the tokenizer on `data_config`'s shards; returns the export URI
    (`<storage_uri>/<run_name>/export`: model.safetensors, config.json, metrics.jsonl).

    Stops without an export (TrainingStopped) once bad samples cost more than `max_skipped_fraction`
    of the split; what was skipped is recorded in the export's config.json under "data"."""
    model_config = config.tokenizer_config()
    index = dataset_index(data_config)
    # The images are read at the tokenizer's size and channels unless the data config names others.
    data_config = data_config.model_copy(update={"image_size": data_config.image_size or model_config.image_size,
                                                 "channels": data_config.channels or model_config.in_channels})
    for field, theirs in (("image_size", model_config.image_size), ("channels", model_config.in_channels)):
        if getattr(data_config, field) != theirs:
            raise ValueError(f"data.{field}: must equal the tokenizer's {theirs} (got {getattr(data_config, field)})")
    stage = TokenizerStage(config, shuffle_buffer_size=data_config.shuffle_buffer_size,
                           skip_budget=skip_budget(data_config, max_skipped_fraction),
                           class_names=list(index.class_names) if index.class_names else None)
    result = run_training(stage, image_dataset(data_config), storage_uri, run_name, num_samples=index.total,
                          worker_pid_dir=worker_pid_dir)
    summary = bad_sample_summary(data_config)
    logger.info("tokenizer stage done: %s (data: %s)", result.export_uri, summary)
    return result.export_uri
