"""VAR's FID protocol: the generation presets, and a set exported as the .npz OpenAI's evaluator reads."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from pipeline.core.configuration import ConfigError, load_config
from pipeline.core.exports import load_tokenizer, load_var
from pipeline.core.images import decode_png, encode_png
from pipeline.core.storage import fsspec_filesystem, join_uri, write_bytes_atomic
from pipeline.generation.config import GenerateConfig
from pipeline.generation.job import prepare
from pipeline.generation.npz import export_npz
from pipeline.generation.reader import read_generated_set
from pipeline.generation.worker import generate_images
from pipeline.generation.writer import publish_unit
from var_model import NO_GUIDANCE_SAMPLING, OFFICIAL_FID_SAMPLING

BASE = ["model.tokenizer=/t", "model.var=/v", "output.uri=/out"]


def _config(*overrides: str) -> GenerateConfig:
    return load_config(GenerateConfig, None, [*BASE, *overrides])


def test_presets_fill_in_what_the_user_did_not_set():
    fid = _config("preset=fid-50k-style")
    assert fid.plan.per_class == 50 and fid.sampling.settings == OFFICIAL_FID_SAMPLING
    assert (fid.sampling.cfg, fid.sampling.top_k, fid.sampling.top_p) == (1.5, 900, 0.96)
    plain = _config("preset=no-guidance")
    assert plain.plan.per_class == 50 and plain.sampling.settings == NO_GUIDANCE_SAMPLING
    assert (plain.sampling.cfg, plain.sampling.top_k, plain.sampling.top_p) == (0.0, 0, 1.0)
    # Explicit values win; a plan of named classes replaces the preset's per-class count.
    mixed = _config("preset=no-guidance", "plan.per_class=3", "sampling.cfg=2.0", "sampling.batch_size=8")
    assert (mixed.plan.per_class, mixed.sampling.cfg, mixed.sampling.top_k, mixed.sampling.batch_size) == (3, 2.0, 0, 8)
    named = _config("preset=fid-50k-style", "plan.classes={Bag: 4}")
    assert named.plan.per_class is None and named.plan.classes == {"Bag": 4}
    with pytest.raises(ConfigError, match=r"^config error: preset: "):
        _config("preset=fid-10k")
    with pytest.raises(ConfigError, match=r"output.npz: must be a file name ending in .npz"):
        _config("plan.per_class=1", "output.npz=/sets/v1")


def _publish_set(tiny_exports, output: str) -> None:
    """A generated set written in-process by the generation writer (no Ray), 3 classes x 3 images."""
    config = load_config(GenerateConfig, None, [f"model.tokenizer={tiny_exports[0]}", f"model.var={tiny_exports[1]}",
                                                f"output.uri={output}", "preset=fid-50k-style",
                                                "plan.classes={class1: 3, class4: 3, 9: 3}", "plan.unit_size=4"])
    prepared = prepare(config)
    assert prepared.plan["preset"] == "fid-50k-style" and prepared.summary()["sampling"]["top_k"] == 900
    write_bytes_atomic(join_uri(output, "plan.json"), json.dumps(prepared.plan).encode())
    tokenizer, var = load_tokenizer(tiny_exports[0]), load_var(tiny_exports[1])
    for unit in prepared.units:
        images = generate_images(var, tokenizer, unit.labels, unit.seeds, config.sampling.settings, batch_size=4)
        publish_unit(unit, images, [encode_png(image) for image in images], prepared.context, 1.0)


def _streamed_header(path) -> tuple:
    """The array header as guided-diffusion's evaluator reads it (zip member, then .npy magic + header)."""
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as member:
        version = np.lib.format.read_magic(member)
        assert version in ((1, 0), (2, 0))
        return np.lib.format.read_array_header_1_0(member)


@pytest.mark.timeout(120)
def test_npz_export_is_what_the_openai_evaluator_reads(tiny_exports, tmp_path):
    output = str(tmp_path / "set")
    _publish_set(tiny_exports, output)
    written = export_npz(output, str(tmp_path / "fid" / "samples.npz"))
    assert written["images"] == 9 and written["shape"] == [9, 16, 16, 3]
    assert [p.name for p in (tmp_path / "fid").iterdir()] == ["samples.npz"]  # no staging file left

    shape, fortran, dtype = _streamed_header(tmp_path / "fid" / "samples.npz")
    assert shape == (9, 16, 16, 3) and not fortran and dtype == np.uint8
    arrays = np.load(tmp_path / "fid" / "samples.npz")
    images, labels = arrays["arr_0"], arrays["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (9, 16, 16, 3)
    generated = read_generated_set(output)  # grey images repeated to 3 channels, in the set's row order
    assert np.array_equal(images, np.repeat(generated.images[..., None], 3, axis=-1))
    assert labels.tolist() == generated.labels.tolist() == [1, 1, 1, 4, 4, 4, 9, 9, 9]


@pytest.mark.s3
@pytest.mark.timeout(120)
def test_npz_export_to_s3(tiny_exports, tmp_path, s3_bucket):
    output = f"{s3_bucket}/sets/v1"
    _publish_set(tiny_exports, output)
    uri = f"{s3_bucket}/fid/samples.npz"
    assert export_npz(output, uri)["images"] == 9
    fs, path = fsspec_filesystem(uri)
    fs.get(path, str(tmp_path / "copy.npz"))
    images = np.load(tmp_path / "copy.npz")["arr_0"]
    first = read_generated_set(output)
    assert images.shape == (9, 16, 16, 3) and np.array_equal(images[..., 0], first.images)
    assert decode_png(encode_png(images[0])).shape == (16, 16, 3)
