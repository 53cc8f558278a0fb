"""Bad inputs at the edges of the pipeline: image modes and sizes, shard indexes, exports, S3, output folders.

Each test is one rule of issue 15 and fails on the code before it (374f5db). CLIs run for real where
the rule is about a CLI; the rest call the function the CLI calls.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import one_line_error
from PIL import Image

SIZE = 8  # shard image side; sources are uniform 12 x 12 images, so resizing keeps their colour


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG header for a `width` x `height` 8-bit gray image, with almost no data (a pixel bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (12, 12), 5)
    palette = [0] * 768
    palette[15:18] = [10, 200, 30]  # entry 5
    image.putpalette(palette)
    if transparent:
        image.info["transparency"] = 5
    return image


# file name -> (image or raw bytes, expected RGB of the shard pixels, or None when the file is refused)
MODES = {
    "mode_1.png": (Image.new("1", (12, 12), 1), (255, 255, 255)),
    "mode_L.png": (Image.new("L", (12, 12), 77), (77, 77, 77)),
    "mode_P.png": (_palette_image(False), (10, 200, 30)),
    "mode_P_transparent.png": (_palette_image(True), (255, 255, 255)),  # alpha composited on white
    "mode_LA_half.png": (Image.new("LA", (12, 12), (0, 128)), (127, 127, 127)),
    "mode_RGBA_clear.png": (Image.new("RGBA", (12, 12), (200, 0, 0, 0)), (255, 255, 255)),
    "mode_RGBA_opaque.png": (Image.new("RGBA", (12, 12), (200, 0, 0, 255)), (200, 0, 0)),
    "mode_I16.png": (Image.new("I;16", (12, 12), 40000), (156, 156, 156)),  # 40000 / 257, not clipped to 255
    "mode_I.tif": (Image.new("I", (12, 12), 30000), (117, 117, 117)),
    "mode_F.tif": (Image.new("F", (12, 12), 0.5), (128, 128, 128)),
    "mode_CMYK.tif": (Image.new("CMYK", (12, 12), (255, 0, 0, 0)), (0, 255, 255)),
    "mode_YCbCr.tif": (Image.new("YCbCr", (12, 12), (200, 128, 128)), (200, 200, 200)),
    "mode_LAB.tif": (Image.new("LAB", (12, 12), (255, 128, 128)), (255, 255, 255)),
    "refused_F_range.tif": (Image.new("F", (12, 12), 300.0), None),
    "refused_large.png": (Image.new("RGB", (100, 100), (1, 2, 3)), None),  # past --max-image-pixels 5000
    "refused_bomb.png": (_png_claiming(20000, 20000), None),  # 400 M pixels: PIL itself raised here
    "refused_broken.png": (b"not an image", None),
}


def _write_folder(root: Path) -> Path:
    folder = root / "images" / "things"
    folder.mkdir(parents=True)
    for name, (image, _) in MODES.items():
        if isinstance(image, bytes):
            (folder / name).write_bytes(image)
        else:
            image.save(folder / name)
    return root / "images"


def _shard_pixels(split: Path) -> dict[str, np.ndarray]:
    """{source file name: image} of every sample in a split's shards."""
    found = {}
    for shard in json.loads((split / "index.json").read_text())["shards"]:
        with tarfile.open(split / shard["name"]) as tar:
            files = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}
        for name, data in files.items():
            if name.endswith(".json"):
                png = files[name[: -len(".json")] + ".png"]
                found[Path(json.loads(data)["path"]).name] = np.asarray(Image.open(io.BytesIO(png)))
    return found


def test_folder_source_converts_every_mode_by_its_meaning_and_counts_refusals(cli, tmp_path):
    images = _write_folder(tmp_path)
    output = tmp_path / "shards"
    result = cli("make_shards", "--source", "folder", "--input", str(images), "--image-size", str(SIZE),
                 "--channels", "3", "--max-image-pixels", "5000", "--output", str(output))
    assert result.returncode == 0, result.stderr[-3000:]
    split = json.loads(result.stdout.strip().splitlines()[-1])["splits"]["train"]
    assert split["samples"] == sum(expected is not None for _, expected in MODES.values())
    assert split["refused"] == {"images": 4, "reasons": {"values out of range": 1, "too many pixels": 2,
                                                          "unreadable": 1}}
    for name in ("refused_F_range.tif", "refused_large.png", "refused_bomb.png", "refused_broken.png"):
        assert f"refusing image {images / 'things' / name}" in result.stderr  # the logged line names the file

    pixels = _shard_pixels(output / "train")
    for name, (_, expected) in MODES.items():
        if expected is None:
            assert name not in pixels
            continue
        image = pixels[name]
        assert image.shape == (SIZE, SIZE, 3), name
        assert np.abs(image.astype(int) - np.array(expected)).max() <= 2, (name, image[0, 0], expected)


def test_gray_output_and_default_pixel_limit(tmp_path):
    from pipeline.data.sharding import MakeShardsConfig
    from pipeline.data.sources.image_folder import ImageRefused, load_image

    _write_folder(tmp_path)
    folder = tmp_path / "images" / "things"
    assert load_image(folder / "mode_I16.png", SIZE, 1)[0, 0] == 156
    assert load_image(folder / "mode_RGBA_clear.png", SIZE, 1)[0, 0] == 255
    assert load_image(folder / "mode_CMYK.tif", SIZE, 1)[0, 0] == round(0.587 * 255 + 0.114 * 255)
    assert MakeShardsConfig(source="folder", input=str(folder), output=str(tmp_path / "o"),
                            image_size=SIZE).max_image_pixels == 89_478_485  # PIL's own limit
    with pytest.raises(ImageRefused, match="too many pixels: 20000 x 20000"):
        load_image(folder / "refused_bomb.png", SIZE, 3)  # the default limit, before any decoding


@pytest.mark.parametrize("name", ["../other/shard-000000.tar", "sub/shard-000000.tar", "/etc/passwd",
                                  "s3://elsewhere/shard.tar", "..", "", "C:\\shard.tar"])
def test_a_shard_index_cannot_point_outside_its_split_folder(tmp_path, name):
    from pipeline.core.errors import VarrayError
    from pipeline.data.shards import read_index

    (tmp_path / "index.json").write_text(json.dumps({
        "format": "varray.shards/1", "split": "train", "total": 3, "class_names": ["a"], "image_size": 8,
        "channels": 1, "source": {}, "shards": [{"name": name, "samples": 3, "bytes": 10}]}))
    with pytest.raises(VarrayError) as info:
        read_index(str(tmp_path))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'index.json'}: not a valid shard index: shards[0].name: ")
    assert repr(name) in message and "\n" not in message


@pytest.mark.parametrize("text, problem", [
    ("{not json", "not JSON"),
    ("[1, 2]", "a JSON list, expected an object"),
    (json.dumps({"format": "varray.shards/1", "split": "train"}), "shards: Field required"),
])
def test_a_corrupt_shard_index_is_a_one_line_varray_error(tmp_path, text, problem):
    from pipeline.core.errors import VarrayError
    from pipeline.data.shards import read_index

    (tmp_path / "index.json").write_text(text)
    with pytest.raises(VarrayError, match=re.escape(f"index.json: not a valid shard index: {problem}")) as info:
        read_index(str(tmp_path))
    assert "\n" not in str(info.value)


def test_a_corrupt_shard_index_is_one_line_in_the_cli(cli, tmp_path):
    split = tmp_path / "shards" / "train"
    split.mkdir(parents=True)
    (split / "index.json").write_text("{not json")
    result = cli("train_var", "--config", "configs/tiny.yaml", "--storage", str(tmp_path / "runs"),
                 "--set", f"data.train.shards_uri={split}", "--dry-run")
    assert f"{split / 'index.json'}: not a valid shard index: not JSON" in one_line_error(result, "train_var")


def _exports(root: Path) -> tuple[Path, Path]:
    """A tiny random tokenizer and VAR export, written directly (no training)."""
    import torch

    from pipeline.core.exports import save_tokenizer, save_var
    from var_model import VAR, VQVAE, TokenizerConfig, VARConfig

    torch.manual_seed(0)
    tokenizer = TokenizerConfig(image_size=16, in_channels=1, scales=(1, 2, 4), codebook_size=64, embed_dim=8,
                                base_channels=16, channel_multipliers=(1, 2, 2), num_res_blocks=1, norm_groups=8)
    save_tokenizer(VQVAE(tokenizer), str(root / "tokenizer"))
    save_var(VAR(VARConfig(hidden_size=32, num_layers=2, num_heads=2, scales=tokenizer.scales,
                           codebook_size=tokenizer.codebook_size, embed_dim=tokenizer.embed_dim, num_classes=3)),
             str(root / "var"))
    return root / "tokenizer", root / "var"


@pytest.mark.parametrize("info, problem", [
    ("[]", "a JSON list, expected an object"),
    ('{"format": "varray.tokenizer/1", "config": {}}', "checksum is missing, expected a sha256 hex string"),
    ('{"format": "varray.tokenizer/1", "config": [], "checksum": "x"}', "config is [], expected an object"),
])
def test_a_corrupt_export_config_is_a_one_line_varray_error(tmp_path, info, problem):
    from pipeline.core.errors import VarrayError
    from pipeline.core.exports import read_export_info

    (tmp_path / "config.json").write_text(info)
    with pytest.raises(VarrayError, match=re.escape(f"config.json: not an export config: {problem}")) as raised:
        read_export_info(str(tmp_path))
    assert "\n" not in str(raised.value)


def test_a_corrupt_export_config_is_one_line_in_generate_dataset(cli, tmp_path):
    tokenizer, var = _exports(tmp_path)
    (tokenizer / "config.json").write_text('{"format": "varray.tokenizer/1", "config": ')
    result = cli("generate_dataset", "--tokenizer", str(tokenizer), "--var", str(var), "--output",
                 str(tmp_path / "set"), "--per-class", "1", "--dry-run")
    line = one_line_error(result, "generate_dataset")
    assert f"{tokenizer / 'config.json'}: not an export config: not JSON" in line


def test_a_weights_checksum_mismatch_stops_generation_before_ray(cli, tmp_path):
    tokenizer, var = _exports(tmp_path)
    weights = (var / "model.safetensors").read_bytes()
    (var / "model.safetensors").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))  # one bit flipped
    started = time.monotonic()
    # Not a dry run: the check must come before any actor would load the weights. An unreachable
    # RAY_ADDRESS shows that no Ray connection was even tried.
    result = cli("generate_dataset", "--tokenizer", str(tokenizer), "--var", str(var), "--output",
                 str(tmp_path / "set"), "--per-class", "1", env={"RAY_ADDRESS": "127.0.0.1:1"}, timeout=120)
    line = one_line_error(result, "generate_dataset")
    assert f"model.var: {var / 'model.safetensors'}: weights checksum" in line and "does not match" in line
    assert time.monotonic() - started < 60
    assert not (tmp_path / "set").exists()


def _tiny_folder(root: Path, count: int = 3) -> Path:
    folder = root / "images" / "only"
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (12, 12), (i * 40, 0, 0)).save(folder / f"{i}.png")
    return root / "images"


S3_ENV = {"AWS_ACCESS_KEY_ID": "not-a-key", "AWS_SECRET_ACCESS_KEY": "wrong", "AWS_REGION": "us-east-1",
          "AWS_DEFAULT_REGION": "us-east-1"}


def test_make_shards_with_refused_credentials_is_one_line(cli, tmp_path, auth_s3_endpoint):
    images = _tiny_folder(tmp_path)
    result = cli("make_shards", "--source", "folder", "--input", str(images), "--image-size", str(SIZE),
                 "--output", "s3://some-bucket/shards", env={**S3_ENV, "AWS_ENDPOINT_URL": auth_s3_endpoint})
    line = one_line_error(result, "make_shards")
    assert "s3://some-bucket/shards/train: access denied" in line
    assert "During handling" not in result.stderr and "direct cause" not in result.stderr


def test_make_shards_with_an_unreachable_endpoint_is_one_line_and_bounded(cli, tmp_path, monkeypatch):
    from local_servers import free_port

    from pipeline.core.storage import (
        StorageError,
        StorageOptions,
        exists,
        fsspec_filesystem,
        pyarrow_filesystem,
    )

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    images = _tiny_folder(tmp_path)
    result = cli("make_shards", "--source", "folder", "--input", str(images), "--image-size", str(SIZE),
                 "--output", "s3://some-bucket/shards", env={**S3_ENV, "AWS_ENDPOINT_URL": endpoint})
    line = one_line_error(result, "make_shards")
    assert "s3://some-bucket/shards/train: Could not connect to the endpoint URL" in line

    # The bound, measured without the CLI's imports; and the knobs that set it.
    options = StorageOptions(endpoint_url=endpoint, access_key_id="k", secret_access_key="s")
    assert (options.connect_timeout, options.max_attempts) == (2.0, 3)
    started = time.monotonic()
    with pytest.raises(StorageError, match="Could not connect"):
        exists("s3://some-bucket/x", options)
    assert time.monotonic() - started < 10
    monkeypatch.setenv("VARRAY_S3_CONNECT_TIMEOUT", "0.5")
    monkeypatch.setenv("VARRAY_S3_MAX_ATTEMPTS", "1")
    configured = StorageOptions.from_env()
    assert (configured.connect_timeout, configured.max_attempts) == (0.5, 1)
    fs, _ = fsspec_filesystem("s3://b/x", configured)
    assert fs.config_kwargs == {"connect_timeout": 0.5, "retries": {"max_attempts": 1, "mode": "standard"}}
    assert pyarrow_filesystem("s3://b/x", configured)[0] is not None
    monkeypatch.setenv("VARRAY_S3_MAX_ATTEMPTS", "0")
    with pytest.raises(StorageError, match="VARRAY_S3_MAX_ATTEMPTS: Input should be greater than or equal to 1"):
        StorageOptions.from_env()


def test_make_shards_deletes_nothing_it_did_not_write(tmp_path, monkeypatch):
    from pipeline.core.errors import VarrayError
    from pipeline.data import sharding
    from pipeline.data.sharding import MakeShardsConfig, make_shards

    images = _tiny_folder(tmp_path, count=5)
    output = tmp_path / "out"
    split = output / "train"
    # One worker: the failure below counts calls in this process (forked workers would count apart).
    config = MakeShardsConfig(source="folder", input=str(images), output=str(output), image_size=SIZE,
                              samples_per_shard=2, workers=1)

    # A split folder holding someone else's files (or someone else's shards) is refused, untouched.
    split.mkdir(parents=True)
    (output / "README.txt").write_text("mine")  # next to the split folders: never looked at
    for foreign in ("notes.txt", "shard-000000.tar"):
        (split / foreign).write_text("theirs")
        with pytest.raises(VarrayError, match=f"{split}: holds"):
            make_shards(config)
        assert (split / foreign).read_text() == "theirs"
        (split / foreign).unlink()

    # A failure in the middle: the shard being written is dropped (no staging file, nothing half-published).
    real = sharding.image_folder.read_image_or_refusal
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(sharding.image_folder, "read_image_or_refusal", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        make_shards(config)
    assert sorted(os.listdir(split)) == [".make_shards-in-progress.json", "shard-000000.stats.json",
                                         "shard-000000.tar"]
    monkeypatch.setattr(sharding.image_folder, "read_image_or_refusal", real)

    # A killed run's staging file is its own: the rerun removes it and finishes the split.
    (split / ".shard-000001.tar.abcd_123.tmp").write_bytes(b"partial")
    assert make_shards(config)["train"].total == 5
    assert sorted(os.listdir(split)) == ["index.json", *(f"shard-00000{i}.{kind}" for i in range(3)
                                                         for kind in ("stats.json", "tar"))]

    # A rerun with bigger shards removes the shards its old index listed and the new one does not.
    bigger = config.model_copy(update={"samples_per_shard": 5})
    assert len(make_shards(bigger)["train"].shards) == 1
    assert sorted(os.listdir(split)) == ["index.json", "shard-000000.stats.json", "shard-000000.tar"]
    assert (output / "README.txt").read_text() == "mine"
