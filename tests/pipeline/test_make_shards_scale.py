"""make_shards from a folder at scale: label manifests, parallel shard tasks, reruns that keep finished
shards, JPEG bytes kept. No Ray here; shards are checked with tarfile and webdataset."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.make_shards import main as make_shards_main
from pipeline.core.errors import VarrayError
from pipeline.data.sharding import MakeShardsConfig, make_shards
from pipeline.data.sources.label_manifest import LabelManifestError, read_label_manifest

SYNSETS = {"n01440764": "tench", "n01443537": "goldfish", "n02012849": "crane", "n03126707": "crane"}


def _synset_folder(root: Path, per_class: int = 3, size: int = 20) -> Path:
    rng = np.random.default_rng(1)
    for number, synset in enumerate(SYNSETS):
        (root / synset).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size, size + 4, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / synset / f"{synset}_{i}.png")
    return root


def _members(tar_path: str) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


# ---- label manifest -------------------------------------------------------------------------------

def test_a_manifest_gives_ids_and_names_in_its_order(tmp_path):
    folder = _synset_folder(tmp_path / "images")
    # ids deliberately not the sorted folder order; the last id names a class this copy lacks
    order = ["n02012849", "n01440764", "n03126707", "n01443537"]
    csv = tmp_path / "labels.csv"
    csv.write_text("folder,id,name\n" + "".join(f"{s},{i},{SYNSETS[s]}\n" for i, s in enumerate(order))
                   + "n09999999,4,missing class\n")
    keras = tmp_path / "imagenet_class_index.json"
    keras.write_text(json.dumps({str(i): [s, SYNSETS[s]] for i, s in enumerate(order)}
                                | {"4": ["n09999999", "missing class"]}))
    by_folder = tmp_path / "labels.json"
    by_folder.write_text(json.dumps({s: {"id": i, "name": SYNSETS[s]} for i, s in enumerate(order)}
                                    | {"n09999999": {"id": 4, "name": "missing class"}}))
    manifests = [read_label_manifest(str(path)) for path in (csv, keras, by_folder)]
    assert manifests[0].folders == manifests[1].folders == manifests[2].folders == (*order, "n09999999")
    assert manifests[0].names == ("crane", "tench", "crane", "goldfish", "missing class")  # names may repeat

    output = tmp_path / "shards"
    index = make_shards(MakeShardsConfig(source="folder", input=str(folder), output=str(output), image_size=16,
                                         labels=str(csv), samples_per_shard=5, workers=1))["train"]
    assert index.class_names == ["crane", "tench", "crane", "goldfish", "missing class"]
    assert index.source["class_folders"] == [*order, "n09999999"] and index.source["label_manifest"] == str(csv)
    labels = {}
    for shard in index.shards:
        members = _members(str(output / "train" / shard.name))
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                labels[meta["path"].split("/")[0]] = int(members[name.replace(".json", ".cls")])
    assert labels == {s: order.index(s) for s in SYNSETS}


@pytest.mark.parametrize("text,problem", [
    ("folder,id,name\nn01440764,0,tench\nn01443537,1,goldfish\nn02012849,2,crane\n",
     "folder 'n03126707' (in {root}) is not in the manifest"),
    ("folder,id,name\nn01440764,0,tench\nn01443537,0,goldfish\n", "folder 'n01443537': id 0 is also folder "
                                                                   "'n01440764''s"),
    ("folder,id,name\nn01440764,0,tench\nn01440764,1,tench again\n", "folder 'n01440764' appears twice"),
    ("folder,id,name\nn01440764,0,tench\nn01443537,2,goldfish\n", "folder 'n01443537': id 2 leaves id 1 unused"),
    ("folder,id,name\nn01440764,zero,tench\n", "folder 'n01440764': id 'zero' is not an integer"),
    ("synset,name\nn01440764,tench\n", "the CSV header must name 'folder' and 'id'"),
])
def test_a_manifest_that_disagrees_stops_with_one_line_naming_the_folder(tmp_path, capsys, text, problem):
    folder = _synset_folder(tmp_path / "images", per_class=1)
    manifest = tmp_path / "labels.csv"
    manifest.write_text(text)
    output = tmp_path / "shards"
    code = make_shards_main(["--source", "folder", "--input", str(folder), "--image-size", "16", "--output",
                             str(output), "--labels", str(manifest)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"make_shards: label manifest {manifest}: ")
    assert problem.format(root=folder) in err[0]
    assert not output.exists()  # refused before anything is written
    with pytest.raises(LabelManifestError):
        make_shards(MakeShardsConfig(source="folder", input=str(folder), output=str(output), image_size=16,
                                     labels=str(manifest)))


def test_manifest_config_errors_are_one_line(tmp_path, capsys):
    for flags, problem in ((["--source", "fashion-mnist", "--labels", "x.csv"], "labels: a label manifest is for "
                                                                               "source 'folder' only"),
                           (["--source", "folder", "--input", str(tmp_path), "--image-size", "8",
                             "--labels", "labels.txt"], "labels: a label manifest is a .json or .csv file")):
        assert make_shards_main([*flags, "--output", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("make_shards: config error: ") and problem in err and "\n" not in err


# ---- parallel writing, reruns, JPEG bytes ---------------------------------------------------------

def _split_state(split: Path) -> dict[str, tuple[int, bytes]]:
    return {name: (os.stat(split / name).st_mtime_ns, (split / name).read_bytes()) for name in os.listdir(split)}


def test_parallel_shards_and_a_rerun_keeps_finished_ones(tmp_path):
    folder = _synset_folder(tmp_path / "images", per_class=5)  # 20 images, shards of 3 -> 7 shards
    output = tmp_path / "out"
    split = output / "train"
    config = MakeShardsConfig(source="folder", input=str(folder), output=str(output), image_size=16,
                              samples_per_shard=3, workers=2)
    index = make_shards(config)["train"]
    assert [s.samples for s in index.shards] == [3, 3, 3, 3, 3, 3, 2] and index.total == 20
    names = [s.name for s in index.shards]
    assert sorted(os.listdir(split)) == sorted(["index.json", *names, *(n.replace(".tar", ".stats.json")
                                                                         for n in names)])
    stats = json.loads((split / "shard-000002.stats.json").read_text())
    assert (stats["name"], stats["samples"], stats["bytes"]) == ("shard-000002.tar", 3,
                                                                 os.path.getsize(split / "shard-000002.tar"))

    # One worker writes the same bytes (shard i holds the i-th slice of the permutation, whatever ran it).
    serial = make_shards(config.model_copy(update={"output": str(tmp_path / "serial"), "workers": 1}))["train"]
    assert serial.shards == index.shards
    for name in names:
        assert (split / name).read_bytes() == (tmp_path / "serial" / "train" / name).read_bytes()

    before = _split_state(split)
    (split / "shard-000004.tar").unlink()  # a lost shard
    (split / "shard-000005.stats.json").unlink()  # a shard whose run was killed between tar and marker
    assert make_shards(config)["train"] == index
    after = _split_state(split)
    assert sorted(after) == sorted(before)
    written_again = {"shard-000004.tar", "shard-000004.stats.json", "shard-000005.tar", "shard-000005.stats.json",
                     "index.json"}
    for name in set(after) - written_again:
        assert after[name] == before[name], f"{name} was rewritten"  # finished shards untouched: mtime, bytes
    for name in ("shard-000004.tar", "shard-000005.tar", "index.json"):
        assert after[name][0] != before[name][0] and after[name][1] == before[name][1], name  # same bytes again

    # Another plan (bigger shards): nothing is kept, and the old plan's extra shards and markers go.
    bigger = make_shards(config.model_copy(update={"samples_per_shard": 10}))["train"]
    assert [s.samples for s in bigger.shards] == [10, 10]
    assert sorted(os.listdir(split)) == ["index.json", "shard-000000.stats.json", "shard-000000.tar",
                                         "shard-000001.stats.json", "shard-000001.tar"]


def test_a_failing_task_stops_the_run_and_the_rerun_finishes(tmp_path):
    folder = _synset_folder(tmp_path / "images", per_class=2)
    (folder / "n01440764" / "broken.png").write_bytes(b"not an image")  # refused, counted, never fatal
    output = tmp_path / "out"
    config = MakeShardsConfig(source="folder", input=str(folder), output=str(output), image_size=16,
                              samples_per_shard=3, workers=2)
    # In a process of its own: this test session is a Ray driver, where the tasks would be Ray tasks,
    # which do not inherit the failing reader; a plain process forks its pool, whose workers do.
    script = f"""
from pipeline.data.sources import image_folder
from pipeline.data.sharding import MakeShardsConfig, make_shards
real = image_folder.read_image_or_refusal
def failing(path, *args, **kwargs):
    if path.endswith("n01443537_1.png"):
        raise RuntimeError("disk on fire")
    return real(path, *args, **kwargs)
image_folder.read_image_or_refusal = failing
make_shards(MakeShardsConfig.model_validate_json({config.model_dump_json()!r}))
"""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    failed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert failed.returncode != 0 and "disk on fire" in failed.stderr, failed.stderr[-2000:]
    left = os.listdir(output / "train")
    assert "index.json" not in left and ".make_shards-in-progress.json" in left
    assert not any(name.endswith(".tmp") for name in left)  # the failed shard's staging file is gone
    assert len([name for name in left if name.endswith(".tar")]) == 2  # the other shards finished
    index = make_shards(config)["train"]
    assert index.total == 8 and [os.path.basename(p) for p in index.source["unreadable_files"]] == ["broken.png"]
    assert index.source["refused_reasons"] == {"unreadable": 1}


def test_jpegs_that_need_no_resize_keep_their_bytes(tmp_path):
    folder = tmp_path / "images"
    rng = np.random.default_rng(2)
    sources = {}
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / cls / f"{i}.jpg", quality=90)
            sources[f"{cls}/{i}.jpg"] = (folder / cls / f"{i}.jpg").read_bytes()
    Image.fromarray(rng.integers(0, 256, size=(20, 16, 3), dtype=np.uint8)).save(folder / "a" / "tall.jpg")
    Image.fromarray(rng.integers(0, 256, size=(16, 16), dtype=np.uint8)).save(folder / "b" / "gray.jpg")
    Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(folder / "b" / "same.png")

    output = tmp_path / "out"
    index = make_shards(MakeShardsConfig(source="folder", input=str(folder), output=str(output), image_size=16,
                                         channels=3, samples_per_shard=4))["train"]
    assert index.total == 9 and index.source["kept_jpeg"] == 6
    found = {}
    for shard in index.shards:
        members = _members(str(output / "train" / shard.name))
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[: -len(".json")]
                image = next(n for n in members if n.startswith(key + ".") and n.split(".")[1] in ("jpg", "png"))
                found[json.loads(data)["path"]] = (image.split(".")[1], members[image])
    for path, data in sources.items():
        assert found[path] == ("jpg", data)  # the file's own bytes, stored as .jpg
    assert found["a/tall.jpg"][0] == "png" and Image.open(io.BytesIO(found["a/tall.jpg"][1])).size == (16, 16)
    assert found["b/gray.jpg"][0] == "png"  # a gray JPEG in an RGB split is converted
    assert found["b/same.png"][0] == "png"

    # --no-keep-jpeg: every image re-encoded as PNG.
    again = make_shards(MakeShardsConfig(source="folder", input=str(folder), output=str(tmp_path / "png"),
                                         image_size=16, channels=3, keep_jpeg=False))["train"]
    assert again.source["kept_jpeg"] == 0


def test_make_shards_refuses_a_foreign_folder_with_stats_like_names_untouched(tmp_path):
    folder = _synset_folder(tmp_path / "images", per_class=1)
    split = tmp_path / "out" / "train"
    split.mkdir(parents=True)
    (split / "shard-000000.tar").write_text("theirs")
    with pytest.raises(VarrayError, match="holds shards"):
        make_shards(MakeShardsConfig(source="folder", input=str(folder), output=str(tmp_path / "out"),
                                     image_size=16))
    assert (split / "shard-000000.tar").read_text() == "theirs"


# ---- the chain's data.create from a folder -------------------------------------------------------

def test_the_chains_data_create_takes_an_image_folder(tmp_path):
    from pipeline.chain.checks import check_data, ensure_shards
    from pipeline.chain.config import TrainVarConfig
    from pipeline.core.configuration import ConfigError, load_config

    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    folder = _synset_folder(tmp_path / "images", per_class=4)
    manifest = tmp_path / "labels.json"
    manifest.write_text(json.dumps({s: {"id": i, "name": SYNSETS[s]} for i, s in enumerate(sorted(SYNSETS))}))
    root = tmp_path / "shards"
    overrides = [f"data.train.shards_uri={root}/train", f"data.validation.shards_uri={root}/validation",
                 "data.create.source=folder", f"data.create.input={folder}", f"data.create.labels={manifest}",
                 "data.create.val_fraction=0.25", "data.create.samples_per_shard=5", "data.create.workers=2"]
    config = load_config(TrainVarConfig, tiny, overrides)
    planned = check_data(config)["create"]
    assert {name: split["samples"] for name, split in planned["splits"].items()} == {"train": 12, "validation": 4}
    assert ensure_shards(config) and not ensure_shards(config)  # written once, then found
    train = json.loads((root / "train" / "index.json").read_text())
    assert train["class_names"] == [SYNSETS[s] for s in sorted(SYNSETS)] and train["image_size"] == 16
    assert train["channels"] == 1 and train["total"] == 12  # the tokenizer's size and channels
    assert json.loads((root / "validation" / "index.json").read_text())["total"] == 4
    assert check_data(config)["samples"] == 12

    for bad, line in (
            (["data.create.source=folder", "data.create.input=null"],
             "data.create.input: an image folder is required for source 'folder'"),
            ([*overrides[:-3], "data.create.val_fraction=0"],
             "data.create.val_fraction: must be > 0 to create data.validation from the image folder"),
            ([*overrides[:2], "data.create.workers=2"], "data.create.workers: for source 'folder' only")):
        with pytest.raises(ConfigError) as error:
            load_config(TrainVarConfig, tiny, bad)
        assert line in str(error.value) and "\n" not in str(error.value), str(error.value)


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_inside_a_ray_driver_the_shard_tasks_are_ray_tasks(ray_cluster, tmp_path, monkeypatch):
    from pipeline.data import sharding

    used = []
    real = sharding._run_on_ray
    monkeypatch.setattr(sharding, "_run_on_ray", lambda *args: used.append(1) or real(*args))
    folder = _synset_folder(tmp_path / "images", per_class=3)
    config = MakeShardsConfig(source="folder", input=str(folder), output=str(tmp_path / "ray"), image_size=16,
                              samples_per_shard=4, workers=2)
    index = make_shards(config)["train"]
    assert used and index.total == 12 and len(index.shards) == 3
    serial = make_shards(config.model_copy(update={"output": str(tmp_path / "one"), "workers": 1}))["train"]
    assert serial.shards == index.shards
    assert make_shards(config)["train"] == index  # the rerun keeps all three
