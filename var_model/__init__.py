# Tokenizer (multi-scale VQ-VAE)
from var_model.official_tokenizer import load_official_tokenizer
from var_model.quantizer import MultiScaleQuantizer
from var_model.tokenizer_api import build_tokenizer
from var_model.tokenizer_config import TOKENIZER_PRESETS, TokenizerConfig
from var_model.vqvae import VQVAE, TokenizerOutput

# The tokenizer-transformer contract
from var_model.contract import CONTRACT_FIELDS, check_pair, contract_of, paired

# Transformer (next-scale prediction), generation, losses
from var_model.edifice_api import build, next_scale_prediction, recommended_defaults
from var_model.batched_generation import generate_in_batches
from var_model.generation import GenerationOutput, generate
from var_model.kv_cache import KVCache
from var_model.losses import next_scale_loss
from var_model.official_var import load_official_var
from var_model.sampling_settings import NO_GUIDANCE_SAMPLING, OFFICIAL_FID_SAMPLING, SamplingSettings
from var_model.transformer import VAR
from var_model.var_config import VAR_PRESETS, VARConfig, total_tokens

# Tokenizer training recipe (VQGAN-style: perceptual, adversarial, EMA)
from var_model.diff_augment import DiffAugment
from var_model.discriminators import (
    DinoDiscriminator, PatchGANDiscriminator, build_dino_discriminator, load_vit_weights,
)
from var_model.ema import ExponentialMovingAverage, ema_decay
from var_model.lpips import LPIPS, build_lpips
from var_model.tokenizer_losses import (
    DISCRIMINATOR_CRITERIA, WeightedLoss, adaptive_adversarial_weight, consistency_loss,
    discriminator_loss, discriminator_schedule_factor, generator_adversarial_loss, lpips_applies,
    nll_loss, perceptual_loss, reconstruction_loss,
)
