"""Outputs are checked, never trusted, and never lost (issue 15, rules 1 (generated set), 2 and 5).

- a finished generated set is verified unit by unit (size, sha256, plan fingerprint): a deleted or
  damaged unit is made again with the same bytes, a changed plan is refused naming what changed,
  a corrupt plan.json or stats file is one line naming the file;
- no job deletes what it did not write: the token cache and the generation job refuse a non-empty
  output folder that is not their own, and the cache removes only its own staging names;
- resuming loads a checkpoint weights-only: a planted pickle is refused and its payload never runs.
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
import torch
from cli_helpers import REPO, one_line_error, run_cli

# ----------------------------------------------------------------------------------------------
# Resume without unpickling


class _WritesAFile:
    """Unpickled without weights_only, this opens (creates) `path`: the payload of a planted checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def engine():
    """A one-process DeepSpeed ZeRO-1 engine on CPU (gloo), as the harness builds them, around a tiny model."""
    import deepspeed
    import torch.distributed as dist

    patch = pytest.MonkeyPatch()
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        patch.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    config = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 1}, "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9}
    ds_engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=config)
    loss = ds_engine(torch.randn(2, 4)).sum()
    ds_engine.backward(loss)
    ds_engine.step()
    yield ds_engine
    dist.destroy_process_group()
    patch.undo()


def _save_checkpoint(engine, folder: Path) -> None:
    """A checkpoint folder in the layout report_metrics_and_save_checkpoint gives Ray Train."""
    from pipeline.train.checkpointing import DEEPSPEED_DIR, DEEPSPEED_TAG, METRICS_FILE, STATE_FILE

    engine.save_checkpoint(str(folder / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    (folder / STATE_FILE).write_text(json.dumps({"step": 1, "epoch": 0, "samples_seen": 2, "resumed_from": []}))
    (folder / METRICS_FILE).write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")


@pytest.mark.timeout(120)
def test_resume_loads_weights_only_and_refuses_a_planted_pickle(engine, tmp_path, monkeypatch):
    import ray.train

    from pipeline.core.errors import VarrayError
    from pipeline.train import checkpointing
    from pipeline.train.checkpointing import DEEPSPEED_DIR, DEEPSPEED_TAG, load_checkpoint

    good, planted = tmp_path / "good", tmp_path / "planted"
    _save_checkpoint(engine, good)
    _save_checkpoint(engine, planted)
    # A real ZeRO checkpoint resumes through the weights-only loader: DeepSpeed's own types are allowed.
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(good)))
    state, history = load_checkpoint(engine)
    assert state.step == 1 and history == [{"step": 1, "loss": 1.0}]

    marker = tmp_path / "payload_ran"
    model_states = planted / DEEPSPEED_DIR / DEEPSPEED_TAG / "mp_rank_00_model_states.pt"
    real = torch.load(model_states, weights_only=False)
    torch.save({**real, "module": _WritesAFile(str(marker))}, model_states)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(planted)))
    with pytest.raises(VarrayError) as refused:
        load_checkpoint(engine)
    assert not marker.exists(), "the planted pickle ran"
    message = str(refused.value)
    assert "\n" not in message and "mp_rank_00_model_states.pt" in message and "io.open" in message

    # Without the up-front scan, DeepSpeed's own reads are weights-only too.
    monkeypatch.setattr(checkpointing, "check_checkpoint_folder", lambda folder: None)
    with pytest.raises(VarrayError) as refused:
        load_checkpoint(engine)
    assert not marker.exists(), "the planted pickle ran"
    assert "\n" not in str(refused.value) and "mp_rank_00_model_states.pt" in str(refused.value)


# ----------------------------------------------------------------------------------------------
# A finished generated set is checked, not trusted


def _generate_args(exports: tuple[str, str], output: Path, *extra: str) -> list[str]:
    # 10 images (one per class) in units of 4: three Parquet files.
    return ["--tokenizer", exports[0], "--var", exports[1], "--output", str(output), "--per-class", "1",
            "--set", "plan.unit_size=4", "--set", "sampling.batch_size=4", "--set", "compute.num_cpus=0.5",
            "--set", "compute.local_num_cpus=2", *extra]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> tuple[str, str]:
    from tests.generation.conftest import write_tiny_exports

    return write_tiny_exports(str(tmp_path_factory.mktemp("exports")))


@pytest.fixture(scope="module")
def generated(exports, tmp_path_factory) -> Path:
    """A finished set, made once by the real CLI; tests work on copies."""

    output = tmp_path_factory.mktemp("generated") / "set"
    result = run_cli("generate_dataset", *_generate_args(exports, output))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (output / "data").iterdir()) == [f"part-00000{i}.parquet" for i in range(3)]
    return output


@pytest.fixture
def copy_of_set(generated, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(generated, tmp_path / "set"))


@pytest.mark.timeout(300)
def test_deleted_or_damaged_unit_is_made_again_with_the_same_bytes(cli, exports, generated, copy_of_set):
    before = _files(generated)
    (copy_of_set / "data" / "part-000000.parquet").unlink()
    damaged = copy_of_set / "data" / "part-000002.parquet"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped: only the checksum can tell
    damaged.write_bytes(bytes(data))

    result = cli("generate_dataset", *_generate_args(exports, copy_of_set))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["units_generated"] == 2 and summary["images_generated"] == 6, summary
    after = _files(copy_of_set)
    assert sorted(after) == sorted(before)
    for name in ("data/part-000000.parquet", "data/part-000001.parquet", "data/part-000002.parquet"):
        assert after[name] == before[name], name  # generation is deterministic per unit: the same bytes
    stats = json.loads(after["stats/part-000002.json"])
    assert stats["sha256"] == hashlib.sha256(after["data/part-000002.parquet"]).hexdigest()


@pytest.mark.timeout(120)
def test_changed_plan_is_refused_naming_the_changed_fields(cli, exports, copy_of_set):
    before = _files(copy_of_set)
    result = cli("generate_dataset", *_generate_args(exports, copy_of_set, "--set", "sampling.cfg=2.0",
                                                     "--per-class", "2"))
    line = one_line_error(result, "generate_dataset")
    assert f"plan.json at {copy_of_set} holds a different plan" in line, line
    assert "changed counts, sampling.cfg (1.5 -> 2.0)" in line, line
    assert _files(copy_of_set) == before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damaged", ["plan.json", "stats/part-000001.json"])
def test_corrupt_plan_or_stats_file_is_one_line_naming_it(cli, exports, copy_of_set, damaged):
    (copy_of_set / damaged).write_text('{"fingerprint": "abc", ')  # cut short: not JSON
    result = cli("generate_dataset", *_generate_args(exports, copy_of_set))
    line = one_line_error(result, "generate_dataset")
    assert str(copy_of_set / damaged) in line and "not JSON" in line, line


# ----------------------------------------------------------------------------------------------
# Nothing lost: no job deletes (or writes into) a folder that is not its own


@pytest.mark.timeout(120)
def test_generation_refuses_a_foreign_non_empty_output(cli, exports, tmp_path):
    output = tmp_path / "holiday_photos"
    (output / "data").mkdir(parents=True)
    (output / "notes.txt").write_text("mine")
    (output / "data" / "mine.csv").write_text("a,b\n")
    result = cli("generate_dataset", *_generate_args(exports, output))
    line = one_line_error(result, "generate_dataset")
    assert "not a generated set of varray" in line and "'data/mine.csv'" in line, line
    assert _files(output) == {"data/mine.csv": b"a,b\n", "notes.txt": b"mine"}


@pytest.fixture(scope="module")
def tokenizer_export(tmp_path_factory) -> str:
    """A tiny tokenizer export with configs/tiny.yaml's model."""
    import yaml

    from pipeline.core.exports import save_tokenizer
    from var_model import VQVAE, TokenizerConfig

    model = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())["tokenizer"]["model"]
    folder = tmp_path_factory.mktemp("tokenizer_export")
    torch.manual_seed(0)
    save_tokenizer(VQVAE(TokenizerConfig.from_dict(model)).eval(), str(folder))
    return str(folder)


@pytest.mark.timeout(180)
def test_token_cache_refuses_a_foreign_output_and_deletes_nothing(cli, tokenizer_export, tmp_path):
    output = tmp_path / "my_files"
    (output / "data").mkdir(parents=True)
    (output / "thesis.tex").write_text("years of work")
    (output / "data" / "part-00000.parquet").write_bytes(b"looks like a cache file, is not alone")
    result = cli("precompute_tokens", "--config", str(REPO / "configs" / "tiny.yaml"), "--storage",
                 str(tmp_path / "runs"), "--tokenizer", tokenizer_export, "--output", str(output), cwd=tmp_path)
    line = one_line_error(result, "precompute_tokens")
    assert "not a token cache of varray" in line and "'thesis.tex'" in line, line
    assert _files(output) == {"data/part-00000.parquet": b"looks like a cache file, is not alone",
                              "thesis.tex": b"years of work"}


def test_token_cache_cleans_only_its_own_leftovers(tmp_path):
    from pipeline.token_cache.cache import _own_leftovers
    from pipeline.token_cache.schema import TokenCacheError

    killed = tmp_path / "cache"
    (killed / "_staging-0a1b2c").mkdir(parents=True)
    (killed / "_staging-0a1b2c" / "x_000000-0.parquet").write_bytes(b"half")
    (killed / "data").mkdir()
    (killed / "data" / "part-00001.parquet").write_bytes(b"published before the kill")
    (killed / "._SUCCESS.json.k3j.tmp").write_bytes(b"{")
    assert _own_leftovers(str(killed), None) == ["._SUCCESS.json.k3j.tmp", "_staging-0a1b2c",
                                                 "data/part-00001.parquet"]
    (killed / "data" / "README").write_text("mine")
    with pytest.raises(TokenCacheError, match="'data/README'"):
        _own_leftovers(str(killed), None)
    assert (killed / "data" / "part-00001.parquet").exists()
