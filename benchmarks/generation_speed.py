"""Next-scale vs next-token generation with the same transformer backbone.

(a) VAR: scale by scale with a KV cache (10 forward passes for the official 10-scale schedule);
(b) raster: the same blocks, one token at a time in raster order with a KV cache (token-causal),
    680 forward passes for the same 680 tokens.
Both use the same batch, classifier-free guidance (doubled batch), top-k / top-p sampling and code
embedding; image decoding is left out of both. Prints one JSON line.

    python benchmarks/generation_speed.py            # small backbone, about a minute on one CPU core
    python benchmarks/generation_speed.py --depth 16 --width 1024 --heads 16 --device cuda
"""

from __future__ import annotations

import json

import torch
from options import options
from timing import measure

from var_model import VAR, VQVAE, SamplingSettings, TokenizerConfig, VARConfig
from var_model.generation import make_generators, sample_token_maps
from var_model.sampling import sample_tokens
from var_model.tokenizer_config import OFFICIAL_SCALES_256


@torch.no_grad()
def raster_token_maps(var: VAR, tokenizer: VQVAE, labels: torch.Tensor, *, cfg: float, top_k: int,
                      top_p: float, seed: int) -> torch.Tensor:
    """Token-causal baseline: every one of the L tokens is its own step (KV cache, no mask needed)."""
    batch, device = labels.shape[0], labels.device
    generator = make_generators(seed, batch, device)
    codebook = tokenizer.quantize.codebook(0)
    condition = var.class_condition(torch.cat((labels, torch.full_like(labels, var.config.num_classes))))
    cache = var.new_cache()
    x = var.first_scale_input(condition)[:, :1]
    tokens = []
    for position in range(var.num_tokens):
        logits = var.forward_cached(x, condition, cache)
        guidance = cfg * position / (var.num_tokens - 1)
        logits = (1 + guidance) * logits[:batch] - guidance * logits[batch:]
        token = sample_tokens(logits, top_k=top_k, top_p=top_p, generator=generator)  # [B, 1]
        tokens.append(token)
        if position + 1 < var.num_tokens:
            embedded = var.word_embed(codebook(token)) + var.pos_1LC[:, position + 1 : position + 2]
            x = embedded.repeat(2, 1, 1)
    return torch.cat(tokens, dim=1)


def main() -> None:
    args = options(__doc__.split("\n\n")[0], depth=8, width=256, heads=4, batch=1, codebook_size=4096, cfg=1.5,
                   top_k=900, top_p=0.96, repeats=(1, "timed runs of each; the fastest is reported"), device="cpu",
                   threads=(1, "CPU threads (default 1: on a shared machine, oversubscribed OpenMP barriers make "
                               "tiny per-token ops 20x slower and would flatter VAR)"))
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    device = torch.device(args.device)
    scales = OFFICIAL_SCALES_256
    # Only the quantizer is used (embedding + Phi + resampling), so a narrow trunk is enough.
    tokenizer = VQVAE(TokenizerConfig(image_size=64, scales=scales, codebook_size=args.codebook_size, embed_dim=32,
                                      base_channels=32, channel_multipliers=(1, 2, 2), num_res_blocks=1,
                                      use_attention=False)).to(device).eval()
    var = VAR(VARConfig(hidden_size=args.width, num_layers=args.depth, num_heads=args.heads, scales=scales,
                        codebook_size=args.codebook_size, embed_dim=32, num_classes=1000)).to(device).eval()
    labels = torch.arange(args.batch, device=device) % 1000
    sampling = SamplingSettings(args.cfg, args.top_k, args.top_p)

    def timed(fn) -> tuple[float, float]:
        """Fastest (wall seconds, process CPU seconds) over the repeats."""
        runs = [measure(fn, device) for _ in range(args.repeats)]
        return min(wall for wall, _ in runs), min(cpu for _, cpu in runs)

    # Warm-up: one VAR run exercises every op both paths use (the raster run is too long to repeat).
    sample_token_maps(var, tokenizer, labels, sampling, seeds=0)
    var_wall, var_cpu = timed(lambda: sample_token_maps(var, tokenizer, labels, sampling, seeds=0))
    raster_wall, raster_cpu = timed(lambda: raster_token_maps(var, tokenizer, labels, seed=0, cfg=sampling.cfg,
                                                                top_k=sampling.top_k, top_p=sampling.top_p))
    # On a CPU the ratio uses process CPU time: on a shared machine wall time mostly measures the
    # neighbours. On a GPU it uses wall time.
    on_cpu = device.type == "cpu"
    ratio = (raster_cpu / var_cpu) if on_cpu else (raster_wall / var_wall)
    print(json.dumps({
        "benchmark": "generation_speed",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "depth": args.depth, "width": args.width, "heads": args.heads, "batch": args.batch,
        "scales": list(scales), "tokens_per_image": var.num_tokens,
        "var_steps": len(scales), "raster_steps": var.num_tokens,
        "var_seconds": round(var_wall, 4), "raster_seconds": round(raster_wall, 4),
        "var_cpu_seconds": round(var_cpu, 4), "raster_cpu_seconds": round(raster_cpu, 4),
        "ratio": round(ratio, 2), "ratio_basis": "cpu_time" if on_cpu else "wall_time",
    }))


if __name__ == "__main__":
    main()
