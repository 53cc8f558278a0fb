"""Generation throughput with 1 and 2 generator actors on the same plan; prints one JSON line.

    python benchmarks/generate_scaling.py                       # random-weight fashion-32 models
    python benchmarks/generate_scaling.py --run runs/fashion    # a trained run's exports
    python benchmarks/generate_scaling.py --per-class 48 --unit-size 16

Each actor gets 1 CPU and 1 torch thread: on a 2-core laptop two actors then use both cores
without oversubscription (two actors with 2 threads each would fight over the same 2 cores), so
the ideal ratio is 2.0. On a GPU cluster the same job gets one GPU per actor instead.
Figures: `images_per_second` counts the whole run (actor start-up, model loading, writing);
`steady_images_per_second` counts from the first published unit to the last (the rate a long run
converges to).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from pipeline.core.configuration import load_config
from pipeline.core.exports import save_tokenizer, save_var
from pipeline.core.storage import join_uri, list_files, read_bytes
from pipeline.generation.config import GenerateConfig
from pipeline.generation.job import run_generation
from var_model import TOKENIZER_PRESETS, VAR, VAR_PRESETS, VQVAE


def random_exports(folder: str) -> tuple[str, str]:
    torch.manual_seed(0)
    tokenizer_uri, var_uri = os.path.join(folder, "tokenizer"), os.path.join(folder, "var")
    save_tokenizer(VQVAE(TOKENIZER_PRESETS["fashion-32"]), tokenizer_uri)
    save_var(VAR(VAR_PRESETS["fashion-32"]), var_uri)
    return tokenizer_uri, var_uri


def steady_rate(output: str) -> float | None:
    """Images per second between the first and the last published unit (from the stats JSONs)."""
    stats = [json.loads(read_bytes(uri)) for uri in list_files(join_uri(output, "stats"), ".json")]
    finished = sorted((s["finished_unix"], s["count"]) for s in stats)
    if len(finished) < 3 or finished[-1][0] <= finished[0][0]:
        return None
    return sum(count for _, count in finished[1:]) / (finished[-1][0] - finished[0][0])


def measure(tokenizer: str, var: str, output: str, actors: int, args: argparse.Namespace) -> dict[str, float]:
    config = load_config(GenerateConfig, None, [
        f"model.tokenizer={tokenizer}", f"model.var={var}", f"output.uri={output}",
        f"plan.per_class={args.per_class}", f"plan.unit_size={args.unit_size}",
        f"sampling.batch_size={args.batch_size}", f"compute.concurrency={actors}", "compute.num_cpus=1",
        "compute.threads=1"])
    started = time.perf_counter()
    summary = run_generation(config, show_progress=False)
    wall = time.perf_counter() - started
    return {"images": summary["images_generated"], "images_per_second": round(summary["images_generated"] / wall, 2),
            "steady_images_per_second": round(steady_rate(output) or 0.0, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="train_var run folder (default: random-weight fashion-32 models)")
    parser.add_argument("--per-class", type=int, default=32)
    parser.add_argument("--unit-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    # 4 logical CPUs: two 1-CPU actors plus Ray Data's own tasks never wait on each other (environment.md).
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as folder:
        if args.run:
            tokenizer, var = join_uri(args.run, "tokenizer", "export"), join_uri(args.run, "gpt", "export")
        else:
            tokenizer, var = random_exports(folder)
        one = measure(tokenizer, var, os.path.join(folder, "one"), 1, args)
        two = measure(tokenizer, var, os.path.join(folder, "two"), 2, args)
    ray.shutdown()
    result = {"benchmark": "generate_scaling", "model": args.run or "random fashion-32", "cpus": os.cpu_count(),
              "threads_per_actor": 1, "one_actor": one, "two_actors": two,
              "ratio": round(two["images_per_second"] / one["images_per_second"], 3),
              "steady_ratio": round(two["steady_images_per_second"] / one["steady_images_per_second"], 3)
              if one["steady_images_per_second"] else None, "goal": 1.7}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
