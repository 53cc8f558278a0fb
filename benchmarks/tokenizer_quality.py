"""Tokenizer quality of the demo's recipe: reconstruction FID against the real-vs-real floor, PSNR, and
what the recipe's step costs over the L2-only step.

1. Trains the demo's tokenizer stage (the chain's own step, `--config`, `--set` overrides; e.g.
   `--set tokenizer.steps=300` for a short run), or takes a trained export (`--tokenizer URI`).
2. rFID and PSNR with the evaluation's protocol (pipeline.evaluation.run): the first N test images of
   its seeded permutation at 28x28 through encode -> decode at the tokenizer's size, back to 28x28;
   FID(reconstructions, test) next to FID(train, test), the floor at the same N (N >= 1000 per side).
3. Step time: one worker's micro-batch step (forward, backward, optimizer; the discriminator's step
   and the EMA update where the config has them) with the stage's own loss code, plain PyTorch in
   this process, at the config's micro batch: the full recipe of `--config` over the same step with
   L2 + VQ only, same model, same batch, measured in this run.

  python benchmarks/tokenizer_quality.py --config configs/fashion_mnist.yaml [--tokenizer URI] [--samples 1000]
prints one JSON line.
"""

from __future__ import annotations

import json
import shlex
import tempfile
import time

import local_ray  # noqa: F401  (Ray's local settings, before Ray loads)
import numpy as np
import torch
from options import options

from pipeline.core.configuration import load_config
from pipeline.core.exports import load_tokenizer, read_export_info
from pipeline.core.images import float_to_uint8, resize_uint8, to_grayscale, uint8_to_float
from pipeline.data.sources.fashion_mnist import load_fashion_mnist
from pipeline.evaluation.classifier import IMAGE_SIZE
from pipeline.evaluation.frechet import FeatureStatistics, frechet_distance
from pipeline.evaluation.inception import inception_features
from pipeline.evaluation.reconstruction import psnr, reconstruct
from pipeline.evaluation.reference import subset_order  # (the evaluation's N-sample subsets)
from pipeline.train.config import TokenizerStageConfig
from pipeline.train.tokenizer_recipe import ShardedEMA, build_discriminator
from pipeline.train.tokenizer_stage import TokenizerStage

TEST_STREAM, TRAIN_STREAM = 1, 2  # the evaluation's streams of the reference (test) and train subsets


class PlainEngine:
    """What the stage asks of a DeepSpeed engine, over a plain module and AdamW (one process)."""

    def __init__(self, module: torch.nn.Module, learning_rate: float, betas: tuple[float, float]):
        self.module = module
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=learning_rate, betas=betas)
        self.training = True

    def __call__(self, *args):
        return self.module(*args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def step_seconds(config: TokenizerStageConfig, images: torch.Tensor, steps: int, warmup: int = 2) -> float:
    """Median seconds of one micro-batch step of the stage's own code (discriminator on from step 0)."""
    torch.manual_seed(0)
    stage = TokenizerStage(config)
    stage.setup_worker(torch.device("cpu"))
    engine = PlainEngine(stage.build_model(), config.learning_rate, config.betas)
    stage.setup_engine(engine)
    stage.start_step, stage.warmup_steps = 0, 0
    if config.uses_discriminator:
        stage.discriminator_engine = PlainEngine(build_discriminator(config, stage.model_config.in_channels),
                                                 config.discriminator_lr, config.discriminator_betas)
    if config.ema_decay > 0:
        stage.ema = ShardedEMA(engine.module, config.ema_decay, config.ema_warmup)
    times = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        stage.before_micro_batch(step)
        loss, _ = stage.compute_loss(engine, {"image": images}, torch.float32)
        engine.backward(loss)
        engine.step()
        stage.after_micro_batch()
        if stage.ema is not None:
            stage.ema.update()
        times.append(time.perf_counter() - started)
    return float(np.median(times[warmup:]))


def l2_only(config: TokenizerStageConfig) -> TokenizerStageConfig:
    return config.model_copy(update={"reconstruction_l1_weight": 0.0, "reconstruction_l2_weight": 1.0,
                                     "perceptual_weight": 0.0, "adversarial_weight": 0.0,
                                     "consistency_weight": 0.0, "ema_decay": 0.0})


def train_tokenizer(config_path: str, overrides: list[str], storage: str) -> tuple[str, float]:
    from pipeline.chain.config import TrainVarConfig
    from pipeline.chain.run import run_step

    config = load_config(TrainVarConfig, config_path, overrides,
                         extra={"storage.root": storage, "storage.run_name": "tokenizer_quality"})
    started = time.perf_counter()
    run_step(config, "tokenizer")
    return config.layout.tokenizer_export, time.perf_counter() - started


def distance(first: np.ndarray, second: np.ndarray) -> float:
    return round(frechet_distance(FeatureStatistics.of(first), FeatureStatistics.of(second)), 4)


def main() -> None:
    args = options(__doc__, config=("configs/fashion_mnist.yaml", "the chain config whose tokenizer section is measured"),
                   set=("", "space-separated --set overrides, e.g. 'tokenizer.steps=300'"),
                   tokenizer=("", "a trained tokenizer export: skip training"),
                   storage=("", "where the benchmark's run goes (default: a temp folder)"),
                   samples=(1000, "N per side for the FIDs (>= 1000 for the must-show)"),
                   timing_steps=(10, "timed micro-batch steps per variant"), seed=0, threads=0)
    if args.threads:
        torch.set_num_threads(args.threads)
    from pipeline.chain.config import TrainVarConfig

    overrides = shlex.split(args.set)
    chain = load_config(TrainVarConfig, args.config, overrides)
    stage_config = chain.tokenizer
    figures: dict = {"benchmark": "tokenizer_quality", "config": args.config, "overrides": overrides}

    # Step time first (a quiet machine matters most here): same batch, same model, same process.
    torch.manual_seed(args.seed)
    model_config = stage_config.tokenizer_config()
    batch = torch.rand(stage_config.micro_batch_size, model_config.in_channels, model_config.image_size,
                       model_config.image_size) * 2 - 1
    full = step_seconds(stage_config, batch, args.timing_steps)
    plain = step_seconds(l2_only(stage_config), batch, args.timing_steps)
    figures["step_time"] = {"micro_batch": stage_config.micro_batch_size, "recipe_s": round(full, 4),
                            "l2_only_s": round(plain, 4), "ratio": round(full / plain, 3),
                            "torch_threads": torch.get_num_threads()}

    export = args.tokenizer
    if not export:
        storage = args.storage or tempfile.mkdtemp(prefix="varray-tokenizer-quality-")
        export, seconds = train_tokenizer(args.config, overrides, storage)
        figures["train_seconds"] = round(seconds, 1)
    info = read_export_info(export)
    figures.update(tokenizer=export, steps=info.get("total_steps"), weights=info.get("weights", "trained"),
                   recipe=info.get("recipe"))

    # The evaluation's protocol (pipeline.evaluation.run.evaluate): same subsets, same sizes.
    train_images, _ = load_fashion_mnist("train")
    test_images, _ = load_fashion_mnist("test")
    n = min(args.samples, len(test_images))
    test_subset = test_images[subset_order(len(test_images), args.seed, TEST_STREAM)[:n]]
    train_subset = train_images[subset_order(len(train_images), args.seed, TRAIN_STREAM)[:n]]
    tokenizer = load_tokenizer(export)
    size, channels = tokenizer.config.image_size, tokenizer.config.in_channels
    originals = resize_uint8(test_subset, size)
    inputs = uint8_to_float(originals)
    if channels == 3:
        inputs = inputs.expand(-1, 3, -1, -1)
    outputs = to_grayscale(float_to_uint8(reconstruct(tokenizer, inputs).add(1).mul(0.5)))
    reconstructions = resize_uint8(outputs, IMAGE_SIZE)
    test_features = inception_features(test_subset)
    rfid = distance(inception_features(reconstructions), test_features)
    floor = distance(inception_features(train_subset), test_features)
    figures.update(n=n, rfid=rfid, floor=floor, ratio=round(rfid / floor, 3),
                   psnr_db=round(float(psnr(originals, outputs).mean()), 3))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
