"""The pieces of the tokenizer recipe that meet DeepSpeed: the discriminator's engine, the EMA of
sharded weights, the adaptive weight at a ZeRO-3 layer, per-scale code statistics, weights files.

- The discriminator is a second DeepSpeed engine with the tokenizer's batch geometry and clipping,
  its own client AdamW (constant lr), in fp32 whatever the tokenizer's precision (it is small, and
  its batch norms keep fp32 statistics that a bf16 module cannot mix with). Two engines in one process each own their
  parameters, optimizer shards and checkpoint folder; both step at the same accumulation boundaries
  because they share the geometry. Its ZeRO stage is the tokenizer's, but at most 2: the generator's
  loss backpropagates through the *frozen* discriminator, and ZeRO-3 does not gather the weights of
  a module whose parameters need no gradient for its backward. A discriminator is small (PatchGAN
  2.8M parameters; DINO's ViT is frozen and outside DeepSpeed), so replicating its weights costs
  little, and its optimizer state and gradients stay partitioned (ZeRO 1-2). The generator's pass
  calls the module, not the engine: the engine's output hooks belong to its own backward.
- `ShardedEMA` keeps the EMA of what each rank holds: the whole weights at ZeRO 0-2 (identical on
  every rank), the rank's own partition (`param.ds_tensor`) at ZeRO 3. An update is local, no
  communication; each rank checkpoints its own file; `full_state_dict` gathers it whole for the
  export and for the validation pass (which runs on a plain copy of the model).
- `adaptive_weight_at_conv`: VQGAN's ratio needs dL/dW at the decoder's last convolution. Under
  ZeRO-3 that weight is an empty placeholder outside its forward, so the gradient is rebuilt from
  the layer's input and the gradient at its output (torch.nn.grad.conv2d_weight): the same tensor
  `autograd.grad(loss, weight)` gives at ZeRO 0-2, at any stage, with no parameter gathered.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.train.config import TokenizerStageConfig
from var_model.ema import ExponentialMovingAverage
from var_model.tokenizer_losses import ADAPTIVE_WEIGHT_RANGE

# ------------------------------------------------------------------ weights files


def local_weights_file(uri: str) -> str:
    """A local path of a weights file given as a path or an s3:// URI (downloaded to a temp file)."""
    from pipeline.core.storage import is_s3, read_bytes

    if not is_s3(uri):
        return uri
    handle, path = tempfile.mkstemp(prefix="varray-weights-", suffix=os.path.splitext(uri)[1])
    with os.fdopen(handle, "wb") as file:
        file.write(read_bytes(uri))
    return path


def build_lpips_network(config: TokenizerStageConfig, device: torch.device) -> nn.Module:
    from var_model.lpips import build_lpips

    vgg = local_weights_file(config.vgg_weights) if config.vgg_weights else None
    lin = local_weights_file(config.lpips_weights) if config.lpips_weights else None
    return build_lpips(vgg, lin).to(device).eval().requires_grad_(False)


def build_discriminator(config: TokenizerStageConfig, in_channels: int) -> nn.Module:
    if config.discriminator == "dino":
        from var_model.discriminators import build_dino_discriminator

        return build_dino_discriminator(local_weights_file(config.dino_weights))
    from var_model.discriminators import PatchGANDiscriminator

    return PatchGANDiscriminator(in_channels, config.discriminator_channels, config.discriminator_layers)


def discriminator_input(images: torch.Tensor, config: TokenizerStageConfig) -> torch.Tensor:
    """The DINO discriminator sees 3 channels; a grey image is repeated."""
    if config.discriminator == "dino" and images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    return images


def discriminator_zero_stage(config: TokenizerStageConfig) -> int:
    """The discriminator engine's ZeRO stage: the tokenizer's, at most 2 (see the module docstring)."""
    return min(config.zero_stage, 2)


def setup_discriminator_engine(config: TokenizerStageConfig, in_channels: int, world_size: int):
    """The discriminator's DeepSpeed engine (the tokenizer's geometry; ZeRO at most 2; fp32)."""
    import deepspeed

    from pipeline.train.deepspeed_config import build_deepspeed_config
    from pipeline.train.optimizer import parameter_groups

    torch.manual_seed(config.seed + 1)  # identical initial weights on every rank, not the tokenizer's draws
    model = build_discriminator(config, in_channels)
    groups = parameter_groups(model, ())
    for group in groups:
        group["weight_decay"] = config.discriminator_weight_decay * group["wd_scale"]
    optimizer = torch.optim.AdamW(groups, lr=config.discriminator_lr, betas=config.discriminator_betas)
    own = config.model_copy(update={"zero_stage": discriminator_zero_stage(config), "offload_parameters": False})
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=build_deepspeed_config(own, world_size, "fp32"))
    return engine


# ------------------------------------------------------------------ adaptive weight


class LayerInput:
    """Keeps the input of a module's latest forward with autograd on (a forward pre-hook)."""

    def __init__(self, module: nn.Module):
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple) -> None:
        self.value = inputs[0] if torch.is_grad_enabled() else None


def parameter_shape(param: torch.Tensor) -> torch.Size:
    return param.ds_shape if hasattr(param, "ds_shape") else param.shape


def conv_weight_gradient(conv: nn.Conv2d, conv_input: torch.Tensor, loss: torch.Tensor,
                         conv_output: torch.Tensor) -> torch.Tensor:
    """d loss / d conv.weight, from the layer's input and d loss / d output (graph kept)."""
    (output_gradient,) = torch.autograd.grad(loss, conv_output, retain_graph=True)
    return torch.nn.grad.conv2d_weight(conv_input.detach().float(), parameter_shape(conv.weight),
                                       output_gradient.float(), stride=conv.stride, padding=conv.padding,
                                       dilation=conv.dilation, groups=conv.groups)


def adaptive_weight_at_conv(conv: nn.Conv2d, conv_input: torch.Tensor, conv_output: torch.Tensor,
                            nll: torch.Tensor, generator_loss: torch.Tensor,
                            weight_range: tuple[float, float] = ADAPTIVE_WEIGHT_RANGE) -> torch.Tensor:
    """VQGAN's `||dL_nll/dW|| / (||dL_g/dW|| + 1e-6)` at `conv` (whose output is `conv_output`),
    clamped; equals var_model.tokenizer_losses.adaptive_adversarial_weight, ZeRO-3 included."""
    nll_norm = conv_weight_gradient(conv, conv_input, nll, conv_output).norm()
    generator_norm = conv_weight_gradient(conv, conv_input, generator_loss, conv_output).norm()
    return (nll_norm / (generator_norm + 1e-6)).clamp(*weight_range).detach()


# ------------------------------------------------------------------ code statistics


def per_scale_code_statistics(token_maps: list[torch.Tensor], codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(share of the codebook used, perplexity of the code histogram), one value per scale [S]."""
    usage, perplexity = [], []
    for token_map in token_maps:
        counts = torch.bincount(token_map.reshape(-1), minlength=codebook_size).float()
        probabilities = counts / counts.sum().clamp_min(1)
        usage.append((counts > 0).float().mean())
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum()
        perplexity.append(entropy.exp())
    return torch.stack(usage), torch.stack(perplexity)


# ------------------------------------------------------------------ EMA of sharded weights


def _local_tensor(param: torch.nn.Parameter) -> torch.Tensor:
    """What this rank holds of `param`: its ZeRO-3 partition, or the whole (working) tensor."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class ShardedEMA:
    """The EMA of one engine's parameters, rank-local (see the module docstring)."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool):
        self.module = module
        self.partitioned = any(hasattr(p, "ds_tensor") for p in module.parameters())
        self.average = ExponentialMovingAverage(self._current(), decay=decay, warmup=warmup)

    def _current(self) -> dict[str, torch.Tensor]:
        return {name: _local_tensor(p) for name, p in self.module.named_parameters() if p.requires_grad}

    def update(self) -> float:
        return self.average.update(self._current())

    def state_dict(self) -> dict:
        return self.average.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state)

    @torch.no_grad()
    def set_rows(self, name: str, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite rows of one whole (unpartitioned) average, e.g. codes just re-initialised."""
        if not self.partitioned:
            average = self.average.averages[name]
            average[rows.to(average.device)] = values.to(average)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective at ZeRO-3: every average whole, fp32 on CPU."""
        full: dict[str, torch.Tensor] = {}
        params = dict(self.module.named_parameters())
        for name, average in self.average.averages.items():
            param = params[name]
            if hasattr(param, "ds_tensor"):
                pieces = [torch.empty_like(average) for _ in range(dist.get_world_size())]
                dist.all_gather(pieces, average)
                average = torch.cat(pieces)[:param.ds_numel].view(param.ds_shape)
            full[name] = average.detach().float().cpu().clone()
        return full


def loss_terms(images: torch.Tensor, reconstruction: torch.Tensor, config: TokenizerStageConfig,
               lpips: nn.Module | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The recipe's L_nll (var_model.tokenizer_losses.nll_loss), with this project's metric names."""
    from var_model.tokenizer_losses import nll_loss

    nll, terms = nll_loss(images, reconstruction, l1_weight=config.reconstruction_l1_weight,
                          l2_weight=config.reconstruction_l2_weight, lpips_weight=config.perceptual_weight,
                          lpips=lpips, lpips_min_resolution=config.perceptual_min_resolution,
                          lpips_upsample_small_to=config.perceptual_upsample_to)
    names = {"l1": "reconstruction_l1", "l2": "reconstruction_l2", "lpips": "perceptual_loss"}
    metrics = {names[key]: value for key, value in terms.items()}
    if "reconstruction_l2" not in metrics:  # always logged (PSNR's companion), even at weight 0
        metrics["reconstruction_l2"] = F.mse_loss(reconstruction.detach(), images)
    return nll, metrics


def psnr_db(images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (range 2), reconstructions clamped to it."""
    error = (reconstruction.clamp(-1, 1) - images).square().flatten(1).mean(dim=1)
    return (10 * torch.log10(4.0 / error.clamp_min(1e-10))).clamp(max=100.0)


def to_uint8(images: torch.Tensor) -> Any:
    """[B, C, H, W] in [-1, 1] -> uint8 numpy [B, H, W, C]."""
    return images.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
