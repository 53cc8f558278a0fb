"""The tokenizer recipe's engines in this process (DeepSpeed on one gloo rank, no Ray): train a few
micro-batches as the harness does, save a checkpoint folder, load it into fresh engines.

Run as a script (`python recipe_engines.py FOLDER ZERO_STAGE...`) it prints one JSON line per stage: whether every
restored tensor equals the saved one (tokenizer and discriminator weights, both optimizers' states,
the EMA). A subprocess keeps torch.distributed out of the test process.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import TINY_TOKENIZER  # noqa: E402

RECIPE = dict(model=TINY_TOKENIZER, num_workers=1, global_batch_size=4, micro_batch_size=4, steps=4,
              warmup_steps=1, adversarial_weight=0.4, discriminator_start=0.0, discriminator_warmup=0.0,
              discriminator_channels=8, discriminator_layers=2, consistency_weight=1.0, ema_decay=0.99,
              reconstruction_l1_weight=0.2, dead_code_reset_every=0, report_to=[], base_learning_rate=1e-2)


def init_process_group() -> None:
    import deepspeed

    from pipeline.train.deepspeed_ops import use_project_cache

    use_project_cache()  # the op DeepSpeed compiled once for this environment (setup.sh)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


def build(zero_stage: int):
    from pipeline.train.config import TokenizerStageConfig
    from pipeline.train.harness import setup_model_and_optimizer
    from pipeline.train.tokenizer_stage import TokenizerStage

    config = TokenizerStageConfig(zero_stage=zero_stage, **RECIPE)
    stage = TokenizerStage(config)
    stage.setup_worker(torch.device("cpu"))
    engine = setup_model_and_optimizer(stage, 1, "fp32", config.steps)
    stage.setup_engine(engine)
    stage.setup_auxiliary(engine, 1, "fp32", config.steps)
    return stage, engine


def train(stage, engine, steps: int) -> list[dict]:
    torch.manual_seed(1)
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    history = []
    for step in range(steps):
        engine.train()
        stage.before_micro_batch(step)
        loss, metrics = stage.compute_loss(engine, {"image": images}, torch.float32)
        engine.backward(loss)
        engine.step()
        metrics.update(stage.after_micro_batch())
        metrics.update(stage.after_optimizer_step(engine, step + 1))
        history.append({name: float(torch.as_tensor(v).float().mean()) for name, v in metrics.items()})
    return history


def snapshot(stage, engine) -> dict:
    """Everything a resume must restore, as plain nested containers of tensors."""
    from pipeline.train.weights import full_state_dict

    return {"tokenizer": full_state_dict(engine.module),
            "tokenizer_optimizer": engine.optimizer.state_dict(),
            "discriminator": full_state_dict(stage.discriminator_engine.module),
            "discriminator_optimizer": stage.discriminator_engine.optimizer.state_dict(),
            "ema": stage.ema.state_dict()}


def differences(saved, restored, path: str = "") -> list[str]:
    """Paths where two nested containers differ (tensors compared exactly, value for value)."""
    if isinstance(saved, torch.Tensor):
        same = isinstance(restored, torch.Tensor) and saved.shape == restored.shape and torch.equal(
            saved.cpu(), restored.cpu())
        return [] if same else [path]
    if isinstance(saved, dict):
        if not isinstance(restored, dict) or saved.keys() != restored.keys():
            return [path + " (keys)"]
        return [d for key in saved for d in differences(saved[key], restored[key], f"{path}/{key}")]
    if isinstance(saved, (list, tuple)):
        if not isinstance(restored, (list, tuple)) or len(saved) != len(restored):
            return [path + " (length)"]
        return [d for i, (a, b) in enumerate(zip(saved, restored)) for d in differences(a, b, f"{path}/{i}")]
    return [] if saved == restored or type(saved).__name__ in ("LossScaler", "DynamicLossScaler") else [path]


def save_and_restore(zero_stage: int, folder: str) -> dict:
    from pipeline.train.checkpointing import TrainState, load_checkpoint_folder, save_checkpoint_folder

    init_process_group()
    stage, engine = build(zero_stage)
    history = train(stage, engine, 2)
    save_checkpoint_folder(engine, folder, TrainState(step=2), history, 0, stage)
    saved = snapshot(stage, engine)
    fresh_stage, fresh_engine = build(zero_stage)
    before = differences(saved, snapshot(fresh_stage, fresh_engine))
    state, _ = load_checkpoint_folder(fresh_engine, folder, stage=fresh_stage, rank=0)
    after = differences(saved, snapshot(fresh_stage, fresh_engine))
    return {"zero_stage": zero_stage, "step": state.step, "differences_before_load": len(before),
            "differences_after_load": after, "ema_updates": fresh_stage.ema.average.num_updates,
            "metrics": sorted(history[-1]), "files": sorted(os.path.relpath(os.path.join(top, name), folder)
                                                          for top, _, names in os.walk(folder) for name in names)}


if __name__ == "__main__":  # recipe_engines.py FOLDER ZERO_STAGE [ZERO_STAGE ...]: one JSON line per stage
    for zero_stage in sys.argv[2:]:
        print(json.dumps(save_and_restore(int(zero_stage), os.path.join(sys.argv[1], f"zero{zero_stage}"))),
              flush=True)
