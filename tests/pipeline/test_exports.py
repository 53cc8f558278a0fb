"""Self-describing exports: the weights file's header alone rebuilds the model; load_tokenizer / load_var
take a run folder, an export folder or a weights file, locally or on S3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.core.exports import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ExportError,
    load_tokenizer,
    load_var,
    read_export_info,
    read_safetensors_header,
    save_tokenizer,
    save_var,
    varray_version,
)
from pipeline.core.storage import join_uri, write_bytes_atomic
from var_model import VAR, VQVAE, TokenizerConfig, VARConfig

TOKENIZER = TokenizerConfig(image_size=16, in_channels=1, scales=(1, 2, 4), codebook_size=64, embed_dim=8,
                            base_channels=16, channel_multipliers=(1, 2, 2), num_res_blocks=1, norm_groups=8)
NAMES = ["T-shirt", "Trouser", "Pullover"]


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder with both exports, as train_var lays them out."""
    torch.manual_seed(0)
    tokenizer = VQVAE(TOKENIZER).eval()
    checksum = save_tokenizer(tokenizer, str(tmp_path / "run" / "tokenizer" / "export"),
                              extra={"class_names": NAMES, "data_uri": "/data/train", "step": 4})
    var = VAR(VARConfig(hidden_size=32, num_layers=2, num_heads=2, scales=(1, 2, 4), codebook_size=64, embed_dim=8,
                        num_classes=3)).eval()
    save_var(var, str(tmp_path / "run" / "gpt" / "export"),
             extra={"class_names": NAMES, "tokenizer_checksum": checksum, "data_uri": "/run/token_cache"})
    return tmp_path / "run"


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_the_weights_header_describes_the_model(run):
    export = run / "gpt" / "export"
    header = read_safetensors_header((export / WEIGHTS_FILE).read_bytes())
    info = read_export_info(str(export))
    assert header["format"] == "varray.var/1" and header["varray_version"] == varray_version() != "unknown"
    assert json.loads(header["config"]) == info["config"]
    assert json.loads(header["class_names"]) == NAMES and json.loads(header["data_uri"]) == "/run/token_cache"
    assert json.loads(header["tokenizer_checksum"]) == read_export_info(str(run / "tokenizer" / "export"))["checksum"]


@pytest.mark.parametrize("where", ["run folder", "export folder", "weights file", "weights file alone"])
def test_load_from_a_run_an_export_or_a_file(run, tmp_path, where):
    export = run / "tokenizer" / "export"
    reference = load_tokenizer(str(export))
    if where == "weights file alone":  # no config.json beside it: the header is the description
        alone = tmp_path / "elsewhere" / "tokenizer.safetensors"
        alone.parent.mkdir()
        shutil.copy(export / WEIGHTS_FILE, alone)
        uri = str(alone)
    else:
        uri = str({"run folder": run, "export folder": export, "weights file": export / WEIGHTS_FILE}[where])
    model = load_tokenizer(uri)
    assert _same_weights(model, reference) and model.config == reference.config
    assert model.checksum == reference.checksum == read_export_info(str(export))["checksum"]
    assert model.export_info["class_names"] == NAMES
    assert load_var(str(run)).config.num_classes == 3


def test_a_run_folder_without_that_export_is_one_line(run):
    with pytest.raises(ExportError, match=r"not an export \(no config.json\) nor a run folder"):
        load_var(str(run / "tokenizer"))
    with pytest.raises(ExportError, match="export format is 'varray.tokenizer/1', expected 'varray.var/1'"):
        load_var(str(run / "tokenizer" / "export" / WEIGHTS_FILE))


@pytest.mark.s3
def test_load_from_s3(run, s3_bucket):
    for kind in ("tokenizer", "gpt"):
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            write_bytes_atomic(join_uri(s3_bucket, "run", kind, "export", name),
                               (run / kind / "export" / name).read_bytes())
    assert _same_weights(load_var(join_uri(s3_bucket, "run")), load_var(str(run)))
    weights = join_uri(s3_bucket, "run", "tokenizer", "export", WEIGHTS_FILE)
    assert load_tokenizer(weights).checksum == read_export_info(str(run / "tokenizer" / "export"))["checksum"]
