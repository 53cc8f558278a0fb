"""Consolidated model exports: `model.safetensors` + `config.json`, what one stage hands the next.

The config carries the model's own arguments, so the folder alone rebuilds the model (nanoGPT's
self-describing checkpoint), plus the sha256 of the weights: downstream artefacts (token caches,
generated sets) record it and refuse to mix models. The safetensors header carries the same
description (format, varray version, model config, class names, data URI, the checksums of the
models it depends on), so the weights file alone rebuilds the model too.

`load_tokenizer(uri)` / `load_var(uri)` take a train_var run folder, an export folder or a
`.safetensors` file, local or on S3.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import posixpath
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from pipeline.core.errors import VarrayError
from pipeline.core.layout import EXPORT_DIR, GPT_RUN, TOKENIZER_RUN
from pipeline.core.storage import exists, join_uri, read_bytes, read_json_object, sha256_of, write_bytes_atomic
from var_model import VAR, VQVAE, TokenizerConfig, VARConfig

TOKENIZER_FORMAT = "varray.tokenizer/1"
VAR_FORMAT = "varray.var/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Where a train_var run keeps each export (pipeline.core.layout: <run>/<stage>/export).
RUN_EXPORTS = {TOKENIZER_FORMAT: f"{TOKENIZER_RUN}/{EXPORT_DIR}", VAR_FORMAT: f"{GPT_RUN}/{EXPORT_DIR}"}
# What the weights file's header carries besides format, version and model config (each as JSON).
HEADER_FIELDS = ("class_names", "data_uri", "tokenizer_checksum", "source")


def varray_version() -> str:
    try:
        return importlib.metadata.version("varray")
    except importlib.metadata.PackageNotFoundError:  # copied as a folder, not installed
        return "unknown"


class ExportError(VarrayError, ValueError):
    """An export whose config.json is not what varray writes, or whose weights do not match it; names the file."""


def _state_dict_bytes(module: torch.nn.Module, header: dict[str, str]) -> bytes:
    # Buffers too (e.g. code-usage statistics); clone() breaks shared storage, which safetensors refuses.
    state = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in module.state_dict().items()}
    return save_safetensors_bytes(state, metadata=header)


def _header(fmt: str, config: dict[str, Any], extra: dict[str, Any]) -> dict[str, str]:
    header = {"format": fmt, "varray_version": varray_version(), "config": json.dumps(config, sort_keys=True)}
    header.update({name: json.dumps(extra[name]) for name in HEADER_FIELDS if extra.get(name) is not None})
    return header


def _save(module: torch.nn.Module, uri: str, fmt: str, config: dict[str, Any], extra: dict[str, Any] | None) -> str:
    weights = _state_dict_bytes(module, _header(fmt, config, extra or {}))
    checksum = hashlib.sha256(weights).hexdigest()
    info = {"format": fmt, "varray_version": varray_version(), "config": config, "checksum": checksum,
            **(extra or {})}
    write_bytes_atomic(join_uri(uri, WEIGHTS_FILE), weights)
    # config.json last: its presence marks a complete export.
    write_bytes_atomic(join_uri(uri, CONFIG_FILE), json.dumps(info, indent=2).encode())
    return checksum


def read_export_info(uri: str) -> dict[str, Any]:
    """The config.json of an export: format, model config, checksum and provenance.

    StorageError if it cannot be read, ExportError (naming the file) if it is not JSON or lacks the
    fields every export has: `format` (a string), `config` (an object), `checksum` (a sha256 hex string).
    """
    config_uri = join_uri(uri, CONFIG_FILE)
    info = read_json_object(config_uri, "an export config", ExportError)
    problems = [f"{name} is {'missing' if name not in info else repr(info[name])[:40]}, expected {what}"
                for name, what, ok in (
                    ("format", "a string", lambda v: isinstance(v, str)),
                    ("config", "an object", lambda v: isinstance(v, dict)),
                    ("checksum", "a sha256 hex string",
                     lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)))
                if not ok(info.get(name))]
    if problems:
        raise ExportError(f"{config_uri}: not an export config: {'; '.join(problems)}")
    return info


def _checksum_mismatch(uri: str, checksum: str, info: dict[str, Any]) -> ExportError:
    return ExportError(f"{join_uri(uri, WEIGHTS_FILE)}: weights checksum {checksum[:12]} does not match "
                       f"{CONFIG_FILE}'s {info['checksum'][:12]} (damaged or replaced weights)")


def verify_weights(uri: str, info: dict[str, Any]) -> None:
    """ExportError unless the export's weights hash to the checksum its config.json records.
    Streams the file: for the driver, which checks before any actor loads the model."""
    checksum = sha256_of(join_uri(uri, WEIGHTS_FILE))
    if checksum != info["checksum"]:
        raise _checksum_mismatch(uri, checksum, info)


def _load_weights(uri: str, info: dict[str, Any]) -> dict[str, torch.Tensor]:
    weights = read_bytes(join_uri(uri, WEIGHTS_FILE))
    checksum = hashlib.sha256(weights).hexdigest()
    if checksum != info["checksum"]:
        raise _checksum_mismatch(uri, checksum, info)
    return load_safetensors_bytes(weights)


def save_tokenizer(model: VQVAE, uri: str, extra: dict[str, Any] | None = None) -> str:
    """Write a tokenizer export under `uri`; returns its checksum."""
    return _save(model, uri, TOKENIZER_FORMAT, model.config.to_dict(), extra)


def save_var(model: VAR, uri: str, extra: dict[str, Any] | None = None) -> str:
    """Write a VAR transformer export under `uri`; returns its checksum."""
    return _save(model, uri, VAR_FORMAT, model.config.to_dict(), extra)


def _expect_format(uri: str, info: dict[str, Any], fmt: str) -> None:
    if info.get("format") != fmt:
        raise ExportError(f"{uri}: export format is {info.get('format')!r}, expected {fmt!r}")


def _file_export(uri: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(the description in its header, the weights) of one self-describing weights file."""
    weights = read_bytes(uri)
    try:
        header = read_safetensors_header(weights)
        info = {name: json.loads(value) for name, value in header.items() if name in ("config", *HEADER_FIELDS)}
        info["format"] = header["format"]
    except (KeyError, ValueError) as exc:
        raise ExportError(f"{uri}: not a varray weights file (its header has no {exc} description)") from None
    info["checksum"] = hashlib.sha256(weights).hexdigest()
    return info, load_safetensors_bytes(weights)


def read_safetensors_header(weights: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's header (the strings its writer put there)."""
    length = int.from_bytes(weights[:8], "little")
    return json.loads(weights[8:8 + length]).get("__metadata__") or {}


def _export_folder(uri: str, fmt: str) -> str:
    """An export folder, or the export of that kind inside a train_var run folder."""
    if exists(join_uri(uri, CONFIG_FILE)):
        return uri
    inside = join_uri(uri, *RUN_EXPORTS[fmt].split("/"))
    if exists(join_uri(inside, CONFIG_FILE)):
        return inside
    raise ExportError(f"{uri}: not an export (no {CONFIG_FILE}) nor a run folder (no {RUN_EXPORTS[fmt]}/{CONFIG_FILE})")


def _load(uri: str, fmt: str, build: Any) -> torch.nn.Module:
    if posixpath.basename(str(uri)).endswith(".safetensors"):
        info, state = _file_export(uri)
    else:
        uri = _export_folder(uri, fmt)
        info = read_export_info(uri)
        state = None
    _expect_format(uri, info, fmt)
    model = build(info["config"])
    model.load_state_dict(state if state is not None else _load_weights(uri, info), strict=True)
    model.checksum = info["checksum"]
    model.export_info = info
    return model.eval()


def load_tokenizer(uri: str) -> VQVAE:
    """Rebuild a tokenizer, in eval mode, with `.checksum` and `.export_info` set, from a run folder, an
    export folder or a weights file."""
    return _load(uri, TOKENIZER_FORMAT, lambda config: VQVAE(TokenizerConfig.from_dict(config)))


def load_var(uri: str) -> VAR:
    """Rebuild a VAR transformer, in eval mode, with `.checksum` and `.export_info` set, from a run folder,
    an export folder or a weights file."""
    return _load(uri, VAR_FORMAT, lambda config: VAR(VARConfig.from_dict(config)))


__all__ = [
    "TOKENIZER_FORMAT",
    "VAR_FORMAT",
    "ExportError",
    "load_tokenizer",
    "load_var",
    "read_export_info",
    "save_tokenizer",
    "save_var",
    "verify_weights",
]
