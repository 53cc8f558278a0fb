"""Typed training configs: the common `TrainingConfig` and one section per stage.

Every field is validated before any worker starts; cross-field rules (batch divisibility, steps or
epochs) raise one line naming the field. Defaults follow the official VAR recipe where it has one
(reference section 4): AdamW (0.9, 0.95), weight decay 0.05, lr = base_learning_rate * global_batch
/ 256 with base 1e-4, warmup from 0.005x over 2% of training, then "lin0" (flat 5%, linear decay to
final_lr_fraction), gradient-norm clip 2.0.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from pipeline.core.configuration import StrictModel
from pipeline.core.storage import Location, absolute_uri
from var_model import TOKENIZER_PRESETS, VAR_PRESETS, TokenizerConfig, VARConfig, contract_of, paired

RESUME_KEYWORDS = ("latest", "none")

# The official tokenizer recipe (shared/reference/tokenizer_recipe.md: vaex `Args` and `trainer.py`), as
# TokenizerStageConfig field values; `recipe: vqgan` fills the fields a config leaves unset with these.
# LPIPS and bCR are vaex's nominal values (its trainer doubles both); lr 3e-4 is the peak lr of both
# networks at any batch (the tokenizer's base_learning_rate is derived from the batch to give it).
RECIPE_LEARNING_RATE = 3e-4
TOKENIZER_RECIPES: dict[str, dict[str, Any]] = {
    "vqgan": {
        "reconstruction_l1_weight": 0.2, "reconstruction_l2_weight": 1.0, "vq_weight": 1.0,
        "perceptual_weight": 0.5, "perceptual_min_resolution": 48,
        "adversarial_weight": 0.4, "adaptive_weight": True, "discriminator_loss": "hinge",
        "discriminator_start": 0.22, "discriminator_warmup": 0.02, "discriminator_augment": 1.0,
        "consistency_weight": 4.0,
        "betas": (0.5, 0.9), "discriminator_betas": (0.5, 0.9), "discriminator_learning_rate": RECIPE_LEARNING_RATE,
        "weight_decay": 0.005, "discriminator_weight_decay": 0.0005, "grad_clip": 10.0,
        "warmup_start_factor": 0.005, "final_lr_fraction": 0.3,
        "ema_decay": 0.9999, "ema_warmup": True,
    },
}
RECIPE_MODEL: dict[str, dict[str, Any]] = {"vqgan": {"beta": 0.25}}  # TokenizerConfig fields (explicit model wins)
DINO_HOW_TO_GET = ("a DINO ViT-S/16 state dict (timm `vit_small_patch16_224.dino` or facebookresearch/dino's "
                   "dino_deitsmall16_pretrain.pth), downloaded on a machine with internet and pointed to here")


def _model_config(presets: dict[str, Any], default: Any, preset: str | None, overrides: dict[str, Any]) -> Any:
    """preset (or the class defaults), then field overrides; errors name `preset` or `model.<field>`."""
    if preset is not None and preset not in presets:
        raise ValueError(f"preset: unknown preset, choose from {sorted(presets)} (got {preset!r})")
    base = presets[preset] if preset is not None else default
    known = {field.name for field in dataclasses.fields(base)}
    for name, value in overrides.items():
        if name not in known:
            raise ValueError(f"model.{name}: unknown {type(base).__name__} field (got {value!r})")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"model.{name}: must be a finite number (got {value!r})")
    try:
        return dataclasses.replace(base, **overrides)
    except ValueError as exc:  # the dataclass's own "field: rule (got x)"
        raise ValueError(f"model.{exc}") from None


class TrainingConfig(StrictModel):
    """What every stage shares: cluster shape, ZeRO, precision, batch, schedule, checkpoints."""

    # Cluster shape (Ray Train ScalingConfig).
    num_workers: int = Field(2, ge=1, description="Ray Train workers = DeepSpeed data-parallel ranks")
    use_gpu: Literal["auto"] | bool = Field("auto", description="auto: GPUs when the Ray cluster has any")
    cpus_per_worker: float = Field(1.0, gt=0, description="logical CPUs each worker reserves")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    # DeepSpeed.
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage: 0 off, 1 optimizer state, 2 +grads, 3 +params")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp32 otherwise (fp16 is refused on CPU)")
    offload_optimizer: bool = Field(False, description="ZeRO 1-3: keep optimizer state in CPU memory")
    offload_parameters: bool = Field(False, description="ZeRO 3 only: keep parameters in CPU memory")

    # Batch: gradient accumulation = global_batch_size / (micro_batch_size * world size).
    global_batch_size: int = Field(64, ge=1, description="samples per optimizer step over all workers")
    micro_batch_size: int = Field(32, ge=1, description="samples per forward pass on one worker")

    # Length: exactly one of steps / epochs.
    steps: int | None = Field(1000, ge=1, description="optimizer steps in total")
    epochs: float | None = Field(None, gt=0, description="passes over the data (steps derived from the sample count)")

    # Optimizer (AdamW) and schedule.
    base_learning_rate: float = Field(1e-4, gt=0, description="lr per 256 samples (tblr): lr = tblr * global_batch / 256")
    warmup_fraction: float = Field(0.02, ge=0, lt=1, description="warmup length as a fraction of steps (ref: ep/50)")
    warmup_steps: int | None = Field(None, ge=0, description="warmup length in steps; overrides warmup_fraction")
    warmup_start_factor: float = Field(0.005, gt=0, le=1, description="lr factor at step 0 (ref wp0)")
    final_lr_fraction: float = Field(0.1, ge=0, le=1, description="lr factor at the last step (ref wpe)")
    weight_decay: float = Field(0.05, ge=0)
    final_weight_decay: float | None = Field(None, ge=0, description="cosine-anneal weight decay to this (ref twde); None: constant")
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(2.0, ge=0, description="gradient-norm clip; 0 disables")

    # Checkpoints, metrics, fault tolerance.
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints (and one at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept in storage (the newest)")
    log_every: int = Field(10, ge=1, description="steps between metric reports")
    max_failures: int = Field(1, ge=-1, description="worker-group restarts from the last checkpoint; -1 unlimited")
    resume: str = Field("latest", min_length=1, description=(
        "latest: continue from the run's newest checkpoint; none: start at step 0 (the run's old folder is moved "
        "aside, not deleted); or a checkpoint URI (a step_XXXXXXXX folder) to start from"))
    seed: int = 0

    @field_validator("resume")
    @classmethod
    def _resume_location(cls, value: str) -> str:
        return value if value in RESUME_KEYWORDS else absolute_uri(value)

    # Live reports (pipeline.train.reporting): every logged interval, written as it happens.
    report_to: list[Literal["tensorboard", "csv", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard", "csv"],
        description="where each logged interval goes besides the console: tensorboard (event files in the "
                    "stage's folder), csv (<stage>/metrics.csv), wandb (optional import; WANDB_MODE=offline "
                    "works); a list, or one comma-separated string; [] or none: only the console")
    validate_every: int = Field(0, ge=0, description="steps between validation passes over the stage's validation "
                                                      "set (and one at the last step); 0 off")

    @field_validator("report_to", mode="before")
    @classmethod
    def _split_report_to(cls, value: Any) -> Any:
        if isinstance(value, str):  # --set gpt.report_to=csv,tensorboard (or none)
            value = [] if value.strip().lower() in ("", "none") else [part.strip() for part in value.split(",")]
        return list(dict.fromkeys(value)) if isinstance(value, (list, tuple)) else value

    @model_validator(mode="after")
    def _check(self) -> TrainingConfig:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"steps: set exactly one of steps / epochs (got steps={self.steps}, epochs={self.epochs})")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size: must be a multiple of micro_batch_size={self.micro_batch_size} "
                             f"(got {self.global_batch_size})")
        self.gradient_accumulation_steps(self.num_workers)  # raises with the field name if not divisible
        if self.offload_parameters and self.zero_stage != 3:
            raise ValueError(f"offload_parameters: needs zero_stage 3 (got zero_stage={self.zero_stage})")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer: needs zero_stage 1, 2 or 3 (got zero_stage=0)")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas: each must be in [0, 1) (got {self.betas})")
        return self

    def gradient_accumulation_steps(self, world_size: int) -> int:
        """Micro-batches each worker runs per optimizer step."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(f"global_batch_size: must be a multiple of micro_batch_size * num_workers = {per_step} "
                             f"(got {self.global_batch_size})")
        return self.global_batch_size // per_step

    @property
    def learning_rate(self) -> float:
        """Peak lr, scaled linearly with the batch as in the reference (tblr * batch / 256)."""
        return self.base_learning_rate * self.global_batch_size / 256

    def total_steps(self, num_samples: int | None = None) -> int:
        if self.steps is not None:
            return self.steps
        if num_samples is None:
            raise ValueError("epochs: the sample count is needed to turn epochs into steps")
        return max(1, int(self.epochs * num_samples // self.global_batch_size))

    def warmup_length(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return min(self.warmup_steps, total_steps)
        return round(self.warmup_fraction * total_steps)


class TokenizerStageConfig(TrainingConfig):
    """Stage 1: the multi-scale VQ-VAE, with the VQGAN recipe VAR's paper names (reconstruction, LPIPS,
    adversarial; shared/reference/tokenizer_recipe.md, read from the official authors' vaex).

    Every term has its weight; a weight of 0 turns the term off and costs nothing (no LPIPS network,
    no discriminator built or stepped). `recipe: vqgan` fills every field the config does not set
    with the official recipe's value (`TOKENIZER_RECIPES`); a field the config sets wins.
    Weights files (LPIPS's VGG16 and heads, the DINO discriminator's ViT) are never downloaded: a
    missing one stops the job on the driver with one line naming the field and the file
    (`missing_weights_file`, checked before any worker starts).
    """

    recipe: Literal["vqgan"] | None = Field(None, description=(
        "a named set of defaults for the fields below (explicit fields win); vqgan: the official tokenizer "
        "recipe (L1 0.2, L2 1, beta 0.25, LPIPS 0.5, adversarial 0.4 hinge adaptive from 22% of the steps, "
        "AdamW (0.5, 0.9) at lr 3e-4 for both networks, EMA 0.9999)"))
    preset: str | None = Field(None, description="a var_model TOKENIZER_PRESETS name; None: TokenizerConfig defaults")
    model: dict[str, Any] = Field(default_factory=dict, description="TokenizerConfig field overrides")

    # Reconstruction and VQ.
    reconstruction_l2_weight: float = Field(1.0, ge=0)
    reconstruction_l1_weight: float = Field(0.0, ge=0)
    vq_weight: float = Field(1.0, ge=0, description="weight of the model's VQ loss (its beta is TokenizerConfig.beta)")

    # Perceptual: LPIPS on VGG16, from files (never downloaded).
    perceptual_weight: float = Field(0.0, ge=0, description="LPIPS weight (recipe 0.5); 0: no LPIPS network built")
    vgg_weights: Location | None = Field(None, description=(
        "torchvision's vgg16 ImageNet state dict (vgg16-397923af.pth); None: torch's hub cache "
        "(torch.hub.get_dir()/checkpoints/)"))
    lpips_weights: Location | None = Field(None, description=(
        "LPIPS's linear heads (lpips/weights/v0.1/vgg.pth of the lpips package); None: torch's hub cache or an "
        "installed lpips package"))
    perceptual_min_resolution: int = Field(48, ge=1, description="LPIPS only for images of at least this size "
                                                                 "(recipe 48)")
    perceptual_upsample_to: int | None = Field(None, ge=1, description="smaller images are upsampled to this size "
                                                                       "for LPIPS instead of skipping it")

    # Adversarial.
    adversarial_weight: float = Field(0.0, ge=0, description="generator adversarial weight (recipe 0.4); 0: no "
                                                             "discriminator built or stepped")
    adaptive_weight: bool = Field(True, description="VQGAN's adaptive weight: the ratio of the reconstruction and "
                                                    "adversarial gradient norms at the decoder's last layer, clamped "
                                                    "to [0.015, 1e4], times adversarial_weight")
    discriminator: Literal["patchgan", "dino"] = Field("patchgan", description=(
        "patchgan: VQGAN's N-layer convolutional one, from scratch (no weights needed); dino: the official "
        "recipe's DINO ViT-S/16 features with trained heads (needs dino_weights)"))
    discriminator_loss: Literal["hinge", "softplus", "linear"] = "hinge"
    discriminator_channels: int = Field(64, ge=1, description="PatchGAN base width")
    discriminator_layers: int = Field(3, ge=1, le=6, description="PatchGAN stride-2 layers")
    dino_weights: Location | None = Field(None, description="DINO ViT-S/16 weights file (timm/DINO layout), for "
                                                            "discriminator: dino")
    discriminator_start: float = Field(0.22, ge=0, le=1, description="share of the steps before the discriminator "
                                                                     "starts (recipe 0.22)")
    discriminator_warmup: float = Field(0.02, ge=0, le=1, description="share of the steps over which its weight "
                                                                      "ramps linearly to 1 after the start (recipe "
                                                                      "0.02)")
    discriminator_learning_rate: float | None = Field(None, gt=0, description="the discriminator's lr (constant); "
                                                                              "None: the tokenizer's peak lr")
    discriminator_betas: tuple[float, float] = (0.5, 0.9)
    discriminator_weight_decay: float = Field(0.0005, ge=0)
    discriminator_augment: float = Field(1.0, ge=0, le=1, description="DiffAugment probability on the "
                                                                      "discriminator's inputs (recipe 1.0)")
    consistency_weight: float = Field(0.0, ge=0, description="bCR weight on the discriminator (vaex 4.0, which its "
                                                             "trainer doubles); 0 off")

    # EMA of the tokenizer's weights (what the export holds when on).
    ema_decay: float = Field(0.0, ge=0, lt=1, description="0: off; recipe 0.9999; the export then holds the EMA")
    ema_warmup: bool = Field(True, description="decay min(ema_decay, (n/2+1)/(n/2+10)) at update n, for short runs")

    # Validation (every validate_every steps, on data.validation).
    validation_samples: int = Field(1000, ge=1, description="validation images per pass (the split's first N): "
                                                            "losses and PSNR")
    fid_samples: int = Field(500, ge=0, description="of those, the images whose reconstructions get an Inception "
                                                    "FID (rFID, ~5-10 img/s on 2 CPU cores) at each validation "
                                                    "pass; 0: losses and PSNR only")

    dead_code_threshold: float = Field(
        1.0, ge=0, description="a code whose EMA hit count (per optimizer micro-batch, all workers, all scales) "
                               "is below this is dead and gets re-initialised from encoder outputs")
    dead_code_reset_every: int = Field(50, ge=0, description="steps between dead-code resets; 0 disables")

    # Without a recipe: the VAR schedule, without decay on the codebook.
    base_learning_rate: float = Field(2e-4, gt=0, description="lr per 256 samples")
    weight_decay: float = Field(0.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("recipe") is None:
            return data
        name = data["recipe"]
        if name not in TOKENIZER_RECIPES:
            return data  # the Literal names the choices
        data = dict(data)
        for field, value in TOKENIZER_RECIPES[name].items():
            data.setdefault(field, value)
        if "base_learning_rate" not in data:  # the recipe's lr 3e-4 at this config's batch
            batch = data.get("global_batch_size", cls.model_fields["global_batch_size"].default)
            if isinstance(batch, int) and batch > 0:
                data["base_learning_rate"] = RECIPE_LEARNING_RATE * 256 / batch
        if isinstance(data.get("model", {}), dict):
            data["model"] = {**RECIPE_MODEL[name], **data.get("model", {})}
        return data

    @model_validator(mode="after")
    def _check_terms(self) -> TokenizerStageConfig:
        if self.reconstruction_l2_weight == 0 and self.reconstruction_l1_weight == 0:
            raise ValueError("reconstruction_l2_weight: L2 and L1 weights cannot both be 0")
        if not all(0 <= beta < 1 for beta in self.discriminator_betas):
            raise ValueError(f"discriminator_betas: each must be in [0, 1) (got {self.discriminator_betas})")
        if self.adversarial_weight and self.discriminator == "dino" and self.dino_weights is None:
            raise ValueError("dino_weights: discriminator dino needs a DINO ViT-S/16 weights file (or use "
                             "discriminator: patchgan, which needs none)")
        if self.fid_samples > self.validation_samples:
            raise ValueError(f"fid_samples: at most validation_samples={self.validation_samples} "
                             f"(got {self.fid_samples})")
        if self.consistency_weight and not self.adversarial_weight:
            raise ValueError(f"consistency_weight: regularises the discriminator, which adversarial_weight 0 "
                             f"turns off (got {self.consistency_weight})")
        self.tokenizer_config()  # a bad preset or override fails here, before any worker starts
        return self

    def tokenizer_config(self) -> TokenizerConfig:
        """The model this stage trains: `preset` (or TokenizerConfig defaults), then `model` overrides."""
        return _model_config(TOKENIZER_PRESETS, TokenizerConfig(), self.preset, self.model)

    @property
    def uses_discriminator(self) -> bool:
        return self.adversarial_weight > 0

    @property
    def uses_lpips(self) -> bool:
        return self.perceptual_weight > 0

    @property
    def discriminator_lr(self) -> float:
        return self.discriminator_learning_rate or self.learning_rate

    def discriminator_steps(self, total_steps: int) -> tuple[int, int]:
        """(first step the discriminator acts on, 0-based; warm-up length in steps)."""
        return round(self.discriminator_start * total_steps), round(self.discriminator_warmup * total_steps)

    def weights_files(self) -> dict[str, tuple[str, str]]:
        """The weights files this config reads: field -> (location, what it is and how to obtain it).
        Unset LPIPS paths are torch's hub cache locations, as var_model.lpips looks them up."""
        files: dict[str, tuple[str, str]] = {}
        if self.uses_lpips:
            from var_model import lpips

            lin = self.lpips_weights or lpips.find_lpips_lin_file() or (
                Path(torch.hub.get_dir()) / "checkpoints" / lpips.LPIPS_LIN_FILE_NAME)
            files["vgg_weights"] = (str(self.vgg_weights or lpips.default_vgg16_path()), lpips.VGG16_HOW_TO_GET)
            files["lpips_weights"] = (str(lin), lpips.LPIPS_LIN_HOW_TO_GET)
        if self.uses_discriminator and self.discriminator == "dino" and self.dino_weights is not None:
            files["dino_weights"] = (self.dino_weights, DINO_HOW_TO_GET)
        return files

    def missing_weights_file(self, exists: Any = None) -> str | None:
        """"<field>: ... not found: <file>; <how to obtain it>" for the first weights file that is
        missing, or None. `exists(uri)`: the storage check (default: pipeline.core.storage.exists)."""
        if exists is None:
            from pipeline.core.storage import exists
        for field, (location, how) in self.weights_files().items():
            if not exists(location):
                return f"{field}: weights file not found: {location}; it is {how}"
        return None


class GPTStageConfig(TrainingConfig):
    """Stage 2: the VAR transformer on the token cache, with the reference recipe as defaults."""

    preset: str | None = Field(None, description="a var_model VAR_PRESETS name (e.g. d16); None: VARConfig defaults")
    model: dict[str, Any] = Field(default_factory=dict, description=(
        "VARConfig field overrides; scales, codebook_size and embed_dim come from the tokenizer (older configs "
        "that still name them are accepted when they agree)"))
    label_dropout: float = Field(0.1, ge=0, lt=1, description="labels replaced by the null class (guidance); "
                                                                "sets VARConfig.cond_drop_rate")
    flip_probability: float = Field(0.0, ge=0, le=1, description="chance of the horizontally flipped token set "
                                                                 "(a cache built with flips)")
    shuffle_buffer_size: int = Field(1024, ge=0, description="local shuffle buffer of token rows per worker; 0 off")
    sample_every: int = Field(0, ge=0, description="steps between sample grids (<run>/gpt/samples/step_<n>.png and "
                                                    "TensorBoard; rank 0; and one at the last step); 0 off")
    sample_classes: list[int] | None = Field(None, description="class indices, one grid row each; None: the "
                                                               "first min(10, num_classes)")
    sample_per_class: int = Field(4, ge=1, le=64, description="images per class in a training-time grid")

    @model_validator(mode="after")
    def _check_model(self) -> GPTStageConfig:
        if "cond_drop_rate" in self.model:
            raise ValueError("model.cond_drop_rate: set label_dropout instead (got "
                             f"{self.model['cond_drop_rate']!r})")
        num_classes = self._own_config().num_classes
        for index, label in enumerate(self.sample_classes or []):
            if not 0 <= label < num_classes:
                raise ValueError(f"sample_classes.{index}: must be a class index in 0..{num_classes - 1} (got {label})")
        return self

    def grid_classes(self) -> list[int]:
        """The classes of a training-time sample grid, one row each."""
        if self.sample_classes is not None:
            return list(self.sample_classes)
        return list(range(min(10, self._own_config().num_classes)))

    def _own_config(self) -> VARConfig:
        """`preset`, then `model` overrides, then label_dropout; the contract fields not yet the tokenizer's."""
        config = _model_config(VAR_PRESETS, VARConfig(), self.preset, self.model)
        return dataclasses.replace(config, cond_drop_rate=self.label_dropout)

    def var_config(self, tokenizer: TokenizerConfig) -> VARConfig:
        """The transformer this stage trains for `tokenizer`: its own shape, the tokenizer's scales, codebook
        size and latent width. A contract field still named in `model` must agree (one line names it)."""
        for name, theirs in contract_of(tokenizer).items():
            if name in self.model and _plain(self.model[name]) != _plain(theirs):
                raise ValueError(f"model.{name}: comes from the tokenizer, whose {name} is {_plain(theirs)}; "
                                 f"remove it (got {_plain(self.model[name])})")
        return paired(self._own_config(), tokenizer)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value
