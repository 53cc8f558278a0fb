# Tokenizer (multi-scale VQ-VAE)
from var_model.official_tokenizer import load_official_tokenizer
from var_model.quantizer import MultiScaleQuantizer
from var_model.tokenizer_api import build_tokenizer
from var_model.tokenizer_config import TOKENIZER_PRESETS, TokenizerConfig
from var_model.vqvae import VQVAE, TokenizerOutput
