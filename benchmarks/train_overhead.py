"""GPT-stage training throughput: Ray Train + DeepSpeed ZeRO-2 with 2 workers vs a bare PyTorch loop.

Same VAR transformer, same frozen tokenizer for the teacher-forcing input, same AdamW + reference
schedule + gradient clipping, same global batch, same total CPU threads (2 workers x 1 thread vs one
process x 2 threads). The Ray figure is the harness's own `samples_per_second` (data wait
included), averaged over the reports after the first; the bare figure is timed over the same steps
after the same warm-up. Goal: ratio >= 0.9.

  python benchmarks/train_overhead.py [--steps 30 --global-batch 32 --hidden 128 --layers 2]
prints one JSON line.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import local_ray  # noqa: F401  (Ray's local settings, before Ray loads)
import numpy as np
import ray
import torch
from options import options

from pipeline.core.exports import load_tokenizer, save_tokenizer
from pipeline.core.storage import join_uri, read_bytes
from pipeline.token_cache.cache import split_tokens
from pipeline.train.config import GPTStageConfig
from pipeline.train.gpt_stage import train_gpt
from pipeline.train.optimizer import build_optimizer, build_schedule
from var_model import VAR, VQVAE, TokenizerConfig, next_scale_loss, total_tokens

SCALES = [1, 2, 3, 4, 6, 8]
TOKENIZER = dict(image_size=32, in_channels=1, scales=SCALES, codebook_size=512, embed_dim=16, base_channels=16,
                 channel_multipliers=[1, 2, 2], num_res_blocks=1, use_attention=False, norm_groups=8)


def bare_loop(config: GPTStageConfig, tokenizer_uri: str, labels: np.ndarray, tokens: np.ndarray,
              warmup: int, threads: int) -> float:
    """Samples/s of a plain single-process loop over the same work, after `warmup` steps."""
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(tokenizer_uri).requires_grad_(False)
    model = VAR(config.var_config(TokenizerConfig.from_dict(TOKENIZER))).train()
    optimizer = build_optimizer(model, config)
    schedule = build_schedule(optimizer, config, config.steps)
    batch = config.global_batch_size
    started = None
    for step in range(config.steps):
        if step == warmup:
            started = time.perf_counter()
        begin = (step * batch) % (len(labels) - batch + 1)
        token_maps = split_tokens(torch.from_numpy(tokens[begin:begin + batch]), SCALES)
        with torch.no_grad():
            teacher_input = tokenizer.teacher_forcing_input(token_maps)
        logits = model(torch.from_numpy(labels[begin:begin + batch]), teacher_input)
        loss, _, _ = next_scale_loss(logits, token_maps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
    return (config.steps - warmup) * batch / (time.perf_counter() - started)


def main() -> None:
    args = options(__doc__.splitlines()[0], steps=30, global_batch=32, hidden=128, layers=2, samples=2048, workers=2)
    log_every = 10
    model = dict(hidden_size=args.hidden, num_layers=args.layers, num_heads=max(1, args.hidden // 64),
                 num_classes=10, drop_path=0.0)  # scales, codebook size, latent width: the tokenizer's
    config = GPTStageConfig(model=model, num_workers=args.workers, zero_stage=2, precision="fp32",
                            global_batch_size=args.global_batch, micro_batch_size=args.global_batch // args.workers,
                            steps=args.steps, log_every=log_every, checkpoint_every=args.steps, max_failures=0,
                            shuffle_buffer_size=0)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, args.samples).astype(np.int64)
    tokens = rng.integers(0, 512, (args.samples, total_tokens(SCALES))).astype(np.int64)

    with tempfile.TemporaryDirectory() as folder:
        tokenizer_uri = os.path.join(folder, "tokenizer")
        torch.manual_seed(0)
        save_tokenizer(VQVAE(TokenizerConfig(**TOKENIZER)).eval(), tokenizer_uri)
        bare = bare_loop(config, tokenizer_uri, labels, tokens, warmup=log_every, threads=args.workers)

        ray.init(num_cpus=args.workers + 2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}})
        dataset = ray.data.from_items([{"label": labels[i], "tokens": tokens[i]} for i in range(args.samples)])
        started = time.time()
        export = train_gpt(config, dataset, tokenizer_uri, folder, "overhead")
        wall = time.time() - started
        history = [json.loads(line) for line in read_bytes(join_uri(export, "metrics.jsonl")).decode().splitlines()]
        ray.shutdown()
    steady = [record["samples_per_second"] for record in history[1:]]
    ray_rate = float(np.mean(steady))
    print(json.dumps({
        "benchmark": "train_overhead", "model_parameters": sum(p.numel() for p in VAR(config.var_config(TokenizerConfig.from_dict(TOKENIZER))).parameters()),
        "workers": args.workers, "zero_stage": 2, "global_batch": args.global_batch, "steps": args.steps,
        "ray_deepspeed_samples_per_s": round(ray_rate, 2), "bare_pytorch_samples_per_s": round(bare, 2),
        "ratio": round(ray_rate / bare, 3), "goal": ">= 0.9",
        "ray_data_wait_fraction": round(float(np.mean([r["data_wait_fraction"] for r in history[1:]])), 3),
        "ray_wall_seconds_including_startup": round(wall, 1), "load_average": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
