"""Per-worker bytes of parameters + gradients + optimizer state under DeepSpeed ZeRO 0, 1, 2, 3.

Two Ray Train workers (CPU, gloo) build the same VAR transformer and wrap it with the harness's own
DeepSpeed config and client AdamW (pipeline.train), once per ZeRO stage and precision. Gradients are
measured after one backward (before the step frees them), parameters and optimizer state (AdamW
moments plus the fp32 master copy DeepSpeed keeps) after the step. Each distinct storage is counted
once: flat buffers that hold many parameters count their whole size. Communication buckets are not
counted. Goal: ZeRO-3 <= 0.6 of ZeRO-0 (in bf16 mixed precision, the GPU configuration).

  python benchmarks/zero_memory.py [--hidden 384 --layers 6 --workers 2]
prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import local_ray  # noqa: F401  (Ray's local settings, before Ray loads)
import ray
import torch

MASTER_ATTRIBUTES = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition",
                     "fp32_groups_flat", "fp32_groups")
GRADIENT_ATTRIBUTES = ("averaged_gradients", "grad_partitions_flat_buffer", "fp32_groups_gradients_flat",
                       "fp32_groups_gradient_flat_partition")


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _storage_bytes(tensors: list[torch.Tensor], seen: set[int]) -> int:
    total = 0
    for tensor in tensors:
        if tensor is None or tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def measure(config: dict) -> None:
    import deepspeed
    import ray.train

    from pipeline.train.config import GPTStageConfig
    from pipeline.train.deepspeed_config import build_deepspeed_config
    from pipeline.train.optimizer import build_optimizer, build_schedule
    from var_model import VAR, VARConfig

    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    var_config = VARConfig(**config["model"])
    results = []
    for precision in ("fp32", "bf16"):
        for zero_stage in (0, 1, 2, 3):
            train = GPTStageConfig(num_workers=world, zero_stage=zero_stage, precision=precision, steps=10,
                                   global_batch_size=2 * world, micro_batch_size=2)
            torch.manual_seed(0)
            model = VAR(var_config)
            parameter_count = sum(p.numel() for p in model.parameters())
            optimizer = build_optimizer(model, train)
            engine, _, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=build_schedule(optimizer, train, 10),
                config=build_deepspeed_config(train, world, precision))
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            labels = torch.randint(0, var_config.num_classes, (2,))
            teacher = torch.randn(2, var_config.total_tokens - var_config.scales[0] ** 2, var_config.embed_dim)
            logits = engine(labels, teacher.to(dtype))
            engine.backward(logits.float().logsumexp(-1).mean())
            zero_optimizer = engine.optimizer
            seen: set[int] = set()
            parameters = list(engine.module.parameters())
            grads = _storage_bytes([p.grad for p in parameters], seen)
            grads += _storage_bytes([t for name in GRADIENT_ATTRIBUTES
                                     for t in _tensors(getattr(zero_optimizer, name, None))], seen)
            engine.step()
            param_tensors = [getattr(p, "ds_tensor", None) if hasattr(p, "ds_id") else p.data for p in parameters]
            params = _storage_bytes(param_tensors, seen)
            master = _storage_bytes([t for name in MASTER_ATTRIBUTES
                                     for t in _tensors(getattr(zero_optimizer, name, None))], seen)
            inner = getattr(zero_optimizer, "optimizer", zero_optimizer)
            moments = _storage_bytes([t for state in inner.state.values() for t in _tensors(state)], seen)
            results.append({"precision": precision, "zero_stage": zero_stage, "parameters": parameter_count,
                            "param_bytes": params, "grad_bytes": grads, "master_bytes": master,
                            "optimizer_state_bytes": moments, "total_bytes": params + grads + master + moments})
            del engine, optimizer, model, zero_optimizer, inner
    if rank == 0:
        with open(config["output"], "w") as f:
            json.dump(results, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(num_cpus=args.workers + 2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
    model = dict(hidden_size=args.hidden, num_layers=args.layers, num_heads=max(1, args.hidden // 64),
                 scales=[1, 2, 3, 4, 6, 8], codebook_size=512, embed_dim=16, num_classes=10)
    started = time.time()
    with tempfile.TemporaryDirectory() as folder:
        output = os.path.join(folder, "zero_memory.json")
        TorchTrainer(measure, train_loop_config={"model": model, "output": output},
                     scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=False),
                     run_config=RunConfig(name="zero_memory", storage_path=folder)).fit()
        with open(output) as f:
            results = json.load(f)
    ray.shutdown()
    totals = {(r["precision"], r["zero_stage"]): r["total_bytes"] for r in results}
    print(json.dumps({
        "benchmark": "zero_memory", "workers": args.workers, "parameters": results[0]["parameters"],
        "per_worker_total_bytes": {f"{p}_zero{s}": b for (p, s), b in totals.items()},
        "zero3_over_zero0_bf16": round(totals[("bf16", 3)] / totals[("bf16", 0)], 3),
        "zero3_over_zero0_fp32": round(totals[("fp32", 3)] / totals[("fp32", 0)], 3),
        "goal": "zero3_over_zero0 <= 0.6",
        "detail": results, "seconds": round(time.time() - started, 1)}))


if __name__ == "__main__":
    main()
