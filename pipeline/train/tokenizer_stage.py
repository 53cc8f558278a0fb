"""Stage 1: the multi-scale VQ-VAE tokenizer, trained on images from the Ray Data shard reader, with
the VQGAN recipe of VAR's paper (TokenizerStageConfig; shared/reference/tokenizer_recipe.md).

One micro-batch: reconstruct; L_nll = L1 + L2 (+ LPIPS) ; once the discriminator is on (from
`discriminator_start` of the steps, ramped over `discriminator_warmup`), the frozen discriminator's
generator loss L_g = -mean D(aug(rec)) weighted by factor * adversarial_weight * the adaptive weight;
tokenizer loss L_nll + vq_weight * L_vq (+ that term); the tokenizer engine steps; then the
discriminator (a second DeepSpeed engine, pipeline.train.tokenizer_recipe) steps on [x; rec]
(hinge, + bCR). After each optimizer step the EMA of the tokenizer's weights is updated; the export
holds it (config.json: "weights": "ema"). An off term (weight 0) builds and runs nothing.
Code usage is tracked by the quantizer's EMA of hits; codes that fall below `dead_code_threshold`
are re-initialised from encoder outputs every `dead_code_reset_every` steps (ZeRO-safe: the fp32
master copy is what gets replaced). Validation (every `validate_every` steps, on data.validation):
the loss terms, PSNR and an Inception rFID on `fid_samples` images, of the weights the export
would hold.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.core.configuration import ConfigError
from pipeline.core.exports import save_tokenizer
from pipeline.data.bad_samples import SkipBudget
from pipeline.data.reader import ImageDataConfig, bad_sample_summary, dataset_index, image_dataset, skip_budget
from pipeline.train.checkpointing import DEEPSPEED_TAG, CheckpointError, safe_torch_load
from pipeline.train.config import TokenizerStageConfig
from pipeline.train.harness import run_training
from pipeline.train.optimizer import NO_DECAY_KEYS
from pipeline.train.stage import TrainingStage
from pipeline.train.tokenizer_recipe import (
    LayerInput,
    ShardedEMA,
    adaptive_weight_at_conv,
    build_lpips_network,
    discriminator_input,
    loss_terms,
    per_scale_code_statistics,
    psnr_db,
    setup_discriminator_engine,
    to_uint8,
)
from pipeline.train.weights import full_parameter, full_state_dict, set_full_parameter
from var_model import VQVAE, MultiScaleQuantizer
from var_model.diff_augment import DiffAugment
from var_model.tokenizer_losses import (
    consistency_loss,
    discriminator_loss,
    discriminator_schedule_factor,
    generator_adversarial_loss,
)

logger = logging.getLogger(__name__)

DISCRIMINATOR_DIR = "discriminator"  # the discriminator engine's DeepSpeed checkpoint, inside the stage's
EMA_DIR = "ema"  # ema/rank_<r>.pt: rank r's EMA (rank 0's alone when every rank holds the whole weights)


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

    # ------------------------------------------------------------------ per-worker set-up

    def setup_worker(self, device: torch.device) -> None:
        config: TokenizerStageConfig = self.config
        self.device = device
        self.last_images: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(config.seed)
        self.lpips = build_lpips_network(config, device) if config.uses_lpips else None
        self.augment = DiffAugment(probability=config.discriminator_augment)
        self.strong_augment = DiffAugment(probability=1.0, cutout_ratio=0.2)
        self.discriminator_engine = None
        self.ema: ShardedEMA | None = None
        self.step = 0
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.validation_model: VQVAE | None = None
        self.validation_images: list[np.ndarray] = []
        self.validation_reconstructions: list[np.ndarray] = []
        self.real_features: dict[bytes, np.ndarray] = {}

    def setup_engine(self, engine) -> None:
        self.quantizer = engine.module.quantize
        self.last_layer = engine.module.decoder.conv_out
        self.last_layer_input = LayerInput(self.last_layer)

    def setup_auxiliary(self, engine, world_size: int, precision: str, total_steps: int) -> None:
        config: TokenizerStageConfig = self.config
        self.start_step, self.warmup_steps = config.discriminator_steps(total_steps)
        if config.uses_discriminator:
            self.discriminator_engine = setup_discriminator_engine(config, self.model_config.in_channels, world_size)
        if config.ema_decay > 0:
            self.ema = ShardedEMA(engine.module, config.ema_decay, config.ema_warmup)

    def discriminator_factor(self, step: int) -> float:
        """The schedule factor of optimizer step `step` (0-based); 0 without a discriminator."""
        if not self.config.uses_discriminator:
            return 0.0
        return discriminator_schedule_factor(step, self.start_step, self.warmup_steps)

    def before_micro_batch(self, step: int) -> None:
        self.step = step

    # ------------------------------------------------------------------ the losses

    def compute_loss(self, model, batch, dtype):
        config: TokenizerStageConfig = self.config
        images = batch["image"]
        self.last_images = images.detach()
        output = model(images.to(dtype))
        # A node past the hooks DeepSpeed puts on the engine's outputs: the adaptive weight's
        # autograd.grad stops here and never starts the engine's backward bookkeeping.
        reconstruction = output.reconstruction.view_as(output.reconstruction)
        nll, metrics = loss_terms(images.float(), reconstruction.float(), config, self.lpips)
        vq_loss = output.vq_loss.float()
        loss = nll + config.vq_weight * vq_loss
        usage, perplexity = per_scale_code_statistics(output.token_maps, self.model_config.codebook_size)
        metrics.update(vq_loss=vq_loss.detach(), codebook_usage=output.code_usage.detach(),
                       codebook_perplexity=output.perplexity.detach(), codebook_usage_scale=usage,
                       codebook_perplexity_scale=perplexity)
        factor = self.discriminator_factor(self.step)
        if factor > 0 and model.training:
            # The frozen discriminator's module, not its engine: L_g trains the tokenizer only, and the
            # engine's backward hooks are for the discriminator's own step.
            discriminator = self.discriminator_engine.module
            discriminator.requires_grad_(False)
            fake = discriminator_input(self.augment(reconstruction.float()), config)
            generator_loss = generator_adversarial_loss(discriminator(fake).float())
            weight = torch.ones((), device=images.device)
            if config.adaptive_weight:
                weight = adaptive_weight_at_conv(self.last_layer, self.last_layer_input.value, reconstruction,
                                                 nll, generator_loss)
            loss = loss + factor * config.adversarial_weight * weight * generator_loss
            metrics.update(generator_loss=generator_loss.detach(), adaptive_weight=weight.detach(),
                           discriminator_factor=torch.tensor(factor))
            self.pending = (images.detach(), reconstruction.detach())
        return loss, metrics

    def after_micro_batch(self) -> dict[str, torch.Tensor]:
        """The discriminator's step on [x; rec] of the micro-batch the tokenizer just took (when on)."""
        if self.pending is None:
            return {}
        config: TokenizerStageConfig = self.config
        images, reconstruction = self.pending
        self.pending = None
        discriminator = self.discriminator_engine
        discriminator.module.requires_grad_(True)
        both = torch.cat([images.float(), reconstruction.float()])
        logits = discriminator(discriminator_input(self.augment(both), config)).float()  # an fp32 engine
        real, fake = logits.chunk(2)
        loss = discriminator_loss(real, fake, config.discriminator_loss)
        metrics = {"discriminator_loss": loss.detach(), "logits_real": real.detach().mean(),
                   "logits_fake": fake.detach().mean()}
        if config.consistency_weight > 0:
            strong = discriminator(discriminator_input(self.strong_augment(both), config)).float()
            consistency = consistency_loss(strong, logits)
            loss = loss + config.consistency_weight * consistency
            metrics["discriminator_consistency"] = consistency.detach()
        discriminator.backward(loss)
        discriminator.step()
        return metrics

    def after_optimizer_step(self, engine, step: int) -> dict[str, float]:
        config: TokenizerStageConfig = self.config
        metrics: dict[str, float] = {}
        if config.dead_code_reset_every and step % config.dead_code_reset_every == 0 and self.last_images is not None:
            metrics["dead_codes_reset"] = float(self.reset_dead_codes(engine))
        if self.ema is not None:
            metrics["ema_decay"] = self.ema.update()
        return metrics

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
            if self.ema is not None:  # a fresh code has no history worth averaging with
                name = next(n for n, p in model.named_parameters() if p is weight)
                self.ema.set_rows(name, dead, codebook[dead])
            # Fresh codes get the mean count, so they are not reset again before they had a chance.
            if scale_index is None:
                ema[:, dead] = ema.mean(dim=1, keepdim=True).to(ema.dtype)
            else:
                ema[scale_index, dead] = ema[scale_index].mean().to(ema.dtype)
            replaced += dead.numel()
        return replaced

    def interval_metrics(self) -> dict[str, float]:
        # Share of codes whose hit EMA reaches the official margin (8% of a uniform share).
        world = dist.get_world_size() if dist.is_initialized() else 1
        tokens_per_batch = self.config.micro_batch_size * world * self.model_config.latent_size ** 2
        usage = self.quantizer.ema_code_usage(tokens_per_batch)
        return {"codebook_ema_usage": float(usage.float().mean())}

    def stop_reason(self, step: int) -> str | None:
        return self.skip_budget.exceeded() if self.skip_budget is not None else None

    # ------------------------------------------------------------------ checkpoint and export

    def save_auxiliary(self, folder: str, rank: int) -> None:
        """Collective: the discriminator engine's shard and this rank's EMA, beside the tokenizer's."""
        if self.discriminator_engine is not None:
            self.discriminator_engine.save_checkpoint(os.path.join(folder, DISCRIMINATOR_DIR), tag=DEEPSPEED_TAG)
        if self.ema is not None and (self.ema.partitioned or rank == 0):
            os.makedirs(os.path.join(folder, EMA_DIR), exist_ok=True)
            torch.save(self.ema.state_dict(), os.path.join(folder, EMA_DIR, f"rank_{rank}.pt"))

    def load_auxiliary(self, folder: str, rank: int, where: str) -> None:
        """Restore what `save_auxiliary` wrote (weights-only loads); a checkpoint made without the
        discriminator or the EMA (e.g. an L2-only run extended with the recipe) starts them fresh."""
        discriminator_dir = os.path.join(folder, DISCRIMINATOR_DIR)
        if self.discriminator_engine is not None:
            if os.path.isdir(discriminator_dir):
                self.discriminator_engine.checkpoint_engine.load = safe_torch_load
                loaded, _ = self.discriminator_engine.load_checkpoint(
                    discriminator_dir, tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
                if loaded is None:
                    raise CheckpointError(f"checkpoint {where}: DeepSpeed found no discriminator state to load")
            elif rank == 0:
                logger.info("[tokenizer] checkpoint %s has no discriminator: it starts fresh", where)
        if self.ema is not None:
            path = os.path.join(folder, EMA_DIR, f"rank_{rank if self.ema.partitioned else 0}.pt")
            if os.path.exists(path):
                self.ema.load_state_dict(safe_torch_load(path, map_location="cpu"))
            elif rank == 0:
                logger.info("[tokenizer] checkpoint %s has no EMA: it starts from the restored weights", where)

    def export_state_dict(self, engine) -> dict[str, torch.Tensor]:
        """Collective: the weights the export holds: the EMA's when on (buffers from the trained model)."""
        state = full_state_dict(engine.module)
        if self.ema is not None:
            state.update(self.ema.full_state_dict())
        return state

    def export_extra(self) -> dict[str, Any]:
        config: TokenizerStageConfig = self.config
        extra: dict[str, Any] = {"class_names": self.class_names}
        if self.ema is not None:
            extra.update(weights="ema", ema_decay=config.ema_decay, ema_warmup=config.ema_warmup,
                         ema_updates=self.ema.average.num_updates)
        else:
            extra["weights"] = "trained"
        extra["recipe"] = {name: getattr(config, name) for name in (
            "recipe", "reconstruction_l1_weight", "reconstruction_l2_weight", "vq_weight", "perceptual_weight",
            "adversarial_weight", "adaptive_weight", "discriminator", "discriminator_loss", "discriminator_start",
            "discriminator_warmup", "consistency_weight")}
        if self.skip_budget is not None:
            extra.update(data_uri=self.skip_budget.shards_uri, data=self.skip_budget.report())
        return extra

    # ------------------------------------------------------------------ validation

    def validation_module(self, engine) -> VQVAE:
        """Collective: a plain fp32 copy with the weights the export would hold (EMA when on)."""
        state = self.export_state_dict(engine)
        if self.validation_model is None:
            self.validation_model = self.build_model().to(self.device)
        self.validation_model.load_state_dict(state, strict=True)
        self.validation_images, self.validation_reconstructions = [], []
        return self.validation_model.eval()

    def validation_loss(self, model, batch, dtype):
        config: TokenizerStageConfig = self.config
        images = batch["image"].float()
        output = model(images)
        reconstruction = output.reconstruction.float()
        nll, metrics = loss_terms(images, reconstruction, config, self.lpips)
        loss = nll + config.vq_weight * output.vq_loss.float()
        metrics.update(vq_loss=output.vq_loss.float(), psnr_db=psnr_db(images, reconstruction).mean())
        world = dist.get_world_size() if dist.is_initialized() else 1
        wanted = math.ceil(config.fid_samples / world) - sum(len(chunk) for chunk in self.validation_images)
        if wanted > 0:
            self.validation_images.append(to_uint8(images[:wanted]))
            self.validation_reconstructions.append(to_uint8(reconstruction[:wanted]))
        return loss, metrics

    def validation_summary(self) -> dict[str, float]:
        """Collective: the Inception rFID of the pass's reconstructions against their originals (rank 0)."""
        if not self.config.fid_samples:
            return {}
        from pipeline.evaluation.frechet import FeatureStatistics, frechet_distance
        from pipeline.evaluation.inception import inception_features

        images = np.concatenate(self.validation_images) if self.validation_images else np.zeros((0, 1, 1, 1), np.uint8)
        reconstructions = (np.concatenate(self.validation_reconstructions) if self.validation_reconstructions
                           else images)
        self.validation_images, self.validation_reconstructions = [], []
        real = self._real_features(images)
        fake = inception_features(reconstructions) if len(reconstructions) else np.zeros((0, real.shape[1]))
        gathered: list[Any] = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
        if dist.is_initialized():
            dist.all_gather_object(gathered, (real, fake))
        else:
            gathered = [(real, fake)]
        real = np.concatenate([pair[0] for pair in gathered])
        fake = np.concatenate([pair[1] for pair in gathered])
        if len(real) < 2:
            return {}
        return {"rfid": frechet_distance(FeatureStatistics.of(fake), FeatureStatistics.of(real)),
                "rfid_samples": float(len(real))}

    def _real_features(self, images: np.ndarray) -> np.ndarray:
        """Inception features of validation originals, each computed once per worker (keyed by content)."""
        from pipeline.evaluation.inception import FEATURE_DIM, inception_features

        keys = [hashlib.sha1(image.tobytes()).digest() for image in images]
        missing = [index for index, key in enumerate(keys) if key not in self.real_features]
        if missing:
            for index, feature in zip(missing, inception_features(images[missing])):
                self.real_features[keys[index]] = feature
        if not keys:
            return np.zeros((0, FEATURE_DIM))
        return np.stack([self.real_features[key] for key in keys])

    def export(self, model, uri, extra):
        return save_tokenizer(model, uri, extra=extra)


def check_weights_files(config: TokenizerStageConfig, section: str = "tokenizer") -> None:
    """Driver side, before any worker starts: every weights file the config reads exists, else one line
    (ConfigError) naming the field, the file and how to obtain it."""
    missing = config.missing_weights_file()
    if missing is not None:
        raise ConfigError(f"config error: {section}.{missing}")


def _at_model_geometry(data_config: ImageDataConfig, model_config, section: str) -> ImageDataConfig:
    """The images are read at the tokenizer's size and channels unless the data config names others."""
    data_config = data_config.model_copy(update={"image_size": data_config.image_size or model_config.image_size,
                                                 "channels": data_config.channels or model_config.in_channels})
    for field, theirs in (("image_size", model_config.image_size), ("channels", model_config.in_channels)):
        if getattr(data_config, field) != theirs:
            raise ValueError(f"{section}.{field}: must equal the tokenizer's {theirs} (got {getattr(data_config, field)})")
    return data_config


def run_tokenizer_stage(config: TokenizerStageConfig, data_config: ImageDataConfig, storage_uri: str,
                        run_name: str, *, worker_pid_dir: str | None = None,
                        max_skipped_fraction: float = 0.01, validation: ImageDataConfig | None = None) -> str:
    """Train the tokenizer on `data_config`'s shards; returns the export URI
    (`<storage_uri>/<run_name>/export`: model.safetensors, config.json, metrics.jsonl).

    `validation`: the validation split, passed over every `validate_every` steps (losses, PSNR, rFID).
    Stops without an export (TrainingStopped) once bad samples cost more than `max_skipped_fraction`
    of the split; what was skipped is recorded in the export's config.json under "data"."""
    check_weights_files(config)
    model_config = config.tokenizer_config()
    index = dataset_index(data_config)
    data_config = _at_model_geometry(data_config, model_config, "data")
    validation_dataset = None
    if validation is not None and config.validate_every:
        validation = _at_model_geometry(validation.model_copy(update={"shuffle": False, "shuffle_buffer_size": 0}),
                                        model_config, "data.validation")
        validation_dataset = image_dataset(validation).limit(config.validation_samples)
    stage = TokenizerStage(config, shuffle_buffer_size=data_config.shuffle_buffer_size,
                           skip_budget=skip_budget(data_config, max_skipped_fraction),
                           class_names=list(index.class_names) if index.class_names else None)
    result = run_training(stage, image_dataset(data_config), storage_uri, run_name, num_samples=index.total,
                          worker_pid_dir=worker_pid_dir, validation=validation_dataset)
    summary = bad_sample_summary(data_config)
    logger.info("tokenizer stage done: %s (data: %s)", result.export_uri, summary)
    return result.export_uri
