"""Bytes a model keeps for backward per training sample, and model-state bytes per GPU by ZeRO stage.

The sizing advice in infra/README.md rests on these figures. Activations: one bf16-autocast forward
at batch 1 and at batch 2 on CPU, summing every tensor autograd saves for backward (each storage
once); the difference is the per-sample cost, free of the batch-independent bf16 weight copies.
CPU attention kernels may save different intermediates than CUDA's memory-efficient kernel, so treat
the figure as an estimate of the GPU's. Model states: mixed-precision AdamW under DeepSpeed ZeRO,
16 bytes per parameter (bf16 weights 2 + bf16 grads 2 + fp32 master, momentum, variance 12),
partitioned over the data-parallel ranks as each stage does.

  python benchmarks/activation_memory.py --preset d16 --ranks 16             # the VAR transformer
  python benchmarks/activation_memory.py --tokenizer official-256 --ranks 16  # the VQ-VAE at 256 px
prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from var_model import TOKENIZER_PRESETS, VAR, VAR_PRESETS, VQVAE, total_tokens


def _forward(model: VAR | VQVAE, batch: int) -> None:
    config = model.config
    if isinstance(model, VQVAE):
        model(torch.rand(batch, config.in_channels, config.image_size, config.image_size) * 2 - 1)
        return
    labels = torch.randint(0, config.num_classes, (batch,))
    teacher_input = torch.randn(batch, total_tokens(config.scales) - config.scales[0] ** 2, config.embed_dim)
    model(labels, teacher_input)


def saved_bytes_for_backward(model: VAR | VQVAE, batch: int) -> int:
    """Bytes of the distinct storages autograd saves in one bf16-autocast forward at `batch`."""
    storages: dict[int, int] = {}
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _forward(model, batch)
    return sum(storages.values())


def model_state_bytes_per_rank(parameters: int, ranks: int) -> dict[str, float]:
    """ZeRO-0..3 bytes per rank for bf16 mixed precision with AdamW (ZeRO paper's K = 12)."""
    weights, grads, optimizer = 2 * parameters, 2 * parameters, 12 * parameters
    return {
        "zero0": weights + grads + optimizer,
        "zero1": weights + grads + optimizer / ranks,
        "zero2": weights + (grads + optimizer) / ranks,
        "zero3": (weights + grads + optimizer) / ranks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="d16", choices=sorted(VAR_PRESETS), help="VAR preset")
    parser.add_argument("--tokenizer", choices=sorted(TOKENIZER_PRESETS), help="measure this tokenizer instead")
    parser.add_argument("--ranks", type=int, default=16, help="data-parallel ranks (GPUs) for the ZeRO figures")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    started = time.perf_counter()
    model = (VQVAE(TOKENIZER_PRESETS[args.tokenizer]) if args.tokenizer else VAR(VAR_PRESETS[args.preset])).train()
    parameters = sum(p.numel() for p in model.parameters())
    one, two = saved_bytes_for_backward(model, 1), saved_bytes_for_backward(model, 2)
    gib = 2 ** 30
    print(json.dumps({
        "model": f"tokenizer {args.tokenizer}" if args.tokenizer else f"var {args.preset}",
        "parameters": parameters,
        "tokens_per_sample": total_tokens(model.config.scales),
        "activation_gib_per_sample": round((two - one) / gib, 3),
        "batch_independent_saved_gib": round((2 * one - two) / gib, 3),
        "ranks": args.ranks,
        "model_state_gib_per_rank": {stage: round(value / gib, 3)
                                     for stage, value in model_state_bytes_per_rank(parameters, args.ranks).items()},
        "seconds": round(time.perf_counter() - started, 1),
    }))


if __name__ == "__main__":
    main()
