"""Consolidated model exports: `model.safetensors` + `config.json`, what one stage hands the next.

The config carries the model's own arguments, so the folder alone rebuilds the model (nanoGPT's
self-describing checkpoint), plus the sha256 of the weights: downstream artefacts (token caches,
generated sets) record it and refuse to mix models.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from pipeline.errors import VarrayError
from pipeline.storage import join_uri, read_bytes, sha256_of, write_bytes_atomic
from var_model import VAR, VQVAE, TokenizerConfig, VARConfig

TOKENIZER_FORMAT = "varray.tokenizer/1"
VAR_FORMAT = "varray.var/1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class ExportError(VarrayError, ValueError):
    """An export whose config.json is not what varray writes, or whose weights do not match it; names the file."""


def _state_dict_bytes(module: torch.nn.Module) -> bytes:
    # Buffers too (e.g. code-usage statistics); clone() breaks shared storage, which safetensors refuses.
    state = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in module.state_dict().items()}
    return save_safetensors_bytes(state)


def _save(module: torch.nn.Module, uri: str, fmt: str, config: dict[str, Any], extra: dict[str, Any] | None) -> str:
    weights = _state_dict_bytes(module)
    checksum = hashlib.sha256(weights).hexdigest()
    info = {"format": fmt, "config": config, "checksum": checksum, **(extra or {})}
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
    raw = read_bytes(config_uri)
    try:
        info = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON
        raise ExportError(f"{config_uri}: not an export config: not JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(info, dict):
        raise ExportError(f"{config_uri}: not an export config: a JSON {type(info).__name__}, expected an object")
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


def load_tokenizer(uri: str) -> VQVAE:
    """Rebuild a tokenizer from its export, in eval mode, with `.checksum` set."""
    info = read_export_info(uri)
    _expect_format(uri, info, TOKENIZER_FORMAT)
    model = VQVAE(TokenizerConfig.from_dict(info["config"]))
    model.load_state_dict(_load_weights(uri, info), strict=True)
    model.checksum = info["checksum"]
    return model.eval()


def load_var(uri: str) -> VAR:
    """Rebuild a VAR transformer from its export, in eval mode, with `.checksum` set."""
    info = read_export_info(uri)
    _expect_format(uri, info, VAR_FORMAT)
    model = VAR(VARConfig.from_dict(info["config"]))
    model.load_state_dict(_load_weights(uri, info), strict=True)
    model.checksum = info["checksum"]
    return model.eval()


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
