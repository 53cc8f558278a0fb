"""A run you can watch: live TensorBoard events and CSV rows, validation metrics, sample grids (issue 12).

One tiny GPT-stage run (module fixture; ZeRO-3, so validation and sampling run on partitioned
weights) on the real token cache, validating on a token cache and drawing a grid every 2 steps; a
thread watches the stage's folder while it trains, so the tests can tell what was on disk before
the export existed. The other tests need no training.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_helpers import TINY_TOKENIZER, TINY_VAR, read_metrics

from pipeline.core.configuration import ConfigError, load_config
from pipeline.train.config import GPTStageConfig
from pipeline.train.reporting import CSV_FILE, LiveReport, ReportError, check_report_to

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
VALIDATE_EVERY, SAMPLE_EVERY = 2, 2
GRID_CLASSES, PER_CLASS = [0, 1, 2], 2


def _csv_rows(path: Path) -> list[dict[str, str]]:
    try:
        return list(csv.DictReader(io.StringIO(path.read_text())))
    except FileNotFoundError:
        return []


class FolderWatcher(threading.Thread):
    """Records what the stage folder holds every few milliseconds until stopped."""

    def __init__(self, stage_dir: Path):
        super().__init__(daemon=True)
        self.stage_dir, self.snapshots, self.stopping = stage_dir, [], threading.Event()
        self.started = time.perf_counter()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.snapshots.append(self.snapshot())
            time.sleep(0.05)

    def snapshot(self) -> dict:
        events = sorted(self.stage_dir.glob("events.out.tfevents.*"))
        return {"time": round(time.perf_counter() - self.started, 1),
                "exported": (self.stage_dir / "export" / "config.json").exists(),
                "csv_steps": [int(row["step"]) for row in _csv_rows(self.stage_dir / CSV_FILE)],
                "event_bytes": sum(path.stat().st_size for path in events if path.exists()),
                "samples": sorted(path.name for path in (self.stage_dir / "samples").glob("step_*.png"))}


@pytest.fixture(scope="module")
def live_run(ray_cluster, token_cache, tiny_tokenizer, tmp_path_factory):
    from pipeline.train.gpt_stage import run_gpt_stage

    storage = tmp_path_factory.mktemp("live_run")
    config = GPTStageConfig(model=TINY_VAR, zero_stage=3, base_learning_rate=3e-2, shuffle_buffer_size=0,
                            num_workers=2, global_batch_size=32, micro_batch_size=16, steps=STEPS, warmup_steps=1,
                            checkpoint_every=STEPS, keep_checkpoints=1, log_every=1, max_failures=0,
                            validate_every=VALIDATE_EVERY, sample_every=SAMPLE_EVERY, sample_classes=GRID_CLASSES,
                            sample_per_class=PER_CLASS)
    stage_dir = storage / "gpt"
    watcher = FolderWatcher(stage_dir)
    watcher.start()
    started = time.perf_counter()
    try:
        # The training cache doubles as the validation cache: what is checked is the mechanism.
        export = run_gpt_stage(config, token_cache, tiny_tokenizer, str(storage), "gpt",
                               validation_cache_uri=token_cache)
    finally:
        watcher.stopping.set()
        watcher.join()
    first = next((s["time"] for s in watcher.snapshots if s["csv_steps"]), None)
    print(f"live run: {time.perf_counter() - started:.1f} s, first CSV row after {first} s; "
          f"{len(watcher.snapshots)} snapshots")
    return types.SimpleNamespace(stage_dir=stage_dir, export=export, metrics=read_metrics(export),
                                 snapshots=watcher.snapshots + [watcher.snapshot()])


def _intervals(metrics: list[dict]) -> list[dict]:
    """The logged intervals (the final checkpoint-only record, if any, holds nothing but the step)."""
    return [record for record in metrics if "loss" in record]


def test_events_and_csv_rows_are_written_while_it_trains(live_run):
    before_export = [s for s in live_run.snapshots if not s["exported"]]
    # Rows and events were on disk, and grew, before training was over.
    growing = [s["csv_steps"] for s in before_export if s["csv_steps"]]
    assert growing and growing[0] != list(range(1, STEPS + 1)), growing[:3]
    assert len({tuple(steps) for steps in growing}) >= 2, "the CSV never grew during training"
    assert all(steps == list(range(1, len(steps) + 1)) for steps in growing)
    assert any(s["event_bytes"] for s in before_export if len(s["csv_steps"]) < STEPS)
    assert [int(row["step"]) for row in _csv_rows(live_run.stage_dir / CSV_FILE)] == list(range(1, STEPS + 1))


def test_tensorboard_holds_every_logged_key_at_every_interval(live_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(live_run.stage_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    intervals = _intervals(live_run.metrics)
    assert [record["step"] for record in intervals] == list(range(1, STEPS + 1))
    tags = set(events.Tags()["scalars"])
    rows = {int(row["step"]): row for row in _csv_rows(live_run.stage_dir / CSV_FILE)}
    for record in intervals:
        for key, value in record.items():
            if key == "step":
                continue
            assert key in tags, key
            logged = {event.step: event.value for event in events.Scalars(key)}
            assert logged[record["step"]] == pytest.approx(value, rel=1e-6, abs=1e-6), (key, record["step"])
            assert float(rows[record["step"]][key]) == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert {"loss", "accuracy", "learning_rate", "val_loss", "val_accuracy"} <= tags


def test_gpt_metrics_include_validation_loss_and_accuracy(live_run):
    validated = [record for record in _intervals(live_run.metrics) if "val_loss" in record]
    assert [record["step"] for record in validated] == list(range(VALIDATE_EVERY, STEPS + 1, VALIDATE_EVERY))
    for record in validated:
        assert math.isfinite(record["val_loss"]) and record["val_loss"] > 0
        assert 0 <= record["val_accuracy"] <= 1
        for index in range(len(TINY_VAR["scales"])):  # per scale, named as the training metrics
            assert 0 <= record[f"val_scale_accuracy_{index}"] <= 1
            assert math.isfinite(record[f"val_scale_loss_{index}"])
        assert not any(key.startswith("val_") and "samples_per_second" in key for key in record)
    # The training cache is the validation cache here: validation loss falls with the training loss.
    assert validated[-1]["val_loss"] < validated[0]["val_loss"]


def test_sample_grids_appear_under_the_stage_folder_during_training(live_run):
    expected = [f"step_{step:08d}.png" for step in range(SAMPLE_EVERY, STEPS + 1, SAMPLE_EVERY)]
    assert live_run.snapshots[-1]["samples"] == expected
    assert any(s["samples"] == expected[:1] for s in live_run.snapshots if not s["exported"])
    with Image.open(live_run.stage_dir / "samples" / expected[0]) as grid:
        width, height = grid.size
        pixels = np.asarray(grid.convert("L"))
    tile = 64  # 16 px images, nearest-upscaled x4
    assert height == len(GRID_CLASSES) * (tile + 2) - 2
    assert width > PER_CLASS * (tile + 2) + 20  # a label column at the left
    assert (pixels[:, : width - PER_CLASS * (tile + 2)] < 128).any()  # with text in it

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(live_run.stage_dir), size_guidance={"images": 0})
    events.Reload()
    assert [image.step for image in events.Images("samples")] == [SAMPLE_EVERY, STEPS]


# ------------------------------------------------------------------ no training below


def test_report_to_from_the_command_line_and_refused_values():
    tiny = REPO / "configs" / "tiny.yaml"
    config = load_config_tiny(tiny, ["tokenizer.report_to=[csv]", "gpt.report_to=tensorboard,csv"])
    assert config.tokenizer.report_to == ["csv"] and config.gpt.report_to == ["tensorboard", "csv"]
    assert load_config_tiny(tiny, ["gpt.report_to=none"]).gpt.report_to == []
    assert GPTStageConfig(model=TINY_VAR).report_to == ["tensorboard", "csv"]
    with pytest.raises(ConfigError, match=r"^config error: gpt\.report_to\.0: .*mlflow"):
        load_config_tiny(tiny, ["gpt.report_to=[mlflow]"])
    with pytest.raises(ConfigError, match=r"sample_classes"):
        load_config_tiny(tiny, ["gpt.sample_classes=[0, 10]"])


def load_config_tiny(path: Path, overrides: list[str]):
    from pipeline.chain.config import TrainVarConfig

    return load_config(TrainVarConfig, path, overrides)


def test_wandb_requested_but_not_installed_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ReportError) as caught:
        check_report_to(["csv", "wandb"])
    assert str(caught.value).startswith("report_to: wandb is not installed") and "\n" not in str(caught.value)
    check_report_to(["csv", "tensorboard"])


def test_wandb_gets_every_interval_when_installed(monkeypatch, tmp_path):
    calls: list = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", step, dict(values)))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    report = LiveReport(str(tmp_path / "tiny" / "gpt"), "gpt", ["wandb"], config={"steps": 2})
    report.log({"step": 1, "loss": 2.0, "epoch": 0})
    report.log({"step": 2, "loss": 1.5, "epoch": 0})
    report.close()
    init = calls[0][1]
    assert init["name"] == "tiny/gpt" and init["dir"] == str(tmp_path / "tiny" / "gpt") and init["resume"] == "allow"
    assert calls[1:] == [("log", 1, {"loss": 2.0, "epoch": 0.0}), ("log", 2, {"loss": 1.5, "epoch": 0.0}), ("finish",)]
    from pipeline.train.reporting import worker_environment

    assert worker_environment(["wandb"])["WANDB_MODE"] == "offline" and worker_environment(["csv"]) == {}


@pytest.mark.s3
def test_reports_on_s3_are_uploaded_at_every_interval(s3_bucket):
    from pipeline.core.storage import exists, join_uri, read_bytes

    stage_uri = join_uri(s3_bucket, "run", "gpt")
    history = [{"step": 1, "loss": 3.0}]  # a resumed stage: the CSV starts from the checkpoint's history
    report = LiveReport(stage_uri, "gpt", ["tensorboard", "csv"], history=history, resumed_step=1)
    report.log({"step": 2, "loss": 2.0})
    rows = list(csv.DictReader(io.StringIO(read_bytes(join_uri(stage_uri, CSV_FILE)).decode())))
    assert [(row["step"], row["loss"]) for row in rows] == [("1", "3.0"), ("2", "2.0")]
    report.log({"step": 3, "loss": 1.0, "val_loss": 1.2})  # a new metric rewrites the header
    rows = list(csv.DictReader(io.StringIO(read_bytes(join_uri(stage_uri, CSV_FILE)).decode())))
    assert [row["val_loss"] for row in rows] == ["", "", "1.2"]
    grid = np.zeros((8, 8, 3), np.uint8)
    from pipeline.core.images import encode_png

    assert exists(report.image("samples", 3, grid, encode_png(grid)))
    folder = report.folder
    report.close()
    from pipeline.core.storage import list_files

    assert any("tfevents" in name for name in list_files(stage_uri))
    assert not os.path.exists(folder)  # the local mirror is gone


def test_one_grid_function_labels_and_upscales(tmp_path):
    import torch

    from pipeline.generation.grid import class_label, labelled_grid, sample_grid
    from var_model import VAR, VQVAE, SamplingSettings, TokenizerConfig

    images = np.random.default_rng(0).integers(0, 255, (6, 1, 16, 16), dtype=np.uint8)
    grid = labelled_grid(images, ["T-shirt/top", "Trouser", "class 2"])
    assert grid.dtype == np.uint8 and grid.shape[2] == 3 and grid.shape[0] == 3 * 66 - 2
    assert class_label(1, ["a", "b"]) == "b" and class_label(5, ["a", "b"]) == "class 5"
    assert class_label(3) == "class 3"
    torch.manual_seed(0)
    var = VAR(GPTStageConfig(model=TINY_VAR).var_config(TokenizerConfig.from_dict(TINY_TOKENIZER))).eval()
    tokenizer = VQVAE(TokenizerConfig.from_dict(TINY_TOKENIZER)).eval()
    chain_grid = sample_grid(var, tokenizer, [0, 1], 2, sampling=SamplingSettings(top_k=0), seed=0,
                             class_names=["T-shirt/top", "Trouser"])
    assert chain_grid.shape[0] == 2 * 66 - 2 and chain_grid.shape[1] > 2 * 66 + 20


def test_the_chain_encodes_the_validation_split_before_the_gpt_stage(monkeypatch, tmp_path):
    import pipeline.token_cache.cache
    from pipeline.chain.steps import chain_steps, step_named

    tiny = REPO / "configs" / "tiny.yaml"
    validation = f"data.validation={{shards_uri: {tmp_path}/shards/test, image_size: 16, channels: 1}}"
    plain = load_config_tiny(tiny, [f"storage.root={tmp_path}", f"data.train.shards_uri={tmp_path}/shards/train"])
    assert "token_cache_validation" not in [step.name for step in chain_steps(plain)]
    config = load_config_tiny(tiny, [f"storage.root={tmp_path}", f"data.train.shards_uri={tmp_path}/shards/train",
                                     validation, "gpt.validate_every=2", "cache.flip=true"])
    steps = [step.name for step in chain_steps(config)]
    assert steps.index("token_cache") < steps.index("token_cache_validation") < steps.index("gpt")
    seen = {}

    def fake_precompute(tokenizer_uri, data_config, output_uri, **kwargs):
        seen.update(tokenizer=tokenizer_uri, shards=data_config.shards_uri, output=output_uri, **kwargs)
        return {"num_rows": 4, "skipped_samples": 0, "skipped_shards": 0}

    monkeypatch.setattr(pipeline.token_cache.cache, "precompute_token_cache", fake_precompute)
    layout = config.layout
    summary = step_named("token_cache_validation").run(config, layout, None)
    assert seen["shards"] == f"{tmp_path}/shards/test" and seen["output"] == str(tmp_path / "tiny" / "token_cache_validation")
    assert seen["flip_augmentation"] is False and summary["data"]["num_rows"] == 4
