"""The chain's configs and CLIs: every shipped config validates, bad values stop with one line naming the
field, --dry-run checks storage and data and starts nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs import import_tokenizer, precompute_tokens, train_gpt, train_tokenizer, train_var
from pipeline.chain.config import TrainVarConfig
from pipeline.chain.run import plan_chain
from pipeline.core.configuration import load_config
from pipeline.core.exports import load_tokenizer
from var_model import VQVAE

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
JOBS = {"import_tokenizer": import_tokenizer, "train_var": train_var, "train_tokenizer": train_tokenizer,
        "precompute_tokens": precompute_tokens, "train_gpt": train_gpt}


def _job(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The job as users run it, in its own process (slow to start: used where the process matters)."""
    return subprocess.run([sys.executable, str(REPO / "jobs" / f"{name}.py"), *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env={**os.environ, **(env or {})})


def test_the_shipped_configs_are_all_there():
    assert {p.name for p in CONFIGS} >= {"fashion_mnist.yaml", "tiny.yaml", "imagenet_d16.yaml", "imagenet_d20.yaml",
                                         "imagenet_d24.yaml", "imagenet_d30.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_validates(path):
    config = load_config(TrainVarConfig, path)
    tokenizer, var = config.tokenizer_model, config.var_model
    assert tokenizer.scales == var.scales and tokenizer.codebook_size == var.codebook_size
    if path.stem.startswith("imagenet_d"):
        depth = int(path.stem.removeprefix("imagenet_d"))
        # The official recipe: global batch 768 (1024 for d30), tblr 1e-4 (8e-5 for d24/d30), bf16.
        assert var.num_layers == depth and tokenizer.image_size == 256
        assert config.gpt.global_batch_size == (1024 if depth == 30 else 768)
        assert config.gpt.base_learning_rate == (8e-5 if depth >= 24 else 1e-4)
        assert config.gpt.precision == "bf16" and config.gpt.grad_clip == 2.0 and config.gpt.betas == (0.9, 0.95)
        assert config.data.train.shards_uri.startswith("s3://YOUR-BUCKET/imagenet/")


@pytest.mark.parametrize("override, field", [
    ("gpt.model.codebook_size=128", "gpt.model.codebook_size"),
    ("gpt.model.scales=[1,2,3]", "gpt.model.scales"),
    ("gpt.model.embed_dim=16", "gpt.model.embed_dim"),
    ("data.train.image_size=32", "data.train.image_size"),
    ("tokenizer.model.image_size=18", "tokenizer.model.image_size"),
    ("tokenizer.preset=no-such-preset", "tokenizer.preset"),
    ("gpt.zero_stage=5", "gpt.zero_stage"),
    ("sample.classes=[0,10]", "sample.classes.1"),
    ("cache.concurrency=0", "cache.concurrency"),
    ("storage.run_name=a/b", "storage.run_name"),
])
def test_a_bad_value_stops_the_job_with_one_line_naming_the_field(override, field, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code = train_var.main(["--config", "configs/tiny.yaml", "--storage", str(tmp_path), "--dry-run", "--set", override])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"train_var: config error: {field}:"), stderr
    assert list(tmp_path.iterdir()) == []


def test_a_bad_value_in_a_real_process_exits_2_with_one_line(tmp_path):
    result = _job("train_var", "--config", "configs/tiny.yaml", "--storage", str(tmp_path), "--dry-run",
                  "--set", "gpt.model.codebook_size=128")
    assert result.returncode == 2
    assert result.stderr.strip() == ("train_var: config error: gpt.model.codebook_size: comes from the tokenizer, "
                                     "whose codebook_size is 64; remove it (got 128)")


def test_dry_run_checks_and_starts_nothing(tmp_path, tiny_shards):
    storage = tmp_path / "runs"
    # An unreachable RAY_ADDRESS: a dry run that tried to join a cluster would fail or hang here.
    env = {"RAY_ADDRESS": "127.0.0.1:1"}
    for job in ("train_var", "train_tokenizer"):
        result = _job(job, "--config", "configs/tiny.yaml", "--storage", str(storage), "--run-name", "dry",
                      "--set", f"data.train.shards_uri={tiny_shards}", "--dry-run", env=env)
        assert result.returncode == 0, result.stderr
        plan = json.loads(result.stdout.strip().splitlines()[-1])
        assert plan["dry_run"] is True
    assert plan["data"]["samples"] == 96 and plan["status"] == "run"
    assert not storage.exists()  # the probe object and the folder it needed are gone again


def test_a_later_step_run_alone_checks_its_inputs(tmp_path, capsys, monkeypatch):
    # The GPT stage needs the tokenizer export and the token cache before anything starts.
    monkeypatch.chdir(REPO)
    code = train_gpt.main(["--config", "configs/tiny.yaml", "--storage", str(tmp_path), "--dry-run"])
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.startswith("train_gpt: tokenizer_export: ") and "missing" in stderr


def test_dry_run_names_missing_shards_and_unwritable_storage(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    missing = str(tmp_path / "nowhere" / "train")
    code = train_var.main(["--config", "configs/tiny.yaml", "--storage", str(tmp_path / "runs"), "--dry-run",
                           "--set", f"data.train.shards_uri={missing}", "--set", "data.create=null"])
    assert code == 2 and capsys.readouterr().err.startswith("train_var: data.train.shards_uri: no index.json")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = train_var.main(["--config", "configs/tiny.yaml", "--storage", str(blocker / "runs"), "--dry-run"])
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.startswith("train_var: storage.root: cannot write"), stderr


def test_plan_says_which_steps_would_run(tmp_path, tiny_shards):
    config = load_config(TrainVarConfig, REPO / "configs/tiny.yaml", [f"data.train.shards_uri={tiny_shards}",
                                                                      f"storage.root={tmp_path}"])
    layout = config.layout
    Path(layout.samples).parent.mkdir(parents=True)
    Path(layout.samples).write_bytes(b"png")
    plan = plan_chain(config)
    assert plan["steps"] == {"tokenizer": "run", "token_cache": "run", "gpt": "run", "samples": "skip (output exists)"}
    assert plan["outputs"]["tokenizer_export"] == str(tmp_path / "tiny" / "tokenizer" / "export")


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_job_has_help(job, capsys):
    with pytest.raises(SystemExit) as exit_info:
        JOBS[job].main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--config" in out and "--storage" in out and "--dry-run" in out


def test_the_released_tokenizer_can_stand_in_for_stage_one(tmp_path, tiny_shards, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    # An official-layout state dict (GroupNorm 32, as the released model): the tiny tokenizer at 32 channels.
    widths = ["--set", "tokenizer.model.base_channels=32", "--set", "tokenizer.model.norm_groups=32"]
    common = ["--config", "configs/tiny.yaml", "--storage", str(tmp_path / "runs"),
              "--set", f"data.train.shards_uri={tiny_shards}", *widths]
    config = load_config(TrainVarConfig, "configs/tiny.yaml", [o for o in common[6:] if o != "--set"])
    torch.manual_seed(0)
    official = VQVAE(config.tokenizer_model)
    torch.save(official.state_dict(), tmp_path / "vae.pth")

    assert import_tokenizer.main([*common, "--checkpoint", str(tmp_path / "vae.pth")]) == 0, capsys.readouterr().err
    imported = load_tokenizer(str(tmp_path / "runs" / "tiny" / "tokenizer" / "export"))
    assert all(torch.equal(imported.state_dict()[k], v) for k, v in official.state_dict().items())
    assert plan_chain(config.model_copy(update={"storage": config.storage.model_copy(
        update={"root": str(tmp_path / "runs")})}))["steps"]["tokenizer"] == "skip (output exists)"

    # A checkpoint that is not the configured model is refused with one line naming the field.
    code = import_tokenizer.main([*common, "--set", "tokenizer.model.embed_dim=16", "--set", "gpt.model.embed_dim=16",
                                  "--checkpoint", str(tmp_path / "vae.pth")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("import_tokenizer: tokenizer.model.embed_dim: the checkpoint has 8"), err
