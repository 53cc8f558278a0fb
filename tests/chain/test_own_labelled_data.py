"""A new user's own labelled data, end to end through the real CLIs: a class-named image folder ->
make_shards -> train_var (tiny, through `ray job submit` to a `ray start --head` cluster of this test's own,
then submitted again: every step skipped) -> generate_dataset (`plan.classes={Bag: n}`, the .npz export) ->
evaluate against the run's own validation split.

The folder holds real Fashion-MNIST images as PNG and JPEG under folders named after the classes. The
names must survive every hand-over: the shard index, both exports' config.json, the token cache (its
manifest and every Parquet file's metadata), the generated set (each row's class_name and the file
metadata), the chain's sample grid (its row labels) and the evaluation, whose every figure is present
and finite.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from ray_head import CLUSTER_ENV, RAY

from pipeline.core.exports import read_export_info
from pipeline.data.sources.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from pipeline.generation.grid import labelled_grid

REPO = Path(__file__).resolve().parents[2]
FOLDERS = sorted(name.replace("/", "-").replace(" ", "_") for name in CLASS_NAMES)  # "T-shirt-top", "Ankle_boot"
PER_CLASS = 6  # images per class folder: half PNG, half JPEG
GENERATED = 6  # images of the one requested class; also the N per side of the evaluation
TINY_STEPS = ["--set", "tokenizer.steps=2", "--set", "tokenizer.warmup_steps=1", "--set", "tokenizer.checkpoint_every=2",
              "--set", "gpt.steps=2", "--set", "gpt.warmup_steps=1", "--set", "gpt.checkpoint_every=2"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _user_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment plus `extra`, without RAY_ADDRESS: a job finds its Ray as a user's would."""
    return {key: value for key, value in {**os.environ, **(extra or {})}.items() if not key.startswith("RAY_ADDRESS")}


def _run(job: str, *args: str, cwd: Path) -> dict:
    """`python jobs/<job>.py ARGS` as a user runs it; its last stdout line is the job's JSON answer."""
    env = _user_env()
    result = subprocess.run([sys.executable, str(REPO / "jobs" / f"{job}.py"), *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{job} {args}\nstderr tail:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def _submit(address: str, job: str, *args: str) -> str:
    """`ray job submit --working-dir . -- python jobs/<job>.py ARGS` from the repository, as README says;
    returns the job's console. The job runs in its own unpacked copy, so every path given is absolute."""
    env = _user_env(CLUSTER_ENV)
    result = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", ".", "--",
                             "python", f"jobs/{job}.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=900)
    console = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in console, console[-4000:]
    return console


def _class_folder(root: Path, fashion_mnist_dir: str) -> None:
    images, labels = load_fashion_mnist("train", fashion_mnist_dir)
    for label, name in enumerate(CLASS_NAMES):
        folder = root / name.replace("/", "-").replace(" ", "_")
        folder.mkdir(parents=True)
        for number, index in enumerate(np.flatnonzero(labels == label)[:PER_CLASS]):
            Image.fromarray(images[index]).save(folder / f"{name[:3]}_{number}.{'png' if number % 2 else 'jpg'}")


def _finite(tree) -> bool:
    if isinstance(tree, dict):
        return all(_finite(value) for value in tree.values())
    if isinstance(tree, list):
        return all(_finite(value) for value in tree)
    return not isinstance(tree, float) or math.isfinite(tree)


def test_class_names_travel_from_the_folder_to_the_evaluation(ray_head, tmp_path, fashion_mnist_dir):
    _class_folder(tmp_path / "photos", fashion_mnist_dir)
    shards = _run("make_shards", "--source", "folder", "--input", "photos", "--output", "shards", "--image-size", "16",
                  "--channels", "1", "--val-fraction", "0.25", "--samples-per-shard", "16", "--workers", "1",
                  cwd=tmp_path)
    assert shards["splits"]["train"]["samples"] + shards["splits"]["validation"]["samples"] == 10 * PER_CLASS
    index = json.loads((tmp_path / "shards" / "train" / "index.json").read_text())
    assert index["class_names"] == FOLDERS

    chain = ["--config", "configs/tiny.yaml", "--set", f"data.train.shards_uri={tmp_path / 'shards' / 'train'}",
             "--set", "data.create=null",
             "--set", f"data.validation={{shards_uri: {tmp_path / 'shards' / 'validation'}, shuffle: false}}",
             "--storage", str(tmp_path / "runs"), "--run-name", "mine", *TINY_STEPS]
    _submit(ray_head, "train_var", *chain)
    run = tmp_path / "runs" / "mine"
    steps = json.loads((run / "chain.json").read_text())["steps"]
    assert all(steps[name]["status"] == "ran" for name in ("tokenizer", "token_cache", "gpt", "samples")), steps
    tokenizer, var = read_export_info(str(run / "tokenizer" / "export")), read_export_info(str(run / "gpt" / "export"))
    assert tokenizer["format"] == "varray.tokenizer/1" and var["format"] == "varray.var/1"
    assert var["tokenizer_checksum"] == tokenizer["checksum"]
    for export in ("tokenizer/export", "gpt/export"):
        assert json.loads((run / export / "config.json").read_text())["class_names"] == FOLDERS, export
    manifest = json.loads((run / "token_cache" / "_SUCCESS.json").read_text())
    assert manifest["class_names"] == FOLDERS and manifest["tokenizer_checksum"] == tokenizer["checksum"]
    assert manifest["num_rows"] == shards["splits"]["train"]["samples"]
    for part in (run / "token_cache" / "data").glob("*.parquet"):
        assert json.loads(pq.read_schema(part).metadata[b"varray.class_names"]) == FOLDERS
    # The chain's grid (tiny.yaml: classes 0, 1, 2) is labelled with the folder names: its label column is
    # exactly what labelled_grid draws for those names, and not what it draws for class indices.
    with Image.open(run / "samples.png") as picture:
        grid = np.asarray(picture.convert("RGB"))
    blank = np.zeros((6, 1, 16, 16), dtype=np.uint8)
    expected = labelled_grid(blank, FOLDERS[:3])
    column = expected.shape[1] - labelled_grid(blank, [""] * 3).shape[1] + 12  # label text + its margins
    assert grid.shape == expected.shape and np.array_equal(grid[:, :column], expected[:, :column])
    assert not np.array_equal(grid[:, :column], labelled_grid(blank, ["class 0", "class 1", "class 2"])[:, :column])

    # The same submission again resumes: every step's output exists, so nothing runs twice.
    _submit(ray_head, "train_var", *chain)
    steps = json.loads((run / "chain.json").read_text())["steps"]
    assert all(step["status"] == "skipped" for step in steps.values()), steps

    generated = _run("generate_dataset", "--run", "runs/mine", "--output", "bags",
                     "--set", f"plan.classes={{Bag: {GENERATED}}}", "--set", "sampling.batch_size=6",
                     "--npz", "bags.npz", cwd=tmp_path)
    assert generated["per_class"] == {"Bag": GENERATED} and generated["npz"]["shape"] == [GENERATED, 16, 16, 3]
    table = pq.read_table(tmp_path / "bags" / "data")
    assert table.column("class_name").to_pylist() == ["Bag"] * GENERATED
    assert table.column("label").to_pylist() == [FOLDERS.index("Bag")] * GENERATED
    for part in (tmp_path / "bags" / "data").glob("*.parquet"):
        assert json.loads(pq.read_schema(part).metadata[b"varray.generated"])["class_names"] == FOLDERS
    assert json.loads((tmp_path / "bags" / "plan.json").read_text())["class_names"] == FOLDERS
    npz = np.load(tmp_path / "bags.npz")
    assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (GENERATED, 16, 16, 3)

    figures = _run("evaluate", "--run", "runs/mine", "--generated", "bags", "--samples", str(GENERATED),
                   "--set", "fid.batch_size=6", "--set", "features.samples=12", "--set", "reconstruction.samples=6",
                   "--set", "classifier.min_steps=10", cwd=tmp_path)
    assert figures == json.loads((run / "eval" / "metrics.json").read_text())
    reference = figures["reference"]
    assert reference["source"] == "run" and reference["uri"] == str(tmp_path / "shards" / "validation")
    assert reference["train"]["uri"] == str(tmp_path / "shards" / "train")
    assert reference["class_names"] == figures["class_names"] == FOLDERS
    assert figures["n"] == GENERATED and _finite(figures)
    for section, names in {"fid": ("generated_vs_reference", "train_vs_reference", "reconstruction_vs_reference"),
                           "kid": ("generated_vs_reference", "train_vs_reference"),
                           "feature_frechet": ("generated_vs_reference", "train_vs_reference"),
                           "classifier_score": ("generated", "reference"),
                           "class_consistency": ("overall", "reference_accuracy"),
                           "reconstruction": ("psnr_db",)}.items():
        for name in names:
            assert isinstance(figures[section][name], float), (section, name)
    for side in ("generated", "train"):
        assert 0.0 <= figures["precision_recall"][side]["precision"] <= 1.0
        assert 0.0 <= figures["precision_recall"][side]["recall"] <= 1.0
    assert figures["fid"]["n"] == figures["kid"]["n"] == figures["precision_recall"]["n"] == GENERATED
    assert list(figures["class_consistency"]["per_class"]) == ["Bag"]
    assert figures["inception_score"]["available"] is False and figures["inception_score"]["reason"]
    assert (run / "eval" / "samples.png").is_file() and (run / "eval" / "loss_curves.png").is_file()
