"""Figures of one device for benchmarks/gpu_check.sh: ZeRO training steps, the attention path, generation.

--mode train: one process, world size 1, the harness's DeepSpeed config (pipeline.train.
  deepspeed_config) and client AdamW + reference schedule (pipeline.train.optimizer), ZeRO stage and
  precision as given, random teacher-forcing inputs and targets of the preset's shape. Times the
  steps after --warmup; reports samples/s and peak device memory.
--mode attention: the transformer's block-causal masked attention (F.scaled_dot_product_attention,
  as SelfAttention calls it) forward + backward at the preset's width and the full pyramid, with
  the default backend choice and each fused backend forced, to show which fused path runs.
--mode generate: images/s of var_model.generate (the preset with random weights, the official
  256 px tokenizer, official FID sampling settings) at --batch, decoding included, fp32.

  python benchmarks/device_steps.py --device cuda --preset d16 --zero-stage 2 --precision bf16
  python benchmarks/device_steps.py --device cpu --preset tiny --zero-stage 2 --precision fp32 --steps 3
prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--mode", choices=("train", "attention", "generate"), default="train")
parser.add_argument("--device", default="cuda")
parser.add_argument("--preset", default="d16")
parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=2)
parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
parser.add_argument("--batch", type=int, default=32, help="samples per step")
parser.add_argument("--steps", type=int, default=12)
parser.add_argument("--warmup", type=int, default=2)
args = parser.parse_args()
if args.device == "cpu":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "RANK": "0", "LOCAL_RANK": "0",
                   "WORLD_SIZE": "1"}.items():
    os.environ.setdefault(key, value)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from var_model import VAR, VAR_PRESETS, TokenizerConfig, next_scale_loss  # noqa: E402
from var_model.var_config import VARConfig  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def var_config(preset: str) -> VARConfig:
    tokenizer = TokenizerConfig()  # the official 256 px tokenizer: scales, codebook, latent width
    fields = {**VAR_PRESETS[preset].to_dict(), "scales": tokenizer.scales, "codebook_size": tokenizer.codebook_size,
              "embed_dim": tokenizer.embed_dim}
    return VARConfig.from_dict(fields)


def train(device: torch.device) -> dict:
    import deepspeed

    from pipeline.train.config import GPTStageConfig
    from pipeline.train.deepspeed_config import build_deepspeed_config
    from pipeline.train.optimizer import build_optimizer, build_schedule

    config = GPTStageConfig(preset=args.preset, zero_stage=args.zero_stage, precision=args.precision,
                            global_batch_size=args.batch, micro_batch_size=args.batch, num_workers=1)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(0)
    model = VAR(var_config(args.preset)).to(device).train()
    parameters = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    optimizer = build_optimizer(model, config)
    schedule = build_schedule(optimizer, config, args.steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=build_deepspeed_config(config, 1, args.precision))
    vocab, width, tokens = model.config.codebook_size, model.config.embed_dim, model.num_tokens
    generator = torch.Generator(device=device).manual_seed(0)
    labels = torch.randint(0, model.config.num_classes, (args.batch,), device=device, generator=generator)
    teacher = torch.randn(args.batch, tokens - model.first_tokens, width, device=device, generator=generator)
    targets = [torch.randint(0, vocab, (args.batch, side, side), device=device, generator=generator)
               for side in model.config.scales]
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = None
    for step in range(args.steps):
        if step == args.warmup:
            synchronize(device)
            started = time.perf_counter()
        logits = engine(labels, teacher.to(dtype))
        loss = next_scale_loss(logits, targets)[0]
        engine.backward(loss)
        engine.step()
        schedule.step()
    synchronize(device)
    seconds = time.perf_counter() - started
    timed = args.steps - args.warmup
    return {"mode": "train", "preset": args.preset, "zero_stage": args.zero_stage, "precision": args.precision,
            "batch": args.batch, "timed_steps": timed, "seconds": round(seconds, 3),
            "samples_per_second": round(timed * args.batch / seconds, 2), "final_loss": round(float(loss), 4),
            "parameters": parameters,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            if device.type == "cuda" else None}


def attention(device: torch.device) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = var_config(args.preset)
    model = VAR(config).to(device)
    mask = model.attn_bias_for_masking
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    heads, head_dim = config.num_heads, config.hidden_size // config.num_heads
    shape = (args.batch, heads, model.num_tokens, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = mask.to(dtype)
    backends = {"default": None, "efficient": SDPBackend.EFFICIENT_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    results = {}
    for name, backend in backends.items():
        def run():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
            out.float().square().mean().backward()
        try:
            context = sdpa_kernel(backend) if backend is not None else _null()
            with context:
                run()
                synchronize(device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    run()
                synchronize(device)
            results[name] = round((time.perf_counter() - start) / args.steps * 1000, 3)
        except RuntimeError as error:  # that backend does not take this mask / dtype / device
            results[name] = f"unavailable: {str(error).splitlines()[0][:120]}"
    return {"mode": "attention", "preset": args.preset, "precision": args.precision, "batch": args.batch,
            "tokens": model.num_tokens, "ms_forward_backward": results}


def generation(device: torch.device) -> dict:
    from var_model import VQVAE, generate

    torch.manual_seed(0)
    tokenizer = VQVAE(TokenizerConfig()).to(device).eval()
    var = VAR(var_config(args.preset)).to(device).eval()
    labels = torch.arange(args.batch, device=device) % var.config.num_classes
    generate(var, tokenizer, labels, seeds=0)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for step in range(args.steps):
        images = generate(var, tokenizer, labels, seeds=step).images
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"mode": "generate", "preset": args.preset, "batch": args.batch, "image_size": images.shape[-1],
            "calls": args.steps, "seconds": round(seconds, 3),
            "images_per_second": round(args.steps * args.batch / seconds, 2)}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> None:
    device = torch.device(args.device)
    result = {"train": train, "attention": attention, "generate": generation}[args.mode](device)
    print(json.dumps({"benchmark": "device_steps", "device": str(device),
                      "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      **result}))


if __name__ == "__main__":
    main()
